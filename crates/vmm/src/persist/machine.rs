//! A whole machine of cela's KVM engine written down and brought back: the state file (every
//! vCPU, the VM's interrupt controllers, PIT and clock, the two UARTs and every virtio-mmio
//! transport with its device) as one JSON document, and guest RAM as a separate file of its
//! own, so that a restore maps it instead of reading it.
//!
//! Saving ([`MachineSaver`]): the machine's [`Gate`] is closed, the vCPUs are kicked out of
//! `KVM_RUN`, each completes its pending I/O, saves itself and parks; the device event loop
//! parks too. With nothing running, the devices, the VM (its clock last) and guest RAM are
//! written; the gate then opens (`--leave-running`) or the machine is stopped.
//!
//! Restoring ([`crate::builder::restore_linux`]) builds the same machine from the same
//! configuration (devices in the same order, same slots), maps the memory file privately
//! (copy-on-write: pages are read from the file when first touched and never written back,
//! so one file serves any number of restores), and puts every part's state back: vCPUs, then
//! the VM's interrupt controllers, then the devices (whose interrupts may be raised again),
//! the clock last.
//!
//! The state file is input to be distrusted (a snapshot may come from another host): it is
//! read bounded ([`MAX_STATE_BYTES`]), its shape is checked against the machine being built,
//! and each part checks its own values ([`super::devices`]).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::PersistError;
use super::devices::{MmioState, SerialSnapshot};
use super::vcpu::VcpuState;
use super::vm::VmState;
use crate::devices::bus::lock;
use crate::devices::legacy::serial::Serial;
use crate::devices::virtio::mmio::MmioTransport;
use crate::stop::StopSignal;
use crate::vstate::pause::Gate;
use crate::vstate::vcpu::SavedVcpus;
use crate::vstate::vm::Vm;

/// The state format this monitor writes and reads.
pub const STATE_FORMAT: u32 = 1;
/// The largest state file read: the vCPUs' XSAVE areas and MSRs, the devices' registers and
/// the few bytes of the init's connections take far less.
pub const MAX_STATE_BYTES: u64 = 16 << 20;
/// How long the machine's threads have to park once asked.
const PAUSE_BOUND: Duration = Duration::from_secs(5);

/// What a machine was, but for its RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub format: u32,
    /// Guest RAM in bytes: the size of the memory file.
    pub memory_size: u64,
    /// The guest's init had said it was up (it does not say it again after a restore).
    #[serde(default)]
    pub guest_ready: bool,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    /// COM1 then COM2.
    pub serials: Vec<SerialSnapshot>,
    /// The virtio-mmio transports (with their devices), in slot order.
    pub virtio: Vec<MmioState>,
}

impl MachineState {
    /// Reads a state file, at most [`MAX_STATE_BYTES`] of it.
    pub fn read(file: &File) -> Result<MachineState, PersistError> {
        let mut bytes = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| PersistError::Incompatible(format!("reading the state file: {e}")))?;
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(PersistError::Incompatible(format!(
                "the state file is larger than {} MiB",
                MAX_STATE_BYTES >> 20
            )));
        }
        let state: MachineState = serde_json::from_slice(&bytes)
            .map_err(|e| PersistError::Incompatible(format!("the state file: {e}")))?;
        if state.format != STATE_FORMAT {
            return Err(PersistError::Incompatible(format!(
                "the state file has format {} and this monitor reads {STATE_FORMAT}",
                state.format
            )));
        }
        Ok(state)
    }

    /// Checks that the state is of a machine like the one `vcpus`, `memory_size`, `serials` and
    /// `virtio` describe (what the configuration builds), before any part is restored.
    pub fn check_shape(
        &self,
        vcpus: u32,
        memory_size: u64,
        serials: usize,
        virtio: usize,
    ) -> Result<(), PersistError> {
        let differ = |what: &str, saved: String, here: String| {
            Err(PersistError::Incompatible(format!(
                "the saved machine has {saved} {what} and this one {here}"
            )))
        };
        if self.vcpus.len() != vcpus as usize {
            return differ("vCPUs", self.vcpus.len().to_string(), vcpus.to_string());
        }
        if self.memory_size != memory_size {
            return differ(
                "bytes of RAM",
                self.memory_size.to_string(),
                memory_size.to_string(),
            );
        }
        if self.serials.len() != serials {
            return differ("UARTs", self.serials.len().to_string(), serials.to_string());
        }
        if self.virtio.len() != virtio {
            return differ(
                "virtio devices",
                self.virtio.len().to_string(),
                virtio.to_string(),
            );
        }
        Ok(())
    }
}

/// How big the two files of a save came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub state_bytes: u64,
    pub memory_bytes: u64,
}

/// The parts of a running machine a snapshot reads, shared with whoever takes it (the
/// monitor's control thread) while the machine's own threads run it.
pub struct MachineSaver {
    pub(crate) gate: Arc<Gate>,
    pub(crate) saved: Arc<SavedVcpus>,
    pub(crate) vcpus: u32,
    pub(crate) stop: Arc<StopSignal>,
    pub(crate) vm: Arc<Vm>,
    pub(crate) serials: Vec<Arc<Mutex<Serial>>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Wakes the device event loop, which then parks at the gate.
    pub(crate) device_waker: Option<EventFd>,
}

impl MachineSaver {
    /// Stops every vCPU and the device loop at the gate (if they are not stopped already),
    /// then has the vCPUs save themselves; their saved states. Requests to the guest are held
    /// meanwhile (one sent now would be saved with the machine and reach every copy). A
    /// machine that could not be stopped runs on; one that stopped but could not be saved
    /// stays paused until [`MachineSaver::resume`] or [`MachineSaver::end`].
    pub fn pause(&self) -> Result<Vec<VcpuState>, PersistError> {
        if self.stop.is_requested() || self.gate.is_released() {
            return Err(PersistError::Incompatible("the machine is stopping".into()));
        }
        if !self.gate.is_closed() {
            self.stop.hold_requests(true);
            self.gate.close();
            self.stop.request_kick();
            if let Some(w) = &self.device_waker {
                let _ = w.write(1);
            }
            let threads = self.vcpus as usize + usize::from(self.device_waker.is_some());
            if !self.gate.wait_parked(threads, PAUSE_BOUND) {
                self.resume();
                return Err(PersistError::Incompatible(format!(
                    "the machine's threads did not pause within {PAUSE_BOUND:?}"
                )));
            }
        }
        self.saved.clear();
        self.gate.request_save();
        if !self.gate.wait_saved(self.vcpus as usize, PAUSE_BOUND) {
            return Err(PersistError::Incompatible(format!(
                "the vCPUs did not save their state within {PAUSE_BOUND:?}"
            )));
        }
        self.saved
            .take(self.vcpus)
            .map_err(PersistError::Incompatible)
    }

    /// Sends `requests` to the guest's init (now, or when its control channel is back); false
    /// if it cannot take them now (the machine is paused, or the channel is full).
    pub fn send_to_guest(&self, requests: Vec<cela_guest::HostRequest>) -> bool {
        self.stop.send_when_attached(requests)
    }

    /// Whether the machine is still held at the gate (it was not stopped meanwhile, which
    /// lets its threads go).
    pub fn is_paused(&self) -> bool {
        self.gate.is_closed() && !self.gate.is_released() && !self.stop.is_requested()
    }

    /// Writes a paused machine: its state (with `vcpus`, from [`MachineSaver::pause`]) to
    /// `state`, its RAM to `memory` (sparse: runs of zero bytes are holes). Both files are
    /// synced.
    pub fn save(
        &self,
        vcpus: Vec<VcpuState>,
        state: &File,
        memory: &File,
    ) -> Result<Saved, PersistError> {
        let io = |what: &'static str| {
            move |e: std::io::Error| PersistError::Incompatible(format!("writing {what}: {e}"))
        };
        let serials = self.serials.iter().map(|s| lock(s).save()).collect();
        let virtio = self.transports.iter().map(|t| lock(t).save()).collect();
        // The clock last: the devices and vCPUs are read at its moment or before.
        let vm = VmState::save(self.vm.fd(), self.vm.has_irqchip())?;
        let memory_bytes = crate::vstate::memory::save_guest_memory(self.vm.memory(), memory)
            .map_err(io("guest memory"))?;
        // A stop while the files were written let the threads go: what was read is not one
        // moment's.
        if !self.is_paused() {
            return Err(PersistError::Incompatible(
                "the machine stopped while it was being saved".into(),
            ));
        }
        let machine = MachineState {
            format: STATE_FORMAT,
            memory_size: memory_bytes,
            guest_ready: self.stop.ready_at().is_some(),
            vcpus,
            vm,
            serials,
            virtio,
        };
        let mut out = BufWriter::with_capacity(1 << 16, state);
        serde_json::to_writer(&mut out, &machine)
            .map_err(|e| PersistError::Incompatible(format!("writing the state: {e}")))?;
        out.flush().map_err(io("the state"))?;
        drop(out);
        state.sync_all().map_err(io("the state"))?;
        memory.sync_all().map_err(io("guest memory"))?;
        let state_bytes = state.metadata().map_err(io("the state"))?.len();
        Ok(Saved {
            state_bytes,
            memory_bytes,
        })
    }

    /// Lets the paused machine run on.
    pub fn resume(&self) {
        self.gate.open();
        self.stop.hold_requests(false);
    }

    /// Ends the paused machine: it stops as saved (the guest never runs again here).
    pub fn end(&self) {
        self.stop.request(crate::stop::StopReason::Guest(
            crate::machine::GuestExit::Snapshotted,
        ));
        self.gate.release();
    }
}

/// Who a restored guest is now: what two copies of one snapshot must not share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Its host name (the new instance's).
    pub hostname: Option<String>,
    /// Its side of the new instance's `--net auto` link (another TAP, MAC and /30).
    pub net: Option<cela_guest::NetRequest>,
}

/// What a restored guest's init is told at once: the wall clock now, fresh random bytes for
/// its generator, its new host name if there is a valid one, and its new link if it has one.
pub fn restored_requests(who: &Identity) -> Vec<cela_guest::HostRequest> {
    use cela_guest::HostRequest;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut out = vec![HostRequest::Clock {
        secs: now.as_secs() as i64,
        nanos: now.subsec_nanos(),
    }];
    let mut seed = [0u8; cela_guest::ENTROPY_BYTES];
    match File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed)) {
        Ok(()) => out.push(HostRequest::Entropy(seed)),
        Err(e) => tracing::warn!("no fresh entropy for the restored guest: {e}"),
    }
    if let Some(h) = who.hostname.as_deref().and_then(cela_guest::Hostname::new) {
        out.push(HostRequest::Hostname(h));
    }
    out.extend(who.net.map(HostRequest::Network));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    fn empty(format: u32) -> MachineState {
        MachineState {
            format,
            memory_size: 64 << 20,
            guest_ready: true,
            vcpus: Vec::new(),
            vm: VmState {
                irqchip: None,
                clock: Default::default(),
            },
            serials: Vec::new(),
            virtio: Vec::new(),
        }
    }

    fn file_of(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f.rewind().unwrap();
        f
    }

    #[test]
    fn a_state_file_is_read_bounded_and_checked_against_the_machine() {
        let good = serde_json::to_vec(&empty(STATE_FORMAT)).unwrap();
        let state = MachineState::read(&file_of(&good)).unwrap();
        state.check_shape(0, 64 << 20, 0, 0).unwrap();
        let e = state
            .check_shape(1, 64 << 20, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 vCPUs and this one 1"), "{e}");
        let e = state
            .check_shape(0, 128 << 20, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes of RAM"), "{e}");
        let e = state
            .check_shape(0, 64 << 20, 2, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 UARTs and this one 2"), "{e}");
        let e = state
            .check_shape(0, 64 << 20, 0, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("virtio devices"), "{e}");

        let other = serde_json::to_vec(&empty(STATE_FORMAT + 1)).unwrap();
        let e = MachineState::read(&file_of(&other))
            .unwrap_err()
            .to_string();
        assert!(e.contains("format 2 and this monitor reads 1"), "{e}");
        let e = MachineState::read(&file_of(b"{\"format\":1,"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the state file"), "{e}");
        // Past the bound: refused before it is parsed (spaces are valid JSON padding).
        let mut big = vec![b' '; MAX_STATE_BYTES as usize];
        big.extend_from_slice(&good);
        let e = MachineState::read(&file_of(&big)).unwrap_err().to_string();
        assert!(e.contains("larger than 16 MiB"), "{e}");
    }
}
