//! Sparse memory files: a full snapshot writes only the guest pages that
//! hold data, and a restored VM's snapshot costs what changed since.
//!
//! The writer reads the host's page tables of the guest mapping from
//! `/proc/self/pagemap` (8 bytes a page: bit 63 present, bit 62 swapped,
//! bit 61 a file page or shared anonymous memory; every process may read
//! its own) and sorts each page into one of three kinds:
//!
//! - **not in the page tables**: the process never touched it. In a VM
//!   built fresh (anonymous memory) it reads as zeros and becomes a hole;
//!   in a VM restored from a snapshot (memory files mapped `MAP_PRIVATE`)
//!   it still holds its file's bytes, so the range is taken file to file
//!   ([`MemorySource`]);
//! - **a file page**: restored and read since, never written: also taken
//!   file to file;
//! - **anonymous, present or swapped**: the guest or a device wrote it (or
//!   it is a fresh VM's memory): copied from guest memory, 4 KiB at a
//!   time, and a page of zeros becomes a hole.
//!
//! File to file is a reflink where the filesystem has one
//! (`ioctl(FICLONERANGE)`: xfs, btrfs), else `copy_file_range`, else a read
//! and a write; the source's holes (`SEEK_DATA`/`SEEK_HOLE`) stay holes.
//! An untouched page is never read through the guest mapping, which would
//! fault it in and grow the process's memory.
//!
//! The memory file's format does not change: a hole reads as zeros, and a
//! restore maps the file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::MemoryRegionState;
use crate::arch::aarch64::layout::PAGE_SIZE;
use crate::memory::GuestMemoryMmap;

/// The page size as a buffer length.
#[allow(clippy::cast_possible_truncation)] // 4096 fits every usize
const PAGE: usize = PAGE_SIZE as usize;
/// pagemap: the page is in the page tables.
const PRESENT: u64 = 1 << 63;
/// pagemap: the page is in swap (only anonymous pages are).
const SWAPPED: u64 = 1 << 62;
/// pagemap: a page-cache page (or shared anonymous memory).
const FILE_PAGE: u64 = 1 << 61;
/// Pages read from pagemap (and classified) at a time.
const PAGEMAP_BATCH: usize = 4096;
/// Guest pages copied through one buffer at a time.
const COPY_PAGES: usize = 64;

/// One memory file a restored VM's guest memory is mapped from.
#[derive(Debug)]
struct SourceLayer {
    file: File,
    /// Per memory region, the page runs `(first, count)` this file backs
    /// (a diff's); `None` for the chain's base, which backs every page.
    runs: Option<Vec<Vec<(u64, u64)>>>,
    /// Where it was opened, for errors.
    path: PathBuf,
    /// Its size and modification time when the VM was restored (`None`
    /// if it could not be read then).
    seen: Option<Fingerprint>,
}

/// What changes when a file's bytes are written or it is truncated: its
/// size and modification time (not its change time, which an unlink or a
/// rename of the file also moves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Fingerprint {
    fn of(file: &File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self {
            len: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

/// Which memory file backs which guest page of a VM restored from a
/// snapshot or a chain: the files stay open, so they are the bytes the
/// guest mapping still reads, even if their directories were replaced.
#[derive(Debug)]
pub(crate) struct MemorySource {
    /// Where each memory region lies in every layer's file (a chain's
    /// layers share one layout).
    regions: Vec<MemoryRegionState>,
    /// Base first, then each diff; the newest holding a page wins.
    layers: Vec<SourceLayer>,
}

impl MemorySource {
    /// The files of a restored chain, oldest first, each with its diff runs
    /// (`None` for the base), laid out as `regions`.
    // Only aarch64 hosts restore VMs.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) fn of_chain(
        layers: impl IntoIterator<Item = (File, PathBuf, Option<Vec<Vec<(u64, u64)>>>)>,
        regions: Vec<MemoryRegionState>,
    ) -> Self {
        Self {
            regions,
            layers: layers
                .into_iter()
                .map(|(file, path, runs)| SourceLayer {
                    seen: Fingerprint::of(&file).ok(),
                    file,
                    runs,
                    path,
                })
                .collect(),
        }
    }

    /// The first memory file whose size or modification time is not what
    /// it was at the restore (one `fstat` per file): written or truncated
    /// in place since, so guest pages not yet touched may read bytes the
    /// snapshot never held. A file replaced by a new one (a rename over
    /// it) is not changed: the VM keeps the one it opened.
    pub(crate) fn changed_file(&self) -> Option<&Path> {
        self.layers
            .iter()
            .find(|l| l.seen.is_none() || Fingerprint::of(&l.file).ok() != l.seen)
            .map(|l| l.path.as_path())
    }

    /// Where the bytes of pages `[first, first + count)` of memory region
    /// `region` lie: `(file, offset in it, pages)` pieces in page order,
    /// each from the newest layer that holds its pages. `None` for a
    /// region the snapshot does not have.
    pub(crate) fn pieces(
        &self,
        region: usize,
        first: u64,
        count: u64,
    ) -> Option<Vec<(&File, u64, u64)>> {
        let offset = self.regions.get(region)?.file_offset;
        let mut cursors = self.cursors(region);
        for cursor in &mut cursors {
            // Straight to the first run that can hold `first`.
            cursor.next = cursor
                .runs
                .partition_point(|&(f, n)| f.saturating_add(n) <= first);
        }
        let mut pieces: Vec<(usize, u64, u64)> = Vec::new();
        for page in first..first.checked_add(count)? {
            let layer = owner(&mut cursors, page);
            match pieces.last_mut() {
                Some((l, _, n)) if *l == layer => *n += 1,
                _ => pieces.push((layer, page, 1)),
            }
        }
        pieces
            .into_iter()
            .map(|(layer, page, n)| {
                let at = page.checked_mul(PAGE_SIZE)?.checked_add(offset)?;
                Some((&self.layers.get(layer)?.file, at, n))
            })
            .collect()
    }

    /// Every layer's file, oldest first.
    pub(crate) fn files(&self) -> impl Iterator<Item = &File> {
        self.layers.iter().map(|l| &l.file)
    }

    /// For each layer, its runs in `region` (the base: none, it holds all).
    fn cursors(&self, region: usize) -> Vec<Cursor<'_>> {
        self.layers
            .iter()
            .map(|l| Cursor {
                runs: l
                    .runs
                    .as_ref()
                    .and_then(|r| r.get(region))
                    .map_or(&[][..], Vec::as_slice),
                next: 0,
            })
            .collect()
    }
}

/// Walks one layer's sorted runs as the pages are visited in order.
struct Cursor<'a> {
    runs: &'a [(u64, u64)],
    next: usize,
}

impl Cursor<'_> {
    /// Whether the runs hold `page`; pages must be asked in rising order.
    fn holds(&mut self, page: u64) -> bool {
        while let Some(&(first, count)) = self.runs.get(self.next) {
            if page < first {
                return false;
            }
            if page < first.saturating_add(count) {
                return true;
            }
            self.next += 1;
        }
        false
    }
}

/// Which layer (index into [`MemorySource::layers`]) backs `page`.
fn owner(cursors: &mut [Cursor<'_>], page: u64) -> usize {
    // The newest diff holding the page, else the base.
    (1..cursors.len())
        .rev()
        .find(|&i| cursors[i].holds(page))
        .unwrap_or(0)
}

/// Where a run of pages comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Zeros: nothing to write.
    Hole,
    /// Guest memory (the pages are resident or swapped).
    Guest,
    /// Layer `n`'s file.
    File(usize),
}

/// What a sparse write put into the file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SparseStats {
    /// Bytes copied from guest memory (pages that are not all zeros).
    pub(crate) from_guest: u64,
    /// Bytes of data taken from the memory files the VM was restored from.
    pub(crate) from_files: u64,
}

/// Copies file ranges, remembering which kernel mechanism works here.
#[derive(Debug)]
struct RangeCopier {
    clone: bool,
    copy_file_range: bool,
    buf: Vec<u8>,
}

impl RangeCopier {
    fn new() -> Self {
        Self {
            clone: true,
            copy_file_range: true,
            buf: Vec::new(),
        }
    }

    /// Copies the data of `src[src_off..src_off + len)` to `dst` at
    /// `dst_off`, leaving the source's holes as holes in `dst` (which must
    /// read as zeros there). Returns the data bytes copied.
    fn copy_sparse(
        &mut self,
        src: &File,
        src_off: u64,
        len: u64,
        dst: &File,
        dst_off: u64,
    ) -> io::Result<u64> {
        let end = src_off.saturating_add(len);
        let mut pos = src_off;
        let mut copied = 0;
        while pos < end {
            let Some(data) = seek(src, pos, libc::SEEK_DATA)? else {
                break; // only holes up to the end of the file
            };
            if data >= end {
                break;
            }
            let hole = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            self.copy_range(src, data, dst, dst_off + (data - src_off), hole - data)?;
            copied += hole - data;
            pos = hole;
        }
        Ok(copied)
    }

    /// Copies `len` bytes at `src_off` to `dst_off`: a reflink, else
    /// `copy_file_range`, else a read and a write.
    fn copy_range(
        &mut self,
        src: &File,
        src_off: u64,
        dst: &File,
        dst_off: u64,
        len: u64,
    ) -> io::Result<()> {
        if self.clone {
            match clone_range(src, src_off, dst, dst_off, len) {
                Ok(()) => return Ok(()),
                Err(e) if not_supported(&e) => self.clone = false,
                Err(e) => return Err(e),
            }
        }
        let (mut src_off, mut dst_off, mut left) = (src_off, dst_off, len);
        while self.copy_file_range && left > 0 {
            match copy_file_range(src, src_off, dst, dst_off, left) {
                Ok(0) => return Err(short_source()),
                Ok(n) => {
                    src_off += n;
                    dst_off += n;
                    left -= n;
                }
                // Only before the first byte: then nothing was copied yet
                // by this mechanism for this range.
                Err(e) if not_supported(&e) && left == len => self.copy_file_range = false,
                Err(e) => return Err(e),
            }
        }
        if left == 0 {
            return Ok(());
        }
        if self.buf.is_empty() {
            self.buf = vec![0; 1 << 20];
        }
        while left > 0 {
            let n = usize::try_from(left).map_or(self.buf.len(), |l| l.min(self.buf.len()));
            src.read_exact_at(&mut self.buf[..n], src_off)?;
            dst.write_all_at(&self.buf[..n], dst_off)?;
            (src_off, dst_off, left) = (src_off + n as u64, dst_off + n as u64, left - n as u64);
        }
        Ok(())
    }
}

/// The error for a source file that ends inside a range it should hold.
fn short_source() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "a memory file the VM was restored from is shorter than its snapshot said",
    )
}

/// Errors that say "this filesystem or kernel cannot do that", after which
/// a slower mechanism does the copy.
fn not_supported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EOPNOTSUPP
                | libc::ENOTTY
                | libc::EXDEV
                | libc::ENOSYS
                | libc::EINVAL
                | libc::EBADF
                | libc::ETXTBSY
        )
    )
}

/// `lseek(fd, offset, whence)`; `None` where SEEK_DATA finds no more data
/// (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: lseek on an fd we own; it touches no memory of ours.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(u64::try_from(at).map_err(io::Error::other)?))
}

/// `struct file_clone_range` of linux/fs.h.
#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// `FICLONERANGE`: `_IOW(0x94, 13, struct file_clone_range)`, the same
/// number on every architecture with the generic ioctl encoding.
const FICLONERANGE: u64 =
    (1 << 30) | ((std::mem::size_of::<FileCloneRange>() as u64) << 16) | (0x94 << 8) | 13;

/// Shares `len` bytes of `src` at `src_off` into `dst` at `dst_off`
/// (a reflink: no data copied).
fn clone_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<()> {
    let arg = FileCloneRange {
        src_fd: src.as_raw_fd().into(),
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    // SAFETY: FICLONERANGE reads a struct file_clone_range, which `arg`
    // is (repr(C), the kernel's layout), alive across the call; it changes
    // only the destination file's extents, no memory of ours.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONERANGE as _, &arg) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One `copy_file_range(2)` call; returns the bytes copied.
fn copy_file_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<u64> {
    let mut off_in = libc::loff_t::try_from(src_off).map_err(io::Error::other)?;
    let mut off_out = libc::loff_t::try_from(dst_off).map_err(io::Error::other)?;
    let len = usize::try_from(len).unwrap_or(usize::MAX).min(1 << 30);
    // SAFETY: both offsets are loff_t values that live across the call,
    // which the kernel reads and updates; the fds are ours. No other
    // memory is touched.
    let n = unsafe {
        libc::syscall(
            libc::SYS_copy_file_range,
            src.as_raw_fd(),
            &mut off_in as *mut libc::loff_t,
            dst.as_raw_fd(),
            &mut off_out as *mut libc::loff_t,
            len,
            0u32,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        u64::try_from(n).map_err(io::Error::other)
    }
}

/// Reads the pagemap entries of `count` pages from host address `addr`.
pub(super) fn read_pagemap(
    pagemap: &File,
    addr: usize,
    count: usize,
    out: &mut Vec<u64>,
) -> io::Result<()> {
    let mut bytes = vec![0u8; count * 8];
    let offset = (addr / PAGE) as u64 * 8;
    pagemap
        .read_exact_at(&mut bytes, offset)
        .map_err(|e| io::Error::new(e.kind(), format!("reading /proc/self/pagemap: {e}")))?;
    out.clear();
    out.extend(bytes.chunks_exact(8).map(|e| {
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        u64::from_le_bytes(b)
    }));
    Ok(())
}

/// Whether a page holds nothing but zeros.
fn is_zero(page: &[u8]) -> bool {
    // Word by word: the compiler vectorises this.
    let (head, words, tail) = {
        // SAFETY: any bytes are a valid u64; align_to keeps every byte in
        // exactly one of the three slices.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && words.iter().fold(0, |a, &w| a | w) == 0
        && tail.iter().all(|&b| b == 0)
}

/// Writes guest memory into `file` as a sparse memory file laid out as
/// `layout`: the file gets its full size, and only pages that hold data
/// are written (see the module docs). `source` says which files back the
/// memory of a restored VM (`None`: the memory is anonymous, a fresh VM's).
/// The VM must be paused: nothing may write guest memory meanwhile.
pub(crate) fn write_sparse(
    memory: &GuestMemoryMmap,
    layout: &[MemoryRegionState],
    source: Option<&MemorySource>,
    file: &File,
) -> io::Result<SparseStats> {
    let len = layout
        .iter()
        .map(|r| r.file_offset.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    file.set_len(len)?;
    let pagemap = match File::open("/proc/self/pagemap") {
        Ok(f) => Some(f),
        Err(e) => {
            log::warn!(
                "cannot read /proc/self/pagemap ({e}): the snapshot reads every guest page \
                 (zero pages still become holes)"
            );
            None
        }
    };
    let mut writer = Writer {
        memory,
        file,
        copier: RangeCopier::new(),
        buf: vec![0; COPY_PAGES * PAGE],
        stats: SparseStats::default(),
    };
    for (index, (region, out)) in memory.iter().zip(layout).enumerate() {
        // A source laid out otherwise cannot back this memory: copy it.
        let source = source.filter(|s| s.regions.get(index).map(|r| r.size) == Some(out.size));
        let host = region.as_ptr() as usize;
        let pages = usize::try_from(region.len()).map_err(io::Error::other)? / PAGE;
        let mut cursors = source.map(|s| s.cursors(index));
        let mut entries = Vec::with_capacity(PAGEMAP_BATCH);
        // The run being gathered: its kind, first page, page count.
        let mut run: Option<(Kind, u64, u64)> = None;
        let mut page = 0;
        while page < pages {
            let n = (pages - page).min(PAGEMAP_BATCH);
            match &pagemap {
                Some(pm) => read_pagemap(pm, host + page * PAGE, n, &mut entries)?,
                None => {
                    entries.clear();
                    entries.resize(n, PRESENT);
                }
            }
            for (i, &entry) in entries.iter().enumerate() {
                let p = (page + i) as u64;
                let written =
                    entry & SWAPPED != 0 || (entry & PRESENT != 0 && entry & FILE_PAGE == 0);
                let kind = match (&mut cursors, written) {
                    (_, true) => Kind::Guest,
                    (Some(c), false) => Kind::File(owner(c, p)),
                    (None, false) if entry & PRESENT != 0 => Kind::Guest,
                    (None, false) => Kind::Hole,
                };
                run = match run {
                    Some((k, first, count)) if k == kind => Some((k, first, count + 1)),
                    Some(done) => {
                        writer.flush(done, index, region.start_addr(), out, source)?;
                        Some((kind, p, 1))
                    }
                    None => Some((kind, p, 1)),
                };
            }
            page += n;
        }
        if let Some(done) = run {
            writer.flush(done, index, region.start_addr(), out, source)?;
        }
    }
    Ok(writer.stats)
}

/// The state of one sparse write.
struct Writer<'a> {
    memory: &'a GuestMemoryMmap,
    file: &'a File,
    copier: RangeCopier,
    buf: Vec<u8>,
    stats: SparseStats,
}

impl Writer<'_> {
    /// Writes one run of pages of memory region `index`, which starts at
    /// guest address `start` and is laid out in the file as `out`.
    fn flush(
        &mut self,
        (kind, first, count): (Kind, u64, u64),
        index: usize,
        start: GuestAddress,
        out: &MemoryRegionState,
        source: Option<&MemorySource>,
    ) -> io::Result<()> {
        match kind {
            Kind::Hole => Ok(()),
            Kind::File(layer) => {
                let Some((layer, region)) =
                    source.and_then(|s| Some((s.layers.get(layer)?, s.regions.get(index)?)))
                else {
                    // Cannot happen (the kind came from the source); copy
                    // from guest memory rather than lose the pages.
                    return self.flush((Kind::Guest, first, count), index, start, out, None);
                };
                let copied = self.copier.copy_sparse(
                    &layer.file,
                    region.file_offset + first * PAGE_SIZE,
                    count * PAGE_SIZE,
                    self.file,
                    out.file_offset + first * PAGE_SIZE,
                )?;
                self.stats.from_files += copied;
                Ok(())
            }
            Kind::Guest => {
                let mut page = first;
                let end = first + count;
                let mut data_pages = [false; COPY_PAGES];
                while page < end {
                    // At most COPY_PAGES: fits a usize.
                    let n = usize::try_from((end - page).min(COPY_PAGES as u64))
                        .map_err(io::Error::other)?;
                    let bytes = &mut self.buf[..n * PAGE];
                    self.memory
                        .read_slice(bytes, GuestAddress(start.0 + page * PAGE_SIZE))
                        .map_err(io::Error::other)?;
                    for (d, p) in data_pages.iter_mut().zip(bytes.chunks_exact(PAGE)) {
                        *d = !is_zero(p);
                    }
                    // Each run of pages that are not all zeros, in one write.
                    let mut i = 0;
                    while i < n {
                        if !data_pages[i] {
                            i += 1;
                            continue;
                        }
                        let from = i;
                        while i < n && data_pages[i] {
                            i += 1;
                        }
                        let data = &bytes[from * PAGE..i * PAGE];
                        self.file.write_all_at(
                            data,
                            out.file_offset + (page + from as u64) * PAGE_SIZE,
                        )?;
                        self.stats.from_guest += data.len() as u64;
                    }
                    page += n as u64;
                }
                Ok(())
            }
        }
    }
}

/// Copies the first `len` bytes of `src` into `dst` (which reads as zeros
/// there, e.g. just sized with `set_len`), keeping `src`'s holes as holes.
/// Returns the data bytes copied.
pub(crate) fn copy_file_sparse(src: &File, dst: &File, len: u64) -> io::Result<u64> {
    RangeCopier::new().copy_sparse(src, 0, len, dst, 0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};

    use super::*;
    use crate::DRAM_START;

    const PAGES: u64 = 64;

    fn temp_file(name: &str) -> (std::path::PathBuf, File) {
        let path =
            std::env::temp_dir().join(format!("dormouse-sparse-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    fn layout() -> Vec<MemoryRegionState> {
        vec![MemoryRegionState {
            guest_addr: DRAM_START.0,
            size: PAGES * PAGE_SIZE,
            file_offset: 0,
        }]
    }

    fn page_addr(page: u64) -> GuestAddress {
        GuestAddress(DRAM_START.0 + page * PAGE_SIZE)
    }

    /// The file's data extents, in pages `(first, count)`, from SEEK_DATA
    /// and SEEK_HOLE.
    fn data_map(file: &File) -> Vec<(u64, u64)> {
        let len = file.metadata().unwrap().len();
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(data) = seek(file, pos, libc::SEEK_DATA).unwrap() {
            if data >= len {
                break;
            }
            let hole = seek(file, data, libc::SEEK_HOLE).unwrap().unwrap_or(len);
            out.push((data / PAGE_SIZE, (hole - data) / PAGE_SIZE));
            pos = hole;
        }
        out
    }

    fn allocated(file: &File) -> u64 {
        file.metadata().unwrap().blocks() * 512
    }

    /// Whether the host page behind a guest page is in the page tables.
    fn resident(memory: &GuestMemoryMmap, page: u64) -> bool {
        let region = memory.iter().next().unwrap();
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let mut entry = Vec::new();
        let addr = region.as_ptr() as usize + usize::try_from(page).unwrap() * PAGE;
        read_pagemap(&pagemap, addr, 1, &mut entry).unwrap();
        entry[0] & PRESENT != 0
    }

    /// Asserts the file holds exactly guest memory.
    fn assert_same(memory: &GuestMemoryMmap, file: &File) {
        let mut want = vec![0u8; PAGE];
        let mut got = vec![0u8; PAGE];
        for page in 0..PAGES {
            memory.read_slice(&mut want, page_addr(page)).unwrap();
            file.read_exact_at(&mut got, page * PAGE_SIZE).unwrap();
            assert!(want == got, "page {page} differs");
        }
    }

    #[test]
    fn a_fresh_vms_untouched_and_zero_pages_become_holes() {
        let memory = crate::memory::create(PAGES * PAGE_SIZE).unwrap();
        for (page, fill) in [(1, 0x11u8), (2, 0x22), (5, 0x55), (40, 0x40)] {
            memory.write_slice(&[fill; PAGE], page_addr(page)).unwrap();
        }
        // Touched, but zeros: written, and read.
        memory.write_slice(&[0; PAGE], page_addr(10)).unwrap();
        memory.read_obj::<u64>(page_addr(20)).unwrap();
        assert!(resident(&memory, 10) && resident(&memory, 20));
        assert!(!resident(&memory, 30));

        let (path, file) = temp_file("fresh");
        let stats = write_sparse(&memory, &layout(), None, &file).unwrap();
        assert_eq!(file.metadata().unwrap().len(), PAGES * PAGE_SIZE);
        assert_eq!(data_map(&file), [(1, 2), (5, 1), (40, 1)]);
        let data = 4 * PAGE_SIZE;
        assert_eq!(
            stats,
            SparseStats {
                from_guest: data,
                from_files: 0
            }
        );
        assert!(
            (data..data + 2 * PAGE_SIZE).contains(&allocated(&file)),
            "{} bytes allocated for {data} bytes of data",
            allocated(&file)
        );
        // Never read through the guest mapping (assert_same reads it).
        assert!(!resident(&memory, 30));
        assert_same(&memory, &file);
        std::fs::remove_file(path).unwrap();
    }

    /// A base file with data in pages 3 and 4 (holes elsewhere), and a
    /// diff file holding pages 4, 8 and 9, mapped as a restore maps them.
    /// File names start with `tag`: tests run in parallel.
    fn restored(tag: &str) -> (GuestMemoryMmap, MemorySource, Vec<std::path::PathBuf>) {
        let (base_path, base) = temp_file(&format!("{tag}-base"));
        base.set_len(PAGES * PAGE_SIZE).unwrap();
        for page in [3u64, 4] {
            base.write_all_at(
                &[0xb0 + u8::try_from(page).unwrap(); PAGE],
                page * PAGE_SIZE,
            )
            .unwrap();
        }
        let (diff_path, diff) = temp_file(&format!("{tag}-diff"));
        diff.set_len(PAGES * PAGE_SIZE).unwrap();
        let runs = vec![(4u64, 1u64), (8, 2)];
        for page in [4u64, 8, 9] {
            diff.write_all_at(
                &[0xd0 + u8::try_from(page).unwrap(); PAGE],
                page * PAGE_SIZE,
            )
            .unwrap();
        }
        let size = usize::try_from(PAGES).unwrap() * PAGE;
        let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::new(base.try_clone().unwrap(), 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .unwrap();
        let region = GuestRegionMmap::new(region, DRAM_START).unwrap();
        for &(first, count) in &runs {
            let addr = region
                .as_ptr()
                .wrapping_add(usize::try_from(first).unwrap() * PAGE);
            // SAFETY: the pages lie inside the mapping `region` owns, which
            // nothing borrows yet; MAP_FIXED replaces just those pages.
            let mapped = unsafe {
                libc::mmap(
                    addr.cast(),
                    usize::try_from(count).unwrap() * PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    diff.as_raw_fd(),
                    libc::off_t::try_from(first * PAGE_SIZE).unwrap(),
                )
            };
            assert_eq!(mapped, addr.cast());
        }
        let memory = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        let source = MemorySource::of_chain(
            [
                (base, base_path.clone(), None),
                (diff, diff_path.clone(), Some(vec![runs])),
            ],
            layout(),
        );
        (memory, source, vec![base_path, diff_path])
    }

    #[test]
    fn a_restored_vms_snapshot_takes_unwritten_pages_from_its_files() {
        let (memory, source, paths) = restored("written");
        // The guest writes a page of the diff and one of a base hole, and
        // reads a page of the base.
        memory.write_slice(&[0xee; PAGE], page_addr(9)).unwrap();
        memory.write_slice(&[0xef; PAGE], page_addr(30)).unwrap();
        assert_eq!(memory.read_obj::<u8>(page_addr(3)).unwrap(), 0xb3);
        assert!(!resident(&memory, 4) && !resident(&memory, 8));

        let (path, file) = temp_file("restored-out");
        let stats = write_sparse(&memory, &layout(), Some(&source), &file).unwrap();
        assert_eq!(
            stats,
            SparseStats {
                from_guest: 2 * PAGE_SIZE,
                from_files: 3 * PAGE_SIZE
            }
        );
        assert_eq!(data_map(&file), [(3, 2), (8, 2), (30, 1)]);
        assert!(allocated(&file) <= 7 * PAGE_SIZE, "{}", allocated(&file));
        // Pages the guest did not touch were taken from the files, not
        // faulted in through the guest mapping.
        assert!(!resident(&memory, 4) && !resident(&memory, 8) && !resident(&memory, 40));
        assert_same(&memory, &file);
        std::fs::remove_file(path).unwrap();
        for p in paths {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn a_memory_file_written_in_place_is_detected_and_one_renamed_over_is_not() {
        let (_memory, source, paths) = restored("renamed");
        assert_eq!(source.changed_file(), None);
        // A new file renamed over the diff's path (a chain merge swapping
        // directories does this): the VM keeps the one it opened.
        let (new_path, new) = temp_file("new-diff");
        new.write_all_at(&[0xee; PAGE], 0).unwrap();
        std::fs::rename(&new_path, &paths[1]).unwrap();
        assert_eq!(source.changed_file(), None);
        // The base written in place, a second later (coarse timestamps).
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let base = std::fs::OpenOptions::new()
            .write(true)
            .open(&paths[0])
            .unwrap();
        base.write_all_at(&[0x11; PAGE], 3 * PAGE_SIZE).unwrap();
        assert_eq!(source.changed_file(), Some(paths[0].as_path()));
        for p in paths {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn a_truncated_memory_file_is_detected() {
        let (_memory, source, paths) = restored("truncated");
        let diff = std::fs::OpenOptions::new()
            .write(true)
            .open(&paths[1])
            .unwrap();
        diff.set_len(PAGE_SIZE).unwrap();
        assert_eq!(source.changed_file(), Some(paths[1].as_path()));
        for p in paths {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn every_copy_mechanism_keeps_the_sources_holes() {
        let (src_path, src) = temp_file("copy-src");
        src.set_len(PAGES * PAGE_SIZE).unwrap();
        for page in [0u64, 1, 17, 63] {
            src.write_all_at(&[u8::try_from(page).unwrap() + 1; PAGE], page * PAGE_SIZE)
                .unwrap();
        }
        // Reflink or copy_file_range, whichever this filesystem has; then
        // copy_file_range alone; then reads and writes.
        for (clone, cfr) in [(true, true), (false, true), (false, false)] {
            let (dst_path, dst) = temp_file("copy-dst");
            dst.set_len(PAGES * PAGE_SIZE).unwrap();
            let mut copier = RangeCopier {
                clone,
                copy_file_range: cfr,
                buf: Vec::new(),
            };
            let copied = copier
                .copy_sparse(&src, 0, PAGES * PAGE_SIZE, &dst, 0)
                .unwrap();
            assert_eq!(copied, 4 * PAGE_SIZE);
            assert_eq!(data_map(&dst), [(0, 2), (17, 1), (63, 1)]);
            let mut page = vec![0u8; PAGE];
            for n in 0..PAGES {
                dst.read_exact_at(&mut page, n * PAGE_SIZE).unwrap();
                let want = if [0, 1, 17, 63].contains(&n) {
                    u8::try_from(n).unwrap() + 1
                } else {
                    0
                };
                assert!(page.iter().all(|&b| b == want), "page {n} ({clone}, {cfr})");
            }
            std::fs::remove_file(dst_path).unwrap();
        }
        std::fs::remove_file(src_path).unwrap();
    }

    #[test]
    fn a_source_shorter_than_its_range_is_an_error() {
        let (src_path, src) = temp_file("short-src");
        src.write_all_at(&[1; PAGE], 0).unwrap();
        let (dst_path, dst) = temp_file("short-dst");
        // The data ends at one page; a range of two from a file that ends
        // there copies the data it has, and no more.
        let copied = copy_file_sparse(&src, &dst, 2 * PAGE_SIZE).unwrap();
        assert_eq!(copied, PAGE_SIZE);
        // A range that the copy mechanisms must fill past the end fails.
        let mut copier = RangeCopier::new();
        let err = copier
            .copy_range(&src, 0, &dst, 0, 2 * PAGE_SIZE)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_file(src_path).unwrap();
        std::fs::remove_file(dst_path).unwrap();
    }
}
