//! The one place that assembles a machine from a validated [`MachineConfig`]: guest memory,
//! the kernel, initramfs and command line, the ACPI tables, the KVM VM with its in-kernel
//! irqchip, the devices on the port-I/O bus, and the vCPUs. Every other module is a part this
//! one uses.
//!
//! The machine:
//! | device | where | interrupt |
//! |---|---|---|
//! | COM1 16550A, the console | port 0x3f8 | GSI 4 |
//! | COM2 16550A, the control channel | port 0x2f8 | GSI 3 |
//! | i8042 (reset line only) | ports 0x60, 0x64 | — |
//! | ACPI PM registers (sleep control/status, reset) | ports 0x600..0x602 | — |
//! | pvpanic | port 0x505 | — |
//! | virtio-mmio devices: virtio-rng, one virtio-blk per disk in order, then virtio-net (`--net`), then virtio-vsock | MMIO 0xd000_0000 + 0x1000·n | GSI 5, 6, … (not 9, the SCI) |
//!
//! virtio devices are served by one device event-loop thread; their queue notifications are
//! KVM ioeventfds and their interrupts KVM irqfds.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acpi_tables::Aml;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{
    ACPI_PM_PORT, ACPI_PM_PORT_SIZE, COM1_GSI, COM1_PORT, COM2_GSI, COM2_PORT, GED_GSI, I8042_PORT,
    I8042_PORT_SIZE, PVPANIC_PORT, SERIAL_PORT_SIZE, VIRTIO_MMIO_STRIDE, VMGENID_ADDR,
    virtio_mmio_slot,
};
use crate::arch::x86_64::{acpi, boot};
use crate::config::{ConfigError, open_disks, validate_for_kvm};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::bus::{Bus, BusError, Placement, SharedDevice};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{Serial, SerialAml, SerialInput};
use crate::devices::pvpanic::{PvPanic, PvPanicAml};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::event_loop::{EventLoop, EventLoopHandle};
use crate::devices::virtio::mmio::{MmioError, MmioTransport, VirtioMmioAml};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{
    DEFAULT_GUEST_CID, HostSocket, PortHandler, Vsock, VsockError,
};
use crate::devices::vmgenid::{GedAml, VmGenIdAml, VmGenIdError, write_new_id};
use crate::machine::MachineConfig;
use crate::persist::machine::{MachineSaver, MachineState};
use crate::seccomp::Filters;
use crate::stop::{StopReason, StopSignal, Wake};
use crate::vstate::memory::{MemoryError, create_guest_memory, map_guest_memory};
use crate::vstate::pause::Gate;
use crate::vstate::vcpu::{ExitStats, SavedVcpus, Vcpu, VcpuContext, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};

/// Why a machine could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("placing a device on the bus failed: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd for a device interrupt: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Virtio(#[from] MmioError),
    #[error("too many virtio devices: the IOAPIC has no interrupt line left for device {0}")]
    TooManyVirtioDevices(usize),
    #[error("cannot start the device event loop: {0}")]
    DeviceLoop(std::io::Error),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("restoring the machine: {0}")]
    Persist(#[from] crate::persist::PersistError),
    #[error(transparent)]
    VmGenId(#[from] VmGenIdError),
    #[error("raising the generation-ID event: {0}")]
    GedEvent(std::io::Error),
}

/// Where the guest's two serial ports lead on the host.
pub struct SerialSinks {
    /// Bytes the guest writes on COM1 (its console).
    pub console: Box<dyn Write + Send>,
    /// Bytes the guest writes on COM2 (the control channel).
    pub control: Box<dyn Write + Send>,
}

/// A machine whose vCPUs are running.
pub struct RunningMachine {
    vcpus: Vec<VcpuHandle>,
    /// The device event loop; stopped when the machine is dropped.
    _device_loop: Option<EventLoopHandle>,
    /// Dropped only after the vCPU threads have been joined (fields drop after `Drop::drop`).
    _vm: Arc<Vm>,
    /// Where the machine's threads park for a snapshot.
    gate: Arc<Gate>,
    /// Threads that park at the gate: the vCPUs and the device loop.
    parkers: usize,
    saver: Option<Arc<MachineSaver>>,
    stop: Arc<StopSignal>,
    console_input: SerialInput,
    started: Instant,
    stats: Arc<Mutex<ExitStats>>,
    filters: Option<Filters>,
    /// The buses the vCPUs dispatch to, held here so the devices on them are dropped on
    /// this (unfiltered) thread after the vCPU threads are joined, never on a vCPU thread
    /// (a vsock device removes its socket file when dropped, which no filter allows).
    _buses: (Arc<Bus>, Arc<Bus>),
}

impl RunningMachine {
    /// How much guest RAM is backed by host memory: the part of the monitor process's RSS that
    /// is the guest's rather than the monitor's own.
    pub fn guest_resident_bytes(&self) -> u64 {
        crate::vstate::memory::resident_bytes(self._vm.memory())
    }

    /// The exits counted so far; complete once the machine has stopped.
    pub fn exit_stats(&self) -> Arc<Mutex<ExitStats>> {
        self.stats.clone()
    }

    /// The system-call filters its threads run under (`None`: unconfined), for the threads
    /// the caller starts around the machine (the console's).
    pub fn filters(&self) -> Option<Filters> {
        self.filters.clone()
    }

    /// The stop signal: request a stop on it to end the machine from the host.
    pub fn stop_signal(&self) -> Arc<StopSignal> {
        self.stop.clone()
    }

    /// What a snapshot of the running machine is taken through (`None`: a bare machine).
    pub fn saver(&self) -> Option<Arc<MachineSaver>> {
        self.saver.clone()
    }

    /// The host's handle for typing into the guest console.
    pub fn console_input(&self) -> SerialInput {
        self.console_input.clone()
    }

    /// When the vCPUs were started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits until something requests a stop (or `timeout` passes, which requests one), then
    /// stops every vCPU thread and returns the outcome. The machine's memory stays mapped
    /// until it is dropped, so it can still be inspected. In a jailed monitor the calling
    /// thread takes the main thread's filter first: call it on the main thread once every
    /// thread of the caller's own has started.
    pub fn wait(&mut self, timeout: Option<Duration>) -> StopReason {
        // From here the main thread of a jailed monitor only waits, stops and reports.
        if let Some(f) = &self.filters {
            f.confine_main();
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            match self.stop.wait_event(deadline) {
                Wake::Stop(_) => break,
                Wake::Kick => self.kick_until_parked(),
                Wake::TimedOut => {
                    self.stop.request(StopReason::Fault(format!(
                        "the machine did not stop within {:?}",
                        timeout.unwrap_or_default()
                    )));
                    break;
                }
            }
        }
        self.shutdown();
        self.stop.outcome().expect("a stop was requested above")
    }

    /// Kicks the vCPUs until every thread of the machine is parked at the closed gate (a kick
    /// can land just before `KVM_RUN` and be lost, so again every few milliseconds), for as
    /// long as the gate stays closed, at most a few seconds (the pauser gives up then too).
    fn kick_until_parked(&self) {
        let start = Instant::now();
        while self.gate.is_closed()
            && !self.stop.is_requested()
            && start.elapsed() < Duration::from_secs(6)
        {
            for v in &self.vcpus {
                v.kick();
            }
            if self
                .gate
                .wait_parked(self.parkers, Duration::from_millis(5))
            {
                return;
            }
        }
    }

    fn shutdown(&mut self) {
        // Parked threads leave the gate to see the stop.
        self.gate.release();
        // A kick can land just before a vCPU enters KVM_RUN and be lost, so kick until every
        // thread has left its loop (each pass is bounded by the short wait on the signal).
        // Waiting on the count of threads that left their loops, not for "another" one: a
        // thread that left just before the first wait would otherwise cost a whole timeout.
        while self.vcpus.iter().any(|v| !v.is_finished()) {
            for v in &self.vcpus {
                v.kick();
            }
            if self
                .stop
                .wait_vcpus_exited(self.vcpus.len(), Duration::from_millis(5))
            {
                break;
            }
        }
        for v in &mut self.vcpus {
            v.join();
        }
    }
}

impl Drop for RunningMachine {
    fn drop(&mut self) {
        if !self.vcpus.is_empty() {
            self.stop.request(StopReason::Fault(
                "the machine was dropped while running".into(),
            ));
            self.shutdown();
        }
    }
}

/// The legacy devices of a PC-like cela machine, on a port-I/O bus, plus their ACPI
/// description.
struct PcDevices {
    pio: Bus,
    console_input: SerialInput,
    aml: Vec<Box<dyn Aml>>,
    /// COM1 and COM2, whose state a snapshot carries.
    serials: Vec<Arc<Mutex<Serial>>>,
    /// The Generic Event Device's interrupt: raised once a restored machine has a new
    /// generation ID (`devices::vmgenid`).
    ged: EventFd,
}

fn pc_devices(
    vm: &Vm,
    sinks: SerialSinks,
    stop: &Arc<StopSignal>,
) -> Result<PcDevices, BuildError> {
    let mut pio = Bus::new();
    let mut aml: Vec<Box<dyn Aml>> = Vec::new();
    let mut console_input = None;
    let mut serials = Vec::new();
    for (uid, port, gsi, out) in [
        (0u8, COM1_PORT, COM1_GSI, sinks.console),
        (1, COM2_PORT, COM2_GSI, sinks.control),
    ] {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.connect_irq(&irq, gsi)?;
        let (serial, input) = Serial::new(irq, out);
        serials.push(serial.clone());
        pio.insert(serial, u64::from(port), u64::from(SERIAL_PORT_SIZE))?;
        aml.push(Box::new(SerialAml { port, gsi, uid }));
        console_input.get_or_insert(input);
    }
    let devices: [(SharedDevice, u16, u16); 3] = [
        (I8042::new(stop.clone()), I8042_PORT, I8042_PORT_SIZE),
        (AcpiPm::new(stop.clone()), ACPI_PM_PORT, ACPI_PM_PORT_SIZE),
        (PvPanic::new(stop.clone()), PVPANIC_PORT, 1),
    ];
    for (dev, port, len) in devices {
        pio.insert(dev, u64::from(port), u64::from(len))?;
    }
    aml.push(Box::new(PvPanicAml { port: PVPANIC_PORT }));
    let ged = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.connect_irq(&ged, GED_GSI)?;
    aml.push(Box::new(VmGenIdAml { addr: VMGENID_ADDR }));
    aml.push(Box::new(GedAml { gsi: GED_GSI }));
    Ok(PcDevices {
        pio,
        console_input: console_input.expect("COM1 was created"),
        aml,
        serials,
        ged,
    })
}

/// The virtio devices of a machine on the virtio-mmio transport: their register windows on an
/// MMIO bus, their ACPI description, and the event loop that serves their queues.
struct VirtioDevices {
    mmio: Bus,
    aml: Vec<Box<dyn Aml>>,
    event_loop: EventLoop,
    /// In slot order, for snapshots.
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

fn virtio_devices(
    vm: &Vm,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
) -> Result<VirtioDevices, BuildError> {
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
    let mut mmio = Bus::new();
    let mut aml: Vec<Box<dyn Aml>> = Vec::new();
    let mut event_loop = EventLoop::new();
    let mut transports = Vec::new();
    for (n, device) in devices.into_iter().enumerate() {
        let (base, gsi) = virtio_mmio_slot(n).ok_or(BuildError::TooManyVirtioDevices(n))?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.connect_irq(&irq, gsi)?;
        let transport = MmioTransport::new(device.clone(), vm.memory().clone(), irq)?;
        for (index, evt) in transport.queue_events().iter().enumerate() {
            let notify = base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY);
            vm.register_ioevent(evt, notify, index as u32)?;
            let device = device.clone();
            event_loop.add(
                evt.try_clone().map_err(BuildError::EventFd)?,
                Box::new(move || crate::devices::bus::lock(&device).process_queue(index)),
            );
        }
        let host_fds = crate::devices::bus::lock(&device).host_fds();
        for (fd, token) in host_fds {
            let device = device.clone();
            event_loop.add_fd(
                fd,
                Box::new(move || crate::devices::bus::lock(&device).process_host_event(token)),
            );
        }
        let transport = Arc::new(Mutex::new(transport));
        transports.push(transport.clone());
        mmio.insert(transport, base, VIRTIO_MMIO_STRIDE)?;
        aml.push(Box::new(VirtioMmioAml {
            base: base as u32,
            gsi,
            uid: n as u8,
        }));
    }
    Ok(VirtioDevices {
        mmio,
        aml,
        event_loop,
        transports,
    })
}

/// A machine built from its configuration: the VM over its memory, and its devices.
struct Assembled {
    vm: Vm,
    pc: PcDevices,
    virtio: VirtioDevices,
}

/// Builds the VM over `memory` and the devices `config` asks for, in their fixed order.
fn assemble(
    config: &MachineConfig,
    memory: vm_memory::GuestMemoryMmap,
    sinks: SerialSinks,
    stop: &Arc<StopSignal>,
    vsock_ports: Vec<(u32, PortHandler)>,
) -> Result<Assembled, BuildError> {
    let vm = Vm::new(memory, true)?;
    validate_for_kvm(config, vm.max_vcpus())?;
    let pc = pc_devices(&vm, sinks, stop)?;
    let rng: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Rng::new()));
    let mut virtio_list = vec![rng];
    for disk in open_disks(&config.disks)? {
        let block: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Block::new(disk)));
        virtio_list.push(block);
    }
    for nic in &config.nets {
        let net: Arc<Mutex<dyn VirtioDevice>> =
            Arc::new(Mutex::new(Net::new(nic.tap.clone(), nic.mac)));
        virtio_list.push(net);
    }
    let host_socket = match &config.vsock {
        Some(v) => Some(HostSocket::bind(&v.path)?),
        None => None,
    };
    let guest_cid = config
        .vsock
        .as_ref()
        .map_or(DEFAULT_GUEST_CID, |v| v.guest_cid);
    let vsock: Arc<Mutex<dyn VirtioDevice>> =
        Arc::new(Mutex::new(Vsock::new(guest_cid, host_socket, vsock_ports)?));
    virtio_list.push(vsock);
    let virtio = virtio_devices(&vm, virtio_list)?;
    Ok(Assembled { vm, pc, virtio })
}

/// What every vCPU of `vm` shares.
fn vcpu_context(
    vm: &Vm,
    pc: &mut PcDevices,
    mmio: Bus,
    stop: &Arc<StopSignal>,
    filters: Option<Filters>,
) -> Result<VcpuContext, BuildError> {
    Ok(VcpuContext {
        pio: Arc::new(std::mem::take(&mut pc.pio)),
        mmio: Arc::new(mmio),
        stop: stop.clone(),
        stats: Arc::default(),
        filters,
        gate: Arc::new(Gate::new()),
        saved: Arc::new(SavedVcpus::default()),
        msr_indices: Arc::new(vm.msrs_to_save()?),
    })
}

/// Builds the machine for `config` and starts it. `stop` receives everything that ends it;
/// `vsock_ports` are the vsock ports the caller serves itself (see
/// [`crate::devices::virtio::vsock::muxer`]); the device and vCPU threads run under
/// `filters` (`None`: unconfined).
pub fn boot_linux(
    config: &MachineConfig,
    sinks: SerialSinks,
    stop: Arc<StopSignal>,
    vsock_ports: Vec<(u32, PortHandler)>,
    filters: Option<Filters>,
) -> Result<RunningMachine, BuildError> {
    let memory = create_guest_memory(config.memory_mib << 20)?;
    let kernel = boot::load_kernel(&memory, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(&memory, path, &kernel)?),
        None => None,
    };
    let cmdline_len = boot::load_cmdline(&memory, &config.cmdline)?;
    boot::write_zero_page(&memory, &kernel, cmdline_len, initrd)?;

    let Assembled { vm, mut pc, virtio } = assemble(config, memory, sinks, &stop, vsock_ports)?;
    let aml: Vec<&dyn Aml> = pc
        .aml
        .iter()
        .chain(&virtio.aml)
        .map(|a| a.as_ref())
        .collect();
    acpi::write_tables(vm.memory(), config.vcpus, &aml)?;
    write_new_id(vm.memory(), VMGENID_ADDR)?;

    let VirtioDevices {
        mmio,
        event_loop,
        transports,
        ..
    } = virtio;
    let ctx = vcpu_context(&vm, &mut pc, mmio, &stop, filters)?;
    let cpuid = vm.supported_cpuid()?;
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let entry = (id == 0).then_some(kernel.entry);
        vcpus.push(Vcpu::new(
            &vm,
            id,
            config.vcpus,
            &cpuid,
            entry,
            ctx.clone(),
        )?);
    }
    start(
        vm,
        vcpus,
        ctx,
        pc.console_input,
        Some(event_loop),
        (pc.serials, transports),
    )
}

/// Builds the machine for `config` as [`boot_linux`] does, but instead of booting it puts
/// back the machine `state` describes, whose RAM is `memory` (mapped privately; see
/// [`crate::persist::machine`]), and starts it where it was saved. Nothing is read from the
/// kernel or initrd: the guest's memory holds what it booted.
pub fn restore_linux(
    config: &MachineConfig,
    sinks: SerialSinks,
    stop: Arc<StopSignal>,
    vsock_ports: Vec<(u32, PortHandler)>,
    filters: Option<Filters>,
    state: &MachineState,
    memory: &std::fs::File,
) -> Result<RunningMachine, BuildError> {
    let size = config.memory_mib << 20;
    if state.memory_size != size {
        return Err(crate::persist::PersistError::Incompatible(format!(
            "the saved machine has {} MiB of RAM and this one {} MiB",
            state.memory_size >> 20,
            config.memory_mib
        ))
        .into());
    }
    // Checked before anything is made: COM1 and COM2; the entropy device, the disks, the
    // NICs and the vsock device.
    let virtio_count = 1 + config.disks.len() + config.nets.len() + 1;
    state.check_shape(config.vcpus, size, 2, virtio_count)?;
    if state.vm.irqchip.is_none() {
        return Err(crate::persist::PersistError::Incompatible(
            "the saved machine has no interrupt controllers, and this one has".into(),
        )
        .into());
    }
    let memory = map_guest_memory(memory, size)?;
    let Assembled { vm, mut pc, virtio } = assemble(config, memory, sinks, &stop, vsock_ports)?;
    state.check_shape(
        config.vcpus,
        size,
        pc.serials.len(),
        virtio.transports.len(),
    )?;
    let VirtioDevices {
        mmio,
        event_loop,
        transports,
        ..
    } = virtio;
    let ctx = vcpu_context(&vm, &mut pc, mmio, &stop, filters)?;
    let cpuid = vm.supported_cpuid()?;
    let mut vcpus = Vec::new();
    for (id, saved) in state.vcpus.iter().enumerate() {
        vcpus.push(Vcpu::restored(
            &vm,
            id as u32,
            config.vcpus,
            &cpuid,
            saved,
            ctx.clone(),
        )?);
    }
    // The interrupt controllers before the devices, whose restored interrupts may be raised
    // again; the clock last.
    state.vm.restore(vm.fd())?;
    for (serial, saved) in pc.serials.iter().zip(&state.serials) {
        crate::devices::bus::lock(serial).restore(saved)?;
    }
    for (transport, saved) in transports.iter().zip(&state.virtio) {
        crate::devices::bus::lock(transport).restore(saved)?;
    }
    state.vm.restore_clock(vm.fd())?;
    // A copy: a new generation ID, and the event that tells a guest with a driver for it
    // (an edge: KVM hands it to the local APIC, taken once the guest runs; a guest that had
    // not yet unmasked the pin misses it, and its driver reads the ID when it probes).
    write_new_id(vm.memory(), VMGENID_ADDR)?;
    pc.ged.write(1).map_err(BuildError::GedEvent)?;
    start(
        vm,
        vcpus,
        ctx,
        pc.console_input,
        Some(event_loop),
        (pc.serials, transports),
    )
}

/// Builds a bare machine for tests and tiny payloads: `memory_size` bytes of RAM holding
/// `code` at `entry`, one or more vCPUs entering it in 64-bit mode (all at the same address,
/// the boot state being the Linux one with RSI = the zero page), the PC devices plus `mmio`
/// devices, and no in-kernel irqchip, so HLT ends a vCPU.
pub fn boot_bare(
    code: &[u8],
    entry: u64,
    vcpus: u32,
    mmio: Vec<Placement>,
    sinks: SerialSinks,
    stop: Arc<StopSignal>,
    filters: Option<Filters>,
) -> Result<RunningMachine, BuildError> {
    use vm_memory::{Bytes, GuestAddress};
    let memory = create_guest_memory(16 << 20)?;
    memory
        .write_slice(code, GuestAddress(entry))
        .map_err(|source| boot::BootError::Memory {
            what: "the guest code",
            source,
        })?;
    let vm = Vm::new(memory, false)?;
    let mut devices = pc_devices(&vm, sinks, &stop)?;
    let mut mmio_bus = Bus::new();
    for (dev, base, len) in mmio {
        mmio_bus.insert(dev, base, len)?;
    }
    let ctx = vcpu_context(&vm, &mut devices, mmio_bus, &stop, filters)?;
    let cpuid = vm.supported_cpuid()?;
    let mut handles = Vec::new();
    for id in 0..vcpus {
        handles.push(Vcpu::new(&vm, id, vcpus, &cpuid, Some(entry), ctx.clone())?);
    }
    start(
        vm,
        handles,
        ctx,
        devices.console_input,
        None,
        (Vec::new(), Vec::new()),
    )
}

/// The devices whose state a snapshot carries: the UARTs and the virtio-mmio transports.
type SavedParts = (Vec<Arc<Mutex<Serial>>>, Vec<Arc<Mutex<MmioTransport>>>);

/// Starts a built machine: enters the monitor's jail if it has one (everything the machine
/// needs is open by now, and no other thread runs yet), then the device event loop and the
/// vCPUs, each thread under its filter. `saved_parts` are the devices a snapshot carries
/// (none: a bare machine, which takes no snapshots).
fn start(
    vm: Vm,
    vcpus: Vec<Vcpu>,
    ctx: VcpuContext,
    console_input: SerialInput,
    device_loop: Option<EventLoop>,
    saved_parts: SavedParts,
) -> Result<RunningMachine, BuildError> {
    let VcpuContext {
        stop,
        stats,
        filters,
        pio,
        mmio,
        gate,
        saved,
        ..
    } = ctx;
    if let Some(f) = &filters {
        f.enter_jail()?;
    }
    let has_loop = device_loop.is_some();
    let device_loop = device_loop
        .map(|l| l.with_gate(gate.clone()).start(filters.clone()))
        .transpose()
        .map_err(BuildError::DeviceLoop)?;
    let vm = Arc::new(vm);
    let (serials, transports) = saved_parts;
    let saver = if transports.is_empty() {
        None
    } else {
        let device_waker = device_loop
            .as_ref()
            .map(|l| l.waker())
            .transpose()
            .map_err(BuildError::EventFd)?;
        Some(Arc::new(MachineSaver {
            gate: gate.clone(),
            saved,
            vcpus: vcpus.len() as u32,
            stop: stop.clone(),
            vm: vm.clone(),
            serials,
            transports,
            device_waker,
        }))
    };
    let started = Instant::now();
    let mut machine = RunningMachine {
        parkers: vcpus.len() + usize::from(has_loop),
        vcpus: Vec::new(),
        _device_loop: device_loop,
        _vm: vm,
        gate,
        saver,
        stop,
        console_input,
        started,
        stats,
        filters,
        _buses: (pio, mmio),
    };
    for vcpu in vcpus {
        // On failure, dropping `machine` stops the vCPUs already started.
        machine
            .vcpus
            .push(vcpu.start().map_err(BuildError::Thread)?);
    }
    Ok(machine)
}
