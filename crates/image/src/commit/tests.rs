//! Commit tests: the config a container's settings and `--change` make, and the layer an
//! upper directory — with OverlayFS markers and hostile entries — is written as, read back
//! through the store's own unpacking.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

use super::*;
use crate::Digest;

fn run_config() -> Map<String, Value> {
    let v = json!({
        "Entrypoint": ["/entry"],
        "Cmd": ["serve"],
        "Env": ["PATH=/bin", "A=1"],
        "WorkingDir": "/srv",
    });
    v.as_object().unwrap().clone()
}

#[test]
fn the_containers_command_keeps_the_entrypoint_it_starts_with() {
    let mut run = run_config();
    apply_settings(
        &mut run,
        &ContainerSettings {
            command: vec!["/entry".into(), "debug".into()],
            env: vec!["PATH=/bin".into(), "A=1".into(), "A=2".into(), "B=3".into()],
            ..Default::default()
        },
    );
    assert_eq!(run["Entrypoint"], json!(["/entry"]));
    assert_eq!(run["Cmd"], json!(["debug"]));
    assert_eq!(run["Env"], json!(["PATH=/bin", "A=2", "B=3"]));

    let mut run = run_config();
    apply_settings(
        &mut run,
        &ContainerSettings {
            command: vec!["sh".into(), "-c".into(), "true".into()],
            ..Default::default()
        },
    );
    assert_eq!(run["Entrypoint"], Value::Null);
    assert_eq!(run["Cmd"], json!(["sh", "-c", "true"]));
}

#[test]
fn changes_are_applied_as_a_dockerfile_would() {
    let mut run = run_config();
    for line in [
        "CMD [\"/bin/app\", \"--x\"]",
        "env GREETING=\"hello world\" A=9",
        "ENV OLD old style value",
        "LABEL org.example=\"a b\" v=1",
        "EXPOSE 80 53/udp",
        "WORKDIR data",
        "USER 1000:1000",
        "VOLUME [\"/v\"]",
        "STOPSIGNAL SIGINT",
    ] {
        apply_change(&mut run, line).unwrap_or_else(|e| panic!("{line}: {e}"));
    }
    assert_eq!(run["Cmd"], json!(["/bin/app", "--x"]));
    assert_eq!(
        run["Env"],
        json!([
            "PATH=/bin",
            "A=9",
            "GREETING=hello world",
            "OLD=old style value"
        ])
    );
    assert_eq!(run["Labels"], json!({"org.example": "a b", "v": "1"}));
    assert_eq!(run["ExposedPorts"], json!({"80/tcp": {}, "53/udp": {}}));
    assert_eq!(run["WorkingDir"], json!("/srv/data"));
    assert_eq!(run["User"], json!("1000:1000"));
    assert_eq!(run["Volumes"], json!({"/v": {}}));
    assert_eq!(run["StopSignal"], json!("SIGINT"));

    apply_change(&mut run, "ENTRYPOINT exec /bin/app").unwrap();
    assert_eq!(run["Entrypoint"], json!(["/bin/sh", "-c", "exec /bin/app"]));
    assert_eq!(run["Cmd"], Value::Null);
}

#[test]
fn variables_in_changes_are_the_environment_before_the_instruction() {
    let mut run = run_config();
    for line in [
        "ENV APP=/opt/app PORT=8080",
        // Each pair sees the environment before the instruction, as in a Dockerfile.
        "ENV APP=/srv DATA=$APP/data",
        "WORKDIR ${APP}/work",
        "EXPOSE $PORT ${UDP:-53}/udp",
        "LABEL where=\"$DATA\" literal='$DATA' escaped=\\$DATA none=${NOPE:+x} both=${PORT:+set}",
        "USER ${RUNAS:-1000}",
        "VOLUME $DATA $UNSET",
        "STOPSIGNAL SIG$NOPE${SIG:-TERM}",
        "CMD echo $APP",
    ] {
        apply_change(&mut run, line).unwrap_or_else(|e| panic!("{line}: {e}"));
    }
    assert!(
        run["Env"]
            .as_array()
            .unwrap()
            .contains(&json!("DATA=/opt/app/data")),
        "{}",
        run["Env"]
    );
    assert_eq!(run["WorkingDir"], json!("/srv/work"));
    assert_eq!(run["ExposedPorts"], json!({"8080/tcp": {}, "53/udp": {}}));
    assert_eq!(
        run["Labels"],
        json!({"where": "/opt/app/data", "literal": "$DATA", "escaped": "$DATA", "none": "", "both": "set"})
    );
    assert_eq!(run["User"], json!("1000"));
    assert_eq!(run["Volumes"], json!({"/opt/app/data": {}}));
    assert_eq!(run["StopSignal"], json!("SIGTERM"));
    // A shell-form command is left to the shell.
    assert_eq!(run["Cmd"], json!(["/bin/sh", "-c", "echo $APP"]));
    for (line, says) in [
        ("ENV A=${B", "is not closed"),
        ("ENV A=${}", "without a variable name"),
        ("ENV A=${B#x}", "a } or :- or :+ was expected"),
        ("ENV A=${B:=x}", "only :- and :+"),
    ] {
        let e = apply_change(&mut run_config(), line)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{line}: {e}");
    }
    let deep = format!("ENV A={}x{}", "${B:-".repeat(40), "}".repeat(40));
    let e = apply_change(&mut run_config(), &deep)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nest deeper"), "{e}");
}

#[test]
fn a_bad_change_is_refused_naming_it() {
    for (line, says) in [
        ("RUN rm -rf /", "not an instruction commit takes"),
        ("FROM scratch", "not an instruction commit takes"),
        ("CMD [\"unclosed\"", "not a JSON array"),
        ("CMD", "needs a command"),
        ("ENV A=\"open", "quote is not closed"),
        ("ENV =v", "key is missing"),
        ("EXPOSE 99999", "is not PORT"),
        ("EXPOSE 80/icmp", "is not PORT"),
        ("USER a b", "takes one value"),
        ("LABEL", "key is missing"),
    ] {
        let e = apply_change(&mut run_config(), line)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{line}: {e}");
        assert!(e.contains("--change"), "{line}: {e}");
    }
}

#[test]
fn pax_records_count_their_own_length() {
    let r = pax_records(&[("security.capability".into(), vec![1, 2, 3])]);
    let text = String::from_utf8_lossy(&r);
    let (len, _) = text.split_once(' ').unwrap();
    assert_eq!(len.parse::<usize>().unwrap(), r.len());
    // 9 bytes of body + 1 digit would be 10, which has 2 digits: the length settles at 12.
    let r = pax_records(&[("a".into(), vec![])]);
    assert_eq!(
        r.len().to_string().len() + 1 + "SCHILY.xattr.a=\n".len(),
        r.len()
    );
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A base image: one layer with /bin/sh, /etc/motd, /etc/keep/a, /var/log/old.
fn base_image(dir: &Path, store: &Store) -> ImageRecord {
    let tar_path = dir.join("base.tar");
    let mut b = tar::Builder::new(fs::File::create(&tar_path).unwrap());
    for (path, data) in [
        ("bin/sh", &b"#!shell"[..]),
        ("etc/motd", b"welcome"),
        ("etc/keep/a", b"a"),
        ("var/log/old", b"old"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    }
    b.finish().unwrap();
    drop(b);
    let recs = crate::import(store, &tar_path, Some("base:1"), &Progress::hidden()).unwrap();
    recs.into_iter().next().unwrap()
}

#[test]
fn an_upper_directory_commits_to_an_image_whose_layers_read_back() {
    assert!(
        is_root(),
        "this test needs root (whiteout device nodes and trusted.* xattrs)"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    let base = base_image(dir.path(), &store);
    let upper = dir.path().join("upper");
    fs::create_dir_all(upper.join("etc/keep")).unwrap();
    fs::create_dir_all(upper.join("app")).unwrap();
    fs::write(upper.join("app/greeting"), b"hello\n").unwrap();
    fs::set_permissions(
        upper.join("app/greeting"),
        fs::Permissions::from_mode(0o4750),
    )
    .unwrap();
    fs::hard_link(upper.join("app/greeting"), upper.join("app/again")).unwrap();
    // A link to a host secret is written as a link, never followed.
    symlink("/etc/shadow", upper.join("app/secret")).unwrap();
    // A deleted /etc/motd, and /etc/keep made opaque (its old content hidden).
    nix::sys::stat::mknod(
        &upper.join("etc/motd"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    rustix::fs::setxattr(
        upper.join("etc/keep"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::write(upper.join("etc/keep/b"), b"b").unwrap();
    rustix::fs::setxattr(
        upper.join("app/greeting"),
        "user.note",
        b"kept",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    // A mount point the runtime made: left out.
    fs::write(upper.join("etc/resolv.conf"), b"").unwrap();
    nix::unistd::mkfifo(
        &upper.join("app/pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let sock = std::os::unix::net::UnixListener::bind(upper.join("app/sock")).unwrap();

    let req = CommitRequest {
        base: "base:1".into(),
        upper: upper.clone(),
        mount_points: vec!["etc/resolv.conf".into()],
        name: Some("committed:1".into()),
        settings: ContainerSettings {
            command: vec!["/bin/sh".into(), "-c".into(), "cat /app/greeting".into()],
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        },
        changes: vec!["LABEL made=by-test".into()],
        comment: Some("a test".into()),
        author: Some("cela".into()),
    };
    let rec = commit(&store, &req, &Progress::hidden()).unwrap();
    drop(sock);
    assert_eq!(rec.names, vec!["docker.io/library/committed:1"]);
    assert_eq!(rec.layers.len(), 2);
    assert_eq!(rec.layers[0], base.layers[0]);
    assert_eq!(rec.layers[1].media_type, LAYER_MEDIA_TYPE);

    let cfg: Value = serde_json::from_slice(&store.read_blob(&rec.config).unwrap()).unwrap();
    assert_eq!(
        cfg["rootfs"]["diff_ids"][1],
        json!(rec.layers[1].digest.to_string())
    );
    assert_eq!(
        cfg["config"]["Cmd"],
        json!(["/bin/sh", "-c", "cat /app/greeting"])
    );
    assert_eq!(cfg["config"]["Labels"]["made"], json!("by-test"));
    assert_eq!(cfg["author"], json!("cela"));
    let history = cfg["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["comment"], json!("a test"));

    // What the layer holds, as a tar.
    let layer = fs::read(store.blob_path(&rec.layers[1].digest)).unwrap();
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(&layer[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().display().to_string();
        let t = e.header().entry_type();
        // The file is written first as app/again (sorted), app/greeting is a link to it.
        if path == "app/again" {
            let xattrs: Vec<(String, Vec<u8>)> = e
                .pax_extensions()
                .unwrap()
                .expect("PAX records")
                .map(|x| x.unwrap())
                .map(|x| (x.key().unwrap().to_owned(), x.value_bytes().to_vec()))
                .collect();
            assert_eq!(
                xattrs,
                vec![("SCHILY.xattr.user.note".to_owned(), b"kept".to_vec())]
            );
            assert_eq!(e.header().mode().unwrap(), 0o4750);
        }
        if path == "app/secret" {
            assert_eq!(t, tar::EntryType::Symlink);
            assert_eq!(
                e.link_name().unwrap().unwrap().display().to_string(),
                "/etc/shadow"
            );
        }
        if path == "app/greeting" || path == "app/again" {
            // The first is the file, the other a link to it (sorted: again < greeting).
            if path == "app/again" {
                assert_eq!(t, tar::EntryType::Regular);
            } else {
                assert_eq!(t, tar::EntryType::Link);
                assert_eq!(
                    e.link_name().unwrap().unwrap().display().to_string(),
                    "app/again"
                );
            }
        }
        names.push(path);
    }
    assert_eq!(
        names,
        [
            "app/",
            "app/again",
            "app/greeting",
            "app/pipe",
            "app/secret",
            "etc/",
            "etc/keep/",
            "etc/keep/.wh..wh..opq",
            "etc/keep/b",
            "etc/.wh.motd",
        ]
    );

    // Read back as every user of the image reads it: the store's own unpacking.
    let dirs = crate::layer_dirs(&store, &rec).unwrap();
    let flat = dir.path().join("flat");
    fs::create_dir(&flat).unwrap();
    crate::flatten(&store, &rec, &flat).unwrap();
    assert_eq!(fs::read(flat.join("app/greeting")).unwrap(), b"hello\n");
    assert_eq!(
        fs::metadata(flat.join("app/again")).unwrap().ino(),
        fs::metadata(flat.join("app/greeting")).unwrap().ino()
    );
    assert!(!flat.join("etc/motd").exists(), "the deleted file is back");
    assert!(
        !flat.join("etc/keep/a").exists(),
        "the opaque directory leaks"
    );
    assert_eq!(fs::read(flat.join("etc/keep/b")).unwrap(), b"b");
    assert_eq!(fs::read(flat.join("var/log/old")).unwrap(), b"old");
    assert!(!flat.join("etc/resolv.conf").exists());
    assert_eq!(
        fs::read_link(flat.join("app/secret")).unwrap(),
        Path::new("/etc/shadow")
    );
    assert_eq!(dirs.len(), 2);
}

#[test]
fn a_commit_that_fails_leaves_the_store_as_it_was() {
    assert!(is_root(), "this test needs root (trusted.* xattrs)");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    base_image(dir.path(), &store);
    let blobs = || {
        fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .count()
    };
    let before = (blobs(), store.list().unwrap());
    let upper = dir.path().join("upper");
    fs::create_dir_all(upper.join("moved")).unwrap();
    fs::write(upper.join("a"), b"a").unwrap();
    rustix::fs::setxattr(
        upper.join("moved"),
        "trusted.overlay.redirect",
        b"/old",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let mut req = CommitRequest {
        base: "base:1".into(),
        upper: upper.clone(),
        name: Some("never:1".into()),
        ..Default::default()
    };
    let e = commit(&store, &req, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(e.contains("moved") && e.contains("redirect"), "{e}");
    assert_eq!((blobs(), store.list().unwrap()), before);

    req.changes = vec!["HEALTHCHECK NONE".into()];
    let e = commit(&store, &req, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(e.contains("HEALTHCHECK"), "{e}");
    req.changes.clear();
    // A name an image layer keeps for deletions cannot come from a container.
    fs::remove_dir(upper.join("moved")).unwrap();
    fs::write(upper.join(".wh.a"), b"").unwrap();
    let e = commit(&store, &req, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(e.contains(".wh.a") && e.contains("deletions"), "{e}");
    fs::remove_file(upper.join(".wh.a")).unwrap();
    req.name = Some("bad@name".into());
    let e = commit(&store, &req, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(e.contains("malformed"), "{e}");
    req.name = None;
    req.base = "sha256:0000".into();
    let e = commit(&store, &req, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such image"), "{e}");
    assert_eq!((blobs(), store.list().unwrap()), before);
    assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn a_container_that_never_ran_commits_an_empty_layer() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    let base = base_image(dir.path(), &store);
    let req = CommitRequest {
        base: base.digest.to_string(),
        upper: dir.path().join("absent"),
        ..Default::default()
    };
    let rec = commit(&store, &req, &Progress::hidden()).unwrap();
    assert!(rec.names.is_empty());
    assert_eq!(rec.layers.len(), 2);
    // An empty tar: its two end blocks.
    assert_eq!(rec.layers[1].size, 1024);
    assert_eq!(
        rec.layers[1].digest,
        Digest::of(&fs::read(store.blob_path(&rec.layers[1].digest)).unwrap())
    );
}
