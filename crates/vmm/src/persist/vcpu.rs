//! A vCPU's KVM state: registers, FPU/XSAVE, XCRs, debug registers, the local APIC (with an
//! in-kernel irqchip), MSRs, the multiprocessing state and pending events.
//!
//! Order matters both ways. On save: an I/O the vCPU exited for is completed first (KVM
//! finishes an instruction that exited to user space on the next `KVM_RUN`, so registers read
//! right after the exit would replay it), the MP state before the rest (reading it may change
//! the local APIC), the events last. On restore: the registers before the events (setting
//! them clears pending exceptions), the special registers before the local APIC (they carry
//! its base), the local APIC before the MSRs (the TSC deadline only takes with the APIC set
//! up), the TSC before the TSC deadline, and the events last.

use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::PersistError;
use crate::arch::x86_64::msr;

/// KVM_SET_MSRS and KVM_GET_MSRS take at most this many entries at once.
const MSR_CHUNK: usize = 255;
/// The TSC deadline: restored after the TSC, or a pending timer would be lost.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSRs whose value is not the vCPU's to carry over (Firecracker's list of the same kind):
/// machine-check control, performance counters and their selectors, and the VMX capability
/// MSRs, which describe the host rather than the guest.
fn not_carried(index: u32) -> bool {
    matches!(index,
        0x17b // MCG_CTL
        | 0xc1..=0xc8 // PERFCTR0-7
        | 0x186..=0x18d // PERFEVTSEL0-7
        | 0x309..=0x30c // FIXED_CTR0-3
        | 0x38d..=0x390 // FIXED_CTR_CTRL, GLOBAL_STATUS/CTRL/OVF_CTRL
        | 0x480..=0x491 // VMX capabilities
    )
}

/// The MSRs a vCPU's state carries on this host: what KVM says it saves and restores, less
/// [`not_carried`], plus those cela sets at boot that the list leaves out (the MTRR default
/// type, on some hosts).
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, PersistError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|source| PersistError::Host {
            what: "the MSRs it saves",
            source,
        })?;
    let mut out: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| !not_carried(i))
        .collect();
    for (index, _) in msr::boot_msr_values() {
        if !out.contains(&index) {
            out.push(index);
        }
    }
    Ok(out)
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    /// The local APIC; only a VM with an in-kernel irqchip has one.
    pub lapic: Option<kvm_lapic_state>,
    /// (index, value), in the order they are restored.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    /// The rate of the guest's TSC as KVM ran it (kHz); a host running another rate scales
    /// it back to this one, or refuses the restore.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

fn save_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::SaveVcpu { what, source }
}

fn restore_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::RestoreVcpu { what, source }
}

/// Lets KVM finish the instruction the vCPU last exited for (the result of an IN, the step
/// past an OUT): one `KVM_RUN` that returns at once, before entering the guest.
pub fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<(), PersistError> {
    vcpu.set_kvm_immediate_exit(1);
    let ran = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(save_err("pending I/O")(e)),
        // Another exit: the access was split (an MMIO or string I/O that needs more than one
        // round trip), which this first part does not serve yet.
        Ok(exit) => Err(PersistError::Incompatible(format!(
            "the vCPU's pending I/O needs another exit to finish ({exit:?})"
        ))),
    };
    vcpu.set_kvm_immediate_exit(0);
    ran
}

/// How far a chunk of `len` entries of which KVM handled `done` moves the cursor: past the
/// whole chunk when all went through, else past the one KVM stopped at.
fn next_after(done: usize, len: usize) -> usize {
    if done < len { done + 1 } else { len }
}

/// Reads `indices` in chunks; an MSR this host does not read is left out (KVM stops a chunk
/// at the first it refuses).
fn get_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, PersistError> {
    read_msrs(vcpu, indices).map_err(save_err("MSRs"))
}

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, kvm_ioctls::Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        // At most MSR_CHUNK entries: always within what `Msrs` holds.
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let read = vcpu.get_msrs(&mut msrs)?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        rest = &rest[next_after(read, chunk.len())..];
    }
    Ok(out)
}

/// Writes `msrs` in chunks. KVM stops a chunk at an MSR it refuses; one it refuses to set to
/// the value it holds already loses nothing (a paravirtual MSR that needs a local APIC, on a
/// VM without one, refuses even its reset value), and the rest of the chunk goes on.
fn set_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), PersistError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let request = Msrs::from_entries(&entries).map_err(|_| {
            PersistError::Incompatible(format!("{} MSRs in one request", entries.len()))
        })?;
        let set = vcpu.set_msrs(&request).map_err(restore_err("MSRs"))?;
        if set < chunk.len() {
            let (index, want) = chunk[set];
            let held = read_msrs(vcpu, &[index]).map_err(restore_err("MSRs"))?;
            if held != [(index, want)] {
                return Err(PersistError::Msr { index, want });
            }
        }
        rest = &rest[next_after(set, chunk.len())..];
    }
    Ok(())
}

impl VcpuState {
    /// Saves a paused vCPU (its thread not in `KVM_RUN`), after [`complete_pending_io`].
    /// `irqchip`: the VM has an in-kernel irqchip, so the vCPU a local APIC.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32], irqchip: bool) -> Result<Self, PersistError> {
        let mp_state = vcpu.get_mp_state().map_err(save_err("MP state"))?;
        let regs = vcpu.get_regs().map_err(save_err("registers"))?;
        let sregs = vcpu.get_sregs().map_err(save_err("special registers"))?;
        let xsave = vcpu.get_xsave().map_err(save_err("XSAVE area"))?;
        let xcrs = vcpu.get_xcrs().map_err(save_err("XCRs"))?;
        let debug_regs = vcpu.get_debug_regs().map_err(save_err("debug registers"))?;
        let lapic = if irqchip {
            Some(vcpu.get_lapic().map_err(save_err("local APIC"))?)
        } else {
            None
        };
        let mut msrs = get_msrs(vcpu, msr_indices)?;
        // The TSC deadline goes last, after the TSC; a pending deadline of 0 read back as the
        // TSC keeps the timer armed.
        if let Some(at) = msrs.iter().position(|(i, _)| *i == MSR_IA32_TSC_DEADLINE) {
            let (index, mut deadline) = msrs.remove(at);
            if deadline == 0
                && let Some((_, tsc)) = msrs.iter().find(|(i, _)| *i == msr::MSR_IA32_TSC)
            {
                deadline = *tsc;
            }
            msrs.push((index, deadline));
        }
        let events = vcpu.get_vcpu_events().map_err(save_err("pending events"))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        Ok(VcpuState {
            tsc_khz,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
        })
    }

    /// Restores the state into a new vCPU of a VM made as the saved one was (same CPUID, an
    /// in-kernel irqchip if the state has a local APIC).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), PersistError> {
        // The TSC's rate before any TSC value (the MSRs), so the value is of the right clock.
        if let Some(want) = self.tsc_khz
            && let Ok(here) = vcpu.get_tsc_khz()
            && here != want
            && vcpu.set_tsc_khz(want).is_err()
        {
            return Err(PersistError::Incompatible(format!(
                "the saved guest's TSC ran at {want} kHz and this host's KVM runs it at {here} kHz and cannot scale it"
            )));
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(restore_err("MP state"))?;
        vcpu.set_regs(&self.regs)
            .map_err(restore_err("registers"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(restore_err("special registers"))?;
        // SAFETY: `kvm_xsave` is the legacy 4 KiB area, which KVM_SET_XSAVE reads whole; it
        // was read by KVM_GET_XSAVE, so it holds no more than that ioctl gives.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(restore_err("XSAVE area"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(restore_err("XCRs"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(restore_err("debug registers"))?;
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic).map_err(restore_err("local APIC"))?;
        }
        set_msrs(vcpu, &self.msrs)?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(restore_err("pending events"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_describing_msrs_are_not_carried() {
        assert!(not_carried(0x17b));
        assert!(not_carried(0x186));
        assert!(not_carried(0x480));
        assert!(!not_carried(msr::MSR_IA32_TSC));
        assert!(!not_carried(MSR_IA32_TSC_DEADLINE));
        assert!(!not_carried(msr::MSR_LSTAR));
    }

    #[test]
    fn a_full_chunk_skips_nothing_after_it() {
        // All 255 went through: the next chunk starts at the 256th, not the 257th.
        assert_eq!(next_after(MSR_CHUNK, MSR_CHUNK), MSR_CHUNK);
        // KVM stopped at the 10th: it is skipped, the 11th comes next.
        assert_eq!(next_after(9, MSR_CHUNK), 10);
        assert_eq!(next_after(0, 1), 1);
        assert_eq!(next_after(3, 3), 3);
    }
}
