//! The virtio block device (virtio 1.2 §5.2, device ID 2): a raw disk image file seen by the
//! guest as /dev/vdX.
//!
//! One queue, `requestq` (§5.2.2). Each request is a descriptor chain (§5.2.6):
//!
//! ```text
//! device-readable   struct virtio_blk_req { le32 type; le32 reserved; le64 sector; }  16 bytes
//! either            data: for IN and GET_ID device-writable, for OUT and DISCARD readable
//! device-writable   u8 status   (the last byte of the chain)
//! ```
//!
//! cela expects the header in the first descriptor and the status in the last byte of the last
//! descriptor, with the data in between (what Linux's `virtio_blk` does); any other layout
//! fails the request. Supported types: IN (read `sector`), OUT (write), FLUSH (`fdatasync` of
//! the file), GET_ID (the serial: the file name, 20 bytes, §5.2.6) and DISCARD (punch a hole in
//! the file, keeping its size). Others get VIRTIO_BLK_S_UNSUPP.
//!
//! The guest is not trusted: every length and sector range is checked (overflow-checked and
//! within the capacity); a malformed request fails with VIRTIO_BLK_S_IOERR, or, when even its
//! status byte is unusable, is returned with used length 0. I/O is positioned (`pread`/`pwrite`)
//! through a bounded bounce buffer, synchronously, on the device event-loop thread.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{ActivateError, ActiveDevice, VirtioDevice, read_config_bytes};

/// The queue size offered to the driver.
const QUEUE_SIZE: u16 = 256;
/// The sector size of the virtio block protocol (§5.2.6: `sector` counts 512-byte units,
/// whatever the block size).
pub const SECTOR_SIZE: u64 = 512;
/// Size of `struct virtio_blk_req`'s header (§5.2.6).
const HEADER_LEN: u32 = 16;
/// Data segments per request the driver may use (config `seg_max`): the chain also holds the
/// header and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The largest data segment (config `size_max`); with [`SEG_MAX`] it bounds a request.
const SIZE_MAX: u32 = 1 << 20;
/// The most data bytes one request may carry.
const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Bounce-buffer size between guest memory and the file.
const CHUNK: usize = 64 << 10;
/// Discard limits (config `max_discard_sectors`, `max_discard_seg`): one range of up to
/// 4 GiB - 512 per request.
const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;
const MAX_DISCARD_SEG: u32 = 1;
/// Size of `struct virtio_blk_discard_write_zeroes` (§5.2.6).
const DISCARD_SEG_LEN: u64 = 16;
/// Size of the configuration space up to and including the discard fields (§5.2.4).
const CONFIG_LEN: usize = 48;

/// An open disk image: the file, its size in sectors, its serial and its mode.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    read_only: bool,
}

impl DiskImage {
    /// Wraps `file` (opened read-write unless `read_only`), found at `path`. A trailing partial
    /// sector is not visible to the guest.
    pub fn new(file: File, path: &Path, read_only: bool) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or(b"");
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name[..n]);
        Ok(DiskImage {
            file,
            sectors: len / SECTOR_SIZE,
            id,
            read_only,
        })
    }

    /// Replaces the serial (the file name by default) with `serial`, cut to 20 bytes.
    pub fn with_serial(mut self, serial: &[u8]) -> Self {
        self.id = [0; VIRTIO_BLK_ID_BYTES as usize];
        let n = serial.len().min(self.id.len());
        self.id[..n].copy_from_slice(&serial[..n]);
        self
    }

    /// The capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }
}

/// A request's outcome: the status byte and how many bytes of data went to the guest.
struct Outcome {
    status: u32,
    written: u32,
}

impl Outcome {
    fn status(status: u32) -> Self {
        Outcome { status, written: 0 }
    }
}

/// A data segment of a request: guest memory the device reads or writes.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// A virtio block device backed by a [`DiskImage`].
pub struct Block {
    disk: DiskImage,
    config: [u8; CONFIG_LEN],
    active: Option<ActiveDevice>,
}

impl Block {
    pub fn new(disk: DiskImage) -> Self {
        // §5.2.4 struct virtio_blk_config, little-endian.
        let mut config = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &disk.sectors.to_le_bytes()); // capacity
        put(8, &SIZE_MAX.to_le_bytes()); // size_max
        put(12, &SEG_MAX.to_le_bytes()); // seg_max
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        Block {
            disk,
            config,
            active: None,
        }
    }

    /// Serves one request: checks its layout, does the I/O and writes its status. Returns the
    /// used length (data written to the guest plus the status byte), or 0 when the status byte
    /// itself is unusable.
    fn serve(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let descs: Vec<Descriptor> = chain.collect();
        let Some(last) = descs.last().filter(|d| d.is_write_only() && d.len() >= 1) else {
            return 0;
        };
        let Some(status_addr) = last.addr().checked_add(u64::from(last.len() - 1)) else {
            return 0;
        };
        let outcome = self.execute(mem, &descs, last);
        let status = outcome.status as u8;
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        outcome.written.saturating_add(1)
    }

    /// Parses and executes the request in `descs`, whose status byte ends `last`.
    fn execute(&self, mem: &GuestMemoryMmap, descs: &[Descriptor], last: &Descriptor) -> Outcome {
        let ioerr = Outcome::status(VIRTIO_BLK_S_IOERR);
        // The header: the first descriptor, device-readable, at least 16 bytes, and not the
        // status descriptor.
        let Some(first) = descs
            .first()
            .filter(|d| descs.len() >= 2 && !d.is_write_only() && d.len() >= HEADER_LEN)
        else {
            return ioerr;
        };
        let mut header = [0u8; HEADER_LEN as usize];
        if mem.read_slice(&mut header, first.addr()).is_err() {
            return ioerr;
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        // The data: the descriptors in between, plus whatever precedes the status byte in the
        // last one.
        let mut segments: Vec<(Segment, bool)> = descs[1..descs.len() - 1]
            .iter()
            .map(|d| {
                (
                    Segment {
                        addr: d.addr(),
                        len: d.len(),
                    },
                    d.is_write_only(),
                )
            })
            .collect();
        if last.len() > 1 {
            segments.push((
                Segment {
                    addr: last.addr(),
                    len: last.len() - 1,
                },
                true,
            ));
        }
        let total: u64 = segments.iter().map(|(s, _)| u64::from(s.len)).sum();
        if total > MAX_REQUEST_BYTES {
            return ioerr;
        }
        let data_writable = segments.iter().all(|(_, w)| *w);
        let data_readable = segments.iter().all(|(_, w)| !*w);
        let segs: Vec<Segment> = segments.iter().map(|(s, _)| *s).collect();

        match kind {
            VIRTIO_BLK_T_IN if data_writable => match self.range(sector, total) {
                Some(offset) => self.read(mem, &segs, offset),
                None => ioerr,
            },
            VIRTIO_BLK_T_OUT if data_readable => match self.range(sector, total) {
                Some(offset) if !self.disk.read_only => self.write(mem, &segs, offset),
                _ => ioerr,
            },
            VIRTIO_BLK_T_FLUSH => match self.disk.file.sync_data() {
                Ok(()) => Outcome::status(VIRTIO_BLK_S_OK),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush failed: {e}");
                    ioerr
                }
            },
            VIRTIO_BLK_T_GET_ID if data_writable => self.get_id(mem, &segs),
            VIRTIO_BLK_T_DISCARD if data_readable && !self.disk.read_only => {
                self.discard(mem, &segs)
            }
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_GET_ID | VIRTIO_BLK_T_DISCARD => {
                ioerr
            }
            _ => Outcome::status(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors within the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.disk.sectors).then(|| sector * SECTOR_SIZE)
    }

    fn read(&self, mem: &GuestMemoryMmap, segs: &[Segment], mut offset: u64) -> Outcome {
        let mut buf = vec![0u8; CHUNK];
        let mut written = 0u32;
        for seg in segs {
            let mut done = 0u32;
            while done < seg.len {
                let n = (seg.len - done).min(CHUNK as u32);
                let chunk = &mut buf[..n as usize];
                let ok = self.disk.file.read_exact_at(chunk, offset).is_ok()
                    && seg
                        .addr
                        .checked_add(u64::from(done))
                        .is_some_and(|a| mem.write_slice(chunk, a).is_ok());
                if !ok {
                    return Outcome {
                        status: VIRTIO_BLK_S_IOERR,
                        written,
                    };
                }
                done += n;
                written += n;
                offset += u64::from(n);
            }
        }
        Outcome {
            status: VIRTIO_BLK_S_OK,
            written,
        }
    }

    fn write(&self, mem: &GuestMemoryMmap, segs: &[Segment], mut offset: u64) -> Outcome {
        let mut buf = vec![0u8; CHUNK];
        for seg in segs {
            let mut done = 0u32;
            while done < seg.len {
                let n = (seg.len - done).min(CHUNK as u32);
                let chunk = &mut buf[..n as usize];
                let ok = seg
                    .addr
                    .checked_add(u64::from(done))
                    .is_some_and(|a| mem.read_slice(chunk, a).is_ok())
                    && self.disk.file.write_all_at(chunk, offset).is_ok();
                if !ok {
                    return Outcome::status(VIRTIO_BLK_S_IOERR);
                }
                done += n;
                offset += u64::from(n);
            }
        }
        Outcome::status(VIRTIO_BLK_S_OK)
    }

    /// GET_ID (§5.2.6): the 20-byte serial, zero-padded, into the first 20 data bytes.
    fn get_id(&self, mem: &GuestMemoryMmap, segs: &[Segment]) -> Outcome {
        let mut id = &self.disk.id[..];
        let mut written = 0u32;
        for seg in segs {
            if id.is_empty() {
                break;
            }
            let n = id.len().min(seg.len as usize);
            if mem.write_slice(&id[..n], seg.addr).is_err() {
                return Outcome {
                    status: VIRTIO_BLK_S_IOERR,
                    written,
                };
            }
            id = &id[n..];
            written += n as u32;
        }
        let status = if id.is_empty() {
            VIRTIO_BLK_S_OK
        } else {
            VIRTIO_BLK_S_IOERR
        };
        Outcome { status, written }
    }

    /// DISCARD (§5.2.6): one `struct virtio_blk_discard_write_zeroes { le64 sector; le32
    /// num_sectors; le32 flags; }`; the range becomes a hole in the file, its size unchanged.
    fn discard(&self, mem: &GuestMemoryMmap, segs: &[Segment]) -> Outcome {
        let ioerr = Outcome::status(VIRTIO_BLK_S_IOERR);
        let [seg] = segs else {
            return ioerr;
        };
        if u64::from(seg.len) != DISCARD_SEG_LEN * u64::from(MAX_DISCARD_SEG) {
            return ioerr;
        }
        let mut raw = [0u8; DISCARD_SEG_LEN as usize];
        if mem.read_slice(&mut raw, seg.addr).is_err() {
            return ioerr;
        }
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&raw[..8]);
        let sector = u64::from_le_bytes(sector);
        let num = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        // No flag (not even `unmap`, which is for WRITE_ZEROES) is defined for discard.
        if flags != 0 {
            return Outcome::status(VIRTIO_BLK_S_UNSUPP);
        }
        if num > MAX_DISCARD_SECTORS {
            return ioerr;
        }
        let len = u64::from(num) * SECTOR_SIZE;
        let Some(offset) = self.range(sector, len) else {
            return ioerr;
        };
        if len == 0 {
            return Outcome::status(VIRTIO_BLK_S_OK);
        }
        // Both fit in off_t: they lie within the file, whose size is an off_t.
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return ioerr;
        };
        // SAFETY: fallocate takes a file descriptor this device owns (kept open by `self.disk`)
        // and plain integers; it touches no memory of this process.
        let rc = unsafe {
            libc::fallocate(
                self.disk.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc != 0 {
            tracing::warn!(
                "virtio-blk: discard failed: {}",
                std::io::Error::last_os_error()
            );
            return ioerr;
        }
        Outcome::status(VIRTIO_BLK_S_OK)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut features = (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.disk.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, active: ActiveDevice) -> Result<(), ActivateError> {
        active.require_queues(1)?;
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn saved_queues(&self) -> Vec<virtio_queue::QueueState> {
        super::active_queue_states(self.active.as_ref())
    }

    fn process_queue(&mut self, index: usize) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        if index == 0 {
            self.process_requests(&mut active);
        }
        self.active = Some(active);
    }
}

impl Block {
    fn process_requests(&self, active: &mut ActiveDevice) {
        let ActiveDevice {
            mem,
            queues,
            interrupt,
            ..
        } = active;
        let Some(queue) = queues.get_mut(0) else {
            return;
        };
        super::serve_queue("virtio-blk", queue, mem, interrupt, |chain| {
            self.serve(mem, chain)
        });
    }
}

#[cfg(test)]
mod tests;
