//! The vsock broker: a jailed monitor sees no host path, so when the guest connects to the
//! host's port P the monitor asks its caller, over a seqpacket socket pair, to connect the
//! `--vsock` socket's sibling `PATH_P`; the caller (root, in the host's view of the file
//! system) connects exactly that path and passes the connected socket back (`SCM_RIGHTS`), or
//! the errno it got. A request is the port (4 bytes, little-endian); an answer is the errno
//! (4 bytes, 0 on success) with the socket attached on success. The caller reads nothing else
//! from the monitor here, so a hostile monitor can ask for `PATH_<any port>`, which the guest
//! could always ask for, and nothing more.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

use super::{JailError, MAX_REPORT};

/// The monitor's end of the broker socket (-1: not a jailed monitor).
static MONITOR_END: AtomicI32 = AtomicI32::new(-1);

/// A seqpacket pair: (the caller's end, the monitor's end).
pub(super) fn pair() -> Result<(OwnedFd, OwnedFd), JailError> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| JailError::prepare("making the vsock broker's socket")(e.into()))
}

/// Called in the monitor: guest connections to host ports go through `fd`.
pub(super) fn set_monitor_end(fd: RawFd) {
    MONITOR_END.store(fd, Ordering::Relaxed);
}

/// In a jailed monitor, connects the host's `PATH_<port>` through the caller; `None` in a
/// monitor that is not jailed (it connects the path itself).
pub fn connect_host_port(port: u32) -> Option<std::io::Result<UnixStream>> {
    let fd = MONITOR_END.load(Ordering::Relaxed);
    if fd < 0 {
        return None;
    }
    Some(ask(fd, port))
}

fn ask(fd: RawFd, port: u32) -> std::io::Result<UnixStream> {
    let sent = nix::sys::socket::send(fd, &port.to_le_bytes(), MsgFlags::empty())?;
    if sent != 4 {
        return Err(std::io::Error::other(
            "the vsock broker took a short request",
        ));
    }
    let mut errno = [0u8; 4];
    let mut iov = [IoSliceMut::new(&mut errno)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut stream = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for f in fds {
                // SAFETY: the kernel just installed `f` in this process for this message; it
                // is owned here and nowhere else.
                let owned = unsafe { OwnedFd::from_raw_fd(f) };
                stream.get_or_insert(UnixStream::from(owned));
            }
        }
    }
    if msg.bytes != 4 {
        return Err(std::io::Error::other("the vsock broker went away"));
    }
    match (i32::from_le_bytes(errno), stream) {
        (0, Some(s)) => Ok(s),
        (0, None) => Err(std::io::Error::other("the vsock broker sent no socket")),
        (e, _) => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// The caller's loop while the monitor runs: reads the report pipe to its end (keeping at most
/// [`MAX_REPORT`] bytes) and answers the monitor's connection requests. Returns the report.
pub(super) fn serve_until_eof(broker: OwnedFd, report: OwnedFd, vsock: Option<&Path>) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut broker_open = true;
    loop {
        let mut fds = vec![PollFd::new(report.as_fd(), PollFlags::POLLIN)];
        if broker_open {
            fds.push(PollFd::new(broker.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return kept,
        }
        let report_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let broker_ready = broker_open && fds[1].revents().is_some_and(|r| !r.is_empty());
        if broker_ready {
            broker_open = answer(&broker, vsock);
        }
        if report_ready {
            let mut buf = [0u8; 16 << 10];
            match nix::unistd::read(&report, &mut buf) {
                Ok(0) => return kept,
                Ok(n) => {
                    let room = MAX_REPORT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return kept,
            }
        }
    }
}

/// Answers one request; false once the monitor's end is closed.
fn answer(broker: &OwnedFd, vsock: Option<&Path>) -> bool {
    let mut req = [0u8; 16];
    let n = match nix::sys::socket::recv(broker.as_raw_fd(), &mut req, MsgFlags::empty()) {
        Ok(0) | Err(_) => return false,
        Ok(n) => n,
    };
    let reply = |errno: i32, fd: Option<RawFd>| {
        let bytes = errno.to_le_bytes();
        let iov = [IoSlice::new(&bytes)];
        let fds: Vec<RawFd> = fd.into_iter().collect();
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let _ = sendmsg::<()>(
            broker.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
    };
    let (Some(vsock), 4) = (vsock, n) else {
        reply(libc::EINVAL, None);
        return true;
    };
    let port = u32::from_le_bytes([req[0], req[1], req[2], req[3]]);
    match connect_nonblocking(&super::port_path(vsock, port)) {
        Ok(stream) => reply(0, Some(stream.as_raw_fd())),
        Err(e) => reply(e.raw_os_error().unwrap_or(libc::EIO), None),
    }
    true
}

/// Connects the Unix socket at `path` without blocking: a listener whose backlog is full
/// answers EAGAIN at once (the guest gets a reset), instead of stalling this loop, and with
/// it the monitor's device thread that waits for the answer.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = nix::sys::socket::UnixAddr::new(path)?;
    nix::sys::socket::connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}
