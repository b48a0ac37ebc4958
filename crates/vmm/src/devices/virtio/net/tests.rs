//! Unit tests of the network device against `virtio-queue`'s mock split queues and an
//! in-memory frame source/sink in place of the TAP: both directions, merged receive buffers,
//! a guest with no room, and the ways a hostile driver can get a chain wrong.

use super::*;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::Interrupt;

const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x4000;
const BUFS: u64 = 0x1_0000;
const R: bool = false;
const W: bool = true;
const MAC: [u8; 6] = [0x02, 0xce, 0x1a, 1, 2, 3];

/// The host side: frames waiting for the guest, frames the guest sent, the offloads set.
#[derive(Default)]
struct Host {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    offload: Option<u32>,
    refuse: bool,
}

#[derive(Clone, Default)]
struct MockIo(Arc<Mutex<Host>>);

impl FrameIo for MockIo {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut host = self.0.lock().unwrap();
        let frame = host
            .to_guest
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn send(&mut self, header: &[u8], frame: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let mut host = self.0.lock().unwrap();
        if host.refuse {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut packet = header.to_vec();
        for piece in frame {
            let start = packet.len();
            packet.resize(start + piece.len(), 0);
            piece.copy_to(&mut packet[start..]);
        }
        let n = packet.len();
        host.from_guest.push(packet);
        Ok(n)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.0.lock().unwrap().offload = Some(flags);
        Ok(())
    }
}

const ALL: u64 = (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_RING_F_EVENT_IDX);

struct Setup<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    net: Net<MockIo>,
    host: MockIo,
    interrupt: Arc<Interrupt>,
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// Raw descriptors for `chains` (each a list of (address, length, device-writable)), numbered
/// from `first`.
fn descriptors(chains: &[&[(u64, u32, bool)]], first: u16) -> Vec<RawDescriptor> {
    let mut raw = Vec::new();
    for chain in chains {
        for (i, (addr, len, write)) in chain.iter().enumerate() {
            let mut flags = if *write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let index = first + raw.len() as u16;
            if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            raw.push(RawDescriptor::from(Descriptor::new(
                *addr,
                *len,
                flags,
                index + 1,
            )));
        }
    }
    raw
}

fn setup(mem: &GuestMemoryMmap, acked: u64) -> Setup<'_> {
    let rx = MockSplitQueue::create(mem, GuestAddress(RX_RING), 64);
    let tx = MockSplitQueue::create(mem, GuestAddress(TX_RING), 64);
    let host = MockIo::default();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut net = Net::new(host.clone(), MAC);
    net.activate(ActiveDevice {
        mem: mem.clone(),
        queues: vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()],
        acked_features: acked,
        interrupt: interrupt.clone(),
    })
    .unwrap();
    Setup {
        mem,
        rx,
        tx,
        net,
        host,
        interrupt,
    }
}

/// A packet: a header with `flags` and `gso`, then `len` bytes counting up.
fn packet(flags: u8, gso: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; VNET_HDR_LEN];
    p[0] = flags;
    p[1] = gso;
    p.extend((0..len).map(|i| i as u8));
    p
}

impl Setup<'_> {
    /// The (id, len) of element `slot` of `queue`'s used ring, and the ring's index.
    fn used(&self, queue: &MockSplitQueue<'_, GuestMemoryMmap>, slot: u64) -> (u32, u32) {
        let elem = queue.used_addr().unchecked_add(4 + 8 * slot);
        (
            self.mem.read_obj(elem).unwrap(),
            self.mem.read_obj(elem.unchecked_add(4)).unwrap(),
        )
    }

    fn used_idx(&self, queue: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        self.mem
            .read_obj(queue.used_addr().unchecked_add(2))
            .unwrap()
    }

    fn transmit(&mut self, chains: &[&[(u64, u32, bool)]]) {
        self.tx.add_desc_chains(&descriptors(chains, 0), 0).unwrap();
        self.net.process_queue(TX_QUEUE);
    }

    fn sent(&self) -> Vec<Vec<u8>> {
        self.host.0.lock().unwrap().from_guest.clone()
    }

    fn host_sends(&self, frame: Vec<u8>) {
        self.host.0.lock().unwrap().to_guest.push_back(frame);
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn features_and_config_space() {
    let net = Net::new(MockIo::default(), MAC);
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.device_features(), ALL);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    let mut cfg = [0u8; 8];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(&cfg[6..], &[0, 0]);
    assert!(net.host_fds().is_empty());
}

#[test]
fn offloads_follow_the_accepted_features_and_reset_clears_them() {
    let mem = memory();
    let mut s = setup(&mem, ALL);
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert_eq!(s.host.0.lock().unwrap().offload, Some(all));
    s.net.reset();
    assert_eq!(s.host.0.lock().unwrap().offload, Some(0));
    // TSO without the checksum offload is not enabled on the TAP.
    let tso_only = (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_MRG_RXBUF);
    assert_eq!(Net::<MockIo>::tap_offloads(tso_only), 0);
    let s = setup(&mem, 0);
    assert_eq!(s.host.0.lock().unwrap().offload, Some(0));
}

#[test]
fn a_frame_spread_over_descriptors_is_sent_whole() {
    let mem = memory();
    let mut s = setup(&mem, ALL);
    let p = packet(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0, 100);
    mem.write_slice(&p[..20], GuestAddress(BUFS)).unwrap();
    mem.write_slice(&p[20..], GuestAddress(BUFS + 0x1000))
        .unwrap();
    s.transmit(&[&[(BUFS, 20, R), (BUFS + 0x1000, 92, R)]]);
    assert_eq!(s.sent(), vec![p]);
    assert_eq!(s.used(&s.tx, 0), (0, 0));
    assert_eq!(s.interrupt.status(), 1);
    assert_eq!(s.net.stats().tx_frames, 1);
    assert_eq!(s.net.stats().tx_bytes, 100);
}

#[test]
fn bad_transmit_chains_are_returned_unsent() {
    let mem = memory();
    // Nothing negotiated: neither checksum nor segmentation offloads may be asked for.
    let mut s = setup(&mem, 1 << VIRTIO_NET_F_MAC);
    let plain = packet(0, 0, 50);
    mem.write_slice(&plain, GuestAddress(BUFS)).unwrap();
    let csum = packet(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0, 50);
    mem.write_slice(&csum, GuestAddress(BUFS + 0x1000)).unwrap();
    let tso = packet(
        VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        50,
    );
    mem.write_slice(&tso, GuestAddress(BUFS + 0x2000)).unwrap();
    s.transmit(&[
        &[(BUFS, 62, W)],                                           // device-writable
        &[(BUFS, 8, R)],                                            // shorter than a header
        &[(BUFS, 0x8000, R), (BUFS, 0x8000, R), (BUFS, 0x8000, R)], // longer than any frame
        &[(0xffff_0000_0000, 62, R)],                               // outside guest memory
        &[(BUFS + 0x1000, 62, R)], // checksum offload not negotiated
        &[(BUFS + 0x2000, 62, R)], // TSO not negotiated
        &[(BUFS, 62, R)],          // fine
    ]);
    let sent = s.sent();
    let lens: Vec<usize> = sent.iter().map(|p| p.len()).collect();
    assert_eq!(lens, [62], "only the last chain is sent");
    assert!(sent[0] == plain);
    assert_eq!(s.net.stats().tx_malformed, 6);
    assert_eq!(s.used_idx(&s.tx), 7, "every chain is returned");
    assert!(!s.interrupt.needs_reset());
}

#[test]
fn a_frame_the_host_refuses_is_counted() {
    let mem = memory();
    let mut s = setup(&mem, ALL);
    s.host.0.lock().unwrap().refuse = true;
    mem.write_slice(&packet(0, 0, 10), GuestAddress(BUFS))
        .unwrap();
    s.transmit(&[&[(BUFS, 22, R)]]);
    assert_eq!(s.net.stats().tx_errors, 1);
    assert_eq!(s.used_idx(&s.tx), 1);
}

#[test]
fn a_received_frame_lands_in_one_buffer_with_num_buffers_1() {
    let mem = memory();
    let mut s = setup(&mem, ALL);
    s.rx.add_desc_chains(&descriptors(&[&[(BUFS, 2048, W)]], 0), 0)
        .unwrap();
    let p = packet(0, 0, 1000);
    s.host_sends(p.clone());
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.used(&s.rx, 0), (0, p.len() as u32));
    let got = s.read(BUFS, p.len());
    assert_eq!(got[10..12], [1, 0], "num_buffers");
    assert_eq!(got[12..], p[12..]);
    assert_eq!(s.interrupt.status(), 1);
    assert_eq!(s.net.stats().rx_frames, 1);
}

#[test]
fn a_large_frame_is_merged_over_several_buffers_published_together() {
    let mem = memory();
    let mut s = setup(&mem, ALL);
    let chains: Vec<[(u64, u32, bool); 1]> =
        (0..4).map(|i| [(BUFS + i * 0x1000, 1536, W)]).collect();
    let refs: Vec<&[(u64, u32, bool)]> = chains.iter().map(|c| &c[..]).collect();
    s.rx.add_desc_chains(&descriptors(&refs, 0), 0).unwrap();
    let p = packet(0, 0, 4000); // 4012 bytes: three buffers
    s.host_sends(p.clone());
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.used_idx(&s.rx), 3);
    assert_eq!(s.used(&s.rx, 0), (0, 1536));
    assert_eq!(s.used(&s.rx, 1), (1, 1536));
    assert_eq!(s.used(&s.rx, 2), (2, 4012 - 2 * 1536));
    let mut got = s.read(BUFS, 1536);
    got.extend(s.read(BUFS + 0x1000, 1536));
    got.extend(s.read(BUFS + 0x2000, 4012 - 2 * 1536));
    assert_eq!(got[10..12], [3, 0], "num_buffers");
    assert_eq!(got[12..], p[12..]);
}

#[test]
fn a_frame_waits_for_buffers_and_goes_when_the_guest_adds_them() {
    let mem = memory();
    let mut s = setup(&mem, ALL);
    let p = packet(0, 0, 3000);
    s.host_sends(p.clone());
    s.host_sends(packet(0, 0, 10));
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.used_idx(&s.rx), 0);
    assert_eq!(s.interrupt.status(), 0);
    // One buffer is not enough for the first frame: it still waits, the buffer unused.
    s.rx.add_desc_chains(&descriptors(&[&[(BUFS, 1536, W)]], 0), 0)
        .unwrap();
    s.net.process_queue(RX_QUEUE);
    assert_eq!(s.used_idx(&s.rx), 0);
    s.rx.add_desc_chains(
        &descriptors(
            &[&[(BUFS + 0x1000, 1536, W)], &[(BUFS + 0x2000, 1536, W)]],
            1,
        ),
        1,
    )
    .unwrap();
    s.net.process_queue(RX_QUEUE);
    assert_eq!(
        s.used_idx(&s.rx),
        3,
        "3012 bytes in two buffers, then 22 in one"
    );
    assert_eq!(s.used(&s.rx, 2), (2, 22));
    assert_eq!(s.net.stats().rx_frames, 2);
}

#[test]
fn without_merged_buffers_a_frame_too_big_for_the_buffer_is_dropped() {
    let mem = memory();
    let acked = ALL & !(1 << VIRTIO_NET_F_MRG_RXBUF);
    let mut s = setup(&mem, acked);
    s.rx.add_desc_chains(&descriptors(&[&[(BUFS, 100, W)]], 0), 0)
        .unwrap();
    s.host_sends(packet(0, 0, 1000));
    s.host_sends(packet(0, 0, 50));
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.net.stats().rx_dropped, 1);
    // The buffer went to the next frame, which fits.
    assert_eq!(s.used_idx(&s.rx), 1);
    assert_eq!(s.used(&s.rx, 0), (0, 62));
    // A buffer made of several descriptors (Linux's "big packets") holds a large frame.
    s.rx.add_desc_chains(
        &descriptors(&[&[(BUFS + 0x1000, 12, W), (BUFS + 0x2000, 4096, W)]], 1),
        1,
    )
    .unwrap();
    let p = packet(0, 0, 3000);
    s.host_sends(p.clone());
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.used(&s.rx, 1), (1, 3012));
    assert_eq!(s.read(BUFS + 0x2000, 3000), p[12..]);
}

#[test]
fn bad_receive_chains_are_returned_empty_and_the_frame_dropped() {
    let mem = memory();
    let mut s = setup(&mem, ALL);
    s.rx.add_desc_chains(
        &descriptors(
            &[
                &[(BUFS, 2048, R)],                       // device-readable
                &[(BUFS, 4, W), (BUFS + 0x100, 2048, W)], // header split
                &[(0xffff_0000_0000, 2048, W)],           // outside guest memory
                &[(BUFS, 2048, W)],                       // fine
            ],
            0,
        ),
        0,
    )
    .unwrap();
    for len in [100, 200, 300, 400] {
        s.host_sends(packet(0, 0, len));
    }
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.net.stats().rx_malformed, 3);
    assert_eq!(s.used_idx(&s.rx), 4);
    for slot in 0..3 {
        assert_eq!(s.used(&s.rx, slot).1, 0);
    }
    assert_eq!(s.used(&s.rx, 3), (4, 412));
    assert!(!s.interrupt.needs_reset());
}

#[test]
fn without_event_idx_no_interrupt_while_the_driver_polls() {
    let mem = memory();
    let mut s = setup(&mem, ALL & !(1 << VIRTIO_RING_F_EVENT_IDX));
    mem.write_obj(
        (VRING_AVAIL_F_NO_INTERRUPT as u16).to_le(),
        s.rx.avail_addr(),
    )
    .unwrap();
    s.rx.add_desc_chains(&descriptors(&[&[(BUFS, 2048, W)]], 0), 0)
        .unwrap();
    s.host_sends(packet(0, 0, 10));
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.used_idx(&s.rx), 1);
    assert_eq!(s.interrupt.status(), 0);
}

#[test]
fn host_frames_before_the_driver_is_up_are_dropped() {
    let host = MockIo::default();
    let mut net = Net::new(host.clone(), MAC);
    host.0.lock().unwrap().to_guest.push_back(packet(0, 0, 10));
    net.process_host_event(TAP_TOKEN);
    net.process_queue(RX_QUEUE);
    net.process_queue(TX_QUEUE);
    assert!(host.0.lock().unwrap().to_guest.is_empty());
}

#[test]
fn with_event_idx_interrupts_wait_for_used_event_and_a_stall_asks_for_a_kick() {
    let mem = memory();
    let mut s = setup(&mem, ALL);
    let size = 64u64;
    let used_event = s.rx.avail_addr().unchecked_add(4 + 2 * size);
    // The driver wants an interrupt once the used index passes 1 (two frames delivered).
    mem.write_obj(1u16.to_le(), used_event).unwrap();
    let chains: Vec<[(u64, u32, bool); 1]> =
        (0..3).map(|i| [(BUFS + i * 0x1000, 2048, W)]).collect();
    let refs: Vec<&[(u64, u32, bool)]> = chains.iter().map(|c| &c[..]).collect();
    s.rx.add_desc_chains(&descriptors(&refs, 0), 0).unwrap();
    s.host_sends(packet(0, 0, 10));
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.used_idx(&s.rx), 1);
    assert_eq!(
        s.interrupt.status(),
        0,
        "used index 1 has not passed used_event 1"
    );
    s.host_sends(packet(0, 0, 10));
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.used_idx(&s.rx), 2);
    assert_eq!(s.interrupt.status(), 1);
    // A frame that finds no room sets avail_event to the next buffer the device wants.
    s.host_sends(packet(0, 0, 10));
    s.host_sends(packet(0, 0, 10));
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.used_idx(&s.rx), 3);
    let avail_event = s.rx.used_addr().unchecked_add(4 + 8 * size);
    assert_eq!(u16::from_le(mem.read_obj::<u16>(avail_event).unwrap()), 3);
}

#[test]
fn with_event_idx_a_merged_frame_short_of_buffers_asks_for_the_next_one() {
    let mem = memory();
    let mut s = setup(&mem, ALL);
    // One buffer available, a frame that needs two: the device takes none and asks to be
    // kicked when the driver's index passes 1, the one it has now.
    s.rx.add_desc_chains(&descriptors(&[&[(BUFS, 1536, W)]], 0), 0)
        .unwrap();
    s.host_sends(packet(0, 0, 3000));
    s.net.process_host_event(TAP_TOKEN);
    assert_eq!(s.used_idx(&s.rx), 0);
    let avail_event = s.rx.used_addr().unchecked_add(4 + 8 * 64);
    assert_eq!(u16::from_le(mem.read_obj::<u16>(avail_event).unwrap()), 1);
}
