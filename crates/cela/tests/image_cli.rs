//! `cela pull` and `cela image import|ls|rm` end to end: a private registry started on loopback
//! with an image pushed by skopeo, OCI layouts and `docker save` archives written by the test,
//! corrupt and truncated content refused without leaving blobs, shared layers stored once.

mod images;

use std::fs;
use std::time::Instant;

use base64::Engine;
use images::*;

fn busybox_image() -> TestImage {
    TestImage::new(vec![busybox_layer()], &["/bin/sh"])
}

/// A registry holding the busybox image as `busybox:latest`.
fn registry_with_busybox(work: &std::path::Path) -> (Registry, TestImage) {
    let registry = Registry::start();
    let image = busybox_image();
    let layout = work.join("layout");
    image.write_layout(&layout, "latest");
    registry.push(&layout, "latest", "busybox:latest");
    (registry, image)
}

#[test]
fn pull_from_a_local_registry_stores_the_verified_blobs() {
    let work = tempfile::tempdir().unwrap();
    let (registry, image) = registry_with_busybox(work.path());

    let data = work.path().join("data");
    let reference = registry.reference("busybox:latest");
    let started = Instant::now();
    let out = cela_ok(&data, &["pull", &reference]);
    eprintln!(
        "pull of a {}-byte image took {:?}",
        image.layers[0].gz.len(),
        started.elapsed()
    );
    assert!(out.contains(&image.digest().to_string()), "{out}");

    let ls = ls_json(&data);
    assert_eq!(ls.len(), 1);
    let rec = &ls[0];
    assert_eq!(rec["digest"], image.digest().to_string());
    assert_eq!(rec["names"][0], reference);
    assert_eq!(
        rec["layers"][0]["digest"],
        image.layers[0].digest().to_string()
    );
    assert_eq!(rec["layers"][0]["size"], image.layers[0].gz.len() as u64);
    let mut expected = vec![
        image.digest().hex().to_owned(),
        cela_image::Digest::of(&image.config).hex().to_owned(),
        image.layers[0].digest().hex().to_owned(),
    ];
    expected.sort();
    assert_eq!(stored_blobs(&data), expected);
    for b in &expected {
        let bytes = fs::read(data.join("images/blobs/sha256").join(b)).unwrap();
        assert_eq!(
            cela_image::Digest::of(&bytes).hex(),
            b,
            "blob content matches its name"
        );
    }
    let table = cela_ok(&data, &["image", "ls"]);
    assert!(
        table.contains(&reference) && table.contains(image.digest().short()),
        "{table}"
    );

    // A several-layer image pulls its layers (concurrently) and records them in order; the
    // busybox layer is already there.
    let layers = vec![
        busybox_layer(),
        layer(&[Entry::File("one", &[1u8; 300_000])]),
        layer(&[Entry::File("two", &[2u8; 200_000])]),
        layer(&[Entry::File("three", b"3")]),
    ];
    let many = TestImage::new(layers, &["/bin/sh"]);
    let many_layout = work.path().join("many");
    many.write_layout(&many_layout, "latest");
    registry.push(&many_layout, "latest", "many:latest");
    cela_ok(&data, &["pull", &registry.reference("many:latest")]);
    let rec = ls_json(&data)
        .into_iter()
        .find(|r| r["digest"] == many.digest().to_string())
        .expect("the several-layer image is listed");
    let digests: Vec<String> = rec["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = many.layers.iter().map(|l| l.digest().to_string()).collect();
    assert_eq!(digests, want);
    assert_eq!(
        stored_blobs(&data).len(),
        3 + 5,
        "busybox's layer is shared"
    );
    cela_ok(&data, &["image", "rm", &registry.reference("many:latest")]);

    // Pulling again changes nothing; rm deletes every blob.
    cela_ok(&data, &["pull", &reference]);
    assert_eq!(stored_blobs(&data), expected);
    let out = cela_ok(&data, &["image", "rm", &reference]);
    assert!(out.contains("deleted"), "{out}");
    assert!(stored_blobs(&data).is_empty());
    assert_eq!(ls_json(&data).len(), 0);
}

#[test]
fn docker_schema2_manifests_pull_like_oci_ones() {
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let image = busybox_image();
    let layout = work.path().join("layout");
    image.write_layout(&layout, "latest");
    // skopeo converts the manifest and config media types to Docker's on the way.
    registry.push_args(&layout, "latest", "docker:v2s2", &["--format", "v2s2"]);
    let data = work.path().join("data");
    cela_ok(&data, &["pull", &registry.reference("docker:v2s2")]);
    let ls = ls_json(&data);
    assert_eq!(
        ls[0]["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_eq!(
        ls[0]["layers"][0]["digest"],
        image.layers[0].digest().to_string()
    );
    let manifest = fs::read(
        data.join("images/blobs/sha256").join(
            ls[0]["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:"),
        ),
    )
    .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
}

#[test]
fn pull_by_digest_and_through_a_multi_arch_index() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = busybox_image();
    // Another image stands in for the arm64 one (its content does not matter).
    let arm = TestImage::new(vec![layer(&[Entry::File("arm64", b"not for us")])], &["/x"]);
    // Both images pushed by skopeo, then a multi-arch index over them (arm64 first) put
    // under the tag by hand: skopeo 1.9 resolves a nested index in an OCI layout to this
    // machine's image instead of copying the index.
    for (img, tag) in [(&arm, "arm"), (&image, "amd")] {
        let layout = work.path().join(tag);
        img.write_layout(&layout, tag);
        registry.push(&layout, tag, &format!("multi:{tag}"));
    }
    let entry = |m: &TestImage, arch: &str| {
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": m.digest().to_string(), "size": m.manifest.len(),
            "platform": {"architecture": arch, "os": "linux"}})
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&arm, "arm64"), entry(&image, "amd64")]}))
    .unwrap();
    registry.put_manifest(
        "multi",
        "1",
        "application/vnd.oci.image.index.v1+json",
        &index,
    );
    assert_eq!(
        registry.tag_target("multi", "1"),
        cela_image::Digest::of(&index)
    );

    let data = work.path().join("data");
    cela_ok(&data, &["pull", &registry.reference("multi:1")]);
    let ls = ls_json(&data);
    assert_eq!(
        ls[0]["digest"],
        image.digest().to_string(),
        "the amd64 manifest was chosen"
    );
    assert!(!stored_blobs(&data).contains(&arm.layers[0].digest().hex().to_owned()));

    // By digest: stored without a name, found by digest prefix.
    let data2 = work.path().join("data2");
    let pinned = format!("127.0.0.1:{}/multi@{}", registry.port, image.digest());
    cela_ok(&data2, &["pull", &pinned]);
    let ls = ls_json(&data2);
    assert_eq!(ls[0]["digest"], image.digest().to_string());
    assert_eq!(ls[0]["names"].as_array().unwrap().len(), 0);
    cela_ok(&data2, &["image", "rm", &image.digest().hex()[..10]]);
    assert!(stored_blobs(&data2).is_empty());
}

#[test]
fn registry_errors_are_one_line_and_leave_no_blob() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let closed = format!("127.0.0.1:{}/busybox:latest", free_port());
    cela_err(
        &data,
        &["pull", &closed],
        "cannot be reached (Connection refused",
    );
    assert!(stored_blobs(&data).is_empty());
    assert_eq!(tmp_entries(&data), 0);

    cela_err(
        &data,
        &["pull", "Not/A/Valid:ref:"],
        "malformed image reference",
    );
    cela_err(&data, &["pull", "busybox@sha256:1234"], "malformed digest");

    let registry = Registry::start();
    cela_err(
        &data,
        &["pull", &registry.reference("nothere:latest")],
        "manifest unknown",
    );
    assert!(stored_blobs(&data).is_empty());
}

#[test]
fn a_corrupt_blob_in_the_registry_is_refused_and_not_stored() {
    let work = tempfile::tempdir().unwrap();
    let (registry, image) = registry_with_busybox(work.path());
    // Flip bytes in the middle of the stored layer, keeping its length.
    let layer = image.layers[0].digest();
    let file = registry.blob_file(&layer);
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    fs::write(&file, &bytes).unwrap();

    let data = work.path().join("data");
    cela_err(
        &data,
        &["pull", &registry.reference("busybox:latest")],
        "digest mismatch",
    );
    assert!(
        !stored_blobs(&data).contains(&layer.hex().to_owned()),
        "the corrupt layer was stored"
    );
    assert_eq!(tmp_entries(&data), 0, "a partial blob was left in tmp/");
    assert_eq!(ls_json(&data).len(), 0);
}

#[test]
fn oci_layouts_import_as_directories_and_tars() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox_image();
    let layout = work.path().join("layout");
    image.write_layout(&layout, "latest");
    let data = work.path().join("data");
    let out = cela_ok(
        &data,
        &[
            "image",
            "import",
            layout.to_str().unwrap(),
            "--name",
            "local/busybox:1",
        ],
    );
    assert!(out.contains(&image.digest().to_string()), "{out}");
    let tar = work.path().join("layout.tar");
    tar_dir(&layout, &tar);
    cela_ok(
        &data,
        &[
            "image",
            "import",
            tar.to_str().unwrap(),
            "--name",
            "busybox:tar",
        ],
    );
    let ls = ls_json(&data);
    assert_eq!(ls.len(), 1, "the same image imported twice is stored once");
    let names: Vec<&str> = ls[0]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["docker.io/local/busybox:1", "docker.io/library/busybox:tar"]
    );
    assert_eq!(stored_blobs(&data).len(), 3);
}

#[test]
fn docker_save_archives_import_and_are_checked_against_diff_ids() {
    let work = tempfile::tempdir().unwrap();
    let image = TestImage::new(
        vec![
            busybox_layer(),
            layer(&[Entry::Dir("etc"), Entry::File("etc/motd", b"hi\n")]),
        ],
        &["/bin/sh"],
    );
    let archive = work.path().join("saved.tar");
    image.write_docker_save(&archive, "saved:v1");
    let data = work.path().join("data");
    cela_ok(&data, &["image", "import", archive.to_str().unwrap()]);
    let ls = ls_json(&data);
    assert_eq!(ls[0]["names"][0], "docker.io/library/saved:v1");
    let layers = ls[0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    // docker save layers are uncompressed: stored as they are, so their digest is the diff_id.
    for (l, want) in layers.iter().zip(&image.layers) {
        assert_eq!(l["digest"], want.diff_id().to_string());
        assert_eq!(l["mediaType"], "application/vnd.oci.image.layer.v1.tar");
    }

    // A layer whose bytes do not match the config's diff_id is refused and not stored.
    let mut bad_image = TestImage::new(vec![layer(&[Entry::File("f", b"original")])], &["/bin/sh"]);
    let tampered = layer(&[Entry::File("f", b"tampered")]);
    bad_image.layers[0].tar = tampered.tar.clone();
    let bad = work.path().join("bad.tar");
    bad_image.write_docker_save(&bad, "bad:1");
    let data2 = work.path().join("data2");
    cela_err(
        &data2,
        &["image", "import", bad.to_str().unwrap()],
        "digest mismatch",
    );
    assert!(!stored_blobs(&data2).contains(&tampered.diff_id().hex().to_owned()));
    assert_eq!(tmp_entries(&data2), 0);
}

#[test]
fn corrupt_truncated_and_foreign_archives_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let image = busybox_image();
    let layout = work.path().join("layout");
    image.write_layout(&layout, "latest");
    // A layer blob with a flipped byte.
    let blob = layout
        .join("blobs/sha256")
        .join(image.layers[0].digest().hex());
    let mut bytes = fs::read(&blob).unwrap();
    bytes[100] ^= 1;
    fs::write(&blob, &bytes).unwrap();
    cela_err(
        &data,
        &["image", "import", layout.to_str().unwrap()],
        "digest mismatch",
    );
    assert!(
        stored_blobs(&data)
            .iter()
            .all(|b| *b != image.layers[0].digest().hex())
    );
    // Truncated.
    bytes.truncate(bytes.len() / 2);
    fs::write(&blob, &bytes).unwrap();
    cela_err(
        &data,
        &["image", "import", layout.to_str().unwrap()],
        "size mismatch",
    );
    assert_eq!(tmp_entries(&data), 0);
    // Not an archive at all.
    let junk = work.path().join("junk");
    fs::write(
        &junk,
        b"this is not a tar archive at all, and it is long enough to fill a header block? no",
    )
    .unwrap();
    cela_err(
        &data,
        &["image", "import", junk.to_str().unwrap()],
        "not a tar archive",
    );
    cela_err(
        &data,
        &["image", "import", "/nonexistent/x.tar"],
        "/nonexistent/x.tar",
    );
    let empty_dir = work.path().join("empty");
    fs::create_dir(&empty_dir).unwrap();
    cela_err(
        &data,
        &["image", "import", empty_dir.to_str().unwrap()],
        "OCI image layout",
    );
    cela_err(&data, &["image", "rm", "nothere"], "no such image");
    assert_eq!(ls_json(&data).len(), 0);
}

#[test]
fn a_rootfs_tarball_becomes_a_one_layer_image() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let l = busybox_layer();
    let gz = work.path().join("rootfs.tar.gz");
    fs::write(&gz, &l.gz).unwrap();
    let out = cela_ok(
        &data,
        &[
            "image",
            "import",
            gz.to_str().unwrap(),
            "--name",
            "rootfs:gz",
        ],
    );
    assert!(out.contains("1 layer"), "{out}");
    let ls = ls_json(&data);
    assert_eq!(
        ls[0]["layers"][0]["digest"],
        l.digest().to_string(),
        "stored as the file is"
    );
    assert_eq!(
        ls[0]["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let config = fs::read(
        data.join("images/blobs/sha256").join(
            ls[0]["config"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:"),
        ),
    )
    .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"][0], l.diff_id().to_string());
    assert_eq!(config["config"]["Cmd"][0], "/bin/sh");
}

#[test]
fn two_images_sharing_a_layer_store_it_once() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let base = busybox_layer();
    let a = TestImage::new(
        vec![base.clone(), layer(&[Entry::File("a", b"image a")])],
        &["/bin/sh"],
    );
    let b = TestImage::new(
        vec![base.clone(), layer(&[Entry::File("b", b"image b")])],
        &["/bin/sh"],
    );
    for (img, name) in [(&a, "a"), (&b, "b")] {
        let dir = work.path().join(name);
        img.write_layout(&dir, "latest");
        cela_ok(
            &data,
            &["image", "import", dir.to_str().unwrap(), "--name", name],
        );
    }
    let blobs = stored_blobs(&data);
    assert_eq!(
        blobs.len(),
        7,
        "2 manifests + 2 configs + 3 distinct layers: {blobs:?}"
    );
    let sum: u64 = ls_json(&data)
        .iter()
        .map(|r| r["size"].as_u64().unwrap())
        .sum();
    eprintln!(
        "two images sharing a {}-byte layer: layers sum to {sum} bytes, the store holds {} bytes",
        base.gz.len(),
        stored_bytes(&data)
    );
    assert!(
        stored_bytes(&data) < sum,
        "the shared layer was stored twice"
    );

    // Removing one keeps the shared layer for the other.
    cela_ok(&data, &["image", "rm", "a"]);
    assert!(stored_blobs(&data).contains(&base.digest().hex().to_owned()));
    assert_eq!(
        stored_blobs(&data).len(),
        4,
        "b's manifest, config and two layers"
    );
    cela_ok(&data, &["image", "rm", "b"]);
    assert!(stored_blobs(&data).is_empty());
}

#[test]
fn a_docker_archive_written_by_skopeo_imports() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox_image();
    let layout = work.path().join("layout");
    image.write_layout(&layout, "latest");
    // skopeo writes Docker's legacy `docker save` format: `<diff_id>.tar` layers, a config
    // named by its digest, and `<id>/layer.tar` symlinks.
    let archive = work.path().join("docker-archive.tar");
    let out = std::process::Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!(
            "docker-archive:{}:saved/busybox:1",
            archive.display()
        ))
        .output()
        .expect("skopeo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = work.path().join("data");
    cela_ok(&data, &["image", "import", archive.to_str().unwrap()]);
    let ls = ls_json(&data);
    assert_eq!(ls[0]["names"][0], "docker.io/saved/busybox:1");
    assert_eq!(
        ls[0]["layers"][0]["digest"],
        image.layers[0].diff_id().to_string(),
        "the uncompressed layer, named by its diff_id"
    );
    assert_eq!(
        ls[0]["config"],
        cela_image::Digest::of(&image.config).to_string()
    );
}

#[test]
fn a_registry_that_wants_a_password_gets_the_docker_login_one() {
    let registry = Registry::start_with_password();
    let work = tempfile::tempdir().unwrap();
    let image = busybox_image();
    let layout = work.path().join("layout");
    image.write_layout(&layout, "latest");
    let creds = format!("--dest-creds={REGISTRY_USER}:{REGISTRY_PASSWORD}");
    registry.push_args(&layout, "latest", "private:1", &[&creds]);
    let reference = registry.reference("private:1");

    // No docker config: anonymous, refused.
    let data = work.path().join("data");
    let empty = work.path().join("no-docker-config");
    fs::create_dir(&empty).unwrap();
    let out = cela_env(&data, &[("DOCKER_CONFIG", &empty)], &["pull", &reference]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("Not authorized"), "{err}");
    assert!(stored_blobs(&data).is_empty());

    // What `docker login` writes: auths.<registry>.auth = base64(user:password).
    let docker = work.path().join("docker");
    fs::create_dir(&docker).unwrap();
    let auth = base64::engine::general_purpose::STANDARD
        .encode(format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}"));
    let config =
        serde_json::json!({"auths": {format!("127.0.0.1:{}", registry.port): {"auth": auth}}});
    fs::write(
        docker.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    let out = cela_env(&data, &[("DOCKER_CONFIG", &docker)], &["pull", &reference]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ls_json(&data)[0]["digest"], image.digest().to_string());
}
