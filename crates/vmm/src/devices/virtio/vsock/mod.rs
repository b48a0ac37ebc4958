//! The virtio socket device (virtio 1.2 §5.10, device ID 19): stream connections between
//! programs in the guest (`AF_VSOCK` sockets) and programs on the host, with no network.
//!
//! # The protocol
//!
//! Every endpoint is a (context ID, port) pair. The host is CID 2; the guest's CID is in the
//! device configuration space (`le64 guest_cid`, §5.10.4; cela uses 3 unless told otherwise).
//! The device has three queues (§5.10.2): `rx` (0), buffers the driver gives the device to fill
//! with packets for the guest; `tx` (1), packets from the guest; `event` (2), device events
//! (cela sends none).
//!
//! A packet is a 44-byte header ([`packet::Header`]) and, for RW, `len` bytes of data. A
//! connection is a little state machine driven by the ops (§5.10.6.2–6):
//!
//! ```text
//! guest                             host (this device)
//!   REQUEST  (src=3:P, dst=2:Q) ──▶    connect the host end of port Q
//!            ◀── RESPONSE            or RST if nothing is there
//!   RW data  ──▶  ◀── RW data        each side within the other's credit
//!   CREDIT_REQUEST ──▶ ◀── CREDIT_UPDATE
//!   SHUTDOWN (RCV/SEND flags) ──▶    half-close; both flags: closing
//!            ◀── RST                 the connection is gone
//! ```
//!
//! Host-initiated connections run the same handshake the other way (the device sends REQUEST,
//! the guest answers RESPONSE or RST).
//!
//! **Credit** (§5.10.6.3): each side announces in every header how much receive buffer it has
//! for the connection (`buf_alloc`) and how many bytes it has consumed so far (`fwd_cnt`, free
//! running). A sender may have at most `buf_alloc - (tx_cnt - fwd_cnt)` bytes in flight, so
//! neither side ever needs to drop data or buffer without bound; a side that needs fresh figures
//! sends CREDIT_REQUEST, and a receiver that freed space may send CREDIT_UPDATE unasked.
//! [`conn`] implements both directions.
//!
//! # The host side
//!
//! cela follows Firecracker's *hybrid* model (its `docs/vsock.md` describes the user-facing
//! behaviour; this is cela's own implementation): the host side of the device is one Unix
//! socket PATH (`--vsock PATH`). A guest connection to CID 2 port P is a connection to the Unix
//! socket `PATH_P`; a host process connecting to PATH writes `CONNECT <port>\n` and, once the
//! guest accepts, reads `OK <host port>\n` and then the stream. The monitor also registers
//! *internal* ports whose host end it serves itself (cela-init's status and output channel).
//! See [`muxer`].
//!
//! # Snapshots
//!
//! A snapshot carries the connections to the internal ports over to the new monitor (each gets
//! a new host end from its port's handler) and resets every other one, whose host end is gone
//! (see `persist::devices`). No TRANSPORT_RESET event is sent: Linux would drop every
//! connection on it, the carried ones too.
//!
//! The guest is hostile: packets with the wrong CIDs or impossible lengths are dropped; unknown
//! ops, other socket types, data beyond the credit or out of turn get a reset; the number of
//! connections and of everything queued is bounded. Nothing a guest sends stops the VMM.

pub mod conn;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::path::PathBuf;

use virtio_queue::{QueueOwnedT, QueueT};

pub use muxer::{HostSocket, PortHandler};
use packet::{HEADER_LEN, Header, Verdict};

use super::{ActivateError, ActiveDevice, VirtioDevice, read_config_bytes};
use crate::persist::PersistError;
use crate::persist::devices::{DeviceState, refused};

/// The device ID of a socket device (§5, 19).
const VIRTIO_ID_VSOCK: u32 = 19;
/// The queue size offered for each of the three queues.
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// The guest CID when none is asked for (the lowest a guest may have).
pub const DEFAULT_GUEST_CID: u64 = 3;

/// Why the vsock device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock socket {0}: already exists (remove it or choose another path)")]
    Exists(PathBuf),
    #[error("vsock socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the vsock device's epoll instance: {0}")]
    Epoll(std::io::Error),
}

/// A virtio-vsock device whose host side is the [`muxer::Muxer`].
pub struct Vsock {
    guest_cid: u64,
    muxer: muxer::Muxer,
    active: Option<ActiveDevice>,
    /// Scratch space for one packet's payload.
    payload: Vec<u8>,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`; `host` is the `--vsock` socket, if any, and
    /// `internal` the ports the monitor serves itself.
    pub fn new(
        guest_cid: u64,
        host: Option<HostSocket>,
        internal: Vec<(u32, PortHandler)>,
    ) -> Result<Self, VsockError> {
        Ok(Vsock {
            guest_cid,
            muxer: muxer::Muxer::new(guest_cid, host, internal)?,
            active: None,
            payload: Vec::new(),
        })
    }

    /// Reads every packet the guest placed in the tx queue.
    fn process_tx(&mut self) {
        let Vsock {
            guest_cid,
            muxer,
            active,
            payload,
        } = self;
        let Some(ActiveDevice {
            mem,
            queues,
            interrupt,
            ..
        }) = active
        else {
            return;
        };
        super::serve_queue("virtio-vsock", &mut queues[TX], mem, interrupt, |chain| {
            let Ok(mut reader) = chain.reader(mem) else {
                return 0;
            };
            let mut raw = [0u8; HEADER_LEN];
            if reader.read_exact(&mut raw).is_err() {
                return 0;
            }
            let header = Header::parse(&raw).expect("a whole header");
            tracing::trace!(
                "virtio-vsock: from the guest: op {} len {} {}→{}",
                header.op,
                header.len,
                header.src_port,
                header.dst_port
            );
            match header.check_from_guest(*guest_cid, reader.available_bytes()) {
                Verdict::Drop => {}
                Verdict::Reset => muxer.reject(&header),
                Verdict::Accept => {
                    payload.resize(header.len as usize, 0);
                    if reader.read_exact(payload).is_ok() {
                        muxer.guest_packet(&header, payload);
                    }
                }
            }
            0
        });
        muxer.flush_all();
    }

    /// Fills the guest's receive buffers with whatever the host side has for it.
    fn fill_rx(&mut self) {
        let Vsock {
            muxer,
            active,
            payload,
            ..
        } = self;
        let Some(ActiveDevice {
            mem,
            queues,
            interrupt,
            ..
        }) = active
        else {
            return;
        };
        let queue = &mut queues[RX];
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut writer) if writer.available_bytes() >= HEADER_LEN => {
                    let room = writer.available_bytes() - HEADER_LEN;
                    let Some(header) = muxer.next_packet(room, payload) else {
                        queue.go_to_previous_position();
                        break;
                    };
                    let ok = writer.write_all(&header.to_bytes()).is_ok()
                        && writer.write_all(payload).is_ok();
                    if !ok {
                        tracing::warn!("virtio-vsock: a receive buffer could not be written");
                    }
                    (HEADER_LEN + payload.len()) as u32
                }
                // Too small or not in guest memory: return it unused.
                _ => 0,
            };
            if let Err(e) = queue.add_used(&*mem, head, written) {
                tracing::warn!("virtio-vsock: cannot return a buffer: {e}");
                interrupt.set_needs_reset();
                return;
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(&*mem).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
    }

    /// Open connections (for tests and diagnostics).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn device_features(&self) -> u64 {
        // Stream sockets only: with no feature bits a driver assumes VIRTIO_VSOCK_F_STREAM.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, active: ActiveDevice) -> Result<(), ActivateError> {
        active.require_queues(3)?;
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }

    fn saved_queues(&self) -> Vec<virtio_queue::QueueState> {
        super::active_queue_states(self.active.as_ref())
    }

    /// The connections to internal ports, carried over, and the others, to be reset (see
    /// [`muxer::Muxer::save`]).
    fn save_state(&self) -> DeviceState {
        DeviceState::Vsock(self.muxer.save())
    }

    /// Carries the saved connections over to new host ends and queues the resets; they reach
    /// the guest as soon as it gives receive buffers (the transport kicks every queue after
    /// a restore). No TRANSPORT_RESET event is sent: Linux would reset every connection on
    /// it, the carried ones too.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::None => Ok(()),
            DeviceState::Vsock(s) => self
                .muxer
                .restore(s)
                .map_err(|problem| refused(super::device_name(VIRTIO_ID_VSOCK), problem)),
        }
    }

    fn process_queue(&mut self, index: usize) {
        self.muxer.attach_carried();
        match index {
            TX => {
                self.process_tx();
                self.fill_rx();
            }
            RX => self.fill_rx(),
            _ => {}
        }
    }

    fn host_fds(&self) -> Vec<(RawFd, u32)> {
        vec![(self.muxer.epoll_fd(), 0)]
    }

    fn process_host_event(&mut self, _token: u32) {
        // Also before activation: a host process may connect early; its REQUEST goes out
        // once the driver gives receive buffers.
        self.muxer.attach_carried();
        self.muxer.poll_host();
        self.fill_rx();
    }
}
