//! Ending the machine. The VMM sees an ACPI power-off (S5) or a reset and ends the VM.

use nix::sys::reboot::{RebootMode, reboot};
use nix::unistd::sync;

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
    sync();
    let Err(e) = reboot(mode);
    say!("reboot({mode:?}): {e}");
    // Only reached if the kernel refused; halting is the last resort, then wait forever
    // (PID 1 must not exit).
    let _ = reboot(RebootMode::RB_HALT_SYSTEM);
    loop {
        nix::unistd::pause();
    }
}
