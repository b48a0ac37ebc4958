//! An instance's output log (`output.log`): the workload's stdout and stderr as they arrive,
//! interleaved in arrival order and kept apart, as Docker's json-file log does, in a compact
//! binary framing: each record is one stream byte (1 stdout, 2 stderr), a little-endian u32
//! length, then that many bytes. The supervisor appends ([`pump`]); `cela logs` and a
//! foreground `cela run` read it back ([`LogReader`]), following it while the instance runs.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Which output stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout = 1,
    Stderr = 2,
}

const HEADER: usize = 5;

/// Appends records to a log.
pub struct LogWriter {
    file: File,
}

impl LogWriter {
    pub fn open(path: &Path) -> io::Result<LogWriter> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(LogWriter { file })
    }

    pub fn write(&mut self, stream: Stream, data: &[u8]) -> io::Result<()> {
        let mut record = Vec::with_capacity(HEADER + data.len());
        record.push(stream as u8);
        record.extend_from_slice(&(data.len() as u32).to_le_bytes());
        record.extend_from_slice(data);
        self.file.write_all(&record)
    }
}

/// Copies what arrives on `stdout` and `stderr` (pipe read ends) into `log` until both reach
/// end-of-file.
pub fn pump(stdout: OwnedFd, stderr: OwnedFd, mut log: LogWriter) -> io::Result<()> {
    let mut open = [Some(File::from(stdout)), Some(File::from(stderr))];
    let streams = [Stream::Stdout, Stream::Stderr];
    let mut buf = vec![0u8; 64 * 1024];
    while open.iter().any(Option::is_some) {
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd> = open
                .iter()
                .flatten()
                .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            fds.iter()
                .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
                .collect()
        };
        let mut ready = ready.into_iter();
        for (slot, stream) in open.iter_mut().zip(streams) {
            let Some(file) = slot else { continue };
            if !ready.next().unwrap_or(false) {
                continue;
            }
            match file.read(&mut buf) {
                Ok(0) => *slot = None,
                Ok(n) => log.write(stream, &buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Reads a log's records, from the start, as they become available.
pub struct LogReader {
    file: File,
    pending: Vec<u8>,
    chunk: Vec<u8>,
}

impl LogReader {
    pub fn open(path: &Path) -> io::Result<LogReader> {
        Ok(LogReader {
            file: File::open(path)?,
            pending: Vec::new(),
            chunk: vec![0u8; 64 * 1024],
        })
    }

    /// Hands every complete record written so far to `out`; returns whether there was any.
    /// A record being written stays pending until it is whole.
    pub fn read_available(&mut self, mut out: impl FnMut(Stream, &[u8])) -> io::Result<bool> {
        loop {
            let n = self.file.read(&mut self.chunk)?;
            if n == 0 {
                break;
            }
            self.pending.extend_from_slice(&self.chunk[..n]);
        }
        let mut at = 0;
        let mut any = false;
        while self.pending.len() - at >= HEADER {
            let len =
                u32::from_le_bytes(self.pending[at + 1..at + HEADER].try_into().unwrap()) as usize;
            if self.pending.len() - at - HEADER < len {
                break;
            }
            let stream = if self.pending[at] == 2 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            out(stream, &self.pending[at + HEADER..at + HEADER + len]);
            at += HEADER + len;
            any = true;
        }
        self.pending.drain(..at);
        Ok(any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_in_order_and_partial_records_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut w = LogWriter::open(&path).unwrap();
        w.write(Stream::Stdout, b"out1\n").unwrap();
        w.write(Stream::Stderr, b"err\n").unwrap();
        let mut r = LogReader::open(&path).unwrap();
        let mut got = Vec::new();
        r.read_available(|s, d| got.push((s, d.to_vec()))).unwrap();
        assert_eq!(
            got,
            [
                (Stream::Stdout, b"out1\n".to_vec()),
                (Stream::Stderr, b"err\n".to_vec())
            ]
        );
        // Half a record: nothing until the rest arrives.
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(&[1, 3, 0, 0, 0, b'a']).unwrap();
        assert!(!r.read_available(|_, _| panic!("partial")).unwrap());
        raw.write_all(b"bc").unwrap();
        let mut got = Vec::new();
        r.read_available(|s, d| got.push((s, d.to_vec()))).unwrap();
        assert_eq!(got, [(Stream::Stdout, b"abc".to_vec())]);
    }

    #[test]
    fn pump_keeps_streams_apart_until_both_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        let (err_r, err_w) = nix::unistd::pipe().unwrap();
        let w = LogWriter::open(&path).unwrap();
        let t = std::thread::spawn(move || pump(out_r, err_r, w));
        File::from(out_w).write_all(b"hello").unwrap();
        File::from(err_w).write_all(b"oops").unwrap();
        t.join().unwrap().unwrap();
        let mut got = Vec::new();
        LogReader::open(&path)
            .unwrap()
            .read_available(|s, d| got.push((s, d.to_vec())))
            .unwrap();
        got.sort_by_key(|(s, _)| *s as u8);
        assert_eq!(
            got,
            [
                (Stream::Stdout, b"hello".to_vec()),
                (Stream::Stderr, b"oops".to_vec())
            ]
        );
    }
}
