//! cela's images: a content-addressed store of OCI images, filled by pulling from registries or
//! importing archives, and the unpacking the instance code builds root file systems from.
//!
//! * [`reference`]: `[registry/]repository[:tag][@digest]`, normalized as Docker does.
//! * [`digest`]: sha256 digests and verification while streaming.
//! * [`store`]: blobs, the image index, locks and garbage collection ([`Store`]).
//! * [`pull`]: from an OCI/Docker v2 registry ([`pull()`]), with [`credentials`] from
//!   `docker login`'s config.
//! * [`import`]: OCI layouts, `docker save` archives and rootfs tarballs ([`import()`]).
//! * [`manifest`]: OCI and Docker schema 2 manifests and indexes, platform choice.
//! * [`unpack`]: layers into directory trees with whiteouts applied, safely; [`tar_limits`]
//!   bounds what a tar stream may make cela read or write.
//! * [`rootfs`]: an image's layers as OverlayFS lower directories, or flattened ([`flatten`]).
//! * [`ext4`]: an image flattened into a cached ext4 disk for microVMs.
//! * [`debootstrap`]: Debian images built with debootstrap ([`build_debian`]).
//! * [`config`]: how the image asks to be run ([`RunConfig`]).
//! * [`commit`]: a container's writable layer made into an image ([`commit::commit`]).

pub mod commit;
pub mod config;
pub mod credentials;
pub mod debootstrap;
pub mod digest;
mod error;
pub mod ext4;
pub mod import;
pub mod manifest;
mod progress;
pub mod pull;
pub mod reference;
pub mod rootfs;
pub mod store;
pub mod tar_limits;
pub mod unpack;

pub use config::RunConfig;
pub use debootstrap::build_debian;
pub use digest::Digest;
pub use error::ImageError;
pub use ext4::{instance_disk, rootfs_disk};
pub use import::import;
pub use progress::{Progress, StepEvent};
pub use pull::pull;
pub use reference::Reference;
pub use rootfs::{flatten, layer_dirs};
pub use store::{ImageRecord, LayerRecord, Removed, Store};
