//! The x86_64 machine: memory map, boot protocol, boot-time CPU state and firmware tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod msr;
pub mod regs;
