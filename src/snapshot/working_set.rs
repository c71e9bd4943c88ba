//! Working sets: the guest pages a restored VM touched first, recorded so
//! that the next restore of the same snapshot loads them before the guest
//! asks for them.
//!
//! A restore maps the memory file and the guest pulls each page in with a
//! page fault on first touch. A session answering its first request after a
//! restore touches the same few MiB every time, so those faults are the
//! latency a user sees. [`MicroVm::record_working_set`](crate::MicroVm)
//! writes which pages the guest touched, in the order it touched them, next
//! to the snapshot (the file [`WORKING_SET_FILE`]); the next restore of that
//! snapshot reads them in on a background thread while the vCPUs run
//! ([`Restore::prefetch`](super::Restore::prefetch)). Memory outside the
//! working set stays lazy.
//!
//! The file is untrusted input like every file of a snapshot, and it is
//! only an optimisation: a missing, stale (another snapshot's) or corrupt
//! one makes the restore fall back to lazy loading with a logged warning,
//! never fail.
//!
//! # Format 1.0
//!
//! Little-endian:
//!
//! ```text
//! offset size
//!      0    8 magic "DMWKSET\0"
//!      8    2 major version (1)
//!     10    2 minor version (0)
//!     12    4 number of runs
//!     16   16 the id of the snapshot it belongs to
//!     32    8 guest RAM size in bytes
//!     40    8 reserved, zero
//!     48 16*n runs: first page (u64, from the start of guest RAM), page count (u64),
//!             in the order the guest first touched them; no two overlap
//!    end    8 CRC-64/XZ of every byte before it
//! ```

// Only aarch64 hosts restore VMs: elsewhere the threads are built and
// tested, never started by a restore.
#![cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{SnapshotId, VmState};
use crate::arch::aarch64::layout::{DRAM_MAX_SIZE, PAGE_SIZE};

/// The working-set file's name inside a snapshot directory.
pub const WORKING_SET_FILE: &str = "working-set";

const MAGIC: &[u8; 8] = b"DMWKSET\0";
/// The format version this build writes.
pub const VERSION: (u16, u16) = (1, 0);
const HEADER_LEN: usize = 48;
const RUN_LEN: usize = 16;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
/// The most runs a file can hold: one per page of the largest guest.
const MAX_RUNS: u64 = DRAM_MAX_SIZE / PAGE_SIZE;
/// The largest a working-set file can be.
pub const MAX_FILE_LEN: u64 = HEADER_LEN as u64 + MAX_RUNS * RUN_LEN as u64 + 8;

/// The CRC-64/XZ a working-set file ends with, of the bytes before it
/// (public for the fuzz target, which builds valid files around arbitrary
/// runs).
pub fn format_crc(bytes: &[u8]) -> u64 {
    CRC.checksum(bytes)
}

/// Why a working-set file was not used.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// The file could not be read or written.
    #[error("could not {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Nothing was recorded: the VM was not restored with
    /// [`Restore::record_working_set`](super::Restore::record_working_set).
    #[error(
        "this VM records no working set: restore it with Restore::record_working_set(true), then \
         call record_working_set() once the guest has done the work to remember"
    )]
    NotRecording,
    /// The file is not a working-set file.
    #[error("not a dormouse working-set file (bad magic)")]
    BadMagic,
    /// The file's major version is not one this build reads.
    #[error(
        "working-set format {}.{} cannot be read by this dormouse (reads {}.x): record it again",
        .0.0, .0.1, VERSION.0
    )]
    Version((u16, u16)),
    /// The file is shorter or longer than its run count says.
    #[error("the working-set file is {found} bytes, its header says {expected}: it is damaged")]
    Length {
        /// Bytes the header implies.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// The checksum does not match.
    #[error("the working-set file is corrupt (CRC-64 {found:#018x}, it says {expected:#018x})")]
    Corrupt {
        /// The CRC the file holds.
        expected: u64,
        /// The CRC of its bytes.
        found: u64,
    },
    /// The file belongs to another snapshot.
    #[error(
        "the working set was recorded for snapshot {found}, not {expected}: it is stale; record \
         it again"
    )]
    Stale {
        /// The snapshot being restored.
        expected: SnapshotId,
        /// The one the file names.
        found: SnapshotId,
    },
    /// A run lies outside guest memory, is empty, overlaps another, or the
    /// header is inconsistent.
    #[error("the working-set file is inconsistent: {0}")]
    Inconsistent(String),
}

/// The guest pages a VM touched first, as runs of pages from the start of
/// guest RAM, in the order of first touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    snapshot: SnapshotId,
    memory_size: u64,
    runs: Vec<(u64, u64)>,
}

impl WorkingSet {
    /// A working set of `snapshot`, a guest of `memory_size` bytes. The
    /// runs are `(first page, page count)`, in the order to load them.
    pub fn new(
        snapshot: SnapshotId,
        memory_size: u64,
        runs: Vec<(u64, u64)>,
    ) -> Result<Self, WorkingSetError> {
        let set = Self {
            snapshot,
            memory_size,
            runs,
        };
        set.check()?;
        Ok(set)
    }

    /// The snapshot it belongs to.
    pub fn snapshot(&self) -> SnapshotId {
        self.snapshot
    }

    /// The guest RAM size it was recorded for, in bytes.
    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    /// The runs `(first page, page count)`, in the order of first touch.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// How many pages it holds.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|&(_, n)| n).sum()
    }

    /// How many bytes of guest memory it covers.
    pub fn bytes(&self) -> u64 {
        self.pages() * PAGE_SIZE
    }

    fn check(&self) -> Result<(), WorkingSetError> {
        let bad = |m: String| Err(WorkingSetError::Inconsistent(m));
        if self.memory_size == 0
            || !self.memory_size.is_multiple_of(PAGE_SIZE)
            || self.memory_size > DRAM_MAX_SIZE
        {
            return bad(format!("a guest of {:#x} bytes", self.memory_size));
        }
        let pages = self.memory_size / PAGE_SIZE;
        let mut sorted = Vec::with_capacity(self.runs.len());
        for &(first, count) in &self.runs {
            match first.checked_add(count) {
                Some(end) if count > 0 && end <= pages => sorted.push((first, end)),
                _ => {
                    return bad(format!(
                        "run ({first}, {count}) is empty or past {pages} pages"
                    ))
                }
            }
        }
        sorted.sort_unstable();
        for pair in sorted.windows(2) {
            if pair[1].0 < pair[0].1 {
                return bad(format!(
                    "runs starting at pages {} and {} overlap",
                    pair[0].0, pair[1].0
                ));
            }
        }
        Ok(())
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.runs.len() * RUN_LEN + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.0.to_le_bytes());
        out.extend_from_slice(&VERSION.1.to_le_bytes());
        // At most MAX_RUNS (checked at construction), which fits.
        out.extend_from_slice(
            &u32::try_from(self.runs.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        out.extend_from_slice(&self.snapshot.0);
        out.extend_from_slice(&self.memory_size.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        for &(first, count) in &self.runs {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        let crc = CRC.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and checks a file's bytes (untrusted).
    pub fn decode(bytes: &[u8]) -> Result<Self, WorkingSetError> {
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if bytes.len() < HEADER_LEN + 8 {
            if bytes.len() >= MAGIC.len() && &bytes[..MAGIC.len()] != MAGIC {
                return Err(WorkingSetError::BadMagic);
            }
            return Err(WorkingSetError::Length {
                expected: (HEADER_LEN + 8) as u64,
                found: bytes.len() as u64,
            });
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(WorkingSetError::BadMagic);
        }
        let version = (u16_at(8), u16_at(10));
        if version.0 != VERSION.0 {
            return Err(WorkingSetError::Version(version));
        }
        let count = u64::from(u32::from_le_bytes([
            bytes[12], bytes[13], bytes[14], bytes[15],
        ]));
        let expected = HEADER_LEN as u64 + count * RUN_LEN as u64 + 8;
        if bytes.len() as u64 != expected {
            return Err(WorkingSetError::Length {
                expected,
                found: bytes.len() as u64,
            });
        }
        let body = bytes.len() - 8;
        let found = CRC.checksum(&bytes[..body]);
        let stored = u64_at(body);
        if found != stored {
            return Err(WorkingSetError::Corrupt {
                expected: stored,
                found,
            });
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[16..32]);
        let memory_size = u64_at(32);
        let runs = (0..usize::try_from(count).unwrap_or(0))
            .map(|i| {
                let at = HEADER_LEN + i * RUN_LEN;
                (u64_at(at), u64_at(at + 8))
            })
            .collect();
        Self::new(SnapshotId(id), memory_size, runs)
    }

    /// Writes the file into the snapshot directory `dir` (atomically, `0600`).
    pub fn save(&self, dir: &Path) -> Result<(), WorkingSetError> {
        let bytes = self.encode();
        crate::fsutil::replace_file(&dir.join(WORKING_SET_FILE), &bytes).map_err(|e| {
            WorkingSetError::Io {
                what: e.what,
                path: e.path,
                source: e.source,
            }
        })
    }

    /// Reads the working set of the snapshot in `dir` whose state is
    /// `state`, and checks that it belongs to that snapshot. `Ok(None)` if
    /// there is none.
    pub fn load(dir: &Path, state: &VmState) -> Result<Option<Self>, WorkingSetError> {
        let Some(set) = Self::load_any(dir)? else {
            return Ok(None);
        };
        if set.snapshot != state.id {
            return Err(WorkingSetError::Stale {
                expected: state.id,
                found: set.snapshot,
            });
        }
        if set.memory_size != state.config.memory_size {
            return Err(WorkingSetError::Inconsistent(format!(
                "recorded for a guest of {} bytes, the snapshot's has {}",
                set.memory_size, state.config.memory_size
            )));
        }
        Ok(Some(set))
    }

    /// Reads the working-set file in `dir`, whichever snapshot it names.
    /// `Ok(None)` if there is none.
    pub fn load_any(dir: &Path) -> Result<Option<Self>, WorkingSetError> {
        let path = dir.join(WORKING_SET_FILE);
        let (file, size) = match super::open_untrusted(&path) {
            Ok(opened) => opened,
            Err(super::SnapshotError::MissingFile(_)) => return Ok(None),
            Err(e) => {
                return Err(WorkingSetError::Io {
                    what: "open",
                    path,
                    source: io::Error::other(e.to_string()),
                })
            }
        };
        if size > MAX_FILE_LEN {
            return Err(WorkingSetError::Length {
                expected: MAX_FILE_LEN,
                found: size,
            });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        // Bounded again: the file may grow after the fstat.
        file.take(MAX_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| WorkingSetError::Io {
                what: "read",
                path: path.clone(),
                source,
            })?;
        Self::decode(&bytes).map(Some)
    }
}

/// A VM's working-set threads: the recorder of a VM restored with
/// [`Restore::record_working_set`](super::Restore::record_working_set), the
/// prefetcher of one restored with a working set.
#[derive(Debug, Default)]
pub(crate) struct Threads {
    /// The recorder, with the snapshot and guest size it records for.
    pub recorder: Option<(Recorder, SnapshotId, u64)>,
    /// The prefetcher.
    pub prefetcher: Option<Prefetcher>,
}

impl Threads {
    /// Stops the recorder and returns the working set it saw.
    pub fn finish_recording(&mut self) -> Result<WorkingSet, WorkingSetError> {
        let (recorder, snapshot, memory_size) =
            self.recorder.take().ok_or(WorkingSetError::NotRecording)?;
        let runs = recorder.finish().map_err(|source| WorkingSetError::Io {
            what: "read",
            path: PathBuf::from("/proc/self/pagemap"),
            source,
        })?;
        WorkingSet::new(snapshot, memory_size, runs)
    }
}

/// The host mapping of the guest RAM of `memory` (dormouse maps it as one
/// region).
pub(crate) fn host_range(memory: &crate::memory::GuestMemoryMmap) -> Option<HostRange> {
    use vm_memory::GuestMemoryBackend as _;
    use vm_memory::GuestMemoryRegion as _;
    let mut regions = memory.iter();
    let region = regions.next()?;
    if regions.next().is_some() {
        return None;
    }
    Some(HostRange {
        addr: region.as_ptr() as usize,
        len: usize::try_from(region.len()).ok()?,
    })
}

/// A page, as a host size.
const PAGE: usize = 4096;
const _: () = assert!(PAGE as u64 == PAGE_SIZE);

/// The size of a transparent huge page, and of a stage-2 block mapping.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Builds a guest memory mapping (with `build`, which maps `size` bytes
/// wherever the kernel puts them) at a 2 MiB-aligned host address, so that
/// huge pages in it can be block-mapped at stage 2 (KVM needs the host
/// address and the guest address congruent modulo 2 MiB, and DRAM_START is
/// aligned). The kernel aligns large anonymous mappings by itself, but not
/// a private mapping of a tmpfs file. So: reserve `size + 2 MiB` of
/// inaccessible address space, free the aligned `size` bytes inside it, and
/// map: the kernel puts a mapping in the highest free gap that fits, which
/// is that hole unless a higher gap fits too (the hole a dropped VM of the
/// same size left, typically). A mapping that came out unaligned is kept
/// until the end, so that it fills that gap and the next try lands in the
/// hole. After a few tries it keeps what it got: alignment is an
/// optimisation, never a condition.
pub(crate) fn huge_aligned<T: AsPtr, E>(
    size: usize,
    mut build: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    const TRIES: usize = 6;
    let mut unaligned = Vec::new();
    for _ in 0..TRIES {
        let Some(reserved) = Reservation::new(size) else {
            break;
        };
        let mapped = build()?;
        drop(reserved);
        if (mapped.as_ptr() as usize).is_multiple_of(HUGE_PAGE) {
            return Ok(mapped);
        }
        // Dropped (unmapped) when this function returns.
        unaligned.push(mapped);
    }
    match unaligned.pop() {
        Some(mapped) => Ok(mapped),
        None => build(),
    }
}

/// What [`huge_aligned`] checks the address of.
pub(crate) trait AsPtr {
    /// The first byte of the mapping.
    fn as_ptr(&self) -> *mut u8;
}

impl<B: vm_memory::bitmap::Bitmap> AsPtr for vm_memory::mmap::MmapRegion<B> {
    fn as_ptr(&self) -> *mut u8 {
        vm_memory::mmap::MmapRegion::as_ptr(self)
    }
}

/// Inaccessible address space around an aligned hole of `size` bytes.
struct Reservation {
    pieces: [(usize, usize); 2],
}

impl Reservation {
    fn new(size: usize) -> Option<Self> {
        let len = size.checked_add(HUGE_PAGE)?;
        // SAFETY: a new private anonymous PROT_NONE mapping at an address
        // the kernel picks: it overlaps nothing and is never accessed.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if start == libc::MAP_FAILED {
            return None;
        }
        let start = start as usize;
        let hole = start.next_multiple_of(HUGE_PAGE);
        // SAFETY: [hole, hole + size) lies inside the reservation just
        // made (hole - start < 2 MiB), which only this function knows of.
        unsafe { libc::munmap(hole as *mut libc::c_void, size) };
        Some(Self {
            pieces: [
                (start, hole - start),
                (hole + size, start + len - hole - size),
            ],
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for (addr, len) in self.pieces {
            if len > 0 {
                // SAFETY: what is left of the reservation made in new():
                // still ours, never handed out, mapped PROT_NONE.
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            }
        }
    }
}

/// Chunks (2 MiB, numbered from the start of guest RAM) that hold at least
/// [`HUGE_MIN_PAGES`] working-set pages: worth copying whole into a huge
/// page. In the order the set first touches them.
fn dense_chunks(set: &WorkingSet, memory_size: u64) -> Vec<u64> {
    let per = (HUGE_PAGE as u64) / PAGE_SIZE;
    let whole = memory_size / HUGE_PAGE as u64;
    let mut count = std::collections::HashMap::<u64, u64>::new();
    let mut order = Vec::new();
    for &(first, n) in set.runs() {
        let mut page = first;
        while page < first + n {
            let chunk = page / per;
            let end = ((chunk + 1) * per).min(first + n);
            let c = count.entry(chunk).or_insert_with(|| {
                order.push(chunk);
                0
            });
            *c += end - page;
            page = end;
        }
    }
    order.retain(|c| *c < whole && count[c] >= HUGE_MIN_PAGES);
    order
}

/// The fewest working-set pages a 2 MiB chunk needs to be copied whole into
/// a huge page: each page of it saves a stage-2 fault, the copy costs 512
/// pages' worth of memory bandwidth and makes the chunk the VM's own memory.
pub const HUGE_MIN_PAGES: u64 = 32;

/// The most threads that fill huge pages at once.
const MAX_FILL_THREADS: usize = 4;

/// How [`install_huge`] fills a 2 MiB staging chunk with a guest chunk's
/// bytes.
enum Fill<'a> {
    /// Read from the memory files the guest mapping maps (one system call
    /// per piece, no fault per source page).
    Files(ChunkReader<'a>),
    /// Copied through the guest mapping itself.
    Mapping(HostRange),
}

impl Fill<'_> {
    /// Fills `HUGE_PAGE` bytes at `dst` with guest chunk `chunk`.
    ///
    /// # Safety
    /// `dst` must be the start of `HUGE_PAGE` writable bytes that nothing
    /// else reads or writes meanwhile; `chunk` must lie inside guest RAM.
    unsafe fn fill(&self, chunk: u64, dst: usize) -> io::Result<()> {
        match self {
            // SAFETY: the caller's promise, passed on.
            Fill::Files(reader) => unsafe { reader.fill(chunk, dst) },
            Fill::Mapping(range) => {
                let from = chunk_offset(chunk, range.len)
                    .ok_or_else(|| io::Error::other("a chunk past guest memory"))?
                    + range.addr;
                // SAFETY: `from` is a whole chunk inside the guest mapping
                // (chunk_offset checked it), which nothing writes until
                // the vCPUs and devices start; `dst` is the caller's.
                unsafe {
                    std::ptr::copy_nonoverlapping(from as *const u8, dst as *mut u8, HUGE_PAGE)
                };
                Ok(())
            }
        }
    }
}

/// Where chunk `chunk` starts in a guest mapping of `len` bytes, if all of
/// it lies inside.
fn chunk_offset(chunk: u64, len: usize) -> Option<usize> {
    usize::try_from(chunk)
        .ok()
        .and_then(|c| c.checked_mul(HUGE_PAGE))
        .filter(|o| o.checked_add(HUGE_PAGE).is_some_and(|end| end <= len))
}

/// Reads guest chunks out of the memory files a restored VM's memory is
/// mapped from, one `pread` per run of pages. Pages in the page cache
/// (`mincore` on the guest mapping, which starts no I/O) are copied from
/// it; the rest go from the disk straight into the huge page
/// (`O_DIRECT`), which neither fills the page cache nor copies out of it.
/// Where the file system refuses `O_DIRECT`, through the page cache.
struct ChunkReader<'a> {
    source: &'a super::sparse::MemorySource,
    /// The guest mapping: what `mincore` asks about.
    range: HostRange,
    /// Each file of `source` by descriptor, reopened with `O_DIRECT`
    /// where that works (opened up front: the fill threads' filter has no
    /// `openat`).
    direct: Vec<(std::os::fd::RawFd, Option<File>)>,
}

impl<'a> ChunkReader<'a> {
    fn new(source: &'a super::sparse::MemorySource, range: HostRange) -> Self {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let direct = source
            .files()
            .map(|file| {
                let fd = file.as_raw_fd();
                // Through /proc/self/fd, so that the flag does not change
                // how the mapping's own descriptor reads.
                let opened = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(format!("/proc/self/fd/{fd}"));
                if let Err(e) = &opened {
                    log::debug!("working set: no O_DIRECT reads of a memory file ({e})");
                }
                (fd, opened.ok())
            })
            .collect();
        Self {
            source,
            range,
            direct,
        }
    }

    /// `file` opened with `O_DIRECT`, if that worked.
    fn direct(&self, file: &File) -> Option<&File> {
        use std::os::fd::AsRawFd as _;
        let fd = file.as_raw_fd();
        self.direct
            .iter()
            .find(|(d, _)| *d == fd)
            .and_then(|(_, f)| f.as_ref())
    }

    /// # Safety
    /// As [`Fill::fill`].
    unsafe fn fill(&self, chunk: u64, dst: usize) -> io::Result<()> {
        let per = HUGE_PAGE / PAGE;
        let start = chunk_offset(chunk, self.range.len)
            .ok_or_else(|| io::Error::other("a chunk past guest memory"))?;
        let pieces = self
            .source
            .pieces(0, (start / PAGE) as u64, per as u64)
            .ok_or_else(|| io::Error::other("guest memory does not match its files"))?;
        let mut cached = vec![0u8; per];
        // SAFETY: asks about a whole chunk inside the guest mapping
        // (chunk_offset checked it); writes one byte per page into
        // `cached`, which has one per page. No memory changes.
        let asked = unsafe {
            libc::mincore(
                (self.range.addr + start) as *mut libc::c_void,
                HUGE_PAGE,
                cached.as_mut_ptr(),
            )
        };
        if asked != 0 {
            // Unknown: through the page cache, which is always right.
            cached.fill(1);
        }
        let mut page = 0;
        for (file, offset, pages) in pieces {
            let pages = usize::try_from(pages).map_err(io::Error::other)?;
            let end = page + pages;
            let mut at = page;
            while at < end {
                let resident = cached[at] & 1 != 0;
                let n = cached[at..end]
                    .iter()
                    .take_while(|c| (*c & 1 != 0) == resident)
                    .count();
                let from = offset + ((at - page) * PAGE) as u64;
                let via = if resident { None } else { self.direct(file) };
                // SAFETY: pages [at, at + n) of the chunk: the pieces
                // cover its 512 pages in order, so these bytes lie inside
                // the caller's HUGE_PAGE bytes at dst.
                unsafe { read_at(file, via, from, dst + at * PAGE, n * PAGE)? };
                at += n;
            }
            page = end;
        }
        Ok(())
    }
}

/// Reads `len` bytes of `file` from `offset` into `dst`: through `direct`
/// (the same file opened `O_DIRECT`) if given, unless it refuses.
///
/// # Safety
/// `[dst, dst + len)` must be writable and nobody else's meanwhile.
unsafe fn read_at(
    file: &File,
    mut direct: Option<&File>,
    offset: u64,
    dst: usize,
    len: usize,
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut done = 0;
    while done < len {
        let from = direct.unwrap_or(file);
        let at = offset
            .checked_add(done as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or_else(|| io::Error::other("a memory file offset out of range"))?;
        // SAFETY: writes at most len - done bytes at dst + done, inside
        // the caller's buffer.
        let n = unsafe {
            libc::pread(
                from.as_raw_fd(),
                (dst + done) as *mut libc::c_void,
                len - done,
                at,
            )
        };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => done += n.unsigned_abs(),
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // A direct read this file system refuses here (or an
                    // unaligned rest after a short read): through the
                    // page cache then.
                    Some(libc::EINVAL) if direct.is_some() => direct = None,
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// Copies each dense chunk of the working set into a transparent huge
/// page and moves it into place over the guest mapping, on up to
/// [`MAX_FILL_THREADS`] threads. The bytes come from `source`, the memory
/// files the guest mapping maps, else through the mapping itself.
/// Only before the vCPUs and devices run: guest memory must still equal
/// its files, and nothing may write a chunk between its copy and its move.
/// Returns the working set's pages it covered, and the chunks it
/// installed, so the prefetcher skips them.
pub(crate) fn install_huge(
    set: &WorkingSet,
    range: HostRange,
    memory_size: u64,
    source: Option<&super::sparse::MemorySource>,
    filters: &crate::seccomp::ThreadFilters,
) -> io::Result<(u64, Vec<u64>)> {
    if !range.addr.is_multiple_of(HUGE_PAGE) {
        return Ok((0, Vec::new()));
    }
    let mut chunks = dense_chunks(set, memory_size);
    chunks.retain(|&c| chunk_offset(c, range.len).is_some());
    if chunks.is_empty() {
        return Ok((0, Vec::new()));
    }
    let len = chunks.len() * HUGE_PAGE + HUGE_PAGE;
    // SAFETY: a new private anonymous mapping at an address the kernel
    // picks; unmapped below, and only this function uses it.
    let staging = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if staging == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let aligned = (staging as usize).next_multiple_of(HUGE_PAGE);
    let result = (|| {
        // SAFETY: inside the staging mapping above. Advice only.
        if unsafe {
            libc::madvise(
                aligned as *mut libc::c_void,
                chunks.len() * HUGE_PAGE,
                libc::MADV_HUGEPAGE,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        let fill = match source {
            Some(source) => Fill::Files(ChunkReader::new(source, range)),
            None => {
                // Reads of every chunk start at once (a cold page cache
                // reads them from the disk while the first ones are
                // copied): the copy then finds them in the page cache.
                for &chunk in &chunks {
                    if let Some(offset) = chunk_offset(chunk, range.len) {
                        let first = (offset / PAGE) as u64;
                        let _ =
                            advise(range, first, (HUGE_PAGE / PAGE) as u64, libc::MADV_WILLNEED);
                    }
                }
                Fill::Mapping(range)
            }
        };
        fill_chunks(&fill, &chunks, aligned, filters)?;
        let mut installed = Vec::with_capacity(chunks.len());
        for (i, &chunk) in chunks.iter().enumerate() {
            let Some(offset) = chunk_offset(chunk, range.len) else {
                continue;
            };
            let from = range.addr + offset;
            let to = aligned + i * HUGE_PAGE;
            // SAFETY: moves the staging chunk (one anonymous VMA piece,
            // filled above) over the guest chunk, which MREMAP_FIXED first
            // unmaps: the guest mapping stays mapped over the same
            // addresses, with the same bytes, now in anonymous memory; the
            // memslot's MMU notifier drops KVM's stage-2 entries of the old
            // pages.
            let moved = unsafe {
                libc::mremap(
                    to as *mut libc::c_void,
                    HUGE_PAGE,
                    HUGE_PAGE,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    from as *mut libc::c_void,
                )
            };
            if moved as usize != from {
                return Err(io::Error::last_os_error());
            }
            installed.push(chunk);
        }
        Ok(installed)
    })();
    // SAFETY: the staging mapping made above; the chunks moved out of it
    // are no longer part of it, so this unmaps only what is left.
    unsafe { libc::munmap(staging, len) };
    let mut installed = result?;
    installed.sort_unstable();
    let covered = set.pages()
        - outside(set.runs(), &installed)
            .iter()
            .map(|r| r.1)
            .sum::<u64>();
    Ok((covered, installed))
}

/// Fills staging chunk `i` (at `staging + i * HUGE_PAGE`) with guest chunk
/// `chunks[i]`, on this thread and up to `MAX_FILL_THREADS - 1` more, each
/// under the memory threads' seccomp filter. The first error stops them.
fn fill_chunks(
    fill: &Fill<'_>,
    chunks: &[u64],
    staging: usize,
    filters: &crate::seccomp::ThreadFilters,
) -> io::Result<()> {
    use std::sync::atomic::AtomicUsize;
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<io::Error>> = Mutex::new(None);
    let work = || {
        while lock(&failed).is_none() {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&chunk) = chunks.get(i) else {
                return;
            };
            // SAFETY: staging chunk i is inside the staging mapping (it
            // holds chunks.len() chunks) and only this worker took i.
            if let Err(e) = unsafe { fill.fill(chunk, staging + i * HUGE_PAGE) } {
                lock(&failed).get_or_insert(e);
            }
        }
    };
    // A few chunks are not worth a thread.
    let helpers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_FILL_THREADS)
        .min(chunks.len() / 4)
        .saturating_sub(1);
    std::thread::scope(|scope| {
        for _ in 0..helpers {
            let spawned = std::thread::Builder::new()
                .name("dormouse-fill".into())
                .spawn_scoped(scope, || {
                    match filters.enter(crate::seccomp::ThreadKind::Memory, None) {
                        Ok(_guard) => work(),
                        Err(e) => {
                            log::debug!("working set: a fill thread could not start ({e})");
                        }
                    }
                });
            if spawned.is_err() {
                break; // the others (and this thread) do its share
            }
        }
        work();
    });
    match failed.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err(io::Error::other("a huge-page fill thread panicked")),
    }
}

/// The parts of `runs` outside the (sorted) 2 MiB `chunks`, in order.
pub(crate) fn outside(runs: &[(u64, u64)], chunks: &[u64]) -> Vec<(u64, u64)> {
    let per = (HUGE_PAGE as u64) / PAGE_SIZE;
    let mut out = Vec::new();
    for &(first, n) in runs {
        let mut page = first;
        while page < first + n {
            let chunk = page / per;
            let end = ((chunk + 1) * per).min(first + n);
            if chunks.binary_search(&chunk).is_err() {
                match out.last_mut() {
                    Some((f, c)) if *f + *c == page => *c += end - page,
                    _ => out.push((page, end - page)),
                }
            }
            page = end;
        }
    }
    out
}

/// Guest RAM as the host maps it: one region's start and length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostRange {
    /// The region's first host address.
    pub addr: usize,
    /// Its length in bytes.
    pub len: usize,
}

/// Whether each page of `range` is in this process's page tables (or
/// swapped out): read from `/proc/self/pagemap` (bit 63 present, bit 62
/// swapped), which every process may read for itself.
pub(crate) fn resident_pages(pagemap: &File, range: HostRange) -> io::Result<Vec<bool>> {
    const AT_ONCE: usize = 4096;
    let pages = range.len / PAGE;
    let mut out = Vec::with_capacity(pages);
    let mut entries = Vec::with_capacity(AT_ONCE);
    let mut next = 0;
    while next < pages {
        let n = (pages - next).min(AT_ONCE);
        super::sparse::read_pagemap(pagemap, range.addr + next * PAGE, n, &mut entries)?;
        out.extend(entries.iter().map(|v| v & (3 << 62) != 0));
        next += n;
    }
    Ok(out)
}

/// Runs of `true` in `pages`, from `start`, in address order.
fn runs_of(pages: &[bool], seen: &mut [bool]) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < pages.len() {
        if pages[i] && !seen[i] {
            let first = i;
            while i < pages.len() && pages[i] && !seen[i] {
                seen[i] = true;
                i += 1;
            }
            runs.push((first as u64, (i - first) as u64));
        } else {
            i += 1;
        }
    }
    runs
}

/// Samples which guest pages are resident, on a thread of its own, from
/// restore until [`Recorder::finish`]: each sample adds the pages that
/// became resident since the one before, so the runs come out in the order
/// of first touch to within a sample.
pub(crate) struct Recorder {
    /// Closed by the owner, never by the thread: its filter has no
    /// `fcntl`, which debug builds of std call when a file closes.
    _pagemap: Arc<File>,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<RecorderState>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The guest memory it records, advised `MADV_RANDOM` meanwhile.
    range: HostRange,
}

struct RecorderState {
    seen: Vec<bool>,
    runs: Vec<(u64, u64)>,
    error: Option<io::Error>,
}

impl RecorderState {
    fn sample(&mut self, pagemap: &File, range: HostRange) {
        if self.error.is_some() {
            return;
        }
        match resident_pages(pagemap, range) {
            Ok(pages) => {
                let new = runs_of(&pages, &mut self.seen);
                self.runs.extend(new);
            }
            Err(e) => self.error = Some(e),
        }
    }
}

impl Recorder {
    /// How long the recorder waits between samples at first; it doubles up
    /// to [`MAX_INTERVAL`], so a long recording costs little.
    const FIRST_INTERVAL: Duration = Duration::from_millis(2);
    const MAX_INTERVAL: Duration = Duration::from_millis(50);

    /// Starts sampling `range` through `pagemap` on a thread of `kind`.
    pub(crate) fn start(
        pagemap: File,
        range: HostRange,
        filters: &Arc<crate::seccomp::ThreadFilters>,
    ) -> Result<Self, crate::Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(RecorderState {
            seen: vec![false; range.len / PAGE],
            runs: Vec::new(),
            error: None,
        }));
        let pagemap = Arc::new(pagemap);
        // No fault-around while recording: a fault maps only the page the
        // guest touched, not 15 neighbours, so the set holds what the guest
        // used and not what the host mapped around it.
        let _ = advise(range, 0, (range.len / PAGE) as u64, libc::MADV_RANDOM);
        // The first sample before the vCPUs run: what the restore itself
        // made resident comes first.
        lock(&state).sample(&pagemap, range);
        let thread = {
            let (stop, state, pagemap) = (stop.clone(), state.clone(), pagemap.clone());
            crate::seccomp::spawn_thread(
                "dormouse-wsrec",
                crate::seccomp::ThreadKind::Memory,
                filters,
                move || {
                    let mut interval = Self::FIRST_INTERVAL;
                    let mut last = Instant::now();
                    while !stop.load(Ordering::Acquire) {
                        std::thread::park_timeout(interval.saturating_sub(last.elapsed()));
                        if last.elapsed() < interval && !stop.load(Ordering::Acquire) {
                            continue;
                        }
                        last = Instant::now();
                        lock(&state).sample(&pagemap, range);
                        interval = (interval * 2).min(Self::MAX_INTERVAL);
                    }
                    // The last sample: everything touched until finish().
                    lock(&state).sample(&pagemap, range);
                },
            )?
        };
        Ok(Self {
            _pagemap: pagemap,
            stop,
            state,
            thread: Some(thread),
            range,
        })
    }

    /// Stops sampling (after a last sample) and returns the runs in the
    /// order of first touch.
    pub(crate) fn finish(mut self) -> io::Result<Vec<(u64, u64)>> {
        self.stop_thread();
        let mut state = lock(&self.state);
        if let Some(e) = state.error.take() {
            return Err(e);
        }
        Ok(std::mem::take(&mut state.runs))
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
            let range = self.range;
            let _ = advise(range, 0, (range.len / PAGE) as u64, libc::MADV_NORMAL);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while sampling leaves plain data behind: keep using it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loads a working set into guest memory on a thread of its own while the
/// vCPUs run: first `MADV_WILLNEED` over every run in address order (the
/// reads go to the disk at once, in large requests), then
/// `MADV_POPULATE_READ` run by run in the order of first touch, which maps
/// each page into the guest memory mapping so that the guest's first touch
/// finds it there. Dropped, it stops between two runs.
pub(crate) struct Prefetcher {
    stop: Arc<AtomicBool>,
    loaded: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// What keeps guest memory mapped while the thread runs; dropped by
    /// the owner after the thread ended, never by the thread (whose filter
    /// has no `fcntl`, which debug builds of std call when a file closes).
    _keep: Box<dyn Send>,
}

/// The most one `madvise` call covers, so that a stop request is seen soon.
const CHUNK: usize = 2 << 20;

impl Prefetcher {
    /// Starts loading `runs` of guest memory mapped at `range`, counting
    /// from `already` pages loaded. The
    /// mapping must stay valid while the thread runs: `keep` holds it.
    pub(crate) fn start<K: Send + 'static>(
        runs: Vec<(u64, u64)>,
        already: u64,
        range: HostRange,
        keep: K,
        filters: &Arc<crate::seccomp::ThreadFilters>,
    ) -> Result<Self, crate::Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let loaded = Arc::new(std::sync::atomic::AtomicU64::new(already));
        let thread = {
            let (stop, loaded) = (stop.clone(), loaded.clone());
            crate::seccomp::spawn_thread(
                "dormouse-prefetch",
                crate::seccomp::ThreadKind::Memory,
                filters,
                move || {
                    let started = Instant::now();
                    let result = prefetch(&runs, range, &stop, &loaded);
                    match result {
                        Ok(pages) => log::debug!(
                            "prefetched {pages} working-set pages in {:?}",
                            started.elapsed()
                        ),
                        Err(e) => log::warn!(
                            "the working-set prefetch stopped ({e}); the rest loads on demand"
                        ),
                    }
                },
            )?
        };
        Ok(Self {
            stop,
            loaded,
            thread: Some(thread),
            _keep: Box::new(keep),
        })
    }

    /// Waits until the prefetch has finished; returns the pages it loaded.
    pub(crate) fn wait(mut self) -> u64 {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.loaded.load(Ordering::Acquire)
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher").finish_non_exhaustive()
    }
}

/// `madvise` over `[addr, addr + len)` of the guest mapping.
fn advise(range: HostRange, first: u64, count: u64, advice: libc::c_int) -> io::Result<()> {
    let page = PAGE;
    let (Ok(first), Ok(count)) = (usize::try_from(first), usize::try_from(count)) else {
        return Err(io::Error::other("a working-set run past guest memory"));
    };
    // WorkingSet::check bounded every run by the snapshot's memory size,
    // which is the mapping's: stay inside it all the same.
    if first.saturating_add(count) > range.len / page {
        return Err(io::Error::other("a working-set run past guest memory"));
    }
    let addr = range.addr + first * page;
    // SAFETY: [addr, addr + count pages) lies inside the guest memory
    // mapping (checked above), which the caller keeps mapped while this
    // runs. madvise with these advices changes no byte of it: WILLNEED
    // starts page-cache reads, POPULATE_READ maps pages as a read would,
    // RANDOM and NORMAL only set how faults read around a page.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, count * page, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Splits runs into pieces of at most [`CHUNK`] bytes.
fn chunks(runs: &[(u64, u64)]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let per = (CHUNK as u64) / PAGE_SIZE;
    runs.iter().flat_map(move |&(first, count)| {
        (0..count.div_ceil(per)).map(move |i| {
            let start = first + i * per;
            (start, per.min(first + count - start))
        })
    })
}

fn prefetch(
    runs: &[(u64, u64)],
    range: HostRange,
    stop: &AtomicBool,
    loaded: &std::sync::atomic::AtomicU64,
) -> io::Result<u64> {
    let mut sorted = runs.to_vec();
    sorted.sort_unstable();
    for (first, count) in chunks(&sorted) {
        if stop.load(Ordering::Acquire) {
            return Ok(0);
        }
        advise(range, first, count, libc::MADV_WILLNEED)?;
    }
    let mut pages = loaded.load(Ordering::Acquire);
    for (first, count) in chunks(runs) {
        if stop.load(Ordering::Acquire) {
            break;
        }
        advise(range, first, count, libc::MADV_POPULATE_READ)?;
        pages += count;
        loaded.store(pages, Ordering::Release);
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> SnapshotId {
        SnapshotId([n; 16])
    }

    fn sample() -> WorkingSet {
        WorkingSet::new(id(7), 64 * PAGE_SIZE, vec![(10, 3), (2, 1), (40, 24)]).unwrap()
    }

    #[test]
    fn a_working_set_round_trips_in_its_order() {
        let set = sample();
        let back = WorkingSet::decode(&set.encode()).unwrap();
        assert_eq!(back, set);
        assert_eq!(back.runs(), &[(10, 3), (2, 1), (40, 24)]);
        assert_eq!(back.pages(), 28);
    }

    #[test]
    fn every_kind_of_damage_is_its_own_error() {
        let good = sample().encode();
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert!(matches!(
            WorkingSet::decode(&magic),
            Err(WorkingSetError::BadMagic)
        ));
        let mut version = good.clone();
        version[8] = 2;
        assert!(matches!(
            WorkingSet::decode(&version),
            Err(WorkingSetError::Version((2, 0)))
        ));
        assert!(matches!(
            WorkingSet::decode(&good[..good.len() - 1]),
            Err(WorkingSetError::Length { .. })
        ));
        assert!(matches!(
            WorkingSet::decode(&good[..20]),
            Err(WorkingSetError::Length { .. })
        ));
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 3] ^= 0x40;
        assert!(matches!(
            WorkingSet::decode(&flipped),
            Err(WorkingSetError::Corrupt { .. })
        ));
        // Well-formed bytes that say impossible things.
        for runs in [
            vec![(60, 5)],
            vec![(1, 0)],
            vec![(2, 4), (5, 1)],
            vec![(u64::MAX, 2)],
        ] {
            let bad = WorkingSet {
                snapshot: id(1),
                memory_size: 64 * PAGE_SIZE,
                runs,
            };
            assert!(matches!(
                WorkingSet::decode(&bad.encode()),
                Err(WorkingSetError::Inconsistent(_))
            ));
        }
    }

    #[test]
    fn resident_pages_and_runs_follow_what_was_touched() {
        let pages = 32;
        let len = pages * PAGE;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end;
        // nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let range = HostRange {
            addr: addr as usize,
            len,
        };
        for p in [3usize, 4, 5, 20] {
            // SAFETY: inside the mapping above.
            unsafe { *(addr as *mut u8).add(p * PAGE) = 1 };
        }
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let resident = resident_pages(&pagemap, range).unwrap();
        let mut seen = vec![false; pages];
        assert_eq!(runs_of(&resident, &mut seen), vec![(3, 3), (20, 1)]);
        // Seen pages are not reported twice.
        assert_eq!(runs_of(&resident, &mut seen), vec![]);
        // SAFETY: the mapping made above, not used after this.
        unsafe { libc::munmap(addr, len) };
    }

    /// A guest memory of four 2 MiB chunks mapped as a restore maps a
    /// chain (the base file, a diff's runs over it) in `dir`, a working
    /// set dense in chunks 0, 1 and 3; `install_huge` must leave every
    /// byte as it was, with the dense chunks in anonymous memory.
    fn install_keeps_every_byte(dir: &Path, with_source: bool) {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::FileExt as _;
        let pages = 4 * HUGE_PAGE / PAGE;
        let len = pages * PAGE;
        let offset = 2 * PAGE as u64; // where guest RAM starts in the files
        let diff_runs = vec![(600u64, 10u64), (1030, 3)];
        let name = |what: &str| dir.join(format!("dormouse-install-{what}-{}", std::process::id()));
        let open = |path: &Path| {
            let _ = std::fs::remove_file(path);
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .unwrap()
        };
        let (base_path, diff_path) = (name("base"), name("diff"));
        let (base, diff) = (open(&base_path), open(&diff_path));
        let page_of = |layer: u8, page: usize| {
            let mut bytes = vec![layer; PAGE];
            bytes[..8].copy_from_slice(&(page as u64).to_le_bytes());
            bytes
        };
        for page in 0..pages {
            base.write_all_at(&page_of(1, page), offset + (page * PAGE) as u64)
                .unwrap();
        }
        diff.set_len(offset + len as u64).unwrap();
        for &(first, n) in &diff_runs {
            for page in first..first + n {
                let page = usize::try_from(page).unwrap();
                diff.write_all_at(&page_of(2, page), offset + (page * PAGE) as u64)
                    .unwrap();
            }
        }
        // Out of the page cache where the file system keeps it elsewhere:
        // chunks then come straight from the disk.
        base.sync_all().unwrap();
        // DONTNEED skips pages still sitting in another CPU's LRU batch:
        // advise until the file has no page in the cache (checked with
        // mincore on a shared mapping), or give up on checking O_DIRECT.
        let file_len = usize::try_from(offset).unwrap() + len;
        let uncached = (0..50).any(|_| {
            // SAFETY: advice on a file this test owns; no memory involved.
            unsafe { libc::posix_fadvise(base.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            // SAFETY: a new read-only shared mapping of the whole file,
            // only passed to mincore and unmapped right after.
            let view = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    file_len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    base.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(view, libc::MAP_FAILED);
            let mut resident = vec![0u8; file_len.div_ceil(PAGE)];
            // SAFETY: `resident` has one byte per page of the mapping.
            let rc = unsafe { libc::mincore(view, file_len, resident.as_mut_ptr()) };
            // SAFETY: the mapping made above; nothing refers to it.
            unsafe { libc::munmap(view, file_len) };
            let empty = rc == 0 && resident.iter().all(|r| r & 1 == 0);
            if !empty {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            empty
        });
        // SAFETY: statfs into a zeroed struct of the right type.
        let on_disk = unsafe {
            let mut fs: libc::statfs = std::mem::zeroed();
            let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
            libc::statfs(path.as_ptr(), &mut fs) == 0 && fs.f_type != libc::TMPFS_MAGIC
        };
        if on_disk && with_source && !uncached {
            eprintln!("the page cache kept {dir:?}'s pages: O_DIRECT not checked");
        }
        // SAFETY: a new PROT_NONE mapping at an address the kernel
        // picks, unmapped at the end; the file mappings replace parts of
        // it, so no other thread's mapping can land in between.
        let reserved = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + HUGE_PAGE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(reserved, libc::MAP_FAILED);
        let addr = (reserved as usize).next_multiple_of(HUGE_PAGE);
        let map = |file: &File, first: usize, n: usize| {
            // SAFETY: maps over [addr + first pages, + n pages), inside
            // the reservation above, which only this test uses.
            let got = unsafe {
                libc::mmap(
                    (addr + first * PAGE) as *mut libc::c_void,
                    n * PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    libc::off_t::try_from(offset + (first * PAGE) as u64).unwrap(),
                )
            };
            assert_eq!(got as usize, addr + first * PAGE);
        };
        map(&base, 0, pages);
        for &(first, n) in &diff_runs {
            map(
                &diff,
                usize::try_from(first).unwrap(),
                usize::try_from(n).unwrap(),
            );
        }
        let range = HostRange { addr, len };
        let source = super::super::sparse::MemorySource::of_chain(
            [
                (base.try_clone().unwrap(), PathBuf::from("base"), None),
                (
                    diff.try_clone().unwrap(),
                    PathBuf::from("diff"),
                    Some(vec![diff_runs.clone()]),
                ),
            ],
            vec![super::super::MemoryRegionState {
                guest_addr: 0,
                size: len as u64,
                file_offset: offset,
            }],
        );
        let set = WorkingSet::new(
            id(1),
            len as u64,
            vec![(1536, 64), (0, 40), (590, 40), (1030, 10)],
        )
        .unwrap();
        let filters = crate::seccomp::ThreadFilters::disabled();
        let (covered, chunks) = install_huge(
            &set,
            range,
            len as u64,
            with_source.then_some(&source),
            &filters,
        )
        .unwrap();
        assert_eq!(chunks, vec![0, 1, 3]);
        assert_eq!(covered, 64 + 40 + 40);
        if on_disk && with_source && uncached {
            // Read with O_DIRECT: chunk 3 did not go through the cache.
            let mut byte = [0u8; 1];
            let iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            let at = offset + (1600 * PAGE) as u64;
            // SAFETY: reads one byte into `byte`.
            let n = unsafe {
                libc::preadv2(
                    base.as_raw_fd(),
                    &iov,
                    1,
                    at.cast_signed(),
                    libc::RWF_NOWAIT,
                )
            };
            assert_eq!(n, -1, "chunk 3 went through the page cache");
        }
        for page in 0..pages {
            let layer = if diff_runs
                .iter()
                .any(|&(f, n)| (f..f + n).contains(&(page as u64)))
            {
                2
            } else {
                1
            };
            // SAFETY: a page of the mapping made above, still mapped.
            let got =
                unsafe { std::slice::from_raw_parts((addr + page * PAGE) as *const u8, PAGE) };
            assert!(
                got == page_of(layer, page).as_slice(),
                "page {page} changed"
            );
        }
        // Installed chunks are anonymous memory now, the rest still file.
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let flags = |page: usize| {
            let mut entry = [0u8; 8];
            pagemap
                .read_exact_at(&mut entry, ((addr / PAGE + page) * 8) as u64)
                .unwrap();
            u64::from_le_bytes(entry)
        };
        assert_eq!(flags(5) & (1 << 61), 0, "chunk 0 still maps the file");
        assert_ne!(flags(1030) & (1 << 61), 0, "chunk 2 was moved");
        // SAFETY: the mappings made above, not used after this.
        unsafe { libc::munmap(reserved, len + HUGE_PAGE) };
        let _ = std::fs::remove_file(base_path);
        let _ = std::fs::remove_file(diff_path);
    }

    #[test]
    fn install_huge_reads_the_newest_layer_of_each_page() {
        // A disk file system (O_DIRECT reads), tmpfs (page cache only),
        // and the copy through the mapping.
        install_keeps_every_byte(&std::env::temp_dir(), true);
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            install_keeps_every_byte(shm, true);
        }
        install_keeps_every_byte(&std::env::temp_dir(), false);
    }

    #[test]
    fn chunks_split_long_runs() {
        let per = CHUNK as u64 / PAGE_SIZE;
        let got: Vec<_> = chunks(&[(5, 2 * per + 1), (1, 1)]).collect();
        assert_eq!(
            got,
            vec![(5, per), (5 + per, per), (5 + 2 * per, 1), (1, 1)]
        );
    }
}
