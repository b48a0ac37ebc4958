//! cela's virtual machine monitor: boots an unmodified Linux bzImage on KVM with a small,
//! Firecracker-like machine model (in-kernel irqchip and PIT, 16550 serial ports, i8042 reset,
//! hardware-reduced ACPI, pvpanic), plus a QEMU TCG fallback engine for hosts whose KVM cannot
//! run a stock kernel. One process runs one VM.
//!
//! Map: [`machine`] is the engine-neutral contract; [`config`] validates it; [`builder`]
//! assembles a KVM machine from [`arch`] (memory map, boot protocol, CPU state, ACPI),
//! [`vstate`] (KVM VM, vCPUs, memory) and [`devices`]; [`stop`] carries how a run ends;
//! [`console`] is the host side of the console; [`engine`] picks KVM or [`qemu`]; [`seccomp`]
//! holds the system-call filters each thread of the monitor runs under.

pub mod arch;
pub mod builder;
pub mod config;
pub mod console;
pub mod devices;
pub mod engine;
pub mod guest_channel;
pub mod machine;
pub mod net;
pub mod qemu;
pub mod seccomp;
pub mod stop;
pub mod vstate;

use std::io;
use std::sync::Arc;
use std::time::Instant;

pub use engine::Engine;
pub use machine::{BASE_CMDLINE, ConsoleMode, DiskConfig, GuestExit, MachineConfig, VsockConfig};

use builder::{BuildError, SerialSinks};
use cela_guest::{ControlMessage, ControlParser};
use stop::{StopReason, StopSignal};

/// Why a run failed (as opposed to the guest ending it).
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("{0}")]
    Fault(String),
    #[error("the guest halted all its vCPUs")]
    Halted,
}

/// How a KVM run went.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub exit: GuestExit,
    /// When the vCPUs started.
    pub started: Instant,
    /// When the guest's init reported it was up.
    pub guest_ready: Option<Instant>,
    /// The exits that reached the monitor.
    pub exits: vstate::vcpu::ExitStats,
    /// Guest RAM backed by host memory when the VM ended.
    pub guest_resident: u64,
    /// This process's peak RSS, guest RAM included.
    pub peak_rss: Option<u64>,
}

/// COM2's host side: decodes control messages into the stop signal.
struct ControlSink {
    parser: ControlParser,
    stop: Arc<StopSignal>,
}

impl io::Write for ControlSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for msg in self.parser.feed(buf) {
            match msg {
                ControlMessage::Ready => self.stop.report_ready(),
                ControlMessage::Exit(code) => self.stop.report_status(code),
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Boots `config` under cela's KVM monitor with the console wired to this process's terminal,
/// and waits for it to end.
pub fn run(config: &MachineConfig, console: ConsoleMode) -> Result<RunReport, VmmError> {
    config::validate(config).map_err(BuildError::from)?;
    let filters = if config.confine {
        Some(seccomp::Filters::new().map_err(BuildError::from)?)
    } else {
        eprintln!(
            "cela: warning: the monitor runs unconfined (--no-confine): a guest that breaks a device emulation gets the monitor's full privileges"
        );
        None
    };
    let stop = Arc::new(StopSignal::new());
    let sinks = SerialSinks {
        console: Box::new(console::HostStdout),
        control: Box::new(ControlSink {
            parser: ControlParser::default(),
            stop: stop.clone(),
        }),
    };
    console::stop_on_host_signals(stop.clone(), filters.clone());
    let raw = match console {
        ConsoleMode::Interactive => console::RawTerminal::stdin(),
        ConsoleMode::Stream => None,
    };
    let vsock_ports = guest_channel::ports(
        stop.clone(),
        Box::new(|| Box::new(io::stdout())),
        Box::new(|| Box::new(io::stderr())),
    );
    let mut machine = builder::boot_linux(config, sinks, stop.clone(), vsock_ports, filters)?;
    if console == ConsoleMode::Interactive {
        let input = machine.console_input();
        console::spawn_stdin_forwarder(stop.clone(), machine.filters(), move |b| input.send(b));
    }
    let started = machine.started();
    let stats = machine.exit_stats();
    let reason = machine.wait(None);
    drop(raw);
    let exits = devices::bus::lock(&stats).clone();
    let guest_resident = machine.guest_resident_bytes();
    drop(machine);
    let report = |exit| RunReport {
        exit,
        started,
        guest_ready: stop.ready_at(),
        exits,
        guest_resident,
        peak_rss: vstate::memory::peak_rss_bytes(),
    };
    match reason {
        StopReason::Guest(exit) => Ok(report(exit)),
        StopReason::Halted => Err(VmmError::Halted),
        StopReason::Fault(f) => Err(VmmError::Fault(f)),
    }
}
