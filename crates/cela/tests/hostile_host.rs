//! What a hostile image or container can do to the host through cela's own files and commands
//! (issue 10), one test per class, each with several variants:
//!
//! * the data directory is closed to other local users (class 2): an image's setuid-root file
//!   and device node, and a setuid file a container planted in its writable layer, are out of
//!   reach of `nobody`;
//! * the host reads image files beneath the image's root, bounded (class 5): `-u NAME` with an
//!   `/etc/passwd` that is a link to `/dev/zero`, to a host file, a FIFO;
//! * one corrupt record hides nothing (class 8): `ps -a` lists it as unknown, `rm -f` kills and
//!   removes what it can find;
//! * bad input gets one `cela: error:` line and status 125 (class 10).
//!
//! As root.

mod images;
mod world;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use images::*;
use serde_json::Value;
use world::World;

/// A layer built from raw tar headers, for entries the shared fixture does not make (setuid
/// files, device nodes, FIFOs).
fn raw_layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    Layer::gzipped(b.into_inner().unwrap())
}

fn entry(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    link: Option<&str>,
) {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    if kind == tar::EntryType::Char {
        h.set_device_major(1).unwrap();
        h.set_device_minor(11).unwrap(); // /dev/kmsg
    }
    match link {
        Some(target) => b.append_link(&mut h, path, target).unwrap(),
        None => b.append_data(&mut h, path, data).unwrap(),
    }
}

/// Imports `test_image()` with `extra` layered on top as `name`.
fn import_with(w: &World, name: &str, extra: Layer) {
    let mut image = test_image();
    image.layers.push(extra);
    let image = TestImage::new(image.layers, &["sh", "-c", "echo default-cmd"]);
    let layout = w.dir.path().join(format!("layout-{name}"));
    image.write_layout(&layout, "latest");
    w.ok(&["image", "import", layout.to_str().unwrap(), "--name", name]);
}

/// Runs `script` in busybox's sh as `nobody` (uid/gid 65534).
fn as_nobody(script: &str) -> Output {
    Command::new("/bin/busybox")
        .args(["sh", "-c", script])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_data_dir_is_closed_to_other_users() {
    let w = World::new();
    // The test's own directories are open, so only cela's permissions stand in the way.
    for d in [w.dir.path(), &w.data()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    std::fs::write(w.dir.path().join("control"), "readable").unwrap();
    let busybox = std::fs::read("/bin/busybox").unwrap();
    import_with(
        &w,
        "suidimg",
        raw_layer(|b| {
            entry(
                b,
                "bin/suidbox",
                tar::EntryType::Regular,
                0o4755,
                &busybox,
                None,
            );
            entry(b, "dev/", tar::EntryType::Directory, 0o755, &[], None);
            entry(b, "dev/kmsg-node", tar::EntryType::Char, 0o666, &[], None);
        }),
    );
    let id = w.ok(&[
        "run",
        "-d",
        "--name",
        "planter",
        "suidimg",
        "sh",
        "-c",
        "cp /bin/busybox /tmp/planted && chmod 4755 /tmp/planted && sleep 1000",
    ]);
    let id = id.trim().to_owned();
    let upper = w
        .data()
        .join("instances")
        .join(&id)
        .join("upper/tmp/planted");
    let start = Instant::now();
    while !upper.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the container planted nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let layers = w.data().join("images/layers");
    let suid = std::fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("bin/suidbox"))
        .find(|p| p.exists())
        .expect("the image's layer is unpacked");
    let node = suid
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("dev/kmsg-node");
    assert_eq!(
        mode(&suid) & 0o4000,
        0o4000,
        "the layer keeps the image's setuid bit"
    );

    let control = as_nobody(&format!("cat {}/control", w.dir.path().display()));
    assert_eq!(
        text(&control.stdout),
        "readable",
        "nobody cannot even reach the test dir"
    );
    for (what, path, cmd) in [
        ("an image's setuid-root file", &suid, "{} -c id"),
        ("a setuid file the container planted", &upper, "{} id"),
        ("an image's device node", &node, "echo x > {}"),
        ("a layer directory", &layers, "ls {}"),
    ] {
        let out = as_nobody(&cmd.replace("{}", path.to_str().unwrap()));
        assert!(
            !out.status.success(),
            "nobody used {what}: {}",
            text(&out.stdout)
        );
        assert!(
            text(&out.stderr).contains("ermission denied"),
            "{what}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(mode(&w.data()), 0o700, "the data dir");
    for sub in ["images", "instances"] {
        assert_eq!(mode(&w.data().join(sub)), 0o700, "{sub}");
    }
    w.ok(&["rm", "-f", "planter"]);
    w.assert_gone(&id, &[]);
}

#[test]
fn image_files_are_read_beneath_the_image_root_and_bounded() {
    let w = World::new();
    let host_passwd = w.dir.path().join("host-passwd");
    std::fs::write(&host_passwd, "hostonly:x:4242:4242::/:/bin/sh\n").unwrap();
    let cases: [(&str, Layer, &str); 4] = [
        (
            "zero",
            raw_layer(|b| {
                entry(
                    b,
                    "etc/passwd",
                    tar::EntryType::Symlink,
                    0o777,
                    &[],
                    Some("/dev/zero"),
                )
            }),
            "no user www",
        ),
        (
            "hostfile",
            raw_layer(|b| {
                let target = format!("../../../../..{}", host_passwd.display());
                entry(
                    b,
                    "etc/passwd",
                    tar::EntryType::Symlink,
                    0o777,
                    &[],
                    Some(&target),
                )
            }),
            "no user www",
        ),
        (
            "fifo",
            raw_layer(|b| entry(b, "etc/passwd", tar::EntryType::Fifo, 0o644, &[], None)),
            "not a regular file",
        ),
        (
            "etcroot",
            raw_layer(|b| {
                entry(b, "etc/passwd", tar::EntryType::Regular, 0o644, b"", None);
                entry(b, "etc", tar::EntryType::Symlink, 0o777, &[], Some("/"))
            }),
            "no user www",
        ),
    ];
    for (name, layer, why) in cases {
        import_with(&w, name, layer);
        let start = Instant::now();
        for user in ["www", "hostonly"] {
            let out = w.cela(&["run", "--rm", "-u", user, name, "id"]);
            assert_eq!(
                out.status.code(),
                Some(125),
                "{name} -u {user}: {}",
                text(&out.stdout)
            );
            let err = text(&out.stderr);
            assert_eq!(err.lines().count(), 1, "{name}: {err}");
            let want = why.replace("www", user);
            assert!(
                err.contains(&want),
                "{name} -u {user} (a host file read?): {err}"
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{name}: took {:?}",
            start.elapsed()
        );
    }

    // A running container turns its /etc/passwd into a link to /dev/zero, then `cela exec -u`.
    let id = w.ok(&[
        "run",
        "-d",
        "--name",
        "swapper",
        "testimg",
        "sh",
        "-c",
        "rm /etc/passwd && ln -s /dev/zero /etc/passwd && touch /tmp/done && sleep 1000",
    ]);
    let start = Instant::now();
    while !w
        .cela(&["exec", "swapper", "test", "-e", "/tmp/done"])
        .status
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the container never swapped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = w.cela(&["exec", "-u", "www", "swapper", "id"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("no user www"),
        "{}",
        text(&out.stderr)
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    // Then a device node in its place (root in the container has CAP_MKNOD): the host looks
    // at what it is and never opens it (opening a device can act, as a watchdog arms).
    w.ok(&[
        "exec",
        "swapper",
        "sh",
        "-c",
        "rm /etc/passwd && mknod /etc/passwd c 1 7",
    ]);
    let out = w.cela(&["exec", "-u", "www", "swapper", "id"]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("/etc/passwd is not a regular file (it is a character device)"),
        "{}",
        text(&out.stderr)
    );
    w.ok(&["rm", "-f", "swapper"]);
    w.assert_gone(id.trim(), &[]);
}

fn inspect(w: &World, name: &str) -> Value {
    w.inspect(name)
}

#[test]
fn a_corrupt_record_is_listed_as_unknown_and_rm_f_removes_what_runs() {
    let w = World::new();
    // A corrupt state.json of a running container.
    let id = w.ok(&[
        "run", "-d", "--name", "badstate", "testimg", "sleep", "1000",
    ]);
    let id = id.trim().to_owned();
    let v = inspect(&w, "badstate");
    let (init, supervisor) = (
        v["state"]["pid"].as_i64().unwrap(),
        v["state"]["supervisor"]["pid"].as_i64().unwrap(),
    );
    let dir = w.data().join("instances").join(&id);
    std::fs::write(dir.join("state.json"), b"{\"status\": ").unwrap();
    // A corrupt config.json of another running one.
    // It forks on and on: rm -f must not be outrun (its children are re-parented to the
    // container's init, and new ones keep coming).
    let id2 = w.ok(&[
        "run",
        "-d",
        "--name",
        "badconfig",
        "testimg",
        "sh",
        "-c",
        "while :; do (sleep 1000 &); usleep 20000; done",
    ]);
    let id2 = id2.trim().to_owned();
    let v2 = inspect(&w, "badconfig");
    let (init2, supervisor2) = (
        v2["state"]["pid"].as_i64().unwrap(),
        v2["state"]["supervisor"]["pid"].as_i64().unwrap(),
    );
    let dir2 = w.data().join("instances").join(&id2);
    std::fs::write(dir2.join("config.json"), b"\x00garbage").unwrap();
    w.ok(&["run", "-d", "--name", "healthy", "testimg", "sleep", "1000"]);

    let ps: Value = serde_json::from_str(&w.ok(&["ps", "-a", "--format", "json"])).unwrap();
    let status = |id: &str| {
        ps.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .map(|r| (r["status"].as_str().unwrap().to_owned(), r["error"].clone()))
            .unwrap_or_else(|| panic!("{id} not listed: {ps}"))
    };
    assert_eq!(status(&id).0, "unknown");
    assert!(status(&id).1.as_str().unwrap().contains("state.json"));
    assert_eq!(status(&id2).0, "unknown");
    assert!(status(&id2).1.as_str().unwrap().contains("config.json"));
    assert!(
        ps.as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "healthy" && r["status"] == "running")
    );
    let table = w.ok(&["ps", "-a"]);
    assert!(
        table.contains(&id) && table.contains(&id2) && table.contains("healthy"),
        "{table}"
    );

    // While records cannot be read, no image is removed: any might be theirs.
    import_with(&w, "spare", raw_layer(|_| {}));
    let out = w.cela(&["image", "rm", "spare"]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot tell whether instances use it") && err.contains(&id2),
        "{err}"
    );
    assert!(w.ok(&["image", "ls"]).contains("spare"));

    // Without -f, refused; with it, what runs is killed and nothing is left.
    for key in [&id, &id2] {
        let out = w.cela(&["rm", key]);
        assert_eq!(
            out.status.code(),
            Some(125),
            "rm {key}: {}",
            text(&out.stderr)
        );
    }
    w.ok(&["rm", "-f", "badstate"]);
    w.assert_gone(&id, &[init, supervisor]);
    w.ok(&["rm", "-f", &id2[..8]]);
    w.assert_gone(&id2, &[init2, supervisor2]);
    w.ok(&["rm", "-f", "healthy"]);
    w.ok(&["image", "rm", "spare"]);
}

#[test]
fn bad_input_is_one_line_and_status_125_and_leaves_nothing() {
    let w = World::new();
    let one_line = |args: &[&str], needle: &str| {
        let out = w.cela(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("cela: error: ") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("ERROR"),
            "{args:?}: a library's log line leaked: {err}"
        );
    };
    one_line(&["--bogus"], "--bogus");
    one_line(&["run", "--no-such-flag", "testimg"], "--no-such-flag");
    one_line(&["ps", "--format", "xml"], "xml");
    one_line(
        &[
            "run",
            "--rm",
            "--memory",
            "99999999999999999",
            "testimg",
            "true",
        ],
        "--memory",
    );
    one_line(
        &["run", "--rm", "--memory", "1", "testimg", "true"],
        "--memory",
    );
    for dest in ["/proc", "/sys/fs/cgroup", "/", "/dev"] {
        one_line(
            &[
                "run",
                "--rm",
                "-v",
                &format!("/tmp:{dest}"),
                "testimg",
                "true",
            ],
            "destination",
        );
    }
    // A supervisor id that is a path writes nothing outside the data dir.
    let outside = w.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    one_line(&["__supervise", "../../outside"], "not an instance id");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    // A container whose program does not exist: one message, no repeated causes.
    let out = w.cela(&["run", "--rm", "testimg", "/no/such/program"]);
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(!err.contains("ERROR"), "{err}");
    for line in err.lines() {
        let parts: Vec<&str> = line.split(": ").collect();
        for p in &parts {
            assert!(
                p.len() < 8 || line.matches(p).count() == 1,
                "a cause repeats in: {line}"
            );
        }
    }
    assert_eq!(w.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");
}

#[test]
fn an_image_an_instance_uses_is_not_removed_from_under_it() {
    let w = World::new();
    let id = w.ok(&["run", "-d", "--name", "user", "testimg", "sleep", "1000"]);
    let id = id.trim().to_owned();
    let layers_before = std::fs::read_dir(w.data().join("images/layers"))
        .unwrap()
        .count();
    let out = w.cela(&["image", "rm", "testimg"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("used by instance user") && err.contains("--force"),
        "{err}"
    );
    // Forced: the name goes, the image and its layers stay for the running container.
    w.ok(&["image", "rm", "--force", "testimg"]);
    let images: Value = serde_json::from_str(&w.ok(&["image", "ls", "--format", "json"])).unwrap();
    assert_eq!(images.as_array().unwrap().len(), 1, "{images}");
    assert_eq!(images[0]["names"], serde_json::json!([]), "{images}");
    assert_eq!(
        std::fs::read_dir(w.data().join("images/layers"))
            .unwrap()
            .count(),
        layers_before
    );
    assert!(w.ok(&["exec", "user", "ls", "/bin"]).contains("busybox"));
    // Stopped and started again, it still has its image.
    w.ok(&["stop", "-t", "0", "user"]);
    w.ok(&["start", "user"]);
    assert!(
        w.ok(&["exec", "user", "cat", "/etc/greeting"])
            .contains("the-test-image")
    );
    // By digest, still refused while the instance exists; gone once it is.
    let digest = images[0]["digest"].as_str().unwrap().to_owned();
    assert_eq!(w.cela(&["image", "rm", &digest]).status.code(), Some(125));
    w.ok(&["rm", "-f", "user"]);
    w.assert_gone(&id, &[]);
    w.ok(&["image", "rm", &digest]);
    assert_eq!(
        std::fs::read_dir(w.data().join("images/layers"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(w.ok(&["image", "ls", "--format", "json"]).trim(), "[]");
}
