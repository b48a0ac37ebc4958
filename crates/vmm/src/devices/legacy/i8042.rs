//! The i8042 keyboard controller, emulated by `vm-superio` only as far as Linux's
//! `reboot=k` needs: the status register reads as idle and command 0xFE (pulse the CPU reset
//! line) ends the machine with [`GuestExit::Rebooted`]. No keyboard or mouse is attached, and
//! the controller is not described in ACPI, so the guest's i8042 driver does not probe it.

use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;
use crate::machine::GuestExit;
use crate::stop::{StopReason, StopSignal};

/// Requests a stop when the controller pulses the reset line.
pub struct ResetLine(pub Arc<StopSignal>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(StopReason::Guest(GuestExit::Rebooted));
        Ok(())
    }
}

pub struct I8042 {
    dev: I8042Device<ResetLine>,
}

impl I8042 {
    pub fn new(stop: Arc<StopSignal>) -> Arc<Mutex<I8042>> {
        Arc::new(Mutex::new(I8042 {
            dev: I8042Device::new(ResetLine(stop)),
        }))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.dev.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.dev.write(off, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_reboots() {
        let stop = Arc::new(StopSignal::new());
        let kbd = I8042::new(stop.clone());
        let mut k = kbd.lock().unwrap();
        k.write(4, &[0xaa]);
        assert!(!stop.is_requested());
        k.write(4, &[0xfe]);
        assert_eq!(stop.outcome(), Some(StopReason::Guest(GuestExit::Rebooted)));
    }
}
