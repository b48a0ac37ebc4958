//! A lab link on the host: each end a veth pair, the node's interface born in the node's
//! network namespace and its peer — the *host end*, `cl<lab><n>a` or `…b` — left on the host
//! with no address and IPv6 off. The two host ends are joined one of two ways:
//!
//! * **in the kernel** (an unimpaired link): a `tc` filter on each host end's ingress
//!   (`clsact`, `u32` matching every frame) redirects each frame out of the other end
//!   (`mirred egress redirect`): a wire, carrying every frame (ARP, STP, LLDP too) at the
//!   kernel's speed;
//! * **through the relay** (an impaired link): the filters are taken off and a
//!   [`super::relay`] process carries the frames, delayed, thinned and paced.
//!
//! `tc` is iproute2's, as every Linux host has it; no maintained crate speaks tc's netlink
//! dialect for filters and actions.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};

use crate::error::InstanceError;
use crate::network::rtnl;

/// The host ends of link `index` of the lab tagged `tag`.
pub fn host_ends(tag: &str, index: usize) -> [String; 2] {
    [format!("cl{tag}{index}a"), format!("cl{tag}{index}b")]
}

fn tc(args: &[&str]) -> Result<(), InstanceError> {
    let out = Command::new("tc")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| InstanceError::Io {
            what: "running tc (iproute2) to join a lab link's ends".into(),
            source: e,
        })?;
    if !out.status.success() {
        return Err(InstanceError::Other(format!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Makes one end: the host end `host` and the node's `iface` in `netns` (with `address`),
/// both up.
pub fn make_end(
    host: &str,
    netns: &File,
    iface: &str,
    address: Option<(Ipv4Addr, u8)>,
) -> Result<(), InstanceError> {
    rtnl::add_veth(host, iface, netns.as_fd()).map_err(|e| InstanceError::Io {
        what: format!("creating the veth pair {host} ↔ {iface}"),
        source: e,
    })?;
    let configured = (|| {
        // A host end carries frames only: no IPv6 address (nor its solicitations) of its own.
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{host}/disable_ipv6"), "1").map_err(
            |e| InstanceError::Io {
                what: format!("turning IPv6 off on {host}"),
                source: e,
            },
        )?;
        cela_guest::netif::set_up(host).map_err(netif)?;
        let iface = iface.to_owned();
        crate::network::in_netns(netns, move || {
            if let Some((addr, prefix)) = address {
                cela_guest::netif::set_ipv4(&iface, addr, prefix).map_err(netif)?;
            }
            cela_guest::netif::set_up(&iface).map_err(netif)
        })
    })();
    if configured.is_err() {
        let _ = rtnl::delete_link(host);
    }
    configured
}

fn netif(e: cela_guest::netif::NetifError) -> InstanceError {
    InstanceError::Other(format!("a lab link: {e}"))
}

/// Joins the host ends in the kernel (each one's ingress redirected out of the other).
pub fn wire(ends: &[String; 2]) -> Result<(), InstanceError> {
    // Afresh: a filter left from before is not doubled.
    unwire(ends)?;
    for (from, to) in [(&ends[0], &ends[1]), (&ends[1], &ends[0])] {
        tc(&["qdisc", "add", "dev", from, "clsact"])?;
        tc(&[
            "filter", "add", "dev", from, "ingress", "protocol", "all", "prio", "1", "u32",
            "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ])?;
    }
    Ok(())
}

/// Takes the kernel's join off (the relay carries the frames instead).
pub fn unwire(ends: &[String; 2]) -> Result<(), InstanceError> {
    for end in ends {
        // Removing the qdisc removes its filters; one already gone is fine.
        if std::path::Path::new("/sys/class/net").join(end).exists() {
            tc(&["qdisc", "del", "dev", end, "clsact"]).or_else(|e| {
                if e.to_string().contains("Cannot find") || e.to_string().contains("Invalid handle")
                {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        }
    }
    Ok(())
}

/// Deletes a link's host ends (and with them the node ends); ends already gone are fine.
pub fn remove(ends: &[String; 2]) {
    for end in ends {
        if let Err(e) = rtnl::delete_link(end)
            && e.raw_os_error() != Some(libc::ENODEV)
        {
            tracing::warn!("deleting the lab link end {end}: {e}");
        }
    }
}
