//! A container's terminal when nobody else takes it: for a foreground `run` or `exec -t` with
//! `process.terminal` set and no `--console-socket`, cela-runc plays the part containerd's
//! shim plays otherwise. It listens on its own console socket, receives the pseudo-terminal
//! master the container's init sends there (SCM_RIGHTS, as the OCI runtime spec's
//! console-socket protocol says), and copies between it and its own stdin/stdout, with the host
//! terminal in raw mode so keys (Ctrl-C included) reach the container's line discipline
//! unchanged, as `runc run` does.

use std::fs::File;
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use nix::sys::termios::{self, SetArg, Termios};

use crate::error::Error;

/// A console socket cela-runc listens on for one container process.
pub struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Listens on a fresh socket in `dir` (the runtime's state root).
    pub fn listen(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(format!(".console-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let listener = UnixListener::bind(&path).map_err(|source| Error::Io {
            what: format!("listening on console socket {}", path.display()),
            source,
        })?;
        Ok(ConsoleSocket { path, listener })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pseudo-terminal master the container sent. The container has connected and sent it
    /// by the time `create` returns, so this does not wait: a missing connection is an error.
    pub fn receive_master(&self) -> Result<OwnedFd, Error> {
        let io_err = |what: &str, source| Error::Io {
            what: format!("{what} on console socket {}", self.path.display()),
            source,
        };
        self.listener
            .set_nonblocking(true)
            .map_err(|e| io_err("setting up", e))?;
        let (stream, _) = self
            .listener
            .accept()
            .map_err(|e| io_err("waiting for the container's terminal", e))?;
        stream
            .set_nonblocking(false)
            .map_err(|e| io_err("setting up", e))?;
        let mut name = [0u8; 256];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| io_err("receiving the terminal", e.into()))?;
        for cmsg in msg.cmsgs().map_err(|e| io_err("reading", e.into()))? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg
                && let Some(&fd) = fds.first()
            {
                // SAFETY: the kernel just installed `fd` in this process for us (SCM_RIGHTS);
                // nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        Err(io_err(
            "receiving the terminal",
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no file descriptor in the message",
            ),
        ))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Copies between the terminal master and this process's stdin/stdout until the terminal
/// closes; the host terminal (if stdin is one) is raw meanwhile and restored by
/// [`TerminalProxy::finish`] or on drop.
pub struct TerminalProxy {
    output: Option<JoinHandle<()>>,
    _raw: Option<RawStdin>,
}

impl TerminalProxy {
    pub fn start(master: OwnedFd) -> io::Result<Self> {
        let stdin = io::stdin();
        if let Ok(size) = window_size(&stdin) {
            let _ = set_window_size(&master, &size);
        }
        let raw = RawStdin::enable();
        // Later size changes of this side (SIGWINCH is not ours to take: a library must not
        // install signal handlers) are looked for a few times a second and passed on.
        let resized = master.try_clone()?;
        std::thread::spawn(move || {
            let mut last = window_size(&io::stdin()).ok().map(|s| (s.ws_row, s.ws_col));
            loop {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let Ok(size) = window_size(&io::stdin()) else {
                    return;
                };
                if last != Some((size.ws_row, size.ws_col)) {
                    last = Some((size.ws_row, size.ws_col));
                    if set_window_size(&resized, &size).is_err() {
                        return;
                    }
                }
            }
        });
        let mut to_container = File::from(master.try_clone()?);
        // Input: ends with this process (a blocked read on stdin cannot be interrupted).
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut stdin = io::stdin().lock();
            while let Ok(n @ 1..) = stdin.read(&mut buf) {
                if to_container.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut from_container = File::from(master);
        let output = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut stdout = io::stdout();
            // EIO once every process holding the terminal's other side has exited.
            while let Ok(n @ 1..) = from_container.read(&mut buf) {
                if stdout
                    .write_all(&buf[..n])
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(TerminalProxy {
            output: Some(output),
            _raw: raw,
        })
    }

    /// Waits until everything the container wrote to its terminal is copied out, then
    /// restores the host terminal. Call once the container process has exited.
    pub fn finish(mut self) {
        if let Some(t) = self.output.take() {
            let _ = t.join();
        }
    }
}

/// Stdin in raw mode while this lives. The terminal is put back on drop, and by a panic
/// hook on a panic (with `panic = "abort"` no destructor runs then); a caller that can be
/// ended by a signal catches it and drops this.
pub struct RawStdin {
    stdin: OwnedFd,
    saved: Termios,
}

/// The settings to put back if this process panics while stdin is raw.
static SAVED: std::sync::Mutex<Option<Termios>> = std::sync::Mutex::new(None);

fn restore_on_panic() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(saved) = SAVED.try_lock()
                && let Some(t) = saved.as_ref()
            {
                let _ = termios::tcsetattr(io::stdin(), SetArg::TCSANOW, t);
            }
            previous(info);
        }));
    });
}

impl RawStdin {
    /// Puts stdin in raw mode; `None` when it is not a terminal.
    pub fn enable() -> Option<Self> {
        let stdin = io::stdin().as_fd().try_clone_to_owned().ok()?;
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        restore_on_panic();
        if let Ok(mut s) = SAVED.lock() {
            *s = Some(saved.clone());
        }
        if termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            if let Ok(mut s) = SAVED.lock() {
                *s = None;
            }
            return None;
        }
        Some(RawStdin { stdin, saved })
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(&self.stdin, SetArg::TCSANOW, &self.saved);
        if let Ok(mut s) = SAVED.lock() {
            *s = None;
        }
    }
}

nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);
nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, libc::winsize);

/// The window size of the terminal `tty`.
pub fn window_size(tty: &impl AsRawFd) -> nix::Result<libc::winsize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `size`, which lives for the call.
    unsafe { tiocgwinsz(tty.as_raw_fd(), &mut size) }?;
    Ok(size)
}

/// Sets the window size of the terminal `tty` (a master or a slave).
/// Sets the terminal's size to `rows` by `cols` (the resize a client asks for).
pub fn set_rows_cols(tty: &impl AsRawFd, rows: u16, cols: u16) -> nix::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    set_window_size(tty, &size)
}

pub fn set_window_size(tty: &impl AsRawFd, size: &libc::winsize) -> nix::Result<()> {
    // SAFETY: TIOCSWINSZ reads one `winsize` from `size`, which lives for the call.
    unsafe { tiocswinsz(tty.as_raw_fd(), size) }?;
    Ok(())
}
