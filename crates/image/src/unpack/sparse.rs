//! Sparse files in layers, written with their holes as holes.
//!
//! GNU tar writes a sparse file in one of four ways:
//! * `--format=gnu`: an entry of type `S` whose header lists the data regions; the `tar` crate
//!   reads it back whole, holes as zeros, and [`copy_holey`] turns zero blocks back into holes.
//! * `--format=posix` (PAX), versions 0.0, 0.1 and 1.0 (the default): a regular-file entry whose
//!   PAX records (`GNU.sparse.*`) describe the map; the entry's data is the data regions one
//!   after another, preceded for 1.0 by the map itself as decimal lines padded to 512 bytes.
//!   The `tar` crate knows nothing of these, so a layer holding one would give a file named
//!   `GNUSparseFile.N/NAME` with the map in its bytes: [`PaxSparse`] reads the records, and
//!   [`PaxSparse::write`] lays the regions out at their offsets.
//!
//! A map is checked before anything is written: regions in order, not overlapping, inside the
//! file's size, and adding up to exactly the entry's data.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

/// The largest a sparse file may be, holes included. The `tar` crate hands a GNU sparse file
/// over as a stream with its holes as zeros, so a hostile size costs time to read through; and
/// a disk image in a layer is rarely larger.
pub const MAX_REAL_SIZE: u64 = 64 << 30;

/// The most regions one sparse file may have (a map of 16 MiB).
const MAX_REGIONS: usize = 1 << 20;
const BLOCK: u64 = 512;

/// A PAX sparse file's description, from its `GNU.sparse.*` records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaxSparse {
    /// The file's real name (`GNU.sparse.name`), when the header's name is a stand-in.
    pub name: Option<Vec<u8>>,
    /// The file's size, holes included.
    pub real_size: u64,
    /// The (offset, length) regions; `None` for format 1.0, where the map leads the data.
    map: Option<Vec<(u64, u64)>>,
}

fn num(key: &str, v: &[u8]) -> Result<u64, String> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("PAX record {key} is not a number"))
}

impl PaxSparse {
    /// Reads the sparse records among `records` (key, value); `None` if there are none.
    pub fn from_records<'a>(
        records: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Option<PaxSparse>, String> {
        let (mut major, mut name, mut size, mut map) = (None, None, None, None);
        let mut pairs: Vec<u64> = Vec::new();
        let mut any = false;
        for (key, v) in records {
            let Some(k) = key.strip_prefix("GNU.sparse.") else {
                continue;
            };
            any = true;
            match k {
                "major" => major = Some(num(key, v)?),
                "minor" | "numblocks" => {}
                "name" => name = Some(v.to_vec()),
                "realsize" | "size" => size = Some(num(key, v)?),
                "offset" | "numbytes" => {
                    if pairs.len() >= 2 * MAX_REGIONS {
                        return Err(format!("more than {MAX_REGIONS} sparse regions"));
                    }
                    pairs.push(num(key, v)?);
                }
                "map" => {
                    let s = std::str::from_utf8(v).map_err(|_| "GNU.sparse.map is not text")?;
                    let mut m = Vec::new();
                    for part in s.split(',').filter(|p| !p.is_empty()) {
                        if m.len() >= 2 * MAX_REGIONS {
                            return Err(format!("more than {MAX_REGIONS} sparse regions"));
                        }
                        m.push(num(key, part.as_bytes())?);
                    }
                    map = Some(m);
                }
                other => return Err(format!("unknown PAX record GNU.sparse.{other}")),
            }
        }
        if !any {
            return Ok(None);
        }
        let real_size = size.ok_or("a PAX sparse file without GNU.sparse.realsize or .size")?;
        if real_size > MAX_REAL_SIZE {
            return Err(format!(
                "a sparse file of {real_size} bytes, more than the {MAX_REAL_SIZE} cela unpacks"
            ));
        }
        let flat = match (major, map) {
            (Some(1), _) => None,
            (Some(m), _) if m != 0 => return Err(format!("PAX sparse format {m}.x is unknown")),
            (_, Some(m)) => Some(m),
            (_, None) => Some(pairs),
        };
        let map = match flat {
            None => None,
            Some(f) if f.len() % 2 == 1 => return Err("an odd number of sparse map values".into()),
            Some(f) => Some(f.chunks(2).map(|c| (c[0], c[1])).collect()),
        };
        Ok(Some(PaxSparse {
            name,
            real_size,
            map,
        }))
    }

    /// Writes the file from the entry's data (`data_len` bytes) into `f`, regions at their
    /// offsets and holes left as holes.
    pub fn write(&self, data: &mut dyn Read, data_len: u64, f: &mut File) -> io::Result<()> {
        let (map, map_bytes) = match &self.map {
            Some(m) => (m.clone(), 0),
            None => read_map(data, data_len)?,
        };
        check_map(&map, self.real_size, data_len - map_bytes)?;
        for &(offset, len) in &map {
            f.seek(SeekFrom::Start(offset))?;
            let n = io::copy(&mut data.take(len), f)?;
            if n != len {
                return Err(bad("the entry ends inside a sparse region"));
            }
        }
        f.set_len(self.real_size)
    }
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Reads a format 1.0 map from the front of the data; returns it and the bytes it took
/// (whole 512-byte blocks).
fn read_map(data: &mut dyn Read, data_len: u64) -> io::Result<(Vec<(u64, u64)>, u64)> {
    let mut numbers: Vec<u64> = Vec::new();
    let mut want: Option<usize> = None;
    let mut digits = String::new();
    let mut used = 0u64;
    let mut block = [0u8; BLOCK as usize];
    loop {
        if used + BLOCK > data_len {
            return Err(bad("the sparse map runs past the entry's data"));
        }
        data.read_exact(&mut block)?;
        used += BLOCK;
        for &b in &block {
            if want.is_some_and(|w| numbers.len() == w) {
                break;
            }
            match b {
                b'0'..=b'9' if digits.len() < 20 => digits.push(b as char),
                b'\n' if !digits.is_empty() => {
                    let n: u64 = digits
                        .parse()
                        .map_err(|_| bad("a sparse map number overflows"))?;
                    digits.clear();
                    if want.is_none() {
                        if n as usize > MAX_REGIONS {
                            return Err(bad(format!("more than {MAX_REGIONS} sparse regions")));
                        }
                        want = Some(2 * n as usize);
                    } else {
                        numbers.push(n);
                    }
                }
                _ => return Err(bad("the sparse map is not decimal lines")),
            }
        }
        if want.is_some_and(|w| numbers.len() == w) {
            let map = numbers.chunks(2).map(|c| (c[0], c[1])).collect();
            return Ok((map, used));
        }
    }
}

/// Regions in order, not overlapping, inside `real_size`, adding up to `data_len`.
fn check_map(map: &[(u64, u64)], real_size: u64, data_len: u64) -> io::Result<()> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(offset, len) in map {
        if offset < end {
            return Err(bad("sparse regions out of order or overlapping"));
        }
        end = offset
            .checked_add(len)
            .filter(|e| *e <= real_size)
            .ok_or_else(|| bad("a sparse region ends past the file's size"))?;
        total += len;
    }
    if total != data_len {
        return Err(bad(format!(
            "the sparse regions hold {total} bytes but the entry has {data_len}"
        )));
    }
    Ok(())
}

/// Copies `r` into `f`, seeking over every whole 4 KiB block of zeros so that it becomes a
/// hole, and sets the file's length to what was read. Returns that length.
pub fn copy_holey(r: &mut dyn Read, f: &mut File) -> io::Result<u64> {
    const HOLE: usize = 4096;
    let mut buf = vec![0u8; 16 * HOLE];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        for chunk in buf[..filled].chunks(HOLE) {
            if chunk.len() == HOLE && chunk.iter().all(|&b| b == 0) {
                f.seek(SeekFrom::Current(HOLE as i64))?;
            } else {
                f.write_all(chunk)?;
            }
        }
        total += filled as u64;
    }
    f.set_len(total)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs<'a>(r: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        r.iter().map(|(k, v)| (*k, v.as_bytes()))
    }

    #[test]
    fn the_three_pax_versions_parse_and_bad_maps_are_refused() {
        assert_eq!(
            PaxSparse::from_records(recs(&[("path", "x")])).unwrap(),
            None
        );
        let v00 = PaxSparse::from_records(recs(&[
            ("GNU.sparse.size", "100"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.offset", "0"),
            ("GNU.sparse.numbytes", "3"),
            ("GNU.sparse.offset", "50"),
            ("GNU.sparse.numbytes", "4"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(v00.map, Some(vec![(0, 3), (50, 4)]));
        let v01 = PaxSparse::from_records(recs(&[
            ("GNU.sparse.size", "100"),
            ("GNU.sparse.map", "0,3,50,4"),
            ("GNU.sparse.name", "f"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (v01.map, v01.name),
            (Some(vec![(0, 3), (50, 4)]), Some(b"f".to_vec()))
        );
        let v10 = PaxSparse::from_records(recs(&[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.realsize", "100"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(v10.map, None);
        for bad in [
            &[("GNU.sparse.map", "0,3")][..],
            &[("GNU.sparse.size", "9"), ("GNU.sparse.map", "0,3,4")],
            &[("GNU.sparse.size", "x")],
            &[("GNU.sparse.size", "9"), ("GNU.sparse.major", "7")],
            &[("GNU.sparse.size", "9"), ("GNU.sparse.evil", "1")],
            &[
                ("GNU.sparse.size", "99999999999999"),
                ("GNU.sparse.map", "0,1"),
            ],
        ] {
            assert!(PaxSparse::from_records(recs(bad)).is_err(), "{bad:?}");
        }
        assert!(check_map(&[(0, 5), (4, 1)], 10, 6).is_err());
        assert!(check_map(&[(8, 5)], 10, 5).is_err());
        assert!(check_map(&[(0, 5)], 10, 6).is_err());
        assert!(check_map(&[(u64::MAX, 5)], u64::MAX, 5).is_err());
        check_map(&[(0, 5), (5, 1)], 10, 6).unwrap();
    }

    #[test]
    fn a_version_1_map_is_read_from_the_data() {
        let mut data = b"2\n0\n3\n50\n4\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"abcdefg");
        let sp = PaxSparse {
            name: None,
            real_size: 100,
            map: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut f = File::create(dir.path().join("f")).unwrap();
        sp.write(&mut &data[..], data.len() as u64, &mut f).unwrap();
        let out = std::fs::read(dir.path().join("f")).unwrap();
        assert_eq!(out.len(), 100);
        assert_eq!(&out[..3], b"abc");
        assert_eq!(&out[50..54], b"defg");
        assert!(out[3..50].iter().chain(&out[54..]).all(|&b| b == 0));
        // A map that claims more than the entry holds.
        let mut short = b"1\n0\n900\n".to_vec();
        short.resize(512, 0);
        let mut f = File::create(dir.path().join("g")).unwrap();
        let sp = PaxSparse {
            real_size: 1000,
            ..sp
        };
        assert!(sp.write(&mut &short[..], 512, &mut f).is_err());
    }
}
