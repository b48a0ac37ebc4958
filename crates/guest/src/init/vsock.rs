//! `AF_VSOCK` stream sockets, the guest end of a virtio-vsock device: connecting to the host
//! (CID 2) and listening for the host's connections. Used by the init for its status and
//! output channel (see the `cela_guest` contract) and by the `nc` applet.

use std::fs::File;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use nix::sys::socket::{
    AddressFamily, Backlog, Shutdown, SockFlag, SockType, VsockAddr, accept4, bind, connect,
    listen, shutdown, socket,
};

/// "Any CID" for a listening socket (`VMADDR_CID_ANY`).
pub const CID_ANY: u32 = u32::MAX;

fn stream_socket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Connects to `port` on `cid`. Without a vsock transport (no device) this fails with
/// `ENODEV`.
pub fn connect_to(cid: u32, port: u32) -> nix::Result<File> {
    let fd = stream_socket()?;
    connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
    Ok(File::from(fd))
}

/// A socket listening on `port` of this guest.
pub fn listen_on(port: u32) -> nix::Result<OwnedFd> {
    let fd = stream_socket()?;
    bind(fd.as_raw_fd(), &VsockAddr::new(CID_ANY, port))?;
    listen(&fd, Backlog::new(8)?)?;
    Ok(fd)
}

/// Accepts one connection on a listening socket (close-on-exec).
pub fn accept_one(listener: &OwnedFd) -> nix::Result<File> {
    let fd = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: `accept` returned a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Shuts the sending side of a socket: the peer reads end-of-file after the bytes already sent,
/// whoever else still holds the descriptor.
pub fn shutdown_write(socket: &File) -> nix::Result<()> {
    shutdown(socket.as_raw_fd(), Shutdown::Write)
}
