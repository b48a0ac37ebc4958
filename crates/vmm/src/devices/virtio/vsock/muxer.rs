//! The host side of every vsock connection: which host socket a guest port leads to, the
//! hybrid Unix-socket front door for host-initiated connections, and the choice of the next
//! packet the guest receives.
//!
//! Host ends, by guest-side destination port:
//! * an *internal* port (registered by the monitor, e.g. cela-init's output and status
//!   channel): a Unix socket pair, one end handed to the monitor's [`PortHandler`];
//! * any other port P: a connection to the Unix socket `PATH_P`, where PATH is the `--vsock`
//!   socket, which some host process listens on; none there → the guest gets a reset.
//!
//! Host-initiated: a host process connects to PATH, writes `CONNECT <port>\n`, and once the
//! guest accepted, reads `OK <host port>\n` followed by the guest's bytes.
//!
//! The muxer keeps its own epoll instance holding the listening socket, the handshakes in
//! progress and every connection's socket (edge-triggered), and the device registers that one
//! fd with the device event loop. Whenever anything happens, the device retries every
//! connection (there are at most [`MAX_CONNECTIONS`]), so no edge is ever lost.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read};
use std::ops::Bound;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::VsockError;
use super::conn::{Connection, State};
use super::packet::{
    HOST_CID, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, TYPE_STREAM,
};
use crate::persist::devices::{ConnSnapshot, MAX_SAVED_RESETS, VsockState};

/// Receives the host end of each guest connection to an internal port.
pub type PortHandler = Box<dyn FnMut(UnixStream) + Send>;

/// Open connections at most (guest- and host-initiated together); more get a reset.
pub const MAX_CONNECTIONS: usize = 64;
/// Host processes at most that have connected to PATH and not yet sent their `CONNECT` line.
const MAX_HANDSHAKES: usize = 16;
/// The longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE_LINE: usize = 32;
/// Resets for packets that match no connection, waiting for receive buffers; more are dropped.
const MAX_QUEUED_RESETS: usize = 256;
/// Host-side ports of host-initiated connections are taken from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// The `--vsock` Unix socket: bound when the machine is built, removed when it goes.
#[derive(Debug)]
pub struct HostSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl HostSocket {
    /// Binds `path`, which must not exist yet (and whose directory must).
    pub fn bind(path: &Path) -> Result<Self, VsockError> {
        if path.symlink_metadata().is_ok() {
            return Err(VsockError::Exists(path.to_owned()));
        }
        let listener = UnixListener::bind(path).map_err(|source| VsockError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let socket = HostSocket {
            listener,
            path: path.to_owned(),
        };
        socket
            .listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Bind {
                path: path.to_owned(),
                source,
            })?;
        Ok(socket)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for HostSocket {
    fn drop(&mut self) {
        // A jailed monitor sees no path: its caller removes the socket.
        if !crate::jail::inside() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A host process that connected to PATH and is sending its `CONNECT` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    port.parse().ok()
}

/// Connection key: (host-side port, guest-side port).
type Key = (u32, u32);

pub struct Muxer {
    guest_cid: u64,
    host: Option<HostSocket>,
    internal: Vec<(u32, PortHandler)>,
    conns: BTreeMap<Key, Connection>,
    handshakes: Vec<Handshake>,
    resets: VecDeque<Header>,
    epoll: Epoll,
    next_local_port: u32,
    /// The connection that sent last, so the next packet comes from the one after it.
    last_sent: Option<Key>,
    /// Connections a restore carried over, waiting for their new host ends.
    carried: Vec<crate::persist::devices::ConnSnapshot>,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        host: Option<HostSocket>,
        internal: Vec<(u32, PortHandler)>,
    ) -> Result<Self, VsockError> {
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let muxer = Muxer {
            guest_cid,
            host,
            internal,
            conns: BTreeMap::new(),
            handshakes: Vec::new(),
            resets: VecDeque::new(),
            epoll,
            next_local_port: FIRST_LOCAL_PORT,
            last_sent: None,
            carried: Vec::new(),
        };
        if let Some(host) = &muxer.host {
            muxer
                .watch(host.listener.as_raw_fd())
                .map_err(VsockError::Epoll)?;
        }
        Ok(muxer)
    }

    /// The epoll fd that becomes readable when any host socket needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn watch(&self, fd: RawFd) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, 0))
    }

    /// Forgets every connection (the driver reset the device); the host socket stays.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.handshakes.clear();
        self.resets.clear();
        self.carried.clear();
        self.last_sent = None;
    }

    fn queue_reset(&mut self, reply: Header) {
        if self.resets.len() < MAX_QUEUED_RESETS {
            self.resets.push_back(reply);
        } else {
            tracing::debug!("virtio-vsock: too many resets waiting; dropping one");
        }
    }

    /// Answers a guest packet the device will not handle with a reset.
    pub fn reject(&mut self, h: &Header) {
        self.queue_reset(h.reset_reply());
    }

    /// Handles a well-formed packet from the guest (see `Header::check_from_guest`);
    /// `payload` is its data (empty unless RW).
    pub fn guest_packet(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            self.guest_connect(h);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.queue_reset(h.reset_reply());
            }
            return;
        };
        conn.update_peer_credit(h);
        match h.op {
            OP_RESPONSE => conn.guest_responded(),
            OP_RST => {
                tracing::debug!(
                    "virtio-vsock: the guest reset {}→{}",
                    h.src_port,
                    h.dst_port
                );
                conn.guest_reset();
            }
            OP_SHUTDOWN => {
                tracing::debug!(
                    "virtio-vsock: the guest shut {}→{} (flags {})",
                    h.src_port,
                    h.dst_port,
                    h.flags
                );
                conn.guest_shutdown(h.flags);
            }
            OP_RW => {
                if conn.state != super::conn::State::Established
                    || conn.guest_data(payload).is_err()
                {
                    tracing::debug!(
                        "virtio-vsock: port {}→{}: data out of turn or past its credit; resetting",
                        h.src_port,
                        h.dst_port
                    );
                    conn.reset();
                }
            }
            OP_CREDIT_REQUEST => conn.credit_requested(),
            OP_CREDIT_UPDATE => {}
            _ => conn.reset(),
        }
        if conn.is_dead() {
            self.conns.remove(&key);
        }
    }

    fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.queue_reset(h.reset_reply());
            return;
        }
        match self.attach_host_end(h.dst_port) {
            Ok(stream) => {
                tracing::debug!(
                    "virtio-vsock: guest port {} connected to host port {}",
                    h.src_port,
                    h.dst_port
                );
                self.conns.insert(key, Connection::accepted(stream, h));
            }
            Err(e) => {
                tracing::debug!("virtio-vsock: guest connect to port {}: {e}", h.dst_port);
                self.queue_reset(h.reset_reply());
            }
        }
    }

    /// Opens the host end for a connection to `port`, non-blocking and watched.
    fn attach_host_end(&mut self, port: u32) -> io::Result<UnixStream> {
        let stream = self.open_host_end(port)?;
        stream
            .set_nonblocking(true)
            .and_then(|()| self.watch(stream.as_raw_fd()))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot watch a connection: {e}")))?;
        Ok(stream)
    }

    fn open_host_end(&mut self, port: u32) -> io::Result<UnixStream> {
        if let Some((_, handler)) = self.internal.iter_mut().find(|(p, _)| *p == port) {
            let (device_end, host_end) = UnixStream::pair()?;
            handler(host_end);
            return Ok(device_end);
        }
        let Some(host) = &self.host else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no --vsock socket on the host",
            ));
        };
        if let Some(brokered) = crate::jail::connect_host_port(port) {
            return brokered;
        }
        let mut path = host.path.clone().into_os_string();
        path.push(format!("_{port}"));
        UnixStream::connect(&path)
    }

    fn is_internal(&self, port: u32) -> bool {
        self.internal.iter().any(|(p, _)| *p == port)
    }

    /// The connections for a snapshot, leaving them as they are: the established ones to
    /// internal ports (one per port: cela-init opens one each; a second one is reset), to be
    /// carried over; every other one the guest knows of, and the resets still queued for it,
    /// to be reset after restore (at most [`MAX_SAVED_RESETS`]; a reset beyond is dropped,
    /// as the queue drops one when full).
    pub fn save(&self) -> VsockState {
        // Carried over by a restore and not yet given host ends: carried on again.
        let mut connections: Vec<ConnSnapshot> = self.carried.clone();
        let mut reset: Vec<Key> = Vec::new();
        for (key, conn) in &self.conns {
            let s = conn.snapshot();
            if s.state == State::Closing && !s.need_rst {
                continue; // gone already
            }
            let carried = self.is_internal(s.local_port)
                && Connection::check_snapshot(&s).is_ok()
                && !connections.iter().any(|c| c.local_port == key.0);
            if carried {
                connections.push(s);
            } else if !s.need_request {
                // A REQUEST not sent yet: the guest never heard of the connection.
                reset.push(*key);
            }
        }
        for h in &self.resets {
            reset.push((h.src_port, h.dst_port));
        }
        let mut seen = std::collections::BTreeSet::new();
        reset.retain(|key| {
            !connections
                .iter()
                .any(|c| (c.local_port, c.peer_port) == *key)
                && seen.insert(*key)
        });
        if reset.len() > MAX_SAVED_RESETS {
            tracing::debug!(
                "virtio-vsock: {} resets to save; keeping {MAX_SAVED_RESETS}",
                reset.len()
            );
            reset.truncate(MAX_SAVED_RESETS);
        }
        VsockState { connections, reset }
    }

    /// Puts back a saved state (hostile: checked whole before anything is done): each carried
    /// connection gets a new host end from its internal port's handler, as a guest connect
    /// would, and continues where it was; every connection to reset gets a RST queued for the
    /// guest. The error says what is wrong.
    pub fn restore(&mut self, s: &VsockState) -> Result<(), String> {
        let ports = self.internal.len();
        if s.connections.len() > ports {
            return Err(format!(
                "{} connections to carry over; the device has {ports} internal ports",
                s.connections.len()
            ));
        }
        if s.reset.len() > MAX_SAVED_RESETS {
            return Err(format!(
                "{} connections to reset, more than {MAX_SAVED_RESETS}",
                s.reset.len()
            ));
        }
        let mut keys = std::collections::BTreeSet::new();
        for c in &s.connections {
            let key = (c.local_port, c.peer_port);
            if !self.is_internal(c.local_port) {
                return Err(format!(
                    "a connection to host port {} (from guest port {}), which is not an \
                     internal port of this device",
                    c.local_port, c.peer_port
                ));
            }
            if c.guest_cid != self.guest_cid {
                return Err(format!(
                    "connection {}→{}: guest CID {} where the device's is {}",
                    c.peer_port, c.local_port, c.guest_cid, self.guest_cid
                ));
            }
            if s.connections
                .iter()
                .filter(|o| o.local_port == c.local_port)
                .count()
                > 1
            {
                return Err(format!(
                    "more than one connection to internal port {}",
                    c.local_port
                ));
            }
            Connection::check_snapshot(c)
                .map_err(|e| format!("connection {}→{}: {e}", c.peer_port, c.local_port))?;
            keys.insert(key);
        }
        for key in &s.reset {
            if !keys.insert(*key) {
                return Err(format!("connection {}→{} is listed twice", key.1, key.0));
            }
        }
        if let Some(key) = keys.iter().find(|k| self.conns.contains_key(k)) {
            return Err(format!(
                "connection {}→{} exists already on this device",
                key.1, key.0
            ));
        }
        // Their host ends are made on the device thread, before it serves anything
        // ([`Muxer::attach_carried`]): a handler starts a thread, which must be that thread's
        // (jailed and filtered), not the restoring main thread's.
        self.carried = s.connections.clone();
        for &(local, peer) in &s.reset {
            self.queue_reset(Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: local,
                dst_port: peer,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Header::default()
            });
        }
        Ok(())
    }

    /// Gives the connections a restore carried over their new host ends (once; see
    /// [`Muxer::restore`]). One that cannot have one is reset.
    pub fn attach_carried(&mut self) {
        for c in std::mem::take(&mut self.carried) {
            match self.attach_host_end(c.local_port) {
                Ok(stream) => {
                    tracing::debug!(
                        "virtio-vsock: guest port {} carried over on internal port {}",
                        c.peer_port,
                        c.local_port
                    );
                    self.conns.insert(
                        (c.local_port, c.peer_port),
                        Connection::from_snapshot(stream, &c),
                    );
                }
                Err(e) => {
                    tracing::warn!(
                        "virtio-vsock: no new host end for internal port {}: {e}",
                        c.local_port
                    );
                    self.queue_reset(Header {
                        src_cid: HOST_CID,
                        dst_cid: self.guest_cid,
                        src_port: c.local_port,
                        dst_port: c.peer_port,
                        type_: TYPE_STREAM,
                        op: OP_RST,
                        ..Header::default()
                    });
                }
            }
        }
        // Guest bytes carried over go to their new host ends.
        self.flush_all();
    }

    /// Attends to the host sockets: drains the epoll, accepts host processes on PATH, reads
    /// their `CONNECT` lines, and hands waiting guest bytes to connections that can take them.
    pub fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        while let Ok(n) = self.epoll.wait(0, &mut events) {
            if n < events.len() {
                break;
            }
        }
        self.accept();
        self.read_handshakes();
        self.flush_all();
    }

    /// Hands the guest bytes of the last transmit batch to their host ends.
    pub fn flush_all(&mut self) {
        for conn in self.conns.values_mut() {
            conn.flush();
        }
        self.conns.retain(|_, c| !c.is_dead());
    }

    fn accept(&mut self) {
        let Some(host) = &self.host else { return };
        loop {
            let stream = match host.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.handshakes.len() >= MAX_HANDSHAKES {
                tracing::debug!("virtio-vsock: too many host connections waiting; closing one");
                continue;
            }
            if stream.set_nonblocking(true).is_err() || self.watch(stream.as_raw_fd()).is_err() {
                continue;
            }
            self.handshakes.push(Handshake {
                stream,
                line: Vec::new(),
            });
        }
    }

    fn read_handshakes(&mut self) {
        let mut i = 0;
        while i < self.handshakes.len() {
            match read_line(&mut self.handshakes[i]) {
                LineStatus::Waiting => i += 1,
                LineStatus::Broken => {
                    self.handshakes.swap_remove(i);
                }
                LineStatus::Done => {
                    let hs = self.handshakes.swap_remove(i);
                    self.host_connect(hs);
                }
            }
        }
    }

    fn host_connect(&mut self, hs: Handshake) {
        let Some(port) = parse_connect(&hs.line) else {
            tracing::debug!("virtio-vsock: a host process sent no CONNECT line; closing it");
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!("virtio-vsock: too many connections; refusing one to port {port}");
            return;
        }
        let local = self.allocate_local_port();
        tracing::debug!("virtio-vsock: host connection {local} to guest port {port}");
        self.conns.insert(
            (local, port),
            Connection::connecting(hs.stream, local, port, self.guest_cid),
        );
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    /// The next packet for the guest, given `room` payload bytes in the receive buffer at
    /// hand: queued resets first, then the connections in turn.
    pub fn next_packet(&mut self, room: usize, data: &mut Vec<u8>) -> Option<Header> {
        if let Some(h) = self.resets.pop_front() {
            data.clear();
            return Some(h);
        }
        let start = self.last_sent;
        let keys: Vec<Key> = match start {
            Some(k) => self
                .conns
                .range((Bound::Excluded(k), Bound::Unbounded))
                .chain(self.conns.range(..=k))
                .map(|(k, _)| *k)
                .collect(),
            None => self.conns.keys().copied().collect(),
        };
        let mut found = None;
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let packet = conn.next_packet(room, data);
            if let Some(h) = &packet
                && h.op != super::packet::OP_RW
            {
                tracing::debug!(
                    "virtio-vsock: to the guest: op {} flags {} {}→{}",
                    h.op,
                    h.flags,
                    h.src_port,
                    h.dst_port
                );
            }
            if conn.is_dead() {
                self.conns.remove(&key);
            }
            if let Some(h) = packet {
                self.last_sent = Some(key);
                found = Some(h);
                break;
            }
        }
        found
    }
}

enum LineStatus {
    Waiting,
    Done,
    Broken,
}

/// Reads a handshake line byte by byte (so no byte meant for the guest is taken).
fn read_line(hs: &mut Handshake) -> LineStatus {
    let mut byte = [0u8; 1];
    loop {
        match hs.stream.read(&mut byte) {
            Ok(0) => return LineStatus::Broken,
            Ok(_) if byte[0] == b'\n' => return LineStatus::Done,
            Ok(_) if hs.line.len() >= MAX_HANDSHAKE_LINE => return LineStatus::Broken,
            Ok(_) => hs.line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineStatus::Waiting,
            Err(_) => return LineStatus::Broken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 5000"), Some(5000));
        assert_eq!(parse_connect(b"CONNECT 5000\r"), Some(5000));
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }

    #[test]
    fn the_socket_file_is_refused_if_present_and_removed_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let socket = HostSocket::bind(&path).unwrap();
        assert!(matches!(
            HostSocket::bind(&path),
            Err(VsockError::Exists(_))
        ));
        drop(socket);
        assert!(!path.exists());
        let missing = dir.path().join("no/such/dir/v.sock");
        let err = HostSocket::bind(&missing).unwrap_err().to_string();
        assert!(err.contains("no/such/dir/v.sock"), "{err}");
        assert!(!missing.exists());
    }
}
