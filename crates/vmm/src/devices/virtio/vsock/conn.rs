//! One vsock stream connection: its host end (a Unix stream socket), its state, the bytes the
//! host end has not taken yet, and both directions' credit (§5.10.6.3).
//!
//! Credit, from the device's side:
//! * guest → host: cela promises [`BUF_ALLOC`] bytes of buffer. It counts what it received
//!   (`rx_cnt`) and what it handed to the host end (`fwd_cnt`); `rx_cnt - fwd_cnt` bytes wait
//!   in `pending`. A guest that sends more than that is broken and gets a reset. The guest
//!   learns `fwd_cnt` from every packet cela sends it; when the host end has taken a quarter
//!   of the buffer since cela last told the guest, cela sends a CREDIT_UPDATE on its own.
//! * host → guest: the guest tells its `buf_alloc` and `fwd_cnt` in every packet; cela sends
//!   at most `buf_alloc - (tx_cnt - fwd_cnt)` bytes beyond what the guest has consumed.
//!
//! All counters are free-running `u32`s (wrapping), as the spec defines them.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use nix::sys::socket::{MsgFlags, UnixAddr, sendmsg};

use crate::persist::devices::ConnSnapshot;

use super::packet::{
    HOST_CID, Header, MAX_PAYLOAD, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Writes to a host end with MSG_NOSIGNAL: a host end whose reader is gone gives EPIPE rather
/// than a SIGPIPE that would kill the monitor unless the process happens to ignore it (found
/// by the `vsock_packets` fuzz target, whose process does not).
fn send(stream: &UnixStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    sendmsg::<UnixAddr>(stream.as_raw_fd(), bufs, &[], MsgFlags::MSG_NOSIGNAL, None)
        .map_err(io::Error::from)
}

/// The receive buffer cela offers the guest per connection.
pub const BUF_ALLOC: u32 = 256 << 10;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum State {
    /// Host-initiated: the REQUEST is (to be) sent, the guest has not answered.
    Connecting,
    Established,
    /// A reset is to be sent (or was received); the connection is then forgotten.
    Closing,
}

/// Why a guest packet broke a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// The guest sent more than the credit cela gave it.
    Credit,
}

#[derive(Debug)]
pub struct Connection {
    /// The host end, non-blocking.
    pub stream: UnixStream,
    /// The port on the host side (CID 2).
    pub local_port: u32,
    /// The port on the guest side.
    pub peer_port: u32,
    pub guest_cid: u64,
    pub state: State,
    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
    need_rst: bool,
    /// SHUTDOWN flags cela still has to tell the guest.
    shutdown_to_send: u32,
    /// SHUTDOWN flags the guest sent.
    guest_shutdown: u32,
    /// The host end reached end-of-file (or failed reading).
    host_eof: bool,
    /// The write side of the host end was shut down.
    host_write_shut: bool,
    /// Guest bytes the host end has not taken yet.
    pending: VecDeque<u8>,
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, guest_cid: u64) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state: State::Established,
            need_request: false,
            need_response: false,
            need_credit_update: false,
            need_rst: false,
            shutdown_to_send: 0,
            guest_shutdown: 0,
            host_eof: false,
            host_write_shut: false,
            pending: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
        }
    }

    /// A connection the guest asked for (its REQUEST is `request`), to be answered with a
    /// RESPONSE.
    pub fn accepted(stream: UnixStream, request: &Header) -> Self {
        let mut c = Connection::new(stream, request.dst_port, request.src_port, request.src_cid);
        c.need_response = true;
        c.update_peer_credit(request);
        c
    }

    /// A connection a host process asked for, to be offered to the guest's `peer_port`.
    pub fn connecting(stream: UnixStream, local_port: u32, peer_port: u32, guest_cid: u64) -> Self {
        let mut c = Connection::new(stream, local_port, peer_port, guest_cid);
        c.state = State::Connecting;
        c.need_request = true;
        c
    }

    /// Everything but the host end, for a snapshot.
    pub fn snapshot(&self) -> ConnSnapshot {
        ConnSnapshot {
            local_port: self.local_port,
            peer_port: self.peer_port,
            guest_cid: self.guest_cid,
            state: self.state,
            need_request: self.need_request,
            need_response: self.need_response,
            need_credit_update: self.need_credit_update,
            need_rst: self.need_rst,
            shutdown_to_send: self.shutdown_to_send,
            guest_shutdown: self.guest_shutdown,
            host_eof: self.host_eof,
            host_write_shut: self.host_write_shut,
            pending: self.pending.iter().copied().collect(),
            rx_cnt: self.rx_cnt,
            fwd_cnt: self.fwd_cnt,
            last_fwd_cnt_sent: self.last_fwd_cnt_sent,
            peer_buf_alloc: self.peer_buf_alloc,
            peer_fwd_cnt: self.peer_fwd_cnt,
            tx_cnt: self.tx_cnt,
        }
    }

    /// Checks that a saved connection is one cela could have been running: established, its
    /// flags known, and its waiting bytes those its counters account for, within the buffer
    /// it offers. The error says what is wrong.
    pub fn check_snapshot(s: &ConnSnapshot) -> Result<(), String> {
        if s.state != State::Established || s.need_request || s.need_rst {
            return Err(format!(
                "state {:?} (REQUEST to send: {}, reset to send: {}) is not an established \
                 connection",
                s.state, s.need_request, s.need_rst
            ));
        }
        let flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        if (s.shutdown_to_send | s.guest_shutdown) & !flags != 0 {
            return Err(format!(
                "shutdown flags {:#x} (to send) and {:#x} (received) are not SHUTDOWN flags",
                s.shutdown_to_send, s.guest_shutdown
            ));
        }
        if s.host_write_shut && s.guest_shutdown & SHUTDOWN_SEND == 0 {
            return Err("the host end was shut without the guest's SHUTDOWN_SEND".into());
        }
        if s.pending.len() > BUF_ALLOC as usize {
            return Err(format!(
                "{} bytes wait for the host end, more than the {BUF_ALLOC} offered",
                s.pending.len()
            ));
        }
        let waiting = s.rx_cnt.wrapping_sub(s.fwd_cnt);
        if waiting as usize != s.pending.len() {
            return Err(format!(
                "{} bytes wait for the host end but the counters say {waiting} (received \
                 {}, forwarded {})",
                s.pending.len(),
                s.rx_cnt,
                s.fwd_cnt
            ));
        }
        Ok(())
    }

    /// A saved connection (checked with [`Connection::check_snapshot`]) on a new host end
    /// `stream`. If the guest had shut its sending side and the old host end was shut
    /// accordingly, the new one is too, so its reader sees end-of-file.
    pub fn from_snapshot(stream: UnixStream, s: &ConnSnapshot) -> Self {
        if s.host_write_shut {
            let _ = stream.shutdown(Shutdown::Write);
        }
        Connection {
            stream,
            local_port: s.local_port,
            peer_port: s.peer_port,
            guest_cid: s.guest_cid,
            state: s.state,
            need_request: s.need_request,
            need_response: s.need_response,
            need_credit_update: s.need_credit_update,
            need_rst: s.need_rst,
            shutdown_to_send: s.shutdown_to_send,
            guest_shutdown: s.guest_shutdown,
            host_eof: s.host_eof,
            host_write_shut: s.host_write_shut,
            pending: s.pending.iter().copied().collect(),
            rx_cnt: s.rx_cnt,
            fwd_cnt: s.fwd_cnt,
            last_fwd_cnt_sent: s.last_fwd_cnt_sent,
            peer_buf_alloc: s.peer_buf_alloc,
            peer_fwd_cnt: s.peer_fwd_cnt,
            tx_cnt: s.tx_cnt,
        }
    }

    /// Whether the connection is done with and can be forgotten.
    pub fn is_dead(&self) -> bool {
        self.state == State::Closing && !self.need_rst
    }

    /// Records the guest's buffer space, which every guest packet carries.
    pub fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Bytes cela may still send the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Ends the connection with a reset to the guest.
    pub fn reset(&mut self) {
        if self.state != State::Closing {
            self.state = State::Closing;
            self.need_rst = true;
        }
    }

    /// The guest reset the connection: forget it without answering.
    pub fn guest_reset(&mut self) {
        self.state = State::Closing;
        self.need_rst = false;
    }

    /// The guest asked how much buffer is left.
    pub fn credit_requested(&mut self) {
        self.need_credit_update = true;
    }

    /// The guest accepted a host-initiated connection: tell the host process which port it got.
    pub fn guest_responded(&mut self) {
        if self.state != State::Connecting {
            self.reset();
            return;
        }
        self.state = State::Established;
        let line = format!("OK {}\n", self.local_port);
        // A fresh socket's buffer always holds these few bytes; anything less is a broken peer.
        match send(&self.stream, &[IoSlice::new(line.as_bytes())]) {
            Ok(n) if n == line.len() => {}
            _ => self.reset(),
        }
    }

    /// The guest sent SHUTDOWN with `flags`.
    pub fn guest_shutdown(&mut self, flags: u32) {
        self.guest_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        self.flush();
    }

    /// The guest sent `data`: it waits in `pending` until the next [`Connection::flush`], so
    /// the packets of one transmit batch reach the host end in one write (a guest writing
    /// 4 KiB at a time would otherwise cost a system call per 4 KiB).
    pub fn guest_data(&mut self, data: &[u8]) -> Result<(), Violation> {
        let waiting = self.rx_cnt.wrapping_sub(self.fwd_cnt) as usize;
        if waiting + data.len() > BUF_ALLOC as usize {
            return Err(Violation::Credit);
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
        self.pending.extend(data);
        Ok(())
    }

    fn forwarded(&mut self, n: usize) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= BUF_ALLOC / 4 {
            self.need_credit_update = true;
        }
    }

    /// Hands waiting guest bytes to the host end as far as it takes them; once all are handed
    /// over and the guest said it sends no more, shuts the host end's write side; once the
    /// guest closed both ways, resets (the closing handshake of §5.10.6.6).
    pub fn flush(&mut self) {
        if self.state == State::Closing {
            return;
        }
        while !self.pending.is_empty() {
            let (front, back) = self.pending.as_slices();
            match send(&self.stream, &[IoSlice::new(front), IoSlice::new(back)]) {
                Ok(0) => return,
                Ok(n) => {
                    self.pending.drain(..n);
                    self.forwarded(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reset();
                    return;
                }
            }
        }
        if self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            self.reset();
        }
    }

    fn header(&mut self, op: u16) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.need_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet for the guest, with its payload in `data`, given `room` payload bytes
    /// in the receive buffer at hand; `None` when there is nothing to send now.
    pub fn next_packet(&mut self, room: usize, data: &mut Vec<u8>) -> Option<Header> {
        data.clear();
        if self.need_rst {
            self.need_rst = false;
            return Some(self.header(OP_RST));
        }
        if self.state == State::Closing {
            return None;
        }
        if self.need_request {
            self.need_request = false;
            return Some(self.header(OP_REQUEST));
        }
        if self.state == State::Connecting {
            return None;
        }
        if self.need_response {
            self.need_response = false;
            return Some(self.header(OP_RESPONSE));
        }
        if let Some(h) = self.read_host(room, data) {
            return Some(h);
        }
        if self.shutdown_to_send != 0 {
            let mut h = self.header(OP_SHUTDOWN);
            h.flags = std::mem::take(&mut self.shutdown_to_send);
            return Some(h);
        }
        if self.need_credit_update {
            return Some(self.header(OP_CREDIT_UPDATE));
        }
        None
    }

    /// Reads what the host end has for the guest, within the guest's credit and `room`.
    fn read_host(&mut self, room: usize, data: &mut Vec<u8>) -> Option<Header> {
        if self.host_eof || self.guest_shutdown & SHUTDOWN_RCV != 0 {
            return None;
        }
        let want = room
            .min(self.peer_credit() as usize)
            .min(MAX_PAYLOAD as usize);
        if want == 0 {
            return None;
        }
        data.resize(want, 0);
        loop {
            match self.stream.read(data) {
                Ok(0) => {
                    data.clear();
                    self.host_eof = true;
                    self.shutdown_to_send |= SHUTDOWN_SEND;
                    return None;
                }
                Ok(n) => {
                    data.truncate(n);
                    self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                    let mut h = self.header(OP_RW);
                    h.len = n as u32;
                    return Some(h);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    data.clear();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        self.host_eof = true;
                        self.reset();
                    }
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn request(buf_alloc: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 80,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc,
            ..Header::default()
        }
    }

    #[test]
    fn an_accepted_connection_responds_then_carries_data_both_ways() {
        let (dev, mut host) = pair();
        let mut c = Connection::accepted(dev, &request(8));
        let mut data = Vec::new();
        let h = c.next_packet(4096, &mut data).unwrap();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (OP_RESPONSE, 80, 1234, 3)
        );
        assert_eq!(c.next_packet(4096, &mut data), None);

        c.guest_data(b"hello").unwrap();
        c.flush();
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");

        // The guest has 8 bytes of buffer: 12 bytes from the host go as 8, then wait.
        host.write_all(b"0123456789ab").unwrap();
        let h = c.next_packet(4096, &mut data).unwrap();
        assert_eq!((h.op, h.len, data.as_slice()), (OP_RW, 8, &b"01234567"[..]));
        assert_eq!(c.next_packet(4096, &mut data), None);
        let mut credit = request(8);
        credit.fwd_cnt = 8;
        c.update_peer_credit(&credit);
        let h = c.next_packet(2, &mut data).unwrap();
        assert_eq!((h.len, data.as_slice()), (2, &b"89"[..]));
    }

    #[test]
    fn host_eof_becomes_a_shutdown_and_guest_close_a_reset() {
        let (dev, host) = pair();
        let mut c = Connection::accepted(dev, &request(4096));
        let mut data = Vec::new();
        c.next_packet(4096, &mut data).unwrap();
        drop(host);
        let h = c.next_packet(4096, &mut data).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        c.guest_shutdown(SHUTDOWN_RCV | SHUTDOWN_SEND);
        assert_eq!(c.next_packet(4096, &mut data).unwrap().op, OP_RST);
        assert!(c.is_dead());
    }

    #[test]
    fn data_past_the_credit_is_a_violation_and_slow_hosts_buffer() {
        let (dev, mut host) = pair();
        let mut c = Connection::accepted(dev, &request(4096));
        let mut data = Vec::new();
        assert_eq!(c.next_packet(0, &mut data).unwrap().op, OP_RESPONSE);
        // Fill the Unix socket until it refuses, then the rest waits in `pending`.
        let chunk = vec![7u8; 64 << 10];
        let mut sent = 0usize;
        while sent + chunk.len() <= BUF_ALLOC as usize {
            c.guest_data(&chunk).unwrap();
            sent += chunk.len();
        }
        let waiting = c.rx_cnt.wrapping_sub(c.fwd_cnt) as usize;
        let too_much = vec![1u8; BUF_ALLOC as usize - waiting + 1];
        assert_eq!(c.guest_data(&too_much), Err(Violation::Credit));
        // The host reads everything: cela forwards the rest and offers credit again.
        host.set_nonblocking(true).unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            c.flush();
            match host.read(&mut buf) {
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if c.pending.is_empty() {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(total, sent);
        let h = c.next_packet(0, &mut data).unwrap();
        assert_eq!((h.op, h.fwd_cnt), (OP_CREDIT_UPDATE, sent as u32));
    }

    #[test]
    fn a_snapshot_carries_waiting_bytes_and_counters_to_a_new_host_end() {
        use nix::sys::socket::{setsockopt, sockopt::SndBuf};
        let (dev, mut old_host) = pair();
        setsockopt(&dev, SndBuf, &4096).unwrap();
        let mut c = Connection::accepted(dev, &request(4096));
        let mut data = Vec::new();
        assert_eq!(c.next_packet(0, &mut data).unwrap().op, OP_RESPONSE);
        let sent: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
        c.guest_data(&sent).unwrap();
        c.flush();
        let s = c.snapshot();
        assert!(
            !s.pending.is_empty(),
            "the small socket buffer leaves bytes waiting"
        );
        assert_eq!(Connection::check_snapshot(&s), Ok(()));
        let taken = s.fwd_cnt as usize;
        assert_eq!(taken + s.pending.len(), sent.len());
        // Taking a snapshot changed nothing.
        assert_eq!(c.snapshot(), s);

        let (dev, mut new_host) = pair();
        let mut restored = Connection::from_snapshot(dev, &s);
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; sent.len() - taken];
            new_host.read_exact(&mut got).unwrap();
            (got, sent, new_host)
        });
        while !restored.pending.is_empty() {
            restored.flush();
            std::thread::yield_now();
        }
        let (got, sent, _new_host) = reader.join().unwrap();
        assert_eq!(
            got,
            &sent[taken..],
            "the new host end gets the bytes that waited"
        );
        let h = restored.header(OP_CREDIT_UPDATE);
        assert_eq!(h.fwd_cnt, sent.len() as u32);
        // The old host end has what it had taken, and nothing more.
        old_host.set_nonblocking(true).unwrap();
        let mut old = Vec::new();
        let _ = old_host.read_to_end(&mut old);
        assert_eq!(old, &sent[..taken]);
    }

    #[test]
    fn a_snapshot_of_a_half_closed_connection_shuts_the_new_host_end() {
        let (dev, _old_host) = pair();
        let mut c = Connection::accepted(dev, &request(4096));
        c.guest_shutdown(SHUTDOWN_SEND);
        let s = c.snapshot();
        assert!(s.host_write_shut);
        let (dev, mut new_host) = pair();
        let _restored = Connection::from_snapshot(dev, &s);
        let mut b = [0u8; 1];
        assert_eq!(new_host.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn a_host_initiated_connection_waits_for_the_guest_response() {
        let (dev, mut host) = pair();
        let mut c = Connection::connecting(dev, 1 << 30, 5000, 3);
        let mut data = Vec::new();
        let h = c.next_packet(4096, &mut data).unwrap();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_REQUEST, 1 << 30, 5000));
        assert_eq!(c.next_packet(4096, &mut data), None);
        c.guest_responded();
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        // A second RESPONSE is a protocol error.
        c.guest_responded();
        assert_eq!(c.next_packet(4096, &mut data).unwrap().op, OP_RST);
    }
}
