//! The devices' state in a snapshot: what a virtio-mmio transport and its device (virtio 1.2
//! §4.2.2 registers, §2.7 split virtqueues) and a 16550A UART hold that the guest can see, as
//! plain serde structs.
//!
//! Restore rebuilds the *same* machine from the same configuration (the same devices in the
//! same order) and then puts each device's saved state back: the transport with
//! [`crate::devices::virtio::mmio::MmioTransport::restore`], which re-activates an active device
//! and hands it its [`DeviceState`]; a UART with
//! [`crate::devices::legacy::serial::Serial::restore`]. Guest memory must be in place first: an
//! active device's rings are checked against it.
//!
//! What survives of a vsock device ([`VsockState`]): only the connections to the monitor's
//! *internal* ports (cela-init's control, stdout and stderr channels), whose host end the new
//! monitor serves itself. Every other connection's host end is gone with the old monitor; the
//! guest gets a reset for each after restore.
//!
//! A saved state is hostile on restore (a snapshot can come from another host): every value is
//! checked, and a bad one is refused with a [`PersistError`] naming the device and the
//! problem, never a panic.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;
use vm_superio::serial::SerialState;

use super::PersistError;
use crate::devices::virtio::vsock::conn::State as ConnState;

/// Connections a vsock state may ask to reset after restore, at most: as many as the muxer
/// holds at once (`vsock::muxer::MAX_CONNECTIONS`).
pub const MAX_SAVED_RESETS: usize = 64;

/// A refusal of a saved `device` state for `problem`.
pub(crate) fn refused(device: impl Into<String>, problem: impl Into<String>) -> PersistError {
    PersistError::Device {
        device: device.into(),
        problem: problem.into(),
    }
}

/// One virtqueue (a serde mirror of `virtio_queue::QueueState`, §2.7): its sizes, the
/// device's positions in the rings, and where the rings lie in guest memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    /// Unchecked: `Queue::try_from` validates the result.
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio transport's registers (§4.2.2) and its device's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmioState {
    /// The device ID; a restore refuses another device's state.
    pub device_type: u32,
    pub device_features_select: u32,
    /// The features the driver accepted (both 32-bit halves).
    pub driver_features: u64,
    pub driver_features_select: u32,
    pub queue_select: u32,
    /// The device status (§2.1), without DEVICE_NEEDS_RESET (that is `needs_reset`).
    pub status: u32,
    pub config_generation: u32,
    /// The device was activated (the driver set DRIVER_OK and the device took the queues).
    pub active: bool,
    /// Pending interrupt causes (§4.2.2 InterruptStatus).
    pub interrupt_status: u32,
    pub needs_reset: bool,
    /// One per queue of the device, in order.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state; [`DeviceState::None`] unless `active`.
    pub device: DeviceState,
}

/// What a device keeps besides its queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceState {
    /// Nothing (an entropy, block or network device: their queues are their state).
    None,
    Vsock(VsockState),
}

impl DeviceState {
    /// What kind of device the state is for, in messages.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::None => "no",
            DeviceState::Vsock(_) => "vsock",
        }
    }
}

/// A vsock device's connections (see the module doc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VsockState {
    /// Connections to internal ports, carried over; at most one per internal port.
    pub connections: Vec<ConnSnapshot>,
    /// (host-side port, guest-side port) of every other connection the guest knows of: each
    /// gets a reset after restore. At most [`MAX_SAVED_RESETS`].
    pub reset: Vec<(u32, u32)>,
}

/// One vsock connection, all but its host end (see `vsock::conn::Connection`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnSnapshot {
    /// The port on the host side (CID 2).
    pub local_port: u32,
    /// The port on the guest side.
    pub peer_port: u32,
    pub guest_cid: u64,
    pub state: ConnState,
    pub need_request: bool,
    pub need_response: bool,
    pub need_credit_update: bool,
    pub need_rst: bool,
    /// SHUTDOWN flags still to be told to the guest.
    pub shutdown_to_send: u32,
    /// SHUTDOWN flags the guest sent.
    pub guest_shutdown: u32,
    pub host_eof: bool,
    pub host_write_shut: bool,
    /// Guest bytes the host end had not taken (at most `conn::BUF_ALLOC`).
    pub pending: Vec<u8>,
    pub rx_cnt: u32,
    pub fwd_cnt: u32,
    pub last_fwd_cnt_sent: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    pub tx_cnt: u32,
}

/// A 16550A UART's registers and receive FIFO (a serde mirror of `vm_superio`'s
/// `SerialState`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes received and not yet read by the guest (at most the FIFO's 64).
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    /// Unchecked: `vm_superio`'s `Serial::from_state` validates the FIFO.
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_state_converts_both_ways() {
        let q = QueueState {
            max_size: 256,
            next_avail: 7,
            next_used: 5,
            event_idx_enabled: true,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        let s = QueueSnapshot::from(q);
        assert_eq!(QueueState::from(&s), q);
    }

    #[test]
    fn serial_state_converts_both_ways() {
        let state = SerialState {
            scratch: 0x5a,
            line_control: 0x83,
            in_buffer: vec![1, 2, 3],
            ..SerialState::default()
        };
        let s = SerialSnapshot::from(state.clone());
        assert_eq!(SerialState::from(&s), state);
    }

    #[test]
    fn device_states_round_trip_through_json() {
        let states = [
            DeviceState::None,
            DeviceState::Vsock(VsockState {
                connections: vec![ConnSnapshot {
                    local_port: 1,
                    peer_port: 2,
                    guest_cid: 3,
                    state: ConnState::Established,
                    need_request: false,
                    need_response: true,
                    need_credit_update: false,
                    need_rst: false,
                    shutdown_to_send: 0,
                    guest_shutdown: 0,
                    host_eof: false,
                    host_write_shut: false,
                    pending: b"abc".to_vec(),
                    rx_cnt: 3,
                    fwd_cnt: 0,
                    last_fwd_cnt_sent: 0,
                    peer_buf_alloc: 4096,
                    peer_fwd_cnt: 0,
                    tx_cnt: 0,
                }],
                reset: vec![(5, 6)],
            }),
        ];
        for s in states {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<DeviceState>(&json).unwrap(), s);
        }
        assert!(serde_json::from_str::<DeviceState>(r#"{"kind":"gpu"}"#).is_err());
    }
}
