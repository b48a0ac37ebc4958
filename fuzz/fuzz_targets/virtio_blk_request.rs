//! Fuzzes the virtio-blk device (virtio 1.2 §5.2) with guest-controlled descriptor tables and
//! memory contents: arbitrary addresses, lengths, flags and `next` links (loops included), and
//! arbitrary request headers and data. The device must never panic, and must return every chain
//! it pops. Run: `cargo +nightly fuzz run virtio_blk_request` in this directory.

#![no_main]

mod common;

use std::sync::Arc;

use cela_vmm::devices::virtio::block::{Block, DiskImage};
use cela_vmm::devices::virtio::{ActiveDevice, Interrupt, VirtioDevice};
use common::{DESC_BYTES, descriptors};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x4_0000;
const QUEUE_SIZE: u16 = 16;
/// Guest memory the fuzzer fills (the rings sit below it).
const DATA_START: u64 = 0x1_0000;
/// Where the used ring goes: below the data area, clear of the mock's other rings.
const USED_RING: u64 = 0x8000;

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let read_only = control & 1 != 0;
    let count = usize::from(control >> 1) % usize::from(QUEUE_SIZE) + 1;
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
    // The mock places the used ring right after `len` bytes of the avail ring (not its size in
    // bytes), so a full avail ring would overlap it; put the used ring well apart.
    let used_ring = GuestAddress(USED_RING);
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));

    let file = tempfile::tempfile().unwrap();
    file.set_len(16 * 512).unwrap();
    let disk = DiskImage::new(file, "fuzz.img".as_ref(), read_only).unwrap();
    let mut blk = Block::new(disk);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    blk.activate(ActiveDevice {
        mem: mem.clone(),
        queues: vec![queue],
        acked_features: 0,
        interrupt: interrupt.clone(),
    })
    .unwrap();
    blk.process_queue(0);

    // An indirect table (cela does not offer VIRTIO_F_INDIRECT_DESC, but `virtio-queue` follows
    // one) comes from guest memory, so it can point the device's writes at the rings themselves;
    // then only "no panic" holds. Otherwise every chain is returned.
    let indirect = common::has_indirect(&descs);
    if !indirect {
        let avail_idx: u16 = mem.read_obj(vq.avail_addr().unchecked_add(2)).unwrap();
        let used_idx: u16 = mem.read_obj(used_ring.unchecked_add(2)).unwrap();
        assert_eq!(used_idx, avail_idx, "every available chain is returned");
        assert!(!interrupt.needs_reset());
    }
});
