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
//! resolved the same way and must be non-directories already in the tree.
//!
//! Every file-system call acts on the entry itself, never through a link (the `tree` submodule holds them):
//! the walk goes from a descriptor of the root through descriptors of each directory
//! (`openat(O_DIRECTORY|O_NOFOLLOW)`), and creation, removal, links, owners, modes, times and
//! xattrs are `*at` calls on (directory descriptor, one name) with no link followed, or calls on
//! the entry's own descriptor. Directory modes and times are applied last (a read-only mode
//! would stop later writes into them); each is found again by its path without following any
//! link and applied only if it is still the same inode, so a later entry that swaps the
//! directory for a symlink to a host path (`a/` with mode 04755, then `a -> /usr/bin/passwd`)
//! changes nothing outside the root. Removal descends by descriptors too, at most
//! `tree::MAX_DEPTH` (1024) levels.
//!
//! Device nodes and owners are applied only when running as root (device nodes are skipped
//! otherwise, and counted). Extended attributes (PAX `SCHILY.xattr.*`) are applied only as
//! root and only if [`xattr_allowed`]: `security.capability` (file capabilities, as Docker
//! keeps them) and `user.*` except `user.overlay.*`. Everything else is dropped and counted —
//! `trusted.*` (`trusted.overlay.*` would steer OverlayFS: opaque directories, redirects,
//! metacopy), `user.overlay.*` (the same for unprivileged overlay mounts), `security.selinux`
//! and other LSM labels (chosen by the host, not the image), `system.*` (ACLs). The only
//! `trusted.overlay.opaque` cela writes is the one an opaque whiteout asks for.
//!
//! Sparse files (GNU `S` entries and PAX sparse formats 0.0, 0.1 and 1.0; the `sparse` submodule) are
//! written with their holes; a sparse map that does not add up is refused. Entry types cela
//! does not know (volume labels, multi-volume continuations, …) refuse the layer, as Docker's
//! and containerd's unpackers do, instead of being dropped silently.

use std::cell::Cell;
use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::FileType;

use crate::ImageError;
use crate::error::IoContext;
use crate::tar_limits::{self, LimitError, Limited};

mod sparse;
pub(crate) mod tree;

use sparse::PaxSparse;
use tree::{Deferred, DirHandle};

/// How the unpacker resolves an entry's parent directory in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Where an entry of the layer goes: symlinks are followed (beneath the root, as tar
    /// and containerd do), missing directories made.
    Create,
    /// What a hard link names: symlinks followed, nothing made.
    Existing,
    /// What a whiteout names, in the tree of the layers below. Where the layer lists a
    /// directory of its own at a path the tree has a symlink (met before any link was
    /// followed), nothing is there to hide: the layer's directory replaces the link in the
    /// merged view (OverlayFS shows an upper directory over a lower non-directory unmerged;
    /// containerd, unpacking in tar order, has replaced the link by the time it meets the
    /// whiteout), so the link's target keeps what it holds. Other links are followed as for
    /// [`Walk::Existing`] (merged /usr: `bin/.wh.x` over `bin -> usr/bin` removes usr/bin/x);
    /// a file on the way means nothing to hide.
    Directories,
}

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
    /// Extended attributes not applied: outside the allow-list, or not running as root.
    pub dropped_xattrs: u64,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const MAX_SYMLINKS: usize = 40;
/// What the directories a layer defers may take in memory (their paths); a real layer of
/// 100,000 directories takes about 20 MiB.
const MAX_DEFERRED_BYTES: u64 = 256 << 20;

/// Opens a layer blob for reading as a tar, undoing gzip or zstd compression.
pub fn open_layer(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    decompress(File::open(path).at("opening layer", path)?).at("reading layer", path)
}

/// `input`, decompressed if its first bytes say it is gzip or zstd.
pub fn decompress(input: impl Read + 'static) -> io::Result<Box<dyn Read>> {
    let mut f = BufReader::with_capacity(1 << 16, input);
    let magic = {
        use std::io::BufRead;
        f.fill_buf()?.to_vec()
    };
    Ok(match Compression::sniff(&magic) {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Compression::Zstd => Box::new(zstd::Decoder::with_buffer(f)?),
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
    let root_fd = tree::open_root(root).at("opening", root)?;
    // What this layer may write: the free space of its file system, less a reserve, counted
    // as decompressed tar bytes (never less than what is written: holes are not counted).
    let budget = tar_limits::room(&root_fd).at("inspecting the file system of", root)?;
    let mut u = Unpacker {
        root: root_fd,
        budget,
        deferred_bytes: 0,
        root_path: root,
        label,
        is_root: nix::unistd::geteuid().is_root(),
        stats: UnpackStats::default(),
        dropped_xattrs: Cell::new(0),
        dirs: Vec::new(),
        layer_dirs: HashSet::new(),
        whiteouts: Vec::new(),
        delete_bytes: 0,
    };
    match mode {
        Whiteouts::Apply => {
            u.pass(blob, Pass::Delete)?;
            u.pass(blob, Pass::Extract)?;
        }
        Whiteouts::Overlay => u.pass(blob, Pass::Overlay)?,
    }
    u.finish_dirs()?;
    u.stats.dropped_xattrs = u.dropped_xattrs.get();
    Ok(u.stats)
}

/// Whether a layer may set the extended attribute `name` (see the module documentation).
pub fn xattr_allowed(name: &str) -> bool {
    name == "security.capability"
        || (name.starts_with("user.") && !name.starts_with("user.overlay."))
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
    root: OwnedFd,
    /// The most bytes a pass may read from the decompressed layer.
    budget: u64,
    /// What the paths of `dirs` take in memory, roughly.
    deferred_bytes: u64,
    root_path: &'a Path,
    label: &'a str,
    is_root: bool,
    stats: UnpackStats,
    dropped_xattrs: Cell<u64>,
    /// Directories whose mode and time are set last (writing into them changes the time, and a
    /// read-only mode would stop the writes of a non-root user).
    dirs: Vec<Deferred>,
    /// The Delete pass: the directories this layer lists, and its whiteouts, applied once
    /// the whole layer was read (a directory may come after the whiteouts inside it).
    layer_dirs: HashSet<PathBuf>,
    whiteouts: Vec<(PathBuf, PathBuf, OsString)>,
    /// What those two hold, bounded as `deferred_bytes`.
    delete_bytes: u64,
}

type LayerEntry<'e> = tar::Entry<'e, Limited<Box<dyn Read>>>;

impl Unpacker<'_> {
    fn hostile(&self, entry: &Path, why: impl Into<String>) -> ImageError {
        ImageError::HostileEntry {
            layer: self.label.to_owned(),
            entry: entry.display().to_string(),
            why: why.into(),
        }
    }

    fn damaged(&self, e: io::Error) -> ImageError {
        let why = match LimitError::of(&e) {
            Some(limit) => format!("refused: {limit}"),
            None => format!("not a readable layer tar: {e}"),
        };
        ImageError::BadArchive {
            path: self.label.into(),
            why,
        }
    }

    /// An I/O failure on an entry, named by its path in the tree.
    fn io(&self, action: &'static str, dir: &DirHandle, name: &OsStr, e: io::Error) -> ImageError {
        let mut p = self.root_path.to_path_buf();
        p.extend(dir.path.iter().chain(std::iter::once(&name.to_owned())));
        ImageError::Io {
            action,
            path: p,
            source: e,
        }
    }

    fn pass(&mut self, blob: &Path, pass: Pass) -> Result<(), ImageError> {
        let mut archive = tar::Archive::new(Limited::new(open_layer(blob)?, Some(self.budget)));
        for entry in archive.entries().map_err(|e| self.damaged(e))? {
            let mut entry = entry.map_err(|e| self.damaged(e))?;
            let sparse = self.pax_sparse(&mut entry)?;
            let raw = match sparse.as_ref().and_then(|s| s.name.as_ref()) {
                Some(name) => PathBuf::from(OsStr::from_bytes(name)),
                None => entry.path().map_err(|e| self.damaged(e))?.into_owned(),
            };
            let rel = safe_relative(&raw).map_err(|why| self.hostile(&raw, why))?;
            let (Some(name), Some(parent)) = (rel.file_name(), rel.parent()) else {
                continue; // the root itself
            };
            let name = name.to_owned();
            let is_whiteout = name.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes());
            match (pass, is_whiteout) {
                (Pass::Extract, true) => {}
                (Pass::Delete, false) => {
                    if entry.header().entry_type().is_dir() {
                        let dir: PathBuf = rel.components().collect();
                        self.count_delete_bytes(&raw, dir.as_os_str().len())?;
                        self.layer_dirs.insert(dir);
                    }
                }
                (Pass::Delete, true) => {
                    let len = raw.as_os_str().len() + parent.as_os_str().len() + name.len();
                    self.count_delete_bytes(&raw, len)?;
                    self.whiteouts.push((raw.clone(), parent.to_owned(), name));
                }
                (Pass::Overlay, true) => self.mark(&raw, parent, &name)?,
                (Pass::Extract | Pass::Overlay, false) => {
                    self.write(&mut entry, sparse.as_ref(), &raw, parent, &name)?
                }
            }
        }
        for (raw, parent, name) in std::mem::take(&mut self.whiteouts) {
            self.delete(&raw, &parent, &name)?;
        }
        Ok(())
    }

    /// Counts `len` bytes the Delete pass keeps until the layer's end, against the bound.
    fn count_delete_bytes(&mut self, raw: &Path, len: usize) -> Result<(), ImageError> {
        self.delete_bytes += len as u64 + 64;
        if self.delete_bytes > MAX_DEFERRED_BYTES {
            return Err(self.hostile(
                raw,
                format!(
                    "the layer's whiteouts and directories pass {MAX_DEFERRED_BYTES} bytes of bookkeeping"
                ),
            ));
        }
        Ok(())
    }

    /// The PAX sparse description of an entry, if it is one.
    fn pax_sparse(&self, entry: &mut LayerEntry<'_>) -> Result<Option<PaxSparse>, ImageError> {
        let raw = entry.path_bytes().into_owned();
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return Ok(None);
        };
        let records: Vec<(String, Vec<u8>)> = exts
            .flatten()
            .filter_map(|e| Some((e.key().ok()?.to_owned(), e.value_bytes().to_vec())))
            .collect();
        PaxSparse::from_records(records.iter().map(|(k, v)| (k.as_str(), &v[..])))
            .map_err(|why| self.hostile(Path::new(OsStr::from_bytes(&raw)), why))
    }

    /// Applies a whiteout to the tree.
    fn delete(&mut self, raw: &Path, parent: &Path, name: &OsStr) -> Result<(), ImageError> {
        let Some(dir) = self.resolve(raw, parent, Walk::Directories)? else {
            return Ok(()); // nothing below to hide
        };
        if name == OPAQUE {
            tree::clear_dir(dir.fd.as_fd(), 0)
                .map_err(|e| self.io("clearing", &dir, OsStr::new(""), e))?;
        } else if let Some(target) = whited_out(name) {
            tree::remove_at(dir.fd.as_fd(), target)
                .map_err(|e| self.io("removing", &dir, target, e))?;
        } else {
            return Ok(()); // .wh..wh.* bookkeeping of aufs: nothing to do
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Turns a whiteout into its OverlayFS marker.
    fn mark(&mut self, raw: &Path, parent: &Path, name: &OsStr) -> Result<(), ImageError> {
        let dir = self.resolve(raw, parent, Walk::Create)?.expect("created");
        if name == OPAQUE {
            tree::fsetxattr(dir.fd.as_fd(), "trusted.overlay.opaque", b"y")
                .map_err(|e| self.io("marking opaque", &dir, OsStr::new(""), e))?;
        } else if let Some(target) = whited_out(name) {
            let fd = dir.fd.as_fd();
            tree::remove_at(fd, target)
                .and_then(|()| tree::mknod_at(fd, target, FileType::CharacterDevice, 0))
                .map_err(|e| self.io("creating whiteout", &dir, target, e))?;
        } else {
            return Ok(());
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    fn write(
        &mut self,
        entry: &mut LayerEntry<'_>,
        sparse: Option<&PaxSparse>,
        raw: &Path,
        parent: &Path,
        name: &OsStr,
    ) -> Result<(), ImageError> {
        use tar::EntryType as T;
        let dir = self.resolve(raw, parent, Walk::Create)?.expect("created");
        let d = dir.fd.as_fd();
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        let ids = (u32::try_from(uid), u32::try_from(gid));
        let (Ok(uid), Ok(gid)) = ids else {
            return Err(self.hostile(raw, format!("owner {uid}:{gid} is not a 32-bit id")));
        };
        let mtime = header.mtime().unwrap_or(0);
        let fail = |action, e| self.io(action, &dir, name, e);
        let existing = tree::lstat_at(d, name).map_err(|e| fail("inspecting", e))?;
        if kind.is_dir() {
            match existing.as_ref().map(tree::kind) {
                Some(FileType::Directory) => {}
                other => {
                    if other.is_some() {
                        tree::remove_at(d, name).map_err(|e| fail("replacing", e))?;
                    }
                    tree::mkdir_at(d, name, 0o700).map_err(|e| fail("creating directory", e))?;
                }
            }
            let fd = tree::open_dir_at(d, name).map_err(|e| fail("opening directory", e))?;
            if self.is_root {
                tree::fchown(fd.as_fd(), uid, gid).map_err(|e| fail("setting owner of", e))?;
            }
            self.xattrs(entry, raw, |n, v| tree::fsetxattr(fd.as_fd(), n, v));
            let st = rustix::fs::fstat(&fd).map_err(|e| fail("inspecting", e.into()))?;
            let mut path = dir.path.clone();
            path.push(name.to_owned());
            // Each directory's path is kept until the end: bound what they may take.
            self.deferred_bytes += path.iter().map(|c| c.len() as u64 + 32).sum::<u64>();
            if self.deferred_bytes > MAX_DEFERRED_BYTES {
                return Err(self.hostile(
                    raw,
                    format!(
                        "the layer's directories and their paths pass {MAX_DEFERRED_BYTES} bytes of bookkeeping (too many, or nested too deep)"
                    ),
                ));
            }
            self.dirs.push(Deferred {
                path,
                dev: st.st_dev,
                ino: st.st_ino,
                mode,
                mtime,
            });
            self.stats.entries += 1;
            return Ok(());
        }
        let is_file = matches!(kind, T::Regular | T::Continuous | T::GNUSparse);
        let node = match kind {
            T::Char => Some(FileType::CharacterDevice),
            T::Block => Some(FileType::BlockDevice),
            T::Fifo => Some(FileType::Fifo),
            _ => None,
        };
        if !(is_file || kind.is_symlink() || kind.is_hard_link() || node.is_some()) {
            if kind == T::XGlobalHeader {
                return Ok(()); // global PAX records carry no file
            }
            // Docker and containerd refuse these too ("unhandled tar header type").
            return Err(self.hostile(
                raw,
                format!("entry type {:?} is not supported", kind.as_byte() as char),
            ));
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
            tree::remove_at(d, name).map_err(|e| fail("replacing", e))?;
        }
        if let Some((from, from_name)) = link_target {
            tree::link_at(from.fd.as_fd(), &from_name, d, name)
                .map_err(|e| fail("creating hard link", e))?;
            self.stats.entries += 1;
            return Ok(()); // a hard link shares its target's owner, mode and time
        }
        if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| self.damaged(e))?
                .ok_or_else(|| self.hostile(raw, "symlink without a target"))?;
            tree::symlink_at(target.as_os_str(), d, name)
                .map_err(|e| fail("creating symlink", e))?;
            if self.is_root {
                tree::chown_at(d, name, uid, gid).map_err(|e| fail("setting owner of", e))?;
            }
            // No extended attributes on symlinks: none that a layer may set applies to them.
            tree::set_times_at(d, name, mtime).map_err(|e| fail("setting time of", e))?;
        } else if let Some(t) = node {
            let (major, minor) = (dev(header.device_major()), dev(header.device_minor()));
            let rdev = if t == FileType::Fifo {
                0
            } else {
                rustix::fs::makedev(major, minor)
            };
            tree::mknod_at(d, name, t, rdev).map_err(|e| fail("creating node", e))?;
            if self.is_root {
                tree::chown_at(d, name, uid, gid).map_err(|e| fail("setting owner of", e))?;
            }
            let n = tree::NodeRef::open(d, name, t).map_err(|e| fail("opening node", e))?;
            n.chmod(mode).map_err(|e| fail("setting mode of", e))?;
            self.xattrs(entry, raw, |k, v| n.setxattr(k, v));
            tree::set_times_at(d, name, mtime).map_err(|e| fail("setting time of", e))?;
        } else {
            let size = entry.size();
            if kind == T::GNUSparse && size > sparse::MAX_REAL_SIZE {
                return Err(self.hostile(
                    raw,
                    format!(
                        "a sparse file of {size} bytes, more than the {} cela unpacks",
                        sparse::MAX_REAL_SIZE
                    ),
                ));
            }
            let mut f = tree::create_file_at(d, name).map_err(|e| fail("creating", e))?;
            match (sparse, kind) {
                (Some(sp), _) => sp.write(entry, size, &mut f),
                (None, T::GNUSparse) => sparse::copy_holey(entry, &mut f).map(drop),
                (None, _) => io::copy(entry, &mut f).map(drop),
            }
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => self.hostile(raw, format!("sparse file: {e}")),
                _ => self.damaged(e),
            })?;
            let fd = f.as_fd();
            if self.is_root {
                tree::fchown(fd, uid, gid).map_err(|e| fail("setting owner of", e))?;
            }
            // After the owner: chown clears the setuid and setgid bits.
            tree::fchmod(fd, mode).map_err(|e| fail("setting mode of", e))?;
            self.xattrs(entry, raw, |k, v| tree::fsetxattr(fd, k, v));
            tree::set_times(fd, mtime).map_err(|e| fail("setting time of", e))?;
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// Where a hard link entry points, resolved inside the root: its directory and name. It
    /// must exist and not be a directory.
    fn hard_link_target(
        &self,
        entry: &LayerEntry<'_>,
        raw: &Path,
    ) -> Result<(DirHandle, OsString), ImageError> {
        let link = entry
            .link_name()
            .map_err(|e| self.damaged(e))?
            .ok_or_else(|| self.hostile(raw, "hard link without a target"))?;
        let rel = safe_relative(&link)
            .map_err(|why| self.hostile(raw, format!("hard link target: {why}")))?;
        let (Some(name), Some(parent)) = (rel.file_name(), rel.parent()) else {
            return Err(self.hostile(raw, "hard link to the root"));
        };
        let not_there = || {
            self.hostile(
                raw,
                format!(
                    "hard link target {} is not a file in the layer",
                    link.display()
                ),
            )
        };
        let dir = self
            .resolve(raw, parent, Walk::Existing)?
            .ok_or_else(not_there)?;
        match tree::lstat_at(dir.fd.as_fd(), name) {
            Ok(Some(st)) if tree::kind(&st) != FileType::Directory => Ok((dir, name.to_owned())),
            _ => Err(not_there()),
        }
    }

    /// Extended attributes from PAX `SCHILY.xattr.*` records, those [`xattr_allowed`] lets
    /// through, only as root; `set` applies one to the entry. A refused one is logged, not
    /// fatal (file systems without xattrs refuse them all).
    fn xattrs(
        &self,
        entry: &mut LayerEntry<'_>,
        raw: &Path,
        set: impl Fn(&str, &[u8]) -> io::Result<()>,
    ) {
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return;
        };
        for ext in exts.flatten() {
            let Ok(key) = ext.key() else { continue };
            let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if !self.is_root || !xattr_allowed(name) {
                tracing::debug!("{}: dropped xattr {name}", raw.display());
                self.dropped_xattrs.set(self.dropped_xattrs.get() + 1);
            } else if let Err(e) = set(name, ext.value_bytes()) {
                tracing::debug!("{}: xattr {name}: {e}", raw.display());
            }
        }
    }

    /// Resolves `parent` (relative to the root) inside the root, through directory descriptors
    /// only, as `walk` says: following symlinks as if the root were `/`, or not at all. `None`
    /// when the path is not there.
    fn resolve(
        &self,
        raw: &Path,
        parent: &Path,
        walk: Walk,
    ) -> Result<Option<DirHandle>, ImageError> {
        let mut stack: Vec<(OwnedFd, OsString)> = Vec::new();
        let mut pending: VecDeque<OsString> = parent.iter().map(|c| c.to_owned()).collect();
        let mut links = 0;
        let here_path = |stack: &[(OwnedFd, OsString)]| {
            let mut p = self.root_path.to_path_buf();
            p.extend(stack.iter().map(|(_, n)| n));
            p
        };
        while let Some(c) = pending.pop_front() {
            if c == ".." {
                stack.pop();
                continue;
            }
            if c == "." || c.is_empty() {
                continue;
            }
            let cur = stack.last().map_or(self.root.as_fd(), |(fd, _)| fd.as_fd());
            let st = tree::lstat_at(cur, &c).at("inspecting", here_path(&stack).join(&c))?;
            match st.as_ref().map(tree::kind) {
                Some(FileType::Symlink)
                    if walk == Walk::Directories && links == 0 && {
                        let mut p: PathBuf = stack.iter().map(|(_, n)| n).collect();
                        p.push(&c);
                        self.layer_dirs.contains(&p)
                    } =>
                {
                    return Ok(None);
                }
                Some(FileType::Symlink) => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(self.hostile(raw, "too many levels of symbolic links"));
                    }
                    let target = tree::readlink_at(cur, &c)
                        .at("reading symlink", here_path(&stack).join(&c))?;
                    let target = Path::new(&target);
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
                Some(FileType::Directory) => {
                    let fd = tree::open_dir_at(cur, &c)
                        .at("opening directory", here_path(&stack).join(&c))?;
                    stack.push((fd, c));
                }
                Some(_) if walk == Walk::Directories => return Ok(None),
                Some(_) => {
                    let mut inside: PathBuf = stack.iter().map(|(_, n)| n).collect();
                    inside.push(&c);
                    return Err(
                        self.hostile(raw, format!("{} is not a directory", inside.display()))
                    );
                }
                None => {
                    if walk != Walk::Create {
                        return Ok(None);
                    }
                    let p = here_path(&stack).join(&c);
                    tree::mkdir_at(cur, &c, 0o755).at("creating directory", &p)?;
                    let fd = tree::open_dir_at(cur, &c).at("opening directory", &p)?;
                    stack.push((fd, c));
                }
            }
            if stack.len() > tree::MAX_DEPTH {
                return Err(self.hostile(
                    raw,
                    format!("directories nested deeper than {}", tree::MAX_DEPTH),
                ));
            }
        }
        let path = stack.iter().map(|(_, n)| n.clone()).collect();
        let fd = match stack.pop() {
            Some((fd, _)) => fd,
            None => self
                .root
                .try_clone()
                .at("duplicating descriptor of", self.root_path)?,
        };
        Ok(Some(DirHandle { fd, path }))
    }

    /// Sets the deferred directory modes and times, innermost first, on the directories
    /// themselves (see `tree::apply_deferred`).
    fn finish_dirs(&mut self) -> Result<(), ImageError> {
        self.dirs.sort_by_key(|d| std::cmp::Reverse(d.path.len()));
        for d in self.dirs.drain(..) {
            let path: PathBuf = self
                .root_path
                .iter()
                .chain(d.path.iter().map(|c| c.as_os_str()))
                .collect();
            if !tree::apply_deferred(self.root.as_fd(), &d).at("setting mode of", path)? {
                tracing::debug!("{}: a deferred directory was replaced", self.label);
            }
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

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;
