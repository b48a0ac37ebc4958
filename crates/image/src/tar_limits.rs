//! Bounds on a tar stream from an untrusted source, enforced while the `tar` crate reads it.
//!
//! The `tar` crate reads the data of a PAX extended header (`x`) and of a GNU long name or
//! long link (`L`, `K`) whole into memory, however large its header says it is: a few MB of
//! gzip holding one 4 GiB "long name" make the root process that unpacks it allocate 4 GiB.
//! Go's archive/tar (Docker's, containerd's) refuses such entries over 1 MiB; so does cela.
//! And decompression has no natural end: a 1 GB gzip of zeros inflates to a terabyte, so a
//! layer may be held to a byte budget (the free space of the file system it is unpacked to).
//!
//! [`Limited`] sits between the (decompressed) bytes and `tar::Archive` and follows the stream
//! block by block exactly as the `tar` crate walks it: a 512-byte header; its data rounded up
//! to 512 bytes, where a PAX `size` record overrides the size of the next real entry; the
//! extension blocks of a GNU sparse entry, which come between its header and its data; the end
//! at the first all-zero header. It never changes a byte; it only stops reading with an error
//! ([`LimitError`]) when a limit is passed. A header it cannot parse is left to `tar` to
//! refuse: from then on it only counts bytes.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};

/// The largest PAX header or GNU long name/link accepted, as Go's archive/tar.
pub const MAX_SPECIAL: u64 = 1 << 20;

const BLOCK: usize = 512;

/// Room kept free on the store's file system when decompressing or unpacking.
pub const RESERVE: u64 = 256 << 20;

/// The bytes that may still be written on the file system of `dir` (free to unprivileged
/// writers) keeping [`RESERVE`] free.
pub fn room(dir: impl std::os::fd::AsFd) -> io::Result<u64> {
    let st = rustix::fs::fstatvfs(dir)?;
    Ok(st
        .f_bavail
        .saturating_mul(st.f_frsize)
        .saturating_sub(RESERVE))
}

/// Why a tar stream was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// A PAX header or GNU long name/link larger than [`MAX_SPECIAL`].
    Special { kind: &'static str, size: u64 },
    /// More bytes than the budget.
    Budget { budget: u64 },
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitError::Special { kind, size } => write!(
                f,
                "it holds a {kind} of {size} bytes (at most {MAX_SPECIAL} are accepted)"
            ),
            LimitError::Budget { budget } => write!(
                f,
                "it unpacks to more than {budget} bytes, more than the store's file system has \
                 free (a decompression bomb, or too little space)"
            ),
        }
    }
}

impl std::error::Error for LimitError {}

impl LimitError {
    /// The limit an I/O error from a [`Limited`] reader reports, if it is one.
    pub fn of(e: &io::Error) -> Option<&LimitError> {
        e.get_ref()?.downcast_ref::<LimitError>()
    }
}

/// Where the reader is in the stream.
#[derive(Debug)]
enum State {
    /// Collecting a 512-byte header.
    Header {
        buf: Box<[u8; BLOCK]>,
        filled: usize,
    },
    /// Collecting the extension blocks of a GNU sparse entry, then its data.
    SparseExt {
        buf: Box<[u8; BLOCK]>,
        filled: usize,
        data: u64,
    },
    /// Inside an entry's data (padding included); `pax` collects a PAX header's records.
    /// `pax` is what has come of the PAX header's data, and its size without the padding.
    Data {
        left: u64,
        pax: Option<(Vec<u8>, u64)>,
    },
    /// Past the end, or past a header `tar` will refuse: bytes are only counted.
    Free,
}

/// A reader that enforces the limits of the module documentation on `inner`.
pub struct Limited<R> {
    inner: R,
    state: State,
    /// The size a PAX `size` record gives the next real entry.
    pax_size: Option<u64>,
    read: u64,
    budget: Option<u64>,
}

impl<R> Limited<R> {
    /// `inner`, held to the tar limits and, if given, to `budget` bytes in all.
    pub fn new(inner: R, budget: Option<u64>) -> Limited<R> {
        Limited {
            inner,
            state: header(),
            pax_size: None,
            read: 0,
            budget,
        }
    }

    /// Follows `bytes`, the next bytes of the stream.
    fn follow(&mut self, mut bytes: &[u8]) -> Result<(), LimitError> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Header { buf, filled } | State::SparseExt { buf, filled, .. } => {
                    let n = (BLOCK - *filled).min(bytes.len());
                    buf[*filled..*filled + n].copy_from_slice(&bytes[..n]);
                    *filled += n;
                    bytes = &bytes[n..];
                    if *filled == BLOCK {
                        self.block_done()?;
                    }
                }
                State::Data { left, pax } => {
                    let n = (*left).min(bytes.len() as u64) as usize;
                    if let Some((p, _)) = pax {
                        p.extend_from_slice(&bytes[..n]);
                    }
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        if let Some((mut p, size)) = pax.take() {
                            p.truncate(size as usize);
                            self.pax_size = pax_size(&p);
                        }
                        self.state = header();
                    }
                }
                State::Free => return Ok(()),
            }
        }
        Ok(())
    }

    /// A whole header or sparse extension block has been collected.
    fn block_done(&mut self) -> Result<(), LimitError> {
        let state = std::mem::replace(&mut self.state, State::Free);
        self.state = match state {
            State::Header { buf, .. } => self.after_header(&buf)?,
            State::SparseExt { buf, data, .. } => {
                if buf[504] != 0 {
                    State::SparseExt {
                        buf,
                        filled: 0,
                        data,
                    }
                } else {
                    data_state(data, false)
                }
            }
            other => other,
        };
        Ok(())
    }

    /// What follows the header `h`.
    fn after_header(&mut self, h: &[u8; BLOCK]) -> Result<State, LimitError> {
        if h.iter().all(|b| *b == 0) || !checksum_ok(h) {
            return Ok(State::Free);
        }
        let Some(mut size) = header_size(&h[124..136]) else {
            return Ok(State::Free);
        };
        let kind = match h[156] {
            b'x' => Some("PAX extended header"),
            b'g' => Some("PAX global header"),
            b'L' => Some("GNU long name"),
            b'K' => Some("GNU long link name"),
            _ => None,
        };
        if let Some(kind) = kind {
            if size > MAX_SPECIAL {
                return Err(LimitError::Special { kind, size });
            }
            if h[156] == b'g' {
                // `tar` hands a global header out as an entry, which takes the pending PAX
                // records without their size.
                self.pax_size = None;
            }
            return Ok(data_state(size, h[156] == b'x'));
        }
        if let Some(s) = self.pax_size.take() {
            size = s;
        }
        let gnu = &h[257..265] == b"ustar  \0";
        if h[156] == b'S' && gnu && h[482] != 0 {
            return Ok(State::SparseExt {
                buf: Box::new([0; BLOCK]),
                filled: 0,
                data: size,
            });
        }
        Ok(data_state(size, false))
    }

    fn count(&mut self, n: u64) -> io::Result<()> {
        self.read = self.read.saturating_add(n);
        match self.budget {
            Some(budget) if self.read > budget => {
                Err(io::Error::other(LimitError::Budget { budget }))
            }
            _ => Ok(()),
        }
    }
}

fn header() -> State {
    State::Header {
        buf: Box::new([0; BLOCK]),
        filled: 0,
    }
}

/// The data of `size` bytes, padded to a whole block.
fn data_state(size: u64, pax: bool) -> State {
    let left = size.div_ceil(BLOCK as u64).saturating_mul(BLOCK as u64);
    if left == 0 {
        header() // an empty PAX header sets nothing
    } else {
        State::Data {
            left,
            pax: pax.then(|| (Vec::new(), size)),
        }
    }
}

/// Whether the header's checksum field matches its bytes (the field counted as spaces).
fn checksum_ok(h: &[u8; BLOCK]) -> bool {
    let sum: u32 = h[..148]
        .iter()
        .chain(&h[156..])
        .map(|b| u32::from(*b))
        .sum::<u32>()
        + 8 * 32;
    header_size(&h[148..156]) == Some(u64::from(sum))
}

/// A numeric header field: octal digits (spaces and NULs around them), or base-256 when the
/// first byte has its top bit set.
fn header_size(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(v);
    }
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c| c == ' ' || c == '\0');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// The `size` record of PAX header data (`LEN key=value` records, one a line), read as the
/// `tar` crate reads it: the first `size` record counts, and a malformed record before it
/// means none.
fn pax_size(data: &[u8]) -> Option<u64> {
    for line in data.split(|b| *b == b'\n') {
        if line.is_empty() {
            return None;
        }
        let space = line.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&line[..space]).ok()?.parse().ok()?;
        if line.len() + 1 != len {
            return None;
        }
        let record = &line[space + 1..];
        let eq = record.iter().position(|b| *b == b'=')?;
        if &record[..eq] == b"size" {
            return std::str::from_utf8(&record[eq + 1..]).ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.count(n as u64)?;
        self.follow(&out[..n]).map_err(io::Error::other)?;
        Ok(n)
    }
}

/// Seeking forward over data (what `tar::Archive::entries_with_seek` does to skip an entry's
/// data) is followed; any other seek leaves the stream to `tar` alone.
impl<R: Read + Seek> Seek for Limited<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let skipped = match (&mut self.state, pos) {
            // `tar` seeks by the distance to the next header before reading each one: 0 when
            // the data was read.
            (_, SeekFrom::Current(0)) => Some(0),
            (State::Data { left, pax: None }, SeekFrom::Current(n))
                if n >= 0 && n as u64 <= *left =>
            {
                Some(n as u64)
            }
            _ => None,
        };
        let at = self.inner.seek(pos)?;
        match skipped {
            Some(0) => {}
            Some(n) => {
                if let State::Data { left, .. } = &mut self.state {
                    *left -= n;
                    if *left == 0 {
                        self.state = header();
                    }
                }
            }
            None => self.state = State::Free,
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar whose entries are built by the `tar` crate, with raw headers where needed.
    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    }

    /// An entry of type `kind` with `size` bytes of data (`fill`).
    fn special(b: &mut tar::Builder<Vec<u8>>, kind: u8, size: usize, fill: u8) {
        let mut h = tar::Header::new_gnu();
        h.set_size(size as u64);
        h.set_entry_type(tar::EntryType::new(kind));
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"././@Long");
        h.set_cksum();
        b.append(&h, std::io::repeat(fill).take(size as u64))
            .unwrap();
    }

    /// Reads `bytes` through `Limited` and `tar`, in small reads, returning each entry's path
    /// and data.
    fn read_all(bytes: &[u8], budget: Option<u64>) -> io::Result<Vec<(String, Vec<u8>)>> {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = out.len().min(self.0.len()).min(7);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut a = tar::Archive::new(Limited::new(Trickle(bytes), budget));
        let mut out = Vec::new();
        for e in a.entries()? {
            let mut e = e?;
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            out.push((e.path()?.display().to_string(), data));
        }
        Ok(out)
    }

    #[test]
    fn ordinary_archives_pass_unchanged() {
        let long = "d/".repeat(200) + "file";
        let bytes = archive(|b| {
            file(b, "a", b"hello");
            file(b, &long, b"long name");
            // A PAX header (long link name) before an entry.
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "l", "t/".repeat(100)).unwrap();
            file(b, "empty", b"");
            file(b, "z", &[7u8; 1500]);
        });
        let got = read_all(&bytes, None).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", long.as_str(), "l", "empty", "z"]);
        assert_eq!(got[4].1, vec![7u8; 1500]);
        // The budget is the whole stream: exactly enough passes, one byte less does not.
        assert!(read_all(&bytes, Some(bytes.len() as u64)).is_ok());
    }

    #[test]
    fn oversized_long_names_and_pax_headers_are_refused() {
        for (kind, name) in [
            (b'L', "GNU long name"),
            (b'K', "GNU long link name"),
            (b'x', "PAX extended header"),
            (b'g', "PAX global header"),
        ] {
            let bytes = archive(|b| {
                file(b, "first", b"x");
                special(b, kind, MAX_SPECIAL as usize + 1, b'a');
                file(b, "after", b"y");
            });
            let e = read_all(&bytes, None).unwrap_err();
            assert_eq!(
                LimitError::of(&e),
                Some(&LimitError::Special {
                    kind: name,
                    size: MAX_SPECIAL + 1
                }),
                "{e}"
            );
        }
        // At the limit, a long name is read (and `tar` uses it).
        let bytes = archive(|b| {
            special(b, b'L', 4096, b'n');
            file(b, "short", b"z");
        });
        let got = read_all(&bytes, None).unwrap();
        assert_eq!(got[0].0, "n".repeat(4096));
    }

    #[test]
    fn a_pax_size_record_is_followed_to_the_next_header() {
        // `size=` in a PAX header overrides the entry's own size field (here 0): the data
        // that follows is 600 bytes, and the entry after it is a 2 MiB long name, refused.
        let mut bytes = archive(|b| {
            let rec = "12 size=600\n";
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(rec.len() as u64);
            h.set_cksum();
            b.append(&h, rec.as_bytes()).unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_path("big").unwrap();
            h.set_size(0);
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        });
        // Place the 600 bytes (two blocks) after the entry's header, before the end blocks.
        let end = bytes.len() - 1024;
        bytes.truncate(end);
        bytes.extend_from_slice(&[b'A'; 1024]);
        let tail = archive(|b| special(b, b'L', 2 << 20, b'n'));
        bytes.extend_from_slice(&tail);
        let e = read_all(&bytes, None).unwrap_err();
        assert!(
            matches!(
                LimitError::of(&e),
                Some(LimitError::Special {
                    kind: "GNU long name",
                    ..
                })
            ),
            "{e}"
        );
    }

    #[test]
    fn a_budget_stops_a_decompression_bomb() {
        let bytes = archive(|b| file(b, "zeros", &vec![0u8; 1 << 20]));
        let e = read_all(&bytes, Some(64 << 10)).unwrap_err();
        assert_eq!(
            LimitError::of(&e),
            Some(&LimitError::Budget { budget: 64 << 10 })
        );
    }

    #[test]
    fn seeking_over_data_is_followed() {
        let bytes = archive(|b| {
            file(b, "a", &[1u8; 5000]);
            special(b, b'L', 2 << 20, b'n');
            file(b, "b", b"x");
        });
        let mut a = tar::Archive::new(Limited::new(io::Cursor::new(bytes), None));
        let mut seen = Vec::new();
        let mut err = None;
        for e in a.entries_with_seek().unwrap() {
            match e {
                Ok(e) => seen.push(e.path().unwrap().display().to_string()),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert_eq!(seen, ["a"]);
        let e = err.expect("the long name is refused");
        assert!(LimitError::of(&e).is_some(), "{e}");
    }
}
