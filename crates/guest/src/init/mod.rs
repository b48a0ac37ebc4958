//! The parts of `cela-init`, one concern per module, in the order a boot uses them:
//! [`mounts`], [`modules`], [`net`] (and [`hosts`]), [`tty`], [`vsock`] and [`control`], [`rootfs`], [`workload`],
//! [`supervise`] (with [`resume`] for a machine restored from a snapshot), [`agent`], [`power`];
//! [`boot`] strings them together. [`nc`] is an applet (`cela-init nc`), not part of a boot.

pub mod agent;
pub mod boot;
pub mod control;
pub mod hosts;
pub mod modules;
pub mod mounts;
pub mod nc;
pub mod net;
pub mod power;
pub mod resume;
pub mod rootfs;
pub mod supervise;
pub mod tty;
pub mod vsock;
pub mod workload;

use std::fmt;
use std::io::Write as _;

/// Prints one `cela-init: ...` line on init's standard error (the kernel console).
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::init::print_line(format_args!($($arg)*))
    };
}
pub(crate) use say;

/// Writes one line as a single `write`, so it is not interleaved with the workload's output.
/// Errors are ignored: there is nowhere else to report them.
pub fn print_line(args: fmt::Arguments<'_>) {
    let line = format!("cela-init: {args}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// A scratch directory for tests, removed on drop (no `tempfile` dependency for so little).
#[cfg(test)]
pub struct TestDir(std::path::PathBuf);

#[cfg(test)]
impl TestDir {
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cela-init-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("creating a test directory");
        TestDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
