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
//! state down and brings it back (snapshots), at the request of the caller on [`control`].

pub mod arch;
pub mod builder;
pub mod config;
pub mod console;
pub mod control;
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

/// What a KVM run is given beyond the machine's configuration.
#[derive(Debug, Default)]
pub struct KvmOptions {
    /// The monitor's end of a control connection ([`control::MonitorControl::pair`]): the
    /// caller takes snapshots through the other end.
    pub control: Option<std::os::fd::OwnedFd>,
    /// Start from this saved machine instead of booting.
    pub restore: Option<RestoreFrom>,
}

/// A saved machine to start from ([`persist::machine`]): the state and memory files a
/// snapshot of a machine configured as this one holds.
#[derive(Debug, Clone)]
pub struct RestoreFrom {
    pub state: std::path::PathBuf,
    pub memory: std::path::PathBuf,
    /// Who the restored guest is now (the new instance).
    pub identity: persist::machine::Identity,
}

/// Boots `config` under cela's KVM monitor with the console wired to this process's terminal,
/// and waits for it to end. With `config.confine` (the default) the monitor runs jailed in a
/// process of its own ([`jail`]); without, in this process, unfiltered but for its threads.
pub fn run(config: &MachineConfig, console: ConsoleMode) -> Result<RunReport, VmmError> {
    run_with(config, console, KvmOptions::default())
}

/// [`run`] with a control connection, or from a saved machine.
pub fn run_with(
    config: &MachineConfig,
    console: ConsoleMode,
    options: KvmOptions,
) -> Result<RunReport, VmmError> {
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
        let outcome = run_here(
            config,
            console,
            None,
            options.control,
            options.restore.as_ref(),
        )?;
        drop(raw);
        return outcome.into_result();
    }
    let mut keep_fds: Vec<_> = config
        .nets
        .iter()
        .map(|n| std::os::fd::AsRawFd::as_raw_fd(n.tap.as_ref()))
        .collect();
    keep_fds.extend(
        options
            .control
            .as_ref()
            .map(std::os::fd::AsRawFd::as_raw_fd),
    );
    let jail_config = jail::JailConfig {
        vsock: config.vsock.as_ref().map(|v| v.path.clone()),
        // Its disks, and the RAM a snapshot writes through the control connection.
        largest_file: config::largest_disk(&config.disks).max(config.memory_mib << 20),
        keep_fds,
        ..jail::JailConfig::monitor(config.vcpus, config.memory_mib)
    };
    let epoch = Instant::now();
    let control = options.control;
    let restore = options.restore;
    let spawned = jail::spawn(&jail_config, |jail| {
        // The monitor's own descriptor of the connection (this copy of the process's memory
        // owns the caller's, which goes when the monitor ends).
        let control = match control.as_ref().map(|fd| fd.try_clone()).transpose() {
            Ok(c) => c,
            Err(e) => return Err(format!("the control connection: {e}")),
        };
        run_here(config, console, Some(jail), control, restore.as_ref())
            .map(|o| o.to_wire(epoch))
            .map_err(|e| e.to_string())
    });
    // The caller keeps only its own end: the monitor's going closes the connection.
    drop(control);
    let outcome = spawned.and_then(|s| s.wait::<WireOutcome>());
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
    control: Option<std::os::fd::OwnedFd>,
    restore: Option<&RestoreFrom>,
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
    let mut machine = match restore {
        None => builder::boot_linux(config, sinks, stop.clone(), vsock_ports, filters)?,
        Some(from) => {
            let open = |path: &std::path::Path| {
                std::fs::File::open(path).map_err(|e| {
                    BuildError::Persist(persist::PersistError::Incompatible(format!(
                        "opening {}: {e}",
                        path.display()
                    )))
                })
            };
            let state = persist::machine::MachineState::read(&open(&from.state)?)
                .map_err(BuildError::from)?;
            let memory = open(&from.memory)?;
            // Read here, before the jail (no /dev/urandom in it), and queued before the
            // device thread can bring the init's control connection back.
            stop.send_when_attached(persist::machine::restored_requests(&from.identity));
            let machine = builder::restore_linux(
                config,
                sinks,
                stop.clone(),
                vsock_ports,
                filters,
                &state,
                &memory,
            )?;
            // The init said it was up before the snapshot and does not say it again.
            if state.guest_ready {
                stop.report_ready();
            }
            machine
        }
    };
    // Shut down once the machine stops, so the caller sees the connection end even while
    // this process lives on (an unconfined run is the caller's own process).
    let mut control_end = None;
    if let (Some(fd), Some(saver)) = (control, machine.saver()) {
        let stream = std::os::unix::net::UnixStream::from(fd);
        control_end = stream.try_clone().ok();
        control::spawn(stream, saver, machine.filters()).map_err(BuildError::Thread)?;
    }
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
    if let Some(c) = control_end {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
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
