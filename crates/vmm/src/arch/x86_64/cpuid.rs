//! CPUID as each vCPU sees it: what KVM supports on this host (KVM_GET_SUPPORTED_CPUID),
//! normalized for a VM with `count` vCPUs where this vCPU has APIC ID `id`. The leaves follow the
//! Intel SDM vol. 2A "CPUID" and AMD APM vol. 3 appendix E.
//!
//! What changes and why:
//! * leaf 0x1: the APIC ID and logical-processor count in EBX, the hypervisor bit (so the guest
//!   looks for paravirtual features such as kvmclock), the TSC-deadline timer bit (KVM emulates
//!   it; with it Linux skips calibrating the local APIC timer against the PIT, a slow and
//!   exit-heavy loop in a nested VM), and HTT when there is more than one vCPU;
//! * leaf 0xb (extended topology): one thread per core, `count` cores, x2APIC ID = `id`;
//! * leaf 0x8000_0008 (AMD): the core count in ECX;
//! * leaf 0xa (architectural performance monitoring): cleared, cela exposes no PMU.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Normalizes the host-supported CPUID for vCPU `id` of `count`.
pub fn normalize(supported: &CpuId, id: u32, count: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, id, count);
    }
    cpuid
}

fn normalize_entry(e: &mut kvm_cpuid_entry2, id: u32, count: u32) {
    match e.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC ID, [23:16] max logical processors, [15:8] CLFLUSH
            // line size in quadwords (8 = 64 bytes).
            e.ebx = (id << 24) | ((count & 0xff) << 16) | (8 << 8) | (e.ebx & 0xff);
            e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: max cores per package - 1. Each cache is private to one core.
            e.eax &= !(0x3f << 26 | 0xfff << 14);
            e.eax |= (count.saturating_sub(1) & 0x3f) << 26;
        }
        LEAF_PERFMON => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        LEAF_EXT_TOPOLOGY => {
            // Sub-leaf 0: SMT level, 1 thread per core; sub-leaf 1: core level, `count`
            // logical processors per package; higher sub-leaves are invalid.
            let (shift, logical, level_type) = match e.index {
                0 => (0, 1, 1),
                1 => (bits_for(count), count, 2),
                _ => (0, 0, 0),
            };
            e.eax = shift;
            e.ebx = logical & 0xffff;
            e.ecx = (level_type << 8) | (e.index & 0xff);
            e.edx = id;
        }
        LEAF_AMD_SIZE_IDS => {
            // ECX[7:0]: number of cores - 1; [15:12]: APIC ID size in bits.
            e.ecx = (bits_for(count) << 12) | (count.saturating_sub(1) & 0xff);
        }
        _ => {}
    }
}

/// Bits needed to hold IDs 0..count.
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    fn host() -> CpuId {
        CpuId::from_entries(&[
            entry(0x1, 0),
            entry(0x4, 0),
            entry(0xa, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0008, 0),
            entry(0x4000_0000, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bits() {
        let c = normalize(&host(), 3, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(find(&normalize(&host(), 0, 1), 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_count_cores() {
        let c = normalize(&host(), 2, 3);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((smt.ebx, smt.edx, (smt.ecx >> 8) & 0xff), (1, 2, 1));
        assert_eq!((core.eax, core.ebx, (core.ecx >> 8) & 0xff), (2, 3, 2));
        assert_eq!(find(&c, 0xb, 2).ebx, 0);
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 2);
        assert_eq!(find(&c, 0x4, 0).eax >> 26, 2);
    }

    #[test]
    fn pmu_is_hidden_and_other_leaves_untouched() {
        let c = normalize(&host(), 0, 1);
        assert_eq!(find(&c, 0xa, 0).eax, 0);
        assert_eq!(find(&c, 0x4000_0000, 0).eax, 0xffff_ffff);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
