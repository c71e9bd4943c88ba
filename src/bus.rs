//! The MMIO bus: dispatches guest MMIO exits to devices by address range.
//!
//! Every device owns a half-open range `[base, base + len)` of guest physical
//! addresses. A vCPU thread that takes an MMIO exit calls [`MmioBus::read`] or
//! [`MmioBus::write`]; the bus finds the owner and hands it the offset into
//! its range.
//!
//! **Addresses no device owns** are defined behaviour, not an error: a read
//! returns all zero bytes and a write is dropped (the VMM counts both, see
//! [`MmioBus::unhandled_accesses`]). The guest is untrusted and can touch any
//! address; ending the VM on a stray access would let one bad driver probe
//! kill a session, and logging every access would let the guest flood the log.
//!
//! Lock order: the bus holds no lock of its own while dispatching; it takes
//! exactly one device mutex per access.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device that lives on the MMIO bus.
///
/// `offset` is relative to the device's base; `data.len()` is the access
/// width the guest used (1, 2, 4 or 8 bytes, guest controlled: a device must
/// accept any width without panicking).
pub trait BusDevice: Send {
    /// Handles a guest read: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of zero length was inserted.
    #[error("device range at {base:#x} has zero length: give the device a non-empty window")]
    ZeroLength {
        /// Base of the rejected range.
        base: u64,
    },
    /// The range runs past the end of the address space.
    #[error("device range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error(
        "device range [{base:#x}, +{len:#x}) overlaps the device at {other:#x}: \
         pick a free slot in the layout"
    )]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range it collides with.
        other: u64,
    },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Address-range to device map for MMIO exits.
#[derive(Default)]
pub struct MmioBus {
    devices: BTreeMap<u64, Entry>,
    unhandled: AtomicU64,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.devices.iter().map(|(b, e)| (*b, e.len)).collect();
        f.debug_struct("MmioBus").field("ranges", &ranges).finish()
    }
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` on the bus at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // The only candidates for overlap are the last range starting below
        // `end` (ranges on the bus never overlap each other).
        if let Some((&other, entry)) = self.devices.range(..end).next_back() {
            if other + entry.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, access_len: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must lie inside the device's window.
        let end = offset.checked_add(access_len as u64)?;
        (end <= entry.len).then_some((offset, &entry.device))
    }

    /// Dispatches a guest read at `addr`. Returns whether a device owned it;
    /// if none did, `data` is zero-filled.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0);
                self.note_unhandled(addr, data.len(), "read");
                false
            }
        }
    }

    /// Dispatches a guest write at `addr`. Returns whether a device owned
    /// it; if none did, the write is dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => {
                self.note_unhandled(addr, data.len(), "write");
                false
            }
        }
    }

    /// How many guest accesses hit no device since the bus was made.
    pub fn unhandled_accesses(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    fn note_unhandled(&self, addr: u64, len: usize, what: &str) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        // Log the first few only: the guest controls how often this happens.
        if n < 8 {
            log::warn!("guest MMIO {what} of {len} bytes at {addr:#x} hit no device");
        }
    }
}

/// Locks a device, recovering it if another thread panicked while holding
/// the lock: device state stays consistent per register access, and a
/// poisoned lock must not turn one bug into a panic on every vCPU.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset's low byte.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn bus_with(base: u64, len: u64) -> (MmioBus, Arc<Mutex<Recorder>>) {
        let mut bus = MmioBus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(base, len, dev.clone()).unwrap();
        (bus, dev)
    }

    #[test]
    fn dispatches_by_offset() {
        let (bus, dev) = bus_with(0x1000, 0x100);
        let mut data = [0xffu8; 4];
        assert!(bus.read(0x1010, &mut data));
        assert_eq!(data, [0x10; 4]);
        assert!(bus.write(0x10fc, &[1, 2, 3, 4]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0xfc, vec![1, 2, 3, 4])]);
        assert_eq!(bus.unhandled_accesses(), 0);
    }

    #[test]
    fn unowned_addresses_read_zero_and_drop_writes() {
        let (bus, dev) = bus_with(0x1000, 0x100);
        let mut data = [0xffu8; 8];
        assert!(!bus.read(0x0fff, &mut data));
        assert_eq!(data, [0; 8]);
        assert!(!bus.write(0x1100, &[1]));
        assert!(!bus.read(u64::MAX, &mut data));
        assert!(dev.lock().unwrap().writes.is_empty());
        assert_eq!(bus.unhandled_accesses(), 3);
    }

    #[test]
    fn access_straddling_the_end_is_unhandled() {
        let (bus, dev) = bus_with(0x1000, 0x100);
        assert!(!bus.write(0x10fe, &[1, 2, 3, 4]));
        let mut data = [0xffu8; 8];
        assert!(!bus.read(u64::MAX - 3, &mut data));
        assert!(dev.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let (mut bus, _) = bus_with(0x1000, 0x100);
        let other = Arc::new(Mutex::new(Recorder::default()));
        for (base, len) in [
            (0x1000, 0x100),
            (0xf00, 0x101),
            (0x10ff, 1),
            (0x800, 0x1000),
        ] {
            assert_eq!(
                bus.insert(base, len, other.clone()),
                Err(BusError::Overlap {
                    base,
                    len,
                    other: 0x1000
                })
            );
        }
        assert_eq!(
            bus.insert(0x5000, 0, other.clone()),
            Err(BusError::ZeroLength { base: 0x5000 })
        );
        assert_eq!(
            bus.insert(u64::MAX, 2, other.clone()),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        // Adjacent ranges on both sides are fine.
        bus.insert(0xf00, 0x100, other.clone()).unwrap();
        bus.insert(0x1100, 0x100, other).unwrap();
    }
}
