//! The defence against CVE-2019-5736: a process that enters a container runs from a sealed
//! in-memory copy of its own executable, never from the file on the host.
//!
//! A container's init, and every process `exec` starts, is a fork of the runtime until it
//! executes the container's program. A container whose program is `#!/proc/self/exe` (or that
//! opens `/proc/PID/exe` of such a process while it is in the container's namespaces) gets the
//! *runtime's* executable: with the file on the host, it could open it and, once the runtime
//! exits, write its own code into `cela-runc` or `cela`, which root runs next. Re-executing
//! from a sealed memfd first (runc does the same, and youki through the same crate) means the
//! file behind `/proc/self/exe` is an anonymous copy that no one can write (`F_SEAL_WRITE`,
//! `F_SEAL_GROW`, `F_SEAL_SHRINK`, `F_SEAL_SEAL`); the host binary is never reachable.
//!
//! Only the commands that put a process into a container pay for the copy (a few milliseconds
//! for a 20 MiB binary); the check on the re-executed side is one `fcntl`.

use std::io;

/// Re-executes this process from a sealed copy of its executable, with the same arguments and
/// environment, unless it already runs from one. Returns only when it does (or on failure).
pub fn reexec_sealed() -> io::Result<()> {
    pentacle::ensure_sealed()
}

/// Whether this process runs from a sealed copy of its executable.
pub fn is_sealed() -> bool {
    pentacle::is_sealed()
}
