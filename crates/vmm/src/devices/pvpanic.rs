//! The pvpanic device (QEMU's docs/specs/pvpanic.rst): one I/O port through which a guest
//! kernel announces a panic. Reading it returns the events the device supports; the guest
//! writes bit 0 (PANICKED) from its panic notifier, and cela ends the VM with
//! [`GuestExit::Panicked`]. Linux binds its `pvpanic-mmio` driver to the ACPI device with
//! _HID "QEMU0001" that [`PvPanicAml`] describes.

use std::sync::{Arc, Mutex};

use acpi_tables::{Aml, AmlSink, aml};

use crate::devices::bus::BusDevice;
use crate::machine::GuestExit;
use crate::stop::{StopReason, StopSignal};

const PVPANIC_PANICKED: u8 = 1 << 0;
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    stop: Arc<StopSignal>,
}

impl PvPanic {
    pub fn new(stop: Arc<StopSignal>) -> Arc<Mutex<PvPanic>> {
        Arc::new(Mutex::new(PvPanic { stop }))
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            self.stop.request(StopReason::Guest(GuestExit::Panicked));
        }
    }
}

/// `\_SB.PEVT`: the pvpanic device at `port`.
pub struct PvPanicAml {
    pub port: u16,
}

impl Aml for PvPanicAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let io = aml::IO::new(self.port, self.port, 1, 1);
        aml::Device::new(
            "PEVT".into(),
            vec![
                &aml::Name::new("_HID".into(), &"QEMU0001"),
                &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io])),
            ],
        )
        .to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_events_and_panics_on_bit0() {
        let stop = Arc::new(StopSignal::new());
        let dev = PvPanic::new(stop.clone());
        let mut b = [0u8];
        dev.lock().unwrap().read(0, &mut b);
        assert_eq!(b[0], 3);
        dev.lock().unwrap().write(0, &[PVPANIC_CRASH_LOADED]);
        assert!(!stop.is_requested());
        dev.lock().unwrap().write(0, &[PVPANIC_PANICKED]);
        assert_eq!(stop.outcome(), Some(StopReason::Guest(GuestExit::Panicked)));
    }

    #[test]
    fn aml_names_the_qemu0001_hid() {
        let mut v = Vec::new();
        PvPanicAml { port: 0x505 }.to_aml_bytes(&mut v);
        assert!(v.windows(8).any(|w| w == b"QEMU0001"));
    }
}
