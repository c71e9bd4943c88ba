//! The console: a 16550 UART (vm-superio's `Serial`) on the MMIO bus.
//!
//! Registers are byte-wide at consecutive addresses (`reg-shift = 0`,
//! `reg-io-width = 1` in device-tree terms). Accesses of any other width are
//! read as zero and dropped on write: the guest controls the width.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// The sink the guest's console output goes to.
pub type SerialOutput = Box<dyn Write + Send>;

/// A 16550 UART wired to an output sink and an interrupt trigger.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, SerialOutput>,
    /// Write errors of the sink are counted, not fatal: the guest keeps
    /// running if whoever reads its console went away.
    output_errors: u64,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("output_errors", &self.output_errors)
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART that writes what the guest sends to `output` and raises
    /// `interrupt` when the guest driver should look at it.
    pub fn new(interrupt: EventFdTrigger, output: SerialOutput) -> Self {
        Self {
            serial: Serial::new(interrupt, output),
            output_errors: 0,
        }
    }

    /// How many guest writes could not be delivered to the output sink or
    /// failed to raise the interrupt.
    pub fn output_errors(&self) -> u64 {
        self.output_errors
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.serial.read(offset),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [byte]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.serial.write(offset, *byte) {
            if self.output_errors == 0 {
                log::warn!("serial console: {e:?}; further errors are only counted");
            }
            self.output_errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_sink() {
        let sink = Sink::default();
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn odd_widths_and_offsets_are_harmless() {
        let sink = Sink::default();
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(sink.clone()));
        dev.write(0, b"xy");
        dev.write(0x1_0000_0000, b"z");
        let mut wide = [0xffu8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        let mut byte = [0xffu8];
        dev.read(u64::MAX, &mut byte);
        assert_eq!(byte, [0]);
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[test]
    fn line_status_says_transmitter_empty() {
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(Sink::default()));
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "THR empty and transmitter idle");
    }

    #[test]
    fn a_failing_sink_is_counted_not_fatal() {
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(Broken));
        dev.write(0, b"a");
        dev.write(0, b"b");
        assert_eq!(dev.output_errors(), 2);
    }
}
