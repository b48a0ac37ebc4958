//! Docker drives `cela-runc`: Debian's dockerd, started by the test with its own data root,
//! exec root and socket in a temp dir and cela-runc added as a runtime (`--add-runtime`), loads
//! a busybox image the test builds and runs it with `docker run --runtime cela`. Docker gives
//! every container its default seccomp profile and capability set: the init *and* every
//! `docker exec` process must run under them (issue 10, class 4: exec'd processes ran
//! unfiltered), exit codes pass through, and `docker rm -f` leaves nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{IMAGE, build_image, runc_bin, stderr, stdout, wait_until};

/// A dockerd private to one test (it starts its own containerd).
struct Dockerd {
    dir: tempfile::TempDir,
    daemon: Child,
}

impl Dockerd {
    fn start() -> Self {
        common::require_root_and_cgroups();
        assert!(
            Path::new("/usr/sbin/dockerd").exists(),
            "dockerd is not installed: install docker.io (scripts/deps)"
        );
        let dir = tempfile::Builder::new()
            .prefix("cela-dockerd-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        // No networking of Docker's own (no bridge, no iptables): the test's containers use
        // `--network none`, and the host's firewall is left alone.
        let daemon = Command::new("/usr/sbin/dockerd")
            .arg("--data-root")
            .arg(d.join("root"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .arg("--add-runtime")
            .arg(format!("cela={}", runc_bin()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let docker = Dockerd { dir, daemon };
        wait_until("dockerd to answer on its socket", || {
            docker.docker(&["version"]).status.success()
        });
        docker
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("--host")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}\n{}",
            stderr(&out),
            std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
        );
        stdout(&out)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = stdout(&self.docker(&["ps", "-aq"]));
        for id in ids.lines() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.daemon.wait();
        // Whatever dockerd left mounted under its data root (overlay layers).
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            let dir = self.dir.path().to_str().unwrap().to_owned();
            let mut targets: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| m.starts_with(&dir))
                .collect();
            targets.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in targets {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

#[test]
fn docker_runs_containers_on_cela_runc_and_exec_keeps_their_confinement() {
    let d = Dockerd::start();
    let tar = build_image(d.dir.path());
    d.ok(&["load", "-i", tar.to_str().unwrap()]);
    let base = ["--runtime", "cela", "--network", "none"];

    // Foreground: output and exit code.
    let mut args = vec!["run", "--rm"];
    args.extend_from_slice(&base);
    args.extend_from_slice(&[IMAGE, "sh", "-c", "echo hello; exit 3"]);
    let out = d.docker(&args);
    assert_eq!(
        (out.status.code(), stdout(&out).as_str()),
        (Some(3), "hello\n"),
        "{}",
        stderr(&out)
    );

    // Detached, then exec: Docker's seccomp profile and capabilities in the init and in the
    // exec'd process alike.
    let mut args = vec!["run", "-d", "--name", "c1"];
    args.extend_from_slice(&base);
    args.extend_from_slice(&[IMAGE, "sleep", "600"]);
    d.ok(&args);
    let fields = "grep -E '^(Seccomp|CapEff|CapBnd|NoNewPrivs):' /proc/1/status; echo @@; \
                  grep -E '^(Seccomp|CapEff|CapBnd|NoNewPrivs):' /proc/self/status";
    let out = d.ok(&["exec", "c1", "sh", "-c", fields]);
    let (init, exec) = out.split_once("@@\n").unwrap();
    assert!(
        init.contains("Seccomp:\t2"),
        "the init is unfiltered:\n{out}"
    );
    assert_eq!(
        init, exec,
        "docker exec is confined otherwise than the init:\n{out}"
    );
    let out = d.docker(&["exec", "c1", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    // Docker's default profile refuses a user namespace in exec too.
    let out = d.docker(&["exec", "c1", "unshare", "-U", "true"]);
    assert!(!out.status.success(), "unshare -U succeeded in docker exec");
    d.ok(&["rm", "-f", "c1"]);
    assert_eq!(d.ok(&["ps", "-aq"]).trim(), "");
}
