//! The virtio-mmio transport, register layout version 2 (virtio 1.2,
//! section 4.2.2). Guest controlled: every register access is checked and a
//! driver that breaks the protocol gets its write ignored (or the device
//! marked DEVICE_NEEDS_RESET), never a panic.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_queue::{QueueState, QueueT};

use super::{status, Interrupt, Queue, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::devices::StateError;
use crate::memory::GuestMemoryMmap;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2: virtio 1.x.
const VERSION: u32 = 2;
/// dormouse's vendor id ("DMSE").
const VENDOR_ID: u32 = 0x444d_5345;

/// Size of a virtio-mmio device's register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (for ioeventfds).
pub const QUEUE_NOTIFY: u64 = 0x050;
/// Offset of the device-specific config space.
const CONFIG_SPACE: u64 = 0x100;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// A saved virtqueue (virtio-queue's `QueueState`, as plain data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    /// The device's maximum size.
    pub max_size: u16,
    /// The device's next available-ring index.
    pub next_avail: u16,
    /// The device's next used-ring index.
    pub next_used: u16,
    /// Whether VIRTIO_F_RING_EVENT_IDX is on.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver marked it ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio transport and its device's queues, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The device type, checked against the device rebuilt on restore.
    pub device_type: u32,
    /// The status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote (acked once FEATURES_OK is set).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Pending InterruptStatus bits.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The queues: the device's live copies once activated, else the
    /// transport's register view.
    pub queues: Vec<SavedQueue>,
    /// The device's rate limiters' budgets (added after format 1.0, where
    /// it is empty: the buckets start full).
    pub rate_limiters: Vec<crate::rate_limiter::RateLimiterState>,
}

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    // Fixed for the device's life, cached so that register reads never wait
    // for the device lock (which the event loop holds while it does I/O).
    device_type: u32,
    device_features: u64,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .finish_non_exhaustive()
    }
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        // A device that asks for an impossible queue size gets none of that
        // queue rather than a panic; QueueNumMax then reads 0 for it.
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

impl MmioTransport {
    /// Puts `device` behind virtio-mmio registers, raising `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let (queues, device_type, device_features) = {
            let d = lock(&device);
            (
                new_queues(d.queue_max_sizes()),
                d.device_type(),
                d.device_features(),
            )
        };
        Self {
            device,
            device_type,
            device_features,
            mem,
            interrupt,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
        }
    }

    /// Saves the transport and its device's queues. The device must be
    /// quiescent (event loop paused, vCPUs stopped).
    pub fn save(&self) -> TransportState {
        let (live, rate_limiters) = {
            let device = lock(&self.device);
            (device.queue_states(), device.rate_limiter_states())
        };
        let queues = if live.len() == self.queues.len() {
            live.into_iter().map(SavedQueue::from).collect()
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        TransportState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            queues,
            rate_limiters,
        }
    }

    /// Makes the device's backend consistent on stable storage for a
    /// snapshot ([`VirtioDevice::save_backend`]). The device must be
    /// quiescent.
    pub fn save_backend(&self) -> std::io::Result<()> {
        lock(&self.device).save_backend()
    }

    /// Raises the device's interrupt again if the driver has bits pending
    /// (see [`Interrupt::resignal`](super::Interrupt::resignal)).
    pub fn resignal_pending(&self) -> std::io::Result<()> {
        self.interrupt.resignal()
    }

    /// Puts a freshly built transport (and its device) into a saved state:
    /// the saved queues are rebuilt through virtio-queue's checks, and a
    /// device the driver had started is activated on them again. The state
    /// comes from a file: every mismatch is an error, not a panic.
    pub fn restore(&mut self, saved: &TransportState) -> Result<(), StateError> {
        let invalid = |reason: String| StateError {
            device: "virtio-mmio transport",
            reason,
        };
        if saved.device_type != self.device_type {
            return Err(invalid(format!(
                "saved device type {} but the VM's device in this slot has type {}",
                saved.device_type, self.device_type
            )));
        }
        if saved.queues.len() != self.queues.len() {
            return Err(invalid(format!(
                "{} queues saved, the device has {}",
                saved.queues.len(),
                self.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (i, (q, current)) in saved.queues.iter().zip(&self.queues).enumerate() {
            if q.max_size != current.max_size() {
                return Err(invalid(format!("queue {i} has a different maximum size")));
            }
            queues.push(
                Queue::try_from(QueueState::from(*q))
                    .map_err(|e| invalid(format!("queue {i}: {e:?}")))?,
            );
        }
        if saved.driver_features & !self.device_features != 0 {
            return Err(invalid(
                "the driver acked features the device does not offer".into(),
            ));
        }
        self.status = saved.status;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.driver_features = saved.driver_features;
        self.queue_sel = saved.queue_sel;
        self.interrupt
            .restore(saved.interrupt_status, saved.config_generation);
        let running =
            saved.status & status::DRIVER_OK != 0 && saved.status & status::DEVICE_NEEDS_RESET == 0;
        if saved.status & status::FEATURES_OK != 0 {
            lock(&self.device).set_acked_features(self.driver_features);
        }
        if running {
            let copies = queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("{e:?}")))?;
            if let Some(i) = copies.iter().position(|q| !q.is_valid(&self.mem)) {
                return Err(invalid(format!("queue {i} does not lie in guest memory")));
            }
            let mut device = lock(&self.device);
            device
                .activate(self.mem.clone(), self.interrupt.clone(), copies)
                .map_err(|e| invalid(format!("re-activating the device: {e}")))?;
            device.restored();
        }
        lock(&self.device).restore_rate_limiters(&saved.rate_limiters);
        self.queues = queues;
        Ok(())
    }

    /// The device status register as the driver last set it.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers only change between FEATURES_OK and DRIVER_OK.
        if self.status & status::DRIVER_OK != 0 || self.status & status::FEATURES_OK == 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_u32(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let [low, high] = split(self.device_features);
                match self.device_features_sel {
                    0 => low,
                    1 => high,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => {
                let mut status = self.status;
                if lock(&self.device).needs_reset() {
                    status |= status::DEVICE_NEEDS_RESET;
                }
                status
            }
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => 0,
        }
    }

    fn write_u32(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // virtio-queue ignores sizes that are zero, larger than
                    // the maximum, or not a power of two; is_valid() then
                    // fails at DRIVER_OK.
                    q.set_size(u16::try_from(value).unwrap_or(0));
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW => {
                self.set_queue_addr(|q| q.set_desc_table_address(Some(value), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.set_queue_addr(|q| q.set_desc_table_address(None, Some(value)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.set_queue_addr(|q| q.set_avail_ring_address(Some(value), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.set_queue_addr(|q| q.set_avail_ring_address(None, Some(value)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.set_queue_addr(|q| q.set_used_ring_address(Some(value), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.set_queue_addr(|q| q.set_used_ring_address(None, Some(value)))
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ => {}
        }
    }

    fn set_queue_addr(&mut self, set: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            set(q);
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Only between DRIVER and FEATURES_OK.
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    fn notify(&self, queue: u32) {
        // Reaches here only when no ioeventfd caught the write (e.g. in
        // host-native tests); forward it the same way KVM would.
        if let Some(evt) = lock(&self.device).queue_events().get(queue as usize) {
            let _ = evt.write(1);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, in the order the spec gives; anything else
        // is ignored.
        if value & self.status != self.status {
            return;
        }
        let new = value & !self.status;
        if new & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        let allowed = match self.status & !status::FAILED {
            0 => status::ACKNOWLEDGE,
            s if s == status::ACKNOWLEDGE => status::DRIVER,
            s if s == status::ACKNOWLEDGE | status::DRIVER => status::FEATURES_OK,
            s if s == status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK => {
                status::DRIVER_OK
            }
            _ => 0,
        };
        if new != allowed {
            return;
        }
        match new {
            status::FEATURES_OK => {
                let offered = self.device_features;
                // The driver must take VERSION_1 and nothing it was not
                // offered; otherwise FEATURES_OK does not stick, which the
                // driver sees when it reads the status back.
                if self.driver_features & !offered != 0
                    || self.driver_features & VIRTIO_F_VERSION_1 == 0
                {
                    return;
                }
                lock(&self.device).set_acked_features(self.driver_features);
                self.status |= new;
            }
            status::DRIVER_OK => {
                self.status |= new;
                self.activate();
            }
            _ => self.status |= new,
        }
    }

    fn activate(&mut self) {
        let mut device = lock(&self.device);
        // The device gets its own copies; the transport keeps the register
        // view (frozen until reset).
        let queues: Result<Vec<Queue>, usize> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                if q.ready() && q.is_valid(&self.mem) {
                    Queue::try_from(q.state()).map_err(|_| i)
                } else {
                    Err(i)
                }
            })
            .collect();
        let result = queues
            .map_err(super::ActivateError::BadQueue)
            .and_then(|queues| device.activate(self.mem.clone(), self.interrupt.clone(), queues));
        if let Err(e) = result {
            crate::guest_warn!(
                "{} failed to activate: {e}",
                super::device_type_name(self.device_type)
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            drop(device);
            let _ = self.interrupt.signal_config_change();
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }
}

/// The low and high 32-bit halves of a feature word.
fn split(features: u64) -> [u32; 2] {
    let bytes = features.to_le_bytes();
    [
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
    ]
}

fn lock(device: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset.is_multiple_of(4) => *word = self.read_u32(offset).to_le_bytes(),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            return;
        }
        if let (Ok(word), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_u32(offset, u32::from_le_bytes(word));
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::{interrupt_status, ActivateError};
    use crate::devices::EventFdTrigger;
    use crate::rate_limiter::{RateLimiterState, TokenBucketState};

    const FEATURE_X: u64 = 1 << 5;

    struct Dummy {
        max_sizes: Vec<u16>,
        events: Vec<EventFd>,
        acked: Option<u64>,
        active: Option<Vec<Queue>>,
        resets: u32,
        config: [u8; 8],
        broken: bool,
        limiters: Vec<RateLimiterState>,
    }

    impl Dummy {
        fn new(queues: usize) -> Self {
            Self {
                max_sizes: vec![16; queues],
                events: (0..queues)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap())
                    .collect(),
                acked: None,
                active: None,
                resets: 0,
                config: *b"dormouse",
                broken: false,
                limiters: Vec::new(),
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | FEATURE_X
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            match self.config.get(start..).and_then(|c| c.get(..data.len())) {
                Some(src) => data.copy_from_slice(src),
                None => data.fill(0),
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _interrupt: Arc<Interrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            self.active = Some(queues);
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active.is_some()
        }
        fn reset(&mut self) {
            self.active = None;
            self.resets += 1;
        }
        fn needs_reset(&self) -> bool {
            self.broken
        }
        fn queue_states(&self) -> Vec<QueueState> {
            self.active
                .as_ref()
                .map(|qs| qs.iter().map(|q| q.state()).collect())
                .unwrap_or_default()
        }
        fn rate_limiter_states(&self) -> Vec<RateLimiterState> {
            self.limiters.clone()
        }
        fn restore_rate_limiters(&mut self, states: &[RateLimiterState]) {
            self.limiters = states.to_vec();
        }
    }

    struct Rig {
        transport: MmioTransport,
        device: Arc<Mutex<Dummy>>,
        interrupt: Arc<Interrupt>,
    }

    fn rig(queues: usize) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = Arc::new(Mutex::new(Dummy::new(queues)));
        let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
        let transport = MmioTransport::new(device.clone(), mem, interrupt.clone());
        Rig {
            transport,
            device,
            interrupt,
        }
    }

    impl Rig {
        fn r(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.transport.read(offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, offset: u64, value: u32) {
            self.transport.write(offset, &value.to_le_bytes());
        }
        fn negotiate(&mut self, features: u64) {
            self.w(reg::STATUS, status::ACKNOWLEDGE);
            self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
            let [low, high] = split(features);
            self.w(reg::DRIVER_FEATURES_SEL, 0);
            self.w(reg::DRIVER_FEATURES, low);
            self.w(reg::DRIVER_FEATURES_SEL, 1);
            self.w(reg::DRIVER_FEATURES, high);
            self.w(
                reg::STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            );
        }
        fn setup_queue(&mut self, index: u32, base: u32) {
            self.w(reg::QUEUE_SEL, index);
            self.w(reg::QUEUE_NUM, 16);
            self.w(reg::QUEUE_DESC_LOW, base);
            self.w(reg::QUEUE_DESC_HIGH, 0);
            self.w(reg::QUEUE_DRIVER_LOW, base + 0x1000);
            self.w(reg::QUEUE_DRIVER_HIGH, 0);
            self.w(reg::QUEUE_DEVICE_LOW, base + 0x2000);
            self.w(reg::QUEUE_DEVICE_HIGH, 0);
            self.w(reg::QUEUE_READY, 1);
        }
        fn driver_ok(&mut self) {
            self.w(
                reg::STATUS,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            );
        }
    }

    #[test]
    fn identifies_as_a_virtio_1_mmio_device() {
        let mut t = rig(1);
        assert_eq!(t.r(reg::MAGIC), MAGIC);
        assert_eq!(t.r(reg::VERSION), 2);
        assert_eq!(t.r(reg::DEVICE_ID), 42);
        t.w(reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(t.r(reg::DEVICE_FEATURES), split(FEATURE_X)[0]);
        t.w(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(t.r(reg::DEVICE_FEATURES), 1);
        t.w(reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(t.r(reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn a_full_handshake_activates_the_device() {
        let mut t = rig(2);
        t.negotiate(VIRTIO_F_VERSION_1 | FEATURE_X);
        assert_eq!(
            t.device.lock().unwrap().acked,
            Some(VIRTIO_F_VERSION_1 | FEATURE_X)
        );
        t.setup_queue(0, 0x1_0000);
        t.setup_queue(1, 0x2_0000);
        t.w(reg::QUEUE_SEL, 1);
        assert_eq!(t.r(reg::QUEUE_NUM_MAX), 16);
        assert_eq!(t.r(reg::QUEUE_READY), 1);
        t.driver_ok();
        assert_ne!(t.r(reg::STATUS) & status::DRIVER_OK, 0);
        let dev = t.device.lock().unwrap();
        let queues = dev.active.as_ref().expect("activated");
        assert_eq!(queues[1].desc_table(), 0x2_0000);
        assert_eq!(queues[1].size(), 16);
    }

    #[test]
    fn features_not_offered_or_without_version_1_are_refused() {
        let mut t = rig(1);
        t.negotiate(VIRTIO_F_VERSION_1 | (1 << 3));
        assert_eq!(t.r(reg::STATUS) & status::FEATURES_OK, 0);
        assert_eq!(t.device.lock().unwrap().acked, None);

        let mut t = rig(1);
        t.negotiate(FEATURE_X);
        assert_eq!(t.r(reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn status_bits_out_of_order_are_ignored() {
        let mut t = rig(1);
        t.w(reg::STATUS, status::DRIVER_OK);
        assert_eq!(t.r(reg::STATUS), 0);
        t.w(reg::STATUS, status::ACKNOWLEDGE);
        t.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(t.r(reg::STATUS), status::ACKNOWLEDGE);
        // Clearing bits other than by a full reset is ignored too.
        t.w(reg::STATUS, status::DRIVER);
        assert_eq!(t.r(reg::STATUS), status::ACKNOWLEDGE);
    }

    #[test]
    fn queues_outside_guest_memory_do_not_activate() {
        let mut t = rig(1);
        t.negotiate(VIRTIO_F_VERSION_1);
        t.setup_queue(0, 0x00ff_f000); // rings past the end of the 1 MiB memory
        t.driver_ok();
        assert!(!t.device.lock().unwrap().is_activated());
        assert_ne!(t.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(t.interrupt.status() & interrupt_status::CONFIG_CHANGE, 0);
    }

    #[test]
    fn unready_queues_do_not_activate() {
        let mut t = rig(2);
        t.negotiate(VIRTIO_F_VERSION_1);
        t.setup_queue(0, 0x1_0000);
        t.driver_ok();
        assert!(!t.device.lock().unwrap().is_activated());
    }

    #[test]
    fn bad_queue_sizes_and_selectors_are_harmless() {
        let mut t = rig(1);
        t.negotiate(VIRTIO_F_VERSION_1);
        t.w(reg::QUEUE_SEL, 1000);
        assert_eq!(t.r(reg::QUEUE_NUM_MAX), 0);
        t.w(reg::QUEUE_NUM, 8);
        t.w(reg::QUEUE_READY, 1);
        t.w(reg::QUEUE_SEL, 0);
        t.w(reg::QUEUE_NUM, 17); // not a power of two
        t.w(reg::QUEUE_NUM, 0x1_0000_u32);
        t.setup_queue(0, 0x1_0000);
        t.w(reg::QUEUE_NUM, 3);
        t.driver_ok();
        let dev = t.device.lock().unwrap();
        assert_eq!(dev.active.as_ref().unwrap()[0].size(), 16);
    }

    #[test]
    fn queue_registers_are_frozen_after_driver_ok() {
        let mut t = rig(1);
        t.negotiate(VIRTIO_F_VERSION_1);
        t.setup_queue(0, 0x1_0000);
        t.driver_ok();
        t.w(reg::QUEUE_DESC_LOW, 0x5_0000);
        t.w(reg::DRIVER_FEATURES, 0);
        assert_eq!(t.transport.queues[0].desc_table(), 0x1_0000);
    }

    #[test]
    fn notify_signals_the_queue_eventfd() {
        let mut t = rig(2);
        t.w(reg::QUEUE_NOTIFY, 1);
        t.w(reg::QUEUE_NOTIFY, 99);
        let dev = t.device.lock().unwrap();
        assert_eq!(dev.events[1].read().unwrap(), 1);
        assert!(dev.events[0].read().is_err(), "queue 0 was not notified");
    }

    #[test]
    fn interrupts_are_acknowledged_bit_by_bit() {
        let mut t = rig(1);
        t.interrupt.signal_used_queue().unwrap();
        t.interrupt.signal_config_change().unwrap();
        assert_eq!(t.r(reg::INTERRUPT_STATUS), 3);
        assert_eq!(t.r(reg::CONFIG_GENERATION), 1);
        t.w(reg::INTERRUPT_ACK, interrupt_status::USED_RING);
        assert_eq!(t.r(reg::INTERRUPT_STATUS), interrupt_status::CONFIG_CHANGE);
    }

    #[test]
    fn writing_zero_resets_everything() {
        let mut t = rig(1);
        t.negotiate(VIRTIO_F_VERSION_1);
        t.setup_queue(0, 0x1_0000);
        t.driver_ok();
        t.interrupt.signal_used_queue().unwrap();
        t.w(reg::STATUS, 0);
        assert_eq!(t.r(reg::STATUS), 0);
        assert_eq!(t.r(reg::INTERRUPT_STATUS), 0);
        assert!(!t.device.lock().unwrap().is_activated());
        assert_eq!(t.device.lock().unwrap().resets, 1);
        assert!(!t.transport.queues[0].ready());
        // And the device can be brought up again.
        t.negotiate(VIRTIO_F_VERSION_1);
        t.setup_queue(0, 0x1_0000);
        t.driver_ok();
        assert!(t.device.lock().unwrap().is_activated());
    }

    #[test]
    fn save_and_restore_bring_back_a_running_device() {
        let mut t = rig(2);
        t.negotiate(VIRTIO_F_VERSION_1 | FEATURE_X);
        t.setup_queue(0, 0x1_0000);
        t.setup_queue(1, 0x2_0000);
        t.driver_ok();
        t.interrupt.signal_used_queue().unwrap();
        let budget = RateLimiterState {
            bandwidth: None,
            ops: Some(TokenBucketState {
                budget: -3,
                one_time_burst: 7,
            }),
        };
        t.device.lock().unwrap().limiters = vec![RateLimiterState::default(), budget];
        let saved = t.transport.save();
        assert_eq!(saved.queues[1].desc_table, 0x2_0000);
        assert_eq!(saved.rate_limiters[1], budget);

        let mut fresh = rig(2);
        fresh.transport.restore(&saved).unwrap();
        assert_eq!(fresh.transport.save(), saved);
        assert_eq!(fresh.r(reg::STATUS), t.r(reg::STATUS));
        assert_eq!(fresh.r(reg::INTERRUPT_STATUS), interrupt_status::USED_RING);
        let dev = fresh.device.lock().unwrap();
        assert_eq!(dev.acked, Some(VIRTIO_F_VERSION_1 | FEATURE_X));
        assert_eq!(dev.active.as_ref().unwrap()[1].desc_table(), 0x2_0000);
        assert_eq!(dev.limiters, saved.rate_limiters);
    }

    #[test]
    fn restoring_a_state_that_does_not_fit_is_an_error() {
        let mut t = rig(1);
        t.negotiate(VIRTIO_F_VERSION_1);
        t.setup_queue(0, 0x1_0000);
        t.driver_ok();
        let saved = t.transport.save();

        let mut wrong = saved.clone();
        wrong.device_type = 7;
        assert!(rig(1).transport.restore(&wrong).is_err());
        assert!(rig(2).transport.restore(&saved).is_err());
        let mut wrong = saved.clone();
        wrong.queues[0].size = 3; // not a power of two
        assert!(rig(1).transport.restore(&wrong).is_err());
        let mut wrong = saved.clone();
        wrong.queues[0].used_ring = 0xffff_ff00; // outside guest memory
        assert!(rig(1).transport.restore(&wrong).is_err());
        let mut wrong = saved;
        wrong.driver_features |= 1 << 60;
        assert!(rig(1).transport.restore(&wrong).is_err());
    }

    #[test]
    fn a_broken_device_reports_needs_reset() {
        let mut t = rig(1);
        t.device.lock().unwrap().broken = true;
        assert_ne!(t.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn config_space_and_odd_accesses() {
        let mut t = rig(1);
        let mut b = [0u8; 8];
        t.transport.read(CONFIG_SPACE, &mut b);
        assert_eq!(&b, b"dormouse");
        let mut b = [0xffu8; 4];
        t.transport.read(CONFIG_SPACE + 6, &mut b);
        assert_eq!(b, [0; 4]);
        // Narrow or misaligned register accesses read zero and are dropped.
        let mut b = [0xffu8; 2];
        t.transport.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0; 2]);
        let mut b = [0xffu8; 4];
        t.transport.read(reg::MAGIC + 1, &mut b);
        assert_eq!(b, [0; 4]);
        t.transport.write(reg::STATUS, &[1]);
        assert_eq!(t.r(reg::STATUS), 0);
        t.transport.write(u64::MAX, &[1, 2, 3, 4]);
    }
}
