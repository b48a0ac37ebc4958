//! The monitor's control connection: requests from the process that started a machine (an
//! instance's supervisor) to cela's running, jailed KVM monitor. The connection is one end of
//! a socket pair the caller made before the monitor was forked; the monitor's end is the only
//! way in, so whoever holds the other end is the caller.
//!
//! The monitor first says `"running"` once the machine runs (booted, or restored: a caller
//! restoring learns here that the state was taken). Then one JSON line per request, one per
//! reply, in turn:
//!
//! | request | reply | what the monitor does |
//! |---|---|---|
//! | `"pause"` | `"paused"` | parks every vCPU (each saving its state) and the device loop |
//! | `"save"` + two descriptors | `{"saved":{"state_bytes":N,"memory_bytes":M}}` | writes the paused machine: state to the first file, RAM to the second |
//! | `"status"` | `"paused"` | nothing: an error if the machine is not held paused any more (it was stopped) |
//! | `"resume"` | `"resumed"` | the machine runs on |
//! | `"end"` | `"ended"` | the machine stops as saved ([`crate::GuestExit::Snapshotted`]) |
//! | `{"hosts":[["ADDR","NAME"],…]}` | `"sent"` | passes the guest its hosts file ([`cela_guest::HostRequest::hosts_block`]); an error if the guest cannot take it now (paused, its channel full) |
//!
//! Any failure is `{"error":"…"}` and leaves the machine as it was (paused stays paused until
//! `resume` or `end`). The files of a save are opened by the caller, outside the jail, and
//! passed with the request (SCM_RIGHTS); the monitor opens nothing. A caller that goes away
//! with the machine paused resumes it; so does a caller whose request failed halfway (a reply
//! that did not come in time): it shuts the connection down rather than read a late reply as
//! the answer to its next request.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::persist::machine::{MachineSaver, Saved};
use crate::seccomp::{Filters, ThreadKind};

/// The longest line either side reads: a hosts file of [`cela_guest::MAX_HOSTS`] names.
const MAX_LINE: usize = 128 << 10;

/// A request to the monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Pause,
    /// Comes with two descriptors: the state file, then the memory file.
    Save,
    Status,
    Resume,
    End,
    /// The names of the instances on the guest's networks, for its `/etc/hosts`.
    Hosts(Vec<(std::net::Ipv4Addr, String)>),
}

/// The monitor's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Unasked, first: the machine runs.
    Running,
    Paused,
    Saved(Saved),
    Resumed,
    Ended,
    Sent,
    Error(String),
}

/// Why a request to the monitor failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("talking to the monitor: {0}")]
    Io(#[from] io::Error),
    #[error(
        "the monitor's control connection closed (the monitor ended, or an earlier request failed)"
    )]
    Closed,
    #[error("the monitor did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("the monitor answered {0:?}")]
    Unexpected(String),
    #[error("the monitor: {0}")]
    Refused(String),
}

/// Reads one line of at most [`MAX_LINE`] bytes, with the descriptors that came with it.
fn read_line(stream: &UnixStream, want_fds: bool) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut buf = [0u8; 512];
        let mut cmsg = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            want_fds.then_some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors in this process for
                // this message; nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        if n == 0 {
            return Ok(None);
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            return Ok(Some((line, fds)));
        }
        if line.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a control line longer than 128 KiB",
            ));
        }
    }
}

fn write_line(stream: &UnixStream, value: &impl Serialize, fds: &[RawFd]) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).expect("control messages serialize");
    line.push(b'\n');
    if fds.is_empty() {
        // A long line (a hosts file) may go in parts; a signal cannot cut it short, and a
        // peer that is gone is an error, not SIGPIPE.
        let mut rest = &line[..];
        while !rest.is_empty() {
            match nix::sys::socket::send(stream.as_raw_fd(), rest, MsgFlags::MSG_NOSIGNAL) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(());
    }
    let iov = [IoSlice::new(&line)];
    let rights = [ControlMessage::ScmRights(fds)];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        &rights,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if sent != line.len() {
        // A line this short goes into a Unix stream socket whole, unless it is closing.
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "a short control write",
        ));
    }
    Ok(())
}

/// Serves the control connection `stream` on a thread of its own (under the control filter)
/// for as long as the machine whose parts `saver` holds runs.
pub fn spawn(
    stream: UnixStream,
    saver: Arc<MachineSaver>,
    filters: Option<Filters>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            crate::seccomp::confine_thread(filters.as_ref(), ThreadKind::Control);
            serve(&stream, &saver);
        })
        .map(drop)
}

fn serve(stream: &UnixStream, saver: &MachineSaver) {
    if write_line(stream, &Reply::Running, &[]).is_err() {
        return;
    }
    let mut paused = None;
    loop {
        let (line, fds) = match read_line(stream, true) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        let reply = match serde_json::from_slice::<Request>(&line) {
            Err(e) => Reply::Error(format!("a malformed request: {e}")),
            Ok(Request::Pause) if paused.is_some() => Reply::Paused,
            Ok(Request::Pause) => match saver.pause() {
                Ok(vcpus) => {
                    paused = Some(vcpus);
                    Reply::Paused
                }
                Err(e) => Reply::Error(e.to_string()),
            },
            Ok(Request::Save) => match (paused.take(), <[OwnedFd; 2]>::try_from(fds)) {
                (None, _) => Reply::Error("save: the machine is not paused".into()),
                (Some(v), Err(_)) => {
                    paused = Some(v);
                    Reply::Error(
                        "save: it takes two descriptors, the state and memory files".into(),
                    )
                }
                (Some(vcpus), Ok([state, memory])) => {
                    // The vCPU states go into the file; a second save needs a second pause.
                    let (state, memory) = (File::from(state), File::from(memory));
                    match saver.save(vcpus, &state, &memory) {
                        Ok(saved) => Reply::Saved(saved),
                        Err(e) => Reply::Error(e.to_string()),
                    }
                }
            },
            Ok(Request::Status) if saver.is_paused() => Reply::Paused,
            Ok(Request::Status) => {
                Reply::Error("the machine is no longer paused (it was stopped)".into())
            }
            Ok(Request::Resume) => {
                paused = None;
                saver.resume();
                Reply::Resumed
            }
            Ok(Request::Hosts(entries)) => {
                let (block, refused) = cela_guest::HostRequest::hosts_block(&entries);
                if !refused.is_empty() {
                    tracing::warn!("names a guest cannot take, left out: {refused:?}");
                }
                if saver.send_to_guest(block) {
                    Reply::Sent
                } else {
                    Reply::Error("the guest cannot take its hosts file now".into())
                }
            }
            Ok(Request::End) => {
                // Answered first: the stop closes this connection.
                let _ = write_line(stream, &Reply::Ended, &[]);
                saver.end();
                return;
            }
        };
        if write_line(stream, &reply, &[]).is_err() {
            break;
        }
    }
    // The caller went away: a paused machine runs on rather than hang.
    saver.resume();
}

/// How long the caller waits for an answer (a save writes guest RAM).
const REPLY_BOUND: Duration = Duration::from_secs(600);

/// The caller's end of a monitor's control connection.
pub struct MonitorControl {
    stream: UnixStream,
    /// Held from a request's write to its reply's read: callers on several threads (a
    /// snapshot, the hosts file) each get their own answer.
    turn: std::sync::Mutex<()>,
    /// A request failed halfway: the connection is shut down and takes no more.
    broken: std::sync::atomic::AtomicBool,
}

impl MonitorControl {
    /// A connected pair: this end, and the descriptor to hand the monitor
    /// ([`crate::KvmOptions::control`]).
    pub fn pair() -> io::Result<(MonitorControl, OwnedFd)> {
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_read_timeout(Some(REPLY_BOUND))?;
        Ok((
            MonitorControl {
                stream: ours,
                turn: Default::default(),
                broken: Default::default(),
            },
            theirs.into(),
        ))
    }

    /// Waits for the monitor to say the machine runs; an error if it ends first.
    pub fn wait_running(&self) -> Result<(), ControlError> {
        match self.reply()? {
            Reply::Running => Ok(()),
            r => Err(ControlError::Unexpected(format!("{r:?}"))),
        }
    }

    fn call(&self, request: &Request, fds: &[RawFd]) -> Result<Reply, ControlError> {
        let _turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ControlError::Closed);
        }
        let answer = write_line(&self.stream, request, fds)
            .map_err(ControlError::from)
            .and_then(|()| self.reply());
        if let Err(e) = &answer
            && !matches!(e, ControlError::Refused(_))
        {
            // Out of step with the monitor now: a late reply would answer the next request.
            // Shut down, the monitor resumes a paused machine when it sees the end.
            self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
        answer
    }

    fn reply(&self) -> Result<Reply, ControlError> {
        let line = match read_line(&self.stream, false) {
            Ok(Some((line, _))) => line,
            Ok(None) => return Err(ControlError::Closed),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ControlError::TimedOut(REPLY_BOUND));
            }
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice::<Reply>(&line) {
            Ok(Reply::Error(e)) => Err(ControlError::Refused(e)),
            Ok(r) => Ok(r),
            Err(_) => Err(ControlError::Unexpected(
                String::from_utf8_lossy(&line).into_owned(),
            )),
        }
    }

    /// Whether the machine is still held paused (not stopped since it was paused).
    pub fn status(&self) -> Result<(), ControlError> {
        self.expect(Request::Status, Reply::Paused)
    }

    fn expect(&self, request: Request, want: Reply) -> Result<(), ControlError> {
        match self.call(&request, &[])? {
            r if r == want => Ok(()),
            r => Err(ControlError::Unexpected(format!("{r:?}"))),
        }
    }

    pub fn pause(&self) -> Result<(), ControlError> {
        self.expect(Request::Pause, Reply::Paused)
    }

    /// Has the paused monitor write its state to `state` and its RAM to `memory`.
    pub fn save(&self, state: &File, memory: &File) -> Result<Saved, ControlError> {
        match self.call(&Request::Save, &[state.as_raw_fd(), memory.as_raw_fd()])? {
            Reply::Saved(s) => Ok(s),
            r => Err(ControlError::Unexpected(format!("{r:?}"))),
        }
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        self.expect(Request::Resume, Reply::Resumed)
    }

    pub fn end(&self) -> Result<(), ControlError> {
        self.expect(Request::End, Reply::Ended)
    }

    /// Passes the guest the names of the instances on its networks (its `/etc/hosts`).
    pub fn hosts(&self, entries: &[(std::net::Ipv4Addr, String)]) -> Result<(), ControlError> {
        self.expect(Request::Hosts(entries.to_vec()), Reply::Sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Seek as _, Write as _};

    #[test]
    fn the_largest_hosts_file_is_one_line() {
        let r = Request::Hosts(vec![("10.0.0.2".parse().unwrap(), "web".into())]);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"hosts":[["10.0.0.2","web"]]}"#
        );
        let big = Request::Hosts(
            (0..cela_guest::MAX_HOSTS as u32)
                .map(|i| (std::net::Ipv4Addr::from(0xfffe_0000 | i), "n".repeat(64)))
                .collect(),
        );
        assert!(serde_json::to_vec(&big).unwrap().len() < MAX_LINE);
    }

    #[test]
    fn a_line_carries_its_descriptors_and_a_long_one_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"passed").unwrap();
        write_line(&a, &Request::Save, &[file.as_raw_fd(), file.as_raw_fd()]).unwrap();
        let (line, fds) = read_line(&b, true).unwrap().unwrap();
        assert_eq!(
            serde_json::from_slice::<Request>(&line).unwrap(),
            Request::Save
        );
        assert_eq!(fds.len(), 2);
        let mut got = File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut text = String::new();
        got.read_to_string(&mut text).unwrap();
        assert_eq!(text, "passed");
        // Replies carry no descriptors, and lines end where the newline is.
        write_line(&b, &Reply::Running, &[]).unwrap();
        let (line, fds) = read_line(&a, false).unwrap().unwrap();
        assert_eq!(
            serde_json::from_slice::<Reply>(&line).unwrap(),
            Reply::Running
        );
        assert!(fds.is_empty());
        // A peer that never ends its line is cut off past MAX_LINE.
        let (a2, b2) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = (&a2).write_all(&vec![b'x'; MAX_LINE + 5000]);
        });
        assert!(read_line(&b2, true).is_err());
        drop(b2);
        writer.join().unwrap();
        drop(a);
        // A closed peer: no line.
        let (c, d) = UnixStream::pair().unwrap();
        drop(c);
        assert!(read_line(&d, true).unwrap().is_none());
    }
}
