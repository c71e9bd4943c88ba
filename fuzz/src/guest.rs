//! Guest memory for a fuzz target, with a copy of what the driver last saw
//! so that every byte the device changes can be checked.

use std::cell::RefCell;

use dormouse::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Page size of the dirty bitmap (vm-memory uses the host page size).
const PAGE: usize = 4096;
/// Bytes compared at once before looking at single bytes.
const LINE: usize = 64;
/// Guests kept for reuse: mapping and first touching fresh memory for
/// every input cost more than the input itself.
const POOL_SIZE: usize = 2;

thread_local! {
    /// Memory and shadow of dropped guests, all zero and clean.
    static POOL: RefCell<Vec<(GuestMemoryMmap, Vec<u8>)>> = const { RefCell::new(Vec::new()) };
}

/// A half-open range of guest addresses `[start, end)`.
pub type Range = (u64, u64);

/// Guest memory at address 0 and the driver's copy of it.
///
/// Only pages ever marked in the dirty bitmap are compared after each
/// pass (the bitmap's bits are collected into [`Guest::marked`], which
/// only grows; nothing under test reads the bitmap); the rest are
/// compared once, when the guest is dropped: a page that changed there
/// changed without being marked dirty.
#[derive(Debug)]
pub struct Guest {
    /// The memory the device sees.
    pub mem: GuestMemoryMmap,
    /// What the memory held when the driver last looked (after its own
    /// writes and after the last [`check`](Self::check)).
    shadow: Vec<u8>,
    /// Every page the bitmap marked since the guest was made, one bit per
    /// page.
    marked: Vec<u64>,
}

impl Guest {
    /// `size` bytes of zeroed guest memory at address 0.
    /// (A dropped guest's memory when one of that size is kept: it is all
    /// zero again and nothing is marked dirty, as in a fresh mapping.)
    pub fn new(size: usize) -> Self {
        let reused = POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            let at = pool.iter().position(|(_, shadow)| shadow.len() == size)?;
            Some(pool.swap_remove(at))
        });
        let (mem, shadow) = reused.unwrap_or_else(|| {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
                .expect("mapping fuzz guest memory");
            (mem, vec![0; size])
        });
        let marked = vec![0; size.div_ceil(PAGE * 64)];
        Self {
            mem,
            shadow,
            marked,
        }
    }

    /// Moves what the dirty bitmap marked into [`Guest::marked`] and
    /// returns it.
    fn collect_marked(&mut self) -> &[u64] {
        let region = self.mem.find_region(GuestAddress(0)).expect("one region");
        let words = std::ops::Deref::deref(region).bitmap().get_and_reset();
        for (m, w) in self.marked.iter_mut().zip(words) {
            *m |= w;
        }
        &self.marked
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

    /// Checks every byte that changed since the last look in a page marked
    /// dirty against `allowed` (device-writable ranges); then takes the new
    /// contents as seen. Pages not marked dirty are checked when the guest
    /// is dropped. Panics on a violation.
    pub fn check(&mut self, allowed: &[Range]) {
        self.collect_marked();
        let Guest {
            mem,
            shadow,
            marked,
        } = self;
        let now = host_view(mem, shadow.len());
        for page in marked_pages(marked) {
            let base = page * PAGE;
            let end = (base + PAGE).min(shadow.len());
            let (now, was) = (&now[base..end], &mut shadow[base..end]);
            if now == was {
                continue;
            }
            // Whole lines first (a slice compare), bytes only where a line
            // changed.
            for (line, (now, was)) in now.chunks(LINE).zip(was.chunks(LINE)).enumerate() {
                if now == was {
                    continue;
                }
                for (i, (a, b)) in now.iter().zip(was).enumerate() {
                    if a == b {
                        continue;
                    }
                    let addr = (base + line * LINE + i) as u64;
                    assert!(
                        allowed.iter().any(|&(s, e)| s <= addr && addr < e),
                        "the device wrote {addr:#x} ({b:#04x} -> {a:#04x}), outside every \
                         device-writable buffer and used ring the driver gave it"
                    );
                }
            }
            was.copy_from_slice(now);
        }
    }

    /// Drops the driver's view: after this, whatever the memory holds is
    /// taken as seen (e.g. when a device is replaced and nothing more is
    /// checked about the old one).
    /// Only pages marked dirty are read: the others may not have changed
    /// (the drop checks that).
    pub fn resync(&mut self) {
        self.collect_marked();
        let Guest {
            mem,
            shadow,
            marked,
        } = self;
        let now = host_view(mem, shadow.len());
        for page in marked_pages(marked) {
            let base = page * PAGE;
            let end = (base + PAGE).min(shadow.len());
            shadow[base..end].copy_from_slice(&now[base..end]);
        }
    }
}

/// The pages whose bits are set in `marked`.
fn marked_pages(marked: &[u64]) -> impl Iterator<Item = usize> + '_ {
    marked.iter().enumerate().flat_map(|(w, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let bit = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(w * 64 + bit)
        })
    })
}

impl Drop for Guest {
    /// The pages [`check`](Self::check) skipped: none may have changed,
    /// since none was marked dirty.
    ///
    /// Then the memory is zeroed where it was written, its dirty bitmap
    /// cleared, and it is kept for the next [`Guest::new`].
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        self.collect_marked();
        let marked = &self.marked;
        let is_marked = |page: usize| marked[page / 64] >> (page % 64) & 1 == 1;
        let now = host_view(&self.mem, self.shadow.len());
        for (page, (now, was)) in now.chunks(PAGE).zip(self.shadow.chunks(PAGE)).enumerate() {
            assert!(
                is_marked(page) || now == was,
                "the device changed page {:#x} without marking it dirty",
                page * PAGE
            );
        }
        // Every page that is not zero was marked (just checked, and only
        // writes mark pages): zero those, then clear what zeroing marked.
        let zero = [0u8; PAGE];
        for page in marked_pages(&self.marked) {
            let base = page * PAGE;
            let end = (base + PAGE).min(self.shadow.len());
            self.mem
                .write_slice(&zero[..end - base], GuestAddress(base as u64))
                .expect("zeroing guest memory");
            self.shadow[base..end].fill(0);
        }
        let region = self.mem.find_region(GuestAddress(0)).expect("one region");
        std::ops::Deref::deref(region).bitmap().reset();
        let mem = std::mem::take(&mut self.mem);
        let shadow = std::mem::take(&mut self.shadow);
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_SIZE {
                pool.push((mem, shadow));
            }
        });
    }
}

/// The first `len` bytes of `mem` (one mapping at address 0), to compare
/// without copying.
fn host_view(mem: &GuestMemoryMmap, len: usize) -> &[u8] {
    let ptr = mem
        .get_host_address(GuestAddress(0))
        .expect("guest memory starts at 0");
    // SAFETY: `mem` is one mapping of `len` bytes at address 0 (`Guest`
    // maps exactly its shadow's length), alive as long as `mem`, which the
    // returned slice borrows. Nothing writes it while the slice lives:
    // devices write guest memory only on this thread, inside the event
    // loop, and the slice is dropped before the loop runs again.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}
