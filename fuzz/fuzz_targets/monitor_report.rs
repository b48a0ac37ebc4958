//! Fuzzes how the caller reads a jailed monitor's report (`cela_vmm::jail::decode`): the
//! monitor runs a hostile guest's devices, so its bytes and its end are not trusted. Any bytes
//! and any status give a result or a message, never a panic; a message is one line of at most
//! `MAX_MESSAGE` characters with no control character, so nothing it says can drive the user's
//! terminal. Run: `cargo +nightly fuzz run monitor_report` here.

#![no_main]

use cela_vmm::jail::{JailError, MAX_MESSAGE, decode};
use libfuzzer_sys::fuzz_target;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

fuzz_target!(|data: &[u8]| {
    let Some((&code, report)) = data.split_first() else {
        return;
    };
    let status = WaitStatus::Exited(Pid::from_raw(1), i32::from(code));
    // The report types the callers decode: a small value and a structure.
    for r in [
        decode::<u32>(report, status).map(|_| ()),
        decode::<Vec<String>>(report, status).map(|_| ()),
    ] {
        match r {
            Ok(()) => {}
            Err(JailError::Monitor(m)) => {
                assert!(m.chars().count() <= MAX_MESSAGE, "{} chars", m.len());
                assert!(!m.chars().any(char::is_control), "a control character: {m:?}");
                assert!(
                    !m.chars().any(|c| matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')),
                    "a bidirectional override: {m:?}"
                );
            }
            Err(e) => panic!("not a monitor error: {e:?}"),
        }
    }
});
