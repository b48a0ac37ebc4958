//! Labs on this host, with real kernel networking: the three-node router lab (a line of two
//! hosts and a router between two subnets) brought up from a YAML file, an end-to-end ping
//! through the router, link impairment through the relay (`--delay 50` raising the round
//! trip by about 100 ms, `--loss 100` cutting it, `--clear` restoring it), the relay confined
//! (nobody, no capabilities), the topology drawn, and `lab down` leaving no instance, link,
//! relay, netns mount or record; a star of hosts on a lab network reaching each other by
//! name, a microVM among them; bad files refused with nothing made, and a lab failing half-way taken down whole.
//! As root.

mod images;
mod world;

use serde_json::Value;
use world::{World, host_ok};

const LINE: &str = r#"
name: line
topology:
  defaults: {image: testimg, cmd: [sleep, "600"]}
  nodes:
    h1: {routes: ["10.0.2.0/24 via 10.0.1.2"]}
    r1: {sysctls: {net.ipv4.ip_forward: "1"}}
    h2: {routes: ["default via 10.0.2.1"]}
  links:
    - endpoints: ["h1:eth1", "r1:eth1"]
      addresses: ["10.0.1.1/24", "10.0.1.2/24"]
    - endpoints: ["r1:eth2", "h2:eth1"]
      addresses: ["10.0.2.1/24", "10.0.2.2/24"]
"#;

fn lab_file(w: &World, name: &str, text: &str) -> String {
    let path = w.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn inspect(w: &World, lab: &str) -> Value {
    serde_json::from_str(&w.ok(&["lab", "inspect", lab])).unwrap()
}

/// The host interfaces whose names start with `prefix`.
fn links_named(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// The link relays of `w`'s labs (other tests' run beside them): processes whose command
/// line is `__link-relay` with a namespace in `w`'s data dir.
fn relays(w: &World) -> Vec<i32> {
    let data = w.data();
    let data = data.to_str().unwrap().as_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let words: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                words.contains(&&b"__link-relay"[..]) && words.iter().any(|w| w.starts_with(data))
            })
        })
        .collect()
}

/// The shortest round trip (ms) of `count` pings from `from` to `to` (the shortest, as a
/// busy machine only ever adds to some of them).
fn rtt(w: &World, from: &str, to: &str, count: u32) -> f64 {
    let out = w.exec_until(from, &format!("ping -c {count} -i 0.2 -W 3 {to} | tail -1"));
    // busybox: "round-trip min/avg/max = 0.061/0.085/0.109 ms"
    out.split('=')
        .nth(1)
        .and_then(|v| v.trim().split('/').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no round trip in {out:?}"))
}

#[test]
fn the_router_lab_routes_is_impaired_and_goes_away_whole() {
    let w = World::new();
    let file = lab_file(&w, "line.yml", LINE);
    let up = w.ok(&["lab", "up", &file]);
    assert!(up.contains("lab line is up: 3 nodes, 2 links"), "{up}");
    let v = inspect(&w, "line");
    assert_eq!(v["complete"], true, "{v}");
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["status"], "running", "{v}");
    }
    assert_eq!(v["links"][0]["lab_ends"][0], "l0a", "{v}");
    assert_eq!(v["links"][1]["up"], true, "{v}");
    // The lab ends are in the lab's own namespace, not the host's.
    let netns = w.data().join("labs/line.netns");
    assert!(netns.exists());
    let ends = host_ok(&[
        "nsenter",
        &format!("--net={}", netns.display()),
        "ip",
        "-o",
        "link",
    ]);
    assert!(ends.contains("l0a") && ends.contains("l1b"), "{ends}");
    assert!(
        links_named("l0a").is_empty(),
        "a lab end in the host's namespace"
    );
    let ls = w.ok(&["lab", "ls"]);
    assert!(ls.contains("line") && ls.contains("3"), "{ls}");
    // Interfaces named and addressed as the file says; forwarding on in the router only.
    let shown = w.ok(&["exec", "line-r1", "ip", "-4", "-o", "addr"]);
    assert!(
        shown.contains("eth1") && shown.contains("10.0.1.2/24"),
        "{shown}"
    );
    assert!(
        shown.contains("eth2") && shown.contains("10.0.2.1/24"),
        "{shown}"
    );
    assert_eq!(
        w.ok(&["exec", "line-r1", "cat", "/proc/sys/net/ipv4/ip_forward"])
            .trim(),
        "1"
    );
    assert_eq!(
        w.ok(&["exec", "line-h1", "cat", "/proc/sys/net/ipv4/ip_forward"])
            .trim(),
        "0"
    );
    // End to end through the router (h1's route, h2's default route).
    let base = rtt(&w, "line-h1", "10.0.2.2", 5);
    assert!(base < 20.0, "a kernel wire: {base} ms");

    // 50 ms on the h1–r1 link, both ways: the round trip rises by about 100 ms.
    let said = w.ok(&["lab", "impair", "line", "h1:eth1", "--delay", "50"]);
    assert!(said.contains("delay 50ms"), "{said}");
    let running = relays(&w);
    assert_eq!(running.len(), 1, "one relay for the impaired link");
    let status = std::fs::read_to_string(format!("/proc/{}/status", running[0])).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        field("Uid:").contains("65534"),
        "the relay is nobody: {status}"
    );
    assert!(field("CapEff:").ends_with("0000000000000000"), "{status}");
    assert!(field("NoNewPrivs:").ends_with('1'), "{status}");
    let slow = rtt(&w, "line-h1", "10.0.2.2", 5);
    assert!(
        (base + 95.0..base + 160.0).contains(&slow),
        "50 ms each way: {base} ms became {slow} ms"
    );
    let v = inspect(&w, "line");
    assert_eq!(v["links"][0]["impairment"], "delay 50ms", "{v}");
    assert_eq!(v["links"][0]["relay"]["alive"], true, "{v}");
    let dot = w.ok(&["lab", "graph", "line", "--format", "dot"]);
    assert!(
        dot.contains(r#""h1" -- "r1""#) && dot.contains("delay 50ms"),
        "{dot}"
    );
    let svg = w.ok(&["lab", "graph", "line"]);
    assert!(svg.starts_with("<svg") && svg.contains(">r1<"), "{svg}");

    // Every frame lost: nothing comes back.
    w.ok(&["lab", "impair", "line", "r1:eth1", "--loss", "100"]);
    let lost = w.cela(&["exec", "line-h1", "ping", "-c", "3", "-W", "1", "10.0.2.2"]);
    assert!(!lost.status.success(), "pings crossed a link losing 100%");
    assert_eq!(relays(&w).len(), 1, "the old relay went");

    // Cleared: a kernel wire again, the relay gone.
    w.ok(&["lab", "impair", "line", "h1:eth1", "--clear"]);
    assert!(relays(&w).is_empty());
    let again = rtt(&w, "line-h1", "10.0.2.2", 5);
    assert!(again < base + 20.0, "cleared: {again} ms (was {base})");

    // Down: nothing of it left.
    w.ok(&[
        "lab", "impair", "line", "h2:eth1", "--delay", "5", "--rate", "10",
    ]);
    // A node that stops takes its links along: said so, not a raw tc error.
    w.ok(&["stop", "-t", "1", "line-h2"]);
    let v2 = inspect(&w, "line");
    assert_eq!(v2["links"][1]["up"], false, "{v2}");
    assert_eq!(v2["links"][0]["up"], true, "{v2}");
    w.err(&["lab", "impair", "line", "h2:eth1", "--clear"], "is gone");
    let ids: Vec<String> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    w.ok(&["lab", "down", "line"]);
    assert!(!netns.exists(), "the lab's namespace left");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("line.netns"), "{mounts}");
    assert!(relays(&w).is_empty(), "a relay left");
    for id in &ids {
        w.assert_gone(id, &[]);
    }
    assert_eq!(w.ok(&["lab", "ls", "--format", "json"]).trim(), "[]");
    w.err(&["lab", "inspect", "line"], "no lab named line");
}

/// The issue's minimal lab: the router in the middle is a microVM (QEMU here) whose two
/// cards are its ends of the links, TAPs in the lab's namespace, named and addressed in the
/// guest as the file says; it forwards between the hosts, and its links are impaired like
/// any other.
#[test]
fn a_microvm_routes_between_its_lab_links() {
    let w = World::new();
    let file = lab_file(
        &w,
        "vmline.yml",
        r#"
name: vmline
topology:
  defaults: {image: testimg, cmd: [sleep, "600"]}
  nodes:
    h1: {routes: ["10.0.2.0/24 via 10.0.1.2"]}
    r1:
      kind: vm
      memory: 256
      cmd: [sh, -c, "echo 1 > /proc/sys/net/ipv4/ip_forward; ip -4 -o addr show; echo forwarding; exec sleep 600"]
    h2: {routes: ["default via 10.0.2.1"]}
  links:
    - endpoints: ["h1:eth1", "r1:eth1"]
      addresses: ["10.0.1.1/24", "10.0.1.2/24"]
    - endpoints: ["r1:eth2", "h2:eth1"]
      addresses: ["10.0.2.1/24", "10.0.2.2/24"]
"#,
    );
    let up = w.ok(&["lab", "up", &file]);
    assert!(up.contains("lab vmline is up: 3 nodes, 2 links"), "{up}");
    let v = inspect(&w, "vmline");
    assert_eq!(v["links"][0]["up"], true, "{v}");
    assert_eq!(v["links"][1]["up"], true, "{v}");
    // The VM's ends are TAPs in the lab's namespace.
    let netns = w.data().join("labs/vmline.netns");
    let ends = host_ok(&[
        "nsenter",
        &format!("--net={}", netns.display()),
        "ip",
        "-d",
        "-o",
        "link",
    ]);
    for end in ["l0b", "l1a"] {
        assert!(
            ends.lines()
                .any(|l| l.contains(&format!(": {end}:")) && l.contains("tun")),
            "{end} is no TAP: {ends}"
        );
    }
    let start = std::time::Instant::now();
    let logs = loop {
        let logs = w.ok(&["logs", "vmline-r1"]);
        if logs.contains("forwarding") {
            break logs;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "r1 never came up: {logs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for (dev, addr) in [("eth1", "10.0.1.2/24"), ("eth2", "10.0.2.1/24")] {
        assert!(
            logs.lines()
                .any(|l| l.contains(&format!(" {dev} ")) && l.contains(&format!("inet {addr}"))),
            "{logs}"
        );
    }
    // End to end through the VM.
    let base = rtt(&w, "vmline-h1", "10.0.2.2", 5);
    // 50 ms on the link to the VM, both ways: the relay carries a TAP's frames too.
    w.ok(&["lab", "impair", "vmline", "r1:eth1", "--delay", "50"]);
    let slow = rtt(&w, "vmline-h1", "10.0.2.2", 5);
    assert!(
        (base + 95.0..base + 250.0).contains(&slow),
        "50 ms each way: {base} ms became {slow} ms"
    );
    w.err(
        &["snapshot", "vmline-r1"],
        "on lab links cannot be snapshotted",
    );
    // Started again, the VM makes its ends anew, which nothing joins: shown down, as a
    // container node's links are.
    w.ok(&["stop", "-t", "1", "vmline-r1"]);
    w.ok(&["start", "vmline-r1"]);
    let v = inspect(&w, "vmline");
    assert_eq!(v["links"][0]["up"], false, "{v}");
    assert_eq!(v["links"][1]["up"], false, "{v}");
    w.err(
        &["lab", "impair", "vmline", "r1:eth2", "--delay", "5"],
        "is gone",
    );
    w.ok(&["lab", "down", "vmline"]);
    assert!(!netns.exists(), "the lab's namespace left");
    assert!(relays(&w).is_empty(), "a relay left");
    assert_eq!(w.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");
}

#[test]
fn a_star_on_a_lab_network_reaches_each_other_by_name() {
    let w = World::new();
    let file = lab_file(
        &w,
        "star.yml",
        r#"
name: star
topology:
  defaults: {image: testimg, cmd: "sleep 600", networks: [lan]}
  networks:
    lan: {subnet: 10.77.40.0/24}
  nodes:
    a: {}
    b: {}
    c: {}
    d: {kind: vm, memory: 256}
"#,
    );
    w.ok(&["lab", "up", &file]);
    let nets: Value = serde_json::from_str(&w.ok(&["network", "inspect", "star-lan"])).unwrap();
    assert_eq!(nets[0]["subnet"], "10.77.40.0/24");
    // d is a microVM from the same image (QEMU here), on the same network.
    for (from, to) in [
        ("star-a", "star-b"),
        ("star-b", "star-c"),
        ("star-c", "star-a"),
        ("star-a", "star-d"),
    ] {
        w.exec_until(from, &format!("ping -c 1 -W 2 {to}"));
    }
    let dot = w.ok(&["lab", "graph", "star", "--format", "dot"]);
    assert!(dot.contains(r#""a" -- "net:lan" [style=dashed]"#), "{dot}");
    w.ok(&["lab", "down", "star"]);
    w.err(
        &["network", "inspect", "star-lan"],
        "no network named star-lan",
    );
    assert_eq!(w.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");
}

#[test]
fn bad_lab_files_make_nothing_and_a_failed_lab_goes_whole() {
    let w = World::new();
    for (text, want) in [
        (LINE.replace("h2:eth1\"]", "h9:eth1\"]"), "no node \"h9\""),
        (LINE.replace("topology:", "topology: ["), "line.yml"),
        (LINE.replace("defaults:", "defaultz:"), "defaultz"),
        (LINE.replace("10.0.1.1/24", "10.0.1.1"), "not ADDR/PREFIX"),
    ] {
        let file = lab_file(&w, "line.yml", &text);
        w.err(&["lab", "up", &file], want);
    }
    // A node whose image does not exist, after others were made: all of it goes.
    let file = lab_file(
        &w,
        "line.yml",
        &LINE.replace("h2: {routes", "h2: {image: 127.0.0.1:9/nosuchimage, routes"),
    );
    w.err(&["lab", "up", &file], "node h2");
    assert_eq!(
        w.ok(&["ps", "-a", "--format", "json"]).trim(),
        "[]",
        "nodes left"
    );
    assert_eq!(w.ok(&["lab", "ls", "--format", "json"]).trim(), "[]");
    // A gateway on none of the node's subnets is refused before anything is made.
    let file = lab_file(
        &w,
        "line.yml",
        &LINE.replace("via 10.0.1.2", "via 10.9.9.9"),
    );
    w.err(&["lab", "up", &file], "10.9.9.9 is on none of its subnets");
    // A sysctl the kernel does not have fails last, after the links: all goes too.
    let file = lab_file(
        &w,
        "line.yml",
        &LINE.replace("net.ipv4.ip_forward", "net.ipv4.no_such_key"),
    );
    w.err(&["lab", "up", &file], "net.ipv4.no_such_key");
    assert_eq!(
        w.ok(&["ps", "-a", "--format", "json"]).trim(),
        "[]",
        "nodes left"
    );
    assert!(
        !w.data().join("labs/line.netns").exists(),
        "the lab's namespace left"
    );
    assert!(relays(&w).is_empty());
    // The same lab twice; an end no link has.
    let file = lab_file(&w, "line.yml", LINE);
    w.ok(&["lab", "up", &file]);
    w.err(&["lab", "up", &file], "is up already");
    w.err(
        &["lab", "impair", "line", "h1:eth7", "--delay", "5"],
        "no link at h1:eth7",
    );
    w.err(
        &["lab", "impair", "line", "h1:eth1", "--delay", "5 parsecs"],
        "unknown unit",
    );
    w.err(&["lab", "impair", "line", "h1:eth1"], "say what to do");
    w.ok(&["lab", "down", "line"]);
}
