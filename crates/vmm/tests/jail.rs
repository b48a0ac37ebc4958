//! The monitor's jail, on a real monitor: a tiny guest runs on /dev/kvm under a jailed monitor
//! (`cela_vmm::jail::run`), and the test reads from the host what the monitor is: its uid, its
//! capabilities, its seccomp mode, its namespaces, its root, its cgroup and limits. Then it
//! stops it the way `cela stop` does (SIGTERM to the caller's child) and checks nothing is
//! left. Another monitor makes a forbidden call on its main thread and must be reported.
//!
//! These tests need /dev/kvm and root, and fail (never skip) without them. They run one at a
//! time: each looks for the monitor among this process's
//! descendants.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cela_vmm::builder::{SerialSinks, boot_bare};
use cela_vmm::jail::{self, JailConfig};
use cela_vmm::stop::StopSignal;

const ENTRY: u64 = 0x10000;
const BOUND: Duration = Duration::from_secs(60);
/// `jmp $`: a guest that runs until it is stopped.
const SPIN: [u8; 2] = [0xeb, 0xfe];

fn require_kvm() {
    if let Err(e) = cela_vmm::vstate::vm::open_kvm() {
        panic!("these tests run tiny guests on /dev/kvm, which is unusable here: {e}");
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests jail a monitor, which takes root"
    );
}

/// One jailed monitor at a time in this process: each test finds its monitor among this
/// process's descendants.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(run_dir: &Path) -> JailConfig {
    // SAFETY: the tests of this file run one at a time (`ONE_AT_A_TIME`), and nothing else
    // in this process reads the environment while it is set.
    unsafe { std::env::set_var("CELA_RUN_DIR", run_dir) };
    JailConfig::monitor(1, 16)
}

/// The body of a jailed monitor: a spinning tiny guest, stopped by a host signal (or the
/// bound), with `after_start` run on the main thread once it runs and is filtered.
fn spinning_guest(jail: jail::Jail, after_start: fn()) -> Result<String, String> {
    let stop = Arc::new(StopSignal::new());
    let sinks = SerialSinks {
        console: Box::new(std::io::sink()),
        control: Box::new(std::io::sink()),
    };
    let signals = cela_vmm::console::HostSignals::install();
    let filters = cela_vmm::seccomp::Filters::new()
        .map_err(|e| e.to_string())?
        .with_jail(jail);
    let mut machine = boot_bare(&SPIN, ENTRY, 1, vec![], sinks, stop.clone(), Some(filters))
        .map_err(|e| e.to_string())?;
    if let Some(s) = signals {
        s.watch(stop.clone(), machine.filters());
    }
    if let Some(f) = machine.filters() {
        f.confine_main();
    }
    after_start();
    Ok(format!("{:?}", machine.wait(Some(BOUND))))
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // The fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = rest.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid == pid {
            out.push(p);
        }
    }
    out
}

fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
        .trim()
        .to_owned()
}

/// Waits (bounded) for this process's grandchild to be a monitor inside its jail (its main
/// thread filtered); returns (reaper, monitor).
fn find_jailed_monitor() -> (u32, u32) {
    let deadline = Instant::now() + BOUND;
    loop {
        for reaper in children(std::process::id()) {
            for monitor in children(reaper) {
                let status =
                    std::fs::read_to_string(format!("/proc/{monitor}/status")).unwrap_or_default();
                if status.contains("Seccomp:\t2") {
                    return (reaper, monitor);
                }
            }
        }
        assert!(Instant::now() < deadline, "no jailed monitor appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn a_jailed_monitor_is_unprivileged_alone_limited_and_leaves_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require_kvm();
    let run_dir = tempfile::tempdir().unwrap();
    let cfg = config(run_dir.path());
    let inspector = std::thread::spawn(|| {
        let (reaper, monitor) = find_jailed_monitor();
        let status = std::fs::read_to_string(format!("/proc/{monitor}/status")).unwrap();
        let uid = status_field(&status, "Uid");
        let id: u32 = uid.split_whitespace().next().unwrap().parse().unwrap();
        let mut seen = vec![
            format!("Uid {uid}"),
            format!("Gid {}", status_field(&status, "Gid")),
            format!("Groups [{}]", status_field(&status, "Groups")),
        ];
        for f in [
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Seccomp",
        ] {
            seen.push(format!("{f} {}", status_field(&status, f)));
        }
        let me = std::process::id().to_string();
        let m = monitor.to_string();
        let shared: Vec<&str> = ["mnt", "pid", "net", "ipc", "uts", "cgroup", "user"]
            .into_iter()
            .filter(|k| ns(&me, k) == ns(&m, k))
            .collect();
        let root: Vec<String> = std::fs::read_dir(format!("/proc/{monitor}/root"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let passwd = Path::new(&format!("/proc/{monitor}/root/etc/passwd")).exists();
        let cgroups = std::fs::read_to_string(format!("/proc/{monitor}/cgroup")).unwrap();
        let limits = std::fs::read_to_string(format!("/proc/{monitor}/limits")).unwrap();
        let limit = |name: &str| {
            limits
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .split_whitespace()
                .skip(name.split(' ').count())
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let lims = [
            limit("Max core file size"),
            limit("Max open files"),
            limit("Max file size"),
            limit("Max processes"),
        ];
        // Stop it as `cela stop` would: SIGTERM to the caller's child.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(reaper as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        (id, seen, shared, root, passwd, cgroups, lims)
    });
    let result = jail::run(&cfg, |j| spinning_guest(j, || {}));
    let (id, seen, shared, root, passwd, cgroups, lims) = inspector.join().unwrap();
    assert_eq!(result.unwrap(), "Guest(Interrupted(15))");

    assert!(
        (jail::uid::FIRST..jail::uid::FIRST + jail::uid::COUNT).contains(&id),
        "uid {id} is outside the monitors' range"
    );
    assert_eq!(
        seen,
        [
            format!("Uid {id}\t{id}\t{id}\t{id}"),
            format!("Gid {id}\t{id}\t{id}\t{id}"),
            "Groups []".into(),
            "CapInh 0000000000000000".into(),
            "CapPrm 0000000000000000".into(),
            "CapEff 0000000000000000".into(),
            "CapBnd 0000000000000000".into(),
            "CapAmb 0000000000000000".into(),
            "NoNewPrivs 1".into(),
            "Seccomp 2".into(),
        ]
    );
    // The cgroup namespace is the host's; the user namespace too (the uid is a host uid).
    assert_eq!(
        shared,
        ["cgroup", "user"],
        "namespaces shared with the host"
    );
    assert!(root.is_empty(), "the jail's root holds {root:?}");
    assert!(!passwd, "the host's /etc/passwd is visible in the jail");
    assert!(
        cgroups.contains(&format!("/cela-monitors/{id}")),
        "the monitor is not in its cgroup:\n{cgroups}"
    );
    // No file may grow (the tiny guest has no disk), unless stdout or stderr, which the
    // monitor inherits, is a regular file (a log, as in CI), which must.
    let stdio_is_a_file = [1, 2]
        .into_iter()
        .any(|fd| std::fs::metadata(format!("/proc/self/fd/{fd}")).is_ok_and(|m| m.is_file()));
    let fsize = if stdio_is_a_file {
        "unlimited unlimited"
    } else {
        "0 0"
    };
    assert_eq!(lims, ["0 0", "1024 1024", fsize, "65 65"]);

    // Nothing left: the cgroup is gone and the id is free again.
    for dir in [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ] {
        let path = Path::new(dir).join(format!("cela-monitors/{id}"));
        assert!(!path.exists(), "{} is left", path.display());
    }
    let again = jail::uid::Lease::take(&run_dir.path().join("monitor-ids")).unwrap();
    assert_eq!(again.id(), id, "the monitor's id was not released");
}

#[test]
fn a_forbidden_call_on_the_main_thread_kills_the_monitor_and_is_named() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require_kvm();
    let run_dir = tempfile::tempdir().unwrap();
    let cfg = config(run_dir.path());
    let result = jail::run(&cfg, |j| {
        spinning_guest(j, || {
            // A read-only, close-on-exec open (as glibc's allocator makes of /proc on its own)
            // is answered ENOENT: nothing is opened, and the monitor runs on.
            match std::fs::File::open("/etc/shadow") {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => panic!("a read-only open got {other:?}"),
            }
            // What a monitor taken over might try next: open a host file to write it.
            let _ = std::fs::OpenOptions::new().write(true).open("/etc/shadow");
        })
    });
    let err = result.unwrap_err().to_string();
    assert_eq!(
        err,
        "the monitor was killed by its seccomp filter: syscall openat (257) on the main thread"
    );
}

#[test]
fn a_memory_limit_is_set_from_the_guest_ram() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require_kvm();
    let run_dir = tempfile::tempdir().unwrap();
    let mut cfg = config(run_dir.path());
    cfg.memory_mib = 64;
    let inspector = std::thread::spawn(|| {
        let (reaper, monitor) = find_jailed_monitor();
        let cgroups = std::fs::read_to_string(format!("/proc/{monitor}/cgroup")).unwrap();
        let memory = cgroups
            .lines()
            .find_map(|l| {
                let (_, rest) = l.split_once(':')?;
                let (ctrls, path) = rest.split_once(':')?;
                (ctrls.split(',').any(|c| c == "memory") || ctrls.is_empty())
                    .then(|| path.to_owned())
            })
            .unwrap();
        let v1 = Path::new("/sys/fs/cgroup/memory").join(memory.trim_start_matches('/'));
        let limit = if v1.join("memory.limit_in_bytes").exists() {
            std::fs::read_to_string(v1.join("memory.limit_in_bytes")).unwrap()
        } else {
            let v2 = Path::new("/sys/fs/cgroup").join(memory.trim_start_matches('/'));
            std::fs::read_to_string(v2.join("memory.max")).unwrap()
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(reaper as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        limit.trim().parse::<u64>().unwrap()
    });
    let result = jail::run(&cfg, |j| spinning_guest(j, || {}));
    let limit = inspector.join().unwrap();
    assert_eq!(result.unwrap(), "Guest(Interrupted(15))");
    assert_eq!(limit, (64 + jail::MEMORY_OVERHEAD_MIB) << 20);
}
