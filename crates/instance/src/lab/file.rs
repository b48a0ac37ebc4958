//! The lab file: a topology in YAML, shaped as containerlab's `.clab.yml` (its `name`,
//! `topology.nodes`, `topology.links[].endpoints` and `kind`/`image`/`cmd`/`env` words), read
//! bounded and checked whole before anything is made. [`LabFile::plan`] turns it into the
//! [`Plan`] `lab up` carries out: every name, interface, address and route settled.
//!
//! ```yaml
//! name: line
//! topology:
//!   defaults: {image: bbox:local, cmd: [sleep, "600"]}
//!   networks:
//!     lan: {subnet: 10.99.0.0/24}
//!   nodes:
//!     h1: {routes: ["10.0.2.0/24 via 10.0.1.2"]}
//!     r1: {sysctls: {net.ipv4.ip_forward: "1"}}
//!     h2: {routes: ["default via 10.0.2.1"], networks: [lan]}
//!   links:
//!     - endpoints: ["h1:eth1", "r1:eth1"]
//!       addresses: ["10.0.1.1/24", "10.0.1.2/24"]
//!       impair: {delay: 20ms, loss: 1%}
//!     - endpoints: ["r1:eth2", "h2:eth1"]
//!       addresses: ["10.0.2.1/24", "10.0.2.2/24"]
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::impair::{ImpairSpec, Impairment};
use crate::record::Kind;

/// The largest lab file read.
pub const MAX_FILE: u64 = 1 << 20;
/// The most nodes and links a lab has.
pub const MAX_NODES: usize = 256;
pub const MAX_LINKS: usize = 1024;
/// The most routes and sysctls one node has.
const MAX_PER_NODE: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabFile {
    pub name: String,
    pub topology: Topology,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// What every node has unless it says otherwise.
    #[serde(default)]
    pub defaults: NodeSpec,
    /// Networks the lab makes (named `LAB-NAME`) and removes with it.
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkSpec>,
    pub nodes: BTreeMap<String, NodeSpec>,
    #[serde(default)]
    pub links: Vec<LinkSpec>,
}

/// A node as the file gives it; every field may come from `defaults`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// `container` (containerlab's `linux`) or `vm`.
    pub kind: Option<String>,
    pub image: Option<String>,
    /// The command: a list, or one string split at spaces.
    pub cmd: Option<Command>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cpus: Option<u32>,
    /// MiB.
    pub memory: Option<u64>,
    /// `DEST/PREFIX via GATEWAY` or `default via GATEWAY`.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Network-namespace sysctls (`net.*` only), e.g. `net.ipv4.ip_forward: "1"` (a
    /// container node's forwarding is off unless this turns it on).
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// The lab's networks (or existing cela networks) the node joins, in order: eth0, eth1, …
    #[serde(default)]
    pub networks: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Command {
    List(Vec<String>),
    Line(String),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub subnet: Option<String>,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub nat: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// Two `NODE:IFACE` ends.
    pub endpoints: [String; 2],
    /// Each end's `ADDR/PREFIX`, in the order of `endpoints` (`""`: none).
    pub addresses: Option<[String; 2]>,
    pub impair: Option<ImpairSpec>,
}

/// A node as `lab up` makes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedNode {
    pub name: String,
    pub kind: Kind,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub networks: Vec<String>,
    pub routes: Vec<Route>,
    pub sysctls: BTreeMap<String, String>,
}

/// `dest/prefix via gateway` (a default route is `0.0.0.0/0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dest: Ipv4Addr,
    pub prefix: u8,
    pub via: Ipv4Addr,
}

/// One end of a link: a node's interface and its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub node: String,
    pub iface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<(Ipv4Addr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedLink {
    pub ends: [End; 2],
    #[serde(default)]
    pub impair: Impairment,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedNetwork {
    /// The name in the file; the cela network is `LAB-NAME`.
    pub name: String,
    pub subnet: Option<String>,
    pub internal: bool,
    pub nat: bool,
}

/// Everything `lab up` makes, settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub networks: Vec<PlannedNetwork>,
    pub nodes: Vec<PlannedNode>,
    pub links: Vec<PlannedLink>,
}

/// Lab, node and network names: what instance names allow, short enough that `LAB-NODE` is
/// one (at most 64).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 31
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// An interface name a node's namespace can have (not `lo`).
fn valid_iface(s: &str) -> bool {
    !s.is_empty()
        && s.len() < libc::IFNAMSIZ
        && s != "lo"
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// `A.B.C.D/P`, with P in 1..=32.
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not ADDR/PREFIX"))?;
    let addr: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("{s:?}: the prefix must be 1-32"))?;
    Ok((addr, prefix))
}

/// `DEST/PREFIX via GW` or `default via GW`.
pub fn parse_route(s: &str) -> Result<Route, String> {
    let words: Vec<&str> = s.split_whitespace().collect();
    let [dest, "via", via] = words[..] else {
        return Err(format!("route {s:?} is not `DEST/PREFIX via GATEWAY`"));
    };
    let (dest, prefix) = if dest == "default" {
        (Ipv4Addr::UNSPECIFIED, 0)
    } else {
        let (a, p) = parse_cidr(dest).map_err(|e| format!("route {s:?}: {e}"))?;
        if subnet_of((a, p)).0 != u32::from(a) {
            return Err(format!("route {s:?}: {dest} has host bits set"));
        }
        (a, p)
    };
    let via = via
        .parse()
        .map_err(|_| format!("route {s:?}: {via:?} is not an IPv4 address"))?;
    Ok(Route { dest, prefix, via })
}

/// A `net.*` sysctl key, as a path beneath `/proc/sys`: dotted words of letters, digits,
/// `_` and `-` (no `..`, no `/`).
pub fn sysctl_path(key: &str) -> Result<String, String> {
    let ok = key.starts_with("net.")
        && key.len() <= 128
        && key.split('.').all(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        });
    if !ok {
        return Err(format!(
            "sysctl {key:?}: only net.* keys (the node's own network namespace) are set"
        ));
    }
    Ok(key.replace('.', "/"))
}

/// The network an address with its prefix is on: (network, prefix).
fn subnet_of((addr, prefix): (Ipv4Addr, u8)) -> (u32, u8) {
    (
        u32::from(addr) & u32::from(cela_guest::netif::netmask(prefix)),
        prefix,
    )
}

/// Every link address is a host's (not its subnet's network or broadcast address, below
/// /31) and no two ends share one.
fn check_addresses(links: &[PlannedLink]) -> Result<(), String> {
    let mut seen: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for e in links.iter().flat_map(|l| &l.ends) {
        let Some((addr, prefix)) = e.address else {
            continue;
        };
        let end = format!("{}:{}", e.node, e.iface);
        if prefix <= 30 {
            let hostmask = !u32::from(cela_guest::netif::netmask(prefix));
            let host = u32::from(addr) & hostmask;
            if host == 0 || host == hostmask {
                return Err(format!(
                    "{end}: {addr}/{prefix} is its subnet's network or broadcast address"
                ));
            }
        }
        if let Some(other) = seen.insert(addr, end.clone()) {
            return Err(format!("{end}: {addr} is {other}'s address too"));
        }
    }
    Ok(())
}

/// A node's routes go through gateways on its subnets (its links', its lab networks'), none
/// twice, and no default route beside one its networks give it.
fn check_routes(
    node: &PlannedNode,
    links: &[PlannedLink],
    networks: &[PlannedNetwork],
) -> Result<(), String> {
    let what = format!("node {}", node.name);
    let mut subnets: Vec<(u32, u8)> = links
        .iter()
        .flat_map(|l| &l.ends)
        .filter(|e| e.node == node.name)
        .filter_map(|e| e.address.map(subnet_of))
        .collect();
    // A network not the lab's, or whose subnet cela picks, is not known here.
    let mut unknown = false;
    let mut gives_default = false;
    for n in &node.networks {
        match networks.iter().find(|p| &p.name == n) {
            Some(p) => {
                gives_default |= !p.internal;
                match p.subnet.as_deref().map(parse_cidr) {
                    Some(Ok(s)) => subnets.push(subnet_of(s)),
                    _ => unknown = true,
                }
            }
            None => {
                unknown = true;
                gives_default = true;
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in &node.routes {
        let shown = format!("{}/{} via {}", r.dest, r.prefix, r.via);
        if !seen.insert((r.dest, r.prefix)) {
            return Err(format!("{what}: a second route to {}/{}", r.dest, r.prefix));
        }
        if r.prefix == 0 && gives_default {
            return Err(format!(
                "{what}: route {shown}: its network gives it a default route already (make the network internal, or route what you need)"
            ));
        }
        let reachable = subnets
            .iter()
            .any(|&(net, p)| subnet_of((r.via, p)) == (net, p));
        if !reachable && !unknown {
            return Err(format!(
                "{what}: route {shown}: {} is on none of its subnets",
                r.via
            ));
        }
    }
    Ok(())
}

impl LabFile {
    /// Parses a lab file's text (at most [`MAX_FILE`] bytes).
    pub fn parse(text: &str) -> Result<LabFile, String> {
        if text.len() as u64 > MAX_FILE {
            return Err(format!("the lab file is over {MAX_FILE} bytes"));
        }
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    /// Settles everything `lab up` makes, or names the first thing wrong.
    pub fn plan(&self, name: Option<&str>) -> Result<Plan, String> {
        let lab = name.unwrap_or(&self.name).to_owned();
        if !valid_name(&lab) {
            return Err(format!(
                "{lab:?} is not a lab name: 1-31 of a-z A-Z 0-9 _ . -, starting with a letter or digit"
            ));
        }
        let t = &self.topology;
        if t.nodes.is_empty() {
            return Err("the topology has no nodes".into());
        }
        if t.nodes.len() > MAX_NODES || t.links.len() > MAX_LINKS {
            return Err(format!(
                "at most {MAX_NODES} nodes and {MAX_LINKS} links in one lab"
            ));
        }
        let mut networks = Vec::new();
        for (n, spec) in &t.networks {
            if !valid_name(n) || lab.len() + 1 + n.len() > 64 {
                return Err(format!("network {n:?}: not a usable network name"));
            }
            if spec.internal && spec.nat {
                return Err(format!("network {n}: internal and nat exclude each other"));
            }
            networks.push(PlannedNetwork {
                name: n.clone(),
                subnet: spec.subnet.clone(),
                internal: spec.internal,
                nat: spec.nat,
            });
        }
        let mut nodes = Vec::new();
        for (n, spec) in &t.nodes {
            nodes.push(self.plan_node(&lab, n, spec)?);
        }
        let mut links = Vec::new();
        let mut used: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (i, l) in t.links.iter().enumerate() {
            let what = format!("link {} ({} – {})", i + 1, l.endpoints[0], l.endpoints[1]);
            let mut ends = Vec::new();
            for (k, e) in l.endpoints.iter().enumerate() {
                let (node, iface) = e
                    .split_once(':')
                    .ok_or_else(|| format!("{what}: endpoint {e:?} is not NODE:IFACE"))?;
                let planned = nodes
                    .iter()
                    .find(|p| p.name == node)
                    .ok_or_else(|| format!("{what}: no node {node:?}"))?;
                if !valid_iface(iface) {
                    return Err(format!(
                        "{what}: {iface:?} is not an interface name (a letter, then letters, digits, _ or -; at most 15)"
                    ));
                }
                // Networks are the node's eth0, eth1, … in order.
                let taken_by_network = iface
                    .strip_prefix("eth")
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| n < planned.networks.len());
                if taken_by_network {
                    return Err(format!(
                        "{what}: {node}'s {iface} is its network {} (networks take eth0, eth1, … in order)",
                        planned.networks[iface[3..].parse::<usize>().unwrap_or(0)]
                    ));
                }
                if let Some(other) = used.insert((node.to_owned(), iface.to_owned()), i + 1) {
                    return Err(format!("{what}: {e} is on link {other} already"));
                }
                let address = match &l.addresses {
                    Some(a) if !a[k].is_empty() => {
                        Some(parse_cidr(&a[k]).map_err(|e| format!("{what}: {e}"))?)
                    }
                    _ => None,
                };
                ends.push(End {
                    node: node.to_owned(),
                    iface: iface.to_owned(),
                    address,
                });
            }
            if ends[0].node == ends[1].node {
                return Err(format!("{what}: both ends are on {}", ends[0].node));
            }
            let impair = l
                .impair
                .as_ref()
                .map(|s| s.resolve())
                .transpose()
                .map_err(|e| format!("{what}: impair: {e}"))?
                .unwrap_or_default();
            let [a, b]: [End; 2] = ends.try_into().expect("two endpoints");
            if let (Some(x), Some(y)) = (a.address, b.address)
                && subnet_of(x) != subnet_of(y)
            {
                return Err(format!(
                    "{what}: {}/{} and {}/{} are not on one subnet",
                    x.0, x.1, y.0, y.1
                ));
            }
            links.push(PlannedLink {
                ends: [a, b],
                impair,
            });
        }
        check_addresses(&links)?;
        for n in nodes.iter().filter(|n| n.kind == Kind::Vm) {
            let cards = n.networks.len()
                + links
                    .iter()
                    .flat_map(|l| &l.ends)
                    .filter(|e| e.node == n.name)
                    .count();
            if cards > cela_vmm::config::MAX_NICS {
                return Err(format!(
                    "node {}: {cards} networks and links are more than the {} network cards a vm has",
                    n.name,
                    cela_vmm::config::MAX_NICS
                ));
            }
        }
        for n in &nodes {
            check_routes(n, &links, &networks)?;
        }
        Ok(Plan {
            name: lab,
            networks,
            nodes,
            links,
        })
    }

    fn plan_node(&self, lab: &str, name: &str, spec: &NodeSpec) -> Result<PlannedNode, String> {
        let d = &self.topology.defaults;
        let what = format!("node {name}");
        if !valid_name(name) || lab.len() + 1 + name.len() > 64 {
            return Err(format!(
                "{what}: not a node name (1-31 of a-z A-Z 0-9 _ . -, starting with a letter or digit)"
            ));
        }
        let kind = match spec.kind.as_deref().or(d.kind.as_deref()) {
            None | Some("container") | Some("linux") => Kind::Container,
            Some("vm") => Kind::Vm,
            Some(other) => {
                return Err(format!(
                    "{what}: kind {other:?} is neither container (linux) nor vm"
                ));
            }
        };
        let image = spec
            .image
            .clone()
            .or_else(|| d.image.clone())
            .ok_or_else(|| format!("{what}: no image (give one, or a default)"))?;
        let command = match spec.cmd.as_ref().or(d.cmd.as_ref()) {
            None => Vec::new(),
            Some(Command::List(v)) => v.clone(),
            Some(Command::Line(s)) => s.split_whitespace().map(str::to_owned).collect(),
        };
        let mut env: BTreeMap<&String, &String> = d.env.iter().collect();
        env.extend(spec.env.iter());
        let env = env
            .into_iter()
            .map(|(k, v)| {
                if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                    Err(format!(
                        "{what}: env {k:?} is empty, or has '=' in its name or a NUL"
                    ))
                } else {
                    Ok(format!("{k}={v}"))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pick =
            |a: &Vec<String>, b: &Vec<String>| if a.is_empty() { b.clone() } else { a.clone() };
        let routes = pick(&spec.routes, &d.routes);
        let networks = pick(&spec.networks, &d.networks);
        let mut sysctls = d.sysctls.clone();
        sysctls.extend(spec.sysctls.clone());
        // A node routes only if asked: a new namespace inherits the host's forwarding. Not
        // beside a forwarding key of the file's own (`ip_forward` and `conf.all.forwarding`
        // are one switch, and setting either resets every interface's).
        if !sysctls
            .keys()
            .any(|k| k.ends_with(".ip_forward") || k.ends_with(".forwarding"))
        {
            sysctls.insert("net.ipv4.ip_forward".to_owned(), "0".to_owned());
        }
        if routes.len() > MAX_PER_NODE || sysctls.len() > MAX_PER_NODE {
            return Err(format!(
                "{what}: at most {MAX_PER_NODE} routes and {MAX_PER_NODE} sysctls"
            ));
        }
        for (k, v) in &sysctls {
            sysctl_path(k).map_err(|e| format!("{what}: {e}"))?;
            if v.len() > 256 || v.contains('\0') {
                return Err(format!("{what}: sysctl {k}: value too long or with a NUL"));
            }
        }
        if kind == Kind::Vm {
            sysctls.clear();
        }
        if kind == Kind::Vm
            && (!routes.is_empty() || !spec.sysctls.is_empty() || !d.sysctls.is_empty())
        {
            return Err(format!(
                "{what}: routes and sysctls are set in containers' namespaces; a vm's guest sets its own"
            ));
        }
        if kind == Kind::Vm && networks.len() > cela_vmm::config::MAX_NICS {
            return Err(format!(
                "{what}: a vm joins at most {} networks (a network card each)",
                cela_vmm::config::MAX_NICS
            ));
        }
        for n in &networks {
            if !valid_name(n) {
                return Err(format!("{what}: {n:?} is not a network name"));
            }
        }
        Ok(PlannedNode {
            name: name.to_owned(),
            kind,
            image,
            command,
            env,
            cpus: spec.cpus.or(d.cpus),
            memory_mib: spec.memory.or(d.memory),
            networks,
            routes: routes
                .iter()
                .map(|r| parse_route(r).map_err(|e| format!("{what}: {e}")))
                .collect::<Result<_, _>>()?,
            sysctls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"
name: line
topology:
  defaults: {image: bbox:local, cmd: [sleep, "600"]}
  nodes:
    h1: {routes: ["10.0.2.0/24 via 10.0.1.2"]}
    r1: {sysctls: {net.ipv4.ip_forward: "1"}}
    h2: {routes: ["default via 10.0.2.1"], cmd: "sleep 300", env: {A: b}}
  links:
    - endpoints: ["h1:eth1", "r1:eth1"]
      addresses: ["10.0.1.1/24", "10.0.1.2/24"]
      impair: {delay: 20ms, loss: 1%}
    - endpoints: ["r1:eth2", "h2:eth1"]
      addresses: ["10.0.2.1/24", "10.0.2.2/24"]
"#;

    #[test]
    fn the_line_lab_plans() {
        let plan = LabFile::parse(LINE).unwrap().plan(None).unwrap();
        assert_eq!(plan.name, "line");
        assert_eq!(plan.nodes.len(), 3);
        let h2 = plan.nodes.iter().find(|n| n.name == "h2").unwrap();
        assert_eq!(h2.command, ["sleep", "300"]);
        assert_eq!(h2.env, ["A=b"]);
        assert_eq!(h2.routes[0].prefix, 0);
        assert_eq!(plan.links[0].impair.delay_us, 20_000);
        assert_eq!(
            plan.links[1].ends[1].address,
            Some(("10.0.2.2".parse().unwrap(), 24))
        );
        // Forwarding off unless the file sets it, in whichever of its names.
        let sysctl = |node: &str, key: &str| {
            let n = plan.nodes.iter().find(|n| n.name == node).unwrap();
            n.sysctls.get(key).cloned()
        };
        assert_eq!(sysctl("h1", "net.ipv4.ip_forward").as_deref(), Some("0"));
        assert_eq!(sysctl("r1", "net.ipv4.ip_forward").as_deref(), Some("1"));
        let other = LINE.replace("net.ipv4.ip_forward", "net.ipv4.conf.all.forwarding");
        let plan2 = LabFile::parse(&other).unwrap().plan(None).unwrap();
        let r1 = plan2.nodes.iter().find(|n| n.name == "r1").unwrap();
        assert_eq!(r1.sysctls.len(), 1, "{:?}", r1.sysctls);
        // --name overrides the file's.
        assert_eq!(
            LabFile::parse(LINE).unwrap().plan(Some("l2")).unwrap().name,
            "l2"
        );
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (LINE.replace("h2:eth1\"]", "h9:eth1\"]"), "no node \"h9\""),
            (LINE.replace("r1:eth2", "r1:eth1"), "on link 1 already"),
            (
                LINE.replace("10.0.2.0/24 via", "10.0.2.1/24 via"),
                "host bits",
            ),
            (LINE.replace("net.ipv4", "kernel.ipv4"), "only net.*"),
            (LINE.replace("20ms", "20parsecs"), "impair"),
            (LINE.replace("name: line", "name: ../x"), "not a lab name"),
            (
                LINE.replace("h2: {", "h2: {kind: zone, "),
                "neither container",
            ),
            (LINE.replace("10.0.1.1/24", "10.0.1.1/40"), "prefix"),
            (
                LINE.replace("r1:eth2\", \"h2:eth1", "r1:eth2\", \"r1:eth3"),
                "both ends",
            ),
            (LINE.replace("defaults:", "defaultz:"), "defaultz"),
            (
                LINE.replace("sysctls: {net.ipv4.ip_forward", "sysctls: {net.ipv4..x"),
                "only net.*",
            ),
            (
                LINE.replace("via 10.0.1.2", "via 10.0.9.2"),
                "on none of its subnets",
            ),
            (LINE.replace("10.0.2.2/24", "10.0.2.255/24"), "broadcast"),
            (
                LINE.replace("10.0.2.2/24", "10.0.1.1/24"),
                "not on one subnet",
            ),
            (LINE.replace("10.0.2.2/24", "10.0.2.1/24"), "address too"),
            (
                LINE.replace("h2: {routes: [", "h2: {routes: [\"default via 10.0.2.1\", "),
                "second route",
            ),
        ];
        for (text, want) in cases {
            let e = LabFile::parse(&text)
                .and_then(|f| f.plan(None))
                .unwrap_err();
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn networks_take_the_first_interfaces() {
        let text = r#"
name: s
topology:
  networks: {lan: {}}
  nodes:
    a: {image: i, networks: [lan]}
    b: {image: i}
  links:
    - endpoints: ["a:eth0", "b:eth0"]
"#;
        let e = LabFile::parse(text).unwrap().plan(None).unwrap_err();
        assert!(e.contains("network lan"), "{e}");
        let ok = text.replace("a:eth0", "a:eth1");
        LabFile::parse(&ok).unwrap().plan(None).unwrap();
        // A vm ends links too, a network card each, at most eight with its networks.
        let vm_link = ok.replace("b: {image: i}", "b: {image: i, kind: vm}");
        LabFile::parse(&vm_link).unwrap().plan(None).unwrap();
        let mut many = String::from("name: m\ntopology:\n  nodes:\n    v: {image: i, kind: vm}\n");
        let mut links = String::from("  links:\n");
        for n in 0..9 {
            many.push_str(&format!("    c{n}: {{image: i}}\n"));
            links.push_str(&format!("    - endpoints: [\"v:e{n}\", \"c{n}:eth1\"]\n"));
        }
        let e = LabFile::parse(&(many + &links))
            .unwrap()
            .plan(None)
            .unwrap_err();
        assert!(e.contains("more than the 8 network cards"), "{e}");
    }

    #[test]
    fn the_example_labs_plan() {
        let readme = include_str!("../../../../README.md");
        let from = readme
            .find("```yaml\nname: line")
            .expect("the README's lab file")
            + 8;
        let to = from + readme[from..].find("```").expect("its end");
        for text in [
            &readme[from..to],
            include_str!("../../../../examples/labs/line.clab.yml"),
            include_str!("../../../../examples/labs/star.clab.yml"),
            include_str!("../../../../examples/labs/mixed.clab.yml"),
        ] {
            let plan = LabFile::parse(text).and_then(|f| f.plan(None));
            assert!(plan.is_ok(), "{plan:?}");
        }
    }

    #[test]
    fn routes_and_sysctls() {
        assert_eq!(
            parse_route("default via 10.0.0.1").unwrap().via,
            Ipv4Addr::new(10, 0, 0, 1)
        );
        assert!(parse_route("10.0.0.0/8 dev eth0").is_err());
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            "net/ipv4/ip_forward"
        );
        assert!(sysctl_path("net.ipv4.conf.eth1/../../x").is_err());
    }
}
