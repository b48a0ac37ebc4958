//! Reading a file of an untrusted root filesystem (an image's, a container's, an image layout
//! directory) from outside it: the path is resolved *beneath* the root, as if the root were `/`
//! (`openat2` with `RESOLVE_IN_ROOT`: a symlink to `/etc/shadow` or `../../..` leads back
//! inside, and `/proc` magic links are refused), or with no symlink at all; only a regular file
//! is opened, and no more than a bound read.
//!
//! The lookup takes an `O_PATH` handle, which opens nothing: only once that handle is known to
//! be a regular file is it reopened for reading (through `/proc/self/fd`, the same inode). A
//! container that is root inside can `mknod` any device where its `/etc/passwd` was, and the
//! host's open of a device can act (a watchdog arms, a tape rewinds) before any check after it.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags, openat2};

/// How a path is resolved beneath its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Symlinks are followed as if the root were `/` (an image's `/etc/passwd` may be a link).
    InRoot,
    /// No symlink anywhere on the path, and nothing outside the root.
    NoLinks,
}

/// A file found beneath a root and not yet opened: an `O_PATH` handle.
#[derive(Debug)]
pub struct Found {
    fd: OwnedFd,
}

impl Found {
    /// What the file is (`fstat` on the handle).
    pub fn metadata(&self) -> io::Result<Metadata> {
        File::from(self.fd.try_clone()?).metadata()
    }

    /// Opens the file for reading, if it is a regular file; otherwise an `InvalidData` error
    /// naming `what` and what it is.
    pub fn open_regular(&self, what: &str) -> io::Result<(File, Metadata)> {
        let meta = self.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{what} is not a regular file (it is {})", kind(&meta)),
            ));
        }
        let fd = rustix::fs::open(
            format!("/proc/self/fd/{}", self.fd.as_raw_fd()),
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok((File::from(fd), meta))
    }
}

/// What a file is, in words, for errors.
pub fn kind(m: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Looks `rel` up beneath `root` without opening it. `Ok(None)` if nothing is there (or a
/// component on the way is not a directory).
pub fn find(root: &Path, rel: &Path, how: Resolve) -> io::Result<Option<Found>> {
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let (oflags, resolve) = match how {
        Resolve::InRoot => (
            OFlags::PATH | OFlags::CLOEXEC,
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ),
        // Not O_NOFOLLOW: with O_PATH it would hand out the trailing link itself; without it
        // RESOLVE_NO_SYMLINKS refuses that link too (ELOOP).
        Resolve::NoLinks => (
            OFlags::PATH | OFlags::CLOEXEC,
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ),
    };
    match openat2(&dir, rel, oflags, Mode::empty(), resolve) {
        Ok(fd) => Ok(Some(Found { fd })),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads `rel` (relative to `root`, resolved beneath it) if it is a regular file of at most
/// `max` bytes. `Ok(None)` if nothing is there; an error names what is wrong with what is.
pub fn read(root: &Path, rel: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
    let Some(found) = find(root, Path::new(rel), Resolve::InRoot)? else {
        return Ok(None);
    };
    let what = format!("/{}", rel.trim_start_matches('/'));
    let (file, _) = found.open_regular(&what)?;
    let mut buf = Vec::new();
    file.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} is larger than {max} bytes"),
        ));
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_stay_inside_and_only_bounded_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(dir.path().join("outside"), "host secret").unwrap();
        std::fs::write(root.join("etc/ok"), "inside").unwrap();
        std::fs::write(root.join("big"), vec![b'x'; 100]).unwrap();
        symlink("/etc/ok", root.join("abs")).unwrap();
        symlink("../../../../outside", root.join("up")).unwrap();
        symlink(dir.path().join("outside"), root.join("host")).unwrap();
        symlink("/dev/zero", root.join("zero")).unwrap();
        symlink("/proc/self/root/etc/passwd", root.join("magic")).unwrap();
        nix::unistd::mkfifo(
            &root.join("fifo"),
            nix::sys::stat::Mode::from_bits(0o600).unwrap(),
        )
        .unwrap();
        let r = |p: &str| read(&root, p, 64);
        assert_eq!(r("etc/ok").unwrap().unwrap(), b"inside");
        assert_eq!(r("/etc/ok").unwrap().unwrap(), b"inside");
        assert_eq!(
            r("abs").unwrap().unwrap(),
            b"inside",
            "absolute links stay in the root"
        );
        assert_eq!(r("up").unwrap(), None, "`..` stops at the root");
        assert_eq!(
            r("host").unwrap(),
            None,
            "a host path is looked up inside the root"
        );
        assert_eq!(r("zero").unwrap(), None, "no /dev/zero inside the root");
        assert!(r("magic").is_err() || r("magic").unwrap().is_none());
        assert!(
            r("fifo")
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
        assert!(r("big").unwrap_err().to_string().contains("larger than 64"));
        // A device node where a file was expected is never opened: /dev/full (1:7) would
        // answer reads with zeros; it is refused by what it is, before any open.
        nix::sys::stat::mknod(
            &root.join("dev-full"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits(0o666).unwrap(),
            nix::sys::stat::makedev(1, 7),
        )
        .unwrap();
        let e = r("dev-full").unwrap_err().to_string();
        assert!(
            e.contains("not a regular file (it is a character device)"),
            "{e}"
        );
        let found = find(&root, Path::new("dev-full"), Resolve::NoLinks)
            .unwrap()
            .unwrap();
        assert!(found.open_regular("x").is_err());
        assert!(
            find(&root, Path::new("abs"), Resolve::NoLinks).is_err(),
            "NoLinks refuses a link"
        );
        assert_eq!(r("nope").unwrap(), None);
        assert_eq!(r("etc/ok/x").unwrap(), None);
    }
}
