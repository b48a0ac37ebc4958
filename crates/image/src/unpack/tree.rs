//! The tree a layer is unpacked into, reached only through directory file descriptors.
//!
//! Every operation names an entry as (directory descriptor, one name) and acts on that entry
//! itself, never through a link: lookups are `fstatat(AT_SYMLINK_NOFOLLOW)`, directories are
//! opened with `O_DIRECTORY|O_NOFOLLOW`, files are created with `O_CREAT|O_EXCL|O_NOFOLLOW`,
//! owners and times are set with `AT_SYMLINK_NOFOLLOW` or on an open descriptor. Modes and
//! extended attributes of device nodes and FIFOs (which cannot be opened safely) go through an
//! `O_PATH|O_NOFOLLOW` descriptor checked to be that node, via its `/proc/self/fd` entry.
//! Nothing here is ever given a path with more than one component, so no symlink placed by a
//! layer — earlier, later, or swapped in — can redirect an operation outside the root.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};

/// How deep a directory tree may be removed (a legitimate image is nowhere near; a hostile
/// one must not overflow the stack).
pub const MAX_DEPTH: usize = 1024;

/// A directory reached beneath the root, and its path from the root (for messages and for
/// finding it again).
pub struct DirHandle {
    pub fd: OwnedFd,
    pub path: Vec<OsString>,
}

/// A directory whose mode and time are set last, found again by its path without following
/// links and applied only if it is still the same inode.
pub struct Deferred {
    pub path: Vec<OsString>,
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub mtime: u64,
}

/// The entry `name` of `dir`, not following a symlink; `None` if there is none.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn kind(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Opens the directory `name` of `dir`; a symlink there is an error (`ELOOP`/`ENOTDIR`),
/// never followed.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the root of the tree.
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Creates the directory `name` in `dir`, private until its own mode is applied.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode))?)
}

/// Creates the regular file `name` in `dir` (it must not exist), open for writing.
pub fn create_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<std::fs::File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    Ok(std::fs::File::from(fd))
}

/// Removes the entry `name` of `dir`, a whole tree if it is a directory; nothing if absent.
/// Descends through descriptors only, so a symlink inside is removed, never followed.
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    remove_at_depth(dir, name, 0)
}

fn remove_at_depth(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if kind(&st) != FileType::Directory {
        return Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?);
    }
    if depth >= MAX_DEPTH {
        return Err(io::Error::other(format!(
            "directory tree deeper than {MAX_DEPTH} levels"
        )));
    }
    let sub = open_dir_at(dir, name)?;
    clear_dir(sub.as_fd(), depth + 1)?;
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

/// Removes everything in the directory `dir`.
pub fn clear_dir(dir: BorrowedFd<'_>, depth: usize) -> io::Result<()> {
    let names: Vec<OsString> = rustix::fs::Dir::read_from(dir)?
        .filter_map(|e| match e {
            Ok(e) => {
                let n = e.file_name().to_bytes();
                (n != b"." && n != b"..").then(|| Ok(OsStr::from_bytes(n).to_owned()))
            }
            Err(e) => Some(Err(io::Error::from(e))),
        })
        .collect::<io::Result<_>>()?;
    for n in names {
        remove_at_depth(dir, &n, depth)?;
    }
    Ok(())
}

/// Sets the owner of the entry itself (a symlink's own owner, not its target's).
pub fn chown_at(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    let (u, g) = (
        rustix::fs::Uid::from_raw(uid),
        rustix::fs::Gid::from_raw(gid),
    );
    Ok(rustix::fs::chownat(
        dir,
        name,
        Some(u),
        Some(g),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Sets the owner through an open descriptor.
pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    let (u, g) = (
        rustix::fs::Uid::from_raw(uid),
        rustix::fs::Gid::from_raw(gid),
    );
    Ok(rustix::fs::fchown(fd, Some(u), Some(g))?)
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime.min(i64::MAX as u64) as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Sets the access and modification times of the entry itself.
pub fn set_times_at(dir: BorrowedFd<'_>, name: &OsStr, mtime: u64) -> io::Result<()> {
    Ok(rustix::fs::utimensat(
        dir,
        name,
        &times(mtime),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Sets the times through an open descriptor.
pub fn set_times(fd: BorrowedFd<'_>, mtime: u64) -> io::Result<()> {
    Ok(rustix::fs::futimens(fd, &times(mtime))?)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?)
}

pub fn fsetxattr(fd: BorrowedFd<'_>, name: &str, value: &[u8]) -> io::Result<()> {
    Ok(rustix::fs::fsetxattr(
        fd,
        name,
        value,
        rustix::fs::XattrFlags::empty(),
    )?)
}

/// A device node or FIFO `name` of `dir`, held by an `O_PATH|O_NOFOLLOW` descriptor that is
/// checked to be of type `want`: its mode and extended attributes are set through
/// `/proc/self/fd/N`, which leads to that very inode (opening the node itself could block or
/// have effects; `fchmodat` cannot refuse to follow a link on older kernels).
pub struct NodeRef {
    fd: OwnedFd,
}

impl NodeRef {
    pub fn open(dir: BorrowedFd<'_>, name: &OsStr, want: FileType) -> io::Result<NodeRef> {
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        if kind(&st) != want {
            return Err(io::Error::other(format!(
                "{} is no longer the node just created",
                Path::new(name).display()
            )));
        }
        Ok(NodeRef { fd })
    }

    fn proc_path(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }

    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        Ok(rustix::fs::chmod(
            self.proc_path().as_str(),
            Mode::from_raw_mode(mode),
        )?)
    }

    pub fn setxattr(&self, name: &str, value: &[u8]) -> io::Result<()> {
        Ok(rustix::fs::setxattr(
            self.proc_path().as_str(),
            name,
            value,
            rustix::fs::XattrFlags::empty(),
        )?)
    }
}

/// Creates a device node or FIFO `name` in `dir` with mode bits 0 (set afterwards, as umask
/// would otherwise change them).
pub fn mknod_at(dir: BorrowedFd<'_>, name: &OsStr, t: FileType, dev: u64) -> io::Result<()> {
    Ok(rustix::fs::mknodat(dir, name, t, Mode::empty(), dev)?)
}

pub fn symlink_at(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    Ok(rustix::fs::symlinkat(target, dir, name)?)
}

/// Hard-links `from_name` of `from_dir` (the entry itself, a symlink not followed) as `name`
/// of `dir`.
pub fn link_at(
    from_dir: BorrowedFd<'_>,
    from_name: &OsStr,
    dir: BorrowedFd<'_>,
    name: &OsStr,
) -> io::Result<()> {
    Ok(rustix::fs::linkat(
        from_dir,
        from_name,
        dir,
        name,
        AtFlags::empty(),
    )?)
}

pub fn readlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OsString> {
    let t = rustix::fs::readlinkat(dir, name, Vec::new())?;
    Ok(OsStr::from_bytes(t.as_bytes()).to_owned())
}

/// Opens the directory at `path` beneath `root` without following any link on the way, and
/// applies a deferred mode and time if it is still the directory recorded. A path that no
/// longer leads to it (a later entry replaced it or a parent) is skipped: its metadata no
/// longer has a place in the tree.
pub fn apply_deferred(root: BorrowedFd<'_>, d: &Deferred) -> io::Result<bool> {
    let mut cur: Option<OwnedFd> = None;
    for c in &d.path {
        let parent = cur.as_ref().map_or(root, |f| f.as_fd());
        match open_dir_at(parent, c) {
            Ok(fd) => cur = Some(fd),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    let Some(fd) = cur else { return Ok(false) };
    let st = rustix::fs::fstat(&fd)?;
    if st.st_dev != d.dev || st.st_ino != d.ino {
        return Ok(false);
    }
    fchmod(fd.as_fd(), d.mode)?;
    set_times(fd.as_fd(), d.mtime)?;
    Ok(true)
}
