//! The digest of a snapshot's file, `sha256-blocks:HEX`: SHA-256 over the file's 4 KiB blocks
//! that are not all zero, each after its index (u64, little-endian), then the file's length
//! (u64, little-endian). Every block but the last is [`BLOCK`] bytes, so the length fixes
//! where each hashed block ends and the encoding is unambiguous.
//!
//! Why not the SHA-256 of the bytes: a snapshot's RAM and disk files are mostly zeros (a guest
//! of 1 GiB that touched 60 MiB), and hashing every zero byte was most of what a snapshot and
//! its export cost (SHA-256 runs at a few hundred MB/s at best). Zero blocks cost a compare
//! here, and a file's holes are skipped without being read ([`of_file`], `SEEK_DATA`), so the
//! cost follows the data a file holds, not its size. The digest depends on the bytes alone —
//! written zeros and a hole give the same one — so a copy made sparse or not (an archive, an
//! import) keeps its digest. It says a file is whole, as any SHA-256 does; it is no signature.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use sha2::{Digest as _, Sha256};

/// The block size the digest is taken over.
pub const BLOCK: usize = 4096;
/// What a digest's text starts with.
const PREFIX: &str = "sha256-blocks:";

/// A block digest; shown (and stored in a manifest) as `sha256-blocks:` and 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDigest {
    hex: String,
}

impl BlockDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> BlockDigest {
        let mut h = BlockHasher::new(io::sink());
        h.update(bytes);
        h.finish().0
    }

    /// Parses the text form; `None` unless it is exactly the prefix and 64 lower-case hex
    /// digits.
    pub fn parse(text: &str) -> Option<BlockDigest> {
        let hex = text.strip_prefix(PREFIX)?;
        (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then(
            || BlockDigest {
                hex: hex.to_owned(),
            },
        )
    }
}

impl fmt::Display for BlockDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex)
    }
}

/// A writer that takes the block digest and length of what passes through it to `inner`.
pub struct BlockHasher<W> {
    inner: W,
    sha: Sha256,
    /// The block being filled (`fill` bytes of it).
    block: Box<[u8; BLOCK]>,
    fill: usize,
    /// The index of the block being filled.
    index: u64,
    len: u64,
}

impl<W: Write> BlockHasher<W> {
    pub fn new(inner: W) -> Self {
        BlockHasher {
            inner,
            sha: Sha256::new(),
            block: Box::new([0; BLOCK]),
            fill: 0,
            index: 0,
            len: 0,
        }
    }

    /// Hashes `bytes` (without writing them to the inner writer).
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            if self.fill == 0 && bytes.len() >= BLOCK {
                let (whole, rest) = bytes.split_at(BLOCK);
                take_block(&mut self.sha, self.index, whole);
                self.index += 1;
                bytes = rest;
                continue;
            }
            let n = (BLOCK - self.fill).min(bytes.len());
            self.block[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == BLOCK {
                take_block(&mut self.sha, self.index, &self.block[..]);
                self.index += 1;
                self.fill = 0;
            }
        }
    }

    /// Hashes `n` zero bytes (a hole) without touching most of them.
    pub fn zeros(&mut self, mut n: u64) {
        if self.fill > 0 {
            let k = ((BLOCK - self.fill) as u64).min(n) as usize;
            self.update(&[0u8; BLOCK][..k]);
            n -= k as u64;
        }
        // At a block boundary now (or `n` is 0): whole zero blocks are only counted.
        let whole = n / BLOCK as u64;
        self.index += whole;
        self.len += whole * BLOCK as u64;
        let rest = (n % BLOCK as u64) as usize;
        self.update(&[0u8; BLOCK][..rest]);
    }

    /// The digest and length of everything hashed.
    pub fn finish(self) -> (BlockDigest, u64) {
        self.finish_into().0
    }

    /// The digest and length, and the inner writer back.
    pub fn finish_into(mut self) -> ((BlockDigest, u64), W) {
        if self.fill > 0 {
            take_block(&mut self.sha, self.index, &self.block[..self.fill]);
        }
        self.sha.update(self.len.to_le_bytes());
        let digest = BlockDigest {
            hex: hex::encode(self.sha.finalize()),
        };
        ((digest, self.len), self.inner)
    }
}

/// Hashes block `index` unless it is all zeros.
fn take_block(sha: &mut Sha256, index: u64, block: &[u8]) {
    if block.iter().any(|&b| b != 0) {
        sha.update(index.to_le_bytes());
        sha.update(block);
    }
}

impl<W: Write> Write for BlockHasher<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The block digest and length of `file`, reading only its data: its holes (`SEEK_DATA` /
/// `SEEK_HOLE`; a file system without them reports the whole file as data) are zeros.
pub fn of_file(file: &File) -> io::Result<(BlockDigest, u64)> {
    use nix::unistd::{Whence, lseek};
    let len = file.metadata()?.len();
    let mut h = BlockHasher::new(io::sink());
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let data = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(d) => (d as u64).min(len),
            // No data after `pos`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => len,
            Err(e) => return Err(e.into()),
        };
        h.zeros(data - pos);
        pos = data;
        if pos == len {
            break;
        }
        let hole = lseek(file, pos as i64, Whence::SeekHole)
            .map(|h| (h as u64).clamp(pos + 1, len))
            .unwrap_or(len);
        while pos < hole {
            let want = ((hole - pos) as usize).min(buf.len());
            let n = file.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was read",
                ));
            }
            h.update(&buf[..n]);
            pos += n as u64;
        }
    }
    // A hole at the end reads as "no data" (ENXIO) whether the file kept its length or lost
    // it meanwhile: the length decides.
    if file.metadata()?.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file changed length while it was read",
        ));
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes with `data` written at each offset, holes elsewhere.
    fn sparse(len: u64, data: &[(u64, &[u8])]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        for (at, bytes) in data {
            f.as_file().write_all_at(bytes, *at).unwrap();
        }
        f
    }

    #[test]
    fn holes_and_written_zeros_give_the_same_digest() {
        let mut flat = vec![0u8; 5 * BLOCK + 100];
        flat[BLOCK + 7] = 1;
        flat[4 * BLOCK + 99] = 2;
        flat[5 * BLOCK + 50] = 3;
        let want = BlockDigest::of(&flat);
        // The same bytes as a sparse file, and written out whole.
        let holes = sparse(
            flat.len() as u64,
            &[
                (BLOCK as u64 + 7, &[1]),
                (4 * BLOCK as u64 + 99, &[2]),
                (5 * BLOCK as u64 + 50, &[3]),
            ],
        );
        assert_eq!(
            of_file(holes.as_file()).unwrap(),
            (want.clone(), flat.len() as u64)
        );
        let whole = sparse(0, &[(0, &flat)]);
        assert_eq!(of_file(whole.as_file()).unwrap().0, want);
        // Fed in odd pieces, with a hole in the middle of a block.
        let mut h = BlockHasher::new(io::sink());
        h.update(&flat[..3]);
        h.zeros(BLOCK as u64 + 4);
        h.update(&flat[BLOCK + 7..2 * BLOCK + 1]);
        h.zeros((4 * BLOCK + 99 - (2 * BLOCK + 1)) as u64);
        h.update(&flat[4 * BLOCK + 99..]);
        assert_eq!(h.finish(), (want, flat.len() as u64));
    }

    #[test]
    fn any_change_of_a_byte_or_the_length_changes_it() {
        let mut a = vec![0u8; 3 * BLOCK];
        a[10] = 9;
        let d = BlockDigest::of(&a);
        let mut moved = vec![0u8; 3 * BLOCK];
        moved[BLOCK + 10] = 9;
        assert_ne!(BlockDigest::of(&moved), d, "a block moved to another index");
        assert_ne!(
            BlockDigest::of(&a[..3 * BLOCK - 1]),
            d,
            "a trailing zero cut"
        );
        let mut longer = a.clone();
        longer.push(0);
        assert_ne!(BlockDigest::of(&longer), d, "a zero added");
        a[3 * BLOCK - 1] = 1;
        assert_ne!(BlockDigest::of(&a), d);
        assert_ne!(BlockDigest::of(&[]), BlockDigest::of(&[0]));
    }

    #[test]
    fn the_text_form_round_trips_and_nothing_else_parses() {
        let d = BlockDigest::of(b"x");
        let text = d.to_string();
        assert!(text.starts_with("sha256-blocks:"), "{text}");
        assert_eq!(BlockDigest::parse(&text), Some(d));
        let hex = "a".repeat(64);
        for bad in [
            format!("sha256:{hex}"),
            format!("sha256-blocks:{}", "A".repeat(64)),
            format!("sha256-blocks:{}", "a".repeat(63)),
            "sha256-blocks:".to_owned(),
        ] {
            assert_eq!(BlockDigest::parse(&bad), None, "{bad}");
        }
    }
}
