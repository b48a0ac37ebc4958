//! Configuring a Linux network interface with the classic `SIOC*` ioctls (netdevice(7),
//! route(4)): an IPv4 address and netmask, the UP flag, a default route, a MAC address. Both ends of a
//! `--net auto` link use it — the host for its TAP device, `cela-init` for the guest's NIC — so
//! neither shells out to `ip` nor needs a netlink library for a handful of requests.
//!
//! Every call takes the interface by name and checks it fits `IFNAMSIZ`; every error names the
//! interface and the request that failed.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A failed interface request: what was asked, of which interface, and why it failed.
#[derive(Debug)]
pub struct NetifError {
    pub what: &'static str,
    pub name: String,
    pub err: io::Error,
}

impl std::fmt::Display for NetifError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of network interface {}: {}",
            self.what, self.name, self.err
        )
    }
}

impl std::error::Error for NetifError {}

/// An `AF_INET` datagram socket: the handle the `SIOC*` requests go through.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes plain integers; the returned descriptor is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming `name`, the rest zeroed.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "not a valid interface name (1 to {} bytes)",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers, sockaddrs and a
    // pointer); all-zero is a valid value for each.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// A `sockaddr` holding the IPv4 address `addr` (a `sockaddr_in` fits in a `sockaddr`).
fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the kernel reads a
    // sockaddr whose family says it is a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Issues `request` with `req` on a control socket.
fn ioctl(request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    let sock = control_socket()?;
    // SAFETY: `req` is a live, initialized ifreq for the duration of the call; each request
    // used here reads or writes only an ifreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fail<'a>(what: &'static str, name: &'a str) -> impl FnOnce(io::Error) -> NetifError + 'a {
    move |err| NetifError {
        what,
        name: name.to_owned(),
        err,
    }
}

/// The netmask of a `/prefix` network.
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// Gives interface `name` the address `addr/prefix` (replacing its IPv4 address).
pub fn set_ipv4(name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetifError> {
    let mut req = ifreq(name).map_err(fail("setting the address", name))?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    ioctl(libc::SIOCSIFADDR, &mut req).map_err(fail("setting the address", name))?;
    req.ifr_ifru.ifru_netmask = sockaddr_v4(netmask(prefix));
    ioctl(libc::SIOCSIFNETMASK, &mut req).map_err(fail("setting the netmask", name))
}

/// Renames interface `name` (which must be down) to `new`.
pub fn rename(name: &str, new: &str) -> Result<(), NetifError> {
    let what = "renaming";
    let mut req = ifreq(name).map_err(fail(what, name))?;
    let target = ifreq(new).map_err(fail(what, new))?;
    req.ifr_ifru.ifru_newname = target.ifr_name;
    ioctl(libc::SIOCSIFNAME, &mut req).map_err(fail(what, name))
}

/// Sets the UP flag of interface `name`.
pub fn set_up(name: &str) -> Result<(), NetifError> {
    set_flag(name, libc::IFF_UP, true)
}

/// Gives interface `name` the Ethernet address `mac`, with the interface up if its driver
/// allows that (virtio-net does), else taking it down for the change and up again.
pub fn set_mac(name: &str, mac: [u8; 6]) -> Result<(), NetifError> {
    let what = "setting the MAC address";
    let mut req = ifreq(name).map_err(fail(what, name))?;
    // SAFETY: writing the `ifru_hwaddr` member of the union, a plain sockaddr.
    let hw = unsafe { &mut req.ifr_ifru.ifru_hwaddr };
    hw.sa_family = libc::ARPHRD_ETHER;
    for (dst, src) in hw.sa_data.iter_mut().zip(mac) {
        *dst = src as libc::c_char;
    }
    let mut live = req;
    match ioctl(libc::SIOCSIFHWADDR, &mut live) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            set_flag(name, libc::IFF_UP, false)?;
            let changed = ioctl(libc::SIOCSIFHWADDR, &mut req).map_err(fail(what, name));
            set_flag(name, libc::IFF_UP, true)?;
            changed
        }
        other => other.map_err(fail(what, name)),
    }
}

/// Sets or clears one of interface `name`'s `IFF_*` flags.
fn set_flag(name: &str, flag: libc::c_int, on: bool) -> Result<(), NetifError> {
    let what = if on { "bringing up" } else { "taking down" };
    let mut req = ifreq(name).map_err(fail(what, name))?;
    ioctl(libc::SIOCGIFFLAGS, &mut req).map_err(fail("reading the flags", name))?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let flag = flag as libc::c_short;
    req.ifr_ifru.ifru_flags = if on { flags | flag } else { flags & !flag };
    ioctl(libc::SIOCSIFFLAGS, &mut req).map_err(fail(what, name))
}

/// Adds a default route through `gateway`, which must be reachable on a connected network.
pub fn add_default_route(gateway: Ipv4Addr) -> Result<(), NetifError> {
    default_route(libc::SIOCADDRT, "adding a default route", gateway)
}

/// Adds a route to `dest/prefix` through `gateway`, which must be reachable on a connected
/// network (prefix 0: the default route).
pub fn add_route(dest: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Result<(), NetifError> {
    route(libc::SIOCADDRT, "adding a route", dest, prefix, gateway)
}

/// Removes the default route through `gateway`.
pub fn delete_default_route(gateway: Ipv4Addr) -> Result<(), NetifError> {
    default_route(libc::SIOCDELRT, "removing the default route", gateway)
}

/// The gateways of this network namespace's IPv4 default routes (from `/proc/net/route`).
pub fn default_gateways() -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    parse_default_gateways(&text)
}

/// The gateways of the default routes in `/proc/net/route`'s text: rows whose destination
/// and mask are zero (addresses in hex, in the host's byte order).
fn parse_default_gateways(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |s: &str| u32::from_str_radix(s, 16).ok();
            let (dst, gw, mask) = (hex(f.get(1)?)?, hex(f.get(2)?)?, hex(f.get(7)?)?);
            (dst == 0 && mask == 0 && gw != 0).then(|| Ipv4Addr::from(u32::from_be(gw)))
        })
        .collect()
}

/// `SIOCADDRT` or `SIOCDELRT` of the default route through `gateway`.
fn default_route(
    request: libc::c_ulong,
    what: &'static str,
    gateway: Ipv4Addr,
) -> Result<(), NetifError> {
    route(request, what, Ipv4Addr::UNSPECIFIED, 0, gateway)
}

/// `SIOCADDRT` or `SIOCDELRT` of the route to `dest/prefix` through `gateway`.
fn route(
    request: libc::c_ulong,
    what: &'static str,
    dest: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
) -> Result<(), NetifError> {
    let sock = control_socket().map_err(fail(what, "(any)"))?;
    // SAFETY: rtentry is plain old data (integers, sockaddrs and a device-name pointer, left
    // null: the kernel picks the interface from the gateway); all-zero is valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_v4(dest);
    rt.rt_genmask = sockaddr_v4(netmask(prefix));
    rt.rt_gateway = sockaddr_v4(gateway);
    rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    // SAFETY: `rt` is a live, initialized rtentry for the duration of the call; SIOCADDRT and
    // SIOCDELRT only read it.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            request as _,
            &mut rt as *mut libc::rtentry,
        )
    };
    if rc < 0 {
        return Err(NetifError {
            what,
            name: format!("(any, via {gateway})"),
            err: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_gateways_are_read_from_the_route_table() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100D50A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0000D50A\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0\n\
eth0\t00000000\t0500D50A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        #[cfg(target_endian = "little")]
        assert_eq!(
            super::parse_default_gateways(text),
            [
                std::net::Ipv4Addr::new(10, 213, 0, 1),
                std::net::Ipv4Addr::new(10, 213, 0, 5)
            ]
        );
    }

    use super::*;

    #[test]
    fn netmasks_from_prefixes() {
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-very-long-interface-name").is_err());
        let err = set_up("a-very-long-interface-name").unwrap_err();
        assert!(
            err.to_string().contains("a-very-long-interface-name"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_interface_is_named() {
        let err = set_up("cela-no-such0").unwrap_err();
        assert_eq!(err.err.raw_os_error(), Some(libc::ENODEV), "{err}");
        assert!(err.to_string().contains("cela-no-such0"), "{err}");
    }
}
