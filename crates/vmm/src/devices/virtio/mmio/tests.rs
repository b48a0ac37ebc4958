//! Register semantics of the virtio-mmio transport (virtio 1.2 §4.2.2, §4.2.3), driven the way
//! Linux's `virtio_mmio` driver drives them, against a fake device.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use vm_memory::GuestAddress;

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

impl Harness {
    fn r(&mut self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, offset: u32, v: u32) {
        self.t.write(u64::from(offset), &v.to_le_bytes());
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
        self.w(VIRTIO_MMIO_QUEUE_SEL, index);
        self.w(VIRTIO_MMIO_QUEUE_NUM, size);
        for (low, high, addr) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                base,
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                base + 0x1000,
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                base + 0x2000,
            ),
        ] {
            self.w(low, addr as u32);
            self.w(high, (addr >> 32) as u32);
        }
        self.w(VIRTIO_MMIO_QUEUE_READY, 1);
    }
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
