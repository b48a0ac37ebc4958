//! The host side of a guest console: the host terminal in raw mode for interactive sessions
//! (restored on every exit path), a thread forwarding host stdin to the guest with the
//! `Ctrl-A x` escape to leave, a writer copying guest output to host stdout, and Ctrl-C /
//! SIGTERM turned into a request to stop the machine.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Once};

use nix::sys::termios::{self, SetArg, Termios};

use crate::input::Input;
use crate::machine::{ConsoleMode, GuestExit};
use crate::seccomp::{Filters, ThreadKind};
use crate::stop::{StopReason, StopSignal};

/// The escape prefix (Ctrl-A) and the key that, after it, leaves the console.
pub const ESCAPE_PREFIX: u8 = 0x01;
pub const ESCAPE_EXIT: u8 = b'x';

/// Guest console output → host stdout, unbuffered so prompts without a newline show at once.
pub struct HostStdout;

impl Write for HostStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// Puts a terminal in raw mode and restores its previous settings when dropped.
pub struct RawTerminal {
    fd: RawFd,
    saved: Termios,
}

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal; `None` otherwise.
    pub fn stdin() -> Option<RawTerminal> {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal {
            fd: stdin.as_raw_fd(),
            saved,
        })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `fd` is stdin, which stays open for the life of the process.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let _ = termios::tcsetattr(fd, SetArg::TCSANOW, &self.saved);
    }
}

/// What the escape filter decided for one input chunk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    /// Bytes to send to the guest.
    pub to_guest: Vec<u8>,
    /// The user typed the exit escape.
    pub exit: bool,
}

/// Recognizes `Ctrl-A x` (leave) and `Ctrl-A Ctrl-A` (send one Ctrl-A) in the input stream,
/// across chunk boundaries.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    pending_prefix: bool,
}

impl EscapeFilter {
    pub fn feed(&mut self, input: &[u8]) -> Filtered {
        let mut out = Filtered::default();
        for &b in input {
            if self.pending_prefix {
                self.pending_prefix = false;
                match b {
                    ESCAPE_EXIT => {
                        out.exit = true;
                        return out;
                    }
                    ESCAPE_PREFIX => out.to_guest.push(ESCAPE_PREFIX),
                    other => out.to_guest.extend_from_slice(&[ESCAPE_PREFIX, other]),
                }
            } else if b == ESCAPE_PREFIX {
                self.pending_prefix = true;
            } else {
                out.to_guest.push(b);
            }
        }
        out
    }
}

/// Forwards host stdin to `send` until EOF or the exit escape, which requests
/// [`GuestExit::Detached`] ([`ConsoleMode::Interactive`]); or, with [`ConsoleMode::Framed`],
/// reads [`Input`] frames from stdin: their data goes to `send`, their sizes to the guest's
/// init (which sizes the console's terminal), and the end of input is ignored (a terminal has
/// none). Input is held back until the guest's init reports it is up: the guest's serial
/// driver discards what sits in the UART when it starts the port, so bytes typed (or piped)
/// before that would be lost. Runs on its own (detached) thread: a blocking read on stdin
/// cannot be interrupted, and the process ends with the machine anyway.
pub fn spawn_stdin_forwarder(
    stop: Arc<StopSignal>,
    filters: Option<Filters>,
    mode: ConsoleMode,
    send: impl Fn(&[u8]) -> io::Result<()> + Send + 'static,
) {
    let spawned = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            crate::seccomp::confine_thread(filters.as_ref(), ThreadKind::Console);
            if !stop.wait_ready() {
                return;
            }
            if mode == ConsoleMode::Framed {
                return forward_frames(&stop, send);
            }
            let mut filter = EscapeFilter::default();
            let mut buf = [0u8; 256];
            let mut stdin = io::stdin();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let f = filter.feed(&buf[..n]);
                if !f.to_guest.is_empty() && send(&f.to_guest).is_err() {
                    return;
                }
                if f.exit {
                    stop.request(StopReason::Guest(GuestExit::Detached));
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot forward the console input: {e}");
    }
}

/// The framed console: until stdin ends or carries a malformed frame. Once the guest takes
/// no more input, what comes is read and dropped, so the supervisor writing it never blocks.
/// A size the guest's init cannot take at once is kept (only the newest) and offered again
/// with the next frame.
fn forward_frames(stop: &StopSignal, send: impl Fn(&[u8]) -> io::Result<()>) {
    let mut stdin = io::BufReader::new(io::stdin());
    let mut taking = true;
    let mut size = None;
    while let Ok(Some(frame)) = Input::read(&mut stdin) {
        match frame {
            Input::Data(d) => taking = taking && send(&d).is_ok(),
            Input::Resize { rows, cols } => size = Some((rows, cols)),
            Input::Eof => {}
        }
        if let Some((rows, cols)) = size
            && stop.send_to_guest(cela_guest::HostRequest::Resize { rows, cols })
        {
            size = None;
        }
    }
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_host_signal(signum: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = signum as u8;
        // SAFETY: write(2) is async-signal-safe; `b` is a valid one-byte buffer. A failed write
        // (pipe full) only loses a duplicate notification.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// Turns SIGINT and SIGHUP into [`GuestExit::Interrupted`] stop requests on `stop`; SIGTERM
/// goes on to the guest's workload when cela-init's control channel is up (a graceful stop),
/// and stops the machine like the others when it is not. Only the first call per process
/// installs the handlers.
pub fn stop_on_host_signals(stop: Arc<StopSignal>, filters: Option<Filters>) {
    if let Some(signals) = HostSignals::install() {
        signals.watch(stop, filters);
    }
}

/// SIGINT, SIGTERM and SIGHUP caught into a pipe: installed while the machine is built (a
/// jailed monitor may not change handlers later), watched by a thread started with the
/// machine (a jailed monitor starts no thread before it enters its jail).
pub struct HostSignals {
    read_end: std::os::fd::OwnedFd,
}

impl HostSignals {
    /// Installs the handlers; `None` if this process did already, or cannot.
    pub fn install() -> Option<HostSignals> {
        static ONCE: Once = Once::new();
        let mut installed = false;
        ONCE.call_once(|| installed = true);
        if !installed {
            return None;
        }
        let (read_end, write_end) = match nix::unistd::pipe() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot watch for Ctrl-C: {e}");
                return None;
            }
        };
        SIGNAL_PIPE.store(
            std::os::fd::IntoRawFd::into_raw_fd(write_end),
            Ordering::Relaxed,
        );
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_host_signal) {
                tracing::warn!("cannot handle signal {sig}: {e}");
            }
        }
        Some(HostSignals { read_end })
    }

    /// Starts the thread that turns the caught signals into stop requests on `stop` (see
    /// [`stop_on_host_signals`]).
    pub fn watch(self, stop: Arc<StopSignal>, filters: Option<Filters>) {
        let read_end = self.read_end;
        let _ = std::thread::Builder::new()
            .name("host-signals".into())
            .spawn(move || {
                crate::seccomp::confine_thread(filters.as_ref(), ThreadKind::Console);
                let mut file = std::fs::File::from(read_end);
                let mut b = [0u8; 1];
                while file.read_exact(&mut b).is_ok() {
                    // SIGTERM is a graceful stop: the workload gets it (as `docker stop` gives
                    // a container's init), and the VM ends when the workload does.
                    let forward = i32::from(b[0]) == libc::SIGTERM
                        && stop.send_to_guest(cela_guest::HostRequest::Signal(libc::SIGTERM));
                    if !forward {
                        stop.request(StopReason::Guest(GuestExit::Interrupted(b[0])));
                        return;
                    }
                    tracing::debug!("SIGTERM passed on to the guest's workload");
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_exits_and_ctrl_a_ctrl_a_sends_one() {
        let mut f = EscapeFilter::default();
        assert_eq!(
            f.feed(b"ls\r"),
            Filtered {
                to_guest: b"ls\r".to_vec(),
                exit: false
            }
        );
        assert_eq!(
            f.feed(&[1, 1, b'a']),
            Filtered {
                to_guest: vec![1, b'a'],
                exit: false
            }
        );
        assert_eq!(
            f.feed(&[1, b'c']),
            Filtered {
                to_guest: vec![1, b'c'],
                exit: false
            }
        );
        assert_eq!(
            f.feed(&[b'q', 1]),
            Filtered {
                to_guest: vec![b'q'],
                exit: false
            }
        );
        assert_eq!(
            f.feed(b"x rest"),
            Filtered {
                to_guest: vec![],
                exit: true
            }
        );
    }
}
