//! The Docker Engine API's containers: create, start, attach, wait, logs, stop, kill,
//! restart, inspect, list and remove, each a thin translation to `cela_instance` (a Docker
//! container is a cela instance; `HostConfig.Runtime: vm` makes it a microVM).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use cela_instance::log::Stream;
use cela_instance::ops::{self, is_live};
use cela_instance::{
    Instance, InstanceState, Instances, Kind, NetMode, RunRequest, Security, Status, Volume,
};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::frames::{ResizeQuery, content_type, frame, switching_protocols};
use crate::error::{ApiError, blocking};
use crate::follow::{self, From, Until};
use crate::{AppState, query_flag};

/// The part of a container create request cela reads. Docker clients send many more fields;
/// those are ignored when they hold their defaults, and refused when they ask for something
/// cela does not do (see [`refuse_unsupported`]).
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct CreateBody {
    image: String,
    #[serde(deserialize_with = "str_or_list")]
    cmd: Option<Vec<String>>,
    #[serde(deserialize_with = "str_or_list")]
    entrypoint: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    tty: bool,
    open_stdin: bool,
    labels: Option<BTreeMap<String, String>>,
    host_config: Option<HostConfig>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct HostConfig {
    binds: Option<Vec<String>>,
    memory: i64,
    nano_cpus: i64,
    network_mode: Option<String>,
    auto_remove: bool,
    runtime: Option<String>,
    cap_add: Option<Vec<String>>,
    cap_drop: Option<Vec<String>>,
    security_opt: Option<Vec<String>>,
    privileged: bool,
    port_bindings: Option<HashMap<String, Value>>,
    devices: Option<Vec<Value>>,
    publish_all_ports: bool,
    /// `[rows, columns]` of the client's terminal (`docker run -t` sends it, zeros without).
    console_size: Option<Vec<u64>>,
}

/// Docker's strslice: a command as a list, or one string (run through a shell by the client).
fn str_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        None => None,
        Some(Either::One(s)) => Some(vec![s]),
        Some(Either::Many(v)) => Some(v),
    })
}

fn refuse_unsupported(body: &CreateBody) -> Result<(), ApiError> {
    let host = body.host_config.as_ref();
    let refused = [
        (host.is_some_and(|h| h.privileged), "privileged containers"),
        (
            host.is_some_and(|h| h.publish_all_ports),
            "every exposed port published (PublishAllPorts, docker run -P)",
        ),
        (
            host.is_some_and(|h| h.devices.as_ref().is_some_and(|d| !d.is_empty())),
            "devices (docker run --device)",
        ),
    ];
    match refused.iter().find(|(asked, _)| *asked) {
        Some((_, what)) => Err(ApiError::not_implemented(format!(
            "creating a container with {what}"
        ))),
        None => Ok(()),
    }
}

/// The typed request a Docker create body asks for.
fn run_request(body: CreateBody, name: Option<String>) -> Result<RunRequest, ApiError> {
    refuse_unsupported(&body)?;
    if body.image.is_empty() {
        return Err(ApiError::bad_request("the request names no Image"));
    }
    let host = body.host_config.unwrap_or_default();
    let kind = match host.runtime.as_deref() {
        None | Some("") | Some("container") | Some("runc") | Some("cela") => Kind::Container,
        Some("vm") => Kind::Vm,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown runtime {other:?}: cela has `container` (the default) and `vm`"
            )));
        }
    };
    // Docker's default is its NAT'd network `bridge`, and so is cela's (made on first use,
    // unless CELA_DEFAULT_NETWORK names another); `bridge` by name is that network. Any
    // other name is a cela network (`cela network create`), checked when the instance is
    // made.
    let mut networks = Vec::new();
    let net = match host.network_mode.as_deref() {
        None | Some("") | Some("default") => {
            let (net, default) =
                cela_instance::network::parse_net_args(&[], kind).map_err(ApiError::from)?;
            networks = default;
            net
        }
        Some("none") => NetMode::None,
        Some("host") if kind == Kind::Container => NetMode::Host,
        Some(name) if !name.contains(':') && name != "host" => {
            networks.push(cela_instance::network::named::Attachment::parse(name)?);
            NetMode::None
        }
        Some(other) => {
            return Err(ApiError::not_implemented(format!(
                "NetworkMode {other:?} for a {}",
                if kind == Kind::Vm {
                    "microVM"
                } else {
                    "container"
                }
            )));
        }
    };
    // `{"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}`, as `cela run -p` takes them.
    let mut ports = Vec::new();
    for (key, bindings) in host.port_bindings.iter().flatten() {
        let (port, proto) = key.split_once('/').unwrap_or((key.as_str(), "tcp"));
        for b in bindings.as_array().into_iter().flatten() {
            let host_port = b["HostPort"].as_str().unwrap_or_default();
            if host_port.is_empty() {
                return Err(ApiError::not_implemented(format!(
                    "PortBindings {key}: a host port the daemon picks (give HostPort)"
                )));
            }
            let ip = b["HostIp"]
                .as_str()
                .filter(|i| !i.is_empty())
                .map_or(String::new(), |i| format!("{i}:"));
            ports.push(cela_instance::network::ports::PortMapping::parse(
                &format!("{ip}{host_port}:{port}/{proto}"),
            )?);
        }
    }
    if host.memory < 0 || host.nano_cpus < 0 {
        return Err(ApiError::bad_request(
            "Memory and NanoCpus must not be negative",
        ));
    }
    let memory_mib = (host.memory > 0).then(|| (host.memory as u64).div_ceil(1 << 20));
    let cpus = match host.nano_cpus {
        0 => None,
        n => Some(
            u32::try_from((n as u64).div_ceil(1_000_000_000)).map_err(|_| {
                ApiError::bad_request(format!("NanoCpus {n} is more CPUs than any host has"))
            })?,
        ),
    };
    let terminal_size = match host.console_size.as_deref() {
        None | Some([]) => None,
        Some(&[rows, cols]) => match (u16::try_from(rows), u16::try_from(cols)) {
            (Ok(rows), Ok(cols)) => Some((rows, cols)),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "ConsoleSize [{rows}, {cols}]: rows and columns are at most 65535"
                )));
            }
        },
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "ConsoleSize {other:?}: give [rows, columns]"
            )));
        }
    };
    let volumes = host
        .binds
        .unwrap_or_default()
        .iter()
        .map(|b| Volume::parse(b))
        .collect::<Result<Vec<_>, _>>()?;
    let security = if kind == Kind::Container {
        Security::parse(
            &host.cap_add.unwrap_or_default(),
            &host.cap_drop.unwrap_or_default(),
            &host.security_opt.unwrap_or_default(),
            net,
        )?
    } else {
        Security::default()
    };
    Ok(RunRequest {
        command: body.cmd.unwrap_or_default(),
        entrypoint: body.entrypoint,
        name: name.map(|n| n.trim_start_matches('/').to_owned()),
        env: body.env.unwrap_or_default(),
        workdir: body.working_dir.filter(|w| !w.is_empty()),
        user: body.user.filter(|u| !u.is_empty()),
        volumes,
        cpus,
        memory_mib,
        net,
        networks,
        ports,
        security,
        auto_remove: host.auto_remove,
        labels: body.labels.unwrap_or_default(),
        stdin: body.open_stdin,
        tty: body.tty,
        terminal_size,
        // Docker clients pull themselves when create answers 404.
        pull: cela_instance::PullPolicy::Never,
        ..RunRequest::new(body.image, kind)
    })
}

#[derive(Deserialize)]
pub struct CreateQuery {
    name: Option<String>,
}

/// A JSON value that asks for nothing: null, false, 0, "", [], {} or an object of such.
fn is_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_default),
    }
}

/// Fields of a create request cela has no equivalent for: refused (501) when they ask for
/// something, so that `docker run --read-only` or `--mount` is not run without it.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("Hostname", "--hostname"),
    ("Domainname", "--domainname"),
    ("StopSignal", "--stop-signal"),
    ("Volumes", "anonymous volumes (VOLUME, -v /dest)"),
    ("Healthcheck", "--health-cmd"),
];
const UNSUPPORTED_HOST: &[(&str, &str)] = &[
    ("Mounts", "--mount (use -v HOST:DEST)"),
    ("ReadonlyRootfs", "--read-only"),
    ("Tmpfs", "--tmpfs"),
    ("PidsLimit", "--pids-limit"),
    ("RestartPolicy", "--restart"),
    ("PidMode", "--pid"),
    ("IpcMode", "--ipc"),
    ("UTSMode", "--uts"),
    ("UsernsMode", "--userns"),
    ("CgroupnsMode", "--cgroupns"),
    ("Ulimits", "--ulimit"),
    ("Sysctls", "--sysctl"),
    ("ShmSize", "--shm-size"),
    ("VolumesFrom", "--volumes-from"),
    ("Links", "--link"),
    ("Dns", "--dns"),
    ("DnsSearch", "--dns-search"),
    ("DnsOptions", "--dns-option"),
    ("ExtraHosts", "--add-host"),
    ("CpuShares", "--cpu-shares"),
    ("CpuQuota", "--cpu-quota"),
    ("CpuPeriod", "--cpu-period"),
    ("CpusetCpus", "--cpuset-cpus"),
    ("CpusetMems", "--cpuset-mems"),
    ("MemoryReservation", "--memory-reservation"),
    ("BlkioWeight", "--blkio-weight"),
    ("OomKillDisable", "--oom-kill-disable"),
    ("GroupAdd", "--group-add"),
    ("Init", "--init"),
    ("StorageOpt", "--storage-opt"),
    ("LogConfig", "--log-driver/--log-opt"),
];

fn refuse_unknown_asks(raw: &Value) -> Result<(), ApiError> {
    let asked = |obj: &Value, list: &[(&str, &'static str)]| -> Option<&'static str> {
        list.iter()
            .find(|(k, _)| {
                obj.get(*k).is_some_and(|v| {
                    // The docker CLI names the default restart policy `no`.
                    let no_restart = *k == "RestartPolicy"
                        && v.get("Name").and_then(Value::as_str) == Some("no")
                        && v.get("MaximumRetryCount").is_none_or(is_default);
                    !is_default(v) && !no_restart
                })
            })
            .map(|(_, what)| *what)
    };
    let found = asked(raw, UNSUPPORTED).or_else(|| {
        raw.get("HostConfig")
            .and_then(|h| asked(h, UNSUPPORTED_HOST))
    });
    match found {
        Some(what) => Err(ApiError::not_implemented(format!(
            "creating a container with {what}"
        ))),
        None => Ok(()),
    }
}

/// The typed request a `POST /containers/create` body (and its `name` query) asks for: asks
/// cela cannot honour refused, the body parsed to its end; nothing is made yet.
pub fn parse_create(body: &[u8], name: Option<String>) -> Result<RunRequest, ApiError> {
    let malformed = |e: &dyn std::fmt::Display| {
        ApiError::bad_request(format!("malformed container config: {e}"))
    };
    let raw: Value = serde_json::from_slice(body).map_err(|e| malformed(&e))?;
    refuse_unknown_asks(&raw)?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let body: CreateBody = serde_path_to_error::deserialize(&mut de).map_err(|e| malformed(&e))?;
    de.end().map_err(|e| malformed(&e))?;
    let mut req = run_request(body, name)?;
    apply_endpoints(&raw, &mut req)?;
    Ok(req)
}

/// `NetworkingConfig.EndpointsConfig` (`docker run --network NET --ip A --mac-address M`): the
/// address and MAC asked for on a network the container joins, as `cela run --net
/// NET,ip=A,mac=M`; aliases and IPv6 addresses are 501, an endpoint on a network the container
/// is not on 400.
fn apply_endpoints(raw: &Value, req: &mut RunRequest) -> Result<(), ApiError> {
    let given = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let endpoints = raw
        .pointer("/NetworkingConfig/EndpointsConfig")
        .and_then(Value::as_object);
    for (network, ep) in endpoints.into_iter().flatten() {
        if ep.is_null() {
            continue;
        }
        let ep: super::networks::EndpointConfig =
            serde_json::from_value(ep.clone()).map_err(|e| {
                ApiError::bad_request(format!("malformed EndpointsConfig.{network}: {e}"))
            })?;
        let (ip, mac) = ep.addressing()?;
        if ip.is_none() && mac.is_none() {
            continue;
        }
        // Newer clients name the default network `default` when none is given.
        let target = |a: &&mut cela_instance::network::named::Attachment| {
            a.network == *network
                || (network == "default"
                    && a.network == cela_instance::network::named::DEFAULT_NETWORK)
        };
        let Some(att) = req.networks.iter_mut().find(target) else {
            return Err(ApiError::bad_request(format!(
                "an address or MAC is asked for on network {network}, which the container does not join (give it as NetworkMode)"
            )));
        };
        *att = cela_instance::network::named::Attachment::of(&att.network, ip, mac)?;
    }
    // Before API 1.44 the client sends `--mac-address` as the config's own MacAddress.
    if let Some(mac) = given(raw.get("MacAddress")) {
        let Some(att) = req.networks.first_mut() else {
            return Err(ApiError::bad_request(
                "a MacAddress needs a network the container joins",
            ));
        };
        if att.mac.is_none() {
            let ip = att.ip.map(|ip| ip.to_string());
            *att = cela_instance::network::named::Attachment::of(
                &att.network,
                ip.as_deref(),
                Some(&mac),
            )?;
        }
    }
    Ok(())
}

pub async fn create(
    State(app): State<Arc<AppState>>,
    Query(q): Query<CreateQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = parse_create(&body, q.name.filter(|n| !n.is_empty()))?;
    let inst = blocking(move || {
        let store = cela_image::Store::open(&app.data_dir)?;
        Ok(cela_instance::run::create(
            &app.data_dir,
            &store,
            &req,
            &cela_image::Progress::hidden(),
        )?)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"Id": inst.config.id, "Warnings": []})),
    )
        .into_response())
}

fn find(app: &AppState, key: &str) -> Result<Instance, ApiError> {
    Ok(Instances::open(&app.data_dir)?.find(key)?)
}

pub async fn start(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || {
        let inst = find(&app, &id)?;
        if is_live(&inst.state()?) {
            return Ok(StatusCode::NOT_MODIFIED);
        }
        cela_instance::run::start(&app.data_dir, &inst)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

#[derive(Deserialize)]
pub struct StopQuery {
    t: Option<u64>,
    timeout: Option<u64>,
    signal: Option<String>,
}

pub async fn stop(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<StopQuery>,
) -> Result<StatusCode, ApiError> {
    if q.signal.is_some() {
        return Err(ApiError::not_implemented(
            "stop with another signal than SIGTERM",
        ));
    }
    blocking(move || {
        let inst = find(&app, &id)?;
        if !is_live(&inst.state()?) {
            return Ok(StatusCode::NOT_MODIFIED);
        }
        ops::stop(&inst, Duration::from_secs(q.t.or(q.timeout).unwrap_or(10)))?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

pub async fn restart(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<StopQuery>,
) -> Result<StatusCode, ApiError> {
    blocking(move || {
        let inst = find(&app, &id)?;
        ops::stop(&inst, Duration::from_secs(q.t.or(q.timeout).unwrap_or(10)))?;
        cela_instance::run::start(&app.data_dir, &inst)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

#[derive(Deserialize)]
pub struct KillQuery {
    signal: Option<String>,
}

/// A signal as Docker names it: `SIGKILL`, `KILL` or a number.
fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, ApiError> {
    use std::str::FromStr;
    let bad = || ApiError::bad_request(format!("invalid signal: {s}"));
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).map_err(|_| bad());
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    nix::sys::signal::Signal::from_str(&name).map_err(|_| bad())
}

pub async fn kill(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<KillQuery>,
) -> Result<StatusCode, ApiError> {
    let signal = parse_signal(q.signal.as_deref().unwrap_or("SIGKILL"))?;
    blocking(move || {
        let inst = find(&app, &id)?;
        ops::send_signal(&inst, signal)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

pub async fn remove(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<crate::ForceQuery>,
) -> Result<StatusCode, ApiError> {
    let force = q.force();
    blocking(move || {
        let inst = find(&app, &id)?;
        ops::remove(&inst, force)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

#[derive(Deserialize)]
pub struct WaitQuery {
    condition: Option<String>,
}

pub async fn wait(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    let condition = q
        .condition
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "not-running".into());
    if !["not-running", "next-exit", "removed"].contains(&condition.as_str()) {
        return Err(ApiError::bad_request(format!(
            "invalid condition {condition:?}: not-running, next-exit or removed"
        )));
    }
    let inst = blocking({
        let app = app.clone();
        move || find(&app, &id)
    })
    .await?;
    let (tx, rx) = tokio::sync::oneshot::channel::<Value>();
    std::thread::spawn(move || {
        let state = inst.state().ok();
        let result = match state {
            // Not running already: its last status, or for `removed` once it is gone.
            Some(s) if condition == "not-running" && !is_live(&s) => status_json(
                s.exit_code.map_or(0, i64::from),
                s.error.filter(|_| s.status != Status::Exited),
            ),
            state => {
                let finished = state.and_then(|s| s.finished);
                let gone = || tx.is_closed();
                let ending =
                    follow::follow(&inst, From::Now, Until::RunEnds, finished, &gone, |_| true);
                let (code, error) = ending.status();
                if condition == "removed" && !ending.removed {
                    while inst.dir.exists() && !gone() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                status_json(code, error)
            }
        };
        let _ = tx.send(result);
    });
    // The headers go out at once (Docker clients wait for them before they start the
    // container); the status follows when the run ends.
    let body = futures_util::stream::unfold(Some(rx), |rx| async move {
        let rx = rx?;
        let value = rx.await.ok()?;
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(value.to_string() + "\n")),
            None,
        ))
    });
    let head = futures_util::stream::once(async {
        Ok::<_, std::convert::Infallible>(Bytes::from_static(b" "))
    });
    let body = Body::from_stream(futures_util::StreamExt::chain(head, body));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn status_json(code: i64, error: Option<String>) -> Value {
    json!({
        "StatusCode": code,
        "Error": error.map(|m| json!({"Message": m})),
    })
}

#[derive(Deserialize)]
pub struct LogsQuery {
    follow: Option<String>,
    stdout: Option<String>,
    stderr: Option<String>,
    timestamps: Option<String>,
    tail: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// A Docker time bound (`since`/`until`): unix seconds with an optional fraction; in
/// nanoseconds. 0 or absent: none.
fn time_bound(s: Option<&str>) -> Result<Option<i64>, ApiError> {
    let Some(s) = s.filter(|s| !s.is_empty() && *s != "0") else {
        return Ok(None);
    };
    // The events' parser: seconds with up to nine decimals (exact, where an f64 loses the
    // nanoseconds), or RFC 3339.
    cela_instance::events::parse_time(s)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("invalid time: {e}")))
}

fn rfc3339_nanos(t: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

pub async fn logs(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let follow_it = query_flag(q.follow.as_deref());
    let want_out = query_flag(q.stdout.as_deref());
    let want_err = query_flag(q.stderr.as_deref());
    let stamps = query_flag(q.timestamps.as_deref());
    let tail = match q.tail.as_deref() {
        None | Some("all") | Some("") => None,
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!("invalid tail {n:?}: a number or `all`"))
        })?),
    };
    let since = time_bound(q.since.as_deref())?;
    let until = time_bound(q.until.as_deref())?;
    if !want_out && !want_err {
        return Err(ApiError::bad_request(
            "you must choose at least one stream (stdout or stderr)",
        ));
    }
    let inst = blocking({
        let app = app.clone();
        move || find(&app, &id)
    })
    .await?;
    let tty = inst.config.tty;
    let permit = if follow_it {
        Some(app.session()?)
    } else {
        None
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    std::thread::spawn(move || {
        let _permit = permit;
        // Lines, so that `tail` counts lines as Docker's does.
        let line = |stream: Stream, time: Option<i64>, data: &[u8]| -> Vec<u8> {
            let mut text = Vec::new();
            if stamps {
                text.extend_from_slice(rfc3339_nanos(time.unwrap_or(0)).as_bytes());
                text.push(b' ');
            }
            text.extend_from_slice(data);
            encode_output(tty, stream, &text).to_vec()
        };
        let keep = |stream: Stream, time: Option<i64>| {
            (match stream {
                Stream::Stdout => want_out,
                Stream::Stderr => want_err,
            }) && since.is_none_or(|s| time.is_none_or(|t| t >= s))
                && until.is_none_or(|u| time.is_none_or(|t| t <= u))
        };
        let mut lines = Splitter::default();
        let gone = || tx.is_closed();
        let send = |chunk: Vec<u8>| tx.blocking_send(Bytes::from(chunk)).is_ok();
        // Without `tail` everything goes out as it is read; with it, the last lines are kept
        // (at most MAX_BACKLOG bytes of them) until the log so far has been read.
        let mut backlog: std::collections::VecDeque<Vec<u8>> = Default::default();
        let mut kept = 0usize;
        let drained = follow::follow(&inst, From::Start, Until::Drained, None, &gone, |rec| {
            if !keep(rec.stream, rec.time) {
                return true;
            }
            let Some(n) = tail else {
                return send(line(rec.stream, rec.time, rec.data));
            };
            for l in lines.push(rec.stream, rec.data) {
                let l = line(rec.stream, rec.time, &l);
                kept += l.len();
                backlog.push_back(l);
                while backlog.len() > n || kept > MAX_BACKLOG {
                    kept -= backlog.pop_front().map_or(0, |b| b.len());
                }
            }
            true
        });
        if tail.is_some() {
            for (stream, rest) in lines.flush() {
                backlog.push_back(line(stream, None, &rest));
                if tail.is_some_and(|n| backlog.len() > n) {
                    backlog.pop_front();
                }
            }
            for chunk in backlog {
                if !send(chunk) {
                    return;
                }
            }
        }
        // Following goes on from where the backlog ended, so nothing falls between.
        if follow_it && let Some(reader) = drained.reader {
            follow::follow(
                &inst,
                From::Reader(reader),
                Until::NotLive,
                None,
                &gone,
                |rec| {
                    if until.is_some_and(|u| rec.time.is_some_and(|t| t > u)) {
                        return false;
                    }
                    !keep(rec.stream, rec.time) || send(line(rec.stream, rec.time, rec.data))
                },
            );
        }
    });
    Ok((
        [(header::CONTENT_TYPE, content_type(tty))],
        crate::channel_body(rx),
    )
        .into_response())
}

/// The most bytes of lines `logs --tail` keeps before sending them.
const MAX_BACKLOG: usize = 16 << 20;

/// The longest line `logs --tail` keeps whole: a longer one counts as several.
const MAX_LINE: usize = 1 << 20;

/// Cuts output into lines per stream (the partial last line of each kept until it ends, or
/// until it is [`MAX_LINE`] long).
#[derive(Default)]
struct Splitter {
    partial: [Vec<u8>; 2],
}

impl Splitter {
    fn push(&mut self, stream: Stream, data: &[u8]) -> Vec<Vec<u8>> {
        let buf = &mut self.partial[stream as usize - 1];
        buf.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            lines.push(buf.drain(..=i).collect());
        }
        while buf.len() >= MAX_LINE {
            lines.push(buf.drain(..MAX_LINE).collect());
        }
        lines
    }

    fn flush(&mut self) -> Vec<(Stream, Vec<u8>)> {
        [Stream::Stdout, Stream::Stderr]
            .into_iter()
            .zip(self.partial.iter_mut())
            .filter(|(_, b)| !b.is_empty())
            .map(|(s, b)| (s, std::mem::take(b)))
            .collect()
    }
}

#[derive(Deserialize)]
pub struct AttachQuery {
    stream: Option<String>,
    stdin: Option<String>,
    stdout: Option<String>,
    stderr: Option<String>,
    logs: Option<String>,
    #[serde(rename = "detachKeys")]
    detach_keys: Option<String>,
}

/// Output for a client: frames without a terminal, the terminal's bytes as they are with one.
fn encode_output(tty: bool, stream: Stream, data: &[u8]) -> Bytes {
    if tty {
        return Bytes::copy_from_slice(data);
    }
    let mut out = Vec::new();
    frame(&mut out, stream, data);
    Bytes::from(out)
}

/// How long an attach to an ended instance waits for its next run to take its input.
const NEXT_RUN_BOUND: Duration = Duration::from_secs(30);

/// Feeds what a client sends into the instance's attach socket until the client's input ends
/// (its half-close becomes the workload's end of stdin) or the detach keys come; returns
/// whether the client detached. Connects once the supervisor takes input: an instance that
/// has ended is waited for into its next run (`docker start -ai` attaches first, then
/// starts at once), for [`NEXT_RUN_BOUND`] and while the client is there (`gone`); input of
/// a client that went before a run took it is never given to a later one.
fn forward_input(
    inst: &Instance,
    mut input: tokio::sync::mpsc::Receiver<Option<Vec<u8>>>,
    keys: &[u8],
    gone: &dyn Fn() -> bool,
) -> bool {
    use cela_instance::attach::{DetachWatch, Input};
    let since = std::time::Instant::now();
    let mut conn = loop {
        if gone() || !inst.dir.exists() || since.elapsed() > NEXT_RUN_BOUND {
            return false;
        }
        match cela_instance::attach::connect(inst, Duration::from_secs(1)) {
            Ok(c) => break c,
            Err(cela_instance::InstanceError::NotFound(_)) => return false,
            // Ended: its next start makes a new socket.
            Err(cela_instance::InstanceError::WrongState { .. }) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => {}
        }
    };
    let mut watch = DetachWatch::new(keys);
    while let Some(chunk) = input.blocking_recv() {
        let Some(data) = chunk else {
            let held = watch.finish();
            if !held.is_empty() {
                let _ = conn.send(&Input::Data(held));
            }
            let _ = conn.send(&Input::Eof);
            return false;
        };
        let (pass, detach) = watch.feed(&data);
        if !pass.is_empty() && conn.send(&Input::Data(pass)).is_err() {
            return false;
        }
        if detach {
            return true;
        }
    }
    false
}

/// `POST /containers/{id}/attach`: the hijacked connection carrying the container's output
/// until its run ends (frames without a terminal, raw bytes with one) and, with `stdin=1`,
/// the client's input to it: the client's half-close ends the workload's stdin, and the
/// detach keys (Ctrl-P Ctrl-Q by default with a terminal) end the attachment only.
pub async fn attach(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<AttachQuery>,
    mut req: Request,
) -> Result<Response, ApiError> {
    if query_flag(q.logs.as_deref()) {
        return Err(ApiError::not_implemented(
            "attach with logs=1 (use the logs endpoint)",
        ));
    }
    let want_out = query_flag(q.stdout.as_deref());
    let want_err = query_flag(q.stderr.as_deref());
    let streaming = query_flag(q.stream.as_deref());
    let inst = blocking({
        let app = app.clone();
        move || find(&app, &id)
    })
    .await?;
    let tty = inst.config.tty;
    let with_input = query_flag(q.stdin.as_deref()) && (inst.config.stdin || inst.config.tty);
    let keys = super::frames::detach_keys(q.detach_keys.as_deref(), tty)?;
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"tcp"));
    if with_input && !upgrade {
        return Err(ApiError::bad_request(
            "attaching stdin needs a hijacked connection (Upgrade: tcp)",
        ));
    }
    // The session's permit: held by the hijacked connection's task, or without one by the
    // thread that follows the output into the body.
    let mut permit = Some(app.session()?);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    if streaming {
        let inst = inst.clone();
        let follower_permit = if upgrade { None } else { permit.take() };
        std::thread::spawn(move || {
            let _permit = follower_permit;
            // One that has ended is followed into its next run (`docker start -a`
            // attaches before it starts it).
            let finished = inst.state().ok().and_then(|s| s.finished);
            let gone = || tx.is_closed();
            follow::follow(&inst, From::Now, Until::RunEnds, finished, &gone, |rec| {
                let wanted = match rec.stream {
                    Stream::Stdout => want_out,
                    Stream::Stderr => want_err,
                };
                !wanted
                    || tx
                        .blocking_send(encode_output(tty, rec.stream, rec.data))
                        .is_ok()
            });
        });
    }
    if !upgrade {
        return Ok((
            [(header::CONTENT_TYPE, content_type(tty))],
            crate::channel_body(rx),
        )
            .into_response());
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _permit = permit;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!("attach: the connection was not upgraded: {e}");
                return;
            }
        };
        let (from_client, mut to_client) = tokio::io::split(TokioIo::new(upgraded));
        // Says the client typed the detach keys; closed without a message when its input
        // ends otherwise.
        let (detached_tx, mut detached) = tokio::sync::mpsc::channel::<()>(1);
        if with_input {
            // Bounded: input the workload does not take is held back by the connection.
            let (in_tx, in_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(4);
            std::thread::spawn(move || {
                let gone = || detached_tx.is_closed();
                if forward_input(&inst, in_rx, &keys, &gone) {
                    let _ = detached_tx.blocking_send(());
                }
            });
            tokio::spawn(super::frames::read_input(from_client, in_tx));
        }
        loop {
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(chunk) => {
                        if !crate::write_bounded(to_client.write_all(&chunk)).await {
                            return;
                        }
                    }
                    None => break,
                },
                // Only a detach ends it: the input ending (the sender dropped) does not.
                Some(()) = detached.recv() => break,
            }
        }
        let _ = to_client.shutdown().await;
    });
    Ok(switching_protocols(tty))
}

/// `POST /containers/{id}/resize?h=ROWS&w=COLS`: the container's terminal size.
pub async fn resize(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<ResizeQuery>,
) -> Result<StatusCode, ApiError> {
    blocking(move || {
        let inst = find(&app, &id)?;
        if !inst.config.tty {
            return Err(ApiError::bad_request(format!(
                "container {} has no terminal to resize",
                inst.name()
            )));
        }
        let mut conn = cela_instance::attach::connect(&inst, Duration::from_secs(10))?;
        conn.send(&cela_instance::attach::Input::Resize {
            rows: q.h.unwrap_or(0),
            cols: q.w.unwrap_or(0),
        })
        .map_err(ApiError::internal)?;
        Ok(StatusCode::OK)
    })
    .await
}

/// Docker's container state name for a cela state.
fn docker_status(state: &InstanceState) -> &'static str {
    match state.status {
        Status::Created if state.supervisor.is_none() => "created",
        Status::Created | Status::Running => "running",
        Status::Exited => "exited",
        Status::Crashed | Status::Unknown => "dead",
    }
}

fn unix_secs(rfc3339: Option<&str>) -> i64 {
    rfc3339
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map_or(0, |t| t.timestamp())
}

/// "3 seconds", "2 minutes", … as Docker's `ps` shows ages.
fn human_age(since: Option<&str>) -> String {
    let secs = (chrono::Utc::now().timestamp() - unix_secs(since)).max(0);
    match secs {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        s if s < 60 => format!("{s} seconds"),
        s if s < 120 => "About a minute".into(),
        s if s < 3600 => format!("{} minutes", s / 60),
        s if s < 7200 => "About an hour".into(),
        s if s < 172_800 => format!("{} hours", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

fn status_text(state: &InstanceState) -> String {
    match docker_status(state) {
        "created" => "Created".into(),
        "running" => format!("Up {}", human_age(state.started.as_deref())),
        "exited" => format!(
            "Exited ({}) {} ago",
            state.exit_code.unwrap_or(-1),
            human_age(state.finished.as_deref())
        ),
        _ => "Dead".into(),
    }
}

fn command_line(inst: &Instance) -> String {
    inst.config.command.join(" ")
}

fn network_mode(inst: &Instance) -> String {
    if let Some(first) = inst.config.networks.first() {
        return first.network.clone();
    }
    match inst.config.net {
        NetMode::None => "none",
        NetMode::Host => "host",
        // Not Docker's `bridge` (cela's network of that name is another): a link of its own.
        NetMode::Auto => "auto",
    }
    .to_owned()
}

/// A container as `GET /containers/json` lists it.
fn summary(inst: &Instance, state: &InstanceState) -> Value {
    json!({
        "Id": inst.config.id,
        "Names": [format!("/{}", inst.config.name)],
        "Image": inst.config.image,
        "ImageID": inst.config.image_digest,
        "Command": command_line(inst),
        "Created": unix_secs(Some(&inst.config.created)),
        "Ports": [],
        "Labels": inst.config.labels,
        "State": docker_status(state),
        "Status": status_text(state),
        "HostConfig": {"NetworkMode": network_mode(inst)},
        "NetworkSettings": {"Networks": network_settings(inst, state)["Networks"]},
        "Mounts": mounts(inst),
    })
}

/// `NetworkSettings` as `docker inspect` reads it: each network the container is on (its
/// `--net auto` link as `auto`) with its address, and the first one's at the top level,
/// where older clients look.
fn network_settings(inst: &Instance, state: &InstanceState) -> Value {
    let split = |a: &str| -> (String, u8) {
        let (ip, len) = a.split_once('/').unwrap_or((a, "32"));
        (ip.to_owned(), len.parse().unwrap_or(32))
    };
    let mut joined: Vec<(String, Value)> = cela_instance::view::joined(inst)
        .into_iter()
        .map(|j| {
            let (ip, len) = j.address.as_deref().map(split).unwrap_or_default();
            let v = json!({
                "IPAddress": ip,
                "IPPrefixLen": len,
                "Gateway": j.gateway.unwrap_or_default(),
                "MacAddress": j.mac.unwrap_or_default(),
            });
            (j.network, v)
        })
        .collect();
    if let Some(link) = state
        .network
        .as_ref()
        .filter(|_| inst.config.net == NetMode::Auto)
    {
        let (ip, len) = split(&link.address);
        let (gateway, _) = split(&link.host_address);
        joined.push((
            "auto".into(),
            json!({"IPAddress": ip, "IPPrefixLen": len, "Gateway": gateway, "MacAddress": ""}),
        ));
    }
    let first = joined.first().map_or_else(|| json!({}), |(_, v)| v.clone());
    let networks: serde_json::Map<String, Value> = joined.into_iter().collect();
    json!({
        "Networks": networks,
        "Ports": {},
        "IPAddress": first["IPAddress"].as_str().unwrap_or_default(),
        "IPPrefixLen": first["IPPrefixLen"].as_u64().unwrap_or(0),
        "Gateway": first["Gateway"].as_str().unwrap_or_default(),
        "MacAddress": first["MacAddress"].as_str().unwrap_or_default(),
    })
}

fn mounts(inst: &Instance) -> Vec<Value> {
    inst.config
        .volumes
        .iter()
        .map(|v| {
            json!({
                "Type": "bind",
                "Source": v.host,
                "Destination": v.dest,
                "Mode": if v.read_only { "ro" } else { "" },
                "RW": !v.read_only,
                "Propagation": "rprivate",
            })
        })
        .collect()
}

/// A container as `GET /containers/{id}/json` shows it.
fn detail(inst: &Instance, state: &InstanceState) -> Value {
    let status = docker_status(state);
    let cfg = &inst.config;
    json!({
        "Id": cfg.id,
        "Created": cfg.created,
        "Path": cfg.command.first(),
        "Args": cfg.command.get(1..).unwrap_or_default(),
        "State": {
            "Status": status,
            "Running": status == "running",
            "Paused": false,
            "Restarting": false,
            "OOMKilled": false,
            "Dead": status == "dead",
            "Pid": state.pid.unwrap_or(0),
            "ExitCode": state.exit_code.unwrap_or(0),
            "Error": state.error.clone().unwrap_or_default(),
            "StartedAt": state.started.clone().unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
            "FinishedAt": state.finished.clone().unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
        },
        "Image": cfg.image_digest,
        "Name": format!("/{}", cfg.name),
        "RestartCount": 0,
        "Driver": "overlay",
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "",
        "HostConfig": {
            "Binds": cfg.volumes.iter().map(|v| format!(
                "{}:{}{}", v.host.display(), v.dest, if v.read_only { ":ro" } else { "" }
            )).collect::<Vec<_>>(),
            "NetworkMode": network_mode(inst),
            "AutoRemove": cfg.auto_remove,
            "Runtime": match cfg.kind { Kind::Vm => "vm", Kind::Container => "container" },
            "Memory": cfg.memory_mib.map_or(0, |m| m << 20),
            "NanoCpus": cfg.cpus.map_or(0, |c| i64::from(c) * 1_000_000_000),
            // cela's log keeps every line and serves `logs`, as Docker's json-file driver
            // does; clients (docker-py's run) read logs only from drivers they know keep them.
            "LogConfig": {"Type": "json-file", "Config": {}},
            "CapAdd": cfg.security.cap_add,
            "CapDrop": cfg.security.cap_drop,
        },
        "Config": {
            "Hostname": cfg.id,
            "User": cfg.user.clone().unwrap_or_default(),
            "Env": cfg.env,
            "Cmd": cfg.command,
            "Image": cfg.image,
            "WorkingDir": cfg.workdir.clone().unwrap_or_default(),
            "Entrypoint": null,
            "Labels": cfg.labels,
            "Tty": cfg.tty,
            "OpenStdin": cfg.stdin,
            "StdinOnce": cfg.stdin,
            "AttachStdin": cfg.stdin,
            "AttachStdout": true,
            "AttachStderr": true,
        },
        "NetworkSettings": network_settings(inst, state),
        "Mounts": mounts(inst),
    })
}

pub async fn inspect(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    blocking(move || {
        let inst = find(&app, &id)?;
        let state = inst.state_or_unknown();
        Ok(axum::Json(detail(&inst, &state)))
    })
    .await
}

#[derive(Deserialize)]
pub struct ListQuery {
    all: Option<String>,
    filters: Option<String>,
    limit: Option<i64>,
}

/// Docker's `filters` query: `{"key": ["value", …]}`, or from older clients
/// `{"key": {"value": true, …}}`.
pub fn parse_filters(raw: Option<&str>) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(BTreeMap::new());
    };
    let bad = |why: String| ApiError::bad_request(format!("invalid filters: {why}"));
    let v: BTreeMap<String, Value> = serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (k, v) in v {
        let values = match v {
            Value::Array(a) => a
                .into_iter()
                .map(|x| x.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>(),
            Value::Object(o) => Some(o.into_iter().map(|(k, _)| k).collect()),
            _ => None,
        }
        .ok_or_else(|| bad(format!("{k}: a list of strings expected")))?;
        out.insert(k, values);
    }
    Ok(out)
}

fn matches(
    filters: &BTreeMap<String, Vec<String>>,
    inst: &Instance,
    state: &InstanceState,
) -> bool {
    filters.iter().all(|(key, values)| {
        values.iter().any(|want| match key.as_str() {
            "name" => inst.config.name.contains(want.trim_start_matches('/')),
            "id" => inst.config.id.starts_with(want.as_str()),
            "status" => docker_status(state) == want,
            "label" => match want.split_once('=') {
                Some((k, v)) => inst.config.labels.get(k).is_some_and(|x| x == v),
                None => inst.config.labels.contains_key(want.as_str()),
            },
            "ancestor" => inst.config.image == *want,
            _ => false,
        })
    })
}

pub async fn list(
    State(app): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<Vec<Value>>, ApiError> {
    let all = query_flag(q.all.as_deref());
    let filters = parse_filters(q.filters.as_deref())?;
    if let Some(bad) = filters
        .keys()
        .find(|k| !["name", "id", "status", "label", "ancestor"].contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "invalid filter {bad:?}: cela filters by name, id, status, label and ancestor"
        )));
    }
    blocking(move || {
        let insts = Instances::open(&app.data_dir)?.list()?;
        let mut rows: Vec<(i64, Value)> = Vec::new();
        for inst in insts {
            let state = inst.state_or_unknown();
            let shown = all || is_live(&state) || filters.contains_key("status");
            if shown && matches(&filters, &inst, &state) {
                rows.push((
                    unix_secs(Some(&inst.config.created)),
                    summary(&inst, &state),
                ));
            }
        }
        // Newest first, as Docker lists.
        rows.sort_by_key(|r| std::cmp::Reverse(r.0));
        let mut rows: Vec<Value> = rows.into_iter().map(|(_, v)| v).collect();
        if let Some(n) = q.limit.filter(|n| *n > 0) {
            rows.truncate(n as usize);
        }
        Ok(axum::Json(rows))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_body_becomes_a_typed_request() {
        let body: CreateBody = serde_json::from_value(json!({
            "Image": "busybox",
            "Cmd": ["echo", "hi"],
            "Env": ["A=1"],
            "Labels": {"team": "x"},
            "HostConfig": {"Memory": 104857600, "NanoCpus": 1500000000, "NetworkMode": "none",
                           "AutoRemove": true, "Runtime": "vm", "Unknown": 1},
            "SomethingNew": {"a": 1}
        }))
        .unwrap();
        let req = run_request(body, Some("/web".into())).unwrap();
        assert_eq!(req.image, "busybox");
        assert_eq!(req.command, ["echo", "hi"]);
        assert_eq!(req.kind, Kind::Vm);
        assert_eq!(req.memory_mib, Some(100));
        assert_eq!(req.cpus, Some(2));
        assert_eq!(req.net, NetMode::None);
        assert!(req.auto_remove);
        assert_eq!(req.name.as_deref(), Some("web"));
        assert_eq!(req.labels["team"], "x");
    }

    #[test]
    fn port_bindings_are_published_ports() {
        let body = json!({"Image": "b", "HostConfig": {"PortBindings": {
            "80/tcp": [{"HostIp": "", "HostPort": "8080"}], "53/udp": [{"HostIp": "10.0.0.1", "HostPort": "5353"}]}}});
        let req = run_request(serde_json::from_value(body).unwrap(), None).unwrap();
        let mut shown: Vec<String> = req.ports.iter().map(|p| p.display()).collect();
        shown.sort();
        assert_eq!(shown, ["0.0.0.0:8080->80/tcp", "10.0.0.1:5353->53/udp"]);
    }

    #[test]
    fn console_size_is_the_terminal_at_start() {
        let sized = |v: Value| {
            let body = json!({"Image": "b", "Tty": true, "HostConfig": {"ConsoleSize": v}});
            run_request(serde_json::from_value(body).unwrap(), None).map(|r| r.terminal_size)
        };
        assert_eq!(sized(json!([33, 90])).unwrap(), Some((33, 90)));
        assert_eq!(sized(json!([])).unwrap(), None);
        assert!(sized(json!([70000, 80])).is_err());
        assert!(sized(json!([1, 2, 3])).is_err());
    }

    #[test]
    fn a_network_mode_that_names_a_network_joins_it() {
        let body = json!({"Image": "b", "HostConfig": {"NetworkMode": "lan"}});
        let req = run_request(serde_json::from_value(body).unwrap(), None).unwrap();
        assert_eq!(req.net, NetMode::None);
        assert_eq!(req.networks.len(), 1);
        assert_eq!(req.networks[0].network, "lan");
    }

    #[test]
    fn an_endpoint_config_gives_the_address_and_mac_on_its_network() {
        let parse = |v: Value| parse_create(v.to_string().as_bytes(), None);
        let req = parse(json!({"Image": "b", "HostConfig": {"NetworkMode": "lan"},
            "NetworkingConfig": {"EndpointsConfig": {"lan": {
                "IPAMConfig": {"IPv4Address": "10.9.0.7"}, "MacAddress": "02:42:0a:09:00:07"}}}}))
        .unwrap();
        assert_eq!(req.networks[0].ip, Some("10.9.0.7".parse().unwrap()));
        assert_eq!(req.networks[0].mac.as_deref(), Some("02:42:0a:09:00:07"));
        // An older client's MacAddress, on the config itself.
        let old = parse(json!({"Image": "b", "MacAddress": "02:42:0a:09:00:08",
            "HostConfig": {"NetworkMode": "lan"}}))
        .unwrap();
        assert_eq!(old.networks[0].mac.as_deref(), Some("02:42:0a:09:00:08"));
        for (body, status) in [
            (
                json!({"Image": "b", "HostConfig": {"NetworkMode": "lan"},
                "NetworkingConfig": {"EndpointsConfig": {"lan": {"Aliases": ["x"]}}}}),
                501,
            ),
            (
                json!({"Image": "b", "HostConfig": {"NetworkMode": "lan"},
                "NetworkingConfig": {"EndpointsConfig": {"other": {"IPAMConfig": {"IPv4Address": "10.9.0.7"}}}}}),
                400,
            ),
            (
                json!({"Image": "b", "HostConfig": {"NetworkMode": "lan"},
                "NetworkingConfig": {"EndpointsConfig": {"lan": {"IPAMConfig": {"IPv4Address": "nope"}}}}}),
                400,
            ),
            (
                json!({"Image": "b", "MacAddress": "02:42:0a:09:00:08", "HostConfig": {"NetworkMode": "none"}}),
                400,
            ),
        ] {
            let err = parse(body.clone()).unwrap_err();
            assert_eq!(err.status.as_u16(), status, "{body}: {}", err.message);
        }
    }

    #[test]
    fn what_cela_does_not_do_is_refused_not_ignored() {
        for body in [
            json!({"Image": "b", "HostConfig": {"Privileged": true}}),
            json!({"Image": "b", "HostConfig": {"PublishAllPorts": true}}),
            json!({"Image": "b", "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": ""}]}}}),
            json!({"Image": "b", "HostConfig": {"NetworkMode": "container:x"}}),
        ] {
            let err = run_request(serde_json::from_value(body.clone()).unwrap(), None).unwrap_err();
            assert_eq!(
                err.status,
                StatusCode::NOT_IMPLEMENTED,
                "{body}: {}",
                err.message
            );
        }
        let err = run_request(
            serde_json::from_value(json!({"Image": "b", "HostConfig": {"Runtime": "kata"}}))
                .unwrap(),
            None,
        )
        .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn filters_in_both_shapes() {
        let a = parse_filters(Some(r#"{"name":["web"],"label":["a=b"]}"#)).unwrap();
        let b = parse_filters(Some(r#"{"name":{"web":true},"label":{"a=b":true}}"#)).unwrap();
        assert_eq!(a, b);
        assert!(parse_filters(Some(r#"{"name":"web"}"#)).is_err());
    }

    #[test]
    fn signals_by_name_or_number() {
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("kill").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("15").unwrap(), Signal::SIGTERM);
        assert!(parse_signal("SIGNOPE").is_err());
    }

    #[test]
    fn lines_are_cut_per_stream() {
        let mut s = Splitter::default();
        assert!(s.push(Stream::Stdout, b"a").is_empty());
        assert_eq!(s.push(Stream::Stderr, b"e\n"), [b"e\n".to_vec()]);
        assert_eq!(s.push(Stream::Stdout, b"b\nc"), [b"ab\n".to_vec()]);
        assert_eq!(s.flush(), [(Stream::Stdout, b"c".to_vec())]);
    }
}
