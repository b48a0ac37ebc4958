//! Store tests: verified blobs, names, concurrent writers, removal and images in use.

use super::*;

fn record(store: &Store, names: &[&str], layer: &[u8]) -> ImageRecord {
    let l = store.put_bytes("layer", layer, None).unwrap();
    let config = store
        .put_bytes("config", format!("{{\"layer\":\"{l}\"}}").as_bytes(), None)
        .unwrap();
    let manifest = store
        .put_bytes(
            "manifest",
            format!("{{\"config\":\"{config}\"}}").as_bytes(),
            None,
        )
        .unwrap();
    ImageRecord {
        digest: manifest,
        names: names.iter().map(|n| n.to_string()).collect(),
        config,
        layers: vec![LayerRecord {
            digest: l,
            size: layer.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        }],
        size: layer.len() as u64,
        created: None,
        added: "2026-01-01T00:00:00Z".into(),
        source: "test".into(),
    }
}

fn blob_count(store: &Store) -> usize {
    fs::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .count()
}

#[test]
fn a_blob_that_does_not_match_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let good = Digest::of(b"hello");
    let e = store
        .put_bytes("layer x", b"hellp", Some(&good))
        .unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
    let mut w = store.blob_writer().unwrap();
    w.write_all(b"hell").unwrap();
    let e = w.commit("layer y", Some(&good), Some(5)).unwrap_err();
    assert!(matches!(e, ImageError::SizeMismatch { .. }), "{e}");
    assert_eq!(blob_count(&store), 0);
    assert_eq!(
        fs::read_dir(store.tmp_dir()).unwrap().count(),
        0,
        "temp files left"
    );
    assert_eq!(store.put_bytes("ok", b"hello", Some(&good)).unwrap(), good);
    assert_eq!(fs::read(store.blob_path(&good)).unwrap(), b"hello");
}

#[test]
fn names_move_digests_resolve_and_shared_blobs_outlive_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store
        .commit_image(record(&store, &["docker.io/library/a:latest"], b"shared"))
        .unwrap();
    let b = store
        .commit_image(record(&store, &["docker.io/library/b:1"], b"shared"))
        .unwrap();
    // Same layer and config → same manifest → one image with two names.
    assert_eq!(a.digest, b.digest);
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(store.resolve("a").unwrap().digest, a.digest);
    assert_eq!(
        store.resolve(&a.digest.hex()[..8]).unwrap().digest,
        a.digest
    );
    assert_eq!(
        store.resolve(&a.digest.to_string()).unwrap().digest,
        a.digest
    );
    assert!(matches!(
        store.resolve("nope"),
        Err(ImageError::UnknownImage(_))
    ));
    assert!(matches!(
        store.resolve("Bad!"),
        Err(ImageError::BadReference { .. })
    ));

    let c = store
        .commit_image(record(&store, &["docker.io/library/a:latest"], b"other"))
        .unwrap();
    assert_ne!(c.digest, a.digest);
    assert_eq!(
        store.resolve("a").unwrap().digest,
        c.digest,
        "the name moved"
    );
    assert_eq!(
        store.resolve("b:1").unwrap().names,
        vec!["docker.io/library/b:1"]
    );

    // Removing the only name of the first image deletes it and its unshared blobs.
    let before = blob_count(&store);
    let r = store.remove("b:1", || Ok(HashSet::new()), false).unwrap();
    assert_eq!(r.deleted, Some(a.digest.clone()));
    assert_eq!(r.blobs_freed, 3);
    assert_eq!(blob_count(&store), before - 3);
    assert!(store.has_blob(&c.layers[0].digest));
    assert!(matches!(
        store.resolve("b:1"),
        Err(ImageError::UnknownImage(_))
    ));
}

#[test]
fn concurrent_writers_lose_no_record_and_stale_temp_files_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    fs::write(store.tmp_dir().join("blob-left-by-a-killed-pull"), b"x").unwrap();
    drop(store.content_lock().unwrap());
    assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    std::thread::scope(|s| {
        for t in 0..8 {
            let store = Store::open(dir.path()).unwrap();
            s.spawn(move || {
                let _lock = store.content_lock().unwrap();
                let name = format!("docker.io/library/t{t}:latest");
                let rec = record(&store, &[&name], format!("layer {t}").as_bytes());
                store.commit_image(rec).unwrap();
            });
        }
    });
    assert_eq!(store.list().unwrap().len(), 8);
    // A holder of the content lock keeps tmp/ from being cleared by another.
    let held = store.content_lock().unwrap();
    fs::write(store.tmp_dir().join("in-progress"), b"x").unwrap();
    drop(store.content_lock().unwrap());
    assert!(store.tmp_dir().join("in-progress").exists());
    drop(held);
}

#[test]
fn removing_one_of_two_names_only_untags() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rec = record(
        &store,
        &["docker.io/library/x:1", "docker.io/library/x:2"],
        b"l",
    );
    store.commit_image(rec.clone()).unwrap();
    let r = store.remove("x:1", || Ok(HashSet::new()), false).unwrap();
    assert_eq!(
        (r.untagged, r.deleted),
        (vec!["docker.io/library/x:1".to_string()], None)
    );
    assert_eq!(store.resolve("x:2").unwrap().digest, rec.digest);
    let r = store
        .remove(&rec.digest.to_string(), || Ok(HashSet::new()), false)
        .unwrap();
    assert_eq!(r.deleted, Some(rec.digest));
    assert_eq!(blob_count(&store), 0);
}

#[test]
fn an_image_in_use_is_refused_or_only_untagged_and_its_blobs_stay() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let used = store
        .commit_image(record(
            &store,
            &["docker.io/library/u:1", "docker.io/library/u:2"],
            b"used",
        ))
        .unwrap();
    let other = store
        .commit_image(record(&store, &["docker.io/library/o:1"], b"other"))
        .unwrap();
    // An unpacked layer and an ext4 disk of the image in use, as instances leave them.
    let layer_dir = store.layers_dir().join(used.layers[0].digest.hex());
    fs::create_dir(&layer_dir).unwrap();
    fs::write(layer_dir.join("f"), b"x").unwrap();
    let disk = store.ext4_dir().join(format!("{}.ext4", used.digest.hex()));
    fs::write(&disk, b"disk").unwrap();
    let in_use: HashSet<Digest> = [used.digest.clone()].into();
    let blobs = blob_count(&store);

    // Taking one of two names off is allowed.
    let r = store.remove("u:1", || Ok(in_use.clone()), false).unwrap();
    assert_eq!(r.untagged, ["docker.io/library/u:1"]);
    // The last name, or the digest, is refused in one line naming the image.
    for input in [
        "u:2".to_owned(),
        used.digest.to_string(),
        used.digest.hex()[..8].to_owned(),
    ] {
        let e = store
            .remove(&input, || Ok(in_use.clone()), false)
            .unwrap_err();
        assert!(matches!(e, ImageError::InUse { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&input) && msg.contains("used by instances"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }
    assert_eq!(store.resolve("u:2").unwrap().digest, used.digest);

    // Forced: its names go, the record and everything it needs stay.
    let r = store.remove("u:2", || Ok(in_use.clone()), true).unwrap();
    assert_eq!(
        (r.untagged, r.deleted),
        (vec!["docker.io/library/u:2".to_owned()], None)
    );
    let kept = store.resolve(&used.digest.to_string()).unwrap();
    assert!(kept.names.is_empty() && kept.familiar_names().is_empty());
    assert_eq!(blob_count(&store), blobs);
    assert!(layer_dir.join("f").is_file() && disk.is_file());

    // Garbage collection caused by another removal keeps them too.
    let r = store.remove("o:1", || Ok(in_use.clone()), false).unwrap();
    assert_eq!(r.deleted, Some(other.digest));
    assert!(used.blobs().all(|d| store.has_blob(d)));
    assert!(layer_dir.join("f").is_file() && disk.is_file());

    // If the instances cannot be told (a record is unreadable), nothing is deleted.
    let e = store
        .remove(
            &used.digest.to_string(),
            || Err("record x is corrupt".into()),
            false,
        )
        .unwrap_err();
    assert!(matches!(e, ImageError::InUseUnknown { .. }), "{e}");
    assert!(e.to_string().contains("record x is corrupt"), "{e}");
    assert!(used.blobs().all(|d| store.has_blob(d)));

    // Once no instance uses it, the nameless image is removed by its digest.
    let r = store
        .remove(&used.digest.to_string(), || Ok(HashSet::new()), false)
        .unwrap();
    assert_eq!(r.deleted, Some(used.digest));
    assert_eq!(blob_count(&store), 0);
    assert!(!layer_dir.exists() && !disk.exists());
}
