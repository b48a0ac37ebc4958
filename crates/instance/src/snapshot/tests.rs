//! Snapshot store tests: names, listing, removal, and the checks a restore makes before it
//! creates anything (format, version, engine, every file's size and digest).

use super::*;

fn config() -> InstanceConfig {
    serde_json::from_value(serde_json::json!({
        "id": "0123456789ab", "name": "src", "kind": "vm", "image": "testimg",
        "image_digest": "sha256:00", "command": ["sh"], "env": [], "workdir": null,
        "user": null, "cpus": null, "memory_mib": null, "volumes": [], "auto_remove": false,
        "created": "2026-12-07T00:00:00Z",
        "vm": {"kernel": "/k", "initrd": "/i", "image_disk": "/d"}
    }))
    .unwrap()
}

/// A snapshot `name` with two files, written as `take` writes one.
fn write(snaps: &Snapshots, name: &str) -> Manifest {
    let dir = snaps.dir(name);
    fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (f, data) in [(STATE_FILE, &b"QEVM state"[..]), (DISK_FILE, b"disk bytes")] {
        fs::write(dir.join(f), data).unwrap();
        files.push(FileDigest {
            name: f.into(),
            size: data.len() as u64,
            digest: BlockDigest::of(data).to_string(),
        });
    }
    let m = Manifest {
        format: FORMAT,
        name: name.into(),
        cela_version: env!("CARGO_PKG_VERSION").into(),
        engine: "qemu".into(),
        qemu: None,
        cpu: None,
        tsc_khz: 0,
        created: now(),
        source: Source {
            id: "0123456789ab".into(),
            name: "src".into(),
        },
        config: config(),
        files,
        imported: false,
    };
    fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    m
}

#[test]
fn snapshots_are_listed_found_and_removed_by_name() {
    let data = tempfile::tempdir().unwrap();
    let snaps = Snapshots::open(data.path()).unwrap();
    write(&snaps, "b");
    write(&snaps, "a");
    // A snapshot being written by a process that is gone is cleared on open.
    let stale = data.path().join("snapshots/.tmp-c-999999999");
    fs::create_dir_all(&stale).unwrap();
    let snaps = Snapshots::open(data.path()).unwrap();
    assert!(!stale.exists());
    let names: Vec<String> = snaps.list().unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"a".to_owned()) && names.contains(&"b".to_owned()));
    assert_eq!(snaps.find("a").unwrap().source.name, "src");
    let e = snaps.find("nosuch").unwrap_err().to_string();
    assert!(e.contains("no such snapshot: nosuch"), "{e}");
    assert!(matches!(snaps.find("../a"), Err(InstanceError::BadName(_))));
    snaps.remove("a").unwrap();
    assert!(snaps.find("a").is_err());
    assert!(snaps.remove("a").is_err());
    // A manifest that names another snapshot is refused.
    fs::rename(snaps.dir("b"), snaps.dir("c")).unwrap();
    let e = snaps.find("c").unwrap_err().to_string();
    assert!(e.contains("names it \"b\""), "{e}");
    snaps.remove("c").unwrap();
}

#[test]
fn a_damaged_snapshot_is_refused_naming_the_file() {
    let data = tempfile::tempdir().unwrap();
    let snaps = Snapshots::open(data.path()).unwrap();
    let m = write(&snaps, "s");
    let dir = snaps.dir("s");
    m.verify(&dir).unwrap();
    // One byte flipped.
    fs::write(dir.join(STATE_FILE), b"QEVM statf").unwrap();
    let e = m.verify(&dir).unwrap_err().to_string();
    assert!(
        e.contains("state.bin's digest") && e.contains("tampered"),
        "{e}"
    );
    fs::write(dir.join(STATE_FILE), b"QEVM state").unwrap();
    // Truncated.
    fs::write(dir.join(DISK_FILE), b"disk").unwrap();
    let e = m.verify(&dir).unwrap_err().to_string();
    assert!(
        e.contains("disk.raw has 4 bytes") && e.contains("truncated"),
        "{e}"
    );
    fs::write(dir.join(DISK_FILE), b"disk bytes").unwrap();
    // A file swapped for a link to another.
    fs::remove_file(dir.join(DISK_FILE)).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join(DISK_FILE)).unwrap();
    let e = m.verify(&dir).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    fs::remove_file(dir.join(DISK_FILE)).unwrap();
    fs::write(dir.join(DISK_FILE), b"disk bytes").unwrap();
    // Verified files are stamped; a stamp vouches for a file that has not changed since,
    // and for nothing once it has (even within the same clock tick, same size).
    m.verify(&dir).unwrap();
    let stamps = Stamp::read_all(&dir);
    assert_eq!(stamps.len(), 2);
    let meta = fs::symlink_metadata(dir.join(DISK_FILE)).unwrap();
    let mut old = stamps.iter().find(|s| s.name == DISK_FILE).unwrap().clone();
    let now = Stamp::of(DISK_FILE, &meta, &old.digest);
    // Taken right after the file's last change: it does not vouch.
    assert!(!old.vouches_for(&now));
    old.at_ns += 2 * STAMP_SETTLE_NS;
    assert!(old.vouches_for(&now));
    // The stamps on disk were taken at once: a change in the same tick is still found.
    fs::write(dir.join(DISK_FILE), b"disk bytez").unwrap();
    let e = m.verify(&dir).unwrap_err().to_string();
    assert!(e.contains("disk.raw's digest"), "{e}");
    fs::write(dir.join(DISK_FILE), b"disk bytes").unwrap();
    // A manifest that lists something else too, or not what it needs.
    let mut other = m.clone();
    other.files.push(FileDigest {
        name: "../../etc/shadow".into(),
        size: 0,
        digest: String::new(),
    });
    let e = other.verify(&dir).unwrap_err().to_string();
    assert!(e.contains("lists \"../../etc/shadow\""), "{e}");
    other.files.remove(1);
    let e = other.verify(&dir).unwrap_err().to_string();
    assert!(e.contains("lists no disk.raw"), "{e}");
}

#[test]
fn a_foreign_snapshot_is_refused_saying_what_differs() {
    let data = tempfile::tempdir().unwrap();
    let snaps = Snapshots::open(data.path()).unwrap();
    let m = write(&snaps, "s");
    let mut v = m.clone();
    v.format = 9;
    let e = v.check_restorable().unwrap_err().to_string();
    assert!(e.contains("its format is 9"), "{e}");
    let mut v = m.clone();
    v.cela_version = "0.0.1-other".into();
    let e = v.check_restorable().unwrap_err().to_string();
    assert!(e.contains("written by cela 0.0.1-other"), "{e}");
    let mut v = m.clone();
    v.engine = "xen".into();
    let e = v.check_restorable().unwrap_err().to_string();
    assert!(
        e.contains("an engine this cela does not know, \"xen\""),
        "{e}"
    );
    // This host's KVM (PVM) cannot run a stock kernel, so cela's own engine's snapshots are
    // refused here, saying why (the nested lab restores them).
    let mut v = m.clone();
    v.engine = "kvm".into();
    let e = v.check_restorable().unwrap_err().to_string();
    assert!(e.contains("it is of cela's KVM engine, and"), "{e}");
    let mut v = m.clone();
    v.qemu = Some(QemuVersion {
        major: 1,
        minor: 2,
        micro: 3,
        package: "elsewhere".into(),
    });
    let e = v.check_restorable().unwrap_err().to_string();
    assert!(e.contains("saved by QEMU 1.2.3 (elsewhere)"), "{e}");
}

#[test]
fn default_names_are_valid_instance_style_names() {
    let n = default_name("a-rather-long-instance-name-that-goes-on-and-on-and-on-forever");
    assert!(valid_name(&n), "{n}");
    assert!(n.len() <= 64);
}

/// One tar entry of a hand-made archive: a name, a type and the bytes.
fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o600);
        h.set_size(data.len() as u64);
        if kind.is_symlink() {
            h.set_link_name("/etc/shadow").unwrap();
        }
        // Raw names, so hostile ones can be written.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn import_bytes(
    snaps: &Snapshots,
    bytes: Vec<u8>,
    name: Option<&str>,
) -> Result<Manifest, InstanceError> {
    archive::import(snaps, io::Cursor::new(bytes), name)
}

/// Only complete snapshots and no import leftovers under the store.
fn store_names(snaps: &Snapshots) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(&snaps.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn an_exported_snapshot_imports_whole_and_sparse_on_another_host() {
    let here = tempfile::tempdir().unwrap();
    let snaps = Snapshots::open(here.path()).unwrap();
    let mut m = write(&snaps, "s");
    // A disk of 1 MiB that is mostly holes.
    let mut disk = vec![0u8; 1 << 20];
    disk[4096..4100].copy_from_slice(b"data");
    fs::write(snaps.dir("s").join(DISK_FILE), &disk).unwrap();
    m.files[1].size = disk.len() as u64;
    m.files[1].digest = BlockDigest::of(&disk).to_string();
    fs::write(
        snaps.dir("s").join("manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();

    let mut tar = Vec::new();
    archive::export(&snaps, "s", &mut tar).unwrap();
    let names: Vec<String> = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["manifest.json", "state.bin", "disk.raw"]);

    let there = tempfile::tempdir().unwrap();
    let other = Snapshots::open(there.path()).unwrap();
    let got = import_bytes(&other, tar.clone(), None).unwrap();
    assert_eq!(got.name, "s");
    assert_eq!(got.files, m.files);
    got.verify(&other.dir("s")).unwrap();
    assert_eq!(other.find("s").unwrap().source.name, "src");
    let meta = fs::metadata(other.dir("s").join(DISK_FILE)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "the disk was written whole: {} blocks",
        meta.blocks()
    );
    // The same name again is refused; another name is fine.
    let e = import_bytes(&other, tar.clone(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists already") && e.contains("--name"), "{e}");
    let t = import_bytes(&other, tar.clone(), Some("t")).unwrap();
    assert_eq!(
        (t.name.as_str(), other.find("t").unwrap().name.as_str()),
        ("t", "t")
    );
    other.find("t").unwrap().verify(&other.dir("t")).unwrap();
    assert!(matches!(
        import_bytes(&other, tar, Some("../x")),
        Err(InstanceError::BadName(_))
    ));
    assert_eq!(store_names(&other), ["s", "t"]);

    // A snapshot damaged on disk is not exported.
    fs::write(snaps.dir("s").join(STATE_FILE), b"QEVM statf").unwrap();
    let e = archive::export(&snaps, "s", Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("state.bin's digest") && e.contains("incomplete"),
        "{e}"
    );
}

#[test]
fn a_hostile_archive_is_refused_for_its_own_reason_and_leaves_nothing() {
    use tar::EntryType::{Regular as F, Symlink as L};
    let here = tempfile::tempdir().unwrap();
    let snaps = Snapshots::open(here.path()).unwrap();
    let m = write(&snaps, "s");
    let manifest = serde_json::to_vec(&m).unwrap();
    let with = |edit: &dyn Fn(&mut Manifest)| {
        let mut m = m.clone();
        edit(&mut m);
        serde_json::to_vec(&m).unwrap()
    };
    let huge_state = with(&|m| m.files[0].size = (512 << 20) + (64 << 20) + 1);
    let three_files = with(&|m| {
        let f = m.files[0].clone();
        m.files.push(f)
    });
    let newer = with(&|m| m.format = FORMAT + 1);
    let huge_disk = with(&|m| m.files[1].size = 1 << 41);
    let other_file = with(&|m| {
        let mut f = m.files[0].clone();
        f.name = "other".into();
        m.files.push(f)
    });
    // (2^44 - 1) MiB would wrap a bound counted in bytes.
    let wrapping_ram = with(&|m| m.config.memory_mib = Some((1 << 44) - 1));
    let no_digest = with(&|m| m.files[1].digest = "sha256:../../x".into());
    let big = vec![b' '; (1 << 20) + 1];
    let (state, disk) = (&b"QEVM state"[..], &b"disk bytes"[..]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", tar_of(&[]), "it is empty"),
        (
            "state first",
            tar_of(&[("state.bin", F, state)]),
            "first entry is \"state.bin\"",
        ),
        (
            "manifest a link",
            tar_of(&[("manifest.json", L, b"")]),
            "manifest.json is not a regular",
        ),
        (
            "manifest too big",
            tar_of(&[("manifest.json", F, &big)]),
            "larger than",
        ),
        (
            "manifest garbage",
            tar_of(&[("manifest.json", F, b"{]")]),
            "manifest.json:",
        ),
        (
            "newer format",
            tar_of(&[("manifest.json", F, &newer)]),
            "format is 3 and this cela reads 2",
        ),
        (
            "a file twice",
            tar_of(&[("manifest.json", F, &three_files)]),
            "lists state.bin 2 times",
        ),
        (
            "a file too many",
            tar_of(&[("manifest.json", F, &other_file)]),
            "lists files other than",
        ),
        (
            "RAM past the host's",
            tar_of(&[("manifest.json", F, &wrapping_ram)]),
            "MiB of RAM and this host",
        ),
        (
            "no digest",
            tar_of(&[("manifest.json", F, &no_digest)]),
            "gives disk.raw no block digest",
        ),
        (
            "state bound",
            tar_of(&[("manifest.json", F, &huge_state)]),
            "where a machine of 512 MiB has",
        ),
        (
            "disk bound",
            tar_of(&[("manifest.json", F, &huge_disk)]),
            "1 TiB at most",
        ),
        (
            "unlisted",
            tar_of(&[("manifest.json", F, &manifest), ("evil", F, b"x")]),
            "holds \"evil\", which its manifest does not list",
        ),
        (
            "traversal",
            tar_of(&[("manifest.json", F, &manifest), ("../state.bin", F, state)]),
            "not a snapshot file's name",
        ),
        (
            "a link",
            tar_of(&[("manifest.json", F, &manifest), ("state.bin", L, b"")]),
            "state.bin is not a regular file",
        ),
        (
            "short",
            tar_of(&[("manifest.json", F, &manifest), ("state.bin", F, b"QEVM")]),
            "state.bin has 4 bytes where its manifest says 10",
        ),
        (
            "tampered",
            tar_of(&[
                ("manifest.json", F, &manifest),
                ("state.bin", F, b"QEVM statf"),
            ]),
            "tampered",
        ),
        (
            "twice",
            tar_of(&[
                ("manifest.json", F, &manifest),
                ("state.bin", F, state),
                ("state.bin", F, state),
            ]),
            "state.bin twice",
        ),
        (
            "no disk",
            tar_of(&[("manifest.json", F, &manifest), ("state.bin", F, state)]),
            "ends without disk.raw",
        ),
        (
            "not a tar",
            b"this is not a tar archive at all, not even close".repeat(20),
            "not a cela snapshot",
        ),
    ];
    let there = tempfile::tempdir().unwrap();
    let other = Snapshots::open(there.path()).unwrap();
    for (what, bytes, want) in cases {
        let e = import_bytes(&other, bytes, None)
            .expect_err(what)
            .to_string();
        assert!(e.contains(want), "{what}: {e}");
        assert!(
            store_names(&other).is_empty(),
            "{what} left {:?}",
            store_names(&other)
        );
    }
    // The same files in order import.
    let ok = tar_of(&[
        ("manifest.json", F, &manifest),
        ("state.bin", F, state),
        ("disk.raw", F, disk),
    ]);
    import_bytes(&other, ok, None).unwrap();
    assert_eq!(store_names(&other), ["s"]);
}

#[test]
fn a_restore_gets_the_network_card_it_was_saved_with_and_an_import_a_link_only_when_asked() {
    let data = tempfile::tempdir().unwrap();
    let snaps = Snapshots::open(data.path()).unwrap();
    let mut m = write(&snaps, "n");
    assert!(check_net(&m, None).is_ok());
    let e = check_net(&m, Some(NetMode::Auto)).unwrap_err().to_string();
    assert!(
        e.contains("cannot add its network card") && e.contains("--net none"),
        "{e}"
    );
    m.config.net = NetMode::Auto;
    assert!(check_net(&m, None).is_ok());
    let e = check_net(&m, Some(NetMode::None)).unwrap_err().to_string();
    assert!(e.contains("cannot remove"), "{e}");
    m.imported = true;
    let e = check_net(&m, None).unwrap_err().to_string();
    assert!(
        e.contains("came from another host") && e.contains("--net auto"),
        "{e}"
    );
    assert!(check_net(&m, Some(NetMode::Auto)).is_ok());
    // On a named network: rejoined as it is or moved to `--net auto`, never stripped; from
    // another host, only with `--net auto`.
    m.imported = false;
    m.config.net = NetMode::None;
    m.config.networks = vec![crate::network::named::Attachment {
        network: "lan".into(),
        ip: None,
        mac: None,
    }];
    assert!(check_net(&m, None).is_ok());
    assert!(check_net(&m, Some(NetMode::Auto)).is_ok());
    let e = check_net(&m, Some(NetMode::None)).unwrap_err().to_string();
    assert!(
        e.contains("on network lan") && e.contains("cannot remove"),
        "{e}"
    );
    m.imported = true;
    let e = check_net(&m, None).unwrap_err().to_string();
    assert!(
        e.contains("came from another host") && e.contains("network lan"),
        "{e}"
    );
    assert!(check_net(&m, Some(NetMode::Auto)).is_ok());
}

#[test]
fn a_manifest_of_another_format_is_refused_for_its_format_not_called_damaged() {
    let data = tempfile::tempdir().unwrap();
    let snaps = Snapshots::open(data.path()).unwrap();
    write(&snaps, "old");
    // Format 1 had `sha256` where format 2 has `digest`.
    let path = data.path().join("snapshots/old/manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    v["format"] = 1.into();
    for f in v["files"].as_array_mut().unwrap() {
        let d = f["digest"].take();
        f.as_object_mut().unwrap().remove("digest");
        f["sha256"] = d;
    }
    fs::write(&path, v.to_string()).unwrap();
    let e = snaps.find("old").unwrap_err().to_string();
    assert!(e.contains("its format is 1 and this cela reads 2"), "{e}");
}
