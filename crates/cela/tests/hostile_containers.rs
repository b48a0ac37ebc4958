//! Hostile containers must not reach the host (issue 10): what `cela run` and `cela exec` do
//! against a container that attacks. One test per attack class, each with several variants:
//!
//! * the default seccomp profile refuses new namespaces and mounts (class 9), in the init and in
//!   exec'd processes (class 4), unless the user asks otherwise;
//! * CVE-2019-5736 through `cela exec` and `cela run` (class 3): the host's `cela` is unchanged;
//! * capabilities are Docker's default set, changed only by `--cap-add`/`--cap-drop`.
//!
//! As root.

#[path = "../../runtime/tests/attacks/full_pipe.rs"]
mod full_pipe;
mod images;
mod world;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use full_pipe::full_pipe;
use world::World;

/// `grep Seccomp`, then the status of each attempt to leave the container's confinement.
const ESCAPES: &str = "grep '^Seccomp:' /proc/self/status; \
    unshare -U true 2>/dev/null; echo userns=$?; \
    unshare -m true 2>/dev/null; echo mountns=$?; \
    unshare -n true 2>/dev/null; echo netns=$?; \
    mount -t tmpfs x /mnt 2>/dev/null; echo mount=$?";

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in:\n{out}"))
}

#[test]
fn the_default_profile_refuses_namespaces_and_mounts_in_run_and_exec() {
    let w = World::new();
    let out = w.ok(&["run", "--rm", "testimg", "sh", "-c", ESCAPES]);
    assert!(out.contains("Seccomp:\t2"), "{out}");
    for key in ["userns", "mountns", "netns", "mount"] {
        assert_ne!(
            field(&out, key),
            "0",
            "{key} succeeded in the container:\n{out}"
        );
    }

    // The same in a process exec'd into a running container.
    let id = w.ok(&["run", "-d", "--name", "target", "testimg", "sleep", "1000"]);
    let out = w.ok(&["exec", "target", "sh", "-c", ESCAPES]);
    assert!(
        out.contains("Seccomp:\t2"),
        "exec'd process unfiltered:\n{out}"
    );
    for key in ["userns", "mountns", "netns", "mount"] {
        assert_ne!(field(&out, key), "0", "{key} succeeded in exec:\n{out}");
    }
    // Everything that confines the init confines the exec'd process: the status fields, the
    // cgroup, the limits.
    let out = w.ok(&[
        "exec",
        "target",
        "sh",
        "-c",
        "for f in status cgroup limits; do \
           a=$(grep -E '^(Seccomp|NoNewPrivs|Cap[A-Za-z]+|Uid|Gid):' /proc/1/$f 2>/dev/null || cat /proc/1/$f); \
           b=$(grep -E '^(Seccomp|NoNewPrivs|Cap[A-Za-z]+|Uid|Gid):' /proc/self/$f 2>/dev/null || cat /proc/self/$f); \
           [ \"$a\" = \"$b\" ] && echo $f=same || echo \"$f differs: $a /// $b\"; done",
    ]);
    assert_eq!(out, "status=same\ncgroup=same\nlimits=same\n", "{out}");
    w.ok(&["rm", "-f", "target"]);
    w.assert_gone(id.trim(), &[]);

    // Unconfined: a user namespace needs no capability, so only the filter refused it.
    let out = w.ok(&[
        "run",
        "--rm",
        "--security-opt",
        "seccomp=unconfined",
        "testimg",
        "sh",
        "-c",
        ESCAPES,
    ]);
    assert!(out.contains("Seccomp:\t0"), "{out}");
    assert_eq!(field(&out, "userns"), "0", "{out}");
    // Without CAP_SYS_ADMIN the kernel still refuses the rest.
    assert_ne!(field(&out, "mount"), "0", "{out}");

    // A profile of the user's, in Docker's format: everything allowed but `unshare`.
    let profile = w.dir.path().join("profile.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW",
            "archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":["SCMP_ARCH_X86"]}],
            "syscalls":[{"names":["unshare"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )
    .unwrap();
    let out = w.ok(&[
        "run",
        "--rm",
        "--security-opt",
        &format!("seccomp={}", profile.display()),
        "testimg",
        "sh",
        "-c",
        ESCAPES,
    ]);
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert_ne!(field(&out, "userns"), "0", "{out}");
}

#[test]
fn capabilities_are_dockers_default_set_and_follow_cap_add_and_drop() {
    let w = World::new();
    let caps = |extra: &[&str]| {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "testimg",
            "sh",
            "-c",
            "grep -E '^Cap(Eff|Bnd)' /proc/self/status",
        ]);
        w.ok(&args)
    };
    // Docker's 14: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE
    // NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
    let out = caps(&[]);
    assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
    assert!(out.contains("CapBnd:\t00000000a80425fb"), "{out}");
    let out = caps(&["--cap-drop", "ALL", "--cap-add", "NET_ADMIN"]);
    assert!(out.contains("CapEff:\t0000000000001000"), "{out}");
    let out = caps(&["--net", "host"]);
    assert!(
        out.contains("CapEff:\t00000000a80405fb"),
        "no NET_RAW on the host's network: {out}"
    );
    w.err(
        &["run", "--rm", "--cap-add", "CAP_BOGUS", "testimg", "true"],
        "unknown capability",
    );
    w.err(
        &[
            "run",
            "--rm",
            "--security-opt",
            "apparmor=x",
            "testimg",
            "true",
        ],
        "not supported",
    );
}

fn sha256(path: &Path) -> String {
    cela_image::Digest::of(&std::fs::read(path).unwrap()).to_string()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The container's attacker (cela-runtime's CVE-2019-5736 test has the same): for every
/// process whose executable is not busybox, open `/proc/PID/exe`, wait for the process to end,
/// then try to append to the file.
const ATTACKER: &str = include_str!("../../runtime/tests/attacks/proc-self-exe.sh");

#[test]
fn cve_2019_5736_through_cela_exec_and_run_leaves_cela_unchanged() {
    let w = World::new();
    let cela = common_cela();
    let before = sha256(&cela);
    // The victim: a program whose interpreter is the process's own executable.
    let victim = w.dir.path().join("victim");
    std::fs::write(&victim, "#!/proc/self/exe\n").unwrap();
    let vol = format!("{}:/bin/victim:ro", victim.display());
    std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let id = w.ok(&[
        "run", "-d", "--name", "attacker", "-v", &vol, "testimg", "sh", "-c", ATTACKER,
    ]);
    let id = id.trim();
    let log = || w.ok(&["exec", "attacker", "cat", "/tmp/log"]);
    wait_for("the attacker to start", || {
        w.cela(&["exec", "attacker", "test", "-e", "/tmp/log"])
            .status
            .success()
    });
    // The supervisor, whose forks become the container's processes, runs from a sealed copy.
    let state = w.inspect("attacker");
    let supervisor = state["state"]["supervisor"]["pid"].as_i64().unwrap();
    let exe = std::fs::read_link(format!("/proc/{supervisor}/exe")).unwrap();
    assert!(
        exe.to_string_lossy().contains("memfd:"),
        "the supervisor runs from {}",
        exe.display()
    );

    // `cela exec` of the victim: its usage message blocks on a full pipe until the attacker
    // holds its executable.
    let (r, pipe_w) = full_pipe();
    let mut child = Command::new(&cela)
        .env("CELA_DATA_DIR", w.data())
        .args(["exec", "attacker", "/bin/victim"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(pipe_w))
        .spawn()
        .unwrap();
    wait_for("the attacker to open the victim", || {
        log().contains("opened")
    });
    let mut r = std::fs::File::from(r);
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    let _ = child.wait();
    drain.join().unwrap();
    wait_for("the attacker's write attempt", || {
        let l = log();
        l.contains("refused") || l.contains("wrote")
    });
    let l = log();
    assert!(
        l.contains("memfd:") && l.contains("refused") && !l.contains("wrote"),
        "{l}"
    );

    // `cela run`: a container's init is a fork of the supervisor, checked above; the victim as
    // a container's command runs cela's sealed copy, which fails on its arguments.
    let out = w.cela(&["run", "--rm", "-v", &vol, "testimg", "/bin/victim"]);
    assert!(!out.status.success());
    w.ok(&["rm", "-f", "attacker"]);
    w.assert_gone(id, &[supervisor]);
    assert_eq!(
        sha256(&cela),
        before,
        "{} was changed by a container",
        cela.display()
    );
}

fn common_cela() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_cela"))
}

/// An image whose /proc or /sys is a link would have the kernel's file systems mounted where
/// the link points. The runtime refuses it in the container's own set-up; `cela run` says why
/// (the cause libcontainer logged there, cela_runtime::cause) and leaves no instance behind.
#[test]
fn an_image_whose_proc_or_sys_is_a_link_is_refused_naming_why_and_leaves_nothing() {
    use images::{Entry, TestImage, busybox_layer, layer};
    let w = World::new();
    let work = tempfile::tempdir().unwrap();
    for (dir, fs) in [("proc", "proc"), ("sys", "sysfs")] {
        let layout = work.path().join(dir);
        TestImage::new(
            vec![busybox_layer(), layer(&[Entry::Symlink(dir, "/tmp")])],
            &["true"],
        )
        .write_layout(&layout, "linked");
        let name = format!("linked-{dir}:1");
        w.ok(&["image", "import", "--name", &name, layout.to_str().unwrap()]);
        w.err(
            &["run", "--rm", &name, "true"],
            &format!("filesystem {fs} must be mounted on ordinary directory"),
        );
        let left: Vec<serde_json::Value> =
            serde_json::from_str(&w.ok(&["ps", "-a", "--format", "json"])).unwrap();
        assert!(left.is_empty(), "{dir}: instances left: {left:?}");
        let dirs: Vec<_> = std::fs::read_dir(w.data().join("instances"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != ".lock")
            .collect();
        assert!(dirs.is_empty(), "{dir}: left in instances/: {dirs:?}");
    }
}
