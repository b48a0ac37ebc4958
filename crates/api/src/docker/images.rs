//! The Docker Engine API's images: list, inspect, remove, create (a pull, answered with
//! Docker's streamed JSON progress lines) and load (`docker load`: an archive imported as
//! `cela image import` does, with the same checks).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use cela_image::{ImageRecord, RunConfig, Store};
use cela_instance::Instances;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, blocking};

fn created_secs(image: &ImageRecord) -> i64 {
    image
        .created
        .as_deref()
        .or(Some(image.added.as_str()))
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map_or(0, |t| t.timestamp())
}

fn summary(image: &ImageRecord) -> Value {
    json!({
        "Id": image.digest.to_string(),
        "ParentId": "",
        "RepoTags": image.familiar_names(),
        "RepoDigests": [],
        "Created": created_secs(image),
        "Size": image.size,
        "SharedSize": -1,
        "Labels": {},
        "Containers": -1,
    })
}

pub async fn list(State(app): State<Arc<AppState>>) -> Result<axum::Json<Vec<Value>>, ApiError> {
    blocking(move || {
        let store = Store::open(&app.data_dir)?;
        Ok(axum::Json(store.list()?.iter().map(summary).collect()))
    })
    .await
}

pub async fn inspect(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    blocking(move || {
        let store = Store::open(&app.data_dir)?;
        let image = store.resolve(&name).map_err(|e| match e {
            cela_image::ImageError::UnknownImage(_) => ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                format!("No such image: {name}"),
            ),
            other => other.into(),
        })?;
        let rc = RunConfig::of(&store, &image)?;
        Ok(axum::Json(json!({
            "Id": image.digest.to_string(),
            "RepoTags": image.familiar_names(),
            "RepoDigests": [],
            "Created": image.created.clone().unwrap_or_else(|| image.added.clone()),
            "Size": image.size,
            "Os": "linux",
            "Architecture": "amd64",
            "Config": {
                "Entrypoint": rc.entrypoint,
                "Cmd": rc.cmd,
                "Env": rc.env,
                "WorkingDir": rc.working_dir.unwrap_or_default(),
                "User": rc.user.unwrap_or_default(),
            },
            "RootFS": {
                "Type": "layers",
                "Layers": image.layers.iter().map(|l| l.digest.to_string()).collect::<Vec<_>>(),
            },
        })))
    })
    .await
}

pub async fn remove(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<crate::ForceQuery>,
) -> Result<axum::Json<Vec<Value>>, ApiError> {
    let force = q.force();
    blocking(move || {
        let store = Store::open(&app.data_dir)?;
        let instances = Instances::open(&app.data_dir)?;
        let removed = cela_instance::images::remove(&store, &instances, &name, force)?;
        let mut out: Vec<Value> = removed
            .untagged
            .iter()
            .map(|n| json!({"Untagged": n}))
            .collect();
        if let Some(d) = removed.deleted {
            out.push(json!({"Deleted": d.to_string()}));
        }
        Ok(axum::Json(out))
    })
    .await
}

#[derive(Deserialize)]
pub struct CreateQuery {
    #[serde(rename = "fromImage")]
    from_image: Option<String>,
    #[serde(rename = "fromSrc")]
    from_src: Option<String>,
    tag: Option<String>,
    platform: Option<String>,
}

/// `POST /images/create?fromImage=NAME&tag=TAG`: a pull. The answer streams JSON lines as
/// Docker's does; a failure after the stream began is a line with `error`/`errorDetail`.
pub async fn create(
    State(app): State<Arc<AppState>>,
    Query(q): Query<CreateQuery>,
) -> Result<Response, ApiError> {
    if q.from_src.is_some() {
        return Err(ApiError::not_implemented(
            "importing an image from a source (fromSrc)",
        ));
    }
    if let Some(p) = q
        .platform
        .as_deref()
        .filter(|p| !p.is_empty() && *p != "linux/amd64")
    {
        return Err(ApiError::not_implemented(format!(
            "pulling for platform {p}"
        )));
    }
    let Some(name) = q.from_image.filter(|n| !n.is_empty()) else {
        return Err(ApiError::bad_request("fromImage is required"));
    };
    // `tag` may be a tag or a digest; a name with its own tag or digest keeps it.
    let reference = match q.tag.filter(|t| !t.is_empty()) {
        Some(t) if t.starts_with("sha256:") => format!("{name}@{t}"),
        Some(t) => format!("{name}:{t}"),
        None if name.contains('@') || name.rsplit('/').next().is_some_and(|l| l.contains(':')) => {
            name.clone()
        }
        None => format!("{name}:latest"),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let line = |v: Value| Bytes::from(v.to_string() + "\r\n");
    let _ = tx.try_send(line(
        json!({"status": format!("Pulling from {name}"), "id": reference}),
    ));
    std::thread::spawn(move || {
        let result = Store::open(&app.data_dir).and_then(|store| {
            cela_image::pull(&store, &reference, &cela_image::Progress::hidden())
        });
        let last = match result {
            Ok(image) => vec![
                json!({"status": format!("Digest: {}", image.digest)}),
                json!({"status": format!("Status: Downloaded newer image for {reference}")}),
            ],
            Err(e) => {
                vec![json!({"errorDetail": {"message": e.to_string()}, "error": e.to_string()})]
            }
        };
        for v in last {
            let _ = tx.blocking_send(line(v));
        }
    });
    let body = crate::channel_body(rx);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// A blocking reader of a request body that an async task feeds in chunks.
struct BodyReader {
    chunks: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl std::io::Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// Loads run one at a time.
static LOADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// How long a load's upload may pause before it is given up (the store's lock is held).
const LOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// `POST /images/load`: the body is a `docker save` archive or an OCI image layout (tar,
/// optionally compressed); every image in it is stored under the names it carries, and the
/// answer is Docker's JSON lines (`Loaded image: NAME`).
pub async fn load(
    State(app): State<Arc<AppState>>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    // One load at a time: each takes what the store's file system has room for.
    let turn = LOADS.acquire().await.map_err(ApiError::internal)?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        loop {
            let chunk = match tokio::time::timeout(LOAD_IDLE, stream.next()).await {
                Ok(Some(chunk)) => chunk.map_err(std::io::Error::other),
                Ok(None) => return,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nothing came for {} s", LOAD_IDLE.as_secs()),
                )),
            };
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    let records = blocking(move || {
        // Held by the import itself: a client that goes mid-import does not free the turn.
        let _turn = turn;
        let store = Store::open(&app.data_dir)?;
        let mut reader = BodyReader {
            chunks: rx,
            current: Bytes::new(),
        };
        use cela_image::ImageError as E;
        cela_image::import::import_reader(&store, &mut reader, &cela_image::Progress::hidden())
            .map_err(|e| match e {
                // What the client sent is at fault: 400, not a failure of cela.
                E::BadArchive { .. }
                | E::HostileEntry { .. }
                | E::BadManifest { .. }
                | E::DigestMismatch { .. }
                | E::SizeMismatch { .. }
                | E::TooLong { .. }
                | E::BadDigest { .. }
                | E::BadReference { .. } => ApiError::bad_request(e.to_string()),
                other => other.into(),
            })
    })
    .await
    .map_err(|e| ApiError::new(e.status, format!("docker load: {}", e.message)))?;
    let mut out = String::new();
    for r in &records {
        let names = r.familiar_names();
        if names.is_empty() {
            out += &json!({"stream": format!("Loaded image ID: {}\n", r.config)}).to_string();
            out.push('\n');
        }
        for n in names {
            out += &json!({"stream": format!("Loaded image: {n}\n")}).to_string();
            out.push('\n');
        }
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], out).into_response())
}
