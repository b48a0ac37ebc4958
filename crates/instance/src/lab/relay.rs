//! The impairing relay: what carries an impaired lab link's frames. This host's kernel has
//! no `netem` (nor `fq`), so delay cannot be had from a qdisc; the relay does in user space
//! what netem would: it reads every frame arriving at one host end of the link (a packet
//! socket, `AF_PACKET`), drops it with the loss probability, holds it for its delay (plus
//! jitter, and its serialisation time at the link's rate), and writes it out of the other end
//! — both directions, each with its own queue. An unimpaired link needs none of this: its
//! ends are joined in the kernel (`tc` mirred, see [`super::link`]).
//!
//! Frames keep their order (a jittered frame never overtakes the one before it, as netem
//! with a rate). Each direction's queue holds at most [`QUEUE_FRAMES`] frames and
//! [`QUEUE_BYTES`] bytes; what arrives past that is dropped, as a full qdisc drops.
//! Sockets carry a `virtio_net_hdr` before each frame (`PACKET_VNET_HDR`), so the kernel's
//! large segmentation-offloaded frames cross whole, with their checksum state, as a TAP
//! carries them for a VM.
//!
//! Each frame's 802.1Q tag, which the kernel keeps beside a received frame, is put back
//! into it (`PACKET_AUXDATA`), so VLANs cross an impaired link as they cross a wire.
//!
//! The relay is `cela __link-relay`, a process of its own per impaired link, in the lab's
//! network namespace (see [`super::link`]): it opens its two sockets as root, then becomes
//! nobody (uid and gid 65534, no capabilities, no new
//! privileges) before it reads a frame. What it handles comes from the lab's nodes and is
//! hostile: it is only copied, within bounded buffers.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::impair::Impairment;

/// The most frames and bytes waiting in one direction.
pub const QUEUE_FRAMES: usize = 1000;
pub const QUEUE_BYTES: usize = 8 << 20;
/// The largest frame read: a virtio_net_hdr and a 64 KiB GSO frame, with room.
const FRAME: usize = 128 << 10;
/// `PACKET_IGNORE_OUTGOING` (linux/if_packet.h): not frames the socket's own device sends.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// nobody.
const NOBODY: u32 = 65534;

/// A packet socket bound to interface `name`, taking every protocol, with virtio headers
/// and each frame's VLAN tag beside it.
fn packet_socket(name: &str) -> io::Result<OwnedFd> {
    let index = nix::net::if_::if_nametoindex(name).map_err(io::Error::from)?;
    // Protocol 0: no frame at all until the bind below names the interface (a socket made
    // with ETH_P_ALL would take every interface's frames until then).
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    for opt in [
        libc::PACKET_VNET_HDR,
        PACKET_IGNORE_OUTGOING,
        libc::PACKET_AUXDATA,
    ] {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt(2) reads one c_int from `one`, which lives for the call.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                opt,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid before the fields are set.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: bind(2) reads one sockaddr_ll from `addr`, which lives for the call.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// An 802.1Q tag: TPID and TCI.
type VlanTag = (u16, u16);

/// The size of a virtio_net_hdr (linux/virtio_net.h) before each frame.
const VNET_HDR: usize = 10;

/// Reads one frame (with its header) into `buf`: its length and its VLAN tag (TPID, TCI)
/// if the kernel took one off, or `None` for a frame that did not fit or that the header
/// cannot describe (dropped, as a wire would).
fn receive(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<(usize, Option<VlanTag>)>> {
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // Room for one tpacket_auxdata control message (u64s: aligned as cmsghdr wants).
        let mut control = [0u64; 8];
        // SAFETY: msghdr is plain old data; all-zero is valid before the fields are set.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        // SAFETY: recvmsg(2) writes at most `buf.len()` bytes into `buf` and at most
        // `msg_controllen` bytes into `control`, both alive for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // A GSO frame a virtio header cannot carry (SCTP, tunnels): lost, not fatal.
                Some(libc::EINVAL | libc::ENOBUFS | libc::EAGAIN) => return Ok(None),
                _ => return Err(e),
            }
        }
        let n = n as usize;
        if n > buf.len() || n < VNET_HDR + 14 {
            return Ok(None);
        }
        let mut tag = None;
        // SAFETY: the CMSG_* walk stays within `msg_controllen` bytes of `control`, which
        // recvmsg filled; an auxdata message holds one tpacket_auxdata, read unaligned.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                    let aux: libc::tpacket_auxdata =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                            aux.tp_vlan_tpid
                        } else {
                            libc::ETH_P_8021Q as u16
                        };
                        tag = Some((tpid, aux.tp_vlan_tci));
                    }
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        return Ok(Some((n, tag)));
    }
}

/// The frame to send: `got` as read, with its VLAN tag put back after the MAC addresses
/// (and the header's offsets moved past it), as it was on the wire.
fn with_tag(got: &[u8], tag: Option<VlanTag>) -> Vec<u8> {
    let Some((tpid, tci)) = tag else {
        return got.to_vec();
    };
    let at = VNET_HDR + 12;
    let mut frame = Vec::with_capacity(got.len() + 4);
    frame.extend_from_slice(&got[..at]);
    frame.extend_from_slice(&tpid.to_be_bytes());
    frame.extend_from_slice(&tci.to_be_bytes());
    frame.extend_from_slice(&got[at..]);
    // virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (native
    // endian for a packet socket). The payload moved 4 bytes on.
    let bump = |frame: &mut Vec<u8>, off: usize| {
        let v = u16::from_ne_bytes([frame[off], frame[off + 1]]).saturating_add(4);
        frame[off..off + 2].copy_from_slice(&v.to_ne_bytes());
    };
    if frame[0] & 1 != 0 {
        bump(&mut frame, 6);
    }
    if frame[1] != 0 {
        bump(&mut frame, 2);
    }
    frame
}

fn send(sock: &OwnedFd, frame: &[u8]) {
    // SAFETY: send(2) reads `frame.len()` bytes from `frame`, which lives for the call. A
    // frame the far end's device refuses (down, too long) is lost, as on a wire.
    unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
}

/// Becomes nobody with no capabilities and no way to regain any.
fn drop_privileges() -> io::Result<()> {
    nix::unistd::setgroups(&[]).map_err(io::Error::from)?;
    let gid = nix::unistd::Gid::from_raw(NOBODY);
    let uid = nix::unistd::Uid::from_raw(NOBODY);
    nix::unistd::setresgid(gid, gid, gid).map_err(io::Error::from)?;
    // From root to another uid in all three: the kernel clears every capability set.
    nix::unistd::setresuid(uid, uid, uid).map_err(io::Error::from)?;
    // SAFETY: prctl(2) with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A small generator for loss and jitter (xorshift64*), seeded by the kernel.
struct Random(u64);

impl Random {
    fn new() -> Random {
        let mut seed = [0u8; 8];
        // SAFETY: getrandom(2) writes at most 8 bytes into `seed`.
        unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        Random(u64::from_ne_bytes(seed) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One direction's queue: frames and when each leaves.
#[derive(Default)]
struct Queue {
    frames: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
}

/// When each frame of one direction leaves: the delay model, kept apart from the sockets so
/// it can be tested.
struct Schedule {
    impair: Impairment,
    random: Random,
    /// When the link is free again (the rate), and the last frame's departure (the order).
    free_at: Instant,
    last: Instant,
}

impl Schedule {
    fn new(impair: Impairment) -> Schedule {
        let now = Instant::now();
        Schedule {
            impair,
            random: Random::new(),
            free_at: now,
            last: now,
        }
    }

    /// When a frame of `len` bytes arriving `now` leaves, or `None` if it is lost.
    fn departure(&mut self, now: Instant, len: usize) -> Option<Instant> {
        let i = self.impair;
        if i.loss_ppm > 0 && self.random.below(1_000_000) < i.loss_ppm {
            return None;
        }
        let mut at = now;
        // On the wire for its bits at the rate, after the frames ahead of it.
        if let Some(ns) = (len as u64 * 8 * 1_000_000_000).checked_div(i.rate_bps) {
            self.free_at = self.free_at.max(now) + Duration::from_nanos(ns);
            at = self.free_at;
        }
        let mut delay = i.delay_us;
        if i.jitter_us > 0 {
            delay = delay - i.jitter_us + self.random.below(2 * i.jitter_us + 1);
        }
        at += Duration::from_micros(delay);
        // Never before the frame ahead of it.
        at = at.max(self.last);
        self.last = at;
        Some(at)
    }
}

/// Carries frames from `from` to `to` until a socket fails.
fn direction(from: Arc<OwnedFd>, to: Arc<OwnedFd>, impair: Impairment) -> io::Result<()> {
    let queue = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
    let q = queue.clone();
    std::thread::spawn(move || {
        let (lock, ready) = &*q;
        let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            match guard.frames.front() {
                None => guard = ready.wait(guard).unwrap_or_else(|p| p.into_inner()),
                Some((at, _)) if *at > now => {
                    let wait = *at - now;
                    guard = ready
                        .wait_timeout(guard, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                Some(_) => {
                    let (_, frame) = guard.frames.pop_front().expect("a frame is queued");
                    guard.bytes -= frame.len();
                    drop(guard);
                    send(&to, &frame);
                    guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    });
    let mut schedule = Schedule::new(impair);
    let mut buf = vec![0u8; FRAME];
    loop {
        let Some((n, tag)) = receive(&from, &mut buf)? else {
            continue;
        };
        let frame = with_tag(&buf[..n], tag);
        let (lock, ready) = &*queue;
        let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
        // A full queue drops the frame before it is scheduled: it takes no time on the link.
        if q.frames.len() >= QUEUE_FRAMES || q.bytes + frame.len() > QUEUE_BYTES {
            continue;
        }
        let Some(at) = schedule.departure(Instant::now(), frame.len() - VNET_HDR) else {
            continue;
        };
        q.bytes += frame.len();
        q.frames.push_back((at, frame));
        ready.notify_one();
    }
}

/// `cela __link-relay --netns PATH A B …`: relays between interfaces `a` and `b` of the
/// network namespace bound at `netns` with `impair` in each direction until killed (or a
/// socket fails, when an end is deleted).
pub fn run(netns: &std::path::Path, a: &str, b: &str, impair: Impairment) -> io::Result<()> {
    let ns = std::fs::File::open(netns)?;
    // SAFETY: setns(2) on a descriptor this function owns; the relay's threads are started
    // after it, so all of them are in the lab's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(ns);
    let sa = Arc::new(packet_socket(a).map_err(|e| io::Error::new(e.kind(), format!("{a}: {e}")))?);
    let sb = Arc::new(packet_socket(b).map_err(|e| io::Error::new(e.kind(), format!("{b}: {e}")))?);
    drop_privileges()?;
    // The word `lab up` and `lab impair` wait for: both ends are held.
    {
        use std::io::Write as _;
        let mut out = io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    // The first direction to fail ends the relay (the caller exits the process).
    let (done, failed) = std::sync::mpsc::channel();
    for (from, to) in [(sa.clone(), sb.clone()), (sb, sa)] {
        let done = done.clone();
        std::thread::spawn(move || {
            let _ = done.send(direction(from, to, impair));
        });
    }
    drop(done);
    failed
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the relay's threads ended")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_jitter_and_order() {
        let mut s = Schedule::new(Impairment {
            delay_us: 10_000,
            jitter_us: 5_000,
            ..Default::default()
        });
        let t0 = Instant::now();
        let mut last = t0;
        for k in 0..1000u64 {
            let now = t0 + Duration::from_micros(k * 100);
            let at = s.departure(now, 100).unwrap();
            assert!(
                at >= now + Duration::from_millis(5),
                "never under delay - jitter"
            );
            assert!(at <= now + Duration::from_millis(15) || at == last);
            assert!(at >= last, "in order");
            last = at;
        }
    }

    #[test]
    fn a_vlan_tag_goes_back_where_it_was() {
        // A checksum-offloaded frame: header (flags NEEDS_CSUM, csum_start 34), MACs, IPv4.
        let mut got = vec![1u8, 0, 0, 0, 0, 0];
        got.extend_from_slice(&34u16.to_ne_bytes());
        got.extend_from_slice(&16u16.to_ne_bytes());
        got.extend_from_slice(&[0xaa; 12]);
        got.extend_from_slice(&[0x08, 0x00, 0x45]);
        assert_eq!(with_tag(&got, None), got);
        let tagged = with_tag(&got, Some((0x8100, 42)));
        assert_eq!(tagged.len(), got.len() + 4);
        assert_eq!(&tagged[22..26], &[0x81, 0x00, 0x00, 42]);
        assert_eq!(&tagged[26..28], &[0x08, 0x00]);
        assert_eq!(u16::from_ne_bytes([tagged[6], tagged[7]]), 38);
    }

    #[test]
    fn loss_and_rate() {
        let mut all = Schedule::new(Impairment {
            loss_ppm: 1_000_000,
            ..Default::default()
        });
        assert!(all.departure(Instant::now(), 60).is_none());
        let mut half = Schedule::new(Impairment {
            loss_ppm: 500_000,
            ..Default::default()
        });
        let lost = (0..10_000)
            .filter(|_| half.departure(Instant::now(), 60).is_none())
            .count();
        assert!((4_000..6_000).contains(&lost), "{lost}");
        // 1 Mbit/s: a 1250-byte frame takes 10 ms on the wire; ten back to back, 100 ms.
        let mut slow = Schedule::new(Impairment {
            rate_bps: 1_000_000,
            ..Default::default()
        });
        let t0 = Instant::now();
        let mut at = t0;
        for _ in 0..10 {
            at = slow.departure(t0, 1250).unwrap();
        }
        assert_eq!(at - t0, Duration::from_millis(100));
    }
}
