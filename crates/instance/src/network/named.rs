//! Named networks (`cela network create|ls|inspect|rm`, `cela run --net NAME`): a Linux bridge
//! (`cbr-<id>`) with an IPv4 subnet, that many containers and microVMs join, as Docker's
//! user-defined bridge networks and Incus's managed bridges.
//!
//! * **Addresses.** A network takes the subnet given, or the first free /24 of
//!   [`POOL`] (10.214.0.0/16); either must overlap no address or route of the host and no
//!   other network. The bridge holds the gateway (the subnet's first address unless
//!   `--gateway` says otherwise), except on an `--internal` network, whose bridge has no
//!   address at all (the host is out of reach). Each instance joining gets the lowest free
//!   address, or the one it asks for (`--net NAME,ip=A`).
//! * **Joining.** A container joins through a veth pair: `cv<instance id><n>` on the bridge,
//!   `eth<n>` in its network namespace (its n-th network), with the address, a MAC (random or
//!   `mac=`), and, on its first network that is not internal, the default route through the
//!   gateway. A microVM joins through its TAP, plugged into the bridge; its guest's `eth0` is
//!   configured by cela-init as for `--net auto`.
//! * **Names.** Instances reach each other by name through hosts files: each container on a
//!   network gets a hosts file of its own (bind-mounted on `/etc/hosts`) listing itself and
//!   every instance on its networks, rewritten in place whenever an instance joins or leaves.
//!   (Chosen over a DNS responder per network: cela has no daemon to run one, and a file needs
//!   none.) A microVM's guest does not get one yet: it reaches the others by address.
//! * **Isolation.** The network's own nftables table (see [`super::firewall`]), and its port
//!   guard: what an instance sends into the bridge carries its own MAC ([`super::guard`]).
//! * **Records.** `DATA/networks/NAME.json`, written atomically under `DATA/networks/.lock`;
//!   each joined instance is an endpoint in it until its run ends. An endpoint whose instance
//!   no longer runs (a supervisor killed with SIGKILL) is pruned, and its link deleted, the
//!   next time the network is changed, so `cela network rm` after a crash still removes all.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cela_vmm::net::subnet::Subnet;
use serde::{Deserialize, Serialize};

use super::firewall::{self, BRIDGE_PREFIX};
use super::guard;
use super::rtnl;
use crate::error::{InstanceError, IoContext};
use crate::record::{Instance, Instances, JsonDir, Status, valid_name};

/// Where networks without `--subnet` take a /24 from.
pub const POOL: Subnet = Subnet {
    base: Ipv4Addr::new(10, 214, 0, 0),
    prefix: 16,
};
/// The built-in network: what `cela run` joins when no `--net` is given (unless
/// `CELA_DEFAULT_NETWORK` says otherwise) and what Docker's `NetworkMode: bridge` names. A
/// network like any other, NAT'd as Docker's `docker0`, made in a data directory the first
/// time an instance asks for it ([`Networks::ensure_builtin`]).
pub const DEFAULT_NETWORK: &str = "bridge";

/// The environment variable that names what `cela run` joins without `--net`: a network,
/// `none`, `auto` or `host` (as `--net` takes them); unset or empty, [`DEFAULT_NETWORK`].
pub const DEFAULT_NETWORK_ENV: &str = "CELA_DEFAULT_NETWORK";

/// Names `cela network create` refuses: `--net`'s modes, Docker's default, the built-in network.
pub const RESERVED_NAMES: &[&str] = &["none", "host", "auto", "default", DEFAULT_NETWORK];

/// The most networks an instance joins.
pub const MAX_ATTACHMENTS: usize = 8;

/// `--net NAME[,ip=ADDR][,mac=MAC]`: a network an instance joins, as its config records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// `aa:bb:cc:dd:ee:ff`, unicast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Attachment {
    /// Parses `NAME[,ip=ADDR][,mac=MAC]`.
    pub fn parse(arg: &str) -> Result<Attachment, InstanceError> {
        let bad = |why: String| InstanceError::Invalid(format!("--net {arg:?}: {why}"));
        let mut parts = arg.split(',');
        let network = parts.next().unwrap_or_default();
        let (mut ip, mut mac) = (None, None);
        for part in parts {
            match part.split_once('=') {
                Some(("ip", v)) if ip.is_none() => ip = Some(v),
                Some(("mac", v)) if mac.is_none() => mac = Some(v),
                _ => {
                    return Err(bad(format!(
                        "{part:?}: expected ip=ADDR or mac=MAC, once each"
                    )));
                }
            }
        }
        Attachment::checked(network, ip, mac).map_err(bad)
    }

    /// The attachment to `network` with the address and MAC given apart (as an API's fields
    /// give them), each checked as [`Attachment::parse`] checks its parts.
    pub fn of(
        network: &str,
        ip: Option<&str>,
        mac: Option<&str>,
    ) -> Result<Attachment, InstanceError> {
        Attachment::checked(network, ip, mac)
            .map_err(|why| InstanceError::Invalid(format!("network {network:?}: {why}")))
    }

    /// The attachment if its name, address and MAC are valid; else why not.
    fn checked(network: &str, ip: Option<&str>, mac: Option<&str>) -> Result<Attachment, String> {
        if !valid_name(network) {
            return Err("not a network name (letters, digits, '_', '.', '-'; at most 64)".into());
        }
        let ip = ip
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("ip={v} is not an IPv4 address"))
            })
            .transpose()?;
        let mac = match mac {
            Some(m) if parse_mac(m).is_none() => {
                return Err(format!("mac={m} is not a unicast MAC address"));
            }
            m => m.map(str::to_ascii_lowercase),
        };
        Ok(Attachment {
            network: network.to_owned(),
            ip,
            mac,
        })
    }
}

/// Refuses, before anything is made, networks an instance of `kind` with `--net mode`
/// cannot join: none that does not exist, none twice, no more than [`MAX_ATTACHMENTS`] (a
/// microVM's network cards, one per network, no more than its monitor gives it), none beside
/// `--net host` or `auto`.
pub fn check_attachments(
    data_dir: &Path,
    kind: crate::record::Kind,
    mode: super::NetMode,
    atts: &[Attachment],
) -> Result<(), InstanceError> {
    if atts.is_empty() {
        return Ok(());
    }
    if mode != super::NetMode::None {
        return Err(InstanceError::Invalid(format!(
            "--net {} cannot be combined with a named network",
            mode.as_str()
        )));
    }
    let most = match kind {
        crate::record::Kind::Vm => MAX_ATTACHMENTS.min(cela_vmm::config::MAX_NICS),
        crate::record::Kind::Container => MAX_ATTACHMENTS,
    };
    if atts.len() > most {
        return Err(InstanceError::Invalid(format!(
            "{} networks given: a {} joins at most {most}",
            atts.len(),
            match kind {
                crate::record::Kind::Vm => "microVM (a network card each)",
                crate::record::Kind::Container => "container",
            }
        )));
    }
    let nets = Networks::open(data_dir)?;
    for (i, a) in atts.iter().enumerate() {
        if atts[..i].iter().any(|b| b.network == a.network) {
            return Err(InstanceError::Invalid(format!(
                "network {} is given twice",
                a.network
            )));
        }
        if kind == crate::record::Kind::Vm && a.mac.is_some() {
            return Err(InstanceError::Invalid(format!(
                "--net {},mac=: a microVM's MAC is its NIC's (mac= is for containers)",
                a.network
            )));
        }
        let net = match nets.get(&a.network) {
            Ok(net) => net,
            // The built-in network is made when the instance is ([`Networks::ensure_builtin`]);
            // an `ip=` on it is checked when it joins.
            Err(_) if a.network == DEFAULT_NETWORK => continue,
            Err(e) => return Err(e),
        };
        if let Some(ip) = a.ip {
            let subnet = net.subnet()?;
            if !is_host_address(subnet, ip) || ip == net.gateway {
                return Err(InstanceError::Invalid(format!(
                    "--net {},ip={ip}: not a free host address of its subnet {}",
                    net.name, net.subnet
                )));
            }
        }
    }
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff` as bytes, if it is a unicast address other than all zeros.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    cela_guest::parse_mac(s).filter(|mac| mac[0] & 1 == 0 && *mac != [0; 6])
}

pub use cela_guest::format_mac;

/// `cela network create`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateRequest {
    pub name: String,
    /// `A.B.C.D/P`; absent: a free /24 of [`POOL`].
    pub subnet: Option<String>,
    /// Absent: the subnet's first address.
    pub gateway: Option<String>,
    /// No way to the host or beyond.
    pub internal: bool,
    /// Beyond the host, masqueraded.
    pub nat: bool,
}

/// An instance on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The instance's name (what the others' hosts files call it).
    pub instance: String,
    pub address: Ipv4Addr,
    pub mac: String,
    /// The host's end: a veth on the bridge (containers) or a TAP (microVMs).
    pub interface: String,
    /// Its index, so a later clean-up never deletes another link of that name.
    pub ifindex: u32,
    /// The instance's end: `eth<n>` in a container's namespace (empty for a microVM).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
}

/// A network's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    /// `A.B.C.D/P`.
    pub subnet: String,
    /// The bridge's address (none is set on an internal network's bridge).
    pub gateway: Ipv4Addr,
    pub bridge: String,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub nat: bool,
    pub created: String,
    /// By instance id.
    #[serde(default)]
    pub endpoints: BTreeMap<String, Endpoint>,
}

impl Network {
    pub fn subnet(&self) -> Result<Subnet, InstanceError> {
        parse_subnet(&self.subnet).map_err(|why| InstanceError::Corrupt {
            what: format!("network {}", self.name),
            why,
        })
    }

    fn rules(&self, subnet: Subnet) -> firewall::Rules<'_> {
        firewall::Rules {
            id: &self.id,
            bridge: &self.bridge,
            subnet: (subnet.base, subnet.prefix),
            nat: self.nat,
            internal: self.internal,
        }
    }
}

/// `A.B.C.D/P` with P in 8..=30 and no host bits set.
pub fn parse_subnet(s: &str) -> Result<Subnet, String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not A.B.C.D/PREFIX"))?;
    let base: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{s:?}: {addr:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or_else(|| format!("{s:?}: the prefix must be 8 to 30"))?;
    let net = Subnet { base, prefix };
    let mask = u32::from(cela_guest::netif::netmask(prefix));
    if u32::from(base) & !mask != 0 {
        let aligned = Ipv4Addr::from(u32::from(base) & mask);
        return Err(format!(
            "{s:?} has host bits set (the network is {aligned}/{prefix})"
        ));
    }
    Ok(net)
}

/// Whether `a` can be given to a host of `net` (not its network or broadcast address).
fn is_host_address(net: Subnet, a: Ipv4Addr) -> bool {
    let size = 1u64 << (32 - net.prefix);
    let off = u64::from(u32::from(a).wrapping_sub(u32::from(net.base)));
    net.contains(a) && off != 0 && off != size - 1
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> InstanceError {
    move |source| InstanceError::Io { what, source }
}

fn netif(what: &str) -> impl Fn(cela_guest::netif::NetifError) -> InstanceError + '_ {
    move |e| InstanceError::Other(format!("{what}: {e}"))
}

/// The networks directory of a data dir.
#[derive(Debug, Clone)]
pub struct Networks {
    records: JsonDir,
    data_dir: PathBuf,
}

/// The lock all changes to networks are made under.
struct Lock(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl Networks {
    pub fn open(data_dir: &Path) -> Result<Networks, InstanceError> {
        Ok(Networks {
            records: JsonDir::open(data_dir.join("networks"))?,
            data_dir: data_dir.to_owned(),
        })
    }

    fn lock(&self) -> Result<Lock, InstanceError> {
        self.records.lock().map(Lock)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.records.path(name)
    }

    fn read(path: &Path) -> Result<Network, InstanceError> {
        JsonDir::read(path)
    }

    fn save(&self, net: &Network) -> Result<(), InstanceError> {
        self.records.save(&net.name, net)
    }

    /// Makes the built-in [`DEFAULT_NETWORK`] (a free /24 of [`POOL`], NAT'd) if `atts`
    /// name it and it does not exist yet; nothing for any other network, which `cela
    /// network create` makes.
    pub fn ensure_builtin(&self, atts: &[Attachment]) -> Result<(), InstanceError> {
        if !atts.iter().any(|a| a.network == DEFAULT_NETWORK) {
            return Ok(());
        }
        let _lock = self.lock()?;
        self.builtin_locked()
    }

    /// [`Networks::ensure_builtin`] under the records' lock.
    fn builtin_locked(&self) -> Result<(), InstanceError> {
        if self.path(DEFAULT_NETWORK).exists() {
            return Ok(());
        }
        let req = CreateRequest {
            name: DEFAULT_NETWORK.to_owned(),
            subnet: None,
            gateway: None,
            internal: false,
            nat: true,
        };
        match self.create_locked(&req) {
            Ok(net) => {
                tracing::info!(
                    "made the default network {DEFAULT_NETWORK} ({})",
                    net.subnet
                );
                Ok(())
            }
            Err(e) => Err(InstanceError::Other(format!(
                "making the default network {DEFAULT_NETWORK} (a NAT'd bridge; `--net none` runs without a network): {e}"
            ))),
        }
    }

    /// The network `name`.
    pub fn get(&self, name: &str) -> Result<Network, InstanceError> {
        if !valid_name(name) || !self.path(name).exists() {
            return Err(InstanceError::Invalid(format!(
                "no network named {name} (see `cela network ls`)"
            )));
        }
        Self::read(&self.path(name))
    }

    /// Every network, by name.
    pub fn list(&self) -> Result<Vec<Network>, InstanceError> {
        self.records.list(valid_name)
    }

    /// `cela network create`: the bridge, its address, its packet filter and its record, or
    /// (on any failure) none of them.
    pub fn create(&self, req: &CreateRequest) -> Result<Network, InstanceError> {
        if !valid_name(&req.name) {
            return Err(InstanceError::BadName(req.name.clone()));
        }
        // `--net` takes these as modes, never as networks; `bridge` is the built-in one, made
        // on first use, always NAT'd.
        if RESERVED_NAMES.contains(&req.name.as_str()) {
            return Err(InstanceError::Invalid(format!(
                "{} is a name cela keeps (--net {}): give the network another",
                req.name, req.name
            )));
        }
        if req.internal && req.nat {
            return Err(InstanceError::Invalid(
                "a network is either --internal (no way out) or --nat (a way out), not both".into(),
            ));
        }
        let _lock = self.lock()?;
        if self.path(&req.name).exists() {
            return Err(InstanceError::Invalid(format!(
                "a network named {} exists already",
                req.name
            )));
        }
        self.create_locked(req)
    }

    /// [`Networks::create`] under the records' lock. The subnet is picked and its bridge
    /// addressed under the host-wide address lock too, so two data directories (or `--net
    /// auto` links) making a network at once never take the same free subnet.
    fn create_locked(&self, req: &CreateRequest) -> Result<Network, InstanceError> {
        let _host = cela_vmm::net::address_lock();
        let others = self.list()?;
        let host = cela_vmm::net::host_networks(None)
            .map_err(io_err("reading this host's addresses and routes".into()))?;
        let taken = |s: &Subnet| -> Option<String> {
            others
                .iter()
                .find(|n| n.subnet().is_ok_and(|o| o.overlaps(s)))
                .map(|n| format!("network {} ({})", n.name, n.subnet))
                .or_else(|| {
                    host.iter()
                        .find(|h| h.overlaps(s))
                        .map(|h| format!("this host's {h}"))
                })
        };
        let subnet = match &req.subnet {
            Some(s) => {
                let net = parse_subnet(s)
                    .map_err(|why| InstanceError::Invalid(format!("--subnet {why}")))?;
                if let Some(what) = taken(&net) {
                    return Err(InstanceError::Invalid(format!(
                        "--subnet {s} overlaps {what}"
                    )));
                }
                net
            }
            None => (0..256u32)
                .map(|i| Subnet {
                    base: Ipv4Addr::from(u32::from(POOL.base) + (i << 8)),
                    prefix: 24,
                })
                .find(|s| taken(s).is_none())
                .ok_or_else(|| {
                    InstanceError::Other(format!(
                        "every /24 of {POOL} is taken by a network or by this host: give --subnet"
                    ))
                })?,
        };
        let gateway = match &req.gateway {
            None => subnet.host(1),
            Some(g) => {
                let g: Ipv4Addr = g.parse().map_err(|_| {
                    InstanceError::Invalid(format!("--gateway {g:?} is not an IPv4 address"))
                })?;
                if !is_host_address(subnet, g) {
                    return Err(InstanceError::Invalid(format!(
                        "--gateway {g} is not a host address of {subnet}"
                    )));
                }
                g
            }
        };
        let id = crate::record::new_id()?;
        let net = Network {
            bridge: format!("{BRIDGE_PREFIX}{}", &id[..8]),
            id,
            name: req.name.clone(),
            subnet: format!("{}/{}", subnet.base, subnet.prefix),
            gateway,
            internal: req.internal,
            nat: req.nat,
            created: crate::record::now(),
            endpoints: BTreeMap::new(),
        };
        // The record first: a create killed half-way leaves a network `cela network rm`
        // removes (with whatever of its bridge and filter was made), never host state that no
        // record names.
        self.save(&net)?;
        let made = (|| {
            make_bridge(&net, subnet)?;
            firewall::install(&net.rules(subnet))?;
            guard::install(&net.id)?;
            if net.nat {
                // As Docker does for its NAT'd bridges: the host routes for them.
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                    .doing(|| "enabling IPv4 forwarding (net.ipv4.ip_forward)".into())?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = firewall::remove(&net.id);
            let _ = guard::remove(&net.id);
            // Only a bridge of this network's name, which the id makes cela's own.
            let _ = rtnl::delete_link(&net.bridge);
            let _ = std::fs::remove_file(self.path(&net.name));
            return Err(e);
        }
        Ok(net)
    }

    /// `cela network rm`: refused while an instance runs on it; otherwise its bridge, packet
    /// filter and record go (what a crash left of its endpoints too).
    pub fn remove(&self, name: &str) -> Result<(), InstanceError> {
        let _lock = self.lock()?;
        let mut net = self.get(name)?;
        self.prune(&mut net);
        if !net.endpoints.is_empty() {
            let mut users: Vec<&str> = net
                .endpoints
                .values()
                .map(|e| e.instance.as_str())
                .collect();
            users.sort_unstable();
            return Err(InstanceError::Invalid(format!(
                "network {name} is in use by {} (stop or remove {} first)",
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" }
            )));
        }
        // The bridge first: while its filter stands, nothing joins or leaves it unwalled.
        match rtnl::delete_link(&net.bridge) {
            Err(e) if e.raw_os_error() != Some(libc::ENODEV) => {
                return Err(io_err(format!("deleting the bridge {}", net.bridge))(e));
            }
            _ => {}
        }
        firewall::remove(&net.id)?;
        guard::remove(&net.id)?;
        std::fs::remove_file(self.path(name))
            .doing(|| format!("removing {}", self.path(name).display()))
    }

    /// Makes `net`'s bridge (with its address, up) and its packet filter again if either is
    /// gone.
    fn ensure(&self, net: &Network, subnet: Subnet) -> Result<(), InstanceError> {
        if super::ifindex(&net.bridge).is_none() {
            make_bridge(net, subnet)?;
        }
        if !firewall::exists(&net.id) {
            firewall::install(&net.rules(subnet))?;
        }
        if !guard::exists(&net.id) {
            // Made again (an upgrade, `nft flush ruleset`): the ports still there are
            // guarded again too.
            guard::install(&net.id)?;
            for ep in net.endpoints.values() {
                if super::ifindex(&ep.interface) == Some(ep.ifindex) {
                    guard::admit(&net.id, &ep.interface, &ep.mac)?;
                }
            }
        }
        if net.nat {
            // After a reboot too.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .doing(|| "enabling IPv4 forwarding (net.ipv4.ip_forward)".into())?;
        }
        Ok(())
    }

    /// Drops the endpoints whose instance no longer runs, deleting their links (their
    /// supervisor was killed before it could).
    fn prune(&self, net: &mut Network) {
        let Ok(instances) = Instances::open(&self.data_dir) else {
            return;
        };
        let live = |id: &str| {
            let inst = instances.root().join(id);
            crate::record::read_json(&inst.join("config.json")).is_ok_and(|config| {
                let inst = Instance { dir: inst, config };
                matches!(
                    inst.state().map(|s| s.status),
                    Ok(Status::Running | Status::Created)
                )
            })
        };
        let stale: Vec<String> = net
            .endpoints
            .keys()
            .filter(|id| !live(id))
            .cloned()
            .collect();
        for id in stale {
            if let Some(ep) = net.endpoints.remove(&id) {
                delete_link_if_same(&ep.interface, ep.ifindex);
                guard::forget(&net.id, &ep.interface, &ep.mac);
                // Its address is free again: nothing may still send it the host's traffic.
                super::ports::unpublish(&id);
            }
        }
    }

    /// Takes an address on `net` for `inst` (the one `att` asks for, or the lowest free) and
    /// records the endpoint `make` returns for it: `make` gets the address and MAC and
    /// creates the link, returning its name and index. Under the lock; the network's
    /// instances' hosts files are rewritten after.
    fn join(
        &self,
        inst: &Instance,
        att: &Attachment,
        peer: &str,
        make: impl FnOnce(&Network, Subnet, Ipv4Addr, [u8; 6]) -> Result<(String, u32), InstanceError>,
    ) -> Result<(Network, Endpoint), InstanceError> {
        let _lock = self.lock()?;
        // The built-in network comes back for an instance made while it existed (`network
        // rm bridge` between a stop and a start).
        if att.network == DEFAULT_NETWORK {
            self.builtin_locked()?;
        }
        let mut net = self.get(&att.network)?;
        self.prune(&mut net);
        let subnet = net.subnet()?;
        let used = |a: Ipv4Addr| {
            a == net.gateway
                || net
                    .endpoints
                    .iter()
                    .any(|(id, e)| e.address == a && *id != inst.config.id)
        };
        let address = match att.ip {
            Some(a) if !is_host_address(subnet, a) => {
                return Err(InstanceError::Invalid(format!(
                    "--net {},ip={a}: not a host address of its subnet {}",
                    net.name, net.subnet
                )));
            }
            Some(a) if used(a) => {
                return Err(InstanceError::Invalid(format!(
                    "--net {},ip={a}: the address is taken on {}",
                    net.name, net.name
                )));
            }
            Some(a) => a,
            None => {
                let size = 1u32 << (32 - subnet.prefix);
                (1..size - 1)
                    .map(|i| subnet.host(i))
                    .find(|a| !used(*a))
                    .ok_or_else(|| {
                        InstanceError::Other(format!(
                            "network {} has no free address left in {}",
                            net.name, net.subnet
                        ))
                    })?
            }
        };
        let mac = match &att.mac {
            Some(m) => parse_mac(m).ok_or_else(|| {
                InstanceError::Invalid(format!("--net {}: mac={m} is not a unicast MAC", net.name))
            })?,
            None => cela_vmm::net::random_mac(),
        };
        let taken_mac = format_mac(&mac);
        if let Some(other) = net
            .endpoints
            .iter()
            .find(|(id, e)| e.mac == taken_mac && **id != inst.config.id)
        {
            return Err(InstanceError::Invalid(format!(
                "--net {},mac={taken_mac}: {} on {} has that MAC",
                net.name, other.1.instance, net.name
            )));
        }
        // Its bridge and packet filter are made again if they are gone (a reboot takes the
        // bridge, `nft flush ruleset` the table): never a join without the network's walls.
        self.ensure(&net, subnet)?;
        // What an earlier run of this instance left here (its supervisor killed, it started
        // again before anything pruned it) goes first: its old link and guard entry.
        if let Some(old) = net.endpoints.remove(&inst.config.id) {
            delete_link_if_same(&old.interface, old.ifindex);
            guard::forget(&net.id, &old.interface, &old.mac);
        }
        let (interface, ifindex) = make(&net, subnet, address, mac)?;
        let ep = Endpoint {
            instance: inst.config.name.clone(),
            address,
            mac: format_mac(&mac),
            interface,
            ifindex,
            peer: peer.to_owned(),
        };
        net.endpoints.insert(inst.config.id.clone(), ep.clone());
        if let Err(e) = self.save(&net) {
            delete_link_if_same(&ep.interface, ep.ifindex);
            guard::forget(&net.id, &ep.interface, &ep.mac);
            return Err(e);
        }
        self.rewrite_hosts(&[&net]);
        Ok((net, ep))
    }

    /// Joins the container `inst` to its networks (its config's order: `eth0`, `eth1`, …)
    /// inside the network namespace open as `netns`. On error, what was joined is left.
    pub fn join_container(&self, inst: &Instance, netns: &File) -> Result<(), InstanceError> {
        let mut routed = false;
        for (i, att) in inst.config.networks.iter().enumerate() {
            let net = self.join_one(inst, i, att, netns, routed)?;
            routed |= !net.internal;
        }
        Ok(())
    }

    /// Joins the container `inst` to `att`'s network as `eth<i>` in `netns`, with the default
    /// route unless an earlier network gave one (`routed`).
    fn join_one(
        &self,
        inst: &Instance,
        i: usize,
        att: &Attachment,
        netns: &File,
        routed: bool,
    ) -> Result<Network, InstanceError> {
        let host_end = format!("cv{}{i:x}", inst.config.id);
        let peer = format!("eth{i}");
        let (net, _) = self.join(inst, att, &peer, |net, subnet, address, mac| {
            rtnl::add_veth(&host_end, &peer, std::os::fd::AsFd::as_fd(netns)).map_err(io_err(
                format!("creating the veth pair {host_end} ↔ {peer}"),
            ))?;
            let plugged = (|| {
                let index = plug(net, &host_end, &format_mac(&mac))?;
                let gateway = (!routed && !net.internal).then_some(net.gateway);
                super::in_netns(netns, || {
                    cela_guest::netif::set_mac(&peer, mac).map_err(super::netif)?;
                    cela_guest::netif::set_ipv4(&peer, address, subnet.prefix)
                        .map_err(super::netif)?;
                    cela_guest::netif::set_up(&peer).map_err(super::netif)?;
                    match gateway {
                        Some(g) => cela_guest::netif::add_default_route(g).map_err(super::netif),
                        None => Ok(()),
                    }
                })?;
                Ok(index)
            })();
            match plugged {
                Ok(index) => Ok((host_end.clone(), index)),
                Err(e) => {
                    let _ = rtnl::delete_link(&host_end);
                    guard::forget(&net.id, &host_end, &format_mac(&mac));
                    Err(e)
                }
            }
        })?;
        Ok(net)
    }

    /// `cela network connect`: the running container `inst` joins `att`'s network now, as its
    /// lowest free `eth<n>`, and on every later start (it is added to its config).
    pub fn connect(&self, inst: &Instance, att: Attachment) -> Result<(), InstanceError> {
        let config = &inst.config;
        if config.kind != crate::record::Kind::Container {
            return Err(InstanceError::Unsupported(format!(
                "{} is a microVM: it joins its network when it starts (`cela run --vm --net NAME`)",
                config.name
            )));
        }
        if config.net != super::NetMode::None {
            return Err(InstanceError::Invalid(format!(
                "{} has --net {}: named networks are for containers with a namespace of their own",
                config.name,
                config.net.as_str()
            )));
        }
        if config.networks.iter().any(|a| a.network == att.network) {
            return Err(InstanceError::Invalid(format!(
                "{} is on network {} already",
                config.name, att.network
            )));
        }
        if config.networks.len() >= MAX_ATTACHMENTS {
            return Err(InstanceError::Invalid(format!(
                "{} is on {MAX_ATTACHMENTS} networks, the most a container joins",
                config.name
            )));
        }
        self.get(&att.network)?;
        let state = inst.state()?;
        if state.status != Status::Running {
            return Err(InstanceError::WrongState {
                name: config.name.clone(),
                status: state.status.to_string(),
                hint: "connect joins a running container (start it, or give --net to run)",
            });
        }
        let netns_path = super::netns_path(inst);
        let netns =
            File::open(&netns_path).doing(|| format!("opening {}", netns_path.display()))?;
        // The interfaces it has: those its networks' records name (a disconnect leaves gaps).
        let mine: Vec<Endpoint> = self
            .list()?
            .into_iter()
            .filter_map(|n| n.endpoints.get(&config.id).cloned())
            .collect();
        let n = (0..MAX_ATTACHMENTS)
            .find(|n| !mine.iter().any(|e| e.peer == format!("eth{n}")))
            .unwrap_or(MAX_ATTACHMENTS);
        let routed = config
            .networks
            .iter()
            .any(|a| self.get(&a.network).is_ok_and(|net| !net.internal));
        self.join_one(inst, n, &att, &netns, routed)?;
        // Recorded under the lock, from the config as it is now (another connect or
        // disconnect may have changed it meanwhile).
        let recorded = self.lock().and_then(|_lock| {
            let path = inst.dir.join("config.json");
            let mut now: crate::record::InstanceConfig = crate::record::read_json(&path)?;
            now.networks.push(att.clone());
            crate::record::write_json(&path, &now)
        });
        if let Err(e) = recorded {
            self.leave_one(inst, &att.network, Some(&netns));
            return Err(e);
        }
        Ok(())
    }

    /// `cela network disconnect`: the container `inst` leaves network `name` (now, if it
    /// runs, and for good: it is taken out of its config). Not the network its ports are
    /// published to (its first), while it has any.
    pub fn disconnect(&self, inst: &Instance, name: &str) -> Result<(), InstanceError> {
        let config = &inst.config;
        if config.kind != crate::record::Kind::Container {
            return Err(InstanceError::Unsupported(format!(
                "{} is a microVM: its network is the one it started with",
                config.name
            )));
        }
        let Some(i) = config.networks.iter().position(|a| a.network == name) else {
            return Err(InstanceError::Invalid(format!(
                "{} is not on network {name}",
                config.name
            )));
        };
        if i == 0 && !config.ports.is_empty() {
            return Err(InstanceError::Invalid(format!(
                "{} publishes ports to its address on {name}: remove it, or run it again without -p",
                config.name
            )));
        }
        let netns = File::open(super::netns_path(inst)).ok();
        self.leave_one(inst, name, netns.as_ref());
        let _lock = self.lock()?;
        let path = inst.dir.join("config.json");
        let mut now: crate::record::InstanceConfig = crate::record::read_json(&path)?;
        now.networks.retain(|a| a.network != name);
        crate::record::write_json(&path, &now)
    }

    /// Takes `inst` off network `name`: its interface there in `netns` (with its host end),
    /// the endpoint, and its name in the others' hosts files.
    fn leave_one(&self, inst: &Instance, name: &str, netns: Option<&File>) {
        let Ok(_lock) = self.lock() else { return };
        let Ok(mut net) = self.get(name) else { return };
        let Some(ep) = net.endpoints.remove(&inst.config.id) else {
            return;
        };
        if let Some(netns) = netns
            && !ep.peer.is_empty()
        {
            let _ = super::in_netns(netns, || {
                let _ = rtnl::delete_link(&ep.peer);
                Ok(())
            });
        }
        delete_link_if_same(&ep.interface, ep.ifindex);
        guard::forget(&net.id, &ep.interface, &ep.mac);
        if let Err(e) = self.save(&net) {
            tracing::warn!("recording that {} left {}: {e}", ep.instance, net.name);
        }
        self.rewrite_hosts(&[&net]);
        // Its own file no longer lists that network's instances.
        let own = inst.dir.join(HOSTS_FILE);
        if own.exists()
            && let Ok(all) = self.list()
        {
            let _ = write_hosts(&own, &hosts_of(&all, &inst.config.id));
        }
    }

    /// Joins the microVM `inst` to its networks, in its config's order, each through its TAP
    /// of `taps` (plugged into the bridge and brought up); what its guest must configure for
    /// each card (the default route through the first network that has a gateway). On error,
    /// what was joined is left joined: the caller leaves them all ([`Networks::leave`]).
    pub fn join_vm(
        &self,
        inst: &Instance,
        taps: &[&str],
    ) -> Result<Vec<cela_guest::NetRequest>, InstanceError> {
        if inst.config.networks.len() != taps.len() {
            return Err(InstanceError::Other(format!(
                "{} networks and {} network cards",
                inst.config.networks.len(),
                taps.len()
            )));
        }
        let mut routed = false;
        let mut out = Vec::new();
        for (att, tap) in inst.config.networks.iter().zip(taps) {
            if att.mac.is_some() {
                return Err(InstanceError::Invalid(
                    "--net NAME,mac= is for containers: a microVM's MAC is its NIC's".into(),
                ));
            }
            let (net, ep) = self.join(inst, att, "", |net, _, _, mac| {
                plug(net, tap, &format_mac(&mac)).map(|index| (tap.to_string(), index))
            })?;
            let subnet = net.subnet()?;
            let gateway = if net.internal || routed {
                Ipv4Addr::UNSPECIFIED
            } else {
                net.gateway
            };
            routed |= !net.internal;
            out.push(cela_guest::NetRequest {
                address: ep.address,
                prefix: subnet.prefix,
                gateway,
                mac: parse_mac(&ep.mac).ok_or_else(|| {
                    InstanceError::Other(format!("a malformed MAC recorded: {}", ep.mac))
                })?,
            });
        }
        Ok(out)
    }

    /// Removes the instance `id` from every network it is on (its links deleted), and
    /// rewrites the others' hosts files.
    pub fn leave(&self, id: &str) {
        let Ok(_lock) = self.lock() else { return };
        let Ok(nets) = self.list() else { return };
        let mut changed = Vec::new();
        for mut net in nets {
            if let Some(ep) = net.endpoints.remove(id) {
                delete_link_if_same(&ep.interface, ep.ifindex);
                guard::forget(&net.id, &ep.interface, &ep.mac);
                if let Err(e) = self.save(&net) {
                    tracing::warn!("recording that {} left {}: {e}", ep.instance, net.name);
                }
                changed.push(net);
            }
        }
        self.rewrite_hosts(&changed.iter().collect::<Vec<_>>());
    }

    /// `inst`'s address on its first network, while it is on it, with the network's subnet.
    pub fn address_of(&self, inst: &Instance) -> Option<(Ipv4Addr, (Ipv4Addr, u8))> {
        let first = inst.config.networks.first()?;
        let net = self.get(&first.network).ok()?;
        let subnet = net.subnet().ok()?;
        net.endpoints
            .get(&inst.config.id)
            .map(|e| (e.address, (subnet.base, subnet.prefix)))
    }

    /// Publishes `inst`'s ports to `target` (see [`super::ports`]), under the networks lock so
    /// that two instances starting at once cannot both take a port: refused if another running
    /// instance publishes one of them, or a host process has bound it.
    pub fn publish(
        &self,
        inst: &Instance,
        target: Ipv4Addr,
        subnet: (Ipv4Addr, u8),
    ) -> Result<(), InstanceError> {
        let _lock = self.lock()?;
        let instances = Instances::open(&self.data_dir)?;
        for other in instances.list()? {
            if other.config.id == inst.config.id || other.config.ports.is_empty() {
                continue;
            }
            // Its ports are its own while a supervisor runs it (from its claim, before its
            // workload runs); a supervisor that was killed left a table nothing else removes
            // until `rm`: gone now, before its port is given to another.
            let holding = other.state().is_ok_and(|s| {
                s.status == Status::Running
                    || (s.status == Status::Created && s.supervisor.is_some_and(|p| p.alive()))
            });
            if !holding {
                super::ports::unpublish(&other.config.id);
                continue;
            }
            for p in &inst.config.ports {
                if let Some(q) = other.config.ports.iter().find(|q| q.clashes(p)) {
                    return Err(InstanceError::Invalid(format!(
                        "-p {}: the host port is published by {} ({})",
                        p.display(),
                        other.config.name,
                        q.display()
                    )));
                }
            }
        }
        if let Some(p) = inst
            .config
            .ports
            .iter()
            .find(|p| super::ports::bound_on_host(p))
        {
            return Err(InstanceError::Invalid(format!(
                "-p {}: a process of the host uses port {}/{}",
                p.display(),
                p.host_port,
                p.protocol.as_str()
            )));
        }
        super::ports::publish(&inst.config.id, target, subnet, &inst.config.ports)
    }

    /// Rewrites the hosts file of every container on `nets`.
    fn rewrite_hosts(&self, nets: &[&Network]) {
        let Ok(all) = self.list() else { return };
        let ids: std::collections::BTreeSet<&String> =
            nets.iter().flat_map(|n| n.endpoints.keys()).collect();
        for id in ids {
            let dir = self.data_dir.join("instances").join(id);
            let file = dir.join(HOSTS_FILE);
            if !file.exists() {
                continue;
            }
            if let Err(e) = write_hosts(&file, &hosts_of(&all, id)) {
                tracing::warn!("rewriting {}: {e}", file.display());
            }
        }
    }

    /// Writes the hosts file `path` of the instance `id`, under the lock, so that a join
    /// after this rewrites it and none before is missing from it.
    pub fn write_initial_hosts(&self, id: &str, path: &Path) -> Result<(), InstanceError> {
        let _lock = self.lock()?;
        let text = hosts_of(&self.list()?, id);
        create_hosts(path, &text).doing(|| format!("writing {}", path.display()))
    }
}

/// The hosts file of a container on networks, in its instance directory.
pub const HOSTS_FILE: &str = "hosts";

/// The hosts file of instance `id`: loopback, then each instance on a network `id` is on
/// (itself first), by address.
fn hosts_of(nets: &[Network], id: &str) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let mine: Vec<&Network> = nets
        .iter()
        .filter(|n| n.endpoints.contains_key(id))
        .collect();
    for net in &mine {
        if let Some(me) = net.endpoints.get(id) {
            out.push_str(&format!("{}\t{}\n", me.address, me.instance));
        }
    }
    for net in &mine {
        for (other, ep) in &net.endpoints {
            if other != id {
                out.push_str(&format!("{}\t{}\n", ep.address, ep.instance));
            }
        }
    }
    out
}

/// Writes a container's first hosts file (replacing one of an earlier run; never through a
/// link).
pub fn create_hosts(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// Rewrites `path` in place (its inode is bind-mounted into the container).
fn write_hosts(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = File::options()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// Creates `net`'s bridge, gives it the gateway's address (unless the network is internal)
/// and brings it up.
fn make_bridge(net: &Network, subnet: Subnet) -> Result<(), InstanceError> {
    rtnl::add_bridge(&net.bridge).map_err(io_err(format!("creating the bridge {}", net.bridge)))?;
    if !net.internal {
        cela_guest::netif::set_ipv4(&net.bridge, net.gateway, subnet.prefix)
            .map_err(netif("addressing the bridge"))?;
    }
    cela_guest::netif::set_up(&net.bridge).map_err(netif("bringing the bridge up"))
}

/// Plugs the host link `port` into `net`'s bridge and brings it up, admitted by the
/// network's port guard with `mac` alone ([`super::guard`]); its index.
fn plug(net: &Network, port: &str, mac: &str) -> Result<u32, InstanceError> {
    let index = super::ifindex(port)
        .ok_or_else(|| InstanceError::Other(format!("the new link {port} is not listed")))?;
    guard::admit(&net.id, port, mac)?;
    let plugged = (|| {
        let bridge = super::ifindex(&net.bridge).ok_or_else(|| {
            InstanceError::Other(format!(
                "network {}: its bridge {} is gone (remove and create the network again)",
                net.name, net.bridge
            ))
        })?;
        rtnl::set_controller(index, bridge)
            .map_err(io_err(format!("plugging {port} into {}", net.bridge)))?;
        cela_guest::netif::set_up(port).map_err(netif("bringing the link up"))
    })();
    match plugged {
        Ok(()) => Ok(index),
        Err(e) => {
            // Its MAC's entry goes; the port's stays until the link does (its caller
            // deletes it), so it is never unguarded while it exists.
            guard::forget(&net.id, port, mac);
            Err(e)
        }
    }
}

/// Deletes the link `name` if it still has index `ifindex`.
fn delete_link_if_same(name: &str, ifindex: u32) {
    if super::ifindex(name) == Some(ifindex)
        && let Err(e) = rtnl::delete_link(name)
        && e.raw_os_error() != Some(libc::ENODEV)
    {
        tracing::warn!("deleting {name}: {e}");
    }
}

/// The instance id a (possibly retired) instance directory stands for.
pub fn id_of_dir(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    let id = name.strip_prefix(".removing-").unwrap_or(name);
    crate::record::is_id(id).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attachment_given_in_parts_is_checked_as_one_given_whole() {
        let a = Attachment::of("lan", Some("10.9.0.7"), Some("02:AA:00:00:00:01")).unwrap();
        assert_eq!(
            a,
            Attachment::parse("lan,ip=10.9.0.7,mac=02:aa:00:00:00:01").unwrap()
        );
        // A value cannot smuggle in another part.
        assert!(Attachment::of("lan", Some("10.9.0.7,mac=02:00:00:00:00:01"), None).is_err());
        assert!(Attachment::of("lan", None, Some("02:00:00:00:00:01,ip=1.2.3.4")).is_err());
        assert!(Attachment::of("lan", None, Some("01:00:5e:00:00:01")).is_err());
        assert!(Attachment::of("la,n", None, None).is_err());
    }

    #[test]
    fn attachments_parse_with_their_options() {
        assert_eq!(
            Attachment::parse("lan").unwrap(),
            Attachment {
                network: "lan".into(),
                ip: None,
                mac: None
            }
        );
        let a = Attachment::parse("lan,ip=10.0.0.5,mac=02:AA:bb:cc:dd:ee").unwrap();
        assert_eq!(a.ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(a.mac.as_deref(), Some("02:aa:bb:cc:dd:ee"));
        for (bad, needle) in [
            ("", "not a network name"),
            ("a b", "not a network name"),
            ("lan,ip=10.0.0", "not an IPv4 address"),
            ("lan,mac=01:00:00:00:00:01", "not a unicast MAC"),
            ("lan,mac=00:00:00:00:00:00", "not a unicast MAC"),
            ("lan,ip=10.0.0.1,ip=10.0.0.2", "once each"),
            ("lan,speed=10", "expected ip=ADDR or mac=MAC"),
        ] {
            let e = Attachment::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn subnets_are_aligned_and_sized() {
        assert_eq!(
            parse_subnet("10.9.0.0/16").unwrap(),
            Subnet {
                base: Ipv4Addr::new(10, 9, 0, 0),
                prefix: 16
            }
        );
        for (bad, needle) in [
            ("10.9.0.1/16", "host bits set (the network is 10.9.0.0/16)"),
            ("10.9.0.0", "not A.B.C.D/PREFIX"),
            ("10.9.0.0/31", "prefix must be 8 to 30"),
            ("10.9.0.0/x", "prefix must be 8 to 30"),
            ("10.9.0/24", "not an IPv4 address"),
        ] {
            let e = parse_subnet(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let net = parse_subnet("10.9.0.0/30").unwrap();
        assert!(!is_host_address(net, Ipv4Addr::new(10, 9, 0, 0)));
        assert!(is_host_address(net, Ipv4Addr::new(10, 9, 0, 1)));
        assert!(is_host_address(net, Ipv4Addr::new(10, 9, 0, 2)));
        assert!(!is_host_address(net, Ipv4Addr::new(10, 9, 0, 3)));
        assert!(!is_host_address(net, Ipv4Addr::new(10, 9, 0, 4)));
    }

    #[test]
    fn a_hosts_file_lists_itself_first_then_its_networks_instances() {
        let ep = |name: &str, last: u8| Endpoint {
            instance: name.into(),
            address: Ipv4Addr::new(10, 214, 0, last),
            mac: "02:00:00:00:00:01".into(),
            interface: "x".into(),
            ifindex: 1,
            peer: "eth0".into(),
        };
        let net = Network {
            id: "0123456789ab".into(),
            name: "lan".into(),
            subnet: "10.214.0.0/24".into(),
            gateway: Ipv4Addr::new(10, 214, 0, 1),
            bridge: "cbr-01234567".into(),
            internal: false,
            nat: false,
            created: String::new(),
            endpoints: [
                ("aaaaaaaaaaaa".to_owned(), ep("web", 2)),
                ("bbbbbbbbbbbb".to_owned(), ep("db", 3)),
            ]
            .into_iter()
            .collect(),
        };
        let other = Network {
            name: "other".into(),
            endpoints: [("cccccccccccc".to_owned(), ep("far", 9))]
                .into_iter()
                .collect(),
            ..net.clone()
        };
        let hosts = hosts_of(&[net, other], "bbbbbbbbbbbb");
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n"), "{hosts}");
        let lines: Vec<&str> = hosts.lines().skip(2).collect();
        assert_eq!(lines, ["10.214.0.3\tdb", "10.214.0.2\tweb"]);
    }

    #[test]
    fn a_retired_directory_still_names_its_instance() {
        assert_eq!(
            id_of_dir(Path::new("/d/instances/.removing-0123456789ab")).as_deref(),
            Some("0123456789ab")
        );
        assert_eq!(
            id_of_dir(Path::new("/d/instances/0123456789ab")).as_deref(),
            Some("0123456789ab")
        );
        assert_eq!(id_of_dir(Path::new("/d/instances/x")), None);
    }
}
