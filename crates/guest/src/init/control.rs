//! The guest end of the control channel: [`cela_guest::ControlMessage`] lines written on COM2.

use std::fs::File;
use std::io::Write as _;

use cela_guest::ControlMessage;
use nix::fcntl::OFlag;
use nix::sys::termios::tcdrain;

use super::say;
use super::tty::{TtyMode, open_tty};

/// The control channel, or its absence (console-only mode: the host then learns only that the
/// guest powered off).
#[derive(Debug)]
pub struct ControlChannel {
    port: Option<File>,
}

impl ControlChannel {
    /// Opens the control port in raw mode, or warns and carries on without one.
    pub fn open(path: &str) -> Self {
        match open_tty(path, OFlag::O_WRONLY, TtyMode::Raw) {
            Ok(port) => ControlChannel { port: Some(port) },
            Err(e) => {
                say!("warning: control channel {path}: {e}; the exit status will not be reported");
                ControlChannel { port: None }
            }
        }
    }

    /// A channel writing to an already open file (a pipe in tests).
    #[cfg(test)]
    pub fn from_file(port: File) -> Self {
        ControlChannel { port: Some(port) }
    }

    /// Writes one message and waits until the port has transmitted it, so a power-off that
    /// follows cannot cut it short.
    pub fn send(&mut self, message: ControlMessage) {
        let Some(port) = &mut self.port else { return };
        if let Err(e) = port.write_all(message.to_line().as_bytes()) {
            say!("warning: control channel: {e}");
            return;
        }
        // Not a terminal (tests) is fine: there is nothing to drain.
        let _ = tcdrain(&*port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn messages_are_written_as_protocol_lines() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let mut channel = ControlChannel::from_file(File::from(writer));
        channel.send(ControlMessage::Ready);
        channel.send(ControlMessage::Exit(7));
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
