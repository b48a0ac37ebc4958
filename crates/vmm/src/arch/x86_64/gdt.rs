//! The boot-time Global Descriptor Table: flat 64-bit code and data segments and a TSS entry,
//! the minimum the Linux 64-bit boot protocol requires (boot.rst, "64-bit Boot Protocol": CS
//! must be a 4G flat execute/read segment, DS/ES/SS a 4G flat read/write segment).

use kvm_bindings::kvm_segment;

/// The boot GDT: null, code, data, TSS. Selectors are index * 8.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),            // null
    gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL0, exec/read, accessed; L=1, G=1
    gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL0, read/write, accessed; D/B=1, G=1
    gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS; G=1
];
pub const CODE_SELECTOR_INDEX: u8 = 1;
pub const DATA_SELECTOR_INDEX: u8 = 2;
pub const TSS_SELECTOR_INDEX: u8 = 3;

/// Packs a segment descriptor from its 12 flag bits (access byte in bits 0..8, flags nibble in
/// bits 12..16), base and 20-bit limit, as the Intel SDM vol. 3 §3.4.5 lays it out.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    // With the granularity bit set the limit counts 4 KiB pages.
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM segment register state that loading `entry` from GDT slot `index` would produce.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_flat_long_mode() {
        let seg = segment_from_gdt(BOOT_GDT[1], CODE_SELECTOR_INDEX);
        assert_eq!(seg.selector, 0x08);
        assert_eq!((seg.base, seg.limit), (0, 0xffff_ffff));
        assert_eq!((seg.l, seg.db, seg.g, seg.present, seg.s), (1, 0, 1, 1, 1));
        assert_eq!(seg.type_, 0xb);
    }

    #[test]
    fn data_and_tss_segments() {
        let data = segment_from_gdt(BOOT_GDT[2], DATA_SELECTOR_INDEX);
        assert_eq!(
            (data.selector, data.type_, data.db, data.l),
            (0x10, 0x3, 1, 0)
        );
        let tss = segment_from_gdt(BOOT_GDT[3], TSS_SELECTOR_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
    }

    #[test]
    fn entry_packing_round_trips_base_and_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        assert_eq!(base(e), 0x1234_5678);
        assert_eq!(limit(e), 0xabcde);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }
}
