//! `GET /events`: the instance event journal (`cela_instance::events`, which also selects and
//! follows) as Docker's event stream, one JSON object per line: the events since `since`
//! (none without it), then those that come, until `until` passes or the client goes.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use cela_instance::events::{self, Event};
use serde::Deserialize;
use serde_json::json;

use super::containers::parse_filters;
use crate::AppState;
use crate::error::ApiError;

#[derive(Deserialize)]
pub struct EventsQuery {
    since: Option<String>,
    until: Option<String>,
    filters: Option<String>,
}

/// An event in the shape of Docker's `EventMessage` (with the old `status`/`id`/`from`
/// fields older clients read).
fn docker_event(e: &Event) -> serde_json::Value {
    json!({
        "status": e.action,
        "id": e.id,
        "from": e.attributes.get("image"),
        "Type": e.kind,
        "Action": e.action,
        "Actor": {"ID": e.id, "Attributes": e.attributes},
        "scope": "local",
        "time": e.time_nano.div_euclid(1_000_000_000),
        "timeNano": e.time_nano,
    })
}

pub async fn events(
    State(app): State<Arc<AppState>>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    stream(&app, &q, docker_event)
}

/// The journal's events that `q` selects, each as `shape` makes it, one JSON object per
/// line, followed (`GET /events`, and `/cela/v1/events` in cela's own shape).
pub(crate) fn stream(
    app: &AppState,
    q: &EventsQuery,
    shape: fn(&Event) -> serde_json::Value,
) -> Result<Response, ApiError> {
    let time = |what: &str, v: Option<&str>| {
        v.filter(|s| !s.is_empty())
            .map(|s| {
                events::parse_time(s).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
            })
            .transpose()
    };
    let query = events::Query {
        since: time("since", q.since.as_deref())?,
        until: time("until", q.until.as_deref())?,
        filters: parse_filters(q.filters.as_deref())?,
    };
    query.check().map_err(ApiError::bad_request)?;
    let permit = app.session()?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let data_dir = app.data_dir.clone();
    std::thread::spawn(move || {
        let _permit = permit;
        let gone = || tx.is_closed();
        events::follow(&data_dir, &query, &gone, |e| {
            let mut line = shape(e).to_string().into_bytes();
            line.push(b'\n');
            tx.blocking_send(Bytes::from(line)).is_ok()
        });
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        crate::channel_body(rx),
    )
        .into_response())
}
