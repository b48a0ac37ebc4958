//! `cela serve --listen`: the APIs over TCP, for clients on other machines or in other network
//! namespaces. A Unix socket is guarded by its file mode; a TCP port is open to anyone who can
//! reach it, so every request on it must carry the server's token (`Authorization: Bearer
//! TOKEN`, compared in constant time), and the token travels only inside TLS (rustls) unless
//! the port is on a loopback address. Every connection is bounded: the TLS handshake and each
//! request head must come within [`HANDSHAKE_BOUND`] (an idle connection is closed after it),
//! a refused request closes its connection, and at most [`MAX_CONNECTIONS`] are served at once
//! (more wait in the kernel's backlog); hijacked and WebSocket sessions are bounded by the
//! server's session limit ([`crate::MAX_SESSIONS`]), whatever the transport.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tower::Layer;

use crate::ServeError;
use crate::error::ApiError;

/// How long a client has for the TLS handshake and for sending a request's head.
pub const HANDSHAKE_BOUND: Duration = Duration::from_secs(10);

/// The most TCP connections served at once.
pub const MAX_CONNECTIONS: usize = 512;

/// The shortest token accepted (characters), and the longest token file read.
const MIN_TOKEN: usize = 32;
const MAX_TOKEN_FILE: u64 = 4096;

/// `--listen` and what goes with it.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    /// The certificate chain and private key (PEM) to serve TLS with.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// The server's token, kept as its SHA-256 digest: comparing digests in constant time hides
/// both the token's bytes and its length from a client timing its refusals.
#[derive(Clone)]
pub struct Token([u8; 32]);

impl Token {
    pub fn new(secret: &str) -> Token {
        Token(Sha256::digest(secret.as_bytes()).into())
    }

    /// Whether `presented` is the token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        bool::from(self.0.ct_eq(&digest))
    }
}

fn secret_error(path: &Path, why: impl Into<String>) -> ServeError {
    ServeError::Secret {
        path: path.to_owned(),
        why: why.into(),
    }
}

/// Checks that a secret file (the token, the TLS key) is a regular file of root's (or of the
/// user serving) that nobody else can read or write, and reads at most `limit` bytes of it.
fn read_secret(path: &Path, limit: u64) -> Result<Vec<u8>, ServeError> {
    use std::io::Read;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| secret_error(path, format!("cannot open it: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| secret_error(path, format!("cannot read its metadata: {e}")))?;
    if !meta.is_file() {
        return Err(secret_error(path, "it is not a regular file"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(secret_error(
            path,
            format!("it belongs to uid {}, not to root", meta.uid()),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(secret_error(
            path,
            format!("others may read or change it (mode {mode:04o}): chmod 600 it"),
        ));
    }
    if meta.len() > limit {
        return Err(secret_error(
            path,
            format!("it holds {} bytes (at most {limit})", meta.len()),
        ));
    }
    let mut data = Vec::new();
    file.take(limit)
        .read_to_end(&mut data)
        .map_err(|e| secret_error(path, format!("cannot read it: {e}")))?;
    Ok(data)
}

/// Reads the token: one line of at least [`MIN_TOKEN`] visible ASCII characters (what fits
/// in a header), e.g. from `openssl rand -hex 32`.
pub fn read_token(path: &Path) -> Result<Token, ServeError> {
    let data = read_secret(path, MAX_TOKEN_FILE)?;
    let text = std::str::from_utf8(&data)
        .map_err(|_| secret_error(path, "the token is not text"))?
        .trim();
    if text.len() < MIN_TOKEN {
        return Err(secret_error(
            path,
            format!(
                "the token has {} characters (at least {MIN_TOKEN}: openssl rand -hex 32 > FILE)",
                text.len()
            ),
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(secret_error(
            path,
            "the token has characters other than visible ASCII",
        ));
    }
    Ok(Token::new(text))
}

/// Refuses a request without the token, with 401 in the APIs' JSON shape.
pub async fn require_token(
    State(token): State<Token>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(t) if token.matches(t) => next.run(req).await,
        other => {
            let why = if other.is_some() {
                "the token is wrong"
            } else {
                "this port needs the server's token (Authorization: Bearer TOKEN)"
            };
            let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, why).into_response();
            let h = resp.headers_mut();
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            // A client without the token keeps no connection open.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
    }
}

/// The TLS acceptor for a certificate chain and key in PEM files.
fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |path: &Path, why: String| ServeError::Tls {
        path: path.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls(cert, format!("reading the certificates: {e}")))?;
    if certs.is_empty() {
        return Err(tls(cert, "it holds no certificate".into()));
    }
    let key_pem = read_secret(key, 1 << 20)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| tls(key, format!("reading the private key: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(cert, e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(|e| {
        tls(
            cert,
            format!("the certificate and key do not go together: {e}"),
        )
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A bound TCP listener, ready to serve.
pub struct Tcp {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    token: Token,
}

/// Checks the options, reads the secrets and binds the port: everything that can fail does
/// so here, before the server says it serves.
pub async fn bind(opts: &TcpOptions) -> Result<Tcp, ServeError> {
    if opts.tls.is_none() && !opts.listen.ip().is_loopback() {
        return Err(ServeError::Insecure(opts.listen));
    }
    let token = read_token(&opts.token_file)?;
    let tls = match &opts.tls {
        Some((cert, key)) => Some(acceptor(cert, key)?),
        None => None,
    };
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: opts.listen,
            source,
        })?;
    Ok(Tcp {
        listener,
        tls,
        token,
    })
}

impl Tcp {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `app` (behind the token) on every connection, for ever.
    pub async fn serve(self, app: Router) -> std::io::Result<()> {
        let app = app.layer(axum::middleware::from_fn_with_state(
            self.token.clone(),
            require_token,
        ));
        let service = tower::util::MapRequestLayer::new(crate::strip_version).layer(app);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(std::io::Error::other)?;
            let (stream, peer) = match self.listener.accept().await {
                Ok(c) => c,
                // Out of descriptors for now, or a connection reset before it was taken.
                Err(e) => {
                    tracing::warn!("accepting on the TCP port: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let tls = self.tls.clone();
            let service = service.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let result = match tls {
                    Some(tls) => {
                        match tokio::time::timeout(HANDSHAKE_BOUND, tls.accept(stream)).await {
                            Ok(Ok(stream)) => serve_connection(stream, service).await,
                            Ok(Err(e)) => Err(format!("the TLS handshake failed: {e}")),
                            Err(_) => Err("the TLS handshake took too long".to_owned()),
                        }
                    }
                    None => serve_connection(stream, service).await,
                };
                if let Err(e) = result {
                    tracing::debug!("connection from {peer}: {e}");
                }
            });
        }
    }
}

/// One HTTP/1.1 connection, upgrades (attach, exec) included.
async fn serve_connection<S, T>(stream: T, service: S) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut service = service.clone();
        async move {
            let req = req.map(axum::body::Body::new);
            tower::Service::call(&mut service, req).await
        }
    });
    // HTTP/1.1 only, with hyper's own builder: its header-read timer runs from the moment the
    // connection waits for a request head (the first, and each next one on a kept-alive
    // connection), so a client that connects and says nothing is dropped after the bound.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_BOUND);
    builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_token_file_must_be_private_long_and_plain() {
        let dir = tempfile::tempdir().unwrap();
        let good = "0123456789abcdef0123456789abcdef";
        let t = read_token(&secret(dir.path(), "ok", &format!("{good}\n"), 0o600)).unwrap();
        assert!(t.matches(good.as_bytes()));
        assert!(!t.matches(b"0123456789abcdef0123456789abcdeX"));
        assert!(!t.matches(b""));
        let err = |p: PathBuf| read_token(&p).err().unwrap().to_string();
        let e = err(secret(dir.path(), "open", good, 0o644));
        assert!(e.contains("mode 0644"), "{e}");
        let e = err(secret(dir.path(), "short", "abc", 0o600));
        assert!(e.contains("3 characters"), "{e}");
        let e = err(secret(
            dir.path(),
            "space",
            &format!("{good} {good}"),
            0o600,
        ));
        assert!(e.contains("visible ASCII"), "{e}");
        let e = err(secret(dir.path(), "big", &"a".repeat(5000), 0o600));
        assert!(e.contains("5000 bytes"), "{e}");
        std::os::unix::fs::symlink(dir.path().join("ok"), dir.path().join("link")).unwrap();
        let e = err(dir.path().join("link"));
        assert!(e.contains("cannot open"), "a link is not followed: {e}");
        let e = err(dir.path().join("missing"));
        assert!(e.contains("cannot open"), "{e}");
    }
}
