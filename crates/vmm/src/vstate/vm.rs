//! The KVM virtual machine: the `/dev/kvm` handle, the VM file descriptor with guest memory
//! registered in it, and — for a PC-like machine — KVM's in-kernel interrupt controllers
//! (local APICs, IOAPIC, dual 8259) and PIT, so that timer and interrupt traffic never leaves
//! the kernel.

use std::io;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "/dev/kvm does not exist: this host has no KVM (is the kvm_intel or kvm_amd module loaded?); use --engine qemu to emulate instead"
    )]
    NoKvm,
    #[error(
        "no permission to open /dev/kvm: run as root or add your user to the group owning /dev/kvm"
    )]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(io::Error),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    BootState(#[from] crate::arch::x86_64::regs::BootStateError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm with an error that says what to do.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::KvmOpen(io::Error::from_raw_os_error(e.errno())),
    })
}

/// A KVM VM with its guest memory.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryMmap,
    irqchip: bool,
}

impl Vm {
    /// Creates a VM backed by `memory`. With `irqchip`, also creates the in-kernel IOAPIC,
    /// local APICs, PIC and PIT (a PC); without, the vCPUs see no interrupt controller and HLT
    /// exits to the monitor (a bare machine, used by tests with tiny guests).
    pub fn new(memory: GuestMemoryMmap, irqchip: bool) -> Result<Vm, VmError> {
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("an mmap-backed region always has a host address");
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range [host, host + len) is a live mmap owned by `memory`, which
            // this Vm keeps alive for as long as the VM fd (and so the mapping in KVM) exists;
            // slots do not overlap because the regions of a GuestMemoryMmap never do.
            unsafe { fd.set_user_memory_region(mem_region) }
                .map_err(kvm_err("register guest memory"))?;
        }
        if irqchip {
            fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
                .map_err(kvm_err("set the identity-map address"))?;
            fd.set_tss_address(KVM_TSS_ADDR as usize)
                .map_err(kvm_err("set the TSS address"))?;
            fd.create_irq_chip()
                .map_err(kvm_err("create the in-kernel irqchip"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit)
                .map_err(kvm_err("create the in-kernel PIT"))?;
        }
        Ok(Vm {
            kvm,
            fd,
            memory,
            irqchip,
        })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// The most vCPUs KVM allows in one VM on this host.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The MSRs a saved vCPU state carries on this host.
    pub fn msrs_to_save(&self) -> Result<Vec<u32>, crate::persist::PersistError> {
        crate::persist::vcpu::msrs_to_save(&self.kvm)
    }

    /// CPUID as KVM can offer it on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report supported CPUID"))
    }

    /// Has KVM signal `evt` when the guest writes the 32-bit value `datamatch` to the MMIO
    /// address `addr` (a KVM ioeventfd): the write completes in the kernel, without an exit to
    /// the monitor.
    pub fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("register an ioeventfd"))
    }

    /// Routes `evt` to interrupt line `gsi` of the in-kernel IOAPIC (a KVM irqfd). Without an
    /// irqchip there is nothing to route to and the eventfd is left unconnected.
    pub fn connect_irq(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        if self.irqchip {
            self.fd
                .register_irqfd(evt, gsi)
                .map_err(kvm_err("connect an irqfd"))?;
        }
        Ok(())
    }
}
