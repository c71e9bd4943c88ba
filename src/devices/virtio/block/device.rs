//! The virtio-blk device model: features, config space, activation and the
//! request queue loop.

use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::backend::Backend;
use super::disk::Disk;
use super::layered::{refuse_layer_as_plain, DiskLayers, LayerError, LayeredDisk};
use super::request::{Negotiated, Request};
use super::{DISCARD_SECTOR_ALIGNMENT, MAX_DISCARD_SECTORS, QUEUE_SIZE, SEG_MAX};
use crate::devices::virtio::{
    device_type, ActivateError, Interrupt, Queue, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState};

/// The size of the config space (`struct virtio_blk_config`).
const CONFIG_LEN: usize = size_of::<virtio_blk_config>();

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk image could not be opened.
    #[error(
        "could not open disk image {path:?}: check that it exists and that dormouse may read \
         (and, unless the disk is read-only, write) it"
    )]
    Open {
        /// The image.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The disk image's size or identity could not be read.
    #[error(
        "could not read the size of disk image {path:?}: give a regular file or a block device"
    )]
    Inspect {
        /// The image.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The disk image is neither a regular file nor a block device.
    #[error(
        "{path:?} is neither a regular file nor a block device: give a raw disk image or a block \
         device as the disk"
    )]
    NotADisk {
        /// The path given.
        path: PathBuf,
    },
    /// Another VM (or process) has the disk image locked.
    #[error(
        "disk image {path:?} is in use: another VM or process holds a lock on it ({}); give \
         each VM its own copy of a writable disk (a restored clone: Restore::block_path), or \
         open it read-only in every VM that shares it",
        if *read_only { "a writer" } else { "a writer or a reader" }
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// Whether this device wanted it read-only (a shared lock).
        read_only: bool,
        /// What flock(2) said.
        #[source]
        source: std::io::Error,
    },
    /// The disk image is not a whole number of 512-byte sectors.
    #[error(
        "disk image {path:?} is {size} bytes, not a multiple of 512: pad it to whole sectors \
         (e.g. `truncate -s %512 {path:?}`)"
    )]
    NotSectorAligned {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The queue eventfd could not be created.
    #[error("could not create the virtio-blk queue eventfd (out of file descriptors?)")]
    EventFd(#[source] std::io::Error),
    /// The rate limiter's configuration is invalid or its timer could not
    /// be created.
    #[error("virtio-blk rate limiter: {0}")]
    RateLimiter(#[source] RateLimiterError),
    /// A layer of a layered disk (or its presence map) is unusable, or a
    /// layer was given as a plain disk.
    #[error(transparent)]
    Layer(#[from] LayerError),
}

/// How a processing pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The available ring is empty (notifications are on again).
    Drained,
    /// The pass served its share; more may be waiting.
    BudgetSpent,
    /// The rate limiter refused the next request, which stays in the
    /// available ring until the limiter's timer fires.
    Throttled,
}

/// The device's guest-facing state once the driver started it.
#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue: Queue,
}

/// A virtio block device backed by a raw disk image.
///
/// Register it with the event loop (it is a `MutEventSubscriber`) and put
/// it behind a virtio-mmio transport; requests are served on the event-loop
/// thread.
pub struct Block {
    disk: Backend,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    queue_evts: [EventFd; 1],
    queue_max_sizes: [u16; 1],
    active: Option<Active>,
    /// The driver broke the queue protocol; nothing is processed until reset.
    broken: bool,
    /// Limits on requests and bytes, if configured.
    pub(super) rate_limiter: Option<RateLimiter>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.active.is_some())
            .field("broken", &self.broken)
            .field("rate_limiter", &self.rate_limiter)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A block device over the raw disk image at `path` (a regular file or
    /// a block device whose size is a multiple of 512 bytes). With
    /// `read_only` the image is opened read-only and the guest sees a
    /// read-only disk.
    ///
    /// The image stays locked while the device lives (`flock`): exclusively
    /// when writable, shared when read-only. So one writable image serves
    /// one VM at a time, and a read-only one any number of read-only VMs;
    /// anything else is [`BlockError::Locked`].
    ///
    /// A layer of a layered disk (a file whose presence map
    /// `<path>.map` exists) is refused: alone it lacks its base's data
    /// ([`LayerError::LayerOpenedAsPlainDisk`]); see [`Block::layered`].
    pub fn new(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        refuse_layer_as_plain(path)?;
        Self::with_backend(Backend::Plain(Disk::open(path, read_only)?))
    }

    /// A block device over a layered copy-on-write disk: `layers.base`
    /// under the frozen `layers.layers` under the writable `layers.top`
    /// (see [`DiskLayers`] for what each file must be and how it is
    /// locked). Guest writes go to the top only; the base and frozen
    /// layers are never written. With `read_only` the top is not written
    /// either and the guest sees a read-only disk.
    ///
    /// The top's presence map is written when the VM is snapshotted
    /// ([`VirtioDevice::save_backend`]), after its data is synced: then
    /// the top and its map form a frozen layer.
    pub fn layered(layers: &DiskLayers, read_only: bool) -> Result<Block, BlockError> {
        Self::with_backend(Backend::Layered(LayeredDisk::open(layers, read_only)?))
    }

    fn with_backend(disk: Backend) -> Result<Block, BlockError> {
        let read_only = disk.read_only();
        let queue_evt =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(BlockError::EventFd)?;
        let bit = |b: u32| 1u64 << b;
        let mut avail_features = VIRTIO_F_VERSION_1
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            avail_features |= bit(VIRTIO_BLK_F_RO);
        }
        if disk.supports_discard() {
            avail_features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config = build_config(&disk);
        Ok(Block {
            disk,
            avail_features,
            acked_features: 0,
            config,
            queue_evts: [queue_evt],
            queue_max_sizes: [QUEUE_SIZE],
            active: None,
            broken: false,
            rate_limiter: None,
        })
    }

    /// The same device, limited to the given rates: each request costs one
    /// operation and its data bytes (see [`crate::rate_limiter`]). A request
    /// the limiter refuses stays in the queue until the budget returns. An
    /// unlimited configuration removes any limiter. Call this before the
    /// device goes on the event loop, which then watches the limiter's
    /// timer.
    pub fn with_rate_limiter(mut self, config: &RateLimiterConfig) -> Result<Block, BlockError> {
        self.rate_limiter = if config.is_unlimited() {
            None
        } else {
            Some(RateLimiter::new(config).map_err(BlockError::RateLimiter)?)
        };
        Ok(self)
    }

    /// The rate limits the device applies (unlimited without a limiter).
    pub fn rate_limiter_config(&self) -> RateLimiterConfig {
        self.rate_limiter
            .as_ref()
            .map(RateLimiter::config)
            .unwrap_or_default()
    }

    /// The disk behind the device.
    #[cfg(test)]
    pub(super) fn backend(&self) -> &Backend {
        &self.disk
    }

    /// The queue notification eventfd.
    pub(super) fn queue_evt(&self) -> &EventFd {
        &self.queue_evts[0]
    }

    /// Serves the requests the driver made available, at most one queue's
    /// worth per call (then the eventfd is kicked so the event loop comes
    /// back after serving the other devices), and only as many as the rate
    /// limiter lets through (then its timer brings the loop back).
    pub(crate) fn process_queue(&mut self) {
        if self.broken
            || self
                .rate_limiter
                .as_ref()
                .is_some_and(RateLimiter::is_blocked)
        {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let negotiated = Negotiated {
            features: self.acked_features,
        };
        let mem = &active.mem;
        let queue = &mut active.queue;
        let mut budget = usize::from(QUEUE_SIZE);
        let mut used = false;
        let outcome = 'pass: loop {
            if let Err(e) = queue.disable_notification(mem) {
                break 'pass Err(e);
            }
            loop {
                if budget == 0 {
                    break 'pass Ok(Pass::BudgetSpent);
                }
                let chain = match queue.iter(mem) {
                    Ok(mut iter) => iter.next(),
                    Err(e) => break 'pass Err(e),
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let request = Request::parse(mem, chain);
                if let Some(limiter) = &mut self.rate_limiter {
                    if !limiter.consume(1, request.data_len()) {
                        // Parsed again when the budget returns.
                        queue.go_to_previous_position();
                        break 'pass Ok(Pass::Throttled);
                    }
                }
                let len = request.run(&mut self.disk, mem, negotiated);
                if let Err(e) = queue.add_used(mem, head, len) {
                    break 'pass Err(e);
                }
                used = true;
                budget -= 1;
            }
            match queue.enable_notification(mem) {
                // More arrived while notifications were off.
                Ok(true) => continue,
                Ok(false) => break Ok(Pass::Drained),
                Err(e) => break Err(e),
            }
        };
        if used && queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = active.interrupt.signal_used_queue() {
                crate::guest_warn!("virtio-blk: cannot signal the guest: {e}");
            }
        }
        match outcome {
            // Throttled: notifications stay off, the limiter's timer
            // brings the loop back.
            Ok(Pass::Drained | Pass::Throttled) => {}
            Ok(Pass::BudgetSpent) => {
                // Come back for the rest on the next event-loop turn.
                if let Err(e) = self.queue_evts[0].write(1) {
                    crate::guest_warn!("virtio-blk: cannot re-kick its queue: {e}");
                }
            }
            Err(e) => {
                crate::guest_warn!("virtio-blk: the driver corrupted the request queue ({e}); the device needs a reset");
                self.broken = true;
                let _ = active.interrupt.signal_config_change();
            }
        }
    }
}

/// The config space (`struct virtio_blk_config`, little endian).
fn build_config(disk: &Backend) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(
        offset_of!(virtio_blk_config, capacity),
        &disk.sectors().to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    if disk.supports_discard() {
        put(
            offset_of!(virtio_blk_config, max_discard_sectors),
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_discard_seg),
            &1u32.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, discard_sector_alignment),
            &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            &1u32.to_le_bytes(),
        );
        // Write-zeroes with the unmap flag punches holes.
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    }
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable (no VIRTIO_BLK_F_CONFIG_WCE).
        log::debug!(
            "virtio-blk: ignored a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let [mut queue]: [Queue; 1] = queues
            .try_into()
            .map_err(|q: Vec<Queue>| ActivateError::BadQueue(q.len().min(1)))?;
        queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
        });
        self.broken = false;
        // Let the event loop serve anything already queued.
        self.queue_evts[0].write(1).map_err(ActivateError::Backend)
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }

    fn rate_limiter_states(&self) -> Vec<RateLimiterState> {
        vec![self
            .rate_limiter
            .as_ref()
            .map(RateLimiter::save)
            .unwrap_or_default()]
    }

    fn restore_rate_limiters(&mut self, states: &[RateLimiterState]) {
        if let (Some(limiter), Some(state)) = (&mut self.rate_limiter, states.first()) {
            limiter.restore(state);
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.broken = false;
        // Drop a stale notification.
        let _ = self.queue_evts[0].read();
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn save_backend(&mut self) -> std::io::Result<()> {
        self.disk.persist().map_err(std::io::Error::other)
    }
}
