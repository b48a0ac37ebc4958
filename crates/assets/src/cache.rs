//! The on-disk cache's two safety rules, shared by every asset:
//!
//! * **One writer per area.** A process that is about to fill an area (`kernel/`, `busybox/`,
//!   `initramfs/`) holds an exclusive `flock` on `<area>/.lock`; a second process waits, then
//!   finds the work done. The kernel drops the lock if its holder dies.
//! * **Nothing half-written is ever visible.** Work happens in a `.tmp-*` entry of the area and
//!   is renamed into place when complete; the holder of the lock removes `.tmp-*` entries left
//!   by a process that died (only lock holders create them, so none can be in use).

use std::cmp::Ordering;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::{AssetError, Progress};

/// Prefix of work-in-progress entries.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

/// An exclusive lock on one cache area, released when dropped.
#[derive(Debug)]
pub(crate) struct AreaLock {
    _file: File,
}

impl AreaLock {
    /// Creates `area` if needed and locks it, waiting (and saying so) while another process
    /// holds it.
    pub(crate) fn acquire(area: &Path, progress: &Progress) -> Result<Self, AssetError> {
        std::fs::create_dir_all(area).at("creating cache directory", area)?;
        let path = area.join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at("opening lock file", &path)?;
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB).at("locking", &path)? {
            let step = progress.step(format!(
                "waiting for another cela process to finish {}",
                area.display()
            ));
            flock(&file, libc::LOCK_EX).at("locking", &path)?;
            step.done();
        }
        Ok(AreaLock { _file: file })
    }
}

/// `flock(2)`, retried on EINTR. Returns false when `LOCK_NB` was given and the lock is held.
fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: flock only reads the descriptor number, which `file` keeps open for the
        // duration of the call; it touches no memory of ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if op & libc::LOCK_NB != 0 => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// Removes the `.tmp-*` entries of `area`. Call only while holding the area's lock.
pub(crate) fn remove_leftovers(area: &Path) -> Result<(), AssetError> {
    for entry in std::fs::read_dir(area).at("listing", area)? {
        let entry = entry.at("listing", area)?;
        if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().at("reading", &path)?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.at("removing leftover", &path)?;
    }
    Ok(())
}

/// A fresh work directory in `area`, removed when dropped unless renamed away first.
pub(crate) fn work_dir(area: &Path) -> Result<tempfile::TempDir, AssetError> {
    tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempdir_in(area)
        .at("creating a work directory in", area)
}

/// The entries of `area` that are finished assets (not `.lock`, not `.tmp-*`), highest version
/// first (see [`version_cmp`]).
pub(crate) fn finished_entries(area: &Path) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(area) else {
        return Vec::new();
    };
    let mut entries: Vec<(String, PathBuf)> = dir
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(name, _)| !name.starts_with('.'))
        .collect();
    entries.sort_by(|a, b| version_cmp(&b.0, &a.0));
    entries.into_iter().map(|(_, p)| p).collect()
}

/// Orders version strings with digit runs compared as numbers (`6.1.0-9` < `6.1.0-56`), a
/// simplification of dpkg's ordering that is enough to pick the newest of our cache entries.
pub(crate) fn version_cmp(a: &str, b: &str) -> Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, c) in s.char_indices().skip(1) {
            let prev = s[..i]
                .chars()
                .next_back()
                .is_some_and(|p| p.is_ascii_digit());
            if prev != c.is_ascii_digit() {
                out.push((prev, &s[start..i]));
                start = i;
            }
        }
        if !s.is_empty() {
            out.push((
                s[start..].starts_with(|c: char| c.is_ascii_digit()),
                &s[start..],
            ));
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    for (x, y) in ra.iter().zip(&rb) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ra.len().cmp(&rb.len())
}

/// A name safe as one path component (package versions carry `:` and `+`).
pub(crate) fn component(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_excludes_a_second_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let area = dir.path().join("kernel");
        let first = AreaLock::acquire(&area, &Progress::hidden()).unwrap();
        // Another open file description, as another process would have.
        let other = File::options()
            .write(true)
            .open(area.join(".lock"))
            .unwrap();
        assert!(!flock(&other, libc::LOCK_EX | libc::LOCK_NB).unwrap());
        drop(first);
        assert!(flock(&other, libc::LOCK_EX | libc::LOCK_NB).unwrap());
    }

    #[test]
    fn leftovers_go_and_finished_entries_stay() {
        let dir = tempfile::tempdir().unwrap();
        let area = dir.path();
        std::fs::create_dir(area.join(".tmp-abc")).unwrap();
        std::fs::write(area.join(".tmp-abc/x"), b"").unwrap();
        std::fs::write(area.join(".tmp-file"), b"").unwrap();
        std::fs::write(area.join(".lock"), b"").unwrap();
        std::fs::create_dir(area.join("6.1.0-56-cloud-amd64")).unwrap();
        remove_leftovers(area).unwrap();
        let mut left: Vec<_> = std::fs::read_dir(area)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, [".lock", "6.1.0-56-cloud-amd64"]);
        assert_eq!(finished_entries(area), [area.join("6.1.0-56-cloud-amd64")]);
        let work = work_dir(area).unwrap();
        assert!(
            work.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(TMP_PREFIX)
        );
    }

    #[test]
    fn versions_compare_numerically() {
        let mut v = [
            "6.1.0-9-cloud-amd64",
            "6.1.0-56-cloud-amd64",
            "6.12.1-cloud-amd64",
            "6.1.0-10-cloud-amd64",
        ];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(
            v,
            [
                "6.1.0-9-cloud-amd64",
                "6.1.0-10-cloud-amd64",
                "6.1.0-56-cloud-amd64",
                "6.12.1-cloud-amd64"
            ]
        );
        assert_eq!(version_cmp("1.0", "1.0"), Ordering::Equal);
        assert_eq!(version_cmp("1.0", "1.0.1"), Ordering::Less);
        assert_eq!(version_cmp("", "1"), Ordering::Less);
    }

    #[test]
    fn components_are_path_safe() {
        assert_eq!(component("1:1.35.0-4+deb12u1+b1"), "1_1.35.0-4+deb12u1+b1");
        assert_eq!(component("a/b"), "a_b");
    }
}
