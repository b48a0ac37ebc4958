//! cela-runc on a pure cgroup v2 host. This machine's cgroups are hybrid (v1 controllers, an
//! empty cgroup2 beside them), so the test runs the runtime inside the nested lab's L1 (see
//! docs/TESTING.md), whose own init mounts nothing but cgroup2 at /sys/fs/cgroup: there
//! libcgroups can only take the v2 path. Memory, pids and cpu limits are applied and read back
//! from the v2 files and `events --stats`, `update` changes them, an allocation past the memory
//! limit is OOM-killed, a fork loop stops at the pids limit, the jail profile runs with its
//! limits, and every cgroup is gone after delete.
//!
//! L1's root is an initramfs, which pivot_root cannot leave, so the containers use
//! `--no-pivot` (the other isolation is unchanged).

use std::collections::HashMap;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use cela_lab::{Lab, LabError, LabRun, Scenario};
use serde_json::{Value, json};

const MIB: i64 = 1 << 20;

/// The L1 script: builds a busybox rootfs per container from L1's own busybox and prints
/// `key=value` lines the tests check.
const SCRIPT: &str = r#"
R="/lab/cela-runc --root /tmp/state"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || { echo "cannot mount cgroup2"; exit 90; }
echo "fs=$(grep ' /sys/fs/cgroup ' /proc/mounts | cut -d' ' -f3)"
echo "v1_dirs=$(ls /sys/fs/cgroup | grep -c -x -e memory -e pids -e cpu)"
for b in lim oom pids jail; do
  mkdir -p /tmp/$b/rootfs/bin /tmp/$b/rootfs/proc /tmp/$b/rootfs/dev /tmp/$b/rootfs/sys /tmp/$b/rootfs/tmp
  cp /bin/busybox /tmp/$b/rootfs/bin/
  for a in sh sleep head tail cat echo; do ln -s busybox /tmp/$b/rootfs/bin/$a; done
  cp /lab/$b.json /tmp/$b/config.json
done
# Polls (bounded, 20 s) until `cond` succeeds.
until_true() { i=0; while ! eval "$1"; do i=$((i+1)); [ $i -gt 400 ] && return 1; sleep 0.05; done; }
stopped() { $R state $1 | grep -q '"status": "stopped"'; }

$R run -d --no-pivot --bundle /tmp/lim lim </dev/null >/dev/null 2>&1; echo lim_run=$?
cg=/sys/fs/cgroup/cela-lim
echo "lim_memory_max=$(cat $cg/memory.max)"
echo "lim_pids_max=$(cat $cg/pids.max)"
echo "lim_cpu_max=$(cat $cg/cpu.max)"
$R update --memory 100663296 --pids-limit 10 lim; echo lim_update=$?
echo "lim_memory_max2=$(cat $cg/memory.max)"
echo "lim_pids_max2=$(cat $cg/pids.max)"
echo "lim_stats=$($R events --stats lim | tr -d '\n')"
$R delete --force lim; echo lim_delete=$?

$R run -d --no-pivot --bundle /tmp/oom oom </dev/null >/dev/null 2>&1; echo oom_run=$?
until_true "stopped oom"; echo oom_stopped=$?
echo "oom_kills=$(grep '^oom_kill ' /sys/fs/cgroup/cela-oom/memory.events | cut -d' ' -f2)"
echo "oom_peak=$(cat /sys/fs/cgroup/cela-oom/memory.peak)"
$R delete oom; echo oom_delete=$?

$R run -d --no-pivot --bundle /tmp/pids pids </dev/null >/dev/null 2>&1; echo pids_run=$?
until_true "grep -q '^max [1-9]' /sys/fs/cgroup/cela-pids/pids.events"; echo pids_refused=$?
echo "pids_current=$(cat /sys/fs/cgroup/cela-pids/pids.current)"
$R delete --force pids; echo pids_delete=$?

$R run -d --no-pivot --bundle /tmp/jail jail </dev/null >/dev/null 2>&1; echo jail_run=$?
echo "jail_status=$($R state jail | grep -o '"status": "[a-z]*"' | cut -d'"' -f4)"
echo "jail_memory_max=$(cat /sys/fs/cgroup/cela-jail/memory.max)"
echo "jail_pids_max=$(cat /sys/fs/cgroup/cela-jail/pids.max)"
$R delete --force jail; echo jail_delete=$?

echo "left=$(ls /sys/fs/cgroup | grep -c '^cela-')"
echo "state_left=$(ls /tmp/state | wc -l)"
echo "procs_left=$(ps -o comm | grep -c -x sleep)"
"#;

/// A bundle config from `cela-runc spec` (or `spec --jail`) for L1's /tmp/<name>/rootfs.
fn config(name: &str, jail: bool, args: &[&str], resources: Option<Value>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cela-runc"));
    cmd.args(["spec", "--bundle"]).arg(dir.path());
    if jail {
        cmd.arg("--jail");
    }
    assert!(cmd.status().unwrap().success(), "cela-runc spec failed");
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    v["root"]["path"] = format!("/tmp/{name}/rootfs").into();
    v["process"]["terminal"] = false.into();
    v["process"]["args"] = json!(args);
    v["linux"]["cgroupsPath"] = format!("/cela-{name}").into();
    if let Some(r) = resources {
        v["linux"]["resources"] = r;
    }
    serde_json::to_vec_pretty(&v).unwrap()
}

/// The script's `key=value` lines, and its whole output for messages.
struct Outcome {
    values: HashMap<String, String>,
    text: String,
}

impl Outcome {
    fn get(&self, key: &str) -> &str {
        self.values
            .get(key)
            .unwrap_or_else(|| panic!("no {key}= in the L1 output:\n{}", self.text))
    }

    fn num(&self, key: &str) -> i64 {
        self.get(key)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number:\n{}", self.text))
    }
}

fn outcome() -> &'static Outcome {
    static OUTCOME: OnceLock<Outcome> = OnceLock::new();
    OUTCOME.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: Vec<u8>| {
            let p = dir.path().join(format!("{name}.json"));
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let configs = [
            write(
                "lim",
                config(
                    "lim",
                    false,
                    &["sleep", "1000"],
                    Some(json!({"memory": {"limit": 64 * MIB}, "pids": {"limit": 32},
                                "cpu": {"quota": 50000, "period": 100000}})),
                ),
            ),
            // busybox tail keeps the current line in memory: a line of zeros grows unbounded.
            write(
                "oom",
                config(
                    "oom",
                    false,
                    &[
                        "sh",
                        "-c",
                        "head -c 400000000 /dev/zero | tail -n 1 >/dev/null",
                    ],
                    Some(json!({"memory": {"limit": 32 * MIB, "swap": 32 * MIB}})),
                ),
            ),
            write(
                "pids",
                config(
                    "pids",
                    false,
                    &[
                        "sh",
                        "-c",
                        "sh -c 'while true; do sleep 1000 & done'; exec sleep 1000",
                    ],
                    Some(json!({"pids": {"limit": 16}})),
                ),
            ),
            write("jail", config("jail", true, &["sleep", "1000"], None)),
        ];
        let lab = Lab::new().unwrap_or_else(|e| panic!("the nested lab is unavailable: {e}"));
        let mut run = LabRun::new().file(env!("CARGO_BIN_EXE_cela-runc"), "/lab/cela-runc");
        for p in &configs {
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            run = run.file(p, format!("/lab/{name}"));
        }
        run = run.scenario(Scenario::new("v2", SCRIPT).with_timeout(Duration::from_secs(240)));
        run.timeout = Duration::from_secs(360);
        // A frozen QEMU-TCG L1 (docs/TESTING.md) is the lab's failure, not cela's: once more.
        let report = match lab.run(&run) {
            Err(e @ (LabError::Frozen { .. } | LabError::Timeout { .. })) => {
                eprintln!("the nested lab stopped responding ({e}); running it once more");
                lab.run(&run)
            }
            other => other,
        }
        .unwrap_or_else(|e| panic!("the lab run failed: {e}"));
        let r = report.get("v2");
        let text = format!("{}{}", r.stdout_str(), r.stderr_str());
        r.expect_rc(0);
        let values = r
            .stdout_str()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Outcome { values, text }
    })
}

#[test]
fn l1_has_cgroup2_only() {
    let o = outcome();
    assert_eq!(o.get("fs"), "cgroup2", "{}", o.text);
    assert_eq!(o.get("v1_dirs"), "0", "{}", o.text);
}

#[test]
fn limits_are_applied_and_updated_in_the_v2_files() {
    let o = outcome();
    assert_eq!(o.get("lim_run"), "0", "{}", o.text);
    assert_eq!(o.num("lim_memory_max"), 64 * MIB);
    assert_eq!(o.get("lim_pids_max"), "32");
    assert_eq!(o.get("lim_cpu_max"), "50000 100000");
    assert_eq!(o.get("lim_update"), "0", "{}", o.text);
    assert_eq!(o.num("lim_memory_max2"), 96 * MIB);
    assert_eq!(o.get("lim_pids_max2"), "10");
    assert_eq!(o.get("lim_delete"), "0", "{}", o.text);
}

#[test]
fn events_stats_reads_the_v2_limits_back() {
    let o = outcome();
    let stats: Value = serde_json::from_str(o.get("lim_stats"))
        .unwrap_or_else(|e| panic!("events --stats is not JSON ({e}):\n{}", o.text));
    assert_eq!(stats["type"], "stats");
    assert_eq!(stats["data"]["pids"]["limit"], 10, "{stats}");
    assert_eq!(
        stats["data"]["memory"]["memory"]["limit"],
        96 * MIB,
        "{stats}"
    );
}

#[test]
fn past_the_memory_limit_the_container_is_oom_killed() {
    let o = outcome();
    assert_eq!(o.get("oom_run"), "0", "{}", o.text);
    assert_eq!(
        o.get("oom_stopped"),
        "0",
        "the container never stopped: {}",
        o.text
    );
    assert!(o.num("oom_kills") >= 1, "no OOM kill recorded: {}", o.text);
    assert!(
        o.num("oom_peak") <= 32 * MIB,
        "usage passed the limit: {}",
        o.text
    );
    assert_eq!(o.get("oom_delete"), "0", "{}", o.text);
}

#[test]
fn a_fork_loop_stops_at_the_pids_limit() {
    let o = outcome();
    assert_eq!(o.get("pids_run"), "0", "{}", o.text);
    assert_eq!(
        o.get("pids_refused"),
        "0",
        "no fork was refused: {}",
        o.text
    );
    assert!(o.num("pids_current") <= 16, "{}", o.text);
    assert_eq!(o.get("pids_delete"), "0", "{}", o.text);
}

#[test]
fn the_jail_runs_with_its_limits() {
    let o = outcome();
    assert_eq!(o.get("jail_run"), "0", "{}", o.text);
    assert_eq!(o.get("jail_status"), "running", "{}", o.text);
    assert_eq!(o.num("jail_memory_max"), 256 * MIB, "{}", o.text);
    assert_eq!(o.get("jail_pids_max"), "128", "{}", o.text);
    assert_eq!(o.get("jail_delete"), "0", "{}", o.text);
}

#[test]
fn nothing_is_left_after_delete() {
    let o = outcome();
    assert_eq!(o.get("left"), "0", "cgroups left: {}", o.text);
    assert_eq!(o.get("state_left"), "0", "state left: {}", o.text);
    assert_eq!(o.get("procs_left"), "0", "processes left: {}", o.text);
}
