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
fn a_vsock_path_that_exists_or_has_no_directory_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let taken = dir.path().join("taken");
    std::fs::write(&taken, "keep").unwrap();
    assert_error(
        &[
            "run",
            "--vm",
            "--vsock",
            taken.to_str().unwrap(),
            "--",
            "true",
        ],
        "already there",
    );
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep");
    let missing = dir.path().join("no/dir/v.sock");
    assert_error(
        &[
            "run",
            "--vm",
            "--vsock",
            missing.to_str().unwrap(),
            "--",
            "true",
        ],
        "its directory does not exist",
    );
    assert!(!dir.path().join("no").exists());
}

#[test]
fn vsock_on_the_qemu_engine_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let p = path.to_str().unwrap();
    assert_error(
        &[
            "run", "--vm", "--engine", "qemu", "--vsock", p, "--", "true",
        ],
        "--vsock needs cela's KVM engine",
    );
    assert!(!path.exists());
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

#[test]
fn qemu_fallback_gives_the_disks_in_order_and_honours_read_only() {
    let a = guest_assets();
    let (k, i) = (a.kernel.to_str().unwrap(), a.initrd.to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let mut content = b"hello-from-host!".to_vec();
    content.resize(1 << 20, 0);
    std::fs::write(&da, &content).unwrap();
    std::fs::write(&db, vec![0u8; 2 << 20]).unwrap();
    let out = run_cela(&[
        "run",
        "--vm",
        "--engine",
        "qemu",
        "--kernel",
        k,
        "--initrd",
        i,
        "--disk",
        &format!("{},ro", da.to_str().unwrap()),
        "--disk",
        db.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "cat /sys/block/vda/size /sys/block/vdb/size /sys/block/vda/ro; head -c 16 /dev/vda; echo; \
         printf cela-disk-ok | dd of=/dev/vdb conv=notrunc,fsync 2>/dev/null; echo rw=$?; \
         printf x | dd of=/dev/vda conv=notrunc,fsync 2>/dev/null; echo ro=$?",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..5],
        ["2048", "4096", "1", "hello-from-host!", "rw=0"],
        "{stdout}"
    );
    assert!(
        lines[5].starts_with("ro=") && lines[5] != "ro=0",
        "{stdout}"
    );
    assert_eq!(std::fs::read(&da).unwrap(), content);
    assert_eq!(&std::fs::read(&db).unwrap()[..12], b"cela-disk-ok");
}

/// `--disk` bad input, checked before the engine is chosen or any guest file is looked at.
#[test]
fn a_missing_disk_is_named() {
    assert_error(
        &[
            "run",
            "--vm",
            "--disk",
            "/nonexistent/disk.img",
            "--",
            "true",
        ],
        "--disk /nonexistent/disk.img: no such file",
    );
}

#[test]
fn a_directory_is_not_a_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_error(
        &["run", "--vm", "--disk", &format!("{d},ro"), "--", "true"],
        "is a directory",
    );
}

#[test]
fn a_disk_that_cannot_be_opened_read_write_is_refused() {
    // A read-only sysfs attribute cannot be opened for writing, even by root (the tests may run
    // as root, for whom file modes do not restrict access).
    assert_error(
        &[
            "run",
            "--vm",
            "--disk",
            "/sys/devices/system/cpu/online",
            "--",
            "true",
        ],
        "--disk /sys/devices/system/cpu/online: cannot open it read-write",
    );
}

#[test]
fn the_same_file_twice_read_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    std::fs::write(&a, vec![0u8; 4096]).unwrap();
    let link = dir.path().join("other-name.img");
    std::fs::hard_link(&a, &link).unwrap();
    let (a, link) = (a.to_str().unwrap(), link.to_str().unwrap());
    for (first, second) in [
        (a.to_string(), a.to_string()),
        (format!("{a},ro"), link.to_string()),
        (a.to_string(), format!("{link},ro")),
    ] {
        assert_error(
            &[
                "run", "--vm", "--disk", &first, "--disk", &second, "--", "true",
            ],
            "is the same file as --disk",
        );
    }
    assert_eq!(std::fs::read(a).unwrap(), vec![0u8; 4096]);
}
