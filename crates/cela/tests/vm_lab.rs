//! `cela run --vm` with the real Debian cloud kernel on cela's own KVM monitor, inside the
//! nested lab (QEMU TCG → L1 Linux with kvm-amd → cela). One L1 boot runs every scenario; each
//! test checks one of them. See docs/TESTING.md.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use cela_lab::{LabReport, ScenarioResult};
use common::run_lab_batch;

/// Every scenario: a name and an L1 shell script, in which `$CELA` is `cela run --vm` with the
/// lab's kernel and initramfs on the KVM engine.
const SCENARIOS: &[(&str, &str)] = &[
    ("echo_exit7", "$CELA -- sh -c 'echo hi; exit 7'"),
    ("exit0", "$CELA -- true"),
    ("signal", "$CELA -- sh -c 'kill -9 $$'"),
    ("not_found", "$CELA -- no-such-command"),
    ("cpus2", "$CELA --cpus 2 -- nproc"),
    (
        "memory512",
        "$CELA --memory 512 -- grep MemTotal /proc/meminfo",
    ),
    ("env", "$CELA -e GREETING=hello -- sh -c 'echo $GREETING'"),
    ("poweroff", "$CELA -- poweroff -f"),
    ("reboot", "$CELA -- reboot -f"),
    ("panic", "$CELA -- sh -c 'echo c > /proc/sysrq-trigger'"),
    // Ctrl-C on the host once the guest is running (its first output line is the event).
    (
        "ctrl_c",
        "mkfifo /tmp/out; $CELA -- sh -c 'echo started; sleep 600' > /tmp/out & pid=$!; \
         exec 3</tmp/out; read -r line <&3; kill -INT $pid; wait $pid",
    ),
    // --rootfs: the command runs in an ext4 image (made on the host with mkfs.ext4 -d) with
    // a marker the initramfs does not have; what it writes is there on the next boot.
    (
        "rootfs",
        "$CELA --rootfs /lab/root.ext4 -- sh -c 'cat /etc/marker; grep \" / \" /proc/mounts | \
         cut -d\" \" -f3; echo kept > /written' && \
         $CELA --rootfs /lab/root.ext4,ro -- cat /written",
    ),
    // virtio-rng: the guest's hw_random core picked it and /dev/hwrng gives bytes.
    (
        "hwrng",
        "$CELA -- sh -c 'cat /sys/devices/virtual/misc/hw_random/rng_current; \
         head -c 32 /dev/hwrng | od -An -tx1 | tr -d \" \\n\"; echo'",
    ),
    // virtio-blk: three disks made in L1 (a: a pattern from the host, b: blank then 1 MiB of
    // 'x', c: read-only); the guest lists them, reads a, writes b, discards b's second MiB and
    // tries to write c; L1 then checks the files.
    (
        "disks",
        r#"dd if=/dev/zero of=/tmp/a.img bs=1024 count=1024 2>/dev/null
printf 'hello-from-host!' | dd of=/tmp/a.img conv=notrunc 2>/dev/null
dd if=/dev/zero of=/tmp/b.img bs=1024 count=1024 2>/dev/null
dd if=/dev/zero bs=1024 count=1024 2>/dev/null | tr '\0' x >> /tmp/b.img
dd if=/dev/zero of=/tmp/c.img bs=1024 count=1024 2>/dev/null
printf 'read-only-data!!' | dd of=/tmp/c.img conv=notrunc 2>/dev/null
$CELA --disk /tmp/a.img --disk /tmp/b.img --disk /tmp/c.img,ro -- sh -c '
for d in vda vdb vdc; do echo "$d $(cat /sys/block/$d/serial) $(cat /sys/block/$d/size) ro=$(cat /sys/block/$d/ro)"; done
echo "read: $(od -An -c -N16 /dev/vda)"
printf cela-disk-ok | dd of=/dev/vdb conv=notrunc,fsync 2>/dev/null; echo rw_write_rc=$?; sync
blkdiscard -o 1048576 -l 1048576 /dev/vdb; echo discard_rc=$?
printf overwrite | dd of=/dev/vdc conv=notrunc,fsync 2>/dev/null; echo ro_write_rc=$?'
echo cela_rc=$?
echo "b=$(head -c 12 /tmp/b.img)"
echo "c=$(head -c 16 /tmp/c.img)"
echo "b_size=$(wc -c < /tmp/b.img | tr -d ' ')"
echo "b_tail_nonzero=$(tail -c 1048576 /tmp/b.img | tr -d '\0' | wc -c | tr -d ' ')""#,
    ),
    // cela-init's channel on vsock: standard output and error apart, bytes untouched.
    (
        "stdio_split",
        "$CELA -- sh -c 'echo out; echo err >&2; printf \"a\\r\\nb\\000c\\377\"; exit 5'",
    ),
    // A large output, timed (busybox `time` prints "real …" on stderr); with pipefail, a
    // failing `cela` fails the scenario and its own message is in the report. 16 MiB is 64
    // times the guest's vsock credit (256 KiB), so flow control goes round many times; more
    // only adds exposure to the lab's resets under load (`scripts/lab-soak` does 50 MiB).
    (
        "big_output",
        "time sh -c \"set -o pipefail; $CELA -- head -c 16777216 /dev/zero | wc -c\"",
    ),
    // `--vsock` with no path: a socket in the run directory, gone afterwards (the jail's
    // mount point and id leases stay, and are not sockets).
    (
        "vsock_default_path",
        "CELA_RUN_DIR=/tmp/celarun $CELA --vsock -- true; echo rc=$?; echo $(ls -A /tmp/celarun | grep -c vsock)",
    ),
    // vsock between guest and host, several ports each way, data both ways on each. Host
    // listeners on PATH_6000 and PATH_6001 take the guest's connections; the guest listens on
    // 5000 and 5001 and the host connects through PATH with `CONNECT <port>`. The guest has
    // CID 42, not the default 3: packets must carry the one given.
    (
        "vsock",
        r#"NC=/lab/cela-init; rm -f /tmp/v.sock*
listeners=
for p in 6000 6001; do
  (echo host-reply-$p | $NC nc -l unix:/tmp/v.sock_$p > /tmp/g2h_$p) & listeners="$listeners $!"
done
while [ ! -S /tmp/v.sock_6000 ] || [ ! -S /tmp/v.sock_6001 ]; do :; done
$CELA --vsock /tmp/v.sock --vsock-cid 42 -- sh -c '
for p in 5000 5001; do (echo guest-reply-$p | /init nc -l vsock:$p > /run/h2g_$p) & done
for p in 6000 6001; do echo guest-data-$p | /init nc vsock:2:$p; done
wait
for p in 5000 5001; do echo "h2g_$p=$(cat /run/h2g_$p)"; done' > /tmp/guest_out 2>/tmp/guest_err &
cela_pid=$!
# The guest connects to the host listeners after starting its own: wait for that, then
# connect (a few tries: a listener started in the background may not be up yet).
wait $listeners
for p in 5000 5001; do
  i=0; out=
  while [ $i -lt 300 ]; do
    out=$( (printf 'CONNECT %s
' $p; echo host-data-$p) | $NC nc unix:/tmp/v.sock)
    case "$out" in OK*) break;; esac
    i=$((i+1)); usleep 20000
  done
  echo "ok_$p=$(echo "$out" | head -n 1 | cut -d' ' -f1) tries=$i"
  echo "reply_$p=$(echo "$out" | tail -n +2)"
done
wait $cela_pid; echo cela_rc=$?
cat /tmp/guest_out; cat /tmp/guest_err >&2
for p in 6000 6001; do echo "g2h_$p=$(cat /tmp/g2h_$p)"; done
if [ -e /tmp/v.sock ]; then echo socket_left; else echo socket_removed; fi"#,
    ),
    // No command: an interactive shell on the console, here fed from a pipe.
    (
        "shell",
        "printf 'echo hello-from-$((6*7))\\nexit 3\\n' | $CELA",
    ),
];

fn report() -> &'static LabReport {
    static REPORT: OnceLock<LabReport> = OnceLock::new();
    // The whole batch normally takes ~90 s; the bound is well above that.
    REPORT.get_or_init(|| run_scenarios(SCENARIOS, Duration::from_secs(420)))
}

fn run_scenarios(scenarios: &[(&str, &str)], batch: Duration) -> LabReport {
    let rootfs_dir = tempfile::tempdir().unwrap();
    let rootfs = common::busybox_rootfs(rootfs_dir.path(), "from-the-rootfs");
    run_lab_batch(
        scenarios,
        &[
            (&rootfs, "/lab/root.ext4"),
            (&common::cela_init(), "/lab/cela-init"),
        ],
        Duration::from_secs(120),
        batch,
    )
}

/// Scenario `name`'s result; run once more, in a lab of its own, when the first run ended the
/// way the nested lab fails under a heavy device load — its L2 guest triple-faulted, or hung
/// until the scenario's bound — which L1 itself resetting or panicking under the same load
/// shows to be the emulated SVM's doing, not cela's (docs/TESTING.md, "Known flake"). The
/// first failure is shown; a second one fails the test, and any other result stands.
fn result_with_one_rerun(name: &str) -> ScenarioResult {
    let first = report().get(name).clone();
    let lab_fault =
        (first.rc == 125 && first.stderr_str().contains("triple-faulted")) || first.timed_out;
    if !lab_fault {
        return first;
    }
    eprintln!(
        "{name}: the L2 guest {} (a known fault of the nested lab); running it once more in a \
         new lab. First run's stdout: {:?}; stderr:\n{}",
        if first.timed_out {
            "hung"
        } else {
            "triple-faulted"
        },
        first.stdout_str(),
        first.stderr_str()
    );
    let scenario = SCENARIOS.iter().find(|s| s.0 == name).copied().unwrap();
    run_scenarios(&[scenario], Duration::from_secs(300))
        .get(name)
        .clone()
}

#[test]
fn output_and_exit_status_of_the_command() {
    let r = report().get("echo_exit7");
    r.expect_rc(7);
    assert_eq!(r.stdout_str(), "hi\n");
    report().get("exit0").expect_rc(0);
}

#[test]
fn a_command_killed_by_a_signal_gives_128_plus_n() {
    report().get("signal").expect_rc(137);
}

#[test]
fn an_unknown_command_gives_127() {
    let r = report().get("not_found");
    r.expect_rc(127);
    assert!(
        r.stderr_str()
            .contains("no-such-command: command not found"),
        "{}",
        r.stderr_str()
    );
}

#[test]
fn stdout_and_stderr_arrive_apart_and_byte_exact_over_vsock() {
    let r = report().get("stdio_split");
    r.expect_rc(5);
    assert_eq!(r.stdout, b"out\na\r\nb\0c\xff", "{:?}", r.stdout_str());
    assert_eq!(r.stderr_str(), "err\n");
}

#[test]
fn a_large_output_arrives_whole() {
    let r = result_with_one_rerun("big_output");
    r.expect_rc(0);
    assert_eq!(
        r.stdout_str().trim(),
        (16u64 << 20).to_string(),
        "stderr: {}",
        r.stderr_str()
    );
    eprintln!("16 MiB of output: {}", r.stderr_str().trim());
}

#[test]
fn vsock_without_a_path_uses_the_run_directory_and_cleans_up() {
    let r = report().get("vsock_default_path");
    r.expect_rc(0);
    assert_eq!(r.stdout_str(), "rc=0\n0\n");
    assert!(
        r.stderr_str()
            .contains("cela: vsock socket: /tmp/celarun/vsock-"),
        "{}",
        r.stderr_str()
    );
}

#[test]
fn vsock_connections_both_ways_on_several_ports_carry_data_both_ways() {
    let r = report().get("vsock");
    r.expect_rc(0);
    let out = r.stdout_str();
    for want in [
        "cela_rc=0",
        // host → guest: the host got OK and the guest's reply; the guest got the host's data
        "reply_5000=guest-reply-5000",
        "reply_5001=guest-reply-5001",
        "h2g_5000=host-data-5000",
        "h2g_5001=host-data-5001",
        // guest → host: each side got the other's bytes
        "host-reply-6000",
        "host-reply-6001",
        "g2h_6000=guest-data-6000",
        "g2h_6001=guest-data-6001",
        "socket_removed",
    ] {
        assert!(
            out.lines().any(|l| l == want),
            "{want:?} in: {out}\n{}",
            r.stderr_str()
        );
    }
    for p in [5000, 5001] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("ok_{p}=OK "))),
            "{out}"
        );
    }
}

#[test]
fn the_guest_sees_the_vcpus_asked_for() {
    let r = report().get("cpus2");
    r.expect_rc(0);
    assert_eq!(r.stdout_str().trim(), "2");
}

#[test]
fn the_guest_sees_the_memory_asked_for() {
    let r = report().get("memory512");
    r.expect_rc(0);
    let kib: u64 = r
        .stdout_str()
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {:?}", r.stdout_str()));
    let asked = 512 * 1024;
    assert!(
        kib <= asked && kib >= asked * 9 / 10,
        "MemTotal {kib} kB is not within 10% of 512 MiB"
    );
}

#[test]
fn environment_reaches_the_command() {
    let r = report().get("env");
    r.expect_rc(0);
    assert_eq!(r.stdout_str(), "hello\n");
}

#[test]
fn guest_poweroff_ends_the_vm() {
    let r = report().get("poweroff");
    r.expect_rc(0);
    assert!(r.stderr_str().contains("powered off"), "{}", r.stderr_str());
}

#[test]
fn guest_reboot_ends_the_vm() {
    let r = report().get("reboot");
    r.expect_rc(0);
    assert!(r.stderr_str().contains("rebooted"), "{}", r.stderr_str());
}

#[test]
fn guest_panic_ends_the_vm_with_a_clear_status() {
    let r = report().get("panic");
    r.expect_rc(125);
    assert!(r.stderr_str().contains("panicked"), "{}", r.stderr_str());
}

#[test]
fn ctrl_c_on_the_host_stops_the_vm() {
    let r = report().get("ctrl_c");
    r.expect_rc(130);
    assert!(r.stderr_str().contains("interrupted"), "{}", r.stderr_str());
}

#[test]
fn without_a_command_the_console_is_an_interactive_shell() {
    let r = report().get("shell");
    r.expect_rc(3);
    let out = r.stdout_str().replace('\r', "");
    assert!(out.lines().any(|l| l == "hello-from-42"), "{out}");
}

#[test]
fn the_guest_reads_entropy_from_the_virtio_rng() {
    let r = report().get("hwrng");
    r.expect_rc(0);
    let out = r.stdout_str();
    let mut lines = out.lines();
    let current = lines.next().unwrap_or_default();
    assert!(current.starts_with("virtio_rng"), "rng_current: {out}");
    let hex = lines.next().unwrap_or_default();
    assert_eq!(hex.len(), 64, "32 bytes in hex: {out}");
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{out}");
    assert_ne!(hex, "0".repeat(64), "{out}");
}

#[test]
fn a_rootfs_image_is_the_commands_root() {
    let r = report().get("rootfs");
    r.expect_rc(0);
    assert_eq!(r.stdout_str(), "from-the-rootfs\next4\nkept\n");
}

/// The lines of the `disks` scenario, after checking cela itself succeeded.
fn disks_output() -> String {
    let r = report().get("disks");
    r.expect_rc(0);
    let out = r.stdout_str().into_owned();
    assert!(out.lines().any(|l| l == "cela_rc=0"), "{out}");
    out
}

#[test]
fn disks_appear_in_command_line_order_with_their_serial_and_size() {
    let out = disks_output();
    for want in [
        "vda a.img 2048 ro=0",
        "vdb b.img 4096 ro=0",
        "vdc c.img 2048 ro=1",
    ] {
        assert!(out.lines().any(|l| l == want), "{want:?} in: {out}");
    }
}

#[test]
fn the_guest_reads_what_the_host_wrote() {
    let out = disks_output();
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("read: "))
        .unwrap_or_default();
    let chars: String = line.split_whitespace().collect();
    assert_eq!(chars, "hello-from-host!", "{out}");
}

#[test]
fn what_the_guest_writes_reaches_the_host_file() {
    let out = disks_output();
    assert!(out.lines().any(|l| l == "rw_write_rc=0"), "{out}");
    assert!(out.lines().any(|l| l == "b=cela-disk-ok"), "{out}");
}

#[test]
fn a_read_only_disk_refuses_writes_and_its_file_is_untouched() {
    let out = disks_output();
    let rc = out
        .lines()
        .find_map(|l| l.strip_prefix("ro_write_rc="))
        .unwrap_or_default();
    assert!(!rc.is_empty() && rc != "0", "the write must fail: {out}");
    assert!(out.lines().any(|l| l == "c=read-only-data!!"), "{out}");
}

#[test]
fn a_discard_punches_a_hole_and_keeps_the_size() {
    let out = disks_output();
    for want in ["discard_rc=0", "b_size=2097152", "b_tail_nonzero=0"] {
        assert!(out.lines().any(|l| l == want), "{want:?} in: {out}");
    }
}
