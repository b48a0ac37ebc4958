//! What every engine that runs a cela microVM agrees on: the machine a user asks for
//! ([`MachineConfig`]), how its console is wired ([`ConsoleMode`]) and how a run ends
//! ([`GuestExit`]). cela's own KVM monitor and the QEMU TCG fallback both take a
//! `MachineConfig` and give back a `GuestExit`, so the CLI treats them alike.

use std::path::PathBuf;

/// Kernel command-line parameters every cela guest gets before the user's own: the serial
/// console, no boot chatter on it (only emergencies such as a panic), keyboard-controller reset
/// for `reboot`, and an immediate reboot on panic so a panicked guest ends instead of hanging.
pub const BASE_CMDLINE: &str = "console=ttyS0 quiet loglevel=1 reboot=k panic=-1 pci=off nomodeset";

/// A microVM as the user asked for it. [`MachineConfig::validate`] checks what can be checked
/// without an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// Number of vCPUs (1..=the engine's limit).
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// A bzImage (Linux x86 boot protocol 2.12 or later).
    pub kernel: PathBuf,
    /// An initramfs (newc cpio, optionally compressed).
    pub initrd: Option<PathBuf>,
    /// The whole kernel command line, [`BASE_CMDLINE`] included.
    pub cmdline: String,
    /// Raw disk images, in the order the guest sees them (/dev/vda, /dev/vdb, …).
    pub disks: Vec<DiskConfig>,
    /// The NICs (`--net`): a virtio-net device per TAP, in order (the guest's eth0, eth1, …).
    pub nets: Vec<crate::net::NicConfig>,
    /// The user's vsock socket (`--vsock PATH`). cela's KVM engine always gives the guest a
    /// virtio-vsock device (cela-init's status and output travel on it); this adds the
    /// user's host side to it. The QEMU engine has no vsock.
    pub vsock: Option<VsockConfig>,
    /// The monitor's threads run under their seccomp filters ([`crate::seccomp`]); off only
    /// for debugging (`--no-confine`).
    pub confine: bool,
}

/// The host side of the guest's vsock device (Firecracker's hybrid model): a Unix socket
/// PATH that host processes connect to (`CONNECT <port>\n`), and `PATH_<port>` sockets the
/// guest's connections to the host (CID 2) reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub path: PathBuf,
    /// The guest's context ID (3 or more; 3 by default).
    pub guest_cid: u64,
}

/// A raw disk image the guest sees as a virtio block device (`--disk PATH[,ro]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// The guest cannot write to it (VIRTIO_BLK_F_RO) and cela opens it read-only.
    pub read_only: bool,
    /// The serial the guest reads (virtio-blk GET_ID, /sys/block/vdX/serial; at most 20
    /// bytes); `None` gives the file name.
    pub serial: Option<String>,
}

impl DiskConfig {
    /// Parses `PATH[,ro]`: a trailing `,ro` makes the disk read-only; anything else is the
    /// path (so a path may itself contain commas).
    pub fn parse(arg: &str) -> DiskConfig {
        match arg.strip_suffix(",ro") {
            Some(path) => DiskConfig {
                path: path.into(),
                read_only: true,
                serial: None,
            },
            None => DiskConfig {
                path: arg.into(),
                read_only: false,
                serial: None,
            },
        }
    }
}

/// How the guest's console (COM1) meets the host's terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleMode {
    /// Guest console output is copied to the host's stdout; host stdin is not read.
    Stream,
    /// The host terminal (put in raw mode if it is a TTY) is the guest console, both ways;
    /// the escape sequence Ctrl-A x ends the VM.
    Interactive,
    /// Output as [`ConsoleMode::Stream`]; stdin carries [`crate::input`] frames from an
    /// instance's supervisor: data for the console, and sizes passed on to the guest's init,
    /// which gives them to the console's terminal. No raw mode, no escape.
    Framed,
}

/// How a microVM run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GuestExit {
    /// The guest's init reported the workload's exit status, then powered off.
    Command(u8),
    /// The guest powered off (ACPI S5) without reporting a status.
    PoweredOff,
    /// The guest asked for a reset (keyboard controller or ACPI reset register); cela ends the
    /// VM rather than rebooting it.
    Rebooted,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): a reset the guest did not ask for, since
    /// cela's kernel command line reboots through the keyboard controller. A failure, not a
    /// reboot: a command that was running never finished.
    TripleFault,
    /// The guest kernel panicked (reported through the pvpanic device).
    Panicked,
    /// The user left an interactive console with the escape sequence.
    Detached,
    /// The host asked cela to stop (Ctrl-C, SIGTERM or SIGHUP; the signal number).
    Interrupted(u8),
    /// The machine was saved to a snapshot and stopped; it goes on where it is restored.
    Snapshotted,
}

impl GuestExit {
    /// The status `cela run` exits with, following the shell's conventions where there is one:
    /// the workload's own status, 0 for a clean power-off, and non-zero otherwise.
    pub fn exit_code(self) -> i32 {
        match self {
            GuestExit::Command(code) => i32::from(code),
            GuestExit::PoweredOff | GuestExit::Detached | GuestExit::Snapshotted => 0,
            GuestExit::Rebooted => 0,
            GuestExit::Panicked | GuestExit::TripleFault => 125,
            GuestExit::Interrupted(sig) => 128 + i32::from(sig),
        }
    }

    /// A one-line description for the user, or `None` when the workload's own status says it all.
    pub fn describe(self) -> Option<&'static str> {
        match self {
            GuestExit::Command(_) => None,
            GuestExit::PoweredOff => Some("the guest powered off"),
            GuestExit::Rebooted => Some("the guest rebooted; cela ended the VM"),
            GuestExit::Panicked => Some("the guest kernel panicked"),
            GuestExit::TripleFault => Some(
                "a guest CPU triple-faulted (a reset the guest did not ask for); cela ended the VM",
            ),
            GuestExit::Detached => Some("detached from the console; the VM was stopped"),
            GuestExit::Interrupted(_) => Some("interrupted; the VM was stopped"),
            GuestExit::Snapshotted => Some("the VM was saved to a snapshot and stopped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_argument_with_and_without_ro() {
        assert_eq!(
            DiskConfig::parse("/a/b.img"),
            DiskConfig {
                path: "/a/b.img".into(),
                read_only: false,
                serial: None,
            }
        );
        assert_eq!(
            DiskConfig::parse("/a/b,c.img,ro"),
            DiskConfig {
                path: "/a/b,c.img".into(),
                read_only: true,
                serial: None,
            }
        );
    }

    #[test]
    fn a_triple_fault_is_a_failure_and_a_requested_reset_is_not() {
        assert_eq!(GuestExit::Rebooted.exit_code(), 0);
        assert_eq!(GuestExit::TripleFault.exit_code(), 125);
        assert!(
            GuestExit::TripleFault
                .describe()
                .unwrap()
                .contains("triple-faulted")
        );
    }
}
