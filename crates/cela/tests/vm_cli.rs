//! `cela run --vm` on this host, without the lab: bad input is refused with a clear error and
//! status 125 before anything is created, and the QEMU fallback engine runs the real Debian
//! kernel with the same output and status semantics as the KVM engine (compare vm_lab.rs).

mod common;

use common::{guest_assets, run_cela, text};

fn assert_error(args: &[&str], needle: &str) {
    let out = run_cela(args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "cela {args:?}: stderr: {err}");
    assert!(
        err.contains(needle),
        "cela {args:?}: expected {needle:?} in stderr: {err}"
    );
    assert!(
        err.lines().any(|l| l.starts_with("cela: error: ")),
        "one clear error line: {err}"
    );
}

#[test]
fn missing_kernel_is_named() {
    assert_error(
        &[
            "run",
            "--vm",
            "--kernel",
            "/nonexistent/bzImage",
            "--",
            "true",
        ],
        "/nonexistent/bzImage",
    );
}

#[test]
fn missing_initrd_is_named() {
    let a = guest_assets();
    let k = a.kernel.to_str().unwrap();
    assert_error(
        &[
            "run",
            "--vm",
            "--kernel",
            k,
            "--initrd",
            "/nonexistent/initrd",
            "--",
            "true",
        ],
        "/nonexistent/initrd",
    );
}

#[test]
fn a_file_that_is_not_a_bzimage_is_refused_naming_the_magic() {
    let a = guest_assets();
    let i = a.initrd.to_str().unwrap();
    // The initramfs is a real file but not a kernel.
    assert_error(
        &["run", "--vm", "--kernel", i, "--initrd", i, "--", "true"],
        "HdrS",
    );
}

#[test]
fn impossible_cpu_and_memory_counts_are_refused() {
    let a = guest_assets();
    let (k, i) = (a.kernel.to_str().unwrap(), a.initrd.to_str().unwrap());
    assert_error(
        &[
            "run", "--vm", "--kernel", k, "--initrd", i, "--cpus", "0", "--", "true",
        ],
        "--cpus must be at least 1",
    );
    assert_error(
        &[
            "run", "--vm", "--kernel", k, "--initrd", i, "--cpus", "1000", "--", "true",
        ],
        "--cpus 1000",
    );
    assert_error(
        &[
            "run", "--vm", "--kernel", k, "--initrd", i, "--memory", "8", "--", "true",
        ],
        "too small",
    );
    assert_error(
        &[
            "run",
            "--vm",
            "--kernel",
            k,
            "--initrd",
            i,
            "--memory",
            "100000000",
            "--",
            "true",
        ],
        "more than this host has",
    );
}

#[test]
fn a_malformed_env_flag_is_refused() {
    assert_error(
        &["run", "--vm", "-e", "NOEQUALS", "--", "true"],
        "KEY=VALUE",
    );
}

#[test]
fn forcing_an_unusable_kvm_is_a_clear_error() {
    // This host's /dev/kvm is PVM (or absent in some CI sandboxes): either way, not usable for
    // a stock kernel, and cela must say why rather than try.
    if cela_vmm::engine::kvm_can_boot_linux().is_ok() {
        eprintln!("this host's KVM can boot Linux; the refusal path is not reachable here");
        return;
    }
    assert_error(
        &["run", "--vm", "--engine", "kvm", "--", "true"],
        "--engine kvm:",
    );
}

#[test]
fn qemu_fallback_gives_the_same_output_and_status() {
    let a = guest_assets();
    let (k, i) = (a.kernel.to_str().unwrap(), a.initrd.to_str().unwrap());
    let out = run_cela(&[
        "run",
        "--vm",
        "--engine",
        "qemu",
        "--kernel",
        k,
        "--initrd",
        i,
        "--",
        "sh",
        "-c",
        "echo hi; exit 7",
    ]);
    assert_eq!(text(&out.stdout), "hi\n", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
}
