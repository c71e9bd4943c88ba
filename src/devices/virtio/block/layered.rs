//! A layered copy-on-write disk: a read-only base image, zero or more
//! frozen layers, and one writable top layer, so that many VMs can start
//! from one image without a byte of it being copied, and each snapshot can
//! freeze the disk state that matches its memory.
//!
//! A layer is two files:
//! - its data file, a sparse file the size of the disk whose data sits at
//!   the same offsets as on the disk;
//! - its presence map, `<data file>.map` ([`map_path`]): which 4 KiB chunks
//!   ([`CHUNK_SIZE`]) the layer holds.
//!
//! A read takes each chunk from the newest layer that holds it (the top,
//! then the frozen layers newest first), else from the base; runs of chunks
//! from one file are read in one go, straight into guest memory. A write
//! goes to the top; a chunk the write covers only in part, and that the top
//! does not hold yet, is first copied up from below. Discard and
//! write-zeroes zero the range in the top (a punched hole), so the chunks
//! read as zeros whatever lies below. Flush is `fdatasync` of the top.
//!
//! The top's map lives in memory and is written when the VM is snapshotted
//! ([`LayeredDisk::persist`]: the data is `fdatasync`ed first, then the map
//! is written to a temporary file, renamed over `<top>.map` and the
//! directory is synced). After the snapshot, the data file and its map are
//! a consistent frozen layer that the caller may move next to the snapshot
//! and name in [`DiskLayers::layers`] when it restores. A top the VM never
//! snapshotted has no map on disk; writes made since the last snapshot are
//! not described by the map on disk.
//!
//! # Map file format (version 1, little endian)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `DMLAYMAP` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | chunk size in bytes (4096) |
//! | 16 | 8 | disk size in bytes |
//! | 24 | 8 | chunk count (disk size / 4096, rounded up) |
//! | 32 | ⌈count / 8⌉ | bitmap: chunk `i` is bit `i % 8` of byte `i / 8` |
//! | end − 8 | 8 | CRC-64/XZ of everything before it |
//!
//! A map read back is untrusted: its length, magic, version, checksum,
//! chunk size, disk size and chunk count are all checked, and bits past the
//! last chunk must be clear. Each failure is its own [`LayerError`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::{Address, GuestMemoryBackend, ReadVolatile, WriteVolatile};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::device::BlockError;
use super::disk::{device_id, Disk, Segment};
use super::{ID_BYTES, SECTOR_SIZE};
use crate::memory::GuestMemoryMmap;

/// The unit a presence map tracks: 4 KiB.
pub const CHUNK_SIZE: u64 = 4096;
/// [`CHUNK_SIZE`] as a buffer length.
const CHUNK_BYTES: usize = 4096;
/// The map file's magic.
const MAP_MAGIC: [u8; 8] = *b"DMLAYMAP";
/// The map format this build writes and reads.
pub const MAP_VERSION: u32 = 1;
/// Magic, version, chunk size, disk size, chunk count.
const MAP_HEADER_LEN: usize = 32;
/// The trailing CRC-64.
const MAP_CRC_LEN: usize = 8;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
/// The copy buffer of [`merge_layers`].
const MERGE_BUFFER: usize = 1 << 20;

/// The files of a layered disk (see
/// [`BlockConfig::layered`](crate::builder::BlockConfig::layered) and
/// [`Restore::block_layers`](crate::snapshot::Restore::block_layers)).
///
/// The guest sees, for every 4 KiB chunk, the data of the newest layer that
/// holds it: `top`, then `layers` from the last to the first, then `base`.
/// - `base`: a raw disk image (regular file or block device, a multiple of
///   512 bytes; a partial last 4 KiB chunk is fine), opened read-only with
///   a shared lock, never written: any number of VMs may share it.
/// - `layers`: frozen layers, **oldest first**, each a data file the size
///   of the base with its map at [`map_path`]; opened read-only with a
///   shared lock, never written.
/// - `top`: the layer guest writes go to, locked exclusively. Created
///   (mode 0600, sparse, the size of the base) if it does not exist; an
///   existing top needs its map, unless it holds no data at all (no
///   allocated blocks), which is then an empty top. With a read-only disk
///   the top is opened read-only (shared lock) and never written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayers {
    /// The read-only base image.
    pub base: PathBuf,
    /// Frozen layers over the base, oldest first.
    pub layers: Vec<PathBuf>,
    /// The writable top layer.
    pub top: PathBuf,
}

impl DiskLayers {
    /// A disk of `base` with no frozen layer and `top` on top of it.
    pub fn new(base: impl Into<PathBuf>, top: impl Into<PathBuf>) -> Self {
        Self {
            base: base.into(),
            layers: Vec::new(),
            top: top.into(),
        }
    }

    /// Adds a frozen layer above those already given (call oldest first).
    pub fn layer(mut self, layer: impl Into<PathBuf>) -> Self {
        self.layers.push(layer.into());
        self
    }
}

/// Where the presence map of the layer whose data file is `data` lives:
/// the same path with `.map` appended (`disk.top` → `disk.top.map`).
pub fn map_path(data: &Path) -> PathBuf {
    let mut name = data.as_os_str().to_owned();
    name.push(".map");
    PathBuf::from(name)
}

/// Why a layer or its presence map could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A layer's data file could not be opened or created.
    #[error(
        "could not open disk layer {path:?}: check that it exists (a top is created if missing) \
         and that dormouse may read it (and write it, for a writable top)"
    )]
    Open {
        /// The data file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A layer's size or identity could not be read, or a fresh top could
    /// not be sized.
    #[error("could not inspect or size disk layer {path:?}")]
    Inspect {
        /// The data file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A layer's data file is not a regular file.
    #[error("disk layer {path:?} is not a regular file: layers are sparse regular files")]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// Another VM or process holds a lock on a layer.
    #[error(
        "disk layer {path:?} is in use: another VM or process holds a lock on it; a top serves \
         one VM at a time, and a frozen layer cannot be some VM's top"
    )]
    Locked {
        /// The data file.
        path: PathBuf,
        /// What flock(2) said.
        #[source]
        source: io::Error,
    },
    /// A layer's data file is not the size of the disk.
    #[error(
        "disk layer {path:?} is {size} bytes but the disk (its base) is {disk_size}: a layer \
         belongs to a base of its own size; name the layers of this base"
    )]
    SizeMismatch {
        /// The data file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The disk's size.
        disk_size: u64,
    },
    /// A frozen layer (or a top that holds data) has no presence map.
    #[error(
        "disk layer {path:?} has no presence map {map:?}: a layer becomes usable once a snapshot \
         of its VM wrote the map; move the map along with the data file"
    )]
    MissingMap {
        /// The data file.
        path: PathBuf,
        /// Where its map should be.
        map: PathBuf,
    },
    /// A map could not be read.
    #[error("could not read the presence map {path:?}")]
    MapRead {
        /// The map file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file is not a presence map (too short, or bad magic).
    #[error(
        "{path:?} is not a dormouse layer presence map (bad magic or too short): give the map \
         a snapshot wrote next to the layer"
    )]
    NotAMap {
        /// The map file.
        path: PathBuf,
    },
    /// The map's format version is not one this build reads.
    #[error(
        "presence map {path:?} has format version {found}, this dormouse reads version \
         {supported}: use the dormouse that wrote it"
    )]
    MapVersion {
        /// The map file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The map's checksum does not match its contents.
    #[error(
        "presence map {path:?} is corrupt: CRC-64 {found:#018x}, the file says {expected:#018x}; \
         the layer cannot be trusted, restore from an older snapshot"
    )]
    MapChecksum {
        /// The map file.
        path: PathBuf,
        /// The CRC the file holds.
        expected: u64,
        /// The CRC of its contents.
        found: u64,
    },
    /// The map tracks chunks of another size.
    #[error("presence map {path:?} tracks {found}-byte chunks, dormouse uses 4096")]
    MapChunkSize {
        /// The map file.
        path: PathBuf,
        /// The chunk size in the file.
        found: u32,
    },
    /// The map describes a disk of another size than the base.
    #[error(
        "presence map {path:?} describes a {map_size}-byte disk but the base is {disk_size} \
         bytes: the layer belongs to another base"
    )]
    MapDiskSize {
        /// The map file.
        path: PathBuf,
        /// The disk size in the map.
        map_size: u64,
        /// The base's size.
        disk_size: u64,
    },
    /// The map's chunk count does not fit its disk size.
    #[error(
        "presence map {path:?} counts {found} chunks, but its disk needs {expected}: the map is \
         corrupt"
    )]
    MapChunkCount {
        /// The map file.
        path: PathBuf,
        /// The count in the file.
        found: u64,
        /// The count the disk size needs.
        expected: u64,
    },
    /// The map file's length does not fit its chunk count.
    #[error(
        "presence map {path:?} is {len} bytes, a map of this disk is {expected}: the map is \
         truncated or has trailing bytes"
    )]
    MapLength {
        /// The map file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length a map of this disk has.
        expected: u64,
    },
    /// The map marks chunks past the end of the disk.
    #[error("presence map {path:?} marks chunks past the end of the disk: the map is corrupt")]
    MapStrayBits {
        /// The map file.
        path: PathBuf,
    },
    /// The top's data could not be synced or its map written.
    #[error("could not {what} {path:?} (is the disk full?)")]
    Persist {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// [`merge_layers`] was given no layer.
    #[error("merge_layers needs at least one layer to merge")]
    MergeNothing,
    /// [`merge_layers`] would overwrite an existing file.
    #[error(
        "{path:?} already exists: merge_layers writes a new layer and never replaces one; remove \
         it or pick another output path"
    )]
    MergeOutputExists {
        /// The existing file.
        path: PathBuf,
    },
    /// [`merge_layers`] failed to copy data or write the output.
    #[error("merging layers into {path:?}: could not {what}")]
    Merge {
        /// What was being done.
        what: &'static str,
        /// The output (or the input being read).
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A plain disk was asked for on a file that is a layer.
    #[error(
        "{path:?} is a layer of a layered disk (its presence map {map:?} exists): opened alone it \
         lacks the base's data; open it as part of its layers (BlockConfig::layered, \
         Restore::block_layers)"
    )]
    LayerOpenedAsPlainDisk {
        /// The data file.
        path: PathBuf,
        /// Its map.
        map: PathBuf,
    },
}

/// Which 4 KiB chunks a layer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChunkMap {
    words: Vec<u64>,
    chunks: u64,
}

/// The number of chunks of a disk of `size` bytes (a partial last one
/// counts).
fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// The length of the map file of a disk of `chunks` chunks.
fn map_len(chunks: u64) -> u64 {
    (MAP_HEADER_LEN + MAP_CRC_LEN) as u64 + chunks.div_ceil(8)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl ChunkMap {
    /// No chunk present, for a disk of `chunks` chunks.
    pub(super) fn empty(chunks: u64) -> Self {
        // A disk's size fits in u64 bytes, so its chunks / 64 fit in usize
        // on the 64-bit hosts dormouse runs on.
        let words = usize::try_from(chunks.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            words: vec![0; words],
            chunks,
        }
    }

    pub(super) fn has(&self, chunk: u64) -> bool {
        usize::try_from(chunk / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// Marks chunks `first..=last` present (clipped to the disk).
    pub(super) fn set_range(&mut self, first: u64, last: u64) {
        let last = last.min(self.chunks.saturating_sub(1));
        for chunk in first..=last {
            if let Some(w) = usize::try_from(chunk / 64)
                .ok()
                .and_then(|w| self.words.get_mut(w))
            {
                *w |= 1 << (chunk % 64);
            }
        }
    }

    /// The map file's bytes for a disk of `disk_size` bytes.
    pub(super) fn encode(&self, disk_size: u64) -> Vec<u8> {
        let bitmap_len = usize::try_from(self.chunks.div_ceil(8)).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(MAP_HEADER_LEN + bitmap_len + MAP_CRC_LEN);
        out.extend_from_slice(&MAP_MAGIC);
        out.extend_from_slice(&MAP_VERSION.to_le_bytes());
        // 4096 fits.
        #[allow(clippy::cast_possible_truncation)]
        out.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&disk_size.to_le_bytes());
        out.extend_from_slice(&self.chunks.to_le_bytes());
        let bits: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.extend_from_slice(&bits[..bitmap_len]);
        let crc = CRC.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Checks and decodes map file bytes for a disk of `disk_size` bytes.
    fn decode(bytes: &[u8], path: &Path, disk_size: u64) -> Result<Self, LayerError> {
        let path = || path.to_owned();
        if bytes.len() < MAP_HEADER_LEN + MAP_CRC_LEN || bytes[..8] != MAP_MAGIC {
            return Err(LayerError::NotAMap { path: path() });
        }
        let version = le_u32(bytes, 8);
        if version != MAP_VERSION {
            return Err(LayerError::MapVersion {
                path: path(),
                found: version,
                supported: MAP_VERSION,
            });
        }
        let (body, tail) = bytes.split_at(bytes.len() - MAP_CRC_LEN);
        let expected = le_u64(tail, 0);
        let found = CRC.checksum(body);
        if expected != found {
            return Err(LayerError::MapChecksum {
                path: path(),
                expected,
                found,
            });
        }
        let chunk_size = le_u32(bytes, 12);
        if u64::from(chunk_size) != CHUNK_SIZE {
            return Err(LayerError::MapChunkSize {
                path: path(),
                found: chunk_size,
            });
        }
        let map_size = le_u64(bytes, 16);
        if map_size != disk_size {
            return Err(LayerError::MapDiskSize {
                path: path(),
                map_size,
                disk_size,
            });
        }
        let chunks = le_u64(bytes, 24);
        if chunks != chunk_count(disk_size) {
            return Err(LayerError::MapChunkCount {
                path: path(),
                found: chunks,
                expected: chunk_count(disk_size),
            });
        }
        if bytes.len() as u64 != map_len(chunks) {
            return Err(LayerError::MapLength {
                path: path(),
                len: bytes.len() as u64,
                expected: map_len(chunks),
            });
        }
        let mut map = Self::empty(chunks);
        for (word, bits) in map.words.iter_mut().zip(body[MAP_HEADER_LEN..].chunks(8)) {
            let mut w = [0u8; 8];
            w[..bits.len()].copy_from_slice(bits);
            *word = u64::from_le_bytes(w);
        }
        let tail_bits = chunks % 64;
        if tail_bits != 0 {
            if let Some(last) = map.words.last() {
                if last >> tail_bits != 0 {
                    return Err(LayerError::MapStrayBits { path: path() });
                }
            }
        }
        Ok(map)
    }

    /// Reads the map of the layer whose data file is `data`, for a disk of
    /// `disk_size` bytes. Reads at most one byte more than such a map has.
    fn load(data: &Path, disk_size: u64) -> Result<Self, LayerError> {
        let path = map_path(data);
        let read_err = |source| LayerError::MapRead {
            path: path.clone(),
            source,
        };
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayerError::MissingMap {
                    path: data.to_owned(),
                    map: path,
                })
            }
            Err(e) => return Err(read_err(e)),
        };
        if !file.metadata().map_err(read_err)?.is_file() {
            return Err(LayerError::NotAMap { path });
        }
        let expected = map_len(chunk_count(disk_size));
        let mut bytes = Vec::new();
        file.take(expected + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > expected {
            // Longer than any map of this disk: name the cause from the
            // header if it is one, else the length.
            return match Self::decode(&bytes, &path, disk_size) {
                Err(e) => Err(e),
                Ok(_) => Err(LayerError::MapLength {
                    path,
                    len: bytes.len() as u64,
                    expected,
                }),
            };
        }
        Self::decode(&bytes, &path, disk_size)
    }

    /// Writes the map of the layer `data` atomically: a temporary file,
    /// fsynced, renamed over the map, then the directory fsynced.
    pub(super) fn persist(&self, data: &Path, disk_size: u64) -> Result<(), LayerError> {
        crate::fsutil::replace_file(&map_path(data), &self.encode(disk_size)).map_err(persist_error)
    }
}

/// A failed step of writing a map (or a merged layer) as a layer error.
fn persist_error(e: crate::fsutil::StepError) -> LayerError {
    LayerError::Persist {
        what: e.what,
        path: e.path,
        source: e.source,
    }
}

/// A layer's data file opened and checked, and its map.
#[derive(Debug)]
struct OpenLayer {
    file: File,
    map: ChunkMap,
    meta: std::fs::Metadata,
}

/// Opens the layer `path` of a disk of `disk_size` bytes: a regular file,
/// locked (exclusively if `writable`), the disk's size, with its map. With
/// `top`, a missing file is created (if `writable`) and a file without a
/// map that holds no data is an empty layer.
fn open_layer(
    path: &Path,
    disk_size: u64,
    writable: bool,
    top: bool,
) -> Result<OpenLayer, LayerError> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .create(writable && top)
        .mode(0o600)
        // Not blocking: opening a FIFO read-only would wait for a writer.
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| LayerError::Open {
            path: path.to_owned(),
            source,
        })?;
    let inspect = |source| LayerError::Inspect {
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(inspect)?;
    if !meta.is_file() {
        return Err(LayerError::NotAFile {
            path: path.to_owned(),
        });
    }
    // Regular files ignore O_NONBLOCK; clear it anyway so I/O is plainly
    // blocking.
    // SAFETY: F_SETFL on a descriptor `file` owns; no pointers.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) } != 0 {
        return Err(inspect(io::Error::last_os_error()));
    }
    let how = if writable {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock(2) on a descriptor `file` owns; no pointers.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
        return Err(LayerError::Locked {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    let map = match ChunkMap::load(path, disk_size) {
        Ok(map) => map,
        // An empty top: just created, or never written (no block
        // allocated). Anything else without a map cannot be trusted.
        Err(LayerError::MissingMap { .. })
            if top && meta.blocks() == 0 && (meta.len() == 0 || meta.len() == disk_size) =>
        {
            if meta.len() == 0 && writable {
                file.set_len(disk_size).map_err(inspect)?;
            }
            ChunkMap::empty(chunk_count(disk_size))
        }
        Err(e) => return Err(e),
    };
    // An empty read-only top of length 0 is never read (no chunk present).
    let len = file.metadata().map_err(inspect)?.len();
    if len != disk_size && !(len == 0 && !writable && map.words.iter().all(|w| *w == 0)) {
        return Err(LayerError::SizeMismatch {
            path: path.to_owned(),
            size: len,
            disk_size,
        });
    }
    Ok(OpenLayer { file, map, meta })
}

/// Where a chunk's data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Top,
    /// A frozen layer, by index (oldest first).
    Layer(usize),
    Base,
}

/// A walk over a request's guest segments, taken a number of bytes at a
/// time.
struct Cursor<'a> {
    segments: &'a [Segment],
    index: usize,
    offset: usize,
}

impl<'a> Cursor<'a> {
    fn new(segments: &'a [Segment]) -> Self {
        Self {
            segments,
            index: 0,
            offset: 0,
        }
    }

    /// The next piece of at most `max` bytes.
    fn next(&mut self, max: usize) -> Option<Segment> {
        while let Some(seg) = self.segments.get(self.index) {
            if self.offset == seg.len {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let len = (seg.len - self.offset).min(max);
            let piece = Segment {
                addr: seg.addr.checked_add(self.offset as u64)?,
                len,
            };
            self.offset += len;
            return Some(piece);
        }
        None
    }
}

/// A layered disk, open.
#[derive(Debug)]
pub(super) struct LayeredDisk {
    base: File,
    /// Frozen layers, oldest first.
    layers: Vec<(File, ChunkMap)>,
    top: File,
    top_map: ChunkMap,
    top_path: PathBuf,
    /// The disk's size in bytes (the base's).
    size: u64,
    read_only: bool,
    /// Whether `fallocate(PUNCH_HOLE)` works on the top.
    punch_hole: bool,
    id: [u8; ID_BYTES],
}

impl LayeredDisk {
    /// Opens every file of `layers`, checks them against the base and
    /// locks them (see [`DiskLayers`]).
    pub(super) fn open(layers: &DiskLayers, read_only: bool) -> Result<Self, BlockError> {
        let (base, size) = Disk::open(&layers.base, true)?.into_file();
        let frozen = layers
            .layers
            .iter()
            .map(|p| open_layer(p, size, false, false).map(|l| (l.file, l.map)))
            .collect::<Result<Vec<_>, _>>()?;
        let top = open_layer(&layers.top, size, !read_only, true)?;
        let punch_hole = !read_only
            && fallocate(&top.file, FallocateMode::PunchHole, true, size, SECTOR_SIZE).is_ok();
        Ok(Self {
            base,
            layers: frozen,
            id: device_id(top.meta.dev(), top.meta.ino()),
            top: top.file,
            top_map: top.map,
            top_path: layers.top.clone(),
            size,
            read_only,
            punch_hole,
        })
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn read_only(&self) -> bool {
        self.read_only
    }

    pub(super) fn supports_discard(&self) -> bool {
        self.punch_hole
    }

    pub(super) fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// The top's presence map as it is in memory.
    #[cfg(test)]
    pub(super) fn top_map(&self) -> &ChunkMap {
        &self.top_map
    }

    /// The end of `chunk` (the disk's end for a partial last chunk).
    fn chunk_end(&self, chunk: u64) -> u64 {
        ((chunk + 1) * CHUNK_SIZE).min(self.size)
    }

    fn source(&self, chunk: u64) -> Source {
        if self.top_map.has(chunk) {
            return Source::Top;
        }
        self.source_below_top(chunk)
    }

    fn source_below_top(&self, chunk: u64) -> Source {
        self.layers
            .iter()
            .rposition(|(_, map)| map.has(chunk))
            .map_or(Source::Base, Source::Layer)
    }

    fn file(&self, source: Source) -> &File {
        match source {
            Source::Top => &self.top,
            Source::Layer(i) => &self.layers[i].0,
            Source::Base => &self.base,
        }
    }

    /// Reads from the disk at `offset` into `segments`, in order, each
    /// chunk from its own layer (runs of one layer in one read). Returns
    /// the bytes written to guest memory (also on error).
    pub(super) fn read_into(
        &self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
    ) -> Result<u64, (u64, io::Error)> {
        let len: u64 = segments.iter().map(|s| s.len as u64).sum();
        let end = offset + len;
        let mut cursor = Cursor::new(segments);
        let mut done = 0u64;
        let mut pos = offset;
        while pos < end {
            let source = self.source(pos / CHUNK_SIZE);
            let mut run_end = self.chunk_end(pos / CHUNK_SIZE).min(end);
            while run_end < end && self.source(run_end / CHUNK_SIZE) == source {
                run_end = self.chunk_end(run_end / CHUNK_SIZE).min(end);
            }
            let mut file = self.file(source);
            file.seek(SeekFrom::Start(pos)).map_err(|e| (done, e))?;
            let mut left = run_end - pos;
            while left > 0 {
                let max = usize::try_from(left).unwrap_or(usize::MAX);
                let piece = cursor
                    .next(max)
                    .ok_or_else(|| (done, io::Error::other("guest buffers end early")))?;
                for slice in GuestMemoryBackend::get_slices(mem, piece.addr, piece.len) {
                    let mut slice = slice.map_err(|e| (done, io::Error::other(e)))?;
                    file.read_exact_volatile(&mut slice)
                        .map_err(|e| (done, io::Error::other(e)))?;
                    done += slice.len() as u64;
                }
                left -= piece.len as u64;
            }
            pos = run_end;
        }
        Ok(done)
    }

    /// Copies `chunk` from below the top into the top (before a write
    /// covers it in part) and marks it present.
    fn copy_up(&mut self, chunk: u64) -> io::Result<()> {
        let start = chunk * CHUNK_SIZE;
        let len = usize::try_from(self.chunk_end(chunk) - start).map_err(io::Error::other)?;
        let mut buf = [0u8; CHUNK_BYTES];
        let buf = &mut buf[..len];
        self.file(self.source_below_top(chunk))
            .read_exact_at(buf, start)?;
        self.top.write_all_at(buf, start)?;
        self.top_map.set_range(chunk, chunk);
        Ok(())
    }

    /// Before `[offset, offset + len)` is written in the top: copies up the
    /// first and last chunks if the range covers them in part and the top
    /// does not hold them. Returns the first and last chunk.
    fn prepare(&mut self, offset: u64, len: u64) -> io::Result<(u64, u64)> {
        let end = offset + len;
        let (first, last) = (offset / CHUNK_SIZE, (end - 1) / CHUNK_SIZE);
        for chunk in [first, last] {
            let partial = offset > chunk * CHUNK_SIZE || end < self.chunk_end(chunk);
            if partial && !self.top_map.has(chunk) {
                self.copy_up(chunk)?;
            }
        }
        Ok((first, last))
    }

    /// Writes `segments`, in order, to the top at `offset`.
    pub(super) fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
    ) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let len: u64 = segments.iter().map(|s| s.len as u64).sum();
        if len == 0 {
            return Ok(());
        }
        let (first, last) = self.prepare(offset, len)?;
        let mut file = &self.top;
        file.seek(SeekFrom::Start(offset))?;
        for seg in segments {
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len) {
                let slice = slice.map_err(io::Error::other)?;
                file.write_all_volatile(&slice).map_err(io::Error::other)?;
            }
        }
        // Only a complete write makes its chunks the top's: after a failed
        // one, they still read from below.
        self.top_map.set_range(first, last);
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros: a hole punched in the
    /// top, its chunks marked present so nothing below shows through.
    pub(super) fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if len == 0 {
            return Ok(());
        }
        let (first, last) = self.prepare(offset, len)?;
        fallocate(&self.top, FallocateMode::PunchHole, true, offset, len)
            .map_err(io::Error::from)?;
        self.top_map.set_range(first, last);
        Ok(())
    }

    /// Commits the top's data to stable storage.
    pub(super) fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.top.sync_data()
    }

    /// Freezes the top as it is now: its data `fdatasync`ed, then its map
    /// written atomically next to it. Nothing to do for a read-only disk.
    pub(super) fn persist(&self) -> Result<(), LayerError> {
        if self.read_only {
            return Ok(());
        }
        self.top.sync_data().map_err(|source| LayerError::Persist {
            what: "fdatasync",
            path: self.top_path.clone(),
            source,
        })?;
        self.top_map.persist(&self.top_path, self.size)
    }
}

/// Refuses to open `path` as a plain disk if it is a layer (its map
/// exists): alone, it would show zeros wherever the base has data.
pub(super) fn refuse_layer_as_plain(path: &Path) -> Result<(), LayerError> {
    let map = map_path(path);
    if std::fs::symlink_metadata(&map).is_ok() {
        return Err(LayerError::LayerOpenedAsPlainDisk {
            path: path.to_owned(),
            map,
        });
    }
    Ok(())
}

/// Merges consecutive frozen layers (`layers`, oldest first) into one new
/// layer at `out` (data) and [`map_path`]`(out)` (map): each chunk comes
/// from the newest layer holding it, a chunk none holds stays absent, and
/// only present chunks' data is copied (the output is sparse). Using the
/// result in place of the inputs gives the same disk.
///
/// The inputs are locked shared (they must not be some VM's top) and
/// checked as a restore would check them (same sizes, valid maps). The
/// output is written to temporary files, synced, then renamed into place,
/// data first and map last, and the directory synced: `out` is a usable
/// layer only once both are in place (a crash in between leaves `out`
/// without a map, which opening refuses). `out` and its map must not exist.
pub fn merge_layers(layers: &[PathBuf], out: &Path) -> Result<(), LayerError> {
    let first = layers.first().ok_or(LayerError::MergeNothing)?;
    let out_map = map_path(out);
    for path in [out, out_map.as_path()] {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(LayerError::MergeOutputExists {
                path: path.to_owned(),
            });
        }
    }
    let size = std::fs::metadata(first)
        .map_err(|source| LayerError::Open {
            path: first.clone(),
            source,
        })?
        .len();
    let inputs = layers
        .iter()
        .map(|p| open_layer(p, size, false, false).map(|l| (l.file, l.map)))
        .collect::<Result<Vec<_>, _>>()?;
    let chunks = chunk_count(size);
    let mut merged = ChunkMap::empty(chunks);

    let mut tmp_name = out.as_os_str().to_owned();
    tmp_name.push(".merge-tmp");
    let tmp = PathBuf::from(tmp_name);
    let fail = |what, path: &Path| {
        let path = path.to_owned();
        move |source| LayerError::Merge { what, path, source }
    };
    // Not ours if it exists already (another merge's): left alone.
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(fail("create", &tmp))?;
    let result = (|| {
        data.set_len(size).map_err(fail("size", &tmp))?;
        let mut buf = vec![0u8; MERGE_BUFFER];
        let newest = |chunk: u64| inputs.iter().rposition(|(_, map)| map.has(chunk));
        let mut chunk = 0;
        while chunk < chunks {
            let Some(source) = newest(chunk) else {
                chunk += 1;
                continue;
            };
            let mut last = chunk;
            while last + 1 < chunks && newest(last + 1) == Some(source) {
                last += 1;
            }
            merged.set_range(chunk, last);
            let (from, to) = (chunk * CHUNK_SIZE, ((last + 1) * CHUNK_SIZE).min(size));
            let mut at = from;
            while at < to {
                let n = usize::try_from(to - at)
                    .unwrap_or(usize::MAX)
                    .min(MERGE_BUFFER);
                inputs[source]
                    .0
                    .read_exact_at(&mut buf[..n], at)
                    .map_err(fail("read", &layers[source]))?;
                data.write_all_at(&buf[..n], at)
                    .map_err(fail("write", &tmp))?;
                at += n as u64;
            }
            chunk = last + 1;
        }
        data.sync_all().map_err(fail("fsync", &tmp))?;
        merged.persist(&tmp, size)?;
        std::fs::rename(&tmp, out).map_err(fail("rename into place", out))?;
        std::fs::rename(map_path(&tmp), &out_map).map_err(fail("rename into place", &out_map))?;
        crate::fsutil::sync_parent(out).map_err(|e| LayerError::Merge {
            what: "fsync the directory of",
            path: out.to_owned(),
            source: e.source,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(map_path(&tmp));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_paths_append_map() {
        assert_eq!(
            map_path(Path::new("/a/disk.top")),
            PathBuf::from("/a/disk.top.map")
        );
        assert_eq!(map_path(Path::new("x")), PathBuf::from("x.map"));
    }

    #[test]
    fn chunk_maps_encode_and_decode() {
        for size in [512u64, 4096, 4096 * 63 + 512, 4096 * 64, 4096 * 65, 1 << 20] {
            let chunks = chunk_count(size);
            let mut map = ChunkMap::empty(chunks);
            map.set_range(0, 0);
            map.set_range(chunks - 1, chunks + 10);
            let bytes = map.encode(size);
            assert_eq!(bytes.len() as u64, map_len(chunks));
            let back = ChunkMap::decode(&bytes, Path::new("m"), size).unwrap();
            assert_eq!(back, map, "size {size}");
            assert!(back.has(chunks - 1) && !back.has(chunks));
        }
    }
}
