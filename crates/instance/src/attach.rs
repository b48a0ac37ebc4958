//! Input into a running instance: the supervisor of an instance made with `stdin` (`-i`) or a
//! `tty` (`-t`) listens on `attach.sock` in the instance directory (0600, root's), and
//! whoever attaches — `cela run -i/-t`, `cela attach`, the Docker API's attach and resize —
//! sends it framed input there. Output does not travel this way: every attached reader
//! follows the instance's log ([`crate::log`]), so any number of them see the same output and
//! none of them can hold the workload up.
//!
//! The frames are [`cela_vmm::input`]'s: [`Input::Data`] (bytes for the workload's stdin, or
//! its terminal), [`Input::Eof`] (stdin ends: the pipe is closed, so the workload reads
//! end-of-file; a terminal ignores it, as a terminal has no end), and [`Input::Resize`] (rows
//! and columns, for the terminal). A microVM's console takes the same frames from its
//! supervisor. A frame longer than [`MAX_FRAME`] or of an unknown kind ends the connection.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{InstanceError, IoContext};
use crate::record::{Instance, Status};

pub use cela_vmm::input::{Input, MAX_FRAME};

/// Where input goes in the supervisor.
pub enum Sink {
    /// The write end of the workload's stdin pipe (closed at the first [`Input::Eof`]).
    Pipe(Option<File>),
    /// The master of the workload's terminal.
    Terminal(File),
    /// A microVM's console: every frame, resizes included, goes on as a frame to the
    /// monitor (`cela_vmm::ConsoleMode::Framed`), which passes sizes to the guest's init.
    Framed(File),
}

/// How many frames wait for a workload that does not read its input before the connections
/// sending them are held back.
const QUEUED: usize = 16;

/// The sink's two halves: data and end-of-input go, in order, through a bounded queue to one
/// writer thread (a write that blocks on a workload not reading holds up only the senders of
/// data); resizes go straight to the terminal, so they are never stuck behind data.
struct Feed {
    data: std::sync::mpsc::SyncSender<Input>,
    terminal: Option<File>,
    /// A framed sink's newest size, written by the writer before its next frame.
    framed: Option<Arc<NewestSize>>,
    /// The sink takes no more (the workload's stdin has ended, or it has gone): senders are
    /// told, and their connections end.
    broken: Arc<std::sync::atomic::AtomicBool>,
}

impl Feed {
    fn start(sink: Sink) -> io::Result<Feed> {
        let terminal = match &sink {
            Sink::Terminal(t) => Some(t.try_clone()?),
            Sink::Pipe(_) | Sink::Framed(_) => None,
        };
        let framed = matches!(sink, Sink::Framed(_)).then(|| Arc::new(Mutex::new(None)));
        let (data, queue) = std::sync::mpsc::sync_channel::<Input>(QUEUED);
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let b = broken.clone();
        let size = framed.clone();
        std::thread::spawn(move || {
            let mut sink = sink;
            for input in queue {
                // A framed sink's newest size goes first; a resize in the queue only woke
                // this thread for it.
                let newest = size.as_ref().and_then(|s| lock(s).take());
                let mut result = Ok(());
                if let Some((rows, cols)) = newest {
                    result = sink.write(Input::Resize { rows, cols });
                }
                if size.is_none() || !matches!(input, Input::Resize { .. }) {
                    result = result.and_then(|()| sink.write(input));
                }
                // A broken sink takes nothing more; the queue is still drained, so no sender
                // waits on it.
                if result.is_err() {
                    b.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        Ok(Feed {
            data,
            terminal,
            framed,
            broken,
        })
    }

    fn take(&self, input: Input) -> io::Result<()> {
        match (input, &self.terminal) {
            (Input::Resize { rows, cols }, Some(t)) => resize(t, rows, cols),
            // A microVM's console: the newest size is kept for the writer, which is woken if
            // the queue has room; a resize never waits behind keys the guest has not read.
            (Input::Resize { rows, cols }, None) => {
                if let Some(slot) = &self.framed {
                    *lock(slot) = Some((rows, cols));
                    let _ = self.data.try_send(Input::Resize { rows, cols });
                }
                Ok(())
            }
            _ if self.broken.load(std::sync::atomic::Ordering::SeqCst) => {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            (input, _) => self
                .data
                .send(input)
                .map_err(|_| io::ErrorKind::BrokenPipe.into()),
        }
    }
}

/// The newest rows and columns asked of a framed sink, not yet written.
type NewestSize = Mutex<Option<(u16, u16)>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is one assignment: a poisoned lock holds a consistent value.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn resize(t: &File, rows: u16, cols: u16) -> io::Result<()> {
    cela_runtime::console::set_rows_cols(t, rows, cols).map_err(io::Error::from)
}

impl Sink {
    fn write(&mut self, input: Input) -> io::Result<()> {
        match (self, input) {
            (Sink::Pipe(Some(pipe)), Input::Data(d)) => pipe.write_all(&d),
            (Sink::Pipe(pipe), Input::Eof) => {
                pipe.take();
                Ok(())
            }
            // Stdin has ended: more data has nowhere to go.
            (Sink::Pipe(None), Input::Data(_)) => Err(io::ErrorKind::BrokenPipe.into()),
            (Sink::Pipe(_), Input::Resize { .. }) | (Sink::Terminal(_), Input::Eof) => Ok(()),
            (Sink::Terminal(t), Input::Data(d)) => t.write_all(&d),
            (Sink::Terminal(t), Input::Resize { rows, cols }) => resize(t, rows, cols),
            (Sink::Framed(f), input) => f.write_all(&input.encode()),
        }
    }
}

impl Instance {
    /// The socket an attached client sends input to.
    pub fn attach_path(&self) -> PathBuf {
        self.dir.join("attach.sock")
    }
}

/// Listens on the instance's attach socket and hands every connection's input to `sink`, on
/// threads of their own, for as long as the supervisor lives. Input of several connections
/// interleaves frame by frame.
pub fn serve(inst: &Instance, sink: Sink) -> Result<(), InstanceError> {
    let path = inst.attach_path();
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).doing(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .doing(|| format!("making {} root's", path.display()))?;
    let feed = Arc::new(Feed::start(sink).doing(|| "sharing the workload's input".into())?);
    std::thread::spawn(move || {
        loop {
            let conn = match listener.accept() {
                Ok((conn, _)) => conn,
                // Out of descriptors or memory for now: wait a little rather than spin.
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let feed = feed.clone();
            // Out of threads for now: the connection is refused (closed), not the supervisor.
            let _ = std::thread::Builder::new().spawn(move || {
                let mut conn = io::BufReader::new(conn);
                while let Ok(Some(input)) = Input::read(&mut conn) {
                    if feed.take(input).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// A connection to a running instance's attach socket.
pub struct Attached {
    conn: UnixStream,
}

impl Attached {
    /// Sends `input`; data longer than a frame goes as several.
    pub fn send(&mut self, input: &Input) -> io::Result<()> {
        match input {
            Input::Data(d) if d.len() > MAX_FRAME => {
                for piece in d.chunks(MAX_FRAME) {
                    self.conn.write_all(&Input::Data(piece.to_vec()).encode())?;
                }
                Ok(())
            }
            _ => self.conn.write_all(&input.encode()),
        }
    }

    pub fn as_raw_fd(&self) -> i32 {
        self.conn.as_raw_fd()
    }
}

/// Connects to the attach socket of `inst`, waiting (at most `bound`) while its supervisor is
/// still starting. An instance made without `stdin` or `tty` has no socket: an error says so.
pub fn connect(inst: &Instance, bound: Duration) -> Result<Attached, InstanceError> {
    if !inst.config.stdin && !inst.config.tty {
        return Err(InstanceError::Invalid(format!(
            "instance {} was made without stdin or a terminal: there is nothing to attach input to",
            inst.name()
        )));
    }
    let path = inst.attach_path();
    let start = Instant::now();
    loop {
        match UnixStream::connect(&path) {
            Ok(conn) => return Ok(Attached { conn }),
            Err(e) => {
                let state = inst.state()?;
                if matches!(state.status, Status::Exited | Status::Crashed) {
                    return Err(InstanceError::WrongState {
                        name: inst.name().to_owned(),
                        status: state.status.to_string(),
                        hint: "attaching needs a running instance",
                    });
                }
                if start.elapsed() >= bound {
                    return Err(InstanceError::Io {
                        what: format!("connecting to {}", path.display()),
                        source: e,
                    });
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parses Docker's `--detach-keys` syntax: comma-separated `ctrl-X` (X a letter, `@`, `[`,
/// `\`, `]`, `^`, `_`) or single characters; empty turns detaching off.
pub fn parse_detach_keys(s: &str) -> Result<Vec<u8>, InstanceError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|k| {
            if let Some(c) = k.strip_prefix("ctrl-") {
                match c.as_bytes() {
                    [b @ b'a'..=b'z'] => Ok(b - b'a' + 1),
                    [b @ (b'@' | b'[' | b'\\' | b']' | b'^' | b'_')] => Ok(b - b'@'),
                    _ => Err(InstanceError::Invalid(format!(
                        "detach keys {s:?}: unknown key {k:?}"
                    ))),
                }
            } else if k.len() == 1 && k.is_ascii() {
                Ok(k.as_bytes()[0])
            } else {
                Err(InstanceError::Invalid(format!(
                    "detach keys {s:?}: {k:?} is not a key (ctrl-X or one character)"
                )))
            }
        })
        .collect()
}

/// Watches a byte stream for the detach sequence, across reads.
pub struct DetachWatch<'a> {
    keys: &'a [u8],
    /// How many of the keys the stream's last bytes match (always fewer than all).
    matched: usize,
}

impl<'a> DetachWatch<'a> {
    pub fn new(keys: &'a [u8]) -> Self {
        DetachWatch { keys, matched: 0 }
    }

    /// The bytes to pass on from `data` (a partly matched sequence is held back until it
    /// fails to match), and whether the whole sequence was typed.
    pub fn feed(&mut self, data: &[u8]) -> (Vec<u8>, bool) {
        if self.keys.is_empty() {
            return (data.to_vec(), false);
        }
        let mut out = Vec::with_capacity(data.len());
        for &b in data {
            if b == self.keys[self.matched] {
                self.matched += 1;
                if self.matched == self.keys.len() {
                    self.matched = 0;
                    return (out, true);
                }
                continue;
            }
            // The held bytes and this one: what stays held is their longest end that
            // begins the sequence (sequences like "a a b" overlap themselves); the rest
            // goes on.
            let mut pending = self.keys[..self.matched].to_vec();
            pending.push(b);
            let keep = (1..pending.len().min(self.keys.len()))
                .rev()
                .find(|&k| pending[pending.len() - k..] == self.keys[..k])
                .unwrap_or(0);
            out.extend_from_slice(&pending[..pending.len() - keep]);
            self.matched = keep;
        }
        (out, false)
    }

    /// The bytes held back at the end of the input (a sequence begun but never finished).
    pub fn finish(&mut self) -> Vec<u8> {
        let held = self.keys[..self.matched].to_vec();
        self.matched = 0;
        held
    }
}

/// The supervisor's stdin pipe for a workload made with `stdin`: the read end (the
/// workload's fd 0) and the write end (the sink), both close-on-exec.
pub fn stdin_pipe() -> Result<(OwnedFd, File), InstanceError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(io::Error::from)
        .doing(|| "making the stdin pipe".into())?;
    Ok((r, File::from(w)))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn a_pipe_sink_ends_at_eof() {
        let (r, w) = stdin_pipe().unwrap();
        let mut sink = Sink::Pipe(Some(w));
        sink.write(Input::Data(b"abc".to_vec())).unwrap();
        sink.write(Input::Resize { rows: 1, cols: 1 }).unwrap();
        sink.write(Input::Eof).unwrap();
        assert!(sink.write(Input::Data(b"late".to_vec())).is_err());
        let mut got = String::new();
        File::from(r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "abc");
    }

    /// A microVM's console that is not reading: resizes return at once (the newest kept), and
    /// once it reads, the data comes in order with the newest size.
    #[test]
    fn a_framed_console_never_holds_a_resize_behind_unread_keys() {
        let (r, w) = stdin_pipe().unwrap();
        let feed = Feed::start(Sink::Framed(w)).unwrap();
        // More than the pipe holds: the writer blocks on the second frame.
        for _ in 0..2 {
            feed.take(Input::Data(vec![b'k'; 60_000])).unwrap();
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let resizer = std::thread::spawn(move || {
            for n in 1..=1000u16 {
                feed.take(Input::Resize { rows: n, cols: n }).unwrap();
            }
            done_tx.send(()).unwrap();
            feed
        });
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("resizes waited for the console to read");
        let feed = resizer.join().unwrap();
        let reader = std::thread::spawn(move || {
            let mut r = io::BufReader::new(File::from(r));
            let mut frames = Vec::new();
            while let Some(f) = Input::read(&mut r).unwrap() {
                frames.push(f);
            }
            frames
        });
        drop(feed);
        let frames = reader.join().unwrap();
        let data: usize = frames
            .iter()
            .map(|f| match f {
                Input::Data(d) => d.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(data, 120_000);
        let sizes: Vec<_> = frames
            .iter()
            .filter(|f| matches!(f, Input::Resize { .. }))
            .collect();
        assert!((1..=QUEUED + 1).contains(&sizes.len()), "{}", sizes.len());
        assert_eq!(
            sizes.last(),
            Some(&&Input::Resize {
                rows: 1000,
                cols: 1000
            })
        );
    }

    #[test]
    fn detach_keys_parse_as_docker_does() {
        assert_eq!(parse_detach_keys("ctrl-p,ctrl-q").unwrap(), [16, 17]);
        assert_eq!(parse_detach_keys("ctrl-@,a").unwrap(), [0, b'a']);
        assert!(parse_detach_keys("ctrl-1").is_err());
        assert!(parse_detach_keys("ab").is_err());
        assert!(parse_detach_keys("").unwrap().is_empty());
    }

    #[test]
    fn the_detach_sequence_is_found_across_reads_and_held_back_until_it_fails() {
        let keys = [16u8, 17];
        let mut w = DetachWatch::new(&keys);
        assert_eq!(w.feed(b"ab\x10"), (b"ab".to_vec(), false));
        assert_eq!(w.feed(b"x"), (b"\x10x".to_vec(), false));
        assert_eq!(w.feed(b"\x10"), (vec![], false));
        assert_eq!(w.feed(b"\x11rest"), (vec![], true));
        let mut w = DetachWatch::new(&keys);
        assert_eq!(w.feed(b"\x10\x10\x11"), (b"\x10".to_vec(), true));
        // A sequence that overlaps itself: "aab" in "aaab" leaves one "a" before it.
        let mut w = DetachWatch::new(b"aab");
        assert_eq!(w.feed(b"a"), (vec![], false));
        assert_eq!(w.feed(b"aab"), (b"a".to_vec(), true));
        let mut w = DetachWatch::new(b"abac");
        assert_eq!(w.feed(b"ababac"), (b"ab".to_vec(), true));
        // Input that ends inside the sequence gives the held bytes back.
        let mut w = DetachWatch::new(&keys);
        assert_eq!(w.feed(b"x\x10"), (b"x".to_vec(), false));
        assert_eq!(w.finish(), b"\x10");
        assert!(w.finish().is_empty());
    }

    #[test]
    fn a_stalled_workload_does_not_hold_resizes_up() {
        let pty = nix::pty::openpty(None, None).unwrap();
        // Raw, as a container's terminal: a canonical one would drop what overflows a line
        // and never block the writer.
        let mut t = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &t).unwrap();
        let feed = Feed::start(Sink::Terminal(File::from(pty.master))).unwrap();
        // Nobody reads the terminal: data fills it and the writer blocks; then the queue
        // fills too. A resize still goes through at once.
        let mut sent = 0;
        loop {
            match feed.data.try_send(Input::Data(vec![b'x'; 4096])) {
                Ok(()) => sent += 1,
                Err(std::sync::mpsc::TrySendError::Full(_)) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(sent < 10_000, "the terminal never filled");
        }
        feed.take(Input::Resize { rows: 33, cols: 77 }).unwrap();
        let size = cela_runtime::console::window_size(&pty.slave).unwrap();
        assert_eq!((size.ws_row, size.ws_col), (33, 77));
    }
}
