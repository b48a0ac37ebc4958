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
            sha256: Digest::of(data).to_string(),
        });
    }
    let m = Manifest {
        format: FORMAT,
        name: name.into(),
        cela_version: env!("CARGO_PKG_VERSION").into(),
        engine: "qemu".into(),
        qemu: None,
        tsc_khz: 0,
        created: now(),
        source: Source {
            id: "0123456789ab".into(),
            name: "src".into(),
        },
        config: config(),
        files,
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
        e.contains("state.bin's sha256") && e.contains("tampered"),
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
    // A manifest that lists something else too, or not what it needs.
    let mut other = m.clone();
    other.files.push(FileDigest {
        name: "../../etc/shadow".into(),
        size: 0,
        sha256: String::new(),
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
    v.engine = "kvm".into();
    let e = v.check_restorable().unwrap_err().to_string();
    assert!(e.contains("of the kvm engine"), "{e}");
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
