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
//!   on first access.
//!
//! Writing is crash-safe: files go into a temporary directory next to the
//! target, are fsync'd, and the directory then replaces the target in one
//! atomic `renameat2(RENAME_EXCHANGE)` (or `rename` if the target is new).
//! A crash leaves either the whole old snapshot or the whole new one.

pub mod format;
mod vm;

pub use vm::{Restore, SnapshotInfo};

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::aarch64::state::{GicState, VcpuState};
use crate::devices::rtc::RtcSnapshot;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;

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
    /// A file of the snapshot is missing.
    #[error("{0} does not exist: is this a dormouse snapshot directory?")]
    MissingFile(PathBuf),
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
    },
    /// virtio-net on a TAP.
    Net {
        /// The TAP's interface name.
        tap: String,
        /// The MAC address.
        mac: [u8; 6],
    },
    /// virtio-vsock.
    Vsock {
        /// The guest's CID.
        cid: u64,
        /// The host-side Unix socket.
        uds_path: PathBuf,
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
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(path: &Path) -> Result<(), SnapshotError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync the directory", path))
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

/// Writes a snapshot directory at `dir`: `state` holds `state`, `memory`
/// is filled by `write_memory`. Crash-safe as the module docs describe; on
/// an error nothing under `dir` changed.
pub fn write_dir(
    dir: &Path,
    state: &[u8],
    write_memory: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), SnapshotError> {
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
    let result = (|| {
        fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
        let mem_path = tmp.join(MEMORY_FILE);
        let mut mem = File::create(&mem_path).map_err(io_err("create", &mem_path))?;
        write_memory(&mut mem).map_err(io_err("write guest memory to", &mem_path))?;
        mem.sync_all().map_err(io_err("fsync", &mem_path))?;
        let state_path = tmp.join(STATE_FILE);
        let mut file = File::create(&state_path).map_err(io_err("create", &state_path))?;
        file.write_all(state)
            .map_err(io_err("write", &state_path))?;
        file.sync_all().map_err(io_err("fsync", &state_path))?;
        fsync_dir(&tmp)
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        exchange(&tmp, dir).map_err(io_err("swap in the new snapshot at", dir))?;
        // `tmp` now holds the previous snapshot.
        let _ = fs::remove_dir_all(&tmp);
    } else {
        fs::rename(&tmp, dir).map_err(io_err("move the new snapshot to", dir))?;
    }
    fsync_dir(&parent)
}

/// Reads and checks the state file of the snapshot at `dir`.
pub fn read_state(dir: &Path) -> Result<VmState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => SnapshotError::MissingFile(path.clone()),
        _ => SnapshotError::Io {
            what: "read",
            path: path.clone(),
            source: e,
        },
    })?;
    let state: VmState = format::decode(&bytes)?;
    check_consistent(&state)?;
    Ok(state)
}

/// Checks what a decoded state says about itself.
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
    let total: u64 = state.memory.iter().map(|r| r.size).sum();
    if total != state.config.memory_size || state.memory.is_empty() {
        return bad(format!(
            "memory regions add up to {total} bytes, the VM has {}",
            state.config.memory_size
        ));
    }
    Ok(())
}

/// Opens the memory file of the snapshot at `dir` and checks it holds
/// every region `state` describes.
pub fn open_memory(dir: &Path, state: &VmState) -> Result<(File, PathBuf), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => SnapshotError::MissingFile(path.clone()),
        _ => SnapshotError::Io {
            what: "open",
            path: path.clone(),
            source: e,
        },
    })?;
    let found = file.metadata().map_err(io_err("inspect", &path))?.len();
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
