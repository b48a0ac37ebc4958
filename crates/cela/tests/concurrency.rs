//! Many `cela` processes on one data dir at once, as an API server or a script driving cela
//! would make them: no instance lost or duplicated, one winner per name, no stale lock, and
//! nothing left after the removals (instance dirs, mounts, cgroups). As root, on this host's
//! containers.

mod images;
mod world;

use std::collections::BTreeSet;
use std::thread;

use world::World;

/// Runs `count` `cela` commands at once (`args(i)` for the i-th) and returns their outputs
/// in order.
fn at_once(
    w: &World,
    count: usize,
    args: impl Fn(usize) -> Vec<String>,
) -> Vec<std::process::Output> {
    thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .map(|i| {
                let a = args(i);
                s.spawn(move || {
                    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
                    w.cela(&refs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every instance of the data dir, from `ps -a --format json`.
fn all_instances(w: &World) -> Vec<serde_json::Value> {
    serde_json::from_str(&w.ok(&["ps", "-a", "--format", "json"])).unwrap()
}

fn assert_nothing_left(w: &World) {
    assert_eq!(all_instances(w), Vec::<serde_json::Value>::new());
    let instances = w.data().join("instances");
    // The store's lock file stays (it is how instances are locked, not one of them).
    let left: Vec<_> = std::fs::read_dir(&instances)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                .filter(|n| n != ".lock")
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", instances.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let data = w.data().display().to_string();
    assert!(
        !mounts.contains(&data),
        "mounts left under {data}:\n{mounts}"
    );
}

#[test]
fn fifty_parallel_runs_each_give_their_own_output_and_leave_nothing() {
    let w = World::new();
    let outs = at_once(&w, 50, |i| {
        [
            "run",
            "--rm",
            "testimg",
            "sh",
            "-c",
            &format!("echo run-{i}; exit {}", i % 7),
        ]
        .map(String::from)
        .to_vec()
    });
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(
            (out.status.code(), text(&out.stdout)),
            (Some((i % 7) as i32), format!("run-{i}\n")),
            "run {i}: {}",
            text(&out.stderr)
        );
    }
    assert_nothing_left(&w);
    // No stale lock: the next run goes through.
    assert_eq!(
        w.ok(&["run", "--rm", "testimg", "echo", "after"]),
        "after\n"
    );
}

#[test]
fn one_name_has_one_winner_and_parallel_removals_leave_nothing() {
    let w = World::new();
    let outs = at_once(&w, 20, |_| {
        ["run", "-d", "--name", "same", "testimg", "sleep", "600"]
            .map(String::from)
            .to_vec()
    });
    let won: Vec<&std::process::Output> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(won.len(), 1, "{} runs took the name `same`", won.len());
    for o in outs.iter().filter(|o| !o.status.success()) {
        assert!(
            text(&o.stderr).contains("exists already"),
            "a losing run failed otherwise: {}",
            text(&o.stderr)
        );
    }
    assert_eq!(all_instances(&w).len(), 1);
    assert_eq!(w.status("same"), "running");

    // Twenty-five detached instances under different names, then every one removed with
    // `rm -f` at once, twice over (the second removal of each finds nothing or the first
    // half-way; neither may fail otherwise or leave anything).
    let ids: BTreeSet<String> = at_once(&w, 25, |i| {
        [
            "run",
            "-d",
            "--name",
            &format!("many-{i}"),
            "testimg",
            "sleep",
            "600",
        ]
        .map(String::from)
        .to_vec()
    })
    .into_iter()
    .map(|o| {
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stdout).trim().to_owned()
    })
    .collect();
    assert_eq!(ids.len(), 25, "duplicated ids");
    assert_eq!(all_instances(&w).len(), 26);
    let removals = at_once(&w, 52, |i| {
        let name = if i >= 50 {
            "same".to_owned()
        } else {
            format!("many-{}", i % 25)
        };
        ["rm", "-f", &name].map(String::from).to_vec()
    });
    for (i, o) in removals.iter().enumerate() {
        assert!(
            o.status.success() || text(&o.stderr).contains("no such instance"),
            "removal {i} failed: {}",
            text(&o.stderr)
        );
    }
    assert_nothing_left(&w);
}
