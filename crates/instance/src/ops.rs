//! What the CLI does to instances besides running them: stop, remove, exec, and waiting on
//! their state. Each reads the state on disk first and refuses what that state does not allow.

use std::time::{Duration, Instant};

use cela_runtime::{ExecOptions, Overrides};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::container;
use crate::error::InstanceError;
use std::os::unix::ffi::OsStrExt;

use crate::record::{Broken, Instance, InstanceState, Kind, ProcessId, Status};

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

/// An instance is live while it runs, or while a supervisor is starting it. One created and
/// never started (no supervisor yet, as the Docker API's create leaves it) is not: it can be
/// started or removed as it is.
pub fn is_live(state: &InstanceState) -> bool {
    match state.status {
        Status::Running => true,
        Status::Created => state.supervisor.is_some(),
        _ => false,
    }
}

/// Stops a running instance: SIGTERM to the workload, then SIGKILL once `timeout` has passed.
/// A container's init gets the signals directly. A microVM's monitor passes SIGTERM on to the
/// guest's workload (through cela-init's control channel), so the VM powers off cleanly when
/// the workload ends; at the timeout the monitor itself is killed, and the end is recorded
/// here as status 137, as for a container. Returns once the end is recorded.
pub fn stop(inst: &Instance, timeout: Duration) -> Result<InstanceState, InstanceError> {
    // One being started has no workload to signal yet: wait (bounded) until it has.
    let state = wait_state(inst, Duration::from_secs(30), |s| {
        s.status != Status::Created || s.supervisor.is_none_or(|p| !p.alive())
    })?;
    if !is_live(&state) {
        return Ok(state);
    }
    let stopped = stop_live(inst, &state, timeout)?;
    crate::events::record(inst, "stop", &[]);
    Ok(stopped)
}

/// [`stop`] of an instance found live in `state`.
fn stop_live(
    inst: &Instance,
    state: &InstanceState,
    timeout: Duration,
) -> Result<InstanceState, InstanceError> {
    let target = match inst.config.kind {
        Kind::Container => state.pid,
        Kind::Vm => state.supervisor.map(|s| s.pid),
    };
    let signal_target = |sig: Signal| {
        if let Some(pid) = target
            && kill(Pid::from_raw(pid), sig).is_ok()
        {
            crate::events::record(inst, "kill", &[("signal", (sig as i32).to_string())]);
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
    if inst.config.kind == Kind::Vm {
        kill_vm_processes(inst)?;
    }
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
        // Its TAP, which the killed monitor may hold open a moment longer.
        if let Some(rec) = state.network.take() {
            crate::network::delete_host_link(&rec);
        }
        // Its place on named networks and its published ports: no supervisor is left to
        // give them up.
        crate::network::release_links(&inst.dir);
        inst.save_state(&state)?;
        let _ = std::fs::remove_file(inst.vsock_path());
    }
    Ok(state)
}

/// Sends `signal` to a running instance: to a container's init, or, for a microVM, SIGTERM
/// to the monitor (passed on to the guest's workload as by [`stop`]) and SIGKILL as a stop
/// without grace. Other signals have no way into a guest yet.
pub fn send_signal(inst: &Instance, signal: Signal) -> Result<(), InstanceError> {
    let state = inst.state()?;
    if state.status != Status::Running {
        return Err(InstanceError::WrongState {
            name: inst.name().to_owned(),
            status: state.status.to_string(),
            hint: "only a running instance can be signalled",
        });
    }
    match (inst.config.kind, signal) {
        (Kind::Container, _) => {
            if let Some(pid) = state.pid {
                kill(Pid::from_raw(pid), signal).map_err(|e| {
                    InstanceError::Other(format!("signalling {}: {e}", inst.name()))
                })?;
            }
        }
        (Kind::Vm, Signal::SIGKILL) => {
            stop(inst, Duration::ZERO)?;
        }
        (Kind::Vm, Signal::SIGTERM) => {
            if let Some(sup) = state.supervisor {
                let _ = kill(Pid::from_raw(sup.pid), Signal::SIGTERM);
            }
        }
        (Kind::Vm, other) => {
            return Err(InstanceError::Unsupported(format!(
                "a microVM takes SIGTERM and SIGKILL only, not {other}"
            )));
        }
    }
    crate::events::record(inst, "kill", &[("signal", (signal as i32).to_string())]);
    Ok(())
}

/// Removes an instance and everything it made (container, mounts, cgroup, its directory). A
/// live one needs `force` (it is killed first), and so does one whose state cannot be read
/// (everything of it that can be found is killed: see [`kill_leftovers`]). When another
/// removal of the same instance wins the race, this one answers that there is no such
/// instance (as `docker rm` does), not with the file that vanished under it.
pub fn remove(inst: &Instance, force: bool) -> Result<(), InstanceError> {
    match remove_instance(inst, force) {
        Err(_) if !inst.dir.exists() => Err(InstanceError::NotFound(inst.name().to_owned())),
        other => other,
    }
}

fn remove_instance(inst: &Instance, force: bool) -> Result<(), InstanceError> {
    // Marked (so that no supervisor starts it any more) once it is not live; a live one is
    // stopped first, which needs `force`, and marked then.
    loop {
        let state = inst.mark_removing()?;
        if !is_live(&state) && state.status != Status::Unknown {
            break;
        }
        if !force {
            return Err(InstanceError::WrongState {
                name: inst.name().to_owned(),
                status: state.status.to_string(),
                hint: "stop it first, or use rm -f",
            });
        }
        if state.status == Status::Unknown {
            kill_leftovers(&inst.config.id, &inst.dir)?;
            break;
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

/// Removes an instance directory whose config cannot be read (needs `force`): kills what can
/// be found of it, unmounts what is mounted in it, removes its network namespace and the
/// directory.
pub fn remove_broken(b: &Broken, force: bool) -> Result<(), InstanceError> {
    if !force {
        return Err(InstanceError::Other(format!(
            "instance {} is unknown ({}): rm -f kills whatever runs of it and removes it",
            b.id, b.error
        )));
    }
    kill_leftovers(&b.id, &b.dir)?;
    let _ = container::runtime_at(&b.dir).delete(&b.id, true);
    container::unmount_rootfs_at(&b.dir);
    crate::network::teardown_at(&b.dir, None);
    let gone = crate::record::retire(&b.dir).unwrap_or_else(|_| b.dir.clone());
    std::fs::remove_dir_all(&gone).map_err(|source| InstanceError::Io {
        what: format!("removing {}", gone.display()),
        source,
    })?;
    if let Some(root) = gone.parent() {
        sweep_retired(root);
    }
    Ok(())
}

/// Kills, without a record to go by, what may still run of instance `id` in `dir`: its
/// supervisor and a microVM's monitor ([`supervisor_processes`]; QEMU dies with the supervisor)
/// and every process in its container's cgroup.
pub fn kill_leftovers(id: &str, dir: &std::path::Path) -> Result<(), InstanceError> {
    for pid in supervisor_processes(id, dir) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    container::kill_cgroup(id)
}

/// The processes of instance `id` (in `dir`) that run cela's supervisor code, found by their
/// command line, `cela --data-dir DATA __supervise ID`: the supervisor and, for a microVM, the
/// reaper and the jailed monitor it forked (copies of it, with its command line).
fn supervisor_processes(id: &str, dir: &std::path::Path) -> Vec<i32> {
    let data_dir = dir.parent().and_then(|p| p.parent());
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let supervises = args
            .windows(2)
            .any(|w| w[0] == b"__supervise" && w[1] == id.as_bytes());
        let same_data = args.windows(2).any(|w| {
            w[0] == b"--data-dir"
                && data_dir
                    .is_some_and(|d| std::path::Path::new(std::ffi::OsStr::from_bytes(w[1])) == d)
        });
        if supervises && (same_data || data_dir.is_none()) {
            found.push(pid);
        }
    }
    found
}

/// Kills what runs of microVM `inst` (supervisor, reaper, monitor) and waits, bounded, until
/// none of them runs: a killed supervisor's monitor dies with it (PR_SET_PDEATHSIG), but only
/// soon after, and a stop returns once the VM is gone.
fn kill_vm_processes(inst: &Instance) -> Result<(), InstanceError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<i32> = supervisor_processes(&inst.config.id, &inst.dir)
            .into_iter()
            .filter(|pid| ProcessId::of(*pid).is_some())
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        for pid in &left {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        if std::time::Instant::now() > deadline {
            return Err(InstanceError::Other(format!(
                "the monitor of {} (pids {left:?}) did not end within 20s of SIGKILL",
                inst.name()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes the instance directory (what is mounted in it is unmounted first, and a
/// container's network removed). The directory is renamed to a hidden name first, so no
/// listing sees it half-removed.
pub fn remove_dir(inst: &Instance) {
    let recorded = inst.state().ok().and_then(|s| s.network);
    if inst.config.kind == Kind::Container {
        container::unmount_rootfs(inst);
        crate::network::teardown(inst, recorded.as_ref());
    } else {
        if let Some(rec) = &recorded {
            crate::network::delete_host_link(rec);
        }
        crate::network::release_links(&inst.dir);
    }
    // Recorded while the instance is still listed: a client that sees it gone (Docker's
    // `wait?condition=removed`) finds its destroy in the journal.
    crate::events::record(inst, "destroy", &[]);
    let dir = inst.retire().unwrap_or_else(|_| inst.dir.clone());
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!("removing {}: {e}", dir.display());
    }
    if let Some(root) = dir.parent() {
        sweep_retired(root);
    }
}

/// Finishes the removals that stopped half-way in the instances directory `root`: each
/// `.removing-<id>` directory an `rm` renamed and then failed (or was killed) to remove.
/// What is mounted in it is unmounted first, and it is removed only once nothing is mounted
/// below it (a recursive removal would otherwise descend into a mounted file system).
pub fn sweep_retired(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let retired = entry.file_name().as_bytes().starts_with(b".removing-");
        if !retired || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        container::unmount_rootfs_at(&dir);
        crate::network::teardown_at(&dir, None);
        if container::mounted_below(&dir) {
            tracing::warn!("{} still has mounts; left for a later rm", dir.display());
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing {}: {e}", dir.display());
        }
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
