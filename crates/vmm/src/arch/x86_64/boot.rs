//! Loading Linux the way a boot loader does for the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): check the bzImage's setup header, copy the protected-mode
//! kernel to 1 MiB, place the initramfs at the top of low memory, write the command line, and
//! fill the "zero page" (`struct boot_params`) with the header, the initramfs location, the
//! command line pointer, the e820 memory map and the ACPI RSDP address.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{KernelLoader, bzimage::BzImage};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_HOLE_START, RSDP_START,
    ZERO_PAGE_START,
};

/// Offset of the setup header in a bzImage, and the fields this module checks.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS" at 0x202
const BOOT_FLAG_MAGIC: u16 = 0xaa55; // at 0x1fe
/// 2.12 is the first protocol version with `xloadflags`, which says whether the kernel has a
/// 64-bit entry point.
const MIN_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
const LOADFLAGS_LOADED_HIGH: u8 = 1 << 0;
/// The 64-bit entry point is 0x200 bytes past the start of the protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;
/// "Undefined" boot loader id: cela has no registered id.
const TYPE_OF_LOADER_UNDEFINED: u8 = 0xff;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Why a kernel or initramfs could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel image {path}: {source}")]
    KernelIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "kernel image {path} is not a bzImage: {detail} (cela boots x86 bzImages, Linux boot protocol 2.12 or later)"
    )]
    NotBzImage { path: PathBuf, detail: String },
    #[error(
        "kernel image {path} needs {needed} MiB of guest memory to decompress and run, but the VM has {have} MiB"
    )]
    KernelTooLarge {
        path: PathBuf,
        needed: u64,
        have: u64,
    },
    #[error("loading kernel image {path} into guest memory failed: {detail}")]
    KernelLoad { path: PathBuf, detail: String },
    #[error("cannot read initramfs {path}: {source}")]
    InitrdIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel; give the VM more memory"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("kernel command line is {len} bytes; the kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing {what} into guest memory failed: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// A kernel placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The 64-bit entry point (RIP at boot).
    pub entry: u64,
    /// End of the kernel's footprint once decompressed (load address + init_size).
    pub end: u64,
    /// The setup header as the boot loader must hand it back in the zero page.
    pub header: setup_header,
}

/// Reads and checks the setup header of `path` without loading it.
pub fn read_setup_header(path: &Path) -> Result<setup_header, BootError> {
    let io = |source| BootError::KernelIo {
        path: path.to_owned(),
        source,
    };
    let not = |detail: String| BootError::NotBzImage {
        path: path.to_owned(),
        detail,
    };
    let mut file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let header_end = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>() as u64;
    if len < header_end {
        return Err(not(format!(
            "the file has {len} bytes, too short for a setup header"
        )));
    }
    file.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(io)?;
    let mut raw = vec![0u8; std::mem::size_of::<setup_header>()];
    file.read_exact(&mut raw).map_err(io)?;
    let header = *setup_header::from_slice(&raw).expect("buffer has the header's size");
    check_setup_header(&header).map_err(not)?;
    Ok(header)
}

/// Checks what cela relies on: the HdrS magic, a protocol version with a 64-bit entry point,
/// and a kernel that loads high.
fn check_setup_header(h: &setup_header) -> Result<(), String> {
    let magic = h.header;
    if magic != HDRS_MAGIC {
        return Err(format!(
            "no \"HdrS\" magic at offset 0x202 (found {:02x?})",
            magic.to_le_bytes()
        ));
    }
    let boot_flag = h.boot_flag;
    if boot_flag != BOOT_FLAG_MAGIC {
        return Err(format!(
            "boot flag at 0x1fe is {boot_flag:#06x}, expected 0xaa55"
        ));
    }
    let version = h.version;
    if version < MIN_PROTOCOL {
        return Err(format!(
            "boot protocol {}.{:02} is older than 2.12",
            version >> 8,
            version & 0xff
        ));
    }
    let xloadflags = h.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err("the kernel has no 64-bit entry point (XLF_KERNEL_64 is clear)".into());
    }
    if h.loadflags & LOADFLAGS_LOADED_HIGH == 0 {
        return Err("the kernel is a zImage that loads below 1 MiB".into());
    }
    Ok(())
}

/// Loads the bzImage at `path` to [`HIMEM_START`], after checking it fits in `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let header = read_setup_header(path)?;
    let init_size = u64::from(header.init_size);
    let ram = low_ram_end(mem);
    // Room for the decompressed kernel and a working margin for its early allocations.
    let needed = HIMEM_START + init_size + (16 << 20);
    if needed > ram {
        return Err(BootError::KernelTooLarge {
            path: path.to_owned(),
            needed: needed.div_ceil(1 << 20),
            have: mem_size(mem) >> 20,
        });
    }
    let mut file = File::open(path).map_err(|source| BootError::KernelIo {
        path: path.to_owned(),
        source,
    })?;
    let result = BzImage::load(
        mem,
        Some(GuestAddress(HIMEM_START)),
        &mut file,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| BootError::KernelLoad {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    let mut header = result.setup_header.unwrap_or(header);
    header.type_of_loader = TYPE_OF_LOADER_UNDEFINED;
    header.code32_start = HIMEM_START as u32;
    Ok(LoadedKernel {
        entry: result.kernel_load.raw_value() + ENTRY_64_OFFSET,
        end: HIMEM_START + init_size.max(result.kernel_end - HIMEM_START),
        header,
    })
}

/// Total guest RAM in bytes.
pub fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// End of the RAM below the 32-bit MMIO hole.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.last_addr().raw_value().min(MMIO_HOLE_START - 1) + 1
}

/// Copies the initramfs at `path` to the highest page-aligned address in low memory that the
/// kernel accepts (`initrd_addr_max`) and that lies above the kernel. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), BootError> {
    let io = |source| BootError::InitrdIo {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::other("not a regular file")));
    }
    let size = meta.len();
    let max = u64::from(kernel.header.initrd_addr_max).max(0x37ff_ffff);
    let limit = low_ram_end(mem).min(max + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel.end)
        .ok_or_else(|| BootError::InitrdTooLarge {
            path: path.to_owned(),
            size,
            limit,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::Memory {
            what: "the initramfs",
            source,
        })?;
    Ok((addr, size))
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`]; returns its length.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::Memory {
            what: "the command line",
            source,
        })?;
    Ok(cmdline.len())
}

/// The e820 map for `mem`: RAM below the EBDA, the BIOS area up to 1 MiB reserved (the ACPI
/// tables live there), RAM from 1 MiB up to the MMIO hole, and RAM above 4 GiB.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.last_addr().raw_value() + 1;
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Fills and writes the zero page.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: kernel.header,
        ..Default::default()
    };
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = RSDP_START;
    let map = e820_map(mem);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::Memory {
            what: "the zero page",
            source,
        })
}

#[cfg(test)]
pub(crate) mod tests_support {
    use std::io::Write;

    /// A minimal valid-looking bzImage (protocol 2.15, 64-bit entry, 4 MiB init_size).
    pub(crate) fn fake_bzimage() -> tempfile::NamedTempFile {
        fake_bzimage_with(0x020f, 1)
    }

    /// A minimal file with a setup header of the given protocol version and xloadflags.
    pub(crate) fn fake_bzimage_with(version: u16, xloadflags: u16) -> tempfile::NamedTempFile {
        let mut img = vec![0u8; 0x1000];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&(4u32 << 20).to_le_bytes()); // init_size
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&img).unwrap();
        f
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::fake_bzimage_with as fake_bzimage;
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use std::io::Write;

    #[test]
    fn rejects_files_that_are_not_bzimages() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x7f, b'E', b'L', b'F']).unwrap();
        let err = read_setup_header(f.path()).unwrap_err().to_string();
        assert!(
            err.contains("not a bzImage") && err.contains("too short"),
            "{err}"
        );
        f.write_all(&vec![0u8; 0x1000]).unwrap();
        let err = read_setup_header(f.path()).unwrap_err().to_string();
        assert!(err.contains("\"HdrS\" magic at offset 0x202"), "{err}");
    }

    #[test]
    fn rejects_old_protocols_and_32_bit_only_kernels() {
        let err = read_setup_header(fake_bzimage(0x020a, 1).path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("2.10 is older than 2.12"), "{err}");
        let err = read_setup_header(fake_bzimage(0x020f, 0).path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("64-bit entry"), "{err}");
        assert!(read_setup_header(fake_bzimage(0x020f, 1).path()).is_ok());
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let err = read_setup_header(Path::new("/nonexistent/bzImage"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/bzImage"), "{err}");
    }

    #[test]
    fn kernel_larger_than_memory_is_refused() {
        let mem = create_guest_memory(8 << 20).unwrap();
        let err = load_kernel(&mem, fake_bzimage(0x020f, 1).path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs 21 MiB") && err.contains("has 8 MiB"),
            "{err}"
        );
    }

    #[test]
    fn kernel_and_initrd_placement() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let k = load_kernel(&mem, fake_bzimage(0x020f, 1).path()).unwrap();
        assert_eq!(k.entry, 0x100200);
        assert_eq!(k.header.type_of_loader, 0xff);
        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.write_all(&[0xab; 5000]).unwrap();
        let (addr, size) = load_initrd(&mem, initrd.path(), &k).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr >= k.end);
        let b: u8 = mem.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 0xab);
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let k = load_kernel(&mem, fake_bzimage(0x020f, 1).path()).unwrap();
        let initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.as_file().set_len(40 << 20).unwrap();
        let err = load_initrd(&mem, initrd.path(), &k)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit"), "{err}");
    }

    #[test]
    fn e820_skips_bios_area_and_mmio_hole() {
        let mem = create_guest_memory(4 << 30).unwrap();
        let map = e820_map(&mem);
        let spans: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            spans,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, MMIO_HOLE_START - HIMEM_START, E820_RAM),
                (1 << 32, (4 << 30) - MMIO_HOLE_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_map() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let k = load_kernel(&mem, fake_bzimage(0x020f, 1).path()).unwrap();
        let len = load_cmdline(&mem, "console=ttyS0").unwrap();
        write_zero_page(&mem, &k, len, Some((0x200_0000, 1234))).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (ptr, size, rd, rds, rsdp) = (
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
            p.acpi_rsdp_addr,
        );
        assert_eq!(
            (ptr, size, rd, rds, rsdp),
            (0x20000, 13, 0x200_0000, 1234, RSDP_START)
        );
        assert_eq!(p.e820_entries, 3);
        let mut cl = [0u8; 14];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let err = load_cmdline(&mem, &"x".repeat(3000))
            .unwrap_err()
            .to_string();
        assert!(err.contains("3000 bytes") && err.contains("2047"), "{err}");
    }
}
