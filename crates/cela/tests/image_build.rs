//! `cela image build debian`: a real Debian image made with debootstrap from Debian's mirror,
//! then flattened and run with chroot, and turned into an ext4 disk that e2fsck accepts; then a
//! real workload in a container of it under cela's default seccomp profile (issue 10, class 9):
//! apt installs a compiler and Python from the mirror, a C program and a Python program run,
//! and a probe finds refused exactly the calls the profile refuses (compared with the same probe
//! unconfined). As root; takes a few minutes here (debootstrap, apt).

mod images;

use std::process::Command;
use std::time::Instant;

use cela_image::{Progress, RunConfig, Store};
use images::*;

#[test]
fn a_debian_image_built_with_debootstrap_runs_and_becomes_an_ext4_disk() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (debootstrap)"
    );
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let started = Instant::now();
    let out = cela_ok(&data, &["image", "build", "debian", "--suite", "bookworm"]);
    eprintln!("cela image build debian: {:?}: {out}", started.elapsed());
    let ls = ls_json(&data);
    assert_eq!(ls[0]["names"][0], "docker.io/library/debian:bookworm");
    assert_eq!(
        ls[0]["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );

    let store = Store::open(&data).unwrap();
    let image = store.resolve("debian:bookworm").unwrap();
    assert_eq!(RunConfig::of(&store, &image).unwrap().cmd, ["/bin/bash"]);
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    cela_image::flatten(&store, &image, &root).unwrap();
    let out = chroot(
        &root,
        "cat /etc/debian_version; dpkg-query -W -f='${Package}\\n' apt",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("12."), "bookworm is Debian 12: {stdout}");
    assert!(stdout.contains("apt"), "{stdout}");

    let started = Instant::now();
    let disk = cela_image::rootfs_disk(&store, &image, &Progress::hidden()).unwrap();
    eprintln!(
        "ext4 disk of {} bytes in {:?}",
        std::fs::metadata(&disk).unwrap().len(),
        started.elapsed()
    );
    assert_fsck_clean(&disk);
    let version = Command::new("debugfs")
        .args(["-R", "cat /etc/debian_version"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("12."));

    the_default_seccomp_profile_runs_a_real_workload(&data, work.path());
}

/// The probe's calls the default profile must refuse with EPERM (clone3: ENOSYS).
const REFUSED: [&str; 15] = [
    "unshare_user",
    "unshare_mount",
    "keyctl",
    "add_key",
    "userfaultfd",
    "io_uring_setup",
    "bpf",
    "perf_event_open",
    "clone3",
    "socket_vsock",
    "personality_exec",
    "setns",
    "mount",
    "open_by_handle_at",
    "fsopen",
];

fn results(out: &str) -> std::collections::HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// apt, gcc and Python in a container of the Debian image (with the host's network and name
/// servers), all through `cela exec`, so exec'd processes are checked under the filter too.
fn the_default_seccomp_profile_runs_a_real_workload(
    data: &std::path::Path,
    work: &std::path::Path,
) {
    let shared = work.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("probe.c"), include_str!("workload/probe.c")).unwrap();
    std::fs::write(
        shared.join("program.py"),
        include_str!("workload/program.py"),
    )
    .unwrap();
    let vol = format!("{}:/work", shared.display());
    cela_ok(
        data,
        &[
            "run",
            "-d",
            "--name",
            "work",
            "--net",
            "host",
            "-v",
            &vol,
            "debian:bookworm",
            "sleep",
            "3600",
        ],
    );
    let started = Instant::now();
    let out = cela_ok(
        data,
        &[
            "exec",
            "-e",
            "DEBIAN_FRONTEND=noninteractive",
            "work",
            "sh",
            "-c",
            "grep '^Seccomp:' /proc/self/status && apt-get update -qq && \
             apt-get install -y -qq --no-install-recommends gcc libc6-dev python3 >/dev/null && echo installed",
        ],
    );
    eprintln!(
        "apt-get install gcc libc6-dev python3 in the container: {:?}",
        started.elapsed()
    );
    assert!(
        out.contains("Seccomp:\t2") && out.contains("installed"),
        "{out}"
    );
    cela_ok(
        data,
        &[
            "exec",
            "work",
            "gcc",
            "-static",
            "-O2",
            "-pthread",
            "-o",
            "/work/probe",
            "/work/probe.c",
        ],
    );
    let confined = results(&cela_ok(data, &["exec", "work", "/work/probe"]));
    let python = cela_ok(data, &["exec", "work", "python3", "/work/program.py"]);
    assert!(python.contains("python=ok"), "{python}");
    cela_ok(data, &["rm", "-f", "work"]);
    let unconfined = results(&cela_ok(
        data,
        &[
            "run",
            "--rm",
            "--security-opt",
            "seccomp=unconfined",
            "-v",
            &vol,
            "debian:bookworm",
            "/work/probe",
        ],
    ));
    eprintln!("probe (default profile / unconfined):");
    for name in REFUSED {
        eprintln!("  {name:20} {:>4} {:>4}", confined[name], unconfined[name]);
    }
    for name in REFUSED {
        let want = if name == "clone3" { "38" } else { "1" };
        assert_eq!(confined[name], want, "{name} under the default profile");
    }
    for ok in ["threads", "fork_exec", "mmap"] {
        assert_eq!(confined[ok], "ok", "{ok} under the default profile");
    }
    for ok in ["personality_query", "socket_inet"] {
        assert_eq!(confined[ok], "0", "{ok} under the default profile");
    }
    // Unconfined, the kernel answers these itself: the refusals above were the filter's.
    assert_eq!(
        unconfined["unshare_user"], "0",
        "a user namespace needs no capability"
    );
    assert_eq!(unconfined["personality_exec"], "0");
    assert_eq!(unconfined["setns"], "9", "EBADF for fd -1");
    assert_eq!(unconfined["clone3"], "22", "EINVAL for a null argument");
}

#[test]
fn a_bad_suite_is_refused_before_anything_runs() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    cela_err(
        &data,
        &["image", "build", "debian", "--suite", "Book worm"],
        "not a Debian suite name",
    );
    assert!(stored_blobs(&data).is_empty());
}
