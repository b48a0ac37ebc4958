//! IPv4 networks as `--net auto` needs them: overlap tests, picking a free /30 out of a pool,
//! and the host's routing table from `/proc/net/route`.

use std::fmt;
use std::net::Ipv4Addr;

/// An IPv4 network: `base/prefix`, `base` with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

fn mask(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

impl Subnet {
    /// The network `addr` is in, given its netmask (a non-contiguous mask counts its leading
    /// ones).
    pub fn from_mask(addr: Ipv4Addr, netmask: Ipv4Addr) -> Subnet {
        let prefix = u32::from(netmask).leading_ones() as u8;
        Subnet {
            base: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        }
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let m = mask(self.prefix.min(other.prefix));
        u32::from(self.base) & m == u32::from(other.base) & m
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.base)
    }

    /// Host address `n` of the network (1 is the first usable one).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base).wrapping_add(n))
    }

    /// The first /30 of this network, from the `start`-th one on (wrapping), that overlaps none
    /// of `used`.
    pub fn free_slash30(&self, used: &[Subnet], start: usize) -> Option<Subnet> {
        let count = 1usize << (30u8.saturating_sub(self.prefix));
        (0..count)
            .map(|i| (start + i) % count)
            .map(|i| Subnet {
                base: Ipv4Addr::from(u32::from(self.base) + ((i as u32) << 2)),
                prefix: 30,
            })
            .find(|candidate| !used.iter().any(|u| u.overlaps(candidate)))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// The (interface, destination network) of each route in `/proc/net/route`'s text, whose
/// addresses are hexadecimal in host (little-endian) byte order. Lines that do not parse are
/// skipped.
pub fn parse_proc_net_route(text: &str) -> Vec<(String, Subnet)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let iface = cols.first()?;
            let dest = u32::from_str_radix(cols.get(1)?, 16).ok()?;
            let netmask = u32::from_str_radix(cols.get(7)?, 16).ok()?;
            // The kernel prints the in-memory (network byte order) value as a host integer.
            let addr = Ipv4Addr::from(dest.to_le_bytes());
            let netmask = Ipv4Addr::from(netmask.to_le_bytes());
            Some((iface.to_string(), Subnet::from_mask(addr, netmask)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Subnet {
        let (a, p) = s.split_once('/').unwrap();
        Subnet::from_mask(a.parse().unwrap(), Ipv4Addr::from(mask(p.parse().unwrap())))
    }

    #[test]
    fn overlap_and_containment() {
        assert!(net("10.0.0.0/8").overlaps(&net("10.213.0.4/30")));
        assert!(net("10.213.0.4/30").overlaps(&net("10.0.0.0/8")));
        assert!(!net("10.213.0.4/30").overlaps(&net("10.213.0.8/30")));
        assert!(net("0.0.0.0/0").overlaps(&net("192.168.1.0/24")));
        assert_eq!(net("10.1.2.3/24"), net("10.1.2.0/24"));
        assert!(net("10.1.2.0/24").contains("10.1.2.255".parse().unwrap()));
        assert!(!net("10.1.2.0/24").contains("10.1.3.0".parse().unwrap()));
        assert_eq!(net("10.1.2.4/30").host(2), Ipv4Addr::new(10, 1, 2, 6));
        assert_eq!(net("10.1.2.4/30").to_string(), "10.1.2.4/30");
    }

    #[test]
    fn the_free_slash30_skips_used_networks_and_wraps() {
        let pool = net("10.213.0.0/16");
        let used = [net("10.213.0.0/29"), net("10.213.0.12/32")];
        assert_eq!(pool.free_slash30(&used, 0), Some(net("10.213.0.8/30")));
        assert_eq!(pool.free_slash30(&used, 3), Some(net("10.213.0.16/30")));
        // Start past the end wraps around.
        assert_eq!(
            pool.free_slash30(&used, 16384 + 2),
            Some(net("10.213.0.8/30"))
        );
        assert_eq!(pool.free_slash30(&[net("10.0.0.0/8")], 7), None);
        let small = net("192.168.0.0/30");
        assert_eq!(small.free_slash30(&[], 5), Some(small));
    }

    #[test]
    fn routes_are_read_from_proc() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    garbage\n";
        assert_eq!(
            parse_proc_net_route(text),
            vec![
                ("eth0".to_string(), net("0.0.0.0/0")),
                ("eth0".to_string(), net("192.168.1.0/24")),
            ]
        );
    }
}
