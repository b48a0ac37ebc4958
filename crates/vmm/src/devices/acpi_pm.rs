//! The power-management registers of cela's hardware-reduced ACPI machine (ACPI 6.5 §4.8.3.7
//! "Sleep Control and Status Registers" and §4.8.3.6 "Reset Register"), one byte each on port
//! I/O, named by the FADT:
//! * sleep control: the OS writes SLP_TYP (bits 2..4) with SLP_EN (bit 5); SLP_TYP = the first
//!   value of the DSDT's `\_S5` package means soft-off, which ends the machine;
//! * sleep status: always reads 0 (no wake events);
//! * reset: writing [`RESET_VALUE`] resets the machine, which cela treats as the end of the run.

use std::sync::{Arc, Mutex};

use crate::arch::x86_64::layout::ACPI_PM_PORT;
use crate::devices::bus::BusDevice;
use crate::machine::GuestExit;
use crate::stop::{StopReason, StopSignal};

pub const SLEEP_CONTROL_PORT: u16 = ACPI_PM_PORT;
pub const SLEEP_STATUS_PORT: u16 = ACPI_PM_PORT + 1;
pub const RESET_PORT: u16 = ACPI_PM_PORT + 2;
pub const RESET_VALUE: u8 = 0x1;
/// SLP_TYP for S5, as the DSDT's `\_S5` package states it.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;

pub struct AcpiPm {
    stop: Arc<StopSignal>,
}

impl AcpiPm {
    pub fn new(stop: Arc<StopSignal>) -> Arc<Mutex<AcpiPm>> {
        Arc::new(Mutex::new(AcpiPm { stop }))
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE => {
                self.stop.request(StopReason::Guest(GuestExit::PoweredOff));
            }
            2 if value == RESET_VALUE => self.stop.request(StopReason::Guest(GuestExit::Rebooted)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let stop = Arc::new(StopSignal::new());
        let pm = AcpiPm::new(stop.clone());
        pm.lock().unwrap().write(0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        pm.lock().unwrap().write(0, &[(3 << 2) | SLP_EN]); // S3: ignored
        assert!(!stop.is_requested());
        pm.lock()
            .unwrap()
            .write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(
            stop.outcome(),
            Some(StopReason::Guest(GuestExit::PoweredOff))
        );
    }

    #[test]
    fn reset_register_reboots() {
        let stop = Arc::new(StopSignal::new());
        let pm = AcpiPm::new(stop.clone());
        pm.lock().unwrap().write(2, &[RESET_VALUE]);
        assert_eq!(stop.outcome(), Some(StopReason::Guest(GuestExit::Rebooted)));
    }
}
