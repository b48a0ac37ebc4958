//! The virtio entropy device (virtio 1.2 §5.4, device ID 4): one queue, `requestq`, on which
//! the driver places device-writable buffers; the device fills each with random bytes from the
//! host's `getrandom(2)` and returns it with the number of bytes written. No feature bits and
//! no configuration space. Linux's `virtio_rng` driver registers it as a `hw_random` source
//! (/dev/hwrng), which also feeds the guest's entropy pool at boot.

use std::io::Write;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::{ActivateError, ActiveDevice, VirtioDevice};

/// The queue size offered to the driver.
const QUEUE_SIZE: u16 = 256;
/// The most bytes given out per request: a buffer can be up to 4 GiB, and there is no reason
/// to let one request tie the device thread up for long.
const MAX_REQUEST_BYTES: usize = 64 << 10;

/// An entropy device backed by the host's `getrandom`.
#[derive(Default)]
pub struct Rng {
    active: Option<ActiveDevice>,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Fills `buf` from the host's entropy source.
fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes owned by this
        // function's caller; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, active: ActiveDevice) -> Result<(), ActivateError> {
        active.require_queues(1)?;
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn saved_queues(&self) -> Vec<virtio_queue::QueueState> {
        super::active_queue_states(self.active.as_ref())
    }

    fn process_queue(&mut self, index: usize) {
        let Some(ActiveDevice {
            mem,
            queues,
            interrupt,
            ..
        }) = &mut self.active
        else {
            return;
        };
        let Some(queue) = queues.get_mut(index).filter(|_| index == 0) else {
            return;
        };
        super::serve_queue("virtio-rng", queue, mem, interrupt, |chain| {
            // A chain whose buffers are not in guest memory (or not writable) fails this
            // request: it is returned with nothing written.
            match chain.writer(mem) {
                Ok(mut w) => {
                    let mut bytes = vec![0u8; w.available_bytes().min(MAX_REQUEST_BYTES)];
                    match host_random(&mut bytes).and_then(|()| w.write_all(&bytes)) {
                        Ok(()) => bytes.len() as u32,
                        Err(e) => {
                            tracing::warn!("virtio-rng: request failed: {e}");
                            0
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!("virtio-rng: malformed request: {e}");
                    0
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use crate::devices::virtio::Interrupt;

    struct Setup {
        mem: GuestMemoryMmap,
        evt: EventFd,
        rng: Rng,
        interrupt: Arc<Interrupt>,
        used_ring: GuestAddress,
    }

    fn setup(descs: &[RawDescriptor]) -> Setup {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let q = vq.create_queue().unwrap();
        let used_ring = vq.used_addr();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(evt.try_clone().unwrap()));
        let mut rng = Rng::new();
        rng.activate(ActiveDevice {
            mem: mem.clone(),
            queues: vec![q],
            acked_features: 0,
            interrupt: interrupt.clone(),
        })
        .unwrap();
        Setup {
            mem,
            evt,
            rng,
            interrupt,
            used_ring,
        }
    }

    /// The (id, len) of used-ring element `slot`.
    fn used(s: &Setup, slot: u64) -> (u32, u32) {
        let elem = s.used_ring.unchecked_add(4 + 8 * slot);
        let id: u32 = s.mem.read_obj(elem).unwrap();
        let len: u32 = s.mem.read_obj(elem.unchecked_add(4)).unwrap();
        (id, len)
    }

    #[test]
    fn fills_writable_buffers_and_interrupts() {
        let w = VRING_DESC_F_WRITE as u16;
        let mut s = setup(&[RawDescriptor::from(Descriptor::new(0x8000, 32, w, 0))]);
        s.rng.process_queue(0);
        assert_eq!(used(&s, 0), (0, 32));
        let mut got = [0u8; 32];
        s.mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_ne!(got, [0u8; 32]);
        assert_eq!(s.interrupt.status(), 1);
        assert_eq!(s.evt.read().unwrap(), 1);
    }

    #[test]
    fn a_buffer_outside_guest_memory_fails_only_that_request() {
        let w = VRING_DESC_F_WRITE as u16;
        let mut s = setup(&[
            RawDescriptor::from(Descriptor::new(0xfff0_0000, 32, w, 0)),
            RawDescriptor::from(Descriptor::new(0x8000, 16, w, 0)),
        ]);
        s.rng.process_queue(0);
        assert_eq!(used(&s, 0), (0, 0));
        assert_eq!(used(&s, 1), (1, 16));
        assert!(!s.interrupt.needs_reset());
    }

    #[test]
    fn read_only_buffers_get_nothing() {
        let mut s = setup(&[RawDescriptor::from(Descriptor::new(0x8000, 32, 0, 0))]);
        s.rng.process_queue(0);
        assert_eq!(used(&s, 0), (0, 0));
    }

    #[test]
    fn notifications_before_activation_or_for_other_queues_are_ignored() {
        let mut rng = Rng::new();
        rng.process_queue(0);
        let mut s = setup(&[]);
        s.rng.process_queue(7);
        s.rng.reset();
        s.rng.process_queue(0);
    }
}
