//! Guest memory: one crate-wide type with a dirty bitmap built in.
//!
//! Guest RAM is an anonymous mapping owned by vm-memory's `GuestMemoryMmap`.
//! The [`AtomicBitmap`] records every page the VMM itself writes through
//! vm-memory (device DMA), so that later dirty-page tracking can OR it with
//! KVM's own log and never miss a device write.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address as _, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::arch::aarch64::layout::{DRAM_MAX_SIZE, DRAM_START, PAGE_SIZE};

/// Guest memory as dormouse uses it everywhere: mmap-backed, dirty-tracked.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Errors from creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A guest needs some memory.
    #[error("guest memory size is zero: give the VM at least one page ({PAGE_SIZE} bytes)")]
    SizeZero,
    /// The size must be a whole number of pages.
    #[error(
        "guest memory size {0:#x} is not a multiple of the page size ({PAGE_SIZE:#x}): round it"
    )]
    NotPageAligned(u64),
    /// The size does not fit the guest address map.
    #[error("guest memory size {size:#x} is larger than the {max:#x} bytes the memory map allows")]
    TooLarge {
        /// The size asked for.
        size: u64,
        /// The most the layout allows.
        max: u64,
    },
    /// The host could not map the memory.
    #[error("could not map {size:#x} bytes of guest memory on the host (out of memory?)")]
    Map {
        /// The size asked for.
        size: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Checks a guest RAM size against the layout.
pub fn validate_size(size: u64) -> Result<(), MemoryError> {
    if size == 0 {
        return Err(MemoryError::SizeZero);
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::NotPageAligned(size));
    }
    if size > DRAM_MAX_SIZE {
        return Err(MemoryError::TooLarge {
            size,
            max: DRAM_MAX_SIZE,
        });
    }
    Ok(())
}

/// Maps `size` bytes of guest RAM at [`DRAM_START`].
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    validate_size(size)?;
    let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge {
        size,
        max: usize::MAX as u64,
    })?;
    GuestMemoryMmap::from_ranges(&[(DRAM_START, len)])
        .map_err(|source| MemoryError::Map { size, source })
}

/// The first address past the end of guest RAM.
pub fn end(memory: &GuestMemoryMmap) -> GuestAddress {
    memory
        .iter()
        .map(|r| r.start_addr().unchecked_add(r.len()))
        .max()
        .unwrap_or(DRAM_START)
}

#[cfg(test)]
mod tests {
    use vm_memory::bitmap::Bitmap as _;
    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;

    #[test]
    fn sizes_are_validated() {
        assert!(matches!(create(0), Err(MemoryError::SizeZero)));
        assert!(matches!(
            create(PAGE_SIZE + 1),
            Err(MemoryError::NotPageAligned(_))
        ));
        assert!(matches!(
            create(DRAM_MAX_SIZE + PAGE_SIZE),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn memory_sits_at_dram_start_and_is_dirty_tracked() {
        let mem = create(16 * PAGE_SIZE).unwrap();
        assert_eq!(end(&mem), DRAM_START.unchecked_add(16 * PAGE_SIZE));
        mem.write_obj(0xabu8, DRAM_START.unchecked_add(3 * PAGE_SIZE))
            .unwrap();
        let region = mem.find_region(DRAM_START).unwrap();
        let bitmap = region.bitmap();
        let page = usize::try_from(PAGE_SIZE).unwrap();
        assert!(bitmap.dirty_at(3 * page));
        assert!(!bitmap.dirty_at(2 * page));
        // Outside guest memory is an error, not a host access.
        assert!(mem.write_obj(1u8, end(&mem)).is_err());
    }
}
