//! Crash consistency: `cela run -d`, its supervisor and `cela rm -f` killed with SIGKILL at
//! random points, many rounds, then the data dir must still work (`ps`, `rm -f`, `image ls`,
//! a new run) and nothing may be left: no instance, mount, cgroup or supervisor process. The
//! points are random (a seed printed, `CELA_CRASH_SEED` replays one); the delays choose where
//! the kill lands, nothing waits on them. As root, on this host's containers.

mod images;
mod world;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use world::World;

/// xorshift64*: enough to spread the kill points; reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A delay of 0..max_us microseconds.
    fn delay(&mut self, max_us: u64) -> Duration {
        Duration::from_micros(self.next() % max_us)
    }
}

fn spawn_cela(w: &World, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_cela"))
        .arg("--data-dir")
        .arg(w.data())
        .args(args)
        .env(images::DEFAULT_NETWORK.0, images::DEFAULT_NETWORK.1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Kills `child` after `delay` (or lets it finish first) and reaps it.
fn kill_after(mut child: std::process::Child, delay: Duration) {
    let until = Instant::now() + delay;
    while Instant::now() < until {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::yield_now();
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Supervisor processes of this data dir still running (not zombies).
fn supervisors(w: &World) -> Vec<String> {
    let data = w.data().display().to_string();
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "__supervise") && args.iter().any(|a| a == &data) {
            let pid = p.file_name().to_string_lossy().into_owned();
            if !world::zombie(pid.parse().unwrap()) {
                out.push(format!("{pid}: {}", args.join(" ")));
            }
        }
    }
    out
}

/// Every container cgroup cela has on this host (`/sys/fs/cgroup/<hierarchy>/cela/<id>`).
fn container_cgroups() -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        if let Ok(d) = std::fs::read_dir(h.path().join("cela")) {
            for e in d.flatten() {
                if e.path().is_dir() {
                    out.insert(e.path().display().to_string());
                }
            }
        }
    }
    out
}

#[test]
fn sigkill_at_random_points_loses_nothing_and_leaks_nothing() {
    let w = World::new();
    let seed = std::env::var("CELA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("CELA_CRASH_SEED={seed}");
    let cgroups_before = container_cgroups();
    let mut rng = Rng(seed);
    const ROUNDS: usize = 60;
    for round in 0..ROUNDS {
        let name = format!("crash-{round}");
        let run = spawn_cela(
            &w,
            &["run", "-d", "--name", &name, "testimg", "sleep", "600"],
        );
        match round % 3 {
            // Kill `cela run -d` itself somewhere in its 0-60 ms.
            0 => kill_after(run, rng.delay(60_000)),
            // Let it return, then kill the supervisor somewhere in the container's start.
            1 => {
                let out = run.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&String::from_utf8_lossy(
                    &w.cela(&["inspect", &name]).stdout,
                )) && let Some(pid) = v[0]["supervisor"]["pid"].as_i64()
                {
                    std::thread::sleep(rng.delay(20_000));
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            // Let it run, then kill `cela rm -f` somewhere in its removal.
            _ => {
                let _ = run.wait_with_output().unwrap();
                let rm = spawn_cela(&w, &["rm", "-f", &name]);
                kill_after(rm, rng.delay(40_000));
            }
        }
    }
    // Whatever each kill left, the data dir still answers and `rm -f` ends it all.
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&["ps", "-a", "--format", "json"])).unwrap();
    let statuses: std::collections::BTreeMap<String, usize> =
        listed.iter().fold(Default::default(), |mut m, i| {
            *m.entry(i["status"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
            m
        });
    println!(
        "after {ROUNDS} kills: {} instances, by status {statuses:?}",
        listed.len()
    );
    for inst in &listed {
        // A directory a kill left without a config is listed by id only (status unknown).
        let name = inst["name"]
            .as_str()
            .or(inst["id"].as_str())
            .unwrap_or_else(|| panic!("a listed instance without a name or an id: {inst}"))
            .to_owned();
        let out = w.cela(&["rm", "-f", &name]);
        assert!(
            out.status.success(),
            "rm -f {name} after the crashes (seed {seed}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Instances whose record a kill cut short are listed by id only, if at all: sweep by id.
    let instances = w.data().join("instances");
    for e in std::fs::read_dir(&instances).unwrap().flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if !id.starts_with('.') {
            let out = w.cela(&["rm", "-f", &id]);
            assert!(
                out.status.success(),
                "rm -f {id} (seed {seed}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let left: Vec<String> = std::fs::read_dir(&instances)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    assert!(
        left.is_empty(),
        "left in instances/ (seed {seed}): {left:?}"
    );
    let ps: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&["ps", "-a", "--format", "json"])).unwrap();
    assert!(ps.is_empty(), "still listed (seed {seed}): {ps:?}");
    let start = Instant::now();
    while !supervisors(&w).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "supervisors left (seed {seed}): {:?}",
            supervisors(&w)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let data = w.data().display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&data),
        "mounts left (seed {seed}):\n{mounts}"
    );
    let cgroups_after = container_cgroups();
    let new: Vec<&String> = cgroups_after.difference(&cgroups_before).collect();
    assert!(new.is_empty(), "cgroups left (seed {seed}): {new:?}");
    // The store still works: images listed, a new instance runs.
    assert!(w.ok(&["image", "ls"]).contains("testimg"));
    assert_eq!(
        w.ok(&["run", "--rm", "testimg", "echo", "after"]),
        "after\n"
    );
}
