//! Sessions: the product on top of the VMM. Boot an environment once and
//! snapshot it as an [`Image`]; launch every session as a restored clone
//! of it ([`SessionRoot::launch`]); suspend a session to disk while it is
//! idle and resume it on the next request to one of its [`Endpoint`]s,
//! with its memory, disk and processes intact; end it after its lifetime.
//!
//! - **Images** ([`Image::create`]): the only place a guest boots. The VM
//!   runs until the guest is ready ([`Readiness`]), is paused and fully
//!   snapshotted; its disks become the image's read-only base.
//! - **Launch**: a restore of the image's snapshot with the session's own
//!   disk layer on top of the base (no disk byte is copied) and its own
//!   vsock socket. Every restore gives the guest a new VM generation ID
//!   (VMGenID), so clones reseed their RNG.
//! - **Endpoints** belong to the session, not its VM: TCP (loopback
//!   unless allowed otherwise) and Unix (`0600`) listeners that forward
//!   each client to a guest vsock port, held while the session resumes.
//! - **Suspend** is a pause, a diff snapshot onto the session's chain (the
//!   image is its base, so it costs what the session dirtied) and the VM
//!   dropped; **resume** restores from the chain. Chains longer than
//!   [`RootOptions::merge_after`] are merged in the background.
//! - **State on disk**: a session root directory, locked by one process;
//!   a new process finds every session and serves it again. The commit
//!   point of a suspend is its record's atomic rename, so a crash at any
//!   point leaves the last complete snapshot, with the disk that matches
//!   it.
//!
//! ```text
//! <image>/image.json  snapshot/  disk0.img
//! <root>/lock
//! <root>/sessions/<id>/session.json  l000001/ (state, memory, disk0.layer)  disk0.top  v.sock
//! ```

mod console;
mod endpoint;
mod files;
mod image;
mod root;
#[allow(clippy::module_inception)]
mod session;

use std::path::PathBuf;
use std::time::Duration;

pub use endpoint::Endpoint;
pub use image::{
    Image, ImageDisk, ImageManifest, ImageSpec, Readiness, DEFAULT_GUEST_CID, DEFAULT_READY_PORT,
    DEFAULT_READY_TIMEOUT, GUEST_ACCEPT_TIMEOUT, IMAGE_FORMAT, IMAGE_MANIFEST, IMAGE_SNAPSHOT,
};
pub use root::{RootOptions, SessionRoot, DEFAULT_MERGE_AFTER, DEFAULT_TICK, LOCK_FILE};
pub use session::{
    Session, SessionConfig, SessionInfo, SessionState, DEFAULT_MAX_LIFETIME, SESSION_FORMAT,
    SESSION_RECORD, SUSPEND_DRAIN,
};

/// Entry points for dormouse's fuzz targets (`fuzz/fuzz_targets/
/// session_records.rs`): the session layer's own record reader and writer,
/// which are not public. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use super::{files, ImageManifest, SessionError};

    /// A session record (`session.json`) as a root reads it; opaque, only
    /// compared and written back.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SessionRecord(super::session::SessionRecord);

    /// Reads and checks the record at `path` exactly as a root that finds
    /// a session does.
    pub fn read_session_record(path: &Path) -> Result<SessionRecord, SessionError> {
        super::root::read_session_record(path).map(SessionRecord)
    }

    /// Writes `record` to `path` as a suspend commits it.
    pub fn write_session_record(path: &Path, record: &SessionRecord) -> Result<(), SessionError> {
        files::write_record(path, &record.0)
    }

    /// Writes `manifest` to `path` as [`Image::create`](super::Image::create)
    /// writes `image.json`.
    pub fn write_image_manifest(path: &Path, manifest: &ImageManifest) -> Result<(), SessionError> {
        files::write_record(path, manifest)
    }
}

/// Points in a suspend where [`test_hook_crash_during_suspend`] kills the
/// process, to test that a crash anywhere leaves the last complete
/// snapshot resumable.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CrashPoint {
    /// The diff's state and memory are written, the disk layer is not
    /// frozen, the record does not name it.
    AfterMemory = 1,
    /// Everything is written but the record (the commit point).
    BeforeCommit = 2,
}

static CRASH_AT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Test hook: the next suspend that reaches `point` SIGKILLs this process.
#[doc(hidden)]
pub fn test_hook_crash_during_suspend(point: CrashPoint) {
    CRASH_AT.store(point as u8, std::sync::atomic::Ordering::SeqCst);
}

fn crash_point(point: CrashPoint) {
    if CRASH_AT.load(std::sync::atomic::Ordering::SeqCst) == point as u8 {
        // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, so no
        // handler of ours runs.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Everything that can go wrong with images and sessions.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The image directory lacks a part.
    #[error("image {dir} is incomplete: {what} is missing; recreate it with Image::create")]
    ImageIncomplete {
        /// The image directory.
        dir: PathBuf,
        /// What is missing.
        what: String,
    },
    /// A part of the image is not what the manifest says.
    #[error("image file {path} is corrupt ({reason}); recreate the image with Image::create")]
    ImageCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The image was written by a newer dormouse.
    #[error(
        "image {dir} has format {found}, this build reads up to {supported}: use a newer dormouse"
    )]
    ImageVersion {
        /// The image directory.
        dir: PathBuf,
        /// Its format.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// [`Image::create`] was given a directory that exists.
    #[error("{0} already exists: give Image::create a new directory, or remove this one")]
    ImageExists(PathBuf),
    /// One of the image's disks is gone.
    #[error(
        "disk {index} of image {dir} is missing ({path}): the image's disks are the read-only \
         base of its sessions; put it back or recreate the image"
    )]
    ImageDiskMissing {
        /// The image directory.
        dir: PathBuf,
        /// The disk's index.
        index: usize,
        /// Where it should be.
        path: PathBuf,
    },
    /// The guest did not become ready in time.
    #[error(
        "the guest was not ready after {waited:?} ({condition}); raise ImageSpec::ready_timeout \
         or fix the guest's init. Its last console lines:\n{console}"
    )]
    ReadinessTimeout {
        /// How long it was given.
        waited: Duration,
        /// What was awaited.
        condition: String,
        /// The guest's last console lines.
        console: String,
    },
    /// The guest stopped before it became ready.
    #[error("the guest stopped ({exit}) before it was ready. Its last console lines:\n{console}")]
    GuestStopped {
        /// How it stopped.
        exit: String,
        /// The guest's last console lines.
        console: String,
    },
    /// An endpoint's address or path is taken.
    #[error(
        "endpoint {endpoint} is already in use ({source}): choose another address, port or path"
    )]
    EndpointInUse {
        /// The endpoint.
        endpoint: String,
        /// What bind(2) said.
        source: std::io::Error,
    },
    /// Another live process has the session root open.
    #[error(
        "session root {root} is in use by {}: close it there first, or use another root",
        pid.map_or("another process".to_string(), |p| format!("process {p}"))
    )]
    RootLocked {
        /// The root.
        root: PathBuf,
        /// The process holding it, if it said.
        pid: Option<u32>,
    },
    /// The session has ended.
    #[error("session {0} is terminated: launch a new one")]
    Terminated(String),
    /// A session's record is not valid.
    #[error("session record {path} is corrupt ({reason}); the session cannot be resumed")]
    SessionCorrupt {
        /// The record.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A disk layer could not be used or merged.
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::LayerError),
    /// A configuration value is invalid.
    #[error("invalid session configuration: {0}")]
    Config(String),
    /// A file operation failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The VMM failed (restore, pause, snapshot).
    #[error(transparent)]
    Vm(#[from] crate::Error),
}

impl From<crate::snapshot::SnapshotError> for SessionError {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        SessionError::Vm(e.into())
    }
}
