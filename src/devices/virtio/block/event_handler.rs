//! The block device on the VM's event loop: its one queue eventfd, and its
//! rate limiter's timerfd if it has one.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::Block;

/// The queue notification eventfd.
const QUEUE_TOKEN: u32 = 0;
/// The rate limiter's timerfd: the budget is back.
const RATE_LIMITER_TOKEN: u32 = 1;

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            QUEUE_TOKEN => {
                // Drain the eventfd whether or not the device runs (a
                // nonblocking read of an unsignalled eventfd just fails).
                let _ = self.queue_evt().read();
                self.process_queue();
            }
            RATE_LIMITER_TOKEN => {
                if let Some(limiter) = &mut self.rate_limiter {
                    limiter.timer_fired();
                }
                self.process_queue();
            }
            other => crate::guest_warn!("virtio-blk: event for unknown token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            self.queue_evt(),
            QUEUE_TOKEN,
            EventSet::IN,
        )) {
            log::error!("virtio-blk: cannot watch its queue eventfd: {e:?}");
        }
        if let Some(limiter) = &self.rate_limiter {
            if let Err(e) = ops.add(Events::with_data(limiter, RATE_LIMITER_TOKEN, EventSet::IN)) {
                log::error!("virtio-blk: cannot watch its rate limiter's timer: {e:?}");
            }
        }
    }
}
