//! The console: a 16550 UART (vm-superio's `Serial`) on the MMIO bus.
//!
//! Registers are byte-wide at consecutive addresses (`reg-shift = 0`,
//! `reg-io-width = 1` in device-tree terms). Accesses of any other width are
//! read as zero and dropped on write: the guest controls the width.
//!
//! **Console output** never runs the embedder's sink on a vCPU thread: the
//! UART writes into a bounded ring ([`ConsoleWriter`], never blocks), and a
//! console output thread ([`ConsoleOutput`]) drains it into the sink. When
//! the ring is full, the oldest bytes are dropped and counted, so a slow
//! sink never stalls the guest or a pause.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::{EventFdTrigger, StateError};
use crate::bus::BusDevice;
use crate::seccomp::{self, SeccompError, ThreadFilters, ThreadKind};

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

/// Feeds `input` to the UART on a thread of its own (with the console
/// input filter of `filters`) until `input` ends or the device is dropped.
/// When the guest does not drain its FIFO, the thread waits rather than
/// dropping bytes.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
pub(crate) fn spawn_input_thread(
    device: Weak<Mutex<SerialDevice>>,
    mut input: SerialInput,
    filters: &Arc<ThreadFilters>,
) -> Result<thread::JoinHandle<()>, SeccompError> {
    let waker = filters.clone();
    seccomp::spawn_thread(
        "dormouse-console-in",
        ThreadKind::ConsoleInput,
        filters,
        move || {
            let mut buf = [0u8; 64];
            loop {
                let read = input.read(&mut buf);
                if seccomp::checkpoint(ThreadKind::ConsoleInput).is_some() {
                    waker.check();
                    return;
                }
                let n = match read {
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
        },
    )
}

/// How many console bytes wait for a slow sink before the oldest are
/// dropped.
pub const CONSOLE_BUFFER_BYTES: usize = 64 * 1024;

/// How much the output thread hands the sink at once.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
const CHUNK_BYTES: usize = 4096;

/// The console bytes between the UART and the sink.
#[derive(Debug, Default)]
struct Ring {
    state: Mutex<RingState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct RingState {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Bytes the UART ever wrote.
    accepted: u64,
    /// Of those, bytes written to the sink, refused by it, or dropped.
    done: u64,
    /// Bytes dropped because the ring was full.
    dropped: u64,
    /// Bytes the sink refused.
    sink_errors: u64,
    /// The owner went: the thread delivers what is left and ends.
    closed: bool,
}

impl RingState {
    /// Appends `buf`, dropping the oldest bytes if it does not fit.
    fn push(&mut self, buf: &[u8]) {
        self.accepted += buf.len() as u64;
        let keep = &buf[buf.len().saturating_sub(self.capacity)..];
        let over = (self.bytes.len() + keep.len()).saturating_sub(self.capacity);
        self.bytes.drain(..over.min(self.bytes.len()));
        let lost = (buf.len() - keep.len() + over) as u64;
        self.dropped += lost;
        self.done += lost;
        self.bytes.extend(keep);
    }
}

impl Ring {
    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the UART writes the guest's console bytes to: a bounded ring that
/// the console output thread drains. Writing never blocks on the sink.
#[derive(Debug)]
pub struct ConsoleWriter(Arc<Ring>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.0.lock();
        // The thread only waits on an empty ring: wake it (a system call)
        // only then, not for every byte.
        let was_empty = state.bytes.is_empty();
        state.push(buf);
        drop(state);
        if was_empty {
            self.0.changed.notify_all();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The output thread flushes the sink whenever it empties the ring.
        Ok(())
    }
}

/// The console output thread and the ring it drains. Dropping it lets the
/// thread deliver what is left (waiting a moment for it) and end.
#[derive(Debug)]
pub struct ConsoleOutput {
    ring: Arc<Ring>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ConsoleOutput {
    /// How long dropping waits for the sink to take what is left.
    const DROP_FLUSH: Duration = Duration::from_secs(1);

    /// Starts the thread (with the console output filter of `filters`)
    /// that writes what the returned [`ConsoleWriter`] receives to `sink`,
    /// keeping at most `capacity` bytes waiting.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) fn start(
        sink: SerialOutput,
        capacity: usize,
        filters: &Arc<ThreadFilters>,
    ) -> Result<(Self, ConsoleWriter), SeccompError> {
        let ring = Arc::new(Ring::default());
        ring.lock().capacity = capacity.max(1);
        let thread = {
            let (ring, waker) = (ring.clone(), filters.clone());
            seccomp::spawn_thread(
                "dormouse-console-out",
                ThreadKind::ConsoleOutput,
                filters,
                move || drain(&ring, sink, &waker),
            )?
        };
        let writer = ConsoleWriter(ring.clone());
        Ok((
            Self {
                ring,
                thread: Some(thread),
            },
            writer,
        ))
    }

    /// Waits up to `timeout` for the sink to have taken every byte written
    /// so far. Returns whether it has.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.ring.lock();
        let target = state.accepted;
        while state.done < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return false;
            }
            state = self
                .ring
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Console bytes dropped because the sink was slower than the guest.
    pub fn dropped(&self) -> u64 {
        self.ring.lock().dropped
    }

    /// Console bytes the sink refused (a write error).
    pub fn sink_errors(&self) -> u64 {
        self.ring.lock().sink_errors
    }
}

impl Drop for ConsoleOutput {
    fn drop(&mut self) {
        self.ring.lock().closed = true;
        self.ring.changed.notify_all();
        self.flush(Self::DROP_FLUSH);
        // A sink still stuck in a write keeps its thread: it ends when the
        // write returns.
        if let Some(t) = self.thread.take_if(|t| t.is_finished()) {
            let _ = t.join();
        }
    }
}

/// The console output thread: sink writes happen here and nowhere else.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
fn drain(ring: &Ring, mut sink: SerialOutput, filters: &ThreadFilters) {
    let mut chunk = Vec::with_capacity(CHUNK_BYTES);
    loop {
        let emptied = {
            let mut state = ring.lock();
            while state.bytes.is_empty() && !state.closed {
                state = ring.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.bytes.is_empty() {
                break;
            }
            let n = state.bytes.len().min(CHUNK_BYTES);
            chunk.clear();
            chunk.extend(state.bytes.drain(..n));
            state.bytes.is_empty()
        };
        let mut result = sink.write_all(&chunk);
        if result.is_ok() && emptied {
            result = sink.flush();
        }
        {
            let mut state = ring.lock();
            state.done += chunk.len() as u64;
            if let Err(e) = result {
                if state.sink_errors == 0 {
                    log::warn!("serial console output: {e}; further errors are only counted");
                }
                state.sink_errors += chunk.len() as u64;
            }
        }
        ring.changed.notify_all();
        if seccomp::checkpoint(ThreadKind::ConsoleOutput).is_some() {
            filters.check();
            return;
        }
    }
    let _ = sink.flush();
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
            &ThreadFilters::disabled(),
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
        let handle =
            spawn_input_thread(weak, Box::new(io::repeat(b'x')), &ThreadFilters::disabled())
                .unwrap();
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

    /// A sink that tells when a write starts and waits for a go before
    /// taking it.
    struct Gate {
        entered: std::sync::mpsc::Sender<()>,
        go: std::sync::mpsc::Receiver<()>,
        seen: Sink,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.go.recv();
            self.seen.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console(sink: SerialOutput, capacity: usize) -> (ConsoleOutput, ConsoleWriter) {
        ConsoleOutput::start(sink, capacity, &ThreadFilters::disabled()).unwrap()
    }

    #[test]
    fn console_bytes_reach_the_sink_through_the_output_thread() {
        let sink = Sink::default();
        let (out, writer) = console(Box::new(sink.clone()), CONSOLE_BUFFER_BYTES);
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(writer));
        let text: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for b in &text {
            dev.write(0, &[*b]);
        }
        assert!(out.flush(Duration::from_secs(10)));
        assert_eq!(*sink.0.lock().unwrap(), text);
        assert_eq!((out.dropped(), out.sink_errors()), (0, 0));
    }

    #[test]
    fn a_stuck_sink_never_blocks_the_uart_and_the_oldest_bytes_are_dropped() {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let seen = Sink::default();
        let gate = Gate {
            entered: entered_tx,
            go: go_rx,
            seen: seen.clone(),
        };
        let (out, mut writer) = console(Box::new(gate), 16);
        writer.write_all(b"<").unwrap();
        // The thread holds "<" and is stuck in the sink.
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        let burst: Vec<u8> = (0..40u8).map(|i| b'A' + i).collect();
        writer.write_all(&burst).unwrap();
        writer.write_all(b"!").unwrap();
        assert_eq!(out.dropped(), 25, "41 bytes into a 16-byte ring");
        assert!(!out.flush(Duration::from_millis(50)), "the sink is stuck");
        go.send(()).unwrap();
        go.send(()).unwrap();
        assert!(out.flush(Duration::from_secs(10)));
        let mut want = b"<".to_vec();
        want.extend_from_slice(&burst[25..]);
        want.push(b'!');
        assert_eq!(*seen.0.lock().unwrap(), want, "the newest bytes are kept");
    }

    #[test]
    fn a_write_larger_than_the_ring_keeps_its_tail() {
        let mut state = RingState {
            capacity: 4,
            ..RingState::default()
        };
        state.push(b"ab");
        state.push(b"0123456789");
        assert_eq!(state.bytes.iter().copied().collect::<Vec<_>>(), b"6789");
        assert_eq!((state.accepted, state.dropped, state.done), (12, 8, 8));
    }

    #[test]
    fn console_sink_errors_are_counted_per_byte() {
        let (out, mut writer) = console(Box::new(Broken), 64);
        writer.write_all(b"abc").unwrap();
        assert!(out.flush(Duration::from_secs(10)));
        assert_eq!(out.sink_errors(), 3);
        assert_eq!(out.dropped(), 0);
    }

    #[test]
    fn dropping_the_console_delivers_what_is_left() {
        let sink = Sink::default();
        let (out, mut writer) = console(Box::new(sink.clone()), 1024);
        writer.write_all(b"last words").unwrap();
        drop(out);
        assert_eq!(&*sink.0.lock().unwrap(), b"last words");
    }
}
