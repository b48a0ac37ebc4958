//! Unpacking tests: whiteouts, hostile names and links, compression.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::*;

/// One tar entry to build: a raw name (not validated, so hostile names can be written).
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

fn tar_bytes(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_old();
        let (name, data, kind, link): (&str, &[u8], tar::EntryType, Option<&str>) = match e {
            E::Dir(n) => (n, b"", tar::EntryType::Directory, None),
            E::File(n, d) => (n, d, tar::EntryType::Regular, None),
            E::Symlink(n, t) => (n, b"", tar::EntryType::Symlink, Some(t)),
            E::HardLink(n, t) => (n, b"", tar::EntryType::Link, Some(t)),
        };
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(t) = link {
            h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    blobs: PathBuf,
    n: usize,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        let blobs = dir.path().join("blobs");
        for d in [&root, &outside, &blobs] {
            fs::create_dir(d).unwrap();
        }
        World {
            _dir: dir,
            root,
            outside,
            blobs,
            n: 0,
        }
    }

    fn layer_bytes(&mut self, bytes: &[u8]) -> PathBuf {
        self.n += 1;
        let p = self.blobs.join(self.n.to_string());
        fs::write(&p, bytes).unwrap();
        p
    }

    fn apply(&mut self, entries: &[E]) -> Result<UnpackStats, ImageError> {
        let p = self.layer_bytes(&tar_bytes(entries));
        apply_layer(&p, "test layer", &self.root, Whiteouts::Apply)
    }

    fn outside_is_empty(&self) -> bool {
        fs::read_dir(&self.outside).unwrap().next().is_none()
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn whiteouts_delete_from_lower_layers_and_opaque_dirs_hide_them() {
    let mut w = World::new();
    w.apply(&[
        E::Dir("a/"),
        E::File("a/x", b"x"),
        E::File("a/y", b"y"),
        E::Dir("b/"),
        E::File("b/old", b"old"),
        E::Dir("b/sub/"),
        E::File("b/sub/deep", b"d"),
    ])
    .unwrap();
    let stats = w
        .apply(&[
            E::File("a/.wh.x", b""),
            E::Dir("b/"),
            E::File("b/new", b"new"),
            E::File("b/.wh..wh..opq", b""),
            // A whiteout never hides an entry of its own layer.
            E::File("a/z", b"z"),
            E::File("a/.wh.z", b""),
        ])
        .unwrap();
    assert_eq!(names(&w.root.join("a")), ["y", "z"]);
    assert_eq!(names(&w.root.join("b")), ["new"]);
    assert_eq!(stats.whiteouts, 3);
    // Whiteout files themselves never appear.
    assert!(!w.root.join("a/.wh.x").exists());
}

#[test]
fn dot_dot_is_refused_and_absolute_names_stay_inside() {
    let mut w = World::new();
    let e = w.apply(&[E::File("../outside/evil", b"x")]).unwrap_err();
    assert!(matches!(e, ImageError::HostileEntry { .. }), "{e}");
    assert!(e.to_string().contains("../outside/evil"), "{e}");
    let e = w
        .apply(&[E::File("a/../../outside/evil", b"x")])
        .unwrap_err();
    assert!(e.to_string().contains("climb out"), "{e}");
    assert!(w.outside_is_empty());

    let abs = format!("{}/abs", w.outside.display());
    w.apply(&[E::File("/etc/passwd", b"root"), E::File(&abs, b"x")])
        .unwrap();
    assert_eq!(fs::read(w.root.join("etc/passwd")).unwrap(), b"root");
    assert!(w.root.join(abs.trim_start_matches('/')).is_file());
    assert!(w.outside_is_empty());
}

#[test]
fn whiteouts_do_not_reach_through_a_lower_layers_symlink() {
    // Below: `a` is a link to `b`, a real directory with files. The layer above makes `a` a
    // directory of its own and hides things in it: what `b` holds stays, as in OverlayFS.
    let mut w = World::new();
    w.apply(&[
        E::Dir("b/"),
        E::File("b/keep", b"k"),
        E::File("b/x", b"x"),
        E::Symlink("a", "b"),
        E::Symlink("c", "/b"),
    ])
    .unwrap();
    let stats = w
        .apply(&[
            E::Dir("a/"),
            E::File("a/.wh.x", b""),
            E::File("a/.wh..wh..opq", b""),
            E::File("a/new", b"n"),
            // The directory may come after the whiteout inside it.
            E::File("c/.wh.keep", b""),
            E::Dir("c/"),
        ])
        .unwrap();
    assert_eq!(names(&w.root.join("b")), ["keep", "x"]);
    assert!(fs::symlink_metadata(w.root.join("a")).unwrap().is_dir());
    assert_eq!(names(&w.root.join("a")), ["new"]);
    assert!(fs::symlink_metadata(w.root.join("c")).unwrap().is_dir());
    assert_eq!(stats.whiteouts, 0);

    // A layer that does not list the directory hides through the link, as Docker does
    // (merged /usr); a whiteout under a lower file hides nothing and is no error.
    let mut w = World::new();
    w.apply(&[
        E::Dir("usr/"),
        E::Dir("usr/bin/"),
        E::File("usr/bin/sudo", b"s"),
        E::File("usr/bin/sh", b"s"),
        E::Symlink("bin", "usr/bin"),
        E::File("f", b"f"),
    ])
    .unwrap();
    let stats = w
        .apply(&[E::File("bin/.wh.sudo", b""), E::File("f/.wh.x", b"")])
        .unwrap();
    assert_eq!(names(&w.root.join("usr/bin")), ["sh"]);
    assert_eq!(stats.whiteouts, 1);
    assert_eq!(fs::read(w.root.join("f")).unwrap(), b"f");
}

#[test]
fn symlinks_pointing_out_are_followed_inside_the_root() {
    let mut w = World::new();
    let outside = w.outside.display().to_string();
    w.apply(&[
        E::Symlink("up", "../../../../.."),
        E::Symlink("abs", &outside),
        E::Symlink("lib", "usr/lib"),
    ])
    .unwrap();
    // Writing through the links lands inside the root.
    w.apply(&[
        E::File("up/escaped", b"1"),
        E::File("abs/escaped", b"2"),
        E::File("lib/libc.so", b"3"),
    ])
    .unwrap();
    assert!(
        w.outside_is_empty(),
        "a write went through a link to the host"
    );
    assert_eq!(fs::read(w.root.join("escaped")).unwrap(), b"1");
    assert_eq!(
        fs::read(w.root.join(format!("{}/escaped", &outside[1..]))).unwrap(),
        b"2"
    );
    assert_eq!(fs::read(w.root.join("usr/lib/libc.so")).unwrap(), b"3");

    // A file entry replaces a symlink instead of writing through it.
    fs::write(w.outside.join("victim"), b"safe").unwrap();
    let victim = format!("{}/victim", outside);
    w.apply(&[E::Symlink("f", &victim)]).unwrap();
    w.apply(&[E::File("f", b"overwritten?")]).unwrap();
    assert_eq!(fs::read(w.outside.join("victim")).unwrap(), b"safe");
    assert!(fs::symlink_metadata(w.root.join("f")).unwrap().is_file());
}

#[test]
fn hard_links_stay_inside_the_root() {
    let mut w = World::new();
    fs::write(w.outside.join("secret"), b"s").unwrap();
    let e = w
        .apply(&[E::HardLink("h", "../outside/secret")])
        .unwrap_err();
    assert!(e.to_string().contains("climb out"), "{e}");
    let abs = format!("{}/secret", w.outside.display());
    let e = w.apply(&[E::HardLink("h", &abs)]).unwrap_err();
    assert!(e.to_string().contains("not a file in the layer"), "{e}");
    let outside = w.outside.display().to_string();
    let e = w
        .apply(&[E::Symlink("o", &outside), E::HardLink("h", "o/secret")])
        .unwrap_err();
    assert!(e.to_string().contains("not a file in the layer"), "{e}");
    assert_eq!(fs::metadata(w.outside.join("secret")).unwrap().nlink(), 1);

    w.apply(&[
        E::File("bin/busybox", b"bb"),
        E::HardLink("bin/sh", "bin/busybox"),
    ])
    .unwrap();
    let a = fs::metadata(w.root.join("bin/busybox")).unwrap();
    let b = fs::metadata(w.root.join("bin/sh")).unwrap();
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn gzip_zstd_and_plain_layers_unpack_alike() {
    let plain = tar_bytes(&[E::Dir("d/"), E::File("d/f", b"content")]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&plain[..], 3).unwrap();
    assert_eq!(Compression::sniff(&gz), Compression::Gzip);
    assert_eq!(Compression::sniff(&zst), Compression::Zstd);
    assert_eq!(Compression::sniff(&plain), Compression::None);
    for bytes in [plain.clone(), gz, zst] {
        let mut w = World::new();
        let p = w.layer_bytes(&bytes);
        apply_layer(&p, "l", &w.root, Whiteouts::Apply).unwrap();
        assert_eq!(fs::read(w.root.join("d/f")).unwrap(), b"content");
    }
}

#[test]
fn garbage_is_a_damaged_layer_not_a_panic() {
    let mut w = World::new();
    let mut junk = tar_bytes(&[E::File("f", &[7u8; 2000])]);
    junk.truncate(700);
    let p = w.layer_bytes(&junk);
    let e = apply_layer(&p, "layer 1 of x", &w.root, Whiteouts::Apply).unwrap_err();
    assert!(e.to_string().starts_with("layer 1 of x: "), "{e}");
}

#[test]
fn overlay_layers_carry_whiteouts_as_overlayfs_markers() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (whiteout device nodes and trusted.* xattrs)"
    );
    let mut w = World::new();
    let p = w.layer_bytes(&tar_bytes(&[
        E::Dir("etc/"),
        E::File("etc/.wh.motd", b""),
        E::Dir("var/cache/"),
        E::File("var/cache/.wh..wh..opq", b""),
        E::File("var/cache/kept", b"k"),
    ]));
    let stats = apply_layer(&p, "l", &w.root, Whiteouts::Overlay).unwrap();
    assert_eq!(stats.whiteouts, 2);
    let m = fs::symlink_metadata(w.root.join("etc/motd")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), 0);
    let mut buf = [0u8; 4];
    let n = rustix::fs::lgetxattr(w.root.join("var/cache"), "trusted.overlay.opaque", &mut buf)
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(buf[0], b'y');
    assert!(w.root.join("var/cache/kept").is_file());
}
