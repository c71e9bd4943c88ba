//! One session: a VM restored from an image, its chain of suspends, its
//! endpoints, its counters.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::console::ConsoleTail;
use super::endpoint::{self, Endpoint, Forward, Listener};
use super::image::Image;
use super::{files, SessionError};
use crate::devices::virtio::block::{map_path, merge_layers, DiskLayers};
use crate::seccomp::{ThreadFilters, ThreadKind};
use crate::MicroVm;

/// The session record format this build writes and the newest it reads.
pub const SESSION_FORMAT: u32 = 1;
/// The record's file name in a session directory.
pub const SESSION_RECORD: &str = "session.json";
/// How long a session lives by default: 8 hours.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// How long [`Session::suspend`] lets connections that reach the guest
/// finish before it suspends anyway.
pub const SUSPEND_DRAIN: Duration = Duration::from_secs(5);
/// The vsock socket of a session's VM, in the session directory.
const VSOCK_SOCKET: &str = "v.sock";

/// A session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionState {
    /// Its VM runs.
    Running,
    /// Its VM is gone; its memory and disk are in its chain of snapshots,
    /// and the next request (or [`Session::resume`]) restores it.
    Suspended,
    /// It ended; its files are removed.
    Terminated,
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SessionState::Running => "running",
            SessionState::Suspended => "suspended",
            SessionState::Terminated => "terminated",
        })
    }
}

/// How a session behaves: its endpoints, when it suspends, how long it
/// lives.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    endpoints: Vec<Endpoint>,
    idle_timeout: Option<Duration>,
    max_lifetime: Duration,
    allow_non_loopback: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionConfig {
    /// No endpoints, no idle suspend, a lifetime of
    /// [`DEFAULT_MAX_LIFETIME`].
    pub fn new() -> Self {
        Self {
            endpoints: Vec::new(),
            idle_timeout: None,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            allow_non_loopback: false,
        }
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Suspends the session after this long with no byte through any
    /// endpoint and no endpoint connection open.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }

    /// Terminates the session (and removes its files) this long after its
    /// launch, running or not.
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// Whether TCP endpoints may listen on non-loopback addresses
    /// (default: no).
    pub fn allow_non_loopback(mut self, allow: bool) -> Self {
        self.allow_non_loopback = allow;
        self
    }

    pub(super) fn validate(&self, image: &Image) -> Result<(), SessionError> {
        if !self.endpoints.is_empty() && !image.has_vsock() {
            return Err(SessionError::Config(format!(
                "image {} has no vsock device, so its sessions cannot have endpoints",
                image.dir().display()
            )));
        }
        if self.max_lifetime.is_zero() {
            return Err(SessionError::Config(
                "max_lifetime must be more than zero".into(),
            ));
        }
        if self.idle_timeout.is_some_and(|t| t.is_zero()) {
            return Err(SessionError::Config(
                "idle_timeout must be more than zero".into(),
            ));
        }
        Ok(())
    }
}

/// What a session's directory records: enough to resume it in another
/// process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SessionRecord {
    pub format: u32,
    pub id: String,
    pub image: PathBuf,
    pub image_snapshot: String,
    pub created_unix_ms: u64,
    pub idle_timeout_ms: Option<u64>,
    pub max_lifetime_ms: u64,
    pub allow_non_loopback: bool,
    /// As bound (TCP port 0 replaced by the port in use).
    pub endpoints: Vec<Endpoint>,
    /// Layer directories on top of the image's snapshot, oldest first.
    pub chain: Vec<String>,
    /// The number the next layer directory gets.
    pub next_layer: u64,
    pub launches: u64,
    pub suspends: u64,
    pub resumes: u64,
    pub merges: u64,
    pub suspended_unix_ms: Option<u64>,
}

impl SessionRecord {
    pub(super) fn validate(&self, path: &Path) -> Result<(), SessionError> {
        let corrupt = |reason: String| SessionError::SessionCorrupt {
            path: path.to_path_buf(),
            reason,
        };
        if self.format == 0 || self.format > SESSION_FORMAT {
            return Err(corrupt(format!(
                "record format {} (this build reads up to {SESSION_FORMAT}): upgrade dormouse",
                self.format
            )));
        }
        if !files::plain_name(&self.id) {
            return Err(corrupt(format!("session id {:?}", self.id)));
        }
        if let Some(bad) = self.chain.iter().find(|n| !files::plain_name(n)) {
            return Err(corrupt(format!("chain entry {bad:?}")));
        }
        if self.max_lifetime_ms == 0 || self.idle_timeout_ms == Some(0) {
            return Err(corrupt("a zero lifetime or idle timeout".into()));
        }
        // The next suspend writes l<next_layer> (removing whatever is
        // there first) and the next merge m<next_layer>: a committed layer
        // of that number or above would be overwritten.
        // Far beyond any session's life (a suspend a microsecond for
        // 100,000 years), so that counting on from it cannot overflow.
        if self.next_layer >= MAX_NEXT_LAYER {
            return Err(corrupt(format!(
                "next layer number {} (at most {MAX_NEXT_LAYER})",
                self.next_layer
            )));
        }
        if let Some(bad) = self
            .chain
            .iter()
            .find(|n| layer_number(n).is_some_and(|k| k >= self.next_layer))
        {
            return Err(corrupt(format!(
                "chain entry {bad:?} is not below the next layer number {}",
                self.next_layer
            )));
        }
        Ok(())
    }
}

/// The bound on a session record's `next_layer` (it must be below).
const MAX_NEXT_LAYER: u64 = 1 << 62;

/// The number in a layer directory's name (`l000012`, `m000013`), if it
/// is one.
fn layer_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix('l').or_else(|| name.strip_prefix('m'))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // More digits than a u64 holds: above any next layer number.
    Some(digits.parse().unwrap_or(u64::MAX))
}

/// Latencies measured in this process.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    last_launch: Option<Duration>,
    last_suspend: Option<Duration>,
    last_resume: Option<Duration>,
    last_resume_to_first_byte: Option<Duration>,
    resumed_at: Option<SystemTime>,
}

struct Slot {
    state: SessionState,
    vm: Option<MicroVm>,
    record: SessionRecord,
    stats: Stats,
    merging: bool,
}

/// A snapshot of a session's state and counters.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// The session's id.
    pub id: String,
    /// Its state.
    pub state: SessionState,
    /// When it was launched.
    pub created: SystemTime,
    /// When it was last suspended, if ever.
    pub suspended_at: Option<SystemTime>,
    /// When this process last resumed it, if it did.
    pub resumed_at: Option<SystemTime>,
    /// How long since the last byte through an endpoint (or since it
    /// started running in this process).
    pub idle_for: Duration,
    /// Endpoint connections open now.
    pub open_connections: usize,
    /// Bytes through its endpoints in this process.
    pub bytes: u64,
    /// Launches (1).
    pub launches: u64,
    /// Suspends, over its whole life.
    pub suspends: u64,
    /// Resumes, over its whole life.
    pub resumes: u64,
    /// Chain merges, over its whole life.
    pub merges: u64,
    /// Layers in its chain on top of the image.
    pub chain_len: usize,
    /// How long its launch took (in this process).
    pub last_launch: Option<Duration>,
    /// How long its last suspend took, from the call to the VM gone.
    pub last_suspend: Option<Duration>,
    /// How long its last resume took, from the call to the VM running.
    pub last_resume: Option<Duration>,
    /// For the last connection that resumed it: from the accept to the
    /// first byte the guest answered.
    pub last_resume_to_first_byte: Option<Duration>,
    /// Its endpoints, as bound.
    pub endpoints: Vec<Endpoint>,
}

pub(super) struct Inner {
    id: String,
    dir: PathBuf,
    image: Image,
    kvm_device: Option<PathBuf>,
    slot: Mutex<Slot>,
    console: ConsoleTail,
    open_conns: AtomicUsize,
    epoch: Instant,
    last_activity_ms: AtomicU64,
    bytes: AtomicU64,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    filters: Arc<ThreadFilters>,
    /// Streams to the guest that endpoint connections hold now.
    active_streams: AtomicUsize,
    /// Whether a suspend is draining: new guest streams wait for it.
    draining: (Mutex<bool>, std::sync::Condvar),
}

/// A handle on one session; clones share it.
#[derive(Clone)]
pub struct Session(pub(super) Arc<Inner>);

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.0.id)
            .field("dir", &self.0.dir)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Launches a new session from `image` in `dir` (which must not
    /// exist): binds its endpoints, records it, restores the image as a
    /// clone with its own disk layer and vsock socket, and starts serving.
    pub(super) fn launch(
        dir: PathBuf,
        id: String,
        image: &Image,
        config: &SessionConfig,
        kvm_device: Option<PathBuf>,
        filters: Arc<ThreadFilters>,
    ) -> Result<Session, SessionError> {
        config.validate(image)?;
        let started = Instant::now();
        files::private_dir(&dir)?;
        let result = (|| {
            let mut listeners = Vec::new();
            let mut bound = Vec::new();
            for endpoint in &config.endpoints {
                let (l, b) = Listener::bind(endpoint, config.allow_non_loopback)?;
                listeners.push((l, b.guest_port()));
                bound.push(b);
            }
            let record = SessionRecord {
                format: SESSION_FORMAT,
                id: id.clone(),
                image: image.dir().to_path_buf(),
                image_snapshot: image.manifest().snapshot_id.clone(),
                created_unix_ms: files::unix_ms(SystemTime::now()),
                idle_timeout_ms: config
                    .idle_timeout
                    .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                max_lifetime_ms: u64::try_from(config.max_lifetime.as_millis()).unwrap_or(u64::MAX),
                allow_non_loopback: config.allow_non_loopback,
                endpoints: bound,
                chain: Vec::new(),
                next_layer: 1,
                launches: 1,
                suspends: 0,
                resumes: 0,
                merges: 0,
                suspended_unix_ms: None,
            };
            files::write_record(&dir.join(SESSION_RECORD), &record)?;
            let session = Session::new(dir.clone(), image.clone(), record, kvm_device, filters);
            {
                let mut slot = session.0.lock();
                session.0.restore(&mut slot, true)?;
                slot.stats.last_launch = Some(started.elapsed());
            }
            session.serve(listeners);
            Ok(session)
        })();
        match result {
            Ok(session) => {
                log::info!(
                    "session {id}: launched from {} in {:?}",
                    image.dir().display(),
                    started.elapsed()
                );
                Ok(session)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Reopens a suspended session from its record (in a new process).
    pub(super) fn reopen(
        dir: PathBuf,
        record: SessionRecord,
        kvm_device: Option<PathBuf>,
        filters: Arc<ThreadFilters>,
    ) -> Result<Session, SessionError> {
        let image = Image::open(&record.image)?;
        if image.manifest().snapshot_id != record.image_snapshot {
            return Err(SessionError::SessionCorrupt {
                path: dir.join(SESSION_RECORD),
                reason: format!(
                    "its image {} now holds snapshot {}, the session was launched from {}",
                    record.image.display(),
                    image.manifest().snapshot_id,
                    record.image_snapshot
                ),
            });
        }
        remove_uncommitted(&dir, &record.chain);
        let mut listeners = Vec::new();
        for endpoint in &record.endpoints {
            let (l, _) = Listener::bind(endpoint, record.allow_non_loopback)?;
            listeners.push((l, endpoint.guest_port()));
        }
        let session = Session::new(dir, image, record, kvm_device, filters);
        session.0.lock().state = SessionState::Suspended;
        session.serve(listeners);
        Ok(session)
    }

    fn new(
        dir: PathBuf,
        image: Image,
        record: SessionRecord,
        kvm_device: Option<PathBuf>,
        filters: Arc<ThreadFilters>,
    ) -> Self {
        Session(Arc::new(Inner {
            id: record.id.clone(),
            dir,
            image,
            kvm_device,
            slot: Mutex::new(Slot {
                state: SessionState::Suspended,
                vm: None,
                record,
                stats: Stats::default(),
                merging: false,
            }),
            console: ConsoleTail::default(),
            open_conns: AtomicUsize::new(0),
            epoch: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
            filters,
            active_streams: AtomicUsize::new(0),
            draining: (Mutex::new(false), std::sync::Condvar::new()),
        }))
    }

    fn serve(&self, listeners: Vec<(Listener, u32)>) {
        let mut threads = self.0.threads.lock().unwrap_or_else(|p| p.into_inner());
        for (listener, port) in listeners {
            let forward: Arc<dyn Forward> = self.0.clone();
            let stop = self.0.stop.clone();
            let filters = self.0.filters.clone();
            match crate::seccomp::spawn_thread(
                "dormouse-accept",
                ThreadKind::Session,
                &self.0.filters,
                move || endpoint::serve(listener, port, forward, stop, filters),
            ) {
                Ok(t) => threads.push(t),
                Err(e) => log::error!("session {}: cannot start an accept thread: {e}", self.0.id),
            }
        }
    }

    /// The session's id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The session's directory.
    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// Its state now.
    pub fn state(&self) -> SessionState {
        self.0.lock().state
    }

    /// Its endpoints, as bound (a TCP port 0 replaced by the real port).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.0.lock().record.endpoints.clone()
    }

    /// The guest's last console lines (since this process last ran it).
    pub fn console_tail(&self) -> Vec<String> {
        self.0.console.lines()
    }

    /// Its state and counters.
    pub fn info(&self) -> SessionInfo {
        let slot = self.0.lock();
        let r = &slot.record;
        SessionInfo {
            id: self.0.id.clone(),
            state: slot.state,
            created: files::from_unix_ms(r.created_unix_ms),
            suspended_at: r.suspended_unix_ms.map(files::from_unix_ms),
            resumed_at: slot.stats.resumed_at,
            idle_for: self.0.idle_for(),
            open_connections: self.0.open_conns.load(Ordering::Acquire),
            bytes: self.0.bytes.load(Ordering::Relaxed),
            launches: r.launches,
            suspends: r.suspends,
            resumes: r.resumes,
            merges: r.merges,
            chain_len: r.chain.len(),
            last_launch: slot.stats.last_launch,
            last_suspend: slot.stats.last_suspend,
            last_resume: slot.stats.last_resume,
            last_resume_to_first_byte: slot.stats.last_resume_to_first_byte,
            endpoints: r.endpoints.clone(),
        }
    }

    /// Suspends a running session: pause, diff snapshot onto its chain
    /// (what it dirtied since its last snapshot, never its whole memory),
    /// then the VM is dropped and its memory returns to the host.
    ///
    /// Endpoint connections that reach the guest now get up to
    /// [`SUSPEND_DRAIN`] to finish; connections that arrive from now on
    /// are held and served once the session resumes, so a request racing
    /// a suspend is answered, not lost. A connection still open after the
    /// drain is closed (its guest side is gone). The endpoints keep
    /// listening, and the next connection resumes the session. A
    /// suspended session is left as is.
    pub fn suspend(&self) -> Result<(), SessionError> {
        let inner = &self.0;
        inner.set_draining(true);
        let deadline = Instant::now() + SUSPEND_DRAIN;
        while inner.active_streams.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let result = {
            let mut slot = inner.lock();
            match slot.state {
                SessionState::Running => inner.suspend_locked(&mut slot, "asked"),
                SessionState::Suspended => Ok(()),
                SessionState::Terminated => Err(SessionError::Terminated(inner.id.clone())),
            }
        };
        inner.set_draining(false);
        result
    }

    /// Resumes a suspended session from its chain; a running one is left
    /// as is.
    pub fn resume(&self) -> Result<(), SessionError> {
        let mut slot = self.0.lock();
        match slot.state {
            SessionState::Suspended => self.0.restore(&mut slot, false),
            SessionState::Running => Ok(()),
            SessionState::Terminated => Err(SessionError::Terminated(self.0.id.clone())),
        }
    }

    /// Ends the session: stops its endpoints, drops its VM and removes its
    /// files. Terminating twice is fine.
    pub fn terminate(&self) -> Result<(), SessionError> {
        self.0.terminate("asked")
    }

    /// Stops serving without touching the session's files (the root is
    /// closing): a running session is suspended first, so nothing is lost.
    pub(super) fn close(&self) {
        {
            let mut slot = self.0.lock();
            if slot.state == SessionState::Running {
                if let Err(e) = self.0.suspend_locked(&mut slot, "the session root closed") {
                    log::error!("session {}: suspend at close failed: {e}", self.0.id);
                }
            }
        }
        self.0.stop_threads();
    }

    /// One tick of the root's manager: lifetime, idle suspend, and whether
    /// the chain wants merging (returned: start a merge).
    pub(super) fn tick(&self, merge_after: usize) -> bool {
        let inner = &self.0;
        let (lifetime_over, idle_timeout, chain_len, merging, state) = {
            let slot = inner.lock();
            let r = &slot.record;
            let end = r.created_unix_ms.saturating_add(r.max_lifetime_ms);
            (
                files::unix_ms(SystemTime::now()) >= end,
                r.idle_timeout_ms.map(Duration::from_millis),
                r.chain.len(),
                slot.merging,
                slot.state,
            )
        };
        if state == SessionState::Terminated {
            return false;
        }
        if lifetime_over {
            if let Err(e) = inner.terminate("its lifetime ended") {
                log::error!("session {}: terminate failed: {e}", inner.id);
            }
            return false;
        }
        if let Some(timeout) = idle_timeout {
            if state == SessionState::Running && inner.idle_for() >= timeout {
                let mut slot = inner.lock();
                // Checked again under the lock: a connection that arrived
                // since holds the session running.
                if slot.state == SessionState::Running
                    && inner.open_conns.load(Ordering::Acquire) == 0
                    && inner.idle_for() >= timeout
                {
                    if let Err(e) = inner.suspend_locked(&mut slot, "idle") {
                        log::error!("session {}: idle suspend failed: {e}", inner.id);
                    }
                }
            }
        }
        !merging && chain_len > merge_after
    }

    /// Merges the session's chain into one layer (run off the request
    /// path), then swaps it in atomically.
    pub(super) fn merge_chain(&self) -> Result<(), SessionError> {
        self.0.merge_chain()
    }
}

/// Removes a disk layer (its data file and its map): a running VM's top
/// left by a crash.
fn remove_layer(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(map_path(path));
}

/// Turns a suspended VM's disk top into a frozen layer at `layer`: the
/// snapshot just wrote its map, so the pair is consistent; both move.
fn freeze(top: &Path, layer: &Path) -> Result<(), SessionError> {
    std::fs::rename(top, layer).map_err(files::io("move the disk layer", top))?;
    let map = map_path(top);
    std::fs::rename(&map, map_path(layer)).map_err(files::io("move the disk layer map", &map))
}

/// Removes what a crash can leave in a session directory: layers not in
/// the committed chain, the running VM's disk layers, its vsock socket.
fn remove_uncommitted(dir: &Path, chain: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == SESSION_RECORD || chain.contains(&name) {
            continue;
        }
        let path = entry.path();
        log::info!(
            "removing {} (not in the session's committed chain)",
            path.display()
        );
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

impl Inner {
    fn set_draining(&self, on: bool) {
        let (lock, cvar) = &self.draining;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = on;
        if !on {
            cvar.notify_all();
        }
    }

    /// Waits while a suspend drains (bounded: the drain ends by itself).
    fn wait_for_drain(&self) {
        let (lock, cvar) = &self.draining;
        let mut draining = lock.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + SUSPEND_DRAIN + Duration::from_secs(60);
        while *draining && !self.stopping() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            draining = match cvar
                .wait_timeout(draining, (deadline - now).min(Duration::from_millis(100)))
            {
                Ok((d, _)) => d,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        // A panic while holding the slot leaves a state we still report
        // and can terminate: take it as is.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed();
        now.saturating_sub(Duration::from_millis(
            self.last_activity_ms.load(Ordering::Acquire),
        ))
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// The data file of disk `disk`'s layer in the layer directory `layer`.
    fn layer_file(&self, layer: &str, disk: usize) -> PathBuf {
        self.dir.join(layer).join(format!("disk{disk}.layer"))
    }

    fn top(&self, disk: usize) -> PathBuf {
        self.dir.join(format!("disk{disk}.top"))
    }

    /// Restores the VM from the image and the chain, with a fresh disk top
    /// per disk. Launch and resume.
    fn restore(&self, slot: &mut Slot, launch: bool) -> Result<(), SessionError> {
        let started = Instant::now();
        let mut chain = vec![self.image.snapshot_dir()];
        chain.extend(slot.record.chain.iter().map(|n| self.dir.join(n)));
        let uds = self.dir.join(VSOCK_SOCKET);
        let _ = std::fs::remove_file(&uds);
        let mut restore = MicroVm::restore_chain(chain)
            .serial_output(self.console.clone())
            .resume(true);
        if self.image.has_vsock() {
            restore = restore.vsock_uds(&uds);
        }
        if let Some(kvm) = &self.kvm_device {
            restore = restore.kvm_device(kvm);
        }
        for (i, disk) in self.image.manifest().disks.iter().enumerate() {
            let base = self.image.dir().join(&disk.file);
            if !base.is_file() {
                return Err(SessionError::ImageDiskMissing {
                    dir: self.image.dir().to_path_buf(),
                    index: i,
                    path: base,
                });
            }
            let layers = slot
                .record
                .chain
                .iter()
                .map(|l| self.layer_file(l, i))
                .collect();
            let top = self.top(i);
            remove_layer(&top);
            restore = restore.block_layers(i, DiskLayers { base, layers, top });
        }
        let vm = restore.build()?;
        slot.vm = Some(vm);
        slot.state = SessionState::Running;
        let took = started.elapsed();
        if !launch {
            slot.record.resumes = slot.record.resumes.saturating_add(1);
            slot.stats.last_resume = Some(took);
            slot.stats.resumed_at = Some(SystemTime::now());
            log::info!("session {}: suspended -> running in {took:?}", self.id);
        }
        self.touch();
        Ok(())
    }

    fn suspend_locked(&self, slot: &mut Slot, why: &str) -> Result<(), SessionError> {
        let started = Instant::now();
        let Some(mut vm) = slot.vm.take() else {
            slot.state = SessionState::Suspended;
            return Ok(());
        };
        if let Err(e) = vm.pause() {
            // A VM that cannot pause cannot be snapshotted: it is dropped
            // and the session resumes from its last complete snapshot.
            log::error!(
                "session {}: pause failed ({e}); resuming from the last snapshot next time",
                self.id
            );
            drop(vm);
            slot.state = SessionState::Suspended;
            return Err(e.into());
        }
        let name = format!("l{:06}", slot.record.next_layer);
        let layer = self.dir.join(&name);
        let _ = std::fs::remove_dir_all(&layer);
        if let Err(e) = vm.snapshot_diff(&layer) {
            // Nothing was lost: the VM runs on, and its dirty pages go into
            // the next snapshot.
            let resumed = vm.resume();
            slot.vm = Some(vm);
            if let Err(r) = resumed {
                log::error!("session {}: resume after a failed suspend: {r}", self.id);
            }
            return Err(e.into());
        }
        let vm_gone = {
            drop(vm);
            started.elapsed()
        };
        slot.record.next_layer += 1;
        // From here the VM is gone: whatever fails, the session is
        // suspended at its last committed layer.
        slot.state = SessionState::Suspended;
        super::crash_point(super::CrashPoint::AfterMemory);
        let frozen = (0..self.image.manifest().disks.len())
            .try_for_each(|i| freeze(&self.top(i), &self.layer_file(&name, i)))
            .and_then(|()| files::sync_dir(&layer));
        if let Err(e) = frozen {
            log::error!(
                "session {}: suspend failed after its VM stopped ({e}); it resumes from its \
                 last complete snapshot, losing what it did since",
                self.id
            );
            let _ = std::fs::remove_dir_all(&layer);
            return Err(e);
        }
        super::crash_point(super::CrashPoint::BeforeCommit);
        slot.record.chain.push(name);
        slot.record.suspends = slot.record.suspends.saturating_add(1);
        slot.record.suspended_unix_ms = Some(files::unix_ms(SystemTime::now()));
        slot.state = SessionState::Suspended;
        // The commit point: from here a new process resumes from this
        // layer. Before it, from the previous one (whose disk matches it:
        // this run's disk writes were all in the top, now discarded).
        let committed = files::write_record(&self.dir.join(SESSION_RECORD), &slot.record);
        let took = started.elapsed();
        slot.stats.last_suspend = Some(took);
        log::info!(
            "session {}: running -> suspended ({why}) in {took:?} (VM gone after {vm_gone:?})",
            self.id
        );
        committed
    }

    fn terminate(&self, why: &str) -> Result<(), SessionError> {
        // Stopping first: a connection waiting for the slot gets an error
        // instead of resuming the session.
        if self.stop.swap(true, Ordering::AcqRel) && self.lock().state == SessionState::Terminated {
            return Ok(());
        }
        let vm = {
            let mut slot = self.lock();
            if slot.state == SessionState::Terminated {
                return Ok(());
            }
            slot.vm.take()
        };
        drop(vm);
        self.stop_threads();
        let removed = std::fs::remove_dir_all(&self.dir).map_err(files::io("remove", &self.dir));
        // Published last: whoever sees Terminated finds the files and the
        // endpoints gone.
        self.lock().state = SessionState::Terminated;
        log::info!("session {}: terminated ({why})", self.id);
        removed
    }

    fn stop_threads(&self) {
        self.stop.store(true, Ordering::Release);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    fn merge_chain(&self) -> Result<(), SessionError> {
        let (names, out_name) = {
            let mut slot = self.lock();
            if slot.merging || slot.record.chain.len() < 2 || slot.state == SessionState::Terminated
            {
                return Ok(());
            }
            slot.merging = true;
            let name = format!("m{:06}", slot.record.next_layer);
            slot.record.next_layer += 1;
            (slot.record.chain.clone(), name)
        };
        let started = Instant::now();
        let out = self.dir.join(&out_name);
        let merged = (|| {
            let dirs: Vec<PathBuf> = names.iter().map(|n| self.dir.join(n)).collect();
            crate::snapshot::merge_diffs(&dirs, &out)?;
            for i in 0..self.image.manifest().disks.len() {
                let layers: Vec<PathBuf> = names.iter().map(|n| self.layer_file(n, i)).collect();
                merge_layers(&layers, &self.layer_file(&out_name, i))?;
            }
            files::sync_dir(&out)
        })();
        let mut slot = self.lock();
        slot.merging = false;
        if let Err(e) = merged {
            let _ = std::fs::remove_dir_all(&out);
            return Err(e);
        }
        // Swap: the chain only grew at its end since (suspends append), so
        // its prefix is still `names` unless the session ended.
        if slot.state == SessionState::Terminated || !slot.record.chain.starts_with(&names) {
            let _ = std::fs::remove_dir_all(&out);
            return Ok(());
        }
        let mut chain = vec![out_name];
        chain.extend_from_slice(&slot.record.chain[names.len()..]);
        let old = std::mem::replace(&mut slot.record.chain, chain);
        slot.record.merges = slot.record.merges.saturating_add(1);
        if let Err(e) = files::write_record(&self.dir.join(SESSION_RECORD), &slot.record) {
            slot.record.chain = old;
            slot.record.merges -= 1;
            let _ = std::fs::remove_dir_all(&out);
            return Err(e);
        }
        drop(slot);
        // The old layers are no longer named by the record. A running VM
        // restored from them keeps its open files and mappings.
        for n in &names {
            let _ = std::fs::remove_dir_all(self.dir.join(n));
        }
        log::info!(
            "session {}: merged {} layers in {:?}",
            self.id,
            names.len(),
            started.elapsed()
        );
        Ok(())
    }
}

impl Forward for Inner {
    fn guest_stream(&self, port: u32) -> Result<(UnixStream, bool), SessionError> {
        // Held while a suspend drains, then served by the resumed session.
        self.wait_for_drain();
        let mut slot = self.lock();
        if self.stopping() {
            return Err(SessionError::Terminated(self.id.clone()));
        }
        let resumed = match slot.state {
            SessionState::Terminated => return Err(SessionError::Terminated(self.id.clone())),
            SessionState::Suspended => {
                self.restore(&mut slot, false)?;
                true
            }
            SessionState::Running => false,
        };
        self.touch();
        let vm = slot
            .vm
            .as_ref()
            .ok_or_else(|| SessionError::Terminated(self.id.clone()))?;
        let stream = vm.vsock_connect(port)?;
        self.active_streams.fetch_add(1, Ordering::AcqRel);
        Ok((stream, resumed))
    }

    fn connection(&self, open: bool) {
        if open {
            self.open_conns.fetch_add(1, Ordering::AcqRel);
        } else {
            self.open_conns.fetch_sub(1, Ordering::AcqRel);
        }
        self.touch();
    }

    fn guest_stream_closed(&self) {
        self.active_streams.fetch_sub(1, Ordering::AcqRel);
    }

    fn activity(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.touch();
    }

    fn first_byte_after_resume(&self, since: Duration) {
        self.lock().stats.last_resume_to_first_byte = Some(since);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(chain: &[&str], next_layer: u64) -> SessionRecord {
        SessionRecord {
            format: SESSION_FORMAT,
            id: "0123456789abcdef".into(),
            image: PathBuf::from("/i"),
            image_snapshot: "00".into(),
            created_unix_ms: 0,
            idle_timeout_ms: None,
            max_lifetime_ms: 1,
            allow_non_loopback: false,
            endpoints: Vec::new(),
            chain: chain.iter().map(|n| n.to_string()).collect(),
            next_layer,
            launches: 1,
            suspends: 0,
            resumes: 0,
            merges: 0,
            suspended_unix_ms: None,
        }
    }

    /// Found by the `session_records` fuzz target: a record whose chain
    /// holds m000003 with next layer 3 was accepted, and the next merge
    /// (or, for l000003, the next suspend) would have overwritten a
    /// committed layer.
    #[test]
    fn a_record_whose_next_layer_would_overwrite_its_chain_is_refused() {
        let path = Path::new("session.json");
        assert!(record(&["l000001", "m000002"], 3).validate(path).is_ok());
        assert!(record(&["l000001", "other"], 1_000_000)
            .validate(path)
            .is_ok());
        for (chain, next) in [
            (&["l000001", "m000003"][..], 3),
            (&["l000003"][..], 3),
            (&["l000009"][..], 3),
            (&["m99999999999999999999999"][..], 3),
            (&[][..], u64::MAX),
            (&[][..], MAX_NEXT_LAYER),
        ] {
            match record(chain, next).validate(path) {
                Err(SessionError::SessionCorrupt { .. }) => {}
                other => panic!("{chain:?} with next layer {next}: {other:?}"),
            }
        }
        assert!(record(&["l000001"], MAX_NEXT_LAYER - 1)
            .validate(path)
            .is_ok());
    }
}
