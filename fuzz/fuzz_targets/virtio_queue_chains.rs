//! Fuzzes the split-queue handling every cela device relies on (`serve_queue` over
//! `virtio-queue`, virtio 1.2 §2.7) with guest memory that is entirely guest-controlled: the
//! descriptor table, the available ring (its index included) and the buffers are fuzz bytes,
//! and the queue size and ring addresses are chosen by the input. The handler reads and writes
//! each chain through `Reader`/`Writer` as devices do, and also gives chains back
//! (`go_to_previous_position`, as the vsock receive path does). Nothing may panic.
//! Run: `cargo +nightly fuzz run virtio_queue_chains` in this directory.

#![no_main]

use std::io::{Read, Write};

use cela_vmm::devices::virtio::{Interrupt, serve_queue};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x2_0000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (control, contents) = data.split_at(8);
    // Queue size: a power of two from 1 to 256.
    let size = 1u16 << (control[0] % 9);
    // Ring addresses anywhere in (or just past) memory, aligned as the spec requires or not.
    let addr = |b: &[u8]| u64::from(u16::from_le_bytes([b[0], b[1]])) * 2;
    let (desc, avail, used) = (addr(&control[1..]), addr(&control[3..]), addr(&control[5..]));
    let give_back = control[7] & 1 != 0;

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = contents.len().min(MEM_SIZE);
    mem.write_slice(&contents[..n], GuestAddress(0)).unwrap();

    let mut queue = Queue::new(256).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_ready(true);
    if !queue.is_valid(&mem) {
        return;
    }
    let interrupt = Interrupt::new(EventFd::new(0).unwrap());

    if give_back {
        // Pop one chain, look at it, hand it back, and pop it again.
        if let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let _ = chain.writer(&mem).map(|w| w.available_bytes());
            queue.go_to_previous_position();
            let again = queue.pop_descriptor_chain(&mem).map(|c| c.head_index());
            assert_eq!(again, Some(head));
            queue.go_to_previous_position();
        }
    }
    let mut served = 0u32;
    serve_queue("fuzz", &mut queue, &mem, &interrupt, |chain| {
        served += 1;
        assert!(served <= 65536, "a queue of {size} cannot yield this many chains");
        let mut written = 0;
        if let Ok(mut r) = chain.clone().reader(&mem) {
            let mut buf = vec![0u8; r.available_bytes().min(4096)];
            let _ = r.read(&mut buf);
        }
        if let Ok(mut w) = chain.writer(&mem) {
            let buf = vec![0xa5u8; w.available_bytes().min(4096)];
            if w.write_all(&buf).is_ok() {
                written = buf.len() as u32;
            }
        }
        written
    });
});
