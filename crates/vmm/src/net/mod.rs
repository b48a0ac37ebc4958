//! The host side of a VM's network (`--net auto|tap=NAME`): the TAP device the guest's
//! virtio-net NIC is plugged into, and for `auto` the point-to-point IPv4 link cela sets up
//! on it.
//!
//! `--net auto` creates a non-persistent TAP (`cela0`, `cela1`, …: the kernel picks the first
//! free name), picks a /30 in [`AUTO_POOL`] that no host address or route overlaps, gives the
//! host the first address and the guest the second, and tells the guest through the boot
//! contract (`cela.net=`, see `cela_guest::NetRequest`). Nothing is left to clean up: a
//! non-persistent TAP disappears with its addresses and routes when its last descriptor
//! closes, which the kernel does whenever this process ends, even on SIGKILL.
//!
//! `--net tap=NAME` attaches to an existing TAP; cela neither configures nor deletes it.

pub mod subnet;
pub mod tap;

use std::net::Ipv4Addr;
use std::sync::Arc;

use cela_guest::NetRequest;

use subnet::Subnet;
use tap::{Tap, TapError};

/// The private range `--net auto` takes its /30 links from.
pub const AUTO_POOL: Subnet = Subnet {
    base: Ipv4Addr::new(10, 213, 0, 0),
    prefix: 16,
};
/// The name pattern of the TAP devices `--net auto` creates.
pub const AUTO_TAP_PATTERN: &str = "cela%d";

/// What `--net` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMode {
    /// A TAP and a /30 made by cela, removed when the VM ends.
    Auto,
    /// An existing TAP device, by name.
    Tap(String),
}

/// What is wrong with `--net` or the network it asks for.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("--net {0:?}: expected `auto` or `tap=NAME`")]
    BadArgument(String),
    #[error("--net {arg}: {err}")]
    Tap { arg: String, err: TapError },
    #[error("--net auto: every /30 of {AUTO_POOL} overlaps an address or route of this host")]
    NoFreeSubnet,
    #[error("--net auto: reading this host's addresses: {0}")]
    HostAddresses(std::io::Error),
    #[error("--net auto: {0}")]
    Configure(cela_guest::netif::NetifError),
}

impl NetMode {
    /// Parses the value of `--net`.
    pub fn parse(arg: &str) -> Result<NetMode, NetError> {
        match arg.split_once('=') {
            None if arg == "auto" => Ok(NetMode::Auto),
            Some(("tap", name)) if tap::valid_name(name) => Ok(NetMode::Tap(name.to_owned())),
            _ => Err(NetError::BadArgument(arg.to_owned())),
        }
    }
}

/// The NIC of a machine: the TAP it is plugged into and its MAC address. Engines share the
/// TAP (cela's device reads it; QEMU inherits a duplicate of its descriptor).
#[derive(Debug, Clone)]
pub struct NicConfig {
    pub tap: Arc<Tap>,
    pub mac: [u8; 6],
}

impl PartialEq for NicConfig {
    fn eq(&self, other: &Self) -> bool {
        self.tap.name() == other.tap.name() && self.mac == other.mac
    }
}

impl Eq for NicConfig {}

/// The host side of a VM's network, ready for the VM: its NIC, and for `--net auto` what the
/// guest's init must configure.
#[derive(Debug)]
pub struct HostNet {
    pub nic: NicConfig,
    pub guest: Option<NetRequest>,
}

/// Sets up the network `mode` asks for. On error nothing is left behind (a TAP created here
/// is closed, hence gone).
pub fn setup(mode: &NetMode) -> Result<HostNet, NetError> {
    let mac = random_mac();
    match mode {
        NetMode::Tap(name) => {
            let tap = Tap::open(name).map_err(|err| NetError::Tap {
                arg: format!("tap={name}"),
                err,
            })?;
            Ok(HostNet {
                nic: NicConfig {
                    tap: Arc::new(tap),
                    mac,
                },
                guest: None,
            })
        }
        NetMode::Auto => {
            let tap = Tap::create(AUTO_TAP_PATTERN).map_err(|err| NetError::Tap {
                arg: "auto".into(),
                err,
            })?;
            let link = configure_auto(tap.name())?;
            Ok(HostNet {
                nic: NicConfig {
                    tap: Arc::new(tap),
                    mac,
                },
                guest: Some(NetRequest {
                    address: link.host(2),
                    prefix: link.prefix,
                    gateway: link.host(1),
                    mac,
                }),
            })
        }
    }
}

/// The host-wide lock cela processes hold while they pick and configure addresses (a /30,
/// or a named network's subnet, whatever data directory it is in): without it, many
/// instances starting at once (50 `docker run`s) pick the same free /30, all see the
/// overlap, all move on together, and run out of tries. In a root-only directory, so no other
/// user can hold it.
const AUTO_LOCK_DIR: &str = "/run/cela/locks";

/// Takes the host-wide address lock (bounded: 30 s); `None` when it cannot be had, and the
/// check after configuring then has to do alone.
pub fn address_lock() -> Option<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    // /run/cela itself keeps its usual mode (`cela serve`'s sockets live there); the locks
    // get a directory of root's alone inside it.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create("/run/cela")
        .ok()?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(AUTO_LOCK_DIR)
        .ok();
    let meta = std::fs::symlink_metadata(AUTO_LOCK_DIR).ok()?;
    if !meta.is_dir() || std::os::unix::fs::MetadataExt::uid(&meta) != 0 {
        return None;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(std::path::Path::new(AUTO_LOCK_DIR).join("net-auto.lock"))
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Some(lock),
            Err((f, _)) if std::time::Instant::now() < deadline => {
                file = f;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    }
}

/// Picks a free /30 for the host interface `name` (a TAP, or a container's veth end), gives it
/// the /30's first address and brings it up; the other end gets the second address. Other
/// cela processes wait on its lock ([`address_lock`]); a program that is not cela and takes the same /30
/// at the same moment is caught by the check after configuring, and the next one is tried.
pub fn configure_auto(name: &str) -> Result<Subnet, NetError> {
    let _lock = address_lock();
    let start = std::process::id() as usize;
    let mut skip: Vec<Subnet> = Vec::new();
    for _ in 0..8 {
        let mut used = host_networks(Some(name)).map_err(NetError::HostAddresses)?;
        used.extend(skip.iter().copied());
        let link = AUTO_POOL
            .free_slash30(&used, start)
            .ok_or(NetError::NoFreeSubnet)?;
        cela_guest::netif::set_ipv4(name, link.host(1), link.prefix)
            .map_err(NetError::Configure)?;
        let others = host_networks(Some(name)).map_err(NetError::HostAddresses)?;
        if others.iter().any(|n| n.overlaps(&link)) {
            skip.push(link);
            continue;
        }
        cela_guest::netif::set_up(name).map_err(NetError::Configure)?;
        return Ok(link);
    }
    Err(NetError::NoFreeSubnet)
}

/// The IPv4 networks in use on this host: every interface address with its prefix, and every
/// route's destination except the default route; `except` names an interface to leave out.
pub fn host_networks(except: Option<&str>) -> std::io::Result<Vec<Subnet>> {
    let mut nets = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        if Some(ifa.interface_name.as_str()) == except {
            continue;
        }
        let v4 = |a: Option<nix::sys::socket::SockaddrStorage>| {
            a.and_then(|s| s.as_sockaddr_in().map(|sin| sin.ip()))
        };
        if let Some(addr) = v4(ifa.address) {
            let mask = v4(ifa.netmask).unwrap_or(Ipv4Addr::BROADCAST);
            nets.push(Subnet::from_mask(addr, mask));
        }
    }
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    nets.extend(
        subnet::parse_proc_net_route(&routes)
            .into_iter()
            .filter(|(iface, n)| n.prefix > 0 && Some(iface.as_str()) != except)
            .map(|(_, n)| n),
    );
    Ok(nets)
}

/// A random, locally administered, unicast MAC address (the first byte's low bits are 10).
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    let mut seed = [0u8; 8];
    // getrandom cannot fail for 8 bytes once the pool is initialized; if it ever did, a fixed
    // address still works for one VM per TAP.
    // SAFETY: `seed` is a live, writable 8-byte buffer.
    let _ = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    mac.copy_from_slice(&seed[..6]);
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_arguments() {
        assert_eq!(NetMode::parse("auto").unwrap(), NetMode::Auto);
        assert_eq!(
            NetMode::parse("tap=tap0").unwrap(),
            NetMode::Tap("tap0".into())
        );
        for bad in [
            "",
            "Auto",
            "tap",
            "tap=",
            "tap=a/b",
            "tap=x:y",
            "bridge=br0",
            "auto=1",
        ] {
            let err = NetMode::parse(bad).unwrap_err();
            assert!(err.to_string().contains("auto` or `tap=NAME"), "{err}");
        }
    }

    #[test]
    fn macs_are_local_unicast_and_differ() {
        let a = random_mac();
        assert_eq!(a[0] & 0x03, 0x02);
        assert_ne!(a, random_mac());
    }

    #[test]
    fn a_missing_tap_is_refused_by_name() {
        let err = setup(&NetMode::Tap("cela-none1".into())).unwrap_err();
        assert!(
            err.to_string().starts_with("--net tap=cela-none1: "),
            "{err}"
        );
    }

    /// Needs /dev/net/tun and CAP_NET_ADMIN, which this project's hosts have.
    #[test]
    fn auto_makes_a_configured_tap_that_vanishes_on_drop() {
        let net = setup(&NetMode::Auto).expect("--net auto on this host");
        let name = net.nic.tap.name().to_owned();
        let guest = net.guest.unwrap();
        assert_eq!(guest.prefix, 30);
        assert_eq!(guest.mac, net.nic.mac);
        assert!(AUTO_POOL.contains(guest.address));
        let nets = host_networks(None).unwrap();
        let link = Subnet::from_mask(guest.gateway, cela_guest::netif::netmask(30));
        assert!(nets.contains(&link), "{link} in {nets:?}");
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & libc::IFF_UP as u32, libc::IFF_UP as u32);
        drop(net);
        assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
        assert!(!host_networks(None).unwrap().contains(&link));
    }
}
