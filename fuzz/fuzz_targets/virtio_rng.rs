//! Fuzzes the virtio entropy device (virtio 1.2 §5.4) with guest-controlled descriptor tables
//! (arbitrary addresses, lengths, flags and links, loops and indirect tables included). The
//! device must never panic and must return every chain it pops.
//! Run: `cargo +nightly fuzz run virtio_rng` in this directory.

#![no_main]

mod common;

use std::sync::Arc;

use cela_vmm::devices::virtio::rng::Rng;
use cela_vmm::devices::virtio::{ActiveDevice, Interrupt, VirtioDevice};
use common::{DESC_BYTES, descriptors, has_indirect};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x4_0000;
const QUEUE_SIZE: u16 = 16;
/// Guest memory the fuzzer fills (the rings sit below it).
const DATA_START: u64 = 0x1_0000;
/// Where the used ring goes: clear of the mock's other rings (see virtio_blk_request).
const USED_RING: u64 = 0x8000;

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(control) % usize::from(QUEUE_SIZE) + 1;
    if rest.len() < count * DESC_BYTES {
        return;
    }
    let (table, contents) = rest.split_at(count * DESC_BYTES);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let descs = descriptors(table, DATA_START, MEM_SIZE as u64);
    if vq.add_desc_chains(&descs, 0).is_err() {
        return;
    }
    let n = contents.len().min(MEM_SIZE - DATA_START as usize);
    mem.write_slice(&contents[..n], GuestAddress(DATA_START))
        .unwrap();
    let mut queue: virtio_queue::Queue = vq.create_queue().unwrap();
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));

    let mut rng = Rng::new();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    rng.activate(ActiveDevice {
        mem: mem.clone(),
        queues: vec![queue],
        acked_features: 0,
        interrupt: interrupt.clone(),
    })
    .unwrap();
    rng.process_queue(0);

    // Through an indirect table the device's writes can hit the rings: then only "no panic".
    if !has_indirect(&descs) {
        let avail_idx: u16 = mem.read_obj(vq.avail_addr().unchecked_add(2)).unwrap();
        let used_idx: u16 = mem
            .read_obj(GuestAddress(USED_RING).unchecked_add(2))
            .unwrap();
        assert_eq!(used_idx, avail_idx, "every available chain is returned");
        assert!(!interrupt.needs_reset());
    }
});
