//! The session root: a directory of sessions owned by one process at a
//! time, and its manager thread (idle suspend, lifetimes, chain merges).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::image::Image;
use super::session::{Session, SessionConfig, SessionRecord, SessionState, SESSION_RECORD};
use super::{files, SessionError};
use crate::seccomp::{ThreadFilters, ThreadKind, Violation};

/// How often the manager looks at every session by default.
pub const DEFAULT_TICK: Duration = Duration::from_millis(100);
/// How many layers a session's chain may have on top of its image before
/// it is merged in the background (see [`RootOptions::merge_after`]).
pub const DEFAULT_MERGE_AFTER: usize = 4;
/// The lock file's name in a session root.
pub const LOCK_FILE: &str = "lock";
/// The directory of sessions in a session root.
const SESSIONS_DIR: &str = "sessions";

/// How a session root runs.
#[derive(Debug, Clone)]
pub struct RootOptions {
    /// How often the manager checks idle timeouts and lifetimes (default
    /// [`DEFAULT_TICK`]).
    pub tick: Duration,
    /// Merge a session's chain when it has more layers than this on top
    /// of its image (default [`DEFAULT_MERGE_AFTER`]). A restore reads
    /// and maps every layer, so each one adds to the resume; merging
    /// costs the bytes the layers hold, off the request path. Four keeps
    /// the chain's share of a resume small while a session that suspends
    /// every few minutes merges about once an hour's worth of suspends.
    pub merge_after: usize,
    /// The KVM device node (default `/dev/kvm`).
    pub kvm_device: Option<PathBuf>,
    /// Whether the root's threads (endpoints, the manager, merges) run
    /// under their seccomp filter
    /// ([`SESSION_DENIED`](crate::seccomp::SESSION_DENIED); default: yes).
    /// Each VM's own threads have their VM's filters either way.
    pub seccomp: bool,
}

impl Default for RootOptions {
    fn default() -> Self {
        Self {
            tick: DEFAULT_TICK,
            merge_after: DEFAULT_MERGE_AFTER,
            kvm_device: None,
            seccomp: true,
        }
    }
}

struct RootInner {
    dir: PathBuf,
    _lock: File,
    options: RootOptions,
    sessions: Mutex<HashMap<String, Session>>,
    skipped: Vec<(PathBuf, String)>,
    stop: AtomicBool,
    manager: Mutex<Option<JoinHandle<()>>>,
    filters: Arc<ThreadFilters>,
}

/// A directory of sessions and the thread that manages them. Opening it
/// takes its lock file: one process at a time. Every suspended session
/// found in it is served again (its endpoints listen, and the next request
/// resumes it). Dropping it suspends every running session, so the next
/// process finds them all.
///
/// ```no_run
/// use dormouse::session::{Endpoint, Image, ImageSpec, SessionConfig, SessionRoot};
/// use std::time::Duration;
///
/// # fn main() -> Result<(), dormouse::session::SessionError> {
/// let image = Image::create(
///     "/srv/images/py",
///     &ImageSpec::new("/boot/Image").initrd("/boot/initrd").disk("/srv/rootfs.ext4"),
/// )?;
/// let root = SessionRoot::open("/srv/sessions")?;
/// let session = root.launch(
///     &image,
///     SessionConfig::new()
///         .endpoint(Endpoint::loopback(0, 5000))
///         .idle_timeout(Duration::from_secs(30)),
/// )?;
/// println!("session {} listens on {:?}", session.id(), session.endpoints());
/// # Ok(()) }
/// ```
pub struct SessionRoot {
    inner: Arc<RootInner>,
}

impl std::fmt::Debug for SessionRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRoot")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl SessionRoot {
    /// Opens (or creates, `0700`) the session root `dir` with default
    /// options.
    pub fn open(dir: impl AsRef<Path>) -> Result<SessionRoot, SessionError> {
        Self::open_with(dir, RootOptions::default())
    }

    /// Opens the session root `dir`: takes its lock (another live process
    /// holding it is [`SessionError::RootLocked`]), finds its sessions,
    /// and starts the manager.
    pub fn open_with(
        dir: impl AsRef<Path>,
        options: RootOptions,
    ) -> Result<SessionRoot, SessionError> {
        let dir = dir.as_ref();
        files::private_dir(&dir.join(SESSIONS_DIR))?;
        let dir = std::fs::canonicalize(dir).map_err(files::io("resolve", dir))?;
        let lock = take_lock(&dir)?;
        let filters = Arc::new(
            ThreadFilters::for_sessions(options.seccomp)
                .map_err(|e| SessionError::Vm(crate::Error::Seccomp(e)))?,
        );
        let mut sessions = HashMap::new();
        let mut skipped = Vec::new();
        let entries = std::fs::read_dir(dir.join(SESSIONS_DIR))
            .map_err(files::io("list", &dir.join(SESSIONS_DIR)))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let record_path = path.join(SESSION_RECORD);
            if !record_path.exists() {
                // A launch that died before its record: nothing to resume.
                log::info!(
                    "removing {} (a launch that never completed)",
                    path.display()
                );
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            match reopen(
                &path,
                &record_path,
                options.kvm_device.clone(),
                filters.clone(),
            ) {
                Ok(session) => {
                    log::info!(
                        "session {}: found suspended in {}",
                        session.id(),
                        path.display()
                    );
                    sessions.insert(session.id().to_owned(), session);
                }
                Err(e) => {
                    log::error!("session in {} left alone: {e}", path.display());
                    skipped.push((path, e.to_string()));
                }
            }
        }
        let inner = Arc::new(RootInner {
            dir,
            _lock: lock,
            options,
            sessions: Mutex::new(sessions),
            skipped,
            stop: AtomicBool::new(false),
            manager: Mutex::new(None),
            filters,
        });
        let weak = Arc::downgrade(&inner);
        let manager = crate::seccomp::spawn_thread(
            "dormouse-sessions",
            ThreadKind::Session,
            &inner.filters,
            move || manage(weak),
        )
        .map_err(|e| SessionError::Vm(crate::Error::Seccomp(e)))?;
        *inner.manager.lock().unwrap_or_else(|p| p.into_inner()) = Some(manager);
        Ok(SessionRoot { inner })
    }

    /// The root directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Launches a new session from `image`.
    pub fn launch(&self, image: &Image, config: SessionConfig) -> Result<Session, SessionError> {
        let id = files::random_id()?;
        let dir = self.inner.dir.join(SESSIONS_DIR).join(&id);
        let session = Session::launch(
            dir,
            id.clone(),
            image,
            &config,
            self.inner.options.kvm_device.clone(),
            self.inner.filters.clone(),
        )?;
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, session.clone());
        Ok(session)
    }

    /// Every session not terminated.
    pub fn sessions(&self) -> Vec<Session> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.state() != SessionState::Terminated)
            .cloned()
            .collect()
    }

    /// The session with this id.
    pub fn get(&self, id: &str) -> Option<Session> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .filter(|s| s.state() != SessionState::Terminated)
            .cloned()
    }

    /// The first system call a thread of this root made that its seccomp
    /// filter forbids, if one did (the call failed with `EPERM`).
    pub fn seccomp_violation(&self) -> Option<Violation> {
        self.inner.filters.violation()
    }

    /// Test hook: the manager thread makes a call its filter forbids.
    #[doc(hidden)]
    pub fn inject_forbidden_syscall(&self) {
        self.inner.filters.inject(ThreadKind::Session);
    }

    /// Test hook: the errno the injected call returned, once made.
    #[doc(hidden)]
    pub fn injected_syscall_errno(&self) -> Option<i32> {
        self.inner.filters.injected_errno()
    }

    /// Session directories found at open that could not be served, with
    /// why (their files are left as they are).
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.inner.skipped
    }
}

impl Drop for SessionRoot {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        if let Some(t) = self
            .inner
            .manager
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
        let sessions: Vec<Session> = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in sessions {
            s.close();
        }
    }
}

fn reopen(
    dir: &Path,
    record_path: &Path,
    kvm: Option<PathBuf>,
    filters: Arc<ThreadFilters>,
) -> Result<Session, SessionError> {
    let record = read_session_record(record_path)?;
    Session::reopen(dir.to_path_buf(), record, kvm, filters)
}

/// Reads and checks a session's record, as a root that finds the session
/// does before anything else.
pub(super) fn read_session_record(record_path: &Path) -> Result<SessionRecord, SessionError> {
    let record: SessionRecord = files::read_record(
        record_path,
        || SessionError::SessionCorrupt {
            path: record_path.to_path_buf(),
            reason: "missing".into(),
        },
        |reason| SessionError::SessionCorrupt {
            path: record_path.to_path_buf(),
            reason,
        },
    )?;
    record.validate(record_path)?;
    Ok(record)
}

/// Takes the root's lock file (flock, held while the root is open) and
/// writes our pid into it for the next one's error message.
fn take_lock(dir: &Path) -> Result<File, SessionError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(files::io("open the lock file", &path))?;
    // SAFETY: flock(2) on a descriptor we own; no pointers.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(SessionError::RootLocked {
                root: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        return Err(files::io("lock", &path)(err));
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| write!(file, "{}", std::process::id()))
        .map_err(files::io("write the lock file", &path))?;
    Ok(file)
}

fn manage(root: Weak<RootInner>) {
    let mut reported = false;
    loop {
        let Some(inner) = root.upgrade() else { return };
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        if let Some(v) = crate::seccomp::checkpoint(ThreadKind::Session) {
            if !reported {
                log::error!(
                    "session root {}: {v}, which its seccomp filter forbids",
                    inner.dir.display()
                );
                reported = true;
            }
        }
        let tick = inner.options.tick;
        let merge_after = inner.options.merge_after;
        let inner_filters = inner.filters.clone();
        let sessions: Vec<Session> = {
            let mut map = inner.sessions.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, s| s.state() != SessionState::Terminated);
            map.values().cloned().collect()
        };
        drop(inner);
        for session in sessions {
            if session.tick(merge_after) {
                let s = session.clone();
                let spawned = crate::seccomp::spawn_thread(
                    "dormouse-merge",
                    ThreadKind::Session,
                    &inner_filters,
                    move || {
                        if let Err(e) = s.merge_chain() {
                            log::error!("session {}: chain merge failed: {e}", s.id());
                        }
                    },
                );
                if let Err(e) = spawned {
                    log::error!("session {}: cannot start a merge: {e}", session.id());
                }
            }
        }
        std::thread::sleep(tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_at_a_time_and_broken_sessions_are_left_alone() {
        let dir = std::env::temp_dir().join(format!("dormouse-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = SessionRoot::open(&dir).unwrap();
        match SessionRoot::open(&dir) {
            Err(SessionError::RootLocked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected RootLocked, got {other:?}"),
        }
        drop(root);
        // A corrupt record and a launch that never wrote one.
        let bad = dir.join(SESSIONS_DIR).join("0123456789abcdef");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join(SESSION_RECORD), b"{}").unwrap();
        let unfinished = dir.join(SESSIONS_DIR).join("fedcba9876543210");
        std::fs::create_dir_all(&unfinished).unwrap();
        let root = SessionRoot::open(&dir).unwrap();
        assert!(root.sessions().is_empty());
        assert_eq!(root.skipped().len(), 1);
        assert_eq!(root.skipped()[0].0, bad);
        assert!(
            bad.join(SESSION_RECORD).exists(),
            "a broken session's files are kept"
        );
        assert!(!unfinished.exists());
        drop(root);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
