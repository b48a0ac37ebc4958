//! The fixture of the instance tests: a data dir with the test image imported, the shared
//! guest assets, `cela` run in it, and the checks that an instance left nothing behind.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::images::*;

/// A data dir with the test image imported as `testimg:latest`, and the shared guest assets.
pub struct World {
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new() -> World {
        assert!(
            nix::unistd::geteuid().is_root(),
            "instances need root (mounts, namespaces, cgroups)"
        );
        let dir = tempfile::Builder::new()
            .prefix("cela-inst-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        // The guest kernel and initramfs cache the other tests use (fetched once).
        let assets = std::env::var_os("CELA_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/cela-test-cache"))
            .join("data/assets");
        std::fs::create_dir_all(&assets).unwrap();
        std::os::unix::fs::symlink(&assets, data.join("assets")).unwrap();
        let image = test_image();
        let layout = dir.path().join("layout");
        image.write_layout(&layout, "latest");
        cela_ok(
            &data,
            &[
                "image",
                "import",
                layout.to_str().unwrap(),
                "--name",
                "testimg:latest",
            ],
        );
        World { dir }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn cela(&self, args: &[&str]) -> std::process::Output {
        cela_in(&self.data(), args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        cela_ok(&self.data(), args)
    }

    pub fn err(&self, args: &[&str], needle: &str) {
        cela_err(&self.data(), args, needle);
    }

    pub fn inspect(&self, name: &str) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["inspect", name])).unwrap();
        v[0].clone()
    }

    pub fn status(&self, name: &str) -> String {
        self.inspect(name)["status"].as_str().unwrap().to_owned()
    }

    pub fn wait_status(&self, name: &str, want: &str) {
        let start = Instant::now();
        while self.status(name) != want {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} never became {want}: {}",
                self.inspect(name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `script` in instance `name` until it succeeds (bounded), for what comes up
    /// asynchronously; its stdout.
    pub fn exec_until(&self, name: &str, script: &str) -> String {
        let start = Instant::now();
        loop {
            let out = self.cela(&["exec", name, "sh", "-c", script]);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name}: {script}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Nothing of instance `id` is left: its directory, mounts, cgroups, processes.
    pub fn assert_gone(&self, id: &str, pids: &[i64]) {
        let instances = self.data().join("instances");
        assert!(!instances.join(id).exists());
        assert!(
            !instances.join(format!(".removing-{id}")).exists(),
            "the removal of {id} stopped half-way"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(id), "mounts of {id} left:\n{mounts}");
        for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let p = h.path().join("cela").join(id);
            assert!(!p.exists(), "cgroup {} left", p.display());
        }
        for pid in pids {
            let start = Instant::now();
            while Path::new(&format!("/proc/{pid}")).exists() && !zombie(*pid) {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "process {pid} left"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

pub fn zombie(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// What a failed test left: its labs, its instances (removed with `rm -f`) and its networks,
/// whose links, relays, bridges and packet filters are the host's, not the temporary
/// directory's.
impl Drop for World {
    fn drop(&mut self) {
        let data = self.data();
        let listed = |args: &[&str], key: &str| -> Vec<String> {
            let out = cela_in(&data, args);
            serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|i| i[key].as_str().map(str::to_owned))
                .collect()
        };
        // Labs first: their links and relays are the host's.
        let labs = listed(&["lab", "ls", "--format", "json"], "name");
        if !labs.is_empty() {
            let mut args = vec!["lab", "down"];
            args.extend(labs.iter().map(String::as_str));
            cela_in(&data, &args);
        }
        let ids = listed(&["ps", "-a", "--format", "json"], "id");
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            cela_in(&data, &args);
        }
        let nets = listed(&["network", "ls", "--format", "json"], "name");
        if !nets.is_empty() {
            let mut args = vec!["network", "rm"];
            args.extend(nets.iter().map(String::as_str));
            cela_in(&data, &args);
        }
    }
}

/// Runs a host command; its output, whatever its status.
pub fn host(cmd: &[&str]) -> std::process::Output {
    std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap()
}

/// Runs a host command, expecting success; its stdout.
pub fn host_ok(cmd: &[&str]) -> String {
    let out = host(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
