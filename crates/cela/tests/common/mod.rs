//! Shared fixtures for cela's integration tests: the built binaries and the default guest
//! assets (fetched once into a cache shared by test runs).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The `cela` binary under test.
pub fn cela() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cela"))
}

/// `cela-init`, built by the same cargo invocation profile next to `cela`.
pub fn cela_init() -> PathBuf {
    let p = cela().with_file_name("cela-init");
    assert!(
        p.is_file(),
        "{} is missing: build every binary first (cargo build --release --workspace --bins), as scripts/test does",
        p.display()
    );
    p
}

/// The assets cache tests share (CELA_TEST_CACHE, default /var/tmp/cela-test-cache), so that
/// repeated runs are offline.
pub fn test_cache() -> PathBuf {
    std::env::var_os("CELA_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/cela-test-cache"))
}

/// The default guest kernel and initramfs, built once per test process.
pub fn guest_assets() -> &'static cela_assets::GuestAssets {
    static ASSETS: OnceLock<cela_assets::GuestAssets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        cela_assets::guest_assets(
            &test_cache().join("assets"),
            &cela_init(),
            &cela_assets::Progress::hidden(),
        )
        .unwrap_or_else(|e| panic!("cannot prepare the guest assets: {e}"))
    })
}

/// Runs `cela` with `args` and a data dir inside the test cache; stdin is /dev/null.
pub fn run_cela(args: &[&str]) -> Output {
    Command::new(cela())
        .args(args)
        .env("CELA_DATA_DIR", test_cache().join("data"))
        .env("CELA_INIT", cela_init())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cela runs")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
