//! A real client drives `cela-runc`: Debian's containerd, started by the test with its own
//! root, state directory and socket in a temp dir, imports a busybox image the test builds (a
//! `docker save`-style archive) and runs it with `ctr run --runc-binary <cela-runc>`, through
//! containerd's stock runc shim (containerd-shim-runc-v2). Output, exit codes, `ctr task exec`
//! (under containerd's default seccomp profile, kept by the exec'd process),
//! a TTY, kill and delete must all work, and nothing of a deleted container may be left.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{process_alive, runc_bin, stderr, stdout, wait_until};

use common::{IMAGE, build_image};

/// A containerd daemon private to one test.
struct Containerd {
    dir: tempfile::TempDir,
    daemon: Child,
    /// The containerd namespace of this test (also names the shim's runc root and cgroups).
    namespace: String,
}

impl Containerd {
    fn start() -> Self {
        common::require_root_and_cgroups();
        for tool in ["containerd", "ctr", "containerd-shim-runc-v2", "script"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success(),
                "{tool} is not installed: install containerd and bsdutils (scripts/deps)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("cela-ctrd-")
            .tempdir()
            .unwrap();
        let d = dir.path().display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
             [debug]\n  address = \"{d}/debug.sock\"\n"
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd {
            namespace: format!("cela-test-{}", std::process::id()),
            dir,
            daemon,
        };
        wait_until("containerd to answer on its socket", || {
            c.ctr(&["version"]).status.success()
        });
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// Runs `ctr` against this daemon and namespace, stdin closed, output captured.
    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Like [`Containerd::ctr`], asserting success.
    fn ok(&self, args: &[&str]) -> Output {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}): {}{}\ncontainerd log:\n{}",
            out.status,
            stdout(&out),
            stderr(&out),
            self.log()
        );
        out
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Where the runc shim keeps cela-runc's state for this namespace.
    fn runtime_root(&self) -> PathBuf {
        Path::new("/run/containerd/runc").join(&self.namespace)
    }

    /// The status `ctr task ls` shows for `id` (RUNNING, STOPPED…), if listed.
    fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ok(&["task", "ls"]);
        stdout(&out).lines().find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.get(2).unwrap_or(&"").to_string())
        })
    }

    /// Asserts that nothing of container `id` is left: no runtime state, no cgroup, no
    /// process `pid`, no mount of its rootfs.
    fn assert_nothing_left(&self, id: &str, pid: Option<i32>) {
        assert!(
            !self.runtime_root().join(id).exists(),
            "cela-runc state of {id} left behind"
        );
        for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let p = h.path().join(&self.namespace).join(id);
            assert!(!p.exists(), "cgroup {} left behind", p.display());
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.lines().any(|l| l.contains(id)),
            "mounts of {id} left behind:\n{mounts}"
        );
        if let Some(pid) = pid {
            wait_until(&format!("process {pid} of {id} to be gone"), || {
                !process_alive(pid)
            });
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks and containers first (their shims exit with them), then the daemon.
        for (kind, delete) in [
            ("task", &["task", "delete", "--force"][..]),
            ("container", &["container", "delete"][..]),
        ] {
            for id in stdout(&self.ctr(&[kind, "ls", "-q"])).lines() {
                let _ = self.ctr(&[delete, &[id]].concat());
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.daemon.wait();
        // containerd leaves its snapshot mounts when killed with containers still present.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            let dir = self.dir.path().to_str().unwrap().to_owned();
            for m in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
                if m.starts_with(&dir) {
                    let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        let _ = std::fs::remove_dir(self.runtime_root());
        // The shim puts containers in cgroups under /<namespace>/; the runtime removes each
        // container's own, the namespace's parent is the test's to remove.
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let _ = std::fs::remove_dir(h.path().join(&self.namespace));
            }
        }
    }
}

#[test]
fn containerd_runs_images_through_cela_runc() {
    let c = Containerd::start();
    let tar = build_image(c.dir.path());
    c.ok(&["image", "import", tar.to_str().unwrap()]);
    let runtime = runc_bin();

    // A foreground run: output on the right streams, the exit code passed through.
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runc-binary",
        runtime,
        IMAGE,
        "fg",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(
        (out.status.code(), stdout(&out).as_str()),
        (Some(3), "out\n"),
        "ctr run: {}\n{}",
        stderr(&out),
        c.log()
    );
    assert!(stderr(&out).contains("err"), "stderr: {}", stderr(&out));
    c.assert_nothing_left("fg", None);

    // A detached task: it runs under cela-runc (its state is cela-runc's), exec works with
    // its own exit code, ps lists the init, SIGKILL stops it, delete removes it all.
    // With containerd's default seccomp profile (`--seccomp`), which exec'd processes keep.
    c.ok(&[
        "run",
        "-d",
        "--seccomp",
        "--runc-binary",
        runtime,
        IMAGE,
        "bg",
        "sleep",
        "600",
    ]);
    assert_eq!(c.task_status("bg").as_deref(), Some("RUNNING"));
    let state = Command::new(runtime)
        .arg("--root")
        .arg(c.runtime_root())
        .args(["state", "bg"])
        .output()
        .unwrap();
    assert!(
        state.status.success(),
        "cela-runc state: {}",
        stderr(&state)
    );
    let state: serde_json::Value = serde_json::from_slice(&state.stdout).unwrap();
    assert_eq!(state["status"], "running");
    let pid = state["pid"].as_i64().unwrap() as i32;

    let exec = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "bg",
        "sh",
        "-c",
        "grep '^Seccomp:' /proc/1/status /proc/self/status; echo exec-out; exit 4",
    ]);
    assert_eq!(
        (exec.status.code(), stdout(&exec).as_str()),
        (
            Some(4),
            "/proc/1/status:Seccomp:\t2\n/proc/self/status:Seccomp:\t2\nexec-out\n"
        ),
        "ctr task exec (the init and the exec'd process both filtered): {}",
        stderr(&exec)
    );
    let ps = c.ok(&["task", "ps", "bg"]);
    assert!(
        stdout(&ps)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&pid.to_string())),
        "task ps does not list the init {pid}:\n{}",
        stdout(&ps)
    );

    c.ok(&["task", "kill", "--signal", "SIGKILL", "bg"]);
    wait_until("bg to stop", || {
        c.task_status("bg").as_deref() == Some("STOPPED")
    });
    let del = c.ok(&["task", "delete", "bg"]);
    assert!(
        stdout(&del).contains("137") || stderr(&del).contains("137"),
        "task delete should report exit status 137: {}{}",
        stdout(&del),
        stderr(&del)
    );
    c.ok(&["container", "delete", "bg"]);
    c.assert_nothing_left("bg", Some(pid));

    // A TTY (ctr passes cela-runc a console socket): the shell sees a terminal.
    let tty = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "ctr --address {} --namespace {} run -t --rm --runc-binary {runtime} {IMAGE} tty \
             sh -c 'tty; exit 5'",
            c.socket().display(),
            c.namespace
        ))
        .arg("/dev/null")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        tty.status.code(),
        Some(5),
        "ctr run -t: {}{}",
        stdout(&tty),
        stderr(&tty)
    );
    assert!(
        stdout(&tty).contains("/dev/pts/"),
        "no terminal in the container: {}",
        stdout(&tty)
    );
    c.assert_nothing_left("tty", None);
}
