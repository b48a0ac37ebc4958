//! The Docker Engine API's networks: `docker network ls|inspect|create|rm|connect|disconnect`
//! as front ends to cela's named networks (`cela_instance::network::named`). A Docker
//! network of the `bridge` driver is a cela network: NAT'd unless it is internal, as
//! Docker's user-defined bridges are; asks cela cannot honour (other drivers, IPv6, labels,
//! swarm scopes) are 501 rather than made without.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cela_instance::Instances;
use cela_instance::network::named::{Attachment, CreateRequest, Network, Networks};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, blocking};

/// A network as `GET /networks` and `GET /networks/{id}` show it.
fn view(net: &Network) -> Value {
    let containers: serde_json::Map<String, Value> = net
        .endpoints
        .iter()
        .map(|(id, e)| {
            let prefix = net.subnet.split_once('/').map_or("32", |(_, p)| p);
            (
                id.clone(),
                json!({
                    "Name": e.instance,
                    "EndpointID": e.interface,
                    "MacAddress": e.mac,
                    "IPv4Address": format!("{}/{prefix}", e.address),
                    "IPv6Address": "",
                }),
            )
        })
        .collect();
    let mut config = json!({"Subnet": net.subnet});
    if !net.internal {
        config["Gateway"] = json!(net.gateway.to_string());
    }
    json!({
        "Name": net.name,
        "Id": net.id,
        "Created": net.created,
        "Scope": "local",
        "Driver": "bridge",
        "EnableIPv4": true,
        "EnableIPv6": false,
        "IPAM": {"Driver": "default", "Options": {}, "Config": [config]},
        "Internal": net.internal,
        "Attachable": false,
        "Ingress": false,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": false,
        "Containers": containers,
        "Options": {
            "com.docker.network.bridge.name": net.bridge,
            "com.docker.network.bridge.enable_ip_masquerade": net.nat.to_string(),
        },
        "Labels": {},
    })
}

fn not_found(key: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("network {key} not found"))
}

/// The network `key` names: a name, a whole id, or a unique prefix of one id (as Docker).
fn find(nets: &Networks, key: &str) -> Result<Network, ApiError> {
    let all = nets.list()?;
    if let Some(n) = all.iter().find(|n| n.name == key || n.id == key) {
        return Ok(n.clone());
    }
    let mut prefixed = all
        .iter()
        .filter(|n| !key.is_empty() && n.id.starts_with(key));
    match (prefixed.next(), prefixed.next()) {
        (Some(n), None) => Ok(n.clone()),
        (Some(_), Some(_)) => Err(ApiError::bad_request(format!(
            "network {key} is ambiguous: give more of its id"
        ))),
        _ => Err(not_found(key)),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    filters: Option<String>,
}

/// `GET /networks`, with the `name` (substring), `id` (prefix) and `driver` filters.
pub async fn list(
    State(app): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<Vec<Value>>, ApiError> {
    let filters = super::parse_filters(q.filters.as_deref())?;
    for key in filters.keys() {
        if !matches!(key.as_str(), "name" | "id" | "driver" | "scope" | "type") {
            return Err(ApiError::bad_request(format!(
                "invalid filter '{key}' for networks"
            )));
        }
    }
    let keep = move |n: &Network| {
        filters.iter().all(|(key, values)| {
            values.iter().any(|v| match key.as_str() {
                "name" => n.name.contains(v.as_str()),
                "id" => n.id.starts_with(v.as_str()),
                "driver" => v == "bridge",
                "scope" => v == "local",
                "type" => v == "custom" || (v == "builtin" && n.name == "bridge"),
                _ => false,
            })
        })
    };
    blocking(move || {
        let nets = Networks::open(&app.data_dir)?;
        Ok(axum::Json(
            nets.list()?.iter().filter(|n| keep(n)).map(view).collect(),
        ))
    })
    .await
}

/// `GET /networks/{id}`.
pub async fn inspect(
    State(app): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    blocking(move || {
        let nets = Networks::open(&app.data_dir)?;
        Ok(axum::Json(view(&find(&nets, &key)?)))
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Ipam {
    #[serde(default)]
    driver: Option<String>,
    #[serde(default)]
    config: Option<Vec<IpamConfig>>,
    #[serde(default)]
    options: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IpamConfig {
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    ip_range: Option<String>,
    #[serde(default)]
    aux_address: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateBody {
    name: String,
    #[serde(default)]
    driver: Option<String>,
    #[serde(default)]
    internal: bool,
    #[serde(default, rename = "EnableIPv6")]
    enable_ipv6: Option<bool>,
    #[serde(default, rename = "IPAM")]
    ipam: Option<Ipam>,
    #[serde(default)]
    options: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    labels: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    attachable: bool,
    #[serde(default)]
    ingress: bool,
    #[serde(default)]
    config_only: bool,
    #[serde(default)]
    config_from: Option<Value>,
    #[serde(default)]
    scope: Option<String>,
}

/// The cela network a `POST /networks/create` body asks for, or why it cannot be made.
pub fn parse_create(body: &[u8]) -> Result<CreateRequest, ApiError> {
    let body: CreateBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed network config: {e}")))?;
    let unsupported = |what: &str| Err(ApiError::not_implemented(format!("a network with {what}")));
    match body.driver.as_deref() {
        None | Some("") | Some("bridge") => {}
        Some(other) => return unsupported(&format!("the driver {other:?} (cela has bridge)")),
    }
    if body.enable_ipv6 == Some(true) {
        return unsupported("IPv6");
    }
    if body.labels.as_ref().is_some_and(|l| !l.is_empty()) {
        return unsupported("labels");
    }
    if body.attachable || body.ingress || body.config_only {
        return unsupported("swarm settings (Attachable, Ingress, ConfigOnly)");
    }
    if body
        .config_from
        .as_ref()
        .is_some_and(|c| c["Network"].as_str().is_some_and(|n| !n.is_empty()))
    {
        return unsupported("ConfigFrom");
    }
    if body
        .scope
        .as_deref()
        .is_some_and(|s| !s.is_empty() && s != "local")
    {
        return unsupported("a scope other than local");
    }
    // The one driver option cela has: masquerade (on unless internal, as Docker's).
    let mut nat = !body.internal;
    for (key, value) in body.options.iter().flatten() {
        match (key.as_str(), value.as_str()) {
            ("com.docker.network.bridge.enable_ip_masquerade", Some("true")) => {}
            ("com.docker.network.bridge.enable_ip_masquerade", Some("false")) => nat = false,
            _ => return unsupported(&format!("the option {key}")),
        }
    }
    let ipam = body.ipam.unwrap_or_default();
    if ipam
        .driver
        .as_deref()
        .is_some_and(|d| !d.is_empty() && d != "default")
        || ipam.options.as_ref().is_some_and(|o| !o.is_empty())
    {
        return unsupported("an IPAM driver or options");
    }
    let configs = ipam.config.unwrap_or_default();
    if configs.len() > 1 {
        return unsupported("more than one subnet");
    }
    let config = configs.into_iter().next().unwrap_or_default();
    if config.ip_range.as_deref().is_some_and(|r| !r.is_empty())
        || config.aux_address.as_ref().is_some_and(|a| !a.is_empty())
    {
        return unsupported("IPRange or AuxiliaryAddresses");
    }
    if config.gateway.is_some() && config.subnet.is_none() {
        return Err(ApiError::bad_request("a Gateway needs its Subnet"));
    }
    Ok(CreateRequest {
        name: body.name,
        subnet: config.subnet.filter(|s| !s.is_empty()),
        gateway: config.gateway.filter(|g| !g.is_empty()),
        internal: body.internal,
        nat: nat && !body.internal,
    })
}

/// `POST /networks/create`: `{"Id", "Warning"}` (201); a name taken is 409.
pub async fn create(State(app): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req = parse_create(&body)?;
    let net = blocking(move || {
        let nets = Networks::open(&app.data_dir)?;
        let taken = || {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("network with name {} already exists", req.name),
            )
        };
        if nets.list()?.iter().any(|n| n.name == req.name) {
            return Err(taken());
        }
        if cela_instance::network::named::RESERVED_NAMES.contains(&req.name.as_str()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{} is a pre-defined network and cannot be created",
                    req.name
                ),
            ));
        }
        nets.create(&req).map_err(|e| match e {
            // Made meanwhile by another request.
            cela_instance::InstanceError::Invalid(why) if why.contains("exists already") => taken(),
            other => other.into(),
        })
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"Id": net.id, "Warning": ""})),
    )
        .into_response())
}

/// `DELETE /networks/{id}`: 204; one an instance runs on is 403, as Docker's "has active
/// endpoints".
pub async fn remove(
    State(app): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || {
        let nets = Networks::open(&app.data_dir)?;
        let net = find(&nets, &key)?;
        nets.remove(&net.name).map_err(|e| match e {
            cela_instance::InstanceError::Invalid(why) if why.contains("in use") => {
                ApiError::new(StatusCode::FORBIDDEN, why)
            }
            other => other.into(),
        })?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConnectBody {
    container: String,
    #[serde(default)]
    endpoint_config: Option<EndpointConfig>,
    /// Disconnect only; cela's disconnect is always whole.
    #[serde(default)]
    #[allow(dead_code)]
    force: bool,
}

/// An endpoint's settings, as `connect` and a container's `NetworkingConfig.EndpointsConfig`
/// give them.
#[derive(Debug, Default, Deserialize)]
pub(super) struct EndpointConfig {
    #[serde(default, rename = "IPAMConfig")]
    ipam_config: Option<EndpointIpam>,
    #[serde(default, rename = "MacAddress")]
    mac_address: Option<String>,
    #[serde(default, rename = "Aliases")]
    aliases: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct EndpointIpam {
    #[serde(default, rename = "IPv4Address")]
    ipv4_address: Option<String>,
    #[serde(default, rename = "IPv6Address")]
    ipv6_address: Option<String>,
}

impl EndpointConfig {
    /// The IPv4 address and MAC asked for (empty ones are none); aliases and an IPv6
    /// address are 501.
    pub(super) fn addressing(&self) -> Result<(Option<&str>, Option<&str>), ApiError> {
        if self.aliases.as_ref().is_some_and(|a| !a.is_empty()) {
            return Err(ApiError::not_implemented(
                "network aliases (instances are known by their names)",
            ));
        }
        let ipam = self.ipam_config.as_ref();
        fn given(v: Option<&String>) -> Option<&str> {
            v.map(String::as_str).filter(|s| !s.is_empty())
        }
        if given(ipam.and_then(|i| i.ipv6_address.as_ref())).is_some() {
            return Err(ApiError::not_implemented("an IPv6 address"));
        }
        Ok((
            given(ipam.and_then(|i| i.ipv4_address.as_ref())),
            given(self.mac_address.as_ref()),
        ))
    }
}

fn parse_connect(body: &[u8]) -> Result<ConnectBody, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed connect request: {e}")))
}

/// `POST /networks/{id}/connect`: a running container joins the network at once, as `cela
/// network connect` (a microVM's network is the one it started with: 501).
pub async fn connect(
    State(app): State<Arc<AppState>>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let body = parse_connect(&body)?;
    let endpoint = body.endpoint_config.unwrap_or_default();
    endpoint.addressing()?;
    blocking(move || {
        let nets = Networks::open(&app.data_dir)?;
        let net = find(&nets, &key)?;
        let inst = Instances::open(&app.data_dir)?.find(&body.container)?;
        let (ip, mac) = endpoint.addressing()?;
        let att = Attachment::of(&net.name, ip, mac)?;
        nets.connect(&inst, att)?;
        Ok(StatusCode::OK)
    })
    .await
}

/// `POST /networks/{id}/disconnect`: the container leaves the network, now and for good.
pub async fn disconnect(
    State(app): State<Arc<AppState>>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let body = parse_connect(&body)?;
    blocking(move || {
        let nets = Networks::open(&app.data_dir)?;
        let net = find(&nets, &key)?;
        let inst = Instances::open(&app.data_dir)?.find(&body.container)?;
        nets.disconnect(&inst, &net.name)?;
        Ok(StatusCode::OK)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bridge_network_is_made_as_docker_makes_one_and_other_asks_are_refused() {
        let req = parse_create(
            br#"{"Name": "lan", "Driver": "bridge", "CheckDuplicate": true,
                 "IPAM": {"Driver": "default", "Config": [{"Subnet": "10.9.0.0/24", "Gateway": "10.9.0.254"}]}}"#,
        )
        .unwrap();
        assert_eq!(req.name, "lan");
        assert_eq!(req.subnet.as_deref(), Some("10.9.0.0/24"));
        assert_eq!(req.gateway.as_deref(), Some("10.9.0.254"));
        assert!(req.nat && !req.internal, "Docker's bridges masquerade");
        let internal = parse_create(br#"{"Name": "walled", "Internal": true}"#).unwrap();
        assert!(internal.internal && !internal.nat);
        let plain = parse_create(
            br#"{"Name": "p", "Options": {"com.docker.network.bridge.enable_ip_masquerade": "false"}}"#,
        )
        .unwrap();
        assert!(!plain.nat);
        for (body, status) in [
            (&br#"{"Name": "o", "Driver": "overlay"}"#[..], 501),
            (br#"{"Name": "o", "EnableIPv6": true}"#, 501),
            (br#"{"Name": "o", "Labels": {"a": "b"}}"#, 501),
            (br#"{"Name": "o", "Attachable": true}"#, 501),
            (br#"{"Name": "o", "Options": {"com.docker.network.driver.mtu": "1400"}}"#, 501),
            (br#"{"Name": "o", "IPAM": {"Config": [{"Subnet": "10.1.0.0/24"}, {"Subnet": "10.2.0.0/24"}]}}"#, 501),
            (br#"{"Name": "o", "IPAM": {"Config": [{"Gateway": "10.1.0.1"}]}}"#, 400),
            (br#"{"Driver": "bridge"}"#, 400),
            (b"not json", 400),
        ] {
            let e = parse_create(body).unwrap_err();
            assert_eq!(
                e.status.as_u16(),
                status,
                "{}: {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
    }
}
