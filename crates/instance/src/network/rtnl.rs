//! The two link requests a container's network needs that the classic `SIOC*` ioctls cannot
//! make (rtnetlink(7), netlink(7)): creating a veth pair whose peer is born inside another
//! network namespace, and deleting a link by name. Addresses, flags and routes stay with
//! `cela_guest::netif`'s ioctls, which the TAP of `--net auto` already uses; two requests do
//! not warrant a netlink library.
//!
//! A request is one netlink message: `nlmsghdr` (16 bytes), `ifinfomsg` (16 bytes), then
//! attributes (`rtattr`: u16 length, u16 type, payload padded to 4 bytes). A veth's peer is
//! the nested attribute `IFLA_LINKINFO { IFLA_INFO_KIND "veth", IFLA_INFO_DATA {
//! VETH_INFO_PEER { ifinfomsg, IFLA_IFNAME, IFLA_NET_NS_FD } } }` (linux/veth.h). Every request
//! asks for an acknowledgement (`NLM_F_ACK`), an `NLMSG_ERROR` message whose error is 0 or a
//! negated errno.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `VETH_INFO_PEER` (linux/veth.h; not in the libc crate).
const VETH_INFO_PEER: u16 = 1;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A netlink request being built: the header, an all-zero `ifinfomsg` (family AF_UNSPEC, any
/// index), then attributes; nested attributes are closed in the reverse order of opening.
struct Request {
    buf: Vec<u8>,
    open: Vec<usize>,
}

impl Request {
    fn new(msg_type: u16, flags: u16) -> Request {
        let mut buf = vec![0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
        buf[4..6].copy_from_slice(&msg_type.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Request {
            buf,
            open: Vec::new(),
        }
    }

    fn pad(&mut self) {
        self.buf.resize(align(self.buf.len()), 0);
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    /// A NUL-terminated string attribute.
    fn string(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut payload = s.as_bytes().to_vec();
        payload.push(0);
        self.attr(ty, &payload)
    }

    fn begin(&mut self, ty: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.attr(ty, &[])
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    fn end(&mut self) -> &mut Self {
        let start = self.open.pop().expect("an open nested attribute");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The message, its length and sequence number filled in.
    fn finish(&mut self, seq: u32) -> Vec<u8> {
        assert!(self.open.is_empty(), "nested attributes left open");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        std::mem::take(&mut self.buf)
    }
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ':', '\0', ' ']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    Ok(())
}

/// The request that creates veth `name` in the caller's namespace with its peer `peer` in
/// the network namespace open as `peer_netns` (failing if `name` exists).
fn add_veth_request(name: &str, peer: &str, peer_netns: i32) -> Vec<u8> {
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    Request::new(libc::RTM_NEWLINK, flags as u16)
        .string(libc::IFLA_IFNAME, name)
        .begin(libc::IFLA_LINKINFO)
        .string(libc::IFLA_INFO_KIND, "veth")
        .begin(libc::IFLA_INFO_DATA)
        .begin(VETH_INFO_PEER)
        .raw(&[0u8; IFINFOMSG_LEN])
        .string(libc::IFLA_IFNAME, peer)
        .attr(libc::IFLA_NET_NS_FD, &(peer_netns as u32).to_ne_bytes())
        .end()
        .end()
        .end()
        .finish(1)
}

fn delete_link_request(name: &str) -> Vec<u8> {
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK;
    Request::new(libc::RTM_DELLINK, flags as u16)
        .string(libc::IFLA_IFNAME, name)
        .finish(1)
}

/// Creates the veth pair `name` (in this thread's network namespace) ↔ `peer` (in the
/// namespace `peer_netns`). Fails with `EEXIST` if `name` is taken.
pub fn add_veth(name: &str, peer: &str, peer_netns: BorrowedFd<'_>) -> io::Result<()> {
    check_name(name)?;
    check_name(peer)?;
    transact(&add_veth_request(name, peer, peer_netns.as_raw_fd()))
}

/// Deletes link `name` of this thread's network namespace (a veth takes its peer with it).
/// Fails with `ENODEV` if there is none.
pub fn delete_link(name: &str) -> io::Result<()> {
    check_name(name)?;
    transact(&delete_link_request(name))
}

/// Sends `request` on a fresh `NETLINK_ROUTE` socket (bound to this thread's network
/// namespace) and reads its acknowledgement.
fn transact(request: &[u8]) -> io::Result<()> {
    // SAFETY: socket(2) takes plain integers; the result is checked, then owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; all-zero is the kernel as destination.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `request` and `kernel` are live for the call; the lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = vec![0u8; 16384];
    loop {
        // SAFETY: `reply` is a live, writable buffer of the given length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if let Some(result) = parse_ack(&reply[..n as usize]) {
            return result;
        }
    }
}

/// The outcome an acknowledgement carries, if `reply` holds one (`NLMSG_ERROR`: 0 is success,
/// a negative value a negated errno).
fn parse_ack(reply: &[u8]) -> Option<io::Result<()>> {
    let mut at = 0;
    while at + NLMSG_HDRLEN <= reply.len() {
        let len = u32::from_ne_bytes(reply[at..at + 4].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(reply[at + 4..at + 6].try_into().ok()?);
        if len < NLMSG_HDRLEN || at + len > reply.len() {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a malformed netlink reply",
            )));
        }
        if ty == libc::NLMSG_ERROR as u16 {
            let code = reply.get(at + NLMSG_HDRLEN..at + NLMSG_HDRLEN + 4)?;
            let code = i32::from_ne_bytes(code.try_into().ok()?);
            return Some(if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-code))
            });
        }
        at += align(len);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
    }

    #[test]
    fn a_veth_request_nests_the_peer_with_its_namespace() {
        let m = add_veth_request("cela7", "eth0", 9);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16_at(&m, 4), libc::RTM_NEWLINK);
        assert_eq!(m.len() % 4, 0);
        // After the headers: IFLA_IFNAME "cela7\0" (4 + 6, padded to 12).
        let a = NLMSG_HDRLEN + IFINFOMSG_LEN;
        assert_eq!((u16_at(&m, a), u16_at(&m, a + 2)), (10, libc::IFLA_IFNAME));
        assert_eq!(&m[a + 4..a + 10], b"cela7\0");
        // IFLA_LINKINFO spans the rest of the message.
        let li = a + 12;
        assert_eq!(u16_at(&m, li + 2), libc::IFLA_LINKINFO);
        assert_eq!(li + u16_at(&m, li) as usize, m.len());
        // KIND "veth\0" (4 + 5, padded to 12), then DATA { PEER { ifinfomsg, name, fd } }.
        assert_eq!(u16_at(&m, li + 6), libc::IFLA_INFO_KIND);
        assert_eq!(&m[li + 8..li + 13], b"veth\0");
        let data = li + 4 + 12;
        assert_eq!(u16_at(&m, data + 2), libc::IFLA_INFO_DATA);
        let peer = data + 4;
        assert_eq!(u16_at(&m, peer + 2), VETH_INFO_PEER);
        assert_eq!(u16_at(&m, peer) as usize, 4 + 16 + 12 + 8);
        let name = peer + 4 + 16;
        assert_eq!(u16_at(&m, name + 2), libc::IFLA_IFNAME);
        assert_eq!(&m[name + 4..name + 9], b"eth0\0");
        let fd = name + 12;
        assert_eq!(
            (u16_at(&m, fd), u16_at(&m, fd + 2)),
            (8, libc::IFLA_NET_NS_FD)
        );
        assert_eq!(u32::from_ne_bytes(m[fd + 4..fd + 8].try_into().unwrap()), 9);
    }

    #[test]
    fn acknowledgements_give_success_or_the_errno() {
        let ack = |code: i32| {
            let mut m = vec![0u8; 36];
            m[0..4].copy_from_slice(&36u32.to_ne_bytes());
            m[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
            m[16..20].copy_from_slice(&code.to_ne_bytes());
            m
        };
        assert!(parse_ack(&ack(0)).unwrap().is_ok());
        let err = parse_ack(&ack(-libc::EEXIST)).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert!(parse_ack(&[]).is_none());
        let mut bad = ack(0);
        bad[0..4].copy_from_slice(&99u32.to_ne_bytes());
        assert!(parse_ack(&bad).unwrap().is_err());
    }

    #[test]
    fn names_are_checked_before_asking_the_kernel() {
        assert!(delete_link("").is_err());
        assert!(delete_link("a-name-far-too-long").is_err());
        assert!(delete_link("a/b").is_err());
    }
}
