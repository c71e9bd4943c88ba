//! virtio devices over the virtio-mmio transport (virtio 1.x, "version 2").
//!
//! A device implements [`VirtioDevice`] (what the transport needs: features,
//! config space, queues, activation, reset) and event-manager's
//! `MutEventSubscriber` (its I/O, run on the VM's event-loop thread: queue
//! notifications arrive as the eventfds in [`VirtioDevice::queue_events`],
//! which KVM signals directly through ioeventfds).
//!
//! Lock order: the transport's lock (taken by a vCPU thread through the bus)
//! before the device's. The event loop takes the device's lock only.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::memory::GuestMemoryMmap;

/// The split virtqueue every dormouse device uses.
pub type Queue = virtio_queue::Queue;

/// The feature bit every virtio 1.x device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// virtio device type ids (virtio 1.2, section 5).
pub mod device_type {
    /// virtio-net.
    pub const NET: u32 = 1;
    /// virtio-blk.
    pub const BLOCK: u32 = 2;
    /// virtio-vsock.
    pub const VSOCK: u32 = 19;
}

/// A readable name for a virtio device type, for logs and error reports.
pub fn device_type_name(device_type: u32) -> &'static str {
    match device_type {
        device_type::NET => "virtio-net",
        device_type::BLOCK => "virtio-blk",
        device_type::VSOCK => "virtio-vsock",
        _ => "virtio device",
    }
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready to drive it.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits (virtio-mmio InterruptStatus).
pub mod interrupt_status {
    /// A used ring was updated.
    pub const USED_RING: u32 = 1;
    /// The configuration (or DEVICE_NEEDS_RESET) changed.
    pub const CONFIG_CHANGE: u32 = 2;
}

/// A device's interrupt line and its virtio-mmio InterruptStatus.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    trigger: EventFdTrigger,
}

impl Interrupt {
    /// An interrupt raised through `trigger` (an irqfd once the VM wires it).
    pub fn new(trigger: EventFdTrigger) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            trigger,
        }
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        vm_superio::Trigger::trigger(&self.trigger)
    }

    /// Tells the driver a used ring changed.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(interrupt_status::USED_RING)
    }

    /// Tells the driver the config space (or the device status) changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(interrupt_status::CONFIG_CHANGE)
    }

    /// Raises the interrupt again if bits are pending. A restore calls it
    /// once the vGIC's saved state is in: an interrupt a device raised while
    /// it was restored (vsock's transport reset) would otherwise be lost
    /// under it, and the driver would not look until the next one.
    pub fn resignal(&self) -> io::Result<()> {
        if self.status() != 0 {
            vm_superio::Trigger::trigger(&self.trigger)?;
        }
        Ok(())
    }

    /// The pending interrupt bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the bits the driver acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Clears every pending bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }

    /// The config generation counter (bumped on every config change).
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Sets the pending bits and config generation from a snapshot.
    pub fn restore(&self, status: u32, config_generation: u32) {
        self.status.store(status, Ordering::Release);
        self.config_generation
            .store(config_generation, Ordering::Release);
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        self.trigger.eventfd()
    }
}

/// Copies `data.len()` bytes of a device's config space from `offset`; a
/// read not wholly inside `config` reads as zeros (guest controlled).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let src = usize::try_from(offset)
        .ok()
        .and_then(|start| config.get(start..))
        .and_then(|rest| rest.get(..data.len()));
    match src {
        Some(src) => data.copy_from_slice(src),
        None => data.fill(0),
    }
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer queues than the device needs, or a queue the
    /// device needs is not ready.
    #[error("queue {0} is not ready or not valid in guest memory")]
    BadQueue(usize),
    /// The device's backend failed.
    #[error("the device backend failed to start")]
    Backend(#[source] io::Error),
}

/// What a virtio-mmio transport needs from a device.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;

    /// The maximum size of each of its queues; the length is the number of
    /// queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The features the device offers ([`VIRTIO_F_VERSION_1`] included).
    fn device_features(&self) -> u64;

    /// The features the driver accepted (a subset of [`device_features`](Self::device_features)),
    /// told once, when the driver sets FEATURES_OK.
    fn set_acked_features(&mut self, features: u64);

    /// Reads the device-specific config space at `offset`. Out-of-range
    /// reads fill `data` with zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific config space. Read-only or out-of-range
    /// writes are dropped.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// One eventfd per queue, signalled when the driver notifies that queue
    /// (KVM writes them directly when they are registered as ioeventfds).
    fn queue_events(&self) -> &[EventFd];

    /// Starts the device with the queues the driver set up. The device keeps
    /// `interrupt` to signal used buffers.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;

    /// Whether [`activate`](Self::activate) succeeded and no reset followed.
    fn is_activated(&self) -> bool;

    /// The device's queues as it runs them (ring addresses and its own
    /// next_avail/next_used), for snapshots; empty while not activated.
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;

    /// Called after a restore re-activated the device: its backend's state
    /// (e.g. vsock connections) did not survive, and the device tells the
    /// guest as its spec requires.
    fn restored(&mut self) {}

    /// The budgets of the device's rate limiters, for snapshots: one entry
    /// per limiter the device can have, in a fixed order (a default entry
    /// for one it does not have). Empty for devices without rate limits.
    fn rate_limiter_states(&self) -> Vec<crate::rate_limiter::RateLimiterState> {
        Vec::new()
    }

    /// Puts saved budgets back, in the order
    /// [`rate_limiter_states`](Self::rate_limiter_states) gives them. The
    /// states come from a file: missing or extra entries are ignored, and
    /// budgets are capped at what a fresh limiter has.
    fn restore_rate_limiters(&mut self, _states: &[crate::rate_limiter::RateLimiterState]) {}

    /// Makes the device's backend consistent on stable storage for a
    /// snapshot being taken (the VM is paused, the event loop parked): a
    /// layered disk syncs its top and writes the top's presence map. Runs
    /// on the thread taking the snapshot, never the device I/O thread.
    /// Nothing to do by default.
    fn save_backend(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Stops the device and forgets its queues and guest memory, as the
    /// driver asked by writing 0 to the status register.
    fn reset(&mut self);

    /// Whether the device hit an error (e.g. a malformed request) that it
    /// cannot recover from until the driver resets it.
    fn needs_reset(&self) -> bool {
        false
    }
}
