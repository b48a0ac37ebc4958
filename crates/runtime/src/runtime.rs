//! Container operations over a state directory (OCI runtime spec §operations, runc's command
//! set): create, start, state, kill, delete, exec, pause, resume, ps, list, update, stats.
//!
//! The mechanics (namespaces, rootfs, pivot_root, capabilities, seccomp, cgroups) are youki's
//! `libcontainer` and `libcgroups`. This module adds what a runc-compatible runtime needs around
//! them: input is checked before any state is written, so a refused `create` leaves nothing
//! behind; states and errors are named as the OCI spec names them; `delete --force` of an
//! unknown id succeeds, as runc's does (containerd relies on it).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt, create_cgroup_manager};
use libcgroups::stats::Stats;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use oci_spec::runtime::{LinuxResources, Process};
use serde::Serialize;

use crate::error::{Error, status_name};
use crate::exec::{self, Confinement, Overrides};
use crate::lock::{Mode, RootLock};
use crate::spec;

/// Default state directory of `cela-runc` (runc's is /run/runc).
pub const DEFAULT_ROOT: &str = "/run/cela-runc";

/// The state of a container as `cela-runc state` prints it: the OCI runtime spec's fields
/// plus runc's `rootfs`, `created` and `owner`, which containerd's go-runc reads.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    /// Runtime-spec version the state follows.
    pub oci_version: String,
    /// Container id.
    pub id: String,
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// Host pid of the container's init (0 once stopped).
    pub pid: i32,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Root filesystem.
    pub rootfs: PathBuf,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Name of the user that created it.
    pub owner: String,
    /// The bundle's annotations.
    #[serde(skip_serializing_if = "HashMap::is_empty", default)]
    pub annotations: HashMap<String, String>,
}

/// How to create a container (runc's `create` flags).
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The bundle directory.
    pub bundle: PathBuf,
    /// Unix socket that receives the pty master when `process.terminal` is set.
    pub console_socket: Option<PathBuf>,
    /// File to write the init's pid to.
    pub pid_file: Option<PathBuf>,
    /// Use a plain chroot-style move of the root instead of pivot_root.
    pub no_pivot: bool,
    /// Extra file descriptors passed to the init beyond stdio.
    pub preserve_fds: i32,
    /// Whether the caller returns at once (true for `create` and `run -d`).
    pub detach: bool,
}

/// How to run a process in a running container (runc's `exec` flags).
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// A process.json (OCI `process` object) to run; what it leaves out is the container's.
    /// When set, `overrides` is ignored.
    pub process: Option<PathBuf>,
    /// The container's process with these changes (program, env, cwd, user, caps, tty).
    pub overrides: Overrides,
    /// Unix socket that receives the pty master.
    pub console_socket: Option<PathBuf>,
    /// File to write the process's pid to.
    pub pid_file: Option<PathBuf>,
    /// Return at once instead of waiting.
    pub detach: bool,
    /// Extra file descriptors passed beyond stdio.
    pub preserve_fds: i32,
    /// Allow exec into a paused container.
    pub ignore_paused: bool,
    /// Sub-cgroup to run in.
    pub cgroup: Option<String>,
}

/// A state directory holding containers, one subdirectory per id.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
    systemd_cgroup: bool,
}

impl Runtime {
    /// A runtime keeping state under `root`; `systemd_cgroup` asks for systemd-managed cgroups
    /// on pure cgroup v2 hosts (ignored on v1 and hybrid hosts, as libcgroups does).
    pub fn new(root: impl Into<PathBuf>, systemd_cgroup: bool) -> Self {
        Runtime {
            root: root.into(),
            systemd_cgroup,
        }
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, id: &str) -> Result<PathBuf, Error> {
        // No leading '.': that keeps ".", ".." and the lock file (crate::lock) out of reach.
        let ok = !id.is_empty()
            && !id.starts_with('.')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.+".contains(c));
        if !ok {
            return Err(Error::InvalidId(id.to_owned()));
        }
        Ok(self.root.join(id))
    }

    /// Takes the state root's lock (crate::lock) for one operation; `None` when there is no
    /// root yet, and so no container to race on.
    fn lock(&self, mode: Mode) -> Result<Option<RootLock>, Error> {
        if !self.root.is_dir() {
            return Ok(None);
        }
        RootLock::acquire(&self.root, mode).map(Some)
    }

    /// Loads a container with its status refreshed from the kernel.
    pub fn load(&self, id: &str) -> Result<Container, Error> {
        let _lock = self.lock(Mode::Shared)?;
        self.open(id)
    }

    /// [`Runtime::load`] for a caller that holds the lock.
    fn open(&self, id: &str) -> Result<Container, Error> {
        let dir = self.dir(id)?;
        if !dir.join("state.json").exists() {
            return Err(Error::NotFound(id.to_owned()));
        }
        Ok(Container::load(dir)?)
    }

    /// Creates a container from a bundle; its init waits for [`Runtime::start`]. On failure no
    /// state directory and no cgroup remain.
    pub fn create(&self, id: &str, opts: &CreateOptions) -> Result<Container, Error> {
        let dir = self.dir(id)?;
        if dir.exists() {
            return Err(Error::Exists(id.to_owned()));
        }
        let bundle = spec::load_bundle(&opts.bundle)?;
        let terminal = bundle.spec.process().as_ref().and_then(|p| p.terminal());
        if terminal == Some(true) && opts.console_socket.is_none() {
            return Err(Error::Usage(
                "process.terminal is set but no --console-socket was given: a container that \
                 outlives this command needs one to hand its terminal to (or run it in the \
                 foreground with `run`)"
                    .into(),
            ));
        }
        fs::create_dir_all(&self.root).map_err(|source| Error::Io {
            what: format!("creating state directory {}", self.root.display()),
            source,
        })?;
        let _lock = RootLock::acquire(&self.root, Mode::Exclusive)?;
        if dir.exists() {
            return Err(Error::Exists(id.to_owned()));
        }
        // What an earlier operation logged is not this create's cause.
        let _ = crate::cause::take();
        let result = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_executor(DefaultExecutor {})
            .with_root_path(&self.root)
            .and_then(|b| b.with_pid_file(opts.pid_file.as_ref()))
            .map(|b| b.with_console_socket(opts.console_socket.as_ref()))
            .map(|b| b.with_preserved_fds(opts.preserve_fds))
            .and_then(|b| {
                // libcontainer reads `detach` only to check the terminal settings (a terminal
                // needs a console socket when detached); a foreground terminal also goes
                // through a console socket, cela-runc's own (crate::console).
                b.as_init(&bundle.dir)
                    .with_systemd(self.systemd_cgroup)
                    .with_detach(opts.detach || opts.console_socket.is_some())
                    .with_no_pivot(opts.no_pivot)
                    .build()
            })
            .map_err(|e| Error::Container(Box::new(e), crate::cause::take()))
            .and_then(|c| Confinement::of(&bundle.spec).save(&dir).map(|()| c));
        result.inspect_err(|_| self.remove_leftovers(id, &dir))
    }

    /// Removes what a failed create may have left: processes, cgroup, state directory.
    fn remove_leftovers(&self, id: &str, dir: &Path) {
        if let Ok(mut c) = self.open(id)
            && let Err(e) = c.delete(true)
        {
            tracing::warn!(id, "cleaning up after a failed create: {e}");
        }
        if dir.exists() {
            let _ = fs::remove_dir_all(dir);
        }
    }

    /// Starts a created container's process.
    pub fn start(&self, id: &str) -> Result<(), Error> {
        let _lock = self.lock(Mode::Exclusive)?;
        let mut c = self.open(id)?;
        if c.status() != ContainerStatus::Created {
            return Err(Error::WrongState {
                op: "start",
                id: id.to_owned(),
                status: status_name(c.status()),
                hint: "; only a created container can be started",
            });
        }
        let pid = c.pid().map(|p| p.as_raw());
        let before = pid.and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok());
        c.start()?;
        if let (Some(pid), Some(before)) = (pid, before) {
            wait_for_exec(pid, &before);
        }
        Ok(())
    }

    /// The container's OCI state.
    pub fn state(&self, id: &str) -> Result<OciState, Error> {
        Ok(oci_state(&self.load(id)?))
    }

    /// Sends a signal (a name like `TERM`/`SIGKILL` or a number) to the init, or with `all` to
    /// every process of the container.
    pub fn kill(&self, id: &str, signal: &str, all: bool) -> Result<(), Error> {
        let sig = parse_signal(signal)?;
        let _lock = self.lock(Mode::Exclusive)?;
        let mut c = self.open(id)?;
        if c.status() == ContainerStatus::Stopped && !all {
            return Err(Error::WrongState {
                op: "kill",
                id: id.to_owned(),
                status: "stopped",
                hint: "",
            });
        }
        Ok(c.kill(sig, all)?)
    }

    /// Deletes a container: its cgroup and state. A running or paused one needs `force` (its
    /// processes are then killed). With `force`, an unknown id is not an error.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), Error> {
        let _lock = self.lock(Mode::Exclusive)?;
        let mut c = match self.open(id) {
            Ok(c) => c,
            Err(Error::NotFound(_)) if force => {
                // An aborted create may leave a directory without state.json.
                let _ = fs::remove_dir_all(self.dir(id)?);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if matches!(
            c.status(),
            ContainerStatus::Running | ContainerStatus::Paused
        ) && !force
        {
            return Err(Error::WrongState {
                op: "delete",
                id: id.to_owned(),
                status: status_name(c.status()),
                hint: "; stop it first or use delete --force",
            });
        }
        Ok(c.delete(force)?)
    }

    /// Freezes every process of a running container.
    pub fn pause(&self, id: &str) -> Result<(), Error> {
        let _lock = self.lock(Mode::Exclusive)?;
        let mut c = self.open(id)?;
        if c.status() != ContainerStatus::Running {
            return Err(Error::WrongState {
                op: "pause",
                id: id.to_owned(),
                status: status_name(c.status()),
                hint: "",
            });
        }
        Ok(c.pause()?)
    }

    /// Thaws a paused container.
    pub fn resume(&self, id: &str) -> Result<(), Error> {
        let _lock = self.lock(Mode::Exclusive)?;
        let mut c = self.open(id)?;
        if c.status() != ContainerStatus::Paused {
            return Err(Error::WrongState {
                op: "resume",
                id: id.to_owned(),
                status: status_name(c.status()),
                hint: "",
            });
        }
        Ok(c.resume()?)
    }

    /// Host pids of every process in the container's cgroup.
    pub fn pids(&self, id: &str) -> Result<Vec<i32>, Error> {
        let _lock = self.lock(Mode::Shared)?;
        let c = self.open(id)?;
        let m = self.cgroup(&c)?;
        let mut pids: Vec<i32> = m
            .get_all_pids()
            .map_err(|e| Error::Cgroup(e.to_string()))?
            .into_iter()
            .map(|p| p.as_raw())
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// States of every container under the root, sorted by id.
    pub fn list(&self) -> Result<Vec<OciState>, Error> {
        let _lock = self.lock(Mode::Shared)?;
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Io {
                    what: format!("reading {}", self.root.display()),
                    source,
                });
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // A container being created or deleted right now may vanish or lack state.json.
            if let Ok(c) = self.open(&name) {
                out.push(oci_state(&c));
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Applies new resource limits to a created, running or paused container, and records them
    /// nowhere else: the cgroup is the truth, as with runc.
    pub fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), Error> {
        let _lock = self.lock(Mode::Shared)?;
        let c = self.open(id)?;
        if c.status() == ContainerStatus::Stopped {
            return Err(Error::WrongState {
                op: "update",
                id: id.to_owned(),
                status: "stopped",
                hint: "",
            });
        }
        let m = self.cgroup(&c)?;
        let opt = ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        };
        m.apply(&opt).map_err(|e| Error::Cgroup(e.to_string()))
    }

    /// Resource statistics of the container's cgroup.
    pub fn stats(&self, id: &str) -> Result<Stats, Error> {
        let _lock = self.lock(Mode::Shared)?;
        let c = self.open(id)?;
        if c.status() == ContainerStatus::Stopped {
            return Err(Error::WrongState {
                op: "read statistics of",
                id: id.to_owned(),
                status: "stopped",
                hint: "",
            });
        }
        self.cgroup(&c)?
            .stats()
            .map_err(|e| Error::Cgroup(e.to_string()))
    }

    /// Runs another process in a running container; returns its host pid. Unless `detach`, the
    /// process is a child of the caller, to be waited for.
    pub fn exec(&self, id: &str, opts: &ExecOptions) -> Result<i32, Error> {
        let lock = self.lock(Mode::Shared)?;
        let c = self.open(id)?;
        let ok = match c.status() {
            ContainerStatus::Running => true,
            ContainerStatus::Paused => opts.ignore_paused,
            _ => false,
        };
        if !ok {
            return Err(Error::WrongState {
                op: "exec in",
                id: id.to_owned(),
                status: status_name(c.status()),
                hint: "",
            });
        }
        if opts.overrides.tty && opts.detach && opts.console_socket.is_none() {
            return Err(Error::Usage(
                "exec --tty --detach needs --console-socket to hand the terminal to".into(),
            ));
        }
        let dir = self.dir(id)?;
        let confinement = match Confinement::load(&dir)? {
            Some(c) => c,
            // A container created before confinement records: its bundle is all there is.
            None => Confinement::of(&spec::load_bundle(c.bundle())?.spec),
        };
        if confinement
            .seccomp
            .as_ref()
            .is_some_and(|s| s.listener_path().is_some())
        {
            return Err(Error::Usage(format!(
                "container {id} has a seccomp notify listener, which exec does not support"
            )));
        }
        let given = opts
            .process
            .as_deref()
            .map(exec::read_json::<Process>)
            .transpose()?;
        let process = exec::exec_process(&confinement, given, &opts.overrides)?;
        let init = c.pid().ok_or_else(|| Error::Exec {
            id: id.to_owned(),
            message: "the container has no init process".into(),
            status: 1,
        })?;
        let cgroup = self.cgroup(&c)?;
        let sub = match &opts.cgroup {
            Some(sub) => Some(self.sub_cgroup_dirs(&c, sub)?),
            None => None,
        };
        let is_member = |pid: i32| {
            cgroup
                .get_all_pids()
                .is_ok_and(|pids| pids.iter().any(|p| p.as_raw() == pid))
        };
        let join_cgroup = |pid: nix::unistd::Pid| match &sub {
            None => cgroup
                .add_task(nix_lc::unistd::Pid::from_raw(pid.as_raw()))
                .map_err(|e| Error::Cgroup(e.to_string())),
            Some(dirs) => {
                for dir in dirs {
                    let procs = dir.join("cgroup.procs");
                    fs::write(&procs, pid.as_raw().to_string())
                        .map_err(|e| Error::Cgroup(format!("joining {}: {e}", dir.display())))?;
                }
                Ok(())
            }
        };
        let io = exec::Io {
            console_socket: opts.console_socket.clone(),
            preserve_fds: opts.preserve_fds,
            frozen: c.status() == ContainerStatus::Paused,
        };
        let failed = |f: exec::Failure| Error::Exec {
            id: id.to_owned(),
            message: f.message,
            status: f.status,
        };
        let started = exec::spawn(
            init.as_raw(),
            is_member,
            join_cgroup,
            &process,
            confinement.seccomp.as_ref(),
            confinement.personality.as_ref(),
            &io,
        )
        .map_err(failed)?;
        // The process is in the container: from here the container may hold it up, and
        // nothing else of the runtime may wait for that.
        drop(lock);
        let pid = started.finish().map_err(failed)?;
        if let Some(path) = &opts.pid_file {
            write_pid_file(path, pid.as_raw())?;
        }
        Ok(pid.as_raw())
    }

    /// The cgroup directories `exec --cgroup ARG` puts a process in, one per hierarchy, as
    /// runc does: on cgroup v1 the named controllers' hierarchies get the sub-cgroup and the
    /// others the container's own cgroup (all of them get the sub-cgroup when none is named);
    /// on v2 the one hierarchy gets it. Each must exist already (exec joins a sub-cgroup, it
    /// does not make one), and is found from the container's configured cgroup path, not from
    /// where its processes are now (they may have moved themselves).
    fn sub_cgroup_dirs(&self, c: &Container, arg: &str) -> Result<Vec<PathBuf>, Error> {
        use libcgroups::common::CgroupSetup;
        let sub = exec_sub_cgroup(arg)?;
        let named: Vec<&str> = arg
            .split_once(':')
            .map_or(vec![], |(c, _)| c.split(',').collect());
        if c.systemd() {
            return Err(Error::Usage(format!(
                "exec --cgroup {arg:?}: not supported for a container whose cgroup systemd manages"
            )));
        }
        let base = c.spec()?.cgroup_path;
        let base = base.strip_prefix("/").unwrap_or(&base).to_owned();
        let setup =
            libcgroups::common::get_cgroup_setup().map_err(|e| Error::Cgroup(e.to_string()))?;
        let mut dirs: Vec<PathBuf> = Vec::new();
        if matches!(setup, CgroupSetup::Unified) {
            if !named.is_empty() {
                return Err(Error::Usage(format!(
                    "exec --cgroup {arg:?}: cgroup v2 has one hierarchy; give a path without \
                     controllers"
                )));
            }
            dirs.push(
                Path::new(libcgroups::common::DEFAULT_CGROUP_ROOT)
                    .join(&base)
                    .join(&sub),
            );
        } else {
            let mounts = libcgroups::v1::util::list_supported_mount_points()
                .map_err(|e| Error::Cgroup(e.to_string()))?;
            for name in &named {
                if CONTROLLERS.contains(name) && !mounts.keys().any(|k| k.to_string() == *name) {
                    return Err(Error::Usage(format!(
                        "exec --cgroup {arg:?}: the {name} controller is not mounted here"
                    )));
                }
            }
            // Hierarchies that hold several controllers (cpu,cpuacct) appear under each
            // name: one directory per hierarchy, the sub-cgroup if any of its controllers
            // was named.
            let mut by_hierarchy: Vec<(PathBuf, bool)> = Vec::new();
            for (ctrl, mount) in &mounts {
                let real = fs::canonicalize(mount).unwrap_or_else(|_| mount.clone());
                let wants_sub = named.is_empty() || named.contains(&ctrl.to_string().as_str());
                match by_hierarchy.iter_mut().find(|(m, _)| *m == real) {
                    Some((_, w)) => *w |= wants_sub,
                    None => by_hierarchy.push((real, wants_sub)),
                }
            }
            by_hierarchy.sort();
            for (mount, wants_sub) in by_hierarchy {
                let dir = mount.join(&base);
                dirs.push(if wants_sub { dir.join(&sub) } else { dir });
            }
        }
        if let Some(missing) = dirs.iter().find(|d| !d.is_dir()) {
            return Err(Error::Usage(format!(
                "exec --cgroup {arg:?}: {} does not exist (exec joins a sub-cgroup, it does not \
                 make one)",
                missing.display()
            )));
        }
        Ok(dirs)
    }

    fn cgroup(&self, c: &Container) -> Result<libcgroups::common::AnyCgroupManager, Error> {
        let config = c.spec()?;
        create_cgroup_manager(CgroupConfig {
            cgroup_path: config.cgroup_path,
            systemd_cgroup: c.systemd(),
            container_name: c.id().to_owned(),
        })
        .map_err(|e| Error::Cgroup(e.to_string()))
    }
}

/// The cgroup controllers `exec --cgroup CONTROLLERS:PATH` may name (cgroup v1's; `name=…`
/// hierarchies too).
const CONTROLLERS: [&str; 15] = [
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "pids",
    "blkio",
    "io",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "perf_event",
    "hugetlb",
    "rdma",
    "misc",
];

/// The path below the container's cgroup that `exec --cgroup [CONTROLLERS:]PATH` names, as
/// runc reads it: relative to the container's cgroup even with a leading `/` (so `/` is the
/// container's cgroup itself, the empty path returned), never above it (`..`), and with only
/// known controllers before the colon. The sub-cgroup must already exist: joining writes to
/// its `cgroup.procs`, which fails for one that does not.
fn exec_sub_cgroup(arg: &str) -> Result<PathBuf, Error> {
    let bad = |why: &str| Error::Usage(format!("exec --cgroup {arg:?}: {why}"));
    let path = match arg.split_once(':') {
        Some((controllers, path)) => {
            for c in controllers.split(',') {
                if !(CONTROLLERS.contains(&c)
                    || c.strip_prefix("name=").is_some_and(|n| !n.is_empty()))
                {
                    return Err(bad(&format!("{c:?} is not a cgroup controller")));
                }
            }
            path
        }
        None => arg,
    };
    if path.is_empty() {
        return Err(bad(
            "give a path below the container's cgroup (`/` is the container's own)",
        ));
    }
    let mut out = PathBuf::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if part == ".." || part == "." {
            return Err(bad(
                "the path must stay below the container's cgroup (no `.` or `..`)",
            ));
        }
        out.push(part);
    }
    Ok(out)
}

/// Waits (at most [`EXEC_WAIT`]) until the init `pid`, told to start, has executed the
/// container's program: its executable is no longer `before` (the sealed copy of cela-runc), or
/// it has ended. runc's `start` returns at the same point (it reads the exec FIFO, which the
/// exec closes). Returning earlier let a `kill` right after `start` reach a pid 1 that had no
/// handler yet, and the kernel drops a signal a namespace's init does not handle: the
/// program's own trap for it never ran (runtime-tools' `killsig`).
fn wait_for_exec(pid: i32, before: &Path) {
    let deadline = std::time::Instant::now() + EXEC_WAIT;
    loop {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
        let ended = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
        });
        if ended || exe.is_ok_and(|e| e != before) {
            return;
        }
        if std::time::Instant::now() > deadline {
            tracing::warn!("the container's init (pid {pid}) has not executed its program yet");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// How long `start` waits for the init to execute the container's program.
const EXEC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Parses a signal as runc does: a name with or without `SIG`, any case, or a number.
pub fn parse_signal(s: &str) -> Result<Signal, Error> {
    let unknown = || Error::UnknownSignal(s.to_owned());
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| unknown());
    }
    Signal::try_from(s).map_err(|_| unknown())
}

fn oci_state(c: &Container) -> OciState {
    let status = c.status();
    let pid = match status {
        ContainerStatus::Stopped => 0,
        _ => c.pid().map(|p| p.as_raw()).unwrap_or(0),
    };
    let rootfs = spec::load_bundle(c.bundle())
        .map(|b| b.rootfs)
        .unwrap_or_default();
    OciState {
        oci_version: "1.0.2".into(),
        id: c.id().to_owned(),
        status: status_name(status).into(),
        pid,
        bundle: c.bundle().clone(),
        rootfs,
        created: c.created().map(|t| t.to_rfc3339()).unwrap_or_default(),
        owner: c
            .creator()
            .map(|o| o.to_string_lossy().into_owned())
            .unwrap_or_default(),
        annotations: c.state.annotations.clone().unwrap_or_default(),
    }
}

/// Writes `pid` to `path` atomically, as runc's `--pid-file` (containerd reads it).
fn write_pid_file(path: &Path, pid: i32) -> Result<(), Error> {
    let tmp = path.with_extension("cela-tmp");
    fs::write(&tmp, pid.to_string())
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|source| Error::Io {
            what: format!("writing pid file {}", path.display()),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        for s in ["KILL", "kill", "SIGKILL", "9"] {
            parse_signal(s).unwrap();
        }
        for s in ["SIGBOGUS", "0", "99", "", "-1"] {
            assert!(
                matches!(parse_signal(s), Err(Error::UnknownSignal(_))),
                "{s}"
            );
        }
    }

    #[test]
    fn exec_cgroups_stay_below_the_containers() {
        for (arg, want) in [
            ("/", ""),
            ("sub", "sub"),
            ("/a/b/", "a/b"),
            ("cpu:sub", "sub"),
            ("cpu,cpuacct:/", ""),
            ("name=systemd:x", "x"),
        ] {
            assert_eq!(exec_sub_cgroup(arg).unwrap(), Path::new(want), "{arg:?}");
        }
        for arg in [
            "",
            "..",
            "a/../b",
            "./a",
            "waaaaat:/",
            "cpu,bogus:a",
            ":a",
            "name=:a",
            "cpu:",
        ] {
            assert!(
                matches!(exec_sub_cgroup(arg), Err(Error::Usage(_))),
                "{arg:?}"
            );
        }
    }

    #[test]
    fn ids_cannot_escape_the_root() {
        let rt = Runtime::new("/nonexistent", false);
        for id in ["", ".", "..", ".lock", "a/b", "../x", "a b"] {
            assert!(matches!(rt.dir(id), Err(Error::InvalidId(_))), "{id:?}");
        }
        assert_eq!(
            rt.dir("ok-1.2_x+y").unwrap(),
            Path::new("/nonexistent/ok-1.2_x+y")
        );
    }
}
