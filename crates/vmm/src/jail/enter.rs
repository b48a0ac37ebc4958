//! The monitor's side of the jail: [`prepare`] as soon as it is forked (its own namespaces,
//! no descriptor it was not given), and [`Jail::enter`] once the machine is built and before
//! any thread starts, which leaves it with nothing: an empty read-only root, no capability, an
//! unprivileged uid, tight rlimits, no_new_privs and Landlock. Both run while the monitor has
//! one thread: credentials and the root are per thread until then shared by the threads
//! started afterwards.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use caps::CapSet;
use landlock::{
    ABI, Access, AccessFs, AccessNet, PathBeneath, PathFd, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
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

/// How long the monitor waits for the reaper to put it in its cgroup (a few ms normally).
const GO_WAIT_MS: u16 = 30_000;

/// The monitor's host name, in its own UTS namespace.
const HOSTNAME: &str = "cela-monitor";

/// Runs first in the monitor (pid 1 of its pid namespace, root, one thread): closes every
/// descriptor but stdio and `keep`, and moves into new mount, IPC, UTS and network
/// namespaces, with mounts private so nothing it mounts reaches the host.
pub(super) fn prepare(keep: &[RawFd]) -> Result<(), JailError> {
    close_all_but(keep)?;
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

/// Closes every descriptor from 3 up except `keep`: with close_range(2), or on a kernel
/// without it (before 5.9), one by one as /proc/self/fd lists them. A descriptor it cannot
/// close is an error: the monitor must hold nothing of the caller's it was not given.
fn close_all_but(keep: &[RawFd]) -> Result<(), JailError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|fd| **fd > 2)
        .map(|fd| *fd as u32)
        .collect();
    keep.sort_unstable();
    let mut first = 3u32;
    let mut ranges_closed = true;
    for fd in keep.iter().copied().chain([u32::MAX]) {
        if fd > first {
            // SAFETY: close_range only closes descriptors; none in [first, fd) is used by
            // anything in this freshly forked, single-threaded process but what is dropped
            // with it (the caller's files, which it does not touch here).
            ranges_closed &= unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0) } == 0;
        }
        first = fd.saturating_add(1);
    }
    if ranges_closed {
        return Ok(());
    }
    let open: Vec<u32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|source| JailError::Enter {
            what: "listing the descriptors to close",
            source,
        })?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open.into_iter().filter(|fd| *fd > 2 && !keep.contains(fd)) {
        // SAFETY: as above; the directory's own descriptor, closed already, fails with EBADF.
        if unsafe { libc::close(fd as i32) } != 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EBADF)
        {
            return Err(JailError::Enter {
                what: "closing the caller's descriptors",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// What the monitor becomes when it enters the jail, decided by the caller.
#[derive(Debug)]
pub struct Jail {
    id: u32,
    /// An empty directory of the host's run directory, the tmpfs root is mounted on (in the
    /// monitor's own mount namespace only).
    mount_point: PathBuf,
    largest_file: u64,
    tasks: u64,
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
            tasks: config.tasks,
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
        self.pivot(&[])?;
        self.limit()?;
        self.drop_privileges()?;
        let landlock = restrict(&[], &[])?;
        ENTERED.store(true, Ordering::Relaxed);
        Ok(landlock)
    }

    /// Enters the jail as [`Jail::enter`] does, but with the host's system directories
    /// (`/usr` and the top-level library and binary directories or their links) and `files`
    /// visible read-only at their own paths (a file others may not read is copied in
    /// instead), and executes `program` with `args`, which keeps `inherit` open. The program
    /// runs under its own seccomp filter, not cela's (QEMU's `-sandbox`). Returns only on
    /// failure.
    pub fn exec(
        self,
        program: &Path,
        args: &[String],
        inherit: &[RawFd],
        files: &[PathBuf],
    ) -> JailError {
        match self.exec_program(program, args, inherit, files) {
            Err(e) => e,
            Ok(never) => match never {},
        }
    }

    fn exec_program(
        self,
        program: &Path,
        args: &[String],
        inherit: &[RawFd],
        files: &[PathBuf],
    ) -> Result<std::convert::Infallible, JailError> {
        let err = |what| {
            move |e: nix::errno::Errno| JailError::Enter {
                what,
                source: e.into(),
            }
        };
        let c = |s: &std::ffi::OsStr| {
            std::ffi::CString::new(s.as_bytes()).map_err(|_| JailError::Enter {
                what: "a program argument",
                source: std::io::Error::other("it holds a NUL byte"),
            })
        };
        // The program by its real path too (it may have been found through a link such as
        // /bin → usr/bin, which the jail makes only after everything else).
        let program = &std::fs::canonicalize(program).map_err(|source| JailError::Enter {
            what: "the program",
            source,
        })?;
        let c_program = c(program.as_os_str())?;
        let mut c_args = vec![c_program.clone()];
        for a in args {
            c_args.push(c(std::ffi::OsStr::new(a))?);
        }
        // No terminal, no stdout: the program talks through the descriptors it is given.
        let null = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(err("opening /dev/null"))?;
        for target in [0, 1] {
            // SAFETY: dup2 only changes this process's descriptor table.
            if unsafe { libc::dup2(null.as_raw_fd(), target) } < 0 {
                return Err(err("redirecting stdin and stdout")(
                    nix::errno::Errno::last(),
                ));
            }
        }
        drop(null);
        self.wait_for_cgroup()?;
        let mut entries = system_entries(program);
        for f in files {
            // By its real path, which has no link in it: the jail's tree is made before the
            // pivot, as root, so a path through a link could reach the host's files.
            let real = std::fs::canonicalize(f).map_err(|source| JailError::Enter {
                what: "a file the program reads",
                source,
            })?;
            if !entries.iter().any(|e| e.covers(&real)) {
                entries.push(Entry::file(&real)?);
            }
        }
        // Links last: none may stand in a path the others are made through.
        entries.sort_by_key(|e| matches!(e.kind, EntryKind::Link(_)));
        self.pivot(&entries)?;
        self.limit()?;
        self.drop_privileges()?;
        let readable: Vec<&Path> = entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Dir | EntryKind::File | EntryKind::Copy))
            .map(|e| e.path.as_path())
            .collect();
        let writable: Vec<&Path> = entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Device))
            .map(|e| e.path.as_path())
            .collect();
        let landlock = restrict(&readable, &writable)?;
        if landlock == Landlock::Absent {
            tracing::warn!("this kernel has no Landlock: the jail has one wall fewer");
        }
        ENTERED.store(true, Ordering::Relaxed);
        for fd in inherit {
            nix::fcntl::fcntl(
                // SAFETY: `fd` is open in this process (the caller's list of what the program
                // inherits); the borrow ends with the call.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) },
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(err("keeping a descriptor open across exec"))?;
        }
        let e = nix::unistd::execv(&c_program, &c_args).unwrap_err();
        Err(JailError::Enter {
            what: "executing the program",
            source: e.into(),
        })
    }

    /// Waits for the reaper's word that this process is in its cgroup (it moved it while the
    /// machine was built), before the guest can make it allocate anything.
    fn wait_for_cgroup(&self) -> Result<(), JailError> {
        // SAFETY: `go` is the read end of the reaper's pipe, kept open for this process
        // (`prepare` keeps it) for its whole life; the borrow ends with this function.
        let go = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.go) };
        let mut fds = [nix::poll::PollFd::new(go, nix::poll::PollFlags::POLLIN)];
        let ready =
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(GO_WAIT_MS)).map_err(|e| {
                JailError::Enter {
                    what: "waiting for the cgroup",
                    source: e.into(),
                }
            })?;
        if ready == 0 {
            return Err(JailError::Cgroup(format!(
                "the reaper did not put the monitor in its cgroup within {} s",
                GO_WAIT_MS / 1000
            )));
        }
        let mut byte = [0u8; 1];
        match nix::unistd::read(go, &mut byte) {
            Ok(1) => Ok(()),
            Ok(_) => Err(JailError::Cgroup(
                "the reaper could not put the monitor in its cgroup".into(),
            )),
            Err(e) => Err(JailError::Enter {
                what: "waiting for the cgroup",
                source: e.into(),
            }),
        }
    }

    /// Whether the reaper is gone: it holds the write end of `go` for its whole life.
    fn reaper_gone(&self) -> bool {
        // SAFETY: as in `wait_for_cgroup`.
        let go = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.go) };
        let mut fds = [nix::poll::PollFd::new(go, nix::poll::PollFlags::POLLIN)];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok()
            && fds[0]
                .revents()
                .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP))
    }

    /// The root becomes a read-only tmpfs holding only `entries`; the host's tree is detached.
    fn pivot(&self, entries: &[Entry]) -> Result<(), JailError> {
        let err = |what| {
            move |e: nix::errno::Errno| JailError::Enter {
                what,
                source: e.into(),
            }
        };
        let hidden = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let copied: u64 = entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Copy))
            .filter_map(|e| std::fs::metadata(&e.path).ok())
            .map(|m| m.len())
            .sum();
        let options = format!(
            "size={},nr_inodes={},mode=0555",
            copied + (64 << 10),
            16 + 8 * entries.len()
        );
        mount(
            Some("cela-jail"),
            &self.mount_point,
            Some("tmpfs"),
            hidden,
            Some(options.as_str()),
        )
        .map_err(err("mounting the jail's root"))?;
        for entry in entries {
            entry.place(&self.mount_point)?;
        }
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
        set("RLIMIT_NPROC", Resource::RLIMIT_NPROC, self.tasks)?;
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
        // caller (and so reaper) would leave the VM running. A reaper that died in between
        // is seen by its end of `go` hanging up (pid 1 of a namespace has no parent to ask).
        // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(JailError::Enter {
                what: "PR_SET_PDEATHSIG",
                source: std::io::Error::last_os_error(),
            });
        }
        if self.reaper_gone() {
            return Err(JailError::Monitor(
                "the monitor's reaper (and so its caller) is gone".into(),
            ));
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

/// Landlock, the second wall: every file-system access but reading (and executing) beneath
/// `readable` and reading and writing `writable` files, every TCP bind and connect, abstract Unix socket and signal outside the
/// process is refused, so even a process whose pivot had failed would open nothing else.
/// (A Unix socket connect by path is not a Landlock right before ABI 6's scopes; the monitor
/// makes none: see [`super::broker`].)
fn restrict(readable: &[&Path], writable: &[&Path]) -> Result<Landlock, JailError> {
    let abi = ABI::V6;
    let err = |e: landlock::RulesetError| JailError::Landlock(e.to_string());
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?;
    let rules = readable
        .iter()
        .map(|p| (p, AccessFs::from_read(abi)))
        .chain(
            writable
                .iter()
                .map(|p| (p, AccessFs::ReadFile | AccessFs::WriteFile)),
        );
    for (path, access) in rules {
        let fd = PathFd::new(path).map_err(|e| JailError::Landlock(e.to_string()))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(err)?;
    }
    let status: RestrictionStatus = ruleset.restrict_self().map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Landlock::Full,
        RulesetStatus::PartiallyEnforced => Landlock::Partial,
        _ => Landlock::Absent,
    })
}

/// One thing a program's jail holds, at its host path.
#[derive(Debug)]
struct Entry {
    path: PathBuf,
    kind: EntryKind,
}

#[derive(Debug)]
enum EntryKind {
    /// A directory, bind-mounted read-only.
    Dir,
    /// A file, bind-mounted read-only.
    File,
    /// A file others may not read, copied in (the program runs as an unprivileged uid).
    Copy,
    /// A symbolic link, made again with the same target (`/lib` → `usr/lib`).
    Link(PathBuf),
    /// A device node, bind-mounted read-write (`/dev/null`; the cgroup allows no other).
    Device,
}

impl Entry {
    /// Whether this entry already shows `path` (a directory bind above it).
    fn covers(&self, path: &Path) -> bool {
        matches!(self.kind, EntryKind::Dir) && path.starts_with(&self.path)
    }

    fn file(path: &Path) -> Result<Entry, JailError> {
        let meta = std::fs::metadata(path).map_err(|source| JailError::Enter {
            what: "a file the program reads",
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let kind = if meta.permissions().mode() & 0o004 != 0 {
            EntryKind::File
        } else {
            EntryKind::Copy
        };
        Ok(Entry {
            path: path.to_owned(),
            kind,
        })
    }

    /// Makes the entry beneath `root` (the jail's tmpfs, still reached by its host path).
    fn place(&self, root: &Path) -> Result<(), JailError> {
        let io = |what| move |source| JailError::Enter { what, source };
        // Absolute paths without `..` only (entries are canonical or the host's fixed
        // directories), so the target stays beneath `root`.
        if !self.path.is_absolute()
            || self
                .path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(JailError::Enter {
                what: "a path for the jail",
                source: std::io::Error::other(format!("{} is not canonical", self.path.display())),
            });
        }
        let target = root.join(self.path.strip_prefix("/").unwrap_or(&self.path));
        // A mount point made here, new (never a file that exists, which could be the host's).
        let new_file = |target: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(target)
                .map(drop)
                .map_err(io("making a mount point"))
        };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io("making the jail's directories"))?;
        }
        let bind = |target: &Path, extra: MsFlags| {
            let err = |e: nix::errno::Errno| JailError::Enter {
                what: "bind-mounting into the jail",
                source: e.into(),
            };
            mount(
                Some(&self.path),
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(err)?;
            mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | extra,
                None::<&str>,
            )
            .map_err(err)
        };
        let read_only = MsFlags::MS_RDONLY | MsFlags::MS_NODEV;
        match &self.kind {
            EntryKind::Dir => {
                std::fs::create_dir_all(&target).map_err(io("making a mount point"))?;
                bind(&target, read_only)
            }
            EntryKind::File => {
                new_file(&target)?;
                bind(&target, read_only)
            }
            EntryKind::Device => {
                new_file(&target)?;
                bind(&target, MsFlags::MS_NOEXEC)
            }
            EntryKind::Copy => {
                new_file(&target)?;
                std::fs::copy(&self.path, &target).map_err(io("copying a file into the jail"))?;
                // The program runs as the jail's uid: the copy is for reading, by anyone in
                // here (copy keeps the original's mode, 0600 for Ubuntu's kernels).
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o444))
                    .map_err(io("making the copy readable"))
            }
            EntryKind::Link(to) => {
                std::os::unix::fs::symlink(to, &target).map_err(io("making a link in the jail"))
            }
        }
    }
}

/// The host's system directories a dynamically linked program needs: `/usr`, and each of
/// `/bin`, `/sbin`, `/lib*` as the host has it (a link into `/usr` on a merged-/usr host, else
/// a directory), the loader's cache, and the program itself when it lives elsewhere.
fn system_entries(program: &Path) -> Vec<Entry> {
    let mut out = vec![Entry {
        path: "/usr".into(),
        kind: EntryKind::Dir,
    }];
    for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let path = Path::new("/").join(top);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(to) = std::fs::read_link(&path) {
                    out.push(Entry {
                        path,
                        kind: EntryKind::Link(to),
                    });
                }
            }
            Ok(m) if m.is_dir() => out.push(Entry {
                path,
                kind: EntryKind::Dir,
            }),
            _ => {}
        }
    }
    // QEMU probes file locking on /dev/null.
    out.push(Entry {
        path: "/dev/null".into(),
        kind: EntryKind::Device,
    });
    if Path::new("/etc/ld.so.cache").is_file() {
        out.push(Entry {
            path: "/etc/ld.so.cache".into(),
            kind: EntryKind::File,
        });
    }
    let covered = out
        .iter()
        .any(|e| matches!(e.kind, EntryKind::Dir) && program.starts_with(&e.path));
    if !covered {
        out.push(Entry {
            path: program.to_owned(),
            kind: EntryKind::File,
        });
    }
    out
}
