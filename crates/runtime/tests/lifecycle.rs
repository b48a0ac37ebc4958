//! The OCI lifecycle through `cela-runc`, against real containers: create → created → start →
//! running → kill → stopped → delete, exit statuses, exec, ps, pause/resume, and that delete
//! leaves nothing behind. Needs root and cgroups.

mod common;

use common::*;

#[test]
fn lifecycle_create_start_kill_delete_leaves_nothing() {
    let f = Fixture::new("life");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sleep", "1000"], |_| {});
    f.create(&id, &b);
    let st = f.state(&id);
    assert_eq!(st["status"], "created");
    assert_eq!(st["id"], id.as_str());
    assert_eq!(st["bundle"], b.to_str().unwrap());
    let pid = st["pid"].as_i64().unwrap() as i32;
    assert!(pid > 0 && process_alive(pid));
    assert!(!f.cgroup_dirs(&id).is_empty(), "no cgroup made for {id}");

    f.ok(&["start", &id]);
    assert_eq!(f.status(&id), "running");
    let listed = stdout(&f.ok(&["list", "--format", "json"]));
    assert!(listed.contains(&id), "list does not show {id}: {listed}");

    f.ok(&["kill", &id, "KILL"]);
    f.wait_status(&id, "stopped");
    assert_eq!(f.state(&id)["pid"], 0);
    f.ok(&["delete", &id]);
    f.assert_nothing_left(&id, Some(pid));
    let out = f.runc(&["state", &id]);
    assert!(!out.status.success() && stderr(&out).contains("does not exist"));
}

/// runtime-tools' `killsig`: `start` returns once the init has executed the program (as
/// runc's does, through its exec FIFO), and a signal sent then reaches the program's own
/// handler. Before, `start` returned while the init could still be cela-runc's code, a
/// namespace's pid 1 without a handler, and the kernel dropped the signal.
#[test]
fn start_returns_once_the_program_runs_and_its_handler_gets_kill() {
    let f = Fixture::new("killsig");
    for (sig, bit) in [("TERM", 15), ("USR1", 10), ("USR2", 12)] {
        let id = f.id(&format!("k{}", sig.to_lowercase()));
        let script = format!("trap 'echo got-{sig}; exit 3' {sig}; sleep 10 & wait $!");
        let b = f.bundle(&id, false, &["sh", "-c", &script], |_| {});
        f.create(&id, &b);
        let pid = f.state(&id)["pid"].as_i64().unwrap();
        f.ok(&["start", &id]);
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(
            !exe.to_string_lossy().contains("memfd") && !exe.to_string_lossy().contains("cela"),
            "start returned while the init was still {}",
            exe.display()
        );
        // The shell sets its trap a moment after it starts: wait for the handler (SigCgt).
        wait_until(&format!("{sig}'s handler in the container"), || {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    let hex = s
                        .lines()
                        .find_map(|l| l.strip_prefix("SigCgt:"))?
                        .trim()
                        .to_owned();
                    u64::from_str_radix(&hex, 16).ok()
                })
                .is_some_and(|mask| mask & (1 << (bit - 1)) != 0)
        });
        f.ok(&["kill", &id, sig]);
        // Well before the sleep would end on its own.
        let start = std::time::Instant::now();
        while f.status(&id) != "stopped" {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "{sig}: the container is still {} after kill",
                f.status(&id)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(f.output_of(&id).trim(), format!("got-{sig}"));
        f.ok(&["delete", &id]);
    }
}

#[test]
fn exit_codes_propagate_from_run() {
    let f = Fixture::new("exit");
    for (name, script, code) in [
        ("zero", "true", 0),
        ("seven", "exit 7", 7),
        ("ninety", "exit 99", 99),
    ] {
        let id = f.id(name);
        let b = f.bundle(&id, false, &["sh", "-c", script], |_| {});
        let out = f.runc(&["run", "--bundle", b.to_str().unwrap(), &id]);
        assert_eq!(out.status.code(), Some(code), "{script}: {}", stderr(&out));
        f.assert_nothing_left(&id, None);
    }
}

#[test]
fn run_of_a_killed_container_exits_128_plus_signal() {
    let f = Fixture::new("sig");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sleep", "1000"], |_| {});
    let child = std::process::Command::new(runc_bin())
        .arg("--root")
        .arg(&f.root)
        .args(["run", "--bundle", b.to_str().unwrap(), &id])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the container to run", || {
        f.runc(&["state", &id]).status.success() && f.status(&id) == "running"
    });
    let pid = f.state(&id)["pid"].as_i64().unwrap() as i32;
    f.ok(&["kill", &id, "SIGKILL"]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    f.assert_nothing_left(&id, Some(pid));
}

#[test]
fn run_output_reaches_the_caller() {
    let f = Fixture::new("out");
    let id = f.id("c");
    let b = f.bundle(
        &id,
        false,
        &["sh", "-c", "echo hello; hostname; echo oops >&2"],
        |_| {},
    );
    let out = f.runc(&["run", "--bundle", b.to_str().unwrap(), &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello\ncela\n");
    assert!(stderr(&out).contains("oops"));
}

#[test]
fn exec_into_a_running_container() {
    let f = Fixture::new("exec");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sleep", "1000"], |_| {});
    let pid = f.start_detached(&id, &b);
    let out = f.runc(&[
        "exec",
        &id,
        "sh",
        "-c",
        "echo from-exec; cat /proc/1/cmdline; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from-exec\nsleep\u{0}1000\u{0}");

    // --cgroup, as runc reads it: relative to the container's cgroup even with a leading `/`
    // (`/` is the container's own), an existing one only, known controllers only.
    let plain = f.ok(&["exec", &id, "cat", "/proc/self/cgroup"]);
    let top = f.ok(&["exec", "--cgroup", "/", &id, "cat", "/proc/self/cgroup"]);
    assert_eq!(stdout(&top), stdout(&plain));
    for (arg, needle) in [
        ("waaaaat:/", "\"waaaaat\" is not a cgroup controller"),
        ("../up", "must stay below the container's cgroup"),
    ] {
        let out = f.runc(&["exec", "--cgroup", arg, &id, "true"]);
        assert!(!out.status.success(), "--cgroup {arg} was accepted");
        assert!(stderr(&out).contains(needle), "{arg}: {}", stderr(&out));
    }
    let out = f.runc(&["exec", "--cgroup", "not-there", &id, "true"]);
    assert!(!out.status.success(), "a missing sub-cgroup was joined");
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(
        f.cgroup_dirs(&id)
            .iter()
            .all(|d| !d.join("not-there").exists()),
        "a refused sub-cgroup was made"
    );
    // An existing sub-cgroup: every hierarchy's, or only the named controllers'.
    let subs: Vec<_> = f.cgroup_dirs(&id).iter().map(|d| d.join("sub")).collect();
    for d in &subs {
        std::fs::create_dir(d).unwrap();
        // A new v1 cpuset cgroup has no CPUs or memory nodes until given some (joining one
        // is ENOSPC): its parent's, as a user making it would.
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(d.parent().unwrap().join(f)) {
                std::fs::write(d.join(f), v.trim()).unwrap();
            }
        }
    }
    let all = stdout(&f.ok(&["exec", "--cgroup", "sub", &id, "cat", "/proc/self/cgroup"]));
    let in_sub = |text: &str, ctrl: &str| {
        text.lines().any(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
            ctrls.split(',').any(|c| c == ctrl) && path.ends_with("/sub")
        })
    };
    assert!(in_sub(&all, "memory") && in_sub(&all, "pids"), "{all}");
    let mem = stdout(&f.ok(&[
        "exec",
        "--cgroup",
        "memory:sub",
        &id,
        "cat",
        "/proc/self/cgroup",
    ]));
    assert!(in_sub(&mem, "memory") && !in_sub(&mem, "pids"), "{mem}");
    for d in &subs {
        std::fs::remove_dir(d).unwrap();
    }

    // --process with a process.json, detached, with a pid file.
    let pj = f.dir.path().join("process.json");
    let process = serde_json::json!({
        "args": ["sleep", "500"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    });
    std::fs::write(&pj, process.to_string()).unwrap();
    let pidfile = f.dir.path().join("exec.pid");
    f.ok_detached(&[
        "exec",
        "--process",
        pj.to_str().unwrap(),
        "-d",
        "--pid-file",
        pidfile.to_str().unwrap(),
        &id,
    ]);
    let epid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(process_alive(epid));
    let pids: Vec<i32> =
        serde_json::from_slice(&f.ok(&["ps", "--format", "json", &id]).stdout).unwrap();
    assert!(
        pids.contains(&pid) && pids.contains(&epid),
        "ps {pids:?} lacks {pid} or {epid}"
    );

    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(pid));
    wait_until("the exec'd process to be gone", || !process_alive(epid));
}

#[test]
fn exec_runs_in_the_containers_personality() {
    // A LINUX32 container: its init and a process exec'd into it both see an i686 machine.
    let f = Fixture::new("personality");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sleep", "1000"], |v| {
        v["linux"]["personality"] = serde_json::json!({"domain": "LINUX32"});
    });
    let pid = f.start_detached(&id, &b);
    let out = f.ok(&["exec", &id, "uname", "-m"]);
    assert_eq!(stdout(&out).trim(), "i686");
    let init = std::fs::read_to_string(format!("/proc/{pid}/personality")).unwrap();
    assert_eq!(init.trim(), "00000008", "the init's personality");
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(pid));
}

#[test]
fn ps_lists_the_container_pids() {
    let f = Fixture::new("ps");
    let id = f.id("c");
    let b = f.bundle(
        &id,
        false,
        &["sh", "-c", "sleep 1000 & sleep 1000 & wait"],
        |_| {},
    );
    let pid = f.start_detached(&id, &b);
    let mut pids = Vec::new();
    wait_until("three processes in the container", || {
        pids = serde_json::from_slice(&f.ok(&["ps", "--format", "json", &id]).stdout).unwrap();
        pids.len() == 3
    });
    assert!(pids.contains(&pid), "{pids:?} lacks init {pid}");
    let table = stdout(&f.ok(&["ps", &id]));
    assert!(table.lines().next().unwrap().contains("PID"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(pid));
    for p in pids {
        assert!(!process_alive(p), "{p} survived delete --force");
    }
}

#[test]
fn pause_freezes_and_resume_thaws() {
    let f = Fixture::new("pause");
    let id = f.id("c");
    // The container counts into a file on a tmpfs; frozen, the count must not move.
    let b = f.bundle(
        &id,
        false,
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /dev/shm/n; done",
        ],
        |_| {},
    );
    let pid = f.start_detached(&id, &b);
    // Read from the host: a process exec'd into a frozen cgroup would freeze too.
    let count = || -> u64 {
        let n = std::fs::read_to_string(format!("/proc/{pid}/root/dev/shm/n"));
        n.ok().and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    };
    wait_until("the counter to run", || count() > 10);
    f.ok(&["pause", &id]);
    assert_eq!(f.status(&id), "paused");
    let frozen = f.cgroup_file(&id, "freezer", "freezer.state");
    assert_eq!(frozen.trim(), "FROZEN");
    let a = count();
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let b2 = count();
    assert_eq!(a, b2, "the counter moved while paused ({state})");
    f.ok(&["resume", &id]);
    assert_eq!(f.status(&id), "running");
    wait_until("the counter to move again", || count() > b2);
    // Wrong-state operations are refused.
    let out = f.runc(&["resume", &id]);
    assert!(
        !out.status.success() && stderr(&out).contains("running"),
        "{}",
        stderr(&out)
    );
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(pid));
}

/// libcontainer rewrites state.json in place; without the state root's lock a `state` racing
/// a `pause` or `resume` read an empty file (this is how `run` once exited 1 instead of 137).
#[test]
fn state_stays_readable_while_another_cela_runc_writes_it() {
    let f = Fixture::new("race");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sleep", "1000"], |_| {});
    f.start_detached(&id, &b);
    let (root, cid) = (f.root.clone(), id.clone());
    std::thread::scope(|s| {
        // The fixture is not Sync: the writer runs cela-runc itself.
        let writer = s.spawn(move || {
            for _ in 0..25 {
                for op in ["pause", "resume"] {
                    let out = std::process::Command::new(runc_bin())
                        .arg("--root")
                        .arg(&root)
                        .args([op, &cid])
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{op}: {}", stderr(&out));
                }
            }
        });
        while !writer.is_finished() {
            let st = f.state(&id);
            assert!(
                st["status"] == "running" || st["status"] == "paused",
                "{st}"
            );
        }
        writer.join().unwrap();
    });
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, None);
}

/// `exec --ignore-paused` into a paused container: the new process waits frozen in the
/// container's cgroup, but the runtime itself never joins that cgroup (it once froze there,
/// in state D, for good), and `state` and `resume` work meanwhile; once resumed, the exec
/// finishes with the program's status and output.
#[test]
fn exec_ignore_paused_never_freezes_the_runtime() {
    let f = Fixture::new("ignorepaused");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sleep", "1000"], |_| {});
    let init = f.start_detached(&id, &b);
    f.ok(&["pause", &id]);
    let mut exec = std::process::Command::new(runc_bin())
        .arg("--root")
        .arg(&f.root)
        .args(["exec", "--ignore-paused", &id, "sh", "-c", "echo resumed"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let procs = || -> Vec<i32> {
        f.cgroup_dirs(&id)
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect()
    };
    wait_until("the exec'd process to join the frozen cgroup", || {
        procs().iter().any(|p| *p != init)
    });
    let runtime = exec.id() as i32;
    assert!(
        !procs().contains(&runtime),
        "the runtime joined the container's cgroup"
    );
    let stat = std::fs::read_to_string(format!("/proc/{runtime}/stat")).unwrap();
    let state = stat.rsplit_once(')').unwrap().1.trim_start().as_bytes()[0];
    assert_ne!(state, b'D', "the runtime is frozen: {stat}");
    assert_eq!(f.status(&id), "paused");
    f.ok(&["resume", &id]);
    let start = std::time::Instant::now();
    while exec.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "exec did not finish after resume"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = exec.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "resumed\n");
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(init));
}
