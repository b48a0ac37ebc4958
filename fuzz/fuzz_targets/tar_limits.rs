//! Fuzzes `cela_image::tar_limits::Limited`, the reader that follows a layer's tar stream
//! header by header to bound what the `tar` crate reads: on any bytes it never panics, and
//! unless it cuts the stream for a limit it changes nothing — `tar` lists the same entries
//! with their data, or fails alike, with and without it. Run:
//! `cargo +nightly fuzz run tar_limits` here.

#![no_main]

use std::io::Read;

use cela_image::tar_limits::{LimitError, Limited};
use libfuzzer_sys::fuzz_target;

/// Every entry's path and data, or where reading stopped.
fn list<R: Read>(r: R) -> Result<Vec<(Vec<u8>, Vec<u8>)>, std::io::Error> {
    let mut archive = tar::Archive::new(r);
    let mut out = Vec::new();
    for e in archive.entries()? {
        let mut e = e?;
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        out.push((e.path_bytes().into_owned(), data));
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let plain = list(data);
    let guarded = list(Limited::new(data, Some(1 << 20)));
    match (&plain, &guarded) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the guard changed what tar read"),
        (_, Err(e)) if LimitError::of(e).is_some() => {}
        (Err(_), Err(_)) => {}
        _ => panic!("tar: {plain:?}, with the guard: {guarded:?}"),
    }
});
