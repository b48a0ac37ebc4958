//! microVM instances on cela's KVM engine, in the nested lab: an image imported in L1 and run
//! with `cela run --vm` (foreground and detached), `cela exec` through the guest agent on
//! vsock (output, status, stdin, a terminal, environment, user), the image's user and working
//! directory, a graceful `cela stop` (the workload gets SIGTERM and the VM powers off), a stop
//! that has to kill, `start` again, and nothing left after `rm`; a workload on the guest's
//! console (`-it`) typed into through `cela attach`; a counting VM saved as a snapshot (cela's
//! own engine: state, RAM, devices, disk), restored twice and forked, each copy counting on
//! under its own name with its own random numbers, and `exec` into a copy; a VM with
//! `--net auto` restored and forked eight times, each copy on a link of its own; two VMs on
//! named networks, one with a card on each of two, naming each other (the hosts file through
//! the monitor's control connection). See docs/TESTING.md.

mod common;
mod images;

use std::sync::OnceLock;
use std::time::Duration;

use cela_lab::LabReport;
use common::run_lab_batch_with;

/// In L1: `$C` is cela with a data dir in /tmp, `$VM` the flags that boot the lab's kernel and
/// initramfs; the test image is imported as `img`. GNU cp and mkfs.ext4 (for the image's disk)
/// come from the host.
const PRELUDE: &str =
    "export PATH=/lab/bin:$PATH CELA_DATA_DIR=/tmp/cela-data CELA_DEFAULT_NETWORK=none
C=./cela
VM='--vm --kernel /lab/bzImage --initrd /lab/initrd.cpio'
$C image import /lab/img.tar --name img:latest >/dev/null || exit 99
";

const SCENARIOS: &[(&str, &str)] = &[
    (
        "foreground",
        "$C run --rm $VM -w /srv -u www img sh -c 'echo hello from $(cat /etc/greeting); pwd; id -u; id -g; exit 4'; echo rc=$?",
    ),
    (
        "exec",
        r#"$C run -d $VM --name v img sh -c 'echo started; exec sleep 600' >/dev/null || exit 98
$C exec v sh -c 'echo out; echo err >&2; exit 3' 2>/tmp/err; echo "rc=$? err=$(cat /tmp/err)"
printf 'line1\nline2\n' | $C exec -i v sh -c 'wc -l; cat /etc/greeting'
$C exec -e X=from-exec -w /srv -u www v sh -c 'echo $X $(pwd) $(id -u)'
$C exec -t v sh -c 'tty; stty size'
$C exec v no-such-command 2>/tmp/err; echo "rc=$? $(cat /tmp/err)"
$C exec v sh -c 'ps -o comm | grep -c sleep'
$C stop v >/dev/null; echo stop_rc=$?
$C inspect v | grep -E '"(status|exit_code)"' | tr -d ' ,' | sort -u
$C exec v true 2>/tmp/err; echo "rc=$? $(cat /tmp/err)"
$C logs v
$C rm v >/dev/null; echo rm_rc=$?; ls /tmp/cela-data/instances | wc -l"#,
    ),
    (
        "stop_kills",
        r#"$C run -d $VM --name k img sh -c 'trap "" TERM; echo ready; while :; do sleep 1; done' >/dev/null || exit 98
up() { cut -d. -f1 /proc/uptime; }
t0=$(up); until $C logs k | grep -q ready; do [ $(($(up)-t0)) -gt 90 ] && { echo "k never said ready in 90 s:" >&2; $C inspect k >&2; $C logs k | tail -5 >&2; $C rm -f k >/dev/null; exit 96; }; sleep 0.1; done
$C stop -t 2 k >/dev/null; echo stop_rc=$?
$C inspect k | grep -E '"(status|exit_code)"' | tr -d ' ,' | sort -u
$C start k >/dev/null; echo start_rc=$?
$C exec k cat /etc/greeting
$C rm -f k >/dev/null; echo rm_rc=$?
ls /tmp/cela-data/instances | wc -l; ps | grep -c '[_]_supervise'; true"#,
    ),
    (
        "console",
        r#"$C run -d -i -t $VM --name t img sh >/dev/null || exit 98
until $C logs t | grep -q '# '; do sleep 0.1; done
printf 'echo tty=$(tty) size=$(stty size); exit 6\r' | $C attach t >/tmp/att; echo attach_rc=$?
tr -d '\r' </tmp/att | grep '^tty='
$C inspect t | grep -E '"exit_code"' | tr -d ' ,' | sort -u
$C rm t >/dev/null; echo rm_rc=$?"#,
    ),
    (
        "snapshot",
        r#"$C run -d $VM --memory 128 --name src img sh -c 'echo start > /w; i=0; while :; do i=$((i+1)); echo "n=$i $(cat /w) $(hostname) $(cat /proc/sys/kernel/random/uuid)"; sleep 1; done' >/dev/null || exit 98
count() { $C logs $1 | grep '^n=' | tail -1 | cut -d' ' -f1 | cut -d= -f2; }
until [ "$(count src)" -ge 3 ] 2>/dev/null; do sleep 0.2; done
up() { cut -d' ' -f1 /proc/uptime; }
t0=$(up); $C snapshot --name s1 src >/dev/null; echo snapshot_rc=$?; echo "timing snapshot $t0 $(up)" >&2
$C inspect src | grep -E '"(status|exit_code)"' | tr -d ' ,' | sort -u
last=$(count src)
$C snapshot ls --format json | tr -d ' 
' | grep -o '"engine":"[a-z]*"'
for r in r1 r2; do t0=$(up); $C restore -d --name $r s1 >/dev/null; echo restore_$r=$?; echo "timing restore-$r $t0 $(up)" >&2; done
for r in r1 r2; do until [ "$(count $r)" -ge $((last+2)) ] 2>/dev/null; do sleep 0.2; done; done
for r in r1 r2; do first=$($C logs $r | grep '^n=' | head -1 | cut -d' ' -f1 | cut -d= -f2); echo "$r from_last=$((first-last)) $($C logs $r | grep "^n=$((last+2)) " | cut -d' ' -f2-3)"; done
u1=$($C logs r1 | grep "^n=$((last+2)) " | cut -d' ' -f4); u2=$($C logs r2 | grep "^n=$((last+2)) " | cut -d' ' -f4)
[ -n "$u1" ] && [ "$u1" != "$u2" ] && echo uuids_differ
$C exec r1 sh -c 'cat /w; hostname'
echo "acpi=$($C exec r1 ls /sys/bus/acpi/devices | grep -c -e '^CELAVGID:' -e '^ACPI0013:')"
gen() { $C exec $1 sh -c 'dd if=/dev/mem bs=16 count=1 skip=65280 2>/dev/null | od -An -tx1' | tr -d ' \n'; }
ged() { $C exec $1 awk '/Ged/ {print $2}' /proc/interrupts; }
g1=$(gen r1); g2=$(gen r2); [ ${#g1} = 32 ] && [ "$g1" != "$g2" ] && echo generation_ids_differ
echo "ged_events r1=$(ged r1) r2=$(ged r2)"
$C fork -n 2 --name-prefix f r2; echo fork_rc=$?
at=$(count r2); for f in f-1 f-2; do until [ "$(count $f)" -ge $((at+1)) ] 2>/dev/null; do sleep 0.2; done; echo "$f $($C logs $f | grep '^n=' | tail -1 | cut -d' ' -f3)"; done
$C inspect r2 | grep -E '"status"' | tr -d ' ,' | sort -u
$C inspect r2 | grep -q '"status": "running"' || { $C inspect r2 >&2; $C logs r2 | tail -5 >&2; exit 97; }
at=$(count r2); until [ "$(count r2)" -gt $at ] 2>/dev/null; do sleep 0.2; done; echo r2_counts_on
$C stop r1 >/dev/null; echo stop_rc=$?
$C rm -f src r1 r2 f-1 f-2 >/dev/null; echo rm_rc=$?
$C snapshot rm s1 >/dev/null; echo snaprm_rc=$?
echo $(( $(ls /tmp/cela-data/instances | wc -l) + $(ls -A /tmp/cela-data/snapshots | wc -l) )); ps | grep -c '[_]_supervise'; true"#,
    ),
    (
        "snapshot_net",
        r#"$C run -d $VM --memory 128 --net auto --name ns img sh -c 'i=0; while :; do i=$((i+1)); set -- $(ip route | grep ^default); gw=$3; set -- $(ip -4 -o addr show dev eth0); a=$4; if ping -c 1 -W 1 $gw >/dev/null 2>&1; then p=ok; else p=no; fi; echo "n=$i $a $(cat /sys/class/net/eth0/address) $gw $p $(hostname) $(cat /proc/sys/kernel/random/uuid)"; sleep 1; done' >/dev/null || exit 98
count() { $C logs $1 | grep '^n=' | tail -1 | cut -d' ' -f1 | cut -d= -f2; }
addr() { $C inspect $1 | tr -d ' ,"' | grep '^address:' | head -1 | cut -d: -f2; }
up() { cut -d. -f1 /proc/uptime; }
why() { echo "$1 $2; its record and last lines:" >&2; $C inspect $1 | grep -E '"(status|exit_code|address|host_address|interface)"' >&2; $C logs $1 | tail -3 >&2; }
onlink() { a=$(addr $1); t0=$(up); until $C logs $1 | grep -q "^n=[0-9]* $a .* ok "; do [ $(($(up)-t0)) -gt 90 ] && { why $1 "is not on its link ($a) after 90 s"; ls /sys/class/net >&2; exit 96; }; sleep 0.2; done; echo "timing onlink-$1 $(($(up)-t0)) s" >&2; $C logs $1 | grep "^n=[0-9]* $a .* ok " | head -1; }
onlink ns >/dev/null
$C snapshot --name ns1 ns >/dev/null; echo snapshot_rc=$?
$C restore -d --name nr ns1 >/dev/null; echo restore_rc=$?
onlink nr >/tmp/lines
at=$(count nr)
t0=$(up); $C fork -n 8 --name-prefix nf nr >/dev/null; echo fork_rc=$?; echo "timing fork $(($(up)-t0)) s" >&2
for i in 1 2 3 4 5 6 7 8; do onlink nf-$i >>/tmp/lines; done
echo names=$(cut -d' ' -f6 /tmp/lines)
echo lines=$(wc -l </tmp/lines) addresses=$(cut -d' ' -f2 /tmp/lines | sort -u | wc -l) macs=$(cut -d' ' -f3 /tmp/lines | sort -u | wc -l) gateways=$(cut -d' ' -f4 /tmp/lines | sort -u | wc -l)
[ "$(cut -d' ' -f4 /tmp/lines | sort -u | wc -l)" = 9 ] || { echo "the lines of the copies:" >&2; cat /tmp/lines >&2; for i in 1 2 3 4 5 6 7 8; do echo "nf-$i: $(addr nf-$i) $($C exec nf-$i ip route | tr '\n' ';')" >&2; done; }
for i in 1 2 3 4 5 6 7 8; do t0=$(up); until $C logs nf-$i | grep -q "^n=$((at+3)) "; do [ $(($(up)-t0)) -gt 60 ] && { why nf-$i "has not counted to $((at+3)) after 60 s"; exit 95; }; sleep 0.2; done; $C logs nf-$i | grep "^n=$((at+3)) " | cut -d' ' -f7; done | sort -u | wc -l | sed 's/^/uuids=/'
n2=$(count nr); k=0; until [ "$(count nr)" -gt $n2 ] 2>/dev/null; do k=$((k+1)); [ $k -gt 300 ] && { echo "nr stopped counting after the fork" >&2; $C inspect nr >&2; $C logs nr | tail -5 >&2; exit 97; }; sleep 0.2; done
[ "$($C logs nr | grep '^n=' | tail -1 | cut -d' ' -f2,5,6)" = "$(addr nr) ok nr" ] && echo parent_on_its_link
$C rm -f ns nr nf-1 nf-2 nf-3 nf-4 nf-5 nf-6 nf-7 nf-8 >/dev/null; echo rm_rc=$?
$C snapshot rm ns1 >/dev/null; echo snaprm_rc=$?
echo $(( $(ls /tmp/cela-data/instances | wc -l) + $(ls -A /tmp/cela-data/snapshots | wc -l) )); ps | grep -c '[_]_supervise'; ls /sys/class/net | grep -c '^cela[0-9]'; true"#,
    ),
];

/// The scenarios on named networks: a batch of their own, whose L1 loads the networks'
/// kernel modules (the others' boots as it always has).
const NET_SCENARIOS: &[(&str, &str)] = &[(
    "names_net",
    r#"nft --version >/dev/null || { echo "no nft in L1" >&2; exit 94; }
up() { cut -d. -f1 /proc/uptime; }
wait_log() { t0=$(up); until $C logs $1 | grep -q "$2"; do [ $(($(up)-t0)) -gt 90 ] && { echo "$1 never said $2:" >&2; $C inspect $1 >&2; $C logs $1 | tail -5 >&2; exit 96; }; sleep 0.2; done; }
$C network create --subnet 10.88.1.0/24 n1 >/dev/null || exit 98
$C network create --subnet 10.88.2.0/24 n2 >/dev/null || exit 98
$C run -d $VM --memory 128 --net n1 --name a img sh -c 'echo up; i=0; until grep -q "[[:space:]]b$" /etc/hosts; do i=$((i+1)); [ $i -gt 600 ] && exit 9; sleep 0.2; done; echo saw-b; exec sleep 600' >/dev/null || exit 98
wait_log a up
$C run -d $VM --memory 128 --net n1 --net n2 --name b img sh -c 'echo "names_a=$(grep -c "[[:space:]]a$" /etc/hosts)"; ip -4 -o addr show | grep -o "eth[01] *inet [0-9./]*" | tr -s " "; echo "defaults=$(ip route | grep -c ^default)"; ping -c 1 -W 2 a >/dev/null && echo reached-a; exec sleep 600' >/dev/null || exit 98
wait_log b reached-a
$C logs b
wait_log a saw-b
echo a_saw_b
$C snapshot b 2>&1 | grep -o "more than one network card"
$C rm -f a b >/dev/null; echo rm_rc=$?
$C network rm n1 n2 >/dev/null; echo netrm_rc=$?
ls /sys/class/net | grep -c '^cela[0-9]'; true"#,
)];

fn report() -> &'static LabReport {
    static REPORT: OnceLock<LabReport> = OnceLock::new();
    REPORT.get_or_init(|| batch(SCENARIOS, false))
}

fn net_report() -> &'static LabReport {
    static REPORT: OnceLock<LabReport> = OnceLock::new();
    REPORT.get_or_init(|| batch(NET_SCENARIOS, true))
}

/// Runs `scenarios` (with the prelude) in one lab boot, with the test image and the host
/// tools they use; `networks`: L1 can run cela's named networks.
fn batch(scenarios: &[(&str, &str)], networks: bool) -> LabReport {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    images::test_image().write_layout(&layout, "latest");
    let tar = dir.path().join("img.tar");
    images::tar_dir(&layout, &tar);
    let scenarios: Vec<(&str, String)> = scenarios
        .iter()
        .map(|(name, body)| (*name, format!("{PRELUDE}{body}")))
        .collect();
    let scenarios: Vec<(&str, &str)> = scenarios.iter().map(|(n, b)| (*n, b.as_str())).collect();
    let mut files = vec![
        (tar.as_path(), "/lab/img.tar"),
        (std::path::Path::new("/usr/bin/cp"), "/lab/bin/cp"),
        (
            std::path::Path::new("/usr/sbin/mkfs.ext4"),
            "/lab/bin/mkfs.ext4",
        ),
    ];
    if networks {
        // Named networks' rules.
        files.push((std::path::Path::new("/usr/sbin/nft"), "/lab/bin/nft"));
    }
    run_lab_batch_with(
        &scenarios,
        &files,
        Duration::from_secs(240),
        Duration::from_secs(600),
        networks,
    )
}

#[test]
fn an_image_runs_as_a_vm_with_its_user_and_working_directory() {
    let r = report().get("foreground");
    r.expect_rc(0);
    assert_eq!(
        r.stdout_str(),
        "hello from the-test-image\n/srv\n33\n34\nrc=4\n",
        "{}",
        r.stderr_str()
    );
}

#[test]
fn exec_into_a_running_vm_and_a_graceful_stop() {
    let r = report().get("exec");
    r.expect_rc(0);
    let out = r.stdout_str();
    let lines: Vec<&str> = out.lines().collect();
    let expected = [
        "out",
        "rc=3 err=err",
        "2",
        "the-test-image",
        "from-exec /srv 33",
        "/dev/pts/0",
        "24 80",
        "rc=127 cela-init: no-such-command: command not found",
        "1",
        "stop_rc=0",
        "\"exit_code\":143",
        "\"status\":\"exited\"",
    ];
    assert!(
        lines.len() > expected.len(),
        "{out}\n--- stderr ---\n{}",
        r.stderr_str()
    );
    // A terminal turns \n into \r\n.
    let got: Vec<String> = lines
        .iter()
        .map(|l| l.trim_end_matches('\r').to_owned())
        .collect();
    assert_eq!(
        got[..expected.len()],
        expected,
        "{out}\n--- stderr ---\n{}",
        r.stderr_str()
    );
    let rest = &got[expected.len()..];
    assert!(
        rest[0].starts_with("rc=125") && rest[0].contains("running instance"),
        "exec into a stopped VM: {rest:?}"
    );
    assert_eq!(rest[1..], ["started", "rm_rc=0", "0"], "{out}");
}

#[test]
fn a_stop_that_times_out_kills_the_vm_and_start_boots_it_again() {
    let r = report().get("stop_kills");
    r.expect_rc(0);
    assert_eq!(
        r.stdout_str(),
        "stop_rc=0\n\"exit_code\":137\n\"status\":\"exited\"\nstart_rc=0\nthe-test-image\nrm_rc=0\n0\n0\n",
        "{}",
        r.stderr_str()
    );
}

/// Snapshots on cela's own engine: saved and ended, restored twice from one snapshot (each
/// counting on from the saved count, under its own host name, with its own random numbers,
/// with the disk's file), `exec` into a copy, the VM generation ID device and its event device
/// in the guest's ACPI namespace, each copy with its own generation ID (read from /dev/mem at
/// its page) and one generation-change event taken by the guest, two forks of a running copy,
/// a graceful stop of a restored VM, and nothing left after `rm`.
#[test]
fn a_counting_vm_is_snapshotted_restored_twice_and_forked() {
    let r = report().get("snapshot");
    r.expect_rc(0);
    let out = r.stdout_str();
    eprintln!(
        "{}",
        r.stderr_str()
            .lines()
            .filter(|l| l.starts_with("timing"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let lines: Vec<&str> = out.lines().collect();
    let expected_head = [
        "snapshot_rc=0",
        "\"exit_code\":0",
        "\"status\":\"exited\"",
        "\"engine\":\"kvm\"",
        "restore_r1=0",
        "restore_r2=0",
    ];
    assert!(
        lines.len() >= 18,
        "{out}\n--- stderr ---\n{}",
        r.stderr_str()
    );
    assert_eq!(
        lines[..6],
        expected_head,
        "{out}\n--- stderr ---\n{}",
        r.stderr_str()
    );
    // Each copy went on from the count it was saved at (the line being written may be the
    // saved one's or the next), with the disk's /w, under its own name.
    for (line, name) in lines[6..8].iter().zip(["r1", "r2"]) {
        let ok = [
            format!("{name} from_last=0 start {name}"),
            format!("{name} from_last=1 start {name}"),
        ];
        assert!(ok.contains(&line.to_string()), "{line}\n{out}");
    }
    assert_eq!(
        lines[8..],
        [
            "uuids_differ",
            "start",
            "r1",
            "acpi=2",
            "generation_ids_differ",
            "ged_events r1=1 r2=1",
            "f-1",
            "f-2",
            "fork_rc=0",
            "f-1 f-1",
            "f-2 f-2",
            "\"status\":\"running\"",
            "r2_counts_on",
            "stop_rc=0",
            "rm_rc=0",
            "snaprm_rc=0",
            "0",
            "0",
        ],
        "{out}\n--- stderr ---\n{}",
        r.stderr_str()
    );
}

/// Snapshots of a VM with `--net auto` on cela's engine: a copy and eight forks of it, each
/// moved onto a link of its own (its TAP's /30 and MAC, reaching its own gateway), under its
/// own name, drawing its own random numbers; no TAP left after `rm`.
#[test]
fn a_networked_vm_is_restored_and_forked_eight_times_onto_links_of_their_own() {
    let r = report().get("snapshot_net");
    r.expect_rc(0);
    assert_eq!(
        r.stdout_str(),
        "snapshot_rc=0\nrestore_rc=0\nfork_rc=0\nnames=nr nf-1 nf-2 nf-3 nf-4 nf-5 nf-6 nf-7 nf-8\nlines=9 addresses=9 macs=9 gateways=9\nuuids=8\nparent_on_its_link\nrm_rc=0\nsnaprm_rc=0\n0\n0\n0\n",
        "{}",
        r.stderr_str()
    );
}

/// `-it` on the KVM engine: the workload's terminal is the guest's console, whose input the
/// jailed monitor takes as frames from its supervisor (the QEMU fallback's is tested outside
/// the lab, with a resize); its exit code comes back through `cela attach`.
#[test]
fn a_workload_on_the_guest_console_is_typed_into_through_attach() {
    let r = report().get("console");
    r.expect_rc(0);
    assert_eq!(
        r.stdout_str(),
        "attach_rc=6\ntty=/dev/ttyS0 size=24 80\n\"exit_code\":6\nrm_rc=0\n",
        "{}",
        r.stderr_str()
    );
}

#[test]
fn vms_on_named_networks_name_each_other_and_one_has_a_card_on_each_of_two() {
    let r = net_report().get("names_net");
    r.expect_rc(0);
    let out = r.stdout_str();
    let err = r.stderr_str();
    for want in [
        "names_a=1\n",
        "eth0 inet 10.88.1.",
        "eth1 inet 10.88.2.",
        "defaults=1\n",
        "reached-a\n",
        "a_saw_b\n",
        "more than one network card\n",
        "rm_rc=0\nnetrm_rc=0\n0\n",
    ] {
        assert!(
            out.contains(want),
            "{want:?} in:\n{out}\n--- stderr ---\n{err}"
        );
    }
}
