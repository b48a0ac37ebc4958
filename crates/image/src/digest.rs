//! Content digests (OCI image spec, "Digests"): `sha256:<64 lowercase hex>`, the only algorithm
//! cela stores, and [`Hasher`], which counts and hashes bytes as they stream past so a blob is
//! verified while it is written, never after it is trusted.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::ImageError;

/// A sha256 content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex digits, as image listings show.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(Sha256::digest(bytes)),
        }
    }

    /// The digest and length of everything `r` yields.
    pub fn of_reader(mut r: impl Read) -> io::Result<(Digest, u64)> {
        let mut h = Hasher::new(io::sink());
        io::copy(&mut r, &mut h)?;
        Ok(h.finish())
    }
}

impl FromStr for Digest {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ImageError::BadDigest {
            input: s.to_owned(),
            why: why.to_owned(),
        };
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| bad("expected ALGORITHM:HEX"))?;
        if alg != "sha256" {
            return Err(bad("only sha256 digests are supported"));
        }
        if hex.len() != 64 {
            return Err(bad("a sha256 digest has 64 hex digits"));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad("a sha256 digest is lowercase hex"));
        }
        Ok(Digest {
            hex: hex.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A writer that hashes and counts what passes through it to an inner writer.
pub struct Hasher<W> {
    inner: W,
    sha: Sha256,
    len: u64,
}

impl<W: Write> Hasher<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Hasher {
            inner,
            sha: Sha256::new(),
            len: 0,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest and length of everything written.
    pub fn finish(self) -> (Digest, u64) {
        self.finish_into().0
    }

    /// The digest and length, and the inner writer back.
    pub fn finish_into(self) -> ((Digest, u64), W) {
        let d = Digest {
            hex: hex::encode(self.sha.finalize()),
        };
        ((d, self.len), self.inner)
    }
}

impl<W: Write> Write for Hasher<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Checks a digest and a length against what was announced; `what` names the content in the
/// error ("layer 2 of 127.0.0.1:5000/busybox:latest").
pub fn verify(
    what: &str,
    expected: &Digest,
    expected_size: Option<u64>,
    actual: &Digest,
    actual_size: u64,
) -> Result<(), ImageError> {
    if let Some(size) = expected_size
        && size != actual_size
    {
        return Err(ImageError::SizeMismatch {
            what: what.to_owned(),
            expected: size,
            actual: actual_size,
        });
    }
    if expected != actual {
        return Err(ImageError::DigestMismatch {
            what: what.to_owned(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_known_content() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY);
        let (d, n) = Digest::of_reader(&b"hello"[..]).unwrap();
        assert_eq!(n, 5);
        assert_eq!(
            d.hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }

    #[test]
    fn parse_accepts_only_lowercase_sha256() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.short(), "e3b0c44298fc");
        for bad in [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0",
            "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            let e = bad.parse::<Digest>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn verification_names_size_then_digest_mismatches() {
        let good = Digest::of(b"abc");
        let other = Digest::of(b"abd");
        verify("blob", &good, Some(3), &good, 3).unwrap();
        let e = verify("layer 1", &good, Some(3), &good, 2).unwrap_err();
        assert!(matches!(
            e,
            ImageError::SizeMismatch {
                expected: 3,
                actual: 2,
                ..
            }
        ));
        let e = verify("layer 1", &good, Some(3), &other, 3).unwrap_err();
        assert!(e.to_string().contains("layer 1"), "{e}");
        assert!(matches!(e, ImageError::DigestMismatch { .. }));
    }

    #[test]
    fn hasher_passes_bytes_through() {
        let mut h = Hasher::new(Vec::new());
        h.write_all(b"hel").unwrap();
        h.write_all(b"lo").unwrap();
        assert_eq!(h.len(), 5);
        let ((d, n), out) = h.finish_into();
        assert_eq!((n, out.as_slice()), (5, &b"hello"[..]));
        assert_eq!(d, Digest::of(b"hello"));
    }
}
