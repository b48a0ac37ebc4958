//! Published ports (`cela run -p [IP:]HOST_PORT:PORT[/tcp|udp]`, the Docker API's
//! `PortBindings`): connections to a port of the host reach a port of the instance. Each
//! instance's mappings are one nftables table of its own, `ip cela_ports_<id>`, made when its
//! network is set up and deleted when its run ends or it is removed, so nothing outlives it:
//! DNAT in `prerouting` (from other machines and other instances) and in `output` (from the
//! host itself) for destinations that are the host's own addresses (`fib daddr type local`),
//! and of those the one `IP` given (which must be the host's). Translated connections carry
//! a conntrack mark ([`CT_MARK`]) that the network's own table and the `--net auto` links'
//! table let through (not what other software translates); ones from the instance's own
//! subnet are masqueraded, so the reply returns through the host. Loopback (`127.0.0.1`) is
//! not published: the kernel does not route it to another interface (Docker runs a proxy
//! process for it; cela runs none).
//!
//! An instance needs an address for this: `--net auto` or a named network (not `--internal`).
//! A host port is published by one instance at a time, and not while a host process listens
//! on it.

use std::borrow::Cow;
use std::net::Ipv4Addr;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Fib, FibFlag, FibResult, NamedExpression, Payload, PayloadField, Prefix,
};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{Mangle, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::{Deserialize, Serialize};

use crate::error::InstanceError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One `-p`: the host's `host_port` (on `host_ip`, or any address of the host) to the
/// instance's `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub port: u16,
    pub protocol: Protocol,
}

impl PortMapping {
    /// Parses `[IP:]HOST_PORT:PORT[/tcp|udp]`.
    pub fn parse(arg: &str) -> Result<PortMapping, InstanceError> {
        let bad = |why: &str| {
            Err(InstanceError::Invalid(format!(
                "-p {arg:?}: {why} (expected [IP:]HOST_PORT:PORT[/tcp|udp])"
            )))
        };
        let (ports, protocol) = match arg.rsplit_once('/') {
            None => (arg, Protocol::Tcp),
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some(_) => return bad("the protocol is tcp or udp"),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host_port, port) = match parts.as_slice() {
            [h, p] => (None, *h, *p),
            [ip, h, p] => match ip.parse::<Ipv4Addr>() {
                Ok(ip) if !ip.is_loopback() && !ip.is_unspecified() => (Some(ip), *h, *p),
                Ok(ip) if ip.is_unspecified() => (None, *h, *p),
                Ok(_) => return bad("loopback addresses cannot be published"),
                Err(_) => return bad("not an IPv4 address before the host port"),
            },
            _ => return bad("both ports are needed"),
        };
        let number = |s: &str| s.parse::<u16>().ok().filter(|p| *p != 0);
        let (Some(host_port), Some(port)) = (number(host_port), number(port)) else {
            return bad("a port is a number from 1 to 65535");
        };
        Ok(PortMapping {
            host_ip,
            host_port,
            port,
            protocol,
        })
    }

    /// `IP:HOST_PORT->PORT/PROTO`, as Docker shows them.
    pub fn display(&self) -> String {
        format!(
            "{}:{}->{}/{}",
            self.host_ip.map_or("0.0.0.0".into(), |i| i.to_string()),
            self.host_port,
            self.port,
            self.protocol.as_str()
        )
    }

    /// Whether this and `other` take the same port of the host.
    pub fn clashes(&self, other: &PortMapping) -> bool {
        self.host_port == other.host_port
            && self.protocol == other.protocol
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }
}

/// Refuses a list with two mappings of one host port.
pub fn check_distinct(ports: &[PortMapping]) -> Result<(), InstanceError> {
    for (i, p) in ports.iter().enumerate() {
        if let Some(q) = ports[..i].iter().find(|q| q.clashes(p)) {
            return Err(InstanceError::Invalid(format!(
                "-p {} and -p {} take the same port of the host",
                q.display(),
                p.display()
            )));
        }
    }
    Ok(())
}

/// Whether a process of the host listens on (or has bound) `p`'s host port.
pub fn bound_on_host(p: &PortMapping) -> bool {
    let ip = p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let taken = |e: std::io::Error| e.kind() == std::io::ErrorKind::AddrInUse;
    match p.protocol {
        Protocol::Tcp => std::net::TcpListener::bind((ip, p.host_port)).is_err_and(taken),
        Protocol::Udp => std::net::UdpSocket::bind((ip, p.host_port)).is_err_and(taken),
    }
}

/// A file in the instance directory while its ports may be published: its removal (or end)
/// deletes the table only then.
pub const MARKER: &str = "ports.published";

fn table_name(id: &str) -> String {
    format!("cela_ports_{id}")
}

/// The conntrack mark of a connection cela translated to a published port: the networks'
/// and links' filters let exactly these through (not what other software DNATs).
pub const CT_MARK: u32 = 0x6365_6c61;

fn matches(
    left: Expression<'static>,
    right: Expression<'static>,
    op: Operator,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn ct_mark() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: Cow::Borrowed("mark"),
        family: None,
        dir: None,
    }))
}

/// `ct mark == CT_MARK`.
pub fn marked() -> Statement<'static> {
    matches(ct_mark(), Expression::Number(CT_MARK), Operator::EQ)
}

fn prefix(addr: Ipv4Addr, len: u8) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(addr.to_string()))),
        len: u32::from(len),
    }))
}

/// The batch that makes `id`'s table mapping `ports` to `target`, whose network is
/// `subnet`:
/// * prerouting and output: to one of the host's own addresses (`fib daddr type local`; in
///   output not loopback, which cannot be routed elsewhere), and to the mapping's address if
///   it names one, on the host port: marked and DNAT'd to the instance;
/// * postrouting: such a connection from the instance's own subnet (another instance on its
///   network, or itself) is masqueraded, so the reply comes back through the host to be
///   translated (no hairpin otherwise: the instance would answer its peer directly).
fn batch(
    id: &str,
    target: Ipv4Addr,
    subnet: (Ipv4Addr, u8),
    ports: &[PortMapping],
) -> nftables::schema::Nftables<'static> {
    let t = table_name(id);
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(Table {
        family: NfFamily::IP,
        name: Cow::Owned(t.clone()),
        handle: None,
    }));
    let chain = |name: &'static str, hook: NfHook, prio: i32| {
        NfListObject::Chain(Chain {
            family: NfFamily::IP,
            table: Cow::Owned(t.clone()),
            name: Cow::Borrowed(name),
            _type: Some(NfChainType::NAT),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        })
    };
    let rule = |chain: &'static str, expr: Vec<Statement<'static>>| {
        NfListObject::Rule(Rule {
            family: NfFamily::IP,
            table: Cow::Owned(t.clone()),
            chain: Cow::Borrowed(chain),
            expr: Cow::Owned(expr),
            ..Rule::default()
        })
    };
    for (name, hook) in [
        ("prerouting", NfHook::Prerouting),
        ("output", NfHook::Output),
    ] {
        batch.add(chain(name, hook, -100));
        for p in ports {
            let mut expr = vec![matches(
                Expression::Named(NamedExpression::Fib(Fib {
                    result: FibResult::Type,
                    flags: [FibFlag::Daddr].into_iter().collect(),
                })),
                Expression::String(Cow::Borrowed("local")),
                Operator::EQ,
            )];
            if hook == NfHook::Output {
                expr.push(matches(
                    payload("ip", "daddr"),
                    prefix(Ipv4Addr::new(127, 0, 0, 0), 8),
                    Operator::NEQ,
                ));
            }
            if let Some(ip) = p.host_ip {
                expr.push(matches(
                    payload("ip", "daddr"),
                    Expression::String(Cow::Owned(ip.to_string())),
                    Operator::EQ,
                ));
            }
            expr.push(matches(
                payload(p.protocol.as_str(), "dport"),
                Expression::Number(u32::from(p.host_port)),
                Operator::EQ,
            ));
            expr.push(Statement::Mangle(Mangle {
                key: ct_mark(),
                value: Expression::Number(CT_MARK),
            }));
            expr.push(Statement::DNAT(Some(NAT {
                addr: Some(Expression::String(Cow::Owned(target.to_string()))),
                family: Some(NATFamily::IP),
                port: Some(Expression::Number(u32::from(p.port))),
                flags: None,
            })));
            batch.add(rule(name, expr));
        }
    }
    batch.add(chain("postrouting", NfHook::Postrouting, 100));
    batch.add(rule(
        "postrouting",
        vec![
            marked(),
            matches(
                payload("ip", "daddr"),
                Expression::String(Cow::Owned(target.to_string())),
                Operator::EQ,
            ),
            matches(
                payload("ip", "saddr"),
                prefix(subnet.0, subnet.1),
                Operator::EQ,
            ),
            Statement::Masquerade(None),
        ],
    ));
    batch.to_nftables()
}

/// Refuses a mapping to an address that is not one of this host's (a hostile caller could
/// otherwise take traffic meant for any address the host sends to or routes).
pub fn check_host_addresses(ports: &[PortMapping]) -> Result<(), InstanceError> {
    let mine: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .map(|ifs| {
            ifs.filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
                .collect()
        })
        .unwrap_or_default();
    match ports
        .iter()
        .find(|p| p.host_ip.is_some_and(|ip| !mine.contains(&ip)))
    {
        Some(p) => Err(InstanceError::Invalid(format!(
            "-p {}: {} is not an address of this host",
            p.display(),
            p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)
        ))),
        None => Ok(()),
    }
}

/// Publishes `ports` of the instance `id`, whose address is `target` on `subnet`
/// (replacing what an earlier run of it left). IPv4 forwarding is turned on, as Docker does
/// for published ports: the filters of cela's networks and links keep it from forwarding
/// anything else of theirs.
pub fn publish(
    id: &str,
    target: Ipv4Addr,
    subnet: (Ipv4Addr, u8),
    ports: &[PortMapping],
) -> Result<(), InstanceError> {
    unpublish(id);
    if ports.is_empty() {
        return Ok(());
    }
    check_host_addresses(ports)?;
    let fail = |e: String| InstanceError::Other(format!("publishing ports: {e}"));
    nftables::helper::apply_ruleset(&batch(id, target, subnet, ports)).map_err(|e| {
        fail(format!(
            "{e} (cela needs nft, from Debian's nftables package)"
        ))
    })?;
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        unpublish(id);
        return Err(fail(format!("enabling IPv4 forwarding: {e}")));
    }
    Ok(())
}

/// Deletes the instance `id`'s published ports, if it has any.
pub fn unpublish(id: &str) {
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "ip", &table_name(id)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_parse_as_docker_writes_them() {
        assert_eq!(
            PortMapping::parse("8080:80").unwrap(),
            PortMapping {
                host_ip: None,
                host_port: 8080,
                port: 80,
                protocol: Protocol::Tcp
            }
        );
        let p = PortMapping::parse("10.0.0.1:53:5353/udp").unwrap();
        assert_eq!(p.host_ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!((p.host_port, p.port, p.protocol), (53, 5353, Protocol::Udp));
        assert_eq!(PortMapping::parse("0.0.0.0:1:2").unwrap().host_ip, None);
        for (bad, needle) in [
            ("80", "both ports are needed"),
            ("0:80", "from 1 to 65535"),
            ("70000:80", "from 1 to 65535"),
            ("8080:80/sctp", "tcp or udp"),
            ("127.0.0.1:8080:80", "loopback"),
            ("host:8080:80", "not an IPv4 address"),
            ("1:2:3:4", "both ports are needed"),
        ] {
            let e = PortMapping::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn one_host_port_is_taken_once() {
        let p = |s| PortMapping::parse(s).unwrap();
        assert!(p("8080:80").clashes(&p("8080:81")));
        assert!(!p("8080:80").clashes(&p("8080:80/udp")));
        assert!(p("10.0.0.1:8080:80").clashes(&p("8080:81")));
        assert!(!p("10.0.0.1:8080:80").clashes(&p("10.0.0.2:8080:81")));
        let e = check_distinct(&[p("8080:80"), p("9090:90"), p("8080:81")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("take the same port"), "{e}");
    }

    #[test]
    fn the_table_maps_each_port_from_the_host_and_from_outside() {
        let json = serde_json::to_string(&batch(
            "0123456789ab",
            Ipv4Addr::new(10, 77, 0, 2),
            (Ipv4Addr::new(10, 77, 0, 0), 24),
            &[PortMapping::parse("10.0.0.1:8080:80").unwrap()],
        ))
        .unwrap();
        assert!(
            json.contains("\"postrouting\"") && json.contains("masquerade"),
            "{json}"
        );
        assert!(json.contains("\"127.0.0.0\""), "{json}");
        assert!(json.contains("\"10.0.0.1\""), "{json}");
        assert!(json.contains("\"cela_ports_0123456789ab\""), "{json}");
        assert!(
            json.contains("\"prerouting\"") && json.contains("\"output\""),
            "{json}"
        );
        assert!(json.contains("\"dnat\""), "{json}");
        assert!(json.contains("\"local\""), "{json}");
    }
}
