//! Guest memory for a fuzz target, with a copy of what the driver last saw
//! so that every byte the device changes can be checked.

use std::cell::RefCell;

use dormouse::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Page size of the dirty bitmap (vm-memory uses the host page size).
const PAGE: usize = 4096;
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
/// After each pass only the pages the dirty bitmap marked in that pass
/// are compared (nothing under test reads the bitmap, so the harness
/// takes and resets it); every page is compared once more when the guest
/// is dropped: a page that changed since it was last taken as seen
/// changed without being marked dirty.
#[derive(Debug)]
pub struct Guest {
    /// The memory the device sees.
    pub mem: GuestMemoryMmap,
    /// What the memory held when the driver last looked (after its own
    /// writes and after the last [`check`](Self::check)).
    shadow: Vec<u8>,
    /// Every page the bitmap marked since the guest was made, one bit per
    /// page (the pages to zero when the guest is dropped).
    marked: Vec<u64>,
    /// The pages the bitmap marked in the last pass (see
    /// [`check`](Self::check)).
    fresh: Vec<u64>,
    /// The pages [`check`](Self::check) last took as seen, as they were
    /// before (what the device could read during that pass).
    before: Vec<(usize, Box<[u8; PAGE]>)>,
    /// `before`'s spare page buffers.
    spare: Vec<Box<[u8; PAGE]>>,
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
            fresh: marked.clone(),
            marked,
            before: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Takes the pages the dirty bitmap marked since the last call into
    /// `fresh` (and adds them to `marked`).
    fn collect_marked(&mut self) {
        let region = self.mem.find_region(GuestAddress(0)).expect("one region");
        let words = std::ops::Deref::deref(region).bitmap().get_and_reset();
        // `fresh` has `marked`'s length from `new` on.
        self.fresh.fill(0);
        for ((m, f), w) in self.marked.iter_mut().zip(&mut self.fresh).zip(words) {
            *m |= w;
            *f = w;
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

    /// Checks every byte that changed in a page the dirty bitmap marked
    /// since the last look: it must lie in `allowed` (device-writable
    /// ranges). Then takes those pages' new contents as seen, keeping
    /// their old contents for [`read_before`](Self::read_before).
    ///
    /// A page changed without being marked is found when the guest is
    /// dropped (every other change was taken as seen here). Panics on a
    /// violation.
    pub fn check(&mut self, allowed: &[Range]) {
        self.collect_marked();
        let allowed = merged(allowed);
        let Guest {
            mem,
            shadow,
            fresh,
            before,
            spare,
            ..
        } = self;
        spare.extend(before.drain(..).map(|(_, b)| b));
        let now = host_view(mem, shadow.len());
        for page in marked_pages(fresh) {
            let base = page * PAGE;
            let end = (base + PAGE).min(shadow.len());
            let (now, was) = (&now[base..end], &mut shadow[base..end]);
            if now == was {
                continue;
            }
            // Only the stretches of the page outside every allowed range
            // must be unchanged: compared as slices, bytes only to name
            // the first change.
            for (s, e) in gaps(&allowed, base as u64, end as u64) {
                let (s, e) = ((s as usize) - base, (e as usize) - base);
                if now[s..e] == was[s..e] {
                    continue;
                }
                let i = (s..e).find(|&i| now[i] != was[i]).expect("the slices differ");
                panic!(
                    "the device wrote {:#x} ({:#04x} -> {:#04x}), outside every \
                     device-writable buffer and used ring the driver gave it",
                    base + i,
                    was[i],
                    now[i]
                );
            }
            let mut old = spare.pop().unwrap_or_else(|| Box::new([0; PAGE]));
            old[..was.len()].copy_from_slice(was);
            before.push((page, old));
            was.copy_from_slice(now);
        }
    }

    /// A driver read of memory as it was before the last
    /// [`check`](Self::check)'s pass (what the device could read during
    /// it, unless it changed it first).
    pub fn read_before(&self, addr: u64, len: usize) -> Vec<u8> {
        let start = usize::try_from(addr).expect("an address inside guest memory");
        let mut out = self.shadow[start..start + len].to_vec();
        for (page, old) in &self.before {
            let (base, end) = (page * PAGE, (page * PAGE + PAGE).min(self.shadow.len()));
            let (s, e) = (base.max(start), end.min(start + len));
            if s < e {
                out[s - start..e - start].copy_from_slice(&old[s - base..e - base]);
            }
        }
        out
    }

    /// Memory as the device sees it now.
    pub fn view(&self) -> &[u8] {
        host_view(&self.mem, self.shadow.len())
    }

    /// Drops the driver's view: after this, whatever the memory holds is
    /// taken as seen (e.g. when a device is replaced and nothing more is
    /// checked about the old one).
    /// Only pages marked dirty since the last look are read: the others
    /// may not have changed (the drop checks that).
    pub fn resync(&mut self) {
        self.collect_marked();
        let Guest {
            mem, shadow, fresh, ..
        } = self;
        let now = host_view(mem, shadow.len());
        for page in marked_pages(fresh) {
            let base = page * PAGE;
            let end = (base + PAGE).min(shadow.len());
            shadow[base..end].copy_from_slice(&now[base..end]);
        }
    }
}

/// `ranges` sorted, without empty ones, overlapping and touching ones
/// joined.
fn merged(ranges: &[Range]) -> Vec<Range> {
    let mut sorted: Vec<Range> = ranges.iter().copied().filter(|(s, e)| s < e).collect();
    sorted.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The stretches of `[start, end)` outside every range of `merged` (as
/// [`merged`] returns them).
fn gaps(merged: &[Range], start: u64, end: u64) -> impl Iterator<Item = Range> + '_ {
    let mut at = start;
    let mut i = merged.partition_point(|&(_, e)| e <= at);
    std::iter::from_fn(move || {
        while at < end {
            match merged.get(i) {
                Some(&(s, e)) if s <= at => {
                    at = e.min(end);
                    i += 1;
                }
                next => {
                    let stop = next.map_or(end, |&(s, _)| s.min(end));
                    let gap = (at, stop);
                    at = stop;
                    return Some(gap);
                }
            }
        }
        None
    })
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
    /// Every page must be as the last [`check`](Self::check) took it,
    /// except those marked dirty since: a page that changed otherwise
    /// changed without being marked dirty.
    ///
    /// Then the memory is zeroed where it was written, its dirty bitmap
    /// cleared, and it is kept for the next [`Guest::new`].
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        self.collect_marked();
        let fresh = &self.fresh;
        let is_fresh = |page: usize| fresh[page / 64] >> (page % 64) & 1 == 1;
        let now = host_view(&self.mem, self.shadow.len());
        for (page, (now, was)) in now.chunks(PAGE).zip(self.shadow.chunks(PAGE)).enumerate() {
            assert!(
                is_fresh(page) || now == was,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_what_no_range_covers() {
        let m = merged(&[(30, 40), (10, 20), (15, 25), (25, 28), (50, 50)]);
        assert_eq!(m, vec![(10, 28), (30, 40)]);
        let g: Vec<Range> = gaps(&m, 0, 100).collect();
        assert_eq!(g, vec![(0, 10), (28, 30), (40, 100)]);
        let g: Vec<Range> = gaps(&m, 12, 35).collect();
        assert_eq!(g, vec![(28, 30)]);
        assert_eq!(gaps(&m, 10, 28).count(), 0);
        assert_eq!(gaps(&[(0, u64::MAX)], 0, 4096).count(), 0);
        assert_eq!(gaps(&[], 5, 9).collect::<Vec<_>>(), vec![(5, 9)]);
    }

    /// What a device would do: write through vm-memory (marking pages).
    fn device_write(g: &Guest, addr: u64, data: &[u8]) {
        g.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn writes_inside_allowed_ranges_pass_and_are_readable_before() {
        let mut g = Guest::new(4 * PAGE);
        g.write(100, &[1; 8]);
        g.check(&[]);
        device_write(&g, 100, &[2; 8]);
        device_write(&g, PAGE as u64 + 7, &[3; 4000]);
        g.check(&[(96, 110), (PAGE as u64, 2 * PAGE as u64)]);
        assert_eq!(g.read_before(98, 4), vec![0, 0, 1, 1]);
        assert_eq!(g.read(98, 4), vec![0, 0, 2, 2]);
        assert_eq!(g.read_before(PAGE as u64 + 6, 2), vec![0, 0]);
        // Nothing changed in this pass: before is now.
        g.check(&[]);
        assert_eq!(g.read_before(98, 4), vec![0, 0, 2, 2]);
    }

    #[test]
    #[should_panic(expected = "the device wrote 0x1010 (0x00 -> 0x09)")]
    fn a_write_outside_every_allowed_range_is_found() {
        let mut g = Guest::new(4 * PAGE);
        device_write(&g, PAGE as u64 + 8, &[9; 16]);
        g.check(&[(PAGE as u64, PAGE as u64 + 16)]);
    }

    #[test]
    #[should_panic(expected = "without marking it dirty")]
    fn a_change_without_a_dirty_mark_is_found_at_drop() {
        let mut g = Guest::new(4 * PAGE);
        device_write(&g, 5, &[1]);
        g.check(&[(0, 8)]);
        // Changed behind the bitmap's back, in a page checked before.
        let ptr = g.mem.get_host_address(GuestAddress(6)).unwrap();
        // SAFETY: address 6 lies inside the guest's 16 KiB mapping, which
        // `g` keeps alive; nothing else accesses it now.
        unsafe { ptr.write_volatile(7) };
        g.check(&[]);
        drop(g);
    }
}
