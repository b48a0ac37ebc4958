//! Fuzzes the exec protocol's frame parser (`cela_guest::exec::Frame::read_from`), which reads
//! what the guest agent sends the host (and what the host sends the agent): any byte stream
//! gives frames or a named error, never a panic, and every frame it accepts is written back
//! as the same bytes it was read from. Run: `cargo +nightly fuzz run exec_frames` here.

#![no_main]

use cela_guest::exec::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        let before = rest;
        match Frame::read_from(&mut rest) {
            Ok(Some(frame)) => {
                let mut again = Vec::new();
                frame.write_to(&mut again).expect("an accepted frame writes back");
                let mut reread = &again[..];
                assert_eq!(
                    Frame::read_from(&mut reread).expect("it reads again"),
                    Some(frame)
                );
                assert!(again.len() <= before.len() - rest.len());
            }
            Ok(None) | Err(_) => break,
        }
    }
});
