//! Hostile layers against the host: modes, owners and times through links placed by the
//! layer, extended attributes a layer must not set, sparse files that must not lose data.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use super::*;

/// One entry with full control of its header.
struct H<'a> {
    name: &'a str,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    data: &'a [u8],
    link: &'a str,
    pax: Vec<(&'a str, &'a [u8])>,
}

fn h<'a>(name: &'a str, kind: tar::EntryType, mode: u32) -> H<'a> {
    H {
        name,
        kind,
        mode,
        uid: 0,
        data: b"",
        link: "",
        pax: Vec::new(),
    }
}

fn dir(name: &str, mode: u32) -> H<'_> {
    h(name, tar::EntryType::Directory, mode)
}

fn symlink<'a>(name: &'a str, target: &'a str) -> H<'a> {
    H {
        link: target,
        ..h(name, tar::EntryType::Symlink, 0o777)
    }
}

fn file<'a>(name: &'a str, data: &'a [u8], mode: u32) -> H<'a> {
    H {
        data,
        ..h(name, tar::EntryType::Regular, mode)
    }
}

/// PAX records: `LEN key=value\n`, LEN counting itself.
fn pax_records(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3;
        let mut len = body + body.to_string().len();
        if len.to_string().len() + body != len {
            len += 1;
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

fn layer(entries: &[H]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.pax.is_empty() {
            let data = pax_records(&e.pax);
            let mut x = tar::Header::new_ustar();
            x.set_path("PaxHeaders/x").unwrap();
            x.set_entry_type(tar::EntryType::XHeader);
            x.set_size(data.len() as u64);
            x.set_cksum();
            b.append(&x, &data[..]).unwrap();
        }
        let mut hd = tar::Header::new_gnu();
        let raw = &mut hd.as_old_mut().name;
        raw[..e.name.len()].copy_from_slice(e.name.as_bytes());
        hd.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        hd.set_entry_type(e.kind);
        hd.set_mode(e.mode);
        hd.set_uid(e.uid);
        hd.set_gid(e.uid);
        hd.set_size(e.data.len() as u64);
        hd.set_mtime(1_700_000_000);
        hd.set_cksum();
        b.append(&hd, e.data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A root to unpack into and, beside it, a canary the layers aim at: a file and a directory
/// of known mode, owner and time.
struct Canary {
    dir: tempfile::TempDir,
    n: usize,
}

const VICTIM_MTIME: i64 = 1_500_000_000;

impl Canary {
    fn new() -> Canary {
        let dir = tempfile::tempdir().unwrap();
        for d in ["root", "outside/vdir/q", "blobs"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let out = dir.path().join("outside");
        fs::write(out.join("victim"), b"victim").unwrap();
        fs::set_permissions(out.join("victim"), fs::Permissions::from_mode(0o644)).unwrap();
        for d in ["vdir", "vdir/q"] {
            fs::set_permissions(out.join(d), fs::Permissions::from_mode(0o750)).unwrap();
        }
        for p in ["victim", "vdir", "vdir/q"] {
            let f = fs::File::open(out.join(p)).unwrap();
            tree::set_times(f.as_fd(), VICTIM_MTIME as u64).unwrap();
        }
        Canary { dir, n: 0 }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn outside(&self) -> String {
        self.dir.path().join("outside").display().to_string()
    }

    fn apply(&mut self, entries: &[H], mode: Whiteouts) -> Result<UnpackStats, ImageError> {
        self.n += 1;
        let p = self.dir.path().join(format!("blobs/{}", self.n));
        fs::write(&p, layer(entries)).unwrap();
        apply_layer(&p, "hostile layer", &self.root(), mode)
    }

    /// Panics if anything outside the root changed.
    fn check(&self, what: &str) {
        let out = self.dir.path().join("outside");
        let names: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{what}: outside/ now holds {names:?}");
        for (p, mode) in [("victim", 0o100644), ("vdir", 0o40750), ("vdir/q", 0o40750)] {
            let m = fs::symlink_metadata(out.join(p)).unwrap();
            assert_eq!(m.mode(), mode, "{what}: mode of {p} is now {:o}", m.mode());
            assert_eq!((m.uid(), m.gid()), (0, 0), "{what}: owner of {p}");
            assert_eq!(m.mtime(), VICTIM_MTIME, "{what}: time of {p}");
        }
        assert_eq!(fs::read(out.join("victim")).unwrap(), b"victim", "{what}");
        assert_eq!(
            fs::read_dir(out.join("vdir/q")).unwrap().count(),
            0,
            "{what}"
        );
    }
}

#[test]
fn deferred_directory_modes_never_reach_through_a_later_symlink() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (owners, nodes)"
    );
    for mode in [Whiteouts::Apply, Whiteouts::Overlay] {
        let c = Canary::new();
        let out = c.outside();
        let victim = format!("{out}/victim");
        let vdir = format!("{out}/vdir");
        let attacks: Vec<(&str, Vec<H>)> = vec![
            (
                "setuid on a host file",
                vec![dir("a/", 0o4755), symlink("a", &victim)],
            ),
            (
                "0777 on a host directory",
                vec![dir("d/", 0o777), symlink("d", &vdir)],
            ),
            (
                "a relative link climbing out",
                vec![dir("r/", 0o6777), symlink("r", "../../outside/victim")],
            ),
            (
                "a parent swapped for a link",
                vec![dir("p/", 0o755), dir("p/q/", 0o777), symlink("p", &vdir)],
            ),
            (
                "replaced twice",
                vec![
                    dir("t/", 0o777),
                    symlink("t", &vdir),
                    dir("t/", 0o755),
                    symlink("t", &victim),
                ],
            ),
            (
                "owner of a file through its link",
                vec![
                    symlink("f", &victim),
                    H {
                        uid: 4242,
                        ..file("f", b"mine", 0o4777)
                    },
                ],
            ),
            (
                "a FIFO in place of a link",
                vec![symlink("n", &vdir), h("n", tar::EntryType::Fifo, 0o777)],
            ),
            (
                "a hard link to a link",
                vec![symlink("s", &victim), h("hl", tar::EntryType::Link, 0o4777)],
            ),
        ];
        let mut c = c;
        for (what, mut entries) in attacks {
            if what == "a hard link to a link" {
                entries[1].link = "s";
            }
            let r = c.apply(&entries, mode);
            c.check(&format!("{mode:?}: {what}: {r:?}"));
        }
        // What the layer asked for inside the root did happen.
        let m = fs::symlink_metadata(c.root().join("f")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o4777, 4242));
        assert!(
            fs::symlink_metadata(c.root().join("a"))
                .unwrap()
                .is_symlink()
        );
    }
}

#[test]
fn flattened_layers_keep_modes_inside_and_never_outside() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (owners)"
    );
    let mut c = Canary::new();
    let victim = format!("{}/victim", c.outside());
    c.apply(&[dir("a/", 0o755), dir("keep/", 0o700)], Whiteouts::Apply)
        .unwrap();
    // The next layer changes a directory below it, then swaps it for a link.
    c.apply(
        &[
            dir("a/", 0o4777),
            symlink("a", &victim),
            dir("keep/", 0o750),
        ],
        Whiteouts::Apply,
    )
    .unwrap();
    c.check("two flattened layers");
    let m = fs::metadata(c.root().join("keep")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o750);
    assert_eq!(m.mtime(), 1_700_000_000);
}

/// A valid `security.capability` value (VFS_CAP_REVISION_2, effective, CAP_NET_RAW).
fn cap_net_raw() -> Vec<u8> {
    let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
    for w in [1u32 << 13, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

#[test]
fn a_layer_sets_only_the_xattrs_of_the_allow_list() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (trusted.* xattrs)"
    );
    let cap = cap_net_raw();
    let bad: Vec<(&str, &[u8])> = vec![
        ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
        ("SCHILY.xattr.trusted.overlay.metacopy", b""),
        ("SCHILY.xattr.trusted.other", b"x"),
        ("SCHILY.xattr.user.overlay.opaque", b"y"),
        (
            "SCHILY.xattr.security.selinux",
            b"system_u:object_r:shadow_t:s0",
        ),
        ("SCHILY.xattr.security.ima", b"x"),
    ];
    let mut with_good = bad.clone();
    with_good.push(("SCHILY.xattr.user.note", b"hello"));
    with_good.push(("SCHILY.xattr.security.capability", &cap));
    for mode in [Whiteouts::Apply, Whiteouts::Overlay] {
        let mut c = Canary::new();
        let stats = c
            .apply(
                &[
                    H {
                        pax: with_good.clone(),
                        ..dir("d/", 0o755)
                    },
                    H {
                        pax: with_good.clone(),
                        ..file("d/ping", b"\x7fELF", 0o755)
                    },
                    H {
                        pax: bad.clone(),
                        ..h("d/fifo", tar::EntryType::Fifo, 0o644)
                    },
                ],
                mode,
            )
            .unwrap();
        let (d, f) = (c.root().join("d"), c.root().join("d/ping"));
        for (p, name) in [
            (&d, "d"),
            (&f, "d/ping"),
            (&c.root().join("d/fifo"), "d/fifo"),
        ] {
            for (k, _) in &bad {
                let k = k.trim_start_matches("SCHILY.xattr.");
                assert_eq!(xattr(p, k), None, "{mode:?}: {name} got {k}");
            }
        }
        assert_eq!(xattr(&f, "user.note").as_deref(), Some(&b"hello"[..]));
        assert_eq!(xattr(&d, "user.note").as_deref(), Some(&b"hello"[..]));
        assert_eq!(
            xattr(&f, "security.capability"),
            Some(cap.clone()),
            "{mode:?}"
        );
        // The directory's security.capability is refused by the kernel, the rest dropped here.
        assert_eq!(stats.dropped_xattrs, 3 * bad.len() as u64, "{mode:?}");
        // Only a whiteout makes a directory opaque.
        let opaque = c.apply(
            &[
                dir("o/", 0o755),
                H {
                    pax: vec![("SCHILY.xattr.trusted.overlay.opaque", b"y")],
                    ..dir("o/", 0o755)
                },
            ],
            mode,
        );
        opaque.unwrap();
        assert_eq!(xattr(&c.root().join("o"), "trusted.overlay.opaque"), None);
        c.check(&format!("{mode:?} xattrs"));
    }
}

/// A 9 MiB file with data at its start, 4 MiB in, and at its very end; holes between.
fn sparse_source(dir: &Path) -> Vec<u8> {
    let mut content = vec![0u8; 9 << 20];
    content[..5].copy_from_slice(b"start");
    for (i, b) in content[4 << 20..(4 << 20) + 10_000].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    let n = content.len();
    content[n - 3..].copy_from_slice(b"end");
    let f = dir.join("sparse");
    let mut out = fs::File::create(&f).unwrap();
    sparse::copy_holey(&mut &content[..], &mut out).unwrap();
    assert!(
        fs::metadata(&f).unwrap().blocks() * 512 < 1 << 20,
        "source not sparse"
    );
    content
}

#[test]
fn sparse_files_from_gnu_tar_unpack_whole_with_their_holes() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    let content = sparse_source(&src);
    let formats: [(&str, &[&str]); 4] = [
        ("gnu", &["--format=gnu"]),
        ("posix 0.0", &["--format=posix", "--sparse-version=0.0"]),
        ("posix 0.1", &["--format=posix", "--sparse-version=0.1"]),
        ("posix 1.0", &["--format=posix", "--sparse-version=1.0"]),
    ];
    for (what, args) in formats {
        for mode in [Whiteouts::Apply, Whiteouts::Overlay] {
            let blob = work.path().join("layer.tar");
            let st = Command::new("tar")
                .args(args)
                .args(["--sparse", "-C"])
                .arg(&src)
                .arg("-cf")
                .arg(&blob)
                .arg("sparse")
                .status()
                .expect("GNU tar is needed to write sparse layers (apt-get install tar)");
            assert!(st.success(), "{what}: tar failed");
            assert!(
                fs::metadata(&blob).unwrap().len() < 1 << 20,
                "{what}: GNU tar did not write a sparse entry"
            );
            let root = work.path().join(format!("root-{what}-{mode:?}"));
            fs::create_dir(&root).unwrap();
            apply_layer(&blob, what, &root, mode).unwrap();
            let names: Vec<_> = fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["sparse"], "{what}: {names:?}");
            let out = root.join("sparse");
            assert!(
                fs::read(&out).unwrap() == content,
                "{what} {mode:?}: the bytes differ"
            );
            let used = fs::metadata(&out).unwrap().blocks() * 512;
            assert!(
                used < 1 << 20,
                "{what}: {used} bytes allocated: the holes were filled"
            );
        }
    }
}

#[test]
fn hostile_sparse_maps_and_unknown_entry_types_are_refused() {
    let mut c = Canary::new();
    let mut map = b"1\n0\n900\n".to_vec();
    map.resize(512, 0);
    map.extend_from_slice(&[7u8; 100]);
    let past_end = [
        ("GNU.sparse.major", &b"1"[..]),
        ("GNU.sparse.minor", b"0"),
        ("GNU.sparse.name", b"f"),
        ("GNU.sparse.realsize", b"50"),
    ];
    let cases: Vec<(&str, H)> = vec![
        (
            "a 1.0 map larger than its data",
            H {
                pax: past_end.to_vec(),
                ..file("GNUSparseFile.0/f", &map, 0o644)
            },
        ),
        (
            "a 0.1 map past the file's size",
            H {
                pax: vec![("GNU.sparse.size", b"10"), ("GNU.sparse.map", b"5,100")],
                ..file("g", &[1u8; 100], 0o644)
            },
        ),
        (
            "a sparse name climbing out",
            H {
                pax: vec![
                    ("GNU.sparse.size", b"1"),
                    ("GNU.sparse.map", b"0,1"),
                    ("GNU.sparse.name", b"../outside/victim"),
                ],
                ..file("h", b"x", 0o644)
            },
        ),
        (
            "a volume label",
            h("label", tar::EntryType::new(b'V'), 0o644),
        ),
        ("an unknown type", h("z", tar::EntryType::new(b'Z'), 0o644)),
    ];
    for (what, e) in cases {
        for mode in [Whiteouts::Apply, Whiteouts::Overlay] {
            let err = c.apply(std::slice::from_ref(&e), mode).unwrap_err();
            assert!(
                matches!(err, ImageError::HostileEntry { .. }),
                "{what}: {err}"
            );
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        c.check(what);
    }
}
