//! Emulated devices. Each device owns its guest-visible description (its ACPI AML) next to its
//! emulation. Devices are reached through a [`bus::Bus`] keyed by port or MMIO address.

pub mod acpi_pm;
pub mod bus;
pub mod legacy;
pub mod pvpanic;
pub mod virtio;
pub mod vmgenid;
