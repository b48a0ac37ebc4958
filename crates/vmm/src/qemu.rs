//! QEMU TCG fallback engine (placeholder until the real module lands).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("qemu engine not built yet")]
pub struct QemuError;

pub fn available() -> Result<PathBuf, QemuError> {
    Err(QemuError)
}

pub fn run(
    _c: &crate::MachineConfig,
    _m: crate::ConsoleMode,
) -> Result<crate::GuestExit, QemuError> {
    Err(QemuError)
}
