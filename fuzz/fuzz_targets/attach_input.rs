//! Fuzzes the frames an attached client sends an instance's supervisor
//! (`cela_instance::attach::Input::read`, on the instance's `attach.sock`): any byte stream
//! gives frames or an error ending the connection, never a panic or an allocation beyond the
//! frame limit, and every frame it accepts encodes back to the bytes it was read from. The
//! detach-key matcher is fed the data frames too: it passes on every byte that is not part of
//! the sequence. Run: `cargo +nightly fuzz run attach_input` here.

#![no_main]

use cela_instance::attach::{DetachWatch, Input, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys: &[u8] = &[16, 17];
    let mut watch = DetachWatch::new(keys);
    let mut passed = Vec::new();
    let mut fed = Vec::new();
    let mut detached = false;
    let mut rest = data;
    loop {
        let before = rest;
        match Input::read(&mut rest) {
            Ok(Some(input)) => {
                let bytes = input.encode();
                assert_eq!(bytes[..], before[..before.len() - rest.len()]);
                if let Input::Data(d) = &input {
                    assert!(d.len() <= MAX_FRAME);
                    if !detached {
                        fed.extend_from_slice(d);
                        let (pass, detach) = watch.feed(d);
                        passed.extend_from_slice(&pass);
                        detached = detach;
                    }
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    if !detached {
        passed.extend_from_slice(&watch.finish());
        assert_eq!(passed, fed, "without the sequence every byte passes, in order");
    } else {
        // What passed is what was fed up to the sequence, without it.
        let at = fed
            .windows(keys.len())
            .position(|w| w == keys)
            .expect("a detach means the sequence was fed");
        assert_eq!(passed, fed[..at]);
    }
});
