//! What the caller makes of a monitor's report and end; the jail itself is tested on a real
//! monitor in `tests/jail.rs`.

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::{JailError, decode};

fn exited(code: i32) -> WaitStatus {
    WaitStatus::Exited(Pid::from_raw(1), code)
}

fn monitor_error(r: Result<u32, JailError>) -> String {
    match r {
        Err(JailError::Monitor(m)) => m,
        other => panic!("not a monitor error: {other:?}"),
    }
}

#[test]
fn a_report_is_the_result() {
    assert_eq!(decode::<u32>(br#"{"Ok":7}"#, exited(0)).unwrap(), 7);
    assert_eq!(
        monitor_error(decode(
            br#"{"Err":"the kernel is not a bzImage"}"#,
            exited(0)
        )),
        "the kernel is not a bzImage"
    );
}

#[test]
fn a_seccomp_kill_names_the_call() {
    let line = b"cela: error: the monitor was killed by its seccomp filter: syscall openat (257) on a vCPU thread\n";
    assert_eq!(
        monitor_error(decode(line, exited(crate::seccomp::KILLED_STATUS))),
        "the monitor was killed by its seccomp filter: syscall openat (257) on a vCPU thread"
    );
    assert_eq!(
        monitor_error(decode(b"", exited(crate::seccomp::KILLED_STATUS))),
        "the monitor was killed by its seccomp filter"
    );
}

#[test]
fn a_monitor_that_ends_without_a_word_is_named_by_its_status() {
    assert_eq!(
        monitor_error(decode(b"", exited(128 + 9))),
        "the monitor was killed by signal 9 (SIGKILL)"
    );
    assert_eq!(
        monitor_error(decode(
            b"",
            WaitStatus::Signaled(Pid::from_raw(1), Signal::SIGSEGV, false)
        )),
        "the monitor was killed by signal 11 (SIGSEGV)"
    );
    assert_eq!(
        monitor_error(decode(b"", exited(1))),
        "the monitor ended with status 1 without a report"
    );
}

#[test]
fn a_hostile_report_is_only_text() {
    // Not JSON of the right shape, huge, or not UTF-8: shown (its first line, bounded), never
    // taken for a result.
    let junk = [b"{\"Ok\":\"not a number\"}".as_slice(), &[0xff; 10_000]].concat();
    let m = monitor_error(decode(&junk, exited(0)));
    assert!(m.len() <= 4096 * 3, "{}", m.len());
    // A terminal escape, in a report or a line, reaches the user as text.
    let m = monitor_error(decode(
        b"{\"Err\":\"\\u001b]0;owned\\u0007\\nsecond line\"}",
        exited(0),
    ));
    assert_eq!(m, "\\u{1b}]0;owned\\u{7}\\u{a}second line");
    let m = monitor_error(decode(b"cela: error: \x1b[2Jcleared\r\n", exited(1)));
    assert_eq!(m, "\\u{1b}[2Jcleared");
    // A right-to-left override would make the message read differently than it is.
    let m = monitor_error(decode(
        "cela: error: ok\u{202e}txt.exe".as_bytes(),
        exited(1),
    ));
    assert_eq!(m, "ok\\u{202e}txt.exe");
    // Escaping cannot grow a message past the bound (fuzz/regressions/monitor_report).
    let m = monitor_error(decode(&[0x7f; 10_000], exited(1)));
    assert_eq!(
        m.chars().count(),
        super::MAX_MESSAGE - super::MAX_MESSAGE % 6
    );
    let long = format!("{{\"Err\":\"{}\"}}", "x".repeat(100_000));
    assert_eq!(
        monitor_error(decode(long.as_bytes(), exited(0))).len(),
        super::MAX_MESSAGE
    );
}
