//! What the fuzz targets share: guest-controlled descriptor tables decoded from fuzzer input.

use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;

/// Bytes of input per descriptor: addr (u64), len (u32), flags (u16), next (u16).
pub const DESC_BYTES: usize = 16;

fn u64_at(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// The descriptors of `table` (`DESC_BYTES` each). Addresses are mostly folded into
/// `data_start..mem_size`, where the fuzzer's memory contents are; an address with its top bit
/// set is kept as is (likely outside guest memory). Lengths stay below 128 KiB.
pub fn descriptors(table: &[u8], data_start: u64, mem_size: u64) -> Vec<RawDescriptor> {
    table
        .chunks_exact(DESC_BYTES)
        .map(|d| {
            let raw = u64_at(d);
            let addr = if raw >> 63 == 0 {
                data_start + raw % (mem_size - data_start)
            } else {
                raw
            };
            let len = u32::from_le_bytes([d[8], d[9], d[10], d[11]]) % 0x2_0000;
            let flags = u16::from_le_bytes([d[12], d[13]]);
            let next = u16::from_le_bytes([d[14], d[15]]);
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect()
}

/// Whether any descriptor refers to an indirect table. Such a table comes from guest memory,
/// so it can point the device's writes at the rings themselves; then only "no panic" holds.
pub fn has_indirect(descs: &[RawDescriptor]) -> bool {
    descs
        .iter()
        .any(|d| Descriptor::from(*d).flags() & VRING_DESC_F_INDIRECT as u16 != 0)
}
