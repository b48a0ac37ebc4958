//! Resource limits enforced on real containers (memory OOM kill, pids limit against a fork
//! loop, `update` of a running container, read back with `events --stats`) and refusal of bad
//! input with a clear error, a non-zero status and no state left. Needs root and cgroups v1
//! controllers (this host's hybrid layout) for the cgroup file checks.

mod common;

use common::*;
use serde_json::json;

const MIB: i64 = 1 << 20;

#[test]
fn memory_limit_oom_kills_the_container_not_the_host() {
    let f = Fixture::new("oom");
    let id = f.id("c");
    // busybox tail keeps the current line in memory: a line of zeros grows without bound.
    let b = f.bundle(
        &id,
        false,
        &[
            "sh",
            "-c",
            "head -c 400000000 /dev/zero | tail -n 1 >/dev/null; echo survived",
        ],
        |v| {
            v["linux"]["resources"]["memory"] = json!({"limit": 32 * MIB, "swap": 32 * MIB});
        },
    );
    let pid = f.start_detached(&id, &b);
    f.wait_status(&id, "stopped");
    let oom = f.cgroup_file(&id, "memory", "memory.oom_control");
    let kills: u64 = oom
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no oom_kill count in memory.oom_control: {oom}"));
    assert!(kills >= 1, "no OOM kill recorded: {oom}");
    assert!(!f.output_of(&id).contains("survived") || kills >= 1);
    let max: i64 = f
        .cgroup_file(&id, "memory", "memory.max_usage_in_bytes")
        .trim()
        .parse()
        .unwrap();
    assert!(max <= 32 * MIB, "usage {max} passed the 32 MiB limit");
    f.ok(&["delete", &id]);
    f.assert_nothing_left(&id, Some(pid));
}

#[test]
fn pids_limit_stops_a_fork_loop() {
    let f = Fixture::new("pids");
    let id = f.id("c");
    // The inner shell forks until a fork fails (busybox sh then exits); the init stays.
    let script = "sh -c 'while true; do sleep 1000 & done'; exec sleep 1000";
    let b = f.bundle(&id, false, &["sh", "-c", script], |v| {
        v["linux"]["resources"]["pids"] = json!({"limit": 16});
    });
    let pid = f.start_detached(&id, &b);
    let refused = || -> u64 {
        let events = f.cgroup_file(&id, "pids", "pids.events");
        events.trim().strip_prefix("max ").unwrap().parse().unwrap()
    };
    wait_until("a fork to be refused at the limit", || refused() >= 1);
    let current: u64 = f
        .cgroup_file(&id, "pids", "pids.current")
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 16, "{current} processes under a limit of 16");
    let stats = stdout(&f.ok(&["events", "--stats", &id]));
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["type"], "stats");
    assert_eq!(v["data"]["pids"]["limit"], 16, "{stats}");
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(pid));
}

#[test]
fn update_changes_the_limits_of_a_running_container() {
    let f = Fixture::new("upd");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sleep", "1000"], |v| {
        v["linux"]["resources"]["memory"] = json!({"limit": 64 * MIB});
        v["linux"]["resources"]["pids"] = json!({"limit": 32});
    });
    let pid = f.start_detached(&id, &b);
    assert_eq!(
        f.cgroup_file(&id, "memory", "memory.limit_in_bytes").trim(),
        (64 * MIB).to_string()
    );
    f.ok(&[
        "update",
        "--memory",
        &(48 * MIB).to_string(),
        "--pids-limit",
        "10",
        &id,
    ]);
    assert_eq!(
        f.cgroup_file(&id, "memory", "memory.limit_in_bytes").trim(),
        (48 * MIB).to_string()
    );
    assert_eq!(f.cgroup_file(&id, "pids", "pids.max").trim(), "10");
    // --resources takes an OCI LinuxResources document.
    let r = f.dir.path().join("res.json");
    std::fs::write(&r, json!({"pids": {"limit": 12}}).to_string()).unwrap();
    f.ok(&["update", "--resources", r.to_str().unwrap(), &id]);
    assert_eq!(f.cgroup_file(&id, "pids", "pids.max").trim(), "12");
    let stats: serde_json::Value =
        serde_json::from_slice(&f.ok(&["events", "--stats", &id]).stdout).unwrap();
    assert_eq!(stats["data"]["pids"]["limit"], 12);
    assert_eq!(stats["data"]["memory"]["memory"]["limit"], 48 * MIB);
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(pid));
}

fn assert_refused(out: &std::process::Output, needle: &str) {
    assert!(
        !out.status.success(),
        "expected a failure mentioning {needle:?}"
    );
    let err = stderr(out);
    assert!(
        err.starts_with("cela-runc: error: "),
        "not one clear line: {err}"
    );
    assert!(
        err.contains(needle),
        "error {err:?} does not mention {needle:?}"
    );
}

#[test]
fn bad_config_is_refused_naming_the_field_and_leaves_nothing() {
    let f = Fixture::new("badcfg");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["true"], |v| {
        v["linux"]["namespaces"][2]["type"] = json!("bogus");
    });
    assert_refused(
        &f.runc(&["create", "--bundle", b.to_str().unwrap(), &id]),
        "linux.namespaces[2].type",
    );
    f.assert_nothing_left(&id, None);
    let b = f.bundle(&id, false, &["true"], |v| v["process"]["args"] = json!([]));
    assert_refused(
        &f.runc(&["run", "--bundle", b.to_str().unwrap(), &id]),
        "process.args",
    );
    f.assert_nothing_left(&id, None);
    let b = f.bundle(&id, false, &["true"], |v| {
        v["root"]["path"] = json!("/nonexistent-rootfs")
    });
    assert_refused(
        &f.runc(&["create", "--bundle", b.to_str().unwrap(), &id]),
        "/nonexistent-rootfs",
    );
    f.assert_nothing_left(&id, None);
    std::fs::write(b.join("config.json"), "{\"ociVersion\": ").unwrap();
    assert_refused(
        &f.runc(&["create", "--bundle", b.to_str().unwrap(), &id]),
        "config.json",
    );
    f.assert_nothing_left(&id, None);
    // A config.json that never ends (a link to /dev/zero) is refused without reading it.
    std::fs::remove_file(b.join("config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", b.join("config.json")).unwrap();
    assert_refused(
        &f.runc(&["create", "--bundle", b.to_str().unwrap(), &id]),
        "must be a regular file of at most",
    );
    f.assert_nothing_left(&id, None);
    // A masked path that is a symbolic link in the image: the mask would land where it
    // points. Refused, as runc does.
    std::os::unix::fs::symlink("/etc", f.rootfs.join("masked-link")).unwrap();
    let b = f.bundle(&id, false, &["true"], |v| {
        v["linux"]["maskedPaths"] = json!(["/proc/kcore", "/masked-link"]);
    });
    let out = f.runc(&["create", "--bundle", b.to_str().unwrap(), &id]);
    std::fs::remove_file(f.rootfs.join("masked-link")).unwrap();
    assert_refused(&out, "/masked-link is a symbolic link");
    f.assert_nothing_left(&id, None);
}

#[test]
fn a_failure_inside_the_container_set_up_names_its_cause() {
    // libcontainer meets these in the container's own processes and tells its parent only a
    // summary; the message still says why (cela_runtime::cause).
    let f = Fixture::new("cause");
    let id = f.id("c");
    // /proc in the image is a link: mounting there would mount where it points.
    std::fs::remove_dir(f.rootfs.join("proc")).unwrap();
    std::os::unix::fs::symlink("/tmp", f.rootfs.join("proc")).unwrap();
    let b = f.bundle(&id, false, &["true"], |_| {});
    let out = f.runc(&["create", "--bundle", b.to_str().unwrap(), &id]);
    std::fs::remove_file(f.rootfs.join("proc")).unwrap();
    std::fs::create_dir(f.rootfs.join("proc")).unwrap();
    assert_refused(&out, "proc must be mounted on ordinary directory");
    f.assert_nothing_left(&id, None);
    // Inheritable capabilities outside an empty bounding set: the kernel's capset refuses.
    let b = f.bundle(&id, false, &["true"], |v| {
        let caps = &mut v["process"]["capabilities"];
        caps["bounding"] = json!([]);
        caps["inheritable"] = json!(["CAP_SYS_ADMIN"]);
    });
    assert_refused(
        &f.runc(&["create", "--bundle", b.to_str().unwrap(), &id]),
        "Operation not permitted",
    );
    f.assert_nothing_left(&id, None);
}

#[test]
fn wrong_state_duplicate_id_and_unknown_signal_are_refused() {
    let f = Fixture::new("state");
    let id = f.id("c");
    let b = f.bundle(&id, false, &["sleep", "1000"], |_| {});
    let pid = f.start_detached(&id, &b);
    let before = f.state(&id);
    assert_refused(
        &f.runc(&["create", "--bundle", b.to_str().unwrap(), &id]),
        "already exists",
    );
    assert_refused(
        &f.runc(&["start", &id]),
        "only a created container can be started",
    );
    assert_refused(&f.runc(&["delete", &id]), "use delete --force");
    assert_refused(
        &f.runc(&["kill", &id, "SIGBOGUS"]),
        "unknown signal \"SIGBOGUS\"",
    );
    assert_eq!(
        f.state(&id),
        before,
        "a refused operation changed the state"
    );
    assert!(process_alive(pid));
    assert_refused(&f.runc(&["state", "no-such-container"]), "does not exist");
    assert_refused(&f.runc(&["state", "../escape"]), "invalid container id");
    f.ok(&["delete", "--force", &id]);
    f.assert_nothing_left(&id, Some(pid));
    // runc's rule, which containerd relies on: force-deleting an unknown id succeeds.
    f.ok(&["delete", "--force", &id]);
}

#[test]
fn json_log_carries_the_error_for_containerd() {
    let f = Fixture::new("log");
    let log = f.dir.path().join("log.json");
    let out = f.runc(&[
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "start",
        "missing",
    ]);
    assert!(!out.status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let rec: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(rec["level"], "error");
    assert!(
        rec["msg"]
            .as_str()
            .unwrap()
            .contains("missing does not exist"),
        "{text}"
    );
}
