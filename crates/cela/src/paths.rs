//! Where cela keeps its files, and where it finds the binaries built alongside it.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The data directory: `--data-dir`, else $CELA_DATA_DIR, else /var/lib/cela.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("CELA_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/cela"))
}

/// The runtime directory: $CELA_RUN_DIR, else /run/cela (created if missing).
pub fn run_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("CELA_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/cela"));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the run directory {}", dir.display()))?;
    Ok(dir)
}

/// The `--vsock` socket when no path is given: one per cela process in the run directory.
pub fn default_vsock_socket() -> anyhow::Result<PathBuf> {
    Ok(run_dir()?.join(format!("vsock-{}.sock", std::process::id())))
}

/// The guest assets cache inside the data directory.
pub fn assets_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("assets")
}

/// The `cela-init` binary that goes into guest initramfs images (see
/// [`cela_assets::guest_init`]).
pub fn guest_init() -> anyhow::Result<PathBuf> {
    Ok(cela_assets::guest_init()?)
}
