//! A hostile registry on a loopback port: enough of the distribution API (`/v2/`, manifests,
//! blobs) for `cela pull` to talk to it, with replies chosen by the test — endless bodies,
//! lying lengths, blobs longer than their descriptors. Each connection is served by a thread
//! that writes at most [`MAX_SENT`] bytes and stops when the client hangs up; the listener
//! thread lives as long as the test process. It counts the bytes it sent, so a test can show
//! that cela stopped reading early.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most one reply writes, whatever it is told to do.
pub const MAX_SENT: u64 = 256 << 20;
/// The longest one reply goes on.
pub const MAX_TIME: Duration = Duration::from_secs(30);

/// What the registry answers for a path.
#[derive(Clone)]
pub enum Reply {
    /// 200 with this body, a content type and a correct Content-Length.
    Body(&'static str, Vec<u8>),
    /// 200 with a Content-Length of the given value, then these bytes (a lie either way).
    LyingLength(u64, Vec<u8>),
    /// 200, no length, the byte repeated until the client goes (or the bounds are reached).
    Endless(u8),
    /// 200 with this prefix, then `extra` more bytes than announced: the Content-Length says
    /// prefix only; the connection then carries on writing garbage.
    Longer(Vec<u8>, u64),
}

#[derive(Default)]
struct Routes {
    replies: HashMap<String, Reply>,
}

pub struct HostileRegistry {
    pub port: u16,
    routes: Arc<Mutex<Routes>>,
    sent: Arc<AtomicU64>,
}

impl HostileRegistry {
    pub fn start() -> HostileRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<Mutex<Routes>> = Arc::default();
        let sent: Arc<AtomicU64> = Arc::default();
        let (r, s) = (routes.clone(), sent.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, s) = (r.clone(), s.clone());
                std::thread::spawn(move || serve(stream, &r, &s));
            }
        });
        HostileRegistry { port, routes, sent }
    }

    /// Answers `GET path` (`/v2/NAME/manifests/REF`, `/v2/NAME/blobs/DIGEST`) with `reply`.
    pub fn route(&self, path: &str, reply: Reply) {
        self.routes
            .lock()
            .unwrap()
            .replies
            .insert(path.to_owned(), reply);
    }

    pub fn reference(&self, repo_tag: &str) -> String {
        format!("127.0.0.1:{}/{repo_tag}", self.port)
    }

    /// Bytes of reply bodies sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

fn serve(stream: TcpStream, routes: &Mutex<Routes>, sent: &AtomicU64) {
    let _ = stream.set_read_timeout(Some(MAX_TIME));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
        }
        let mut parts = request.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = path.split('?').next().unwrap_or("");
        let reply = if path == "/v2/" || path == "/v2" {
            Some(Reply::Body("application/json", b"{}".to_vec()))
        } else {
            routes.lock().unwrap().replies.get(path).cloned()
        };
        let keep = match reply {
            None => {
                let body = br#"{"errors":[{"code":"NAME_UNKNOWN","message":"not here"}]}"#;
                head(
                    &mut out,
                    "404 Not Found",
                    Some(body.len() as u64),
                    "application/json",
                ) && (method == "HEAD" || write(&mut out, body, sent))
            }
            Some(Reply::Body(t, body)) => {
                head(&mut out, "200 OK", Some(body.len() as u64), t)
                    && (method == "HEAD" || write(&mut out, &body, sent))
            }
            Some(Reply::LyingLength(len, body)) => {
                head(&mut out, "200 OK", Some(len), manifest_type());
                write(&mut out, &body, sent);
                false
            }
            Some(Reply::Endless(b)) => {
                head(&mut out, "200 OK", None, manifest_type());
                flood(&mut out, b, u64::MAX, sent);
                false
            }
            Some(Reply::Longer(prefix, extra)) => {
                head(
                    &mut out,
                    "200 OK",
                    Some(prefix.len() as u64 + extra),
                    "application/octet-stream",
                );
                let _ = write(&mut out, &prefix, sent) && flood(&mut out, b'x', extra, sent);
                false
            }
        };
        if !keep {
            return;
        }
    }
}

fn manifest_type() -> &'static str {
    "application/vnd.oci.image.manifest.v1+json"
}

fn head(out: &mut TcpStream, status: &str, len: Option<u64>, content_type: &str) -> bool {
    let mut h = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n");
    match len {
        Some(n) => h.push_str(&format!("Content-Length: {n}\r\n")),
        None => h.push_str("Connection: close\r\n"),
    }
    h.push_str("Docker-Distribution-API-Version: registry/2.0\r\n\r\n");
    out.write_all(h.as_bytes()).is_ok()
}

fn write(out: &mut TcpStream, body: &[u8], sent: &AtomicU64) -> bool {
    let ok = out.write_all(body).is_ok();
    sent.fetch_add(body.len() as u64, Ordering::SeqCst);
    ok
}

/// Writes `byte` up to `limit` bytes, [`MAX_SENT`] or [`MAX_TIME`], or until the client goes.
fn flood(out: &mut TcpStream, byte: u8, limit: u64, sent: &AtomicU64) -> bool {
    let chunk = vec![byte; 64 << 10];
    let started = Instant::now();
    let mut done = 0u64;
    while done < limit.min(MAX_SENT) && started.elapsed() < MAX_TIME {
        let n = (chunk.len() as u64).min(limit - done) as usize;
        if out.write_all(&chunk[..n]).is_err() {
            return false;
        }
        done += n as u64;
        sent.fetch_add(n as u64, Ordering::SeqCst);
    }
    true
}
