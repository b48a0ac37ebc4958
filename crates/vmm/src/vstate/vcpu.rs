//! A virtual CPU: its boot-time configuration and the thread that runs it. Each vCPU runs
//! KVM_RUN in a loop on its own thread and dispatches the exits KVM hands to userspace —
//! port I/O and MMIO to the buses, and the exits that end the machine to the [`StopSignal`].
//!
//! Stopping: another thread requests a stop on the `StopSignal`, then *kicks* the vCPU thread
//! with a real-time signal whose handler does nothing; the signal makes a KVM_RUN in progress
//! return EINTR and the loop sees the request.
//!
//! Pausing (a snapshot): the loop also checks the machine's [`Gate`] between two exits; once it
//! is closed, the vCPU completes the I/O it last exited for and parks until the gate opens (the
//! guest goes on) or the machine stops; asked to save while parked (once every thread of the
//! machine is), it saves its state into [`SavedVcpus`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use crate::seccomp::{Filters, ThreadKind};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::bus::Bus;
use crate::machine::GuestExit;
use crate::persist::vcpu::{VcpuState, complete_pending_io};
use crate::stop::{StopReason, StopSignal};
use crate::vstate::pause::Gate;
use crate::vstate::vm::{Vm, VmError};

/// The signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Failing to install leaves vCPUs unkickable; stopping then waits for their next
        // exit instead, which every running guest produces soon (timer, I/O).
        if let Err(e) = register_signal_handler(kick_signal(), noop_handler) {
            tracing::warn!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    id: u32,
    count: u32,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    stop: Arc<StopSignal>,
    shared_stats: Arc<Mutex<ExitStats>>,
    stats: ExitStats,
    filters: Option<Filters>,
    gate: Arc<Gate>,
    saved: Arc<SavedVcpus>,
    /// The MSRs a saved state carries.
    msr_indices: Arc<Vec<u32>>,
    irqchip: bool,
}

/// Where paused vCPUs leave their saved state (or why they could not save it) for whoever is
/// taking a snapshot, by vCPU id.
#[derive(Debug, Default)]
pub struct SavedVcpus {
    slots: Mutex<BTreeMap<u32, Result<VcpuState, String>>>,
}

impl SavedVcpus {
    fn put(&self, id: u32, state: Result<VcpuState, String>) {
        crate::devices::bus::lock(&self.slots).insert(id, state);
    }

    /// Forgets what an earlier pause left.
    pub fn clear(&self) {
        crate::devices::bus::lock(&self.slots).clear();
    }

    /// The states of vCPUs 0..count, in order; the first failure, or a vCPU that saved
    /// nothing, is an error.
    pub fn take(&self, count: u32) -> Result<Vec<VcpuState>, String> {
        let mut slots = crate::devices::bus::lock(&self.slots);
        let mut out = Vec::with_capacity(count as usize);
        for id in 0..count {
            match slots.remove(&id) {
                Some(Ok(state)) => out.push(state),
                Some(Err(e)) => return Err(format!("vCPU {id}: {e}")),
                None => return Err(format!("vCPU {id} did not save its state")),
            }
        }
        Ok(out)
    }
}

/// What every vCPU of a machine shares: the buses it dispatches exits to, the stop signal, and
/// the machine-wide exit counts each vCPU adds its own to when it stops.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stop: Arc<StopSignal>,
    pub stats: Arc<Mutex<ExitStats>>,
    /// The monitor's system-call filters; `None` runs unconfined (`--no-confine`).
    pub filters: Option<Filters>,
    /// Where the vCPUs park for a snapshot, and leave their state.
    pub gate: Arc<Gate>,
    pub saved: Arc<SavedVcpus>,
    /// The MSRs a saved vCPU state carries on this host.
    pub msr_indices: Arc<Vec<u32>>,
}

/// How many exits reached the monitor, by I/O port and by MMIO page. In a nested VM every such
/// exit costs a trip through two hypervisors, so these counts explain boot times.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitStats {
    pub pio: BTreeMap<u16, u64>,
    pub mmio: BTreeMap<u64, u64>,
    pub other: u64,
}

impl ExitStats {
    pub fn total(&self) -> u64 {
        self.pio.values().sum::<u64>() + self.mmio.values().sum::<u64>() + self.other
    }

    fn merge(&mut self, other: &ExitStats) {
        for (k, v) in &other.pio {
            *self.pio.entry(*k).or_default() += v;
        }
        for (k, v) in &other.mmio {
            *self.mmio.entry(*k).or_default() += v;
        }
        self.other += other.other;
    }

    /// A one-line summary: the total and the `top` busiest ports/pages.
    pub fn summary(&self, top: usize) -> String {
        let mut items: Vec<(u64, String)> = self
            .pio
            .iter()
            .map(|(p, n)| (*n, format!("port {p:#x}")))
            .chain(self.mmio.iter().map(|(a, n)| (*n, format!("mmio {a:#x}"))))
            .collect();
        items.sort_by_key(|item| std::cmp::Reverse(item.0));
        let busiest: Vec<String> = items
            .iter()
            .take(top)
            .map(|(n, what)| format!("{what}: {n}"))
            .collect();
        format!(
            "{} exits ({}; other: {})",
            self.total(),
            busiest.join(", "),
            self.other
        )
    }
}

impl Vcpu {
    /// Creates vCPU `id` of `count` and applies the boot state: CPUID, MSRs, FPU, LAPIC LINTs
    /// and — for the boot processor (`entry` is Some) — the 64-bit entry registers. Application
    /// processors wait for INIT/SIPI from the boot processor (in-kernel LAPIC).
    pub fn new(
        vm: &Vm,
        id: u32,
        count: u32,
        host_cpuid: &CpuId,
        entry: Option<u64>,
        ctx: VcpuContext,
    ) -> Result<Vcpu, VmError> {
        // Here, while the machine is built, not when it starts: a jailed monitor's main
        // thread may no longer change signal handlers then.
        install_kick_handler();
        let err = |what| move |source| VmError::Kvm { what, source };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(err("create a vCPU"))?;
        fd.set_cpuid2(&cpuid::normalize(host_cpuid, id, count))
            .map_err(err("set CPUID"))?;
        let msrs = msr::boot_msrs();
        let written = fd.set_msrs(&msrs).map_err(err("set boot MSRs"))?;
        if written != msrs.as_slice().len() {
            let failed = msrs.as_slice()[written].index;
            tracing::warn!("vCPU {id}: KVM did not accept MSR {failed:#x}; continuing without it");
        }
        fd.set_fpu(&regs::boot_fpu())
            .map_err(err("set FPU state"))?;
        if vm.has_irqchip() {
            let lapic = fd.get_lapic().map_err(err("read the local APIC"))?;
            fd.set_lapic(&interrupts::configure_lints(lapic))
                .map_err(err("configure the local APIC"))?;
        }
        if let Some(rip) = entry {
            let sregs = fd.get_sregs().map_err(err("read special registers"))?;
            let sregs = regs::boot_sregs(vm.memory(), sregs)?;
            fd.set_sregs(&sregs).map_err(err("set special registers"))?;
            fd.set_regs(&regs::boot_regs(rip))
                .map_err(err("set registers"))?;
        }
        Ok(Vcpu::from_fd(fd, id, count, vm.has_irqchip(), ctx))
    }

    /// Creates vCPU `id` of `count` with `state` (saved from a vCPU of a machine made as this
    /// one is) in place of the boot state. The CPUID is this host's, as at boot.
    pub fn restored(
        vm: &Vm,
        id: u32,
        count: u32,
        host_cpuid: &CpuId,
        state: &VcpuState,
        ctx: VcpuContext,
    ) -> Result<Vcpu, crate::persist::PersistError> {
        install_kick_handler();
        let fd = vm.fd().create_vcpu(u64::from(id)).map_err(|source| {
            crate::persist::PersistError::RestoreVcpu {
                what: "creation",
                source,
            }
        })?;
        fd.set_cpuid2(&cpuid::normalize(host_cpuid, id, count))
            .map_err(|source| crate::persist::PersistError::RestoreVcpu {
                what: "CPUID",
                source,
            })?;
        if state.lapic.is_some() != vm.has_irqchip() {
            return Err(crate::persist::PersistError::Incompatible(format!(
                "vCPU {id}'s saved state {} a local APIC and the machine {}",
                if state.lapic.is_some() {
                    "has"
                } else {
                    "has no"
                },
                if vm.has_irqchip() { "has" } else { "has none" }
            )));
        }
        state.restore(&fd)?;
        Ok(Vcpu::from_fd(fd, id, count, vm.has_irqchip(), ctx))
    }

    fn from_fd(fd: VcpuFd, id: u32, count: u32, irqchip: bool, ctx: VcpuContext) -> Vcpu {
        let VcpuContext {
            pio,
            mmio,
            stop,
            stats: shared_stats,
            filters,
            gate,
            saved,
            msr_indices,
        } = ctx;
        Vcpu {
            id,
            count,
            fd,
            pio,
            mmio,
            stop,
            shared_stats,
            stats: ExitStats::default(),
            filters,
            gate,
            saved,
            msr_indices,
            irqchip,
        }
    }

    /// Starts the vCPU on its own thread.
    pub fn start(self) -> std::io::Result<VcpuHandle> {
        let name = format!("vcpu{}", self.id);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || self.run())?;
        Ok(VcpuHandle {
            thread: Some(thread),
        })
    }

    fn run(mut self) {
        // Before the guest runs a single instruction on this vCPU.
        crate::seccomp::confine_thread(self.filters.as_ref(), ThreadKind::Vcpu);
        while !self.stop.is_requested() {
            if self.gate.is_closed() {
                self.pause();
                continue;
            }
            match self.run_once() {
                Ok(true) => {}
                Ok(false) => break,
                Err(fault) => {
                    self.stop
                        .request(StopReason::Fault(format!("vCPU {}: {fault}", self.id)));
                    break;
                }
            }
        }
        crate::devices::bus::lock(&self.shared_stats).merge(&self.stats);
        self.stop.vcpu_exited();
    }

    /// Parks at the closed gate until it opens, saving this vCPU's state whenever asked. The
    /// I/O the vCPU last exited for is completed first, so the saved registers are past it.
    fn pause(&mut self) {
        let pending = complete_pending_io(&mut self.fd).map_err(|e| e.to_string());
        let (fd, saved, id) = (&self.fd, &self.saved, self.id);
        let (msrs, irqchip) = (&self.msr_indices, self.irqchip);
        self.gate.park_saving(|| {
            let state = pending
                .clone()
                .and_then(|()| VcpuState::save(fd, msrs, irqchip).map_err(|e| e.to_string()));
            saved.put(id, state);
        });
    }

    /// Runs the guest until its next exit and handles it. Ok(false): this vCPU is done.
    fn run_once(&mut self) -> Result<bool, String> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(true),
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                *self.stats.pio.entry(port).or_default() += 1;
                self.pio.read(u64::from(port), data);
            }
            VcpuExit::IoOut(port, data) => {
                *self.stats.pio.entry(port).or_default() += 1;
                self.pio.write(u64::from(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                *self.stats.mmio.entry(addr & !0xfff).or_default() += 1;
                self.mmio.read(addr, data);
            }
            VcpuExit::MmioWrite(addr, data) => {
                *self.stats.mmio.entry(addr & !0xfff).or_default() += 1;
                self.mmio.write(addr, data);
            }
            VcpuExit::Hlt => {
                self.stop.vcpu_halted(self.count);
                return Ok(false);
            }
            VcpuExit::Shutdown => {
                // Where it happened, for whoever has to find out why (the user sees one line).
                match self.fd.get_regs() {
                    Ok(r) => tracing::warn!(
                        "vCPU {}: triple fault at guest RIP {:#x} (RSP {:#x}, RFLAGS {:#x})",
                        self.id,
                        r.rip,
                        r.rsp,
                        r.rflags
                    ),
                    Err(e) => tracing::warn!("vCPU {}: triple fault (registers: {e})", self.id),
                }
                self.stop.request(StopReason::Guest(GuestExit::TripleFault));
                return Ok(false);
            }
            VcpuExit::SystemEvent(kind, _) => {
                let exit = match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::PoweredOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestExit::Rebooted,
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => GuestExit::Panicked,
                    other => return Err(format!("unknown KVM system event {other}")),
                };
                self.stop.request(StopReason::Guest(exit));
                return Ok(false);
            }
            VcpuExit::InternalError => return Err(self.describe_internal_error()),
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(format!(
                    "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
                ));
            }
            VcpuExit::Intr => self.stats.other += 1,
            other => {
                let text = format!("{other:?}");
                return Err(format!(
                    "unhandled KVM exit {text} at guest RIP {}",
                    self.rip()
                ));
            }
        }
        Ok(true)
    }

    fn rip(&self) -> String {
        self.fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|_| "unknown".into())
    }

    fn describe_internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled `internal` because the exit reason is KVM_EXIT_INTERNAL_ERROR (this
        // is only called for VcpuExit::InternalError), so that union member is the live one.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            1 => "emulation failure",
            2 => "exception while delivering an exception",
            3 => "failure delivering an event",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        format!(
            "KVM internal error (suberror {}: {what}) at guest RIP {}",
            internal.suberror,
            self.rip()
        )
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Interrupts a KVM_RUN in progress on this vCPU's thread.
    pub fn kick(&self) {
        if let Some(t) = &self.thread
            && !t.is_finished()
        {
            let _ = t.kill(kick_signal());
        }
    }

    /// Waits for the thread to end (after a stop was requested and the vCPU kicked).
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
