//! The JSON shape of an instance that `cela ps --format json`, `cela inspect` and cela's own
//! HTTP API (`/cela/v1/instances`) all show, so that a program sees the same object whichever
//! front end it asks. The shapes are types, so the API's OpenAPI document describes them from
//! the code that writes them.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::network::{NetMode, NetworkState};
use crate::record::{Broken, Instance, InstanceState, Kind, Status};

/// An instance's network as it is listed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NetworkView {
    /// What `--net` asked for.
    pub mode: NetMode,
    /// The host end of the instance's link (a veth or a TAP), while it runs.
    pub interface: Option<String>,
    /// The host's address on that link, `ADDR/PREFIX`.
    pub host_address: Option<String>,
    /// The instance's address, `ADDR/PREFIX`.
    pub address: Option<String>,
}

impl NetworkView {
    pub fn new(mode: NetMode, state: Option<&NetworkState>) -> NetworkView {
        NetworkView {
            mode,
            interface: state.map(|s| s.interface.clone()),
            host_address: state.map(|s| s.host_address.clone()),
            address: state.map(|s| s.address.clone()),
        }
    }
}

/// The instance on a named network (`--net NAME`), while it runs.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JoinedView {
    pub network: String,
    /// `ADDR/PREFIX`; absent while it is not running.
    pub address: Option<String>,
    pub mac: Option<String>,
    /// The host end of its link (a veth on the bridge, or a microVM's TAP).
    pub interface: Option<String>,
    /// The network's gateway (absent on an `--internal` network, which has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// The named networks `inst` joins, with its address on each while it runs.
pub fn joined(inst: &Instance) -> Vec<JoinedView> {
    if inst.config.networks.is_empty() {
        return Vec::new();
    }
    let data_dir = inst.data_dir().unwrap_or(std::path::Path::new("/"));
    let nets = crate::network::named::Networks::open(data_dir)
        .and_then(|n| n.list())
        .unwrap_or_default();
    inst.config
        .networks
        .iter()
        .map(|a| {
            let net = nets.iter().find(|n| n.name == a.network);
            let ep = net.and_then(|n| n.endpoints.get(&inst.config.id));
            let prefix = net
                .and_then(|n| n.subnet.split_once('/'))
                .map_or("32", |(_, p)| p);
            JoinedView {
                network: a.network.clone(),
                address: ep.map(|e| format!("{}/{prefix}", e.address)),
                mac: ep.map(|e| e.mac.clone()),
                interface: ep.map(|e| e.interface.clone()),
                gateway: net.filter(|n| !n.internal).map(|n| n.gateway.to_string()),
            }
        })
        .collect()
}

/// One instance as `ps --format json` lists it (a record that cannot be read is listed as
/// [`Unreadable`]).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Summary {
    /// 64 hex digits.
    pub id: String,
    pub name: String,
    pub kind: Kind,
    /// The image as it was named.
    pub image: String,
    /// The image's manifest digest.
    pub image_digest: String,
    /// The full command line (the image's entrypoint and cmd, or the caller's command).
    pub command: Vec<String>,
    pub status: Status,
    /// The last run's exit code, once it has ended.
    pub exit_code: Option<i32>,
    /// The supervisor's pid while it runs.
    pub pid: Option<i32>,
    /// When it was created (RFC 3339).
    pub created: String,
    /// When its last run started (RFC 3339).
    pub started: Option<String>,
    /// When its last run ended (RFC 3339).
    pub finished: Option<String>,
    /// Why the last run failed to start or ended abnormally.
    pub error: Option<String>,
    pub network: NetworkView,
    /// The named networks it joins (`--net NAME`), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<JoinedView>,
    /// Its published ports (`-p`), `IP:HOST_PORT->PORT/PROTO`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// The caller's key/value labels.
    pub labels: BTreeMap<String, String>,
}

/// An instance whose record cannot be read, as it is listed: its id (its directory's name),
/// `unknown`, and why. `cela rm -f` removes it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Unreadable {
    pub id: String,
    pub status: Status,
    pub error: String,
}

/// A row of the instance list.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Listed {
    Instance(Box<Summary>),
    Unreadable(Unreadable),
}

/// One instance as `inspect` shows it: the summary with its whole config and state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Detail {
    #[serde(flatten)]
    pub summary: Summary,
    /// What was asked for when it was created (`config.json`).
    #[schema(value_type = Object)]
    pub config: Value,
    /// Where it is in its life (`state.json`).
    #[schema(value_type = Object)]
    pub state: Value,
    /// Its directory on the host.
    #[schema(value_type = String)]
    pub dir: std::path::PathBuf,
}

fn typed_summary(inst: &Instance, state: &InstanceState) -> Summary {
    Summary {
        id: inst.config.id.clone(),
        name: inst.config.name.clone(),
        kind: inst.config.kind,
        image: inst.config.image.clone(),
        image_digest: inst.config.image_digest.clone(),
        command: inst.config.command.clone(),
        status: state.status,
        exit_code: state.exit_code,
        pid: state.pid,
        created: inst.config.created.clone(),
        started: state.started.clone(),
        finished: state.finished.clone(),
        error: state.error.clone(),
        network: NetworkView::new(inst.config.net, state.network.as_ref()),
        networks: joined(inst),
        ports: inst.config.ports.iter().map(|p| p.display()).collect(),
        labels: inst.config.labels.clone(),
    }
}

/// One instance as `ps --format json` lists it.
pub fn summary(inst: &Instance, state: &InstanceState) -> Value {
    serde_json::to_value(typed_summary(inst, state)).expect("a summary serializes")
}

/// One instance as `inspect` shows it: the summary with its whole config and state.
pub fn detail(inst: &Instance, state: &InstanceState) -> Value {
    let d = Detail {
        summary: typed_summary(inst, state),
        config: serde_json::to_value(&inst.config).expect("a config serializes"),
        state: serde_json::to_value(state).expect("a state serializes"),
        dir: inst.dir.clone(),
    };
    serde_json::to_value(d).expect("a detail serializes")
}

/// An instance whose record cannot be read: its id, `unknown`, and why.
pub fn broken(b: &Broken) -> Value {
    let u = Unreadable {
        id: b.id.clone(),
        status: Status::Unknown,
        error: b.error.clone(),
    };
    serde_json::to_value(u).expect("a row serializes")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_network_view_has_every_field() {
        let s = NetworkState {
            interface: "cela3".into(),
            ifindex: 7,
            host_address: "10.213.0.1/30".into(),
            address: "10.213.0.2/30".into(),
        };
        let view = |m, s| serde_json::to_value(NetworkView::new(m, s)).unwrap();
        assert_eq!(
            view(NetMode::Auto, Some(&s)),
            json!({"mode": "auto", "interface": "cela3", "host_address": "10.213.0.1/30",
                   "address": "10.213.0.2/30"})
        );
        assert_eq!(
            view(NetMode::None, None),
            json!({"mode": "none", "interface": null, "host_address": null, "address": null})
        );
    }
}
