//! Saving a running QEMU machine's state and starting a machine from one, with QEMU's own
//! migration: `migrate` to a file descriptor of ours, `-incoming defer` and `migrate-incoming`
//! from one. The state is QEMU's stream (`QEVM` …): guest RAM (zero pages cost nothing), CPUs,
//! devices, clocks. It is only ever fed back to a jailed QEMU of the same build (the caller
//! records [`QemuVersion`] and checks it).
//!
//! The stream goes through a pipe, never a file QEMU writes: the jail's file-size limit is the
//! largest disk's, and this side can then count, hash and place it. Facts of QEMU 7.2 this
//! follows (docs/TESTING.md): migration runs at 128 MiB/s unless told otherwise, even with the
//! machine stopped; a machine whose migration completed is left `postmigrate` and `cont`
//! resumes it (its disks are given with `file.locking=off`, or the re-activation fails); a
//! machine loaded from a stream comes up paused; a failed load ends QEMU with status 1.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::QemuError;
use super::qmp::{QemuVersion, Qmp, QmpError};
use crate::machine::GuestExit;
use crate::stop::{StopReason, StopSignal};

/// The migration speed asked for: as fast as the pipe takes it.
const MAX_BANDWIDTH: u64 = 100 << 30;
/// How long a save may go without a byte before it is given up.
const STALL: Duration = Duration::from_secs(60);
/// How long a load may take before it is given up (within `run::start`'s bound).
const LOAD_BOUND: Duration = Duration::from_secs(90);
/// How long a save may take in all.
const SAVE_BOUND: Duration = Duration::from_secs(600);
/// What a state may take beyond guest RAM (device state, ROMs, page headers).
pub const STATE_SLACK: u64 = 64 << 20;

/// A machine to start from a saved state rather than boot.
pub struct Incoming {
    /// QEMU's stream, as [`Paused::save_state`] wrote it.
    pub state: std::fs::File,
    /// The QEMU that wrote it; another one is refused before anything is loaded.
    pub expect: QemuVersion,
    /// Who the restored guest is now (the new instance).
    pub identity: crate::persist::machine::Identity,
}

/// The control-channel lines a restored guest gets at once (see
/// [`crate::persist::machine::restored_requests`]), after a bare newline that ends a line the
/// guest had half received when it was saved.
pub fn restored_requests(who: &crate::persist::machine::Identity) -> String {
    std::iter::once("\n".to_owned())
        .chain(
            crate::persist::machine::restored_requests(who)
                .into_iter()
                .map(|r| r.to_line()),
        )
        .collect()
}

fn qmp_err(e: QmpError) -> QemuError {
    QemuError::Migration(e.to_string())
}

/// Polls `query-migrate` until it is `completed` (or fails, or `bound` passes).
fn wait_completed(qmp: &Qmp, what: &str, bound: Duration) -> Result<(), QemuError> {
    let start = Instant::now();
    loop {
        let v = qmp.execute("query-migrate", None).map_err(qmp_err)?;
        match v.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = v
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("QEMU gave no reason");
                return Err(QemuError::Migration(format!(
                    "{what} failed: {}",
                    crate::jail::printable(why)
                )));
            }
            _ => {}
        }
        if start.elapsed() > bound {
            return Err(QemuError::Migration(format!(
                "{what} did not complete within {} s",
                bound.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Loads `incoming` into a QEMU started with `-incoming defer` (still paused afterwards).
pub(super) fn load(qmp: &Qmp, incoming: &Incoming) -> Result<(), QemuError> {
    let want = &incoming.expect;
    if *want != qmp.version {
        return Err(QemuError::Migration(format!(
            "the state was saved by QEMU {want}; this host has QEMU {}",
            qmp.version
        )));
    }
    qmp.execute_with_fd(
        "getfd",
        json!({"fdname": "incoming"}),
        incoming.state.as_fd(),
    )
    .map_err(qmp_err)?;
    qmp.execute("migrate-incoming", Some(json!({"uri": "fd:incoming"})))
        .map_err(qmp_err)?;
    wait_completed(qmp, "loading the saved state", LOAD_BOUND)
}

/// A running machine's handle for pausing and saving it. Cheap to clone; one pause at a time.
#[derive(Clone)]
pub struct QemuHandle {
    pub(super) qmp: Arc<Qmp>,
    pub(super) stop: Arc<StopSignal>,
    pub(super) busy: Arc<Mutex<()>>,
    /// The TSC rate the guest was told at boot (kHz).
    pub tsc_khz: u64,
    /// Guest RAM: what a saved state may hold, beyond [`STATE_SLACK`].
    pub(super) memory_mib: u64,
}

impl QemuHandle {
    /// The QEMU running the machine.
    pub fn version(&self) -> &QemuVersion {
        &self.qmp.version
    }

    /// Passes the guest the names of the instances on its networks (its `/etc/hosts`), once
    /// its init has said it is up (the control port drops what comes before it opens it).
    /// Refused if the machine stopped first, is paused for a save, or its channel is full.
    pub fn hosts(&self, entries: &[(std::net::Ipv4Addr, String)]) -> Result<(), QemuError> {
        if !self.stop.wait_ready() {
            return Err(QemuError::Migration("the machine is ending".into()));
        }
        let (block, refused) = cela_guest::HostRequest::hosts_block(entries);
        if !refused.is_empty() {
            tracing::warn!("names a guest cannot take, left out: {refused:?}");
        }
        if self.stop.send_when_attached(block) {
            Ok(())
        } else {
            Err(QemuError::Migration(
                "the guest cannot take its hosts file now".into(),
            ))
        }
    }

    /// Whether the machine is ending (or has ended).
    pub fn ended(&self) -> bool {
        self.stop.outcome().is_some()
    }

    /// Stops the guest's CPUs (QEMU drains and flushes the disks first). Refused while another
    /// pause holds the machine or once the machine is ending.
    pub fn pause(&self) -> Result<Paused<'_>, QemuError> {
        let guard = self
            .busy
            .try_lock()
            .map_err(|_| QemuError::Migration("the machine is being saved already".into()))?;
        if self.stop.outcome().is_some() {
            return Err(QemuError::Migration("the machine is ending".into()));
        }
        if self.stop.ready_at().is_none() {
            return Err(QemuError::Migration(
                "the guest has not finished booting (its init has not said it is ready)".into(),
            ));
        }
        self.stop.hold_requests(true);
        if let Err(e) = self.qmp.execute("stop", None) {
            self.stop.hold_requests(false);
            return Err(qmp_err(e));
        }
        Ok(Paused {
            h: self,
            _guard: guard,
            finished: false,
        })
    }
}

/// A paused machine: resumed when dropped unless [`Paused::resume`] or [`Paused::end`] said
/// otherwise, so a save that fails leaves it running as before.
pub struct Paused<'a> {
    h: &'a QemuHandle,
    _guard: MutexGuard<'a, ()>,
    finished: bool,
}

impl Paused<'_> {
    /// Writes the machine's state to `out`; returns its length. A failure (of QEMU, or of
    /// `out`) leaves the machine paused and able to go on.
    pub fn save_state(&mut self, out: &mut dyn Write) -> Result<u64, QemuError> {
        let qmp = &self.h.qmp;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": MAX_BANDWIDTH})),
        )
        .map_err(qmp_err)?;
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| QemuError::Setup {
                what: "the state's pipe",
                source: e.into(),
            })?;
        qmp.execute_with_fd("getfd", json!({"fdname": "snapshot"}), w.as_fd())
            .map_err(qmp_err)?;
        // QEMU holds its own copy now: ours must go, or the stream never ends.
        drop(w);
        if let Err(e) = qmp.execute("migrate", Some(json!({"uri": "fd:snapshot"}))) {
            let _ = qmp.execute("closefd", Some(json!({"fdname": "snapshot"})));
            return Err(qmp_err(e));
        }
        let mut r = std::fs::File::from(r);
        let limit = (self.h.memory_mib << 20) + STATE_SLACK;
        let copied = copy_bounded(&mut r, out, limit);
        // Whatever happened, QEMU's end sees EPIPE from now on rather than blocking.
        drop(r);
        let written = match copied {
            Ok(n) => n,
            Err(e) => {
                let _ = qmp.execute("migrate_cancel", None);
                let _ = wait_completed(qmp, "saving the state", Duration::from_secs(10));
                return Err(QemuError::Migration(format!("writing the state: {e}")));
            }
        };
        wait_completed(qmp, "saving the state", STALL)?;
        Ok(written)
    }

    /// Lets the machine run on.
    pub fn resume(mut self) -> Result<(), QemuError> {
        self.finished = true;
        self.h.cont()
    }

    /// Ends the machine as saved: the run ends with [`GuestExit::Snapshotted`].
    pub fn end(mut self) -> Result<(), QemuError> {
        self.finished = true;
        self.h
            .stop
            .request(StopReason::Guest(GuestExit::Snapshotted));
        // QEMU may close the monitor before it answers.
        match self.h.qmp.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(qmp_err(e)),
        }
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if !self.finished
            && let Err(e) = self.h.cont()
        {
            tracing::warn!("resuming the machine after a failed save: {e}");
        }
    }
}

impl QemuHandle {
    /// Resumes the machine; one that cannot be resumed is ended (a fault), never left frozen.
    fn cont(&self) -> Result<(), QemuError> {
        match self.qmp.execute("cont", None) {
            Ok(_) => {
                self.stop.hold_requests(false);
                Ok(())
            }
            Err(e) => {
                let why = format!("the machine could not be resumed after a save: {e}");
                self.stop.request(StopReason::Fault(why.clone()));
                Err(QemuError::Migration(why))
            }
        }
    }
}

/// Copies `r` to `w` until the end, giving up when nothing comes for [`STALL`], when it all
/// takes longer than [`SAVE_BOUND`], or past `limit` bytes.
fn copy_bounded(r: &mut std::fs::File, w: &mut dyn Write, limit: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let start = Instant::now();
    loop {
        if start.elapsed() > SAVE_BOUND {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the state took longer than {} s", SAVE_BOUND.as_secs()),
            ));
        }
        let mut pfd = [nix::poll::PollFd::new(
            r.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(STALL.as_millis()).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms)) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("QEMU sent nothing for {} s", STALL.as_secs()),
                ));
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        if total > limit {
            return Err(io::Error::other(format!(
                "the state is larger than the {limit} bytes a machine of this size can have"
            )));
        }
        w.write_all(&buf[..n])?;
    }
}
