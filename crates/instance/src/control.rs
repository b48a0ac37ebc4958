//! The control socket of a microVM's supervisor, `control.sock` in the instance directory
//! (root's, 0600): requests that only the process holding the machine can carry out. One JSON
//! line in, one JSON line out, per connection. The only request so far is a snapshot
//! ([`crate::snapshot::take`]), which the supervisor makes whole, so a client that goes away
//! meanwhile changes nothing.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{InstanceError, IoContext};
use crate::record::Instance;
use crate::snapshot::{self, Machine, Manifest, SnapshotRequest};

/// The longest request read.
const MAX_REQUEST: u64 = 64 << 10;
/// How long a client waits for a snapshot to be written.
pub const SNAPSHOT_BOUND: Duration = Duration::from_secs(600);

/// A request to the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Snapshot(SnapshotRequest),
}

/// Its answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Snapshot(Box<Manifest>),
    Error(String),
}

impl Instance {
    pub fn control_path(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
}

/// Held while a request is being answered: the supervisor takes it before it ends, so that a
/// snapshot that ends the machine still gets its answer out.
#[derive(Clone, Default)]
pub struct InFlight(std::sync::Arc<std::sync::Mutex<()>>);

impl InFlight {
    /// Waits for the request being answered, if any.
    pub fn settle(&self) {
        drop(self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Serves `inst`'s control socket on a thread for as long as the supervisor lives.
pub fn serve(
    data_dir: &Path,
    inst: &Instance,
    machine: Machine,
    busy: InFlight,
) -> Result<(), InstanceError> {
    let path = inst.control_path();
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).doing(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .doing(|| format!("making {} root's", path.display()))?;
    let (data_dir, inst) = (data_dir.to_owned(), inst.clone());
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            // One request at a time: a snapshot holds the machine anyway.
            for conn in listener.incoming() {
                let Ok(conn) = conn else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                let _answering = busy.0.lock().unwrap_or_else(|e| e.into_inner());
                answer(&data_dir, &inst, &machine, conn);
            }
        })
        .doing(|| "starting the control thread".into())?;
    Ok(())
}

fn answer(data_dir: &Path, inst: &Instance, machine: &Machine, conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let read = BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line);
    let reply = match read {
        Err(e) => Reply::Error(format!("reading the request: {e}")),
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Error(format!("malformed request: {e}")),
            Ok(Request::Snapshot(req)) => match snapshot::take(data_dir, inst, machine, &req) {
                Ok(m) => Reply::Snapshot(Box::new(m)),
                Err(e) => Reply::Error(e.to_string()),
            },
        },
    };
    let mut bytes = serde_json::to_vec(&reply).expect("a reply serializes");
    bytes.push(b'\n');
    let _ = (&conn).write_all(&bytes);
}

/// Sends `req` to the supervisor of `inst` and waits (up to `bound`) for its answer.
pub fn request(inst: &Instance, req: &Request, bound: Duration) -> Result<Reply, InstanceError> {
    let path = inst.control_path();
    let conn = UnixStream::connect(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => InstanceError::WrongState {
            name: inst.config.name.clone(),
            status: inst.state_or_unknown().status.to_string(),
            hint: "its machine is not running under a supervisor that takes snapshots (a running microVM does)",
        },
        _ => InstanceError::Io {
            what: format!("connecting to {}", path.display()),
            source: e,
        },
    })?;
    conn.set_read_timeout(Some(bound))
        .doing(|| "setting a timeout".into())?;
    let mut bytes = serde_json::to_vec(req).expect("a request serializes");
    bytes.push(b'\n');
    (&conn)
        .write_all(&bytes)
        .doing(|| format!("writing to {}", path.display()))?;
    let mut line = String::new();
    BufReader::new((&conn).take(4 << 20))
        .read_line(&mut line)
        .doing(|| format!("reading the answer on {}", path.display()))?;
    if line.is_empty() {
        return Err(InstanceError::Other(format!(
            "the supervisor of {} closed its control socket without answering (did the VM end?)",
            inst.config.name
        )));
    }
    serde_json::from_str(&line).map_err(|e| InstanceError::Corrupt {
        what: format!("the answer on {}", path.display()),
        why: e.to_string(),
    })
}
