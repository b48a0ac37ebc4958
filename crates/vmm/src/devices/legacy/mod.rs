//! PC legacy devices on port I/O: 16550A serial ports and the i8042 keyboard controller (used
//! only for its CPU-reset line).

pub mod i8042;
pub mod serial;
