//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2): a device's registers in a window of
//! guest-physical addresses. The window's layout (§4.2.2):
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0x000 | MagicValue, "virt" (0x74726976) | R |
//! | 0x004 | Version, 2 (the legacy interface is version 1) | R |
//! | 0x008 / 0x00c | DeviceID / VendorID | R |
//! | 0x010 / 0x014 | DeviceFeatures / DeviceFeaturesSel (32-bit halves) | R / W |
//! | 0x020 / 0x024 | DriverFeatures / DriverFeaturesSel | W / W |
//! | 0x030 / 0x034 / 0x038 | QueueSel / QueueNumMax / QueueNum | W / R / W |
//! | 0x044 | QueueReady | RW |
//! | 0x050 | QueueNotify (a KVM ioeventfd catches it; see [`super::event_loop`]) | W |
//! | 0x060 / 0x064 | InterruptStatus / InterruptACK | R / W |
//! | 0x070 | Status (§2.1) | RW |
//! | 0x080..0x0a4 | QueueDesc, QueueDriver, QueueDevice (low/high halves) | W |
//! | 0x0ac..0x0bc | shared-memory regions (none: length and base read all-ones) | |
//! | 0x0fc | ConfigGeneration | R |
//! | 0x100.. | the device-specific configuration space | RW |
//!
//! Registers below 0x100 are 32 bits wide and accessed with aligned 32-bit accesses only
//! (§4.2.2.2); other accesses are ignored (reads return 0). The device is described to the
//! guest in ACPI (a `LNRO0005` device, [`VirtioMmioAml`]): Linux's `virtio_mmio` driver binds
//! it with its window and interrupt.

use std::sync::{Arc, Mutex};

use acpi_tables::{Aml, AmlSink, aml};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveDevice, Interrupt, VirtioDevice, device_name};
use crate::devices::bus::{BusDevice, lock};
use crate::persist::PersistError;
use crate::persist::devices::{DeviceState, MmioState, QueueSnapshot, refused};

/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The non-legacy virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// cela's vendor ID: "CELA" in little-endian ASCII (any value is valid; Linux ignores it).
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"CELA");
/// The size of the register window the guest is told about (registers + a 256-byte config).
pub const MMIO_WINDOW_SIZE: u32 = 0x200;

/// Why a transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("virtio device type {device}: queue {queue} has invalid maximum size {size}")]
    QueueSize {
        device: u32,
        queue: usize,
        size: u16,
    },
    #[error("cannot create a queue-notify eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A virtio device on the virtio-mmio transport: the register state the driver programs, and
/// the device it forwards to once the driver sets DRIVER_OK.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    device_type: u32,
    max_sizes: Vec<u16>,
    /// The queues being configured; handed to the device at DRIVER_OK.
    queues: Vec<Queue>,
    /// One per queue: signalled by KVM when the guest writes the queue's index to QueueNotify.
    queue_evts: Vec<EventFd>,
    device_features: u64,
    device_features_select: u32,
    driver_features: u64,
    driver_features_select: u32,
    queue_select: u32,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    /// Wraps `device`; its interrupt signals `irq`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        let (device_type, max_sizes, features) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.queue_max_sizes().to_vec(),
                d.device_features(),
            )
        };
        let queues = fresh_queues(device_type, &max_sizes)?;
        let queue_evts = max_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            device_type,
            max_sizes,
            queues,
            queue_evts,
            device_features: features | (1 << VIRTIO_F_VERSION_1),
            device_features_select: 0,
            driver_features: 0,
            driver_features_select: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// The queue-notify eventfds, by queue index: register each with KVM for a write of its
    /// index to `base + QUEUE_NOTIFY_OFFSET`, and watch it in the event loop.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device this transport carries.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    fn has(&self, bit: u32) -> bool {
        self.status & bit != 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let i = usize::try_from(self.queue_select).ok()?;
        self.queues.get_mut(i)
    }

    /// Queue registers may be written only while setting the device up (after FEATURES_OK,
    /// before DRIVER_OK) and only for a queue that is not yet ready (§4.2.3.2).
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        if !self.has(VIRTIO_CONFIG_S_FEATURES_OK) || self.has(VIRTIO_CONFIG_S_DRIVER_OK) {
            return None;
        }
        self.selected_queue().filter(|q| !q.ready())
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => {
                let mut s = self.status;
                if self.interrupt.needs_reset() {
                    s |= VIRTIO_CONFIG_S_NEEDS_RESET;
                }
                s
            }
            // No shared-memory regions: a non-existent region's length and base are all ones.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES
                if self.has(VIRTIO_CONFIG_S_DRIVER) && !self.has(VIRTIO_CONFIG_S_FEATURES_OK) =>
            {
                let v = u64::from(value);
                match self.driver_features_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.configurable_queue() {
                    // An invalid size (not a power of two, zero, above the maximum) is refused
                    // and the queue keeps its previous one.
                    let _ = u16::try_from(value).map(|n| q.try_set_size(n));
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.configurable_queue() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.set_queue_address(|q| {
                q.set_desc_table_address(Some(value), None);
            }),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.set_queue_address(|q| {
                q.set_desc_table_address(None, Some(value));
            }),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.set_queue_address(|q| {
                q.set_avail_ring_address(Some(value), None);
            }),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.set_queue_address(|q| {
                q.set_avail_ring_address(None, Some(value));
            }),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.set_queue_address(|q| {
                q.set_used_ring_address(Some(value), None);
            }),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.set_queue_address(|q| {
                q.set_used_ring_address(None, Some(value));
            }),
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally caught by KVM's ioeventfd; this path serves a notify KVM passed on
                // (e.g. a machine without the ioeventfd registered).
                if self.active
                    && let Some(evt) = usize::try_from(value)
                        .ok()
                        .and_then(|i| self.queue_evts.get(i))
                {
                    let _ = evt.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            _ => {}
        }
    }

    fn set_queue_address(&mut self, set: impl FnOnce(&mut Queue)) {
        // Misaligned addresses are refused by `virtio-queue` (§2.7: descriptor table 16,
        // available ring 2, used ring 4 bytes); whether the rings lie in guest memory is
        // checked at DRIVER_OK.
        if let Some(q) = self.configurable_queue() {
            set(q);
        }
    }

    /// The device status state machine (§2.1, §3.1.1). Writing 0 resets the device. Otherwise
    /// a driver only adds bits, in order; a write that clears a bit or skips a step is ignored.
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            tracing::debug!(
                "virtio-mmio: status {value:#x} would clear bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        let needs = |bit: u32, prerequisite: u32| added & bit == 0 || value & prerequisite != 0;
        if !needs(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE)
            || !needs(VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER)
            || !needs(VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK)
        {
            tracing::debug!("virtio-mmio: status {value:#x} skips a step; ignored");
            return;
        }
        let mut value = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // §3.1.1 step 6: the device refuses the subset by leaving FEATURES_OK clear.
            value &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && value & VIRTIO_CONFIG_S_FAILED == 0 {
            self.activate();
        }
    }

    /// The driver may accept only offered features, and must accept VIRTIO_F_VERSION_1 on a
    /// non-legacy transport.
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        match self.start_device() {
            // Buffers made available before DRIVER_OK (the notify was dropped because the
            // device was not active) are picked up now.
            Ok(()) => self.kick_queues(),
            Err(e) => {
                tracing::warn!("{}: {e}", device_name(self.device_type));
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// Hands the configured queues to the device (DRIVER_OK, or a restore), each ready one
    /// checked to lie in guest memory. On failure the transport keeps the queues and the
    /// device stays inactive.
    fn start_device(&mut self) -> Result<(), String> {
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
        {
            return Err(format!("queue {i} lies outside guest memory"));
        }
        // The device owns the queues while active; `reset` sets up fresh ones.
        let states: Vec<QueueState> = self.queues.iter().map(|q| q.state()).collect();
        let active = ActiveDevice {
            mem: self.mem.clone(),
            queues: std::mem::take(&mut self.queues),
            acked_features: self.driver_features,
            interrupt: self.interrupt.clone(),
        };
        if let Err(e) = lock(&self.device).activate(active) {
            // States of valid queues are valid; fresh queues are the fallback all the same.
            self.queues = states
                .into_iter()
                .map(Queue::try_from)
                .collect::<Result<_, _>>()
                .or_else(|_| fresh_queues(self.device_type, &self.max_sizes))
                .unwrap_or_default();
            return Err(e.to_string());
        }
        self.active = true;
        Ok(())
    }

    /// Signals every queue's eventfd, so the device looks at what the driver made available
    /// while it could not.
    fn kick_queues(&self) {
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
    }

    fn reset(&mut self) {
        if self.active {
            lock(&self.device).reset();
            self.active = false;
        }
        match fresh_queues(self.device_type, &self.max_sizes) {
            Ok(queues) => self.queues = queues,
            Err(e) => tracing::error!("{e}"),
        }
        self.interrupt.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
    }
}

/// Status bits a driver sets (§2.1); DEVICE_NEEDS_RESET is the device's, saved apart.
const DRIVER_STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;

/// The bit order of driver initialization (§3.1.1): each needs the one before.
const STATUS_STEPS: [(u32, &str); 4] = [
    (VIRTIO_CONFIG_S_ACKNOWLEDGE, "ACKNOWLEDGE"),
    (VIRTIO_CONFIG_S_DRIVER, "DRIVER"),
    (VIRTIO_CONFIG_S_FEATURES_OK, "FEATURES_OK"),
    (VIRTIO_CONFIG_S_DRIVER_OK, "DRIVER_OK"),
];

/// Snapshots: the registers and the queues, and the device's own state.
impl MmioTransport {
    /// The transport's and its device's state. Saving changes nothing, but the state is
    /// consistent with guest memory only if neither the vCPUs nor the device event loop run
    /// meanwhile.
    pub fn save(&self) -> MmioState {
        let (queues, device) = if self.active {
            // Under one lock: the queues and the state the device built from them agree.
            let d = lock(&self.device);
            (d.saved_queues(), d.save_state())
        } else {
            let queues = self.queues.iter().map(|q| q.state()).collect();
            (queues, DeviceState::None)
        };
        MmioState {
            device_type: self.device_type,
            device_features_select: self.device_features_select,
            driver_features: self.driver_features,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            active: self.active,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues: queues.into_iter().map(QueueSnapshot::from).collect(),
            device,
        }
    }

    /// Puts back a saved state `s` on a transport built for the same device (from the same
    /// configuration), after guest memory was restored: the registers, the queues, and, if the
    /// device was active, the device re-activated with its queues and given its own state;
    /// every queue is then kicked so buffers made available meanwhile are processed, and a
    /// pending interrupt is raised again. `s` is checked whole first; on any refusal the
    /// transport and the device are left reset.
    pub fn restore(&mut self, s: &MmioState) -> Result<(), PersistError> {
        let name = device_name(self.device_type);
        self.reset();
        let queues = self.check_saved(s).map_err(|p| refused(&name, p))?;
        self.queues = queues;
        self.device_features_select = s.device_features_select;
        self.driver_features = s.driver_features;
        self.driver_features_select = s.driver_features_select;
        self.queue_select = s.queue_select;
        self.status = s.status;
        self.config_generation = s.config_generation;
        // Before the device runs again, so causes it raises while restoring add to these.
        self.interrupt.restore(s.interrupt_status, s.needs_reset);
        if s.active {
            if let Err(e) = self.start_device() {
                self.reset();
                return Err(refused(
                    &name,
                    format!("the device refused its queues: {e}"),
                ));
            }
            let restored = lock(&self.device).restore_state(&s.device);
            if let Err(e) = restored {
                self.reset();
                return Err(e);
            }
            self.kick_queues();
        }
        Ok(())
    }

    /// Checks a saved state against this transport's device and guest memory, and builds its
    /// queues; the error says what is wrong.
    fn check_saved(&self, s: &MmioState) -> Result<Vec<Queue>, String> {
        if s.device_type != self.device_type {
            return Err(format!(
                "the snapshot holds the state of virtio device type {}, not {}",
                s.device_type, self.device_type
            ));
        }
        if s.queues.len() != self.max_sizes.len() {
            return Err(format!(
                "the snapshot has {} queues; the device has {}",
                s.queues.len(),
                self.max_sizes.len()
            ));
        }
        let status = s.status;
        if status & !DRIVER_STATUS_BITS != 0 {
            return Err(format!(
                "status {status:#x} has bits {:#x} a driver does not set",
                status & !DRIVER_STATUS_BITS
            ));
        }
        for pair in STATUS_STEPS.windows(2) {
            let ((before, before_name), (bit, bit_name)) = (pair[0], pair[1]);
            if status & bit != 0 && status & before == 0 {
                return Err(format!(
                    "status {status:#x} has {bit_name} without {before_name}"
                ));
            }
        }
        let has = |bit: u32| status & bit != 0;
        let features = s.driver_features;
        let not_offered = features & !self.device_features;
        if not_offered != 0 {
            return Err(format!(
                "driver features {features:#x} include {not_offered:#x}, which the device does \
                 not offer (it offers {:#x})",
                self.device_features
            ));
        }
        if features != 0 && !has(VIRTIO_CONFIG_S_DRIVER) {
            return Err(format!(
                "driver features {features:#x} with status {status:#x}, without DRIVER"
            ));
        }
        if has(VIRTIO_CONFIG_S_FEATURES_OK) && features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(format!(
                "status {status:#x} has FEATURES_OK but driver features {features:#x} lack \
                 VIRTIO_F_VERSION_1"
            ));
        }
        if s.active && !has(VIRTIO_CONFIG_S_DRIVER_OK) {
            return Err(format!(
                "the device is active but status {status:#x} lacks DRIVER_OK"
            ));
        }
        if !s.active && s.device != DeviceState::None {
            return Err("the device is not active yet the snapshot holds its state".into());
        }
        let causes = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
        if s.interrupt_status & !causes != 0 {
            return Err(format!(
                "interrupt status {:#x} has causes other than used buffers and configuration \
                 change",
                s.interrupt_status
            ));
        }
        let event_idx = s.active && features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        s.queues
            .iter()
            .zip(&self.max_sizes)
            .enumerate()
            .map(|(i, (q, &max))| {
                if q.max_size != max {
                    return Err(format!(
                        "queue {i}: maximum size {} where the device's is {max}",
                        q.max_size
                    ));
                }
                if q.size == 0 || !q.size.is_power_of_two() || q.size > max {
                    return Err(format!(
                        "queue {i}: size {} is not a power of two of at most {max}",
                        q.size
                    ));
                }
                if q.ready && !has(VIRTIO_CONFIG_S_FEATURES_OK) {
                    return Err(format!("queue {i} is ready before FEATURES_OK"));
                }
                if q.event_idx_enabled && !event_idx {
                    return Err(format!(
                        "queue {i} uses event indices, which the driver did not negotiate"
                    ));
                }
                let queue =
                    Queue::try_from(QueueState::from(q)).map_err(|e| format!("queue {i}: {e}"))?;
                if s.active && q.ready && !queue.is_valid(&self.mem) {
                    return Err(format!(
                        "queue {i}: its rings (descriptors at {:#x}, available at {:#x}, used \
                         at {:#x}, {} entries) lie outside guest memory",
                        q.desc_table, q.avail_ring, q.used_ring, q.size
                    ));
                }
                Ok(queue)
            })
            .collect()
    }
}

fn fresh_queues(device: u32, sizes: &[u16]) -> Result<Vec<Queue>, MmioError> {
    sizes
        .iter()
        .enumerate()
        .map(|(queue, &size)| {
            Queue::new(size).map_err(|_| MmioError::QueueSize {
                device,
                queue,
                size,
            })
        })
        .collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            lock(&self.device).read_config(offset - config, data);
            return;
        }
        data.fill(0);
        if data.len() == 4 && offset.is_multiple_of(4) {
            let v = self.read_register(offset as u32);
            data.copy_from_slice(&v.to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            lock(&self.device).write_config(offset - config, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset as u32, u32::from_le_bytes(bytes));
        }
    }
}

/// The ACPI description of a virtio-mmio device: `\_SB.VRnn`, _HID "LNRO0005" (the ID Linux's
/// `virtio_mmio` driver matches), its register window and its edge-triggered, active-high
/// interrupt.
pub struct VirtioMmioAml {
    pub base: u32,
    pub gsi: u32,
    pub uid: u8,
}

impl Aml for VirtioMmioAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let name = format!("VR{:02X}", self.uid);
        let window = aml::Memory32Fixed::new(true, self.base, MMIO_WINDOW_SIZE);
        let irq = aml::Interrupt::new(true, true, false, false, self.gsi);
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &self.uid),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![&window, &irq]),
                ),
            ],
        )
        .to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests;
