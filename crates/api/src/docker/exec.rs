//! The Docker Engine API's exec: create (recorded in the server's memory, as dockerd keeps
//! them), start (the hijacked stream, with or without a terminal), resize, inspect. A started
//! exec is `cela exec` itself, run as a child of the server with the connection's data on its
//! stdio (pipes, or a pseudo-terminal the server holds the master of), so an exec through the
//! API is exactly the CLI's: the same confinement, user lookup and microVM path.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cela_instance::Instances;
use cela_instance::log::Stream;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::frames::{ResizeQuery, frame, switching_protocols};
use crate::AppState;
use crate::error::{ApiError, blocking};

/// The most execs kept (finished ones are dropped oldest first beyond it).
const MAX_EXECS: usize = 1024;

/// One exec, as created and as it runs.
#[derive(Debug, Clone)]
pub struct ExecRecord {
    container: String,
    cmd: Vec<String>,
    env: Vec<String>,
    workdir: Option<String>,
    user: Option<String>,
    tty: bool,
    stdin: bool,
    running: bool,
    exit_code: Option<i32>,
    pid: Option<u32>,
    /// The server's end of the exec's terminal, for resizes.
    master: Option<Arc<OwnedFd>>,
    seq: u64,
}

/// The server's execs by id.
#[derive(Default)]
pub struct Execs {
    map: Mutex<HashMap<String, ExecRecord>>,
    next: Mutex<u64>,
}

fn new_id() -> String {
    let mut b = [0u8; 32];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct CreateBody {
    attach_stdin: bool,
    tty: bool,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    privileged: bool,
}

pub async fn create(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let mut de = serde_json::Deserializer::from_slice(&body);
    let body: CreateBody = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| ApiError::bad_request(format!("malformed exec config: {e}")))?;
    if body.privileged {
        return Err(ApiError::not_implemented("a privileged exec"));
    }
    let cmd = body
        .cmd
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::bad_request("no exec command specified"))?;
    let container = blocking({
        let app = app.clone();
        move || {
            let inst = Instances::open(&app.data_dir)?.find(&id)?;
            let state = inst.state()?;
            if state.status != cela_instance::Status::Running {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("container {} is not running", inst.name()),
                ));
            }
            Ok(inst.config.id)
        }
    })
    .await?;
    let exec_id = new_id();
    let seq = {
        let mut n = app.execs.next.lock().map_err(ApiError::internal)?;
        *n += 1;
        *n
    };
    let mut map = app.execs.map.lock().map_err(ApiError::internal)?;
    if map.len() >= MAX_EXECS {
        let oldest = map
            .iter()
            .filter(|(_, e)| !e.running)
            .min_by_key(|(_, e)| e.seq)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => {
                map.remove(&k);
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{MAX_EXECS} execs are running; try again when one has ended"),
                ));
            }
        }
    }
    map.insert(
        exec_id.clone(),
        ExecRecord {
            container,
            cmd,
            env: body.env.unwrap_or_default(),
            workdir: body.working_dir.filter(|w| !w.is_empty()),
            user: body.user.filter(|u| !u.is_empty()),
            tty: body.tty,
            stdin: body.attach_stdin,
            running: false,
            exit_code: None,
            pid: None,
            master: None,
            seq,
        },
    );
    Ok((StatusCode::CREATED, axum::Json(json!({"Id": exec_id}))))
}

fn lookup(app: &AppState, id: &str) -> Result<ExecRecord, ApiError> {
    app.execs
        .map
        .lock()
        .map_err(ApiError::internal)?
        .get(id)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("No such exec instance: {id}"),
            )
        })
}

fn update(app: &AppState, id: &str, f: impl FnOnce(&mut ExecRecord)) {
    if let Ok(mut map) = app.execs.map.lock()
        && let Some(e) = map.get_mut(id)
    {
        f(e);
    }
}

pub async fn inspect(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let e = lookup(&app, &id)?;
    Ok(axum::Json(json!({
        "ID": id,
        "Running": e.running,
        "ExitCode": e.exit_code,
        "ProcessConfig": {
            "tty": e.tty,
            "entrypoint": e.cmd.first(),
            "arguments": e.cmd.get(1..).unwrap_or_default(),
            "privileged": false,
            "user": e.user.clone().unwrap_or_default(),
        },
        "OpenStdin": e.stdin,
        "OpenStderr": true,
        "OpenStdout": true,
        "CanRemove": false,
        "ContainerID": e.container,
        "DetachKeys": "",
        "Pid": e.pid.unwrap_or(0),
    })))
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct StartBody {
    detach: bool,
}

/// The `cela exec` command line for an exec.
fn command(app: &AppState, e: &ExecRecord) -> Result<Command, ApiError> {
    let exe = std::env::current_exe().map_err(ApiError::internal)?;
    let mut c = Command::new(exe);
    c.arg("--data-dir").arg(&app.data_dir).arg("exec");
    if e.tty {
        c.arg("-t");
    }
    if e.stdin {
        c.arg("-i");
    }
    for kv in &e.env {
        c.arg("-e").arg(kv);
    }
    if let Some(w) = &e.workdir {
        c.arg("-w").arg(w);
    }
    if let Some(u) = &e.user {
        c.arg("-u").arg(u);
    }
    c.arg(&e.container).arg("--").args(&e.cmd);
    Ok(c)
}

/// `POST /exec/{id}/start`: runs the exec, its output (and input, with `AttachStdin`) on the
/// hijacked connection; with `Detach`, in the background.
pub async fn start(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let e = lookup(&app, &id)?;
    if e.running || e.exit_code.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("exec {id} has already been started"),
        ));
    }
    let body = axum::body::to_bytes(std::mem::take(req.body_mut()), crate::MAX_BODY)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request: {e}")))?;
    let start: StartBody = if body.is_empty() {
        StartBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("malformed exec start: {e}")))?
    };
    let mut cmd = command(&app, &e)?;
    // The exec's stdio: a terminal the server holds the master of, or pipes.
    let master = if e.tty {
        let pty = nix::pty::openpty(None, None)
            .map_err(|e| ApiError::internal(format!("a terminal for the exec: {e}")))?;
        // Close-on-exec, both: every process the server starts meanwhile (other execs, the
        // supervisors of new instances) would otherwise keep this terminal allocated, and the
        // exec's output would never end while one of them lived.
        for fd in [&pty.master, &pty.slave] {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(|e| ApiError::internal(format!("a terminal for the exec: {e}")))?;
        }
        let slave = pty.slave;
        let s = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(ApiError::internal);
        cmd.stdin(s(&slave)?).stdout(s(&slave)?).stderr(s(&slave)?);
        Some(Arc::new(pty.master))
    } else {
        cmd.stdin(if e.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        None
    };
    if start.detach {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| ApiError::internal(format!("starting cela exec: {e}")))?;
    let pid = child.id();
    update(&app, &id, |r| {
        r.running = true;
        r.pid = Some(pid);
        r.master = master.clone();
    });
    // Output: frames from the pipes, or the terminal's bytes.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let mut readers = Vec::new();
    if !start.detach {
        if let Some(m) = &master {
            let mut f = std::fs::File::from(m.try_clone().map_err(ApiError::internal)?);
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                // Read to the end even when the client has gone, so the exec never blocks
                // on a full terminal.
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = f.read(&mut buf) {
                    let _ = tx.blocking_send(Bytes::copy_from_slice(&buf[..n]));
                }
            }));
        } else {
            for (pipe, stream) in [
                (
                    child
                        .stdout
                        .take()
                        .map(|p| Box::new(p) as Box<dyn Read + Send>),
                    Stream::Stdout,
                ),
                (
                    child
                        .stderr
                        .take()
                        .map(|p| Box::new(p) as Box<dyn Read + Send>),
                    Stream::Stderr,
                ),
            ] {
                let Some(mut pipe) = pipe else { continue };
                let tx = tx.clone();
                readers.push(std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = pipe.read(&mut buf) {
                        let mut out = Vec::new();
                        frame(&mut out, stream, &buf[..n]);
                        let _ = tx.blocking_send(Bytes::from(out));
                    }
                }));
            }
        }
    }
    let child_stdin = child.stdin.take();
    // The exec's end is recorded whoever is still listening, and before the stream ends: a
    // client asks for the exit code as soon as it has the last byte.
    {
        let app = app.clone();
        let id = id.clone();
        let hold = tx;
        std::thread::spawn(move || {
            let code = child.wait().ok().and_then(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.code().or_else(|| s.signal().map(|n| 128 + n))
            });
            for r in readers {
                let _ = r.join();
            }
            update(&app, &id, |r| {
                r.running = false;
                r.exit_code = Some(code.unwrap_or(-1));
                r.master = None;
            });
            drop(hold);
        });
    }
    if start.detach {
        return Ok(StatusCode::OK.into_response());
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let input_to_master = master.as_ref().filter(|_| e.stdin).map(|m| m.try_clone());
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (mut from_client, mut to_client) = tokio::io::split(TokioIo::new(upgraded));
        // Input: into the terminal, or the stdin pipe (closed at the client's half-close).
        let sink: Option<Box<dyn Write + Send>> = match (input_to_master, child_stdin) {
            (Some(Ok(m)), _) => Some(Box::new(std::fs::File::from(m))),
            (_, Some(pipe)) => Some(Box::new(pipe)),
            _ => None,
        };
        if let Some(mut sink) = sink {
            // Bounded: a client sending faster than the exec reads is held back by its
            // connection, not buffered in the server.
            let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
            std::thread::spawn(move || {
                while let Some(data) = in_rx.blocking_recv() {
                    if sink.write_all(&data).is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) =
                    tokio::io::AsyncReadExt::read(&mut from_client, &mut buf).await
                {
                    if in_tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            });
        }
        while let Some(chunk) = rx.recv().await {
            if to_client.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to_client.shutdown().await;
    });
    Ok(switching_protocols(e.tty))
}

/// `POST /exec/{id}/resize`: the exec's terminal (`cela exec -t` follows its stdin's size).
pub async fn resize(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<ResizeQuery>,
) -> Result<StatusCode, ApiError> {
    let e = lookup(&app, &id)?;
    let Some(master) = e.master else {
        return Err(ApiError::bad_request(format!(
            "exec {id} has no running terminal to resize"
        )));
    };
    let size = libc::winsize {
        ws_row: q.h.unwrap_or(0),
        ws_col: q.w.unwrap_or(0),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    cela_runtime::console::set_window_size(master.as_ref(), &size)
        .map_err(|e| ApiError::internal(format!("resizing: {e}")))?;
    Ok(StatusCode::OK)
}
