//! Waiting as PID 1: reaping every process that ends, until the workload does or someone asks
//! for a power-off or reboot.
//!
//! PID 1 is the parent of every orphan, so it must reap children it never started, and it is
//! the process busybox's `poweroff`, `reboot` and `halt` signal (without `-f`): `SIGUSR2` powers
//! off, `SIGTERM` reboots, `SIGUSR1` halts. Init blocks those signals and `SIGCHLD` and reads
//! them from a `signalfd`, so no work happens in a signal handler and none is missed: a blocked
//! signal is queued even for PID 1, which the kernel otherwise shields from signals it has no
//! handler for. It also reads the host's requests on the control channel (`signal N`, how a
//! graceful `cela stop` reaches the workload). The loop itself ([`supervise`]) takes its events
//! from an [`EventSource`], so its logic is tested without being PID 1.

use std::collections::VecDeque;
use std::os::fd::{AsFd as _, OwnedFd};

use cela_guest::{ControlParser, HostRequest};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::workload::exit_status;

/// What a power signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    /// `poweroff` (`SIGUSR2`) or `halt` (`SIGUSR1`; a VM has nothing to halt to).
    PowerOff,
    /// `reboot` (`SIGTERM`).
    Reboot,
}

impl PowerRequest {
    /// The request a signal to PID 1 makes, busybox style.
    pub fn from_signal(signal: Signal) -> Option<Self> {
        match signal {
            Signal::SIGUSR1 | Signal::SIGUSR2 => Some(PowerRequest::PowerOff),
            Signal::SIGTERM => Some(PowerRequest::Reboot),
            _ => None,
        }
    }
}

/// Something that happened to init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A child ended with this status (see [`exit_status`]) and has been reaped.
    ChildExited {
        pid: Pid,
        status: u8,
    },
    Power(PowerRequest),
    /// The host asked that the workload get this signal.
    HostSignal(i32),
}

/// Where [`supervise`] gets its events from.
pub trait EventSource {
    /// Blocks until the next event.
    fn next_event(&mut self) -> Result<Event, Errno>;
}

/// How supervision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The workload ended with this status.
    Exited(u8),
    Power(PowerRequest),
}

/// Waits until `workload` ends or a power signal arrives; other children that end are only
/// reaped.
pub fn supervise(workload: Pid, events: &mut impl EventSource) -> Result<Outcome, Errno> {
    loop {
        match events.next_event()? {
            Event::ChildExited { pid, status } if pid == workload => {
                return Ok(Outcome::Exited(status));
            }
            Event::ChildExited { .. } => {}
            Event::Power(request) => return Ok(Outcome::Power(request)),
            Event::HostSignal(n) => {
                if let Ok(signal) = Signal::try_from(n) {
                    let _ = kill(workload, signal);
                }
            }
        }
    }
}

/// PID 1's events: the signals it watches, read from a `signalfd`, and every child that ended,
/// reaped with `waitpid(-1)`.
#[derive(Debug)]
pub struct Pid1Events {
    signals: SignalFd,
    queue: VecDeque<Event>,
    /// The control channel, read for host requests until it ends.
    requests: Option<(OwnedFd, ControlParser<HostRequest>)>,
    /// The hosts file being received.
    hosts: super::hosts::Block,
    /// How many hosts files were received.
    hosts_received: u64,
}

impl Pid1Events {
    /// Blocks `SIGCHLD` and the power signals and starts watching them. Call this before
    /// starting any child, so that not even the first `SIGCHLD` is lost. Init must be single
    /// threaded (it is): the mask is the calling thread's.
    pub fn new() -> Result<Self, Errno> {
        let mut mask = SigSet::empty();
        for signal in [
            Signal::SIGCHLD,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGTERM,
        ] {
            mask.add(signal);
        }
        mask.thread_block()?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)?;
        Ok(Pid1Events {
            signals,
            queue: VecDeque::new(),
            requests: None,
            hosts: Default::default(),
            hosts_received: 0,
        })
    }

    /// Also reads host requests from `channel` (a descriptor of the control channel).
    pub fn watch_requests(&mut self, channel: OwnedFd) {
        self.requests = Some((channel, ControlParser::default()));
    }

    /// Waits until a signal is pending, reading host requests that arrive meanwhile.
    fn wait_for_signal(&mut self) -> Result<(), Errno> {
        while self.queue.is_empty() {
            let Some((channel, _)) = &self.requests else {
                return Ok(());
            };
            let mut fds = [
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(channel.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            let (signal_ready, request_ready) = (ready(&fds[0]), ready(&fds[1]));
            if request_ready {
                self.read_requests();
            }
            if signal_ready {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Takes the host requests that have come already, without waiting: a terminal's size
    /// sent right after `ready` is applied before the workload starts, so a program that
    /// reads its size once sees the right one.
    pub fn read_waiting_requests(&mut self) {
        let Some((channel, _)) = &self.requests else {
            return;
        };
        let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
        if matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1..)) {
            self.read_requests();
        }
    }

    /// Waits at most `bound` for the host's first hosts file (a boot with
    /// [`cela_guest::BootRequest::hosts`]), applying other requests that come meanwhile, so
    /// the workload starts knowing its neighbours' names; false if none came.
    pub fn wait_for_hosts(&mut self, bound: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + bound;
        while self.hosts_received == 0 {
            let Some((channel, _)) = &self.requests else {
                return false;
            };
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(1..) => self.read_requests(),
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Reads what the channel has; a channel that ended or failed is no longer watched.
    fn read_requests(&mut self) {
        let Some((channel, parser)) = &mut self.requests else {
            return;
        };
        let mut buf = [0u8; 256];
        match nix::unistd::read(&*channel, &mut buf) {
            Ok(0) | Err(_) => self.requests = None,
            Ok(n) => {
                for request in parser.feed(&buf[..n]) {
                    match request {
                        HostRequest::Signal(n) => self.queue.push_back(Event::HostSignal(n)),
                        HostRequest::Resize { rows, cols } => {
                            super::tty::resize_console(rows, cols)
                        }
                        HostRequest::Clock { secs, nanos } => super::resume::set_clock(secs, nanos),
                        HostRequest::Entropy(bytes) => super::resume::add_entropy(&bytes),
                        HostRequest::Hostname(h) => super::resume::set_hostname(h.as_str()),
                        HostRequest::Network(n) => {
                            if let Err(e) = super::net::reconfigure(&n) {
                                super::say!("moving the network to this copy's link: {e}");
                            }
                        }
                        HostRequest::HostsBegin => self.hosts.begin(),
                        HostRequest::Host { address, name } => self.hosts.add(address, name),
                        HostRequest::HostsEnd => {
                            if let Some(text) = self.hosts.end() {
                                // Received is enough to end the wait for it: a root where it
                                // cannot be written would only make every boot wait longer.
                                self.hosts_received += 1;
                                if let Err(e) =
                                    super::hosts::install(std::path::Path::new("/"), &text)
                                {
                                    super::say!("writing /etc/hosts: {e}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Reaps every child that has ended (one `SIGCHLD` may stand for several).
    fn reap(&mut self) -> Result<(), Errno> {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
                Ok(status) => {
                    if let (Some(pid), Some(code)) = (status.pid(), exit_status(status)) {
                        self.queue
                            .push_back(Event::ChildExited { pid, status: code });
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl EventSource for Pid1Events {
    fn next_event(&mut self) -> Result<Event, Errno> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(event);
            }
            self.wait_for_signal()?;
            if let Some(event) = self.queue.pop_front() {
                return Ok(event);
            }
            let info = match self.signals.read_signal() {
                Ok(Some(info)) => info,
                Ok(None) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            };
            let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            if signal == Signal::SIGCHLD {
                self.reap()?;
            } else if let Some(request) = PowerRequest::from_signal(signal) {
                self.queue.push_back(Event::Power(request));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::workload::{ChildIo, RunAs, Session, build_env, spawn};
    use std::fs::File;
    use std::io::Read as _;
    use std::os::fd::OwnedFd;

    struct Scripted(VecDeque<Event>);

    impl EventSource for Scripted {
        fn next_event(&mut self) -> Result<Event, Errno> {
            self.0.pop_front().ok_or(Errno::ECHILD)
        }
    }

    /// Events from one child only: a test process is not PID 1 and must not reap the test
    /// harness's other children.
    struct OneChild(Pid);

    impl EventSource for OneChild {
        fn next_event(&mut self) -> Result<Event, Errno> {
            loop {
                let status = waitpid(self.0, None)?;
                if let Some(code) = exit_status(status) {
                    return Ok(Event::ChildExited {
                        pid: self.0,
                        status: code,
                    });
                }
            }
        }
    }

    #[test]
    fn orphans_are_reaped_until_the_workload_ends() {
        let (workload, orphan) = (Pid::from_raw(10), Pid::from_raw(11));
        let mut events = Scripted(VecDeque::from([
            Event::ChildExited {
                pid: orphan,
                status: 0,
            },
            Event::ChildExited {
                pid: workload,
                status: 3,
            },
        ]));
        assert_eq!(supervise(workload, &mut events), Ok(Outcome::Exited(3)));
        let mut events = Scripted(VecDeque::from([
            Event::ChildExited {
                pid: orphan,
                status: 0,
            },
            Event::Power(PowerRequest::Reboot),
        ]));
        assert_eq!(
            supervise(workload, &mut events),
            Ok(Outcome::Power(PowerRequest::Reboot))
        );
    }

    #[test]
    fn busybox_power_signals() {
        assert_eq!(
            PowerRequest::from_signal(Signal::SIGUSR2),
            Some(PowerRequest::PowerOff)
        );
        assert_eq!(
            PowerRequest::from_signal(Signal::SIGUSR1),
            Some(PowerRequest::PowerOff)
        );
        assert_eq!(
            PowerRequest::from_signal(Signal::SIGTERM),
            Some(PowerRequest::Reboot)
        );
        assert_eq!(PowerRequest::from_signal(Signal::SIGINT), None);
    }

    /// Runs `sh -c script` as init would and returns its status and its output.
    fn run_shell(script: &str) -> (Outcome, String) {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let stderr = writer.try_clone().unwrap();
        let argv = ["sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let env = build_env(&["GREETING=hello there".into()], false);
        let io = ChildIo {
            stdin: None,
            stdout: writer,
            stderr,
        };
        let pid = spawn(&argv, &env, io, Session::Inherit, &RunAs::default()).unwrap();
        let outcome = supervise(pid, &mut OneChild(pid)).unwrap();
        (outcome, read_all(reader))
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut text = String::new();
        File::from(fd).read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn real_commands_report_shell_statuses() {
        assert_eq!(run_shell("exit 7").0, Outcome::Exited(7));
        assert_eq!(run_shell("kill -9 $$").0, Outcome::Exited(137));
        assert_eq!(run_shell("true").0, Outcome::Exited(0));
    }

    #[test]
    fn the_workload_sees_its_environment_and_bytes_pass_untouched() {
        let (outcome, out) = run_shell(
            "printf '%s|%s|%s\\n' \"$GREETING\" \"$HOME\" \"$PATH\"; echo err >&2; env | wc -l",
        );
        assert_eq!(outcome, Outcome::Exited(0));
        let mut lines = out.lines();
        assert_eq!(
            lines.next(),
            Some("hello there|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        );
        assert_eq!(lines.next(), Some("err"));
        // PATH HOME TERM GREETING, plus PWD and SHLVL that sh adds itself.
        let count: usize = lines.next().unwrap().trim().parse().unwrap();
        assert!(count <= 6, "{out}");
    }

    #[test]
    fn the_workload_starts_with_no_blocked_signals_and_null_stdin() {
        // Block what init blocks, in this (test) thread, before spawning.
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGUSR2);
        mask.thread_block().unwrap();
        let (outcome, out) =
            run_shell("grep SigBlk /proc/self/status; cat; readlink /proc/self/fd/0");
        mask.thread_unblock().unwrap();
        assert_eq!(outcome, Outcome::Exited(0));
        assert_eq!(out, "SigBlk:\t0000000000000000\n/dev/null\n");
    }

    #[test]
    fn unrunnable_programs_get_126_and_127() {
        let env = build_env(&[], false);
        let io = || {
            let (_, w) = nix::unistd::pipe().unwrap();
            ChildIo {
                stdin: None,
                stdout: w.try_clone().unwrap(),
                stderr: w,
            }
        };
        let err = spawn(
            &["no-such-program-cela".into()],
            &env,
            io(),
            Session::Inherit,
            &RunAs::default(),
        )
        .unwrap_err();
        assert_eq!(
            (err.status(), err.to_string()),
            (127, "no-such-program-cela: command not found".to_owned())
        );

        let dir = crate::init::TestDir::new();
        // A script whose interpreter is missing: execve fails with ENOENT. (A file the kernel
        // does not recognise is not an error: like a shell, std runs it with /bin/sh.)
        let garbage = dir.path().join("orphan-script");
        std::fs::write(&garbage, "#!/nonexistent/interpreter\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = spawn(
            &[garbage.display().to_string()],
            &env,
            io(),
            Session::Inherit,
            &RunAs::default(),
        )
        .unwrap_err();
        assert_eq!(err.status(), 126, "{err}");
        assert!(
            err.to_string().contains("No such file or directory"),
            "{err}"
        );
    }

    #[test]
    fn a_host_signal_reaches_the_workload() {
        let argv = ["sleep".to_owned(), "600".to_owned()];
        let env = build_env(&[], false);
        let (_, w) = nix::unistd::pipe().unwrap();
        let io = ChildIo {
            stdin: None,
            stdout: w.try_clone().unwrap(),
            stderr: w,
        };
        let pid = spawn(&argv, &env, io, Session::Inherit, &RunAs::default()).unwrap();
        // The host's `signal 15`, then the child's end as the real event source reports it.
        struct ThenChild(Option<Event>, Pid);
        impl EventSource for ThenChild {
            fn next_event(&mut self) -> Result<Event, Errno> {
                if let Some(e) = self.0.take() {
                    return Ok(e);
                }
                OneChild(self.1).next_event()
            }
        }
        let outcome = supervise(pid, &mut ThenChild(Some(Event::HostSignal(15)), pid)).unwrap();
        assert_eq!(outcome, Outcome::Exited(143));
    }

    #[test]
    fn the_workload_runs_as_the_user_in_the_working_directory() {
        let dir = crate::init::TestDir::new();
        let work = dir.path().join("made/by/init");
        let run_as = RunAs {
            uid: 65534,
            gid: 65534,
            workdir: work.clone(),
        };
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let io = ChildIo {
            stdin: None,
            stdout: writer.try_clone().unwrap(),
            stderr: writer,
        };
        let argv = [
            "sh".to_owned(),
            "-c".to_owned(),
            "id -u; id -g; id -G; pwd".to_owned(),
        ];
        let pid = spawn(&argv, &build_env(&[], false), io, Session::Inherit, &run_as).unwrap();
        assert_eq!(
            supervise(pid, &mut OneChild(pid)).unwrap(),
            Outcome::Exited(0)
        );
        assert_eq!(
            read_all(reader),
            format!("65534\n65534\n65534\n{}\n", work.display())
        );
    }
}
