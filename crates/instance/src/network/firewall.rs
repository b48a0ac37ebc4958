//! The packet filter of a named network: one nftables table per network (`inet cela_<id>`),
//! made with it and deleted with it, so a network's rules come and go whole and a removal
//! after a crash deletes exactly what the network added. Rules are built with the `nftables`
//! crate (the nftables JSON schema) and applied through `nft -j` (Debian's `nftables`
//! package), one batch per change, which the kernel applies atomically.
//!
//! For a network whose bridge is `B` (every cela bridge is named `cbr-…`):
//! * forward: traffic within `B` passes (it only crosses the IP layer with `br_netfilter`);
//!   with `--nat`, from `B` to anything that is not a cela bridge or `--net auto` link
//!   passes, with the replies;
//!   connections to a published port (DNAT'd by [`super::ports`]) pass into `B`;
//!   everything else into or out of `B` is dropped, so two networks never reach each other
//!   through the host, and a network without `--nat` reaches the host alone.
//! * postrouting (`--nat`): the subnet's traffic leaving by another interface is masqueraded.
//! * input (`--internal`): nothing from `B` reaches the host (its bridge has no address either;
//!   this also refuses a guest that routes to one of the host's other addresses through it).

use std::borrow::Cow;
use std::net::Ipv4Addr;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::error::InstanceError;

/// The prefix of every bridge cela makes (an nftables wildcard matches them all).
pub const BRIDGE_PREFIX: &str = "cbr-";
/// The prefix of the host ends of `--net auto` links (veths and TAPs).
pub const LINK_PREFIX: &str = "cela";

/// What a network's table is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules<'a> {
    /// The network's id: the table is `cela_<id>`.
    pub id: &'a str,
    pub bridge: &'a str,
    pub subnet: (Ipv4Addr, u8),
    pub nat: bool,
    pub internal: bool,
}

fn table_name(id: &str) -> String {
    format!("cela_{id}")
}

fn meta(key: MetaKey, op: Operator, value: &str) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(Meta { key })),
        right: Expression::String(Cow::Owned(value.to_owned())),
        op,
    })
}

/// `ct KEY in RIGHT` (a conntrack state or status).
fn ct(key: &'static str, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::CT(CT {
            key: Cow::Borrowed(key),
            family: None,
            dir: None,
        })),
        right,
        op: Operator::IN,
    })
}

/// A connection cela translated to a published port (its conntrack mark), either way.
fn dnat() -> Statement<'static> {
    super::ports::marked()
}

fn rule(table: &str, chain: &str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: Cow::Owned(table.to_owned()),
        chain: Cow::Owned(chain.to_owned()),
        expr: Cow::Owned(expr),
        ..Rule::default()
    })
}

fn base_chain(
    table: &str,
    name: &str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> NfListObject<'static> {
    NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: Cow::Owned(table.to_owned()),
        name: Cow::Owned(name.to_owned()),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    })
}

impl Rules<'_> {
    /// The batch that makes the table (it must not exist).
    pub fn batch(&self) -> nftables::schema::Nftables<'static> {
        use MetaKey::{Iifname, Oifname};
        use Operator::{EQ, NEQ};
        let t = table_name(self.id);
        let b = self.bridge;
        let any_bridge = format!("{BRIDGE_PREFIX}*");
        let any_link = format!("{LINK_PREFIX}*");
        let accept = || Statement::Accept(None);
        let drop = || Statement::Drop(None);
        let mut batch = Batch::new();
        batch.add(NfListObject::Table(Table {
            family: NfFamily::INet,
            name: Cow::Owned(t.clone()),
            handle: None,
        }));
        batch.add(base_chain(
            &t,
            "forward",
            NfChainType::Filter,
            NfHook::Forward,
            0,
        ));
        batch.add(rule(
            &t,
            "forward",
            vec![meta(Iifname, EQ, b), meta(Oifname, EQ, b), accept()],
        ));
        if self.nat && !self.internal {
            batch.add(rule(
                &t,
                "forward",
                vec![
                    meta(Iifname, EQ, b),
                    meta(Oifname, NEQ, &any_bridge),
                    meta(Oifname, NEQ, &any_link),
                    accept(),
                ],
            ));
            batch.add(rule(
                &t,
                "forward",
                vec![
                    meta(Oifname, EQ, b),
                    ct(
                        "state",
                        Expression::List(vec![
                            Expression::String(Cow::Borrowed("established")),
                            Expression::String(Cow::Borrowed("related")),
                        ]),
                    ),
                    accept(),
                ],
            ));
            batch.add(base_chain(
                &t,
                "postrouting",
                NfChainType::NAT,
                NfHook::Postrouting,
                100,
            ));
            batch.add(rule(
                &t,
                "postrouting",
                vec![
                    Statement::Match(Match {
                        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                            PayloadField {
                                protocol: Cow::Borrowed("ip"),
                                field: Cow::Borrowed("saddr"),
                            },
                        ))),
                        right: Expression::Named(NamedExpression::Prefix(Prefix {
                            addr: Box::new(Expression::String(Cow::Owned(
                                self.subnet.0.to_string(),
                            ))),
                            len: u32::from(self.subnet.1),
                        })),
                        op: EQ,
                    }),
                    meta(Oifname, NEQ, b),
                    Statement::Masquerade(None),
                ],
            ));
        }
        if !self.internal {
            // Connections to a port an instance publishes (`-p`), translated on the way in,
            // and their replies.
            for key in [Oifname, Iifname] {
                batch.add(rule(
                    &t,
                    "forward",
                    vec![meta(key, EQ, b), dnat(), accept()],
                ));
            }
        }
        batch.add(rule(&t, "forward", vec![meta(Iifname, EQ, b), drop()]));
        batch.add(rule(&t, "forward", vec![meta(Oifname, EQ, b), drop()]));
        if self.internal {
            batch.add(base_chain(
                &t,
                "input",
                NfChainType::Filter,
                NfHook::Input,
                0,
            ));
            batch.add(rule(&t, "input", vec![meta(Iifname, EQ, b), drop()]));
        }
        batch.to_nftables()
    }
}

/// The table every `--net auto` link shares, `inet cela_links`: what reaches such a link, or
/// leaves by one, goes to or comes from the host alone — never forwarded to another link,
/// another network or beyond (the host may forward for others: a `--nat` network turns
/// forwarding on) — except connections to a port it publishes (`-p`), and their replies.
/// Made (again) whenever such a link is, in one batch that flushes its chain first, so it
/// holds its rules once whoever makes it.
pub fn ensure_auto_links() -> Result<(), InstanceError> {
    use MetaKey::{Iifname, Oifname};
    let t = "cela_links";
    let any_link = format!("{LINK_PREFIX}*");
    let chain = Chain {
        family: NfFamily::INet,
        table: Cow::Borrowed(t),
        name: Cow::Borrowed("forward"),
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Forward),
        prio: Some(0),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    };
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(Table {
        family: NfFamily::INet,
        name: Cow::Borrowed(t),
        handle: None,
    }));
    batch.add(NfListObject::Chain(chain.clone()));
    batch.add_cmd(nftables::schema::NfCmd::Flush(
        nftables::schema::FlushObject::Chain(chain),
    ));
    for key in [Oifname, Iifname] {
        batch.add(rule(
            t,
            "forward",
            vec![
                meta(key, Operator::EQ, &any_link),
                dnat(),
                Statement::Accept(None),
            ],
        ));
    }
    for key in [Iifname, Oifname] {
        batch.add(rule(
            t,
            "forward",
            vec![meta(key, Operator::EQ, &any_link), Statement::Drop(None)],
        ));
    }
    nftables::helper::apply_ruleset(&batch.to_nftables())
        .map_err(|e| nft_error("adding the packet filter of --net auto links".into(), e))
}

/// [`ensure_auto_links`], whose failure (no `nft` on this host) leaves the link as it was
/// before cela had the table, with a warning: a named network needs `nft`, a link does not.
pub fn ensure_auto_links_or_warn() {
    if let Err(e) = ensure_auto_links() {
        tracing::warn!("{e}: --net auto links are not kept from forwarding through the host");
    }
}

pub(super) fn nft_error(what: String, e: nftables::helper::NftablesError) -> InstanceError {
    InstanceError::Other(format!(
        "{what}: {e} (cela needs nft, from Debian's nftables package)"
    ))
}

/// Makes the network's table.
pub fn install(rules: &Rules<'_>) -> Result<(), InstanceError> {
    nftables::helper::apply_ruleset(&rules.batch())
        .map_err(|e| nft_error(format!("adding the packet filter of {}", rules.bridge), e))
}

/// Whether the network `id`'s table exists.
pub fn exists(id: &str) -> bool {
    table_exists(NfFamily::INet, &table_name(id))
}

/// Deletes the network `id`'s table if it exists.
pub fn remove(id: &str) -> Result<(), InstanceError> {
    delete_table(NfFamily::INet, &table_name(id))
}

fn family_name(family: NfFamily) -> &'static str {
    match family {
        NfFamily::Bridge => "bridge",
        NfFamily::IP => "ip",
        _ => "inet",
    }
}

/// Whether the table `name` of `family` exists.
pub(super) fn table_exists(family: NfFamily, name: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", family_name(family), name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Deletes the table `name` of `family` if it exists.
pub(super) fn delete_table(family: NfFamily, name: &str) -> Result<(), InstanceError> {
    if !table_exists(family, name) {
        return Ok(());
    }
    let mut batch = Batch::new();
    batch.delete(NfListObject::Table(Table {
        family,
        name: Cow::Owned(name.to_owned()),
        handle: None,
    }));
    nftables::helper::apply_ruleset(&batch.to_nftables()).map_err(|e| {
        nft_error(
            format!("deleting the table {} {name}", family_name(family)),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nat_network_forwards_out_and_masquerades_an_internal_one_is_walled() {
        let nat = Rules {
            id: "0123456789ab",
            bridge: "cbr-01234567",
            subnet: (Ipv4Addr::new(10, 214, 3, 0), 24),
            nat: true,
            internal: false,
        };
        let json = serde_json::to_string(&nat.batch()).unwrap();
        assert!(json.contains("\"cela_0123456789ab\""), "{json}");
        assert!(json.contains("masquerade"), "{json}");
        assert!(json.contains("\"cbr-*\""), "{json}");
        assert!(json.contains("\"len\":24"), "{json}");
        assert!(!json.contains("\"input\""), "{json}");
        let internal = Rules {
            nat: false,
            internal: true,
            ..nat
        };
        let json = serde_json::to_string(&internal.batch()).unwrap();
        assert!(!json.contains("masquerade"), "{json}");
        assert!(json.contains("\"input\""), "{json}");
    }
}
