//! Dirty-page tracking: which guest pages changed since the last snapshot.
//!
//! Two sources, OR'ed together, so that nothing written is ever missing
//! from a diff snapshot:
//!
//! - **KVM's dirty log** for writes by the guest's vCPUs (and by KVM itself,
//!   e.g. the vGIC's pending tables). Memory slots carry
//!   `KVM_MEM_LOG_DIRTY_PAGES`, with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
//!   enabled: `KVM_GET_DIRTY_LOG` only reads the log and `KVM_CLEAR_DIRTY_LOG`
//!   re-protects exactly the pages harvested, in chunks. Without
//!   `INITIALLY_SET`, a new slot has no stage-2 mappings to protect, so
//!   turning tracking on costs nothing at build or restore.
//! - **The VMM's own bitmap**: every device write into guest memory goes
//!   through vm-memory, whose `AtomicBitmap` marks the page (virtio-blk reads,
//!   vsock and net receive buffers, used rings).
//!
//! A harvest is taken while the VM is paused, which makes it exact.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::arch::aarch64::layout::PAGE_SIZE;
use crate::memory::GuestMemoryMmap;

mod ioctls {
    use kvm_bindings::kvm_clear_dirty_log;
    use vmm_sys_util::ioctl_iowr_nr;

    /// The KVM ioctl type.
    const KVMIO: u32 = 0xAE;
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}
use ioctls::KVM_CLEAR_DIRTY_LOG;

/// Pages cleared per KVM_CLEAR_DIRTY_LOG: 1 GiB of 4 KiB pages, so that no
/// single call holds KVM's MMU lock for long.
const CLEAR_CHUNK_PAGES: u64 = 1 << 18;

/// Errors from dirty-page tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The kernel lacks manual dirty-log protection.
    #[error(
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 could not be enabled: dirty tracking needs \
         Linux 5.8 or later"
    )]
    EnableManualProtect(#[source] kvm_ioctls::Error),
    /// KVM_GET_DIRTY_LOG failed.
    #[error("KVM_GET_DIRTY_LOG failed for memory slot {slot}")]
    GetLog {
        /// The slot.
        slot: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The dirty ring could not be enabled.
    #[error("KVM refused the dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL / _WITH_BITMAP)")]
    EnableRing(#[source] kvm_ioctls::Error),
    /// A vCPU's dirty ring could not be mapped.
    #[error("could not map a vCPU's dirty ring")]
    MapRing(#[source] std::io::Error),
    /// KVM_RESET_DIRTY_RINGS failed.
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    ResetRings(#[source] std::io::Error),
    /// KVM_CLEAR_DIRTY_LOG failed.
    #[error("KVM_CLEAR_DIRTY_LOG failed for memory slot {slot}")]
    ClearLog {
        /// The slot.
        slot: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Turns on manual dirty-log protection for `vm`; must come before the
/// memory slots are registered with `KVM_MEM_LOG_DIRTY_PAGES`.
pub fn enable(vm: &VmFd) -> Result<(), DirtyError> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(DirtyError::EnableManualProtect)
}

/// The pages of one memory region that changed, one bit per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The region's number of pages.
    pub pages: u64,
    /// Bit `p % 64` of word `p / 64` is set when page `p` changed.
    pub words: Vec<u64>,
}

impl DirtyBitmap {
    /// An all-clean bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
        Self {
            pages,
            words: vec![0; words],
        }
    }

    /// ORs `other` (as KVM or vm-memory lay bits out) into this bitmap.
    /// Bits past `pages` are ignored.
    pub fn or_words(&mut self, other: &[u64]) {
        for (w, o) in self.words.iter_mut().zip(other) {
            *w |= o;
        }
        self.mask_tail();
    }

    fn mask_tail(&mut self) {
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// Marks page `page`.
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            let (w, b) = ((page / 64) as usize, page % 64);
            self.words[w] |= 1 << b;
        }
    }

    /// Whether page `page` changed.
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// How many pages changed.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The changed pages as runs of `(first page, page count)`, in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, &word) in self.words.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let bit = u64::from(w.trailing_zeros());
                let page = i as u64 * 64 + bit;
                match runs.last_mut() {
                    Some((start, len)) if *start + *len == page => *len += 1,
                    _ => runs.push((page, 1)),
                }
                w &= w - 1;
            }
        }
        runs
    }
}

/// Reads and clears the VMM's own record of the pages it wrote, per region.
pub fn harvest_vmm(memory: &GuestMemoryMmap) -> Vec<DirtyBitmap> {
    memory
        .iter()
        .map(|region| {
            let mut bitmap = DirtyBitmap::new(region.len() / PAGE_SIZE);
            // The mapping's own AtomicBitmap (not the trait's slice view).
            bitmap.or_words(&std::ops::Deref::deref(region).bitmap().get_and_reset());
            bitmap
        })
        .collect()
}

/// Reads and clears what changed since the last harvest: KVM's dirty log of
/// every slot OR'ed with the VMM's own bitmap, per region in slot order.
/// The VM must be paused, with [`enable`]d tracking.
pub fn harvest(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<Vec<DirtyBitmap>, DirtyError> {
    let mut out = harvest_vmm(memory);
    for (index, (region, bitmap)) in memory.iter().zip(out.iter_mut()).enumerate() {
        let slot = u32::try_from(index).unwrap_or(u32::MAX);
        let size = usize::try_from(region.len()).unwrap_or(usize::MAX);
        let log = vm
            .get_dirty_log(slot, size)
            .map_err(|source| DirtyError::GetLog { slot, source })?;
        clear(vm, slot, &log, bitmap.pages)?;
        bitmap.or_words(&log);
    }
    Ok(out)
}

/// Re-protects the pages in `log`, chunk by chunk.
fn clear(vm: &VmFd, slot: u32, log: &[u64], pages: u64) -> Result<(), DirtyError> {
    let mut first = 0u64;
    while first < pages {
        let count = CLEAR_CHUNK_PAGES.min(pages - first);
        // Both fit usize: `log` holds one bit per page of the slot.
        let start_word = usize::try_from(first / 64).unwrap_or(usize::MAX);
        let words = usize::try_from(count.div_ceil(64)).unwrap_or(usize::MAX);
        let chunk = log
            .get(start_word..start_word.saturating_add(words).min(log.len()))
            .unwrap_or_default();
        if chunk.iter().any(|w| *w != 0) {
            let mut bits = chunk.to_vec();
            let request = kvm_clear_dirty_log {
                slot,
                // CLEAR_CHUNK_PAGES fits u32.
                num_pages: u32::try_from(count).unwrap_or(u32::MAX),
                first_page: first,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: bits.as_mut_ptr().cast(),
                },
            };
            // SAFETY: `vm` is a KVM VM fd; `request.dirty_bitmap` points at
            // `bits`, which holds at least `num_pages` bits and outlives the
            // call; KVM only reads through it.
            let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &request) };
            if rc != 0 {
                return Err(DirtyError::ClearLog {
                    slot,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        first += count;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn runs_merge_neighbours_across_words() {
        let mut b = DirtyBitmap::new(200);
        for p in [0, 1, 2, 63, 64, 65, 100, 199] {
            b.set(p);
        }
        assert_eq!(b.runs(), vec![(0, 3), (63, 3), (100, 1), (199, 1)]);
        assert_eq!(b.count(), 8);
        assert!(b.is_set(64) && !b.is_set(66) && !b.is_set(500));
    }

    #[test]
    fn or_ignores_bits_past_the_region() {
        let mut b = DirtyBitmap::new(70);
        b.or_words(&[0, u64::MAX]);
        assert_eq!(b.runs(), vec![(64, 6)]);
    }

    #[test]
    fn vmm_writes_are_harvested_once() {
        let mem = crate::memory::create(64 * PAGE_SIZE).unwrap();
        let base = crate::DRAM_START;
        mem.write_obj(1u32, GuestAddress(base.0 + 3 * PAGE_SIZE + 8))
            .unwrap();
        mem.write_slice(&[7u8; 5000], GuestAddress(base.0 + 10 * PAGE_SIZE))
            .unwrap();
        assert_eq!(harvest_vmm(&mem)[0].runs(), vec![(3, 1), (10, 2)]);
        // Harvesting clears.
        assert_eq!(harvest_vmm(&mem)[0].count(), 0);
    }
}

/// `kvm_dirty_gfn.flags`: KVM published this entry.
const GFN_DIRTY: u32 = 1;
/// `kvm_dirty_gfn.flags`: userspace collected this entry.
const GFN_RESET: u32 = 2;
/// The most ring memory dormouse asks for per vCPU (65536 entries).
const MAX_RING_BYTES: usize = 1 << 20;

mod ring_ioctls {
    use vmm_sys_util::ioctl_io_nr;

    /// The KVM ioctl type.
    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}

/// How KVM reports the pages vCPUs write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyMode {
    /// The per-slot dirty bitmap (KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG):
    /// a harvest scans one bit per page of guest memory.
    Log,
    /// A ring of dirtied pages per vCPU (KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    /// with the bitmap for writes made outside any vCPU, e.g. the vGIC's):
    /// a harvest costs what was dirtied. Ring size in bytes.
    Ring(usize),
}

/// The ring mode this host's KVM offers, if any: Linux 6.1+ on arm64 with
/// KVM_CAP_DIRTY_LOG_RING_ACQ_REL and KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP.
pub fn ring_mode(vm: &VmFd) -> Option<DirtyMode> {
    let max = vm.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into());
    let bitmap = vm.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP.into());
    let max = usize::try_from(max).ok().filter(|&m| m > 0)?;
    if bitmap <= 0 {
        return None;
    }
    // A power of two no larger than KVM's limit.
    let bytes = MAX_RING_BYTES.min(max);
    Some(DirtyMode::Ring(1 << bytes.ilog2()))
}

/// Turns dirty tracking on for `vm` in `mode`: before any vCPU or memory
/// slot exists.
pub fn enable_mode(vm: &VmFd, mode: DirtyMode) -> Result<(), DirtyError> {
    match mode {
        DirtyMode::Log => enable(vm),
        DirtyMode::Ring(bytes) => {
            let ring = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                args: [bytes as u64, 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&ring).map_err(DirtyError::EnableRing)?;
            let bitmap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
                ..Default::default()
            };
            vm.enable_cap(&bitmap).map_err(DirtyError::EnableRing)
        }
    }
}

/// A VM's dirty tracking: the mode in use and, for the ring, where full
/// rings were drained to.
#[derive(Debug)]
pub struct Tracking {
    /// How KVM reports vCPU writes on this VM.
    pub mode: DirtyMode,
    /// With the ring: the drained pages and the reset handle.
    pub sink: Option<std::sync::Arc<RingSink>>,
}

/// One vCPU's dirty ring, mapped from its fd.
#[derive(Debug)]
pub struct DirtyRing {
    gfns: *mut kvm_bindings::kvm_dirty_gfn,
    entries: u32,
    bytes: usize,
    /// The next entry to look at (free-running).
    next: u32,
}

// SAFETY: the ring is a mapping owned by this value (unmapped on drop);
// nothing else in this process aliases it, and KVM synchronises with us
// through the entries' flags with acquire/release ordering.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps vCPU `vcpu`'s ring of `bytes` bytes.
    pub fn map(vcpu: &kvm_ioctls::VcpuFd, bytes: usize) -> Result<Self, DirtyError> {
        use std::os::fd::AsRawFd;
        let page = usize::try_from(PAGE_SIZE).unwrap_or(4096);
        let offset = libc::off_t::try_from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as usize * page)
            .map_err(|_| DirtyError::MapRing(std::io::Error::other("ring offset")))?;
        // SAFETY: a fresh shared mapping of the vCPU fd's ring area, of the
        // size the ring was enabled with; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyError::MapRing(std::io::Error::last_os_error()));
        }
        let entries = bytes / std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>();
        Ok(Self {
            gfns: ptr.cast(),
            entries: u32::try_from(entries).unwrap_or(u32::MAX),
            bytes,
            next: 0,
        })
    }

    /// Moves every published entry into `into` (per slot) and marks it
    /// collected. Returns how many there were. KVM re-protects the pages
    /// on the next [`reset_rings`].
    pub fn collect(&mut self, into: &mut [DirtyBitmap]) -> u32 {
        use std::sync::atomic::{AtomicU32, Ordering};
        let mut count = 0;
        loop {
            let index = (self.next % self.entries) as usize;
            // SAFETY: `index` < entries, so the entry lies inside the
            // mapping; `flags` is a naturally aligned u32 that KVM and we
            // access atomically (acquire/release, as ACQ_REL requires).
            let entry = unsafe { self.gfns.add(index) };
            // SAFETY: as above.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                return count;
            }
            // SAFETY: the entry is published (DIRTY seen with acquire), so
            // KVM does not write it until we reset it.
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            // Address space 0 only (slot's upper 16 bits).
            if let Some(bitmap) = into.get_mut((slot & 0xffff) as usize) {
                bitmap.set(offset);
            }
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            count += 1;
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made, which nothing else
        // refers to.
        unsafe { libc::munmap(self.gfns.cast(), self.bytes) };
    }
}

/// Re-protects the pages of every collected ring entry (KVM_RESET_DIRTY_RINGS).
pub fn reset_rings(vm: &impl std::os::fd::AsRawFd) -> Result<(), DirtyError> {
    // SAFETY: `vm` is a KVM VM fd; the ioctl takes no argument.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl(vm, ring_ioctls::KVM_RESET_DIRTY_RINGS()) };
    if rc < 0 {
        return Err(DirtyError::ResetRings(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Dirty pages collected by vCPU threads when their ring filled up, kept
/// until the next harvest; and a handle to reset the rings from there.
#[derive(Debug)]
pub struct RingSink {
    /// A duplicate of the VM fd, for KVM_RESET_DIRTY_RINGS.
    vm: std::fs::File,
    /// Per memory region.
    pending: std::sync::Mutex<Vec<DirtyBitmap>>,
}

impl RingSink {
    /// A sink for a VM whose regions have these page counts.
    pub fn new(vm: &VmFd, region_pages: &[u64]) -> Result<Self, DirtyError> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: dup(2) of the VM fd, which stays open for the call; the
        // result is checked and owned by the File.
        let fd = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(DirtyError::ResetRings(std::io::Error::last_os_error()));
        }
        Ok(Self {
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            vm: unsafe { std::fs::File::from_raw_fd(fd) },
            pending: std::sync::Mutex::new(
                region_pages.iter().map(|&p| DirtyBitmap::new(p)).collect(),
            ),
        })
    }

    /// Drains a full ring (a vCPU thread's KVM_EXIT_DIRTY_RING_FULL).
    pub fn drain(&self, ring: &mut DirtyRing) -> Result<(), DirtyError> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        ring.collect(&mut pending);
        drop(pending);
        reset_rings(&self.vm)
    }

    /// Harvests with the VM paused: every ring, what vCPU threads drained
    /// before, KVM's bitmap of non-vCPU writes, and the VMM's own writes.
    pub fn harvest<'a>(
        &self,
        vm: &VmFd,
        memory: &GuestMemoryMmap,
        rings: impl Iterator<Item = &'a mut DirtyRing>,
    ) -> Result<Vec<DirtyBitmap>, DirtyError> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for ring in rings {
            ring.collect(&mut pending);
        }
        reset_rings(&self.vm)?;
        let mut out = harvest_vmm(memory);
        for (index, ((region, bitmap), drained)) in memory
            .iter()
            .zip(out.iter_mut())
            .zip(pending.iter_mut())
            .enumerate()
        {
            bitmap.or_words(&drained.words);
            *drained = DirtyBitmap::new(drained.pages);
            let slot = u32::try_from(index).unwrap_or(u32::MAX);
            let size = usize::try_from(region.len()).unwrap_or(usize::MAX);
            // Writes made outside any vCPU (the vGIC's tables) land here;
            // without manual protection this read also clears it.
            let log = vm
                .get_dirty_log(slot, size)
                .map_err(|source| DirtyError::GetLog { slot, source })?;
            bitmap.or_words(&log);
        }
        Ok(out)
    }
}
