//! The device's event loop, run on the fuzzing thread.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

/// How many event-loop passes a burst of work may take before the loop is
/// declared busy. Devices bound each pass (a queue's worth of requests, a
/// batch of connections); far fewer passes settle every input.
const SETTLE_PASSES: usize = 1000;

/// An event-manager loop with the devices under test registered.
pub struct Loop<S: MutEventSubscriber> {
    manager: EventManager<S>,
}

impl<T: Send + 'static> Loop<Arc<Mutex<T>>>
where
    Arc<Mutex<T>>: MutEventSubscriber,
{
    /// A loop serving `device`.
    pub fn new(device: Arc<Mutex<T>>) -> Self {
        let mut manager = EventManager::new().expect("creating the event manager");
        manager.add_subscriber(device);
        Self { manager }
    }
}

impl<S: MutEventSubscriber> Loop<S> {
    /// A loop with no device yet.
    pub fn empty() -> Self {
        Self {
            manager: EventManager::new().expect("creating the event manager"),
        }
    }

    /// Registers another subscriber.
    pub fn add(&mut self, subscriber: S) {
        self.manager.add_subscriber(subscriber);
    }

    /// Runs the loop until no fd is ready. Panics if it never settles: a
    /// device that keeps its own fds ready forever spins the VMM's event
    /// loop thread.
    pub fn pump(&mut self) {
        for _ in 0..SETTLE_PASSES {
            if self.manager.run_with_timeout(0).expect("epoll_wait") == 0 {
                return;
            }
        }
        panic!("the event loop never settles: a device keeps itself busy");
    }
}
