//! The ids jailed monitors run as: each live monitor has a uid (and the gid of the same
//! number) of its own from [`FIRST`]..[`FIRST`]+[`COUNT`], so no two monitors can signal,
//! trace or share files with each other, and none is an id a host user or a container's user
//! namespace mapping uses: Debian's /etc/subuid ranges start at 100000 and grow by 65536 per
//! user, systemd gives containers 0x80000..0x6FFFFFFF and its "foreign" range is 0x7FFE0000..
//! 0x7FFEFFFF; this range sits between them, below 2^31 (tools mishandle uids above). A lease is an exclusive `flock`
//! on the file named after the id in the run directory's `monitor-ids/`: held by the caller,
//! the reaper and the monitor, so it ends only when all three have, and a killed monitor
//! leaves nothing to clean up.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;

use super::JailError;

/// The first uid/gid of the monitors' range (0x7E63_0000).
pub const FIRST: u32 = 0x7E63_0000;
/// How many monitors can run at once.
pub const COUNT: u32 = 65_536;

/// One id, held until dropped.
pub struct Lease {
    id: u32,
    lock: Flock<File>,
}

impl Lease {
    /// Takes the lowest free id in `dir` (so the directory holds as many files as monitors
    /// ever ran at once).
    pub fn take(dir: &Path) -> Result<Lease, JailError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(JailError::prepare(format!("creating {}", dir.display())))?;
        for id in FIRST..FIRST + COUNT {
            // Read-only (flock needs no more): the monitor keeps it open, and must not be able
            // to write to a file of the host's through it.
            let fd = nix::fcntl::open(
                &dir.join(id.to_string()),
                OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| {
                JailError::prepare(format!("opening a lease in {}", dir.display()))(e.into())
            })?;
            let file = File::from(fd);
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Lease { id, lock }),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => {
                    return Err(JailError::prepare(format!(
                        "locking a lease in {}",
                        dir.display()
                    ))(e.into()));
                }
            }
        }
        Err(JailError::Prepare {
            what: format!("taking a monitor id in {}", dir.display()),
            source: std::io::Error::other(format!("all {COUNT} are in use")),
        })
    }

    /// The uid and gid.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The lock's descriptor, kept open in the reaper and the monitor.
    pub(super) fn fd(&self) -> RawFd {
        self.lock.as_raw_fd()
    }
}
