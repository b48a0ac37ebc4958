//! A machine's state written down and brought back (snapshots, restore, fork): plain serde
//! structs per part, each saved from and restored into its KVM object in the order KVM
//! needs: the vCPUs' and the VM's own KVM state ([`vcpu`], [`vm`]), the devices'
//! ([`devices`]), a whole machine with its RAM ([`machine`]), and the CPU features a saved
//! guest relies on ([`cpu`]).

pub mod cpu;
pub mod devices;
pub mod machine;
pub mod vcpu;
pub mod vm;

/// Why state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("saving the {what} of a vCPU: {source}")]
    SaveVcpu {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("restoring the {what} of a vCPU: {source}")]
    RestoreVcpu {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("saving the VM's {what}: {source}")]
    SaveVm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("restoring the VM's {what}: {source}")]
    RestoreVm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("this host's KVM did not take MSR {index:#x} = {want:#x} of the saved vCPU")]
    Msr { index: u32, want: u64 },
    #[error("asking KVM for {what}: {source}")]
    Host {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Incompatible(String),
    /// A device's saved state was refused (or could not be put back).
    #[error("restoring {device}: {problem}")]
    Device { device: String, problem: String },
}
