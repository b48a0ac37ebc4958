//! Instances on this host: an image the test builds (busybox-static, an /etc/passwd, a
//! greeting) run as a container and, through the QEMU fallback engine, as a microVM (the nested
//! lab runs the KVM engine in vm_lab.rs); the image's config honoured; the detached lifecycle
//! (run -d, ps, logs, exec, stop, start, rm), a supervisor killed with SIGKILL, bad input,
//! `--net none|host|auto` (loopback only, the host's namespace, a veth or TAP link pinged both
//! ways), and nothing left behind (no mounts, veths or addresses either). As root.

mod images;
mod world;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use world::{World, host_ok};

/// `readlink /proc/self/ns/net` of this process: `net:[INODE]`.
fn host_netns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .unwrap()
        .display()
        .to_string()
}

/// The interface index of host interface `name`, if there is one.
fn ifindex(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The address part of `A.B.C.D/P`.
fn addr(cidr: &Value) -> String {
    cidr.as_str().unwrap().split('/').next().unwrap().to_owned()
}

#[test]
fn the_same_image_gives_the_same_output_as_a_container_and_as_a_vm() {
    let w = World::new();
    let script = "echo hello from $(cat /etc/greeting); echo $GREETING; exit 5";
    let mut outputs = Vec::new();
    for vm in [false, true] {
        let mut args = vec!["run", "--rm", "-e", "GREETING=hi-there"];
        if vm {
            args.push("--vm");
        }
        args.extend(["testimg", "sh", "-c", script]);
        let out = w.cela(&args);
        assert_eq!(
            out.status.code(),
            Some(5),
            "vm={vm}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    assert_eq!(outputs[0], "hello from the-test-image\nhi-there\n");
    assert_eq!(outputs[0], outputs[1], "container and VM output differ");
    // --rm: nothing listed afterwards.
    let ps: Value = serde_json::from_str(&w.ok(&["ps", "-a", "--format", "json"])).unwrap();
    assert_eq!(ps, Value::Array(vec![]), "--rm left instances");
}

#[test]
fn the_image_config_and_the_flags_are_honoured() {
    let w = World::new();
    // The image's own command when none is given.
    assert_eq!(w.ok(&["run", "--rm", "testimg"]), "default-cmd\n");
    // -w, -u by name (uid/gid from the image's passwd), -e over the image's env; the hostname
    // (the instance's name) in a container. In a microVM cela-init resolves the user in the
    // image's own /etc/passwd.
    for vm in [false, true] {
        let mut args = vec!["run", "--rm", "--name", "cfg"];
        if vm {
            args.push("--vm");
        }
        let script = if vm {
            "pwd; id -u; id -g; echo $PATH"
        } else {
            "pwd; id -u; id -g; echo $PATH; hostname"
        };
        args.extend([
            "-w",
            "/srv",
            "-u",
            "www",
            "-e",
            "PATH=/bin:/sbin",
            "testimg",
        ]);
        args.extend(["sh", "-c", script]);
        let expected = if vm {
            "/srv\n33\n34\n/bin:/sbin\n"
        } else {
            "/srv\n33\n34\n/bin:/sbin\ncfg\n"
        };
        assert_eq!(w.ok(&args), expected, "vm={vm}");
    }
    // -v: a host directory inside, read-only with :ro.
    let host = w.dir.path().join("shared");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("f"), "from-host\n").unwrap();
    let vol = format!("{}:/mnt/shared:ro", host.display());
    let out = w.cela(&[
        "run",
        "--rm",
        "-v",
        &vol,
        "testimg",
        "sh",
        "-c",
        "cat /mnt/shared/f; (echo x > /mnt/shared/g) 2>/dev/null; echo write=$?",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-host\nwrite=1\n");
    assert!(!host.join("g").exists());
}

#[test]
fn detached_container_lifecycle() {
    let w = World::new();
    let id = w.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "testimg",
        "sh",
        "-c",
        "echo started; echo to-stderr >&2; exec sleep 600",
    ]);
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 12, "run -d prints the id: {id}");
    assert_eq!(w.status("web"), "running");
    let ps = w.ok(&["ps"]);
    assert!(
        ps.lines()
            .any(|l| l.contains("web") && l.contains("running")),
        "{ps}"
    );
    // Logs keep stdout and stderr apart.
    let start = Instant::now();
    loop {
        let out = w.cela(&["logs", "web"]);
        if String::from_utf8_lossy(&out.stdout) == "started\n"
            && String::from_utf8_lossy(&out.stderr) == "to-stderr\n"
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "logs: {out:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = w.cela(&[
        "exec",
        "web",
        "sh",
        "-c",
        "echo in-exec; cat /etc/greeting; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "in-exec\nthe-test-image\n"
    );
    // A second instance with the same name, rm without -f: refused.
    w.err(
        &["run", "--name", "web", "testimg", "true"],
        "exists already",
    );
    w.err(&["rm", "web"], "is running");
    let pid = w.inspect("web")["pid"].as_i64().unwrap();
    // `exec sleep` is the container's init: SIGTERM is ignored by a pid-1 without a handler,
    // so stop kills after its timeout.
    w.ok(&["stop", "-t", "1", "web"]);
    let v = w.inspect("web");
    assert_eq!(v["status"], "exited");
    assert_eq!(v["exit_code"], 137);
    w.err(&["exec", "web", "true"], "exec needs a running instance");
    // start runs it again.
    w.ok(&["start", "web"]);
    assert_eq!(w.status("web"), "running");
    let out = w.ok(&["logs", "web"]);
    assert!(out.starts_with("started\n"), "{out}");
    let pid2 = w.inspect("web")["pid"].as_i64().unwrap();
    assert_ne!(pid, pid2);
    w.ok(&["rm", "-f", "web"]);
    w.assert_gone(&id, &[pid, pid2]);
    w.err(&["logs", "web"], "no such instance");
}

#[test]
fn commit_makes_an_image_of_a_containers_changes() {
    let w = World::new();
    let images = || w.ok(&["image", "ls", "--format", "json"]);
    // An ended container: a file written, one of the image's deleted, a directory made.
    w.ok(&[
        "run",
        "--name",
        "c1",
        "-e",
        "MADE=yes",
        "testimg",
        "sh",
        "-c",
        "echo hello > /hello; rm /etc/greeting; mkdir -p /data; echo d > /data/f",
    ]);
    let digest = w.ok(&[
        "commit",
        "-m",
        "first",
        "-a",
        "tester",
        "-c",
        "WORKDIR /data",
        "c1",
        "mine:1",
    ]);
    assert!(digest.trim().starts_with("sha256:"), "{digest}");
    let out = w.ok(&[
        "run",
        "--rm",
        "mine:1",
        "sh",
        "-c",
        "cat /hello; test -e /etc/greeting || echo gone; pwd; echo $MADE; cat f",
    ]);
    assert_eq!(out, "hello\ngone\n/data\nyes\nd\n");
    let listed: Value = serde_json::from_str(&images()).unwrap();
    let mine = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["names"][0] == "docker.io/library/mine:1")
        .unwrap_or_else(|| panic!("mine:1 is not listed: {listed}"));
    assert_eq!(mine["digest"], digest.trim());
    assert_eq!(
        mine["source"].as_str().unwrap().split(' ').next(),
        Some("commit")
    );

    // A running container is frozen while committed, and runs on after.
    w.ok(&[
        "run",
        "-d",
        "--name",
        "c2",
        "testimg",
        "sh",
        "-c",
        "echo live > /live; exec sleep 600",
    ]);
    let start = Instant::now();
    while !w
        .cela(&["exec", "c2", "test", "-e", "/live"])
        .status
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "/live never came"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    w.ok(&["commit", "c2", "mine:2"]);
    assert_eq!(w.status("c2"), "running");
    assert_eq!(w.ok(&["exec", "c2", "echo", "thawed"]), "thawed\n");
    assert_eq!(w.ok(&["run", "--rm", "mine:2", "cat", "/live"]), "live\n");

    // Bad input: one line naming the problem, nothing stored.
    let before = images();
    w.err(
        &["commit", "-c", "RUN true", "c1", "mine:3"],
        "not an instruction",
    );
    w.err(&["commit", "c1", "Bad Name"], "malformed image reference");
    w.err(&["commit", "nosuch", "mine:3"], "no such instance");
    assert_eq!(images(), before);
    w.ok(&["rm", "-f", "c1", "c2"]);
    w.ok(&["image", "rm", "mine:1", "mine:2"]);
}

#[test]
fn a_killed_supervisor_shows_as_crashed_and_rm_cleans_up() {
    let w = World::new();
    let id = w.ok(&["run", "-d", "--name", "victim", "testimg", "sleep", "600"]);
    let id = id.trim().to_owned();
    let v = w.inspect("victim");
    let supervisor = v["state"]["supervisor"]["pid"].as_i64().unwrap();
    let pid = v["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    w.wait_status("victim", "crashed");
    let ps = w.ok(&["ps", "-a"]);
    assert!(
        ps.lines()
            .any(|l| l.contains("victim") && l.contains("crashed")),
        "{ps}"
    );
    w.ok(&["rm", "victim"]);
    w.assert_gone(&id, &[supervisor, pid]);
}

#[test]
fn detached_vm_lifecycle() {
    let w = World::new();
    let id = w.ok(&[
        "run",
        "-d",
        "--vm",
        "--name",
        "vm1",
        "testimg",
        "sh",
        "-c",
        "echo vm-started; sleep 600",
    ]);
    let id = id.trim().to_owned();
    let start = Instant::now();
    while !w.ok(&["logs", "vm1"]).contains("vm-started") {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the VM never printed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = w.inspect("vm1");
    assert_eq!(
        (v["status"].as_str(), v["kind"].as_str()),
        (Some("running"), Some("vm"))
    );
    // exec goes through the guest agent on vsock: the QEMU fallback has no vsock here.
    w.err(&["exec", "vm1", "true"], "needs cela's KVM engine");
    let supervisor = v["state"]["supervisor"]["pid"].as_i64().unwrap();
    w.ok(&["stop", "-t", "20", "vm1"]);
    assert_eq!(w.status("vm1"), "exited");
    w.ok(&["rm", "vm1"]);
    w.assert_gone(&id, &[supervisor]);
}

#[test]
fn bad_input_is_refused_clearly() {
    let w = World::new();
    w.err(
        &["run", "no-such-image"],
        "no image no-such-image in the store",
    );
    for (args, needle) in [
        (
            &["run", "--name", "bad name", "testimg", "true"][..],
            "not a valid instance name",
        ),
        (
            &["run", "-v", "relative:/x", "testimg", "true"],
            "both paths must be absolute",
        ),
        (
            &["run", "-v", "/nonexistent-dir:/x", "testimg", "true"],
            "does not exist",
        ),
        (
            &["run", "--vm", "-v", "/tmp:/x", "testimg", "true"],
            "not supported for --vm",
        ),
        (
            &["run", "-u", "nobody", "testimg", "true"],
            "no user nobody",
        ),
        (&["logs", "nothing-here"], "no such instance"),
        (&["rm", "nothing-here"], "no such instance"),
        (
            &["run", "--disk", "/tmp/x", "testimg", "true"],
            "--disk is not supported with an IMAGE",
        ),
        (
            &["run", "--net", "bogus", "testimg", "true"],
            "no network named bogus",
        ),
        (
            &["run", "--vm", "--net", "host", "testimg", "true"],
            "--net host is for containers",
        ),
    ] {
        w.err(args, needle);
    }
    // No instance is left by any of them.
    let ps: Value = serde_json::from_str(&w.ok(&["ps", "-a", "--format", "json"])).unwrap();
    assert_eq!(ps, Value::Array(vec![]), "bad input left instances");
}

#[test]
fn a_reader_that_goes_away_ends_cela_quietly() {
    // `cela ps | head -1`, `cela image ls | grep -q x`: the pipe's reader is gone before
    // cela writes its table.
    let w = World::new();
    for args in [&["ps", "-a"][..], &["image", "ls"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cela"))
            .args(args)
            .env("CELA_DATA_DIR", w.data())
            .env(images::DEFAULT_NETWORK.0, images::DEFAULT_NETWORK.1)
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} said something: {err}");
    }
}

#[test]
fn container_networks_none_and_host() {
    let w = World::new();
    let script = "ip -o link; readlink /proc/self/ns/net";
    for net in [None, Some("none")] {
        let mut args = vec!["run", "--rm"];
        if let Some(n) = net {
            args.extend(["--net", n]);
        }
        args.extend(["testimg", "sh", "-c", script]);
        let out = w.ok(&args);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "--net {net:?}: only lo: {out}");
        assert!(
            lines[0].starts_with("1: lo: <LOOPBACK,UP"),
            "--net {net:?}: lo is up: {out}"
        );
        assert_ne!(
            lines[1],
            host_netns(),
            "--net {net:?}: a namespace of its own"
        );
    }
    // host: the host's namespace, so the interface of its default route too.
    let out = w.ok(&[
        "run", "--rm", "--net", "host", "testimg", "sh", "-c", script,
    ]);
    assert_eq!(out.lines().last(), Some(host_netns().as_str()), "{out}");
    let routes = std::fs::read_to_string("/proc/net/route").unwrap();
    if let Some(default) = routes
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("00000000"))
    {
        let iface = default.split_whitespace().next().unwrap();
        assert!(out.contains(&format!(": {iface}:")), "{iface} in {out}");
    }
}

#[test]
fn container_net_auto_links_the_container_and_the_host() {
    let w = World::new();
    let id = w.ok(&[
        "run",
        "-d",
        "--name",
        "netc",
        "--net",
        "auto",
        "testimg",
        "sh",
        "-c",
        "nc -l -p 7000 -e sh -c 'read l; echo got-$l' & exec sleep 600",
    ]);
    let id = id.trim().to_owned();
    let v = w.inspect("netc");
    assert_eq!(v["config"]["net"], "auto");
    let net = &v["network"];
    assert_eq!(net["mode"], "auto", "{v}");
    let iface = net["interface"].as_str().unwrap().to_owned();
    assert!(iface.starts_with("cela"), "{net}");
    let (host, guest) = (addr(&net["host_address"]), addr(&net["address"]));
    assert!(
        host.starts_with("10.213.") && guest.starts_with("10.213."),
        "{net}"
    );
    assert!(net["address"].as_str().unwrap().ends_with("/30"), "{net}");
    let index = v["state"]["network"]["ifindex"].as_u64().unwrap();
    assert_eq!(ifindex(&iface), Some(index));
    // The host's end has the first address, the container's eth0 the second and a default
    // route through the host.
    let shown = host_ok(&["ip", "-4", "-o", "addr", "show", "dev", &iface]);
    assert!(shown.contains(&format!("inet {host}/30")), "{shown}");
    let inside = w.ok(&[
        "exec",
        "netc",
        "sh",
        "-c",
        "ip -4 -o addr show dev eth0; ip route",
    ]);
    assert!(inside.contains(&format!("inet {guest}/30")), "{inside}");
    assert!(
        inside.contains(&format!("default via {host} dev eth0")),
        "{inside}"
    );
    // Ping both ways.
    host_ok(&["busybox", "ping", "-c", "1", "-W", "2", &guest]);
    w.ok(&["exec", "netc", "ping", "-c", "1", "-W", "2", &host]);
    // A TCP round trip to the container's nc (bounded wait for it to listen).
    let start = Instant::now();
    let reply = loop {
        use std::io::{Read, Write};
        let attempt = std::net::TcpStream::connect((guest.as_str(), 7000)).and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            c.write_all(b"hello\n")?;
            let mut s = String::new();
            c.read_to_string(&mut s)?;
            Ok(s)
        });
        match attempt {
            Ok(s) => break s,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(20), "connect: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(reply, "got-hello\n");
    let pid = v["pid"].as_i64().unwrap();
    w.ok(&["rm", "-f", "netc"]);
    w.assert_gone(&id, &[pid]);
    assert_ne!(ifindex(&iface), Some(index), "{iface} left behind");
}

#[test]
fn a_killed_supervisor_leaves_its_veth_and_namespace_to_rm() {
    let w = World::new();
    let id = w.ok(&[
        "run", "-d", "--name", "netk", "--net", "auto", "testimg", "sleep", "600",
    ]);
    let id = id.trim().to_owned();
    let v = w.inspect("netk");
    let iface = v["network"]["interface"].as_str().unwrap().to_owned();
    let index = v["state"]["network"]["ifindex"].as_u64().unwrap();
    let supervisor = v["state"]["supervisor"]["pid"].as_i64().unwrap();
    let pid = v["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    w.wait_status("netk", "crashed");
    assert_eq!(
        ifindex(&iface),
        Some(index),
        "the veth outlives the supervisor"
    );
    w.ok(&["rm", "netk"]);
    w.assert_gone(&id, &[supervisor, pid]);
    assert_ne!(ifindex(&iface), Some(index), "{iface} left behind");
}

#[test]
fn a_vm_with_net_auto_has_its_address_and_reaches_the_host() {
    let w = World::new();
    let out = w.ok(&[
        "run",
        "--rm",
        "--vm",
        "--net",
        "auto",
        "testimg",
        "sh",
        "-c",
        "ip -4 -o addr show dev eth0; gw=$(ip route | awk '/^default/ {print $3}'); \
         ping -c 1 -W 5 $gw > /dev/null && echo ping-ok",
    ]);
    let inet = out
        .split_whitespace()
        .skip_while(|t| *t != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no inet address: {out}"))
        .to_owned();
    assert!(
        inet.starts_with("10.213.") && inet.ends_with("/30"),
        "{out}"
    );
    assert!(out.contains("ping-ok"), "{out}");
    // The host's end (the /30's first address) went with the VM.
    let guest: std::net::Ipv4Addr = inet.split('/').next().unwrap().parse().unwrap();
    let host = std::net::Ipv4Addr::from(u32::from(guest) - 1);
    let addrs = host_ok(&["ip", "-4", "-o", "addr"]);
    assert!(!addrs.contains(&format!("inet {host}/")), "{addrs}");
}

/// `cela logs -f` ends once nobody reads its output (`| head -1`), as `docker logs -f` does;
/// the instance runs on.
#[test]
fn logs_follow_ends_when_its_reader_goes() {
    use std::io::BufRead;
    let w = World::new();
    w.ok(&[
        "run",
        "-d",
        "--name",
        "chatty",
        "testimg",
        "sh",
        "-c",
        "while :; do echo tick; sleep 0.05; done",
    ]);
    let mut follower = Command::new(env!("CARGO_BIN_EXE_cela"))
        .args(["logs", "-f", "chatty"])
        .env("CELA_DATA_DIR", w.data())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(follower.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "tick\n");
    // The reader is gone (dropped above): the follower's next write fails and it ends.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = follower.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = follower.kill();
            panic!("cela logs -f went on following with nobody reading");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(w.status("chatty"), "running");
    w.ok(&["rm", "-f", "chatty"]);
}
