//! cela's own API's exec and console over WebSocket, `GET /cela/v1/instances/{id}/exec` and
//! `/console` (for browsers and other clients without Docker's hijacked streams). The exec is `cela exec`, as the Docker
//! API's (`docker::exec::launch`): the same confinement, user lookup and microVM path.
//!
//! The protocol: the client's first message is text, the exec as JSON (`{"cmd": [...], "tty":
//! bool, "stdin": bool, "env": ["K=V"], "workdir": "/", "user": "u"}`, strict), within
//! [`SPEC_BOUND`]. Then the server sends binary messages whose first byte says the stream (1
//! stdout or the terminal, 2 stderr) and the rest is output, and at the end a text message
//! `{"exit_code": N}` and a close. The client sends binary messages (input) and text messages
//! `{"resize": {"rows": R, "cols": C}}` or `{"close_stdin": true}`. Messages are bounded by
//! [`crate::MAX_BODY`]; anything else ends the session with a close naming the problem. A client
//! that goes leaves the exec to finish (its stdin closed), as a Docker client's does.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use cela_instance::log::Stream;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;

use crate::AppState;
use crate::docker::exec::{ExecSpec, feed_input, launch, relay};
use crate::error::{ApiError, blocking};

/// How long a client has to say what to run.
pub const SPEC_BOUND: Duration = Duration::from_secs(10);

/// The first message: what to run.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    cmd: Vec<String>,
    #[serde(default)]
    tty: bool,
    #[serde(default)]
    stdin: bool,
    #[serde(default)]
    env: Vec<String>,
    workdir: Option<String>,
    user: Option<String>,
}

/// A control message from the client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Control {
    Resize { rows: u16, cols: u16 },
    CloseStdin(bool),
}

type Upgrade = Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;

/// What an upgrade needs before it happens: the instance looked up (404), running (409), with
/// the time its last run finished (to follow into the end of this one), a session's permit
/// (503), and a WebSocket request (400). `what` names the route in the answers.
async fn upgrade(
    app: &Arc<AppState>,
    id: String,
    ws: Upgrade,
    what: &'static str,
) -> Result<
    (
        WebSocketUpgrade,
        tokio::sync::OwnedSemaphorePermit,
        (cela_instance::Instance, Option<String>),
    ),
    ApiError,
> {
    let found = blocking({
        let app = app.clone();
        move || {
            let inst = cela_instance::Instances::open(&app.data_dir)?.find(&id)?;
            let state = inst.state()?;
            if state.status != cela_instance::Status::Running {
                return Err(ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    format!(
                        "instance {} is {}: {what} needs a running one",
                        inst.name(),
                        state.status
                    ),
                ));
            }
            Ok((inst, state.finished))
        }
    })
    .await?;
    let permit = app.session()?;
    let ws = ws.map_err(|e| {
        ApiError::bad_request(format!(
            "{what} here is a WebSocket (Upgrade: websocket): {e}"
        ))
    })?;
    let ws = ws
        .max_message_size(crate::MAX_BODY)
        .max_frame_size(crate::MAX_BODY);
    Ok((ws, permit, found))
}

/// The upgrade: the instance is looked up (404) and must be running (409) before it.
#[utoipa::path(get, path = "/cela/v1/instances/{id}/exec", tag = "instances",
    description = "A WebSocket (`Upgrade: websocket`). The client's first message is text, the exec as JSON: `{\"cmd\": [...], \"tty\": bool, \"stdin\": bool, \"env\": [\"K=V\"], \"workdir\": \"/\", \"user\": \"u\"}`. The server sends binary messages whose first byte is the stream (1 stdout or the terminal, 2 stderr), then a text message `{\"exit_code\": N}` and a close. The client sends binary messages (input) and text messages `{\"resize\": {\"rows\": R, \"cols\": C}}` or `{\"close_stdin\": true}`.",
    params(crate::own::InstanceKey),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade, or an id prefix that several instances share", body = crate::error::ErrorBody),
        (status = 404, description = "No such instance", body = crate::error::ErrorBody),
        (status = 409, description = "It is not running", body = crate::error::ErrorBody),
        (status = 503, description = "Too many streaming sessions", body = crate::error::ErrorBody),
    ))]
pub async fn exec(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    let (ws, permit, (inst, _)) = upgrade(&app, id, ws, "exec").await?;
    let container = inst.config.id;
    Ok(ws.on_upgrade(move |socket| async move {
        let _permit = permit;
        session(app, container, socket).await
    }))
}

/// A close frame's reason: at most 123 bytes (the frame's 125 less its code), cut on a
/// character boundary.
fn close_reason(why: &str) -> String {
    let mut end = why.len().min(123);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    why[..end].to_owned()
}

async fn close(mut socket: WebSocket, why: String) {
    tracing::debug!("websocket exec: {why}");
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            // 1008: policy violation, the close code for a message the server refuses.
            code: 1008,
            reason: close_reason(&why).into(),
        })))
        .await;
}

async fn session(app: Arc<AppState>, container: String, mut socket: WebSocket) {
    let spec = match tokio::time::timeout(SPEC_BOUND, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<Spec>(&t) {
            Ok(s) if !s.cmd.is_empty() => s,
            Ok(_) => return close(socket, "the exec's cmd is empty".into()).await,
            Err(e) => return close(socket, format!("malformed exec: {e}")).await,
        },
        Ok(_) => {
            return close(
                socket,
                "the first message must be the exec, as JSON text".into(),
            )
            .await;
        }
        Err(_) => return close(socket, "no exec was sent in time".into()).await,
    };
    let e = ExecSpec {
        container,
        cmd: spec.cmd,
        env: spec.env,
        workdir: spec.workdir.filter(|w| !w.is_empty()),
        user: spec.user.filter(|u| !u.is_empty()),
        tty: spec.tty,
        stdin: spec.stdin,
        stdout: true,
        stderr: true,
        // No detach keys: the client closes, or the exec ends.
        detach_keys: Vec::new(),
    };
    let launched = match launch(&app, "", &e, false) {
        Ok(l) => l,
        Err(err) => return close(socket, err.message).await,
    };
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Message>(16);
    let (_never, detached) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(relay(
        launched.output,
        launched.over,
        detached,
        out_tx,
        |stream, data| {
            let mut m = Vec::with_capacity(data.len() + 1);
            m.push(if stream == Some(Stream::Stderr) { 2 } else { 1 });
            m.extend_from_slice(&data);
            Message::Binary(m.into())
        },
        |code| Some(Message::Text(format!("{{\"exit_code\":{code}}}").into())),
    ));
    let (to_client, mut from_client) = socket.split();
    // The client's messages, on a task of their own: input the exec does not read never
    // holds its output up.
    let master = launched.master.clone();
    let input = launched.input;
    let reader = tokio::spawn(async move {
        // Input goes through a bounded queue to a writer thread; without stdin (or once it
        // is closed) it is dropped. Input the exec does not read holds later messages
        // (resizes included) back: the client's own backpressure.
        let mut to_stdin = input.map(|sink| {
            let (tx, rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(4);
            std::thread::spawn(move || feed_input(sink, rx, &[]));
            tx
        });
        while let Some(Ok(msg)) = from_client.next().await {
            match msg {
                Message::Binary(b) => {
                    if let Some(tx) = &to_stdin
                        && tx.send(Some(b.to_vec())).await.is_err()
                    {
                        to_stdin = None;
                    }
                }
                Message::Text(t) => match serde_json::from_str::<Control>(&t) {
                    Ok(Control::Resize { rows, cols }) => {
                        if let Some(m) = &master {
                            let _ = cela_runtime::console::set_rows_cols(m.as_ref(), rows, cols);
                        }
                    }
                    Ok(Control::CloseStdin(true)) => {
                        if let Some(tx) = to_stdin.take() {
                            let _ = tx.send(None).await;
                        }
                    }
                    Ok(Control::CloseStdin(false)) => {}
                    Err(e) => return Some(format!("malformed control message: {e}")),
                },
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
        // The client went: the exec's stdin ends, the exec runs on to its end.
        if let Some(tx) = to_stdin {
            let _ = tx.send(None).await;
        }
        None
    });
    serve_until_done(to_client, out_rx, reader).await;
}

/// `GET /cela/v1/instances/{id}/console`: the instance's console, as `cela attach` has it: a
/// microVM's serial console (with `-t`, its workload's terminal) or a container's terminal or
/// stdio. Output is what the instance logs from now on, tagged as the exec's is, until its run
/// ends (then `{"exit_code": N}` and a close); input (binary messages, and the exec's control
/// messages) goes to it when it was made with a terminal or stdin, and is dropped otherwise.
/// A client that closes detaches: the instance runs on.
#[utoipa::path(get, path = "/cela/v1/instances/{id}/console", tag = "instances",
    description = "A WebSocket (`Upgrade: websocket`) to the instance's console: a microVM's serial console (its workload's terminal when made with `tty`), a container's terminal or stdio. The server sends binary messages whose first byte is the stream (1 stdout or the terminal, 2 stderr) and the rest output, from the upgrade on; when the run ends, a text message `{\"exit_code\": N}` and a close. The client sends binary messages (keys, or stdin) and text messages `{\"resize\": {\"rows\": R, \"cols\": C}}` or `{\"close_stdin\": true}`; input is dropped for an instance made without a terminal or stdin. Closing detaches.",
    params(crate::own::InstanceKey),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade, or an id prefix that several instances share", body = crate::error::ErrorBody),
        (status = 404, description = "No such instance", body = crate::error::ErrorBody),
        (status = 409, description = "It is not running", body = crate::error::ErrorBody),
        (status = 503, description = "Too many streaming sessions", body = crate::error::ErrorBody),
    ))]
pub async fn console(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    ws: Upgrade,
) -> Result<Response, ApiError> {
    let (ws, permit, (inst, finished)) = upgrade(&app, id, ws, "console").await?;
    Ok(ws.on_upgrade(move |socket| async move {
        let _permit = permit;
        console_session(inst, finished, socket).await
    }))
}

async fn console_session(
    inst: cela_instance::Instance,
    finished: Option<String>,
    socket: WebSocket,
) {
    use crate::follow::{From, Until, follow};
    use cela_instance::attach::Input;
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Message>(16);
    {
        let inst = inst.clone();
        std::thread::spawn(move || {
            let gone = || out_tx.is_closed();
            let ending = follow(&inst, From::Now, Until::RunEnds, finished, &gone, |rec| {
                let mut m = Vec::with_capacity(rec.data.len() + 1);
                m.push(if rec.stream == Stream::Stderr { 2 } else { 1 });
                m.extend_from_slice(rec.data);
                out_tx.blocking_send(Message::Binary(m.into())).is_ok()
            });
            let (code, _) = ending.status();
            let _ = out_tx.blocking_send(Message::Text(format!("{{\"exit_code\":{code}}}").into()));
        });
    }
    // Input goes to the supervisor's attach socket from a thread of its own, through a
    // bounded queue (input the instance does not read holds the client back, as it holds a
    // Docker client's). Sizes go on a connection of their own, the newest only, so they
    // never wait behind keys the instance has not read.
    let takes_input = inst.config.stdin || inst.config.tty;
    let to_instance = takes_input.then(|| {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Input>(4);
        let inst = inst.clone();
        std::thread::spawn(move || {
            let Ok(mut conn) = cela_instance::attach::connect(&inst, Duration::from_secs(5)) else {
                return;
            };
            while let Some(input) = rx.blocking_recv() {
                if conn.send(&input).is_err() {
                    return;
                }
            }
        });
        tx
    });
    let sizes = inst.config.tty.then(|| {
        let (tx, mut rx) = tokio::sync::watch::channel::<Option<(u16, u16)>>(None);
        let inst = inst.clone();
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            let Ok(mut conn) = cela_instance::attach::connect(&inst, Duration::from_secs(5)) else {
                return;
            };
            // Ends when the session drops its sender.
            while rt.block_on(rx.changed()).is_ok() {
                let newest = *rx.borrow_and_update();
                if let Some((rows, cols)) = newest
                    && conn.send(&Input::Resize { rows, cols }).is_err()
                {
                    return;
                }
            }
        });
        tx
    });
    let (to_client, mut from_client) = socket.split();
    let reader = tokio::spawn(async move {
        let mut to_instance = to_instance;
        while let Some(Ok(msg)) = from_client.next().await {
            let input = match msg {
                Message::Binary(b) => Input::Data(b.to_vec()),
                Message::Text(t) => match serde_json::from_str::<Control>(&t) {
                    Ok(Control::Resize { rows, cols }) => {
                        if let Some(s) = &sizes {
                            let _ = s.send(Some((rows, cols)));
                        }
                        continue;
                    }
                    Ok(Control::CloseStdin(true)) => Input::Eof,
                    Ok(Control::CloseStdin(false)) => continue,
                    Err(e) => return Some(format!("malformed control message: {e}")),
                },
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if let Some(tx) = &to_instance
                && tx.send(input).await.is_err()
            {
                to_instance = None;
            }
        }
        None
    });
    serve_until_done(to_client, out_rx, reader).await;
}

/// Sends a session's output until it ends or the client goes, then a close (naming why the
/// client's messages were refused, if they were); a reader that does not answer the close
/// keeps nothing: it is aborted (which ends an exec's stdin).
async fn serve_until_done(
    mut to_client: futures_util::stream::SplitSink<WebSocket, Message>,
    mut out_rx: tokio::sync::mpsc::Receiver<Message>,
    reader: tokio::task::JoinHandle<Option<String>>,
) {
    let mut refused = None;
    tokio::pin!(reader);
    loop {
        tokio::select! {
            m = out_rx.recv() => match m {
                Some(m) => {
                    if !crate::write_bounded(to_client.send(m)).await {
                        break;
                    }
                }
                None => break,
            },
            // The client closed or went, or sent what is refused: nothing more to send it.
            r = &mut reader => {
                if let Ok(Some(why)) = r {
                    refused = Some(why);
                }
                break;
            }
        }
    }
    let frame = refused.map(|why| CloseFrame {
        code: 1008,
        reason: close_reason(&why).into(),
    });
    crate::write_bounded(to_client.send(Message::Close(frame))).await;
    reader.abort();
}
