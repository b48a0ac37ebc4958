//! The monitor's side of the jail: [`prepare`] as soon as it is forked (its own namespaces,
//! no descriptor it was not given), and [`Jail::enter`] once the machine is built and before
//! any thread starts, which leaves it with nothing: an empty read-only root, no capability, an
//! unprivileged uid, tight rlimits, no_new_privs and Landlock. Both run while the monitor has
//! one thread: credentials and the root are per thread until then shared by the threads
//! started afterwards.

use std::io::Read;
use std::os::fd::{AsFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use caps::CapSet;
use landlock::{
    ABI, Access, AccessFs, AccessNet, RestrictionStatus, Ruleset, RulesetAttr, RulesetStatus, Scope,
};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::unistd::{Gid, Uid};

use super::{JailConfig, JailError};

/// Set once this process has entered its jail.
pub(super) static ENTERED: AtomicBool = AtomicBool::new(false);

/// The highest number of descriptors a jailed monitor may hold.
const MAX_FILES: u64 = 1024;

/// The monitor's host name, in its own UTS namespace.
const HOSTNAME: &str = "cela-monitor";

/// Runs first in the monitor (pid 1 of its pid namespace, root, one thread): closes every
/// descriptor but stdio and `keep`, and moves into new mount, IPC, UTS and network
/// namespaces, with mounts private so nothing it mounts reaches the host.
pub(super) fn prepare(keep: &[RawFd]) -> Result<(), JailError> {
    close_all_but(keep);
    let err = |what| {
        move |e: nix::errno::Errno| JailError::Enter {
            what,
            source: e.into(),
        }
    };
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(err("new mount, IPC, UTS and network namespaces"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err("making mounts private"))?;
    nix::unistd::sethostname(HOSTNAME).map_err(err("setting the host name"))?;
    Ok(())
}

/// Closes every descriptor from 3 up except `keep`.
fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|fd| **fd > 2)
        .map(|fd| *fd as u32)
        .collect();
    keep.sort_unstable();
    let mut first = 3u32;
    for fd in keep.into_iter().chain([u32::MAX]) {
        if fd > first {
            // SAFETY: close_range only closes descriptors; none in [first, fd) is used by
            // anything in this freshly forked, single-threaded process but what is dropped
            // with it (the caller's files, which it does not touch here).
            unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0) };
        }
        first = fd.saturating_add(1);
    }
}

/// What the monitor becomes when it enters the jail, decided by the caller.
#[derive(Debug)]
pub struct Jail {
    id: u32,
    /// An empty directory of the host's run directory, the tmpfs root is mounted on (in the
    /// monitor's own mount namespace only).
    mount_point: PathBuf,
    largest_file: u64,
    vcpus: u32,
    /// Readable once the reaper has put the monitor in its cgroup.
    go: RawFd,
}

/// How the monitor was left once inside: what Landlock could enforce on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landlock {
    Full,
    Partial,
    /// The kernel has no Landlock: the other walls stand alone.
    Absent,
}

impl Jail {
    pub(super) fn new(id: u32, mount_point: PathBuf, config: &JailConfig, go: RawFd) -> Jail {
        Jail {
            id,
            mount_point,
            largest_file: config.largest_file,
            vcpus: config.vcpus,
            go,
        }
    }

    /// The uid and gid the monitor runs as.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Enters the jail: call with one thread, after every file the monitor needs is open.
    pub fn enter(self) -> Result<Landlock, JailError> {
        self.wait_for_cgroup()?;
        self.pivot()?;
        self.limit()?;
        self.drop_privileges()?;
        let landlock = restrict()?;
        ENTERED.store(true, Ordering::Relaxed);
        Ok(landlock)
    }

    /// Waits for the reaper's word that this process is in its cgroup (it moved it while the
    /// machine was built), before the guest can make it allocate anything.
    fn wait_for_cgroup(&self) -> Result<(), JailError> {
        // SAFETY: `go` is the read end of the reaper's pipe, kept open for this process
        // (`prepare` keeps it) and owned from here on.
        let go = unsafe { std::os::fd::OwnedFd::from_raw_fd(self.go) };
        let mut byte = [0u8; 1];
        match std::fs::File::from(go).read(&mut byte) {
            Ok(1) => Ok(()),
            Ok(_) => Err(JailError::Cgroup(
                "the reaper could not put the monitor in its cgroup".into(),
            )),
            Err(source) => Err(JailError::Enter {
                what: "waiting for the cgroup",
                source,
            }),
        }
    }

    /// The root becomes an empty, read-only tmpfs; the host's tree is detached.
    fn pivot(&self) -> Result<(), JailError> {
        let err = |what| {
            move |e: nix::errno::Errno| JailError::Enter {
                what,
                source: e.into(),
            }
        };
        let hidden = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(
            Some("cela-jail"),
            &self.mount_point,
            Some("tmpfs"),
            hidden,
            Some("size=4k,nr_inodes=4,mode=0555"),
        )
        .map_err(err("mounting the jail's root"))?;
        nix::unistd::chdir(&self.mount_point).map_err(err("entering the jail's root"))?;
        match nix::unistd::pivot_root(".", ".") {
            Ok(()) => {
                umount2(".", MntFlags::MNT_DETACH).map_err(err("detaching the host's tree"))?;
            }
            // The host runs from its initramfs (rootfs cannot be pivoted away, as in the
            // nested lab's L1): move the jail's root over / and chroot into it, as runc's
            // --no-pivot does. The host's tree stays underneath, out of reach of a process
            // with no CAP_SYS_CHROOT, no directory descriptor and Landlock's empty ruleset.
            Err(nix::errno::Errno::EINVAL) => {
                mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                    .map_err(err("moving the jail's root over /"))?;
                nix::unistd::chroot(".").map_err(err("chroot"))?;
            }
            Err(e) => return Err(err("pivot_root")(e)),
        }
        nix::unistd::chdir("/").map_err(err("entering /"))?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | hidden,
            None::<&str>,
        )
        .map_err(err("making the jail's root read-only"))?;
        Ok(())
    }

    /// No core dumps (guest memory), at most [`MAX_FILES`] descriptors, no write past the
    /// largest disk (unless stdout or stderr is a regular file, which grows), and threads
    /// for the vCPUs and the devices only.
    fn limit(&self) -> Result<(), JailError> {
        let set = |what, resource, value: u64| {
            setrlimit(resource, value, value).map_err(|e| JailError::Enter {
                what,
                source: e.into(),
            })
        };
        set("RLIMIT_CORE", Resource::RLIMIT_CORE, 0)?;
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((MAX_FILES, MAX_FILES));
        set(
            "RLIMIT_NOFILE",
            Resource::RLIMIT_NOFILE,
            hard.min(MAX_FILES),
        )?;
        let grows = [std::io::stdout().as_fd(), std::io::stderr().as_fd()]
            .into_iter()
            .any(|fd| {
                nix::sys::stat::fstat(fd).is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFREG)
            });
        if !grows {
            set("RLIMIT_FSIZE", Resource::RLIMIT_FSIZE, self.largest_file)?;
        }
        set(
            "RLIMIT_NPROC",
            Resource::RLIMIT_NPROC,
            u64::from(self.vcpus) + 64,
        )?;
        Ok(())
    }

    /// Every capability gone (bounding set first, while that is still allowed), then the
    /// monitor's own uid and gid with no supplementary groups, then no_new_privs.
    fn drop_privileges(&self) -> Result<(), JailError> {
        let caps_err = |what| {
            move |e: caps::errors::CapsError| JailError::Enter {
                what,
                source: std::io::Error::other(e.to_string()),
            }
        };
        let err = |what| {
            move |e: nix::errno::Errno| JailError::Enter {
                what,
                source: e.into(),
            }
        };
        caps::clear(None, CapSet::Bounding).map_err(caps_err("dropping the bounding set"))?;
        nix::unistd::setgroups(&[]).map_err(err("dropping supplementary groups"))?;
        let (uid, gid) = (Uid::from_raw(self.id), Gid::from_raw(self.id));
        nix::unistd::setresgid(gid, gid, gid).map_err(err("setresgid"))?;
        nix::unistd::setresuid(uid, uid, uid).map_err(err("setresuid"))?;
        // A change of credentials clears the parent-death signal: ask again, or a killed
        // caller (and so reaper) would leave the VM running. (Were the reaper to die in
        // between, the monitor would run on until stopped; no parent can be checked from
        // pid 1 of a namespace. The window is these two calls.)
        // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(JailError::Enter {
                what: "PR_SET_PDEATHSIG",
                source: std::io::Error::last_os_error(),
            });
        }
        for set in [CapSet::Inheritable, CapSet::Ambient] {
            caps::clear(None, set).map_err(caps_err("clearing capabilities"))?;
        }
        for set in [CapSet::Permitted, CapSet::Effective] {
            let left = caps::read(None, set).map_err(caps_err("reading capabilities"))?;
            if !left.is_empty() {
                return Err(JailError::Enter {
                    what: "dropping capabilities",
                    source: std::io::Error::other(format!("{left:?} are left")),
                });
            }
        }
        nix::sys::prctl::set_no_new_privs().map_err(err("no_new_privs"))?;
        Ok(())
    }
}

/// Landlock, the second wall: every file-system access, TCP bind and connect, abstract Unix
/// socket and signal outside the monitor is refused, so even a monitor whose pivot had failed
/// would open nothing. (A Unix socket connect by path is not a Landlock right before ABI 6's
/// scopes; the monitor makes none: see [`super::broker`].)
fn restrict() -> Result<Landlock, JailError> {
    let abi = ABI::V6;
    let err = |e: landlock::RulesetError| JailError::Landlock(e.to_string());
    let status: RestrictionStatus = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Landlock::Full,
        RulesetStatus::PartiallyEnforced => Landlock::Partial,
        _ => Landlock::Absent,
    })
}
