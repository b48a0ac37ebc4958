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
use super::conn::Connection;
use super::packet::{
    Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN,
};

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
        match self.open_host_end(h.dst_port) {
            Ok(stream) => {
                if let Err(e) = stream
                    .set_nonblocking(true)
                    .and_then(|()| self.watch(stream.as_raw_fd()))
                {
                    tracing::warn!("virtio-vsock: cannot watch a connection: {e}");
                    self.queue_reset(h.reset_reply());
                    return;
                }
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
