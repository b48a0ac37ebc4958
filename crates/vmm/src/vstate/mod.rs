//! KVM-backed state of a running machine: guest memory, the VM and its vCPUs.

pub mod memory;
pub mod pause;
pub mod vcpu;
pub mod vm;
