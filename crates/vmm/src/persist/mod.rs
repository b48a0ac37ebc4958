//! A machine's state written down and brought back (snapshots, restore, fork): plain serde
//! structs per part, each saved from and restored into its KVM object in the order KVM
//! needs. This first part holds the vCPUs' and the VM's own KVM state ([`vcpu`], [`vm`]);
//! devices, guest memory and the snapshot files follow.

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
}
