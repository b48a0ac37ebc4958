//! Fuzzes what a restore puts back from a snapshot's state file, which may come from another
//! host (`cela snapshot import`): a virtio-mmio transport's registers and queues, with the
//! device state of an entropy, block or vsock device (carried connections and resets), and a
//! UART's registers, all built field by field from the input (structure-aware, so most inputs
//! reach the checks past the parser). A restore must refuse or succeed, never panic; a device
//! that took the state must then serve its queues and host events without panicking either.
//! Run: `cargo +nightly fuzz run snapshot_state` in this directory.

#![no_main]

use std::sync::{Arc, Mutex};

use cela_vmm::devices::legacy::serial::Serial;
use cela_vmm::devices::virtio::VirtioDevice;
use cela_vmm::devices::virtio::block::{Block, DiskImage};
use cela_vmm::devices::virtio::mmio::MmioTransport;
use cela_vmm::devices::virtio::rng::Rng;
use cela_vmm::devices::virtio::vsock::{PortHandler, Vsock};
use cela_vmm::devices::virtio::vsock::conn::State;
use cela_vmm::persist::devices::{
    ConnSnapshot, DeviceState, MmioState, QueueSnapshot, SerialSnapshot, VsockState,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x4_0000;
/// The internal port the vsock device serves (cela-init's control port).
const PORT: u32 = 0x4345_4c00;

/// Reads the input as little-endian fields; zeros once it runs out.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = self.0.len().min(N);
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    /// An address: mostly inside guest memory, sometimes anywhere.
    fn addr(&mut self) -> u64 {
        let raw = self.u64();
        if raw >> 63 == 0 { raw % MEM_SIZE as u64 } else { raw }
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (usize::from(self.u16()) % (max + 1)).min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.to_vec()
    }
}

fn queue(f: &mut Fields) -> QueueSnapshot {
    QueueSnapshot {
        max_size: if f.bool() { 256 } else { f.u16() },
        next_avail: f.u16(),
        next_used: f.u16(),
        event_idx_enabled: f.bool(),
        size: 1 << (f.u8() % 10),
        ready: f.bool(),
        desc_table: f.addr() & !0xf,
        avail_ring: f.addr() & !0x1,
        used_ring: f.addr() & !0x3,
    }
}

fn conn(f: &mut Fields) -> ConnSnapshot {
    let state = match f.u8() % 3 {
        0 => State::Connecting,
        1 => State::Established,
        _ => State::Closing,
    };
    ConnSnapshot {
        local_port: if f.bool() { PORT } else { f.u32() },
        peer_port: f.u32(),
        guest_cid: if f.bool() { 3 } else { f.u64() },
        state,
        need_request: f.bool(),
        need_response: f.bool(),
        need_credit_update: f.bool(),
        need_rst: f.bool(),
        shutdown_to_send: f.u32() & 0x7,
        guest_shutdown: f.u32() & 0x7,
        host_eof: f.bool(),
        host_write_shut: f.bool(),
        pending: f.bytes(4096),
        rx_cnt: f.u32(),
        fwd_cnt: f.u32(),
        last_fwd_cnt_sent: f.u32(),
        peer_buf_alloc: f.u32(),
        peer_fwd_cnt: f.u32(),
        tx_cnt: f.u32(),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut f = Fields(data);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let kind = f.u8() % 3;
    let device: Arc<Mutex<dyn VirtioDevice>> = match kind {
        0 => Arc::new(Mutex::new(Rng::new())),
        1 => {
            let file = tempfile::tempfile().unwrap();
            file.set_len(16 * 512).unwrap();
            let disk = DiskImage::new(file, "fuzz.img".as_ref(), false).unwrap();
            Arc::new(Mutex::new(Block::new(disk)))
        }
        _ => {
            let handler: PortHandler = Box::new(|_stream| {});
            Arc::new(Mutex::new(Vsock::new(3, None, vec![(PORT, handler)]).unwrap()))
        }
    };
    let queues = (0..f.u8() % 5).map(|_| queue(&mut f)).collect();
    let device_state = match f.u8() % 3 {
        0 => DeviceState::None,
        _ => DeviceState::Vsock(VsockState {
            connections: (0..f.u8() % 4).map(|_| conn(&mut f)).collect(),
            reset: (0..f.u8() % 8).map(|_| (f.u32(), f.u32())).collect(),
        }),
    };
    let state = MmioState {
        device_type: if f.bool() { [4, 2, 19][usize::from(kind)] } else { f.u32() },
        device_features_select: f.u32(),
        driver_features: f.u64(),
        driver_features_select: f.u32(),
        queue_select: f.u32(),
        status: f.u32() & 0xff,
        config_generation: f.u32(),
        active: f.bool(),
        interrupt_status: f.u32() & 0x3,
        needs_reset: f.bool(),
        queues,
        device: device_state,
    };
    let mut transport =
        MmioTransport::new(device.clone(), mem, EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap()).unwrap();
    if transport.restore(&state).is_ok() {
        // What the device thread then does with it.
        let mut d = device.lock().unwrap();
        let count = d.queue_max_sizes().len();
        for i in 0..count {
            d.process_queue(i);
        }
        d.process_host_event(0);
    }

    let uart = SerialSnapshot {
        baud_divisor_low: f.u8(),
        baud_divisor_high: f.u8(),
        interrupt_enable: f.u8(),
        interrupt_identification: f.u8(),
        line_control: f.u8(),
        line_status: f.u8(),
        modem_control: f.u8(),
        modem_status: f.u8(),
        scratch: f.u8(),
        in_buffer: f.bytes(128),
    };
    let (serial, _input) = Serial::new(
        EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
        Box::new(std::io::sink()),
    );
    let _ = serial.lock().unwrap().restore(&uart);
});
