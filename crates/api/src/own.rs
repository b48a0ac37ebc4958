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

use crate::AppState;
use crate::error::{ApiError, blocking};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/cela/v1/instances", get(list).post(create))
        .route("/cela/v1/instances/{id}", get(inspect).delete(remove))
        .route("/cela/v1/instances/{id}/start", post(start))
        .route("/cela/v1/instances/{id}/stop", post(stop))
        .route("/cela/v1/instances/{id}/exec", get(crate::ws::exec))
        .route("/cela/v1/images", get(images))
        .route("/cela/v1/events", get(events))
}

/// `GET /cela/v1/events?since=&until=&filters=`: the event journal in its own shape (as `cela
/// events --format json` prints it), with the Docker API's selection and following.
async fn events(
    State(app): State<Arc<AppState>>,
    axum::extract::Query(q): axum::extract::Query<crate::docker::events::EventsQuery>,
) -> Result<axum::response::Response, ApiError> {
    crate::docker::events::stream(&app, &q, |e| serde_json::to_value(e).unwrap_or(Value::Null))
}

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

fn detail(app: &AppState, id: &str) -> Result<Value, ApiError> {
    let inst = Instances::open(&app.data_dir)?.find(id)?;
    Ok(cela_instance::view::detail(&inst, &inst.state_or_unknown()))
}

async fn inspect(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    blocking(move || detail(&app, &id).map(axum::Json)).await
}

/// A new instance, as `cela run` takes it. Unknown fields are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    image: String,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    /// `container` (default) or `vm`.
    #[serde(default = "container")]
    kind: Kind,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    /// `HOST:DEST[:ro]`.
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    cpus: Option<u32>,
    #[serde(default)]
    memory_mib: Option<u64>,
    /// `none` (default), `host` (containers) or `auto`.
    #[serde(default)]
    net: NetMode,
    #[serde(default)]
    auto_remove: bool,
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

/// The typed request (and whether to start it) a `POST /cela/v1/instances` body asks for:
/// strict JSON (unknown fields refused), checked before anything is made.
pub fn parse_create(body: &[u8]) -> Result<(RunRequest, bool), ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let malformed = |e: &dyn std::fmt::Display| {
        ApiError::bad_request(format!("malformed instance request: {e}"))
    };
    let body: CreateBody = serde_path_to_error::deserialize(&mut de).map_err(|e| malformed(&e))?;
    de.end().map_err(|e| malformed(&e))?;
    if body.net == NetMode::Host && body.kind == Kind::Vm {
        return Err(ApiError::bad_request(
            "net host is for containers: a microVM runs its own kernel",
        ));
    }
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
        net: body.net,
        auto_remove: body.auto_remove,
        labels: body.labels,
        pull: body.pull,
        ..RunRequest::new(body.image, body.kind)
    };
    Ok((req, body.start))
}

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

async fn images(State(app): State<Arc<AppState>>) -> Result<axum::Json<Value>, ApiError> {
    blocking(move || {
        let store = cela_image::Store::open(&app.data_dir)?;
        Ok(axum::Json(
            serde_json::to_value(store.list()?).map_err(ApiError::internal)?,
        ))
    })
    .await
}
