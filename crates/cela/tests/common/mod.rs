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

/// Runs `scenarios` (name, L1 shell script in which `$CELA` is `cela run --vm` with the lab's
/// kernel and initramfs on the KVM engine) in one nested-lab boot, each bounded by
/// `per_scenario` and the whole batch by `batch`. When L1 itself stops responding (seen once in
/// a loaded CI run: L1 froze mid-batch and its own per-scenario `timeout` never fired — the
/// emulated lab failing, not cela), the batch runs once more; any other failure, and a second
/// freeze, panic.
pub fn run_lab_batch(
    scenarios: &[(&str, &str)],
    per_scenario: std::time::Duration,
    batch: std::time::Duration,
) -> cela_lab::LabReport {
    use cela_lab::{Lab, LabError, LabRun, Scenario};
    let assets = guest_assets();
    let lab = Lab::new().unwrap_or_else(|e| panic!("the nested lab is unavailable: {e}"));
    let mut run = LabRun::new()
        .file(cela(), "/lab/cela")
        .file(&assets.kernel, "/lab/bzImage")
        .file(&assets.initrd, "/lab/initrd.cpio");
    for (name, body) in scenarios {
        let script = format!(
            "CELA='./cela run --vm --engine kvm --kernel /lab/bzImage --initrd /lab/initrd.cpio'\n{body}"
        );
        run = run.scenario(Scenario::new(*name, script).with_timeout(per_scenario));
    }
    run.timeout = batch;
    match lab.run(&run) {
        Err(e @ LabError::Timeout { .. }) => {
            eprintln!("the nested lab stopped responding ({e}); running the batch once more");
            lab.run(&run)
        }
        other => other,
    }
    .unwrap_or_else(|e| panic!("the lab run failed: {e}"))
}
