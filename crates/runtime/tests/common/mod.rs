//! The shared fixture of cela-runtime's integration tests: a busybox bundle built in a temp
//! dir, a private state root, the `cela-runc` binary, bounded waits, and a leak check that
//! proves a deleted container left no state, cgroup directory, mount or process behind.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any awaited event may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(20);

/// Fails the test with a clear message unless it runs as root on a host with cgroups.
pub fn require_root_and_cgroups() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs real containers and needs root (namespaces, cgroups, mounts)"
    );
    assert!(
        Path::new("/sys/fs/cgroup/memory").is_dir()
            || Path::new("/sys/fs/cgroup/cgroup.controllers").is_file(),
        "this test needs cgroups (v1 memory controller or cgroup v2) mounted at /sys/fs/cgroup"
    );
    assert!(
        Path::new("/bin/busybox").is_file(),
        "this test builds its bundles from /bin/busybox: install busybox-static (scripts/deps)"
    );
}

/// One test's world: a temp dir with a busybox rootfs and a state root.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub rootfs: PathBuf,
    /// Unique prefix of this fixture's container ids and cgroup paths.
    pub tag: String,
    ids: std::cell::RefCell<Vec<String>>,
}

/// Debian's runc, the peer the hostile-input tests run the same attack against; the test
/// fails saying so where it is missing.
pub fn system_runc() -> &'static str {
    ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("runc is not installed (scripts/deps installs it): the comparison needs it")
}

/// Path of the binary under test.
pub fn runc_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cela-runc")
}

impl Fixture {
    pub fn new(name: &str) -> Self {
        require_root_and_cgroups();
        let dir = tempfile::Builder::new()
            .prefix("cela-rt-")
            .tempdir()
            .unwrap();
        // The jail's root is an unprivileged host uid: it must be able to reach the rootfs.
        chmod(dir.path(), 0o755);
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "mnt"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
        assert!(list.status.success(), "busybox --list failed");
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
            }
        }
        chmod(&rootfs.join("tmp"), 0o1777);
        let tag = format!("cela-test-{}-{name}", std::process::id());
        Fixture {
            root: dir.path().join("state"),
            rootfs,
            dir,
            tag,
            ids: Default::default(),
        }
    }

    /// A container id unique to this fixture; remembered for cleanup.
    pub fn id(&self, name: &str) -> String {
        let id = format!("{}-{name}", self.tag);
        self.ids.borrow_mut().push(id.clone());
        id
    }

    /// Writes a bundle for `id`: `spec` (or `spec --jail`) output, no terminal, the given
    /// command, a cgroup path named after the id, then `edit` for anything else.
    pub fn bundle(
        &self,
        id: &str,
        jail: bool,
        args: &[&str],
        edit: impl FnOnce(&mut Value),
    ) -> PathBuf {
        let b = self.dir.path().join(format!("bundle-{id}"));
        std::fs::create_dir_all(&b).unwrap();
        let _ = std::fs::remove_file(b.join("config.json"));
        let mut cmd = vec!["spec", "--bundle", b.to_str().unwrap()];
        if jail {
            cmd.push("--jail");
        }
        let out = self.runc(&cmd);
        assert!(out.status.success(), "spec failed: {}", stderr(&out));
        let path = b.join("config.json");
        let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["root"]["path"] = self.rootfs.to_str().unwrap().into();
        v["process"]["terminal"] = false.into();
        v["process"]["args"] = args.iter().map(|a| Value::from(*a)).collect();
        v["linux"]["cgroupsPath"] = format!("/{id}").into();
        edit(&mut v);
        std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        b
    }

    /// Runs `cela-runc --root <root> ARGS` with stdin closed and output captured.
    pub fn runc(&self, args: &[&str]) -> Output {
        Command::new(runc_bin())
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Like [`Fixture::runc`], asserting success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.runc(args);
        assert!(
            out.status.success(),
            "cela-runc {args:?} failed ({}): {}",
            out.status,
            stderr(&out)
        );
        out
    }

    /// Runs a command that leaves a process behind (`exec -d`, `run -d`): its output goes to a
    /// file, since the process would keep a pipe open; asserts success.
    pub fn ok_detached(&self, args: &[&str]) {
        let path = self.dir.path().join("detached.out");
        let log = std::fs::File::create(&path).unwrap();
        let st = Command::new(runc_bin())
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(st.success(), "cela-runc {args:?} failed ({st}): {text}");
    }

    /// `state ID` parsed.
    pub fn state(&self, id: &str) -> Value {
        serde_json::from_slice(&self.ok(&["state", id]).stdout).unwrap()
    }

    pub fn status(&self, id: &str) -> String {
        self.state(id)["status"].as_str().unwrap().to_owned()
    }

    /// Waits (bounded) until the container reaches `status`.
    pub fn wait_status(&self, id: &str, status: &str) {
        wait_until(&format!("{id} to be {status}"), || {
            self.status(id) == status
        });
    }

    /// create + start, detached: the container's stdout and stderr go to a file in the temp
    /// dir; returns the init's host pid.
    pub fn start_detached(&self, id: &str, bundle: &Path) -> i32 {
        self.create(id, bundle);
        self.ok(&["start", id]);
        self.state(id)["pid"].as_i64().unwrap() as i32
    }

    /// `create`, with the container's stdout and stderr going to a file in the temp dir (a
    /// pipe would stay open in the container and never reach end-of-file).
    pub fn create(&self, id: &str, bundle: &Path) {
        let log = std::fs::File::create(self.dir.path().join(format!("{id}.out"))).unwrap();
        let out = Command::new(runc_bin())
            .arg("--root")
            .arg(&self.root)
            .args(["create", "--bundle", bundle.to_str().unwrap(), id])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .unwrap();
        assert!(out.success(), "create {id} failed: {}", self.output_of(id));
    }

    /// What a detached container wrote so far.
    pub fn output_of(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{id}.out"))).unwrap_or_default()
    }

    /// Existing cgroup directories named after `id` in any hierarchy.
    pub fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let p = h.path().join(id);
            if p.exists() {
                found.push(p);
            }
        }
        let v2 = Path::new("/sys/fs/cgroup").join(id);
        if v2.exists() && !found.contains(&v2) {
            found.push(v2);
        }
        found
    }

    /// Path of a cgroup v1 controller's file for `id` (e.g. `memory`, `memory.limit_in_bytes`).
    pub fn cgroup_file(&self, id: &str, controller: &str, file: &str) -> String {
        let p = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(id)
            .join(file);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
    }

    /// Asserts that nothing of `id` is left: no state directory, no cgroup directory, no mount
    /// under this fixture's temp dir, and (if given) the init process is gone.
    pub fn assert_nothing_left(&self, id: &str, pid: Option<i32>) {
        assert!(
            !self.root.join(id).exists(),
            "state directory of {id} left behind"
        );
        assert_eq!(
            self.cgroup_dirs(id),
            Vec::<PathBuf>::new(),
            "cgroup directories of {id} left behind"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = self.dir.path().to_str().unwrap();
        assert!(
            !mounts.contains(dir),
            "mounts under {dir} left behind:\n{mounts}"
        );
        if let Some(pid) = pid {
            wait_until(&format!("process {pid} of {id} to be gone"), || {
                !process_alive(pid)
            });
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for id in self.ids.borrow().iter() {
            let _ = Command::new(runc_bin())
                .arg("--root")
                .arg(&self.root)
                .args(["delete", "--force", id])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls `cond` every 10 ms until it holds; fails the test after [`BOUND`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < BOUND,
            "timed out after {BOUND:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The image [`build_image`] writes, as it is tagged.
pub const IMAGE: &str = "cela.test/busybox:latest";

/// Writes a `docker save`-style archive of a one-layer image holding busybox-static and its
/// applet links, and returns its path.
pub fn build_image(dir: &Path) -> PathBuf {
    let layer = dir.join("layer");
    std::fs::create_dir_all(layer.join("bin")).unwrap();
    std::fs::create_dir_all(layer.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", layer.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", layer.join("bin").join(applet)).unwrap();
        }
    }
    let archive = dir.join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&layer)
            .arg("-cf")
            .arg(archive.join("layer.tar"))
            .arg("."),
    );
    let sum = run_ok(Command::new("sha256sum").arg(archive.join("layer.tar")));
    let diff_id = stdout(&sum).split_whitespace().next().unwrap().to_owned();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
    });
    std::fs::write(archive.join("config.json"), config.to_string()).unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [IMAGE],
        "Layers": ["layer.tar"],
    }]);
    std::fs::write(archive.join("manifest.json"), manifest.to_string()).unwrap();
    let tar = dir.join("image.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&archive)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    tar
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}", stderr(&out));
    out
}
