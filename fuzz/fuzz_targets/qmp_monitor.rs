//! Fuzzes cela's QMP client (`cela_vmm::qemu::qmp`) with a hostile QEMU: the bytes are what
//! QEMU's end of the monitor socket says (greeting, replies, events), then it closes. QEMU
//! runs a guest's machine, so a guest that broke it speaks here. Any bytes give a connection
//! or an error, never a panic or a hang; a command gets its reply or an error; every error and
//! the QEMU build's name are one bounded line of printable characters. Run:
//! `cargo +nightly fuzz run qmp_monitor` here.

#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use cela_vmm::qemu::qmp::{Qmp, QmpError};
use libfuzzer_sys::fuzz_target;

/// What a message may be at most: the fixed words and two bounded fields of QEMU's.
const MAX_SHOWN: usize = 2 * cela_vmm::jail::MAX_MESSAGE + 200;

fn shown_safely(text: &str) {
    assert!(text.chars().count() <= MAX_SHOWN, "{} chars", text.chars().count());
    assert!(!text.chars().any(char::is_control), "a control character: {text:?}");
}

fuzz_target!(|data: &[u8]| {
    // A write to a closed socket must fail, not end the process (no Rust runtime set this).
    // SAFETY: setting SIGPIPE's disposition to ignore, before any thread here writes.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let (ours, theirs) = UnixStream::pair().unwrap();
    let bytes = data.to_vec();
    // QEMU's side from a thread: the input may not fit the socket's buffer.
    let qemu = std::thread::spawn(move || {
        let mut theirs = theirs;
        let _ = theirs.write_all(&bytes);
    });
    match Qmp::connect(ours) {
        Err(e) => shown_safely(&e.to_string()),
        Ok((qmp, events)) => {
            shown_safely(&qmp.version.to_string());
            let reader = std::thread::spawn(move || events.run(|_| {}));
            match qmp.execute("query-status", None) {
                Ok(_) => {}
                Err(e @ (QmpError::Command { .. } | QmpError::Closed | QmpError::Io(_))) => {
                    shown_safely(&e.to_string())
                }
                Err(e) => panic!("not an answer to a command: {e:?}"),
            }
            reader.join().unwrap();
        }
    }
    qemu.join().unwrap();
});
