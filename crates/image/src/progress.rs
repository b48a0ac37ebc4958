//! Progress of pulls and imports, shown with cela's shared [`Progress`] display (byte bars on
//! stderr when it is a terminal; the caller picks [`Progress::hidden`] otherwise).

use std::io::{self, Read, Write};

pub use cela_assets::{Progress, Step, StepEvent};

/// Reports bytes read through it on a step's bar.
pub(crate) struct Counting<'a, R> {
    pub(crate) inner: R,
    pub(crate) step: &'a Step,
    pub(crate) done: u64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        self.step.set_bytes(self.done);
        Ok(n)
    }
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.done += n as u64;
        self.step.set_bytes(self.done);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
