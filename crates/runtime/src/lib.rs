//! cela's container runtime: OCI bundles run as isolated process trees on the host kernel
//! (namespaces, cgroups v1/v2, pivot_root, capabilities, seccomp), following the OCI runtime
//! spec, and the jail profile that confines a container as a FreeBSD jail would.
//!
//! The kernel-facing mechanics are youki's `libcontainer` and `libcgroups`; this crate owns the
//! operations around them ([`runtime`]), bundle loading and the spec templates ([`spec`]), and
//! typed errors ([`error`]). The runc-compatible command line, `cela-runc`, is the crate's
//! binary and holds no mechanism.

pub mod cause;
pub mod console;
pub mod error;
pub mod exec;
pub mod lock;
pub mod runtime;
pub mod sealed;
pub mod seccomp;
pub mod spec;

pub use error::Error;
pub use exec::Overrides;
pub use runtime::{CreateOptions, DEFAULT_ROOT, ExecOptions, OciState, Runtime};
