//! The guest physical memory map and every fixed address or port cela's machine uses, in one
//! place. Addresses in low memory follow the Linux x86 boot protocol
//! (Documentation/arch/x86/boot.rst) and the conventions of other KVM monitors; the MMIO hole
//! and the APIC addresses are the PC platform's.

/// Real-mode interrupt vectors and BIOS data: kept out of the guest's usable RAM.
pub const BIOS_DATA_END: u64 = 0x500;
/// The boot GDT (four 8-byte entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT (empty: the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux's "zero page" (`struct boot_params`), pointed to by RSI at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The initial stack pointer (RSP/RBP at entry), below the page tables.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for 64-bit entry: PML4, one PDPT, one PD of 2 MiB pages
/// (mapping the first 1 GiB, where the kernel, zero page and command line live).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line (NUL-terminated).
pub const CMDLINE_START: u64 = 0x20000;
/// Linux x86 limits the command line to 2048 bytes (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: usable RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI RSDP lives: the kernel also finds it by scanning 0xE0000..0xFFFFF, so it
/// works even with a boot loader that does not pass `acpi_rsdp_addr`.
pub const RSDP_START: u64 = 0xe0000;
/// The rest of the ACPI tables follow the RSDP, up to the VM generation ID's page.
pub const ACPI_TABLES_END: u64 = VMGENID_ADDR;
/// The VM generation ID's page (`devices::vmgenid`): the last page of the BIOS area, which the
/// e820 map reserves, above the ACPI tables.
pub const VMGENID_ADDR: u64 = 0xff000;
/// Start of "high memory": the protected-mode kernel is loaded here.
pub const HIMEM_START: u64 = 0x100000;

/// The 32-bit MMIO hole: guest RAM never overlaps [MMIO_HOLE_START, 4 GiB); RAM beyond the
/// hole's start continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The in-kernel IOAPIC's MMIO window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC's MMIO window.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Reserved for KVM's TSS (three pages) and identity-map page, below the IOAPIC.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Number of IOAPIC pins (GSIs) of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;

/// virtio-mmio devices (virtio 1.2 §4.2): one 4 KiB page each from here, in the 32-bit MMIO
/// hole below the IOAPIC, in the order the builder creates them.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// virtio-mmio interrupts: IOAPIC pins from 5 up (3 and 4 are the serial ports), skipping the
/// SCI's pin.
pub const VIRTIO_GSI_START: u32 = 5;

/// The MMIO window and GSI of virtio-mmio device `n`, or None once the IOAPIC's pins run out.
pub fn virtio_mmio_slot(n: usize) -> Option<(u64, u32)> {
    let gsi = (VIRTIO_GSI_START..IOAPIC_PINS)
        .filter(|g| *g != SCI_GSI && *g != GED_GSI)
        .nth(n)?;
    Some((VIRTIO_MMIO_START + VIRTIO_MMIO_STRIDE * n as u64, gsi))
}

/// Legacy I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;
pub const COM2_PORT: u16 = 0x2f8;
pub const COM2_GSI: u32 = 3;
pub const SERIAL_PORT_SIZE: u16 = 8;
/// The i8042 keyboard controller's data and command/status ports (0x60, 0x64).
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_SIZE: u16 = 5;
/// cela's ACPI power-management block (hardware-reduced ACPI): sleep control, sleep status and
/// reset registers, one byte each.
pub const ACPI_PM_PORT: u16 = 0x600;
pub const ACPI_PM_PORT_SIZE: u16 = 3;
/// The pvpanic device's port, QEMU's default so guest tooling expecting it works unchanged.
pub const PVPANIC_PORT: u16 = 0x505;

/// The GSI the ACPI SCI would use; hardware-reduced ACPI needs none, but the FADT field must
/// name a valid pin.
pub const SCI_GSI: u32 = 9;
/// The Generic Event Device's interrupt (`devices::vmgenid`): the IOAPIC's last pin.
pub const GED_GSI: u32 = IOAPIC_PINS - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_avoid_the_serial_ports_the_sci_and_the_ged() {
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_mmio_slot(4), Some((0xd000_4000, 10)));
        let all: Vec<_> = (0..).map_while(virtio_mmio_slot).collect();
        assert_eq!(all.len(), 17);
        assert!(all.iter().all(|(base, gsi)| {
            *gsi != COM1_GSI
                && *gsi != COM2_GSI
                && *gsi != SCI_GSI
                && *gsi != GED_GSI
                && *gsi < IOAPIC_PINS
                && *base + VIRTIO_MMIO_STRIDE <= IOAPIC_ADDR
        }));
    }
}
