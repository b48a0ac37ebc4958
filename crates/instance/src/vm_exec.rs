//! `cela exec` into a running microVM: the host end of the exec protocol
//! ([`cela_guest::exec`]). The client connects to the VM's vsock socket, asks for the guest's
//! agent port (`CONNECT <port>`, Firecracker's hybrid handshake), sends what to run and then
//! relays: this process's stdin to the command, its stdout and stderr back, until the exit
//! status arrives. With a terminal, the host terminal is raw meanwhile and the guest's
//! pseudo-terminal starts with its size.

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cela_guest::VSOCK_AGENT_PORT;
use cela_guest::exec::{Frame, Start};

use crate::error::InstanceError;
use crate::ops::ExecRequest;
use crate::record::Instance;

/// How long the guest may take to accept the connection.
const HANDSHAKE_BOUND: Duration = Duration::from_secs(30);

fn lost(what: impl std::fmt::Display) -> InstanceError {
    InstanceError::Other(format!(
        "the connection to the microVM's exec agent {what} (did the VM stop?)"
    ))
}

/// Runs `req` in the microVM `inst` with this process's standard streams (stdin only when
/// `forward_stdin`); returns the command's exit status.
pub fn exec(inst: &Instance, req: &ExecRequest, forward_stdin: bool) -> Result<i32, InstanceError> {
    let path = inst.vsock_path();
    if inst.state()?.engine.as_deref() == Some("qemu") {
        return Err(InstanceError::Unsupported(format!(
            "cela exec into microVM {} needs cela's KVM engine (it runs under the QEMU \
             fallback, which has no vsock on this host)",
            inst.name()
        )));
    }
    let mut stream = connect_agent(&path)?;
    let tty_size = req.tty.then(|| {
        cela_runtime::console::window_size(&io::stdin())
            .map(|w| (w.ws_row, w.ws_col))
            .unwrap_or((24, 80))
    });
    Frame::Start(Start {
        argv: req.args.clone(),
        env: req.env.clone(),
        workdir: req.workdir.clone(),
        user: req.user.clone(),
        tty: tty_size,
    })
    .write_to(&mut stream)
    .map_err(|e| lost(format!("failed: {e}")))?;
    let _raw = if req.tty {
        cela_runtime::console::RawStdin::enable()
    } else {
        None
    };
    if forward_stdin {
        let writer = stream
            .try_clone()
            .map_err(|e| lost(format!("failed: {e}")))?;
        // Ends with this process if stdin never does (a blocked read cannot be interrupted).
        std::thread::spawn(move || forward_input(writer));
    } else {
        let _ = Frame::StdinEnd.write_to(&mut stream);
    }
    relay_output(&mut stream)
}

/// How often a refused connection is tried again while the guest boots.
const RETRY: Duration = Duration::from_millis(100);

/// Connects to the guest's agent. A VM that was just started may not have its agent listening
/// yet (the guest refuses the connection): that is tried again until [`HANDSHAKE_BOUND`].
fn connect_agent(path: &std::path::Path) -> Result<UnixStream, InstanceError> {
    let start = std::time::Instant::now();
    loop {
        // The monitor binds the socket as it builds the machine, just after the instance is
        // recorded as running.
        let stream = match UnixStream::connect(path) {
            Ok(stream) => stream,
            Err(e) if start.elapsed() < HANDSHAKE_BOUND && e.kind() == io::ErrorKind::NotFound => {
                std::thread::sleep(RETRY);
                continue;
            }
            Err(e) => {
                return Err(InstanceError::Other(format!(
                    "connecting to {}: {e}",
                    path.display()
                )));
            }
        };
        match handshake(stream)? {
            Some(stream) => return Ok(stream),
            None if start.elapsed() < HANDSHAKE_BOUND => std::thread::sleep(RETRY),
            None => {
                return Err(InstanceError::Other(format!(
                    "the microVM has no exec agent listening after {}s (its init is not \
                     cela-init, or the guest did not finish booting)",
                    HANDSHAKE_BOUND.as_secs()
                )));
            }
        }
    }
}

/// Sends `CONNECT <agent port>` and reads the device's `OK <port>`; `None` if the guest
/// refused the connection (nothing listens on the port).
fn handshake(mut stream: UnixStream) -> Result<Option<UnixStream>, InstanceError> {
    stream
        .write_all(format!("CONNECT {VSOCK_AGENT_PORT}\n").as_bytes())
        .map_err(|e| lost(format!("failed: {e}")))?;
    let _ = stream.set_read_timeout(Some(HANDSHAKE_BOUND));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(_) if line.starts_with("OK ") => {}
        // The device closes the connection when the guest answers with a reset.
        Ok(_) => return Ok(None),
        Err(e) => return Err(lost(format!("failed: {e}"))),
    }
    if !reader.buffer().is_empty() {
        return Err(lost("sent bytes before the request"));
    }
    let stream = reader.into_inner();
    let _ = stream.set_read_timeout(None);
    Ok(Some(stream))
}

fn forward_input(mut writer: UnixStream) {
    let mut buf = vec![0u8; 32 << 10];
    let mut stdin = io::stdin().lock();
    loop {
        let frame = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => Frame::StdinEnd,
            Ok(n) => Frame::Stdin(buf[..n].to_vec()),
        };
        let end = frame == Frame::StdinEnd;
        if frame.write_to(&mut writer).is_err() || end {
            return;
        }
    }
}

fn relay_output(stream: &mut UnixStream) -> Result<i32, InstanceError> {
    let (mut out, mut err) = (io::stdout(), io::stderr());
    loop {
        match Frame::read_from(stream) {
            Ok(Some(Frame::Stdout(data))) => {
                let _ = out.write_all(&data).and_then(|()| out.flush());
            }
            Ok(Some(Frame::Stderr(data))) => {
                let _ = err.write_all(&data);
            }
            Ok(Some(Frame::Exit(code))) => return Ok(code),
            Ok(Some(other)) => return Err(lost(format!("sent an unexpected {other:?}"))),
            Ok(None) => return Err(lost("ended before the command's exit status")),
            Err(e) => return Err(lost(format!("failed: {e}"))),
        }
    }
}
