//! Hostile images against the host, as an attacker would build them: layers that aim the
//! unpacker's metadata calls at host paths through their own symlinks, layers with xattrs
//! that would steer OverlayFS, sparse files, a registry on loopback that never stops talking
//! or lies about sizes, and OCI layouts or `docker save` archives whose blobs are links to
//! `/dev/zero` or host files, FIFOs, or declared absurdly large.
//!
//! Every case checks that a canary directory outside the data dir (a file and directories of
//! known mode, owner and time) is untouched, that a refusal is one `cela: error:` line with
//! status 125, and that the store is exactly as before: same blobs, same records, empty `tmp/`.
//! As root (owners, device nodes, `trusted.*` xattrs).

#[path = "images/hostile_fixtures.rs"]
mod hostile_fixtures;
#[path = "images/hostile_registry.rs"]
mod hostile_registry;
mod images;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use cela_image::{Digest, Store};
use hostile_fixtures::*;
use hostile_registry::{HostileRegistry, Reply};
use images::*;

// ---------------------------------------------------------------------------------------------
// 1. Metadata through the layer's own links.

#[test]
fn layers_aiming_modes_owners_and_times_at_host_paths_change_nothing_outside() {
    root_required();
    let work = tempfile::tempdir().unwrap();
    let canary = Canary::new(work.path());
    let data = seeded_store(work.path(), "data");
    let before = canary.snapshot();
    let (victim, vdir, sub) = (
        canary.path("victim"),
        canary.path("vdir"),
        canary.path("vdir/sub"),
    );
    let climb = "../../../../../../../../..".to_owned() + &victim;
    let variants: Vec<(&str, Vec<Layer>)> = vec![
        // The reported one: a directory, then a link in its place; its mode applied last.
        // Docker's and containerd's unpackers apply modes with lchmod-like calls on the entry
        // itself; a user expects the link to win and the host file to stay as it was.
        (
            "setuid-file",
            vec![hostile_layer(&[dir("a/", 0o4755), link("a", &victim)])],
        ),
        (
            "open-dir",
            vec![hostile_layer(&[dir("d/", 0o777), link("d", &vdir)])],
        ),
        (
            "climbing",
            vec![hostile_layer(&[dir("c/", 0o6777), link("c", &climb)])],
        ),
        (
            "swapped-parent",
            vec![hostile_layer(&[
                dir("p/", 0o755),
                dir("p/sub/", 0o777),
                link("p", &vdir),
            ])],
        ),
        (
            "owner-and-file",
            vec![hostile_layer(&[
                link("f", &victim),
                H {
                    uid: 4242,
                    ..file("f", b"mine", 0o4777)
                },
                link("g", &sub),
                H {
                    uid: 4242,
                    ..dir("g/", 0o777)
                },
            ])],
        ),
        (
            "two-layers",
            vec![
                hostile_layer(&[dir("x/", 0o755), dir("x/y/", 0o755)]),
                hostile_layer(&[dir("x/y/", 0o4777), link("x", &vdir), dir("x/", 0o777)]),
            ],
        ),
        (
            "fifo-and-node",
            vec![hostile_layer(&[
                link("n", &victim),
                h("n", tar::EntryType::Fifo, 0o4777),
                link("m", &vdir),
                H {
                    uid: 4242,
                    ..h("m", tar::EntryType::Char, 0o666)
                },
            ])],
        ),
    ];
    for (name, layers) in variants {
        let (flat, dirs) = import_and_unpack(work.path(), &data, name, layers);
        assert_eq!(canary.snapshot(), before, "{name}: the canary changed");
        // The layer's own wishes held inside the tree.
        if name == "owner-and-file" {
            for root in std::iter::once(&flat).chain(&dirs) {
                let m = fs::symlink_metadata(root.join("f")).unwrap();
                assert_eq!((m.mode() & 0o7777, m.uid()), (0o4777, 4242), "{name}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Extended attributes.

#[test]
fn xattrs_that_would_steer_overlayfs_are_dropped_and_file_capabilities_kept() {
    root_required();
    let work = tempfile::tempdir().unwrap();
    let canary = Canary::new(work.path());
    let data = seeded_store(work.path(), "data");
    let before = canary.snapshot();
    let mut cap = 0x0200_0001u32.to_le_bytes().to_vec();
    for w in [1u32 << 13, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    // Docker's unpacker keeps `security.capability` (ping without setuid) and drops `trusted.*`;
    // cela follows it, and also drops `user.overlay.*` (the same steering for unprivileged
    // overlay mounts) and LSM labels.
    let steering: Vec<(&str, &[u8])> = vec![
        ("trusted.overlay.opaque", b"y"),
        ("trusted.overlay.redirect", b"/etc"),
        ("trusted.overlay.origin", b"x"),
        ("trusted.overlay.metacopy", b""),
        ("user.overlay.opaque", b"y"),
        ("user.overlay.redirect", b"/etc"),
        ("security.selinux", b"system_u:object_r:shadow_t:s0"),
        ("trusted.anything", b"x"),
    ];
    let mut file_x = steering.clone();
    file_x.push(("security.capability", &cap));
    file_x.push(("user.comment", b"kept"));
    let lower = hostile_layer(&[
        dir("etc/", 0o755),
        file("etc/passwd", b"root:x:0:0::/:/bin/sh\n", 0o644),
    ]);
    let upper = hostile_layer(&[
        H {
            xattrs: steering.clone(),
            ..dir("etc/", 0o755)
        },
        H {
            xattrs: file_x,
            ..file("ping", b"\x7fELF", 0o755)
        },
    ]);
    let (flat, dirs) = import_and_unpack(work.path(), &data, "xattrs", vec![lower, upper]);
    for root in std::iter::once(&flat).chain(&dirs) {
        for p in ["etc", "ping"] {
            let path = root.join(p);
            if fs::symlink_metadata(&path).is_err() {
                continue; // not in this layer's directory
            }
            for (k, _) in &steering {
                assert_eq!(xattr(&path, k), None, "{}: {k} was set", path.display());
            }
        }
    }
    // The OverlayFS view of the two layers still shows the lower /etc/passwd.
    let merged = work.path().join("merged");
    fs::create_dir(&merged).unwrap();
    let lowers: Vec<String> = dirs.iter().rev().map(|d| d.display().to_string()).collect();
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}", lowers.join(":")))
        .arg(&merged)
        .status()
        .unwrap();
    assert!(st.success(), "overlay mount failed");
    let passwd = fs::read(merged.join("etc/passwd"));
    let umount = Command::new("umount").arg(&merged).status().unwrap();
    assert!(umount.success());
    assert_eq!(
        passwd.unwrap(),
        b"root:x:0:0::/:/bin/sh\n",
        "an xattr made /etc opaque"
    );
    let ping = flat.join("ping");
    assert_eq!(xattr(&ping, "security.capability"), Some(cap));
    assert_eq!(xattr(&ping, "user.comment").as_deref(), Some(&b"kept"[..]));
    assert_eq!(canary.snapshot(), before, "the canary changed");
}

// ---------------------------------------------------------------------------------------------
// 3. Sparse files.

#[test]
fn sparse_files_written_by_gnu_tar_import_and_unpack_whole() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    // 64 MiB with 12 KiB of data in three places.
    let size: u64 = 64 << 20;
    let f = fs::File::create(src.join("disk.img")).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    for (off, byte) in [(0u64, 1u8), (size / 2, 2), (size - 4096, 3)] {
        f.write_all_at(&[byte; 4096], off).unwrap();
    }
    drop(f);
    let expected = fs::read(src.join("disk.img")).unwrap();
    let data = work.path().join("data");
    for (name, args) in [
        ("gnu", &["--format=gnu"][..]),
        ("posix00", &["--format=posix", "--sparse-version=0.0"]),
        ("posix01", &["--format=posix", "--sparse-version=0.1"]),
        ("posix10", &["--format=posix", "--sparse-version=1.0"]),
    ] {
        let tarball = work.path().join(format!("{name}.tar"));
        let st = Command::new("tar")
            .args(args)
            .args(["--sparse", "-C"])
            .arg(&src)
            .arg("-cf")
            .arg(&tarball)
            .arg("disk.img")
            .status()
            .expect("GNU tar writes the sparse layers of this test (apt-get install tar)");
        assert!(st.success());
        assert!(
            fs::metadata(&tarball).unwrap().len() < 1 << 20,
            "{name}: not sparse"
        );
        // A rootfs tarball becomes a one-layer image.
        cela_ok(
            &data,
            &["image", "import", "--name", name, tarball.to_str().unwrap()],
        );
        let store = Store::open(&data).unwrap();
        let rec = store.resolve(name).unwrap();
        let flat = work.path().join(format!("{name}-flat"));
        fs::create_dir(&flat).unwrap();
        cela_image::flatten(&store, &rec, &flat).unwrap();
        let names: Vec<_> = fs::read_dir(&flat)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["disk.img"], "{name}: {names:?}");
        let out = flat.join("disk.img");
        assert!(
            fs::read(&out).unwrap() == expected,
            "{name}: the bytes differ"
        );
        let used = fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            used < 1 << 20,
            "{name}: {used} bytes allocated for 12 KiB of data"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4 and 5. Unbounded reads, and nothing half-stored: a hostile registry.

#[test]
fn a_hostile_registry_is_cut_off_and_leaves_nothing() {
    let work = tempfile::tempdir().unwrap();
    let canary = Canary::new(work.path());
    let data = seeded_store(work.path(), "data");
    let reg = HostileRegistry::start();
    let (image, honest) = served_image(None);
    let config = Digest::of(&image.config);
    let layer = image.layers[0].digest();
    reg.route(
        &format!("/v2/img/blobs/{config}"),
        Reply::Body("application/octet-stream", image.config.clone()),
    );

    // An endless manifest: read no further than a manifest may be.
    reg.route("/v2/endless/manifests/latest", Reply::Endless(b' '));
    let sent = reg.sent();
    refused(
        &data,
        &canary,
        &["pull", &reg.reference("endless:latest")],
        "more than 8388608 bytes",
    );
    let read = reg.sent() - sent;
    assert!(
        read < 64 << 20,
        "the registry got {read} bytes out before cela hung up"
    );

    // A length announced beyond the bound is refused before reading.
    reg.route(
        "/v2/liar/manifests/latest",
        Reply::LyingLength(1 << 40, b"{".to_vec()),
    );
    refused(
        &data,
        &canary,
        &["pull", &reg.reference("liar:latest")],
        "more than a manifest may have",
    );

    // Layers declared absurdly large, in several ways.
    for (tag, size) in [("max", i64::MAX as u64), ("tib", 2 << 40)] {
        let (_, m) = served_image(Some(size));
        reg.route(
            &format!("/v2/img/manifests/{tag}"),
            Reply::Body(manifest_type(), m),
        );
        refused(
            &data,
            &canary,
            &["pull", &reg.reference(&format!("img:{tag}"))],
            &format!("declares {size} bytes"),
        );
    }
    // An index whose linux/amd64 manifest claims 2^64-1 bytes.
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": manifest_type(), "digest": Digest::of(&honest).to_string(),
            "size": u64::MAX, "platform": {"architecture": "amd64", "os": "linux"}}]});
    reg.route(
        "/v2/img/manifests/index",
        Reply::Body(
            "application/vnd.oci.image.index.v1+json",
            serde_json::to_vec(&index).unwrap(),
        ),
    );
    refused(
        &data,
        &canary,
        &["pull", &reg.reference("img:index")],
        "a manifest may have",
    );

    // A layer blob longer than its descriptor: cut at the declared size, and the config
    // already fetched is taken out again.
    reg.route(
        "/v2/img/manifests/long",
        Reply::Body(manifest_type(), honest.clone()),
    );
    reg.route(
        &format!("/v2/img/blobs/{layer}"),
        Reply::Longer(image.layers[0].gz.clone(), 512 << 20),
    );
    let sent = reg.sent();
    refused(
        &data,
        &canary,
        &["pull", &reg.reference("img:long")],
        "is longer than the",
    );
    let read = reg.sent() - sent;
    assert!(read < 256 << 20, "the registry got {read} bytes out");

    // An endless blob.
    reg.route(&format!("/v2/img/blobs/{layer}"), Reply::Endless(0));
    refused(
        &data,
        &canary,
        &["pull", &reg.reference("img:long")],
        "is longer than the",
    );

    // The honest reply pulls (the same registry, the same image).
    reg.route(
        &format!("/v2/img/blobs/{layer}"),
        Reply::Body("application/octet-stream", image.layers[0].gz.clone()),
    );
    cela_ok(&data, &["pull", &reg.reference("img:long")]);
}

// ---------------------------------------------------------------------------------------------
// 4 and 5. Unbounded reads, and nothing half-stored: hand-made layouts and archives.

#[test]
fn layouts_with_linked_special_or_oversized_blobs_are_refused_and_leave_nothing() {
    let work = tempfile::tempdir().unwrap();
    let canary = Canary::new(work.path());
    let data = seeded_store(work.path(), "data");
    // A layer nobody else has, so its config is new to the store and would be orphaned.
    let image = TestImage::new(
        vec![
            busybox_layer(),
            hostile_layer(&[file("only-here", b"x", 0o644)]),
        ],
        &["/bin/sh"],
    );
    let layer = image.layers[1].digest();
    let blob = |dir: &Path, d: &Digest| dir.join("blobs/sha256").join(d.hex());
    let mut n = 0;
    let mut attack = |what: &str, needle: &str, change: &dyn Fn(&Path)| {
        n += 1;
        let layout = work.path().join(format!("layout-{n}"));
        image.write_layout(&layout, "latest");
        change(&layout);
        refused(
            &data,
            &canary,
            &["image", "import", layout.to_str().unwrap()],
            needle,
        );
        // The same layout as a tar archive, where one can be made of it.
        let _ = what;
    };
    attack("layer is a link to /dev/zero", "symbolic link", &|l| {
        fs::remove_file(blob(l, &layer)).unwrap();
        symlink("/dev/zero", blob(l, &layer)).unwrap();
    });
    attack("layer is a link to a host file", "symbolic link", &|l| {
        fs::remove_file(blob(l, &layer)).unwrap();
        symlink(canary.dir.join("victim"), blob(l, &layer)).unwrap();
    });
    attack(
        "layer is a FIFO",
        "not a regular file (it is a FIFO)",
        &|l| {
            fs::remove_file(blob(l, &layer)).unwrap();
            mkfifo(&blob(l, &layer));
        },
    );
    attack(
        "layer is /dev/zero's node",
        "not a regular file (it is a character device)",
        &|l| {
            fs::remove_file(blob(l, &layer)).unwrap();
            let st = Command::new("mknod")
                .arg(blob(l, &layer))
                .args(["c", "1", "5"])
                .status()
                .unwrap();
            assert!(st.success());
        },
    );
    attack("blobs/ is a link", "symbolic link", &|l| {
        fs::rename(l.join("blobs"), l.join("real-blobs")).unwrap();
        symlink("real-blobs", l.join("blobs")).unwrap();
    });
    attack("index.json is a link to /dev/zero", "symbolic link", &|l| {
        fs::remove_file(l.join("index.json")).unwrap();
        symlink("/dev/zero", l.join("index.json")).unwrap();
    });
    attack("the layer is longer than declared", "size mismatch", &|l| {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(blob(l, &layer))
            .unwrap();
        f.write_all(&vec![0u8; 1 << 20]).unwrap();
    });
    attack("the layer is corrupt", "digest mismatch", &|l| {
        let mut b = fs::read(blob(l, &layer)).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        fs::write(blob(l, &layer), b).unwrap();
    });
    for (what, size) in [("2^63-1", i64::MAX as u64), ("2 TiB", 2 << 40)] {
        attack(what, "declares", &|l| {
            let mut m: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
            m["layers"][1]["size"] = size.into();
            let bytes = serde_json::to_vec(&m).unwrap();
            fs::write(blob(l, &Digest::of(&bytes)), &bytes).unwrap();
            let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": manifest_type(),
                "digest": Digest::of(&bytes).to_string(), "size": bytes.len()}]});
            fs::write(l.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        });
    }
    attack(
        "the manifest claims 2^64-1 bytes",
        "a manifest may have",
        &|l| {
            let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": manifest_type(),
            "digest": image.digest().to_string(), "size": u64::MAX}]});
            fs::write(l.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        },
    );
    // The top-level path itself must be a file or a directory.
    let fifo = work.path().join("fifo");
    mkfifo(&fifo);
    refused(
        &data,
        &canary,
        &["image", "import", fifo.to_str().unwrap()],
        "not a regular file or a directory",
    );
    refused(
        &data,
        &canary,
        &["image", "import", "/dev/zero"],
        "not a regular file or a directory",
    );
}

#[test]
fn docker_save_archives_with_hostile_members_are_refused_and_leave_nothing() {
    let work = tempfile::tempdir().unwrap();
    let canary = Canary::new(work.path());
    let data = seeded_store(work.path(), "data");
    let image = TestImage::new(
        vec![
            busybox_layer(),
            hostile_layer(&[file("only-here", b"y", 0o644)]),
        ],
        &["/bin/sh"],
    );
    let layer_name = format!("{}/layer.tar", image.layers[1].diff_id().hex());
    let archive = work.path().join("save.tar");
    image.write_docker_save(&archive, "saved:1");
    // Extracted, as a directory.
    let extract = |n: &str| {
        let d = work.path().join(n);
        fs::create_dir(&d).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&d)
            .status()
            .unwrap();
        assert!(st.success());
        d
    };
    let d = extract("zero");
    fs::remove_file(d.join(&layer_name)).unwrap();
    symlink("/dev/zero", d.join(&layer_name)).unwrap();
    refused(
        &data,
        &canary,
        &["image", "import", d.to_str().unwrap()],
        "symbolic link",
    );
    let d = extract("host");
    fs::remove_file(d.join(&layer_name)).unwrap();
    symlink(canary.dir.join("victim"), d.join(&layer_name)).unwrap();
    refused(
        &data,
        &canary,
        &["image", "import", d.to_str().unwrap()],
        "symbolic link",
    );
    let d = extract("fifo");
    fs::remove_file(d.join(&layer_name)).unwrap();
    mkfifo(&d.join(&layer_name));
    refused(
        &data,
        &canary,
        &["image", "import", d.to_str().unwrap()],
        "it is a FIFO",
    );
    let d = extract("manifest-zero");
    fs::remove_file(d.join("manifest.json")).unwrap();
    symlink("/dev/zero", d.join("manifest.json")).unwrap();
    refused(
        &data,
        &canary,
        &["image", "import", d.to_str().unwrap()],
        "symbolic link",
    );
    // The config is fine and stored first; the layer does not match its diff_id.
    let d = extract("corrupt");
    let mut bytes = fs::read(d.join(&layer_name)).unwrap();
    let n = bytes.len();
    bytes[n - 1030] ^= 0xff;
    fs::write(d.join(&layer_name), bytes).unwrap();
    refused(
        &data,
        &canary,
        &["image", "import", d.to_str().unwrap()],
        "digest mismatch",
    );
    // As a tar: a member that is a symlink out of the archive names nothing in it.
    let tarred = work.path().join("linked.tar");
    {
        let mut b = tar::Builder::new(fs::File::create(&tarred).unwrap());
        let src = extract("for-tar");
        fs::remove_file(src.join(&layer_name)).unwrap();
        symlink("/etc/shadow", src.join(&layer_name)).unwrap();
        b.follow_symlinks(false);
        b.append_dir_all(".", &src).unwrap();
        b.finish().unwrap();
    }
    refused(
        &data,
        &canary,
        &["image", "import", tarred.to_str().unwrap()],
        "missing from the archive",
    );
}

/// Unmounts its path when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A data dir on a 300 MiB tmpfs: cela keeps 256 MiB free, so some 44 MiB may be used.
fn small_store(work: &Path) -> (PathBuf, Unmount) {
    let data = work.join("data");
    fs::create_dir(&data).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=300m", "tmpfs"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs failed");
    let unmount = Unmount(data.clone());
    cela_ok(&data, &["image", "ls"]);
    (data, unmount)
}

/// A layer of one file of `size` zeros (gzip makes it about a thousandth of that).
fn zeros_layer(size: usize) -> Layer {
    let zeros = vec![0u8; size];
    hostile_layer(&[file("zeros", &zeros, 0o644)])
}

#[test]
fn a_compression_bomb_stops_before_it_fills_the_store() {
    root_required();
    let work = tempfile::tempdir().unwrap();
    let canary = Canary::new(work.path());
    let (data, _unmount) = small_store(work.path());
    // 200 MiB of zeros in a tar member, gzipped to some 200 KiB.
    let bomb = work.path().join("bomb.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            fs::File::create(&bomb).unwrap(),
            flate2::Compression::best(),
        );
        let mut b = tar::Builder::new(gz);
        let mut hd = tar::Header::new_gnu();
        hd.set_size(200 << 20);
        hd.set_mode(0o644);
        hd.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut hd, "zeros", std::io::repeat(0).take(200 << 20))
            .unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    assert!(fs::metadata(&bomb).unwrap().len() < 1 << 20);
    refused(
        &data,
        &canary,
        &["image", "import", bomb.to_str().unwrap()],
        "bytes free for the store",
    );

    // The same bomb as a layer of an image: stored compressed (some 200 KiB), it is refused
    // when `cela run` unpacks it, and leaves no layer, no instance, nothing in tmp/.
    let image = TestImage::new(vec![busybox_layer(), zeros_layer(200 << 20)], &["/bin/sh"]);
    let layout = work.path().join("bomb-layout");
    image.write_layout(&layout, "bomb");
    cela_ok(
        &data,
        &[
            "image",
            "import",
            "--name",
            "bomb",
            layout.to_str().unwrap(),
        ],
    );
    let bomb_dir = data
        .join("images/layers")
        .join(image.layers[1].digest().hex());
    refused(
        &data,
        &canary,
        &["run", "--rm", "bomb", "true"],
        "refused: it unpacks to more than",
    );
    assert!(
        !bomb_dir.exists(),
        "the bomb's layer was left half-unpacked"
    );
    let ps: serde_json::Value =
        serde_json::from_str(&cela_ok(&data, &["ps", "-a", "--format", "json"])).unwrap();
    assert_eq!(ps, serde_json::json!([]), "an instance was left");
}

#[test]
fn layers_with_giant_long_names_or_pax_headers_are_refused_when_unpacked() {
    // The `tar` crate reads a GNU long name or a PAX header whole into memory: 64 MiB of
    // either (gzipped to some 64 KiB) is refused at 1 MiB, as Go's archive/tar does.
    root_required();
    let work = tempfile::tempdir().unwrap();
    let canary = Canary::new(work.path());
    let data = seeded_store(work.path(), "data");
    let big = vec![b'a'; 64 << 20];
    for (kind, what) in [
        (
            tar::EntryType::GNULongName,
            "GNU long name of 67108864 bytes",
        ),
        (
            tar::EntryType::XHeader,
            "PAX extended header of 67108864 bytes",
        ),
    ] {
        let giant = H {
            data: &big,
            ..h("././@LongLink", kind, 0o644)
        };
        let image = TestImage::new(
            vec![
                busybox_layer(),
                hostile_layer(&[giant, file("after", b"x", 0o644)]),
            ],
            &["/bin/sh"],
        );
        let layout = work.path().join(format!("layout-{}", kind.as_byte()));
        image.write_layout(&layout, "giant");
        cela_ok(
            &data,
            &[
                "image",
                "import",
                "--name",
                "giant",
                layout.to_str().unwrap(),
            ],
        );
        refused(&data, &canary, &["run", "--rm", "giant", "true"], what);
        cela_ok(&data, &["image", "rm", "giant"]);
    }
}
