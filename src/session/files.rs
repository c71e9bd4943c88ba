//! Small file helpers for images and sessions: atomic JSON records, hex
//! ids, private directories.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::SessionError;

/// The most bytes an image or session record may have: they are a few
/// hundred bytes, and a larger file is not ours.
const MAX_RECORD_BYTES: u64 = 1 << 20;

pub(super) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SessionError {
    let path = path.to_path_buf();
    move |source| SessionError::Io { what, path, source }
}

/// Creates `dir` (and missing parents) `0700`.
pub(super) fn private_dir(dir: &Path) -> Result<(), SessionError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("create the directory", dir))
}

impl From<crate::fsutil::StepError> for SessionError {
    fn from(e: crate::fsutil::StepError) -> Self {
        SessionError::Io {
            what: e.what,
            path: e.path,
            source: e.source,
        }
    }
}

/// fsyncs a directory, so that renames and new entries in it are durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), SessionError> {
    Ok(crate::fsutil::sync_dir(dir)?)
}

/// Writes `value` as JSON to `path` atomically
/// ([`replace_file`](crate::fsutil::replace_file)): a crash leaves either
/// the old record or the new one, never a mix.
pub(super) fn write_record<T: Serialize>(path: &Path, value: &T) -> Result<(), SessionError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| SessionError::Io {
        what: "encode",
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    Ok(crate::fsutil::replace_file(path, &bytes)?)
}

/// Reads a JSON record, refusing symlinks, non-regular files and anything
/// larger than a record can be; `corrupt` builds the error for a file
/// that is not a valid record.
pub(super) fn read_record<T: DeserializeOwned>(
    path: &Path,
    missing: impl FnOnce() -> SessionError,
    corrupt: impl FnOnce(String) -> SessionError,
) -> Result<T, SessionError> {
    use std::io::Read;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(corrupt("it is a symbolic link".into()))
        }
        Err(e) => return Err(io("open", path)(e)),
    };
    let meta = file.metadata().map_err(io("inspect", path))?;
    if !meta.is_file() {
        return Err(corrupt("it is not a regular file".into()));
    }
    if meta.len() > MAX_RECORD_BYTES {
        return Err(corrupt(format!(
            "{} bytes, more than a record can be ({MAX_RECORD_BYTES})",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io("read", path))?;
    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))
}

/// `bytes` as lower-case hex.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random id: 16 hex digits.
pub(super) fn random_id() -> Result<String, SessionError> {
    let mut id = [0u8; 8];
    crate::vm::host_random(&mut id).map_err(io("read random bytes for", Path::new("an id")))?;
    Ok(hex(&id))
}

/// Whether `name` is a plain file name (what records may name inside their
/// own directory): no separators, not `.` or `..`, not empty.
pub(super) fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Milliseconds since the Unix epoch.
pub(super) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the Unix epoch.
pub(super) fn from_unix_ms(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}
