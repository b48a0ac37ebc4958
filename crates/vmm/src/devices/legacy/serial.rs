//! A 16550A UART on port I/O, emulated by `vm-superio`, with its interrupt delivered through an
//! eventfd (a KVM irqfd when the machine has an in-kernel irqchip). COM1 is the guest console;
//! COM2 is cela's control channel (see `cela_guest`).
//!
//! Host → guest input goes through [`SerialInput`], which applies back-pressure: the UART's
//! receive FIFO holds 64 bytes and the writer waits until the guest has drained it.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use acpi_tables::{Aml, AmlSink, aml};
use vm_superio::serial::{Error as SerialError, SerialEvents, SerialState};
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{BusDevice, lock};
use crate::persist::PersistError;
use crate::persist::devices::{SerialSnapshot, refused};

/// The receive FIFO of a 16550A, in bytes.
const FIFO_SIZE: usize = 64;
/// The interrupt-enable bits a 16550A has (IER bits 0-3); the UART keeps only these.
const IER_VALID_BITS: u8 = 0x0f;

/// Raises the UART's interrupt line by signalling an eventfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Wakes a host writer blocked on a full receive FIFO when the guest reads from it.
#[derive(Debug, Default)]
pub struct InputSpace {
    generation: Mutex<u64>,
    drained: Condvar,
}

impl InputSpace {
    fn notify(&self) {
        *lock(&self.generation) += 1;
        self.drained.notify_all();
    }
}

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {
        self.notify();
    }
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        self.notify();
    }
}

type Inner = Uart<IrqTrigger, Arc<InputSpace>, Box<dyn Write + Send>>;

/// One UART: the bus device the vCPUs reach.
pub struct Serial {
    uart: Inner,
}

impl Serial {
    /// A UART whose transmitted bytes go to `out` and whose interrupt signals `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> (Arc<Mutex<Serial>>, SerialInput) {
        let space = Arc::new(InputSpace::default());
        let serial = Arc::new(Mutex::new(Serial {
            uart: Uart::with_events(IrqTrigger(irq), space.clone(), out),
        }));
        let input = SerialInput {
            serial: serial.clone(),
            space,
        };
        (serial, input)
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save(&self) -> SerialSnapshot {
        SerialSnapshot::from(self.uart.state())
    }

    /// Puts back a saved state (hostile: checked first), keeping this UART's interrupt line,
    /// input waiters and output. An interrupt the saved state has pending and enabled is
    /// raised again.
    pub fn restore(&mut self, s: &SerialSnapshot) -> Result<(), PersistError> {
        const DEVICE: &str = "the 16550A UART";
        if s.in_buffer.len() > FIFO_SIZE {
            return Err(refused(
                DEVICE,
                format!(
                    "{} bytes in the receive FIFO, which holds {FIFO_SIZE}",
                    s.in_buffer.len()
                ),
            ));
        }
        if s.interrupt_enable & !IER_VALID_BITS != 0 {
            return Err(refused(
                DEVICE,
                format!(
                    "interrupt enable register {:#04x} has bits a 16550A does not have",
                    s.interrupt_enable
                ),
            ));
        }
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(|e| {
            refused(
                DEVICE,
                format!("cannot duplicate its interrupt eventfd: {e}"),
            )
        })?;
        let events = self.uart.events().clone();
        let placeholder: Box<dyn Write + Send> = Box::new(io::sink());
        let mut uart =
            Uart::from_state(&SerialState::from(s), IrqTrigger(irq), events, placeholder)
                .map_err(|e| refused(DEVICE, e.to_string()))?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        // A host writer waiting for room looks again.
        self.uart.events().notify();
        Ok(())
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // An output error (the host side of the console went away) loses the byte, as
            // on a real line; the guest is not told.
            let _ = self.uart.write(off, value);
        }
    }
}

/// The host's handle for sending bytes to a UART's receive side.
#[derive(Clone)]
pub struct SerialInput {
    serial: Arc<Mutex<Serial>>,
    space: Arc<InputSpace>,
}

impl SerialInput {
    /// Queues all of `bytes` for the guest, waiting while the receive FIFO is full. Returns an
    /// error only if the interrupt cannot be raised.
    pub fn send(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let seen = *lock(&self.space.generation);
            let result = lock(&self.serial).uart.enqueue_raw_bytes(bytes);
            match result {
                Ok(n) => bytes = &bytes[n..],
                Err(SerialError::FullFifo) => {
                    let guard = lock(&self.space.generation);
                    // Bounded wait: a guest that never reads (no driver yet) must not wedge
                    // the host thread forever, it just retries.
                    let _ = self.space.drained.wait_timeout_while(
                        guard,
                        Duration::from_millis(200),
                        |g| *g == seen,
                    );
                }
                Err(SerialError::Trigger(e)) | Err(SerialError::IOError(e)) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The ACPI description of a 16550 at `port` with interrupt `gsi`: `\_SB.COMn`.
pub struct SerialAml {
    pub port: u16,
    pub gsi: u32,
    /// 0 for COM1, 1 for COM2.
    pub uid: u8,
}

impl Aml for SerialAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let name = format!("COM{}", self.uid + 1);
        let io = aml::IO::new(self.port, self.port, 1, 8);
        let irq = aml::Interrupt::new(true, true, false, false, self.gsi);
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                &aml::Name::new("_UID".into(), &self.uid),
                &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq])),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// A `Write` that appends to a shared buffer: lets tests (and the control channel's consumer)
/// read what the guest sent.
#[derive(Clone, Default)]
pub struct SharedBuffer(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u64 = 0;
    const RBR: u64 = 0;
    const IER: u64 = 1;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;

    fn read_reg(s: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        s.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn registers_and_fifo_survive_save_and_restore() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (serial, input) = Serial::new(irq, Box::new(io::sink()));
        input.send(b"xyz").unwrap();
        let saved = {
            let mut s = lock(&serial);
            s.write(LCR, &[0x80]); // DLAB: the divisor latch
            s.write(0, &[0x01]);
            s.write(1, &[0x00]);
            s.write(LCR, &[0x1b]);
            s.write(MCR, &[0x0b]);
            s.write(SCR, &[0x5a]);
            s.write(IER, &[0x01]);
            s.save()
        };
        let json = serde_json::to_string(&saved).unwrap();
        let saved: SerialSnapshot = serde_json::from_str(&json).unwrap();

        let out = SharedBuffer::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (fresh, _) = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        let mut s = lock(&fresh);
        s.restore(&saved).unwrap();
        // Data is waiting and its interrupt enabled: the line is raised again.
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read_reg(&mut s, LCR), 0x1b);
        assert_eq!(read_reg(&mut s, MCR), 0x0b);
        assert_eq!(read_reg(&mut s, SCR), 0x5a);
        assert_eq!(read_reg(&mut s, IER), 0x01);
        assert_eq!(read_reg(&mut s, LSR) & 1, 1, "data ready");
        assert_eq!(read_reg(&mut s, RBR), b'x');
        assert_eq!(read_reg(&mut s, RBR), b'y');
        assert_eq!(read_reg(&mut s, RBR), b'z');
        assert_eq!(read_reg(&mut s, LSR) & 1, 0);
        s.write(LCR, &[0x9b]);
        assert_eq!(read_reg(&mut s, 0), 0x01, "divisor low");
        s.write(LCR, &[0x1b]);
        // The output still goes where this UART's went.
        s.write(THR, b"!");
        assert_eq!(&*out.0.lock().unwrap(), b"!");
    }

    #[test]
    fn hostile_serial_states_are_refused() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (serial, _) = Serial::new(irq, Box::new(io::sink()));
        let mut s = lock(&serial);
        let good = s.save();
        let mut big = good.clone();
        big.in_buffer = vec![0; 65];
        let err = s.restore(&big).unwrap_err().to_string();
        assert!(err.contains("65 bytes in the receive FIFO"), "{err}");
        let mut ier = good.clone();
        ier.interrupt_enable = 0xf0;
        let err = s.restore(&ier).unwrap_err().to_string();
        assert!(err.contains("interrupt enable register 0xf0"), "{err}");
        // Refused states leave the UART as it was.
        assert_eq!(s.save(), good);
    }

    #[test]
    fn transmitted_bytes_reach_the_writer_and_raise_the_irq() {
        let out = SharedBuffer::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (serial, _) = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        let mut s = serial.lock().unwrap();
        s.write(IER, &[0x2]); // enable THR-empty interrupt
        for b in b"hi\n" {
            s.write(THR, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn input_is_queued_and_readable_by_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (serial, input) = Serial::new(irq, Box::new(io::sink()));
        input.send(b"ab").unwrap();
        let mut s = serial.lock().unwrap();
        let mut b = [0u8];
        s.read(LSR, &mut b);
        assert_eq!(b[0] & 1, 1, "data ready");
        s.read(RBR, &mut b);
        assert_eq!(b[0], b'a');
        s.read(RBR, &mut b);
        assert_eq!(b[0], b'b');
    }

    #[test]
    fn a_full_fifo_blocks_the_sender_until_the_guest_reads() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (serial, input) = Serial::new(irq, Box::new(io::sink()));
        let data: Vec<u8> = (0..100u8).collect();
        let sender = std::thread::spawn(move || input.send(&data));
        let mut received = Vec::new();
        while received.len() < 100 {
            let mut s = lock(&serial);
            let mut b = [0u8];
            s.read(LSR, &mut b);
            if b[0] & 1 == 1 {
                s.read(RBR, &mut b);
                received.push(b[0]);
            }
        }
        sender.join().unwrap().unwrap();
        assert_eq!(received, (0..100u8).collect::<Vec<_>>());
    }

    #[test]
    fn aml_describes_a_pnp0501_device() {
        let mut v = Vec::new();
        SerialAml {
            port: 0x2f8,
            gsi: 3,
            uid: 1,
        }
        .to_aml_bytes(&mut v);
        assert!(v.windows(4).any(|w| w == b"COM2"));
        assert!(v.windows(4).any(|w| w == b"_CRS"));
    }
}
