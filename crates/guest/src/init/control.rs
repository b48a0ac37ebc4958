//! The guest end of the control channel: [`cela_guest::ControlMessage`] lines, on vsock when
//! the machine has a virtio-vsock device (together with the command's output streams), else on
//! COM2.

use std::fs::File;
use std::io::{Read as _, Write as _};

use cela_guest::{
    ControlMessage, VSOCK_CONTROL_PORT, VSOCK_HOST_CID, VSOCK_STDERR_PORT, VSOCK_STDOUT_PORT,
};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::termios::tcdrain;

use super::say;
use super::tty::{TtyMode, open_tty};
use super::vsock;

/// How the channel reaches the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Serial,
    Vsock,
}

/// The control channel, or its absence (console-only mode: the host then learns only that the
/// guest powered off).
#[derive(Debug)]
pub struct ControlChannel {
    port: Option<File>,
    kind: Kind,
}

/// The command's standard output and error as vsock streams to the host.
#[derive(Debug)]
pub struct VsockOutput {
    pub stdout: File,
    pub stderr: File,
}

impl VsockOutput {
    /// Ends both streams (the host reads end-of-file after the bytes already written), even if
    /// a process the command left behind still holds them.
    pub fn shutdown(&self) {
        for stream in [&self.stdout, &self.stderr] {
            let _ = vsock::shutdown_write(stream);
        }
    }
}

/// Opens the vsock channel (control, standard output, standard error) when the machine has a
/// vsock device, else the serial control port `serial_path`.
pub fn open_channels(serial_path: &str) -> (ControlChannel, Option<VsockOutput>) {
    let connect = |port| vsock::connect_to(VSOCK_HOST_CID, port);
    let vsock = connect(VSOCK_CONTROL_PORT).and_then(|control| {
        let output = VsockOutput {
            stdout: connect(VSOCK_STDOUT_PORT)?,
            stderr: connect(VSOCK_STDERR_PORT)?,
        };
        Ok((control, output))
    });
    match vsock {
        Ok((control, output)) => (
            ControlChannel {
                port: Some(control),
                kind: Kind::Vsock,
            },
            Some(output),
        ),
        Err(e) => {
            // No vsock device (the QEMU engine) is the expected case, not worth a warning.
            if !matches!(e, Errno::ENODEV | Errno::EAFNOSUPPORT | Errno::ENETUNREACH) {
                say!("warning: vsock channel: {e}; using the serial ports");
            }
            (ControlChannel::open(serial_path), None)
        }
    }
}

impl ControlChannel {
    /// Opens the serial control port in raw mode (both ways: the host may send requests), or
    /// warns and carries on without one.
    pub fn open(path: &str) -> Self {
        match open_tty(path, OFlag::O_RDWR, TtyMode::Raw) {
            Ok(port) => ControlChannel {
                port: Some(port),
                kind: Kind::Serial,
            },
            Err(e) => {
                say!("warning: control channel {path}: {e}; the exit status will not be reported");
                ControlChannel {
                    port: None,
                    kind: Kind::Serial,
                }
            }
        }
    }

    /// A channel writing to an already open file (a pipe in tests).
    #[cfg(test)]
    pub fn from_file(port: File) -> Self {
        ControlChannel {
            port: Some(port),
            kind: Kind::Serial,
        }
    }

    /// The channel's descriptor, if open.
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd as _;
        self.port.as_ref().map(|p| p.as_raw_fd())
    }

    /// A second descriptor of the channel, to read the host's [`cela_guest::HostRequest`]s
    /// from while the workload runs.
    pub fn requests(&self) -> Option<std::os::fd::OwnedFd> {
        let port = self.port.as_ref()?;
        port.try_clone().ok().map(Into::into)
    }

    /// Writes one message and waits until the port has transmitted it, so a power-off that
    /// follows cannot cut it short.
    pub fn send(&mut self, message: ControlMessage) {
        let Some(port) = &mut self.port else { return };
        if let Err(e) = port.write_all(message.to_line().as_bytes()) {
            say!("warning: control channel: {e}");
            return;
        }
        if self.kind == Kind::Serial {
            // Not a terminal (tests) is fine: there is nothing to drain.
            let _ = tcdrain(&*port);
        }
    }

    /// After the last message: on vsock, waits until the host closes the channel, which it
    /// does once it has written out the command's output; then a power-off loses nothing.
    pub fn finish(&mut self) {
        let Some(port) = &mut self.port else { return };
        if self.kind != Kind::Vsock {
            return;
        }
        let mut buf = [0u8; 64];
        loop {
            match port.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_written_as_protocol_lines() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let mut channel = ControlChannel::from_file(File::from(writer));
        channel.send(ControlMessage::Ready);
        channel.send(ControlMessage::Exit(7));
        channel.finish();
        drop(channel);
        let mut text = String::new();
        File::from(reader).read_to_string(&mut text).unwrap();
        assert_eq!(text, "ready\nexit 7\n");
    }

    #[test]
    fn a_missing_port_means_console_only_mode() {
        let mut channel = ControlChannel::open("/nonexistent/ttyS1");
        channel.send(ControlMessage::Exit(1));
    }
}
