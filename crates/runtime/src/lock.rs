//! The state root's lock: serialises cela-runc processes that read and write the same state.
//!
//! libcontainer rewrites `state.json` in place (truncate, then write), so a `state` racing a
//! `kill` or a `start` can read an empty or cut file, and two writers can leave a mix of both.
//! runc avoids this by renaming a new file over the old one; we cannot change how libcontainer
//! writes, so every runtime operation takes this lock first: shared to read, exclusive to write.
//!
//! It is a POSIX record lock (`F_SETLK`) on `<root>/.lock`, not a `flock`: a record lock
//! belongs to the process, so the container processes libcontainer forks during `create` do
//! not inherit it (a forked holder of a `flock` would keep it until its `exec`, and `start`
//! would wait on it for ever). A process that takes it twice just holds it once, so only the
//! runtime's public operations lock, and dropping the guard ends the lock for the process.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};

use crate::error::Error;

/// The lock file's name inside the state root; ids may not start with '.', so no container
/// can be called this.
pub const LOCK_FILE: &str = ".lock";

/// How long an operation waits for another cela-runc before it gives up. Operations hold the
/// lock for milliseconds, except `create` and `start` while OCI hooks run.
const WAIT: Duration = Duration::from_secs(60);

/// What the holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read state; many readers at once.
    Shared,
    /// Change state; alone.
    Exclusive,
}

/// A held lock; released when dropped (closing the file ends the record lock).
#[derive(Debug)]
pub struct RootLock {
    _file: File,
}

impl RootLock {
    /// Takes the lock of the state root `root`, waiting at most a minute for other holders.
    /// `root` must exist.
    pub fn acquire(root: &Path, mode: Mode) -> Result<RootLock, Error> {
        Self::acquire_within(root, mode, WAIT)
    }

    fn acquire_within(root: &Path, mode: Mode, wait: Duration) -> Result<RootLock, Error> {
        let path = root.join(LOCK_FILE);
        let io = |what: &str, source| Error::Io {
            what: format!("{what} {}", path.display()),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("opening the state lock", e))?;
        let request = libc::flock {
            l_type: match mode {
                Mode::Shared => libc::F_RDLCK,
                Mode::Exclusive => libc::F_WRLCK,
            } as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(1);
        loop {
            match fcntl(file.as_fd(), FcntlArg::F_SETLK(&request)) {
                Ok(_) => return Ok(RootLock { _file: file }),
                Err(Errno::EACCES | Errno::EAGAIN) if Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(Errno::EACCES | Errno::EAGAIN) => {
                    return Err(Error::Locked {
                        path: path.clone(),
                        waited: wait,
                    });
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(io("locking", e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Record locks do not conflict within one process, so the competing holder is a child.
    fn child_holding(root: &Path, mode: Mode) -> (nix::unistd::Pid, std::os::fd::OwnedFd) {
        let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
        let (hold_r, hold_w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child of this multi-threaded test binary only takes the lock (glibc's
        // fork leaves malloc usable in the child), reports on a pipe, blocks reading another
        // and leaves with `_exit`, running none of the parent's destructors.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let lock = RootLock::acquire(root, mode);
                let _ = nix::unistd::write(&ready_w, &[lock.is_ok() as u8]);
                let mut b = [0u8; 1];
                let _ = nix::unistd::read(&hold_r, &mut b);
                // SAFETY: ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let mut b = [0u8; 1];
                nix::unistd::read(&ready_r, &mut b).unwrap();
                assert_eq!(b[0], 1, "the child took the lock");
                (child, hold_w)
            }
        }
    }

    fn release(child: nix::unistd::Pid, hold: std::os::fd::OwnedFd) {
        // A byte, not EOF: the other test's child may hold a copy of this pipe's write end.
        nix::unistd::write(&hold, &[1]).unwrap();
        let status = nix::sys::wait::waitpid(child, None).unwrap();
        assert!(matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)));
    }

    #[test]
    fn readers_share_and_a_writer_waits() {
        let root = tempfile::tempdir().unwrap();
        let (child, hold) = child_holding(root.path(), Mode::Shared);
        let short = Duration::from_millis(30);
        assert!(RootLock::acquire_within(root.path(), Mode::Shared, short).is_ok());
        let err = RootLock::acquire_within(root.path(), Mode::Exclusive, short).unwrap_err();
        assert!(
            err.to_string().contains("another cela-runc"),
            "a clear message: {err}"
        );
        release(child, hold);
        assert!(RootLock::acquire_within(root.path(), Mode::Exclusive, short).is_ok());
    }

    #[test]
    fn a_writer_excludes_readers() {
        let root = tempfile::tempdir().unwrap();
        let (child, hold) = child_holding(root.path(), Mode::Exclusive);
        let short = Duration::from_millis(30);
        assert!(RootLock::acquire_within(root.path(), Mode::Shared, short).is_err());
        release(child, hold);
        assert!(RootLock::acquire_within(root.path(), Mode::Shared, short).is_ok());
    }
}
