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
use std::time::Duration;

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

/// What an exec runs, and how its streams are attached.
#[derive(Debug, Clone)]
pub(crate) struct ExecSpec {
    /// The container's id.
    pub container: String,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    pub stdin: bool,
    /// `AttachStdout`, `AttachStderr`: the streams passed on (others go to /dev/null).
    pub stdout: bool,
    pub stderr: bool,
    /// Docker's detach keys for the exec's input (Ctrl-P Ctrl-Q with a terminal by default).
    pub detach_keys: Vec<u8>,
}

/// One exec of the Docker API, as created and as it runs.
#[derive(Debug, Clone)]
pub struct ExecRecord {
    spec: ExecSpec,
    /// Started (a claim taken under the map's lock, so two starts cannot both run it).
    started: bool,
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
    attach_stdout: bool,
    attach_stderr: bool,
    tty: bool,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    privileged: bool,
    detach_keys: Option<String>,
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
    let detach_keys = super::frames::detach_keys(body.detach_keys.as_deref(), body.tty)?;
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
            spec: ExecSpec {
                container,
                cmd,
                env: body.env.unwrap_or_default(),
                workdir: body.working_dir.filter(|w| !w.is_empty()),
                user: body.user.filter(|u| !u.is_empty()),
                tty: body.tty,
                stdin: body.attach_stdin,
                stdout: body.attach_stdout,
                stderr: body.attach_stderr,
                detach_keys,
            },
            started: false,
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
            "tty": e.spec.tty,
            "entrypoint": e.spec.cmd.first(),
            "arguments": e.spec.cmd.get(1..).unwrap_or_default(),
            "privileged": false,
            "user": e.spec.user.clone().unwrap_or_default(),
        },
        "OpenStdin": e.spec.stdin,
        "OpenStderr": e.spec.stderr,
        "OpenStdout": e.spec.stdout,
        "CanRemove": false,
        "ContainerID": e.spec.container,
        "DetachKeys": detach_keys_text(&e.spec.detach_keys),
        "Pid": e.pid.unwrap_or(0),
    })))
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct StartBody {
    detach: bool,
}

/// Detach keys in Docker's syntax (`ctrl-p,ctrl-q`).
fn detach_keys_text(keys: &[u8]) -> String {
    keys.iter()
        .map(|&k| match k {
            1..=26 => format!("ctrl-{}", (b'a' + k - 1) as char),
            0 | 27..=31 => format!("ctrl-{}", (b'@' + k) as char),
            k => (k as char).to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The `cela exec` command line for an exec. Values go in `--flag=VALUE` form, so one that
/// begins with a dash is never read as an option.
fn command(app: &AppState, e: &ExecSpec) -> Result<Command, ApiError> {
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
        c.arg(format!("--env={kv}"));
    }
    if let Some(w) = &e.workdir {
        c.arg(format!("--workdir={w}"));
    }
    if let Some(u) = &e.user {
        c.arg(format!("--user={u}"));
    }
    c.arg(&e.container).arg("--").args(&e.cmd);
    Ok(c)
}

/// How long an exec's output may be idle after it has exited before the exec is over: a
/// process it left in the background may hold its stdout open for ever, and the exec is over
/// all the same (the supervisor bounds a run's output the same way). Output that keeps
/// coming, or waits for a slow client, is still passed on.
const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(2);

/// What the output readers are doing: how many are passing a chunk on (blocked on a slow
/// client counts as busy), and when one last read something.
struct Activity {
    busy: std::sync::atomic::AtomicUsize,
    last: Mutex<std::time::Instant>,
}

impl Activity {
    fn idle_for(&self) -> Duration {
        if self.busy.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.last
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or(Duration::ZERO)
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last.lock() {
            *t = std::time::Instant::now();
        }
    }
}

/// Takes the start of exec `id` (atomically: of two concurrent starts, one gets it).
fn claim(app: &AppState, id: &str) -> Result<ExecRecord, ApiError> {
    let mut map = app.execs.map.lock().map_err(ApiError::internal)?;
    let e = map.get_mut(id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("No such exec instance: {id}"),
        )
    })?;
    if e.started {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("exec {id} has already been started"),
        ));
    }
    e.started = true;
    Ok(e.clone())
}

/// The exec's stdio: a terminal the server holds the master of (the slave for the child, the
/// master for the server, and another handle on the master for reading), or pipes.
struct ExecIo {
    master: Option<Arc<OwnedFd>>,
    /// The master again, to read the terminal's output from.
    output: Option<std::fs::File>,
    /// The master again, to write the client's input to (with `AttachStdin`).
    input: Option<std::fs::File>,
}

fn prepare(cmd: &mut Command, e: &ExecSpec, detach: bool) -> Result<ExecIo, ApiError> {
    if detach {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    if !e.tty {
        if !detach {
            let piped = |yes: bool| if yes { Stdio::piped() } else { Stdio::null() };
            cmd.stdin(piped(e.stdin))
                .stdout(piped(e.stdout))
                .stderr(piped(e.stderr));
        }
        return Ok(ExecIo {
            master: None,
            output: None,
            input: None,
        });
    }
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
    let master = |fd: &OwnedFd| {
        fd.try_clone()
            .map(std::fs::File::from)
            .map_err(ApiError::internal)
    };
    let (output, input) = if detach {
        (None, None)
    } else {
        let s = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(ApiError::internal);
        cmd.stdin(s(&pty.slave)?)
            .stdout(s(&pty.slave)?)
            .stderr(s(&pty.slave)?);
        let input = if e.stdin {
            Some(master(&pty.master)?)
        } else {
            None
        };
        (Some(master(&pty.master)?), input)
    };
    Ok(ExecIo {
        master: Some(Arc::new(pty.master)),
        output,
        input,
    })
}

/// A started exec: its output as it is read (tagged with its stream; `None` for a terminal's
/// bytes), its exit code once it is over (exited, and its output read or idle for
/// [`OUTPUT_AFTER_EXIT`]), where its input goes, and its terminal.
pub(crate) struct Launched {
    pub output: tokio::sync::mpsc::Receiver<(Option<Stream>, Bytes)>,
    pub over: tokio::sync::oneshot::Receiver<i32>,
    pub input: Option<Box<dyn Write + Send>>,
    pub master: Option<Arc<OwnedFd>>,
}

/// Starts exec `e` as `cela exec` (recording its pid, and its end, under `id` in the
/// server's execs when it is there). Everything that can fail comes before the spawn: after
/// it, the exec runs and its end is recorded whatever happens to the client. A failed launch
/// gives the claim back.
pub(crate) fn launch(
    app: &Arc<AppState>,
    id: &str,
    e: &ExecSpec,
    detach: bool,
) -> Result<Launched, ApiError> {
    let prepared = command(app, e).and_then(|mut cmd| {
        let stdio = prepare(&mut cmd, e, detach)?;
        let child = cmd
            .spawn()
            .map_err(|e| ApiError::internal(format!("starting cela exec: {e}")))?;
        Ok((child, stdio))
    });
    let (mut child, stdio) = match prepared {
        Ok(p) => p,
        Err(err) => {
            update(app, id, |r| r.started = false);
            return Err(err);
        }
    };
    let pid = child.id();
    update(app, id, |r| {
        r.running = true;
        r.pid = Some(pid);
        r.master = stdio.master.clone();
    });
    // Output: frames from the pipes, or the terminal's bytes, read on threads of their own
    // (to the end even when the client has gone, so the exec never blocks on its output).
    let (tx, rx) = tokio::sync::mpsc::channel::<(Option<Stream>, Bytes)>(16);
    let mut sources: Vec<(Box<dyn Read + Send>, Option<Stream>)> = Vec::new();
    if let Some(f) = stdio.output {
        sources.push((Box::new(f), None));
    }
    if let Some(p) = child.stdout.take() {
        sources.push((Box::new(p), Some(Stream::Stdout)));
    }
    if let Some(p) = child.stderr.take() {
        sources.push((Box::new(p), Some(Stream::Stderr)));
    }
    let child_stdin = child.stdin.take();
    let (read_tx, read_done) = std::sync::mpsc::channel::<()>();
    let readers = sources.len();
    let activity = Arc::new(Activity {
        busy: Default::default(),
        last: Mutex::new(std::time::Instant::now()),
    });
    for (mut source, stream) in sources {
        let tx = tx.clone();
        let read_tx = read_tx.clone();
        let activity = activity.clone();
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering::SeqCst;
            let mut buf = vec![0u8; 16 * 1024];
            // EIO ends a terminal once every process holding its other side has exited.
            while let Ok(n @ 1..) = source.read(&mut buf) {
                activity.busy.fetch_add(1, SeqCst);
                let _ = tx.blocking_send((stream, Bytes::copy_from_slice(&buf[..n])));
                activity.touch();
                activity.busy.fetch_sub(1, SeqCst);
            }
            let _ = read_tx.send(());
        });
    }
    drop(read_tx);
    // The exec's end is recorded whoever is still listening, and before the stream ends: a
    // client asks for the exit code as soon as it has the last byte.
    let (over_tx, over) = tokio::sync::oneshot::channel::<i32>();
    {
        let app = app.clone();
        let id = id.to_owned();
        std::thread::spawn(move || {
            let code = child.wait().ok().and_then(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.code().or_else(|| s.signal().map(|n| 128 + n))
            });
            // Every reader at its end, or the output idle long enough.
            activity.touch();
            let mut finished = 0;
            while finished < readers {
                match read_done.recv_timeout(Duration::from_millis(100)) {
                    Ok(()) => finished += 1,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                }
                if activity.idle_for() >= OUTPUT_AFTER_EXIT {
                    break;
                }
            }
            let code = code.unwrap_or(-1);
            update(&app, &id, |r| {
                r.running = false;
                r.exit_code = Some(code);
                r.master = None;
            });
            let _ = over_tx.send(code);
        });
    }
    drop(tx);
    // Input: into the terminal, or the stdin pipe (closed when the sink is dropped).
    let input: Option<Box<dyn Write + Send>> = match (stdio.input, child_stdin) {
        (Some(terminal), _) => Some(Box::new(terminal)),
        (_, Some(pipe)) => Some(Box::new(pipe)),
        _ => None,
    };
    Ok(Launched {
        output: rx,
        over,
        input,
        master: stdio.master,
    })
}

/// `POST /exec/{id}/start`: runs the exec, its output (and input, with `AttachStdin`) on the
/// hijacked connection (or, without `Upgrade`, the response's body, as dockerd does); with
/// `Detach`, in the background. The stream ends when the exec has exited and its output is
/// read (or idle for [`OUTPUT_AFTER_EXIT`]), or when the client types the detach keys.
pub async fn start(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    mut req: Request,
) -> Result<Response, ApiError> {
    lookup(&app, &id)?;
    let body = axum::body::to_bytes(std::mem::take(req.body_mut()), crate::MAX_BODY)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request: {e}")))?;
    let start: StartBody = if body.is_empty() {
        StartBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("malformed exec start: {e}")))?
    };
    let upgrade = req
        .headers()
        .get(axum::http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"tcp"));
    let e = lookup(&app, &id)?.spec;
    if !start.detach && e.stdin && !upgrade {
        return Err(ApiError::bad_request(
            "an exec's stdin needs a hijacked connection (Upgrade: tcp)",
        ));
    }
    let permit = if start.detach {
        None
    } else {
        Some(app.session()?)
    };
    let e = claim(&app, &id)?.spec;
    let launched = launch(&app, &id, &e, start.detach)?;
    if start.detach {
        return Ok(StatusCode::OK.into_response());
    }
    // What the client gets: the output until the exec is over (then what is already read),
    // or until it detaches.
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let (detach_tx, detached) = tokio::sync::oneshot::channel::<()>();
    // The relay holds the session's permit: it lasts as long as the stream.
    let relay = relay(
        launched.output,
        launched.over,
        detached,
        out_tx,
        |stream, data| match stream {
            Some(stream) => {
                let mut out = Vec::new();
                frame(&mut out, stream, &data);
                Bytes::from(out)
            }
            None => data,
        },
        |_| None,
    );
    tokio::spawn(async move {
        let _permit = permit;
        relay.await;
    });
    if !upgrade {
        return Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                super::frames::content_type(e.tty),
            )],
            crate::channel_body(out_rx),
        )
            .into_response());
    }
    let sink = launched.input;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let keys = e.detach_keys.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (from_client, mut to_client) = tokio::io::split(TokioIo::new(upgraded));
        if let Some(sink) = sink {
            // Bounded: a client sending faster than the exec reads is held back by its
            // connection, not buffered in the server.
            let (in_tx, in_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(4);
            std::thread::spawn(move || {
                if feed_input(sink, in_rx, &keys) {
                    let _ = detach_tx.send(());
                }
            });
            tokio::spawn(super::frames::read_input(from_client, in_tx));
        }
        let mut out_rx = out_rx;
        while let Some(chunk) = out_rx.recv().await {
            if !crate::write_bounded(to_client.write_all(&chunk)).await {
                return;
            }
        }
        let _ = to_client.shutdown().await;
    });
    Ok(switching_protocols(e.tty))
}

/// Passes the exec's output on to the client, each chunk as `encode` makes it, until the
/// exec is over (then what was read before that, and what `finish` makes of the exit code)
/// or the client detaches.
pub(crate) async fn relay<T>(
    mut rx: tokio::sync::mpsc::Receiver<(Option<Stream>, Bytes)>,
    mut over: tokio::sync::oneshot::Receiver<i32>,
    detached: tokio::sync::oneshot::Receiver<()>,
    out: tokio::sync::mpsc::Sender<T>,
    encode: impl Fn(Option<Stream>, Bytes) -> T,
    finish: impl FnOnce(i32) -> Option<T>,
) {
    // A detach ends the stream; input that ends without one (the sender dropped) does not.
    let detached = async move {
        if detached.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(detached);
    // The output can end before the exec does (it closed its stdout): the stream then
    // waits for the exit all the same, so the client finds the exit code recorded.
    let mut output_ended = false;
    loop {
        tokio::select! {
            biased;
            // Over: the readers have finished or stayed idle, so everything they read is
            // queued already.
            code = &mut over => {
                while let Ok((stream, data)) = rx.try_recv() {
                    if out.send(encode(stream, data)).await.is_err() {
                        return;
                    }
                }
                if let Some(last) = code.ok().and_then(finish) {
                    let _ = out.send(last).await;
                }
                return;
            }
            () = &mut detached => return,
            // The client has gone (its receiving end dropped): nothing to wait for.
            () = out.closed() => return,
            chunk = rx.recv(), if !output_ended => match chunk {
                Some((stream, data)) => {
                    if out.send(encode(stream, data)).await.is_err() {
                        return;
                    }
                }
                None => output_ended = true,
            },
        }
    }
}

/// Writes the client's input into the exec's stdin (or terminal) until it ends or the detach
/// keys come; returns whether the client detached.
pub(crate) fn feed_input(
    mut sink: Box<dyn Write + Send>,
    mut input: tokio::sync::mpsc::Receiver<Option<Vec<u8>>>,
    keys: &[u8],
) -> bool {
    let mut watch = cela_instance::attach::DetachWatch::new(keys);
    while let Some(Some(data)) = input.blocking_recv() {
        let (pass, detach) = watch.feed(&data);
        if sink.write_all(&pass).is_err() {
            return false;
        }
        if detach {
            return true;
        }
    }
    // The end of the client's input: what was held back goes, and the pipe closes (a
    // terminal's master stays open with the server's other handle).
    let _ = sink.write_all(&watch.finish());
    false
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
    cela_runtime::console::set_rows_cols(master.as_ref(), q.h.unwrap_or(0), q.w.unwrap_or(0))
        .map_err(|e| ApiError::internal(format!("resizing: {e}")))?;
    Ok(StatusCode::OK)
}
