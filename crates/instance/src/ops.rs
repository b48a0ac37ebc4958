//! What the CLI does to instances besides running them: stop, remove, exec, and waiting on
//! their state. Each reads the state on disk first and refuses what that state does not allow.

use std::time::{Duration, Instant};

use cela_runtime::{ExecOptions, Overrides};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::container;
use crate::error::InstanceError;
use crate::record::{Instance, InstanceState, Kind, Status};

/// How often waits on an instance's state look again.
const POLL: Duration = Duration::from_millis(20);

/// Waits until `cond` holds for the instance's state, at most `bound`; returns the last state.
pub fn wait_state(
    inst: &Instance,
    bound: Duration,
    cond: impl Fn(&InstanceState) -> bool,
) -> Result<InstanceState, InstanceError> {
    let start = Instant::now();
    loop {
        let state = inst.state()?;
        if cond(&state) || start.elapsed() >= bound {
            return Ok(state);
        }
        std::thread::sleep(POLL);
    }
}

/// An instance is live while it is created or running with a live supervisor.
pub fn is_live(state: &InstanceState) -> bool {
    matches!(state.status, Status::Created | Status::Running)
}

/// Stops a running instance: SIGTERM to the workload, then SIGKILL once `timeout` has passed.
/// A container's init gets the signals directly. A microVM's monitor passes SIGTERM on to the
/// guest's workload (through cela-init's control channel), so the VM powers off cleanly when
/// the workload ends; at the timeout the monitor itself is killed, and the end is recorded
/// here as status 137, as for a container. Returns once the end is recorded.
pub fn stop(inst: &Instance, timeout: Duration) -> Result<InstanceState, InstanceError> {
    let state = inst.state()?;
    if !is_live(&state) {
        return Ok(state);
    }
    let target = match inst.config.kind {
        Kind::Container => state.pid,
        Kind::Vm => state.supervisor.map(|s| s.pid),
    };
    let signal_target = |sig| {
        if let Some(pid) = target {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    };
    if !timeout.is_zero() {
        signal_target(Signal::SIGTERM);
        let state = wait_state(inst, timeout, |s| !is_live(s))?;
        if !is_live(&state) {
            return Ok(state);
        }
    }
    signal_target(Signal::SIGKILL);
    let mut state = wait_state(inst, Duration::from_secs(20), |s| !is_live(s))?;
    if is_live(&state) {
        return Err(InstanceError::Other(format!(
            "instance {} did not stop within {}s of SIGKILL",
            inst.name(),
            20
        )));
    }
    if inst.config.kind == Kind::Vm && state.status == Status::Crashed {
        // The monitor was this kill's target: its end is a stop, not a crash.
        state.status = Status::Exited;
        state.exit_code = Some(128 + Signal::SIGKILL as i32);
        state.error = None;
        state.pid = None;
        state.finished = Some(crate::record::now());
        inst.save_state(&state)?;
        let _ = std::fs::remove_file(inst.vsock_path());
    }
    Ok(state)
}

/// Removes an instance and everything it made (container, mounts, cgroup, its directory). A
/// live one needs `force` (it is killed first).
pub fn remove(inst: &Instance, force: bool) -> Result<(), InstanceError> {
    let state = inst.state()?;
    if is_live(&state) {
        if !force {
            return Err(InstanceError::WrongState {
                name: inst.name().to_owned(),
                status: state.status.to_string(),
                hint: "stop it first, or use rm -f",
            });
        }
        stop(inst, Duration::ZERO)?;
    }
    if inst.config.kind == Kind::Container {
        // Also what a killed supervisor left: the container, its mount.
        container::destroy(inst, true);
    }
    remove_dir(inst);
    Ok(())
}

/// Removes the instance directory (what is mounted in it is unmounted first, and a
/// container's network removed).
pub fn remove_dir(inst: &Instance) {
    if inst.config.kind == Kind::Container {
        container::unmount_rootfs(inst);
        let recorded = inst.state().ok().and_then(|s| s.network);
        crate::network::teardown(inst, recorded.as_ref());
    }
    if let Err(e) = std::fs::remove_dir_all(&inst.dir) {
        tracing::warn!("removing {}: {e}", inst.dir.display());
    }
}

/// How to run a command in a running instance.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `USER[:GROUP]`; `None`: the instance's user.
    pub user: Option<String>,
    /// A pseudo-terminal (a container's is handed to `console_socket`).
    pub tty: bool,
    pub console_socket: Option<std::path::PathBuf>,
    /// Whether the command reads the caller's stdin (a microVM's; a container's always does
    /// without a terminal).
    pub stdin: bool,
}

/// What [`exec`] started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    /// A container's exec: its host pid, a child of the caller to wait for.
    Child(i32),
    /// A microVM's exec ran to its end with this status.
    Finished(i32),
}

/// Runs `req` in the running instance with the caller's stdio (or, for a container, the
/// terminal of `console_socket`).
pub fn exec(inst: &Instance, req: &ExecRequest) -> Result<Exec, InstanceError> {
    let state = inst.state()?;
    if state.status != Status::Running {
        return Err(InstanceError::WrongState {
            name: inst.name().to_owned(),
            status: state.status.to_string(),
            hint: "exec needs a running instance (cela start it first)",
        });
    }
    if inst.config.kind == Kind::Vm {
        return crate::vm_exec::exec(inst, req, req.stdin).map(Exec::Finished);
    }
    let user = match &req.user {
        Some(user) => {
            let rootfs = inst.dir.join("rootfs");
            let (uid, gid) = container::resolve_user(&rootfs, user)?;
            Some((uid, Some(gid)))
        }
        None => None,
    };
    let env = req
        .env
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let pid = container::runtime(inst).exec(
        &inst.config.id,
        &ExecOptions {
            overrides: Overrides {
                args: req.args.clone(),
                env,
                cwd: req.workdir.as_ref().map(Into::into),
                tty: req.tty,
                user,
                ..Default::default()
            },
            console_socket: req.console_socket.clone(),
            ..Default::default()
        },
    )?;
    Ok(Exec::Child(pid))
}
