//! CVE-2019-5736 (issue 10, class 3): a container must not be able to write the runtime's
//! executable on the host. The attack: the container's program is a script starting with
//! `#!/proc/self/exe`, so the kernel runs *the runtime's own executable* in the container as its
//! interpreter; a process of the container opens that process's `/proc/PID/exe` and, once it
//! has ended, writes through the descriptor. cela runs every process that enters a container
//! from a sealed memfd copy of itself (`cela_runtime::sealed`), so the descriptor leads to a
//! copy that cannot be written, and the host binary is never reachable.
//!
//! The victim is made to wait, so the attack is not a race the test could lose: its error
//! message goes to a pipe the test has filled, and the runtime's copy blocks writing it until
//! the attacker has its descriptor. The same attack runs against runc where it is installed.

mod common;
#[path = "attacks/full_pipe.rs"]
mod full_pipe;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{Fixture, wait_until};
use full_pipe::full_pipe;
use serde_json::json;
use sha2::{Digest, Sha256};

/// The container's attacker, its init: for every process whose executable is not busybox,
/// open `/proc/PID/exe`, wait for the process to end, then try to append to the file.
const ATTACKER: &str = include_str!("attacks/proc-self-exe.sh");

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(bytes))
}

/// `runtime --root ROOT ARGS`, stdin closed, its output collected.
fn command(runtime: &str, f: &Fixture, args: &[&str]) -> Output {
    Command::new(runtime)
        .arg("--root")
        .arg(&f.root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `runtime run -d` of `bundle` as `id`. A detached container keeps the runtime's stdout and
/// stderr open, so they go to a file (`ID.out` in the fixture's directory), not to a pipe the
/// test would wait on.
fn run_detached(runtime: &str, f: &Fixture, bundle: &Path, id: &str) {
    let out = std::fs::File::create(f.dir.path().join(format!("{id}.out"))).unwrap();
    let st = Command::new(runtime)
        .arg("--root")
        .arg(&f.root)
        .args(["run", "-d", "--bundle", bundle.to_str().unwrap(), id])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    assert!(st.success(), "{runtime} run -d {id} failed");
}

fn log(f: &Fixture) -> String {
    std::fs::read_to_string(f.rootfs.join("tmp/log")).unwrap_or_default()
}

/// Runs the attack with `runtime` through `exec` (into the attacker's container) and through
/// `run` (a second container in the attacker's pid namespace whose init is the script), and
/// returns the attacker's log.
fn attack(f: &Fixture, runtime: &str, binary: &Path) -> String {
    let before = sha256(binary);
    let attacker = f.id("attacker");
    let bundle = f.bundle(&attacker, false, &["sh", "-c", ATTACKER], |v| {
        v["root"]["readonly"] = json!(false);
    });
    let _ = std::fs::remove_file(f.rootfs.join("tmp/log"));
    let _ = std::fs::remove_file(f.rootfs.join("tmp/seen"));
    let runc = |args: &[&str]| command(runtime, f, args);
    run_detached(runtime, f, &bundle, &attacker);
    wait_until("the attacker to start", || {
        f.rootfs.join("tmp/log").exists()
    });
    let pid_ns = |pid: i64| format!("/proc/{pid}/ns/pid");
    let attacker_pid = serde_json::from_slice::<serde_json::Value>(
        &runc(&["state", &attacker]).stdout,
    )
    .unwrap()["pid"]
        .as_i64()
        .unwrap();

    // Through exec: the victim's error message blocks on a full pipe until the attacker has
    // opened its executable.
    let victims: [(&str, StartVictim); 2] = [
        (
            "exec",
            Box::new(|w: OwnedFd| {
                Command::new(runtime)
                    .arg("--root")
                    .arg(&f.root)
                    .args(["exec", &attacker, "/bin/victim"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(w))
                    .spawn()
                    .unwrap()
            }),
        ),
        (
            "run",
            Box::new(|w: OwnedFd| {
                let id = f.id("victim");
                let b = f.bundle(&id, false, &["/bin/victim"], |v| {
                    // libcontainer 0.7 mounts cgroup v1 by looking up /proc/<its pid in the
                    // joined pid namespace> in the host's /proc, which fails: no cgroup mount.
                    v["mounts"]
                        .as_array_mut()
                        .unwrap()
                        .retain(|m| m["type"] != "cgroup");
                    for ns in v["linux"]["namespaces"].as_array_mut().unwrap() {
                        if ns["type"] == "pid" {
                            ns["path"] = json!(pid_ns(attacker_pid));
                        }
                    }
                });
                Command::new(runtime)
                    .arg("--root")
                    .arg(&f.root)
                    .args(["run", "--bundle", b.to_str().unwrap(), &id])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(w))
                    .spawn()
                    .unwrap()
            }),
        ),
    ];
    let mut opened = 0;
    for (how, start) in &victims {
        let (r, w) = full_pipe();
        let mut child = KillOnDrop(start(w));
        let child = &mut child.0;
        // The victim waits on the pipe; it is gone early only if the runtime refused to run
        // it (runc does: the interpreter /proc/self/exe is not found in its init).
        let start_time = std::time::Instant::now();
        while log(f).matches("opened").count() == opened {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                start_time.elapsed() < common::BOUND,
                "{runtime} {how}: the attacker did not find the victim; its log:\n{}",
                log(f)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let caught = log(f).matches("opened").count() > opened;
        // Let the victim go: drain the pipe until the runtime's command ends.
        let mut r = std::fs::File::from(r);
        let drain = std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        });
        let _ = child.wait();
        drain.join().unwrap();
        if caught {
            opened += 1;
            wait_until(
                &format!("{runtime} {how}: the attacker's write attempt"),
                || {
                    let l = log(f);
                    l.matches("refused").count() + l.matches("wrote").count() >= opened
                },
            );
        }
    }
    let _ = runc(&["delete", "--force", &attacker]);
    assert_eq!(
        sha256(binary),
        before,
        "{} was changed by the container",
        binary.display()
    );
    log(f)
}

/// Starts the runtime command that runs the victim, its stderr the given pipe.
type StartVictim<'a> = Box<dyn Fn(OwnedFd) -> Child + 'a>;

/// A runtime command blocked on the test's pipe is killed if the test fails before releasing it
/// (it would otherwise hold the pipe, and whatever descriptors it inherited, for ever).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn victim_script(f: &Fixture) {
    let p = f.rootfs.join("bin/victim");
    std::fs::write(&p, "#!/proc/self/exe\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_container_cannot_write_cela_runc_through_proc_self_exe() {
    let f = Fixture::new("cve20195736");
    victim_script(&f);
    let binary = PathBuf::from(common::runc_bin());
    let log = attack(&f, common::runc_bin(), &binary);
    // The attacker held the runtime's executable each time, and could write it neither time.
    assert_eq!(log.matches("opened").count(), 2, "{log}");
    assert_eq!(log.matches("refused").count(), 2, "{log}");
    assert!(!log.contains("wrote"), "{log}");
    assert!(
        log.lines()
            .filter(|l| l.starts_with("opened"))
            .all(|l| l.contains("memfd:")),
        "the container reached a file other than a sealed copy:\n{log}"
    );
}

#[test]
fn runc_refuses_the_same_attack() {
    // What users expect, from runc on the same bundle: its `runc init` runs from a sealed copy
    // too, and the interpreter `/proc/self/exe` is not even found there, so the script never
    // runs and the binary is unchanged.
    let runc = common::system_runc();
    let f = Fixture::new("cve20195736runc");
    victim_script(&f);
    let before = sha256(Path::new(runc));
    let id = f.id("target");
    let bundle = f.bundle(&id, false, &["sleep", "100"], |_| {});
    let run = |args: &[&str]| command(runc, &f, args);
    run_detached(runc, &f, &bundle, &id);
    let exec = run(&["exec", &id, "/bin/victim"]);
    let _ = run(&["delete", "--force", &id]);
    assert!(!exec.status.success());
    assert!(
        common::stderr(&exec).contains("no such file or directory"),
        "runc: {}",
        common::stderr(&exec)
    );
    assert_eq!(sha256(Path::new(runc)), before);
}

/// The processes cela-runc leaves in a container before they exec its program (a created
/// container's init, an exec'd process frozen in a paused container) run from a sealed copy.
#[test]
fn processes_entering_a_container_run_from_a_sealed_copy() {
    let f = Fixture::new("sealed");
    let sealed = |pid: i32, what: &str| {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(
            exe.to_string_lossy().contains("memfd:"),
            "{what} runs from {} rather than a sealed copy",
            exe.display()
        );
        // Reopened for writing through /proc (as the attack does), the copy refuses writes.
        if let Ok(mut w) = std::fs::OpenOptions::new()
            .append(true)
            .open(format!("/proc/{pid}/exe"))
        {
            let e = w.write_all(b"PWNED").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{what}: {e}");
        }
    };
    let id = f.id("created");
    let bundle = f.bundle(&id, false, &["sleep", "100"], |_| {});
    f.create(&id, &bundle);
    let init = f.state(&id)["pid"].as_i64().unwrap() as i32;
    sealed(init, "a created container's init");
    f.ok(&["start", &id]);
    f.ok(&["pause", &id]);
    let pid_file = f.dir.path().join("exec.pid");
    f.ok_detached(&[
        "exec",
        "-d",
        "--ignore-paused",
        "--pid-file",
        pid_file.to_str().unwrap(),
        &id,
        "true",
    ]);
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    sealed(pid, "a process exec'd into a paused container");
    f.ok(&["resume", &id]);
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(init));
}
