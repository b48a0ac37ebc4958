//! Fuzzes the virtio-vsock device (virtio 1.2 §5.10): the input is a sequence of packets the
//! guest sends (header fields and payload, with the CIDs and ports mostly plausible so the
//! fuzzer reaches the connection state machine: requests to an internal port, data, credit,
//! shutdowns, resets, unknown ops), interleaved with receive buffers of fuzzed sizes and with
//! the host end writing or closing. Also `Header::parse`/`check_from_guest` on raw bytes.
//! Nothing may panic; every transmit chain is returned.
//! Run: `cargo +nightly fuzz run vsock_packets` in this directory.

#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use cela_vmm::devices::virtio::vsock::packet::{HEADER_LEN, HOST_CID, Header};
use cela_vmm::devices::virtio::vsock::{PortHandler, Vsock};
use cela_vmm::devices::virtio::{ActiveDevice, Interrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x40_0000;
const QLEN: u16 = 256;
const GUEST_CID: u64 = 3;
const PORT: u32 = 1;

fuzz_target!(|data: &[u8]| {
    if let Some(h) = Header::parse(data) {
        let _ = h.check_from_guest(GUEST_CID, data.len() - HEADER_LEN);
        assert_eq!(Header::parse(&h.to_bytes()), Some(h));
    }

    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let rx = MockSplitQueue::create(&mem, GuestAddress(0), QLEN);
    let tx = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), QLEN);
    let ev = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), QLEN);
    let hosts: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
    let keep = hosts.clone();
    let handler: PortHandler = Box::new(move |s| keep.lock().unwrap().push(s));
    let mut dev = Vsock::new(GUEST_CID, None, vec![(PORT, handler)]).unwrap();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    dev.activate(ActiveDevice {
        mem: mem.clone(),
        queues: vec![
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            ev.create_queue().unwrap(),
        ],
        acked_features: 0,
        interrupt: interrupt.clone(),
    })
    .unwrap();

    let (mut next_tx, mut next_rx) = (0u16, 0u16);
    let mut addr = 0x10_0000u64;
    let mut input = data;
    let mut steps = 0;
    while let Some((&kind, rest)) = input.split_first() {
        steps += 1;
        if steps > 200 || addr > (MEM_SIZE as u64) - 0x2_0000 {
            break;
        }
        input = rest;
        match kind % 4 {
            // A packet from the guest: 20 bytes of fields, then `len % 512` payload bytes.
            0 | 1 => {
                let Some((f, rest)) = input.split_at_checked(20) else { break };
                input = rest;
                let u32_at = |i: usize| u32::from_le_bytes(f[i..i + 4].try_into().unwrap());
                let plausible = f[0] & 0x80 == 0;
                let h = Header {
                    src_cid: if plausible { GUEST_CID } else { u64::from(f[1]) },
                    dst_cid: if plausible { HOST_CID } else { u64::from(f[2]) },
                    src_port: u32::from(f[3] % 4),
                    dst_port: if f[0] & 0x40 == 0 { PORT } else { u32_at(4) },
                    len: u32_at(8) % 600,
                    type_: if plausible { 1 } else { u16::from(f[12]) },
                    op: u16::from(f[13] % 9),
                    flags: u32::from(f[14]),
                    buf_alloc: u32_at(15) % (1 << 20),
                    fwd_cnt: u32::from(f[19]) * 100,
                };
                let carried = (h.len as usize).min(input.len());
                let (payload, rest) = input.split_at(if f[0] & 0x20 == 0 { carried } else { 0 });
                input = rest;
                let mut bytes = h.to_bytes().to_vec();
                bytes.extend_from_slice(payload);
                // Sometimes cut the packet short.
                if f[0] & 0x10 != 0 {
                    bytes.truncate(usize::from(f[19]) % (bytes.len() + 1));
                }
                mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
                let d = Descriptor::new(addr, bytes.len() as u32, 0, 0);
                addr += (bytes.len() as u64 + 64).next_multiple_of(64);
                tx.add_desc_chains(&[RawDescriptor::from(d)], next_tx % QLEN).unwrap();
                next_tx = next_tx.wrapping_add(1);
                dev.process_queue(1);
            }
            // Receive buffers of fuzzed sizes.
            2 => {
                let Some((&size, rest)) = input.split_first() else { break };
                input = rest;
                let len = u32::from(size) * 32;
                let d = Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0);
                addr += u64::from(len).next_multiple_of(64) + 64;
                rx.add_desc_chains(&[RawDescriptor::from(d)], next_rx % QLEN).unwrap();
                next_rx = next_rx.wrapping_add(1);
                dev.process_queue(0);
            }
            // The host end of a connection writes or goes away.
            _ => {
                let Some((&what, rest)) = input.split_first() else { break };
                input = rest;
                let mut hosts = hosts.lock().unwrap();
                if !hosts.is_empty() {
                    let i = usize::from(what) % hosts.len();
                    if what & 1 == 0 {
                        let _ = hosts[i].write_all(&[what; 100]);
                    } else {
                        hosts.swap_remove(i);
                    }
                }
                drop(hosts);
                dev.process_host_event(0);
            }
        }
    }
    let avail_idx: u16 = mem.read_obj(tx.avail_addr().unchecked_add(2)).unwrap();
    let used_idx: u16 = mem.read_obj(tx.used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used_idx, avail_idx, "every transmit chain is returned");
    assert!(!interrupt.needs_reset());
});
