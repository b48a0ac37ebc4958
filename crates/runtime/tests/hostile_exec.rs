//! A process started in a container with `exec` is confined exactly as the container's init:
//! the same seccomp filter, capabilities, no_new_privs, cgroup and rlimits (issue 10, class 4:
//! libcontainer's exec dropped the seccomp filter). Each case compares `/proc/self` of an exec'd
//! process with `/proc/1` of the container, and checks that the filter refuses in the exec'd
//! process what it refuses in the init. The same bundle runs under runc where it is installed,
//! as the behaviour users expect.

mod common;

use std::path::Path;

use common::{Fixture, stderr, stdout};
use serde_json::{Value, json};

/// The fields of /proc/PID/status that say how a process is confined.
const CONFINEMENT: [&str; 9] = [
    "Seccomp",
    "Seccomp_filters",
    "NoNewPrivs",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "Uid",
];

fn confinement(status: &str) -> Vec<String> {
    status
        .lines()
        .filter(|l| CONFINEMENT.iter().any(|f| l.starts_with(&format!("{f}:"))))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// A filter that allows everything but `sethostname` (EPERM) and `chroot` (ENOSYS, which no
/// other check returns).
fn deny_hostname(v: &mut Value) {
    v["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["chroot"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
        ]
    });
    v["process"]["rlimits"] = json!([
        {"type": "RLIMIT_NOFILE", "hard": 777, "soft": 555},
        {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}
    ]);
    // CAP_SYS_ADMIN would let `hostname` through the capability check, so that the refusal
    // seen is the filter's.
    for set in ["bounding", "effective", "permitted"] {
        v["process"]["capabilities"][set]
            .as_array_mut()
            .unwrap()
            .push("CAP_SYS_ADMIN".into());
    }
}

/// Starts `sleep` in a container of `bundle`'s shape with `runtime` (cela-runc or runc), execs
/// the checks into it (given as arguments, or with `as_process` in a minimal `process.json`
/// like containerd's, without capabilities or rlimits) and returns (init's confinement, exec'd
/// confinement, the exec'd shell's report of what its calls did), all read inside the
/// container.
fn exec_report(
    f: &Fixture,
    runtime: &str,
    id: &str,
    bundle: &Path,
    as_process: bool,
) -> [String; 3] {
    let run = |args: &[&str]| {
        std::process::Command::new(runtime)
            .arg("--root")
            .arg(&f.root)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let log = std::fs::File::create(f.dir.path().join(format!("{id}.out"))).unwrap();
    let st = std::process::Command::new(runtime)
        .arg("--root")
        .arg(&f.root)
        .args(["run", "-d", "--bundle", bundle.to_str().unwrap(), id])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    assert!(st.success(), "{runtime} run -d {id}: {}", f.output_of(id));
    let script = "cat /proc/1/status; echo @@; cat /proc/self/status; echo @@; \
                  cat /proc/1/cgroup; echo @@; cat /proc/self/cgroup; echo @@; \
                  cat /proc/1/limits; echo @@; cat /proc/self/limits; echo @@; \
                  hostname evil 2>&1; echo hostname=$?; \
                  chroot / true 2>&1; echo chroot=$?";
    let process = f.dir.path().join(format!("{id}.process.json"));
    std::fs::write(
        &process,
        json!({"args": ["sh", "-c", script], "cwd": "/", "user": {"uid": 0, "gid": 0},
               "env": ["PATH=/bin"]})
        .to_string(),
    )
    .unwrap();
    let out = if as_process {
        run(&["exec", "--process", process.to_str().unwrap(), id])
    } else {
        run(&["exec", id, "sh", "-c", script])
    };
    let _ = run(&["delete", "--force", id]);
    assert!(
        out.status.success(),
        "{runtime} exec into {id} failed: {}",
        stderr(&out)
    );
    let text = stdout(&out);
    let parts: Vec<&str> = text.split("@@\n").collect();
    assert_eq!(parts.len(), 7, "unexpected exec output:\n{text}");
    let (init, me) = (confinement(parts[0]), confinement(parts[1]));
    assert_eq!(
        parts[2], parts[3],
        "{runtime}: exec'd process in another cgroup"
    );
    // runc 1.1 raises the soft RLIMIT_NOFILE of exec'd processes to the hard limit (Go's
    // runtime does it for itself), so only cela-runc's rlimits are compared.
    if runtime == common::runc_bin() {
        assert_eq!(
            parts[4], parts[5],
            "{runtime}: exec'd process has other rlimits"
        );
    }
    [init.join("\n"), me.join("\n"), parts[6].to_owned()]
}

fn assert_confined_as_init(report: &[String; 3], what: &str) {
    let [init, me, calls] = report;
    assert!(
        init.contains("Seccomp: 2"),
        "{what}: init unfiltered:\n{init}"
    );
    assert_eq!(init, me, "{what}: the exec'd process is confined otherwise");
    assert!(
        calls.contains("hostname=1") && calls.contains("chroot=1"),
        "{what}: the filter did not refuse hostname/chroot in the exec'd process:\n{calls}"
    );
    assert!(
        calls.contains("Operation not permitted") && calls.contains("Function not implemented"),
        "{what}: refused with the filter's errnos (EPERM, ENOSYS), not another check:\n{calls}"
    );
}

#[test]
fn exec_keeps_the_filter_without_no_new_privs() {
    // No no_new_privs: loading the filter needs CAP_SYS_ADMIN in the exec'd process (the
    // path where libcontainer's exec ran unfiltered).
    let f = Fixture::new("execseccomp");
    let id = f.id("c");
    let bundle = f.bundle(&id, false, &["sleep", "1000"], |v| {
        deny_hostname(v);
        // Drop CAP_SYS_ADMIN again: the exec'd process must not keep what the runtime
        // raised to load the filter.
        for set in ["bounding", "effective", "permitted"] {
            v["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .retain(|c| c != "CAP_SYS_ADMIN");
        }
        v["process"]
            .as_object_mut()
            .unwrap()
            .remove("noNewPrivileges");
    });
    let report = exec_report(&f, common::runc_bin(), &id, &bundle, false);
    let [init, ..] = &report;
    assert!(init.contains("NoNewPrivs: 0"), "{init}");
    // Without CAP_SYS_ADMIN hostname is refused by the capability check too (EPERM), so
    // only chroot's ENOSYS tells the filter's refusal apart.
    assert_eq!(
        report[0], report[1],
        "the exec'd process is confined otherwise"
    );
    assert!(
        report[2].contains("chroot=1") && report[2].contains("Function not implemented"),
        "the filter did not refuse chroot in the exec'd process:\n{}",
        report[2]
    );
    f.assert_nothing_left(&id, None);
}

#[test]
fn exec_keeps_the_filter_caps_rlimits_and_cgroup() {
    let f = Fixture::new("execconfined");
    for (name, nnp) in [("nnp", true), ("nonnp", false)] {
        let id = f.id(name);
        let bundle = f.bundle(&id, false, &["sleep", "1000"], |v| {
            deny_hostname(v);
            if !nnp {
                v["process"]
                    .as_object_mut()
                    .unwrap()
                    .remove("noNewPrivileges");
            }
        });
        let report = exec_report(&f, common::runc_bin(), &id, &bundle, false);
        assert_confined_as_init(&report, &format!("cela-runc exec ({name})"));
        assert!(report[0].contains(&format!("NoNewPrivs: {}", u8::from(nnp))));
        f.assert_nothing_left(&id, None);

        // A process object as containerd passes it, without capabilities or rlimits: what it
        // leaves out is the container's.
        let id = f.id(&format!("{name}-process"));
        let report = exec_report(&f, common::runc_bin(), &id, &bundle, true);
        assert_confined_as_init(&report, &format!("cela-runc exec --process ({name})"));
        f.assert_nothing_left(&id, None);
    }
}

#[test]
fn exec_in_a_jail_keeps_its_filter() {
    let f = Fixture::new("execjail");
    let id = f.id("j");
    let bundle = f.bundle(&id, true, &["sleep", "1000"], |_| {});
    let report = exec_report(&f, common::runc_bin(), &id, &bundle, false);
    let [init, me, calls] = &report;
    assert!(init.contains("Seccomp: 2"), "{init}");
    assert_eq!(init, me);
    assert!(calls.contains("hostname=1"), "{calls}");
    f.assert_nothing_left(&id, None);
}

#[test]
fn runc_confines_exec_the_same_way() {
    // What users expect, on the same bundle: runc applies the container's filter to exec'd
    // processes too. Without runc this comparison cannot be made, and says so.
    let runc = common::system_runc();
    let f = Fixture::new("execrunc");
    let id = f.id("r");
    let bundle = f.bundle(&id, false, &["sleep", "1000"], deny_hostname);
    let report = exec_report(&f, runc, &id, &bundle, false);
    assert_confined_as_init(&report, "runc exec");
    let _ = std::process::Command::new(runc)
        .arg("--root")
        .arg(&f.root)
        .args(["delete", "--force", &id])
        .output();
}

/// CVE-2024-21626: a working directory reached through a descriptor of a host directory
/// (`/proc/self/fd/3`, handed in with `--preserve-fds`) would put the exec'd program outside
/// the container's root, on the host's file system. The runtime must refuse it after `chdir`.
/// Returns the exec's status, stdout and stderr.
fn exec_with_host_cwd(f: &Fixture, runtime: &str, id: &str, host_dir: &Path) -> (bool, String) {
    let script = format!(
        "exec 3<'{}'; exec '{runtime}' --root '{}' exec --preserve-fds 1 --cwd /proc/self/fd/3 {id} sh -c 'ls; ls ..'",
        host_dir.display(),
        f.root.display()
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

#[test]
fn exec_cannot_start_outside_the_root_through_a_host_directory_descriptor() {
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("host-canary"), "x").unwrap();
    let runc = common::system_runc();
    for runtime in [common::runc_bin(), runc] {
        let f = Fixture::new("execcwd");
        let id = f.id("c");
        let bundle = f.bundle(&id, false, &["sleep", "1000"], |_| {});
        let started = std::process::Command::new(runtime)
            .arg("--root")
            .arg(&f.root)
            .args(["run", "-d", "--bundle", bundle.to_str().unwrap(), &id])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(started.success(), "{runtime} run -d failed");
        let (ok, out) = exec_with_host_cwd(&f, runtime, &id, host.path());
        let _ = std::process::Command::new(runtime)
            .arg("--root")
            .arg(&f.root)
            .args(["delete", "--force", &id])
            .output();
        assert!(
            !out.contains("host-canary"),
            "{runtime}: the exec'd program listed the host directory:\n{out}"
        );
        assert!(
            !ok,
            "{runtime}: exec with a cwd outside the root succeeded:\n{out}"
        );
        if runtime == common::runc_bin() {
            assert!(out.contains("outside the container's root"), "{out}");
        }
    }
}
