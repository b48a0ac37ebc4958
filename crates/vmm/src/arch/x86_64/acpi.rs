//! The ACPI tables cela's firmware-less machine hands the guest (ACPI 6.5): RSDP → XSDT →
//! {FADT → DSDT, MADT}. The machine is *hardware-reduced* ACPI (FADT flag HW_REDUCED_ACPI): no
//! SCI, PM timer, GPE blocks or legacy PIC/PIT expectations; power-off goes through the FADT's
//! sleep control register and reset through its reset register. Linux then skips its legacy
//! timer checks, which matters for boot time in a nested VM.
//!
//! The DSDT is assembled from the AML each device emits for itself ([`Aml`] implementations
//! next to the devices' emulation), plus the `\_S5` sleep package.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{ACPI_TABLES_END, IOAPIC_ADDR, LAPIC_ADDR, RSDP_START, SCI_GSI};
use crate::devices::acpi_pm;

const OEM_ID: [u8; 6] = *b"CELA  ";
const OEM_TABLE_ID: [u8; 8] = *b"CELAVM  ";
const OEM_REVISION: u32 = 1;

const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// The SLP_TYP value for S5 (soft off) in `\_S5`; the sleep control register decodes it.
pub const S5_SLEEP_TYPE: u8 = acpi_pm::S5_SLEEP_TYPE;

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error(
        "the ACPI tables need {size} bytes but only {room} fit below the VM generation ID's page"
    )]
    TooLarge { size: u64, room: u64 },
    #[error("writing the ACPI {table} into guest memory failed: {source}")]
    Memory {
        table: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// The DSDT: every device's AML inside `\_SB`, and the S5 sleep package.
pub fn dsdt(devices: &[&dyn Aml]) -> Sdt {
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    aml::Scope::new("\\_SB_".into(), devices.to_vec()).to_aml_bytes(&mut body);
    let s5 = [S5_SLEEP_TYPE, 0, 0, 0];
    let s5_refs: Vec<&dyn Aml> = s5.iter().map(|v| v as &dyn Aml).collect();
    aml::Name::new("_S5_".into(), &aml::Package::new(s5_refs)).to_aml_bytes(&mut body);
    table.append_slice(&body);
    table
}

/// The MADT: one local APIC per vCPU, the IOAPIC, the PIT's IRQ0→GSI2 override, and LINT1 as
/// the NMI input of every local APIC. Flags are 0 (no PCAT_COMPAT: there is no dual 8259).
pub fn madt(vcpus: u32) -> Sdt {
    let mut table = Sdt::new(*b"APIC", 36, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append(LAPIC_ADDR as u32);
    table.append(0u32);
    let mut body = Vec::new();
    for id in 0..vcpus {
        ProcessorLocalApic::new(id as u8, id as u8, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(0, IOAPIC_ADDR as u32, 0).to_aml_bytes(&mut body);
    // Interrupt source override (type 2, 10 bytes): ISA bus, IRQ 0 → GSI 2, conforming flags.
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI (type 4, 6 bytes): all processors (0xff), conforming, LINT1.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    table.append_slice(&body);
    table
}

/// The FADT for a hardware-reduced machine whose PM registers are cela's `acpi_pm` device.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io8 = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::Headless);
    builder.sci_int = (SCI_GSI as u16).into();
    // IA-PC boot architecture flags (ACPI 6.5 §5.2.9.3): no VGA, and no CMOS RTC. Without the
    // latter Linux probes the RTC at ports 0x70/0x71, which cela does not emulate: measured in
    // the nested lab, 40,000 port exits and about 4 s of boot. The wall clock comes from
    // kvmclock instead. The i8042 flag stays clear, so Linux does not probe a keyboard
    // controller either (cela's only serves the reset line).
    builder.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    builder.sleep_control_reg = io8(acpi_pm::SLEEP_CONTROL_PORT);
    builder.sleep_status_reg = io8(acpi_pm::SLEEP_STATUS_PORT);
    builder.reset_reg = io8(acpi_pm::RESET_PORT);
    builder.reset_value = acpi_pm::RESET_VALUE;
    builder.hypervisor_vendor_identity = u64::from_le_bytes(*b"CELAVMM\0").into();
    let mut bytes = Vec::new();
    builder.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// Lays the tables out from [`RSDP_START`] and writes them; returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u32,
    devices: &[&dyn Aml],
) -> Result<u64, AcpiError> {
    let align = |a: u64| (a + 7) & !7;
    let xsdt_addr = align(RSDP_START + Rsdp::len() as u64);

    let dsdt = dsdt(devices);
    let madt = madt(vcpus);
    // XSDT with two entries: 36-byte header + 2 * 8.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let madt_addr = align(fadt_addr + fadt_len);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge {
            size: end - RSDP_START,
            room: ACPI_TABLES_END - RSDP_START,
        });
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);

    let write = |table, addr: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Memory { table, source })
    };
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    write("RSDP", RSDP_START, &rsdp)?;
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    write("XSDT", xsdt_addr, &xsdt_bytes)?;
    write("FADT", fadt_addr, &fadt(dsdt_addr))?;
    write("MADT", madt_addr, madt.as_slice())?;
    write("DSDT", dsdt_addr, dsdt.as_slice())?;
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, 8);
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap());
        read(mem, addr, len as usize)
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn tables_parse_back_with_valid_checksums() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let com1 = crate::devices::legacy::serial::SerialAml {
            port: 0x3f8,
            gsi: 4,
            uid: 0,
        };
        let rsdp_addr = write_tables(&mem, 3, &[&com1]).unwrap();
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));

        let xsdt = table_at(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        assert_eq!(xsdt.len(), 36 + 16);

        let fadt = table_at(&mem, u64_at(&xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        assert_eq!(fadt.len(), 276);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let boot_arch = u16::from_le_bytes(fadt[109..111].try_into().unwrap());
        assert_eq!(
            boot_arch,
            (1 << 2) | (1 << 5),
            "no VGA, no CMOS RTC, no i8042"
        );
        // Sleep control register: a system-I/O GAS at offset 244.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(&fadt, 248), u64::from(acpi_pm::SLEEP_CONTROL_PORT));

        let madt = table_at(&mem, u64_at(&xsdt, 44));
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        let lapics = madt[44..].chunks(2).count(); // walk entries properly below
        assert!(lapics > 0);
        let mut off = 44;
        let mut kinds = Vec::new();
        while off < madt.len() {
            kinds.push(madt[off]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(
            kinds,
            vec![0, 0, 0, 1, 2, 4],
            "3 local APICs, IOAPIC, override, NMI"
        );

        let dsdt = table_at(&mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let body = &dsdt[36..];
        assert!(body.windows(4).any(|w| w == b"_S5_"));
        assert!(body.windows(4).any(|w| w == b"COM1"));
    }

    #[test]
    fn madt_lists_every_vcpu() {
        for n in [1u32, 2, 8] {
            let t = madt(n);
            assert_eq!(t.len(), 44 + 8 * n as usize + 12 + 10 + 6);
        }
    }
}
