//! Guest RAM: anonymous host memory mapped into the guest's physical address space, split
//! around the 32-bit MMIO hole ([`layout::MMIO_HOLE_START`]..4 GiB) so that device windows
//! (IOAPIC, local APIC, virtio) never overlap RAM.

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::arch::x86_64::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Why guest memory could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot allocate {mib} MiB of guest memory: {detail}")]
pub struct MemoryError {
    pub mib: u64,
    pub detail: String,
}

/// The (start, length) ranges of guest RAM for `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// Maps `size` bytes of anonymous memory as guest RAM. Pages are only backed by host memory
/// when the guest first touches them.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|e| MemoryError {
        mib: size >> 20,
        detail: e.to_string(),
    })
}

/// Bytes of guest RAM currently backed by host pages (mincore(2) over every region).
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let mut total = 0;
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let pages = region.len().div_ceil(page) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: [host, host + len) is one live mapping owned by `mem`, page-aligned because
        // mmap returned it, and `vec` has one byte per page of it as mincore requires.
        let rc = unsafe { libc::mincore(host.cast(), region.len() as usize, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| *b & 1 == 1).count() as u64 * page;
        }
    }
    total
}

/// The monitor process's peak RSS in bytes (ru_maxrss).
pub fn peak_rss_bytes() -> Option<u64> {
    // getrusage rather than /proc/self/status: a jailed monitor has no /proc.
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).ok()?;
    u64::try_from(usage.max_rss()).ok().map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_touched_pages_are_resident() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(resident_bytes(&mem), 0);
        for i in 0..10u64 {
            mem.write_obj(1u8, GuestAddress(i << 20)).unwrap();
        }
        assert_eq!(resident_bytes(&mem), 10 * 4096);
        assert!(peak_rss_bytes().unwrap() > 0);
    }

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let r = ram_ranges(5 << 30);
        assert_eq!(r[0], (GuestAddress(0), 3 << 30));
        assert_eq!(r[1], (GuestAddress(4 << 30), 2 << 30));
    }
}
