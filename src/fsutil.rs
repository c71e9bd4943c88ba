//! The file-system steps that make a write crash-safe, shared by the
//! modules that need them (snapshots, disk layer maps, session records).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Which step of a crash-safe write failed, on which path, and why; each
/// caller turns it into its own module's error.
#[derive(Debug)]
pub(crate) struct StepError {
    /// The step ("create", "write", "rename into place", ...).
    pub what: &'static str,
    /// The path it was done on.
    pub path: PathBuf,
    /// What the OS said.
    pub source: io::Error,
}

fn step(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StepError {
    let path = path.to_path_buf();
    move |source| StepError { what, path, source }
}

/// fsyncs the directory `dir`, so that renames and new entries in it are
/// durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StepError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(step("fsync the directory", dir))
}

/// fsyncs the directory that holds `path`.
pub(crate) fn sync_parent(path: &Path) -> Result<(), StepError> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// Replaces `path` with `bytes` atomically: a `0600` temporary file next
/// to it (`<path>.tmp`, never followed if it is a symbolic link), written
/// and fsynced, renamed over `path`, then the directory fsynced. A crash
/// leaves the old file or the new one, never a mix; on an error the
/// temporary file is removed.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), StepError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    let tmp = PathBuf::from(name);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(step("create", &tmp))?;
        file.write_all(bytes).map_err(step("write", &tmp))?;
        file.sync_all().map_err(step("fsync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(step("rename into place", path))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_parent(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_is_whole_private_and_leaves_no_temporary() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("dormouse-fsutil-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("record");
        replace_file(&path, b"first").unwrap();
        replace_file(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.join("record.tmp").exists());
        // A symbolic link in the temporary's place is not followed.
        std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join("record.tmp")).unwrap();
        let err = replace_file(&path, b"third").unwrap_err();
        assert_eq!(err.what, "create");
        assert!(!dir.join("elsewhere").exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
