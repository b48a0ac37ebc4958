//! The vsock device against `virtio-queue`'s mock split queues, playing the guest driver:
//! connections both ways through real Unix sockets, credit, closing, and hostile packets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::conn::BUF_ALLOC;
use super::packet::*;
use super::*;
use crate::devices::virtio::Interrupt;
use crate::persist::devices::{ConnSnapshot, DeviceState, VsockState};

const QLEN: u16 = 256;
const GUEST_CID: u64 = 3;
const INTERNAL_PORT: u32 = 77;

/// A driver's view of the device: its memory, both queues, and bookkeeping.
struct Driver {
    mem: &'static GuestMemoryMmap,
    dev: Vsock,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    interrupt: Arc<Interrupt>,
    next_rx_desc: u16,
    next_tx_desc: u16,
    rx_seen: u16,
    rx_bufs: Vec<u64>,
    next_addr: u64,
}

impl Driver {
    fn new(host: Option<HostSocket>, internal: Vec<(u32, PortHandler)>) -> Driver {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap(),
        ));
        let rx = MockSplitQueue::create(mem, GuestAddress(0), QLEN);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QLEN);
        let event = MockSplitQueue::create(mem, GuestAddress(0x2_0000), QLEN);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut dev = Vsock::new(GUEST_CID, host, internal).unwrap();
        dev.activate(ActiveDevice {
            mem: mem.clone(),
            queues: vec![
                rx.create_queue().unwrap(),
                tx.create_queue().unwrap(),
                event.create_queue().unwrap(),
            ],
            acked_features: 0,
            interrupt: interrupt.clone(),
        })
        .unwrap();
        Driver {
            mem,
            dev,
            rx,
            tx,
            interrupt,
            next_rx_desc: 0,
            next_tx_desc: 0,
            rx_seen: 0,
            rx_bufs: Vec::new(),
            next_addr: 0x10_0000,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_addr;
        self.next_addr += len.next_multiple_of(64);
        a
    }

    /// Places a packet in the tx queue and notifies the device.
    fn send_raw(&mut self, bytes: &[u8]) {
        let addr = self.alloc(bytes.len() as u64);
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        let d = Descriptor::new(addr, bytes.len() as u32, 0, 0);
        self.tx
            .add_desc_chains(&[RawDescriptor::from(d)], self.next_tx_desc)
            .unwrap();
        self.next_tx_desc = (self.next_tx_desc + 1) % QLEN;
        self.dev.process_queue(TX);
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes);
    }

    /// Gives the device `n` receive buffers of `size` bytes and notifies it.
    fn give_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let addr = self.alloc(u64::from(size));
            let d = Descriptor::new(addr, size, VRING_DESC_F_WRITE as u16, 0);
            self.rx
                .add_desc_chains(&[RawDescriptor::from(d)], self.next_rx_desc)
                .unwrap();
            self.rx_bufs.push(addr);
            self.next_rx_desc = (self.next_rx_desc + 1) % QLEN;
        }
        self.dev.process_queue(RX);
    }

    /// The packets the device placed in receive buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.rx_seen != idx {
            let elem = used.unchecked_add(4 + 8 * u64::from(self.rx_seen % QLEN));
            let id: u32 = self.mem.read_obj(elem).unwrap();
            let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            if len == 0 {
                continue;
            }
            let addr = self.rx_bufs[id as usize];
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let h = Header::parse(&bytes).unwrap();
            assert_eq!(h.len as usize, bytes.len() - HEADER_LEN);
            out.push((h, bytes[HEADER_LEN..].to_vec()));
        }
        out
    }

    /// Waits (bounded) for the host side to have something, then collects it.
    fn poll_until(
        &mut self,
        mut done: impl FnMut(&[(Header, Vec<u8>)]) -> bool,
    ) -> Vec<(Header, Vec<u8>)> {
        let mut all = Vec::new();
        let fd = self.dev.muxer.epoll_fd();
        for _ in 0..200 {
            all.extend(self.received());
            if done(&all) {
                return all;
            }
            wait_readable(fd, 50);
            self.dev.process_host_event(0);
        }
        panic!("the host side never produced what was expected: {all:?}");
    }
}

/// Waits up to `ms` for `fd` to become readable.
fn wait_readable(fd: std::os::fd::RawFd, ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd array of length 1 that lives across the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

fn from_guest(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 << 10,
        ..Header::default()
    }
}

fn rw(src_port: u32, dst_port: u32, data: &[u8]) -> Header {
    Header {
        len: data.len() as u32,
        ..from_guest(OP_RW, src_port, dst_port)
    }
}

fn internal_port() -> (Vec<(u32, PortHandler)>, mpsc::Receiver<UnixStream>) {
    let (tx, rx) = mpsc::channel();
    let handler: PortHandler = Box::new(move |s| tx.send(s).unwrap());
    (vec![(INTERNAL_PORT, handler)], rx)
}

#[test]
fn the_config_space_holds_the_guest_cid() {
    let dev = Vsock::new(42, None, Vec::new()).unwrap();
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 42);
    assert_eq!(dev.device_type(), 19);
}

#[test]
fn a_guest_connection_to_an_internal_port_carries_data_both_ways_and_closes() {
    let (internal, streams) = internal_port();
    let mut d = Driver::new(None, internal);
    d.give_rx(8, 4096);
    d.send(from_guest(OP_REQUEST, 1000, INTERNAL_PORT), &[]);
    let got = d.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RESPONSE);
    assert_eq!(
        (got[0].0.src_port, got[0].0.dst_port),
        (INTERNAL_PORT, 1000)
    );
    assert_eq!(got[0].0.buf_alloc, BUF_ALLOC);
    let mut host = streams.recv_timeout(Duration::from_secs(5)).unwrap();

    d.send(rw(1000, INTERNAL_PORT, b"from guest"), b"from guest");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from guest");

    host.write_all(b"from host").unwrap();
    let got = d.poll_until(|p| !p.is_empty());
    assert_eq!(got[0].0.op, OP_RW);
    assert_eq!(got[0].1, b"from host");
    assert_eq!(got[0].0.fwd_cnt, 10);

    // The guest half-closes: the host reads end-of-file; the host closes: the guest gets
    // SHUTDOWN; the guest closes fully: RST, and the connection is gone.
    let mut shut = from_guest(OP_SHUTDOWN, 1000, INTERNAL_PORT);
    shut.flags = SHUTDOWN_SEND;
    d.send(shut, &[]);
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    drop(host);
    let got = d.poll_until(|p| p.iter().any(|(h, _)| h.op == OP_SHUTDOWN));
    assert!(got.iter().any(|(h, _)| h.flags == SHUTDOWN_SEND));
    shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    d.send(shut, &[]);
    let got = d.received();
    assert_eq!(got.last().unwrap().0.op, OP_RST);
    assert_eq!(d.dev.connection_count(), 0);
}

#[test]
fn guest_connections_reach_path_underscore_port_or_get_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
    let mut d = Driver::new(Some(HostSocket::bind(&path).unwrap()), Vec::new());
    d.give_rx(8, 4096);
    d.send(from_guest(OP_REQUEST, 1000, 5000), &[]);
    assert_eq!(d.received()[0].0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    d.send(rw(1000, 5000, b"abc"), b"abc");
    let mut buf = [0u8; 3];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"abc");
    // Nobody listens on port 5001.
    d.send(from_guest(OP_REQUEST, 1001, 5001), &[]);
    let got = d.received();
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RST, 1001));
    // The guest resets the first connection: the host end sees end-of-file.
    d.send(from_guest(OP_RST, 1000, 5000), &[]);
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert_eq!(d.dev.connection_count(), 0);
    drop(d);
    assert!(!path.exists(), "the socket file is removed with the device");
}

#[test]
fn a_host_process_connects_with_connect_and_gets_ok() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut d = Driver::new(Some(HostSocket::bind(&path).unwrap()), Vec::new());
    d.give_rx(8, 4096);
    let mut host = UnixStream::connect(&path).unwrap();
    host.write_all(b"CONNECT 52\nearly bytes").unwrap();
    let got = d.poll_until(|p| !p.is_empty());
    let req = got[0].0;
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid),
        (OP_REQUEST, 52, GUEST_CID)
    );
    let mut resp = from_guest(OP_RESPONSE, 52, req.src_port);
    resp.buf_alloc = 4096;
    d.send(resp, &[]);
    let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
    host.read_exact(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());
    // The bytes written right after the CONNECT line reach the guest.
    let got = d.poll_until(|p| !p.is_empty());
    assert_eq!(
        (got[0].0.op, got[0].1.as_slice()),
        (OP_RW, &b"early bytes"[..])
    );
    d.send(rw(52, req.src_port, b"hi"), b"hi");
    let mut two = [0u8; 2];
    host.read_exact(&mut two).unwrap();
    assert_eq!(&two, b"hi");
}

#[test]
fn a_refused_host_connection_is_closed_and_bad_lines_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut d = Driver::new(Some(HostSocket::bind(&path).unwrap()), Vec::new());
    d.give_rx(8, 4096);
    let mut host = UnixStream::connect(&path).unwrap();
    host.write_all(b"CONNECT 9\n").unwrap();
    let req = d.poll_until(|p| !p.is_empty())[0].0;
    d.send(from_guest(OP_RST, 9, req.src_port), &[]);
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0);

    let mut bad = UnixStream::connect(&path).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..200 {
        wait_readable(d.dev.muxer.epoll_fd(), 50);
        d.dev.process_host_event(0);
        if d.dev.muxer.connection_count() == 0 {
            break;
        }
    }
    assert_eq!(bad.read(&mut buf).unwrap(), 0);
    assert!(d.received().is_empty());
}

#[test]
fn hostile_packets_are_dropped_or_reset_and_never_crash() {
    let (internal, _streams) = internal_port();
    let mut d = Driver::new(None, internal);
    d.give_rx(16, 4096);
    // Too short for a header, wrong CIDs, a length longer than the chain: dropped.
    d.send_raw(&[1, 2, 3]);
    let mut wrong_cid = from_guest(OP_REQUEST, 1, INTERNAL_PORT);
    wrong_cid.src_cid = 9;
    d.send(wrong_cid, &[]);
    let mut long = rw(1, INTERNAL_PORT, b"");
    long.len = 1000;
    d.send(long, b"short");
    assert!(d.received().is_empty());
    // Unknown op, datagram type, data for no connection: reset.
    d.send(from_guest(42, 1, INTERNAL_PORT), &[]);
    let mut dgram = from_guest(OP_REQUEST, 2, INTERNAL_PORT);
    dgram.type_ = 3;
    d.send(dgram, &[]);
    d.send(rw(3, INTERNAL_PORT, b"x"), b"x");
    let got = d.received();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|(h, _)| h.op == OP_RST));
    // Data beyond the credit (the host end reads nothing, so its socket buffer fills, then
    // cela's): the connection is reset.
    d.send(from_guest(OP_REQUEST, 4, INTERNAL_PORT), &[]);
    assert_eq!(d.received()[0].0.op, OP_RESPONSE);
    let chunk = vec![0u8; MAX_PAYLOAD as usize];
    for _ in 0..(4 * BUF_ALLOC / MAX_PAYLOAD) {
        d.send(rw(4, INTERNAL_PORT, &chunk), &chunk);
    }
    assert!(d.received().iter().any(|(h, _)| h.op == OP_RST));
    assert!(!d.interrupt.needs_reset());
}

#[test]
fn connections_are_limited() {
    let (internal, _streams) = internal_port();
    let mut d = Driver::new(None, internal);
    d.give_rx(200, 256);
    for port in 0..(muxer::MAX_CONNECTIONS as u32 + 3) {
        d.send(from_guest(OP_REQUEST, port, INTERNAL_PORT), &[]);
    }
    let got = d.received();
    let responses = got.iter().filter(|(h, _)| h.op == OP_RESPONSE).count();
    let resets = got.iter().filter(|(h, _)| h.op == OP_RST).count();
    assert_eq!((responses, resets), (muxer::MAX_CONNECTIONS, 3));
}

#[test]
fn without_receive_buffers_packets_wait() {
    let (internal, _streams) = internal_port();
    let mut d = Driver::new(None, internal);
    d.send(from_guest(OP_REQUEST, 1, INTERNAL_PORT), &[]);
    assert!(d.received().is_empty());
    // A buffer too small for a header is returned unused; a good one gets the RESPONSE.
    d.give_rx(1, 10);
    d.give_rx(1, 64);
    let got = d.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RESPONSE);
}

// Snapshots: what survives of the connections, and what the guest is told.

fn json_round_trip(s: &DeviceState) -> DeviceState {
    serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap()
}

#[test]
fn an_internal_connection_survives_a_snapshot_and_the_others_are_reset() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
    let (internal, streams) = internal_port();
    let host_socket = HostSocket::bind(&dir.path().join("v.sock")).unwrap();
    let mut d = Driver::new(Some(host_socket), internal);
    d.give_rx(8, 4096);
    d.send(from_guest(OP_REQUEST, 1000, INTERNAL_PORT), &[]);
    d.send(from_guest(OP_REQUEST, 1001, 5000), &[]);
    assert!(d.received().iter().all(|(h, _)| h.op == OP_RESPONSE));
    let mut old_host = streams.recv_timeout(Duration::from_secs(5)).unwrap();
    let (_user, _) = listener.accept().unwrap();
    d.send(rw(1000, INTERNAL_PORT, b"before"), b"before");
    let mut buf = [0u8; 6];
    old_host.read_exact(&mut buf).unwrap();
    old_host.write_all(b"hi").unwrap();
    let got = d.poll_until(|p| !p.is_empty());
    assert_eq!((got[0].1.as_slice(), got[0].0.fwd_cnt), (&b"hi"[..], 6));

    let saved = json_round_trip(&d.dev.save_state());
    let DeviceState::Vsock(state) = &saved else {
        panic!("{saved:?}");
    };
    assert_eq!(state.connections.len(), 1);
    assert_eq!(
        (
            state.connections[0].local_port,
            state.connections[0].peer_port
        ),
        (INTERNAL_PORT, 1000)
    );
    assert_eq!(state.reset, vec![(5000, 1001)]);
    // Saving changed nothing: the old device runs on.
    assert_eq!(d.dev.connection_count(), 2);
    d.send(rw(1000, INTERNAL_PORT, b"x"), b"x");
    old_host.read_exact(&mut buf[..1]).unwrap();
    assert_eq!(&buf[..1], b"x");
    let saved = json_round_trip(&d.dev.save_state());

    // A new monitor: the same internal port, a new handler.
    let (internal, streams) = internal_port();
    let mut new = Driver::new(None, internal);
    new.dev.restore_state(&saved).unwrap();
    // The host ends are made on the device thread, at its first event, not by the restore.
    assert!(streams.try_recv().is_err());
    assert_eq!(new.dev.connection_count(), 0);
    new.dev.process_host_event(0);
    let mut new_host = streams.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(new.dev.connection_count(), 1);
    new.give_rx(8, 4096);
    let got = new.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let rst = got[0].0;
    assert_eq!(
        (rst.op, rst.src_cid, rst.src_port, rst.dst_cid, rst.dst_port),
        (OP_RST, HOST_CID, 5000, GUEST_CID, 1001)
    );
    // The guest goes on on its connection; its bytes reach the new host end, and the
    // counters go on: 6 + 1 bytes were forwarded before, 5 now.
    new.send(rw(1000, INTERNAL_PORT, b"after"), b"after");
    let mut five = [0u8; 5];
    new_host.read_exact(&mut five).unwrap();
    assert_eq!(&five, b"after");
    new_host.write_all(b"back").unwrap();
    let got = new.poll_until(|p| !p.is_empty());
    let (h, data) = &got[0];
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, INTERNAL_PORT, 1000));
    assert_eq!((data.as_slice(), h.fwd_cnt), (&b"back"[..], 12));
    // The old host end saw nothing of it.
    old_host.set_nonblocking(true).unwrap();
    assert!(old_host.read(&mut buf).is_err());
}

fn carried(local_port: u32) -> ConnSnapshot {
    ConnSnapshot {
        local_port,
        peer_port: 1000,
        guest_cid: GUEST_CID,
        state: conn::State::Established,
        need_request: false,
        need_response: false,
        need_credit_update: false,
        need_rst: false,
        shutdown_to_send: 0,
        guest_shutdown: 0,
        host_eof: false,
        host_write_shut: false,
        pending: b"abc".to_vec(),
        rx_cnt: 10,
        fwd_cnt: 7,
        last_fwd_cnt_sent: 7,
        peer_buf_alloc: 4096,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
    }
}

#[test]
fn hostile_vsock_states_are_refused_before_any_host_end_is_made() {
    type Edit = fn(&mut VsockState);
    let cases: &[(&str, Edit, &str)] = &[
        (
            "unknown port",
            |s| s.connections[0].local_port = 9,
            "host port 9 (from guest port 1000), which is not an internal port",
        ),
        (
            "too many connections",
            |s| s.connections.push(carried(INTERNAL_PORT)),
            "2 connections to carry over; the device has 1 internal ports",
        ),
        (
            "oversized pending",
            |s| {
                let c = &mut s.connections[0];
                c.pending = vec![0; BUF_ALLOC as usize + 1];
                c.rx_cnt = c.fwd_cnt.wrapping_add(BUF_ALLOC + 1);
            },
            "262145 bytes wait for the host end, more than the 262144 offered",
        ),
        (
            "pending the counters do not account for",
            |s| s.connections[0].rx_cnt = 7,
            "the counters say 0",
        ),
        (
            "another guest",
            |s| s.connections[0].guest_cid = 4,
            "guest CID 4",
        ),
        (
            "not established",
            |s| s.connections[0].state = conn::State::Closing,
            "not an established connection",
        ),
        (
            "unknown shutdown flags",
            |s| s.connections[0].guest_shutdown = 4,
            "not SHUTDOWN flags",
        ),
        (
            "a carried connection reset too",
            |s| s.reset.push((INTERNAL_PORT, 1000)),
            "listed twice",
        ),
        (
            "too many resets",
            |s| s.reset = (0..65).map(|p| (5000, p)).collect(),
            "65 connections to reset, more than 64",
        ),
    ];
    for (what, edit, want) in cases {
        let mut s = VsockState {
            connections: vec![carried(INTERNAL_PORT)],
            reset: vec![(5000, 1)],
        };
        edit(&mut s);
        let (internal, streams) = internal_port();
        let mut dev = Vsock::new(GUEST_CID, None, internal).unwrap();
        let err = dev
            .restore_state(&DeviceState::Vsock(s))
            .expect_err(what)
            .to_string();
        assert!(err.contains(want), "{what}: {err}");
        assert!(err.starts_with("restoring virtio-vsock: "), "{err}");
        assert!(streams.try_recv().is_err(), "{what}: a handler was called");
        assert_eq!(dev.connection_count(), 0);
    }
    // The unedited state restores, and its waiting bytes reach the new host end.
    let (internal, streams) = internal_port();
    let mut dev = Vsock::new(GUEST_CID, None, internal).unwrap();
    let s = VsockState {
        connections: vec![carried(INTERNAL_PORT)],
        reset: vec![(5000, 1)],
    };
    dev.restore_state(&DeviceState::Vsock(s)).unwrap();
    dev.process_host_event(0);
    let mut host = streams.recv_timeout(Duration::from_secs(5)).unwrap();
    let mut abc = [0u8; 3];
    host.read_exact(&mut abc).unwrap();
    assert_eq!(&abc, b"abc");
}
