//! The VM's own KVM state: with an in-kernel irqchip, the two PICs, the IOAPIC and the PIT;
//! and the KVM clock. Saved after the vCPUs, the clock last; restored after them, the clock
//! last of all, just before the vCPUs run again.
//!
//! Setting the clock to its saved value makes time stand still while the machine was away:
//! the guest's monotonic clock goes on from where it stopped, and its wall clock lags by the
//! time away. Bringing the wall clock forward (KVM's REALTIME flag with a TSC offset, where
//! the host has them, or cela-init stepping the time on resume) is the restore path's choice.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::PersistError;

/// The in-kernel irqchip and PIT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

/// The VM's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Only a VM made with an in-kernel irqchip has one.
    pub irqchip: Option<IrqchipState>,
    pub clock: kvm_clock_data,
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, PersistError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(|source| PersistError::SaveVm {
            what: "interrupt controllers",
            source,
        })?;
    Ok(c)
}

impl VmState {
    /// Saves a paused VM (every vCPU saved already). `irqchip`: it was made with one.
    pub fn save(vm: &VmFd, irqchip: bool) -> Result<Self, PersistError> {
        let irqchip = if irqchip {
            Some(IrqchipState {
                pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
                pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
                ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
                pit: vm.get_pit2().map_err(|source| PersistError::SaveVm {
                    what: "PIT",
                    source,
                })?,
            })
        } else {
            None
        };
        let clock = vm.get_clock().map_err(|source| PersistError::SaveVm {
            what: "clock",
            source,
        })?;
        Ok(VmState { irqchip, clock })
    }

    /// Restores the interrupt controllers and the PIT into a VM made as the saved one was
    /// (after its vCPUs are restored); the clock is [`VmState::restore_clock`]'s.
    pub fn restore(&self, vm: &VmFd) -> Result<(), PersistError> {
        let Some(chips) = &self.irqchip else {
            return Ok(());
        };
        let err = |what| move |source| PersistError::RestoreVm { what, source };
        for c in [&chips.pic_master, &chips.pic_slave, &chips.ioapic] {
            vm.set_irqchip(c).map_err(err("interrupt controllers"))?;
        }
        vm.set_pit2(&chips.pit).map_err(err("PIT"))?;
        Ok(())
    }

    /// Sets the KVM clock: the last step before the vCPUs run. Only the value is given back
    /// (the saved flags describe the host it was read on).
    pub fn restore_clock(&self, vm: &VmFd) -> Result<(), PersistError> {
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|source| PersistError::RestoreVm {
                what: "clock",
                source,
            })
    }
}
