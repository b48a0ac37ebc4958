//! An instance's output log (`output.log`): the workload's stdout and stderr as they arrive,
//! interleaved in arrival order and kept apart, as Docker's json-file log does, in a compact
//! binary framing: each record is one kind byte, a little-endian u32 length, then that many
//! bytes. Output records are kinds 0x11 (stdout) and 0x12 (stderr), whose bytes start with
//! the time they arrived (little-endian i64 nanoseconds since the epoch, for `logs
//! --timestamps`); kinds 1 and 2 are the same without a time (logs written before times were
//! kept). When a run ends, the supervisor appends an end record
//! (stream byte 3, a JSON [`LogEnd`]), so a reader learns how the run ended even when the
//! instance removes itself right after (`--rm`, the Docker API's `AutoRemove`). The supervisor appends ([`pump`]); `cela logs` and a
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

/// The kind byte of an end record.
const END: u8 = 3;
/// Added to a stream's byte for a record that starts with its arrival time.
const TIMED: u8 = 0x10;

/// One piece of output as the log kept it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub stream: Stream,
    /// When it arrived, in nanoseconds since the epoch (absent in old logs).
    pub time: Option<i64>,
    pub data: &'a [u8],
}

/// How a run ended, as its end record says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogEnd {
    /// The workload's status (128+N for signal N); absent when it could not run.
    pub exit_code: Option<i32>,
    /// Why it could not run or ended abnormally.
    pub error: Option<String>,
}

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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let mut timed = Vec::with_capacity(8 + data.len());
        timed.extend_from_slice(&now.to_le_bytes());
        timed.extend_from_slice(data);
        self.record(stream as u8 | TIMED, &timed)
    }

    /// Appends the end record of a run.
    pub fn end(&mut self, end: &LogEnd) -> io::Result<()> {
        self.record(
            END,
            &serde_json::to_vec(end).expect("an end record serializes"),
        )
    }

    fn record(&mut self, kind: u8, data: &[u8]) -> io::Result<()> {
        let mut record = Vec::with_capacity(HEADER + data.len());
        record.push(kind);
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
    end: Option<LogEnd>,
}

impl LogReader {
    pub fn open(path: &Path) -> io::Result<LogReader> {
        Ok(LogReader {
            file: File::open(path)?,
            pending: Vec::new(),
            chunk: vec![0u8; 64 * 1024],
            end: None,
        })
    }

    /// A reader of what is appended from now on (the next run's output and end).
    pub fn open_at_end(path: &Path) -> io::Result<LogReader> {
        let mut reader = LogReader::open(path)?;
        io::Seek::seek(&mut reader.file, io::SeekFrom::End(0))?;
        Ok(reader)
    }

    /// The last end record read: how the run whose output was read last ended.
    pub fn end(&self) -> Option<&LogEnd> {
        self.end.as_ref()
    }

    /// Hands every complete output record written so far to `out` as stream and bytes;
    /// returns whether there was any. A record being written stays pending until it is whole.
    pub fn read_available(&mut self, mut out: impl FnMut(Stream, &[u8])) -> io::Result<bool> {
        self.read_records(|r| out(r.stream, r.data))
    }

    /// [`LogReader::read_available`] with each record's arrival time.
    pub fn read_records(&mut self, mut out: impl FnMut(Record<'_>)) -> io::Result<bool> {
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
            let data = &self.pending[at + HEADER..at + HEADER + len];
            match self.pending[at] {
                END => self.end = serde_json::from_slice(data).ok(),
                kind => {
                    // A new run's output follows an end record when the instance restarts.
                    self.end = None;
                    let stream = if kind & !TIMED == 2 {
                        Stream::Stderr
                    } else {
                        Stream::Stdout
                    };
                    let (time, data) = match data.split_first_chunk::<8>() {
                        Some((t, rest)) if kind & TIMED != 0 => {
                            (Some(i64::from_le_bytes(*t)), rest)
                        }
                        _ => (None, data),
                    };
                    out(Record { stream, time, data });
                    any = true;
                }
            }
            at += HEADER + len;
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
        // Half a record (of the untimed kind old logs have): nothing until the rest arrives.
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(&[1, 3, 0, 0, 0, b'a']).unwrap();
        assert!(!r.read_available(|_, _| panic!("partial")).unwrap());
        raw.write_all(b"bc").unwrap();
        let mut got = Vec::new();
        r.read_available(|s, d| got.push((s, d.to_vec()))).unwrap();
        assert_eq!(got, [(Stream::Stdout, b"abc".to_vec())]);
        // An end record is no output; it is kept until more output comes.
        let end = LogEnd {
            exit_code: Some(3),
            error: None,
        };
        w.end(&end).unwrap();
        let mut later = LogReader::open_at_end(&path).unwrap();
        assert!(!r.read_available(|_, _| panic!("no output")).unwrap());
        assert_eq!(r.end(), Some(&end));
        w.write(Stream::Stderr, b"again").unwrap();
        r.read_available(|_, _| {}).unwrap();
        assert_eq!(r.end(), None);
        let mut got = Vec::new();
        later
            .read_available(|s, d| got.push((s, d.to_vec())))
            .unwrap();
        assert_eq!(got, [(Stream::Stderr, b"again".to_vec())]);
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
