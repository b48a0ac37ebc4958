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
    ACPI_PM_PORT, ACPI_PM_PORT_SIZE, COM1_GSI, COM1_PORT, COM2_GSI, COM2_PORT, I8042_PORT,
    I8042_PORT_SIZE, PVPANIC_PORT, SERIAL_PORT_SIZE, VIRTIO_MMIO_STRIDE, virtio_mmio_slot,
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
use crate::machine::MachineConfig;
use crate::seccomp::Filters;
use crate::stop::{StopReason, StopSignal};
use crate::vstate::memory::{MemoryError, create_guest_memory};
use crate::vstate::vcpu::{ExitStats, Vcpu, VcpuContext, VcpuHandle};
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
    _vm: Vm,
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
        if self.stop.wait(timeout).is_none() {
            self.stop.request(StopReason::Fault(format!(
                "the machine did not stop within {:?}",
                timeout.unwrap_or_default()
            )));
        }
        self.shutdown();
        self.stop.outcome().expect("a stop was requested above")
    }

    fn shutdown(&mut self) {
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
}

fn pc_devices(
    vm: &Vm,
    sinks: SerialSinks,
    stop: &Arc<StopSignal>,
) -> Result<PcDevices, BuildError> {
    let mut pio = Bus::new();
    let mut aml: Vec<Box<dyn Aml>> = Vec::new();
    let mut console_input = None;
    for (uid, port, gsi, out) in [
        (0u8, COM1_PORT, COM1_GSI, sinks.console),
        (1, COM2_PORT, COM2_GSI, sinks.control),
    ] {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.connect_irq(&irq, gsi)?;
        let (serial, input) = Serial::new(irq, out);
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
    Ok(PcDevices {
        pio,
        console_input: console_input.expect("COM1 was created"),
        aml,
    })
}

/// The virtio devices of a machine on the virtio-mmio transport: their register windows on an
/// MMIO bus, their ACPI description, and the event loop that serves their queues.
struct VirtioDevices {
    mmio: Bus,
    aml: Vec<Box<dyn Aml>>,
    event_loop: EventLoop,
}

fn virtio_devices(
    vm: &Vm,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
) -> Result<VirtioDevices, BuildError> {
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
    let mut mmio = Bus::new();
    let mut aml: Vec<Box<dyn Aml>> = Vec::new();
    let mut event_loop = EventLoop::new();
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
        mmio.insert(Arc::new(Mutex::new(transport)), base, VIRTIO_MMIO_STRIDE)?;
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

    let vm = Vm::new(memory, true)?;
    validate_for_kvm(config, vm.max_vcpus())?;
    let devices = pc_devices(&vm, sinks, &stop)?;
    let rng: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Rng::new()));
    let mut virtio_list = vec![rng];
    for disk in open_disks(&config.disks)? {
        let block: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Block::new(disk)));
        virtio_list.push(block);
    }
    if let Some(nic) = &config.net {
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
    let aml: Vec<&dyn Aml> = devices
        .aml
        .iter()
        .chain(&virtio.aml)
        .map(|a| a.as_ref())
        .collect();
    acpi::write_tables(vm.memory(), config.vcpus, &aml)?;

    let ctx = VcpuContext {
        pio: Arc::new(devices.pio),
        mmio: Arc::new(virtio.mmio),
        stop: stop.clone(),
        stats: Arc::default(),
        filters,
    };
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
        devices.console_input,
        Some(virtio.event_loop),
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
    let devices = pc_devices(&vm, sinks, &stop)?;
    let mut mmio_bus = Bus::new();
    for (dev, base, len) in mmio {
        mmio_bus.insert(dev, base, len)?;
    }
    let ctx = VcpuContext {
        pio: Arc::new(devices.pio),
        mmio: Arc::new(mmio_bus),
        stop: stop.clone(),
        stats: Arc::default(),
        filters,
    };
    let cpuid = vm.supported_cpuid()?;
    let mut handles = Vec::new();
    for id in 0..vcpus {
        handles.push(Vcpu::new(&vm, id, vcpus, &cpuid, Some(entry), ctx.clone())?);
    }
    start(vm, handles, ctx, devices.console_input, None)
}

/// Starts a built machine: enters the monitor's jail if it has one (everything the machine
/// needs is open by now, and no other thread runs yet), then the device event loop and the
/// vCPUs, each thread under its filter.
fn start(
    vm: Vm,
    vcpus: Vec<Vcpu>,
    ctx: VcpuContext,
    console_input: SerialInput,
    device_loop: Option<EventLoop>,
) -> Result<RunningMachine, BuildError> {
    let VcpuContext {
        stop,
        stats,
        filters,
        pio,
        mmio,
    } = ctx;
    if let Some(f) = &filters {
        f.enter_jail()?;
    }
    let device_loop = device_loop
        .map(|l| l.start(filters.clone()))
        .transpose()
        .map_err(BuildError::DeviceLoop)?;
    let started = Instant::now();
    let mut machine = RunningMachine {
        vcpus: Vec::new(),
        _device_loop: device_loop,
        _vm: vm,
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
