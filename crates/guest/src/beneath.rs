//! Reading a file of an untrusted root filesystem (an image's, a container's) from outside it:
//! the path is resolved *beneath* the root, as if the root were `/` (`openat2` with
//! `RESOLVE_IN_ROOT`: a symlink to `/etc/shadow` or `../../..` leads back inside, and `/proc`
//! magic links are refused), only a regular file is read (a FIFO would block, a device such as
//! `/dev/zero` would never end), and no more than a bound.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags, openat2};

/// Reads `rel` (relative to `root`, resolved beneath it) if it is a regular file of at most
/// `max` bytes. `Ok(None)` if nothing is there; an error names what is wrong with what is.
pub fn read(root: &Path, rel: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let fd = match openat2(
        &dir,
        rel,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/{rel} is not a regular file"),
        ));
    }
    let mut buf = Vec::new();
    file.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/{rel} is larger than {max} bytes"),
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
        assert_eq!(r("nope").unwrap(), None);
        assert_eq!(r("etc/ok/x").unwrap(), None);
    }
}
