//! The virtio-vsock packet header (virtio 1.2 §5.10.6, `struct virtio_vsock_hdr`): 44 bytes,
//! little-endian, followed by `len` bytes of payload for a RW packet.
//!
//! ```text
//! le64 src_cid   le64 dst_cid   le32 src_port   le32 dst_port
//! le32 len       le16 type      le16 op         le32 flags
//! le32 buf_alloc le32 fwd_cnt
//! ```
//!
//! Parsing is the first line of defence against a hostile driver: [`Header::parse`] takes any
//! byte slice, and [`Header::check_from_guest`] decides whether a packet the guest sent is one
//! the device will look at, one it answers with a reset, or one it drops.

/// Size of the header on the wire.
pub const HEADER_LEN: usize = 44;

/// The host's context ID (§5.10.4: 2 is reserved for the host).
pub const HOST_CID: u64 = 2;

/// The only socket type a virtio-vsock device must support (§5.10.6: stream).
pub const TYPE_STREAM: u16 = 1;

/// The most payload bytes cela accepts in one packet from the guest or puts in one packet for
/// it (Linux never sends more than 64 KiB per packet).
pub const MAX_PAYLOAD: u32 = 64 << 10;

/// Operations (§5.10.6).
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// What the device does with a packet the guest sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A well-formed stream packet: handle it.
    Accept,
    /// Addressed to the host from the guest, but not something the device speaks (another
    /// socket type, an unknown op): answer with RST, as §5.10.6.3 asks.
    Reset,
    /// Not for this device at all, or too broken to answer (wrong CIDs, a length the chain
    /// does not carry or beyond [`MAX_PAYLOAD`], a RST of another socket type): drop it
    /// silently.
    Drop,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Decodes the first [`HEADER_LEN`] bytes of `bytes`; `None` if there are fewer.
    pub fn parse(bytes: &[u8]) -> Option<Header> {
        let b = bytes.get(..HEADER_LEN)?;
        Some(Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        })
    }

    /// Encodes the header for the wire.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Judges a packet from the guest whose chain carries `payload_available` bytes after the
    /// header; the guest's CID is `guest_cid`.
    pub fn check_from_guest(&self, guest_cid: u64, payload_available: usize) -> Verdict {
        if self.src_cid != guest_cid || self.dst_cid != HOST_CID {
            return Verdict::Drop;
        }
        if self.len > MAX_PAYLOAD || self.len as usize > payload_available {
            return Verdict::Drop;
        }
        if self.type_ != TYPE_STREAM {
            // Never answer a reset with a reset.
            return if self.op == OP_RST {
                Verdict::Drop
            } else {
                Verdict::Reset
            };
        }
        match self.op {
            OP_REQUEST | OP_RESPONSE | OP_RST | OP_SHUTDOWN | OP_RW | OP_CREDIT_UPDATE
            | OP_CREDIT_REQUEST => {
                // Only RW carries data.
                if self.op != OP_RW && self.len != 0 {
                    Verdict::Reset
                } else {
                    Verdict::Accept
                }
            }
            _ => Verdict::Reset,
        }
    }

    /// The reset answering this packet (ports and CIDs swapped).
    pub fn reset_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_guest(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 5000,
            len,
            type_: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }

    #[test]
    fn header_round_trips_and_is_little_endian() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 7,
            len: 5,
            type_: 1,
            op: OP_RW,
            flags: 3,
            buf_alloc: 1 << 18,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(&b[16..20], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(Header::parse(&b), Some(h));
        assert_eq!(Header::parse(&b[..43]), None);
    }

    #[test]
    fn guest_packets_are_judged() {
        assert_eq!(
            from_guest(OP_RW, 10).check_from_guest(3, 10),
            Verdict::Accept
        );
        assert_eq!(from_guest(OP_RW, 11).check_from_guest(3, 10), Verdict::Drop);
        assert_eq!(
            from_guest(OP_RW, MAX_PAYLOAD + 1).check_from_guest(3, usize::MAX),
            Verdict::Drop
        );
        assert_eq!(from_guest(OP_RW, 0).check_from_guest(4, 0), Verdict::Drop);
        let mut to_other = from_guest(OP_REQUEST, 0);
        to_other.dst_cid = 7;
        assert_eq!(to_other.check_from_guest(3, 0), Verdict::Drop);
        assert_eq!(
            from_guest(OP_RST, 0).check_from_guest(3, 0),
            Verdict::Accept
        );
        let mut odd_rst = from_guest(OP_RST, 0);
        odd_rst.type_ = 9;
        assert_eq!(odd_rst.check_from_guest(3, 0), Verdict::Drop);
        assert_eq!(from_guest(99, 0).check_from_guest(3, 0), Verdict::Reset);
        assert_eq!(
            from_guest(OP_REQUEST, 4).check_from_guest(3, 4),
            Verdict::Reset
        );
        let mut dgram = from_guest(OP_REQUEST, 0);
        dgram.type_ = 2;
        assert_eq!(dgram.check_from_guest(3, 0), Verdict::Reset);
        let r = from_guest(OP_REQUEST, 0).reset_reply();
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port, r.op),
            (HOST_CID, 3, 5000, 1000, OP_RST)
        );
    }
}
