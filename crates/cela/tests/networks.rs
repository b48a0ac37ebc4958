//! Named networks on this host, with real kernel networking: `cela network create|ls|inspect|rm`
//! and their bad input; containers on one network reaching each other by name (hosts files
//! rewritten as instances come and go) and the host, but not another network; `--internal`
//! reaching neither the host nor beyond, `--nat` reaching an "outside" network namespace the
//! test makes (never a real external address) where a plain network cannot; a container and a
//! microVM (QEMU fallback) exchanging TCP data on one network; nothing left behind (bridges,
//! veths, TAPs, nftables tables). As root.

mod images;
mod world;

use std::time::{Duration, Instant};

use serde_json::Value;
use world::{World, host, host_ok};

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn table_exists(id: &str) -> bool {
    host(&["nft", "list", "table", "inet", &format!("cela_{id}")])
        .status
        .success()
}

/// A network's record as `cela network inspect` prints it.
fn inspect(w: &World, name: &str) -> Value {
    let v: Value = serde_json::from_str(&w.ok(&["network", "inspect", name])).unwrap();
    v[0].clone()
}

/// An instance's address on its first network (`ADDR`, no prefix).
fn address_of(w: &World, name: &str) -> String {
    let v = w.inspect(name);
    v["networks"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no address: {v}"))
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn networks_are_created_listed_inspected_and_removed_and_bad_input_is_refused() {
    let w = World::new();
    let id = w.ok(&["network", "create", "--subnet", "10.77.1.0/24", "lan1"]);
    let id = id.trim();
    assert_eq!(id.len(), 12, "{id}");
    let v = inspect(&w, "lan1");
    assert_eq!(v["subnet"], "10.77.1.0/24");
    assert_eq!(v["gateway"], "10.77.1.1");
    let bridge = v["bridge"].as_str().unwrap().to_owned();
    assert!(bridge.starts_with("cbr-"), "{v}");
    let shown = host_ok(&["ip", "-4", "-o", "addr", "show", "dev", &bridge]);
    assert!(shown.contains("inet 10.77.1.1/24"), "{shown}");
    assert!(table_exists(id));
    // No subnet given: a free /24 of 10.214.0.0/16; internal: no address on its bridge.
    w.ok(&["network", "create", "--internal", "lan2"]);
    let v2 = inspect(&w, "lan2");
    assert!(
        v2["subnet"].as_str().unwrap().starts_with("10.214."),
        "{v2}"
    );
    let bridge2 = v2["bridge"].as_str().unwrap().to_owned();
    let shown = host_ok(&["ip", "-4", "-o", "addr", "show", "dev", &bridge2]);
    assert!(
        shown.is_empty(),
        "an internal bridge has no address: {shown}"
    );
    let ls: Value = serde_json::from_str(&w.ok(&["network", "ls", "--format", "json"])).unwrap();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lan1", "lan2"]);
    let table = w.ok(&["network", "ls"]);
    assert!(
        table.contains("lan1") && table.contains("internal"),
        "{table}"
    );

    for (args, needle) in [
        (
            &["network", "create", "lan1"][..],
            "a network named lan1 exists already",
        ),
        (
            &["network", "create", "--subnet", "10.77.1.128/25", "x"],
            "overlaps network lan1 (10.77.1.0/24)",
        ),
        (
            &["network", "create", "--subnet", "10.77.9.0/33", "x"],
            "prefix must be 8 to 30",
        ),
        (
            &["network", "create", "--subnet", "bogus", "x"],
            "not A.B.C.D/PREFIX",
        ),
        (
            &["network", "create", "--subnet", "10.77.9.1/24", "x"],
            "host bits set",
        ),
        (
            &[
                "network",
                "create",
                "--subnet",
                "10.77.9.0/24",
                "--gateway",
                "10.77.8.1",
                "x",
            ],
            "not a host address of 10.77.9.0/24",
        ),
        (
            &["network", "create", "--internal", "--nat", "x"],
            "not both",
        ),
        (&["network", "create", "bad name"], "not a valid"),
        (&["network", "create", "none"], "a name cela keeps"),
        (&["network", "create", "bridge"], "a name cela keeps"),
        (&["network", "rm", "nothing"], "no network named nothing"),
        (
            &["network", "inspect", "nothing"],
            "no network named nothing",
        ),
        (
            &["run", "--net", "nothing", "testimg", "true"],
            "no network named nothing",
        ),
        (
            &["run", "--net", "lan1", "--net", "lan1", "testimg", "true"],
            "given twice",
        ),
        (
            &["run", "--net", "lan1", "--net", "auto", "testimg", "true"],
            "stands alone",
        ),
        (
            &["run", "--net", "lan1,ip=10.77.2.5", "testimg", "true"],
            "not a free host address",
        ),
        (
            &["run", "--net", "lan1,ip=10.77.1.1", "testimg", "true"],
            "not a free host address",
        ),
        (
            &["run", "--net", "lan1,mtu=9000", "testimg", "true"],
            "expected ip=ADDR or mac=MAC",
        ),
        (
            &[
                "run", "--vm", "--net", "v1", "--net", "v2", "--net", "v3", "--net", "v4", "--net",
                "v5", "--net", "v6", "--net", "v7", "--net", "v8", "--net", "v9", "testimg",
                "true",
            ],
            "at most 8",
        ),
    ] {
        w.err(args, needle);
    }
    // Nothing was made by any of them.
    let ps: Value = serde_json::from_str(&w.ok(&["ps", "-a", "--format", "json"])).unwrap();
    assert_eq!(ps, Value::Array(vec![]), "bad input left instances");
    assert_eq!(
        serde_json::from_str::<Value>(&w.ok(&["network", "ls", "--format", "json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(w.ok(&["network", "rm", "lan1", "lan2"]), "lan1\nlan2\n");
    assert!(!link_exists(&bridge) && !link_exists(&bridge2));
    assert!(!table_exists(id));
    assert_eq!(w.ok(&["network", "ls", "--format", "json"]).trim(), "[]");
}

#[test]
fn containers_on_a_network_reach_each_other_by_name_and_the_host_but_not_another_network() {
    let w = World::new();
    w.ok(&["network", "create", "--subnet", "10.77.2.0/24", "n1"]);
    w.ok(&["network", "create", "--subnet", "10.77.3.0/24", "n2"]);
    let bridges =
        [inspect(&w, "n1"), inspect(&w, "n2")].map(|v| v["bridge"].as_str().unwrap().to_owned());
    for (name, net) in [
        ("a", "n1"),
        ("b", "n1,ip=10.77.2.50,mac=02:00:0a:4d:02:32"),
        ("c", "n2"),
    ] {
        w.ok(&[
            "run", "-d", "--name", name, "--net", net, "testimg", "sleep", "600",
        ]);
    }
    let (a, b, c) = (
        address_of(&w, "a"),
        address_of(&w, "b"),
        address_of(&w, "c"),
    );
    assert_eq!(a, "10.77.2.2");
    assert_eq!(b, "10.77.2.50");
    assert_eq!(c, "10.77.3.2");
    let veths = ["a", "c"].map(|n| {
        let v = w.inspect(n)["networks"][0]["interface"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(link_exists(&v), "{n}: {v}");
        v
    });
    let inside = w.ok(&[
        "exec",
        "b",
        "sh",
        "-c",
        "ip -o link show eth0; ip -4 -o addr; ip route",
    ]);
    assert!(inside.contains("02:00:0a:4d:02:32"), "{inside}");
    assert!(inside.contains("inet 10.77.2.50/24"), "{inside}");
    assert!(
        inside.contains("default via 10.77.2.1 dev eth0"),
        "{inside}"
    );
    // By name both ways: a's hosts file was rewritten when b joined.
    let hosts = w.ok(&["exec", "a", "cat", "/etc/hosts"]);
    assert!(
        hosts.contains("10.77.2.2\ta\n") && hosts.contains("10.77.2.50\tb\n"),
        "{hosts}"
    );
    assert!(!hosts.contains("\tc\n"), "c is on another network: {hosts}");
    w.exec_until("a", "ping -c 1 -W 2 b");
    w.exec_until("b", "ping -c 1 -W 2 a");
    // The host, through the gateway.
    w.exec_until("c", "ping -c 1 -W 2 10.77.3.1");
    // Not the other network, whose bridge the host could route to.
    let out = w.cela(&["exec", "c", "ping", "-c", "2", "-W", "1", &a]);
    assert!(
        !out.status.success(),
        "n2 reached n1: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = w.cela(&["exec", "a", "ping", "-c", "2", "-W", "1", &c]);
    assert!(
        !out.status.success(),
        "n1 reached n2: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A network in use stays; the names go as their instances do.
    w.err(&["network", "rm", "n1"], "network n1 is in use by a, b");
    let veth_b = w.inspect("b")["networks"][0]["interface"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(link_exists(&veth_b));
    w.ok(&["rm", "-f", "b"]);
    assert!(!link_exists(&veth_b), "{veth_b} left");
    let hosts = w.ok(&["exec", "a", "cat", "/etc/hosts"]);
    assert!(!hosts.contains("\tb\n"), "b is gone: {hosts}");
    // A supervisor killed with SIGKILL: its endpoint is pruned by the network's removal.
    let sup = w.inspect("a")["state"]["supervisor"]["pid"]
        .as_i64()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    w.wait_status("a", "crashed");
    w.ok(&["network", "rm", "n1"]);
    w.ok(&["rm", "-f", "a", "c"]);
    w.ok(&["network", "rm", "n2"]);
    for b in &bridges {
        assert!(!link_exists(b), "{b} left");
    }
    for v in &veths {
        assert!(!link_exists(v), "{v} left");
    }
}

/// A network namespace standing for the world outside the host: a /28 of a documentation
/// range (TEST-NET-2 or -3, never routed anywhere real; this host's own network may well be
/// TEST-NET-1), its first address the host's, its second the namespace's. Each test has its
/// own (`slot`: which /28, and the names), since tests run at once. Removed on drop.
struct Outside {
    ns: String,
    link: String,
    /// The host's address and the namespace's.
    near: String,
    far: String,
}

impl Outside {
    fn new(slot: u8) -> Outside {
        // Another test's outside (on its own `ctout` link) does not make a range taken.
        let routes: String = (host_ok(&["ip", "-4", "route"])
            + &host_ok(&["ip", "-4", "-o", "addr"]))
            .lines()
            .filter(|l| !l.contains("ctout"))
            .collect();
        let range = ["198.51.100.", "203.0.113."]
            .into_iter()
            .find(|n| !routes.contains(n))
            .expect("both TEST-NET-2 and -3 are in use on this host");
        let base = u32::from(slot) * 16;
        let o = Outside {
            ns: format!("cela-test-out{slot}"),
            link: format!("ctout{slot}"),
            near: format!("{range}{}", base + 1),
            far: format!("{range}{}", base + 2),
        };
        let _ = host(&["ip", "netns", "del", &o.ns]);
        let _ = host(&["ip", "link", "del", &o.link]);
        host_ok(&["ip", "netns", "add", &o.ns]);
        host_ok(&[
            "ip", "link", "add", &o.link, "type", "veth", "peer", "name", "eth0", "netns", &o.ns,
        ]);
        host_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/28", o.near),
            "dev",
            &o.link,
        ]);
        host_ok(&["ip", "link", "set", &o.link, "up"]);
        let setup = format!(
            "ip addr add {}/28 dev eth0; ip link set eth0 up; ip link set lo up",
            o.far
        );
        host_ok(&["ip", "netns", "exec", &o.ns, "sh", "-c", &setup]);
        o
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = host(&["ip", "netns", "del", &self.ns]);
        let _ = host(&["ip", "link", "del", &self.link]);
    }
}

#[test]
fn nat_reaches_beyond_the_host_a_plain_network_only_the_host_and_internal_nothing() {
    let w = World::new();
    let outside = Outside::new(1);
    w.ok(&[
        "network",
        "create",
        "--nat",
        "--subnet",
        "10.77.4.0/24",
        "out",
    ]);
    w.ok(&["network", "create", "--subnet", "10.77.5.0/24", "plain"]);
    w.ok(&[
        "network",
        "create",
        "--internal",
        "--subnet",
        "10.77.6.0/24",
        "walled",
    ]);
    for (name, net) in [
        ("o", "out"),
        ("p", "plain"),
        ("i", "walled"),
        ("i2", "walled"),
    ] {
        w.ok(&[
            "run", "-d", "--name", name, "--net", net, "testimg", "sleep", "600",
        ]);
    }
    // Out through the masquerade: the outside sees the host's address, not the container's.
    w.exec_until("o", &format!("ping -c 1 -W 2 {}", outside.far));
    let plain = w.cela(&["exec", "p", "ping", "-c", "2", "-W", "1", &outside.far]);
    assert!(
        !plain.status.success(),
        "a plain network went beyond the host: {}",
        String::from_utf8_lossy(&plain.stdout)
    );
    w.exec_until("p", "ping -c 1 -W 2 10.77.5.1");
    // Internal: no route out, the host not even through its other addresses; each other yes.
    let routes = w.ok(&["exec", "i", "ip", "route"]);
    assert!(!routes.contains("default"), "{routes}");
    for target in ["10.77.6.1".to_owned(), outside.near.clone()] {
        let out = w.cela(&[
            "exec",
            "i",
            "sh",
            "-c",
            &format!("ip route add default dev eth0; ping -c 2 -W 1 {target}"),
        ]);
        assert!(!out.status.success(), "internal reached {target}");
    }
    w.exec_until("i", "ping -c 1 -W 2 i2");
    w.ok(&["rm", "-f", "o", "p", "i", "i2"]);
    w.ok(&["network", "rm", "out", "plain", "walled"]);
}

#[test]
fn a_container_and_a_microvm_on_one_network_exchange_tcp_data() {
    let w = World::new();
    w.ok(&["network", "create", "--subnet", "10.77.7.0/24", "mixed"]);
    w.ok(&[
        "run",
        "-d",
        "--name",
        "srv",
        "--net",
        "mixed",
        "testimg",
        "sh",
        "-c",
        "nc -l -p 7000 > /tmp/got; cat /tmp/got; sleep 600",
    ]);
    // The VM reaches the container by name from its first command on, and learns the names
    // of instances that come and go while it runs.
    let script = "head -c 4096 /etc/hosts; ip -4 -o addr show eth0; ip route; \
        i=0; until echo from-the-vm | nc srv 7000; do i=$((i+1)); [ $i -gt 50 ] && exit 9; sleep 0.2; done; echo sent; \
        i=0; until ping -c 1 -W 1 late >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 300 ] && exit 10; sleep 0.2; done; echo found-late; \
        i=0; while grep -q late /etc/hosts; do i=$((i+1)); [ $i -gt 300 ] && exit 11; sleep 0.2; done; echo late-gone";
    w.ok(&[
        "run",
        "-d",
        "--vm",
        "--name",
        "vm1",
        "--net",
        "mixed,ip=10.77.7.9",
        "testimg",
        "sh",
        "-c",
        script,
    ]);
    let logs_until = |name: &str, what: &str| {
        let start = Instant::now();
        loop {
            let logs = w.ok(&["logs", name]);
            if logs.contains(what) {
                return logs;
            }
            let status = w.inspect(name)["status"].as_str().unwrap_or("").to_owned();
            assert!(
                start.elapsed() < Duration::from_secs(120) && status != "exited",
                "{name} never said {what:?} ({status}):\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let out = logs_until("vm1", "sent");
    assert!(out.contains("inet 10.77.7.9/24"), "{out}");
    assert!(out.contains("default via 10.77.7.1"), "{out}");
    let srv = address_of(&w, "srv");
    assert!(out.contains(&format!("{srv}\tsrv")), "{out}");
    assert!(out.contains("10.77.7.9\tvm1"), "{out}");
    logs_until("srv", "from-the-vm");
    // A container that joins later is found by name, and the VM by it.
    w.ok(&[
        "run", "-d", "--name", "late", "--net", "mixed", "testimg", "sleep", "600",
    ]);
    logs_until("vm1", "found-late");
    w.exec_until("late", "ping -c 1 -W 2 vm1");
    w.ok(&["rm", "-f", "late"]);
    logs_until("vm1", "late-gone");
    w.wait_status("vm1", "exited");
    assert_eq!(
        w.inspect("vm1")["exit_code"],
        0,
        "{}",
        w.ok(&["logs", "vm1"])
    );
    w.ok(&["rm", "vm1"]);
    // The VM's TAP left the network with it.
    assert_eq!(
        inspect(&w, "mixed")["endpoints"].as_object().unwrap().len(),
        1
    );
    w.ok(&["rm", "-f", "srv"]);
    w.ok(&["network", "rm", "mixed"]);
}

/// A microVM on two networks has a network card on each (eth0, eth1, in the order given),
/// the default route through the first, and routes between them for containers on each.
#[test]
fn a_microvm_on_two_networks_routes_between_them() {
    let w = World::new();
    w.ok(&["network", "create", "--subnet", "10.77.11.0/24", "r1"]);
    w.ok(&["network", "create", "--subnet", "10.77.12.0/24", "r2"]);
    w.ok(&[
        "run", "-d", "--vm", "--name", "router", "--net", "r1,ip=10.77.11.254", "--net",
        "r2,ip=10.77.12.254", "testimg", "sh", "-c",
        "ip -4 -o addr show; ip route; echo 1 > /proc/sys/net/ipv4/ip_forward && echo forwarding; sleep 600",
    ]);
    for (name, net, to, via) in [
        ("h1", "r1", "10.77.12.0/24", "10.77.11.254"),
        ("h2", "r2", "10.77.11.0/24", "10.77.12.254"),
    ] {
        w.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--net",
            net,
            "--cap-add",
            "NET_ADMIN",
            "testimg",
            "sh",
            "-c",
            &format!("ip route add {to} via {via} && sleep 600"),
        ]);
    }
    let start = Instant::now();
    let logs = loop {
        let logs = w.ok(&["logs", "router"]);
        if logs.contains("forwarding") {
            break logs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120) && w.status("router") == "running",
            "the router never came up: {logs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for (dev, addr) in [("eth0", "10.77.11.254/24"), ("eth1", "10.77.12.254/24")] {
        assert!(
            logs.lines()
                .any(|l| l.contains(&format!(" {dev} ")) && l.contains(&format!("inet {addr}"))),
            "{logs}"
        );
    }
    assert_eq!(logs.matches("default via").count(), 1, "{logs}");
    assert!(logs.contains("default via 10.77.11.1 dev eth0"), "{logs}");
    let joined = w.inspect("router")["networks"].clone();
    assert_eq!(joined.as_array().map(Vec::len), Some(2), "{joined}");
    // Each host reaches the other only through the VM (the host routes between no networks).
    let (h1, h2) = (address_of(&w, "h1"), address_of(&w, "h2"));
    w.exec_until("h1", &format!("ping -c 1 -W 2 {h2}"));
    w.exec_until("h2", &format!("ping -c 1 -W 2 {h1}"));
    // And the router by name: every hosts file on its networks lists it.
    w.exec_until("h1", "ping -c 1 -W 2 router");
    w.err(&["snapshot", "router"], "more than one network card");
    w.ok(&["rm", "-f", "router", "h1", "h2"]);
    w.ok(&["network", "rm", "r1", "r2"]);
}

/// Connects to `addr` until something answers (bounded: the listener comes up
/// asynchronously); what it sends.
fn read_from(addr: (&str, u16)) -> String {
    use std::io::Read;
    let start = Instant::now();
    loop {
        let got = std::net::TcpStream::connect(addr).and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut s = String::new();
            c.read_to_string(&mut s)?;
            Ok(s)
        });
        match got {
            Ok(s) if !s.is_empty() => return s,
            other => assert!(
                start.elapsed() < Duration::from_secs(60),
                "{addr:?}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn published_ports_reach_a_container_and_a_microvm_and_go_with_them() {
    let w = World::new();
    let outside = Outside::new(2);
    w.ok(&["network", "create", "--subnet", "10.77.8.0/24", "pub"]);
    let serve = |word: &str| format!("while :; do echo {word} | nc -l -p 8080; done");
    let id = w.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--net",
        "pub",
        "-p",
        "18080:8080",
        "testimg",
        "sh",
        "-c",
        &serve("published-ct"),
    ]);
    let id = id.trim().to_owned();
    assert_eq!(w.inspect("web")["ports"][0], "0.0.0.0:18080->8080/tcp");
    // From the host itself (to one of its addresses: here the network's gateway), and from
    // outside the host (to its address on the outside link).
    assert_eq!(read_from(("10.77.8.1", 18080)), "published-ct\n");
    // The listener comes back a moment after each connection (a shell loop of nc): asked
    // until it answers, bounded.
    let start = Instant::now();
    let from_outside = loop {
        let out = host(&[
            "ip",
            "netns",
            "exec",
            &outside.ns,
            "busybox",
            "nc",
            "-w",
            "5",
            &outside.near,
            "18080",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && !text.is_empty() {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the published port never answered from outside: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(from_outside, "published-ct\n");
    // One instance per host port; none a host process holds; an address to publish to.
    w.err(
        &[
            "run",
            "-d",
            "--name",
            "web2",
            "--net",
            "pub",
            "-p",
            "18080:9090",
            "testimg",
            "sleep",
            "60",
        ],
        "the host port is published by web",
    );
    let held = std::net::TcpListener::bind(("0.0.0.0", 18082)).unwrap();
    w.err(
        &[
            "run", "-d", "--name", "web3", "--net", "pub", "-p", "18082:80", "testimg", "sleep",
            "60",
        ],
        "a process of the host uses port 18082/tcp",
    );
    drop(held);
    w.err(
        &[
            "run",
            "--net",
            "pub",
            "-p",
            "8.8.8.8:18084:80",
            "testimg",
            "true",
        ],
        "8.8.8.8 is not an address of this host",
    );
    // Another instance on the network reaches it through the host (hairpin).
    let hairpin = w.ok(&[
        "run",
        "--rm",
        "--net",
        "pub",
        "testimg",
        "sh",
        "-c",
        "nc -w 5 10.77.8.1 18080",
    ]);
    assert_eq!(hairpin, "published-ct\n");
    w.err(
        &["run", "-p", "18083:80", "testimg", "true"],
        "needs --net auto or a network",
    );
    w.err(
        &[
            "run", "--net", "pub", "-p", "18083:80", "-p", "18083:81", "testimg", "true",
        ],
        "take the same port",
    );
    // A microVM on its --net auto link (QEMU fallback).
    w.ok(&[
        "run",
        "-d",
        "--vm",
        "--name",
        "vmweb",
        "--net",
        "auto",
        "-p",
        "18081:8080",
        "testimg",
        "sh",
        "-c",
        &serve("published-vm"),
    ]);
    assert_eq!(read_from(("10.77.8.1", 18081)), "published-vm\n");
    let vm_id = w.inspect("vmweb")["id"].as_str().unwrap().to_owned();
    // The rules go with their instances.
    w.ok(&["rm", "-f", "web", "web2", "web3", "vmweb"]);
    for i in [&id, &vm_id] {
        assert!(
            !host(&["nft", "list", "table", "ip", &format!("cela_ports_{i}")])
                .status
                .success(),
            "the ports of {i} are still published"
        );
    }
    assert!(std::net::TcpStream::connect(("10.77.8.1", 18080)).is_err());
    w.ok(&["network", "rm", "pub"]);
}

#[test]
fn a_running_container_is_connected_to_a_network_and_disconnected() {
    let w = World::new();
    w.ok(&["network", "create", "--subnet", "10.77.9.0/24", "na"]);
    w.ok(&["network", "create", "--subnet", "10.77.10.0/24", "nb"]);
    w.ok(&[
        "run", "-d", "--name", "x", "--net", "na", "testimg", "sleep", "600",
    ]);
    w.ok(&[
        "run", "-d", "--name", "y", "--net", "nb", "testimg", "sleep", "600",
    ]);
    w.ok(&["network", "connect", "nb,ip=10.77.10.7", "x"]);
    let inside = w.ok(&["exec", "x", "ip", "-4", "-o", "addr", "show", "eth1"]);
    assert!(inside.contains("inet 10.77.10.7/24"), "{inside}");
    w.exec_until("x", "ping -c 1 -W 2 y");
    let hosts = w.ok(&["exec", "y", "cat", "/etc/hosts"]);
    assert!(hosts.contains("10.77.10.7\tx\n"), "{hosts}");
    w.err(
        &["network", "connect", "nb", "x"],
        "x is on network nb already",
    );
    w.err(
        &["network", "connect", "nothing", "x"],
        "no network named nothing",
    );
    w.ok(&["network", "disconnect", "nb", "x"]);
    let links = w.ok(&["exec", "x", "ip", "-o", "link"]);
    assert!(!links.contains("eth1"), "{links}");
    let hosts = w.ok(&["exec", "y", "cat", "/etc/hosts"]);
    assert!(!hosts.contains("\tx\n"), "{hosts}");
    assert_eq!(
        w.inspect("x")["config"]["networks"],
        serde_json::json!([{"network": "na"}])
    );
    w.err(
        &["network", "disconnect", "nb", "x"],
        "x is not on network nb",
    );
    // Its first network left and joined again: the lowest free interface, eth0 once more,
    // beside eth1 of another.
    w.ok(&["network", "connect", "nb", "x"]);
    w.ok(&["network", "disconnect", "na", "x"]);
    w.ok(&["network", "connect", "na", "x"]);
    let links = w.ok(&["exec", "x", "ip", "-o", "link"]);
    assert!(
        links.contains(" eth0@") && links.contains(" eth1@"),
        "{links}"
    );
    w.exec_until("x", "ping -c 1 -W 2 y");
    w.ok(&["stop", "-t", "1", "y"]);
    w.err(
        &["network", "connect", "na", "y"],
        "connect joins a running container",
    );
    w.ok(&["rm", "-f", "x", "y"]);
    w.ok(&["network", "rm", "na", "nb"]);
}

/// `cela` as a user runs it: without the suite's `CELA_DEFAULT_NETWORK=none`, or with `env`.
fn cela_as_user(w: &World, env: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_cela"));
    c.args(args)
        .env("CELA_DATA_DIR", w.data())
        .env_remove("CELA_DEFAULT_NETWORK")
        .stdin(std::process::Stdio::null());
    if let Some(v) = env {
        c.env("CELA_DEFAULT_NETWORK", v);
    }
    c.output().unwrap()
}

fn ok_as_user(w: &World, env: Option<&str>, args: &[&str]) -> String {
    let out = cela_as_user(w, env, args);
    assert!(
        out.status.success(),
        "cela {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Without `--net`, a container and a microVM (QEMU fallback) join the built-in network
/// `bridge`, made on first use and NAT'd like Docker's docker0: they reach each other by name
/// and address, and beyond the host; `--net none` and `CELA_DEFAULT_NETWORK` opt out; the
/// network goes like any other.
#[test]
fn without_net_instances_join_the_default_nat_bridge_made_on_first_use() {
    let w = World::new();
    let outside = Outside::new(3);
    assert_eq!(w.ok(&["network", "ls", "--format", "json"]).trim(), "[]");
    for name in ["a", "b"] {
        ok_as_user(
            &w,
            None,
            &["run", "-d", "--name", name, "testimg", "sleep", "600"],
        );
    }
    let net = inspect(&w, "bridge");
    assert_eq!(net["nat"], true, "{net}");
    assert_eq!(net["internal"], false, "{net}");
    assert!(
        net["subnet"].as_str().unwrap().starts_with("10.214."),
        "{net}"
    );
    assert_eq!(w.inspect("a")["networks"][0]["network"], "bridge");
    let bridge = net["bridge"].as_str().unwrap().to_owned();
    let id = net["id"].as_str().unwrap().to_owned();
    assert!(link_exists(&bridge) && table_exists(&id));
    w.exec_until("a", "ping -c 1 -W 2 b");
    w.exec_until("b", &format!("ping -c 1 -W 2 {}", outside.far));
    // A microVM on the same network, by default too.
    let a = address_of(&w, "a");
    let out = ok_as_user(
        &w,
        None,
        &[
            "run",
            "--rm",
            "--vm",
            "--name",
            "v",
            "testimg",
            "sh",
            "-c",
            &format!(
                "ip -4 -o addr show eth0; i=0; until ping -c 1 -W 1 {a} >/dev/null; do i=$((i+1)); [ $i -gt 30 ] && exit 9; done; echo reached"
            ),
        ],
    );
    let (subnet_head, _) = net["subnet"].as_str().unwrap().rsplit_once('.').unwrap();
    assert!(out.contains(&format!("inet {subnet_head}.")), "{out}");
    assert!(out.contains("reached"), "{out}");
    // Opting out: --net none, or the environment.
    for (env, args) in [
        (
            None,
            vec![
                "run",
                "--rm",
                "--net",
                "none",
                "testimg",
                "ls",
                "/sys/class/net",
            ],
        ),
        (
            Some("none"),
            vec!["run", "--rm", "testimg", "ls", "/sys/class/net"],
        ),
    ] {
        assert_eq!(ok_as_user(&w, env, &args).trim(), "lo", "{env:?} {args:?}");
    }
    let bad = cela_as_user(&w, Some("nosuch"), &["run", "--rm", "testimg", "true"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no network named nosuch"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // In use, it stays; then it goes like any network, and comes back on the next use.
    w.err(&["network", "rm", "bridge"], "in use by a, b");
    w.ok(&["rm", "-f", "a", "b"]);
    w.ok(&["network", "rm", "bridge"]);
    assert!(!link_exists(&bridge) && !table_exists(&id));
    // The next run makes it again (and a stopped instance's start would too).
    let again = ok_as_user(
        &w,
        None,
        &["run", "--rm", "testimg", "ls", "/sys/class/net"],
    );
    assert!(again.lines().any(|l| l == "eth0"), "{again}");
    w.ok(&["network", "rm", "bridge"]);
}

/// The port guard: frames into a network's bridge must carry the sender's own MAC, so a
/// container that takes another's (it may, with NET_ADMIN) is cut off until it gives it back.
#[test]
fn a_container_that_forges_another_mac_is_cut_off_the_bridge() {
    let w = World::new();
    w.ok(&["network", "create", "--subnet", "10.77.12.0/24", "guarded"]);
    let id = inspect(&w, "guarded")["id"].as_str().unwrap().to_owned();
    w.ok(&[
        "run", "-d", "--name", "honest", "--net", "guarded", "testimg", "sleep", "600",
    ]);
    w.ok(&[
        "run",
        "-d",
        "--name",
        "forger",
        "--net",
        "guarded",
        "--cap-add",
        "NET_ADMIN",
        "testimg",
        "sleep",
        "600",
    ]);
    let mac = |name: &str| {
        w.inspect(name)["networks"][0]["mac"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (victim, own) = (mac("honest"), mac("forger"));
    let guard = host_ok(&["nft", "list", "table", "bridge", &format!("cela_{id}")]);
    assert!(guard.contains(&victim) && guard.contains(&own), "{guard}");
    w.exec_until("forger", "ping -c 1 -W 1 10.77.12.1");
    let forged = w.cela(&[
        "exec",
        "forger",
        "sh",
        "-c",
        &format!("ip link set eth0 address {victim} && ping -c 2 -W 1 10.77.12.1"),
    ]);
    assert!(
        !forged.status.success(),
        "a forged MAC passed the bridge: {}",
        String::from_utf8_lossy(&forged.stdout)
    );
    w.exec_until("honest", "ping -c 1 -W 1 10.77.12.1");
    w.ok(&[
        "exec", "forger", "ip", "link", "set", "eth0", "address", &own,
    ]);
    w.exec_until("forger", "ping -c 1 -W 1 10.77.12.1");
    w.ok(&["rm", "-f", "honest", "forger"]);
    let guard = host_ok(&["nft", "list", "table", "bridge", &format!("cela_{id}")]);
    assert!(
        !guard.contains(&own),
        "the guard kept a removed port: {guard}"
    );
    w.ok(&["network", "rm", "guarded"]);
    assert!(
        !host(&["nft", "list", "table", "bridge", &format!("cela_{id}")])
            .status
            .success()
    );
}
