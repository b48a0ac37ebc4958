//! cela's virtual machine monitor: boots an unmodified Linux bzImage on KVM with a small,
//! Firecracker-like machine model (in-kernel irqchip and PIT, 16550 serial ports, i8042 reset,
//! ACPI tables, pvpanic), plus a QEMU TCG fallback engine for hosts whose KVM cannot run a stock
//! kernel.

pub mod machine;

pub use machine::{BASE_CMDLINE, ConsoleMode, GuestExit, MachineConfig};
