//! The device's file descriptors on the event loop: the two queue eventfds,
//! the TAP, and the receive and transmit rate limiters' timerfds.
//!
//! The TAP stays registered but is only watched for `EPOLLIN` while the
//! receive side can use a frame: epoll is level triggered, so a readable TAP
//! with no receive buffer to put its frames in would wake the loop forever.
//! The driver's next receive-queue notification turns watching back on.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{Net, RX_QUEUE, TX_QUEUE};

/// Event data of the receive queue's eventfd.
const RX_QUEUE_EVENT: u32 = 0;
/// Event data of the transmit queue's eventfd.
const TX_QUEUE_EVENT: u32 = 1;
/// Event data of the TAP.
const TAP_EVENT: u32 = 2;
/// Event data of the receive rate limiter's timerfd.
const RX_LIMITER_EVENT: u32 = 3;
/// Event data of the transmit rate limiter's timerfd.
const TX_LIMITER_EVENT: u32 = 4;

/// How the TAP is registered with the event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TapWatch {
    /// `init` has not run.
    Unregistered,
    /// Registered, no events asked for (errors and hang-ups still come).
    Idle,
    /// Registered for `EPOLLIN`.
    Readable,
    /// Removed for good: the TAP failed.
    Removed,
}

impl Net {
    /// Brings the TAP's registration in line with what the device wants.
    fn sync_tap_watch(&mut self, ops: &mut EventOps) {
        let wanted = if self.tap_gone {
            TapWatch::Removed
        } else if self.is_running() && self.rx_wants_tap {
            TapWatch::Readable
        } else {
            TapWatch::Idle
        };
        if wanted == self.tap_watch || self.tap_watch == TapWatch::Unregistered {
            return;
        }
        let result = match wanted {
            TapWatch::Removed => ops.remove(Events::empty(&self.tap)),
            TapWatch::Readable => ops.modify(Events::with_data(&self.tap, TAP_EVENT, EventSet::IN)),
            TapWatch::Idle | TapWatch::Unregistered => {
                ops.modify(Events::with_data(&self.tap, TAP_EVENT, EventSet::empty()))
            }
        };
        match result {
            Ok(()) => self.tap_watch = wanted,
            Err(e) => log::error!(
                "virtio-net: cannot change how TAP {} is watched: {e:?}",
                self.tap.name()
            ),
        }
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            RX_QUEUE_EVENT => {
                // Drained even while inactive, so that it does not fire again.
                let _ = self.queue_events[RX_QUEUE].read();
                if self.is_running() {
                    self.rx_pass();
                }
            }
            TX_QUEUE_EVENT => {
                let _ = self.queue_events[TX_QUEUE].read();
                if self.is_running() {
                    self.tx_pass();
                }
            }
            RX_LIMITER_EVENT => {
                if let Some(limiter) = &mut self.rx_rate_limiter {
                    limiter.timer_fired();
                }
                if self.is_running() {
                    self.rx_pass();
                }
            }
            TX_LIMITER_EVENT => {
                if let Some(limiter) = &mut self.tx_rate_limiter {
                    limiter.timer_fired();
                }
                if self.is_running() {
                    self.tx_pass();
                }
            }
            TAP_EVENT => {
                let set = events.event_set();
                if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    log::error!(
                        "virtio-net: TAP {} failed or hung up ({set:?}); no more frames will be \
                         received",
                        self.tap.name()
                    );
                    self.tap_gone = true;
                } else if self.is_running() {
                    self.rx_pass();
                }
            }
            other => crate::guest_warn!("virtio-net: unexpected event data {other}"),
        }
        self.sync_tap_watch(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, data) in [(RX_QUEUE, RX_QUEUE_EVENT), (TX_QUEUE, TX_QUEUE_EVENT)] {
            let evt = &self.queue_events[index];
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("virtio-net: cannot watch queue {index}'s eventfd: {e:?}");
            }
        }
        for (limiter, data) in [
            (&self.rx_rate_limiter, RX_LIMITER_EVENT),
            (&self.tx_rate_limiter, TX_LIMITER_EVENT),
        ] {
            if let Some(limiter) = limiter {
                if let Err(e) = ops.add(Events::with_data(limiter, data, EventSet::IN)) {
                    log::error!("virtio-net: cannot watch a rate limiter's timer: {e:?}");
                }
            }
        }
        // Not watched for EPOLLIN until the driver is running with receive
        // buffers; see the module documentation.
        match ops.add(Events::with_data(&self.tap, TAP_EVENT, EventSet::empty())) {
            Ok(()) => self.tap_watch = TapWatch::Idle,
            Err(e) => {
                log::error!(
                    "virtio-net: cannot watch TAP {}: no frames will be received: {e:?}",
                    self.tap.name()
                );
                self.tap_gone = true;
                self.tap_watch = TapWatch::Removed;
            }
        }
        self.sync_tap_watch(ops);
    }
}
