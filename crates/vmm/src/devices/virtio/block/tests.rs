//! Unit tests of the block device against `virtio-queue`'s mock split queue: one test per
//! request type, and the ways a hostile driver can get a request wrong.

use super::*;
use std::io::Write as _;
use std::sync::Arc;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::Interrupt;

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const R: bool = false;
const W: bool = true;

struct Setup {
    mem: GuestMemoryMmap,
    blk: Block,
    interrupt: Arc<Interrupt>,
    used_ring: GuestAddress,
    file: tempfile::NamedTempFile,
}

/// A disk image holding `content`.
fn image(content: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(content).unwrap();
    f
}

fn open(f: &tempfile::NamedTempFile, read_only: bool) -> DiskImage {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(f.path())
        .unwrap();
    DiskImage::new(file, f.path(), read_only).unwrap()
}

/// A device on `file` with `chains` (each a list of (address, length, device-writable))
/// available in its queue.
fn setup(file: tempfile::NamedTempFile, read_only: bool, chains: &[&[(u64, u32, bool)]]) -> Setup {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let vq = MockSplitQueue::new(&mem, 64);
    let mut raw = Vec::new();
    for chain in chains {
        for (i, (addr, len, write)) in chain.iter().enumerate() {
            let mut flags = if *write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let index = raw.len() as u16;
            if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            raw.push(RawDescriptor::from(Descriptor::new(
                *addr,
                *len,
                flags,
                index + 1,
            )));
        }
    }
    vq.add_desc_chains(&raw, 0).unwrap();
    let q = vq.create_queue().unwrap();
    let used_ring = vq.used_addr();
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(evt));
    let mut blk = Block::new(open(&file, read_only));
    blk.activate(ActiveDevice {
        mem: mem.clone(),
        queues: vec![q],
        acked_features: 0,
        interrupt: interrupt.clone(),
    })
    .unwrap();
    Setup {
        mem,
        blk,
        interrupt,
        used_ring,
        file,
    }
}

fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

impl Setup {
    /// Writes the header of the request at `HDR`, processes the queue and returns the (id, used
    /// length) of used-ring element `slot`.
    fn run(&mut self, kind: u32, sector: u64) -> (u32, u32) {
        header(&self.mem, HDR, kind, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        self.blk.process_queue(0);
        self.used(0)
    }

    fn used(&self, slot: u64) -> (u32, u32) {
        let elem = self.used_ring.unchecked_add(4 + 8 * slot);
        let id: u32 = self.mem.read_obj(elem).unwrap();
        let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
        (id, len)
    }

    fn status(&self) -> u32 {
        u32::from(self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    fn file_bytes(&self) -> Vec<u8> {
        std::fs::read(self.file.path()).unwrap()
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A descriptor chain: (address, length, device-writable) per descriptor.
type Chain<'a> = &'a [(u64, u32, bool)];

const READ_CHAIN: &[(u64, u32, bool)] = &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)];
const WRITE_CHAIN: &[(u64, u32, bool)] = &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)];

#[test]
fn reads_sectors_into_guest_memory() {
    let content = pattern(2048);
    let mut s = setup(image(&content), false, &[READ_CHAIN]);
    assert_eq!(s.run(VIRTIO_BLK_T_IN, 1), (0, 513));
    assert_eq!(s.status(), VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; 512];
    s.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, &content[512..1024]);
    assert_eq!(s.interrupt.status(), 1);
}

#[test]
fn reads_across_several_segments_and_a_shared_status_descriptor() {
    let content = pattern(2048);
    // Two data descriptors, the second one also holding the status byte at its end.
    let chain: &[(u64, u32, bool)] = &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 513, W)];
    let mut s = setup(image(&content), false, &[chain]);
    header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
    s.blk.process_queue(0);
    assert_eq!(s.used(0), (0, 1537));
    let mut got = vec![0u8; 1536];
    s.mem
        .read_slice(&mut got[..1024], GuestAddress(DATA))
        .unwrap();
    s.mem
        .read_slice(&mut got[1024..], GuestAddress(STATUS))
        .unwrap();
    assert_eq!(got, &content[..1536]);
    assert_eq!(s.mem.read_obj::<u8>(GuestAddress(STATUS + 512)).unwrap(), 0);
}

#[test]
fn writes_guest_memory_to_the_file() {
    let mut s = setup(image(&[0u8; 1024]), false, &[WRITE_CHAIN]);
    s.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(s.run(VIRTIO_BLK_T_OUT, 1), (0, 1));
    assert_eq!(s.status(), VIRTIO_BLK_S_OK);
    let f = s.file_bytes();
    assert_eq!(&f[..512], &[0u8; 512]);
    assert_eq!(&f[512..], &[0xab; 512]);
}

#[test]
fn flush_succeeds() {
    let chain: &[(u64, u32, bool)] = &[(HDR, 16, R), (STATUS, 1, W)];
    let mut s = setup(image(&[0u8; 512]), false, &[chain]);
    assert_eq!(s.run(VIRTIO_BLK_T_FLUSH, 0), (0, 1));
    assert_eq!(s.status(), VIRTIO_BLK_S_OK);
}

#[test]
fn get_id_is_the_file_name_truncated_to_20_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a-rather-long-disk-image-name.img");
    std::fs::write(&path, [0u8; 512]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let disk = DiskImage::new(file, &path, true).unwrap();
    assert_eq!(&disk.id, b"a-rather-long-disk-i");
    let disk = disk.with_serial(b"cela-rootfs");
    assert_eq!(&disk.id, b"cela-rootfs\0\0\0\0\0\0\0\0\0");

    let short = image(&[0u8; 512]);
    let name = short
        .path()
        .file_name()
        .unwrap()
        .as_encoded_bytes()
        .to_vec();
    let chain: &[(u64, u32, bool)] = &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)];
    let mut s = setup(short, true, &[chain]);
    s.mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(s.run(VIRTIO_BLK_T_GET_ID, 0), (0, 21));
    assert_eq!(s.status(), VIRTIO_BLK_S_OK);
    let mut got = [0u8; 20];
    s.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..name.len()], &name[..]);
    assert!(got[name.len()..].iter().all(|b| *b == 0));
}

#[test]
fn a_read_only_disk_refuses_writes_and_discards_and_the_file_is_untouched() {
    let content = pattern(1024);
    let mut s = setup(image(&content), true, &[WRITE_CHAIN]);
    assert_ne!(s.blk.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(s.blk.device_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    s.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(s.run(VIRTIO_BLK_T_OUT, 0), (0, 1));
    assert_eq!(s.status(), VIRTIO_BLK_S_IOERR);
    assert_eq!(s.file_bytes(), content);

    let chain: &[(u64, u32, bool)] = &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)];
    let mut s = setup(image(&content), true, &[chain]);
    discard_range(&s.mem, 0, 1, 0);
    assert_eq!(s.run(VIRTIO_BLK_T_DISCARD, 0), (0, 1));
    assert_eq!(s.status(), VIRTIO_BLK_S_IOERR);
    assert_eq!(s.file_bytes(), content);
}

#[test]
fn sectors_beyond_the_capacity_or_overflowing_fail() {
    // Two sectors and a partial third one the guest does not see.
    let content = pattern(1100);
    for sector in [2, 3, u64::MAX, u64::MAX / 512] {
        let mut s = setup(image(&content), false, &[READ_CHAIN]);
        assert_eq!(s.run(VIRTIO_BLK_T_IN, sector), (0, 1), "sector {sector}");
        assert_eq!(s.status(), VIRTIO_BLK_S_IOERR, "sector {sector}");
        let mut s = setup(image(&content), false, &[WRITE_CHAIN]);
        assert_eq!(s.run(VIRTIO_BLK_T_OUT, sector), (0, 1));
        assert_eq!(s.status(), VIRTIO_BLK_S_IOERR);
        assert_eq!(s.file_bytes(), content);
    }
    let mut s = setup(image(&content), false, &[READ_CHAIN]);
    assert_eq!(s.run(VIRTIO_BLK_T_IN, 1), (0, 513));
    assert_eq!(s.status(), VIRTIO_BLK_S_OK);
    let mut cfg = [0u8; 8];
    s.blk.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 2);
}

#[test]
fn malformed_chains_fail_only_their_request() {
    let content = pattern(1024);
    let cases: &[(&str, Chain, u32)] = &[
        (
            "short header",
            &[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)],
            1,
        ),
        (
            "writable header",
            &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)],
            1,
        ),
        (
            "read-only data",
            &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
            1,
        ),
        (
            "partial sector",
            &[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)],
            1,
        ),
        (
            "data outside memory",
            &[(HDR, 16, R), (0xfff0_0000, 512, W), (STATUS, 1, W)],
            1,
        ),
        (
            "header outside memory",
            &[(0xfff0_0000, 16, R), (DATA, 512, W), (STATUS, 1, W)],
            1,
        ),
        ("status only", &[(STATUS, 1, W)], 1),
        (
            "read-only status",
            &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)],
            0,
        ),
        (
            "empty status",
            &[(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)],
            0,
        ),
        (
            "status outside memory",
            &[(HDR, 16, R), (DATA, 512, W), (0xfff0_0000, 1, W)],
            0,
        ),
        (
            "status at the end of the address space",
            &[(HDR, 16, R), (u64::MAX, 2, W)],
            0,
        ),
    ];
    for (what, chain, used_len) in cases {
        // The malformed request, then a good one with its own buffers.
        let good: &[(u64, u32, bool)] =
            &[(HDR, 16, R), (DATA + 0x1000, 512, W), (STATUS + 8, 1, W)];
        let mut s = setup(image(&content), false, &[chain, good]);
        header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        s.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        s.blk.process_queue(0);
        assert_eq!(s.used(0).1, *used_len, "{what}");
        if *used_len == 1 {
            assert_eq!(s.status(), VIRTIO_BLK_S_IOERR, "{what}");
        }
        assert_eq!(s.used(1), (chain.len() as u32, 513), "{what}: next request");
        assert!(!s.interrupt.needs_reset(), "{what}");
    }
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mut s = setup(image(&[0u8; 512]), false, &[READ_CHAIN]);
    assert_eq!(s.run(0x7777, 0), (0, 1));
    assert_eq!(s.status(), VIRTIO_BLK_S_UNSUPP);
}

fn discard_range(mem: &GuestMemoryMmap, sector: u64, num: u32, flags: u32) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&sector.to_le_bytes());
    d[8..12].copy_from_slice(&num.to_le_bytes());
    d[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&d, GuestAddress(DATA)).unwrap();
}

#[test]
fn discard_zeroes_the_range_and_keeps_the_size() {
    let content = vec![0x5a; 8192];
    let chain: &[(u64, u32, bool)] = &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)];
    let mut s = setup(image(&content), false, &[chain]);
    assert_ne!(s.blk.device_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    discard_range(&s.mem, 8, 8, 0);
    assert_eq!(s.run(VIRTIO_BLK_T_DISCARD, 0), (0, 1));
    assert_eq!(s.status(), VIRTIO_BLK_S_OK);
    let f = s.file_bytes();
    assert_eq!(f.len(), 8192);
    assert!(f[..4096].iter().all(|b| *b == 0x5a));
    assert!(f[4096..].iter().all(|b| *b == 0));

    for (sector, num, flags, status) in [
        (15, 2, 0, VIRTIO_BLK_S_IOERR),
        (u64::MAX, 2, 0, VIRTIO_BLK_S_IOERR),
        (0, 1, 1, VIRTIO_BLK_S_UNSUPP),
    ] {
        let mut s = setup(image(&content), false, &[chain]);
        discard_range(&s.mem, sector, num, flags);
        assert_eq!(s.run(VIRTIO_BLK_T_DISCARD, 0), (0, 1));
        assert_eq!(s.status(), status, "{sector} {num} {flags}");
        assert_eq!(s.file_bytes(), content);
    }
}

#[test]
fn notifications_before_activation_or_for_other_queues_are_ignored() {
    let f = image(&[0u8; 512]);
    let mut blk = Block::new(open(&f, false));
    blk.process_queue(0);
    let mut s = setup(image(&[0u8; 512]), false, &[READ_CHAIN]);
    s.blk.process_queue(3);
    assert_eq!(s.used(0), (0, 0));
    s.blk.reset();
    s.blk.process_queue(0);
}

/// A small deterministic generator (xorshift64*) for the garbage-request test.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn garbage_requests_never_panic_nor_break_the_device() {
    let content = pattern(8192);
    let mut rand = Rand(0x9e37_79b9_7f4a_7c15);
    for round in 0..400 {
        let read_only = rand.next().is_multiple_of(2);
        let mut chains: Vec<Vec<(u64, u32, bool)>> = Vec::new();
        for _ in 0..1 + rand.next() % 4 {
            let chain = (0..1 + rand.next() % 5)
                .map(|_| {
                    let addr = match rand.next() % 4 {
                        0 => rand.pick(&[0xfff0_0000, u64::MAX, u64::MAX - 15, 0xf_fffe]),
                        _ => 0x1_0000 + (rand.next() % 0xe_0000),
                    };
                    let len = rand.pick(&[0, 1, 8, 15, 16, 17, 511, 512, 513, 1024, 70_000]) as u32;
                    let len = if rand.next().is_multiple_of(16) {
                        u32::MAX
                    } else {
                        len
                    };
                    (addr, len, rand.next().is_multiple_of(2))
                })
                .collect();
            chains.push(chain);
        }
        let refs: Vec<Chain> = chains.iter().map(|c| c.as_slice()).collect();
        let mut s = setup(image(&content), read_only, &refs);
        // Random bytes where the requests point, and a plausible header at each chain's head.
        let mut noise = vec![0u8; 0xf_0000];
        noise.iter_mut().for_each(|b| *b = rand.next() as u8);
        s.mem.write_slice(&noise, GuestAddress(0x1_0000)).unwrap();
        for chain in &chains {
            let any_kind = rand.next() as u32;
            let kind = rand.pick(&[
                VIRTIO_BLK_T_IN,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_FLUSH,
                VIRTIO_BLK_T_GET_ID,
                VIRTIO_BLK_T_DISCARD,
                any_kind,
            ]);
            let any_sector = rand.next();
            let sector = rand.pick(&[0, 1, 15, 16, u64::MAX, any_sector]);
            let head = chain[0].0;
            if (0x1_0000..0xf_fff0).contains(&head) {
                header(&s.mem, head, kind, sector);
            }
        }
        s.blk.process_queue(0);
        let used_idx: u16 = s.mem.read_obj(s.used_ring.unchecked_add(2)).unwrap();
        assert_eq!(usize::from(used_idx), chains.len(), "round {round}");
        assert!(!s.interrupt.needs_reset(), "round {round}");
        let after = s.file_bytes();
        assert_eq!(after.len(), content.len(), "round {round}");
        if read_only {
            assert_eq!(after, content, "round {round}");
        }
    }
}
