//! A writer for the cpio "newc" format (magic `070701`), the format the Linux kernel unpacks
//! as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Each entry is a 110-byte ASCII header of thirteen 8-digit hexadecimal fields (inode, mode,
//! uid, gid, nlink, mtime, file size, dev major/minor, rdev major/minor, name size including its
//! NUL, checksum), then the NUL-terminated name padded to a multiple of 4 bytes, then the file
//! data (a symlink's data is its target) padded to a multiple of 4 bytes. The archive ends with
//! an entry named `TRAILER!!!`; this writer then pads the whole archive to 512-byte blocks, as
//! GNU cpio does.
//!
//! Archive paths are relative (`bin/busybox`, never `/bin/busybox`). **Parent directories are
//! created automatically** (mode 0755) the first time a path below them is written; the writer
//! remembers every directory it wrote. To give a directory another mode, call [`CpioWriter::dir`]
//! before writing anything below it. Every entry is owned by root (uid 0, gid 0) and carries
//! mtime 0, so the same inputs always give the same bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;
const BLOCK: u64 = 512;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
/// Permission bits, setuid/setgid and sticky: the part of a mode a caller chooses.
const PERM_MASK: u32 = 0o7777;

/// What kind of entry an archive path holds, to check later entries against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Dir { mode: u32 },
    Other,
}

/// Writes a newc cpio archive to `W`. See the module documentation for the conventions.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far, for alignment.
    offset: u64,
    next_ino: u32,
    written: HashMap<String, Written>,
}

/// The fields of one header that vary between entries.
struct Header {
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn check_path(path: &str) -> io::Result<()> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(invalid(format!(
            "cpio path {path:?} must be relative, without empty, '.' or '..' components"
        )));
    }
    Ok(())
}

impl<W: Write> CpioWriter<W> {
    /// Starts an empty archive.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            offset: 0,
            next_ino: 1,
            written: HashMap::new(),
        }
    }

    /// Adds a directory with permission bits `mode` (e.g. `0o755`, `0o1777`). Writing a directory
    /// that already exists with the same mode does nothing; with another mode it is an error,
    /// since its first entry (perhaps implicit) already fixed the mode.
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        check_path(path)?;
        let mode = mode & PERM_MASK;
        match self.written.get(path) {
            Some(Written::Dir { mode: old }) if *old == mode => return Ok(()),
            Some(Written::Dir { mode: old }) => {
                return Err(invalid(format!(
                    "cpio directory {path} was already written with mode {old:o}; \
                     declare it with mode {mode:o} before anything below it"
                )));
            }
            Some(Written::Other) => {
                return Err(invalid(format!("cpio path {path} was already written")));
            }
            None => {}
        }
        self.parents(path)?;
        self.entry(
            path,
            &Header {
                mode: S_IFDIR | mode,
                nlink: 2,
                size: 0,
                rdev: (0, 0),
            },
        )?;
        self.written.insert(path.to_owned(), Written::Dir { mode });
        Ok(())
    }

    /// Adds a regular file holding `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let size = file_size(path, data.len() as u64)?;
        self.start_other(path)?;
        self.entry(
            path,
            &Header {
                mode: S_IFREG | (mode & PERM_MASK),
                nlink: 1,
                size,
                rdev: (0, 0),
            },
        )?;
        self.data(data)
    }

    /// Adds a regular file whose contents are streamed from the host file `src`.
    pub fn file_from_path(&mut self, path: &str, mode: u32, src: &Path) -> io::Result<()> {
        let mut f = File::open(src)?;
        let len = f.metadata()?.len();
        let size = file_size(path, len)?;
        self.start_other(path)?;
        self.entry(
            path,
            &Header {
                mode: S_IFREG | (mode & PERM_MASK),
                nlink: 1,
                size,
                rdev: (0, 0),
            },
        )?;
        let copied = io::copy(&mut (&mut f).take(len), &mut self.out)?;
        // A file that shrank while being copied would leave the archive inconsistent.
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} shrank from {len} to {copied} bytes while being archived",
                    src.display()
                ),
            ));
        }
        self.offset += len;
        self.pad(4)
    }

    /// Adds a symbolic link at `path` pointing to `target` (stored verbatim; relative targets
    /// resolve against the link's directory inside the guest).
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        if target.is_empty() || target.contains('\0') {
            return Err(invalid(format!(
                "cpio symlink {path}: bad target {target:?}"
            )));
        }
        let size = file_size(path, target.len() as u64)?;
        self.start_other(path)?;
        self.entry(
            path,
            &Header {
                mode: S_IFLNK | 0o777,
                nlink: 1,
                size,
                rdev: (0, 0),
            },
        )?;
        self.data(target.as_bytes())
    }

    /// Adds a character device node (e.g. `dev/console`, 5:1), which the kernel creates while
    /// unpacking an initramfs so that init starts with a console.
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.start_other(path)?;
        self.entry(
            path,
            &Header {
                mode: S_IFCHR | (mode & PERM_MASK),
                nlink: 1,
                size: 0,
                rdev: (major, minor),
            },
        )
    }

    /// Writes the trailer, pads the archive to a multiple of 512 bytes, flushes and returns the
    /// inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(
            TRAILER,
            0,
            &Header {
                mode: 0,
                nlink: 1,
                size: 0,
                rdev: (0, 0),
            },
        )?;
        self.pad(BLOCK)?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Checks that `path` is new and creates its missing parent directories.
    fn start_other(&mut self, path: &str) -> io::Result<()> {
        check_path(path)?;
        if self.written.contains_key(path) {
            return Err(invalid(format!("cpio path {path} was already written")));
        }
        self.parents(path)?;
        self.written.insert(path.to_owned(), Written::Other);
        Ok(())
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            let parent = &path[..end];
            match self.written.get(parent) {
                Some(Written::Dir { .. }) => {}
                Some(Written::Other) => {
                    return Err(invalid(format!(
                        "cpio path {path}: {parent} is not a directory"
                    )));
                }
                None => {
                    self.entry(
                        parent,
                        &Header {
                            mode: S_IFDIR | 0o755,
                            nlink: 2,
                            size: 0,
                            rdev: (0, 0),
                        },
                    )?;
                    self.written
                        .insert(parent.to_owned(), Written::Dir { mode: 0o755 });
                }
            }
            end += 1;
        }
        Ok(())
    }

    fn entry(&mut self, path: &str, h: &Header) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, ino, h)
    }

    fn header(&mut self, name: &str, ino: u32, h: &Header) -> io::Result<()> {
        let namesize = name.len() + 1;
        let fields = [
            ino,
            h.mode,
            0,
            0,
            h.nlink,
            0,
            h.size,
            0,
            0,
            h.rdev.0,
            h.rdev.1,
            namesize as u32,
            0,
        ];
        let mut buf = String::with_capacity(HEADER_LEN + namesize);
        buf.push_str(MAGIC);
        for f in fields {
            buf.push_str(&format!("{f:08x}"));
        }
        buf.push_str(name);
        buf.push('\0');
        self.out.write_all(buf.as_bytes())?;
        self.offset += buf.len() as u64;
        self.pad(4)
    }

    fn data(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.offset += data.len() as u64;
        self.pad(4)
    }

    fn pad(&mut self, align: u64) -> io::Result<()> {
        let n = (align - self.offset % align) % align;
        self.out.write_all(&vec![0; n as usize])?;
        self.offset += n;
        Ok(())
    }
}

/// newc stores sizes in 32 bits.
fn file_size(path: &str, len: u64) -> io::Result<u32> {
    u32::try_from(len).map_err(|_| {
        invalid(format!(
            "cpio entry {path} is {len} bytes; newc allows < 4 GiB"
        ))
    })
}

/// Test support: a strict newc reader.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// One parsed entry: name, mode, rdev, data.
    pub(crate) type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// A strict newc reader for the tests: checks magic, alignment and the trailer.
    pub(crate) fn parse(archive: &[u8]) -> Vec<Entry> {
        assert_eq!(
            archive.len() % 512,
            0,
            "archive is padded to 512-byte blocks"
        );
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            let h = std::str::from_utf8(&archive[at..at + HEADER_LEN]).unwrap();
            assert_eq!(&h[..6], MAGIC);
            let field = |i: usize| u32::from_str_radix(&h[6 + 8 * i..14 + 8 * i], 16).unwrap();
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name_at = at + HEADER_LEN;
            let name = std::str::from_utf8(&archive[name_at..name_at + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(archive[name_at + namesize - 1], 0);
            let data_at = (name_at + namesize).next_multiple_of(4);
            at = (data_at + size).next_multiple_of(4);
            if name == TRAILER {
                assert!(archive[at..].iter().all(|&b| b == 0));
                return out;
            }
            out.push((
                name,
                mode,
                (field(9), field(10)),
                archive[data_at..data_at + size].to_vec(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::parse;
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("tmp", 0o1777).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("lib/modules/cela/load.order", 0o644, b"x\n")
            .unwrap();
        w.symlink("sbin", "bin").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trips_and_creates_parents_once() {
        let entries = parse(&sample());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "tmp",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/cela",
                "lib/modules/cela/load.order",
                "sbin",
                "dev",
                "dev/console",
                "empty"
            ]
        );
        let by_name = |n: &str| entries.iter().find(|e| e.0 == n).unwrap();
        assert_eq!(by_name("tmp").1, 0o041777);
        assert_eq!(by_name("init").1, 0o100755);
        assert_eq!(by_name("init").3, b"#!/bin/sh\necho hi\n");
        assert_eq!(by_name("lib/modules").1, 0o040755);
        assert_eq!(by_name("sbin").1, 0o120777);
        assert_eq!(by_name("sbin").3, b"bin");
        assert_eq!(by_name("dev/console").1, 0o020600);
        assert_eq!(by_name("dev/console").2, (5, 1));
        assert!(by_name("empty").3.is_empty());
    }

    #[test]
    fn same_inputs_give_same_bytes() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn streams_files_from_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("blob");
        let blob: Vec<u8> = (0..10_001u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &blob).unwrap();
        let mut w = CpioWriter::new(Vec::new());
        w.file_from_path("bin/blob", 0o755, &src).unwrap();
        let entries = parse(&w.finish().unwrap());
        assert_eq!(entries[1].0, "bin/blob");
        assert_eq!(entries[1].3, blob);
    }

    #[test]
    fn rejects_bad_paths_duplicates_and_late_modes() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/init", "a//b", "a/../b", "./a", "a/"] {
            assert!(w.file(bad, 0o644, b"").is_err(), "{bad:?}");
        }
        w.file("etc/passwd", 0o644, b"").unwrap();
        assert!(w.file("etc/passwd", 0o644, b"").is_err());
        assert!(w.file("etc/passwd/x", 0o644, b"").is_err());
        w.dir("etc", 0o755).unwrap();
        let err = w.dir("etc", 0o700).unwrap_err();
        assert!(
            err.to_string().contains("before anything below it"),
            "{err}"
        );
        w.symlink("usr/bin", "../bin").unwrap();
        assert!(w.file("usr/bin/x", 0o644, b"").is_err());
    }

    /// GNU cpio, when installed, reads the archive back with the same names and kinds.
    #[test]
    fn gnu_cpio_lists_the_archive() {
        let Ok(mut child) = Command::new("cpio")
            .args(["-itv", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            eprintln!("cpio is not installed; skipping the cross-check");
            return;
        };
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 10, "{listing}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("drwxrwxrwt") && l.ends_with(" tmp")),
            "{listing}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" init")),
            "{listing}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("lrwxrwxrwx") && l.ends_with("sbin -> bin")),
            "{listing}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("crw-------") && l.ends_with(" dev/console")),
            "{listing}"
        );
    }
}
