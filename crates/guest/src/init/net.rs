//! The guest side of a microVM's network cards (`--net auto`, or one per named network):
//! finds each NIC the host described (by its MAC address, in `/sys/class/net`), gives it its
//! address, brings it and the loopback up, and routes through the gateway the host named (at
//! most one card has one). The virtio-net driver was loaded with the other modules, so the
//! interfaces exist by the time this runs.
//!
//! A machine restored from a snapshot as another instance is told its new link
//! ([`reconfigure`]): the interface configured at boot (remembered here: the init's memory is
//! part of the snapshot) takes the new MAC address, address and gateway. Only a machine with
//! one card is snapshotted.

use std::path::Path;
use std::sync::Mutex;

use cela_guest::{LinkRequest, NetRequest, format_mac, netif};

/// The first network's interface [`configure_cards`] set up and what it was given; `None`
/// before, or without a network.
static CONFIGURED: Mutex<Option<(String, NetRequest)>> = Mutex::new(None);

/// Configures the machine's cards: the networks' (`nets`, named `eth0`, `eth1`, … in their
/// order, whatever order the kernel probed them in) and the lab links' (`links`, named as the
/// lab file says). Each is found by its MAC address; all are renamed through temporary names
/// first, so that no card's new name is another's current one. An error says which step
/// failed.
pub fn configure_cards(nets: &[NetRequest], links: &[LinkRequest]) -> Result<(), String> {
    if nets.is_empty() && links.is_empty() {
        return Ok(());
    }
    let _ = netif::set_up("lo");
    let sys = Path::new("/sys/class/net");
    let alone = nets.len() == 1 && links.is_empty();
    let mut cards = Vec::new();
    for (i, n) in nets.iter().enumerate() {
        // By its MAC; else the only virtio NIC there is: a machine saved before its NIC
        // was probed and restored elsewhere probes it with the new MAC, while this request (its
        // command line) still names the old one. The restore's own request then moves it.
        let now = interface_with_mac(sys, &n.mac)
            .or_else(|| alone.then(|| only_virtio_nic(sys)).flatten())
            .ok_or_else(|| {
                format!(
                    "no network interface has MAC address {} (is virtio_net loaded?)",
                    format_mac(&n.mac)
                )
            })?;
        cards.push((now, format!("eth{i}")));
    }
    for l in links {
        let now = interface_with_mac(sys, &l.mac).ok_or_else(|| {
            format!(
                "no network interface has MAC address {} (the card of link {})",
                format_mac(&l.mac),
                l.name
            )
        })?;
        cards.push((now, l.name.clone()));
    }
    if cards.iter().any(|(now, want)| now != want) {
        for (i, (now, _)) in cards.iter_mut().enumerate() {
            // `~` is in no name a lab file gives.
            let temp = format!("cela~{i}");
            netif::rename(now, &temp).map_err(|e| e.to_string())?;
            *now = temp;
        }
        for (now, want) in &mut cards {
            netif::rename(now, want).map_err(|e| e.to_string())?;
            *now = want.clone();
        }
    }
    for (n, (name, _)) in nets.iter().zip(&cards) {
        netif::set_ipv4(name, n.address, n.prefix).map_err(|e| e.to_string())?;
        netif::set_up(name).map_err(|e| e.to_string())?;
        // An internal network (`cela network create --internal`) has no gateway.
        if !n.gateway.is_unspecified() {
            netif::add_default_route(n.gateway).map_err(|e| e.to_string())?;
        }
    }
    if let (Some(first), Some((name, _))) = (nets.first(), cards.first()) {
        *CONFIGURED.lock().unwrap_or_else(|e| e.into_inner()) = Some((name.clone(), *first));
    }
    for (l, (name, _)) in links.iter().zip(&cards[nets.len()..]) {
        if let Some((address, prefix)) = l.address {
            netif::set_ipv4(name, address, prefix).map_err(|e| e.to_string())?;
        }
        netif::set_up(name).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Moves the interface configured at boot to the link `request` describes: its MAC address,
/// its address (which replaces the old one, and with it the old link's routes) and a default
/// route through the new gateway. An error says which step failed.
pub fn reconfigure(request: &NetRequest) -> Result<(), String> {
    let mut configured = CONFIGURED.lock().unwrap_or_else(|e| e.into_inner());
    let Some((name, old)) = configured.as_ref() else {
        return Err("this machine configured no network interface at boot".into());
    };
    // The MAC first (before the new address is announced with the old one; and a driver
    // that takes it only with the link down drops routes, which are set after), but its
    // failure is told last: the address and route are what reach the new link (a
    // point-to-point TAP hardly looks at the MAC), so the copy stays reachable.
    let mac = netif::set_mac(name, request.mac).map_err(|e| e.to_string());
    // The old route is gone already if the kernel dropped it with the old address.
    let _ = netif::delete_default_route(old.gateway);
    netif::set_ipv4(name, request.address, request.prefix).map_err(|e| e.to_string())?;
    netif::set_up(name).map_err(|e| e.to_string())?;
    if !request.gateway.is_unspecified() {
        match netif::add_default_route(request.gateway) {
            Err(e) if e.err.raw_os_error() != Some(libc::EEXIST) => return Err(e.to_string()),
            _ => {}
        }
    }
    // The new gateway's is the only default route: one through an old gateway that
    // survived (seen once in the lab) would reach the old link's host end through the new
    // one, and the copy would name a gateway that is not its own.
    for stale in netif::default_gateways() {
        if stale != request.gateway {
            let _ = netif::delete_default_route(stale);
        }
    }
    let name = name.clone();
    *configured = Some((name, *request));
    mac
}

/// The one virtio-net interface under `sys_class_net` (its device's driver is `virtio_net`:
/// not a bridge, bond, dummy or tunnel, which are Ethernet too), if there is exactly one.
fn only_virtio_nic(sys_class_net: &Path) -> Option<String> {
    let mut found = std::fs::read_dir(sys_class_net)
        .ok()?
        .flatten()
        .filter(|entry| {
            std::fs::read_link(entry.path().join("device/driver"))
                .is_ok_and(|d| d.file_name().is_some_and(|n| n == "virtio_net"))
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned());
    let one = found.next()?;
    found.next().is_none().then_some(one)
}

/// The name of the interface under `sys_class_net` whose `address` file holds `mac`.
fn interface_with_mac(sys_class_net: &Path, mac: &[u8; 6]) -> Option<String> {
    let want = format_mac(mac);
    std::fs::read_dir(sys_class_net)
        .ok()?
        .flatten()
        .find(|entry| {
            std::fs::read_to_string(entry.path().join("address"))
                .is_ok_and(|a| a.trim().eq_ignore_ascii_case(&want))
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::TestDir;

    #[test]
    fn the_interface_is_found_by_its_mac() {
        let dir = TestDir::new();
        for (name, mac) in [("lo", "00:00:00:00:00:00"), ("eth0", "02:ce:1a:00:00:05")] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("address"), format!("{mac}\n")).unwrap();
        }
        let mac = [0x02, 0xce, 0x1a, 0, 0, 5];
        assert_eq!(
            interface_with_mac(dir.path(), &mac).as_deref(),
            Some("eth0")
        );
        assert_eq!(interface_with_mac(dir.path(), &[2, 0, 0, 0, 0, 1]), None);
        assert_eq!(interface_with_mac(&dir.path().join("none"), &mac), None);
    }

    #[test]
    fn the_only_virtio_nic_is_found_and_two_are_not_chosen_between() {
        let dir = TestDir::new();
        // lo and a dummy have no device; a bridge-like one has another driver.
        for (name, driver) in [
            ("lo", None),
            ("dummy0", None),
            ("br0", Some("bridge")),
            ("eth0", Some("virtio_net")),
        ] {
            let iface = dir.path().join(name);
            std::fs::create_dir_all(iface.join("device")).unwrap();
            if let Some(d) = driver {
                let target = dir.path().join("drivers").join(d);
                std::fs::create_dir_all(&target).unwrap();
                std::os::unix::fs::symlink(&target, iface.join("device/driver")).unwrap();
            }
        }
        assert_eq!(only_virtio_nic(dir.path()).as_deref(), Some("eth0"));
        let eth1 = dir.path().join("eth1/device");
        std::fs::create_dir_all(&eth1).unwrap();
        std::os::unix::fs::symlink(dir.path().join("drivers/virtio_net"), eth1.join("driver"))
            .unwrap();
        assert_eq!(only_virtio_nic(dir.path()), None);
    }
}
