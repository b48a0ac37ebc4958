//! Layers into directory trees (OCI image spec, "Image Layer Filesystem Changeset").
//!
//! A layer is a tar (optionally gzip- or zstd-compressed; the compression is read from the
//! blob's first bytes) of the files it adds or changes, plus *whiteouts*: an entry
//! `DIR/.wh.NAME` deletes `DIR/NAME` from the layers below, and `DIR/.wh..wh..opq` hides
//! everything the layers below had in `DIR`. Two ways to lay a layer out, by [`Whiteouts`]:
//!
//! * [`Whiteouts::Apply`]: onto a tree holding the layers below it, deleting what whiteouts name
//!   — the flattened image (for ext4 disks). Whiteouts apply only to lower layers, so a first
//!   pass over the layer deletes and a second one extracts.
//! * [`Whiteouts::Overlay`]: into an empty directory of its own, turning whiteouts into what
//!   OverlayFS understands (a 0/0 character device; the `trusted.overlay.opaque=y` xattr) —
//!   a lower directory for stacking (containers). Needs root.
//!
//! Layers are hostile input. Entry names are taken relative to the root (a leading `/` is
//! dropped, `..` is refused), every parent directory is resolved inside the root — a symlink on
//! the way is followed as if the root were `/`, so it can never lead out — and the entry itself
//! replaces whatever is at its place instead of being written through it. Hard-link targets are
//! resolved the same way. Device nodes, ownership and extended attributes are applied only when
//! running as root (device nodes are skipped otherwise, and counted).

use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use crate::ImageError;
use crate::error::IoContext;

/// How whiteout entries are laid out; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    Apply,
    Overlay,
}

/// What unpacking one layer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries written (files, directories, links, nodes).
    pub entries: u64,
    /// Whiteouts applied or converted.
    pub whiteouts: u64,
    /// Device nodes skipped because cela does not run as root.
    pub skipped_devices: u64,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const MAX_SYMLINKS: usize = 40;

/// Opens a layer blob for reading as a tar, undoing gzip or zstd compression.
pub fn open_layer(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let mut f = BufReader::with_capacity(1 << 16, File::open(path).at("opening layer", path)?);
    let magic = {
        use std::io::BufRead;
        f.fill_buf().at("reading layer", path)?.to_vec()
    };
    Ok(match Compression::sniff(&magic) {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Compression::Zstd => {
            Box::new(zstd::Decoder::with_buffer(f).at("opening zstd layer", path)?)
        }
        Compression::None => Box::new(f),
    })
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Tells by the first bytes (gzip `1f 8b`, zstd `28 b5 2f fd`).
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI layer media type for this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Lays the layer blob at `blob` out under `root` (which exists). `label` names the layer in
/// errors.
pub fn apply_layer(
    blob: &Path,
    label: &str,
    root: &Path,
    mode: Whiteouts,
) -> Result<UnpackStats, ImageError> {
    let mut u = Unpacker {
        root,
        label,
        is_root: nix::unistd::geteuid().is_root(),
        stats: UnpackStats::default(),
        dirs: Vec::new(),
    };
    match mode {
        Whiteouts::Apply => {
            u.pass(blob, Pass::Delete)?;
            u.pass(blob, Pass::Extract)?;
        }
        Whiteouts::Overlay => u.pass(blob, Pass::Overlay)?,
    }
    u.finish_dirs()?;
    Ok(u.stats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Apply whiteouts to what is already in the tree.
    Delete,
    /// Extract everything but whiteouts.
    Extract,
    /// Extract everything, whiteouts as OverlayFS markers.
    Overlay,
}

struct Unpacker<'a> {
    root: &'a Path,
    label: &'a str,
    is_root: bool,
    stats: UnpackStats,
    /// Directories whose mode and time are set last (writing into them changes the time, and a
    /// read-only mode would stop the writes of a non-root user).
    dirs: Vec<(PathBuf, u32, u64)>,
}

impl Unpacker<'_> {
    fn hostile(&self, entry: &Path, why: impl Into<String>) -> ImageError {
        ImageError::HostileEntry {
            layer: self.label.to_owned(),
            entry: entry.display().to_string(),
            why: why.into(),
        }
    }

    fn damaged(&self, e: io::Error) -> ImageError {
        ImageError::BadArchive {
            path: self.label.into(),
            why: format!("not a readable layer tar: {e}"),
        }
    }

    fn pass(&mut self, blob: &Path, pass: Pass) -> Result<(), ImageError> {
        let mut archive = tar::Archive::new(open_layer(blob)?);
        for entry in archive.entries().map_err(|e| self.damaged(e))? {
            let mut entry = entry.map_err(|e| self.damaged(e))?;
            let raw = entry.path().map_err(|e| self.damaged(e))?.into_owned();
            let rel = safe_relative(&raw).map_err(|why| self.hostile(&raw, why))?;
            let (Some(name), Some(parent)) = (rel.file_name(), rel.parent()) else {
                continue; // the root itself
            };
            let name = name.to_owned();
            let is_whiteout = name.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes());
            match (pass, is_whiteout) {
                (Pass::Extract, true) | (Pass::Delete, false) => {}
                (Pass::Delete, true) => self.delete(&raw, parent, &name)?,
                (Pass::Overlay, true) => self.mark(&raw, parent, &name)?,
                (Pass::Extract | Pass::Overlay, false) => {
                    self.write(&mut entry, &raw, parent, &name)?
                }
            }
        }
        Ok(())
    }

    /// Applies a whiteout to the tree.
    fn delete(&mut self, raw: &Path, parent: &Path, name: &OsStr) -> Result<(), ImageError> {
        let Some(dir) = self.resolve(raw, parent, false)? else {
            return Ok(()); // nothing below to hide
        };
        if name == OPAQUE {
            for e in fs::read_dir(&dir).at("listing", &dir)? {
                crate::store::remove_any(&e.at("listing", &dir)?.path())?;
            }
        } else if let Some(target) = whited_out(name) {
            crate::store::remove_any(&dir.join(target))?;
        } else {
            return Ok(()); // .wh..wh.* bookkeeping of aufs: nothing to do
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Turns a whiteout into its OverlayFS marker.
    fn mark(&mut self, raw: &Path, parent: &Path, name: &OsStr) -> Result<(), ImageError> {
        let dir = self.resolve(raw, parent, true)?.expect("created");
        if name == OPAQUE {
            setxattr(&dir, "trusted.overlay.opaque", b"y").at("marking opaque", &dir)?;
        } else if let Some(target) = whited_out(name) {
            let path = dir.join(target);
            crate::store::remove_any(&path)?;
            mknod(&path, libc::S_IFCHR, 0, 0).at("creating whiteout", &path)?;
        } else {
            return Ok(());
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    fn write(
        &mut self,
        entry: &mut tar::Entry<'_, Box<dyn Read>>,
        raw: &Path,
        parent: &Path,
        name: &OsStr,
    ) -> Result<(), ImageError> {
        let dir = self.resolve(raw, parent, true)?.expect("created");
        let dest = dir.join(name);
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        let mtime = header.mtime().unwrap_or(0);
        let existing = fs::symlink_metadata(&dest).ok();
        if kind.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {}
                other => {
                    if other.is_some() {
                        fs::remove_file(&dest).at("replacing", &dest)?;
                    }
                    fs::create_dir(&dest).at("creating directory", &dest)?;
                }
            }
            self.own(&dest, uid, gid)?;
            self.xattrs(entry, &dest);
            self.dirs.push((dest, mode, mtime));
            self.stats.entries += 1;
            return Ok(());
        }
        use tar::EntryType as T;
        let is_special = matches!(kind, T::Char | T::Block | T::Fifo);
        if !(kind.is_file() || kind.is_symlink() || kind.is_hard_link() || is_special) {
            return Ok(()); // global pax headers and the like carry no file
        }
        if matches!(kind, T::Char | T::Block) && !self.is_root {
            self.stats.skipped_devices += 1;
            return Ok(());
        }
        // Link targets are checked before the entry's place is cleared.
        let link_target = if kind.is_hard_link() {
            Some(self.hard_link_target(entry, raw)?)
        } else {
            None
        };
        if existing.is_some() {
            crate::store::remove_any(&dest)?;
        }
        match kind {
            _ if kind.is_symlink() => {
                let target = entry
                    .link_name()
                    .map_err(|e| self.damaged(e))?
                    .ok_or_else(|| self.hostile(raw, "symlink without a target"))?;
                symlink(&target, &dest).at("creating symlink", &dest)?;
            }
            _ if kind.is_hard_link() => {
                let target = link_target.expect("checked above");
                fs::hard_link(&target, &dest).at("creating hard link", &dest)?;
                self.stats.entries += 1;
                return Ok(()); // a hard link shares its target's owner, mode and time
            }
            T::Char | T::Block | T::Fifo => {
                let (fmt, major, minor) = match kind {
                    T::Char => (
                        libc::S_IFCHR,
                        dev(header.device_major()),
                        dev(header.device_minor()),
                    ),
                    T::Block => (
                        libc::S_IFBLK,
                        dev(header.device_major()),
                        dev(header.device_minor()),
                    ),
                    _ => (libc::S_IFIFO, 0, 0),
                };
                mknod(&dest, fmt | mode, major, minor).at("creating node", &dest)?;
            }
            _ => {
                let mut f = File::options()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .at("creating", &dest)?;
                io::copy(entry, &mut f).map_err(|e| self.damaged(e))?;
            }
        }
        self.own(&dest, uid, gid)?;
        if !kind.is_symlink() {
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                .at("setting mode of", &dest)?;
        }
        self.xattrs(entry, &dest);
        set_mtime(&dest, mtime).at("setting time of", &dest)?;
        self.stats.entries += 1;
        Ok(())
    }

    /// Where a hard link entry points, resolved inside the root; it must exist.
    fn hard_link_target(
        &self,
        entry: &tar::Entry<'_, Box<dyn Read>>,
        raw: &Path,
    ) -> Result<PathBuf, ImageError> {
        let link = entry
            .link_name()
            .map_err(|e| self.damaged(e))?
            .ok_or_else(|| self.hostile(raw, "hard link without a target"))?;
        let rel = safe_relative(&link)
            .map_err(|why| self.hostile(raw, format!("hard link target: {why}")))?;
        let (Some(name), Some(parent)) = (rel.file_name(), rel.parent()) else {
            return Err(self.hostile(raw, "hard link to the root"));
        };
        let target = self
            .resolve(raw, parent, false)?
            .map(|d| d.join(name))
            .filter(|t| fs::symlink_metadata(t).is_ok_and(|m| !m.is_dir()))
            .ok_or_else(|| {
                self.hostile(
                    raw,
                    format!(
                        "hard link target {} is not a file in the layer",
                        link.display()
                    ),
                )
            })?;
        Ok(target)
    }

    fn own(&self, path: &Path, uid: u64, gid: u64) -> Result<(), ImageError> {
        if self.is_root {
            let id = |v: u64| u32::try_from(v).ok();
            std::os::unix::fs::lchown(path, id(uid), id(gid)).at("setting owner of", path)?;
        }
        Ok(())
    }

    /// Extended attributes from PAX `SCHILY.xattr.*` records (file capabilities, SELinux
    /// labels); only as root, and a refused one is logged, not fatal.
    fn xattrs(&self, entry: &mut tar::Entry<'_, Box<dyn Read>>, path: &Path) {
        if !self.is_root {
            return;
        }
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return;
        };
        for ext in exts.flatten() {
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.")
                && let Err(e) = setxattr(path, name, ext.value_bytes())
            {
                tracing::debug!("{}: xattr {name}: {e}", path.display());
            }
        }
    }

    /// Resolves `parent` (relative to the root) inside the root, following symlinks as if the
    /// root were `/`. Missing directories are created when `create`, else `None` is returned.
    fn resolve(
        &self,
        raw: &Path,
        parent: &Path,
        create: bool,
    ) -> Result<Option<PathBuf>, ImageError> {
        let mut stack: Vec<OsString> = Vec::new();
        let mut pending: VecDeque<OsString> = parent.iter().map(|c| c.to_owned()).collect();
        let mut links = 0;
        while let Some(c) = pending.pop_front() {
            if c == ".." {
                stack.pop();
                continue;
            }
            if c == "." || c.is_empty() {
                continue;
            }
            let here: PathBuf = self
                .root
                .iter()
                .chain(stack.iter().map(|s| s.as_os_str()))
                .collect();
            let candidate = here.join(&c);
            match fs::symlink_metadata(&candidate) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(self.hostile(raw, "too many levels of symbolic links"));
                    }
                    let target = fs::read_link(&candidate).at("reading symlink", &candidate)?;
                    if target.is_absolute() {
                        stack.clear();
                    }
                    let mut next: VecDeque<OsString> = target
                        .components()
                        .filter_map(|c| match c {
                            Component::Normal(n) => Some(n.to_owned()),
                            Component::ParentDir => Some("..".into()),
                            _ => None,
                        })
                        .collect();
                    next.extend(pending);
                    pending = next;
                }
                Ok(m) if m.is_dir() => stack.push(c),
                Ok(_) => {
                    return Err(self.hostile(
                        raw,
                        format!(
                            "{} is not a directory",
                            candidate
                                .strip_prefix(self.root)
                                .unwrap_or(&candidate)
                                .display()
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::create_dir(&candidate).at("creating directory", &candidate)?;
                    stack.push(c);
                }
                Err(e) => return Err(e).at("inspecting", candidate),
            }
        }
        Ok(Some(
            self.root
                .iter()
                .chain(stack.iter().map(|s| s.as_os_str()))
                .collect(),
        ))
    }

    /// Sets the deferred directory modes and times, innermost first.
    fn finish_dirs(&mut self) -> Result<(), ImageError> {
        self.dirs
            .sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
        for (path, mode, mtime) in self.dirs.drain(..) {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .at("setting mode of", &path)?;
            set_mtime(&path, mtime).at("setting time of", &path)?;
        }
        Ok(())
    }
}

/// `NAME` of a `.wh.NAME` entry; `None` for `.wh..wh.*` bookkeeping entries.
fn whited_out(name: &OsStr) -> Option<&OsStr> {
    let rest = &name.as_bytes()[WHITEOUT_PREFIX.len()..];
    if rest.is_empty()
        || rest.starts_with(WHITEOUT_PREFIX.as_bytes())
        || rest == b"."
        || rest == b".."
    {
        return None;
    }
    Some(OsStr::from_bytes(rest))
}

/// An entry name made relative to the root: a leading `/` and `.` components are dropped;
/// `..` is refused, since no legitimate layer needs it.
pub fn safe_relative(p: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return Err("`..` in a path would climb out of the root".into()),
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

fn dev(v: io::Result<Option<u32>>) -> u32 {
    v.ok().flatten().unwrap_or(0)
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn mknod(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: a valid C string; mknod does not retain it.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cpath(path)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C strings and a value buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_mtime(path: &Path, mtime: u64) -> io::Result<()> {
    let c = cpath(path)?;
    let t = libc::timespec {
        tv_sec: mtime.min(i64::MAX as u64) as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: a valid C string and two timespecs; the link itself is changed, not its target.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests;
