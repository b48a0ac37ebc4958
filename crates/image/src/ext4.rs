//! An image flattened into an ext4 disk image for microVMs (`--rootfs`), made with e2fsprogs'
//! `mkfs.ext4 -d DIR` (which copies a tree into a new file system without mounting it) and
//! cached in the store by image digest, so each image is flattened once.
//!
//! Size: the tree's allocated bytes plus a quarter, plus 64 MiB for the journal, metadata and
//! some room to write; inodes: twice the tree's entries plus 8192. Files keep their owners and
//! modes when cela runs as root (as `mkfs.ext4 -d` copies them from the tree).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::IoContext;
use crate::progress::Progress;
use crate::rootfs::flatten;
use crate::{ImageError, ImageRecord, Store};

const MIB: u64 = 1 << 20;

/// The ext4 disk of `image`, built on first use. It is shared: open it read-only, or give each
/// instance its own copy with [`instance_disk`].
pub fn rootfs_disk(
    store: &Store,
    image: &ImageRecord,
    progress: &Progress,
) -> Result<PathBuf, ImageError> {
    let dest = store
        .ext4_dir()
        .join(format!("{}.ext4", image.digest.hex()));
    if dest.is_file() {
        return Ok(dest);
    }
    let _lock = store.content_lock()?;
    let step = progress.step(format!(
        "building the ext4 root disk of {}",
        image.digest.short()
    ));
    let tree = tempfile::Builder::new()
        .prefix("flat-")
        .tempdir_in(store.tmp_dir())
        .at("creating a temporary directory in", store.tmp_dir())?;
    let root = tree.path().join("root");
    fs::create_dir(&root).at("creating", &root)?;
    flatten(store, image, &root)?;
    let (bytes, entries) = measure(&root)?;
    let size_mib = (bytes + bytes / 4 + 64 * MIB).div_ceil(MIB);
    let inodes = entries * 2 + 8192;
    let disk = tempfile::Builder::new()
        .prefix("disk-")
        .suffix(".ext4")
        .tempfile_in(store.tmp_dir())
        .at("creating a temporary file in", store.tmp_dir())?;
    make_ext4(&root, disk.path(), size_mib, inodes)?;
    disk.persist(&dest)
        .map_err(|e| e.error)
        .at("storing", &dest)?;
    step.done();
    Ok(dest)
}

/// A private, writable copy of `image`'s ext4 disk at `dest` for one instance (the cached disk
/// is shared by every instance of the image and must only ever be opened read-only). The copy
/// keeps the disk sparse, and shares blocks where the file system can (`cp --reflink=auto`).
pub fn instance_disk(
    store: &Store,
    image: &ImageRecord,
    dest: &Path,
    progress: &Progress,
) -> Result<(), ImageError> {
    let cached = rootfs_disk(store, image, progress)?;
    copy_disk(&cached, dest)
}

/// Copies the disk `src` to `dest` (which must not exist): sparse, sharing blocks where the
/// file system can (`cp --reflink=auto`), owned by the caller with default permissions.
pub fn copy_disk(src: &Path, dest: &Path) -> Result<(), ImageError> {
    let cached = src;
    let out = Command::new("cp")
        .args(["--reflink=auto", "--sparse=always", "--no-preserve=all"])
        .arg(cached)
        .arg(dest)
        .output()
        .map_err(|e| ImageError::Tool {
            command: "cp".into(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            command: format!("cp {} {}", cached.display(), dest.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Runs `mkfs.ext4` to make `disk` (`size_mib` MiB, `inodes` inodes) holding the tree `dir`.
pub fn make_ext4(dir: &Path, disk: &Path, size_mib: u64, inodes: u64) -> Result<(), ImageError> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args([
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-m",
        "0",
        "-L",
        "cela-root",
    ])
    .arg("-N")
    .arg(inodes.to_string())
    .arg("-d")
    .arg(dir)
    .arg(disk)
    .arg(format!("{size_mib}M"));
    let shown = format!(
        "mkfs.ext4 -d {} {} {size_mib}M",
        dir.display(),
        disk.display()
    );
    let out = cmd.output().map_err(|e| ImageError::Tool {
        command: shown.clone(),
        status: "not started".into(),
        stderr: format!("{e} (install e2fsprogs)"),
    })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Allocated bytes (rounded up to 4 KiB per entry) and the number of entries of a tree.
fn measure(dir: &Path) -> Result<(u64, u64), ImageError> {
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).at("listing", &d)? {
            let e = e.at("listing", &d)?;
            let m = e.metadata().at("inspecting", e.path())?;
            entries += 1;
            bytes += m.len().max(m.blocks() * 512).div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, entries))
}
