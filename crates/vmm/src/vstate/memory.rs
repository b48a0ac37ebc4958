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

/// The size of the runs [`save_guest_memory`] checks for zeros.
const SAVE_CHUNK: usize = 64 << 10;

/// Writes guest RAM to `out`, its ranges one after the other (the layout
/// [`map_guest_memory`] maps back), leaving holes where a whole chunk is zero; the file's size
/// is set to the RAM's. Returns that size.
pub fn save_guest_memory(mem: &GuestMemoryMmap, out: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};
    out.set_len(0)?;
    let mut buf = vec![0u8; SAVE_CHUNK];
    let mut offset = 0u64;
    for region in mem.iter() {
        let start = region.start_addr();
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(SAVE_CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(start.0 + done))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            if buf[..n].iter().any(|&b| b != 0) {
                out.write_all_at(&buf[..n], offset + done)?;
            }
            done += n as u64;
        }
        offset += len;
    }
    out.set_len(offset)?;
    Ok(offset)
}

/// Maps `file` (written by [`save_guest_memory`] for `size` bytes of RAM) as guest RAM,
/// privately: pages are read from the file when the guest first touches them, and what the
/// guest writes stays in this process (copy-on-write), so the file serves any number of
/// machines and never changes.
pub fn map_guest_memory(file: &std::fs::File, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    use vm_memory::mmap::MmapRegion;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let fail = |detail: String| MemoryError {
        mib: size >> 20,
        detail,
    };
    let len = file
        .metadata()
        .map_err(|e| fail(format!("the memory file: {e}")))?
        .len();
    if len != size {
        return Err(fail(format!(
            "the memory file has {len} bytes where the machine has {size} bytes of RAM"
        )));
    }
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size) {
        let clone = file
            .try_clone()
            .map_err(|e| fail(format!("the memory file: {e}")))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(clone, offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| fail(format!("mapping the memory file: {e}")))?;
        regions.push(
            GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| fail("a memory region wraps the address space".into()))?,
        );
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| fail(e.to_string()))
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
    fn saved_memory_maps_back_privately_with_holes_for_zeros() {
        use std::os::unix::fs::MetadataExt;
        use vm_memory::Bytes;
        let mem = create_guest_memory(8 << 20).unwrap();
        mem.write_slice(b"first", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"last", GuestAddress((8 << 20) - 4))
            .unwrap();
        let file = tempfile::tempfile().unwrap();
        assert_eq!(save_guest_memory(&mem, &file).unwrap(), 8 << 20);
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 8 << 20);
        // Two chunks hold data; the rest are holes.
        assert!(
            meta.blocks() * 512 <= 4 * SAVE_CHUNK as u64,
            "{}",
            meta.blocks()
        );
        let copy = map_guest_memory(&file, 8 << 20).unwrap();
        let mut b = [0u8; 5];
        copy.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"first");
        copy.read_slice(&mut b[..4], GuestAddress((8 << 20) - 4))
            .unwrap();
        assert_eq!(&b[..4], b"last");
        // A write stays in the copy.
        copy.write_slice(b"again", GuestAddress(0x1000)).unwrap();
        let other = map_guest_memory(&file, 8 << 20).unwrap();
        other.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"first");
        // A file of another size is refused, naming both.
        let err = map_guest_memory(&file, 16 << 20).unwrap_err().to_string();
        assert!(
            err.contains("8388608 bytes") && err.contains("16777216"),
            "{err}"
        );
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
