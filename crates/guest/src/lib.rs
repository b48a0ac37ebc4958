//! The contract between the host (cela's VMM, or the QEMU fallback engine) and `cela-init`, the
//! init process cela puts in every microVM's initramfs.
//!
//! Both engines boot the same kernel and initramfs with the same command line, so the contract
//! is expressed only in terms a stock kernel carries on its own:
//!
//! * **Host → guest**: kernel command-line parameters in the `cela.` namespace, read by the init
//!   from `/proc/cmdline` (dotted parameters are not handed to init as argv or environment by
//!   the kernel, so they never leak into the workload). See [`BootRequest`].
//! * **Guest → host, with a virtio-vsock device** (cela's KVM engine always has one): the init
//!   connects to the host (CID 2) on three ports: [`VSOCK_CONTROL_PORT`] carries
//!   [`ControlMessage`] lines, [`VSOCK_STDOUT_PORT`] and [`VSOCK_STDERR_PORT`] the command's
//!   standard output and error, byte for byte. After the command ends the init shuts the two
//!   output streams, sends `exit N`, and waits until the host closes the control connection:
//!   the host does so once it has written out both streams, so no output is lost to the
//!   power-off. The serial console then carries only the console (kernel messages, a shell).
//!   The host may write [`HostRequest`] lines on the same control connection (`signal N`: pass
//!   signal N to the workload, how a graceful `cela stop` reaches a VM).
//! * **Exec** (with vsock): the init starts an agent listening on [`VSOCK_AGENT_PORT`] of the
//!   guest; each connection runs one command in the guest ([`exec`] has the protocol), which is
//!   how `cela exec` reaches a running microVM.
//! * **Guest → host, without vsock** (the QEMU engine): the second serial port (COM2,
//!   `/dev/ttyS1`) is a control channel that carries nothing but [`ControlMessage`] lines; the
//!   first serial port (COM1) is the console and carries the workload's output untouched
//!   (standard output and error together). The host may write [`HostRequest`] lines on COM2.
//! * **Ending the VM**: the init powers the machine off (ACPI S5) after reporting; a guest reboot
//!   or kernel panic ends the VM too and is reported by the engine, not by the init.

pub mod beneath;
pub mod exec;
pub mod netif;
pub mod users;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Kernel parameter carrying the command to run, as URL-safe base64 (no padding) of the argv
/// joined with NUL bytes. Absent: the init starts an interactive shell on the console.
pub const CMD_PARAM: &str = "cela.cmd";
/// Kernel parameter carrying the workload's environment, encoded like [`CMD_PARAM`]
/// (`KEY=VALUE` entries joined with NUL bytes).
pub const ENV_PARAM: &str = "cela.env";
/// Kernel parameter naming the disk to use as the root filesystem, by its virtio-blk serial
/// (see [`ROOTFS_SERIAL`]). Absent: the workload runs in the initramfs.
pub const ROOT_PARAM: &str = "cela.root";
/// The serial cela gives the `--rootfs` disk; at most 20 bytes, the virtio-blk ID length.
pub const ROOTFS_SERIAL: &str = "cela-rootfs";
/// Kernel parameter carrying the guest side of one network card, encoded like [`CMD_PARAM`]:
/// the entries `ADDRESS/PREFIX`, `GATEWAY` and `MAC` (the interface to configure, found by its
/// address), once per card in the machine's order. Absent: the init leaves network interfaces
/// alone.
pub const NET_PARAM: &str = "cela.net";
/// Kernel parameter carrying one lab link's card, encoded like [`CMD_PARAM`]: the entries
/// `NAME`, `MAC` and `ADDRESS/PREFIX` (empty for none), once per link card
/// ([`LinkRequest`]).
pub const LINK_PARAM: &str = "cela.link";
/// Kernel parameter carrying the workload's working directory (encoded like [`CMD_PARAM`], one
/// entry). Absent: `/`.
pub const WORKDIR_PARAM: &str = "cela.workdir";
/// Kernel parameter carrying the user the workload runs as, `USER[:GROUP]` by name or number
/// as in an OCI image config (encoded like [`CMD_PARAM`], one entry), resolved by the init in
/// the root filesystem's `/etc/passwd` and `/etc/group`. Absent: root.
pub const USER_PARAM: &str = "cela.user";
/// Kernel parameter asking for the command to run on the console as its terminal
/// (`cela.tty=1`, [`BootRequest::tty`]).
pub const TTY_PARAM: &str = "cela.tty";
/// Kernel parameter telling the init that the host sends the guest's hosts file
/// (`cela.hosts=1`, [`BootRequest::hosts`]).
pub const HOSTS_PARAM: &str = "cela.hosts";
/// The most names a hosts file sent to the guest carries ([`HostRequest::Host`]).
pub const MAX_HOSTS: usize = 1024;
/// Path, inside the initramfs, of the file listing kernel modules to load at boot, one
/// initramfs path per line, already in dependency order.
pub const MODULE_LOAD_ORDER: &str = "/lib/modules/cela/load.order";
/// The guest device node of the control channel.
pub const CONTROL_TTY: &str = "/dev/ttyS1";
/// The guest device node of the console.
pub const CONSOLE_TTY: &str = "/dev/ttyS0";
/// The host's vsock CID (virtio 1.2 §5.10.4).
pub const VSOCK_HOST_CID: u32 = 2;
/// The host vsock port of the control channel (`ready`, `exit N`); `CEL\0` in ASCII. These
/// three ports are served by the monitor itself, never by a `--vsock` socket.
pub const VSOCK_CONTROL_PORT: u32 = 0x4345_4c00;
/// The host vsock port of the command's standard output.
pub const VSOCK_STDOUT_PORT: u32 = 0x4345_4c01;
/// The host vsock port of the command's standard error.
pub const VSOCK_STDERR_PORT: u32 = 0x4345_4c02;
/// The *guest* vsock port the init's exec agent listens on (see [`exec`]).
pub const VSOCK_AGENT_PORT: u32 = 0x4345_4c03;

/// What the host asks the init to do, decoded from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BootRequest {
    /// The command and its arguments; `None` asks for an interactive shell.
    pub command: Option<Vec<String>>,
    /// Extra environment for the command, as `KEY=VALUE` strings.
    pub env: Vec<String>,
    /// The serial of the disk holding the root filesystem to switch to before the workload
    /// starts (1-20 characters of `[A-Za-z0-9._-]`).
    pub root: Option<String>,
    /// The network interfaces the init configures before running the command, in the
    /// machine's order (a default route through at most one of them).
    pub nets: Vec<NetRequest>,
    /// The lab links' cards (after the networks' in the machine's order): renamed and
    /// addressed as the lab file says, no route through them.
    pub links: Vec<LinkRequest>,
    /// The command's working directory (absolute); `None` is `/`.
    pub workdir: Option<String>,
    /// `USER[:GROUP]` (names or numbers) the command runs as; `None` is root.
    pub user: Option<String>,
    /// Run the command on the console as its terminal (`cela run -t`): cooked mode, its
    /// controlling terminal, its output on the console rather than on vsock. The host passes
    /// the terminal's size later ([`HostRequest::Resize`]).
    pub tty: bool,
    /// The host sends the names of the instances on the guest's networks (a block of
    /// [`HostRequest::Host`] lines, again whenever they change); the init writes them to the
    /// root's `/etc/hosts` and waits for the first block before starting the workload.
    pub hosts: bool,
}

/// One card of a lab link (`cela lab up` with a vm node at a link's end): the init names the
/// interface with MAC address `mac` `name` and gives it `address`, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRequest {
    /// An interface name: 1 to 15 of `[A-Za-z0-9_.-]`.
    pub name: String,
    pub mac: [u8; 6],
    pub address: Option<(std::net::Ipv4Addr, u8)>,
}

impl LinkRequest {
    fn encode(&self) -> String {
        encode_list(&[
            self.name.clone(),
            format_mac(&self.mac),
            self.address
                .map(|(a, p)| format!("{a}/{p}"))
                .unwrap_or_default(),
        ])
    }

    fn decode(value: &str) -> Result<Self, DecodeError> {
        let bad = |reason: String| DecodeError {
            param: LINK_PARAM,
            reason,
        };
        let fields = decode_list(LINK_PARAM, value)?;
        let [name, mac, address] = fields.as_slice() else {
            return Err(bad(format!(
                "expected NAME, MAC and ADDRESS/PREFIX, got {} fields",
                fields.len()
            )));
        };
        let valid = (1..16).contains(&name.len())
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid {
            return Err(bad(format!("{name:?} is not an interface name")));
        }
        let mac = parse_mac(mac).ok_or_else(|| bad(format!("{mac:?} is not a MAC address")))?;
        let address = if address.is_empty() {
            None
        } else {
            Some(parse_cidr(address, 32).map_err(bad)?)
        };
        Ok(LinkRequest {
            name: name.clone(),
            mac,
            address,
        })
    }
}

/// The guest side of one network card: the init gives the interface with MAC address `mac`
/// the address `address/prefix`, brings it up and routes everything else through `gateway`
/// (the host's end, or the network's), unless that is 0.0.0.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetRequest {
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    pub mac: [u8; 6],
}

impl NetRequest {
    fn encode(&self) -> String {
        encode_list(&[
            format!("{}/{}", self.address, self.prefix),
            self.gateway.to_string(),
            format_mac(&self.mac),
        ])
    }

    fn decode(value: &str) -> Result<Self, DecodeError> {
        let bad = |reason: String| DecodeError {
            param: NET_PARAM,
            reason,
        };
        let fields = decode_list(NET_PARAM, value)?;
        let [cidr, gateway, mac] = fields.as_slice() else {
            return Err(bad(format!(
                "expected ADDRESS/PREFIX, GATEWAY and MAC, got {} fields",
                fields.len()
            )));
        };
        let (address, prefix) = parse_cidr(cidr, 30).map_err(bad)?;
        let gateway = gateway
            .parse()
            .map_err(|_| bad(format!("gateway {gateway:?} is not an IPv4 address")))?;
        let mac = parse_mac(mac).ok_or_else(|| bad(format!("{mac:?} is not a MAC address")))?;
        Ok(NetRequest {
            address,
            prefix,
            gateway,
            mac,
        })
    }
}

/// `ADDRESS/PREFIX` with the prefix in 1..=`max`; or why not.
fn parse_cidr(text: &str, max: u8) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (address, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not ADDRESS/PREFIX"))?;
    let address = address
        .parse()
        .map_err(|_| format!("{address:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=max).contains(p))
        .ok_or_else(|| format!("prefix {prefix:?} is not in 1..={max}"))?;
    Ok((address, prefix))
}

/// `aa:bb:cc:dd:ee:ff`, lower case.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Why a `cela.*` parameter on the command line could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub param: &'static str,
    pub reason: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kernel parameter {}: {}", self.param, self.reason)
    }
}

impl std::error::Error for DecodeError {}

fn encode_list(items: &[String]) -> String {
    URL_SAFE_NO_PAD.encode(items.join("\0"))
}

fn decode_list(param: &'static str, value: &str) -> Result<Vec<String>, DecodeError> {
    let bytes = URL_SAFE_NO_PAD.decode(value).map_err(|e| DecodeError {
        param,
        reason: format!("not base64url: {e}"),
    })?;
    let text = String::from_utf8(bytes).map_err(|_| DecodeError {
        param,
        reason: "not UTF-8".into(),
    })?;
    if text.is_empty() {
        return Ok(Vec::new());
    }
    Ok(text.split('\0').map(str::to_owned).collect())
}

/// Decodes a parameter that holds exactly one non-empty entry.
fn decode_one(param: &'static str, value: &str) -> Result<String, DecodeError> {
    match decode_list(param, value)?.as_slice() {
        [one] if !one.is_empty() => Ok(one.clone()),
        other => Err(DecodeError {
            param,
            reason: format!("expected one non-empty entry, got {}", other.len()),
        }),
    }
}

/// Decodes a parameter that is `0` or `1`.
fn decode_flag(param: &'static str, value: &str) -> Result<bool, DecodeError> {
    match value {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(DecodeError {
            param,
            reason: format!("{value:?} is not 0 or 1"),
        }),
    }
}

impl BootRequest {
    /// The `cela.*` parameters for this request, to append to the kernel command line.
    pub fn to_kernel_params(&self) -> String {
        let mut params = Vec::new();
        if let Some(cmd) = &self.command {
            params.push(format!("{CMD_PARAM}={}", encode_list(cmd)));
        }
        if !self.env.is_empty() {
            params.push(format!("{ENV_PARAM}={}", encode_list(&self.env)));
        }
        if let Some(root) = &self.root {
            params.push(format!("{ROOT_PARAM}={root}"));
        }
        for net in &self.nets {
            params.push(format!("{NET_PARAM}={}", net.encode()));
        }
        for link in &self.links {
            params.push(format!("{LINK_PARAM}={}", link.encode()));
        }
        if let Some(dir) = &self.workdir {
            params.push(format!(
                "{WORKDIR_PARAM}={}",
                encode_list(std::slice::from_ref(dir))
            ));
        }
        if let Some(user) = &self.user {
            params.push(format!(
                "{USER_PARAM}={}",
                encode_list(std::slice::from_ref(user))
            ));
        }
        if self.tty {
            params.push(format!("{TTY_PARAM}=1"));
        }
        if self.hosts {
            params.push(format!("{HOSTS_PARAM}=1"));
        }
        params.join(" ")
    }

    /// Decodes the request from the whole kernel command line (`/proc/cmdline`).
    pub fn from_cmdline(cmdline: &str) -> Result<Self, DecodeError> {
        let mut req = BootRequest::default();
        for word in cmdline.split_ascii_whitespace() {
            if let Some(v) = word
                .strip_prefix(CMD_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                let argv = decode_list(CMD_PARAM, v)?;
                if argv.is_empty() {
                    return Err(DecodeError {
                        param: CMD_PARAM,
                        reason: "empty command".into(),
                    });
                }
                req.command = Some(argv);
            } else if let Some(v) = word
                .strip_prefix(ENV_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                req.env = decode_list(ENV_PARAM, v)?;
            } else if let Some(v) = word
                .strip_prefix(ROOT_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                let valid = (1..=20).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !valid {
                    return Err(DecodeError {
                        param: ROOT_PARAM,
                        reason: format!("{v:?} is not a disk serial (1-20 of A-Z a-z 0-9 . _ -)"),
                    });
                }
                req.root = Some(v.to_owned());
            } else if let Some(v) = word
                .strip_prefix(NET_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                req.nets.push(NetRequest::decode(v)?);
            } else if let Some(v) = word
                .strip_prefix(LINK_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                req.links.push(LinkRequest::decode(v)?);
            } else if let Some(v) = word
                .strip_prefix(WORKDIR_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                let dir = decode_one(WORKDIR_PARAM, v)?;
                if !dir.starts_with('/') {
                    return Err(DecodeError {
                        param: WORKDIR_PARAM,
                        reason: format!("{dir:?} is not an absolute path"),
                    });
                }
                req.workdir = Some(dir);
            } else if let Some(v) = word
                .strip_prefix(USER_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                req.user = Some(decode_one(USER_PARAM, v)?);
            } else if let Some(v) = word
                .strip_prefix(TTY_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                req.tty = decode_flag(TTY_PARAM, v)?;
            } else if let Some(v) = word
                .strip_prefix(HOSTS_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                req.hosts = decode_flag(HOSTS_PARAM, v)?;
            }
        }
        Ok(req)
    }
}

/// One line on the control channel (guest → host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMessage {
    /// The init is up and about to start the workload (a boot-time marker for benchmarks).
    Ready,
    /// The workload finished with this status: its exit code, or 128 + the signal that killed
    /// it, as a shell reports it.
    Exit(u8),
}

impl ControlMessage {
    /// The line to write on the control channel, newline included.
    pub fn to_line(self) -> String {
        match self {
            ControlMessage::Ready => "ready\n".to_string(),
            ControlMessage::Exit(code) => format!("exit {code}\n"),
        }
    }

    /// Parses one line (without its newline); unknown lines give `None`.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim();
        if line == "ready" {
            return Some(ControlMessage::Ready);
        }
        let code = line.strip_prefix("exit ")?;
        code.parse().ok().map(ControlMessage::Exit)
    }
}

/// One line on the control channel in the other direction (host → guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRequest {
    /// Send this signal to the workload (`cela stop` sends SIGTERM, then SIGKILL).
    Signal(i32),
    /// The console's terminal has this many rows and columns now (a workload run with
    /// [`BootRequest::tty`]; its foreground processes get SIGWINCH).
    Resize { rows: u16, cols: u16 },
    /// The machine was restored from a snapshot: the wall clock is this now (`CLOCK_REALTIME`,
    /// seconds and nanoseconds since the epoch); the guest's own lags by the time it was away.
    Clock { secs: i64, nanos: u32 },
    /// The machine was restored: mix these random bytes into the kernel's pool and reseed its
    /// generator, so copies of one snapshot do not draw the same numbers.
    Entropy([u8; ENTROPY_BYTES]),
    /// The machine was restored as another instance: its host name is this now.
    Hostname(Hostname),
    /// The machine was restored as another instance with `--net auto`: the interface the init
    /// configured at boot takes this MAC address, address and gateway (its old ones were the
    /// saved instance's, which another copy may hold).
    Network(NetRequest),
    /// A hosts file follows: [`HostRequest::Host`] lines up to [`HostRequest::HostsEnd`]
    /// (a block that is cut off is forgotten when the next one begins).
    HostsBegin,
    /// One name of the block: an instance on one of the guest's networks.
    Host {
        address: std::net::Ipv4Addr,
        name: Hostname,
    },
    /// The block is whole: the root's `/etc/hosts` becomes loopback and these names.
    HostsEnd,
}

/// How many random bytes a restored guest is given.
pub const ENTROPY_BYTES: usize = 32;

/// A host name as a guest takes it: 1 to 64 letters, digits, `-`, `.` and `_`, not starting
/// with `-` or `.`; kept inline so that requests stay `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hostname {
    len: u8,
    bytes: [u8; 64],
}

impl Hostname {
    pub fn new(name: &str) -> Option<Hostname> {
        let b = name.as_bytes();
        let ok = (1..=64).contains(&b.len())
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-._".contains(c));
        if !ok {
            return None;
        }
        let mut bytes = [0u8; 64];
        bytes[..b.len()].copy_from_slice(b);
        Some(Hostname {
            len: b.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).expect("checked ASCII")
    }
}

impl HostRequest {
    /// The block of requests that gives the guest this hosts file: the names in order, at
    /// most [`MAX_HOSTS`]; a name a guest would not take is left out (and named in the error
    /// list returned beside).
    pub fn hosts_block(
        entries: &[(std::net::Ipv4Addr, String)],
    ) -> (Vec<HostRequest>, Vec<String>) {
        let mut out = vec![HostRequest::HostsBegin];
        let mut refused = Vec::new();
        for (address, name) in entries.iter().take(MAX_HOSTS) {
            match Hostname::new(name) {
                Some(name) => out.push(HostRequest::Host {
                    address: *address,
                    name,
                }),
                None => refused.push(name.clone()),
            }
        }
        out.push(HostRequest::HostsEnd);
        (out, refused)
    }

    /// The line to write on the control channel, newline included.
    pub fn to_line(self) -> String {
        match self {
            HostRequest::Signal(n) => format!("signal {n}\n"),
            HostRequest::Resize { rows, cols } => format!("resize {rows} {cols}\n"),
            HostRequest::Clock { secs, nanos } => format!("clock {secs} {nanos}\n"),
            HostRequest::Entropy(bytes) => {
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                format!("entropy {hex}\n")
            }
            HostRequest::Hostname(h) => format!("hostname {}\n", h.as_str()),
            HostRequest::Network(n) => format!("net {}\n", n.encode()),
            HostRequest::HostsBegin => "hosts-begin\n".into(),
            HostRequest::Host { address, name } => format!("host {address} {}\n", name.as_str()),
            HostRequest::HostsEnd => "hosts-end\n".into(),
        }
    }

    /// Parses one line (without its newline); unknown lines, signal numbers outside 1..=64
    /// and sizes that are not two u16 give `None`.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim();
        match line {
            "hosts-begin" => return Some(HostRequest::HostsBegin),
            "hosts-end" => return Some(HostRequest::HostsEnd),
            _ => {}
        }
        if let Some(entry) = line.strip_prefix("host ") {
            let (address, name) = entry.split_once(' ')?;
            return Some(HostRequest::Host {
                address: address.parse().ok()?,
                name: Hostname::new(name)?,
            });
        }
        if let Some(t) = line.strip_prefix("clock ") {
            let (secs, nanos) = t.split_once(' ')?;
            let nanos: u32 = nanos.parse().ok()?;
            return (nanos < 1_000_000_000).then_some(HostRequest::Clock {
                secs: secs.parse().ok()?,
                nanos,
            });
        }
        if let Some(hex) = line.strip_prefix("entropy ") {
            if hex.len() != ENTROPY_BYTES * 2 || !hex.is_ascii() {
                return None;
            }
            let mut bytes = [0u8; ENTROPY_BYTES];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
            }
            return Some(HostRequest::Entropy(bytes));
        }
        if let Some(name) = line.strip_prefix("hostname ") {
            return Hostname::new(name).map(HostRequest::Hostname);
        }
        if let Some(net) = line.strip_prefix("net ") {
            return NetRequest::decode(net).ok().map(HostRequest::Network);
        }
        if let Some(size) = line.strip_prefix("resize ") {
            let (rows, cols) = size.split_once(' ')?;
            return Some(HostRequest::Resize {
                rows: rows.parse().ok()?,
                cols: cols.parse().ok()?,
            });
        }
        let n: i32 = line.strip_prefix("signal ")?.parse().ok()?;
        (1..=64).contains(&n).then_some(HostRequest::Signal(n))
    }
}

/// A control-channel message type: one line of text.
pub trait ControlLine: Sized {
    fn parse_line(line: &str) -> Option<Self>;
}

impl ControlLine for ControlMessage {
    fn parse_line(line: &str) -> Option<Self> {
        ControlMessage::parse(line)
    }
}

impl ControlLine for HostRequest {
    fn parse_line(line: &str) -> Option<Self> {
        HostRequest::parse(line)
    }
}

/// Accumulates control-channel bytes and yields complete messages (guest → host
/// [`ControlMessage`]s by default, or host → guest [`HostRequest`]s).
#[derive(Debug)]
pub struct ControlParser<T = ControlMessage> {
    pending: Vec<u8>,
    _kind: std::marker::PhantomData<T>,
}

impl<T> Default for ControlParser<T> {
    fn default() -> Self {
        ControlParser {
            pending: Vec::new(),
            _kind: std::marker::PhantomData,
        }
    }
}

impl<T: ControlLine> ControlParser<T> {
    /// Feeds bytes read from the channel; returns the messages completed by them. Bytes that do
    /// not form a known message are dropped (the channel is the other side's input). A line
    /// longer than 256 bytes is discarded rather than buffered without bound.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<T> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if let Ok(line) = std::str::from_utf8(&self.pending) {
                    out.extend(T::parse_line(line));
                }
                self.pending.clear();
            } else if self.pending.len() < 256 {
                self.pending.push(b);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_requests_round_trip_and_garbage_is_dropped() {
        let mut entropy = [0u8; ENTROPY_BYTES];
        entropy[0] = 0xab;
        entropy[31] = 0x01;
        for r in [
            HostRequest::Clock {
                secs: 1_796_000_000,
                nanos: 999_999_999,
            },
            HostRequest::Entropy(entropy),
            HostRequest::Hostname(Hostname::new("vm-restored.1").unwrap()),
            HostRequest::Network(NetRequest {
                address: "10.211.0.6".parse().unwrap(),
                prefix: 30,
                gateway: "10.211.0.5".parse().unwrap(),
                mac: [0x02, 0xce, 0x1a, 0xff, 0x00, 0x07],
            }),
            HostRequest::HostsBegin,
            HostRequest::Host {
                address: "10.214.3.7".parse().unwrap(),
                name: Hostname::new(&"n".repeat(64)).unwrap(),
            },
            HostRequest::HostsEnd,
        ] {
            let line = r.to_line();
            assert!(line.len() < 256, "{line}");
            assert_eq!(HostRequest::parse(line.trim_end()), Some(r), "{line}");
        }
        for bad in [
            "clock 1",
            "clock x 1",
            "clock 1 1000000000",
            "entropy 00",
            "entropy zz00000000000000000000000000000000000000000000000000000000000000",
            "hostname -rf",
            "hostname a b",
            "hostname ",
            "net ",
            "net MTAuMC4wLjIvMzA",
            "host 10.0.0.1",
            "host 10.0.0.256 a",
            "host ::1 a",
            "host 10.0.0.1 a b",
            "host 10.0.0.1 -a",
            "hosts-begin x",
        ] {
            assert_eq!(HostRequest::parse(bad), None, "{bad}");
        }
        assert!(Hostname::new(&"a".repeat(64)).is_some());
        assert!(Hostname::new(&"a".repeat(65)).is_none());
    }

    #[test]
    fn request_round_trips_through_the_cmdline() {
        let req = BootRequest {
            command: Some(vec!["sh".into(), "-c".into(), "echo 'a b'; exit 7".into()]),
            env: vec!["A=1".into(), "B=x y".into()],
            root: Some(ROOTFS_SERIAL.into()),
            nets: vec![
                NetRequest {
                    address: [10, 0, 0, 2].into(),
                    prefix: 30,
                    gateway: [10, 0, 0, 1].into(),
                    mac: [0x02, 0xce, 0x1a, 0, 0xab, 0xff],
                },
                NetRequest {
                    address: [10, 9, 0, 2].into(),
                    prefix: 24,
                    gateway: std::net::Ipv4Addr::UNSPECIFIED,
                    mac: [0x02, 0xce, 0x1a, 0, 0xab, 0x01],
                },
            ],
            links: vec![
                LinkRequest {
                    name: "eth1".into(),
                    mac: [0x02, 0xce, 0x1a, 0, 0xab, 0x02],
                    address: Some(([10, 0, 1, 2].into(), 24)),
                },
                LinkRequest {
                    name: "r1-up.x".into(),
                    mac: [0x02, 0xce, 0x1a, 0, 0xab, 0x03],
                    address: None,
                },
            ],
            workdir: Some("/srv/a b".into()),
            user: Some("nobody:nogroup".into()),
            tty: true,
            hosts: true,
        };
        let cmdline = format!("console=ttyS0 quiet {} panic=-1", req.to_kernel_params());
        // One word per parameter: the kernel splits its command line on spaces.
        assert_eq!(req.to_kernel_params().split(' ').count(), 11);
        let enc = |fields: &[&str]| {
            let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
            format!("{LINK_PARAM}={}", encode_list(&fields))
        };
        for (fields, needle) in [
            (&["eth1", "02:00:00:00:00:01"][..], "got 2 fields"),
            (&["eth 1", "02:00:00:00:00:01", ""][..], "interface name"),
            (
                &["a-very-long-name", "02:00:00:00:00:01", ""][..],
                "interface name",
            ),
            (&["eth1", "02:00:00:00:00", ""][..], "MAC"),
            (
                &["eth1", "02:00:00:00:00:01", "10.0.0.1"][..],
                "ADDRESS/PREFIX",
            ),
            (&["eth1", "02:00:00:00:00:01", "10.0.0.1/33"][..], "prefix"),
        ] {
            let e = BootRequest::from_cmdline(&enc(fields))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{fields:?}: {e}");
        }
        assert_eq!(BootRequest::from_cmdline(&cmdline).unwrap(), req);
    }

    #[test]
    fn malformed_net_requests_are_named_in_the_error() {
        let enc = |fields: &[&str]| {
            let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
            format!("{NET_PARAM}={}", encode_list(&fields))
        };
        for (fields, needle) in [
            (&["10.0.0.2/30", "10.0.0.1"][..], "got 2 fields"),
            (
                &["10.0.0.2", "10.0.0.1", "02:00:00:00:00:01"][..],
                "ADDRESS/PREFIX",
            ),
            (
                &["10.0.0.256/30", "10.0.0.1", "02:00:00:00:00:01"][..],
                "IPv4",
            ),
            (
                &["10.0.0.2/31", "10.0.0.1", "02:00:00:00:00:01"][..],
                "prefix",
            ),
            (&["10.0.0.2/30", "x", "02:00:00:00:00:01"][..], "gateway"),
            (&["10.0.0.2/30", "10.0.0.1", "02:00:00:00:00"][..], "MAC"),
            (&["10.0.0.2/30", "10.0.0.1", "02:00:00:00:00:0g"][..], "MAC"),
        ] {
            let err = BootRequest::from_cmdline(&enc(fields)).unwrap_err();
            assert_eq!(err.param, NET_PARAM);
            assert!(err.reason.contains(needle), "{needle:?} in {err}");
        }
        assert!(BootRequest::from_cmdline("cela.net=***").is_err());
    }

    #[test]
    fn macs_format_and_parse() {
        let mac = [0x02, 0xce, 0x1a, 0x00, 0xab, 0xff];
        assert_eq!(format_mac(&mac), "02:ce:1a:00:ab:ff");
        assert_eq!(parse_mac("02:CE:1a:00:ab:ff"), Some(mac));
        assert_eq!(parse_mac("02:ce:1a:00:ab:ff:00"), None);
        assert_eq!(parse_mac("2:ce:1a:00:ab:ff"), None);
    }

    #[test]
    fn no_command_means_interactive_shell() {
        let req = BootRequest::from_cmdline("console=ttyS0 quiet").unwrap();
        assert_eq!(req.command, None);
        assert!(BootRequest::default().to_kernel_params().is_empty());
    }

    #[test]
    fn garbage_parameters_are_named_in_the_error() {
        let err = BootRequest::from_cmdline("cela.cmd=!!!").unwrap_err();
        assert_eq!(err.param, CMD_PARAM);
        let err = BootRequest::from_cmdline("cela.cmd=").unwrap_err();
        assert!(err.reason.contains("empty"));
        let err = BootRequest::from_cmdline("cela.root=../etc").unwrap_err();
        assert_eq!(err.param, ROOT_PARAM);
        let err = BootRequest::from_cmdline("cela.root=a-serial-that-is-too-long").unwrap_err();
        assert!(err.reason.contains("not a disk serial"));
        let relative = format!("{WORKDIR_PARAM}={}", encode_list(&["srv".into()]));
        let err = BootRequest::from_cmdline(&relative).unwrap_err();
        assert!(err.reason.contains("absolute"), "{err}");
        let two = format!("{USER_PARAM}={}", encode_list(&["a".into(), "b".into()]));
        let err = BootRequest::from_cmdline(&two).unwrap_err();
        assert_eq!(err.param, USER_PARAM);
    }

    #[test]
    fn host_requests_parse_and_garbage_is_dropped() {
        let mut p = ControlParser::<HostRequest>::default();
        assert_eq!(
            p.feed(b"signal 15\nsignal 0\nsignal 99\nsignal x\nexit 1\nsignal 9\n"),
            vec![HostRequest::Signal(15), HostRequest::Signal(9)]
        );
        assert_eq!(
            p.feed(b"resize 40 120\nresize 40\nresize -1 5\nresize 70000 5\nresize 1 2 3\n"),
            vec![HostRequest::Resize {
                rows: 40,
                cols: 120
            }]
        );
        let r = HostRequest::Resize { rows: 3, cols: 4 };
        assert_eq!(HostRequest::parse(&r.to_line()), Some(r));
        assert_eq!(
            BootRequest::from_cmdline("cela.tty=2").unwrap_err().param,
            TTY_PARAM
        );
        assert_eq!(
            HostRequest::parse(&HostRequest::Signal(2).to_line()),
            Some(HostRequest::Signal(2))
        );
    }

    #[test]
    fn control_lines_parse_and_garbage_is_dropped() {
        let mut p = ControlParser::<ControlMessage>::default();
        assert_eq!(p.feed(b"rea"), vec![]);
        assert_eq!(
            p.feed(b"dy\nexit 7\nexit 300\nnoise\n"),
            vec![ControlMessage::Ready, ControlMessage::Exit(7)]
        );
        assert_eq!(
            ControlMessage::parse(&ControlMessage::Exit(255).to_line()),
            Some(ControlMessage::Exit(255))
        );
        let long = vec![b'x'; 10_000];
        assert_eq!(p.feed(&long), vec![]);
        assert_eq!(p.feed(b"\nexit 0\n"), vec![ControlMessage::Exit(0)]);
    }
}
