//! The virtio network device (virtio 1.2 §5.1, device ID 1): an Ethernet NIC whose frames go
//! to and come from a host TAP device ([`crate::net::tap`]).
//!
//! Two queues (§5.1.2): `receiveq1` (index 0, device-writable buffers the device fills with
//! frames for the guest) and `transmitq1` (index 1, device-readable frames from the guest). No
//! control queue. Every frame in either direction starts with `struct virtio_net_hdr_v1`
//! (§5.1.6, 12 bytes: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
//! num_buffers); the TAP device uses the same header (IFF_VNET_HDR), so offload metadata
//! passes through untouched.
//!
//! Features offered: MAC (config space: the address), CSUM / GUEST_CSUM (partial checksums each
//! way), HOST_TSO4/6 (the guest may send TCP segments up to 64 KiB; the host kernel segments
//! them), GUEST_TSO4/6 (the device may deliver such segments, enabled on the TAP with
//! TUNSETOFFLOAD from what the driver accepted) and MRG_RXBUF (§5.1.6.3.2: a received frame may
//! span several receive buffers, counted in `num_buffers`).
//!
//! Receiving (§5.1.6.4) is driven by the TAP's fd on the device event loop, edge-triggered: the
//! device reads frames until the TAP has none left. A frame that finds no receive buffer waits
//! (one frame, in [`Net`]) until the driver adds buffers and notifies the receive queue; the
//! chains taken for one frame are published to the used ring together, so the driver never
//! sees part of a merged frame. Transmitting (§5.1.6.2) runs on queue notifications, with
//! notifications suppressed while the device drains the queue (§2.7.10). VIRTIO_F_EVENT_IDX
//! (§2.7.7.2, §2.7.10.2) is offered: the driver says after which used index it wants the next
//! interrupt, and the device after which available index it wants the next notification.
//!
//! The guest is not trusted. Transmit chains must be device-readable, hold a header and at
//! most [`MAX_PACKET`] bytes, and ask only for offloads that were negotiated; receive chains
//! must be device-writable with the header in their first descriptor. A bad transmit chain is
//! returned unsent; a bad receive chain is returned empty and the frame dropped; a frame that
//! cannot fit the guest's buffers is dropped. Each case is counted ([`NetStats`]), none stops
//! the VMM. Without EVENT_IDX, interrupts honour VRING_AVAIL_F_NO_INTERRUPT (§2.7.7), which
//! Linux sets while it polls the rings (NAPI).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::{ActivateError, ActiveDevice, VirtioDevice, read_config_bytes};
use crate::net::tap::{Tap, VNET_HDR_LEN};

/// The size offered for each queue.
const QUEUE_SIZE: u16 = 256;
/// Queue indexes (§5.1.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// The largest Ethernet frame either way: a 64 KiB TSO segment (the IP length field's limit)
/// plus the Ethernet and VLAN headers.
pub const MAX_FRAME: usize = 65535 + 14 + 4;
/// The largest packet on a queue or the TAP: header plus frame.
pub const MAX_PACKET: usize = VNET_HDR_LEN + MAX_FRAME;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: u64 = 10;
/// The token of the TAP's fd on the event loop.
const TAP_TOKEN: u32 = 0;
/// Size of the configuration space: `mac` and `status` (§5.1.4).
const CONFIG_LEN: usize = 8;

/// Where frames go and come from: a TAP device, or a test double.
pub trait FrameIo: Send {
    /// Reads one packet (header and frame) into `buf`; `WouldBlock` when none waits.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one packet: the virtio-net header (the device's own checked copy), then the
    /// frame, in pieces of guest memory.
    fn send(&mut self, header: &[u8], frame: &[VolatileSlice<'_>]) -> io::Result<usize>;
    /// Sets the offloads (TUN_F_*) the guest accepts on received frames.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// The fd the event loop waits on, if any.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

impl FrameIo for Arc<Tap> {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
    fn send(&mut self, header: &[u8], frame: &[VolatileSlice<'_>]) -> io::Result<usize> {
        self.write_guest(header, frame)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags).map_err(io::Error::other)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// What the device did with frames, for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames that fit no receive buffers (too big for them) and were dropped.
    pub rx_dropped: u64,
    /// Receive chains that were not usable (read-only, header split, outside memory).
    pub rx_malformed: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Transmit chains returned unsent: not readable, too short or too long, or asking for an
    /// offload that was not negotiated.
    pub tx_malformed: u64,
    /// Frames the host refused.
    pub tx_errors: u64,
}

/// What became of one received frame.
enum Delivery {
    Delivered,
    /// No receive buffers now; keep the frame and retry when the driver adds some.
    NoRoom,
    /// The frame is dropped; the buffers stay with the device for the next one.
    TooBig,
    /// A receive chain was malformed; it was returned empty and the frame dropped.
    Malformed,
    /// The used ring cannot be written: the device needs a reset.
    Broken,
}

/// A virtio network device on a [`FrameIo`] (a TAP device in a real machine).
pub struct Net<T: FrameIo = Arc<Tap>> {
    io: T,
    config: [u8; CONFIG_LEN],
    active: Option<ActiveDevice>,
    /// A frame read from the host and not yet delivered (its length; 0: none).
    rx_pending: usize,
    rx_buf: Vec<u8>,
    /// Chains taken for the frame being delivered: (head, bytes written).
    rx_used: Vec<(u16, u32)>,
    stats: NetStats,
}

impl<T: FrameIo> Net<T> {
    pub fn new(io: T, mac: [u8; 6]) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        Net {
            io,
            config,
            active: None,
            rx_pending: 0,
            rx_buf: vec![0; MAX_PACKET],
            rx_used: Vec::new(),
            stats: NetStats::default(),
        }
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The TUN_F_* offloads matching what the driver accepted.
    fn tap_offloads(acked: u64) -> u32 {
        let has = |f: u32| acked & (1 << f) != 0;
        let mut flags = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
        }
        flags
    }

    /// Sends every frame the driver made available on the transmit queue.
    fn process_tx(&mut self, active: &mut ActiveDevice) {
        let ActiveDevice {
            mem,
            queues,
            interrupt,
            acked_features,
        } = active;
        let Some(queue) = queues.get_mut(TX_QUEUE) else {
            return;
        };
        let old_used = queue.next_used();
        let mut used_any = false;
        loop {
            let _ = queue.disable_notification(mem);
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                self.send_frame(mem, chain, *acked_features);
                if let Err(e) = queue.add_used(mem, head, 0) {
                    tracing::warn!("virtio-net: cannot return a transmit buffer: {e}");
                    interrupt.set_needs_reset();
                    return;
                }
                used_any = true;
            }
            // More may have arrived while notifications were off (§2.7.10).
            if !queue.enable_notification(mem).unwrap_or(false) {
                break;
            }
        }
        if used_any && wants_interrupt(queue, mem, old_used) {
            interrupt.signal_used_queue();
        }
    }

    /// Checks one transmit chain and hands it to the host if it is well-formed: the header is
    /// copied out (so the guest cannot change it after the check), the frame goes from guest
    /// memory to the TAP without a copy.
    fn send_frame(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        acked: u64,
    ) {
        let mut header = [0u8; VNET_HDR_LEN];
        let mut have = 0usize;
        let mut total = 0usize;
        let mut body = Vec::with_capacity(4);
        for desc in chain {
            let mut len = desc.len() as usize;
            total += len;
            if desc.is_write_only() || total > MAX_PACKET {
                self.stats.tx_malformed += 1;
                return;
            }
            let mut addr = desc.addr();
            if have < VNET_HDR_LEN {
                let n = (VNET_HDR_LEN - have).min(len);
                if mem.read_slice(&mut header[have..have + n], addr).is_err() {
                    self.stats.tx_malformed += 1;
                    return;
                }
                have += n;
                len -= n;
                addr = addr.unchecked_add(n as u64);
            }
            if len > 0 {
                match mem.get_slice(addr, len) {
                    Ok(slice) => body.push(slice),
                    Err(_) => {
                        self.stats.tx_malformed += 1;
                        return;
                    }
                }
            }
        }
        if have < VNET_HDR_LEN || !tx_header_allowed(&header, acked) {
            self.stats.tx_malformed += 1;
            return;
        }
        match self.io.send(&header, &body) {
            Ok(_) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += (total - VNET_HDR_LEN) as u64;
            }
            Err(e) => {
                self.stats.tx_errors += 1;
                tracing::debug!("virtio-net: the host refused a frame: {e}");
            }
        }
    }

    /// Moves frames from the host to the guest until the host has none left or the guest has
    /// no room. The driver is interrupted as soon as it wants to be (after each frame, subject
    /// to its suppression), not only at the end, so it can take frames while more arrive.
    fn process_rx(&mut self, active: &mut ActiveDevice) {
        let mergeable = active.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let Some(mut old_used) = active.queues.get(RX_QUEUE).map(|q| q.next_used()) else {
            return;
        };
        loop {
            if self.rx_pending == 0 {
                match self.io.recv(&mut self.rx_buf) {
                    Ok(0) => break,
                    Ok(n) if n < VNET_HDR_LEN => {
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Ok(n) => self.rx_pending = n.min(MAX_PACKET),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("virtio-net: reading from the host failed: {e}");
                        break;
                    }
                }
            }
            let Some(queue) = active.queues.get_mut(RX_QUEUE) else {
                return;
            };
            let frame = &self.rx_buf[..self.rx_pending];
            let used = match deliver(queue, &active.mem, frame, mergeable, &mut self.rx_used) {
                Delivery::Delivered => {
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += (frame.len() - VNET_HDR_LEN) as u64;
                    self.rx_pending = 0;
                    true
                }
                Delivery::NoRoom => {
                    // Ask to be notified when buffers come (with EVENT_IDX that is not the
                    // default); retry at once if some came meanwhile.
                    if buffers_added_since(queue, &active.mem) {
                        continue;
                    }
                    break;
                }
                Delivery::TooBig => {
                    self.stats.rx_dropped += 1;
                    self.rx_pending = 0;
                    false
                }
                Delivery::Malformed => {
                    self.stats.rx_malformed += 1;
                    self.rx_pending = 0;
                    true
                }
                Delivery::Broken => {
                    tracing::warn!("virtio-net: cannot return a receive buffer");
                    active.interrupt.set_needs_reset();
                    return;
                }
            };
            if used && wants_interrupt(queue, &active.mem, old_used) {
                active.interrupt.signal_used_queue();
                old_used = queue.next_used();
            }
        }
    }

    /// Reads and drops what the host sends while the guest has no driver (a NIC whose link is
    /// down), so stale frames are not delivered later.
    fn discard_host_frames(&mut self) {
        for _ in 0..4096 {
            match self.io.recv(&mut self.rx_buf) {
                Ok(n) if n > 0 => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => return,
            }
        }
    }
}

/// Whether the header of an outgoing packet asks only for what was negotiated: a partial
/// checksum (CSUM) and TCP segmentation (HOST_TSO4/6), nothing else.
fn tx_header_allowed(packet: &[u8], acked: u64) -> bool {
    let has = |f: u32| acked & (1 << f) != 0;
    let flags = u32::from(packet[0]);
    let gso = u32::from(packet[1]);
    let csum_ok = match flags {
        0 => true,
        VIRTIO_NET_HDR_F_NEEDS_CSUM => has(VIRTIO_NET_F_CSUM),
        _ => false,
    };
    let gso_ok = match gso {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        _ => false,
    };
    csum_ok && gso_ok
}

/// Whether the driver wants an interrupt now that the used index went from `old_used` to the
/// queue's current one (§2.7.7.2): with EVENT_IDX, when it passed the driver's `used_event`;
/// without, unless the driver set VRING_AVAIL_F_NO_INTERRUPT (Linux does while it polls).
fn wants_interrupt(queue: &Queue, mem: &GuestMemoryMmap, old_used: u16) -> bool {
    // The used-ring writes must be visible before the driver's fields are read.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        // used_event follows the avail ring's `size` entries.
        let at = avail.checked_add(4 + 2 * u64::from(queue.size()));
        let Some(used_event) = at.and_then(|a| mem.read_obj::<u16>(a).ok()) else {
            return true;
        };
        let new = queue.next_used();
        return new.wrapping_sub(u16::from_le(used_event)).wrapping_sub(1)
            < new.wrapping_sub(old_used);
    }
    let flags: u16 = mem.read_obj(avail).unwrap_or(0);
    u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
}

/// After a receive queue ran out of buffers: asks the driver to notify when it adds some,
/// then tells whether it already did, so that no addition is missed between the failed
/// attempt and the request. With EVENT_IDX the request is `avail_event` set to the driver's
/// current index — not the device's next one, which may lag behind when a merged frame found
/// some buffers but not enough: then no later addition would pass it, and no kick come.
fn buffers_added_since(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    let Ok(seen) = queue.avail_idx(mem, Ordering::Acquire) else {
        return false;
    };
    if queue.event_idx_enabled() {
        // avail_event follows the used ring's `size` elements.
        let at = GuestAddress(queue.used_ring()).checked_add(4 + 8 * u64::from(queue.size()));
        if let Some(at) = at {
            let _ = mem.write_obj(seen.0.to_le(), at);
        }
    } else {
        let _ = queue.enable_notification(mem);
    }
    fence(Ordering::SeqCst);
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|now| now != seen)
}

/// Copies `frame` (header first) into the next receive chains: one chain, or with `mergeable`
/// as many as it takes, then publishes them at once with `num_buffers` set. `used` is scratch
/// space.
fn deliver(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &[u8],
    mergeable: bool,
    used: &mut Vec<(u16, u32)>,
) -> Delivery {
    let start = queue.next_avail();
    used.clear();
    let mut offset = 0usize;
    let mut header_at: Option<GuestAddress> = None;
    while offset < frame.len() {
        if used.len() >= usize::from(queue.size()) {
            queue.set_next_avail(start);
            return Delivery::TooBig;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            queue.set_next_avail(start);
            return Delivery::NoRoom;
        };
        let head = chain.head_index();
        let mut written = 0u32;
        let mut malformed = false;
        for desc in chain {
            if !desc.is_write_only() {
                malformed = true;
                break;
            }
            if header_at.is_none() {
                if (desc.len() as usize) < VNET_HDR_LEN {
                    malformed = true;
                    break;
                }
                header_at = Some(desc.addr());
            }
            let n = (desc.len() as usize).min(frame.len() - offset);
            if mem
                .write_slice(&frame[offset..offset + n], desc.addr())
                .is_err()
            {
                malformed = true;
                break;
            }
            offset += n;
            written += n as u32;
            if offset == frame.len() {
                break;
            }
        }
        if malformed {
            // The frame fails: every chain taken for it goes back empty.
            for entry in used.iter_mut() {
                entry.1 = 0;
            }
            used.push((head, 0));
            return match publish(queue, mem, used) {
                Ok(()) => Delivery::Malformed,
                Err(()) => Delivery::Broken,
            };
        }
        used.push((head, written));
        if !mergeable && offset < frame.len() {
            queue.set_next_avail(start);
            return Delivery::TooBig;
        }
    }
    let Some(header) = header_at else {
        return Delivery::TooBig;
    };
    let count = used.len() as u16;
    let ok = header
        .checked_add(NUM_BUFFERS_OFFSET)
        .is_some_and(|a| mem.write_obj(count.to_le(), a).is_ok());
    if !ok {
        return Delivery::Broken;
    }
    match publish(queue, mem, used) {
        Ok(()) => Delivery::Delivered,
        Err(()) => Delivery::Broken,
    }
}

/// Puts `used` (head, length) entries in the used ring and only then advances its index, so
/// the driver sees them all at once (§2.7.8).
fn publish(queue: &mut Queue, mem: &GuestMemoryMmap, used: &[(u16, u32)]) -> Result<(), ()> {
    let size = queue.size();
    let next = queue.next_used();
    let ring = GuestAddress(queue.used_ring());
    for (i, &(head, len)) in used.iter().enumerate() {
        if head >= size {
            return Err(());
        }
        let slot = u64::from(next.wrapping_add(i as u16) % size);
        let elem = ring.checked_add(4 + 8 * slot).ok_or(())?;
        mem.write_obj(u32::from(head).to_le(), elem)
            .map_err(|_| ())?;
        mem.write_obj(len.to_le(), elem.unchecked_add(4))
            .map_err(|_| ())?;
    }
    let new = next.wrapping_add(used.len() as u16);
    let idx = ring.checked_add(2).ok_or(())?;
    mem.store(new.to_le(), idx, Ordering::Release)
        .map_err(|_| ())?;
    queue.set_next_used(new);
    Ok(())
}

impl<T: FrameIo + 'static> VirtioDevice for Net<T> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
        ]
        .iter()
        .fold(0, |acc, f| acc | (1u64 << f))
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, mut active: ActiveDevice) -> Result<(), ActivateError> {
        active.require_queues(2)?;
        let event_idx = active.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for queue in &mut active.queues {
            queue.set_event_idx(event_idx);
        }
        let offloads = Self::tap_offloads(active.acked_features);
        if let Err(e) = self.io.set_offload(offloads) {
            // The host then sends plain frames, which every driver takes.
            tracing::warn!("virtio-net: cannot enable receive offloads: {e}");
        }
        self.rx_pending = 0;
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_pending = 0;
        let _ = self.io.set_offload(0);
    }

    fn saved_queues(&self) -> Vec<virtio_queue::QueueState> {
        super::active_queue_states(self.active.as_ref())
    }

    fn process_queue(&mut self, index: usize) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        match index {
            RX_QUEUE => self.process_rx(&mut active),
            TX_QUEUE => self.process_tx(&mut active),
            _ => {}
        }
        self.active = Some(active);
    }

    fn host_fds(&self) -> Vec<(RawFd, u32)> {
        self.io
            .raw_fd()
            .map(|fd| (fd, TAP_TOKEN))
            .into_iter()
            .collect()
    }

    fn process_host_event(&mut self, token: u32) {
        if token != TAP_TOKEN {
            return;
        }
        match self.active.take() {
            Some(mut active) => {
                self.process_rx(&mut active);
                self.active = Some(active);
            }
            None => self.discard_host_frames(),
        }
    }
}

#[cfg(test)]
mod tests;
