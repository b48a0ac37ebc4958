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
    // The pull reports from its own runtime's threads, which may not block on the response:
    // lines go through a queue to a thread that does. Byte updates are thinned to one per
    // percent, so the queue stays small whatever the client reads.
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for v in lines_rx {
            if tx
                .blocking_send(Bytes::from(v.to_string() + "\r\n"))
                .is_err()
            {
                return;
            }
        }
    });
    let _ = lines_tx.send(json!({"status": format!("Pulling from {name}"), "id": reference}));
    std::thread::spawn(move || {
        let shown = std::sync::Mutex::new(PullLines::default());
        let sink = lines_tx.clone();
        let progress = cela_image::Progress::events(move |e| {
            let lines = shown.lock().unwrap_or_else(|p| p.into_inner()).lines(e);
            for v in lines {
                let _ = sink.send(v);
            }
        });
        let result = Store::open(&app.data_dir)
            .and_then(|store| cela_image::pull(&store, &reference, &progress));
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
            let _ = lines_tx.send(v);
        }
    });
    let body = crate::channel_body(rx);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Docker's pull progress from cela's pull steps: each layer by its short digest, as dockerd
/// streams it ("Pulling fs layer", "Downloading" with its bytes, "Download complete", "Pull
/// complete", "Already exists"); a layer's byte updates at most once per percent.
#[derive(Default)]
struct PullLines {
    /// Layers downloading: their key and the last percent shown.
    layers: std::collections::HashMap<u64, (String, Option<u64>)>,
}

impl PullLines {
    fn lines(&mut self, e: &cela_image::StepEvent<'_>) -> Vec<Value> {
        use cela_image::StepEvent as E;
        let line =
            |status: &str, key: &str| json!({"status": status, "progressDetail": {}, "id": key});
        match *e {
            E::Started {
                id, key: Some(key), ..
            } => {
                self.layers.insert(id, (key.to_owned(), None));
                vec![line("Pulling fs layer", key)]
            }
            E::Started { .. } => vec![],
            E::Bytes { id, done, total } => {
                let Some((key, last)) = self.layers.get_mut(&id) else {
                    return vec![];
                };
                // Per percent of a known size; per MiB of an unknown one.
                let step = done
                    .saturating_mul(100)
                    .checked_div(total)
                    .unwrap_or(done >> 20);
                if *last == Some(step) {
                    return vec![];
                }
                *last = Some(step);
                vec![json!({
                    "status": "Downloading",
                    "progressDetail": {"current": done, "total": total},
                    "progress": progress_bar(done, total),
                    "id": key,
                })]
            }
            E::Done { id } => match self.layers.remove(&id) {
                Some((key, _)) => {
                    vec![line("Download complete", &key), line("Pull complete", &key)]
                }
                None => vec![],
            },
            E::Dropped { id } => {
                self.layers.remove(&id);
                vec![]
            }
            E::Present { key, .. } => vec![line("Already exists", key)],
        }
    }
}

/// Sizes as Docker shows them (decimal units, four significant digits).
fn human_size(n: u64) -> String {
    let mut v = n as f64;
    for unit in ["B", "kB", "MB", "GB", "TB"] {
        if v < 1000.0 || unit == "TB" {
            if unit == "B" {
                return format!("{n}B");
            }
            // Four significant digits, as Go's %.4g.
            let digits = match v {
                100.0.. => 1,
                10.0.. => 2,
                _ => 3,
            };
            let s = format!("{v:.digits$}");
            return s.trim_end_matches('0').trim_end_matches('.').to_owned() + unit;
        }
        v /= 1000.0;
    }
    unreachable!("the last unit returns")
}

/// A progress bar as dockerd's: 50 columns, then done/total.
fn progress_bar(done: u64, total: u64) -> String {
    if total == 0 {
        return human_size(done);
    }
    let filled = (done.min(total).saturating_mul(50) / total) as usize;
    let bar = if filled >= 50 {
        "=".repeat(50)
    } else {
        format!("{}>{}", "=".repeat(filled), " ".repeat(49 - filled))
    };
    format!("[{bar}]  {}/{}", human_size(done), human_size(total))
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

/// An upload must bring at least [`LOAD_MIN_PER_WINDOW`] bytes in every window of this long:
/// a client trickling a byte within every [`LOAD_IDLE`] does not keep the turn (and the
/// store's lock) for ever.
const LOAD_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
const LOAD_MIN_PER_WINDOW: u64 = 1 << 20;

/// Checks an upload's rate window by window (see [`LOAD_WINDOW`]). Only time spent waiting
/// for the client counts: a server that takes its time importing does not blame the client.
#[derive(Default)]
struct MinRate {
    waited: std::time::Duration,
    bytes: u64,
}

impl MinRate {
    /// Counts `n` bytes that came after waiting `waited` for them; an error once a whole
    /// window of waiting brought too few.
    fn take(&mut self, n: usize, waited: std::time::Duration) -> Result<(), String> {
        self.bytes += n as u64;
        self.waited += waited;
        if self.waited < LOAD_WINDOW {
            return Ok(());
        }
        if self.bytes < LOAD_MIN_PER_WINDOW {
            return Err(format!(
                "the upload brought {} bytes in {} s (at least {} KiB a minute are needed)",
                self.bytes,
                self.waited.as_secs(),
                LOAD_MIN_PER_WINDOW >> 10
            ));
        }
        *self = MinRate::default();
        Ok(())
    }
}

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
        let mut rate = MinRate::default();
        loop {
            let asked = std::time::Instant::now();
            let chunk = match tokio::time::timeout(LOAD_IDLE, stream.next()).await {
                Ok(Some(chunk)) => chunk.map_err(std::io::Error::other).and_then(|c| {
                    rate.take(c.len(), asked.elapsed())
                        .map(|()| c)
                        .map_err(|why| std::io::Error::new(std::io::ErrorKind::TimedOut, why))
                }),
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

/// `POST /commit` (`docker commit`): a container's changes made into an image, as `cela
/// commit` makes it. The query is read by hand because Docker sends each `--change` as its own
/// `changes` value. The body (a container config to merge) is not read: what the container ran
/// with, and the changes, make the config.
pub async fn commit(
    State(app): State<Arc<AppState>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<(axum::http::StatusCode, axum::Json<Value>), ApiError> {
    let bad = |m: String| ApiError::new(axum::http::StatusCode::BAD_REQUEST, m);
    let (mut container, mut repo, mut tag) = (None, None, None);
    let mut req = cela_instance::commit::CommitRequest::default();
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let v = v.into_owned();
        match &*k {
            "container" => container = Some(v),
            "repo" => repo = Some(v).filter(|s| !s.is_empty()),
            "tag" => tag = Some(v).filter(|s| !s.is_empty()),
            "comment" => req.message = Some(v).filter(|s| !s.is_empty()),
            "author" => req.author = Some(v).filter(|s| !s.is_empty()),
            "pause" => req.pause = !matches!(&*v, "0" | "false" | "False"),
            // One value may carry several instructions, a line each (docker-py's form).
            "changes" => req.changes.extend(
                v.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned),
            ),
            _ => {}
        }
    }
    let Some(container) = container else {
        return Err(bad(
            "commit needs the container's name or id (container=)".into()
        ));
    };
    req.name = match (repo, tag) {
        (Some(r), Some(t)) => Some(format!("{r}:{t}")),
        (Some(r), None) => Some(r),
        (None, Some(t)) => return Err(bad(format!("tag {t:?} needs a repository (repo=)"))),
        (None, None) => None,
    };
    cela_image::commit::check_request(req.name.as_deref(), &req.changes)
        .map_err(|e| bad(e.to_string()))?;
    blocking(move || {
        let inst = Instances::open(&app.data_dir)?.find(&container)?;
        let store = Store::open(&app.data_dir)?;
        let rec =
            cela_instance::commit::commit(&store, &inst, &req, &cela_image::Progress::hidden())?;
        Ok((
            axum::http::StatusCode::CREATED,
            axum::Json(json!({"Id": rec.digest.to_string()})),
        ))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use cela_image::StepEvent as E;

    #[test]
    fn a_trickling_upload_is_given_up_window_by_window() {
        let secs = std::time::Duration::from_secs;
        let mut r = MinRate::default();
        // One byte every 29 s: the first whole window fails it.
        assert!(r.take(1, secs(29)).is_ok());
        assert!(r.take(1, secs(29)).is_ok());
        let err = r.take(1, secs(29)).unwrap_err();
        assert!(err.contains("3 bytes in 87 s"), "{err}");
        // Enough in each window: the windows go on.
        let mut r = MinRate::default();
        for _ in 1..10 {
            assert!(r.take(1 << 20, secs(60)).is_ok());
        }
        // Time the server spends importing is not counted: a fast client is not failed.
        let mut r = MinRate::default();
        for _ in 0..1000 {
            assert!(
                r.take(64 << 10, std::time::Duration::from_millis(1))
                    .is_ok()
            );
        }
    }

    #[test]
    fn sizes_and_bars_read_as_dockers() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(32_768), "32.77kB");
        assert_eq!(human_size(2_228_950), "2.229MB");
        assert_eq!(human_size(100_000_000), "100MB");
        assert_eq!(progress_bar(0, 0), "0B");
        assert_eq!(
            progress_bar(1_000, 2_000),
            format!("[{}>{}]  1kB/2kB", "=".repeat(25), " ".repeat(24))
        );
        assert_eq!(progress_bar(5, 5), format!("[{}]  5B/5B", "=".repeat(50)));
    }

    #[test]
    fn a_layer_is_shown_by_its_digest_and_bytes_are_thinned() {
        let mut p = PullLines::default();
        let status = |v: &[Value]| -> Vec<String> {
            v.iter()
                .map(|l| format!("{} {}", l["status"].as_str().unwrap(), l["id"]))
                .collect()
        };
        let config = E::Started {
            id: 0,
            key: None,
            msg: "pulling config",
        };
        assert!(p.lines(&config).is_empty(), "the config is not a layer");
        let started = E::Started {
            id: 1,
            key: Some("abcdef012345"),
            msg: "pulling layer 1/1",
        };
        assert_eq!(
            status(&p.lines(&started)),
            ["Pulling fs layer \"abcdef012345\""]
        );
        let mut shown = 0;
        for done in (0..=10_000u64).step_by(7) {
            shown += p
                .lines(&E::Bytes {
                    id: 1,
                    done,
                    total: 10_000,
                })
                .len();
        }
        assert!((90..=101).contains(&shown), "{shown} byte lines");
        let end = p.lines(&E::Done { id: 1 });
        assert_eq!(
            status(&end),
            [
                "Download complete \"abcdef012345\"",
                "Pull complete \"abcdef012345\""
            ]
        );
        assert!(
            p.lines(&E::Bytes {
                id: 1,
                done: 1,
                total: 1
            })
            .is_empty()
        );
        let present = E::Present {
            key: "0123456789ab",
            msg: "layer",
        };
        assert_eq!(
            status(&p.lines(&present)),
            ["Already exists \"0123456789ab\""]
        );
    }
}
