//! Snapshotting a paused [`MicroVm`] and restoring one: the snapshot module
//! assembles each part's own saved state and rebuilds the VM through the
//! same phases as [`MicroVmBuilder::build`](crate::MicroVmBuilder::build).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{SnapshotError, SnapshotId, VmState};
use crate::builder::{VsockHost, DEFAULT_KVM_DEVICE};
use crate::devices::serial::{SerialInput, SerialOutput};
use crate::devices::virtio::net::TapConfig;
use crate::{Error, MicroVm};

/// What a snapshot wrote, and how long each part took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Bytes in the state file.
    pub state_bytes: u64,
    /// Bytes of guest memory data written into the memory file: every
    /// byte for a dense full snapshot, the pages that hold data (not the
    /// holes) for a sparse one, the changed pages for a diff.
    pub memory_bytes: u64,
    /// Time to save vCPU, vGIC and device state.
    pub save_state: Duration,
    /// Time to write and fsync the files.
    pub write_files: Duration,
}

/// What [`MicroVm::snapshot_diff_live`] wrote, and how long the guest was
/// paused for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveDiffInfo {
    /// The snapshot, as [`MicroVm::snapshot_diff`] reports it
    /// (`write_files` is the whole call but `save_state`).
    pub info: SnapshotInfo,
    /// Copy rounds made while the guest ran (0: the VM was paused).
    pub rounds: u32,
    /// Bytes written while the guest ran (a page dirtied again counts
    /// again).
    pub precopied_bytes: u64,
    /// How long the vCPUs were stopped in all: each round's dirty-log
    /// read, and the last step.
    pub paused: Duration,
    /// The last step's pause: state saved, last pages written, files
    /// committed.
    pub last_pause: Duration,
}

/// The most copy rounds [`MicroVm::snapshot_diff_live`] makes while the
/// guest runs before it pauses for the rest.
pub const LIVE_DIFF_MAX_ROUNDS: u32 = 5;

/// When a copy round finds at most this many dirty pages (1 MiB), the next
/// step of [`MicroVm::snapshot_diff_live`] is the last, paused one.
pub const LIVE_DIFF_LAST_PAGES: u64 = 256;

/// Adds the pages of `dirty` to `taken` (region by region).
fn merge_taken(taken: &mut Vec<crate::dirty::DirtyBitmap>, dirty: &[crate::dirty::DirtyBitmap]) {
    if taken.is_empty() {
        taken.extend(
            dirty
                .iter()
                .map(|b| crate::dirty::DirtyBitmap::new(b.pages)),
        );
    }
    for (all, new) in taken.iter_mut().zip(dirty) {
        all.or_words(&new.words);
    }
}

/// How [`MicroVm::snapshot_with`] writes a full snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotOptions {
    /// Whether the memory file is sparse (default: yes): guest pages the
    /// guest never touched and pages of zeros become holes, and a VM
    /// restored from a snapshot takes the pages it has not written since
    /// from the files it was restored from (a reflink where the filesystem
    /// has one). `false` writes every byte of guest memory through the
    /// guest mapping, as a preallocated file: slower, and it faults in all
    /// of guest memory.
    pub sparse: bool,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self { sparse: true }
    }
}

impl SnapshotOptions {
    /// Sets [`sparse`](Self::sparse).
    pub fn sparse(mut self, sparse: bool) -> Self {
        self.sparse = sparse;
        self
    }
}

impl MicroVm {
    /// Writes a full snapshot of this paused VM to the directory `dir`
    /// (created `0700`, or replaced atomically if it exists; files `0600`):
    /// every vCPU's registers and power state, the vGICv3, every device,
    /// and all of guest memory, as a sparse file (see
    /// [`SnapshotOptions::sparse`]; [`snapshot_with`](Self::snapshot_with)
    /// writes a dense one). The VM stays paused and can be resumed.
    ///
    /// If it fails, the VM's diff base is unchanged and no dirty page is
    /// lost: the next [`snapshot_diff`](Self::snapshot_diff) is relative to
    /// the previous snapshot and holds every page changed since.
    pub fn snapshot(&mut self, dir: impl AsRef<Path>) -> Result<SnapshotInfo, Error> {
        self.snapshot_with(dir, &SnapshotOptions::default())
    }

    /// [`snapshot`](Self::snapshot), written as `options` say.
    pub fn snapshot_with(
        &mut self,
        dir: impl AsRef<Path>,
        options: &SnapshotOptions,
    ) -> Result<SnapshotInfo, Error> {
        if !matches!(self.state(), crate::VmState::Paused) {
            return Err(SnapshotError::NotPaused.into());
        }
        self.check_memory_files()?;
        let start = std::time::Instant::now();
        let mut state = self.save_state()?;
        let id = SnapshotId::new().map_err(Error::Host)?;
        state.id = id;
        let bytes = super::format::encode(&state)?;
        // After save_state (the vGIC may have written guest memory) and
        // after everything else that can fail before the write: every page
        // goes into this snapshot, the next diff starts here.
        let harvested = if self.config.dirty_tracking {
            Some(self.harvest_dirty()?)
        } else {
            None
        };
        let saved = start.elapsed();

        let memory = &self.memory;
        let size = self.config.memory_size;
        let source = self.memory_source.as_ref();
        let mut memory_bytes = size;
        let written = super::write_dir(dir.as_ref(), &bytes, |file| {
            if options.sparse {
                let stats = super::sparse::write_sparse(memory, &state.memory, source, file)?;
                memory_bytes = stats.from_guest + stats.from_files;
                Ok(())
            } else {
                write_memory(memory, size, file)
            }
        });
        if let Err(e) = written {
            // No snapshot holds those pages: the next diff (still relative
            // to the previous snapshot, whose id stays) must.
            if let Some(dirty) = harvested {
                let runs: Vec<_> = dirty.iter().map(|b| b.runs()).collect();
                self.remark_dirty(&runs);
            }
            return Err(e.into());
        }
        self.snapshot_id = Some(id);
        Ok(SnapshotInfo {
            state_bytes: bytes.len() as u64,
            memory_bytes,
            save_state: saved,
            write_files: start.elapsed() - saved,
        })
    }

    /// Writes a diff snapshot of this paused VM to `dir`: its state, and
    /// only the guest pages that changed since the last snapshot it took
    /// (full or diff) or was restored from. Restore it with
    /// [`MicroVm::restore_chain`] on top of the snapshots before it, or
    /// compact the chain with [`crate::snapshot::merge`]. Needs
    /// [`dirty_tracking`](crate::MicroVmBuilder::dirty_tracking).
    ///
    /// If it fails, no page is lost: the pages it took from the dirty log
    /// go into the next snapshot, which is still relative to the same one.
    pub fn snapshot_diff(&mut self, dir: impl AsRef<Path>) -> Result<SnapshotInfo, Error> {
        if !matches!(self.state(), crate::VmState::Paused) {
            return Err(SnapshotError::NotPaused.into());
        }
        self.check_memory_files()?;
        let parent = self.diff_parent()?;
        let start = std::time::Instant::now();
        let mut state = self.save_state()?;
        let id = SnapshotId::new().map_err(Error::Host)?;
        // After save_state: the vGIC's pending tables may just have been
        // written to guest memory. From here on, every failure puts the
        // harvested pages back.
        let dirty = self.harvest_dirty()?;
        state.id = id;
        state.parent = Some(parent);
        state.diff = Some(dirty.iter().map(|b| b.runs()).collect());
        let runs = state.diff.as_deref().unwrap_or_default();
        let written = super::format::encode(&state).and_then(|bytes| {
            let saved = start.elapsed();
            super::write_dir(dir.as_ref(), &bytes, |file| {
                write_diff_memory(&self.memory, self.config.memory_size, runs, file)
            })?;
            Ok((bytes.len(), saved))
        });
        let (state_bytes, saved) = match written {
            Ok(done) => done,
            Err(e) => {
                // Those pages are in no snapshot yet: keep them for the next.
                self.remark_dirty(runs);
                return Err(e.into());
            }
        };
        self.snapshot_id = Some(id);
        let pages: u64 = runs.iter().flatten().map(|(_, n)| n).sum();
        Ok(SnapshotInfo {
            state_bytes: state_bytes as u64,
            memory_bytes: pages * crate::arch::aarch64::layout::PAGE_SIZE,
            save_state: saved,
            write_files: start.elapsed() - saved,
        })
    }

    /// Writes a diff snapshot of this *running* VM to `dir` and leaves it
    /// running, with the guest paused only for a short last step: the
    /// same snapshot [`snapshot_diff`](Self::snapshot_diff) writes, at the
    /// moment of that last pause.
    ///
    /// Pre-copy, as a live migration does it: while the guest runs, each
    /// round takes the pages dirtied since the round before (a pause of
    /// the vCPUs just long enough to read the dirty log) and writes them
    /// to the new snapshot's memory file; a page the guest writes again is
    /// dirty again and goes in again. When a round finds few pages (or
    /// after [`LIVE_DIFF_MAX_ROUNDS`], or when a round finds no fewer than
    /// the one before: a guest dirtying faster than the copy), the VM is
    /// paused, its state saved, the last dirty pages written, the files
    /// committed, and the VM resumed. So the pause grows with what the
    /// guest dirties during one round, not with all it dirtied since the
    /// last snapshot.
    ///
    /// A paused VM is snapshotted as [`snapshot_diff`](Self::snapshot_diff)
    /// does (and stays paused). If it fails, no page is lost: every page
    /// it took from the dirty log goes into the next snapshot, and the VM
    /// is resumed if it was running (an error from that resume wins).
    pub fn snapshot_diff_live(&mut self, dir: impl AsRef<Path>) -> Result<LiveDiffInfo, Error> {
        if matches!(self.state(), crate::VmState::Paused) {
            let start = std::time::Instant::now();
            let info = self.snapshot_diff(dir)?;
            return Ok(LiveDiffInfo {
                info,
                rounds: 0,
                precopied_bytes: 0,
                paused: start.elapsed(),
                last_pause: start.elapsed(),
            });
        }
        if !matches!(self.state(), crate::VmState::Running) {
            return Err(self.not_runnable());
        }
        self.check_memory_files()?;
        let parent = self.diff_parent()?;
        let start = std::time::Instant::now();
        let mut staged = super::Staged::new(dir.as_ref())?;
        let size = self.config.memory_size;
        staged.write_memory(|f| f.set_len(size))?;
        // Every page taken from the dirty log so far: in the snapshot if it
        // commits, marked dirty again if anything fails.
        let mut taken: Vec<crate::dirty::DirtyBitmap> = Vec::new();
        let mut paused = std::time::Duration::ZERO;
        let mut rounds = 0;
        let mut precopied = 0u64;
        let outcome = (|| -> Result<(SnapshotInfo, std::time::Instant), Error> {
            let mut before = u64::MAX;
            loop {
                let pause = std::time::Instant::now();
                self.pause()?;
                let dirty = self.harvest_dirty();
                let resumed = self.resume();
                paused += pause.elapsed();
                let dirty = dirty?;
                merge_taken(&mut taken, &dirty);
                resumed?;
                let runs: Vec<_> = dirty.iter().map(|b| b.runs()).collect();
                let pages: u64 = dirty.iter().map(|b| b.count()).sum();
                staged.write_memory(|f| write_diff_runs(&self.memory, &runs, f))?;
                rounds += 1;
                precopied += pages * crate::arch::aarch64::layout::PAGE_SIZE;
                if pages <= LIVE_DIFF_LAST_PAGES
                    || pages >= before
                    || rounds >= LIVE_DIFF_MAX_ROUNDS
                {
                    break;
                }
                before = pages;
            }
            // What the rounds wrote goes to the disk while the guest runs.
            staged.sync_memory()?;

            let pause = std::time::Instant::now();
            self.pause()?;
            let saving = std::time::Instant::now();
            let mut state = self.save_state()?;
            let id = SnapshotId::new().map_err(Error::Host)?;
            // After save_state, as in snapshot_diff.
            let dirty = self.harvest_dirty()?;
            merge_taken(&mut taken, &dirty);
            let saved = saving.elapsed();
            let last: Vec<_> = dirty.iter().map(|b| b.runs()).collect();
            staged.write_memory(|f| write_diff_runs(&self.memory, &last, f))?;
            state.id = id;
            state.parent = Some(parent);
            state.diff = Some(taken.iter().map(|b| b.runs()).collect());
            let bytes = super::format::encode(&state)?;
            staged.commit(&bytes)?;
            self.snapshot_id = Some(id);
            let pages: u64 = taken.iter().map(|b| b.count()).sum();
            let info = SnapshotInfo {
                state_bytes: bytes.len() as u64,
                memory_bytes: pages * crate::arch::aarch64::layout::PAGE_SIZE,
                save_state: saved,
                write_files: start.elapsed() - saved,
            };
            Ok((info, pause))
        })();
        let (info, pause) = match outcome {
            Ok(done) => done,
            Err(e) => {
                // Those pages are in no snapshot: keep them for the next.
                let runs: Vec<_> = taken.iter().map(|b| b.runs()).collect();
                self.remark_dirty(&runs);
                if matches!(self.state(), crate::VmState::Paused) {
                    self.resume()?;
                }
                return Err(e);
            }
        };
        let resumed = self.resume();
        let last_pause = pause.elapsed();
        paused += last_pause;
        resumed?;
        Ok(LiveDiffInfo {
            info,
            rounds,
            precopied_bytes: precopied,
            paused,
            last_pause,
        })
    }

    /// The snapshot a diff of this VM is relative to, if it can take one.
    fn diff_parent(&self) -> Result<SnapshotId, Error> {
        if !self.config.dirty_tracking {
            return Err(SnapshotError::NoDiffBase("dirty tracking is off").into());
        }
        Ok(self.snapshot_id.ok_or(SnapshotError::NoDiffBase(
            "this VM has no snapshot to be relative to",
        ))?)
    }

    /// Reads and clears what changed since the last harvest.
    fn harvest_dirty(&mut self) -> Result<Vec<crate::dirty::DirtyBitmap>, Error> {
        let sink = self.dirty.as_ref().and_then(|d| d.sink.clone());
        Ok(match sink {
            Some(sink) => sink.harvest(
                &self._vm,
                &self.memory,
                self.vcpus.iter_mut().filter_map(|v| v.dirty_ring_mut()),
            )?,
            None => crate::dirty::harvest(&self._vm, &self.memory)?,
        })
    }

    /// Marks pages dirty again in the VMM's bitmap (after a failed
    /// snapshot), so the next harvest returns them.
    fn remark_dirty(&self, runs: &[Vec<(u64, u64)>]) {
        use vm_memory::GuestMemoryBackend as _;
        let page = crate::arch::aarch64::layout::PAGE_SIZE;
        for (region, runs) in self.memory.iter().zip(runs) {
            let bitmap = std::ops::Deref::deref(region).bitmap();
            for &(first, count) in runs {
                let (Ok(start), Ok(len)) =
                    (usize::try_from(first * page), usize::try_from(count * page))
                else {
                    continue;
                };
                bitmap.set_addr_range(start, len);
            }
        }
    }

    /// Returns the working set the guest has touched since this VM was
    /// restored, in the order of first touch, and stops recording. Call it
    /// at the point a restore should be ready for (after the guest's first
    /// answer, say), then save it next to the snapshot with
    /// [`WorkingSet::save`](crate::snapshot::WorkingSet::save): the next
    /// restore of that snapshot loads those pages while its vCPUs start.
    ///
    /// Needs a VM restored with
    /// [`Restore::record_working_set(true)`](Restore::record_working_set).
    /// Pages a prefetch loaded count as touched: record on a restore made
    /// with [`Restore::prefetch(false)`](Restore::prefetch) to shrink a
    /// working set.
    pub fn record_working_set(&mut self) -> Result<crate::snapshot::WorkingSet, Error> {
        Ok(self.working_set.finish_recording()?)
    }

    /// Waits until the working-set prefetch of this restored VM has
    /// finished and returns how many pages it loaded; `None` if this VM
    /// prefetches nothing (it was not restored, or its snapshot has no
    /// usable working set).
    pub fn wait_for_prefetch(&mut self) -> Option<u64> {
        self.working_set.prefetcher.take().map(|p| p.wait())
    }

    /// Checks that the memory files this VM was restored from are as they
    /// were at the restore (same size and modification time; one `fstat`
    /// per file). They are mapped `MAP_PRIVATE`: a page the guest has not
    /// touched since the restore reads whatever the file holds now, so a
    /// file written in place under the VM changes guest memory behind the
    /// guest's back. Every snapshot checks this first and refuses
    /// ([`SnapshotError::MemoryFileChanged`]) rather than save such memory.
    /// A VM that was not restored has no memory file: always `Ok`.
    pub fn check_memory_files(&self) -> Result<(), SnapshotError> {
        let changed = self.memory_source.as_ref().and_then(|s| s.changed_file());
        match changed {
            Some(path) => Err(SnapshotError::MemoryFileChanged(path.to_path_buf())),
            None => Ok(()),
        }
    }

    /// Starts restoring the snapshot in `dir`; see [`Restore`].
    pub fn restore(dir: impl Into<PathBuf>) -> Restore {
        Self::restore_chain([dir.into()])
    }

    /// Starts restoring a chain: a full snapshot, then the diff snapshots
    /// taken on top of it, oldest first. The newest layer's pages win;
    /// each layer's pages are mapped from its own file, nothing is copied.
    pub fn restore_chain(dirs: impl IntoIterator<Item = PathBuf>) -> Restore {
        Restore {
            chain: dirs.into_iter().collect(),
            serial_output: None,
            serial_input: None,
            block_paths: Vec::new(),
            taps: Vec::new(),
            vsock_host: None,
            reuse_saved_paths: false,
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            resume: false,
            seccomp: crate::seccomp::SeccompPolicy::Default,
            prefetch: true,
            record_working_set: false,
        }
    }
}

/// Writes the dirty page runs into a sparse memory file of the full size,
/// each at its own offset.
fn write_diff_memory(
    memory: &crate::memory::GuestMemoryMmap,
    size: u64,
    runs: &[Vec<(u64, u64)>],
    file: &mut std::fs::File,
) -> std::io::Result<()> {
    file.set_len(size)?;
    write_diff_runs(memory, runs, file)
}

/// Writes the dirty page runs into a memory file of the full size, each at
/// its own offset.
fn write_diff_runs(
    memory: &crate::memory::GuestMemoryMmap,
    runs: &[Vec<(u64, u64)>],
    file: &mut std::fs::File,
) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};

    use vm_memory::Bytes;
    let page = crate::arch::aarch64::layout::PAGE_SIZE;
    // One region today: its runs are offsets from DRAM_START.
    for &(first, count) in runs.iter().flatten() {
        file.seek(SeekFrom::Start(first * page))?;
        let len = usize::try_from(count * page).map_err(std::io::Error::other)?;
        memory
            .write_all_volatile_to(
                vm_memory::GuestAddress(crate::DRAM_START.0 + first * page),
                file,
                len,
            )
            .map_err(io_error)?;
    }
    Ok(())
}

/// Copies guest RAM into the memory file.
fn write_memory(
    memory: &crate::memory::GuestMemoryMmap,
    size: u64,
    file: &mut std::fs::File,
) -> std::io::Result<()> {
    use vm_memory::Bytes;
    let len = usize::try_from(size).map_err(std::io::Error::other)?;
    memory
        .write_all_volatile_to(crate::DRAM_START, file, len)
        .map_err(io_error)
}

/// The file's own error (ENOSPC, EIO...) when guest memory could not be
/// written to it, so the caller sees what the OS said.
fn io_error(e: vm_memory::GuestMemoryError) -> std::io::Error {
    match e {
        vm_memory::GuestMemoryError::IOError(e) => e,
        other => std::io::Error::other(other),
    }
}

/// How to restore a snapshot: in the same or a fresh process, as is or as
/// a clone with its own host resources. Made by [`MicroVm::restore`].
///
/// A snapshot file is not trusted to choose host resources: every disk
/// image, TAP and vsock socket the snapshot's devices used must be named by
/// the caller ([`block_path`](Self::block_path), [`tap`](Self::tap),
/// [`vsock_uds`](Self::vsock_uds) or
/// [`vsock_listener`](Self::vsock_listener)), unless the caller consents to
/// reopening the ones the snapshot names with
/// [`reuse_saved_paths(true)`](Self::reuse_saved_paths). A device left
/// unnamed is [`SnapshotError::SavedResourceNotNamed`].
///
/// ```no_run
/// # fn main() -> Result<(), dormouse::Error> {
/// let mut vm = dormouse::MicroVm::restore("/snapshots/session-42")
///     .serial_output(std::io::stdout())
///     .block_path(0, "/disks/session-42-copy.ext4")
///     .vsock_uds("/run/session-42.vsock")
///     .resume(true)
///     .build()?;
/// # vm.pause()?; Ok(()) }
/// ```
pub struct Restore {
    chain: Vec<PathBuf>,
    serial_output: Option<SerialOutput>,
    serial_input: Option<SerialInput>,
    block_paths: Vec<(usize, DiskOverride)>,
    taps: Vec<(usize, TapConfig)>,
    /// The vsock device's host side, if the caller names it (the last of
    /// `vsock_uds` and `vsock_listener` wins).
    vsock_host: Option<VsockHost>,
    reuse_saved_paths: bool,
    kvm_device: PathBuf,
    resume: bool,
    seccomp: crate::seccomp::SeccompPolicy,
    prefetch: bool,
    record_working_set: bool,
}

/// What backs a restored disk instead of the path its snapshot names.
#[derive(Debug)]
// Only aarch64 hosts restore VMs; elsewhere the overrides are only checked.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
enum DiskOverride {
    /// One raw image ([`Restore::block_path`]).
    Path(PathBuf),
    /// A layered disk ([`Restore::block_layers`]).
    Layers(crate::builder::DiskLayers),
}

impl std::fmt::Debug for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restore")
            .field("chain", &self.chain)
            .field("block_paths", &self.block_paths)
            .field("taps", &self.taps)
            .field("vsock_host", &self.vsock_host)
            .field("reuse_saved_paths", &self.reuse_saved_paths)
            .field("resume", &self.resume)
            .field("seccomp", &self.seccomp)
            .finish_non_exhaustive()
    }
}

impl Restore {
    /// Where the restored guest's console output goes (default: discarded).
    pub fn serial_output(mut self, sink: impl Write + Send + 'static) -> Self {
        self.serial_output = Some(Box::new(sink));
        self
    }

    /// Where the restored guest's console input comes from.
    pub fn serial_input(mut self, source: impl Read + Send + 'static) -> Self {
        self.serial_input = Some(Box::new(source));
        self
    }

    /// Backs the `index`-th virtio-blk disk (in attach order) with another
    /// file, e.g. a clone's own copy. The file must hold the same disk
    /// contents as when the snapshot was taken.
    pub fn block_path(mut self, index: usize, path: impl Into<PathBuf>) -> Self {
        self.block_paths
            .push((index, DiskOverride::Path(path.into())));
        self
    }

    /// Backs the `index`-th virtio-blk disk (in attach order) with a
    /// layered copy-on-write disk (see
    /// [`BlockConfig::layered`](crate::builder::BlockConfig::layered)).
    /// The layers must hold the disk as it was when the snapshot was
    /// taken: typically the layers the VM ran on plus its top as of that
    /// snapshot (which the snapshot froze) as the newest frozen layer, and
    /// a new, empty top. Overrides an earlier
    /// [`block_path`](Self::block_path) for the same disk, and the other
    /// way round: the last call wins.
    pub fn block_layers(mut self, index: usize, layers: crate::builder::DiskLayers) -> Self {
        self.block_paths.push((index, DiskOverride::Layers(layers)));
        self
    }

    /// Attaches the `index`-th virtio-net interface to another TAP.
    pub fn tap(mut self, index: usize, tap: TapConfig) -> Self {
        self.taps.push((index, tap));
        self
    }

    /// Puts the vsock device's host side on another Unix socket (a clone's
    /// own; each running VM needs its own).
    pub fn vsock_uds(mut self, path: impl Into<PathBuf>) -> Self {
        self.vsock_host = Some(VsockHost::Path(path.into()));
        self
    }

    /// Puts the vsock device's host side on `listener`, bound and kept by
    /// the caller, as
    /// [`MicroVmBuilder::vsock_listener`](crate::MicroVmBuilder::vsock_listener)
    /// does: clients that connected while no VM existed wait in its backlog
    /// and are served by the restored VM. Replaces a
    /// [`vsock_uds`](Self::vsock_uds) given before.
    pub fn vsock_listener(mut self, listener: std::os::unix::net::UnixListener) -> Self {
        self.vsock_host = Some(VsockHost::Listener(listener));
        self
    }

    /// Whether the disk images, TAPs and vsock socket paths stored in the
    /// snapshot may be reopened for the devices the caller does not name
    /// (default: no, each must be named). Consent only for snapshots you
    /// wrote yourself: a snapshot file names whatever its writer chose.
    pub fn reuse_saved_paths(mut self, reuse: bool) -> Self {
        self.reuse_saved_paths = reuse;
        self
    }

    /// The KVM device node to open (default `/dev/kvm`).
    pub fn kvm_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_device = path.into();
        self
    }

    /// Whether the VM runs when [`build`](Self::build) returns (default:
    /// it is paused).
    pub fn resume(mut self, running: bool) -> Self {
        self.resume = running;
        self
    }

    /// Which seccomp filters the restored VM's threads install (default:
    /// dormouse's own per thread kind); see
    /// [`MicroVmBuilder::seccomp_policy`](crate::MicroVmBuilder::seccomp_policy).
    pub fn seccomp_policy(mut self, policy: crate::seccomp::SeccompPolicy) -> Self {
        self.seccomp = policy;
        self
    }

    /// Whether to load the snapshot's recorded working set (default: yes).
    /// If the newest snapshot directory of the chain holds a
    /// [`WORKING_SET_FILE`](crate::snapshot::WORKING_SET_FILE) recorded for
    /// that snapshot, a thread loads those pages into guest memory, in the
    /// order the guest first touched them, while the vCPUs start; the rest
    /// of memory stays lazy. The restore call does not wait for it. A
    /// missing file changes nothing; a stale or damaged one is logged as a
    /// warning and ignored.
    pub fn prefetch(mut self, prefetch: bool) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Whether to record the guest's working set from the restore on
    /// (default: no): a thread samples which guest pages the guest has
    /// touched until [`MicroVm::record_working_set`] returns them.
    pub fn record_working_set(mut self, record: bool) -> Self {
        self.record_working_set = record;
        self
    }

    /// Reads and checks the snapshot, then rebuilds the VM from it. Every
    /// check on the files comes before any KVM resource exists.
    pub fn build(self) -> Result<MicroVm, Error> {
        if let Some(host) = &self.vsock_host {
            host.validate()?;
        }
        let mut phases = Phases::start();
        let layers = super::read_chain(&self.chain)?;
        if let Some(newest) = layers.last() {
            self.check_overrides(&newest.state)?;
        }
        phases.mark("read files");
        let vm = restore_vm(self, layers, &mut phases)?;
        log::debug!("restore: {phases}");
        Ok(vm)
    }

    fn check_overrides(&self, state: &VmState) -> Result<(), SnapshotError> {
        use super::SavedDevice;
        let count =
            |f: fn(&SavedDevice) -> bool| state.config.devices.iter().filter(|d| f(d)).count();
        let blocks = count(|d| matches!(d, SavedDevice::Block { .. }));
        let nets = count(|d| matches!(d, SavedDevice::Net { .. }));
        if let Some((i, _)) = self.block_paths.iter().find(|(i, _)| *i >= blocks) {
            return Err(SnapshotError::Inconsistent(format!(
                "block_path({i}) or block_layers({i}) but the snapshot has {blocks} disks"
            )));
        }
        if let Some((i, _)) = self.taps.iter().find(|(i, _)| *i >= nets) {
            return Err(SnapshotError::Inconsistent(format!(
                "tap({i}) but the snapshot has {nets} network interfaces"
            )));
        }
        if self.vsock_host.is_some() && count(|d| matches!(d, SavedDevice::Vsock { .. })) == 0 {
            return Err(SnapshotError::Inconsistent(
                "vsock_uds() or vsock_listener() but the snapshot has no vsock device".into(),
            ));
        }
        if self.reuse_saved_paths {
            return Ok(());
        }
        let (mut block, mut net, mut vsock) = (0, 0, 0);
        for device in &state.config.devices {
            let (kind, index, named, saved, method) = match device {
                SavedDevice::Block { path, .. } => {
                    block += 1;
                    let named = self.block_paths.iter().any(|(i, _)| *i == block - 1);
                    (
                        "disk",
                        block - 1,
                        named,
                        path.display().to_string(),
                        "block_path",
                    )
                }
                SavedDevice::Net { tap, .. } => {
                    net += 1;
                    let named = self.taps.iter().any(|(i, _)| *i == net - 1);
                    ("network interface", net - 1, named, tap.clone(), "tap")
                }
                SavedDevice::Vsock { uds_path, .. } => {
                    vsock += 1;
                    let named = self.vsock_host.is_some();
                    let saved = uds_path.display().to_string();
                    ("vsock device", vsock - 1, named, saved, "vsock_uds")
                }
            };
            if !named {
                return Err(SnapshotError::SavedResourceNotNamed {
                    kind,
                    index,
                    saved,
                    method,
                });
            }
        }
        Ok(())
    }
}

#[cfg(not(target_arch = "aarch64"))]
fn restore_vm(
    _restore: Restore,
    _layers: Vec<super::Layer>,
    _phases: &mut Phases,
) -> Result<MicroVm, Error> {
    Err(Error::UnsupportedArchitecture(std::env::consts::ARCH))
}

#[cfg(not(target_arch = "aarch64"))]
impl MicroVm {
    fn save_state(&self) -> Result<VmState, Error> {
        Err(Error::UnsupportedArchitecture(std::env::consts::ARCH))
    }
}

#[cfg(target_arch = "aarch64")]
use aarch64::restore_vm;

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use std::sync::Mutex;

    use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

    use super::super::{MemoryRegionState, SavedDevice, SnapshotError, VmState};
    use super::{Restore, VsockHost};
    use crate::arch::aarch64::layout::{DRAM_START, PAGE_SIZE};
    use crate::arch::aarch64::{regs, ArchError};
    use crate::build::{assemble, attach_virtio_devices, create_core, Threads};
    use crate::builder::VirtioConfig;
    use crate::device_manager::{DeviceError, DeviceManager};
    use crate::devices::vmgenid::VMGENID_LEN;
    use crate::memory::GuestMemoryMmap;
    use crate::snapshot::sparse::MemorySource;
    use crate::snapshot::SavedConfig;
    use crate::{Error, MicroVm};

    fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    impl MicroVm {
        /// Saves every part's state. The VM must be paused.
        pub(super) fn save_state(&self) -> Result<VmState, Error> {
            // Disks first: a layered disk's top (data, then its map) must
            // hold exactly what the guest wrote up to this pause.
            for (device, t) in self.transports.iter().enumerate() {
                lock(t)
                    .save_backend()
                    .map_err(|source| SnapshotError::Backend { device, source })?;
            }
            let vcpus = self
                .vcpus
                .iter()
                .map(|v| regs::save_vcpu(v.fd(), v.index()))
                .collect::<Result<Vec<_>, _>>()?;
            let mpidrs: Vec<u64> = vcpus.iter().map(|v| v.mpidr).collect();
            // Hold the UART while the vGIC is saved: the console input thread
            // cannot then queue a byte (and its interrupt) in between.
            let serial = lock(&self.serial);
            let gic = self.gic.save(&mpidrs)?;
            let serial_state = serial.save();
            drop(serial);
            Ok(VmState {
                id: super::super::SnapshotId([0; 16]),
                parent: None,
                diff: None,
                config: self.config.clone(),
                memory: vec![MemoryRegionState {
                    guest_addr: DRAM_START.0,
                    size: self.config.memory_size,
                    file_offset: 0,
                }],
                vcpus,
                gic,
                serial: serial_state,
                rtc: self.rtc.as_ref().map(|r| lock(r).save()),
                virtio: self.transports.iter().map(|t| lock(t).save()).collect(),
                vmgenid: self.vmgenid.as_ref().map(|g| g.save()),
            })
        }
    }

    /// Maps the memory file privately as guest RAM: no copy, pages come in
    /// from the file on first touch, guest writes stay in this process.
    fn map_memory(
        file: &std::fs::File,
        regions: &[MemoryRegionState],
    ) -> Result<GuestMemoryMmap, Error> {
        let bad = |m: String| Error::Snapshot(SnapshotError::Inconsistent(m));
        let mut mapped = Vec::with_capacity(regions.len());
        for r in regions {
            if r.guest_addr != DRAM_START.0
                || r.size % PAGE_SIZE != 0
                || r.file_offset % PAGE_SIZE != 0
            {
                return Err(bad(format!(
                    "memory region at {:#x} of {:#x} bytes (file offset {:#x}) does not fit this \
                     VM's layout",
                    r.guest_addr, r.size, r.file_offset
                )));
            }
            crate::memory::validate_size(r.size)?;
            let size =
                usize::try_from(r.size).map_err(|_| bad("memory region too large".into()))?;
            let fd = file
                .try_clone()
                .map_err(|e| bad(format!("duplicating the memory file: {e}")))?;
            // The same dirty bitmap a freshly built VM's memory has.
            let build = || {
                let bitmap = AtomicBitmap::with_len(size);
                MmapRegionBuilder::new_with_bitmap(size, bitmap)
                    .with_file_offset(FileOffset::new(
                        fd.try_clone()
                            .map_err(vm_memory::mmap::MmapRegionError::Mmap)?,
                        r.file_offset,
                    ))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                    .build()
            };
            let region = crate::snapshot::working_set::huge_aligned(size, build)
                .map_err(|e| bad(format!("mapping the memory file: {e}")))?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| bad("memory region wraps the address space".into()))?;
            mapped.push(region);
        }
        GuestMemoryMmap::from_regions(mapped).map_err(|e| bad(format!("memory regions: {e}")))
    }

    /// Runs shorter than this many pages are read into place rather than
    /// mapped: each mapping is a VMA of the process, a diff of a guest that
    /// wrote here and there holds hundreds of short runs, and a process
    /// holding many restored VMs would reach `vm.max_map_count` (65530 by
    /// default). Reading 60 KiB costs about what mapping it and faulting
    /// its pages in does.
    const COPY_RUN_PAGES: u64 = 16;

    /// Puts a diff layer's page runs over `memory`: long runs are mapped
    /// (MAP_FIXED, private) and read from the layer's file on first touch,
    /// short ones are read into place now. Afterwards those guest pages
    /// hold the layer's bytes.
    fn overlay(memory: &GuestMemoryMmap, layer: &super::super::Layer) -> Result<(), Error> {
        use std::os::fd::AsRawFd;

        use vm_memory::GuestMemoryBackend as _;
        use vm_memory::GuestMemoryRegion as _;

        let bad = |m: String| Error::Snapshot(SnapshotError::Inconsistent(m));
        let runs = layer.state.diff.as_deref().unwrap_or_default();
        for ((region, saved), runs) in memory.iter().zip(&layer.state.memory).zip(runs) {
            for &(first, count) in runs {
                // read_chain checked the runs lie inside the region.
                let (offset, len) = (first * PAGE_SIZE, count * PAGE_SIZE);
                if offset + len > region.len() {
                    return Err(bad(format!("diff run ({first}, {count}) past the region")));
                }
                let len = usize::try_from(len).map_err(|_| bad("run too large".into()))?;
                let file_offset = libc::off_t::try_from(saved.file_offset + offset)
                    .map_err(|_| bad("file offset too large".into()))?;
                // The run's host address inside the region's own mapping.
                let addr = region
                    .as_ptr()
                    .wrapping_add(usize::try_from(offset).map_err(|_| bad("offset".into()))?);
                if count < COPY_RUN_PAGES {
                    use std::os::unix::fs::FileExt;
                    // SAFETY: [addr, addr + len) lies inside the mapping
                    // this GuestMemoryMmap owns (checked above against
                    // region.len()), which is readable and writable, and no
                    // vCPU, device or other slice uses it yet: this is the
                    // only reference while it lives.
                    let pages = unsafe { std::slice::from_raw_parts_mut(addr, len) };
                    let at = saved.file_offset + offset;
                    layer.memory.read_exact_at(pages, at).map_err(|e| {
                        bad(format!(
                            "reading {} into guest memory: {e}",
                            layer.dir.display()
                        ))
                    })?;
                    continue;
                }
                // SAFETY: [addr, addr + len) lies inside the mapping this
                // GuestMemoryMmap owns (checked above against region.len()),
                // which no vCPU or device uses yet and no slice borrows;
                // MAP_FIXED replaces exactly those pages with a private
                // mapping of the layer's file, which the kernel keeps alive
                // after the fd closes. The region's munmap at drop covers it.
                let mapped = unsafe {
                    libc::mmap(
                        addr.cast(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                        layer.memory.as_raw_fd(),
                        file_offset,
                    )
                };
                if mapped != addr.cast() {
                    return Err(bad(format!(
                        "mapping {} over guest memory: {}",
                        layer.dir.display(),
                        std::io::Error::last_os_error()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Applies the restore's overrides to the saved device list.
    fn device_configs(
        restore: &mut Restore,
        saved: &[SavedDevice],
    ) -> Result<Vec<VirtioConfig>, Error> {
        let (mut block, mut net) = (0, 0);
        let mut configs = Vec::with_capacity(saved.len());
        for device in saved {
            configs.push(match device {
                SavedDevice::Block {
                    path,
                    read_only,
                    rate_limiter,
                } => {
                    let chosen = restore.block_paths.iter().rev().find(|(i, _)| *i == block);
                    let (path, layers) = match chosen {
                        None => (path.clone(), None),
                        Some((_, super::DiskOverride::Path(p))) => (p.clone(), None),
                        Some((_, super::DiskOverride::Layers(l))) => {
                            (l.top.clone(), Some(l.clone()))
                        }
                    };
                    block += 1;
                    VirtioConfig::Block {
                        path,
                        read_only: *read_only,
                        rate_limiter: *rate_limiter,
                        layers,
                    }
                }
                SavedDevice::Net {
                    tap,
                    mac,
                    rx_rate_limiter,
                    tx_rate_limiter,
                } => {
                    let position = restore.taps.iter().rposition(|(i, _)| *i == net);
                    let tap = match position {
                        Some(p) => restore.taps.remove(p).1,
                        None => crate::devices::virtio::net::TapConfig::Name(tap.clone()),
                    };
                    net += 1;
                    VirtioConfig::Net {
                        tap,
                        mac: *mac,
                        rx_rate_limiter: *rx_rate_limiter,
                        tx_rate_limiter: *tx_rate_limiter,
                    }
                }
                SavedDevice::Vsock {
                    cid,
                    uds_path,
                    config,
                } => VirtioConfig::Vsock {
                    cid: *cid,
                    host: restore
                        .vsock_host
                        .take()
                        .unwrap_or_else(|| VsockHost::Path(uds_path.clone())),
                    config: config.clone(),
                },
            });
        }
        Ok(configs)
    }

    /// Starts the recorder and the prefetcher a restore asks for, before
    /// the vCPUs run.
    fn start_working_set_threads(
        vm: &mut MicroVm,
        restore: &Restore,
        set: Option<crate::snapshot::WorkingSet>,
        id: super::super::SnapshotId,
    ) -> Result<(), Error> {
        use crate::snapshot::working_set::{
            host_range, install_huge, outside, Prefetcher, Recorder,
        };
        let range = host_range(&vm.memory)
            .ok_or(Error::Internal("restored guest memory is not one region"))?;
        if restore.record_working_set {
            let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(Error::Host)?;
            let recorder = Recorder::start(pagemap, range, &vm.seccomp)?;
            vm.working_set.recorder = Some((recorder, id, vm.config.memory_size));
        }
        if let Some(set) = set {
            let start = std::time::Instant::now();
            // Dense chunks into huge pages now, while nothing runs; the
            // scattered rest on a thread while the vCPUs start. Not while
            // KVM logs dirty pages: it then maps guest memory page by page
            // whatever backs it, and the copy would only cost time.
            let huge = if vm.dirty.is_some() {
                Ok((0, Vec::new()))
            } else {
                install_huge(
                    &set,
                    range,
                    vm.config.memory_size,
                    vm.memory_source.as_ref(),
                    &vm.seccomp,
                )
            };
            let (covered, chunks) = match huge {
                Ok(done) => done,
                Err(e) => {
                    log::warn!(
                        "could not copy the working set into huge pages ({e}); it loads \
                             page by page"
                    );
                    (0, Vec::new())
                }
            };
            let rest = outside(set.runs(), &chunks);
            log::debug!(
                "working set of {} pages ({} runs): {} pages in {} huge pages in {:?}, {} pages \
                 to prefetch",
                set.pages(),
                set.runs().len(),
                covered,
                chunks.len(),
                start.elapsed(),
                set.pages() - covered
            );
            vm.working_set.prefetcher = Some(Prefetcher::start(
                rest,
                covered,
                range,
                vm.memory.clone(),
                &vm.seccomp,
            )?);
        }
        Ok(())
    }

    /// A random generation ID other than `old`.
    fn new_generation_id(old: &[u8; VMGENID_LEN]) -> Result<[u8; VMGENID_LEN], Error> {
        let mut id = *old;
        // Equal only with probability 2^-128 per draw.
        while id == *old {
            crate::vm::host_random(&mut id).map_err(Error::Host)?;
        }
        Ok(id)
    }

    /// The restore recipe: the build phases, with saved state in place of
    /// the boot source.
    pub(super) fn restore_vm(
        mut restore: Restore,
        mut layers: Vec<super::super::Layer>,
        phases: &mut super::Phases,
    ) -> Result<MicroVm, Error> {
        let newest = layers
            .pop()
            .ok_or(Error::Internal("restore of an empty chain"))?;
        let (threads, output) = Threads::start(
            &restore.seccomp,
            restore.serial_output.take(),
            restore.serial_input.take(),
        )?;
        phases.mark("threads");
        let memory = match layers.first() {
            // A chain: the base's memory, each later layer mapped over it.
            Some(base) => {
                let memory = map_memory(&base.memory, &base.state.memory)?;
                for layer in layers.iter().skip(1).chain(std::iter::once(&newest)) {
                    overlay(&memory, layer)?;
                }
                memory
            }
            None => map_memory(&newest.memory, &newest.state.memory)?,
        };
        phases.mark("map memory");
        let working_set = if restore.prefetch {
            match crate::snapshot::WorkingSet::load(&newest.dir, &newest.state) {
                Ok(set) => set,
                Err(e) => {
                    log::warn!(
                        "not prefetching the working set of {}: {e}; guest memory loads on \
                         demand",
                        newest.dir.display()
                    );
                    None
                }
            }
        } else {
            None
        };
        let state = newest.state;
        let core = create_core(
            &restore.kvm_device,
            memory,
            state.config.vcpus,
            state
                .config
                .dirty_tracking
                .then_some(state.config.dirty_ring),
        )?;
        phases.mark("vm and vcpus");

        let mut devices = DeviceManager::new();
        devices.attach_serial(&core.vm, output, Some(&state.serial))?;
        if let Some(rtc) = &state.rtc {
            devices.attach_rtc(Some(rtc))?;
        }
        let configs = device_configs(&mut restore, &state.config.devices)?;
        let saved_devices = attach_virtio_devices(&mut devices, &core.vm, &core.memory, configs)?;
        for (transport, saved) in devices.transports.iter().zip(&state.virtio) {
            lock(transport).restore(saved).map_err(DeviceError::from)?;
        }
        if let Some(saved) = &state.vmgenid {
            // Where the guest found it, with a new ID: this is a new
            // generation of the VM.
            let id = new_generation_id(&saved.id)?;
            devices.attach_vmgenid(&core.vm, &core.memory, id, Some(saved))?;
        }
        phases.mark("devices");

        for (vcpu, saved) in core.vcpus.iter().zip(&state.vcpus) {
            regs::restore_fresh_vcpu(vcpu.fd(), vcpu.index(), saved)?;
        }
        let mpidrs = core
            .vcpus
            .iter()
            .map(|v| regs::mpidr(v.fd(), v.index()))
            .collect::<Result<Vec<_>, ArchError>>()?;
        core.gic.restore_fresh(&mpidrs, &state.gic)?;
        // Interrupts the devices raised while they were restored (vsock's
        // transport reset) went in before the vGIC's state and were lost
        // under it: raise them again.
        for transport in &devices.transports {
            lock(transport).resignal_pending().map_err(Error::Host)?;
        }
        // After the vGIC's state, which would clear it: the guest sees the
        // ID changed when its vCPUs start, and reseeds its RNG.
        if let Some(saved) = &state.vmgenid {
            crate::arch::aarch64::gic::pulse_spi(&core.vm, saved.spi)?;
        }
        phases.mark("registers and vgic");

        let config = SavedConfig {
            devices: saved_devices,
            ..state.config
        };
        let mut vm = assemble(core, devices, config, threads)?;
        // What a full snapshot takes the pages the guest has not written from.
        // Each with its path, for the error if it changes under the VM.
        let newest_path = newest.dir.join(super::super::MEMORY_FILE);
        let files = layers.into_iter().map(|l| {
            let path = l.dir.join(super::super::MEMORY_FILE);
            (l.memory, path, l.state.diff)
        });
        let files = files.chain([(newest.memory, newest_path, state.diff.clone())]);
        vm.memory_source = Some(MemorySource::of_chain(files, state.memory.clone()));
        vm.snapshot_id = Some(state.id);
        phases.mark("assemble");
        start_working_set_threads(&mut vm, &restore, working_set, state.id)?;
        phases.mark("working set");
        if restore.resume {
            vm.start()?;
            phases.mark("start");
        }
        Ok(vm)
    }
}

/// How long each phase of a restore took, for a debug log line.
pub(crate) struct Phases {
    last: std::time::Instant,
    first: std::time::Instant,
    done: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    fn start() -> Self {
        let now = std::time::Instant::now();
        Self {
            last: now,
            first: now,
            done: Vec::new(),
        }
    }

    /// Ends the phase called `name`.
    fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((name, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} in all", self.last - self.first)?;
        for (name, took) in &self.done {
            write!(f, "; {name} {took:?}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn the_diff_writer_puts_each_run_at_its_own_offset_and_leaves_holes() {
        const PAGE: u64 = 4096;
        const PAGE_BYTES: usize = 4096;
        let mem = crate::memory::create(16 * PAGE).unwrap();
        for page in 0..16u64 {
            let fill = [u8::try_from(page).unwrap() + 1; PAGE_BYTES];
            mem.write_slice(&fill, GuestAddress(crate::DRAM_START.0 + page * PAGE))
                .unwrap();
        }
        let path = std::env::temp_dir().join(format!("dormouse-diffw-{}", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        let runs = vec![vec![(1, 2), (9, 1)]];
        write_diff_memory(&mem, 16 * PAGE, &runs, &mut file).unwrap();
        drop(file);

        let file = std::fs::File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 16 * PAGE, "full size");
        let mut page = vec![0u8; PAGE_BYTES];
        for n in 0..16u64 {
            file.read_exact_at(&mut page, n * PAGE).unwrap();
            let want = if [1, 2, 9].contains(&n) {
                u8::try_from(n).unwrap() + 1
            } else {
                0 // a hole
            };
            assert!(page.iter().all(|&b| b == want), "page {n}");
        }
        // The pages outside the runs take no disk space.
        use std::os::unix::fs::MetadataExt;
        assert!(file.metadata().unwrap().blocks() * 512 < 16 * PAGE);
        std::fs::remove_file(&path).unwrap();
    }
}
