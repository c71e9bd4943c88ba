//! What a block device reads and writes: a plain disk image or a layered
//! copy-on-write disk. The plain disk's calls go straight through.

use std::io;

use super::disk::{Disk, Segment};
use super::layered::{LayerError, LayeredDisk};
use super::{ID_BYTES, SECTOR_SIZE};
use crate::memory::GuestMemoryMmap;

/// The disk behind a block device.
#[derive(Debug)]
pub(super) enum Backend {
    /// One raw image.
    Plain(Disk),
    /// A base, frozen layers and a top.
    Layered(LayeredDisk),
}

impl Backend {
    /// The capacity in sectors.
    pub(super) fn sectors(&self) -> u64 {
        match self {
            Self::Plain(d) => d.sectors(),
            Self::Layered(d) => d.size() / SECTOR_SIZE,
        }
    }

    pub(super) fn read_only(&self) -> bool {
        match self {
            Self::Plain(d) => d.read_only(),
            Self::Layered(d) => d.read_only(),
        }
    }

    /// Whether discard and write-zeroes can be offered.
    pub(super) fn supports_discard(&self) -> bool {
        match self {
            Self::Plain(d) => d.supports_discard(),
            Self::Layered(d) => d.supports_discard(),
        }
    }

    /// The 20-byte id GET_ID returns.
    pub(super) fn id(&self) -> &[u8; ID_BYTES] {
        match self {
            Self::Plain(d) => d.id(),
            Self::Layered(d) => d.id(),
        }
    }

    /// The byte offset of `sector` if `[sector, sector + len)` lies inside
    /// the disk (`len` in bytes); `None` if it does not or overflows.
    pub(super) fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let size = self.sectors() * SECTOR_SIZE;
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        (offset.checked_add(len)? <= size).then_some(offset)
    }

    /// Reads from the disk at `offset` into `segments`; see
    /// [`Disk::read_into`].
    pub(super) fn read_into(
        &self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
    ) -> Result<u64, (u64, io::Error)> {
        match self {
            Self::Plain(d) => d.read_into(mem, segments, offset),
            Self::Layered(d) => d.read_into(mem, segments, offset),
        }
    }

    /// Writes `segments`, in order, to the disk at `offset`.
    pub(super) fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
    ) -> io::Result<()> {
        match self {
            Self::Plain(d) => d.write_from(mem, segments, offset),
            Self::Layered(d) => d.write_from(mem, segments, offset),
        }
    }

    /// Commits written data to stable storage.
    pub(super) fn flush(&self) -> io::Result<()> {
        match self {
            Self::Plain(d) => d.flush(),
            Self::Layered(d) => d.flush(),
        }
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeroes.
    pub(super) fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Self::Plain(d) => d.punch_hole(offset, len),
            Self::Layered(d) => d.zero(offset, len),
        }
    }

    /// Zeroes `len` bytes at `offset`.
    pub(super) fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Self::Plain(d) => d.zero_range(offset, len),
            Self::Layered(d) => d.zero(offset, len),
        }
    }

    /// Makes what a snapshot needs durable: a layered disk's top data and
    /// presence map. A plain disk needs nothing.
    pub(super) fn persist(&self) -> Result<(), LayerError> {
        match self {
            Self::Plain(_) => Ok(()),
            Self::Layered(d) => d.persist(),
        }
    }
}
