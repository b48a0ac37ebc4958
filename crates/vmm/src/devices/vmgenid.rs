//! The VM generation ID (Microsoft's "Virtual Machine Generation ID" specification, as QEMU
//! and Firecracker offer it): 16 random bytes in guest memory that change whenever the
//! machine is copied — here on every restore from a snapshot — and a notification that they
//! did. A guest kernel with the `vmgenid` driver (Linux 5.18 and later, where it is built)
//! then reseeds its random generator at once, before any program runs on; cela-init's
//! `entropy` request does the same for kernels without it (Debian's 6.1 cloud kernel has
//! none), a moment later.
//!
//! The guest finds the bytes through the ACPI device `\_SB.VGEN` ([`VmGenIdAml`]: `_CID`
//! `VM_Gen_Counter`, the ID Linux's driver and Windows bind to; `ADDR` is a package of the
//! address's low and high 32 bits). They lie in a page of the BIOS area that the e820 map
//! reserves ([`crate::arch::x86_64::layout::VMGENID_ADDR`]), above the ACPI tables, so the
//! guest never uses it as RAM. The notification is hardware-reduced ACPI's: a Generic Event
//! Device (`ACPI0013`, [`GedAml`]) whose interrupt the monitor raises after a restore; its
//! `_EVT` method does `Notify(\_SB.VGEN, 0x80)`.

use std::io::Read;

use acpi_tables::{Aml, AmlSink, aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The size of a generation ID.
pub const ID_SIZE: usize = 16;

/// Why a new generation ID could not be given.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("reading random bytes for the VM generation ID: {0}")]
    Random(std::io::Error),
    #[error("writing the VM generation ID into guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

/// Writes a fresh random generation ID at `addr` in `mem` and returns it. Called before the
/// monitor enters its jail (it reads `/dev/urandom`).
pub fn write_new_id(mem: &GuestMemoryMmap, addr: u64) -> Result<[u8; ID_SIZE], VmGenIdError> {
    let mut id = [0u8; ID_SIZE];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(VmGenIdError::Random)?;
    mem.write_slice(&id, GuestAddress(addr))
        .map_err(VmGenIdError::Memory)?;
    Ok(id)
}

/// `\_SB.VGEN`: the generation ID at `addr`.
pub struct VmGenIdAml {
    pub addr: u64,
}

impl Aml for VmGenIdAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let low = self.addr as u32;
        let high = (self.addr >> 32) as u32;
        aml::Device::new(
            "VGEN".into(),
            vec![
                &aml::Name::new("_HID".into(), &"CELAVGID"),
                &aml::Name::new("_CID".into(), &"VM_Gen_Counter"),
                &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
                &aml::Name::new("ADDR".into(), &aml::Package::new(vec![&low, &high])),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// `\_SB.GED0`: the Generic Event Device whose edge-triggered interrupt `gsi` makes the guest
/// run its `_EVT`, which notifies `\_SB.VGEN` (0x80: the generation ID changed).
pub struct GedAml {
    pub gsi: u32,
}

impl Aml for GedAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // A consumer, edge-triggered, active-high, exclusive interrupt.
        let irq = aml::Interrupt::new(true, true, false, false, self.gsi);
        let vgen = aml::Path::new("\\_SB_.VGEN");
        let changed: u8 = 0x80;
        let notify = aml::Notify::new(&vgen, &changed);
        let ours = aml::Equal::new(&aml::Arg(0), &self.gsi);
        let when = aml::If::new(&ours, vec![&notify]);
        aml::Device::new(
            "GED0".into(),
            vec![
                &aml::Name::new("_HID".into(), &"ACPI0013"),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq])),
                &aml::Method::new("_EVT".into(), 1, true, vec![&when]),
            ],
        )
        .to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    fn bytes_of(aml: &dyn Aml) -> Vec<u8> {
        let mut v = Vec::new();
        aml.to_aml_bytes(&mut v);
        v
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_device_names_its_ids_and_the_address_in_two_halves() {
        let b = bytes_of(&VmGenIdAml {
            addr: 0x1_2345_6000,
        });
        for s in ["VGEN", "CELAVGID", "VM_Gen_Counter", "ADDR"] {
            assert!(contains(&b, s.as_bytes()), "{s} missing");
        }
        // DWordConst 0x23456000, then the high half 1 (AML's One).
        assert!(
            contains(&b, &[0x0c, 0x00, 0x60, 0x45, 0x23, 0x01]),
            "{b:02x?}"
        );
    }

    #[test]
    fn the_event_device_takes_its_interrupt_and_notifies_vgen() {
        let b = bytes_of(&GedAml { gsi: 23 });
        for s in ["GED0", "ACPI0013", "_EVT", "VGEN"] {
            assert!(contains(&b, s.as_bytes()), "{s} missing");
        }
        // Extended IRQ descriptor: consumer | edge (flags 3), one interrupt, GSI 23.
        assert!(contains(&b, &[0x89, 6, 0, 3, 1, 23, 0, 0, 0]), "{b:02x?}");
        // NotifyOp (0x86) on \_SB_.VGEN with 0x80.
        assert!(contains(&b, &[0x86, b'\\', 0x2e]), "{b:02x?}");
    }

    #[test]
    fn each_new_id_is_written_where_it_is_said_to_be_and_differs() {
        let mem = create_guest_memory(2 << 20).unwrap();
        let a = write_new_id(&mem, 0xff000).unwrap();
        let mut read = [0u8; ID_SIZE];
        mem.read_slice(&mut read, GuestAddress(0xff000)).unwrap();
        assert_eq!(read, a);
        let b = write_new_id(&mem, 0xff000).unwrap();
        assert_ne!(a, b);
        assert!(write_new_id(&mem, 4 << 20).is_err(), "past the RAM");
    }
}
