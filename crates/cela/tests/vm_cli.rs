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
fn a_reserved_vsock_cid_or_one_without_vsock_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let p = path.to_str().unwrap();
    for cid in ["0", "2", "4294967295"] {
        assert_error(
            &[
                "run",
                "--vm",
                "--vsock",
                p,
                "--vsock-cid",
                cid,
                "--",
                "true",
            ],
            "reserved or too large",
        );
    }
    // A usage error, from the argument parser.
    let out = run_cela(&["run", "--vm", "--vsock-cid", "7", "--", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--vsock"),
        "{}",
        text(&out.stderr)
    );
    assert!(!path.exists());
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

/// `--net` tests that create or look for TAP devices run one at a time, so that one test's
/// TAP is not mistaken for another's leftover.
fn net_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host's network interfaces named like `--net auto`'s TAPs, and its addresses in the
/// pool `--net auto` takes them from.
fn net_auto_leftovers() -> (Vec<String>, String) {
    let taps = common::net_auto_taps();
    let route = std::fs::read_to_string("/proc/net/route").unwrap();
    // 10.213.x.x in /proc/net/route's byte order ends in D50A.
    let pool: String = route.lines().filter(|l| l.contains("D50A\t")).collect();
    (taps, pool)
}

#[test]
fn a_malformed_net_flag_is_refused() {
    for bad in ["bogus", "tap", "tap=", "tap=a/b", "auto,tap=x"] {
        assert_error(
            &["run", "--vm", "--net", bad, "--", "true"],
            "expected `auto` or `tap=NAME`",
        );
    }
}

#[test]
fn a_tap_that_does_not_exist_is_named_and_not_created() {
    let _lock = net_lock();
    assert_error(
        &["run", "--vm", "--net", "tap=cela-nosuch", "--", "true"],
        "TAP device \"cela-nosuch\": no such network interface",
    );
    assert!(!std::path::Path::new("/sys/class/net/cela-nosuch").exists());
}

#[test]
fn an_interface_that_is_not_a_tap_is_refused() {
    let _lock = net_lock();
    assert_error(
        &["run", "--vm", "--net", "tap=lo", "--", "true"],
        "\"lo\" is a network interface but not a TAP device",
    );
}

#[test]
fn net_auto_leaves_nothing_behind_when_the_vm_cannot_start() {
    let _lock = net_lock();
    let a = guest_assets();
    let (k, i) = (a.kernel.to_str().unwrap(), a.initrd.to_str().unwrap());
    let before = net_auto_leftovers();
    // The TAP and its address are made before the machine is validated and refused.
    assert_error(
        &[
            "run", "--vm", "--kernel", k, "--initrd", i, "--net", "auto", "--cpus", "1000", "--",
            "true",
        ],
        "--cpus 1000",
    );
    assert_eq!(net_auto_leftovers(), before);
}

#[test]
fn qemu_fallback_connects_the_guest_with_net_auto() {
    let _lock = net_lock();
    let a = guest_assets();
    let (k, i) = (a.kernel.to_str().unwrap(), a.initrd.to_str().unwrap());
    let before = net_auto_leftovers();
    let out = run_cela(&[
        "run",
        "--vm",
        "--engine",
        "qemu",
        "--kernel",
        k,
        "--initrd",
        i,
        "--net",
        "auto",
        "--",
        "sh",
        "-c",
        "ip -4 -o addr show | grep -v ' lo ' | awk '{print $4}'; \
         gw=$(ip route | awk '/^default/ {print $3}'); echo gw=$gw; \
         ping -c 1 -W 20 $gw >/dev/null && echo ping=ok",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} stderr: {}",
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("10.213.") && l.ends_with("/30")),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("gw=10.213.")),
        "{stdout}"
    );
    assert!(lines.contains(&"ping=ok"), "{stdout}");
    assert_eq!(net_auto_leftovers(), before);
}

#[test]
fn qemu_fallback_runs_qemu_under_its_sandbox_in_the_monitors_jail() {
    // `-sandbox on,...`: QEMU's own seccomp filter; and around it the jail cela's own monitor
    // runs in (cela_vmm::jail), all seen from the host while it runs.
    let a = guest_assets();
    let (k, i) = (a.kernel.to_str().unwrap(), a.initrd.to_str().unwrap());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cela"))
        .args([
            "run", "--vm", "--engine", "qemu", "--kernel", k, "--initrd", i, "--",
        ])
        .args(["sh", "-c", "echo up; read x; exit 0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "up\n", "the guest never came up");
    let cela = child.id().to_string();
    let field = |status: &str, name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:\t")))
            .unwrap_or("")
            .to_owned()
    };
    let ppid = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|s| field(&s, "PPid"))
            .unwrap_or_default()
    };
    // cela → the jail's reaper → QEMU.
    let (qemu_pid, qemu) = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().into_owned();
            let status = std::fs::read_to_string(p.path().join("status")).ok()?;
            Some((pid, status))
        })
        .find(|(_, s)| {
            field(s, "Name").starts_with("qemu-system") && ppid(&field(s, "PPid")) == cela
        })
        .expect("no QEMU grandchild of cela found");
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    let own_ns: Vec<&str> = ["mnt", "pid", "net", "ipc", "uts"]
        .into_iter()
        .filter(|kind| ns(&qemu_pid, kind) != ns(&cela, kind))
        .collect();
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{qemu_pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    let passwd = std::path::Path::new(&format!("/proc/{qemu_pid}/root/etc/passwd")).exists();
    let dev: Vec<String> = std::fs::read_dir(format!("/proc/{qemu_pid}/root/dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // The guest's `read` ends at EOF on its stdin: the VM ends.
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(field(&qemu, "Seccomp"), "2", "{qemu}");
    assert_eq!(field(&qemu, "NoNewPrivs"), "1", "{qemu}");
    let uid: u32 = field(&qemu, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (cela_vmm::jail::uid::FIRST..cela_vmm::jail::uid::FIRST + cela_vmm::jail::uid::COUNT)
            .contains(&uid),
        "QEMU runs as uid {uid}"
    );
    for caps in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(field(&qemu, caps), "0000000000000000", "{caps}: {qemu}");
    }
    assert_eq!(
        own_ns,
        ["mnt", "pid", "net", "ipc", "uts"],
        "QEMU's own namespaces"
    );
    // /usr and the host's top-level links into it, /dev/null, the loader's cache, and the
    // kernel and initramfs at their paths: nothing else.
    let kernel_top = a.kernel.components().nth(1).unwrap();
    let kernel_top = kernel_top.as_os_str().to_string_lossy().into_owned();
    for name in &root {
        assert!(
            [
                "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev"
            ]
            .contains(&name.as_str())
                || *name == kernel_top,
            "the jail holds /{name}: {root:?}"
        );
    }
    assert!(!passwd, "the host's /etc/passwd is visible to QEMU");
    assert_eq!(dev, ["null"], "the jail's /dev");
}
