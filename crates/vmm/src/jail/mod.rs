//! The monitor's jail. With confinement on (the default), a microVM's monitor runs in a process
//! of its own, walled off from the host as Firecracker's jailer walls off its VMM: a guest that
//! takes over a device emulation holds an unprivileged process that sees an empty file system,
//! no host process, no network, and only the system calls its thread needs.
//!
//! Processes: the caller (an instance's supervisor, or `cela run --vm`) keeps everything that
//! outlives the VM: records, logs, the terminal, the TAP, the vsock socket's path. It forks a
//! *reaper*, which enters a new pid namespace and forks the *monitor*, pid 1 there. The reaper
//! only forwards signals and reports how the monitor ended; each dies with its parent
//! (`PR_SET_PDEATHSIG`), so killing the caller kills the VM, as before.
//!
//! | step | where | what |
//! |---|---|---|
//! | prepare | caller (root) | a uid/gid of its own ([`uid`]), a cgroup sized from the VM ([`cgroup`]), the reaper put in it |
//! | namespaces | monitor | new pid (from the reaper), mount, ipc, uts and net namespaces; every other inherited fd closed |
//! | build | monitor (root) | the machine: kernel, initrd and disks opened, /dev/kvm, the vsock socket bound, guest memory |
//! | [`Jail::enter`] | monitor, before any thread starts | `pivot_root` into an empty read-only tmpfs, rlimits, every capability dropped, the uid, no_new_privs, Landlock, the main thread's seccomp filter |
//! | run | monitor | device and vCPU threads start, each under its own filter ([`crate::seccomp`]) |
//! | report | monitor → caller | how the run went, as JSON on a pipe (read bounded: the monitor is not trusted) |
//!
//! The net namespace is new even with a NIC: a TAP's file descriptor keeps working in any
//! namespace, and the TAP is created and owned by the caller. Nothing is bind-mounted into the
//! jail. A guest's connection to the host's `PATH_<port>` socket is made by the caller on the
//! monitor's behalf ([`broker`]): it connects exactly `PATH_<port>`, as root did before, and
//! passes the connected socket back.

mod broker;
pub mod cgroup;
mod enter;
pub mod uid;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use broker::connect_host_port;
pub use enter::{Jail, Landlock};

/// Guest RAM plus this much is the memory limit of a monitor's cgroup: the monitor's own heap,
/// thread stacks, device buffers and the kernel's page tables for guest memory. A monitor at
/// the end of a 512 MiB boot measures ~25 MiB beyond guest RAM (`RunReport::peak_rss`).
pub const MEMORY_OVERHEAD_MIB: u64 = 128;

/// The largest report a monitor may send; anything beyond is read and thrown away.
const MAX_REPORT: usize = 1 << 20;

/// What the jail around one monitor is sized from.
#[derive(Debug, Clone)]
pub struct JailConfig {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Memory beyond guest RAM the cgroup allows.
    pub memory_overhead_mib: u64,
    /// Threads the monitor may have (RLIMIT_NPROC of its uid, the cgroup's task limit).
    pub tasks: u64,
    /// The `--vsock` socket: the caller removes it when the monitor ends, and connects its
    /// `PATH_<port>` siblings for the guest.
    pub vsock: Option<PathBuf>,
    /// The largest file the monitor writes through (its disks): RLIMIT_FSIZE.
    pub largest_file: u64,
    /// Descriptors the caller opened for the monitor (a TAP), kept open in it.
    pub keep_fds: Vec<RawFd>,
    /// The caller passes SIGINT, SIGTERM and SIGHUP on to the monitor (cela's own monitor
    /// turns them into stops); off when the caller stops it itself (QEMU, through QMP).
    pub forward_signals: bool,
    /// The monitor gets a process group of its own, so the terminal's Ctrl-C reaches only
    /// the caller (QEMU, whose console the caller serves); cela's own monitor stays in the
    /// terminal's foreground group, as it reads the terminal.
    pub own_process_group: bool,
}

impl JailConfig {
    /// The jail of cela's own monitor for a machine of `vcpus` vCPUs and `memory_mib` MiB.
    pub fn monitor(vcpus: u32, memory_mib: u64) -> JailConfig {
        JailConfig {
            vcpus,
            memory_mib,
            memory_overhead_mib: MEMORY_OVERHEAD_MIB,
            tasks: u64::from(vcpus) + 64,
            vsock: None,
            largest_file: 0,
            keep_fds: Vec::new(),
            forward_signals: true,
            own_process_group: false,
        }
    }
}

/// Why a jailed monitor could not run, or how it failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("preparing the monitor's jail: {what}: {source}")]
    Prepare {
        what: String,
        source: std::io::Error,
    },
    #[error("preparing the monitor's cgroup: {0}")]
    Cgroup(String),
    #[error("entering the monitor's jail: {what}: {source}")]
    Enter {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("entering the monitor's jail: Landlock: {0}")]
    Landlock(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The monitor ended without a report: killed, or failed before it could say why.
    #[error("{0}")]
    Monitor(String),
}

impl JailError {
    fn prepare(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
        let what = what.into();
        move |source| JailError::Prepare { what, source }
    }
}

/// The run directory cela keeps sockets and per-run state in: `$CELA_RUN_DIR`, else /run/cela.
pub fn run_dir() -> PathBuf {
    std::env::var_os("CELA_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/cela"))
}

/// Whether this process is a monitor inside its jail (set by [`Jail::enter`]). Paths mean
/// nothing there: what the host side would remove by name, the caller removes.
pub fn inside() -> bool {
    enter::ENTERED.load(Ordering::Relaxed)
}

/// Runs `monitor` in a jailed monitor process (see the module doc) and returns what it
/// reported. `monitor` gets the [`Jail`] to enter once the machine is built; it runs in a
/// forked copy of this process, so it must not rely on other threads of this one.
pub fn run<T, F>(config: &JailConfig, monitor: F) -> Result<T, JailError>
where
    T: Serialize + DeserializeOwned,
    F: FnOnce(Jail) -> Result<T, String>,
{
    spawn(config, monitor)?.wait()
}

/// A jailed monitor running; [`Spawned::wait`] for its report. Dropped without a wait, it is
/// killed and reaped.
pub struct Spawned {
    reaper: Option<Pid>,
    forwarding: Option<Forwarding>,
    cgroup: Option<cgroup::MonitorCgroup>,
    lease: Option<uid::Lease>,
    report: Option<OwnedFd>,
    broker: Option<OwnedFd>,
    vsock: Option<PathBuf>,
    vsock_existed: bool,
}

/// Starts `monitor` in a jailed monitor process (see [`run`]) and returns at once. The
/// monitor dies with the calling *thread* (`PR_SET_PDEATHSIG` follows the thread that
/// forked): call it from a thread that outlives the VM, as cela's main threads do.
pub fn spawn<T, F>(config: &JailConfig, monitor: F) -> Result<Spawned, JailError>
where
    T: Serialize,
    F: FnOnce(Jail) -> Result<T, String>,
{
    // Whether the socket path is taken before the monitor can bind it (see `Spawned::finish`).
    let vsock_existed = config
        .vsock
        .as_ref()
        .is_some_and(|p| p.symlink_metadata().is_ok());
    let base = run_dir();
    let lease = uid::Lease::take(&base.join("monitor-ids"))?;
    let root = base.join("jail");
    std::fs::create_dir_all(&root)
        .map_err(JailError::prepare(format!("creating {}", root.display())))?;
    let cgroup = cgroup::MonitorCgroup::create(
        lease.id(),
        u64::from(config.vcpus) + 1,
        (config.memory_mib + config.memory_overhead_mib) << 20,
        config.tasks,
    )?;
    // Close-on-exec: a monitor that executes a program (QEMU) does not hand it these.
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| JailError::prepare("making a pipe")(e.into()))
    };
    let (report_r, report_w) = pipe()?;
    // The reaper's word to the monitor that it is in its cgroup (see `reaper`).
    let (go_r, go_w) = pipe()?;
    let (broker_caller, broker_monitor) = broker::pair()?;
    let jail = Jail::new(lease.id(), root, config, go_r.as_raw_fd());
    let mut keep = config.keep_fds.clone();
    keep.extend([
        report_w.as_raw_fd(),
        broker_monitor.as_raw_fd(),
        go_r.as_raw_fd(),
        lease.fd(),
    ]);
    let (report_fd, broker_fd) = (report_w.as_raw_fd(), broker_monitor.as_raw_fd());
    let me = nix::unistd::getpid();
    // SAFETY: the child only runs `reaper`, which forks again and runs `monitor` in a process
    // with one thread; glibc's fork leaves its allocator usable in the child.
    let reaper_pid = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop((report_r, broker_caller));
            if config.own_process_group {
                let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
            }
            let spec = ReaperSpec {
                parent: me,
                keep: &keep,
                cgroup: cgroup.as_ref(),
                go: go_w,
                report: report_fd,
            };
            reaper(spec, move || {
                broker::set_monitor_end(broker_fd);
                crate::seccomp::set_report_fd(report_fd);
                let result = monitor(jail);
                use std::io::Write;
                let _ = std::io::stdout().flush();
                let _ = std::io::stderr().flush();
                send_report(report_fd, &result);
            });
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return Err(JailError::prepare("forking the monitor")(e.into())),
    };
    drop((report_w, go_r, go_w, broker_monitor));
    Ok(Spawned {
        reaper: Some(reaper_pid),
        forwarding: config
            .forward_signals
            .then(|| Forwarding::start(reaper_pid)),
        cgroup,
        lease: Some(lease),
        report: Some(report_r),
        broker: Some(broker_caller),
        vsock_existed,
        vsock: config.vsock.clone(),
    })
}

impl Spawned {
    /// The reaper's pid: the process to signal (it passes signals on when asked to).
    pub fn pid(&self) -> Option<Pid> {
        self.reaper
    }

    /// Kills the monitor (through its reaper, whose death kills it).
    pub fn kill(&self) {
        if let Some(p) = self.reaper {
            let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
        }
    }

    /// Serves the monitor until it ends, then cleans up after it (cgroup, vsock socket, id)
    /// and returns its report, or how it ended.
    pub fn wait<T: DeserializeOwned>(mut self) -> Result<T, JailError> {
        let (report, status) = self.finish();
        decode(&report, status)
    }

    /// Like [`Spawned::wait`], for a monitor that reports nothing once it runs (a program it
    /// executed): how it ended, as its status, or what it reported before.
    pub fn wait_status(mut self) -> (String, WaitStatus) {
        let (report, status) = self.finish();
        (String::from_utf8_lossy(&report).into_owned(), status)
    }

    fn finish(&mut self) -> (Vec<u8>, WaitStatus) {
        let report = match (self.broker.take(), self.report.take()) {
            (Some(b), Some(r)) => broker::serve_until_eof(b, r, self.vsock.as_deref()),
            _ => Vec::new(),
        };
        // No more forwarding before the reaper is reaped: its pid could be reused after.
        self.forwarding.take();
        let status = match self.reaper.take() {
            Some(p) => wait_for(p),
            None => WaitStatus::Exited(Pid::from_raw(0), 1),
        };
        self.cgroup.take();
        // The monitor's socket, if it made one: a path that was there before it started is
        // someone else's (the monitor failed to bind it).
        if let Some(path) = self.vsock.take()
            && !self.vsock_existed
        {
            let _ = std::fs::remove_file(path);
        }
        self.lease.take();
        (report, status)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.reaper.is_some() {
            self.kill();
            self.report.take();
            self.broker.take();
            self.finish();
        }
    }
}

/// What the reaper needs from the caller.
struct ReaperSpec<'a> {
    parent: Pid,
    keep: &'a [RawFd],
    cgroup: Option<&'a cgroup::MonitorCgroup>,
    /// Written once the monitor is in its cgroup.
    go: OwnedFd,
    /// The report pipe, for the reaper's own failure.
    report: RawFd,
}

/// The reaper: makes the pid namespace, forks the monitor, moves it into its cgroup while it
/// builds the machine (the kernel's first cgroup migration after a while waits for an RCU
/// grace period, ~15 ms here, which the build hides; what the monitor allocates before the
/// move, the kernel and initrd it loads, is charged to the caller), tells it to go on, then
/// forwards signals to it and exits as it did. Never returns.
fn reaper(spec: ReaperSpec, monitor: impl FnOnce()) -> ! {
    die_with_parent(Some(spec.parent));
    let fail = |what: String| -> ! {
        // On the report pipe only: a reaper in a background process group writing to a
        // terminal with `tostop` would be stopped, and its caller wait forever.
        let line = format!("cela: error: {what}\n");
        // SAFETY: the report pipe is open for this process's life; the buffer is valid.
        unsafe { libc::write(spec.report, line.as_ptr().cast(), line.len()) };
        // SAFETY: _exit ends the process without running the parent's atexit handlers.
        unsafe { libc::_exit(1) }
    };
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID) {
        fail(format!("entering the monitor's jail: a pid namespace: {e}"));
    }
    // SAFETY: this process has one thread.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            die_with_parent(None);
            let code = match enter::prepare(spec.keep) {
                Ok(()) => {
                    monitor();
                    0
                }
                Err(e) => {
                    eprintln!("cela: error: {e}");
                    1
                }
            };
            // SAFETY: as above.
            unsafe { libc::_exit(code) };
        }
        Ok(ForkResult::Parent { child }) => {
            FORWARD_TO.store(child.as_raw(), Ordering::Relaxed);
            install_forwarders();
            if let Some(c) = spec.cgroup
                && let Err(e) = c.add(child)
            {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                wait_for(child);
                fail(e.to_string());
            }
            // `go` stays open while this process lives: the monitor sees it hang up if the
            // reaper dies (see `Jail::enter`).
            let _ = nix::unistd::write(&spec.go, b"g");
            let code = exit_code(wait_for(child));
            // SAFETY: as above.
            unsafe { libc::_exit(code) };
        }
        Err(e) => fail(format!(
            "entering the monitor's jail: forking the monitor: {e}"
        )),
    }
}

/// Asks for SIGKILL when the parent goes; if it went already (`expected` is no longer the
/// parent), ends now.
fn die_with_parent(expected: Option<Pid>) {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if let Some(p) = expected
        && nix::unistd::getppid() != p
    {
        // SAFETY: _exit ends the process without running atexit handlers.
        unsafe { libc::_exit(1) };
    }
}

/// How a process ended, as a shell's status: its exit code, or 128 + the signal that killed it.
pub(crate) fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 1,
    }
}

/// Waits for child `pid` to end, through EINTR.
fn wait_for(pid: Pid) -> WaitStatus {
    loop {
        match waitpid(pid, None) {
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return s,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return WaitStatus::Exited(pid, 1),
        }
    }
}

/// The process SIGINT, SIGTERM and SIGHUP are passed on to (0: none).
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

const FORWARDED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

fn install_forwarders() -> Vec<SigAction> {
    let action = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    FORWARDED
        .iter()
        // SAFETY: `forward` only calls kill(2), which is async-signal-safe.
        .filter_map(|s| unsafe { sigaction(*s, &action) }.ok())
        .collect()
}

/// The caller passes SIGINT, SIGTERM and SIGHUP on to the reaper (and it to the monitor)
/// while the monitor runs, so `cela stop` and Ctrl-C reach the VM; dropped, the caller's
/// previous handlers come back. One monitor per caller process at a time (cela's callers run
/// one each; tests that run several serialize them).
struct Forwarding {
    previous: Vec<SigAction>,
}

impl Forwarding {
    fn start(reaper: Pid) -> Forwarding {
        FORWARD_TO.store(reaper.as_raw(), Ordering::Relaxed);
        Forwarding {
            previous: install_forwarders(),
        }
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        FORWARD_TO.store(0, Ordering::Relaxed);
        for (sig, old) in FORWARDED.iter().zip(&self.previous) {
            // SAFETY: restores the action that was installed before `start`.
            let _ = unsafe { sigaction(*sig, old) };
        }
    }
}

/// The monitor's side of the report: `result`, as JSON, on the report pipe.
pub(crate) fn send_report<T: Serialize>(fd: RawFd, result: &Result<T, String>) {
    let bytes = serde_json::to_vec(result).unwrap_or_else(|e| {
        serde_json::to_vec(&Err::<(), String>(format!("encoding the report: {e}")))
            .expect("a string encodes")
    });
    let mut off = 0;
    while off < bytes.len() {
        // SAFETY: `fd` is the report pipe's write end, open for the monitor's life; the
        // slice is valid for its length.
        let n = unsafe { libc::write(fd, bytes[off..].as_ptr().cast(), bytes.len() - off) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        off += n as usize;
    }
}

/// The longest message of the monitor's that is shown, in characters.
pub const MAX_MESSAGE: usize = 4096;

/// Turns what the monitor wrote and how it ended into the result: its report when it sent
/// one, else the line its SIGSYS handler wrote, else its status. The bytes are the monitor's
/// and so not trusted: bounded, parsed, and any text of theirs only ever shown, as one line
/// of at most [`MAX_MESSAGE`] printable characters (defence in depth: this message carries no
/// terminal escapes of theirs, though a monitor that serves the console writes to the
/// terminal anyway).
/// Public for the fuzz target `monitor_report`; the caller is [`Spawned::wait`].
pub fn decode<T: DeserializeOwned>(report: &[u8], status: WaitStatus) -> Result<T, JailError> {
    let code = exit_code(status);
    if report.first() == Some(&b'{')
        && let Ok(result) = serde_json::from_slice::<Result<T, String>>(report)
    {
        return result.map_err(|m| JailError::Monitor(printable(&m)));
    }
    let text = String::from_utf8_lossy(&report[..report.len().min(MAX_MESSAGE)]);
    let line = text.lines().next().unwrap_or("").trim();
    let line = line.strip_prefix("cela: error: ").unwrap_or(line);
    Err(JailError::Monitor(match (code, line.is_empty()) {
        (_, false) => printable(line),
        (crate::seccomp::KILLED_STATUS, true) => {
            "the monitor was killed by its seccomp filter".into()
        }
        (c, true) if c > 128 => format!(
            "the monitor was killed by signal {} ({})",
            c - 128,
            Signal::try_from(c - 128).map_or("?", |s| s.as_str())
        ),
        (c, true) => format!("the monitor ended with status {c} without a report"),
    }))
}

/// `text` as one line to show, each control character (escape, newline, carriage return, …)
/// written as `\u{..}`, cut to at most [`MAX_MESSAGE`] characters.
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::new();
    let mut len = 0;
    for c in text.chars() {
        let shown: Vec<char> = if c.is_control() || is_invisible_format(c) {
            c.escape_unicode().collect()
        } else {
            vec![c]
        };
        len += shown.len();
        if len > MAX_MESSAGE {
            break;
        }
        out.extend(shown);
    }
    out
}

/// Where the vsock broker's caller side finds `PATH_<port>`.
fn port_path(vsock: &Path, port: u32) -> PathBuf {
    let mut p = vsock.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

#[cfg(test)]
mod tests;

/// Unicode format characters that change how the text around them is shown without being
/// shown themselves (bidirectional overrides and isolates, zero-width characters): escaped
/// like control characters, so a message reads as it is.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}
