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
//! * **Guest → host, without vsock** (the QEMU engine): the second serial port (COM2,
//!   `/dev/ttyS1`) is a control channel that carries nothing but [`ControlMessage`] lines; the
//!   first serial port (COM1) is the console and carries the workload's output untouched
//!   (standard output and error together).
//! * **Ending the VM**: the init powers the machine off (ACPI S5) after reporting; a guest reboot
//!   or kernel panic ends the VM too and is reported by the engine, not by the init.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Kernel parameter carrying the command to run, as URL-safe base64 (no padding) of the argv
/// joined with NUL bytes. Absent: the init starts an interactive shell on the console.
pub const CMD_PARAM: &str = "cela.cmd";
/// Kernel parameter carrying the workload's environment, encoded like [`CMD_PARAM`]
/// (`KEY=VALUE` entries joined with NUL bytes).
pub const ENV_PARAM: &str = "cela.env";
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

/// What the host asks the init to do, decoded from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BootRequest {
    /// The command and its arguments; `None` asks for an interactive shell.
    pub command: Option<Vec<String>>,
    /// Extra environment for the command, as `KEY=VALUE` strings.
    pub env: Vec<String>,
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

/// Accumulates control-channel bytes and yields complete messages.
#[derive(Debug, Default)]
pub struct ControlParser {
    pending: Vec<u8>,
}

impl ControlParser {
    /// Feeds bytes read from the channel; returns the messages completed by them. Bytes that do
    /// not form a known message are dropped (the channel is guest-controlled input). A line
    /// longer than 256 bytes is discarded rather than buffered without bound.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<ControlMessage> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if let Ok(line) = std::str::from_utf8(&self.pending) {
                    out.extend(ControlMessage::parse(line));
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
    fn request_round_trips_through_the_cmdline() {
        let req = BootRequest {
            command: Some(vec!["sh".into(), "-c".into(), "echo 'a b'; exit 7".into()]),
            env: vec!["A=1".into(), "B=x y".into()],
        };
        let cmdline = format!("console=ttyS0 quiet {} panic=-1", req.to_kernel_params());
        assert!(
            !req.to_kernel_params().contains(' ') || req.to_kernel_params().split(' ').count() == 2
        );
        assert_eq!(BootRequest::from_cmdline(&cmdline).unwrap(), req);
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
    }

    #[test]
    fn control_lines_parse_and_garbage_is_dropped() {
        let mut p = ControlParser::default();
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
