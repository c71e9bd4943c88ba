//! The console: a 16550 UART (vm-superio's `Serial`) on the MMIO bus.
//!
//! Registers are byte-wide at consecutive addresses (`reg-shift = 0`,
//! `reg-io-width = 1` in device-tree terms). Accesses of any other width are
//! read as zero and dropped on write: the guest controls the width.

use std::io::{self, Read, Write};
use std::sync::{Mutex, Weak};
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::{EventFdTrigger, StateError};
use crate::bus::BusDevice;

/// The sink the guest's console output goes to.
pub type SerialOutput = Box<dyn Write + Send>;
/// The source the guest's console input comes from.
pub type SerialInput = Box<dyn Read + Send>;

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

/// The UART's registers and receive FIFO, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input not yet read by the guest (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// Saves the UART's state.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in a saved state, writing to `output`.
    pub fn restore(
        interrupt: EventFdTrigger,
        output: SerialOutput,
        saved: &SerialSnapshot,
    ) -> Result<Self, StateError> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor[0],
            baud_divisor_high: saved.baud_divisor[1],
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let serial =
            Serial::from_state(&state, interrupt, NoEvents, output).map_err(|e| StateError {
                device: "serial console",
                reason: format!("{e:?}"),
            })?;
        Ok(Self {
            serial,
            output_errors: 0,
        })
    }

    /// A UART that writes what the guest sends to `output` and raises
    /// `interrupt` when the guest driver should look at it.
    pub fn new(interrupt: EventFdTrigger, output: SerialOutput) -> Self {
        Self {
            serial: Serial::new(interrupt, output),
            output_errors: 0,
        }
    }

    /// Queues console input for the guest. Returns how many bytes fit in
    /// the receive FIFO (0 when it is full: try again once the guest read).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        // FullFifo and a failed interrupt both mean "not now".
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// How many guest writes could not be delivered to the output sink or
    /// failed to raise the interrupt.
    pub fn output_errors(&self) -> u64 {
        self.output_errors
    }
}

/// Feeds `input` to the UART on a thread of its own until `input` ends or
/// the device is dropped. When the guest does not drain its FIFO, the
/// thread waits rather than dropping bytes.
pub fn spawn_input_thread(
    device: Weak<Mutex<SerialDevice>>,
    mut input: SerialInput,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("dormouse-console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("serial console input ended: {e}");
                        return;
                    }
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let Some(device) = device.upgrade() else {
                        return;
                    };
                    let sent = device
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue_input(pending);
                    drop(device);
                    pending = &pending[sent..];
                    if !pending.is_empty() {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
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
    fn input_reaches_the_receive_buffer_without_loss() {
        use std::sync::Arc;

        let dev = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new().unwrap(),
            Box::new(Sink::default()),
        )));
        // More than the 64-byte FIFO holds: the thread must wait, not drop.
        let text: Vec<u8> = (0..200u8).map(|i| b'a' + i % 26).collect();
        let handle = spawn_input_thread(
            Arc::downgrade(&dev),
            Box::new(io::Cursor::new(text.clone())),
        )
        .unwrap();
        let mut received = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while received.len() < text.len() && std::time::Instant::now() < deadline {
            let mut d = dev.lock().unwrap();
            let mut lsr = [0u8];
            d.read(5, &mut lsr);
            if lsr[0] & 1 == 1 {
                let mut byte = [0u8];
                d.read(0, &mut byte);
                received.push(byte[0]);
            } else {
                drop(d);
                thread::sleep(Duration::from_millis(1));
            }
        }
        handle.join().unwrap();
        assert_eq!(received, text);
    }

    #[test]
    fn the_input_thread_ends_when_the_device_is_gone() {
        use std::sync::Arc;

        let dev = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new().unwrap(),
            Box::new(Sink::default()),
        )));
        let weak = Arc::downgrade(&dev);
        drop(dev);
        let handle = spawn_input_thread(weak, Box::new(io::repeat(b'x'))).unwrap();
        handle.join().unwrap();
    }

    #[test]
    fn save_and_restore_keep_registers_and_pending_input() {
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(Sink::default()));
        dev.write(3, &[0x80]); // DLAB on
        dev.write(0, &[0x0c]); // divisor low
        dev.write(3, &[0x03]); // DLAB off, 8N1
        dev.write(7, &[0x5a]); // scratch
        dev.enqueue_input(b"abc");
        let saved = dev.save();
        let mut back = SerialDevice::restore(
            EventFdTrigger::new().unwrap(),
            Box::new(Sink::default()),
            &saved,
        )
        .unwrap();
        assert_eq!(back.save(), saved);
        let mut b = [0u8];
        back.read(7, &mut b);
        assert_eq!(b, [0x5a]);
        for want in b"abc" {
            back.read(0, &mut b);
            assert_eq!(b[0], *want);
        }
    }

    #[test]
    fn an_oversized_saved_fifo_is_refused() {
        let mut saved =
            SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(Sink::default())).save();
        saved.in_buffer = vec![0; 65];
        assert!(SerialDevice::restore(
            EventFdTrigger::new().unwrap(),
            Box::new(Sink::default()),
            &saved
        )
        .is_err());
    }

    #[test]
    fn a_failing_sink_is_counted_not_fatal() {
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(Broken));
        dev.write(0, b"a");
        dev.write(0, b"b");
        assert_eq!(dev.output_errors(), 2);
    }
}
