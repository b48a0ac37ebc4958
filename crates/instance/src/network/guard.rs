//! The port guard of a named network: frames an instance sends into the network's bridge
//! must carry its own MAC address (as the Ethernet source, and as an ARP sender's), so no
//! instance takes another's place on the bridge — a guest that forges a neighbour's MAC, or a
//! microVM copy that still sends as the snapshot's source until its guest has moved to its own
//! address (`super::named`'s snapshot support relies on this).
//!
//! One nftables table per network, `bridge cela_<id>` (beside its `inet` table of the same
//! name, `super::firewall`): a prerouting chain that drops, of the frames entering a bridge
//! from a port listed in the set `ports`, every frame whose `(port, source MAC)` is not in
//! the set `macs`, and every ARP packet whose `(port, sender MAC)` is not. It pins MACs, not
//! IP addresses: an instance on two networks may route between them (the issue's "unless an
//! instance routes"), a lab's router node forwards others' packets, and Linux may answer or
//! ask ARP with any of its addresses, so an instance can still *claim* a neighbour's address
//! in ARP (as on Docker's bridges); it cannot send as the neighbour's MAC.

use std::borrow::Cow;

use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField};
use nftables::schema::{Chain, Element, NfListObject, Rule, Set, SetType, SetTypeValue, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::firewall::nft_error;
use crate::error::InstanceError;

fn table_name(id: &str) -> String {
    format!("cela_{id}")
}

const PORTS: &str = "ports";
const MACS: &str = "macs";

fn iifname() -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta {
        key: MetaKey::Iifname,
    }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn matches(left: Expression<'static>, op: Operator, set: &str) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right: Expression::String(Cow::Owned(format!("@{set}"))),
        op,
    })
}

/// The batch that makes network `id`'s guard table (it must not exist). Bridge-family
/// tables see the frames of every bridge of the host, and this kernel cannot match the
/// bridge a frame enters (`meta ibrname` is not supported here): a port name is therefore
/// listed by one network's guard at a time ([`admit`] takes it out of the others').
pub fn batch(id: &str) -> nftables::schema::Nftables<'static> {
    let t = table_name(id);
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(Table {
        family: NfFamily::Bridge,
        name: Cow::Owned(t.clone()),
        handle: None,
    }));
    batch.add(NfListObject::Set(Box::new(Set {
        family: NfFamily::Bridge,
        table: Cow::Owned(t.clone()),
        name: Cow::Borrowed(PORTS),
        set_type: SetTypeValue::Single(SetType::Ifname),
        ..Set::default()
    })));
    batch.add(NfListObject::Set(Box::new(Set {
        family: NfFamily::Bridge,
        table: Cow::Owned(t.clone()),
        name: Cow::Borrowed(MACS),
        set_type: SetTypeValue::Concatenated(Cow::Borrowed(&[SetType::Ifname, SetType::EtherAddr])),
        ..Set::default()
    })));
    batch.add(NfListObject::Chain(Chain {
        family: NfFamily::Bridge,
        table: Cow::Owned(t.clone()),
        name: Cow::Borrowed("ports"),
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Prerouting),
        prio: Some(-300),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }));
    for source in [payload("ether", "saddr"), payload("arp", "saddr ether")] {
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::Bridge,
            table: Cow::Owned(t.clone()),
            chain: Cow::Borrowed("ports"),
            expr: Cow::Owned(vec![
                matches(iifname(), Operator::EQ, PORTS),
                matches(
                    Expression::Named(NamedExpression::Concat(vec![iifname(), source])),
                    Operator::NEQ,
                    MACS,
                ),
                Statement::Drop(None),
            ]),
            ..Rule::default()
        }));
    }
    batch.to_nftables()
}

/// Makes network `id`'s guard table.
pub fn install(id: &str) -> Result<(), InstanceError> {
    nftables::helper::apply_ruleset(&batch(id)).map_err(|e| {
        nft_error(
            format!("adding the port guard table bridge {}", table_name(id)),
            e,
        )
    })
}

/// Whether network `id`'s guard table exists.
pub fn exists(id: &str) -> bool {
    super::firewall::table_exists(NfFamily::Bridge, &table_name(id))
}

/// Deletes network `id`'s guard table if it exists.
pub fn remove(id: &str) -> Result<(), InstanceError> {
    super::firewall::delete_table(NfFamily::Bridge, &table_name(id))
}

/// The elements that admit `port` with `mac` (`aa:bb:cc:dd:ee:ff`).
fn elements(id: &str, port: &str, mac: &str) -> [NfListObject<'static>; 2] {
    let t = table_name(id);
    let element = |set: &'static str, elem: Expression<'static>| {
        NfListObject::Element(Element {
            family: NfFamily::Bridge,
            table: Cow::Owned(t.clone()),
            name: Cow::Borrowed(set),
            elem: Cow::Owned(vec![elem]),
        })
    };
    [
        element(PORTS, Expression::String(Cow::Owned(port.to_owned()))),
        element(
            MACS,
            Expression::Named(NamedExpression::Concat(vec![
                Expression::String(Cow::Owned(port.to_owned())),
                Expression::String(Cow::Owned(mac.to_owned())),
            ])),
        ),
    ]
}

/// Lets frames from `port` into network `id`'s bridge only with `mac` as their source: called
/// before the port is plugged in, so nothing passes unguarded. The name is taken out of every
/// other cela guard first (one a killed supervisor's endpoint left there, in this data
/// directory or another, would drop this port's frames).
pub fn admit(id: &str, port: &str, mac: &str) -> Result<(), InstanceError> {
    let others = guards_listing(port)
        .into_iter()
        .filter(|t| *t != table_name(id))
        .collect::<Vec<_>>();
    if !others.is_empty() {
        let mut batch = Batch::new();
        for other in others {
            batch.delete(NfListObject::Element(Element {
                family: NfFamily::Bridge,
                table: Cow::Owned(other),
                name: Cow::Borrowed(PORTS),
                elem: Cow::Owned(vec![Expression::String(Cow::Owned(port.to_owned()))]),
            }));
        }
        apply_quietly(&batch.to_nftables());
    }
    let mut batch = Batch::new();
    for e in elements(id, port, mac) {
        batch.add(e);
    }
    nftables::helper::apply_ruleset(&batch.to_nftables())
        .map_err(|e| nft_error(format!("guarding the bridge port {port}"), e))
}

/// The host's cela guard tables (`bridge cela_*`) whose `ports` list `port`: one listing of
/// the bridge family's sets, whatever the number of networks.
fn guards_listing(port: &str) -> Vec<String> {
    let Ok(out) = std::process::Command::new("nft")
        .args(["-j", "list", "sets", "bridge"])
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    listed["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| &o["set"])
        .filter(|set| set["name"] == PORTS)
        .filter(|set| {
            set["elem"]
                .as_array()
                .is_some_and(|e| e.iter().any(|p| p == port))
        })
        .filter_map(|set| set["table"].as_str())
        .filter(|t| t.starts_with("cela_"))
        .map(str::to_owned)
        .collect()
}

/// Takes the endpoint `port` with `mac` out of network `id`'s guard once it has left: its MAC
/// always, the port itself only when no link of that name is left (a new instance may have
/// been given the name, and its entry is its own). An entry already gone is no error.
pub fn forget(id: &str, port: &str, mac: &str) {
    let [port_entry, mac_entry] = elements(id, port, mac);
    let mut gone = vec![mac_entry];
    if !std::path::Path::new("/sys/class/net").join(port).exists() {
        gone.push(port_entry);
    }
    for e in gone {
        let mut batch = Batch::new();
        batch.delete(e);
        apply_quietly(&batch.to_nftables());
    }
}

/// Applies `batch` with nft, whatever it says: for deletions of what may be gone already.
/// Its complaints must not reach this process's stderr, which is an instance's log when a
/// supervisor calls.
fn apply_quietly(batch: &nftables::schema::Nftables<'_>) {
    use std::io::Write as _;
    let Ok(json) = serde_json::to_vec(batch) else {
        return;
    };
    let Ok(mut child) = std::process::Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&json);
    }
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_drops_frames_and_arp_not_sent_with_the_ports_own_mac() {
        let json = serde_json::to_string(&batch("n1")).unwrap();
        assert!(json.contains(r#""family":"bridge""#), "{json}");
        assert!(json.contains(r#""type":["ifname","ether_addr"]"#), "{json}");
        assert!(json.contains(r#""hook":"prerouting""#), "{json}");
        assert!(json.contains(r#""field":"saddr ether""#), "{json}");
        assert_eq!(json.matches(r#""op":"!=""#).count(), 2, "{json}");
        assert_eq!(json.matches(r#""drop""#).count(), 2, "{json}");
        assert!(
            !json.contains("ipv4_addr"),
            "source addresses are not checked: {json}"
        );
    }
}
