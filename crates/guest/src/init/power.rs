//! Ending the machine. The VMM sees an ACPI power-off (S5) or a reset and ends the VM.

use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, sync};

use super::say;

/// Stops the kernel from printing anything more on the console, not even its own
/// `reboot: Power down` line, so that the host reads exactly the workload's bytes. Only for
/// the very end of a run: a panic after this is silent too (the engine still reports it).
pub fn silence_kernel_console() {
    // `/proc/sys/kernel/printk` starts with the console log level; 0 prints nothing.
    if let Err(e) = std::fs::write("/proc/sys/kernel/printk", "0") {
        say!("warning: silencing the kernel console: {e}");
    }
}

/// Flushes filesystems and powers the machine off. Never returns.
pub fn power_off() -> ! {
    end(RebootMode::RB_POWER_OFF)
}

/// Flushes filesystems and resets the machine (cela then ends the VM). Never returns.
pub fn restart() -> ! {
    end(RebootMode::RB_AUTOBOOT)
}

fn end(mode: RebootMode) -> ! {
    quiesce();
    let Err(e) = reboot(mode);
    say!("reboot({mode:?}): {e}");
    // Only reached if the kernel refused; halting is the last resort, then wait forever
    // (PID 1 must not exit).
    let _ = reboot(RebootMode::RB_HALT_SYSTEM);
    loop {
        nix::unistd::pause();
    }
}

/// How long the other processes get to die before the machine ends anyway (one stuck in the
/// kernel must not keep the VM running).
const QUIESCE_BOUND: Duration = Duration::from_secs(2);

/// Kills every other process, reaps them, flushes, and remounts the root read-only, so that a
/// root disk (`--rootfs`) is left clean: its journal needs no replay and a later read-only
/// boot can mount it. On the initramfs root the remount is harmless.
fn quiesce() {
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let deadline = Instant::now() + QUIESCE_BOUND;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(WaitStatus::StillAlive) => break,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            // ECHILD: nothing left.
            Err(_) => break,
        }
    }
    sync();
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
}
