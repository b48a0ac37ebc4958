//! `cela run --vm --net` with the real Debian cloud kernel on cela's own KVM monitor, inside the
//! nested lab (see docs/TESTING.md): ICMP and TCP both ways between L1 and the guest over
//! virtio-net, nothing left on L1 afterwards, and an existing TAP used as it is. One L1 boot
//! runs both scenarios. Transfers use busybox `nc`, whose receiving side runs `cat` with `-e`
//! (plain `nc` stops reading when its own stdin ends); `nc`'s own output stays off the guest's
//! console.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use cela_lab::LabReport;
use common::run_lab_batch;

/// `--net auto`: the guest pings L1, sends it 4 MiB and receives 4 MiB; then L1 pings the
/// guest (at the second address of the /30 cela gave L1's TAP) and tells it to finish.
const NET_AUTO: &str = r#"
dd if=/dev/urandom of=/tmp/to_guest.bin bs=1024 count=4096 2>/dev/null
echo "host_sent=$(sha256sum < /tmp/to_guest.bin | cut -d' ' -f1)"
nc -l -p 5001 -e sh -c 'cat > /tmp/from_guest.bin' & l1=$!
nc -l -p 5002 < /tmp/to_guest.bin & l2=$!
# Both listeners are up before the guest (which connects once) starts; bounded wait.
for i in $(seq 100); do
  [ "$(netstat -ltn | grep -c -e ':5001 ' -e ':5002 ')" = 2 ] && break; sleep 0.1
done
mkfifo /tmp/guest_out
$CELA --net auto -- sh -c '
gw=$(ip route | awk "/^default/ {print \$3}")
echo "guest_addr=$(ip -4 -o addr show | grep -v " lo " | awk "{print \$4}") gw=$gw"
ping -c 3 -W 10 $gw >/dev/null && echo guest_ping=ok
dd if=/dev/urandom of=/tmp/g.bin bs=1024 count=4096 2>/dev/null
echo "guest_sent=$(sha256sum < /tmp/g.bin | cut -d" " -f1)"
nc $gw 5001 < /tmp/g.bin >/dev/null 2>&1; echo guest_send_rc=$?
nc $gw 5002 -e sh -c "cat > /tmp/h.bin" 2>/dev/null; echo guest_recv_rc=$?
echo "guest_got=$(sha256sum < /tmp/h.bin | cut -d" " -f1)"
echo waiting-for-host
nc -l -p 5003 -e true' > /tmp/guest_out &
cpid=$!
exec 3</tmp/guest_out
# Not a `read` loop: the listeners exit meanwhile, and ash's `read` drops the part of a line
# it had read when SIGCHLD interrupts it. Not sed either: it reads one line ahead, and nothing
# follows this one until L1 answers.
awk '{ print } /^waiting-for-host$/ { exit }' <&3
wait $l1 $l2
echo "host_got=$(sha256sum < /tmp/from_guest.bin | cut -d' ' -f1)"
host=$(ip -4 -o addr show | awk '/ cela[0-9]/ {print $4}'); host=${host%/*}
echo "tap=$(ip -o link | awk -F': ' '/ cela[0-9]/ {print $2}') host=$host"
guest=${host%.*}.$(( ${host##*.} + 1 ))
ping -c 3 -W 10 $guest >/dev/null && echo host_ping=ok
echo bye | nc $guest 5003
cat <&3
wait $cpid; echo cela_rc=$?
echo "left_links=$(ip -o link | grep -c ' cela[0-9]')"
echo "left_addrs=$(ip -4 -o addr | grep -c ' 10\.213\.')"
"#;

/// `--net tap=NAME`: a persistent TAP made and addressed in L1 (busybox `tunctl`); the guest
/// configures itself and pings L1; the TAP and its address are still there afterwards.
const NET_TAP: &str = r#"
tunctl -t labtap0 >/dev/null
ip addr add 10.77.0.1/24 dev labtap0
ip link set labtap0 up
$CELA --net tap=labtap0 -- sh -c '
ip addr add 10.77.0.2/24 dev eth0 && ip link set eth0 up
ping -c 3 -W 10 10.77.0.1 >/dev/null && echo guest_ping=ok'
echo cela_rc=$?
echo "after=$(ip -4 -o addr show labtap0 | awk '{print $4}')"
tunctl -d labtap0 >/dev/null
"#;

/// `--net auto`, then cela killed with SIGKILL (no cleanup code runs) or stopped with Ctrl-C
/// while the guest runs: either way no TAP or address is left.
const NET_KILLED: &str = r#"
for sig in KILL INT; do
  mkfifo /tmp/out_$sig
  $CELA --net auto -- sh -c 'echo up; sleep 600' > /tmp/out_$sig & pid=$!
  exec 3</tmp/out_$sig; read -r line <&3
  echo "$sig: up=$line links=$(ip -o link | grep -c ' cela[0-9]')"
  kill -$sig $pid; wait $pid; echo "$sig: rc=$?"
  exec 3<&-
  # The jailed monitor holds the TAP and dies with cela, a moment after it: wait for that.
  i=0; while [ $(ip -o link | grep -c ' cela[0-9]') != 0 ] && [ $i -lt 500 ]; do usleep 20000; i=$((i+1)); done
  echo "$sig: left_links=$(ip -o link | grep -c ' cela[0-9]') left_addrs=$(ip -4 -o addr | grep -c ' 10\.213\.')"
done
"#;

const SCENARIOS: &[(&str, &str)] = &[
    ("net_auto", NET_AUTO),
    ("net_tap", NET_TAP),
    ("net_killed", NET_KILLED),
];

fn report() -> &'static LabReport {
    static REPORT: OnceLock<LabReport> = OnceLock::new();
    REPORT.get_or_init(|| {
        run_lab_batch(
            SCENARIOS,
            &[],
            Duration::from_secs(180),
            Duration::from_secs(400),
        )
    })
}

/// The output of scenario `name` after checking it and cela succeeded.
fn output(name: &str) -> String {
    let r = report().get(name);
    r.expect_rc(0);
    let out = r.stdout_str().into_owned();
    assert!(out.lines().any(|l| l == "cela_rc=0"), "{out}");
    out
}

/// The value of the first `key=value` word in `out`.
fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in: {out}"))
}

#[test]
fn net_auto_gives_the_guest_an_address_on_a_private_slash30() {
    let out = output("net_auto");
    let guest = value(&out, "guest_addr");
    let gw = value(&out, "gw");
    assert!(
        guest.starts_with("10.213.") && guest.ends_with("/30"),
        "{out}"
    );
    assert_eq!(value(&out, "host"), gw, "{out}");
    assert!(value(&out, "tap").starts_with("cela"), "{out}");
}

#[test]
fn guest_and_host_ping_each_other() {
    let out = output("net_auto");
    for want in ["guest_ping=ok", "host_ping=ok"] {
        assert!(out.lines().any(|l| l == want), "{want} in: {out}");
    }
}

#[test]
fn tcp_transfers_arrive_intact_both_ways() {
    let out = output("net_auto");
    assert!(out.lines().any(|l| l == "guest_send_rc=0"), "{out}");
    assert!(out.lines().any(|l| l == "guest_recv_rc=0"), "{out}");
    let sent_by_guest = value(&out, "guest_sent");
    assert_eq!(sent_by_guest.len(), 64, "{out}");
    assert_eq!(
        value(&out, "host_got"),
        sent_by_guest,
        "guest → host: {out}"
    );
    assert_eq!(
        value(&out, "guest_got"),
        value(&out, "host_sent"),
        "host → guest: {out}"
    );
}

#[test]
fn nothing_is_left_on_the_host_after_the_vm() {
    let out = output("net_auto");
    assert_eq!(value(&out, "left_links"), "0", "{out}");
    assert_eq!(value(&out, "left_addrs"), "0", "{out}");
}

#[test]
fn an_existing_tap_is_used_and_left_as_it_was() {
    let out = output("net_tap");
    assert!(out.lines().any(|l| l == "guest_ping=ok"), "{out}");
    assert_eq!(value(&out, "after"), "10.77.0.1/24", "{out}");
}

#[test]
fn nothing_is_left_when_cela_is_killed_or_interrupted() {
    let r = report().get("net_killed");
    r.expect_rc(0);
    let out = r.stdout_str();
    for sig in ["KILL", "INT"] {
        let line = |what: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("{sig}: {what}")))
                .unwrap_or_else(|| panic!("no {sig}: {what} line in: {out}"))
                .to_string()
        };
        assert_eq!(line("up="), format!("{sig}: up=up links=1"), "{out}");
        let rc = if sig == "KILL" { 137 } else { 130 };
        assert_eq!(line("rc="), format!("{sig}: rc={rc}"), "{out}");
        assert_eq!(
            line("left_links="),
            format!("{sig}: left_links=0 left_addrs=0"),
            "{out}"
        );
    }
}
