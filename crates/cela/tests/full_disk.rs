//! A full disk: the data dir on a small tmpfs, filled to the last byte, then `image import`,
//! `run` and `run -d` must fail with an error that says so, store nothing half-made (no image,
//! instance, layer or temporary file), and work again once space is back. As root (mounts).

mod images;

use std::path::Path;

use images::*;

/// Files under `dir`, recursively (paths relative to it), lock files aside.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else if p.file_name().is_none_or(|n| n != ".lock") {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("cela-full-")
            .tempdir()
            .unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .unwrap();
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Fills the file system of `path` with one file until ENOSPC.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 1 << 16];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial page too.
    while f.write(&[0x5a]).is_ok_and(|n| n == 1) {}
}

#[test]
fn a_full_disk_fails_clearly_stores_nothing_half_made_and_work_resumes() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a tmpfs, which takes root"
    );
    // Above the 256 MiB the store keeps free when it unpacks a layer (its bomb guard).
    let fs = Tmpfs::new("300m");
    let data = fs.0.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    test_image().write_layout(&layout, "latest");
    let layout = layout.to_str().unwrap();
    cela_ok(
        &data,
        &["image", "import", layout, "--name", "testimg:latest"],
    );
    assert_eq!(
        cela_ok(&data, &["run", "--rm", "testimg", "echo", "before"]),
        "before\n"
    );
    let before = files(&data);

    let filler = fs.0.path().join("filler");
    fill(&filler);
    for args in [
        vec!["image", "import", layout, "--name", "other:1"],
        vec!["run", "--rm", "testimg", "echo", "full"],
        vec!["run", "-d", "--name", "full", "testimg", "sleep", "600"],
    ] {
        let out = cela_in(&data, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "cela {args:?} succeeded on a full disk"
        );
        assert!(
            err.contains("No space left on device") || err.contains("too little space"),
            "cela {args:?} on a full disk: {err}"
        );
        assert!(
            err.lines().count() <= 3,
            "cela {args:?}: not a short error: {err}"
        );
        assert_eq!(files(&data), before, "cela {args:?} left files behind");
    }
    assert_eq!(
        cela_ok(&data, &["ps", "-a", "--format", "json"]).trim(),
        "[]"
    );
    let images = cela_ok(&data, &["image", "ls"]);
    assert!(!images.contains("other"), "{images}");

    // Space back: everything works again.
    std::fs::remove_file(&filler).unwrap();
    cela_ok(&data, &["image", "import", layout, "--name", "other:1"]);
    assert_eq!(
        cela_ok(&data, &["run", "--rm", "other:1", "echo", "after"]),
        "after\n"
    );
}
