//! Snapshots of microVMs on this host's engine (the QEMU fallback): a counting guest saved,
//! restored twice and saved again while it runs on; every bad input refused with nothing left.

mod common;
mod images;
mod world;

use std::time::{Duration, Instant};

use serde_json::Value;
use world::World;

/// The counter lines (`n=K start HOSTNAME UUID`) of an instance's log, as numbers.
fn counts(w: &World, name: &str) -> Vec<u64> {
    w.ok(&["logs", name])
        .lines()
        .filter_map(|l| l.strip_prefix("n="))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

/// Waits until `name` has printed a count of at least `n`.
fn wait_count(w: &World, name: &str, n: u64) {
    let start = Instant::now();
    while counts(w, name).last().is_none_or(|&c| c < n) {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{name} never counted to {n}: {}",
            w.ok(&["logs", name])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn instance_count(w: &World) -> usize {
    let v: Value = serde_json::from_str(&w.ok(&["ps", "-a", "--format", "json"])).unwrap();
    v.as_array().unwrap().len()
}

#[test]
fn a_counting_microvm_is_saved_restored_twice_and_saved_while_it_runs() {
    let w = World::new();
    // The count goes to the log and to a file on the VM's disk.
    w.ok(&[
        "run",
        "-d",
        "--vm",
        "--name",
        "src",
        "testimg",
        "sh",
        "-c",
        "i=$(cat /count 2>/dev/null || echo 0); echo start > /w; while :; do i=$((i+1)); echo $i > /count; sync; echo \"n=$i $(cat /w) $(hostname) $(cat /proc/sys/kernel/random/uuid)\"; sleep 1; done",
    ]);
    wait_count(&w, "src", 3);
    let supervisor = w.inspect("src")["state"]["supervisor"]["pid"]
        .as_i64()
        .unwrap();

    // Saved and ended: the VM's run ends cleanly, as saved.
    let t = Instant::now();
    assert_eq!(w.ok(&["snapshot", "--name", "s1", "src"]).trim(), "s1");
    let took = t.elapsed();
    let v = w.inspect("src");
    assert_eq!(
        (v["status"].as_str(), v["exit_code"].as_i64()),
        (Some("exited"), Some(0))
    );
    let last = *counts(&w, "src").last().unwrap();
    let listed: Value =
        serde_json::from_str(&w.ok(&["snapshot", "ls", "--format", "json"])).unwrap();
    assert_eq!(listed[0]["name"], "s1");
    assert_eq!(listed[0]["source"]["name"], "src");
    assert_eq!(listed[0]["engine"], "qemu");
    let size = |i: usize| listed[0]["files"][i]["size"].as_u64().unwrap();
    eprintln!(
        "snapshot of a 512 MiB VM: {:.2} s; state {:.1} MiB, disk {:.1} MiB",
        took.as_secs_f64(),
        size(0) as f64 / 1048576.0,
        size(1) as f64 / 1048576.0
    );

    // Two restores, side by side: each goes on from the saved count with the saved disk.
    for name in ["r1", "r2"] {
        let t = Instant::now();
        w.ok(&["restore", "-d", "--name", name, "s1"]);
        eprintln!("restore -d {name}: {:.2} s", t.elapsed().as_secs_f64());
        assert_eq!(w.status(name), "running");
    }
    for name in ["r1", "r2"] {
        wait_count(&w, name, last + 2);
        let c = counts(&w, name);
        assert!(
            c[0] == last + 1 || c[0] == last,
            "{name} began at {} where the snapshot stopped at {last}",
            c[0]
        );
        let log = w.ok(&["logs", name]);
        assert!(log.contains(" start "), "the disk's /w is gone: {log}");
        // The restored guest took its instance's name as its host name.
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("n={} ", last + 2)))
            .unwrap();
        assert_eq!(line.split(' ').nth(2), Some(name), "{line} in {log}");
    }
    // Each copy reseeded its random generator: the same iteration draws other numbers.
    let uuid_at = |name: &str| {
        let log = w.ok(&["logs", name]);
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("n={} ", last + 2)))
            .unwrap()
            .to_owned();
        line.split(' ').nth(3).unwrap().to_owned()
    };
    assert_ne!(uuid_at("r1"), uuid_at("r2"));

    // Forked: two running copies of r2, which runs on; the snapshot between them is gone.
    let at = *counts(&w, "r2").last().unwrap();
    assert_eq!(
        w.ok(&["fork", "-n", "2", "--name-prefix", "f", "r2"]),
        "f-1\nf-2\n"
    );
    assert_eq!(w.status("r2"), "running");
    for name in ["f-1", "f-2"] {
        wait_count(&w, name, at + 2);
        assert!(counts(&w, name)[0] >= at);
        let log = w.ok(&["logs", name]);
        let line = log.lines().last().unwrap();
        assert_eq!(line.split(' ').nth(2), Some(name), "{line}");
    }
    assert_eq!(
        w.ok(&["snapshot", "ls"]).lines().count(),
        2,
        "the fork's snapshot is left"
    );
    w.err(&["fork", "-n", "0", "r2"], "1 to 64 copies");
    for name in ["f-1", "f-2"] {
        w.ok(&["rm", "-f", name]);
    }

    // Saved while it runs on: r1 keeps counting, and its copy counts from the same place.
    let at = *counts(&w, "r1").last().unwrap();
    w.ok(&["snapshot", "--leave-running", "--name", "s2", "r1"]);
    assert_eq!(w.status("r1"), "running");
    wait_count(&w, "r1", at + 2);
    w.ok(&["restore", "-d", "--name", "r3", "s2"]);
    wait_count(&w, "r3", at + 1);
    assert!(counts(&w, "r3")[0] >= at);
    // Its disk is the one saved: booted cold, the workload counts on from the disk's count.
    w.ok(&["stop", "-t", "20", "r3"]);
    let before = *counts(&w, "r3").last().unwrap();
    w.ok(&["start", "r3"]);
    wait_count(&w, "r3", before + 1);
    assert!(
        !w.ok(&["logs", "r3"]).lines().any(|l| l.starts_with("n=1 ")),
        "the cold boot counted from 1: the saved disk was not the one booted"
    );

    // Carried to "another host" as one file: exported, imported under a new name, restored.
    let carry = tempfile::tempdir().unwrap();
    let tar = carry.path().join("s2.tar");
    w.ok(&["snapshot", "export", "s2", tar.to_str().unwrap()]);
    w.ok(&["snapshot", "import", "--name", "s3", tar.to_str().unwrap()]);
    w.ok(&["restore", "-d", "--name", "r4", "s3"]);
    wait_count(&w, "r4", at + 1);
    assert!(counts(&w, "r4")[0] >= at);
    w.ok(&["rm", "-f", "r4"]);
    // A copy cut short is refused and leaves nothing.
    let bytes = std::fs::read(&tar).unwrap();
    let cut = carry.path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    w.err(
        &["snapshot", "import", "--name", "s4", cut.to_str().unwrap()],
        "not a cela snapshot",
    );
    w.err(
        &["snapshot", "import", tar.to_str().unwrap()],
        "exists already",
    );
    w.ok(&["snapshot", "rm", "s3"]);
    // A device is written to as it is and stays; a failed export leaves no file.
    w.ok(&["snapshot", "export", "s2", "/dev/null"]);
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
    let none = carry.path().join("none.tar");
    w.err(
        &["snapshot", "export", "nosuch", none.to_str().unwrap()],
        "no such snapshot",
    );
    let left: Vec<_> = std::fs::read_dir(carry.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");

    // A restored instance is an instance: stopped and removed as any other.
    for name in ["r1", "r2", "r3"] {
        w.ok(&["stop", "-t", "20", name]);
        assert_eq!(w.status(name), "exited");
    }

    // Bad input: one line naming the problem, status 125, nothing made.
    let before = instance_count(&w);
    w.ok(&["run", "--name", "ct", "testimg", "true"]);
    w.err(&["snapshot", "ct"], "is a container");
    w.err(&["snapshot", "src"], "a snapshot is of a running microVM");
    w.err(&["snapshot", "nosuch"], "no such instance");
    w.err(&["restore", "nosuch"], "no such snapshot: nosuch");
    w.err(&["restore", "--name", "r1", "s1"], "exists already");
    let dir = w.data().join("snapshots/s2");
    let state = std::fs::read(dir.join("state.bin")).unwrap();
    let mut flipped = state.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    std::fs::write(dir.join("state.bin"), &flipped).unwrap();
    w.err(&["restore", "s2"], "tampered");
    std::fs::write(dir.join("state.bin"), &state[..state.len() - 10]).unwrap();
    w.err(&["restore", "s2"], "truncated");
    std::fs::write(dir.join("state.bin"), &state).unwrap();
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let mut m: Value = serde_json::from_str(&manifest).unwrap();
    m["cela_version"] = "0.0.0-elsewhere".into();
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    w.err(&["restore", "s2"], "written by cela 0.0.0-elsewhere");
    assert_eq!(
        instance_count(&w),
        before + 1,
        "a failed restore left an instance"
    );
    let out = w.cela(&["restore", "s2"]);
    assert_eq!(out.status.code(), Some(125));

    w.ok(&["rm", "src", "r1", "r2", "r3", "ct"]);
    w.ok(&["snapshot", "rm", "s1", "s2"]);
    assert_eq!(w.ok(&["snapshot", "ls"]).lines().count(), 1);
    let left: Vec<_> = std::fs::read_dir(w.data().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{supervisor}")).exists() || world::zombie(supervisor)
    );
}

/// What a networked guest says of its link each second: `n=K ADDRESS/PREFIX MAC GATEWAY PING`.
const LINK_LOOP: &str = "i=0; while :; do i=$((i+1)); \
    gw=$(ip route | awk '/^default/ {print $3}'); \
    if ping -c 1 -W 1 \"$gw\" >/dev/null 2>&1; then p=ok; else p=no; fi; \
    echo \"n=$i $(ip -4 -o addr show dev eth0 | awk '{print $4}') $(cat /sys/class/net/eth0/address) $gw $p\"; \
    sleep 1; done";

/// [`LINK_LOOP`] that also says, before each of its lines, which names the guest's
/// `/etc/hosts` gives others: `names A B `.
const LINK_AND_NAMES_LOOP: &str = "i=0; while :; do i=$((i+1)); \
    echo \"names $(awk '$1 !~ /^(127[.]|::)/ {print $2}' /etc/hosts | sort | tr '\\n' ' ')\"; \
    gw=$(ip route | awk '/^default/ {print $3}'); \
    if ping -c 1 -W 1 \"$gw\" >/dev/null 2>&1; then p=ok; else p=no; fi; \
    echo \"n=$i $(ip -4 -o addr show dev eth0 | awk '{print $4}') $(cat /sys/class/net/eth0/address) $gw $p\"; \
    sleep 1; done";

/// Waits until `name` says it reaches the host end of the link its instance has now (the
/// address and gateway `inspect` shows), and returns that line's fields.
fn wait_on_own_link(w: &World, name: &str) -> Vec<String> {
    wait_for_line(w, name, |w| {
        let net = w.inspect(name)["network"].clone();
        let host = net["host_address"].as_str().unwrap_or_default();
        (
            net["address"].as_str().unwrap_or_default().to_owned(),
            None,
            host.split('/').next().unwrap_or_default().to_owned(),
        )
    })
}

/// Waits until `name` logs a line of `LINK_LOOP` with the address, MAC (if any) and gateway
/// `own` reads from its record now, and `ok`; that line's fields.
fn wait_for_line(
    w: &World,
    name: &str,
    own: impl Fn(&World) -> (String, Option<String>, String),
) -> Vec<String> {
    let start = Instant::now();
    loop {
        let (address, mac, gateway) = own(w);
        let log = w.ok(&["logs", name]);
        let found = log.lines().find_map(|l| {
            let f: Vec<String> = l.split(' ').map(str::to_owned).collect();
            (f.len() == 5
                && f[1] == address
                && mac.as_ref().is_none_or(|m| &f[2] == m)
                && f[3] == gateway
                && f[4] == "ok")
                .then_some(f)
        });
        if let Some(f) = found {
            return f;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{name} never reached {gateway} from {address} {mac:?}: {log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_microvm_with_a_network_is_restored_and_forked_onto_links_of_their_own() {
    let w = World::new();
    let before = common::net_auto_taps();
    w.ok(&[
        "run", "-d", "--vm", "--net", "auto", "--name", "nsrc", "testimg", "sh", "-c", LINK_LOOP,
    ]);
    let src = wait_on_own_link(&w, "nsrc");
    w.ok(&["snapshot", "--name", "ns", "nsrc"]);
    let listed: Value =
        serde_json::from_str(&w.ok(&["snapshot", "ls", "--format", "json"])).unwrap();
    assert_eq!(listed[0]["name"], "ns");

    // A restore cannot add or remove the network card: one line, nothing made.
    let count = instance_count(&w);
    w.err(
        &["restore", "--net", "none", "ns"],
        "restore it with --net auto",
    );
    w.err(
        &["restore", "--net", "host", "ns"],
        "--net host is for containers",
    );
    assert_eq!(instance_count(&w), count);

    // Two copies: each moved its eth0 to its own TAP's /30 and MAC, and reaches the host.
    let mut seen = vec![src.clone()];
    for name in ["nr1", "nr2"] {
        w.ok(&["restore", "-d", "--name", name, "ns"]);
        seen.push(wait_on_own_link(&w, name));
    }
    // A fork of a copy: two more, each on a link of its own; the parent keeps its own.
    w.ok(&["fork", "-n", "2", "--name-prefix", "nf", "nr1"]);
    for name in ["nf-1", "nf-2"] {
        seen.push(wait_on_own_link(&w, name));
    }
    for (i, a) in seen.iter().enumerate() {
        for b in &seen[i + 1..] {
            assert_ne!(a[1], b[1], "two copies share an address: {seen:?}");
            assert_ne!(a[2], b[2], "two copies share a MAC: {seen:?}");
        }
    }
    let parent = w.inspect("nr1")["network"]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = w.ok(&["logs", "nr1"]);
    assert!(
        log.lines().last().unwrap().contains(&format!(" {parent} ")),
        "the parent lost its link to the fork: {log}"
    );

    // Everything goes with the instances: no TAP, no snapshot left.
    w.ok(&["rm", "-f", "nsrc", "nr1", "nr2", "nf-1", "nf-2"]);
    w.ok(&["snapshot", "rm", "ns"]);
    assert_eq!(common::net_auto_taps(), before, "a TAP was left behind");
}

/// Waits until `name` says it reaches `gateway` from the address and MAC `inspect` shows it
/// has on its first named network; that line's fields.
fn wait_on_network(w: &World, name: &str, gateway: &str) -> Vec<String> {
    wait_for_line(w, name, |w| {
        let joined = w.inspect(name)["networks"][0].clone();
        (
            joined["address"].as_str().unwrap_or_default().to_owned(),
            joined["mac"].as_str().map(str::to_owned),
            gateway.to_owned(),
        )
    })
}

/// A VM on a named network (as every `cela run` without `--net` is, on `bridge`) is
/// snapshotted; its copy rejoins the network with an address and MAC of its own while the
/// source runs on, and its guest moves to them on resume.
#[test]
fn a_microvm_on_a_named_network_is_restored_onto_it_with_an_address_of_its_own() {
    let w = World::new();
    w.ok(&["network", "create", "--subnet", "10.77.9.0/24", "snet"]);
    w.ok(&[
        "run",
        "-d",
        "--vm",
        "--net",
        "snet",
        "--name",
        "wsrc",
        "testimg",
        "sh",
        "-c",
        LINK_AND_NAMES_LOOP,
    ]);
    let src = wait_on_network(&w, "wsrc", "10.77.9.1");
    w.ok(&["snapshot", "--leave-running", "--name", "ws", "wsrc"]);
    let count = instance_count(&w);
    w.err(
        &["restore", "--net", "none", "ws"],
        "cannot remove its network card",
    );
    assert_eq!(instance_count(&w), count);
    w.ok(&["restore", "-d", "--name", "wr", "ws"]);
    let copy = wait_on_network(&w, "wr", "10.77.9.1");
    assert_ne!(src[1], copy[1], "the copy took the source's address");
    assert_ne!(src[2], copy[2], "the copy took the source's MAC");
    let net: Value = serde_json::from_str(&w.ok(&["network", "inspect", "snet"])).unwrap();
    assert_eq!(net[0]["endpoints"].as_object().unwrap().len(), 2, "{net}");
    // Each knows the other by name: the copy's names came after its restore, the source's
    // changed while it ran.
    for name in ["wsrc", "wr"] {
        let start = Instant::now();
        while !w.ok(&["logs", name]).contains("names wr wsrc ") {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} never named both: {}",
                w.ok(&["logs", name])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The source runs on at its own address.
    let a = src[1].clone();
    let start = Instant::now();
    while !w
        .ok(&["logs", "wsrc"])
        .lines()
        .last()
        .is_some_and(|l| l.contains(&format!(" {a} ")) && l.ends_with(" ok"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "wsrc lost its link"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    w.ok(&["rm", "-f", "wsrc", "wr"]);
    w.ok(&["snapshot", "rm", "ws"]);
    w.ok(&["network", "rm", "snet"]);
}
