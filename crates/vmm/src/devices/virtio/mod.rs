//! Virtio devices (OASIS virtio 1.2): paravirtual devices a stock Linux kernel drives through
//! shared-memory rings ("virtqueues", §2.7 split virtqueues).
//!
//! The split follows the spec's own: a *device* (§5: what the device does with the buffers it is
//! given) is transport-agnostic and implements [`VirtioDevice`]; a *transport* (§4: how the
//! driver discovers the device, negotiates features, sets queues up and is notified) wraps it.
//! cela has one transport, virtio-mmio ([`mmio`], §4.2); a virtio-pci one would wrap the same
//! devices.
//!
//! Life of a device (§3.1.1, driver initialization): the driver resets it, sets ACKNOWLEDGE and
//! DRIVER, negotiates features and sets FEATURES_OK, configures the queues, then sets
//! DRIVER_OK. At DRIVER_OK the transport hands the configured queues, guest memory and the
//! [`Interrupt`] to the device ([`VirtioDevice::activate`]). From then on queue notifications
//! reach the device on the device event-loop thread ([`event_loop`]), never on a vCPU thread:
//! KVM turns the guest's write to the notify register into an eventfd signal (ioeventfd), and
//! the device raises its interrupt through another eventfd (irqfd).
//!
//! The guest is not trusted: every address, length and index it provides is checked (by
//! `virtio-queue` for the rings and descriptor chains, by the device for its request formats).
//! A malformed request fails that request; a broken ring marks the device DEVICE_NEEDS_RESET
//! (§2.1.1). Neither stops the VMM.

pub mod block;
pub mod event_loop;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::persist::PersistError;
use crate::persist::devices::{DeviceState, refused};

/// Why a device could not start with the queues the driver configured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("queue {0} is not ready; this device needs it")]
    QueueNotReady(usize),
    #[error("the driver configured {got} queues; this device has {want}")]
    QueueCount { got: usize, want: usize },
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct ActiveDevice {
    pub mem: GuestMemoryMmap,
    /// One per queue of [`VirtioDevice::queue_max_sizes`], in order; a queue the driver did not
    /// set up is not `ready()`. Each was checked to lie in guest memory.
    pub queues: Vec<Queue>,
    /// The features both sides agreed on.
    pub acked_features: u64,
    pub interrupt: Arc<Interrupt>,
}

impl ActiveDevice {
    /// Checks that the driver set up and readied the first `want` queues, which a device
    /// needs before it can run.
    pub fn require_queues(&self, want: usize) -> Result<(), ActivateError> {
        if self.queues.len() < want {
            return Err(ActivateError::QueueCount {
                got: self.queues.len(),
                want,
            });
        }
        match self.queues.iter().take(want).position(|q| !q.ready()) {
            Some(index) => Err(ActivateError::QueueNotReady(index)),
            None => Ok(()),
        }
    }
}

/// Serves every available chain of `queue` with `serve` (which returns the number of bytes it
/// wrote into the chain), returns each chain to the used ring, and interrupts the driver once
/// if it asked to be told (§2.7.7). A used ring that cannot be written marks the device
/// DEVICE_NEEDS_RESET, since only a reset can recover from that. `device` names the device in
/// logs.
pub fn serve_queue(
    device: &str,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut serve: impl FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
) {
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let written = serve(chain);
        if let Err(e) = queue.add_used(mem, head, written) {
            tracing::warn!("{device}: cannot return a buffer: {e}");
            interrupt.set_needs_reset();
            return;
        }
        used_any = true;
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
}

/// A virtio device, whatever transport it sits on (§5).
pub trait VirtioDevice: Send {
    /// The device ID (§5, e.g. 4 for an entropy device).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues (each a power of two ≤ 32768).
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific feature bits (§6 lists the reserved ones; the transport adds
    /// VIRTIO_F_VERSION_1).
    fn device_features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; most devices ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the queues the driver set up.
    fn activate(&mut self, active: ActiveDevice) -> Result<(), ActivateError>;
    /// Stops the device and forgets its queues (the driver wrote 0 to the status).
    fn reset(&mut self);
    /// The driver notified queue `index`: process what it made available. Called on the
    /// device event-loop thread; does nothing unless the device is active.
    fn process_queue(&mut self, index: usize);
    /// Host file descriptors the device serves besides its queues (a TAP device, a socket),
    /// each with a token for [`VirtioDevice::process_host_event`]. Asked once, when the
    /// machine is built; each fd must stay open as long as the device.
    fn host_fds(&self) -> Vec<(RawFd, u32)> {
        Vec::new()
    }
    /// Host fd `token` became readable or writable (edge-triggered: what the device leaves
    /// unread now is not signalled again until more arrives, so it retries on its own, e.g.
    /// when the guest adds buffers). Called on the device event-loop thread.
    fn process_host_event(&mut self, _token: u32) {}
    /// The queues of an active device, for a snapshot (`Queue::state` of each, in order);
    /// empty when the device is not active (the transport then holds them).
    fn saved_queues(&self) -> Vec<QueueState>;
    /// What the device keeps besides its queues, for a snapshot. Asked only of an active
    /// device; must not change it (a snapshot can be taken of a running machine).
    fn save_state(&self) -> DeviceState {
        DeviceState::None
    }
    /// Puts back what [`VirtioDevice::save_state`] saved. Called by the transport right after
    /// it re-activated the device with its saved queues; `state` is hostile and checked.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::None => Ok(()),
            other => Err(refused(
                device_name(self.device_type()),
                format!(
                    "it keeps no state; the snapshot holds {} state",
                    other.kind()
                ),
            )),
        }
    }
}

/// A device's name in messages, by its device ID (§5).
pub(crate) fn device_name(device_type: u32) -> String {
    use virtio_bindings::virtio_ids::{
        VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VIRTIO_ID_RNG, VIRTIO_ID_VSOCK,
    };
    match device_type {
        VIRTIO_ID_NET => "virtio-net".into(),
        VIRTIO_ID_BLOCK => "virtio-blk".into(),
        VIRTIO_ID_RNG => "virtio-rng".into(),
        VIRTIO_ID_VSOCK => "virtio-vsock".into(),
        other => format!("virtio device type {other}"),
    }
}

/// [`VirtioDevice::saved_queues`] for a device that keeps its [`ActiveDevice`] in an
/// `Option`.
pub(crate) fn active_queue_states(active: Option<&ActiveDevice>) -> Vec<QueueState> {
    active.map_or_else(Vec::new, |a| a.queues.iter().map(|q| q.state()).collect())
}

/// A device's interrupt: the interrupt status bits the driver reads (§4.2.2 InterruptStatus;
/// the same bits as virtio-pci's ISR, §4.1.4.5), the DEVICE_NEEDS_RESET condition, and the
/// eventfd that raises the guest interrupt line.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            evt,
        }
    }

    /// The device used buffers in a queue.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// The device configuration (or the device status) changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The device hit an error it cannot recover from without a reset (§2.1.1): sets
    /// DEVICE_NEEDS_RESET and tells the driver with a configuration-change interrupt.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The pending interrupt causes.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged the causes in `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Puts back a saved interrupt status and DEVICE_NEEDS_RESET condition; a pending cause
    /// raises the line again, so the guest sees it on the new machine.
    pub(crate) fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        if status != 0
            && let Err(e) = self.evt.write(1)
        {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }
}

/// Reads `data.len()` bytes at `offset` of a device's configuration space `config`; bytes
/// beyond its end read as zero (a driver probing past the end learns nothing and breaks
/// nothing).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_status_is_raised_and_acked_per_bit() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Interrupt::new(evt.try_clone().unwrap());
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), 3);
        assert_eq!(evt.read().unwrap(), 2);
        irq.ack(1);
        assert_eq!(irq.status(), 2);
        irq.set_needs_reset();
        assert!(irq.needs_reset());
        irq.reset();
        assert_eq!(irq.status(), 0);
        assert!(!irq.needs_reset());
    }

    #[test]
    fn a_restored_pending_interrupt_raises_the_line() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Interrupt::new(evt.try_clone().unwrap());
        irq.restore(0, true);
        assert!(irq.needs_reset());
        assert!(evt.read().is_err(), "nothing pending: no interrupt");
        irq.restore(VIRTIO_MMIO_INT_VRING, false);
        assert_eq!((irq.status(), irq.needs_reset()), (1, false));
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
