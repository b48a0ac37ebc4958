//! `cela serve`: cela's HTTP APIs over Unix sockets. Two front ends to the same instances and
//! images the CLI sees: a subset of the Docker Engine API ([`docker`]), so the `docker` CLI
//! and Docker's SDKs drive cela, and cela's own API under `/cela/v1` ([`own`]). The server owns
//! nothing: every instance runs under its own supervisor and its state directory is the
//! truth, so instances outlive the server and a restarted server picks them up. Requests are
//! translated into `cela_instance` calls (run on blocking threads); bodies are size-limited
//! and parsed strictly; ids and names reach the store's lookups only, never a path.

pub mod docker;
mod error;
mod follow;
pub mod own;
pub mod tcp;
mod ws;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use tokio::net::UnixListener;
use tower::Layer;

pub use error::ApiError;

/// What every request handler shares.
pub struct AppState {
    pub data_dir: PathBuf,
    /// The Docker API's execs (kept in memory, as dockerd keeps them).
    pub(crate) execs: docker::exec::Execs,
    /// One permit per streaming session (attach, exec, WebSocket exec, followed logs and
    /// events), held while its client is served: it bounds the connections and follower
    /// threads of clients, not the execs they start (those run to their end).
    sessions: Arc<tokio::sync::Semaphore>,
}

/// How long a write to a streaming client may wait for it to read: a client that stops
/// reading loses its session (and frees its permit) instead of holding it for ever.
pub const WRITE_BOUND: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs a write to a streaming client within [`WRITE_BOUND`]; whether it succeeded.
pub(crate) async fn write_bounded<T, E>(
    write: impl std::future::Future<Output = Result<T, E>>,
) -> bool {
    matches!(tokio::time::timeout(WRITE_BOUND, write).await, Ok(Ok(_)))
}

/// The most streaming sessions served at once, over every socket and port together.
pub const MAX_SESSIONS: usize = 512;

impl AppState {
    /// A permit for a streaming session, held by it until it ends; 503 when
    /// [`MAX_SESSIONS`] are running.
    pub(crate) fn session(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.sessions.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_SESSIONS} streaming sessions are open: try again when one ends"),
            )
        })
    }
}

/// Where `cela serve` listens.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    /// cela's own API (and the Docker API too: both are served on each socket).
    pub socket: PathBuf,
    /// The socket Docker clients are pointed at (`DOCKER_HOST=unix://PATH`).
    pub docker_socket: PathBuf,
    /// Both APIs on a TCP port too, behind a token (and TLS).
    pub tcp: Option<tcp::TcpOptions>,
}

/// cela's run directory, where the sockets are by default.
const RUN_DIR: &str = "/run/cela";

/// The largest request body accepted (a container config is a few KiB).
pub const MAX_BODY: usize = 1 << 20;

/// Docker's boolean query values: `1`, `true`, `True`; anything else (or absent) is false.
pub(crate) fn query_flag(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "true" | "True" | "TRUE"))
}

/// The `force` query of the removals.
#[derive(serde::Deserialize)]
pub(crate) struct ForceQuery {
    force: Option<String>,
}

impl ForceQuery {
    pub(crate) fn force(&self) -> bool {
        query_flag(self.force.as_deref())
    }
}

/// A streamed response body made of what a blocking worker sends; it ends when the worker
/// drops its sender.
pub(crate) fn channel_body(rx: tokio::sync::mpsc::Receiver<axum::body::Bytes>) -> axum::body::Body {
    axum::body::Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), rx))
    }))
}

/// The version a request's path asks for, set by [`strip_version`].
#[derive(Clone)]
struct AskedVersion(String);

/// Takes a Docker client's `/v1.NN` prefix off the path, so one set of routes serves every
/// version; the version is kept for [`check_version`].
pub(crate) fn strip_version(mut req: Request) -> Request {
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix("/v") else {
        return req;
    };
    let (version, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return req;
    }
    let version = version.to_owned();
    let tail = if tail.is_empty() { "/" } else { tail };
    let new = match req.uri().query() {
        Some(q) => format!("{tail}?{q}"),
        None => tail.to_owned(),
    };
    if let Ok(uri) = new.parse::<Uri>() {
        *req.uri_mut() = uri;
        req.extensions_mut().insert(AskedVersion(version));
    }
    req
}

/// Refuses a Docker API version cela does not serve, and gives every error the APIs' JSON
/// shape: axum's own refusals (a body over the limit, a query value of the wrong type) come
/// as plain text, and become `{"message": TEXT}` here.
async fn check_version(req: Request, next: axum::middleware::Next) -> Response {
    if let Some(AskedVersion(v)) = req.extensions().get::<AskedVersion>()
        && let Err(why) = docker::check_version(v)
    {
        return ApiError::bad_request(why).into_response();
    }
    let resp = next.run(req).await;
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
    if !resp.status().is_client_error() && !resp.status().is_server_error() || json {
        return resp;
    }
    let status = resp.status();
    let text = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    ApiError::new(status, text).into_response()
}

/// Whatever no route answers: 501 naming the endpoint, in the API's error shape.
async fn not_implemented(req: Request) -> Response {
    ApiError::not_implemented(format!("{} {}", req.method(), req.uri().path())).into_response()
}

/// Both APIs' routes over `data_dir`.
pub fn router(data_dir: &Path) -> Router {
    let state = Arc::new(AppState {
        data_dir: data_dir.to_owned(),
        execs: Default::default(),
        sessions: Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS)),
    });
    docker::routes()
        .merge(own::routes())
        .fallback(not_implemented)
        .method_not_allowed_fallback(not_implemented)
        .layer(axum::middleware::from_fn(check_version))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{what} {}: {source}", path.display())]
    Socket {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another server listens on {}: stop it first", .0.display())]
    InUse(PathBuf),
    #[error("starting the server's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{}: {why}", path.display())]
    Secret { path: PathBuf, why: String },
    #[error("TLS: {}: {why}", path.display())]
    Tls { path: PathBuf, why: String },
    #[error(
        "listening on {0} without TLS would send the token in the clear: give --tls-cert and --tls-key, or listen on a loopback address"
    )]
    Insecure(std::net::SocketAddr),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `path` as a Unix socket, mode 0660, group `cela` when that group exists (else
/// root's alone). A stale socket left by a killed server is replaced; a live one is refused.
fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |what, source| ServeError::Socket {
        what,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err("creating the directory of", e))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServeError::InUse(path.to_owned()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).map_err(|e| err("removing the stale socket", e))?;
        }
        Ok(_) => {
            return Err(err(
                "refusing to replace",
                std::io::Error::other("it exists and is not a socket"),
            ));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| err("listening on", e))?;
    // Read from /etc/group directly: cela is linked statically, and glibc's NSS lookups
    // (getgrnam) crash in a static binary.
    let group = cela_guest::users::resolve(Path::new("/"), "0:cela")
        .ok()
        .map(|id| id.gid);
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| err("giving group cela", e.into()))?;
        // The group reaches the socket only through its directory. cela's own run directory
        // (made 0700 by an older cela, or by hand) is given to the group for traversal, not
        // listing; another directory is the admin's to open, and a warning says so.
        if let Some(dir) = path.parent()
            && let Ok(m) = std::fs::metadata(dir)
        {
            use std::os::unix::fs::MetadataExt;
            let mode = m.permissions().mode() & 0o7777;
            let reachable = mode & 0o001 != 0 || (m.gid() == gid && mode & 0o010 != 0);
            if !reachable && dir == Path::new(RUN_DIR) && m.uid() == 0 {
                nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(gid)))
                    .map_err(|e| err("giving group cela the directory of", e.into()))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o010))
                    .map_err(|e| err("letting group cela through the directory of", e))?;
            } else if !reachable {
                tracing::warn!(
                    "group cela cannot reach {}: {} is mode {mode:04o}",
                    path.display(),
                    dir.display()
                );
            }
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err("setting the mode of", e))?;
    Ok(listener)
}

/// Serves both APIs on the sockets of `opts` until SIGINT or SIGTERM, then removes the
/// sockets. Instances are not touched: they run on under their supervisors.
pub fn serve(opts: &ServeOptions) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(async {
        let app = router(&opts.data_dir);
        let mut paths = vec![opts.socket.clone()];
        if opts.docker_socket != opts.socket {
            paths.push(opts.docker_socket.clone());
        }
        let mut servers = tokio::task::JoinSet::new();
        // The TCP port first: its secrets and address are checked before any socket exists.
        if let Some(opts) = &opts.tcp {
            let tcp = tcp::bind(opts).await?;
            let addr = tcp.local_addr().map_err(ServeError::Runtime)?;
            let app = app.clone();
            servers.spawn(tcp.serve(app));
            tracing::info!(
                "serving on tcp {addr} ({})",
                if opts.tls.is_some() {
                    "TLS"
                } else {
                    "plain, loopback"
                }
            );
        }
        for path in &paths {
            let listener = bind(path)?;
            let service = tower::util::MapRequestLayer::new(strip_version).layer(app.clone());
            servers.spawn(async move {
                axum::serve(
                    listener,
                    axum::ServiceExt::<Request>::into_make_service(service),
                )
                .await
            });
            tracing::info!("serving on {}", path.display());
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(ServeError::Runtime)?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            Some(ended) = servers.join_next() => {
                tracing::warn!("a listener ended: {ended:?}");
            }
        }
        for path in &paths {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    })
}
