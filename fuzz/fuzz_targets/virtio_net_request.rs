//! Fuzzes the virtio-net device (virtio 1.2 §5.1) with guest-controlled descriptor tables for
//! both queues (arbitrary addresses, lengths, flags and `next` links, loops included), guest
//! memory contents (transmit headers and frames), the negotiated features, and frames of
//! arbitrary length and content arriving from the host. The device must never panic, must
//! return every transmit chain it pops, and must never return more receive chains than were
//! offered. Run: `cargo +nightly fuzz run virtio_net_request` in this directory.

#![no_main]

mod common;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use cela_vmm::devices::virtio::net::{FrameIo, Net, RX_QUEUE, TX_QUEUE};
use cela_vmm::devices::virtio::{ActiveDevice, Interrupt, VirtioDevice};
use common::{DESC_BYTES, descriptors, has_indirect};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::QueueT;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x4_0000;
const QUEUE_SIZE: u16 = 16;
/// The two queues' rings, and their used rings apart from the mock's (see virtio_blk_request).
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x2000;
const RX_USED: u64 = 0x8000;
const TX_USED: u64 = 0x9000;
/// Guest memory the fuzzer fills.
const DATA_START: u64 = 0x1_0000;

/// Frames from the host, given by the fuzzer; what the guest sends is dropped.
struct Host(VecDeque<Vec<u8>>);

impl FrameIo for Host {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .0
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn send(&mut self, header: &[u8], frame: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let mut sink = vec![0u8; 4096];
        let mut n = header.len();
        for piece in frame {
            n += piece.copy_to(&mut sink[..]);
        }
        Ok(n)
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let [features, rx_count, tx_count, frames, rest @ ..] = data else {
        return;
    };
    let rx_count = usize::from(*rx_count) % usize::from(QUEUE_SIZE);
    let tx_count = usize::from(*tx_count) % usize::from(QUEUE_SIZE);
    let frame_count = usize::from(*frames % 8);
    if rest.len() < (rx_count + tx_count) * DESC_BYTES + 2 * frame_count {
        return;
    }
    let (rx_table, rest) = rest.split_at(rx_count * DESC_BYTES);
    let (tx_table, rest) = rest.split_at(tx_count * DESC_BYTES);
    let (lengths, contents) = rest.split_at(2 * frame_count);
    // Host frames: each a length (up to beyond the largest packet) of bytes from `contents`.
    let host: VecDeque<Vec<u8>> = lengths
        .chunks_exact(2)
        .map(|l| {
            let len = usize::from(u16::from_le_bytes([l[0], l[1]])) + usize::from(l[0] & 3) * 4096;
            (0..len)
                .map(|i| contents.get(i % contents.len().max(1)).copied().unwrap_or(0))
                .collect()
        })
        .collect();

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RX_RING), QUEUE_SIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TX_RING), QUEUE_SIZE);
    let descs = |table| descriptors(table, DATA_START, MEM_SIZE as u64);
    let (rx_descs, tx_descs) = (descs(rx_table), descs(tx_table));
    if rx.add_desc_chains(&rx_descs, 0).is_err() || tx.add_desc_chains(&tx_descs, 0).is_err() {
        return;
    }
    let n = contents.len().min(MEM_SIZE - DATA_START as usize);
    mem.write_slice(&contents[..n], GuestAddress(DATA_START))
        .unwrap();
    let mut rx_queue: virtio_queue::Queue = rx.create_queue().unwrap();
    rx_queue.set_used_ring_address(Some(RX_USED as u32), Some(0));
    let mut tx_queue: virtio_queue::Queue = tx.create_queue().unwrap();
    tx_queue.set_used_ring_address(Some(TX_USED as u32), Some(0));

    let mut net = Net::new(Host(host), [2, 0, 0, 0, 0, 1]);
    // Bit 0: merged receive buffers; bit 1: the guest's offloads (CSUM, HOST_TSO4/6);
    // bit 2: the host's (GUEST_CSUM, GUEST_TSO4/6).
    let pick = |bit: u8, flags: &[u32]| -> u64 {
        if features & (1 << bit) == 0 {
            return 0;
        }
        flags.iter().fold(0, |acc, f| acc | (1u64 << f))
    };
    let acked = pick(0, &[VIRTIO_NET_F_MRG_RXBUF])
        | pick(1, &[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6])
        | pick(2, &[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6]);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    net.activate(ActiveDevice {
        mem: mem.clone(),
        queues: vec![rx_queue, tx_queue],
        acked_features: acked,
        interrupt: interrupt.clone(),
    })
    .unwrap();
    net.process_queue(TX_QUEUE);
    net.process_host_event(0);
    net.process_queue(RX_QUEUE);

    // An indirect table comes from guest memory, so it can point the device's writes at the
    // rings themselves; then only "no panic" holds.
    if has_indirect(&rx_descs) || has_indirect(&tx_descs) {
        return;
    }
    let idx = |addr: u64| -> u16 { mem.read_obj(GuestAddress(addr).unchecked_add(2)).unwrap() };
    let tx_avail = idx(tx.avail_addr().0);
    assert_eq!(idx(TX_USED), tx_avail, "every transmit chain is returned");
    let rx_avail = idx(rx.avail_addr().0);
    assert!(idx(RX_USED) <= rx_avail, "no more receive chains used than offered");
    assert!(!interrupt.needs_reset());
});
