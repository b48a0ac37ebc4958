//! Local APIC boot configuration: LINT0 delivers external interrupts (ExtINT, the legacy PIC
//! path) and LINT1 delivers NMIs, as a PC's BIOS leaves them (Intel SDM vol. 3 §11.5.1 and
//! the MultiProcessor Specification's virtual-wire mode).

use kvm_bindings::kvm_lapic_state;

/// Offsets of the LVT LINT0 and LINT1 registers in the APIC register page.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn read_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn write_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

/// Sets the delivery mode (bits 8..11) of an LVT entry, keeping its other bits.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Returns `state` with LINT0 = ExtINT and LINT1 = NMI.
pub fn configure_lints(mut state: kvm_lapic_state) -> kvm_lapic_state {
    let lvt0 = read_reg(&state, APIC_LVT0);
    write_reg(
        &mut state,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = read_reg(&state, APIC_LVT1);
    write_reg(
        &mut state,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lints_get_extint_and_nmi() {
        let mut s = kvm_lapic_state::default();
        write_reg(&mut s, APIC_LVT0, 0x0001_0000); // masked, fixed
        let s = configure_lints(s);
        assert_eq!(read_reg(&s, APIC_LVT0), 0x0001_0700);
        assert_eq!(read_reg(&s, APIC_LVT1), 0x0000_0400);
    }
}
