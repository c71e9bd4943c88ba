//! The VM's device I/O thread: one event-manager loop for every device's
//! queue notifications and backend file descriptors. vCPU threads never do
//! device I/O that blocks; they only signal eventfds this loop waits on.
//!
//! [`EventLoop::pause`] parks the thread between two passes, so that no
//! device touches guest memory or its own state while a snapshot is taken.
//!
//! A device must take an fd off the loop (`EventOps::remove`) before it
//! closes it: event-manager keeps its records by fd number.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{self, SeccompError, ThreadFilters, ThreadKind};

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
    /// The loop thread could not install its seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
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

/// Whether the loop thread should park, and whether it has.
#[derive(Debug, Default)]
struct ParkState {
    requested: bool,
    parked: bool,
}

#[derive(Debug, Default)]
struct Park {
    state: Mutex<ParkState>,
    changed: Condvar,
}

impl Park {
    fn lock(&self) -> std::sync::MutexGuard<'_, ParkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Parks the loop thread when its eventfd is written and a pause is asked.
struct Parker {
    evt: EventFd,
    park: Arc<Park>,
}

impl MutEventSubscriber for Parker {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.evt.read();
        let mut state = self.park.lock();
        if !state.requested {
            return;
        }
        state.parked = true;
        self.park.changed.notify_all();
        while state.requested {
            state = self
                .park
                .changed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        state.parked = false;
        self.park.changed.notify_all();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event loop: cannot watch its pause eventfd: {e:?}");
        }
    }
}

/// The running loop; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct EventLoop {
    stop: EventFd,
    pause: EventFd,
    park: Arc<Park>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the thread and registers every subscriber (each one's `init`
    /// runs on the loop thread before this returns). The thread has no
    /// seccomp filter: a VM's loop is started with its filters.
    pub fn start(subscribers: Vec<Subscriber>) -> Result<Self, EventLoopError> {
        let filters = ThreadFilters::new(&seccomp::SeccompPolicy::Disabled)?;
        Self::start_filtered(subscribers, Arc::new(filters))
    }

    /// Starts the thread, which installs the device I/O filter of
    /// `filters` on itself first, then registers every subscriber.
    pub(crate) fn start_filtered(
        subscribers: Vec<Subscriber>,
        filters: Arc<ThreadFilters>,
    ) -> Result<Self, EventLoopError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::Io)?;
        let stopper = Stopper {
            evt: stop.try_clone().map_err(EventLoopError::Io)?,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let pause = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::Io)?;
        let park = Arc::new(Park::default());
        let parker = Parker {
            evt: pause.try_clone().map_err(EventLoopError::Io)?,
            park: park.clone(),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("dormouse-io".into())
            .spawn(move || {
                let _seccomp = match filters.enter(ThreadKind::DeviceIo, None) {
                    Ok(guard) => guard,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                run(subscribers, stopper, parker, ready_tx, &filters)
            })
            .map_err(EventLoopError::Io)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                pause,
                park,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
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

impl EventLoop {
    /// Parks the loop thread between two passes and returns once it is
    /// parked: no device runs until [`resume`](Self::resume). Returns
    /// false if the thread is gone (it ended on an event-manager error).
    pub fn pause(&self) -> bool {
        let mut state = self.park.lock();
        state.requested = true;
        drop(state);
        if self.pause.write(1).is_err() {
            return false;
        }
        let mut state = self.park.lock();
        while !state.parked {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return false;
            }
            let (next, _) = self
                .park
                .changed
                .wait_timeout(state, std::time::Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner());
            state = next;
        }
        true
    }

    /// Makes the loop thread go round once (it reaches its seccomp
    /// checkpoint), without parking it.
    pub(crate) fn wake(&self) {
        let _ = self.pause.write(1);
    }

    /// Lets a paused loop run again.
    pub fn resume(&self) {
        let mut state = self.park.lock();
        state.requested = false;
        self.park.changed.notify_all();
    }
}

fn run(
    subscribers: Vec<Subscriber>,
    stopper: Stopper,
    parker: Parker,
    ready: mpsc::Sender<Result<(), EventLoopError>>,
    filters: &ThreadFilters,
) {
    let mut manager = match EventManager::<Subscriber>::new() {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(EventLoopError::Manager(e)));
            return;
        }
    };
    let stop = stopper.stop.clone();
    manager.add_subscriber(Arc::new(Mutex::new(stopper)));
    manager.add_subscriber(Arc::new(Mutex::new(parker)));
    for s in subscribers {
        manager.add_subscriber(s);
    }
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Acquire) {
        if let Err(e) = manager.run() {
            log::error!("device event loop stopped: {e:?}");
            return;
        }
        if let Some(v) = seccomp::checkpoint(ThreadKind::DeviceIo) {
            log::error!("device event loop stopped: {v}, which its seccomp filter forbids");
            filters.check();
            return;
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.resume();
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

    #[test]
    fn a_paused_loop_runs_nothing_until_resumed() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let counter = Counter {
            evt: evt.try_clone().unwrap(),
            seen: tx,
        };
        let lp = EventLoop::start(vec![Arc::new(Mutex::new(counter))]).unwrap();
        assert!(lp.pause());
        evt.write(2).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        lp.resume();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
        // Pausing twice in a row, and dropping while paused, are fine.
        assert!(lp.pause());
        assert!(lp.pause());
        drop(lp);
    }
}
