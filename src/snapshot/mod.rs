//! Snapshots: the state file format, the files of a snapshot, and the
//! [`VmState`] assembled from the state each part of the VM saves for
//! itself (vCPUs and vGIC in `arch`, devices beside their models).
//!
//! A snapshot is a directory holding two files:
//!
//! - `state`: a fixed header (magic, format version, architecture, payload
//!   length, CRC-64) and the [`VmState`] payload ([`format`]);
//! - `memory`: raw guest RAM, page-aligned, which a restore maps
//!   (`MAP_PRIVATE`) rather than reads. It must not change while a VM
//!   restored from it runs: pages not yet touched are read from the file
//!   on first access. A change in place (a write or truncation, which
//!   moves the file's size or modification time) is detected at the next
//!   snapshot, which then refuses ([`SnapshotError::MemoryFileChanged`]). A full snapshot writes it sparse: pages without
//!   data are holes, which read as zeros (`sparse`).
//!
//! Writing is crash-safe: files go into a temporary directory next to the
//! target, are fsync'd, and the directory then replaces the target in one
//! atomic `renameat2(RENAME_EXCHANGE)` (or `rename` if the target is new).
//! A crash leaves either the whole old snapshot or the whole new one.
//! Snapshot directories are created `0700` and their files `0600`.
//!
//! Reading treats every file as hostile: files are opened without following
//! a symbolic link (`O_NOFOLLOW`) and without blocking (`O_NONBLOCK`, so a
//! FIFO cannot hang the open), and anything that is not a regular file is
//! refused before a byte is read; the state file's size is bounded before
//! it is read. Older minor versions of the format decode through
//! [`compat`].

pub mod compat;
pub mod format;
mod vm;
pub mod working_set;

pub use vm::{LiveDiffInfo, Restore, SnapshotInfo, LIVE_DIFF_LAST_PAGES, LIVE_DIFF_MAX_ROUNDS};
pub use working_set::{WorkingSet, WORKING_SET_FILE};

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::aarch64::state::{GicState, VcpuState};
use crate::devices::rtc::RtcSnapshot;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;
use crate::devices::vmgenid::VmGenIdSnapshot;
use crate::rate_limiter::RateLimiterConfig;

pub(crate) mod sparse;
pub use vm::SnapshotOptions;

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Errors from writing or reading snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Snapshots are taken of paused VMs.
    #[error("the VM is not paused: call pause() before snapshot()")]
    NotPaused,
    /// A file or directory could not be read or written.
    #[error("could not {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A memory file the VM was restored from was written or truncated in
    /// place while the VM ran ([`crate::MicroVm::check_memory_files`]).
    #[error(
        "{0} was written or truncated while a VM restored from it ran: guest pages the VM had not \
         touched yet now read bytes the snapshot never held, so its memory is not snapshotted; \
         restore it again from an intact copy (a snapshot's files must not change while a VM \
         restored from them runs)"
    )]
    MemoryFileChanged(PathBuf),
    /// A file of the snapshot is missing.
    #[error("{0} does not exist: is this a dormouse snapshot directory?")]
    MissingFile(PathBuf),
    /// A file of the snapshot is a symbolic link, which is not followed.
    #[error(
        "{0} is a symbolic link: dormouse does not follow links in a snapshot directory; copy \
         the file it points to into the snapshot directory instead"
    )]
    SymlinkFile(PathBuf),
    /// A file of the snapshot is a FIFO (named pipe).
    #[error(
        "{0} is a FIFO (named pipe), not a regular file: restore from the directory \
         MicroVm::snapshot wrote, whose files are regular files"
    )]
    FifoFile(PathBuf),
    /// A file of the snapshot is a character or block device node.
    #[error(
        "{0} is a device node, not a regular file: restore from the directory \
         MicroVm::snapshot wrote, whose files are regular files"
    )]
    DeviceFile(PathBuf),
    /// A file of the snapshot is something else that is not a regular file
    /// (a directory, a socket).
    #[error(
        "{path} is a {kind}, not a regular file: restore from the directory MicroVm::snapshot \
         wrote, whose files are regular files"
    )]
    NotARegularFile {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The state file is larger than any state file can be.
    #[error(
        "the state file {path} is {size} bytes, more than the {max} a dormouse state file can \
         be: this is not a state file MicroVm::snapshot wrote"
    )]
    StateFileTooLarge {
        /// The state file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The largest a state file can be (header and largest payload).
        max: u64,
    },
    /// The snapshot names a host resource (disk image, TAP, vsock socket)
    /// that the restore was not told to use.
    #[error(
        "the snapshot's {kind} {index} used {saved:?}, and a restore does not reopen host \
         resources named in a snapshot file unless asked: name its replacement with \
         Restore::{method}() (device index {index}), or call Restore::reuse_saved_paths(true) to \
         reopen the one the snapshot names"
    )]
    SavedResourceNotNamed {
        /// The kind of device: "disk", "network interface", "vsock device".
        kind: &'static str,
        /// Its index among the snapshot's devices of that kind.
        index: usize,
        /// The path or TAP name the snapshot holds.
        saved: String,
        /// The [`Restore`] method that names a replacement.
        method: &'static str,
    },
    /// The file is not a dormouse state file.
    #[error("not a dormouse snapshot state file (bad magic)")]
    NotASnapshot,
    /// The file is shorter than its header says.
    #[error("the state file is truncated: {found} bytes, its header needs {expected}")]
    Truncated {
        /// Bytes the header promises.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// The payload's CRC does not match.
    #[error("the state file is corrupt: CRC-64 {found:#018x}, header says {expected:#018x}")]
    Corrupt {
        /// The CRC in the header.
        expected: u64,
        /// The CRC of what was read.
        found: u64,
    },
    /// The file's format version is newer than this reader.
    #[error(
        "snapshot format {}.{} cannot be read by this dormouse (reads {}.0 to {}.{}): \
         restore it with a newer dormouse",
        file.0, file.1, reader.0, reader.0, reader.1
    )]
    UnsupportedVersion {
        /// The file's major.minor.
        file: (u16, u16),
        /// This reader's major.minor.
        reader: (u16, u16),
    },
    /// The snapshot was taken on another architecture.
    #[error("the snapshot is for architecture {0}, not aarch64 (1)")]
    WrongArchitecture(u32),
    /// The header claims an absurd payload.
    #[error("the state file claims a {0}-byte payload, more than any snapshot has")]
    PayloadTooLarge(u64),
    /// The state could not be serialized.
    #[error("could not encode the VM state")]
    Encode(#[source] postcard::Error),
    /// The payload passed its CRC but is not a VM state this build knows.
    #[error("the state file's payload does not decode as a VM state")]
    Decode(#[source] postcard::Error),
    /// The memory file does not hold the memory the state describes.
    #[error("the memory file {path} is {found} bytes, the snapshot needs {expected}")]
    MemoryFileTooShort {
        /// The memory file.
        path: PathBuf,
        /// Bytes the layout needs.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// The state contradicts itself or this host.
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(String),
    /// A device's saved rate limits cannot work (the file is corrupt or
    /// was edited).
    #[error(
        "the snapshot's virtio device {device} has invalid rate limits ({source}): the state \
         file is corrupt; restore another snapshot"
    )]
    InvalidRateLimiter {
        /// The device's index in the saved device list.
        device: usize,
        /// What is wrong.
        #[source]
        source: crate::rate_limiter::RateLimiterConfigError,
    },
    /// The saved VM generation ID page lies where this VM's memory map has
    /// something else.
    #[error(
        "the snapshot puts the VM generation ID page at {0:#x}, which is not a free, page-aligned \
         page of this VM's memory map: the state file is corrupt; restore another snapshot"
    )]
    VmGenIdAddress(u64),
    /// The saved VM generation ID interrupt is another device's or past the
    /// vGIC's.
    #[error(
        "the snapshot gives the VM generation ID device SPI {spi}, which is not free in a VM with \
         {virtio} virtio devices: the state file is corrupt; restore another snapshot"
    )]
    VmGenIdSpi {
        /// The saved SPI.
        spi: u32,
        /// The snapshot's virtio device count.
        virtio: usize,
    },
    /// A diff snapshot needs dirty tracking and a snapshot to be relative to.
    #[error(
        "no diff snapshot possible: {0} (build the VM with .dirty_tracking(true) and take a \
         full snapshot first)"
    )]
    NoDiffBase(&'static str),
    /// A chain must start with a full snapshot.
    #[error("{0} is a diff snapshot: a chain starts with a full snapshot")]
    ChainBaseNotFull(PathBuf),
    /// A diff does not follow the snapshot before it in the chain.
    #[error(
        "{path} was taken on top of snapshot {parent}, but the layer before it in the chain is \
         {previous}: a layer is missing or the chain is out of order"
    )]
    ChainGap {
        /// The diff that does not fit.
        path: PathBuf,
        /// Its parent's id.
        parent: SnapshotId,
        /// The id of the layer before it.
        previous: SnapshotId,
    },
    /// Only the first layer of a chain is a full snapshot.
    #[error("{0} is a full snapshot in the middle of a chain: restore from it alone")]
    FullInChain(PathBuf),
    /// A device's backend could not be made consistent for the snapshot
    /// (a layered disk's top could not be synced or its presence map
    /// written). No snapshot was written.
    #[error(
        "virtio device {device}'s backend could not be saved for the snapshot: {source}; free          space or fix the disk's directory and snapshot again"
    )]
    Backend {
        /// The device's index among the VM's virtio devices.
        device: usize,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// A snapshot's identity: random, made when it is written. A diff names
/// its parent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    /// A fresh random id.
    pub fn new() -> std::io::Result<Self> {
        let mut id = [0u8; 16];
        crate::vm::host_random(&mut id)?;
        Ok(Self(id))
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A device as configured, saved so that a restore rebuilds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedDevice {
    /// virtio-blk on a raw file.
    Block {
        /// The disk image.
        path: PathBuf,
        /// Whether guest writes are refused.
        read_only: bool,
        /// Limits on requests and bytes (added after format 1.0, where a
        /// disk is unlimited).
        rate_limiter: RateLimiterConfig,
    },
    /// virtio-net on a TAP.
    Net {
        /// The TAP's interface name.
        tap: String,
        /// The MAC address.
        mac: [u8; 6],
        /// Limits on frames delivered to the guest (added after format
        /// 1.0, where an interface is unlimited).
        rx_rate_limiter: RateLimiterConfig,
        /// Limits on frames the guest sends (added after format 1.0, where
        /// an interface is unlimited).
        tx_rate_limiter: RateLimiterConfig,
    },
    /// virtio-vsock.
    Vsock {
        /// The guest's CID.
        cid: u64,
        /// The host-side Unix socket.
        uds_path: PathBuf,
        /// Its configuration (allowed host ports, limits, timeouts).
        config: crate::devices::virtio::vsock::VsockConfig,
    },
}

/// The configuration a restore rebuilds the VM from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    /// Guest RAM in bytes.
    pub memory_size: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// Whether the VM has the PL031 RTC.
    pub rtc: bool,
    /// Whether dirty pages are tracked (needed for diff snapshots).
    pub dirty_tracking: bool,
    /// Whether KVM's dirty ring is preferred to its bitmap log.
    pub dirty_ring: bool,
    /// virtio devices, in attach (MMIO slot) order.
    pub devices: Vec<SavedDevice>,
}

/// Where one guest RAM region lives in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset in the memory file (page-aligned).
    pub file_offset: u64,
}

/// Everything a snapshot's state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// This snapshot's identity.
    pub id: SnapshotId,
    /// For a diff, the snapshot it was taken on top of.
    pub parent: Option<SnapshotId>,
    /// For a diff, per memory region, the runs of pages `(first, count)`
    /// its memory file holds (at their own offsets; the rest of that file
    /// is holes). `None` for a full snapshot, whose file holds every page.
    pub diff: Option<Vec<Vec<(u64, u64)>>>,
    /// How to rebuild the VM.
    pub config: SavedConfig,
    /// The guest RAM layout in the memory file.
    pub memory: Vec<MemoryRegionState>,
    /// Each vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// The vGICv3.
    pub gic: GicState,
    /// The console UART.
    pub serial: SerialSnapshot,
    /// The RTC, if the VM has one.
    pub rtc: Option<RtcSnapshot>,
    /// Each virtio transport, in slot order.
    pub virtio: Vec<TransportState>,
    /// The VM generation ID device, if the VM has one (added after format
    /// 1.1, whose VMs have none). A restore writes a new ID.
    pub vmgenid: Option<VmGenIdSnapshot>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(path: &Path) -> Result<(), SnapshotError> {
    crate::fsutil::sync_dir(path).map_err(|e| SnapshotError::Io {
        what: e.what,
        path: e.path,
        source: e.source,
    })
}

/// Atomically swaps two directory entries (Linux renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that live across the call;
    // renameat2 reads them and touches no other memory of ours.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The mode of a snapshot directory (guest memory is the guest's secrets).
pub const DIR_MODE: u32 = 0o700;
/// The mode of a snapshot's files.
pub const FILE_MODE: u32 = 0o600;

/// Creates a new snapshot file, `0600`, refusing to reuse or follow
/// anything already at `path`.
fn create_file(path: &Path) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("create", path))
}

/// Writes a snapshot directory at `dir`: `state` holds `state`, `memory`
/// is filled by `write_memory`. Crash-safe as the module docs describe; on
/// an error nothing under `dir` changed. The directory is created
/// [`DIR_MODE`] and its files [`FILE_MODE`].
pub fn write_dir(
    dir: &Path,
    state: &[u8],
    write_memory: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), SnapshotError> {
    let mut staged = Staged::new(dir)?;
    staged.write_memory(write_memory)?;
    staged.commit(state)
}

/// A snapshot directory being written: a hidden temporary directory next
/// to `dir` with the memory file open, which [`commit`](Staged::commit)
/// completes with the state and moves into place, and which is removed if
/// it is dropped before. Lets the memory file be written in steps (a live
/// diff writes most of it while the guest still runs).
pub(crate) struct Staged {
    dir: PathBuf,
    parent: PathBuf,
    tmp: PathBuf,
    memory: File,
    committed: bool,
}

impl Staged {
    /// Creates the temporary directory and its empty memory file.
    pub(crate) fn new(dir: &Path) -> Result<Self, SnapshotError> {
        let name = dir.file_name().ok_or_else(|| {
            SnapshotError::Inconsistent(format!("{} has no file name", dir.display()))
        })?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = parent.join(format!(
            ".{}.tmp-{}-{nonce}",
            name.to_string_lossy(),
            std::process::id()
        ));
        fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&tmp)
            .map_err(io_err("create", &tmp))?;
        let memory = match create_file(&tmp.join(MEMORY_FILE)) {
            Ok(file) => file,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            parent,
            tmp,
            memory,
            committed: false,
        })
    }

    /// Writes (part of) the memory file with `write`; an error names the
    /// file.
    pub(crate) fn write_memory(
        &mut self,
        write: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<(), SnapshotError> {
        let path = self.tmp.join(MEMORY_FILE);
        write(&mut self.memory).map_err(io_err("write guest memory to", &path))
    }

    /// Flushes what the memory file holds so far to the disk.
    pub(crate) fn sync_memory(&self) -> Result<(), SnapshotError> {
        let path = self.tmp.join(MEMORY_FILE);
        self.memory.sync_data().map_err(io_err("fsync", &path))
    }

    /// Syncs the memory file, writes and syncs `state`, and moves the
    /// directory to its place (replacing what was there atomically).
    pub(crate) fn commit(mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let tmp = self.tmp.clone();
        let mem_path = tmp.join(MEMORY_FILE);
        self.memory.sync_all().map_err(io_err("fsync", &mem_path))?;
        let state_path = tmp.join(STATE_FILE);
        let mut file = create_file(&state_path)?;
        file.write_all(state)
            .map_err(io_err("write", &state_path))?;
        file.sync_all().map_err(io_err("fsync", &state_path))?;
        fsync_dir(&tmp)?;
        let dir = &self.dir;
        if dir.exists() {
            exchange(&tmp, dir).map_err(io_err("swap in the new snapshot at", dir))?;
            // `tmp` now holds the previous snapshot: removed on drop.
        } else {
            fs::rename(&tmp, dir).map_err(io_err("move the new snapshot to", dir))?;
            self.committed = true;
        }
        fsync_dir(&self.parent)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Opens a file of a snapshot for reading as untrusted input: without
/// following a symbolic link, without blocking (a FIFO cannot hang the
/// open), and refusing anything but a regular file before a byte is read.
/// Returns the file and its size.
fn open_untrusted(path: &Path) -> Result<(File, u64), SnapshotError> {
    let file = OpenOptions::new()
        .read(true)
        // O_NONBLOCK changes nothing for the regular files that pass.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => SnapshotError::MissingFile(path.to_path_buf()),
            // O_NOFOLLOW's answer for a link; a loop in the directories
            // above also says ELOOP, and stays an I/O error.
            Some(libc::ELOOP) if fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) => {
                SnapshotError::SymlinkFile(path.to_path_buf())
            }
            _ => SnapshotError::Io {
                what: "open",
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    let meta = file.metadata().map_err(io_err("inspect", path))?;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok((file, meta.len()));
    }
    let path = path.to_path_buf();
    Err(if kind.is_fifo() {
        SnapshotError::FifoFile(path)
    } else if kind.is_char_device() || kind.is_block_device() {
        SnapshotError::DeviceFile(path)
    } else if kind.is_dir() {
        SnapshotError::NotARegularFile {
            path,
            kind: "directory",
        }
    } else if kind.is_socket() {
        SnapshotError::NotARegularFile {
            path,
            kind: "socket",
        }
    } else {
        SnapshotError::NotARegularFile {
            path,
            kind: "special file",
        }
    })
}

/// The largest a state file can be: the header and the largest payload.
pub const MAX_STATE_FILE: u64 = format::HEADER_LEN as u64 + format::MAX_PAYLOAD;

/// Reads and checks the state file of the snapshot at `dir`.
pub fn read_state(dir: &Path) -> Result<VmState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let (file, size) = open_untrusted(&path)?;
    let too_large = |size| SnapshotError::StateFileTooLarge {
        path: path.clone(),
        size,
        max: MAX_STATE_FILE,
    };
    if size > MAX_STATE_FILE {
        return Err(too_large(size));
    }
    // Bounded again while reading: the file may grow after the fstat.
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", &path))?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(too_large(bytes.len() as u64));
    }
    let state = format::decode(&bytes)?;
    state.validate()?;
    Ok(state)
}

impl VmState {
    /// Checks what a decoded state says about itself (counts, sizes, diff
    /// page runs). [`read_state`] does this for every file it reads.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        check_consistent(self)
    }
}

fn check_consistent(state: &VmState) -> Result<(), SnapshotError> {
    let bad = |m: String| Err(SnapshotError::Inconsistent(m));
    if state.vcpus.len() != state.config.vcpus as usize {
        return bad(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            state.config.vcpus
        ));
    }
    if state.gic.vcpus.len() != state.vcpus.len() {
        return bad("the vGIC state has a different vCPU count".into());
    }
    for (device, saved) in state.config.devices.iter().enumerate() {
        let limits = match saved {
            SavedDevice::Block { rate_limiter, .. } => [Some(rate_limiter), None],
            SavedDevice::Net {
                rx_rate_limiter,
                tx_rate_limiter,
                ..
            } => [Some(rx_rate_limiter), Some(tx_rate_limiter)],
            SavedDevice::Vsock { .. } => [None, None],
        };
        for limit in limits.into_iter().flatten() {
            limit
                .validate()
                .map_err(|source| SnapshotError::InvalidRateLimiter { device, source })?;
        }
    }
    if state.virtio.len() != state.config.devices.len() {
        return bad(format!(
            "{} transport states for {} devices",
            state.virtio.len(),
            state.config.devices.len()
        ));
    }
    if state.rtc.is_some() != state.config.rtc {
        return bad("the RTC state does not match the configuration".into());
    }
    if let Some(g) = &state.vmgenid {
        use crate::arch::aarch64::layout::{is_unused, PAGE_SIZE, VMGENID_SIZE};
        if !g.addr.is_multiple_of(PAGE_SIZE) || !is_unused(g.addr, VMGENID_SIZE) {
            return Err(SnapshotError::VmGenIdAddress(g.addr));
        }
        let virtio = state.config.devices.len();
        if !crate::device_manager::free_spis(virtio).contains(&g.spi) {
            return Err(SnapshotError::VmGenIdSpi { spi: g.spi, virtio });
        }
    }
    if state.diff.is_some() != state.parent.is_some() {
        return bad("a diff needs a parent, and only a diff has one".into());
    }
    if let Some(diff) = &state.diff {
        if diff.len() != state.memory.len() {
            return bad("diff runs do not match the memory regions".into());
        }
        for (runs, region) in diff.iter().zip(&state.memory) {
            let pages = region.size / crate::arch::aarch64::layout::PAGE_SIZE;
            let mut next = 0;
            for &(first, count) in runs {
                let end = first
                    .checked_add(count)
                    .filter(|&e| e <= pages && count > 0);
                match end {
                    Some(end) if first >= next => next = end,
                    _ => {
                        return bad(format!(
                            "diff page run ({first}, {count}) is out of order or past the region"
                        ))
                    }
                }
            }
        }
    }
    // Checked: the sizes come from a file (found by the snapshot_state
    // fuzz target: a wrapping sum could even match the VM's size).
    let total = state
        .memory
        .iter()
        .try_fold(0u64, |sum, r| sum.checked_add(r.size));
    if total != Some(state.config.memory_size) || state.memory.is_empty() {
        return bad(format!(
            "memory regions add up to {total:?} bytes, the VM has {}",
            state.config.memory_size
        ));
    }
    Ok(())
}

/// Opens the memory file of the snapshot at `dir` (a regular file, not
/// through a symbolic link) and checks it holds every region `state`
/// describes.
pub fn open_memory(dir: &Path, state: &VmState) -> Result<(File, PathBuf), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let (file, found) = open_untrusted(&path)?;
    let expected = state
        .memory
        .iter()
        .map(|r| r.file_offset.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    if found < expected {
        return Err(SnapshotError::MemoryFileTooShort {
            path,
            expected,
            found,
        });
    }
    Ok((file, path))
}

/// One layer of a chain: its directory, state and memory file.
pub struct Layer {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Its state.
    pub state: VmState,
    /// Its memory file, open.
    pub memory: File,
}

/// Reads a chain (a full snapshot, then diffs, oldest first), checking that
/// each diff was taken on top of the layer before it and that every memory
/// file holds what its state says.
pub fn read_chain(dirs: &[PathBuf]) -> Result<Vec<Layer>, SnapshotError> {
    let mut layers: Vec<Layer> = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let state = read_state(dir)?;
        match (&state.parent, layers.last()) {
            (Some(_), None) => return Err(SnapshotError::ChainBaseNotFull(dir.clone())),
            (None, Some(_)) => return Err(SnapshotError::FullInChain(dir.clone())),
            (Some(parent), Some(previous)) if *parent != previous.state.id => {
                return Err(SnapshotError::ChainGap {
                    path: dir.clone(),
                    parent: *parent,
                    previous: previous.state.id,
                })
            }
            _ => {}
        }
        push_layer(&mut layers, dir, state)?;
    }
    if layers.is_empty() {
        return Err(SnapshotError::Inconsistent("an empty chain".into()));
    }
    Ok(layers)
}

/// Checks that `state` has the memory layout of the layer before it,
/// opens its memory file and adds it to `layers`.
fn push_layer(layers: &mut Vec<Layer>, dir: &Path, state: VmState) -> Result<(), SnapshotError> {
    if let Some(previous) = layers.last() {
        if state.memory != previous.state.memory {
            return Err(SnapshotError::Inconsistent(format!(
                "{} has another memory layout than the layer before it",
                dir.display()
            )));
        }
    }
    let (memory, _) = open_memory(dir, &state)?;
    layers.push(Layer {
        dir: dir.to_path_buf(),
        state,
        memory,
    });
    Ok(())
}

/// Writes each diff layer's pages into `file` at their own offsets, oldest
/// layer first, so that a page in several layers ends up with the newest.
fn copy_diff_pages(layers: &[Layer], file: &File) -> io::Result<()> {
    use std::os::unix::fs::FileExt;

    let page = crate::arch::aarch64::layout::PAGE_SIZE;
    // Big enough for the longest run, up to 1 MiB: a merge of a few short
    // runs (a session's small diffs) does not zero and fault in 1 MiB.
    let longest = layers
        .iter()
        .flat_map(|l| l.state.diff.iter().flatten().flatten())
        .map(|&(_, count)| count.saturating_mul(page))
        .max()
        .unwrap_or(0);
    let mut buf = vec![0u8; usize::try_from(longest.min(1 << 20)).unwrap_or(1 << 20)];
    for layer in layers {
        let runs = layer.state.diff.as_deref().unwrap_or_default();
        for (region, region_runs) in layer.state.memory.iter().zip(runs) {
            for &(first, count) in region_runs {
                let mut offset = region.file_offset + first * page;
                let end = offset + count * page;
                while offset < end {
                    let n = usize::try_from(end - offset)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    layer.memory.read_exact_at(&mut buf[..n], offset)?;
                    file.write_all_at(&buf[..n], offset)?;
                    offset += n as u64;
                }
            }
        }
    }
    Ok(())
}

/// Compacts a chain into one full snapshot at `out`: the base's memory with
/// each diff's pages laid over it in order (a page absent from a diff is
/// unchanged, never zero), and the newest layer's state. The result keeps
/// the newest layer's id, so diffs taken on top of it still apply.
pub fn merge(chain: &[PathBuf], out: &Path) -> Result<(), SnapshotError> {
    let layers = read_chain(chain)?;
    let newest = layers
        .last()
        .map(|l| l.state.clone())
        .ok_or_else(|| SnapshotError::Inconsistent("an empty chain".into()))?;
    let merged = VmState {
        parent: None,
        diff: None,
        ..newest
    };
    let bytes = format::encode(&merged)?;
    write_dir(out, &bytes, |file| {
        let (base, diffs) = layers.split_at(1);
        // Exactly the memory the layout covers: a memory file may be longer
        // (restore maps only the regions), the merged one is not.
        let len = base[0]
            .state
            .memory
            .iter()
            .map(|r| r.file_offset.saturating_add(r.size))
            .max()
            .unwrap_or(0);
        // The base's holes stay holes (a sparse full snapshot's zeros).
        file.set_len(len)?;
        sparse::copy_file_sparse(&base[0].memory, file, len)?;
        copy_diff_pages(diffs, file)?;
        Ok(())
    })
}

/// Compacts consecutive diff snapshots (oldest first, each taken on top of
/// the one before) into one diff at `out`: relative to the first one's
/// parent, holding every page any of them holds (the newest copy of each),
/// with the newest layer's state and id, so diffs taken on top of the
/// newest still apply. It costs the bytes the diffs hold, not the guest's
/// memory size: this is how a session keeps its chain short on top of a
/// shared base.
pub fn merge_diffs(diffs: &[PathBuf], out: &Path) -> Result<(), SnapshotError> {
    let mut layers = Vec::with_capacity(diffs.len());
    for dir in diffs {
        let state = read_state(dir)?;
        if state.parent.is_none() || state.diff.is_none() {
            return Err(SnapshotError::Inconsistent(format!(
                "{} is a full snapshot: merge_diffs takes diffs only",
                dir.display()
            )));
        }
        if let Some(previous) = layers.last() {
            let previous: &Layer = previous;
            if state.parent != Some(previous.state.id) {
                return Err(SnapshotError::ChainGap {
                    path: dir.clone(),
                    parent: state.parent.unwrap_or(previous.state.id),
                    previous: previous.state.id,
                });
            }
        }
        push_layer(&mut layers, dir, state)?;
    }
    let (Some(first), Some(newest)) = (layers.first(), layers.last()) else {
        return Err(SnapshotError::Inconsistent("an empty chain".into()));
    };
    let regions = newest.state.memory.len();
    let mut union: Vec<Vec<(u64, u64)>> = vec![Vec::new(); regions];
    for layer in &layers {
        for (i, runs) in layer.state.diff.iter().flatten().enumerate().take(regions) {
            union[i].extend_from_slice(runs);
        }
    }
    for runs in &mut union {
        runs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for &(first, count) in runs.iter() {
            match merged.last_mut() {
                Some((start, len)) if first <= *start + *len => {
                    *len = (*len).max(first + count - *start);
                }
                _ => merged.push((first, count)),
            }
        }
        *runs = merged;
    }
    let state = VmState {
        parent: first.state.parent,
        diff: Some(union),
        ..newest.state.clone()
    };
    let bytes = format::encode(&state)?;
    let len = state
        .memory
        .iter()
        .map(|r| r.file_offset.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    let newest_dir = newest.dir.clone();
    write_dir(out, &bytes, |file| {
        file.set_len(len)?;
        copy_diff_pages(&layers, file)
    })?;
    carry_working_set(&newest_dir, out);
    Ok(())
}

/// A merged snapshot keeps the newest layer's id, so the working set
/// recorded for that layer still applies: copy it over. Best effort: it
/// is only an optimisation, and a restore checks it again.
fn carry_working_set(from: &Path, to: &Path) {
    match working_set::WorkingSet::load_any(from) {
        Ok(Some(set)) => {
            if let Err(e) = set.save(to) {
                log::warn!(
                    "the merged snapshot {} has no working set: {e}",
                    to.display()
                );
            }
        }
        Ok(None) => {}
        Err(e) => log::warn!("not carrying the working set of {}: {e}", from.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dormouse-snap-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_new_snapshot_replaces_the_old_one_whole() {
        let root = tmpdir("replace");
        let dir = root.join("snap");
        write_dir(&dir, b"state-1", |f| f.write_all(b"memory-1")).unwrap();
        write_dir(&dir, b"state-2", |f| f.write_all(b"memory-2")).unwrap();
        assert_eq!(fs::read(dir.join(STATE_FILE)).unwrap(), b"state-2");
        assert_eq!(fs::read(dir.join(MEMORY_FILE)).unwrap(), b"memory-2");
        // No temporary directory is left behind.
        let entries: Vec<_> = fs::read_dir(&root).unwrap().collect();
        assert_eq!(entries.len(), 1);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_failure_while_writing_leaves_the_old_snapshot_untouched() {
        let root = tmpdir("fail");
        let dir = root.join("snap");
        write_dir(&dir, b"state-1", |f| f.write_all(b"memory-1")).unwrap();
        let err = write_dir(&dir, b"state-2", |_| Err(io::Error::other("disk full")));
        assert!(matches!(err, Err(SnapshotError::Io { .. })));
        assert_eq!(fs::read(dir.join(STATE_FILE)).unwrap(), b"state-1");
        assert_eq!(fs::read(dir.join(MEMORY_FILE)).unwrap(), b"memory-1");
        assert_eq!(fs::read_dir(&root).unwrap().count(), 1);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_files_are_named() {
        let root = tmpdir("missing");
        assert!(matches!(
            read_state(&root),
            Err(SnapshotError::MissingFile(_))
        ));
        fs::remove_dir_all(&root).unwrap();
    }
}
