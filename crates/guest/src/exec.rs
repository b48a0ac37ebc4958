//! The exec protocol: how `cela exec` runs a command in a running microVM.
//!
//! The init starts an agent that listens on the guest's vsock port
//! [`crate::VSOCK_AGENT_PORT`]. The host connects (through the VM's `--vsock` socket, with
//! `CONNECT <port>`), and each connection runs exactly one command:
//!
//! ```text
//! host                                   guest agent
//!   Start {argv, env, workdir, user, tty} ──▶  starts the command (or answers Stderr + Exit)
//!   Stdin bytes … StdinEnd ──▶                 to the command's standard input
//!   Resize rows cols, Signal n ──▶             to its terminal / to the command
//!            ◀── Stdout bytes, Stderr bytes    its output (a terminal's all comes as Stdout)
//!            ◀── Exit status                   once it ended and its output is all sent;
//!                                              then the agent closes the connection
//! ```
//!
//! Every message is a *frame*: one kind byte, the payload length as a little-endian `u32`, and
//! the payload (at most [`MAX_PAYLOAD`] bytes). Both ends treat the other's frames as
//! untrusted: an unknown kind, an oversized or malformed payload is an error naming the
//! problem, never a panic.

use std::io::{self, Read, Write};

/// The largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 1 << 20;

const START: u8 = 1;
const STDIN: u8 = 2;
const STDIN_END: u8 = 3;
const RESIZE: u8 = 4;
const SIGNAL: u8 = 5;
const STDOUT: u8 = 16;
const STDERR: u8 = 17;
const EXIT: u8 = 18;

/// Field tags inside a [`Start`] payload: each field is a tag byte, a `u32` length and bytes.
const FIELD_ARG: u8 = b'a';
const FIELD_ENV: u8 = b'e';
const FIELD_WORKDIR: u8 = b'w';
const FIELD_USER: u8 = b'u';
const FIELD_TTY: u8 = b't';

/// What to run: the first frame of every connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Start {
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries on top of the guest workload's defaults.
    pub env: Vec<String>,
    /// Absolute; `None` is the workload's working directory (`/` unless the image says).
    pub workdir: Option<String>,
    /// `USER[:GROUP]`; `None` is root.
    pub user: Option<String>,
    /// A pseudo-terminal of this size (rows, columns) for the command; `None`: pipes.
    pub tty: Option<(u16, u16)>,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Start(Start),
    Stdin(Vec<u8>),
    StdinEnd,
    Resize {
        rows: u16,
        cols: u16,
    },
    Signal(i32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command's status as a shell reports it (128 + N for signal N).
    Exit(i32),
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn put_field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl Start {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for a in &self.argv {
            put_field(&mut out, FIELD_ARG, a.as_bytes());
        }
        for e in &self.env {
            put_field(&mut out, FIELD_ENV, e.as_bytes());
        }
        if let Some(w) = &self.workdir {
            put_field(&mut out, FIELD_WORKDIR, w.as_bytes());
        }
        if let Some(u) = &self.user {
            put_field(&mut out, FIELD_USER, u.as_bytes());
        }
        if let Some((rows, cols)) = self.tty {
            let mut size = rows.to_le_bytes().to_vec();
            size.extend_from_slice(&cols.to_le_bytes());
            put_field(&mut out, FIELD_TTY, &size);
        }
        out
    }

    fn decode(mut b: &[u8]) -> io::Result<Self> {
        let mut start = Start::default();
        while !b.is_empty() {
            if b.len() < 5 {
                return Err(invalid("exec start: a truncated field"));
            }
            let tag = b[0];
            let len = u32::from_le_bytes([b[1], b[2], b[3], b[4]]) as usize;
            let value = b
                .get(5..5 + len)
                .ok_or_else(|| invalid("exec start: a field longer than the frame"))?;
            b = &b[5 + len..];
            let text = || {
                std::str::from_utf8(value)
                    .ok()
                    .filter(|t| !t.contains('\0'))
                    .map(str::to_owned)
                    .ok_or_else(|| invalid("exec start: a field is not UTF-8 text without NUL"))
            };
            match tag {
                FIELD_ARG => start.argv.push(text()?),
                FIELD_ENV => start.env.push(text()?),
                FIELD_WORKDIR => start.workdir = Some(text()?),
                FIELD_USER => start.user = Some(text()?),
                FIELD_TTY => {
                    let [r0, r1, c0, c1] = value else {
                        return Err(invalid("exec start: a terminal size is 4 bytes"));
                    };
                    start.tty = Some((
                        u16::from_le_bytes([*r0, *r1]),
                        u16::from_le_bytes([*c0, *c1]),
                    ));
                }
                other => return Err(invalid(format!("exec start: unknown field {other:#04x}"))),
            }
        }
        if start.argv.is_empty() {
            return Err(invalid("exec start: no command"));
        }
        Ok(start)
    }
}

impl Frame {
    fn kind_and_payload(&self) -> (u8, std::borrow::Cow<'_, [u8]>) {
        use std::borrow::Cow;
        match self {
            Frame::Start(s) => (START, Cow::Owned(s.encode())),
            Frame::Stdin(d) => (STDIN, Cow::Borrowed(d)),
            Frame::StdinEnd => (STDIN_END, Cow::Borrowed(&[])),
            Frame::Resize { rows, cols } => {
                let mut b = rows.to_le_bytes().to_vec();
                b.extend_from_slice(&cols.to_le_bytes());
                (RESIZE, Cow::Owned(b))
            }
            Frame::Signal(n) => (SIGNAL, Cow::Owned(n.to_le_bytes().to_vec())),
            Frame::Stdout(d) => (STDOUT, Cow::Borrowed(d)),
            Frame::Stderr(d) => (STDERR, Cow::Borrowed(d)),
            Frame::Exit(n) => (EXIT, Cow::Owned(n.to_le_bytes().to_vec())),
        }
    }

    /// Writes the frame as one `write_all` (header and payload together), so frames written
    /// by several threads under one lock never interleave.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let (kind, payload) = self.kind_and_payload();
        if payload.len() > MAX_PAYLOAD {
            return Err(invalid(format!(
                "a frame of {} bytes is over the {MAX_PAYLOAD}-byte limit",
                payload.len()
            )));
        }
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.push(kind);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&payload);
        w.write_all(&buf)
    }

    /// Reads the next frame; `Ok(None)` at a clean end of stream (between frames).
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut head = [0u8; 5];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(invalid("the stream ended inside a frame header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(invalid(format!(
                "a frame of {len} bytes is over the {MAX_PAYLOAD}-byte limit"
            )));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                invalid("the stream ended inside a frame")
            } else {
                e
            }
        })?;
        Self::decode(head[0], payload).map(Some)
    }

    fn decode(kind: u8, payload: Vec<u8>) -> io::Result<Frame> {
        let int = |p: &[u8]| -> io::Result<i32> {
            let b: [u8; 4] = p
                .try_into()
                .map_err(|_| invalid(format!("frame kind {kind}: expected 4 bytes")))?;
            Ok(i32::from_le_bytes(b))
        };
        Ok(match kind {
            START => Frame::Start(Start::decode(&payload)?),
            STDIN => Frame::Stdin(payload),
            STDIN_END => Frame::StdinEnd,
            RESIZE => {
                let [r0, r1, c0, c1] = payload[..] else {
                    return Err(invalid("a resize frame is 4 bytes"));
                };
                Frame::Resize {
                    rows: u16::from_le_bytes([r0, r1]),
                    cols: u16::from_le_bytes([c0, c1]),
                }
            }
            SIGNAL => Frame::Signal(int(&payload)?),
            STDOUT => Frame::Stdout(payload),
            STDERR => Frame::Stderr(payload),
            EXIT => Frame::Exit(int(&payload)?),
            other => return Err(invalid(format!("unknown frame kind {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame) {
        let mut buf = Vec::new();
        frame.write_to(&mut buf).unwrap();
        let mut r = &buf[..];
        assert_eq!(Frame::read_from(&mut r).unwrap(), Some(frame));
        assert_eq!(Frame::read_from(&mut r).unwrap(), None);
    }

    #[test]
    fn every_frame_round_trips() {
        round_trip(Frame::Start(Start {
            argv: vec!["sh".into(), "-c".into(), "echo 'a b'".into()],
            env: vec!["A=1".into()],
            workdir: Some("/srv".into()),
            user: Some("nobody:nogroup".into()),
            tty: Some((30, 100)),
        }));
        round_trip(Frame::Start(Start {
            argv: vec!["true".into()],
            ..Start::default()
        }));
        round_trip(Frame::Stdin(b"\0\xff data".to_vec()));
        round_trip(Frame::StdinEnd);
        round_trip(Frame::Resize {
            rows: 1,
            cols: 65535,
        });
        round_trip(Frame::Signal(15));
        round_trip(Frame::Stdout(vec![7; 1000]));
        round_trip(Frame::Stderr(Vec::new()));
        round_trip(Frame::Exit(-1));
    }

    #[test]
    fn malformed_frames_are_named_errors() {
        let err = |bytes: &[u8]| Frame::read_from(&mut &bytes[..]).unwrap_err().to_string();
        assert!(err(&[99, 0, 0, 0, 0]).contains("unknown frame kind 99"));
        assert!(err(&[STDOUT, 0, 0, 0x20, 0]).contains("over the"));
        assert!(err(&[STDOUT, 4, 0, 0]).contains("header"));
        assert!(err(&[STDOUT, 4, 0, 0, 0, 1]).contains("inside a frame"));
        assert!(err(&[EXIT, 1, 0, 0, 0, 1]).contains("4 bytes"));
        assert!(err(&[RESIZE, 0, 0, 0, 0]).contains("resize"));
        assert!(err(&[START, 0, 0, 0, 0]).contains("no command"));
        assert!(err(&[START, 3, 0, 0, 0, b'a', 9, 0]).contains("truncated"));
        assert!(err(&[START, 6, 0, 0, 0, b'a', 9, 0, 0, 0, b'x']).contains("longer"));
        assert!(err(&[START, 6, 0, 0, 0, b'z', 1, 0, 0, 0, b'x']).contains("unknown field"));
        assert!(err(&[START, 6, 0, 0, 0, b'a', 1, 0, 0, 0, 0xff]).contains("UTF-8"));
        assert!(err(&[START, 6, 0, 0, 0, b't', 1, 0, 0, 0, 1]).contains("terminal size"));
    }
}
