//! The link requests instance networks need that the classic `SIOC*` ioctls cannot make
//! (rtnetlink(7)): creating a veth pair whose peer is born inside another network namespace,
//! creating a bridge, plugging a link into a bridge, and deleting a link by name. Messages are built and parsed with the rust-netlink
//! crates (`netlink-packet-route`, `netlink-sys`, which libcontainer already brings); addresses,
//! flags and routes stay with `cela_guest::netif`'s ioctls, which the TAP of `--net auto`
//! already uses.
//!
//! A veth's peer is the nested attribute `IFLA_LINKINFO { IFLA_INFO_KIND "veth",
//! IFLA_INFO_DATA { VETH_INFO_PEER { ifinfomsg, IFLA_IFNAME, IFLA_NET_NS_FD } } }`
//! (linux/veth.h). Every request asks for an acknowledgement (`NLM_F_ACK`): an `NLMSG_ERROR`
//! message whose code is 0 or a negated errno.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_ROUTE;

/// Refuses what the kernel would: empty, too long (IFNAMSIZ includes the NUL), or with a
/// character an interface name cannot have.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ':', '\0', ' ']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    Ok(())
}

/// A link message naming `name`.
fn named(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    m
}

/// The request that creates veth `name` in the caller's namespace with its peer `peer` in
/// the network namespace open as `peer_netns` (failing if `name` exists).
fn add_veth_request(
    name: &str,
    peer: &str,
    peer_netns: i32,
) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut peer_msg = named(peer);
    peer_msg.attributes.push(LinkAttribute::NetNsFd(peer_netns));
    let mut m = named(name);
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
    ]));
    request(
        RouteNetlinkMessage::NewLink(m),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// The request that creates the bridge `name` (failing if `name` exists).
fn add_bridge_request(name: &str) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = named(name);
    m.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Bridge,
        )]));
    request(
        RouteNetlinkMessage::NewLink(m),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// The request that makes the link with index `port` a port of the bridge with index
/// `bridge` (`IFLA_MASTER`).
fn set_controller_request(port: u32, bridge: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut m = LinkMessage::default();
    m.header.index = port;
    m.attributes.push(LinkAttribute::Controller(bridge));
    request(RouteNetlinkMessage::SetLink(m), NLM_F_REQUEST | NLM_F_ACK)
}

fn delete_link_request(name: &str) -> NetlinkMessage<RouteNetlinkMessage> {
    request(
        RouteNetlinkMessage::DelLink(named(name)),
        NLM_F_REQUEST | NLM_F_ACK,
    )
}

fn request(payload: RouteNetlinkMessage, flags: u16) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut m = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    m.finalize();
    m
}

/// Creates the veth pair `name` (in this thread's network namespace) ↔ `peer` (in the
/// namespace `peer_netns`). Fails with `EEXIST` if `name` is taken.
pub fn add_veth(name: &str, peer: &str, peer_netns: BorrowedFd<'_>) -> io::Result<()> {
    check_name(name)?;
    check_name(peer)?;
    transact(&add_veth_request(name, peer, peer_netns.as_raw_fd()))
}

/// Creates the bridge `name` in this thread's network namespace (down, without addresses).
/// Fails with `EEXIST` if `name` is taken.
pub fn add_bridge(name: &str) -> io::Result<()> {
    check_name(name)?;
    transact(&add_bridge_request(name))
}

/// Plugs the link with index `port` into the bridge with index `bridge`.
pub fn set_controller(port: u32, bridge: u32) -> io::Result<()> {
    transact(&set_controller_request(port, bridge))
}

/// Deletes link `name` of this thread's network namespace (a veth takes its peer with it).
/// Fails with `ENODEV` if there is none.
pub fn delete_link(name: &str) -> io::Result<()> {
    check_name(name)?;
    transact(&delete_link_request(name))
}

/// Sends `request` on a fresh `NETLINK_ROUTE` socket (bound to this thread's network
/// namespace) and reads its acknowledgement.
fn transact(request: &NetlinkMessage<RouteNetlinkMessage>) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut reply = vec![0u8; 16384];
    loop {
        let n = match socket.recv(&mut &mut reply[..], 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(result) = ack_of(&reply[..n]) {
            return result;
        }
    }
}

/// The outcome the acknowledgement in `reply` carries, if it holds one.
fn ack_of(reply: &[u8]) -> Option<io::Result<()>> {
    let mut at = 0;
    while at < reply.len() {
        let message = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[at..]) {
            Ok(m) => m,
            Err(e) => {
                return Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a malformed netlink reply: {e}"),
                )));
            }
        };
        if let NetlinkPayload::Error(e) = &message.payload {
            return Some(match e.code {
                None => Ok(()),
                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            });
        }
        let len = message.header.length as usize;
        if len == 0 {
            return None;
        }
        at += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_veth_request_nests_the_peer_with_its_namespace() {
        let m = add_veth_request("cela7", "eth0", 9);
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
        assert_eq!(
            back.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = back.payload else {
            panic!("not a new-link request: {:?}", back.payload)
        };
        assert!(
            link.attributes
                .contains(&LinkAttribute::IfName("cela7".into()))
        );
        let info = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i),
                _ => None,
            })
            .expect("IFLA_LINKINFO");
        assert!(info.contains(&LinkInfo::Kind(InfoKind::Veth)));
        let peer = info
            .iter()
            .find_map(|i| match i {
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) => Some(p),
                _ => None,
            })
            .expect("VETH_INFO_PEER");
        assert!(
            peer.attributes
                .contains(&LinkAttribute::IfName("eth0".into()))
        );
        assert!(peer.attributes.contains(&LinkAttribute::NetNsFd(9)));
    }

    #[test]
    fn a_bridge_request_names_its_kind_and_a_port_request_its_bridge() {
        let m = add_bridge_request("cbr-1");
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = back.payload else {
            panic!("not a new-link request: {:?}", back.payload)
        };
        assert!(
            link.attributes
                .contains(&LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Bridge
                )]))
        );
        let m = set_controller_request(7, 3);
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::SetLink(link)) = back.payload else {
            panic!("not a set-link request: {:?}", back.payload)
        };
        assert_eq!(link.header.index, 7);
        assert!(link.attributes.contains(&LinkAttribute::Controller(3)));
    }

    #[test]
    fn the_kernel_answers_a_delete_of_a_missing_link_with_its_errno() {
        // A real round trip on this host: no such link → ENODEV.
        let err = delete_link("celanone0").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV), "{err}");
    }

    #[test]
    fn names_are_checked_before_asking_the_kernel() {
        assert!(delete_link("").is_err());
        assert!(delete_link("a-name-far-too-long").is_err());
        assert!(delete_link("a/b").is_err());
    }
}
