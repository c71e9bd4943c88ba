//! The virtio-net device model: features, config space, activation, and the
//! receive and transmit passes the event loop runs.

use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::event_handler::TapWatch;
use super::frame::{self, RingError, TxFrame, MAX_BUFFER_LEN, VNET_HDR_LEN};
use super::tap::{Tap, TapConfig};
use super::NetError;
use crate::devices::virtio::{
    device_type, ActivateError, Interrupt, Queue, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterState};

/// Index of the receive queue.
pub(super) const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub(super) const TX_QUEUE: usize = 1;
/// Both queues hold up to 256 descriptors.
const QUEUE_MAX_SIZES: [u16; 2] = [256, 256];
/// Frames moved per pass before the loop serves other devices (the rest
/// wait for the next pass, which level-triggered epoll or a re-signalled
/// queue eventfd brings).
const FRAMES_PER_PASS: usize = 256;
/// mac (6 bytes) then status (le16).
const CONFIG_LEN: usize = 8;

/// What the device has moved, for tests and metrics. Bytes count Ethernet
/// frames, without the virtio-net header.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames from the TAP that never reached the guest: larger than the
    /// receive buffer, malformed, or pending when the driver reset.
    pub rx_dropped: u64,
    /// Frames written to the TAP.
    pub tx_frames: u64,
    /// Bytes written to the TAP.
    pub tx_bytes: u64,
    /// Frames from the guest that never reached the TAP: malformed chains
    /// (too short, too long, device-writable descriptors) or a failed write.
    pub tx_dropped: u64,
}

/// What the device has while the driver has it running.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    rx: Queue,
    tx: Queue,
}

/// Why a receive pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RxStop {
    /// The device is not running.
    Inactive,
    /// No frame left on the TAP.
    TapDrained,
    /// The pass moved its share; the TAP may have more.
    BudgetSpent,
    /// A frame is waiting and the driver has no receive buffer.
    NoBuffers,
    /// The TAP reported end of file or an error: it will not be read again.
    TapGone,
    /// The receive rate limiter refused the next frame, which waits (as
    /// the pending frame) for the limiter's timer.
    Throttled,
}

/// A virtio-net device backed by a TAP. Frames move on the event loop (see
/// [`event_manager::MutEventSubscriber`]); the transport drives the rest
/// through [`VirtioDevice`].
pub struct Net {
    pub(super) tap: Tap,
    mac: [u8; 6],
    acked_features: u64,
    pub(super) queue_events: [EventFd; 2],
    active: Option<Active>,
    broken: bool,
    counters: NetCounters,
    /// Header plus frame read from the TAP, waiting for a receive buffer
    /// when `pending_rx` is set. One byte longer than the largest frame, so
    /// that a frame the backend had to cut shows as too long.
    rx_buf: Box<[u8]>,
    pending_rx: Option<usize>,
    tx_buf: Box<[u8]>,
    /// Whether the receive side wants to hear when the TAP is readable.
    pub(super) rx_wants_tap: bool,
    /// The TAP read end of file or failed; it is no longer watched.
    pub(super) tap_gone: bool,
    /// How the TAP is registered with the event loop.
    pub(super) tap_watch: TapWatch,
    /// Limits on frames and bytes delivered to the guest.
    pub(super) rx_rate_limiter: Option<RateLimiter>,
    /// Limits on frames and bytes the guest sends.
    pub(super) tx_rate_limiter: Option<RateLimiter>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &self.mac)
            .field("activated", &self.active.is_some())
            .field("broken", &self.broken)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A virtio-net device on the TAP `tap` with MAC address `mac` (which
    /// must be unicast).
    pub fn new(tap: TapConfig, mac: [u8; 6]) -> Result<Net, NetError> {
        let tap = match tap {
            TapConfig::Name(name) => Tap::open(&name)?,
            TapConfig::Fd(fd) => Tap::from_fd(fd)?,
        };
        Self::with_tap(tap, mac)
    }

    /// A virtio-net device on an opened [`Tap`].
    pub fn with_tap(tap: Tap, mac: [u8; 6]) -> Result<Net, NetError> {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::InvalidMac(mac));
        }
        let event =
            || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(NetError::EventFd);
        Ok(Net {
            tap,
            mac,
            acked_features: 0,
            queue_events: [event()?, event()?],
            active: None,
            broken: false,
            counters: NetCounters::default(),
            rx_buf: vec![0; MAX_BUFFER_LEN + 1].into_boxed_slice(),
            pending_rx: None,
            tx_buf: vec![0; MAX_BUFFER_LEN].into_boxed_slice(),
            rx_wants_tap: false,
            tap_gone: false,
            tap_watch: TapWatch::Unregistered,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        })
    }

    /// The same device with receive (`rx`) and transmit (`tx`) limits:
    /// each frame costs one operation and its Ethernet bytes (see
    /// [`crate::rate_limiter`]). A refused transmit chain stays in its
    /// ring; a refused received frame waits in the device, and the TAP is
    /// not read meanwhile. An unlimited configuration means no limiter for
    /// that direction. Call this before the device goes on the event loop,
    /// which then watches the limiters' timers.
    pub fn with_rate_limiters(
        mut self,
        rx: &RateLimiterConfig,
        tx: &RateLimiterConfig,
    ) -> Result<Net, NetError> {
        let make = |config: &RateLimiterConfig, direction| {
            if config.is_unlimited() {
                return Ok(None);
            }
            RateLimiter::new(config)
                .map(Some)
                .map_err(|source| NetError::RateLimiter { direction, source })
        };
        self.rx_rate_limiter = make(rx, "receive")?;
        self.tx_rate_limiter = make(tx, "transmit")?;
        Ok(self)
    }

    /// The receive and transmit limits (unlimited without a limiter).
    pub fn rate_limiter_configs(&self) -> (RateLimiterConfig, RateLimiterConfig) {
        let config =
            |l: &Option<RateLimiter>| l.as_ref().map(RateLimiter::config).unwrap_or_default();
        (config(&self.rx_rate_limiter), config(&self.tx_rate_limiter))
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The MAC address the guest sees.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Frames and bytes moved and dropped so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Activated, and not failed.
    pub(super) fn is_running(&self) -> bool {
        self.active.is_some() && !self.broken
    }

    /// Runs a receive pass and records whether the TAP should be watched.
    pub(super) fn rx_pass(&mut self) {
        match self.process_rx() {
            Ok(stop) => {
                // Throttled or without buffers, a readable TAP would wake the
                // loop for nothing: the timer or the driver's notification
                // brings the next pass.
                self.rx_wants_tap = matches!(stop, RxStop::TapDrained | RxStop::BudgetSpent);
                if stop == RxStop::TapGone {
                    self.tap_gone = true;
                }
            }
            Err(e) => self.fail(&e),
        }
    }

    /// Runs a transmit pass.
    pub(super) fn tx_pass(&mut self) {
        if let Err(e) = self.process_tx() {
            self.fail(&e);
        }
    }

    /// Moves frames from the TAP into receive buffers until the TAP is
    /// empty, the buffers run out or the pass has moved its share.
    fn process_rx(&mut self) -> Result<RxStop, RingError> {
        if self.broken {
            return Ok(RxStop::Inactive);
        }
        let Net {
            tap,
            active,
            rx_buf,
            pending_rx,
            counters,
            tap_gone,
            rx_rate_limiter,
            ..
        } = self;
        let Some(Active { mem, rx, .. }) = active else {
            return Ok(RxStop::Inactive);
        };
        if rx_rate_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked)
        {
            return Ok(RxStop::Throttled);
        }
        if *tap_gone {
            return Ok(RxStop::TapGone);
        }
        let mut used = false;
        let mut result = Ok(RxStop::BudgetSpent);
        for _ in 0..FRAMES_PER_PASS {
            let len = match pending_rx.take() {
                Some(len) => len,
                None => match tap.read_frame(rx_buf) {
                    Ok(0) => {
                        crate::guest_warn!("virtio-net: TAP {} closed", tap.name());
                        result = Ok(RxStop::TapGone);
                        break;
                    }
                    Ok(len) if len > MAX_BUFFER_LEN => {
                        // Larger than any frame the device moves: the read
                        // cut it (a datagram socket) or reports its whole
                        // length (a TAP). Never deliver part of a frame.
                        log::debug!("virtio-net: dropping a {len}-byte frame from the TAP");
                        counters.rx_dropped += 1;
                        continue;
                    }
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        result = Ok(RxStop::TapDrained);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("virtio-net: reading TAP {} failed: {e}", tap.name());
                        result = Ok(RxStop::TapGone);
                        break;
                    }
                },
            };
            let buf = &rx_buf[..len];
            if let Err(why) = frame::check_rx(buf) {
                log::debug!("virtio-net: dropping a frame from the TAP: {why:?}");
                counters.rx_dropped += 1;
                continue;
            }
            let chain = match pop(rx, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    *pending_rx = Some(len);
                    result = Ok(RxStop::NoBuffers);
                    break;
                }
                Err(e) => {
                    *pending_rx = Some(len);
                    result = Err(e);
                    break;
                }
            };
            let frame_len = (len - VNET_HDR_LEN) as u64;
            if let Some(limiter) = rx_rate_limiter {
                if !limiter.consume(1, frame_len) {
                    rx.go_to_previous_position();
                    *pending_rx = Some(len);
                    result = Ok(RxStop::Throttled);
                    break;
                }
            }
            let head = chain.head_index();
            match frame::write_rx(mem, chain, &buf[VNET_HDR_LEN..]) {
                Ok(Some(written)) => {
                    if let Err(e) = rx.add_used(mem, head, written) {
                        result = Err(RingError::UsedRing(e));
                        break;
                    }
                    used = true;
                    counters.rx_frames += 1;
                    counters.rx_bytes += frame_len;
                }
                Ok(None) => {
                    // Too big for the buffer: drop the frame, keep the
                    // buffer for the next one.
                    log::debug!(
                        "virtio-net: dropping a {len}-byte frame: receive buffer {head} is smaller"
                    );
                    rx.go_to_previous_position();
                    counters.rx_dropped += 1;
                }
                Err(e) => {
                    // Kept until the reset that must follow.
                    *pending_rx = Some(len);
                    result = Err(e);
                    break;
                }
            }
        }
        if used {
            self.signal_used(RX_QUEUE)?;
        }
        result
    }

    /// Writes every transmit chain to the TAP and returns it to the driver.
    fn process_tx(&mut self) -> Result<(), RingError> {
        if self.broken {
            return Ok(());
        }
        let Net {
            tap,
            active,
            tx_buf,
            counters,
            queue_events,
            tx_rate_limiter,
            ..
        } = self;
        let Some(Active { mem, tx, .. }) = active else {
            return Ok(());
        };
        if tx_rate_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked)
        {
            return Ok(());
        }
        let mut used = false;
        let mut result = Ok(());
        let mut budget = FRAMES_PER_PASS;
        loop {
            let chain = match pop(tx, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let head = chain.head_index();
            let frame = frame::read_tx(mem, chain, tx_buf);
            // A frame costs one operation and its bytes; a dropped chain
            // one operation, so that malformed chains are limited too.
            let cost = match &frame {
                Ok(TxFrame::Ready(len)) => Some((len - VNET_HDR_LEN) as u64),
                Ok(TxFrame::Drop(_)) => Some(0),
                Err(_) => None,
            };
            if let (Some(bytes), Some(limiter)) = (cost, tx_rate_limiter.as_mut()) {
                if !limiter.consume(1, bytes) {
                    // Read again when the budget is back.
                    tx.go_to_previous_position();
                    break;
                }
            }
            match frame {
                Ok(TxFrame::Ready(len)) => match tap.write_frame(&tx_buf[..len]) {
                    Ok(n) if n == len => {
                        counters.tx_frames += 1;
                        counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
                    }
                    Ok(n) => {
                        log::debug!("virtio-net: TAP took {n} of {len} bytes");
                        counters.tx_dropped += 1;
                    }
                    Err(e) => {
                        log::debug!("virtio-net: writing to TAP {} failed: {e}", tap.name());
                        counters.tx_dropped += 1;
                    }
                },
                Ok(TxFrame::Drop(why)) => {
                    log::debug!("virtio-net: dropping transmit chain {head}: {why:?}");
                    counters.tx_dropped += 1;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if let Err(e) = tx.add_used(mem, head, 0) {
                result = Err(RingError::UsedRing(e));
                break;
            }
            used = true;
            budget -= 1;
            if budget == 0 {
                // Come back after the other devices had their turn.
                let _ = queue_events[TX_QUEUE].write(1);
                break;
            }
        }
        if used {
            self.signal_used(TX_QUEUE)?;
        }
        result
    }

    /// Interrupts the driver if it wants to hear about used buffers.
    fn signal_used(&mut self, queue: usize) -> Result<(), RingError> {
        let Some(active) = &mut self.active else {
            return Ok(());
        };
        let q = if queue == RX_QUEUE {
            &mut active.rx
        } else {
            &mut active.tx
        };
        if q.needs_notification(&active.mem)
            .map_err(RingError::UsedRing)?
        {
            if let Err(e) = active.interrupt.signal_used_queue() {
                log::error!("virtio-net: cannot raise the used-buffer interrupt: {e}");
            }
        }
        Ok(())
    }

    /// The driver broke a ring: stop until it resets the device.
    fn fail(&mut self, error: &RingError) {
        crate::guest_warn!("virtio-net: the driver broke a queue, device needs reset: {error}");
        self.broken = true;
        self.rx_wants_tap = false;
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.signal_config_change() {
                log::error!("virtio-net: cannot raise the config-change interrupt: {e}");
            }
        }
    }

    /// The features the driver accepted.
    #[cfg(test)]
    pub(super) fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether a frame waits for a receive buffer.
    #[cfg(test)]
    pub(super) fn has_pending_rx(&self) -> bool {
        self.pending_rx.is_some()
    }
}

/// The next available chain; an impossible available index is the driver's
/// fault.
fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, RingError> {
    let mut iter = queue.iter(mem).map_err(RingError::AvailRing)?;
    Ok(iter.next())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.device_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac);
        // The link is always up.
        let status = u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1);
        config[6..].copy_from_slice(&status.to_le_bytes());
        super::super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // mac and status are read-only in virtio 1.x.
        log::debug!(
            "virtio-net: ignoring a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_MAX_SIZES.len() {
            return Err(ActivateError::BadQueue(
                queues.len().min(QUEUE_MAX_SIZES.len()),
            ));
        }
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadQueue(RX_QUEUE));
        };
        self.active = Some(Active {
            mem,
            interrupt,
            rx,
            tx,
        });
        self.broken = false;
        // Let the event loop look at anything the driver queued already.
        for evt in &self.queue_events {
            evt.write(1).map_err(ActivateError::Backend)?;
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.rx.state(), a.tx.state()])
            .unwrap_or_default()
    }

    /// Receive, then transmit.
    fn rate_limiter_states(&self) -> Vec<RateLimiterState> {
        [&self.rx_rate_limiter, &self.tx_rate_limiter]
            .into_iter()
            .map(|l| l.as_ref().map(RateLimiter::save).unwrap_or_default())
            .collect()
    }

    fn restore_rate_limiters(&mut self, states: &[RateLimiterState]) {
        let limiters = [&mut self.rx_rate_limiter, &mut self.tx_rate_limiter];
        for (limiter, state) in limiters.into_iter().zip(states) {
            if let Some(limiter) = limiter {
                limiter.restore(state);
            }
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        self.acked_features = 0;
        self.rx_wants_tap = false;
        if self.pending_rx.take().is_some() {
            self.counters.rx_dropped += 1;
        }
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }
}
