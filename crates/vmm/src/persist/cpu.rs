//! What a saved machine needs of the CPU: the feature bits KVM offered its guest on the host
//! it was saved on. A guest probes CPUID once, at boot, and then uses what it found; restored
//! where one of those features is missing, it would fault on its next such instruction. So a
//! restore compares the saved host's features with this host's first and refuses, naming the
//! first that is missing.

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use serde::{Deserialize, Serialize};

/// The CPUID leaves (function, index) and registers that hold feature bits, with their names.
const FEATURE_WORDS: &[(u32, u32, Reg, &str)] = &[
    (1, 0, Reg::Ecx, "CPUID.1:ECX"),
    (1, 0, Reg::Edx, "CPUID.1:EDX"),
    (7, 0, Reg::Ebx, "CPUID.7.0:EBX"),
    (7, 0, Reg::Ecx, "CPUID.7.0:ECX"),
    (7, 0, Reg::Edx, "CPUID.7.0:EDX"),
    (0xd, 0, Reg::Eax, "CPUID.0xD.0:EAX (XSAVE state components)"),
    (0xd, 1, Reg::Eax, "CPUID.0xD.1:EAX"),
    (0x8000_0001, 0, Reg::Ecx, "CPUID.0x80000001:ECX"),
    (0x8000_0001, 0, Reg::Edx, "CPUID.0x80000001:EDX"),
];

#[derive(Debug, Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// The CPU a machine was saved on, as its guest saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSignature {
    /// CPUID.0's vendor string ("GenuineIntel", "AuthenticAMD").
    pub vendor: String,
    /// One value per [`FEATURE_WORDS`] entry, in order.
    pub features: Vec<u32>,
}

/// This host's signature, from the CPUID KVM supports here.
pub fn host_signature() -> Result<CpuSignature, String> {
    let kvm = crate::vstate::vm::open_kvm().map_err(|e| e.to_string())?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("asking KVM for its CPUID: {e}"))?;
    let entries = cpuid.as_slice();
    let find = |function: u32, index: u32| {
        entries
            .iter()
            .find(|e| e.function == function && (e.index == index || e.flags & 1 == 0))
    };
    let vendor = find(0, 0)
        .map(|e| {
            let mut b = Vec::with_capacity(12);
            for r in [e.ebx, e.edx, e.ecx] {
                b.extend_from_slice(&r.to_le_bytes());
            }
            String::from_utf8_lossy(&b).into_owned()
        })
        .unwrap_or_default();
    let features = FEATURE_WORDS
        .iter()
        .map(|&(f, i, reg, _)| {
            find(f, i).map_or(0, |e| match reg {
                Reg::Eax => e.eax,
                Reg::Ebx => e.ebx,
                Reg::Ecx => e.ecx,
                Reg::Edx => e.edx,
            })
        })
        .collect();
    Ok(CpuSignature { vendor, features })
}

impl CpuSignature {
    /// Whether a machine saved on `saved` can run here (on `self`): the same vendor and every
    /// saved feature bit; the refusal names what differs.
    pub fn check_covers(&self, saved: &CpuSignature) -> Result<(), String> {
        if self.vendor != saved.vendor {
            return Err(format!(
                "it was saved on a {} CPU and this one is {}",
                saved.vendor, self.vendor
            ));
        }
        if saved.features.len() != FEATURE_WORDS.len() {
            return Err(format!(
                "its CPU signature has {} feature words, not {}",
                saved.features.len(),
                FEATURE_WORDS.len()
            ));
        }
        for ((&want, &have), (_, _, _, name)) in
            saved.features.iter().zip(&self.features).zip(FEATURE_WORDS)
        {
            let missing = want & !have;
            if missing != 0 {
                return Err(format!(
                    "its guest uses CPU features this host's KVM does not offer: {name} bits {missing:#x}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(vendor: &str, first: u32) -> CpuSignature {
        let mut features = vec![0; FEATURE_WORDS.len()];
        features[0] = first;
        CpuSignature {
            vendor: vendor.into(),
            features,
        }
    }

    #[test]
    fn more_features_cover_fewer_and_a_missing_one_is_named() {
        let here = sig("AuthenticAMD", 0b111);
        assert!(here.check_covers(&sig("AuthenticAMD", 0b101)).is_ok());
        let e = here.check_covers(&sig("AuthenticAMD", 0b1101)).unwrap_err();
        assert!(e.contains("CPUID.1:ECX bits 0x8"), "{e}");
        let e = here.check_covers(&sig("GenuineIntel", 0)).unwrap_err();
        assert!(e.contains("GenuineIntel"), "{e}");
        let mut short = sig("AuthenticAMD", 0);
        short.features.pop();
        assert!(here.check_covers(&short).is_err());
    }
}
