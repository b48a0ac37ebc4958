//! `cela-init`: PID 1 of every cela microVM.
//!
//! The kernel starts it from the initramfs. It mounts the pseudo-filesystems, loads the kernel
//! modules the initramfs carries, reads what the host asked for from the kernel command line
//! (see the `cela_guest` library for the host/guest contract), runs the workload or an
//! interactive shell on the serial console, reports the workload's status on the control
//! channel and powers the machine off. It never returns: PID 1 exiting panics the kernel.

mod init;

fn main() {
    init::boot::run()
}
