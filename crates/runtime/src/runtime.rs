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
use oci_spec::runtime::LinuxResources;
use serde::Serialize;

use crate::error::{Error, status_name};
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
    /// A process.json (OCI `process` object); when set, the fields below except `detach`,
    /// `pid_file`, `console_socket` and `preserve_fds` are ignored.
    pub process: Option<PathBuf>,
    /// Program and arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: HashMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Uid and optional gid.
    pub user: Option<(u32, Option<u32>)>,
    /// Additional group ids.
    pub additional_gids: Vec<u32>,
    /// Capabilities to add.
    pub caps: Vec<String>,
    /// Set no_new_privileges.
    pub no_new_privs: bool,
    /// Allocate a pseudo-terminal.
    pub tty: bool,
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
            });
        match result {
            Ok(c) => Ok(c),
            Err(e) => {
                self.remove_leftovers(id, &dir);
                Err(e.into())
            }
        }
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
        Ok(c.start()?)
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
        let _lock = self.lock(Mode::Shared)?;
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
        if opts.tty && opts.detach && opts.console_socket.is_none() {
            return Err(Error::Usage(
                "exec --tty --detach needs --console-socket to hand the terminal to".into(),
            ));
        }
        // A terminal is asked for through the process object; write one if the caller gave
        // only arguments.
        let process = match (&opts.process, opts.tty) {
            (Some(p), _) => Some(p.clone()),
            (None, false) => None,
            (None, true) => Some(self.write_tty_process(&c, opts)?),
        };
        if process.is_none() && opts.args.is_empty() {
            return Err(Error::Usage("exec needs a command or --process".into()));
        }
        let result = ContainerBuilder::new(id.to_owned(), SyscallType::default())
            .with_executor(DefaultExecutor {})
            .with_root_path(&self.root)
            .and_then(|b| b.with_pid_file(opts.pid_file.as_ref()))
            .map(|b| b.with_console_socket(opts.console_socket.as_ref()))
            .map(|b| b.with_preserved_fds(opts.preserve_fds))
            .map(|b| {
                b.as_tenant()
                    .with_detach(opts.detach || opts.console_socket.is_some())
                    .with_cwd(opts.cwd.as_ref())
                    .with_env(opts.env.clone())
                    .with_container_args(opts.args.clone())
                    .with_process(process.as_ref())
                    .with_no_new_privs(opts.no_new_privs)
                    .with_capabilities(opts.caps.clone())
                    .with_user(opts.user.map(|u| u.0))
                    .with_group(opts.user.and_then(|u| u.1))
                    .with_additional_gids(opts.additional_gids.clone())
                    .with_ignore_paused(opts.ignore_paused)
                    .with_sub_cgroup(opts.cgroup.clone())
            })
            .and_then(|b| b.build());
        if opts.tty
            && opts.process.is_none()
            && let Some(p) = &process
        {
            let _ = fs::remove_file(p);
        }
        Ok(result?.as_raw())
    }

    fn write_tty_process(&self, c: &Container, opts: &ExecOptions) -> Result<PathBuf, Error> {
        let bundle = spec::load_bundle(c.bundle())?;
        let mut process = bundle.spec.process().clone().unwrap_or_default();
        process.set_terminal(Some(true));
        process.set_args(Some(opts.args.clone()));
        if let Some(cwd) = &opts.cwd {
            process.set_cwd(cwd.clone());
        }
        let mut env = process.env().clone().unwrap_or_default();
        env.extend(opts.env.iter().map(|(k, v)| format!("{k}={v}")));
        process.set_env(Some(env));
        let path = self
            .root
            .join(c.id())
            .join(format!("exec-tty-{}.json", std::process::id()));
        let text = serde_json::to_vec(&process).expect("an OCI process serializes");
        fs::write(&path, text).map_err(|source| Error::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
        Ok(path)
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
