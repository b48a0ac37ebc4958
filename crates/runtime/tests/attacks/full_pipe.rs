//! A pipe whose buffer is full, for the CVE-2019-5736 tests of both crates
//! (`crates/runtime/tests/hostile_binary.rs`, `crates/cela/tests/hostile_containers.rs`): a
//! victim whose error message goes to its write end blocks until the test reads, so the
//! attack is not a race the test could lose.

use std::io::Write;
use std::os::fd::OwnedFd;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// A pipe (read end, write end) whose buffer is full: whoever writes to its write end blocks
/// until it is read.
pub fn full_pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) = nix::unistd::pipe().unwrap();
    fcntl(&w, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let mut f = std::fs::File::from(w.try_clone().unwrap());
    while f.write(&[b'.'; 4096]).is_ok() {}
    fcntl(&w, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
    (r, w)
}
