//! A client of QMP, the QEMU Machine Protocol: JSON objects one per line over the monitor's
//! socket pair. After the greeting and `qmp_capabilities`, commands go out as
//! `{"execute", "arguments", "id"}` and replies (`return` or `error`, with the same `id`) come
//! back interleaved with events. One thread reads everything ([`QmpEvents::run`]): replies go to
//! the command waiting for them, events to a callback. Commands may come from any thread, one
//! at a time.
//!
//! Written here rather than taken from a crate: `qapi` generates bindings of QEMU's whole
//! schema and cannot send a file descriptor along with a command, which `getfd` needs
//! (SCM_RIGHTS on the same `sendmsg` as the command's bytes); `qmp` is async-only. The
//! monitor's end is QEMU's, running a guest's machine: every line read is bounded
//! ([`MAX_LINE`]), and its words that reach a message (an error's, the build's name) are made
//! one bounded printable line (fuzz target `qmp_monitor`).

use std::io::{self, BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde_json::{Value, json};

/// The longest line accepted from QEMU.
pub const MAX_LINE: usize = 1 << 20;
/// How long a command waits for its reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The QEMU a monitor belongs to, from its greeting.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QemuVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// The distribution's build, e.g. `Debian 1:7.2+dfsg-7+deb12u18+b3`.
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        // From QEMU's greeting, or an imported snapshot's manifest: shown printable only.
        if !self.package.trim().is_empty() {
            write!(f, " ({})", crate::jail::printable(self.package.trim()))?;
        }
        Ok(())
    }
}

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QEMU's monitor closed")]
    Closed,
    #[error("QEMU did not answer {command} within {secs} s")]
    TimedOut { command: String, secs: u64 },
    #[error("talking to QEMU's monitor: {0}")]
    Io(#[from] io::Error),
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU's monitor said something unexpected: {0}")]
    Protocol(String),
}

/// Reads one line of at most [`MAX_LINE`] bytes (without its newline); `None` at the end.
fn read_line(reader: &mut impl BufRead) -> Result<Option<Vec<u8>>, QmpError> {
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if buf.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(QmpError::Protocol("a line cut short".into()))
            };
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE {
            return Err(QmpError::Protocol(format!(
                "a line longer than {MAX_LINE} bytes"
            )));
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take + usize::from(done));
        if done {
            return Ok(Some(line));
        }
    }
}

fn parse(line: &[u8]) -> Result<Value, QmpError> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| QmpError::Protocol(format!("not JSON ({e})")))?;
    if !v.is_object() {
        return Err(QmpError::Protocol("not a JSON object".into()));
    }
    Ok(v)
}

/// The command half of a monitor connection.
pub struct Qmp {
    writer: Mutex<UnixStream>,
    replies: Mutex<Receiver<Value>>,
    next_id: AtomicU64,
    pub version: QemuVersion,
}

/// The reading half: run it on a thread of its own.
pub struct QmpEvents {
    reader: BufReader<UnixStream>,
    replies: SyncSender<Value>,
}

/// Replies kept for commands: one is awaited at a time, so more are a monitor talking out of
/// turn, and dropped.
const QUEUED_REPLIES: usize = 8;

impl Qmp {
    /// Reads the greeting and leaves capabilities negotiation. Events start after that; the
    /// returned [`QmpEvents`] must be run for commands to get their replies.
    pub fn connect(stream: UnixStream) -> Result<(Qmp, QmpEvents), QmpError> {
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let greeting = parse(&read_line(&mut reader)?.ok_or(QmpError::Closed)?)?;
        let Some(v) = greeting.get("QMP").and_then(|q| q.get("version")) else {
            return Err(QmpError::Protocol(format!(
                "a greeting without a version: {}",
                crate::jail::printable(&greeting.to_string())
            )));
        };
        let num = |k: &str| v["qemu"][k].as_u64().unwrap_or(0);
        let version = QemuVersion {
            major: num("major"),
            minor: num("minor"),
            micro: num("micro"),
            package: crate::jail::printable(v["package"].as_str().unwrap_or("")),
        };
        writer.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        loop {
            let reply = parse(&read_line(&mut reader)?.ok_or(QmpError::Closed)?)?;
            if let Some(e) = reply.get("error") {
                return Err(command_error("qmp_capabilities", e));
            }
            if reply.get("return").is_some() {
                break;
            }
        }
        let (tx, rx) = mpsc::sync_channel(QUEUED_REPLIES);
        Ok((
            Qmp {
                writer: Mutex::new(writer),
                replies: Mutex::new(rx),
                next_id: AtomicU64::new(1),
                version,
            },
            QmpEvents {
                reader,
                replies: tx,
            },
        ))
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.exchange(command, arguments, None)
    }

    /// Runs `command` with `fd` passed along (SCM_RIGHTS on the same message as the command:
    /// what `getfd` and `add-fd` take).
    pub fn execute_with_fd(
        &self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        self.exchange(command, Some(arguments), Some(fd.as_raw_fd()))
    }

    fn exchange(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<RawFd>,
    ) -> Result<Value, QmpError> {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let replies = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"execute": command, "id": id});
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).expect("JSON values serialize");
        line.push(b'\n');
        match fd {
            Some(fd) => {
                let fds = [fd];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                let iov = [IoSlice::new(&line)];
                let sent = sendmsg::<()>(
                    writer.as_raw_fd(),
                    &iov,
                    &cmsg,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)?;
                if sent != line.len() {
                    (&*writer).write_all(&line[sent..])?;
                }
            }
            None => (&*writer).write_all(&line)?,
        }
        loop {
            let reply = match replies.recv_timeout(REPLY_TIMEOUT) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(QmpError::TimedOut {
                        command: command.to_owned(),
                        secs: REPLY_TIMEOUT.as_secs(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => return Err(QmpError::Closed),
            };
            // A reply to an earlier command that timed out is not this one's.
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(e) = reply.get("error") {
                return Err(command_error(command, e));
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

/// QEMU's refusal of `command`. Its words are QEMU's, which runs a guest's machine: shown
/// only as one bounded line of printable characters (no escape of theirs reaches a terminal).
fn command_error(command: &str, e: &Value) -> QmpError {
    QmpError::Command {
        command: command.to_owned(),
        class: crate::jail::printable(e["class"].as_str().unwrap_or("?")),
        desc: crate::jail::printable(e["desc"].as_str().unwrap_or("no description")),
    }
}

impl QmpEvents {
    /// Reads until the monitor closes (or says something unreadable): replies go to the
    /// commands waiting for them, events (objects with `event`) to `on_event`.
    pub fn run(mut self, mut on_event: impl FnMut(&Value)) {
        loop {
            let line = match read_line(&mut self.reader) {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("QMP: {e}");
                    return;
                }
            };
            let Ok(v) = parse(&line) else {
                tracing::warn!("QMP: an unreadable line ({} bytes)", line.len());
                return;
            };
            tracing::trace!("QMP: {v}");
            if v.get("event").is_some() {
                on_event(&v);
            } else if v.get("return").is_some() || v.get("error").is_some() {
                let _ = self.replies.try_send(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsFd, OwnedFd};

    /// A fake QEMU on the far end of a socket pair, driven by `script`.
    fn fake(script: impl FnOnce(BufReader<UnixStream>, UnixStream) + Send + 'static) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let w = theirs.try_clone().unwrap();
            script(BufReader::new(theirs), w)
        });
        ours
    }

    const GREETING: &[u8] = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}
"#;

    fn expect_line(r: &mut BufReader<UnixStream>) -> Value {
        parse(&read_line(r).unwrap().unwrap()).unwrap()
    }

    #[test]
    fn commands_get_their_replies_between_events() {
        let sock = fake(|mut r, mut w| {
            w.write_all(GREETING).unwrap();
            assert_eq!(expect_line(&mut r)["execute"], "qmp_capabilities");
            w.write_all(b"{\"return\": {}}\n").unwrap();
            let cmd = expect_line(&mut r);
            assert_eq!(cmd["execute"], "query-status");
            let id = cmd["id"].clone();
            let reply = json!({"return": {"status": "running"}, "id": id});
            w.write_all(b"{\"event\": \"STOP\", \"data\": {}}\n")
                .unwrap();
            w.write_all(format!("{reply}\n").as_bytes()).unwrap();
            let cmd = expect_line(&mut r);
            let id = cmd["id"].clone();
            let reply = json!({"error": {"class": "GenericError", "desc": "no"}, "id": id});
            w.write_all(format!("{reply}\n").as_bytes()).unwrap();
        });
        let (qmp, events) = Qmp::connect(sock).unwrap();
        assert_eq!(
            qmp.version.to_string(),
            "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
        );
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || events.run(|e| tx.send(e["event"].clone()).unwrap()));
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running");
        assert_eq!(rx.recv().unwrap(), "STOP");
        let e = qmp.execute("cont", None).unwrap_err().to_string();
        assert_eq!(e, "QEMU refused cont: no (GenericError)");
        // The fake is gone: the next command finds the monitor closed.
        assert!(matches!(
            qmp.execute("cont", None),
            Err(QmpError::Closed | QmpError::Io(_))
        ));
    }

    #[test]
    fn a_file_descriptor_travels_with_its_command() {
        use nix::sys::socket::{ControlMessageOwned, recvmsg};
        let file = tempfile::tempfile().unwrap();
        let want = nix::sys::stat::fstat(file.as_fd()).unwrap().st_ino;
        let (tx, rx) = mpsc::channel();
        let sock = fake(move |mut r, mut w| {
            w.write_all(GREETING).unwrap();
            expect_line(&mut r);
            w.write_all(b"{\"return\": {}}\n").unwrap();
            let mut buf = vec![0u8; 4096];
            let mut space = nix::cmsg_space!([RawFd; 1]);
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                r.get_ref().as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .unwrap();
            let mut got = None;
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    // SAFETY: the descriptor was just received and is owned by nobody else.
                    got = Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) });
                }
            }
            let n = msg.bytes;
            let cmd = parse(buf[..n].strip_suffix(b"\n").unwrap()).unwrap();
            tx.send((cmd.clone(), got)).unwrap();
            w.write_all(format!("{}\n", json!({"return": {}, "id": cmd["id"]})).as_bytes())
                .unwrap();
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        let (qmp, events) = Qmp::connect(sock).unwrap();
        std::thread::spawn(move || events.run(|_| {}));
        qmp.execute_with_fd("getfd", json!({"fdname": "f"}), file.as_fd())
            .unwrap();
        let (cmd, fd) = rx.recv().unwrap();
        assert_eq!(cmd["arguments"]["fdname"], "f");
        let fd = fd.expect("no descriptor came with the command");
        assert_eq!(nix::sys::stat::fstat(fd.as_fd()).unwrap().st_ino, want);
    }

    #[test]
    fn a_hostile_monitor_is_bounded_and_named() {
        let sock = fake(|_, mut w| {
            w.write_all(b"{\"QMP\": {}}\n").unwrap();
        });
        let e = Qmp::connect(sock).err().unwrap().to_string();
        assert!(e.contains("without a version"), "{e}");
        let sock = fake(|_, mut w| {
            let long = vec![b'x'; MAX_LINE + 10];
            let _ = w.write_all(&long);
        });
        let e = Qmp::connect(sock).err().unwrap().to_string();
        assert!(e.contains("longer than"), "{e}");
        let sock = fake(|_, mut w| {
            w.write_all(b"[1,2]\n").unwrap();
        });
        let e = Qmp::connect(sock).err().unwrap().to_string();
        assert!(e.contains("not a JSON object"), "{e}");
        let sock = fake(|_, _| {});
        assert!(matches!(Qmp::connect(sock), Err(QmpError::Closed)));
    }
}
