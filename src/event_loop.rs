//! The VM's device I/O thread: one event-manager loop for every device's
//! queue notifications and backend file descriptors. vCPU threads never do
//! device I/O that blocks; they only signal eventfds this loop waits on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// A device (or anything else) that the loop drives.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors from starting the loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// An eventfd or the thread could not be created.
    #[error("could not start the device event loop")]
    Io(#[source] std::io::Error),
    /// event-manager failed (epoll creation or a subscriber's registration).
    #[error("the device event loop failed: {0:?}")]
    Manager(event_manager::Error),
}

/// Ends the loop when its eventfd is written.
struct Stopper {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event loop: cannot watch its stop eventfd: {e:?}");
        }
    }
}

/// The running loop; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct EventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the thread and registers every subscriber (each one's `init`
    /// runs on the loop thread before this returns).
    pub fn start(subscribers: Vec<Subscriber>) -> Result<Self, EventLoopError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::Io)?;
        let stopper = Stopper {
            evt: stop.try_clone().map_err(EventLoopError::Io)?,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("dormouse-io".into())
            .spawn(move || run(subscribers, stopper, ready_tx))
            .map_err(EventLoopError::Io)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(EventLoopError::Manager(e))
            }
            Err(mpsc::RecvError) => {
                let _ = thread.join();
                Err(EventLoopError::Io(std::io::Error::other(
                    "the event loop thread ended during start-up",
                )))
            }
        }
    }
}

fn run(
    subscribers: Vec<Subscriber>,
    stopper: Stopper,
    ready: mpsc::Sender<Result<(), event_manager::Error>>,
) {
    let mut manager = match EventManager::<Subscriber>::new() {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let stop = stopper.stop.clone();
    manager.add_subscriber(Arc::new(Mutex::new(stopper)));
    for s in subscribers {
        manager.add_subscriber(s);
    }
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Acquire) {
        if let Err(e) = manager.run() {
            log::error!("device event loop stopped: {e:?}");
            return;
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    struct Counter {
        evt: EventFd,
        seen: mpsc::Sender<u64>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            if let Ok(n) = self.evt.read() {
                let _ = self.seen.send(n);
            }
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn subscribers_run_on_the_loop_and_drop_stops_it() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let counter = Counter {
            evt: evt.try_clone().unwrap(),
            seen: tx,
        };
        let lp = EventLoop::start(vec![Arc::new(Mutex::new(counter))]).unwrap();
        evt.write(3).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        drop(lp);
        // The subscriber went with the loop: its channel closed.
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_err());
    }
}
