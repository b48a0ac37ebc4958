//! Fuzzes layer unpacking (cela-image's `unpack`) with hostile tars: names and link targets
//! built from `..`, `.`, absolute paths, whiteout names and a path to a directory outside the
//! root, as files, directories, symlinks, hard links and FIFOs with plain or setuid/0777 modes,
//! over two stacked layers, in both whiteout modes. Whatever the layers hold, unpacking must not
//! panic and nothing outside the root may change: names, content, modes or times (a directory
//! entry followed by a symlink in its place must not carry its mode to the link's target). Run: `cargo +nightly fuzz run image_layer` in this directory (as root, so
//! the OverlayFS mode can make its markers).

#![no_main]

use std::fs;
use std::path::Path;

use cela_image::unpack::{Whiteouts, apply_layer};
use libfuzzer_sys::fuzz_target;

/// Path components the fuzzer picks from; `OUT` stands for the absolute path outside the root.
const PARTS: [&str; 12] = [
    "a", "b", "..", ".", "etc", ".wh.a", ".wh..wh..opq", ".wh.b", "OUT", "c", "", "lib",
];

fn path(bytes: &[u8], outside: &str) -> String {
    let Some((&head, rest)) = bytes.split_first() else {
        return "a".into();
    };
    let mut parts: Vec<&str> = rest
        .iter()
        .take(1 + (head as usize & 3))
        .map(|b| PARTS[*b as usize % PARTS.len()])
        .collect();
    if parts.is_empty() {
        parts.push("a");
    }
    let joined = parts.join("/").replace("OUT", outside.trim_start_matches('/'));
    if head & 0x80 != 0 { format!("/{joined}") } else { joined }
}

/// A tar from fuzz bytes: each entry is [kind, name (5 bytes), link (5 bytes), data len].
fn tar(bytes: &[u8], outside: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in bytes.chunks(12).filter(|c| c.len() == 12) {
        let name = path(&e[1..6], outside);
        let link = path(&e[6..11], outside);
        let data = vec![b'x'; e[11] as usize % 16];
        let kind = match e[0] % 5 {
            0 => tar::EntryType::Regular,
            1 => tar::EntryType::Directory,
            2 => tar::EntryType::Symlink,
            3 => tar::EntryType::Link,
            _ => tar::EntryType::Fifo,
        };
        let mut h = tar::Header::new_gnu();
        // Raw names, unchecked: the point is names a careful writer would refuse.
        let raw = &mut h.as_old_mut().name;
        let n = name.len().min(raw.len());
        raw[..n].copy_from_slice(&name.as_bytes()[..n]);
        let l = &mut h.as_old_mut().linkname;
        let n = link.len().min(l.len());
        l[..n].copy_from_slice(&link.as_bytes()[..n]);
        h.set_entry_type(kind);
        h.set_mode(if e[11] & 0x80 != 0 { 0o4777 } else { 0o755 });
        h.set_mtime(1_700_000_000);
        let data: &[u8] = if kind == tar::EntryType::Regular { &data } else { &[] };
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn untouched(outside: &Path, before: &[(u32, i64); 2]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let names: Vec<_> = fs::read_dir(outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    let meta = |p: &Path| fs::symlink_metadata(p).map(|m| (m.mode(), m.mtime())).ok();
    names.len() == 1
        && fs::symlink_metadata(outside.join("victim")).is_ok_and(|m| m.is_file())
        && fs::read(outside.join("victim")).unwrap() == b"victim"
        && meta(&outside.join("victim")) == Some(before[0])
        && meta(outside) == Some(before[1])
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), b"victim").unwrap();
    let snap = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = fs::symlink_metadata(p).unwrap();
        (m.mode(), m.mtime())
    };
    let before = [snap(&outside.join("victim")), snap(&outside)];
    let out_str = outside.display().to_string();
    let half = (data.len() / 24) * 12;
    let layers = [tar(&data[..half], &out_str), tar(&data[half..], &out_str)];
    for (i, l) in layers.iter().enumerate() {
        fs::write(dir.path().join(format!("layer{i}")), l).unwrap();
    }
    for (mode, root) in [(Whiteouts::Apply, "flat"), (Whiteouts::Overlay, "ovl")] {
        let root = dir.path().join(root);
        fs::create_dir(&root).unwrap();
        for i in 0..2 {
            let blob = dir.path().join(format!("layer{i}"));
            // Errors are fine (hostile entries are refused); escapes and panics are not.
            let _ = apply_layer(&blob, "fuzz", &root, mode);
            assert!(untouched(&outside, &before), "{mode:?}: a write escaped the root");
        }
    }
    let top: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top.len(), 5, "something was created next to the root: {top:?}");
});
