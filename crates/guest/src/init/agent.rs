//! The exec agent: a process the init forks once the workload's root is in place, listening on
//! vsock port [`cela_guest::VSOCK_AGENT_PORT`]. Each host connection runs one command with the
//! workload's environment, user and working directory (unless the request names others), its
//! standard streams carried as [`Frame`]s (protocol in [`cela_guest::exec`]), on pipes or on a
//! pseudo-terminal, and ends with its exit status. This is what `cela exec` into a microVM
//! talks to.
//!
//! The agent is a forked copy of the init, not a new program: after a switch into a root disk
//! the initramfs (and with it `/init`) is gone. It is single-purpose and may use threads, one
//! set per connection, since it is not PID 1.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::{Arc, Mutex};

use cela_guest::exec::{Frame, Start};
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::pty::{Winsize, openpty};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork};

use super::say;
use super::tty::set_window_size;
use super::vsock;
use super::workload::{ChildIo, RunAs, Session, build_env, exit_status, spawn};

/// What every exec starts from: the workload's own request.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub env: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
}

/// Forks the agent. `close` are descriptors of the init the agent must not keep (the control
/// and output channels: the host must see them end when the init ends them).
pub fn start(defaults: Defaults, close: &[std::os::fd::RawFd]) {
    let listener = match vsock::listen_on(cela_guest::VSOCK_AGENT_PORT) {
        Ok(l) => l,
        Err(e) => {
            say!("warning: exec agent: listening on vsock: {e}; cela exec will not work");
            return;
        }
    };
    // SAFETY: the init is single-threaded, so the child is a complete copy with no lock held
    // by a thread that does not exist in it.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => {}
        Ok(ForkResult::Child) => {
            for fd in close {
                // SAFETY: closing descriptors the child inherited and never uses.
                unsafe { libc::close(*fd) };
            }
            // The init blocks its power and child signals; the agent needs the defaults.
            let _ = SigSet::all().thread_unblock();
            serve(listener, &defaults);
        }
        Err(e) => say!("warning: exec agent: fork: {e}; cela exec will not work"),
    }
}

fn serve(listener: OwnedFd, defaults: &Defaults) -> ! {
    loop {
        match vsock::accept_one(&listener) {
            Ok(conn) => {
                let defaults = defaults.clone();
                let _ = std::thread::Builder::new()
                    .name("exec".into())
                    .spawn(move || run_one(conn, &defaults));
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                say!("exec agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Sends one frame under the connection's write lock; a failed send is the host gone, which
/// the reading side notices too.
fn send(out: &Mutex<File>, frame: &Frame) -> bool {
    let mut f = out.lock().unwrap_or_else(|p| p.into_inner());
    frame.write_to(&mut *f).is_ok()
}

/// Runs one connection's command from start to exit status.
fn run_one(conn: File, defaults: &Defaults) {
    let Ok(mut reader) = conn.try_clone() else {
        return;
    };
    let out = Arc::new(Mutex::new(conn));
    let start = match Frame::read_from(&mut reader) {
        Ok(Some(Frame::Start(start))) => start,
        Ok(Some(_)) => {
            fail(&out, "the first frame must be Start", 125);
            return;
        }
        Ok(None) => return,
        Err(e) => {
            fail(&out, &format!("bad request: {e}"), 125);
            return;
        }
    };
    let mut request_env = defaults.env.clone();
    request_env.extend(start.env.iter().cloned());
    let mut env = build_env(&request_env, start.tty.is_some());
    let user = start.user.as_deref().or(defaults.user.as_deref());
    let workdir = start.workdir.as_deref().or(defaults.workdir.as_deref());
    let run_as = match RunAs::resolve(user, workdir, &mut env, &request_env) {
        Ok(r) => r,
        Err(e) => {
            fail(&out, &e, 126);
            return;
        }
    };
    let launched = match start.tty {
        Some(size) => launch_on_pty(&start, &env, &run_as, size),
        None => launch_on_pipes(&start, &env, &run_as),
    };
    let (pid, streams) = match launched {
        Ok(l) => l,
        Err(Launch::Spawn(e)) => {
            fail(&out, &format!("cela-init: {e}"), i32::from(e.status()));
            return;
        }
        Err(Launch::Io(e)) => {
            fail(
                &out,
                &format!("cela-init: preparing the command's streams: {e}"),
                126,
            );
            return;
        }
    };
    let pumps: Vec<_> = streams
        .outputs
        .into_iter()
        .map(|(fd, is_err)| {
            let out = out.clone();
            std::thread::spawn(move || pump_output(fd, is_err, &out))
        })
        .collect();
    let control = streams.control;
    let stdin = streams.stdin;
    // Signals go through a pidfd, which cannot reach another process that reuses the pid
    // after this one is reaped.
    let target = pidfd_open(pid);
    std::thread::spawn(move || follow_input(reader, stdin, control, target));
    let status = loop {
        match waitpid(pid, None) {
            Ok(s) => {
                if let Some(code) = exit_status(s) {
                    break i32::from(code);
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break 255,
        }
    };
    for p in pumps {
        let _ = p.join();
    }
    send(&out, &Frame::Exit(status));
    let f = out.lock().unwrap_or_else(|p| p.into_inner());
    let _ = vsock::shutdown_write(&f);
}

/// Tells the host why nothing ran, with the status a shell would give.
fn fail(out: &Mutex<File>, message: &str, status: i32) {
    send(out, &Frame::Stderr(format!("{message}\n").into_bytes()));
    send(out, &Frame::Exit(status));
}

enum Launch {
    Spawn(super::workload::SpawnError),
    Io(std::io::Error),
}

/// The agent's ends of a started command's streams.
struct Streams {
    /// Where Stdin frames go; `None` once closed.
    stdin: Option<File>,
    /// Output to forward: (descriptor, whether it is standard error).
    outputs: Vec<(File, bool)>,
    /// The terminal's master side (for window sizes), if any.
    control: Option<File>,
}

fn launch_on_pipes(
    start: &Start,
    env: &[(String, String)],
    run_as: &RunAs,
) -> Result<(Pid, Streams), Launch> {
    // Close-on-exec: the command must hold only its own ends (std moves them to 0, 1 and 2),
    // or it would keep its own stdin open and never read its end.
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Launch::Io(e.into()));
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let io = ChildIo {
        stdin: Some(in_r),
        stdout: out_w,
        stderr: err_w,
    };
    let pid = spawn(&start.argv, env, io, Session::Inherit, run_as).map_err(Launch::Spawn)?;
    Ok((
        pid,
        Streams {
            stdin: Some(File::from(in_w)),
            outputs: vec![(File::from(out_r), false), (File::from(err_r), true)],
            control: None,
        },
    ))
}

fn launch_on_pty(
    start: &Start,
    env: &[(String, String)],
    run_as: &RunAs,
    (rows, cols): (u16, u16),
) -> Result<(Pid, Streams), Launch> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).map_err(|e| Launch::Io(e.into()))?;
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| Launch::Io(e.into()))?;
    }
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(Launch::Io);
    let io = ChildIo {
        stdin: Some(dup(&pty.slave)?),
        stdout: dup(&pty.slave)?,
        stderr: dup(&pty.slave)?,
    };
    let pid =
        spawn(&start.argv, env, io, Session::ControllingTerminal, run_as).map_err(Launch::Spawn)?;
    drop(pty.slave);
    let master = File::from(pty.master);
    Ok((
        pid,
        Streams {
            stdin: Some(master.try_clone().map_err(Launch::Io)?),
            outputs: vec![(master.try_clone().map_err(Launch::Io)?, false)],
            control: Some(master),
        },
    ))
}

/// Copies one output of the command to the host until it ends (a terminal's master reads EIO
/// once the last process holding the terminal has gone).
fn pump_output(mut fd: File, is_err: bool, out: &Mutex<File>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match fd.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let data = buf[..n].to_vec();
        let frame = if is_err {
            Frame::Stderr(data)
        } else {
            Frame::Stdout(data)
        };
        if !send(out, &frame) {
            return;
        }
    }
}

/// A pidfd for `pid` (Linux 5.3+), `None` if the kernel has none.
fn pidfd_open(pid: Pid) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    // SAFETY: a non-negative result is a descriptor nothing else owns.
    (fd >= 0).then(|| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Sends `signal` to the process behind `pidfd`; nothing if it has ended.
fn signal_process(pidfd: &Option<OwnedFd>, signal: i32) {
    if let Some(fd) = pidfd {
        // SAFETY: pidfd_send_signal takes a pidfd, a signal number, a null siginfo and flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

/// Follows the host's frames after Start: input, end of input, window size, signals. When the
/// host goes away first, the command gets SIGHUP, as when a terminal closes.
fn follow_input(
    mut conn: File,
    mut stdin: Option<File>,
    control: Option<File>,
    target: Option<OwnedFd>,
) {
    loop {
        match Frame::read_from(&mut conn) {
            Ok(Some(Frame::Stdin(data))) => {
                if let Some(w) = &mut stdin
                    && w.write_all(&data).is_err()
                {
                    stdin = None;
                }
            }
            Ok(Some(Frame::StdinEnd)) => {
                if control.is_some() {
                    // A terminal has no end of input; ^D is what a user would type.
                    if let Some(w) = &mut stdin {
                        let _ = w.write_all(&[4]);
                    }
                } else {
                    stdin = None;
                }
            }
            Ok(Some(Frame::Resize { rows, cols })) => {
                if let Some(master) = &control {
                    set_window_size(master, rows, cols);
                }
            }
            Ok(Some(Frame::Signal(n))) => {
                if Signal::try_from(n).is_ok() {
                    signal_process(&target, n);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                signal_process(&target, libc::SIGHUP);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Runs one exec over a socket pair (the agent's side on a thread) and returns what came
    /// back: stdout, stderr and the exit status.
    fn exec(start: Start, input: &[Frame]) -> (Vec<u8>, Vec<u8>, Option<i32>) {
        let (host, guest) = UnixStream::pair().unwrap();
        let defaults = Defaults {
            env: vec!["FROM_IMAGE=yes".into()],
            user: None,
            workdir: None,
        };
        let agent =
            std::thread::spawn(move || run_one(File::from(OwnedFd::from(guest)), &defaults));
        let mut host_w = host.try_clone().unwrap();
        Frame::Start(start).write_to(&mut host_w).unwrap();
        for f in input {
            f.write_to(&mut host_w).unwrap();
        }
        let (mut out, mut err, mut status) = (Vec::new(), Vec::new(), None);
        let mut r = host;
        while let Some(frame) = Frame::read_from(&mut r).unwrap() {
            match frame {
                Frame::Stdout(d) => out.extend(d),
                Frame::Stderr(d) => err.extend(d),
                Frame::Exit(n) => status = Some(n),
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(host_w);
        agent.join().unwrap();
        (out, err, status)
    }

    fn sh(script: &str) -> Start {
        Start {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Start::default()
        }
    }

    #[test]
    fn output_status_and_environment_come_back() {
        let (out, err, status) = exec(
            sh("echo out $FROM_IMAGE; echo err >&2; exit 3"),
            &[Frame::StdinEnd],
        );
        assert_eq!(
            (out.as_slice(), err.as_slice(), status),
            (&b"out yes\n"[..], &b"err\n"[..], Some(3))
        );
    }

    #[test]
    fn stdin_reaches_the_command_and_its_end_too() {
        let (out, _, status) = exec(
            sh("wc -l; echo done"),
            &[Frame::Stdin(b"a\nb\n".to_vec()), Frame::StdinEnd],
        );
        assert_eq!(
            (
                String::from_utf8_lossy(&out).trim().replace(' ', ""),
                status
            ),
            ("2\ndone".into(), Some(0))
        );
    }

    #[test]
    fn a_terminal_has_the_size_asked_for() {
        let mut start = sh("stty size; tty");
        start.tty = Some((30, 100));
        let (out, _, status) = exec(start, &[Frame::StdinEnd]);
        let text = String::from_utf8_lossy(&out).replace('\r', "");
        assert!(text.starts_with("30 100\n/dev/pts/"), "{text:?}");
        assert_eq!(status, Some(0));
    }

    #[test]
    fn unknown_commands_and_signals() {
        let (_, err, status) = exec(
            Start {
                argv: vec!["no-such-command-cela".into()],
                ..Start::default()
            },
            &[],
        );
        assert_eq!(status, Some(127));
        assert!(String::from_utf8_lossy(&err).contains("command not found"));
        let sleep = Start {
            argv: vec!["sleep".into(), "600".into()],
            ..Start::default()
        };
        let (_, _, status) = exec(sleep, &[Frame::Signal(15)]);
        assert_eq!(status, Some(143));
    }
}
