//! A lab link: each end a veth pair, the node's interface born in the node's network
//! namespace and its peer — the *lab end*, `l<n>a` or `l<n>b` — in the lab's own network
//! namespace (`DATA/labs/NAME.netns`). That namespace is the wall between the lab and the
//! host: it has no address, no route and no forwarding, and IPv6 is off in it, so whatever
//! a node sends reaches nothing there but the other end of its link; deleting it deletes
//! every lab end at once. The two lab ends of a link are joined one of two ways:
//!
//! * **in the kernel** (an unimpaired link): a `tc` filter on each lab end's ingress
//!   (`clsact`, `u32` matching every frame) redirects each frame out of the other end
//!   (`mirred egress redirect`): a wire, carrying every frame (ARP, STP, LLDP too) at the
//!   kernel's speed;
//! * **through the relay** (an impaired link): the filters are taken off and a
//!   [`super::relay`] process in the lab's namespace carries the frames, delayed, thinned
//!   and paced.
//!
//! `tc` is iproute2's, as every Linux host has it, run inside the lab's namespace; no
//! maintained crate speaks tc's netlink dialect for filters and actions.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::InstanceError;
use crate::network::{in_netns, rtnl};

/// A vm node's end of a lab link. A microVM has no network namespace for a veth to be born
/// in; its card is a TAP instead, made in the lab's namespace under the lab end's own name
/// (`l<n>a`) when the VM starts and gone when it ends, so the two ends are joined as any
/// other (in the kernel or by a relay). The guest names its card `iface` and gives it
/// `address` (`cela_guest::LinkRequest`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmEnd {
    /// The lab's network namespace (its bind mount).
    pub netns: std::path::PathBuf,
    /// The TAP's name there: the lab end.
    pub tap: String,
    /// The interface's name in the guest.
    pub iface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<(Ipv4Addr, u8)>,
}

impl VmEnd {
    /// Makes the end's TAP in the lab's namespace, up; it goes when the returned handle (and
    /// every copy of its descriptor, the monitor's) is closed.
    pub fn open(&self) -> Result<cela_vmm::net::tap::Tap, InstanceError> {
        let ns = File::open(&self.netns).map_err(|e| InstanceError::Io {
            what: format!("opening the lab's namespace {}", self.netns.display()),
            source: e,
        })?;
        let name = self.tap.clone();
        in_netns(&ns, move || {
            let tap = cela_vmm::net::tap::Tap::create(&name).map_err(|e| {
                InstanceError::Other(format!("making the lab end {name} (a TAP): {e}"))
            })?;
            cela_guest::netif::set_up(&name).map_err(netif)?;
            Ok(tap)
        })
    }
}

/// The lab ends of link `index`.
pub fn lab_ends(index: usize) -> [String; 2] {
    [format!("l{index}a"), format!("l{index}b")]
}

/// Makes the lab's namespace at `path`: lo only, no forwarding, no IPv6.
pub fn make_namespace(path: &Path) -> Result<(), InstanceError> {
    crate::network::make_netns(path)?;
    let made = (|| {
        let ns = File::open(path).map_err(|e| InstanceError::Io {
            what: format!("opening {}", path.display()),
            source: e,
        })?;
        in_netns(&ns, || {
            for (key, value) in [
                ("net/ipv4/ip_forward", "0"),
                ("net/ipv6/conf/all/disable_ipv6", "1"),
                ("net/ipv6/conf/default/disable_ipv6", "1"),
            ] {
                match std::fs::write(Path::new("/proc/sys").join(key), value) {
                    // A kernel booted without IPv6 has nothing to turn off.
                    Err(e) if key.contains("ipv6") && e.kind() == std::io::ErrorKind::NotFound => {}
                    other => other.map_err(|e| InstanceError::Io {
                        what: format!("setting {key} in the lab's namespace"),
                        source: e,
                    })?,
                }
            }
            Ok(())
        })
    })();
    if made.is_err() {
        let _ = crate::network::remove_netns(path);
    }
    made
}

/// Runs `tc` inside the namespace open as `ns`.
fn tc(ns: &File, args: &[&str]) -> Result<(), InstanceError> {
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new("tc");
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: between fork and exec the child only calls setns(2), which is async-signal-safe,
    // on a descriptor the parent keeps open across the call.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().map_err(|e| InstanceError::Io {
        what: "running tc (iproute2) in the lab's namespace".into(),
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

fn netif(e: cela_guest::netif::NetifError) -> InstanceError {
    InstanceError::Other(format!("a lab link: {e}"))
}

/// Makes one end: `lab_end` in the lab's namespace `lab_ns` and the node's `iface` in
/// `node_ns` (with `address`), both up.
pub fn make_end(
    lab_ns: &File,
    lab_end: &str,
    node_ns: &File,
    iface: &str,
    address: Option<(Ipv4Addr, u8)>,
) -> Result<(), InstanceError> {
    let lab_end = lab_end.to_owned();
    in_netns(lab_ns, || {
        rtnl::add_veth(&lab_end, iface, node_ns.as_fd()).map_err(|e| InstanceError::Io {
            what: format!("creating the veth pair {lab_end} ↔ {iface}"),
            source: e,
        })?;
        cela_guest::netif::set_up(&lab_end).map_err(netif)
    })?;
    let iface = iface.to_owned();
    in_netns(node_ns, move || {
        if let Some((addr, prefix)) = address {
            cela_guest::netif::set_ipv4(&iface, addr, prefix).map_err(netif)?;
        }
        cela_guest::netif::set_up(&iface).map_err(netif)
    })
}

/// The interface indexes of `names` in the lab's namespace, each if it exists.
fn indexes<const N: usize>(lab_ns: &File, names: [&str; N]) -> [Option<u32>; N] {
    let names = names.map(str::to_owned);
    in_netns(lab_ns, move || {
        Ok(names
            .each_ref()
            .map(|n| nix::net::if_::if_nametoindex(n.as_str()).ok()))
    })
    .unwrap_or([None; N])
}

/// Whether the lab end `end` exists.
pub fn end_exists(lab_ns: &File, end: &str) -> bool {
    indexes(lab_ns, [end])[0].is_some()
}

/// The interface indexes of both lab ends, if both exist.
pub fn end_indexes(lab_ns: &File, ends: &[String; 2]) -> Option<[u32; 2]> {
    match indexes(lab_ns, [ends[0].as_str(), ends[1].as_str()]) {
        [Some(a), Some(b)] => Some([a, b]),
        _ => None,
    }
}

/// Whether both lab ends still exist as they were joined (`joined`, their indexes then): a
/// node whose namespace went took its ends along, and a vm node started again made its end
/// anew, which nothing joined.
pub fn ends_exist(lab_ns: &File, ends: &[String; 2], joined: Option<[u32; 2]>) -> bool {
    match (end_indexes(lab_ns, ends), joined) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(now), Some(then)) => now == then,
    }
}

/// Joins the lab ends in the kernel (each one's ingress redirected out of the other).
pub fn wire(lab_ns: &File, ends: &[String; 2]) -> Result<(), InstanceError> {
    // Afresh: a filter left from before is not doubled.
    unwire(lab_ns, ends)?;
    for (from, to) in [(&ends[0], &ends[1]), (&ends[1], &ends[0])] {
        tc(lab_ns, &["qdisc", "add", "dev", from, "clsact"])?;
        tc(
            lab_ns,
            &[
                "filter", "add", "dev", from, "ingress", "protocol", "all", "prio", "1", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(())
}

/// Takes the kernel's join off (the relay carries the frames instead).
pub fn unwire(lab_ns: &File, ends: &[String; 2]) -> Result<(), InstanceError> {
    for end in ends {
        // Removing the qdisc removes its filters; none there is fine.
        match tc(lab_ns, &["qdisc", "del", "dev", end, "clsact"]) {
            Err(e)
                if ["Cannot find", "Invalid handle"]
                    .iter()
                    .any(|m| e.to_string().contains(m)) => {}
            other => other?,
        }
    }
    Ok(())
}
