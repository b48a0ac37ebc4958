//! cela's own API under `/cela/v1`: instances as the same JSON objects `cela ps --format json`
//! and `cela inspect` print (`cela_instance::view`), made from a strict typed request, and
//! the image store's listing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use cela_instance::{Instances, Kind, NetMode, RunRequest, Volume};
use serde::Deserialize;
use serde_json::Value;

use cela_image::store::ImageRecord;
use cela_instance::events::Event;
use cela_instance::view::{Detail, Listed};
use utoipa::{OpenApi, ToSchema};

use crate::AppState;
use crate::error::{ApiError, ErrorBody, blocking};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/cela/v1/instances", get(list).post(create))
        .route("/cela/v1/instances/{id}", get(inspect).delete(remove))
        .route("/cela/v1/instances/{id}/start", post(start))
        .route("/cela/v1/instances/{id}/stop", post(stop))
        .route("/cela/v1/instances/{id}/commit", post(commit))
        .route("/cela/v1/instances/{id}/exec", get(crate::ws::exec))
        .route("/cela/v1/instances/{id}/console", get(crate::ws::console))
        .route("/cela/v1/images", get(images))
        .route("/cela/v1/events", get(events))
        .route("/cela/v1/openapi.json", get(openapi))
}

/// cela's own API, described from the handlers and the types that make its JSON. The same
/// document is kept in the repository (`docs/openapi.json`); a test keeps the two equal.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "cela",
        description = "cela's own API: instances (containers and microVMs), images and events. The Docker Engine API that cela also serves is described by Docker's own document (version 1.50).",
        license(name = "Apache-2.0"),
    ),
    paths(
        list,
        create,
        inspect,
        remove,
        start,
        stop,
        commit,
        crate::ws::exec,
        crate::ws::console,
        images,
        events,
        openapi
    ),
    tags(
        (name = "instances", description = "Containers and microVMs, as `cela run`, `ps`, `inspect`, `start`, `stop` and `rm` see them"),
        (name = "images", description = "The image store"),
        (name = "events", description = "The event journal"),
    ),
)]
pub struct Document;

/// The OpenAPI document as served and kept in the repository: pretty JSON with a final
/// newline.
pub fn openapi_json() -> String {
    let mut doc = Document::openapi()
        .to_pretty_json()
        .expect("the document serializes");
    doc.push('\n');
    doc
}

#[utoipa::path(get, path = "/cela/v1/openapi.json", tag = "instances",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json")))]
async fn openapi() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
        .into_response()
}

/// `GET /cela/v1/events?since=&until=&filters=`: the event journal in its own shape (as `cela
/// events --format json` prints it), with the Docker API's selection and following.
#[utoipa::path(get, path = "/cela/v1/events", tag = "events",
    params(
        ("since" = Option<String>, Query, description = "Unix seconds (with a fraction) or RFC 3339: events from then"),
        ("until" = Option<String>, Query, description = "Events until then; without it the stream follows new events"),
        ("filters" = Option<String>, Query, description = "Docker's filters as JSON: {\"container\": [ID], \"event\": [ACTION], \"label\": [K=V], \"type\": [...]}"),
    ),
    responses(
        (status = 200, description = "One event per line (JSON lines), followed unless `until` is given", body = Event, content_type = "application/json"),
        (status = 400, description = "A malformed time or filter", body = ErrorBody),
        (status = 503, description = "Too many streaming sessions", body = ErrorBody),
    ))]
async fn events(
    State(app): State<Arc<AppState>>,
    axum::extract::Query(q): axum::extract::Query<crate::docker::events::EventsQuery>,
) -> Result<axum::response::Response, ApiError> {
    crate::docker::events::stream(&app, &q, |e| serde_json::to_value(e).unwrap_or(Value::Null))
}

#[utoipa::path(get, path = "/cela/v1/instances", tag = "instances",
    responses((status = 200, description = "Every instance, as `cela ps -a --format json` lists them; a record that cannot be read has only `id`, `status` (`unknown`) and `error`", body = [Listed])))]
async fn list(State(app): State<Arc<AppState>>) -> Result<axum::Json<Vec<Value>>, ApiError> {
    blocking(move || {
        // As `cela ps -a --format json`: records that cannot be read by their id only.
        let (good, broken) = Instances::open(&app.data_dir)?.scan()?;
        let mut rows: Vec<Value> = good
            .iter()
            .map(|i| cela_instance::view::summary(i, &i.state_or_unknown()))
            .collect();
        rows.extend(broken.iter().map(cela_instance::view::broken));
        Ok(axum::Json(rows))
    })
    .await
}

/// The instance a route's path names, as the OpenAPI document describes it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct InstanceKey {
    /// The instance's id, a unique prefix of it, or its name.
    #[allow(
        dead_code,
        reason = "described only: the handlers take it as Path<String>"
    )]
    id: String,
}

fn detail(app: &AppState, id: &str) -> Result<Value, ApiError> {
    let inst = Instances::open(&app.data_dir)?.find(id)?;
    Ok(cela_instance::view::detail(&inst, &inst.state_or_unknown()))
}

#[utoipa::path(get, path = "/cela/v1/instances/{id}", tag = "instances",
    params(InstanceKey),
    responses(
        (status = 200, description = "The instance, as `cela inspect` shows it", body = Detail),
        (status = 400, description = "An id prefix that several instances share", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
    ))]
async fn inspect(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    blocking(move || detail(&app, &id).map(axum::Json)).await
}

/// A new instance, as `cela run` takes it. Unknown fields are refused.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// The image: a name in the store (pulled when missing, as `pull` says) or a digest.
    image: String,
    /// The command, after the entrypoint; the image's cmd when empty.
    #[serde(default)]
    command: Vec<String>,
    /// Replaces the image's entrypoint.
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    /// `container` (default) or `vm`.
    #[serde(default = "container")]
    kind: Kind,
    /// A unique name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 64 bytes); one is made up without it.
    #[serde(default)]
    name: Option<String>,
    /// `KEY=VALUE`, after the image's environment.
    #[serde(default)]
    env: Vec<String>,
    /// The working directory (absolute); the image's without it.
    #[serde(default)]
    workdir: Option<String>,
    /// `USER[:GROUP]`, names of the image or numbers.
    #[serde(default)]
    user: Option<String>,
    /// `HOST:DEST[:ro]`.
    #[serde(default)]
    volumes: Vec<String>,
    /// A microVM's vCPUs; a container's CPU limit.
    #[serde(default)]
    cpus: Option<u32>,
    /// A microVM's RAM; a container's memory limit.
    #[serde(default)]
    memory_mib: Option<u64>,
    /// `none`, `host` (containers) or `auto`. Absent with no `networks`: the default
    /// network, as `cela run` without `--net` (`bridge`, cela's NAT'd network made on first
    /// use, unless the server's `CELA_DEFAULT_NETWORK` names another).
    #[serde(default)]
    net: Option<NetMode>,
    /// Named networks to join (`cela network create`), as `cela run --net` takes them:
    /// `NAME[,ip=ADDR][,mac=MAC]`; with `net` left at `none`.
    #[serde(default)]
    networks: Vec<String>,
    /// Ports to publish, as `cela run -p` takes them: `[IP:]HOST_PORT:PORT[/tcp|udp]`.
    #[serde(default)]
    ports: Vec<String>,
    /// Removed when it ends (`cela run --rm`).
    #[serde(default)]
    auto_remove: bool,
    /// Key/value labels, for filtering.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Pull the image first: `missing` (default), `always` or `never`.
    #[serde(default)]
    pull: cela_instance::PullPolicy,
    /// Start it at once (default), or only record it.
    #[serde(default = "yes")]
    start: bool,
}

fn container() -> Kind {
    Kind::Container
}

fn yes() -> bool {
    true
}

/// One JSON document of type `T` and nothing after it; an error names the field at fault
/// ("malformed WHAT: …", 400).
fn strict_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let malformed =
        |e: &dyn std::fmt::Display| ApiError::bad_request(format!("malformed {what}: {e}"));
    let v = serde_path_to_error::deserialize(&mut de).map_err(|e| malformed(&e))?;
    de.end().map_err(|e| malformed(&e))?;
    Ok(v)
}

/// The typed request (and whether to start it) a `POST /cela/v1/instances` body asks for:
/// strict JSON (unknown fields refused), checked before anything is made.
pub fn parse_create(body: &[u8]) -> Result<(RunRequest, bool), ApiError> {
    let body: CreateBody = strict_json(body, "instance request")?;
    if body.net == Some(NetMode::Host) && body.kind == Kind::Vm {
        return Err(ApiError::bad_request(
            "net host is for containers: a microVM runs its own kernel",
        ));
    }
    let (net, networks) = match body.net {
        None if body.networks.is_empty() => cela_instance::network::parse_net_args(&[], body.kind)?,
        net => (
            net.unwrap_or_default(),
            body.networks
                .iter()
                .map(|n| cela_instance::network::named::Attachment::parse(n))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let req = RunRequest {
        command: body.command,
        entrypoint: body.entrypoint,
        name: body.name,
        env: body.env,
        workdir: body.workdir,
        user: body.user,
        volumes: body
            .volumes
            .iter()
            .map(|v| Volume::parse(v))
            .collect::<Result<Vec<_>, _>>()?,
        cpus: body.cpus,
        memory_mib: body.memory_mib,
        net,
        networks,
        ports: body
            .ports
            .iter()
            .map(|p| cela_instance::network::ports::PortMapping::parse(p))
            .collect::<Result<Vec<_>, _>>()?,
        auto_remove: body.auto_remove,
        labels: body.labels,
        pull: body.pull,
        ..RunRequest::new(body.image, body.kind)
    };
    Ok((req, body.start))
}

#[utoipa::path(post, path = "/cela/v1/instances", tag = "instances",
    request_body(content = CreateBody, description = "What to run (strict: unknown fields are refused)"),
    responses(
        (status = 201, description = "The instance, created and (unless `start` is false) started", body = Detail),
        (status = 400, description = "Malformed JSON, an unknown field or an invalid value", body = ErrorBody),
        (status = 404, description = "The image is neither stored nor pullable", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 413, description = "The body is over 1 MiB", body = ErrorBody),
        (status = 501, description = "Something cela cannot do for this kind of instance", body = ErrorBody),
    ))]
async fn create(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let (req, start) = parse_create(&body)?;
    blocking(move || {
        let store = cela_image::Store::open(&app.data_dir)?;
        let inst = cela_instance::run::create(
            &app.data_dir,
            &store,
            &req,
            &cela_image::Progress::hidden(),
        )?;
        if start {
            cela_instance::run::start(&app.data_dir, &inst)?;
        }
        let v = cela_instance::view::detail(&inst, &inst.state_or_unknown());
        Ok((StatusCode::CREATED, axum::Json(v)))
    })
    .await
}

#[utoipa::path(post, path = "/cela/v1/instances/{id}/start", tag = "instances",
    params(InstanceKey),
    responses(
        (status = 200, description = "The instance after it started", body = Detail),
        (status = 400, description = "An id prefix that several instances share", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "It is running already", body = ErrorBody),
    ))]
async fn start(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    blocking(move || {
        let inst = Instances::open(&app.data_dir)?.find(&id)?;
        cela_instance::run::start(&app.data_dir, &inst)?;
        detail(&app, &id).map(axum::Json)
    })
    .await
}

#[derive(Deserialize)]
struct StopQuery {
    timeout: Option<u64>,
}

#[utoipa::path(post, path = "/cela/v1/instances/{id}/stop", tag = "instances",
    params(
        InstanceKey,
        ("timeout" = Option<u64>, Query, description = "Seconds between SIGTERM (a microVM: its power button) and SIGKILL; 10 by default"),
    ),
    responses(
        (status = 200, description = "The instance after it stopped", body = Detail),
        (status = 400, description = "An id prefix that several instances share", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
    ))]
async fn stop(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<StopQuery>,
) -> Result<axum::Json<Value>, ApiError> {
    blocking(move || {
        let inst = Instances::open(&app.data_dir)?.find(&id)?;
        cela_instance::ops::stop(&inst, Duration::from_secs(q.timeout.unwrap_or(10)))?;
        detail(&app, &id).map(axum::Json)
    })
    .await
}

/// What `cela commit` takes: how to name and describe the image made of a container's
/// changes. Unknown fields are refused.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    /// `NAME[:TAG]`; without it the image is known by its digest only.
    #[serde(default)]
    name: Option<String>,
    /// The commit message, kept in the image's history.
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    author: Option<String>,
    /// Dockerfile instructions applied to the image's config: CMD, ENTRYPOINT, ENV, EXPOSE,
    /// LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR.
    #[serde(default)]
    changes: Vec<String>,
    /// Freeze a running container while its changes are read (default true).
    #[serde(default = "yes")]
    pause: bool,
}

#[utoipa::path(post, path = "/cela/v1/instances/{id}/commit", tag = "instances",
    params(InstanceKey),
    request_body(content = Option<CommitBody>, description = "How to name and describe the image (an empty body: unnamed, paused)"),
    responses(
        (status = 201, description = "The image made of the container's changes", body = ImageRecord),
        (status = 400, description = "Malformed JSON, a bad name or change, or an id prefix that several instances share", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 501, description = "The instance is a microVM", body = ErrorBody),
    ))]
async fn commit(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let body: CommitBody = if body.iter().all(u8::is_ascii_whitespace) {
        CommitBody {
            pause: true,
            ..CommitBody::default()
        }
    } else {
        strict_json(&body, "commit request")?
    };
    cela_image::commit::check_request(body.name.as_deref(), &body.changes)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    blocking(move || {
        let inst = Instances::open(&app.data_dir)?.find(&id)?;
        let store = cela_image::Store::open(&app.data_dir)?;
        let req = cela_instance::commit::CommitRequest {
            name: body.name,
            message: body.message,
            author: body.author,
            changes: body.changes,
            pause: body.pause,
        };
        let rec =
            cela_instance::commit::commit(&store, &inst, &req, &cela_image::Progress::hidden())?;
        let v = serde_json::to_value(rec).map_err(ApiError::internal)?;
        Ok((StatusCode::CREATED, axum::Json(v)))
    })
    .await
}

#[utoipa::path(delete, path = "/cela/v1/instances/{id}", tag = "instances",
    params(
        InstanceKey,
        ("force" = Option<bool>, Query, description = "Stop it first if it runs"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "An id prefix that several instances share", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "It runs, and `force` was not given", body = ErrorBody),
    ))]
async fn remove(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<crate::ForceQuery>,
) -> Result<StatusCode, ApiError> {
    let force = q.force();
    blocking(move || {
        let inst = Instances::open(&app.data_dir)?.find(&id)?;
        cela_instance::ops::remove(&inst, force)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

#[utoipa::path(get, path = "/cela/v1/images", tag = "images",
    responses((status = 200, description = "The image store's records", body = [ImageRecord])))]
async fn images(State(app): State<Arc<AppState>>) -> Result<axum::Json<Value>, ApiError> {
    blocking(move || {
        let store = cela_image::Store::open(&app.data_dir)?;
        Ok(axum::Json(
            serde_json::to_value(store.list()?).map_err(ApiError::internal)?,
        ))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document kept in the repository is the one the code makes: run with `CELA_BLESS=1`
    /// to rewrite it after changing the API.
    #[test]
    fn the_openapi_document_in_the_repository_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let now = openapi_json();
        if std::env::var_os("CELA_BLESS").is_some() {
            std::fs::write(path, &now).unwrap();
        }
        let kept = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            kept == now,
            "docs/openapi.json is not the document the code makes: regenerate it with \
             `CELA_BLESS=1 cargo test -p cela-api openapi` and commit it"
        );
    }

    #[test]
    fn every_route_is_in_the_document() {
        let doc: Value = serde_json::from_str(&openapi_json()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for (path, methods) in [
            ("/cela/v1/instances", &["get", "post"][..]),
            ("/cela/v1/instances/{id}", &["get", "delete"]),
            ("/cela/v1/instances/{id}/start", &["post"]),
            ("/cela/v1/instances/{id}/stop", &["post"]),
            ("/cela/v1/instances/{id}/commit", &["post"]),
            ("/cela/v1/instances/{id}/exec", &["get"]),
            ("/cela/v1/instances/{id}/console", &["get"]),
            ("/cela/v1/images", &["get"]),
            ("/cela/v1/events", &["get"]),
            ("/cela/v1/openapi.json", &["get"]),
        ] {
            for m in methods {
                assert!(paths[path][m].is_object(), "{m} {path} is not described");
            }
        }
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for s in [
            "CreateBody",
            "CommitBody",
            "Summary",
            "Detail",
            "ErrorBody",
            "Event",
            "ImageRecord",
        ] {
            assert!(schemas.contains_key(s), "schema {s} is missing");
        }
        // The create body's required fields are what serde requires.
        assert_eq!(
            schemas["CreateBody"]["required"],
            serde_json::json!(["image"])
        );
    }
}
