//! Boot-time register state of the bootstrap processor for the Linux 64-bit boot protocol
//! (boot.rst, "64-bit Boot Protocol"): long mode with paging on, an identity map of the first
//! gigabyte, flat segments, interrupts off, RSI pointing at the zero page and RIP at the kernel's
//! 64-bit entry point (load address + 0x200).
//!
//! Each register group has a pure function computing it (tested below) and the VMM applies it
//! with one ioctl.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{
    BOOT_GDT, CODE_SELECTOR_INDEX, DATA_SELECTOR_INDEX, TSS_SELECTOR_INDEX, segment_from_gdt,
};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Why the boot CPU state could not be written to guest memory.
#[derive(Debug, thiserror::Error)]
#[error("writing the boot {what} at {addr:#x} into guest memory failed: {source}")]
pub struct BootStateError {
    what: &'static str,
    addr: u64,
    source: vm_memory::GuestMemoryError,
}

/// General-purpose registers at the 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set; IF clear
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// x87 and SSE control state as after FNINIT, with all SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Identity-maps the first 1 GiB with 2 MiB pages: one PML4 entry, one PDPT entry, 512 PD
/// entries. Returns (address, value) pairs to write.
pub fn identity_page_tables() -> Vec<(u64, u64)> {
    let mut entries = vec![
        (PML4_START, PDPTE_START | 0x03), // present, writable
        (PDPTE_START, PDE_START | 0x03),
    ];
    entries.extend((0..512u64).map(|i| (PDE_START + i * 8, (i << 21) | 0x83))); // + page size
    entries
}

/// Writes the GDT, an empty IDT and the page tables into guest memory, and returns the special
/// registers that use them, based on `sregs` as KVM created them.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, BootStateError> {
    let write = |what, addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| BootStateError { what, addr, source })
    };
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write("GDT", BOOT_GDT_START + i as u64 * 8, *entry)?;
    }
    write("IDT", BOOT_IDT_START, 0)?;
    for (addr, val) in identity_page_tables() {
        write("page tables", addr, val)?;
    }

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(BOOT_GDT[CODE_SELECTOR_INDEX as usize], CODE_SELECTOR_INDEX);
    let data = segment_from_gdt(BOOT_GDT[DATA_SELECTOR_INDEX as usize], DATA_SELECTOR_INDEX);
    let tss = segment_from_gdt(BOOT_GDT[TSS_SELECTOR_INDEX as usize], TSS_SELECTOR_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn regs_point_at_entry_and_zero_page() {
        let regs = boot_regs(0x100200);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100200, ZERO_PAGE_START, 2)
        );
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
    }

    #[test]
    fn fpu_is_in_fninit_state() {
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn sregs_enter_long_mode_with_paging() {
        let m = mem();
        let s = boot_sregs(&m, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(
            (s.cr3, s.cs.selector, s.ds.selector, s.tr.selector),
            (PML4_START, 8, 16, 24)
        );
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, BOOT_GDT[1]);
    }

    #[test]
    fn page_tables_identity_map_the_first_gigabyte() {
        let m = mem();
        boot_sregs(&m, kvm_sregs::default()).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pde_last: u64 = m.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde_last, (511 << 21) | 0x83);
        assert_eq!(identity_page_tables().len(), 514);
    }

    #[test]
    fn writing_outside_memory_is_an_error() {
        let tiny = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = boot_sregs(&tiny, kvm_sregs::default()).unwrap_err();
        assert!(err.to_string().contains("page tables"), "{err}");
    }
}
