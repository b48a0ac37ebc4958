//! cela-runc on a pure cgroup v2 host. This machine's cgroups are hybrid (v1 controllers, an
//! empty cgroup2 beside them), so the test runs the runtime inside the nested lab's L1 (see
//! docs/TESTING.md), whose own init mounts nothing but cgroup2 at /sys/fs/cgroup: there
//! libcgroups can only take the v2 path. Memory, pids and cpu limits are applied and read back
//! from the v2 files and `events --stats`, `update` changes them, an allocation past the memory
//! limit is OOM-killed, a fork loop stops at the pids limit, the jail profile runs with its
//! limits, and every cgroup is gone after delete.
//!
//! Device rules, in the same L1 boot (scenario `devices`): on cgroup v2 only an eBPF program
//! of type BPF_PROG_TYPE_CGROUP_DEVICE attached to the container's cgroup enforces them (v1 had
//! the `devices` controller), so a runtime that forgets it lets a container read and write the
//! host's disks. L1 backs a loop device with a file (its "disk") and the containers attack it:
//! a block node made with `mknod` (CAP_MKNOD, as in Docker's default set), nodes the image
//! carries (mode 0666, also in the jail), `/dev/kmsg` and `/dev/kvm`, through `run`, and
//! through `exec` after an `update`. Every open must fail with EPERM while mknod itself
//! succeeds, the allowed nodes (/dev/null, zero, full, random, urandom, tty) must still work,
//! a rule in the spec must allow exactly the access it names, and L1's disk and kernel log must
//! be untouched.
//!
//! L1's root is an initramfs, which pivot_root cannot leave, so the containers use
//! `--no-pivot` (the other isolation is unchanged).

use std::collections::HashMap;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use cela_lab::{Lab, LabError, LabRun, Scenario, ScenarioResult};
use serde_json::{Value, json};

const MIB: i64 = 1 << 20;

/// The L1 script: builds a busybox rootfs per container from L1's own busybox and prints
/// `key=value` lines the tests check.
const SCRIPT: &str = r#"
R="/lab/cela-runc --root /tmp/state"
grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup || { echo "cannot mount cgroup2"; exit 90; }
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
fn config(name: &str, jail: bool, args: &[&str], resources: Option<Value>) -> Value {
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
    v
}

/// The `devices` scenario: a loop device over a file in L1's /tmp stands for the host's disk
/// (`HOSTDISK-SECRET` at 0, zeros at 512); four containers attack it and L1's kernel log
/// through the device nodes of [`ATTACK`], then L1 reads back its disk and log. Device rules
/// are enforced at open, so the nodes are made (or shipped) freely and opened in the container.
const DEVICES_SCRIPT: &str = r#"
D="/lab/cela-runc --root /tmp/devstate"
grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup || { echo "cannot mount cgroup2"; exit 90; }
for m in /lab/devmod-*.ko; do [ -e "$m" ] || continue; insmod "$m" || { echo "cannot load $m"; exit 91; }; done
dd if=/dev/zero of=/tmp/disk.img bs=1024 count=1024 2>/dev/null
printf HOSTDISK-SECRET | dd of=/tmp/disk.img conv=notrunc 2>/dev/null
losetup /dev/loop0 /tmp/disk.img || { echo "losetup /dev/loop0 failed"; exit 92; }
echo "loop0=$(cat /sys/block/loop0/dev)"
echo "l1_read=$(head -c 15 /dev/loop0)"
for b in devs devjail devallow devupd; do
  r=/tmp/$b/rootfs
  mkdir -p $r/bin $r/proc $r/dev $r/sys $r/tmp
  cp /bin/busybox $r/bin/
  for a in sh head dd od tr wc sleep cat; do ln -s busybox $r/bin/$a; done
  tr ':' ' ' < /sys/block/loop0/dev > $r/devnum
  # What a hostile image ships: the disk and the kernel log, open to everyone.
  mknod -m 666 $r/imgdisk b $(cat $r/devnum)
  mknod -m 666 $r/imgkmsg c 1 11
  cp /lab/attack.sh $r/attack.sh
  cp /lab/$b.json /tmp/$b/config.json
done
for b in devs devjail devallow; do
  $D run --no-pivot --bundle /tmp/$b $b </dev/null; echo ${b}_run=$?
done
$D run -d --no-pivot --bundle /tmp/devupd devupd </dev/null >/dev/null 2>&1; echo devupd_run=$?
$D update --pids-limit 50 devupd; echo devupd_update=$?
$D exec devupd sh /attack.sh devupd </dev/null; echo devupd_exec=$?
$D delete --force devupd; echo devupd_delete=$?
sync; blockdev --flushbufs /dev/loop0
echo "disk_head=$(head -c 15 /tmp/disk.img)"
echo "disk_512_nonzero=$(dd if=/tmp/disk.img bs=1 skip=512 count=15 2>/dev/null | tr -d '\000' | wc -c)"
echo "kmsg_probes=$(dmesg | grep -c cela-devprobe)"
echo "dev_cgroups_left=$(ls /sys/fs/cgroup | grep -c '^cela-dev')"
echo "dev_state_left=$(ls /tmp/devstate | wc -l)"
"#;

/// Run in the container as `sh /attack.sh NAME`: prints `NAME_<probe>=<result>`, where the
/// result is `EPERM`, `ENXIO`, `ENOSPC`, `missing` (no such node), or `ok:<output>`.
/// `mk_*` probe nodes made here with mknod (`/devnum` holds L1's loop0 as `MAJOR MINOR`),
/// `img_*` the nodes the image carries.
const ATTACK: &str = r#"
P=$1
read maj min < /devnum
probe() {
  n=$1; shift
  out=$("$@" 2>&1); rc=$?
  case "$out" in
    *"Operation not permitted"*) r=EPERM ;;
    *"No such device or address"*) r=ENXIO ;;
    *"No space left on device"*) r=ENOSPC ;;
    missing) r=missing ;;
    *) if [ $rc = 0 ]; then r="ok:$(printf %s "$out" | tr -d '\n')"; else r="rc$rc:$(printf %s "$out" | tr '\n' ' ')"; fi ;;
  esac
  echo "${P}_$n=$r"
}
node() { [ -b "$1" ] || [ -c "$1" ] || { echo missing; return 1; }; }
rd() { node "$1" && head -c 15 "$1"; }
wr() { node "$1" || return; e=$(printf CONTAINER-WROTE | dd of="$1" bs=1 seek="$2" conv=notrunc 2>&1) && echo written || { echo "$e"; return 1; }; }
log() { node "$1" && echo "cela-devprobe-$P" > "$1" && echo written; }
opn() { node "$1" && exec 3<"$1" && echo opened; }
mknod /dev/mkdisk b $maj $min; echo ${P}_mk_mknod=$?
mknod /dev/kmsg c 1 11; echo ${P}_kmsg_mknod=$?
mknod /dev/kvm c 10 232; echo ${P}_kvm_mknod=$?
probe mk_read rd /dev/mkdisk
probe mk_write wr /dev/mkdisk 0
probe img_read rd /imgdisk
probe img_write wr /imgdisk 512
probe kmsg_write log /dev/kmsg
probe img_kmsg_write log /imgkmsg
probe kvm_open opn /dev/kvm
probe null_write sh -c 'echo x > /dev/null && echo written'
probe zero_read sh -c 'head -c 4 /dev/zero | od -An -tx1 | tr -d " "'
probe full_write sh -c 'echo x > /dev/full'
probe urandom_read sh -c 'head -c 8 /dev/urandom | wc -c'
probe random_read sh -c 'head -c 8 /dev/random | wc -c'
probe tty_open sh -c 'echo x > /dev/tty'
"#;

/// The device-attack containers: `devs` (the default template plus CAP_MKNOD), `devjail` (the
/// jail, whose seccomp filter refuses mknod: only the image's nodes), `devallow` (a spec rule
/// allowing reads of L1's loop0, 7:0) and `devupd` (as `devs`, attacked through `exec` after
/// an `update` has rewritten its cgroup).
fn device_configs() -> [(&'static str, Value); 4] {
    let with_mknod = |mut v: Value| {
        for set in ["bounding", "effective", "permitted"] {
            v["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .push("CAP_MKNOD".into());
        }
        v
    };
    let allow_read = json!({"devices": [
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "b", "major": 7, "minor": 0, "access": "r"}]});
    [
        (
            "devs",
            with_mknod(config("devs", false, &["sh", "/attack.sh", "devs"], None)),
        ),
        (
            "devjail",
            config("devjail", true, &["sh", "/attack.sh", "devjail"], None),
        ),
        (
            "devallow",
            with_mknod(config(
                "devallow",
                false,
                &["sh", "/attack.sh", "devallow"],
                Some(allow_read),
            )),
        ),
        (
            "devupd",
            with_mknod(config("devupd", false, &["sleep", "1000"], None)),
        ),
    ]
}

/// A scenario's `key=value` lines, and its whole output for messages.
struct Outcome {
    values: HashMap<String, String>,
    text: String,
    rc: i32,
}

impl Outcome {
    fn new(r: &ScenarioResult) -> Outcome {
        let values = r
            .stdout_str()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let text = format!("{}{}", r.stdout_str(), r.stderr_str());
        Outcome {
            values,
            text,
            rc: r.rc,
        }
    }

    /// The outcome, if its script ran to the end.
    fn checked(&self, name: &str) -> &Outcome {
        assert_eq!(
            self.rc, 0,
            "the {name} scenario failed in L1:\n{}",
            self.text
        );
        self
    }

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

/// The `v2` scenario's outcome (limits, OOM, pids, the jail).
fn outcome() -> &'static Outcome {
    batch().0.checked("v2")
}

/// The `devices` scenario's outcome, after checking that L1 had its disk (loop0, 7:0, which
/// the `devallow` rule names) and could read it itself.
fn devices() -> &'static Outcome {
    let o = batch().1.checked("devices");
    assert_eq!(o.get("loop0"), "7:0", "{}", o.text);
    assert_eq!(o.get("l1_read"), "HOSTDISK-SECRET", "{}", o.text);
    o
}

/// One L1 boot for both scenarios.
fn batch() -> &'static (Outcome, Outcome) {
    static BATCH: OnceLock<(Outcome, Outcome)> = OnceLock::new();
    BATCH.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, v: Value| {
            let p = dir.path().join(format!("{name}.json"));
            std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
            p
        };
        let mut configs = vec![
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
        for (name, v) in device_configs() {
            configs.push(write(name, v));
        }
        let attack = dir.path().join("attack.sh");
        std::fs::write(&attack, ATTACK).unwrap();
        let lab = Lab::new().unwrap_or_else(|e| panic!("the nested lab is unavailable: {e}"));
        // The loop driver is a module of L1's kernel (none if it is built in).
        let loop_modules = lab
            .kernel()
            .module_closure(&["loop"])
            .unwrap_or_else(|e| panic!("L1's kernel has no loop driver: {e}"));
        let mut run = LabRun::new()
            .file(env!("CARGO_BIN_EXE_cela-runc"), "/lab/cela-runc")
            .file(&attack, "/lab/attack.sh");
        for p in &configs {
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            run = run.file(p, format!("/lab/{name}"));
        }
        for (i, m) in loop_modules.iter().enumerate() {
            run = run.file(m, format!("/lab/devmod-{i}.ko"));
        }
        run = run
            .scenario(Scenario::new("v2", SCRIPT).with_timeout(Duration::from_secs(240)))
            .scenario(
                Scenario::new("devices", DEVICES_SCRIPT).with_timeout(Duration::from_secs(180)),
            );
        run.timeout = Duration::from_secs(540);
        // A frozen, reset or panicked QEMU-TCG L1 (docs/TESTING.md, "Known flake") is the
        // lab's failure, not cela's: once more.
        let report = match lab.run(&run) {
            Err(
                e @ (LabError::Frozen { .. } | LabError::Timeout { .. } | LabError::Exited { .. }),
            ) => {
                eprintln!("the nested lab failed ({e}); running it once more");
                lab.run(&run)
            }
            other => other,
        }
        .unwrap_or_else(|e| panic!("the lab run failed: {e}"));
        (
            Outcome::new(report.get("v2")),
            Outcome::new(report.get("devices")),
        )
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

/// Asserts each `key` of the devices outcome is `want`.
fn expect_all(o: &Outcome, keys: &[&str], want: &str, why: &str) {
    for key in keys {
        assert_eq!(o.get(key), want, "{key}: {why}:\n{}", o.text);
    }
}

#[test]
fn a_block_device_made_with_mknod_cannot_be_opened() {
    let o = devices();
    assert_eq!(o.get("devs_run"), "0", "{}", o.text);
    // CAP_MKNOD and the default rules' `b *:* m` let the node be made; opening it is refused.
    assert_eq!(o.get("devs_mk_mknod"), "0", "{}", o.text);
    expect_all(
        o,
        &["devs_mk_read", "devs_mk_write"],
        "EPERM",
        "the host's disk through a node made with mknod",
    );
}

#[test]
fn a_block_device_the_image_carries_cannot_be_opened() {
    let o = devices();
    assert_eq!(o.get("devjail_run"), "0", "{}", o.text);
    expect_all(
        o,
        &[
            "devs_img_read",
            "devs_img_write",
            "devjail_img_read",
            "devjail_img_write",
        ],
        "EPERM",
        "the host's disk through a 0666 node in the image",
    );
    // The jail's seccomp filter refuses mknod, so only the image's nodes exist there.
    assert_ne!(o.get("devjail_mk_mknod"), "0", "{}", o.text);
    assert_eq!(o.get("devjail_mk_read"), "missing", "{}", o.text);
}

#[test]
fn char_devices_outside_the_allowed_list_cannot_be_opened() {
    let o = devices();
    assert_eq!(o.get("devs_kmsg_mknod"), "0", "{}", o.text);
    assert_eq!(o.get("devs_kvm_mknod"), "0", "{}", o.text);
    expect_all(
        o,
        &[
            "devs_kmsg_write",
            "devs_img_kmsg_write",
            "devs_kvm_open",
            "devjail_img_kmsg_write",
        ],
        "EPERM",
        "/dev/kmsg (1:11) or /dev/kvm (10:232)",
    );
    assert_eq!(
        o.get("kmsg_probes"),
        "0",
        "the kernel log was written: {}",
        o.text
    );
}

#[test]
fn the_allowed_devices_still_work() {
    let o = devices();
    for c in ["devs", "devjail", "devallow", "devupd"] {
        let key = |probe: &str| format!("{c}_{probe}");
        for (probe, want) in [
            ("null_write", "ok:written"),
            ("zero_read", "ok:00000000"),
            ("full_write", "ENOSPC"),
            ("urandom_read", "ok:8"),
            ("random_read", "ok:8"),
            // Allowed, and then refused by the tty driver: the process has no terminal.
            ("tty_open", "ENXIO"),
        ] {
            assert_eq!(o.get(&key(probe)), want, "{}: {}", key(probe), o.text);
        }
    }
}

#[test]
fn a_rule_in_the_spec_allows_exactly_its_access() {
    let o = devices();
    assert_eq!(o.get("devallow_run"), "0", "{}", o.text);
    // `b 7:0 r`: the same nodes the other containers cannot open are read here...
    assert_eq!(
        o.get("devallow_mk_read"),
        "ok:HOSTDISK-SECRET",
        "{}",
        o.text
    );
    assert_eq!(
        o.get("devallow_img_read"),
        "ok:HOSTDISK-SECRET",
        "{}",
        o.text
    );
    // ...but not written, and nothing else is opened.
    expect_all(
        o,
        &[
            "devallow_mk_write",
            "devallow_img_write",
            "devallow_kmsg_write",
            "devallow_kvm_open",
        ],
        "EPERM",
        "beyond the spec's `b 7:0 r`",
    );
}

#[test]
fn exec_after_update_is_still_filtered() {
    let o = devices();
    assert_eq!(o.get("devupd_run"), "0", "{}", o.text);
    assert_eq!(o.get("devupd_update"), "0", "{}", o.text);
    assert_eq!(o.get("devupd_exec"), "0", "{}", o.text);
    assert_eq!(o.get("devupd_mk_mknod"), "0", "{}", o.text);
    expect_all(
        o,
        &[
            "devupd_mk_read",
            "devupd_mk_write",
            "devupd_img_read",
            "devupd_img_write",
            "devupd_kmsg_write",
            "devupd_kvm_open",
        ],
        "EPERM",
        "exec'd after update",
    );
    assert_eq!(o.get("devupd_delete"), "0", "{}", o.text);
}

#[test]
fn the_host_disk_is_untouched_and_nothing_is_left() {
    let o = devices();
    assert_eq!(o.get("disk_head"), "HOSTDISK-SECRET", "{}", o.text);
    assert_eq!(o.get("disk_512_nonzero"), "0", "written at 512: {}", o.text);
    assert_eq!(o.get("dev_cgroups_left"), "0", "{}", o.text);
    assert_eq!(o.get("dev_state_left"), "0", "{}", o.text);
}
