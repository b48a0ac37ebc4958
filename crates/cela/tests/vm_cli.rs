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

#[test]
fn qemu_fallback_boots_a_rootfs_and_keeps_what_it_writes() {
    let a = guest_assets();
    let (k, i) = (a.kernel.to_str().unwrap(), a.initrd.to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let image = common::busybox_rootfs(dir.path(), "from-the-rootfs");
    let img = image.to_str().unwrap();
    let data = dir.path().join("data.img");
    std::fs::write(&data, vec![0u8; 1 << 20]).unwrap();
    let run = |rootfs: &str, script: &str| {
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
            data.to_str().unwrap(),
            "--rootfs",
            rootfs,
            "--",
            "sh",
            "-c",
            script,
        ]);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        text(&out.stdout)
    };
    // Read-only, an image without the mount points cela-init moves into it cannot be used.
    let out = run_cela(&[
        "run",
        "--vm",
        "--engine",
        "qemu",
        "--kernel",
        k,
        "--initrd",
        i,
        "--rootfs",
        &format!("{img},ro"),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stdout).contains("the root filesystem has no /proc directory"),
        "{}",
        text(&out.stdout)
    );
    // The command runs in the image, on a read-write root; --disk keeps /dev/vda and the
    // rootfs disk comes after it, each with its serial.
    let out = run(
        img,
        "cat /etc/marker; grep ' / ' /proc/mounts | cut -d' ' -f3,4 | cut -d, -f1; \
         echo $(cat /sys/block/vda/serial); echo $(cat /sys/block/vdb/serial); echo kept > /written",
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["from-the-rootfs", "ext4 rw", "data.img", "cela-rootfs"],
        "{out}"
    );
    // Written data survives, the image was left clean, and `,ro` mounts it read-only.
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn", img])
        .output()
        .unwrap();
    assert!(fsck.status.success(), "e2fsck: {}", text(&fsck.stdout));
    let out = run(
        &format!("{img},ro"),
        "cat /written; grep ' / ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1; \
         (echo x > /new) 2>/dev/null; echo write=$?",
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["kept", "ro", "write=1"],
        "{out}"
    );
}

#[test]
fn a_rootfs_that_is_not_ext4_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("zeros.img");
    std::fs::write(&bad, vec![0u8; 8192]).unwrap();
    assert_error(
        &[
            "run",
            "--vm",
            "--rootfs",
            bad.to_str().unwrap(),
            "--",
            "true",
        ],
        "is not an ext4 image (no superblock magic 0xef53 at byte 1080",
    );
    assert_error(
        &[
            "run",
            "--vm",
            "--rootfs",
            "/nonexistent/root.ext4",
            "--",
            "true",
        ],
        "--rootfs /nonexistent/root.ext4: no such file",
    );
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
            "is the same file as disk",
        );
    }
    assert_eq!(std::fs::read(a).unwrap(), vec![0u8; 4096]);
}
