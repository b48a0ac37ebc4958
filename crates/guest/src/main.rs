//! `cela-init`: PID 1 of every cela microVM.
//!
//! The kernel starts it from the initramfs. It mounts the pseudo-filesystems, loads the kernel
//! modules the initramfs carries, reads what the host asked for from the kernel command line
//! (see the `cela_guest` library for the host/guest contract), runs the workload or an
//! interactive shell on the serial console, reports the workload's status on the control
//! channel and powers the machine off. It never returns: PID 1 exiting panics the kernel.
//!
//! Run as `cela-init nc ...` (not as PID 1) it is a small netcat for vsock and Unix sockets
//! (see `init::nc`).

mod init;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("nc") {
        std::process::exit(init::nc::main(&args[2..]));
    }
    init::boot::run()
}
