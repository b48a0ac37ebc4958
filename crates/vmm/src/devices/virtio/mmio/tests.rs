//! Register semantics of the virtio-mmio transport (virtio 1.2 §4.2.2, §4.2.3), driven the way
//! Linux's `virtio_mmio` driver drives them, against a fake device.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::devices::virtio::rng::Rng;

const FAKE_ID: u32 = 42;
const FAKE_FEATURE: u64 = 1 << 3;

#[derive(Default)]
struct Fake {
    active: Option<ActiveDevice>,
    resets: usize,
    processed: Arc<AtomicUsize>,
    config: [u8; 8],
}

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        FAKE_ID
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn device_features(&self) -> u64 {
        FAKE_FEATURE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::super::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = self.config.get_mut(offset as usize) {
            *b = data[0];
        }
    }
    fn activate(&mut self, active: ActiveDevice) -> Result<(), super::super::ActivateError> {
        self.active = Some(active);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        self.resets += 1;
    }
    fn process_queue(&mut self, _index: usize) {
        self.processed.fetch_add(1, Ordering::SeqCst);
    }
    fn saved_queues(&self) -> Vec<QueueState> {
        super::super::active_queue_states(self.active.as_ref())
    }
}

struct Harness {
    t: MmioTransport,
    fake: Arc<Mutex<Fake>>,
    irq: EventFd,
}

fn harness() -> Harness {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let fake = Arc::new(Mutex::new(Fake::default()));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(fake.clone(), mem, irq.try_clone().unwrap()).unwrap();
    Harness { t, fake, irq }
}

fn read_reg(t: &mut MmioTransport, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

fn write_reg(t: &mut MmioTransport, offset: u32, v: u32) {
    t.write(u64::from(offset), &v.to_le_bytes());
}

impl Harness {
    fn r(&mut self, offset: u32) -> u32 {
        read_reg(&mut self.t, offset)
    }
    fn w(&mut self, offset: u32, v: u32) {
        write_reg(&mut self.t, offset, v);
    }
    fn status(&mut self) -> u32 {
        self.r(VIRTIO_MMIO_STATUS)
    }
    /// ACKNOWLEDGE, DRIVER, features (VERSION_1 + `low`), FEATURES_OK.
    fn negotiate(&mut self, low: u32) {
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, low);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1 is bit 32
        self.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_FEATURES_OK));
    }
    fn setup_queue(&mut self, index: u32, size: u32, base: u64) {
        let rings = [base, base + 0x1000, base + 0x2000];
        setup_queue_at(&mut self.t, index, size, rings);
    }
}

/// Sets queue `index` up with `size` entries and its descriptor table, available and used
/// rings at `rings`, and readies it.
fn setup_queue_at(t: &mut MmioTransport, index: u32, size: u32, rings: [u64; 3]) {
    write_reg(t, VIRTIO_MMIO_QUEUE_SEL, index);
    write_reg(t, VIRTIO_MMIO_QUEUE_NUM, size);
    let registers = [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
        (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH),
    ];
    for ((low, high), addr) in registers.into_iter().zip(rings) {
        write_reg(t, low, addr as u32);
        write_reg(t, high, (addr >> 32) as u32);
    }
    write_reg(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

fn ok_up_to(bit: u32) -> u32 {
    let order = [
        VIRTIO_CONFIG_S_ACKNOWLEDGE,
        VIRTIO_CONFIG_S_DRIVER,
        VIRTIO_CONFIG_S_FEATURES_OK,
        VIRTIO_CONFIG_S_DRIVER_OK,
    ];
    let n = order.iter().position(|b| *b == bit).unwrap() + 1;
    order[..n].iter().fold(0, |a, b| a | b)
}

#[test]
fn identifies_as_a_version_2_virtio_mmio_device() {
    let mut h = harness();
    assert_eq!(h.r(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(h.r(VIRTIO_MMIO_VERSION), 2);
    assert_eq!(h.r(VIRTIO_MMIO_DEVICE_ID), FAKE_ID);
    assert_eq!(h.r(VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(h.r(VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(h.r(VIRTIO_MMIO_SHM_BASE_HIGH), u32::MAX);
}

#[test]
fn only_aligned_32_bit_register_accesses_count() {
    let mut h = harness();
    let mut b = [0xffu8; 2];
    h.t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    h.t.read(2, &mut b);
    assert_eq!(b, [0; 4]);
    h.t.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);
    assert_eq!(h.status(), 0);
}

#[test]
fn device_features_are_read_in_32_bit_halves_with_version_1() {
    let mut h = harness();
    h.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(h.r(VIRTIO_MMIO_DEVICE_FEATURES), FAKE_FEATURE as u32);
    h.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(h.r(VIRTIO_MMIO_DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1");
    h.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(h.r(VIRTIO_MMIO_DEVICE_FEATURES), 0);
}

#[test]
fn features_ok_needs_version_1_and_only_offered_bits() {
    let mut h = harness();
    h.negotiate(FAKE_FEATURE as u32);
    assert_eq!(h.status(), ok_up_to(VIRTIO_CONFIG_S_FEATURES_OK));

    let mut h = harness();
    h.negotiate(1 << 5); // not offered
    assert_eq!(h.status(), ok_up_to(VIRTIO_CONFIG_S_DRIVER));

    let mut h = harness();
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER));
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_FEATURES_OK)); // no VERSION_1
    assert_eq!(h.status(), ok_up_to(VIRTIO_CONFIG_S_DRIVER));
}

#[test]
fn status_bits_are_added_in_order_and_never_cleared() {
    let mut h = harness();
    h.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER); // skips ACKNOWLEDGE
    assert_eq!(h.status(), 0);
    h.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    h.w(
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(h.status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER));
    h.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER); // clears ACKNOWLEDGE
    assert_eq!(h.status(), ok_up_to(VIRTIO_CONFIG_S_DRIVER));
    h.w(
        VIRTIO_MMIO_STATUS,
        ok_up_to(VIRTIO_CONFIG_S_DRIVER) | VIRTIO_CONFIG_S_FAILED,
    );
    assert_ne!(h.status() & VIRTIO_CONFIG_S_FAILED, 0);
}

#[test]
fn driver_features_are_frozen_after_features_ok() {
    let mut h = harness();
    h.negotiate(FAKE_FEATURE as u32);
    h.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    h.w(VIRTIO_MMIO_DRIVER_FEATURES, 0);
    h.setup_queue(0, 16, 0x1_0000);
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK));
    let fake = h.fake.lock().unwrap();
    let acked = fake.active.as_ref().unwrap().acked_features;
    assert_eq!(acked, FAKE_FEATURE | (1 << 32));
}

#[test]
fn queues_are_set_up_and_handed_to_the_device_at_driver_ok() {
    let mut h = harness();
    h.w(VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(h.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
    h.w(VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(h.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no such queue");

    // Before FEATURES_OK queue registers are ignored.
    h.setup_queue(0, 16, 0x1_0000);
    h.w(VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(h.r(VIRTIO_MMIO_QUEUE_READY), 0);

    h.negotiate(0);
    h.setup_queue(0, 8, 0x1_0000);
    h.w(VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(h.r(VIRTIO_MMIO_QUEUE_READY), 1);
    // A ready queue can no longer be reconfigured.
    h.w(VIRTIO_MMIO_QUEUE_NUM, 4);
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK));
    assert_eq!(h.status(), ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK));

    let fake = h.fake.lock().unwrap();
    let active = fake.active.as_ref().unwrap();
    assert_eq!(active.queues.len(), 2);
    let q = &active.queues[0];
    assert!(q.ready());
    assert_eq!(q.size(), 8);
    assert_eq!(q.desc_table(), 0x1_0000);
    assert_eq!(q.avail_ring(), 0x1_1000);
    assert_eq!(q.used_ring(), 0x1_2000);
    assert!(!active.queues[1].ready());
    // Every queue's eventfd was kicked so buffers made available early are processed.
    assert_eq!(h.t.queue_events()[0].read().unwrap(), 1);
}

#[test]
fn invalid_queue_sizes_and_misaligned_rings_are_refused() {
    let mut h = harness();
    h.negotiate(0);
    h.w(VIRTIO_MMIO_QUEUE_SEL, 0);
    for bad in [0, 3, 32, 0x1_0000] {
        h.w(VIRTIO_MMIO_QUEUE_NUM, bad);
    }
    h.w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1_0008); // descriptor table needs 16-byte alignment
    h.w(VIRTIO_MMIO_QUEUE_READY, 1);
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK));
    let fake = h.fake.lock().unwrap();
    let q = &fake.active.as_ref().unwrap().queues[0];
    assert_eq!(q.size(), 16, "the maximum stays");
    assert_ne!(q.desc_table(), 0x1_0008);
}

#[test]
fn a_queue_outside_guest_memory_sets_device_needs_reset() {
    let mut h = harness();
    h.negotiate(0);
    h.setup_queue(0, 16, 0xfff0_0000);
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK));
    assert!(h.fake.lock().unwrap().active.is_none());
    assert_ne!(h.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(h.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(h.irq.read().unwrap(), 1);
    // A reset clears the condition and the device can be set up again.
    h.w(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(h.status(), 0);
    assert_eq!(h.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    h.negotiate(0);
    h.setup_queue(0, 16, 0x1_0000);
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK));
    assert!(h.fake.lock().unwrap().active.is_some());
}

#[test]
fn interrupt_status_reflects_the_device_and_is_acked_by_the_driver() {
    let mut h = harness();
    h.t.interrupt.signal_used_queue();
    h.t.interrupt.signal_config_change();
    assert_eq!(h.r(VIRTIO_MMIO_INTERRUPT_STATUS), 3);
    h.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(h.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    h.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(h.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(h.irq.read().unwrap(), 2);
}

#[test]
fn reset_stops_the_device_and_restores_the_queues() {
    let mut h = harness();
    h.negotiate(0);
    h.setup_queue(0, 8, 0x1_0000);
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK));
    h.w(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(h.fake.lock().unwrap().resets, 1);
    assert!(h.fake.lock().unwrap().active.is_none());
    assert_eq!(h.status(), 0);
    h.w(VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(h.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
    assert_eq!(h.r(VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn a_notify_reaching_the_transport_signals_the_queue_eventfd() {
    let mut h = harness();
    h.negotiate(0);
    h.setup_queue(0, 8, 0x1_0000);
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK));
    let _ = h.t.queue_events()[1].read();
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(h.t.queue_events()[1].read().unwrap(), 1);
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 99); // no such queue: ignored
}

#[test]
fn config_space_is_passed_through_and_bumps_the_generation() {
    let mut h = harness();
    h.fake.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
    let mut b = [0u8; 2];
    h.t.read(0x104, &mut b);
    assert_eq!(b, [5, 6]);
    let generation = h.r(VIRTIO_MMIO_CONFIG_GENERATION);
    h.t.write(0x100, &[9]);
    assert_eq!(h.fake.lock().unwrap().config[0], 9);
    assert_ne!(h.r(VIRTIO_MMIO_CONFIG_GENERATION), generation);
}

#[test]
fn aml_describes_an_lnro0005_device_with_its_window_and_gsi() {
    let mut v = Vec::new();
    VirtioMmioAml {
        base: 0xd000_0000,
        gsi: 5,
        uid: 0,
    }
    .to_aml_bytes(&mut v);
    assert!(v.windows(4).any(|w| w == b"VR00"));
    assert!(v.windows(8).any(|w| w == b"LNRO0005"));
    // Memory32Fixed descriptor: tag 0x86, length 9, RW, base, size.
    let mut desc = vec![0x86, 9, 0, 1];
    desc.extend_from_slice(&0xd000_0000u32.to_le_bytes());
    desc.extend_from_slice(&0x200u32.to_le_bytes());
    assert!(v.windows(desc.len()).any(|w| w == desc.as_slice()));
}

// Snapshots: save, a JSON round trip, and restore into a fresh transport.

fn json_round_trip(s: &MmioState) -> MmioState {
    serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap()
}

/// An entropy device on the transport, driven to DRIVER_OK with its queue where `vq` lies.
fn rng_transport(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) -> MmioTransport {
    let rng = Arc::new(Mutex::new(Rng::new()));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(rng, mem.clone(), irq).unwrap();
    write_reg(&mut t, VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER));
    write_reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write_reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    write_reg(
        &mut t,
        VIRTIO_MMIO_STATUS,
        ok_up_to(VIRTIO_CONFIG_S_FEATURES_OK),
    );
    let rings = [vq.desc_table_addr(), vq.avail_addr(), vq.used_addr()].map(|a| a.0);
    setup_queue_at(&mut t, 0, 16, rings);
    write_reg(
        &mut t,
        VIRTIO_MMIO_STATUS,
        ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK),
    );
    t
}

/// Makes a 32-byte device-writable buffer at `addr` available as descriptor `index`.
fn offer_buffer(vq: &MockSplitQueue<GuestMemoryMmap>, index: u16, addr: u64) {
    let d = Descriptor::new(addr, 32, VRING_DESC_F_WRITE as u16, 0);
    vq.add_desc_chains(&[RawDescriptor::from(d)], index)
        .unwrap();
}

/// The used ring's index and the length of its entry `n`.
fn used(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, n: u64) -> (u16, u32) {
    let ring = vq.used_addr();
    let idx: u16 = mem.read_obj(ring.unchecked_add(2)).unwrap();
    let len: u32 = mem.read_obj(ring.unchecked_add(4 + 8 * n + 4)).unwrap();
    (idx, len)
}

#[test]
fn an_active_device_is_restored_with_its_queues_and_serves_on() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let mut old = rng_transport(&mem, &vq);
    offer_buffer(&vq, 0, 0x8_0000);
    old.device().lock().unwrap().process_queue(0);
    assert_eq!(used(&mem, &vq, 0), (1, 32));
    old.interrupt.ack(VIRTIO_MMIO_INT_VRING);
    write_reg(&mut old, VIRTIO_MMIO_QUEUE_SEL, 0);
    let saved = json_round_trip(&old.save());
    assert!(saved.active);
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (1, 1)
    );
    assert_eq!(saved.device, DeviceState::None);

    // A new machine: the same memory, a fresh device of the same kind.
    let rng = Arc::new(Mutex::new(Rng::new()));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut new = MmioTransport::new(rng, mem.clone(), irq.try_clone().unwrap()).unwrap();
    new.restore(&saved).unwrap();
    assert_eq!(new.save(), saved);
    assert_eq!(
        read_reg(&mut new, VIRTIO_MMIO_STATUS),
        ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK)
    );
    assert!(irq.read().is_err(), "no interrupt was pending");
    // Every queue is kicked, and the next buffer is served where the old device stopped.
    assert_eq!(new.queue_events()[0].read().unwrap(), 1);
    offer_buffer(&vq, 1, 0x8_1000);
    new.device().lock().unwrap().process_queue(0);
    assert_eq!(used(&mem, &vq, 1), (2, 32));
    assert_eq!(irq.read().unwrap(), 1);
}

#[test]
fn a_device_not_yet_active_is_restored_not_active() {
    let mut h = harness();
    h.negotiate(FAKE_FEATURE as u32);
    h.setup_queue(1, 4, 0x2_0000);
    h.w(VIRTIO_MMIO_QUEUE_SEL, 1);
    h.t.interrupt.signal_config_change();
    let saved = json_round_trip(&h.t.save());
    assert!(!saved.active);

    let mut fresh = harness();
    let _ = fresh.irq.read();
    fresh.t.restore(&saved).unwrap();
    assert!(fresh.fake.lock().unwrap().active.is_none());
    assert_eq!(fresh.status(), ok_up_to(VIRTIO_CONFIG_S_FEATURES_OK));
    assert_eq!(fresh.r(VIRTIO_MMIO_QUEUE_READY), 1, "QueueSel was 1");
    assert_eq!(
        fresh.r(VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(
        fresh.irq.read().unwrap(),
        1,
        "the pending interrupt is raised again"
    );
    // The driver goes on from where it was.
    fresh.setup_queue(0, 16, 0x1_0000);
    fresh.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK));
    let fake = fresh.fake.lock().unwrap();
    let active = fake.active.as_ref().unwrap();
    assert_eq!(active.acked_features, FAKE_FEATURE | (1 << 32));
    assert_eq!(active.queues[1].size(), 4);
    assert_eq!(active.queues[1].desc_table(), 0x2_0000);
}

/// The state of the fake device, active, with queue 0 ready.
fn active_fake_state() -> MmioState {
    let mut h = harness();
    h.negotiate(FAKE_FEATURE as u32);
    h.setup_queue(0, 16, 0x1_0000);
    h.w(VIRTIO_MMIO_STATUS, ok_up_to(VIRTIO_CONFIG_S_DRIVER_OK));
    let s = h.t.save();
    assert!(s.active);
    s
}

#[test]
fn hostile_transport_states_are_refused_and_leave_the_device_reset() {
    type Edit = fn(&mut MmioState);
    let cases: &[(&str, Edit, &str)] = &[
        (
            "device type",
            |s| s.device_type = 2,
            "virtio device type 2, not 42",
        ),
        (
            "queue count",
            |s| s.queues.truncate(1),
            "1 queues; the device has 2",
        ),
        ("max size", |s| s.queues[0].max_size = 32, "maximum size 32"),
        (
            "size not a power of two",
            |s| s.queues[0].size = 12,
            "size 12 is not a power of two",
        ),
        (
            "size above max",
            |s| s.queues[1].size = 16,
            "size 16 is not a power of two of at most 8",
        ),
        (
            "misaligned ring",
            |s| s.queues[0].used_ring = 0x1_2002,
            "used ring breaks alignment",
        ),
        (
            "rings outside memory",
            |s| s.queues[0].avail_ring = 0xfff0_0000,
            "outside guest memory",
        ),
        (
            "features not offered",
            |s| s.driver_features |= 1 << 5,
            "include 0x20",
        ),
        (
            "no VERSION_1",
            |s| s.driver_features &= !(1 << VIRTIO_F_VERSION_1),
            "lack VIRTIO_F_VERSION_1",
        ),
        (
            "DRIVER_OK without FEATURES_OK",
            |s| s.status &= !VIRTIO_CONFIG_S_FEATURES_OK,
            "DRIVER_OK without FEATURES_OK",
        ),
        (
            "DRIVER without ACKNOWLEDGE",
            |s| s.status &= !1,
            "DRIVER without ACKNOWLEDGE",
        ),
        (
            "active without DRIVER_OK",
            |s| s.status = ok_up_to(VIRTIO_CONFIG_S_FEATURES_OK),
            "lacks DRIVER_OK",
        ),
        ("unknown status bits", |s| s.status |= 0x100, "bits 0x100"),
        (
            "NEEDS_RESET in the status",
            |s| s.status |= 0x40,
            "bits 0x40",
        ),
        (
            "interrupt causes",
            |s| s.interrupt_status = 4,
            "interrupt status 0x4",
        ),
        (
            "event index",
            |s| s.queues[0].event_idx_enabled = true,
            "event indices",
        ),
        (
            "a state for another device",
            |s| {
                s.device = DeviceState::Vsock(crate::persist::devices::VsockState {
                    connections: Vec::new(),
                    reset: Vec::new(),
                })
            },
            "keeps no state",
        ),
        (
            "state of an inactive device",
            |s| {
                s.active = false;
                s.device = DeviceState::Vsock(crate::persist::devices::VsockState {
                    connections: Vec::new(),
                    reset: vec![(1, 2)],
                })
            },
            "not active yet",
        ),
    ];
    for (what, edit, want) in cases {
        let mut s = active_fake_state();
        edit(&mut s);
        let mut h = harness();
        let err = h.t.restore(&s).expect_err(what).to_string();
        assert!(err.contains(want), "{what}: {err}");
        assert!(
            err.starts_with("restoring virtio device type 42: "),
            "{err}"
        );
        assert!(h.fake.lock().unwrap().active.is_none(), "{what}");
        assert!(!h.t.active, "{what}");
        assert_eq!(h.status(), 0, "{what}");
        assert_eq!(h.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0, "{what}");
    }
    // The unedited state restores.
    let mut h = harness();
    h.t.restore(&active_fake_state()).unwrap();
    assert!(h.fake.lock().unwrap().active.is_some());
}
