//! cela's instances: the one model behind `cela run`, `ps`, `logs`, `exec`, `stop`, `start`,
//! `rm` and `inspect`, for containers and microVMs alike.
//!
//! * [`record`]: an instance's directory, its config and state on disk (atomic writes, unique
//!   names, crash detection by supervisor liveness).
//! * [`supervise`]: the process that runs an instance's workload and records its end.
//! * [`images`]: images instances use are not removed.
//! * [`attach`]: input into a running instance (stdin, its terminal, resizes) through the
//!   supervisor's attach socket.
//! * [`container`]: containers from images (OverlayFS over the image's layers, an OCI bundle
//!   from the image config, `cela-runtime` underneath).
//! * [`log`]: the output log, stdout and stderr kept apart in arrival order.
//! * [`security`]: a container's capabilities and seccomp filter.
//! * [`network`]: `--net none|host|auto`: a container's network namespace and veth link, a
//!   microVM's TAP, and their removal.
//! * [`run`]: a typed [`run::RunRequest`] made into an instance, and starting it; the one
//!   path every front end (CLI, HTTP APIs) takes.
//! * [`ops`]: stop, remove, exec, waiting on state.
//! * [`lab`]: labs: topologies of instances and the links between them (`cela lab`).
//! * [`commit`]: a container's changes made into an image.
//! * [`snapshot`]: microVM snapshots on disk, taking them (in the supervisor) and restoring
//!   them as new instances; [`control`]: the supervisor's socket that takes the request.
//! * [`view`]: the JSON an instance is shown as, by the CLI and the APIs alike.
//! * [`vm_exec`]: `cela exec` into a microVM, the host end of the guest agent's protocol.

pub mod attach;
pub mod commit;
pub mod container;
pub mod control;
mod error;
pub mod events;
pub mod images;
pub mod lab;
pub mod log;
pub mod network;
pub mod ops;
pub mod record;
pub mod run;
pub mod security;
pub mod snapshot;
pub mod supervise;
pub mod view;
pub mod vm_exec;

pub use error::InstanceError;
pub use network::NetMode;
pub use record::{
    Broken, Instance, InstanceConfig, InstanceState, Instances, Kind, Status, VmBoot, Volume,
};
pub use run::{GuestFiles, PullPolicy, RunRequest};
pub use security::{Seccomp, Security};
