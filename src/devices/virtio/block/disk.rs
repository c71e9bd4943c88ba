//! The disk image behind the device: opening and sizing it, and moving data
//! between it and guest memory.
//!
//! Data goes straight between the file and guest memory with vm-memory's
//! volatile I/O (`read(2)`/`write(2)` on guest memory slices after one
//! `lseek(2)` per request), so no buffer the size of a guest request is ever
//! allocated and every byte written to the guest is marked in the dirty
//! bitmap.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, WriteVolatile};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::device::BlockError;
use super::{ID_BYTES, SECTOR_SIZE};
use crate::memory::GuestMemoryMmap;

/// A contiguous run of guest memory, as one descriptor (or part of one)
/// gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) addr: GuestAddress,
    pub(super) len: usize,
}

/// An open disk image.
#[derive(Debug)]
pub(super) struct Disk {
    file: File,
    /// The size in bytes (a multiple of [`SECTOR_SIZE`]).
    size: u64,
    read_only: bool,
    /// Whether `fallocate(PUNCH_HOLE)` works on the file.
    punch_hole: bool,
    id: [u8; ID_BYTES],
}

impl Disk {
    /// Opens `path` (read-only if asked), checks it is a regular file or a
    /// block device, locks it (see [`lock`]) and checks its size.
    pub(super) fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            // Not blocking: opening a FIFO read-only would wait for a writer.
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let inspect = |source| BlockError::Inspect {
            path: path.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(inspect)?;
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(BlockError::NotADisk {
                path: path.to_owned(),
            });
        }
        // Requests are plain blocking I/O (O_NONBLOCK was only for the open).
        // SAFETY: F_SETFL on a descriptor `file` owns; no pointers.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) } != 0 {
            return Err(inspect(io::Error::last_os_error()));
        }
        lock(&file, path, read_only)?;
        // Seeking to the end sizes block devices too (their metadata says 0).
        let size = (&file).seek(SeekFrom::End(0)).map_err(inspect)?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::NotSectorAligned {
                path: path.to_owned(),
                size,
            });
        }
        // Punching a hole past the end of the file changes nothing but tells
        // whether the file system supports it.
        let punch_hole = !read_only
            && fallocate(&file, FallocateMode::PunchHole, true, size, SECTOR_SIZE).is_ok();
        Ok(Self {
            file,
            size,
            read_only,
            punch_hole,
            id: device_id(meta.dev(), meta.ino()),
        })
    }

    /// The capacity in sectors.
    pub(super) fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// The open file (still locked) and its size, for a layered disk's
    /// base.
    pub(super) fn into_file(self) -> (File, u64) {
        (self.file, self.size)
    }

    pub(super) fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether discard and write-zeroes can be offered.
    pub(super) fn supports_discard(&self) -> bool {
        self.punch_hole
    }

    /// The 20-byte id GET_ID returns.
    pub(super) fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Reads from the disk at `offset` into `segments`, in order. Returns
    /// the number of bytes written to guest memory (also on error, as
    /// `Err((written, error))`).
    pub(super) fn read_into(
        &self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
    ) -> Result<u64, (u64, io::Error)> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset)).map_err(|e| (0, e))?;
        let mut done = 0u64;
        for seg in segments {
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len) {
                let mut slice = slice.map_err(|e| (done, io::Error::other(e)))?;
                file.read_exact_volatile(&mut slice)
                    .map_err(|e| (done, io::Error::other(e)))?;
                done += slice.len() as u64;
            }
        }
        Ok(done)
    }

    /// Writes `segments`, in order, to the disk at `offset`.
    pub(super) fn write_from(
        &self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
    ) -> io::Result<()> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))?;
        for seg in segments {
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len) {
                let slice = slice.map_err(io::Error::other)?;
                file.write_all_volatile(&slice).map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    /// Commits written data to stable storage.
    pub(super) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeroes.
    pub(super) fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(&self.file, FallocateMode::PunchHole, true, offset, len).map_err(Into::into)
    }

    /// Zeroes `len` bytes at `offset`, keeping them allocated.
    pub(super) fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(&self.file, FallocateMode::ZeroRange, true, offset, len).map_err(Into::into)
    }
}

/// Locks the disk image for as long as `file` (the device's) stays open,
/// so that two VMs (say, two restored from one snapshot) cannot use one
/// image in a way that corrupts it: a writable disk takes an exclusive
/// `flock`, a read-only one a shared lock. Any number of VMs may share a
/// read-only image; a writer excludes every other writer and reader, since
/// a reader would see the image change under its page cache. The lock is
/// advisory: it binds every dormouse and every program that takes `flock`
/// locks, and is released when the device is dropped (or the process dies).
fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    let how = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock(2) on a descriptor `file` owns; no pointers.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    Err(BlockError::Locked {
        path: path.to_owned(),
        read_only,
        source: io::Error::last_os_error(),
    })
}

/// Writes up to `ID_BYTES` of `id` into `segments`; returns how many bytes
/// were written.
pub(super) fn write_id(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    id: &[u8],
) -> Result<u64, vm_memory::GuestMemoryError> {
    let mut rest = id;
    let mut done = 0u64;
    for seg in segments {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(seg.len.min(rest.len()));
        mem.write_slice(now, seg.addr)?;
        done += now.len() as u64;
        rest = later;
    }
    Ok(done)
}

/// A stable id for the file (`dm-` and 16 hex digits, NUL-padded): the
/// same file gives the same id on every run, different files differ.
pub(super) fn device_id(dev: u64, ino: u64) -> [u8; ID_BYTES] {
    let hash = mix(dev ^ mix(ino));
    let text = format!("dm-{hash:016x}");
    let mut id = [0u8; ID_BYTES];
    let n = text.len().min(ID_BYTES);
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

/// splitmix64's finaliser: a fixed, well-spread 64-bit mix.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(device_id(1, 2), device_id(1, 2));
        assert_ne!(device_id(1, 2), device_id(1, 3));
        assert_ne!(device_id(1, 2), device_id(2, 1));
        let id = device_id(7, 9);
        assert!(id.starts_with(b"dm-"));
        assert_eq!(id[19], 0, "NUL-terminated within 20 bytes");
    }
}
