//! virtio-blk: a raw disk image (a regular file or a block device) as a
//! virtio block device (virtio 1.2, section 5.2).
//!
//! - `device`: the model ([`Block`]): features, config space, activation and
//!   the queue processing loop.
//! - `disk`: the backing file: positioned I/O straight between the file and
//!   guest memory (through vm-memory, so the dirty bitmap sees every write),
//!   flush, discard and write-zeroes with `fallocate`.
//! - `layered`: a layered copy-on-write disk ([`DiskLayers`]): a
//!   read-only base, frozen layers and a writable top, each layer a sparse
//!   data file plus a presence map of 4 KiB chunks; [`merge_layers`].
//! - `backend`: the plain or layered disk a device uses.
//! - `request`: turning one descriptor chain into a request, checking
//!   everything the guest controls, and running it.
//! - `event_handler`: the queue eventfd (and the rate limiter's timerfd) on
//!   the VM's event loop.
//!
//! The device has one request queue. I/O is synchronous on the event-loop
//! thread; a processing pass handles at most one queue's worth of requests
//! and then yields to the other devices (it re-kicks its own eventfd).
//!
//! With a rate limiter ([`Block::with_rate_limiter`]) each request costs
//! one operation and its data bytes (every buffer but the 16-byte header
//! and the status byte). A request the limiter refuses stays in the
//! available ring, notifications stay off, and the pass ends; the
//! limiter's timerfd starts the next pass when the budget is back.

mod backend;
mod device;
mod disk;
mod event_handler;
mod layered;
mod request;
#[cfg(test)]
mod tests;

pub use device::{Block, BlockError};
pub use layered::{map_path, merge_layers, DiskLayers, LayerError, CHUNK_SIZE, MAP_VERSION};

/// The size of a virtio-blk sector, whatever the backing file's block size.
const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
const SECTOR_SHIFT: u32 = 9;
/// The maximum (and default) size of the request queue.
const QUEUE_SIZE: u16 = 256;
/// The most data segments a request may carry: without indirect descriptors
/// a chain is at most one queue long, header and status included.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The most sectors one discard or write-zeroes request may cover (2 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Discard alignment in sectors (4 KiB, the common file-system block size).
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// The length of the device id GET_ID returns.
const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
