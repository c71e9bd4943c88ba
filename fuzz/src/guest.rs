//! Guest memory for a fuzz target, with a copy of what the driver last saw
//! so that every byte the device changes can be checked.

use dormouse::memory::GuestMemoryMmap;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Page size of the dirty bitmap (vm-memory uses the host page size).
const PAGE: usize = 4096;

/// A half-open range of guest addresses `[start, end)`.
pub type Range = (u64, u64);

/// Guest memory at address 0 and the driver's copy of it.
#[derive(Debug)]
pub struct Guest {
    /// The memory the device sees.
    pub mem: GuestMemoryMmap,
    /// What the memory held when the driver last looked (after its own
    /// writes and after the last [`check`](Self::check)).
    shadow: Vec<u8>,
    /// Reused buffer for reading the memory back.
    now: Vec<u8>,
}

impl Guest {
    /// `size` bytes of zeroed guest memory at address 0.
    pub fn new(size: usize) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
            .expect("mapping fuzz guest memory");
        Self {
            mem,
            shadow: vec![0; size],
            now: vec![0; size],
        }
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.shadow.len() as u64
    }

    /// A driver write (allowed anywhere inside memory; clipped at its end).
    pub fn write(&mut self, addr: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(addr) else {
            return;
        };
        let Some(room) = self.shadow.len().checked_sub(start) else {
            return;
        };
        let data = &data[..data.len().min(room)];
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("driver write inside guest memory");
        self.shadow[start..start + data.len()].copy_from_slice(data);
    }

    /// A driver write of a plain value.
    pub fn write_obj<T: vm_memory::ByteValued>(&mut self, addr: u64, value: T) {
        self.write(addr, value.as_slice());
    }

    /// A driver read.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("driver read inside guest memory");
        buf
    }

    /// A driver read of a plain value.
    pub fn read_obj<T: vm_memory::ByteValued>(&self, addr: u64) -> T {
        self.mem
            .read_obj(GuestAddress(addr))
            .expect("driver read inside guest memory")
    }

    /// Checks every byte that changed since the last look against
    /// `allowed` (device-writable ranges), and that its page is marked
    /// dirty; then takes the new contents as seen. Panics on a violation.
    pub fn check(&mut self, allowed: &[Range]) {
        if self.host_view() == self.shadow.as_slice() {
            return;
        }
        self.mem
            .read_slice(&mut self.now, GuestAddress(0))
            .expect("reading guest memory back");
        let region = self.mem.find_region(GuestAddress(0)).expect("one region");
        let bitmap = region.bitmap();
        for (page, (now, was)) in self
            .now
            .chunks(PAGE)
            .zip(self.shadow.chunks(PAGE))
            .enumerate()
        {
            if now == was {
                continue;
            }
            let base = page * PAGE;
            assert!(
                bitmap.dirty_at(base),
                "the device changed page {base:#x} without marking it dirty"
            );
            for (i, (a, b)) in now.iter().zip(was).enumerate() {
                if a == b {
                    continue;
                }
                let addr = (base + i) as u64;
                assert!(
                    allowed.iter().any(|&(s, e)| s <= addr && addr < e),
                    "the device wrote {addr:#x} ({b:#04x} -> {a:#04x}), outside every \
                     device-writable buffer and used ring the driver gave it"
                );
            }
        }
        std::mem::swap(&mut self.now, &mut self.shadow);
    }

    /// The whole memory as bytes, to compare without copying.
    fn host_view(&self) -> &[u8] {
        let ptr = self
            .mem
            .get_host_address(GuestAddress(0))
            .expect("guest memory starts at 0");
        // SAFETY: the memory is one mapping of `shadow.len()` bytes at
        // address 0, alive as long as `self.mem`, which the returned slice
        // borrows. Nothing writes it while the slice lives: devices write
        // guest memory only on this thread, inside the event loop, and the
        // slice is dropped before the loop runs again.
        unsafe { std::slice::from_raw_parts(ptr, self.shadow.len()) }
    }

    /// Drops the driver's view: after this, whatever the memory holds is
    /// taken as seen (e.g. when a device is replaced and nothing more is
    /// checked about the old one).
    pub fn resync(&mut self) {
        self.mem
            .read_slice(&mut self.shadow, GuestAddress(0))
            .expect("reading guest memory back");
    }
}
