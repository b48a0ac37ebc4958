//! cela's virtual machine monitor: boots an unmodified Linux bzImage on KVM with a small,
//! Firecracker-like machine model (in-kernel irqchip and PIT, 16550 serial ports, i8042 reset,
//! hardware-reduced ACPI, pvpanic), plus a QEMU TCG fallback engine for hosts whose KVM cannot
//! run a stock kernel. One process runs one VM: with confinement on, a jailed process of its own
//! forked by the caller ([`jail`]).
//!
//! Map: [`machine`] is the engine-neutral contract; [`config`] validates it; [`builder`]
//! assembles a KVM machine from [`arch`] (memory map, boot protocol, CPU state, ACPI),
//! [`vstate`] (KVM VM, vCPUs, memory) and [`devices`]; [`stop`] carries how a run ends;
//! [`console`] is the host side of the console and [`input`] the framed input a supervisor gives it; [`engine`] picks KVM or [`qemu`]; [`seccomp`]
//! holds the system-call filters each thread of the monitor runs under, and [`jail`] the
//! process, namespaces, ids and limits the monitor runs in; [`persist`] writes a machine's
//! state down and brings it back (snapshots).

pub mod arch;
pub mod builder;
pub mod config;
pub mod console;
pub mod devices;
pub mod engine;
pub mod guest_channel;
pub mod input;
pub mod jail;
pub mod machine;
pub mod net;
pub mod persist;
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
/// and waits for it to end. With `config.confine` (the default) the monitor runs jailed in a
/// process of its own ([`jail`]); without, in this process, unfiltered but for its threads.
pub fn run(config: &MachineConfig, console: ConsoleMode) -> Result<RunReport, VmmError> {
    config::validate(config).map_err(BuildError::from)?;
    // The terminal is this process's: it is put back even if the monitor is killed.
    let raw = match console {
        ConsoleMode::Interactive => console::RawTerminal::stdin(),
        ConsoleMode::Stream | ConsoleMode::Framed => None,
    };
    if !config.confine {
        eprintln!(
            "cela: warning: the monitor runs unconfined (--no-confine): a guest that breaks a device emulation gets the monitor's full privileges"
        );
        let outcome = run_here(config, console, None)?;
        drop(raw);
        return outcome.into_result();
    }
    let jail_config = jail::JailConfig {
        vsock: config.vsock.as_ref().map(|v| v.path.clone()),
        largest_file: config::largest_disk(&config.disks),
        keep_fds: config
            .net
            .iter()
            .map(|n| std::os::fd::AsRawFd::as_raw_fd(n.tap.as_ref()))
            .collect(),
        ..jail::JailConfig::monitor(config.vcpus, config.memory_mib)
    };
    let epoch = Instant::now();
    let outcome = jail::run(&jail_config, |jail| {
        run_here(config, console, Some(jail))
            .map(|o| o.to_wire(epoch))
            .map_err(|e| e.to_string())
    });
    drop(raw);
    outcome
        .map_err(|e| VmmError::Build(BuildError::Jail(e)))?
        .into_outcome(epoch)
        .into_result()
}

/// How a run in this process ended, before it becomes a [`RunReport`] or an error.
enum Outcome {
    Stopped(RunReport),
    Halted,
    Fault(String),
}

impl Outcome {
    fn into_result(self) -> Result<RunReport, VmmError> {
        match self {
            Outcome::Stopped(r) => Ok(r),
            Outcome::Halted => Err(VmmError::Halted),
            Outcome::Fault(f) => Err(VmmError::Fault(f)),
        }
    }

    fn to_wire(&self, epoch: Instant) -> WireOutcome {
        let since = |t: Instant| t.saturating_duration_since(epoch).as_nanos() as u64;
        match self {
            Outcome::Stopped(r) => WireOutcome::Stopped {
                exit: r.exit,
                started_ns: since(r.started),
                guest_ready_ns: r.guest_ready.map(since),
                exits: r.exits.clone(),
                guest_resident: r.guest_resident,
                peak_rss: r.peak_rss,
            },
            Outcome::Halted => WireOutcome::Halted,
            Outcome::Fault(f) => WireOutcome::Fault(f.clone()),
        }
    }
}

/// An [`Outcome`] as a jailed monitor reports it to its caller: times as nanoseconds since an
/// instant both processes share (the monotonic clock is the same in both).
#[derive(serde::Serialize, serde::Deserialize)]
enum WireOutcome {
    Stopped {
        exit: GuestExit,
        started_ns: u64,
        guest_ready_ns: Option<u64>,
        exits: vstate::vcpu::ExitStats,
        guest_resident: u64,
        peak_rss: Option<u64>,
    },
    Halted,
    Fault(String),
}

impl WireOutcome {
    fn into_outcome(self, epoch: Instant) -> Outcome {
        let at = |ns: u64| epoch + std::time::Duration::from_nanos(ns);
        match self {
            WireOutcome::Stopped {
                exit,
                started_ns,
                guest_ready_ns,
                exits,
                guest_resident,
                peak_rss,
            } => Outcome::Stopped(RunReport {
                exit,
                started: at(started_ns),
                guest_ready: guest_ready_ns.map(at),
                exits,
                guest_resident,
                peak_rss,
            }),
            WireOutcome::Halted => Outcome::Halted,
            WireOutcome::Fault(f) => Outcome::Fault(f),
        }
    }
}

/// Builds and runs the machine in this process: the jailed monitor's body, or the whole run
/// with confinement off. `jail` is entered once the machine is built.
fn run_here(
    config: &MachineConfig,
    console: ConsoleMode,
    jail: Option<jail::Jail>,
) -> Result<Outcome, VmmError> {
    let filters = match (config.confine, jail) {
        (false, _) => None,
        (true, None) => Some(seccomp::Filters::new().map_err(BuildError::from)?),
        (true, Some(j)) => Some(
            seccomp::Filters::new()
                .map_err(BuildError::from)?
                .with_jail(j),
        ),
    };
    let stop = Arc::new(StopSignal::new());
    let sinks = SerialSinks {
        console: Box::new(console::HostStdout),
        control: Box::new(ControlSink {
            parser: ControlParser::default(),
            stop: stop.clone(),
        }),
    };
    let signals = console::HostSignals::install();
    let vsock_ports = guest_channel::ports(
        stop.clone(),
        Box::new(|| Box::new(io::stdout())),
        Box::new(|| Box::new(io::stderr())),
    );
    let mut machine = builder::boot_linux(config, sinks, stop.clone(), vsock_ports, filters)?;
    if let Some(s) = signals {
        s.watch(stop.clone(), machine.filters());
    }
    if console != ConsoleMode::Stream {
        let input = machine.console_input();
        console::spawn_stdin_forwarder(stop.clone(), machine.filters(), console, move |b| {
            input.send(b)
        });
    }
    let started = machine.started();
    let stats = machine.exit_stats();
    let reason = machine.wait(None);
    let exits = devices::bus::lock(&stats).clone();
    let guest_resident = machine.guest_resident_bytes();
    drop(machine);
    Ok(match reason {
        StopReason::Guest(exit) => Outcome::Stopped(RunReport {
            exit,
            started,
            guest_ready: stop.ready_at(),
            exits,
            guest_resident,
            peak_rss: vstate::memory::peak_rss_bytes(),
        }),
        StopReason::Halted => Outcome::Halted,
        StopReason::Fault(f) => Outcome::Fault(f),
    })
}
