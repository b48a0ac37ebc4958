//! Fixtures of `hostile_images.rs`: a canary directory outside the data dir and its snapshot,
//! the store's observable state, a bounded run of a refused command, layers with full control
//! of every header (modes, owners, links, PAX xattrs), and the images a hostile registry serves.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cela_image::Store;

use crate::images::*;

/// A snapshot entry: mode, uid, gid, mtime, size, content.
pub type Seen = (u32, u32, u32, i64, u64, Vec<u8>);

// ---------------------------------------------------------------------------------------------
// The canary and the store's state.

/// Files and directories outside the data dir that attacks aim at.
pub struct Canary {
    pub dir: PathBuf,
}

pub const CANARY_MTIME: i64 = 1_500_000_000;

impl Canary {
    pub fn new(work: &Path) -> Canary {
        let dir = work.join("canary");
        fs::create_dir_all(dir.join("vdir/sub")).unwrap();
        fs::write(dir.join("victim"), b"host file\n").unwrap();
        fs::write(dir.join("vdir/sub/inner"), b"inner\n").unwrap();
        for (p, mode) in [("victim", 0o644), ("vdir", 0o750), ("vdir/sub", 0o700)] {
            fs::set_permissions(dir.join(p), fs::Permissions::from_mode(mode)).unwrap();
        }
        let c = Canary { dir };
        for p in ["victim", "vdir/sub/inner", "vdir/sub", "vdir"] {
            c.touch(p);
        }
        c
    }

    pub fn touch(&self, p: &str) {
        let st = Command::new("touch")
            .args(["-h", "-d", &format!("@{CANARY_MTIME}")])
            .arg(self.dir.join(p))
            .status()
            .expect("touch runs");
        assert!(st.success());
    }

    pub fn path(&self, p: &str) -> String {
        self.dir.join(p).display().to_string()
    }

    /// Mode, owner, time, size and content of everything in the canary.
    pub fn snapshot(&self) -> BTreeMap<String, Seen> {
        fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, Seen>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let m = fs::symlink_metadata(&p).unwrap();
                let content = if m.is_file() {
                    fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                let key = p.strip_prefix(base).unwrap().display().to_string();
                out.insert(
                    key,
                    (m.mode(), m.uid(), m.gid(), m.mtime(), m.len(), content),
                );
                if m.is_dir() {
                    walk(&p, base, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.dir, &self.dir, &mut out);
        out
    }
}

/// What must not change when an attack is refused: blobs, records, tmp/.
pub fn store_state(data: &Path) -> (Vec<String>, Vec<serde_json::Value>, usize) {
    (stored_blobs(data), ls_json(data), tmp_entries(data))
}

/// A data dir holding one good image, so "unchanged" means more than "empty".
pub fn seeded_store(work: &Path, name: &str) -> PathBuf {
    let data = work.join(name);
    let layout = work.join(format!("{name}-seed"));
    TestImage::new(vec![busybox_layer()], &["/bin/sh"]).write_layout(&layout, "seed");
    cela_ok(
        &data,
        &[
            "image",
            "import",
            "--name",
            "seed:1",
            layout.to_str().unwrap(),
        ],
    );
    data
}

/// Runs a refused command: one error line containing `needle`, status 125, nothing changed in
/// the store or the canary. Bounded in time, so a read that blocks fails the test.
pub fn refused(data: &Path, canary: &Canary, args: &[&str], needle: &str) {
    let before = (store_state(data), canary.snapshot());
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cela"))
        .args(args)
        .env("CELA_DATA_DIR", data)
        .env(DEFAULT_NETWORK.0, DEFAULT_NETWORK.1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cela runs");
    let deadline = Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > deadline {
            child.kill().unwrap();
            panic!("cela {args:?} ran for more than {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(125), "cela {args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "cela {args:?}: not one line: {err}");
    assert!(lines[0].starts_with("cela: error: "), "{err}");
    assert!(
        lines[0].contains(needle),
        "cela {args:?}: expected {needle:?} in {err}"
    );
    let after = (store_state(data), canary.snapshot());
    assert_eq!(before.0, after.0, "cela {args:?} changed the store: {err}");
    assert_eq!(before.1, after.1, "cela {args:?} changed the canary");
}

// ---------------------------------------------------------------------------------------------
// Layers with full control of every header.

pub struct H<'a> {
    pub name: &'a str,
    pub kind: tar::EntryType,
    pub mode: u32,
    pub uid: u64,
    pub data: &'a [u8],
    pub link: &'a str,
    pub xattrs: Vec<(&'a str, &'a [u8])>,
}

pub fn h(name: &str, kind: tar::EntryType, mode: u32) -> H<'_> {
    H {
        name,
        kind,
        mode,
        uid: 0,
        data: b"",
        link: "",
        xattrs: Vec::new(),
    }
}

pub fn dir(name: &str, mode: u32) -> H<'_> {
    h(name, tar::EntryType::Directory, mode)
}

pub fn link<'a>(name: &'a str, target: &'a str) -> H<'a> {
    H {
        link: target,
        ..h(name, tar::EntryType::Symlink, 0o777)
    }
}

pub fn file<'a>(name: &'a str, data: &'a [u8], mode: u32) -> H<'a> {
    H {
        data,
        ..h(name, tar::EntryType::Regular, mode)
    }
}

pub fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
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

pub fn hostile_layer(entries: &[H]) -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.xattrs.is_empty() {
            let recs: Vec<(String, &[u8])> = e
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            let recs: Vec<(&str, &[u8])> = recs.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let data = pax(&recs);
            let mut x = tar::Header::new_ustar();
            x.set_path("PaxHeaders/x").unwrap();
            x.set_entry_type(tar::EntryType::XHeader);
            x.set_size(data.len() as u64);
            x.set_cksum();
            b.append(&x, &data[..]).unwrap();
        }
        let mut hd = tar::Header::new_gnu();
        hd.as_old_mut().name[..e.name.len()].copy_from_slice(e.name.as_bytes());
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
    Layer::gzipped(b.into_inner().unwrap())
}

/// Imports an image of `layers` through the CLI and unpacks it both ways the instance code
/// does: flattened (microVM disks) and as OverlayFS lower directories (containers).
pub fn import_and_unpack(
    work: &Path,
    data: &Path,
    name: &str,
    layers: Vec<Layer>,
) -> (PathBuf, Vec<PathBuf>) {
    let layout = work.join(format!("{name}-layout"));
    TestImage::new(layers, &["/bin/sh"]).write_layout(&layout, "latest");
    cela_ok(
        data,
        &["image", "import", "--name", name, layout.to_str().unwrap()],
    );
    let store = Store::open(data).unwrap();
    let rec = store.resolve(name).unwrap();
    let flat = work.join(format!("{name}-flat"));
    fs::create_dir(&flat).unwrap();
    cela_image::flatten(&store, &rec, &flat).unwrap();
    let dirs = cela_image::layer_dirs(&store, &rec).unwrap();
    (flat, dirs)
}

pub fn root_required() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the hostile image tests need root (owners, device nodes, trusted.* xattrs)"
    );
}

pub fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    nix::sys::stat::lstat(path).ok()?;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

/// A config and one layer as a registry would serve them, with the manifest's layer size
/// declared as `declared` (the real one if `None`).
pub fn served_image(declared: Option<u64>) -> (TestImage, Vec<u8>) {
    // A layer of its own: nothing of it is in the seeded store.
    let image = TestImage::new(
        vec![hostile_layer(&[file(
            "served",
            b"from the registry",
            0o644,
        )])],
        &["/bin/sh"],
    );
    let mut m: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
    if let Some(size) = declared {
        m["layers"][0]["size"] = size.into();
    }
    (image, serde_json::to_vec(&m).unwrap())
}

pub fn manifest_type() -> &'static str {
    "application/vnd.oci.image.manifest.v1+json"
}

pub fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
}
