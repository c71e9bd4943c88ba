//! The vsock device on the VM's event loop: its three queue eventfds, its
//! wake-up eventfd, its deadline timer, the listener and one stream per
//! connection.
//!
//! Tokens: the queues are 0 to 2, the wake-up eventfd 3 (which also says
//! that connections were handed in), the listener
//! [`LISTENER_TOKEN`], the timer 5; connection streams use their
//! connection's key, from [`FIRST_CONN_KEY`] up.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::backend::{FIRST_CONN_KEY, LISTENER_TOKEN};
use super::device::Vsock;
use super::{EVQ, RXQ, TXQ};
use crate::devices::virtio::VirtioDevice;

const RXQ_TOKEN: u32 = 0;
const TXQ_TOKEN: u32 = 1;
const EVQ_TOKEN: u32 = 2;
const WAKE_TOKEN: u32 = 3;
const TIMER_TOKEN: u32 = 5;
const _: () = assert!(TIMER_TOKEN != LISTENER_TOKEN && TIMER_TOKEN < FIRST_CONN_KEY);

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut tx_kick = false;
        match events.data() {
            // Queue notifications are drained even while inactive; an
            // active device then looks at every queue it has work for.
            RXQ_TOKEN => {
                let _ = self.queue_events()[RXQ].read();
            }
            TXQ_TOKEN => {
                let _ = self.queue_events()[TXQ].read();
                tx_kick = true;
            }
            // Event buffers are only stored, for send_transport_reset();
            // a kick says the guest handled what it had.
            EVQ_TOKEN => {
                let _ = self.queue_events()[EVQ].read();
                self.event_queue_kicked();
            }
            // Connections closed off the loop, or handed in.
            WAKE_TOKEN => {
                let _ = self.wake.read();
                self.take_handoffs();
            }
            TIMER_TOKEN => {
                // Non-blocking: a timer re-set since it fired reads nothing.
                let _ = self.timer.wait();
                self.expire();
            }
            LISTENER_TOKEN => self.backend.accept(),
            key if key >= FIRST_CONN_KEY => self.backend.on_host_event(key, events.event_set()),
            other => log::warn!("vsock: event for unknown token {other}"),
        }
        self.run_queues(tx_kick);
        self.backend.sync(ops);
        self.arm_timer();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (token, evt) in [RXQ_TOKEN, TXQ_TOKEN, EVQ_TOKEN]
            .into_iter()
            .zip(self.queue_events())
        {
            if let Err(e) = ops.add(Events::with_data(evt, token, EventSet::IN)) {
                log::error!("vsock: cannot watch queue eventfd {token}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&*self.wake, WAKE_TOKEN, EventSet::IN)) {
            log::error!("vsock: cannot watch its wake-up eventfd: {e:?}");
        }
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER_TOKEN, EventSet::IN)) {
            log::error!("vsock: cannot watch its timer: {e:?}");
        }
        // Registers the listener.
        self.backend.sync(ops);
    }
}
