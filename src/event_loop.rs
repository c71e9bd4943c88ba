//! The VM's device I/O thread: one event-manager loop for every device's
//! queue notifications and backend file descriptors. vCPU threads never do
//! device I/O that blocks; they only signal eventfds this loop waits on.
//!
//! [`EventLoop::pause`] parks the thread between two passes, so that no
//! device touches guest memory or its own state while a snapshot is taken.
//!
//! A device must take an fd off the loop (`EventOps::remove`) before it
//! closes it: event-manager keeps its records by fd number.
//!
//! **Failures are never silent.** If event-manager fails or a device panics
//! on the loop thread, the loop ends and records why ([`IoFailure`]); the
//! VM then reports it from `wait()` and `pause()` instead of running on with
//! dead devices. The loop also records which device it is inside, so a
//! pause that times out can name the device that did not stop.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

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

/// Why the device I/O thread ended while the VM still needed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoFailure {
    /// event-manager's epoll wait or dispatch failed.
    #[error("the device event loop failed: {0}")]
    Manager(String),
    /// A device panicked while handling an event (a dormouse bug).
    #[error("device {device} panicked on the I/O thread: {message}; please report this as a dormouse bug")]
    DevicePanicked {
        /// The device the loop was inside.
        device: String,
        /// The panic's message.
        message: String,
    },
}

/// Why [`EventLoop::pause_within`] could not park the loop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    /// The loop thread had ended.
    #[error(transparent)]
    Failed(#[from] IoFailure),
    /// The loop did not reach a point between two passes in time.
    #[error("the device I/O thread did not stop in time (busy in {})", .device.as_deref().unwrap_or("the loop itself"))]
    Stuck {
        /// The device the loop was inside, if it was inside one.
        device: Option<String>,
    },
}

/// No device is running on the loop thread.
const IDLE: usize = usize::MAX;

/// What the loop thread is doing, shared with its owner.
#[derive(Debug)]
struct Health {
    /// The names of the subscribers, by index.
    names: Vec<String>,
    /// The index of the subscriber inside `process`, or [`IDLE`].
    busy: AtomicUsize,
    /// Why the loop ended early, once it has.
    failure: Mutex<Option<IoFailure>>,
}

impl Health {
    fn busy_device(&self) -> Option<String> {
        self.names.get(self.busy.load(Ordering::Acquire)).cloned()
    }

    fn failure(&self) -> Option<IoFailure> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fail(&self, failure: IoFailure) {
        log::error!("{failure}");
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(failure);
    }
}

/// A subscriber that records, while it runs, that the loop is inside it.
struct Tracked {
    index: usize,
    inner: Subscriber,
    health: Arc<Health>,
}

impl MutEventSubscriber for Tracked {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.health.busy.store(self.index, Ordering::Release);
        // A panic unwinds out of here with `busy` still naming this device:
        // that is how the failure report names it.
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .process(events, ops);
        self.health.busy.store(IDLE, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .init(ops);
    }
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
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

    /// On the loop thread: if a pause is asked, parks until it is lifted.
    fn park_while_requested(&self) {
        let mut state = self.lock();
        if !state.requested {
            return;
        }
        state.parked = true;
        self.changed.notify_all();
        while state.requested {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked = false;
        self.changed.notify_all();
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
        self.park.park_while_requested();
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
    health: Arc<Health>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the thread and registers every subscriber (each one's `init`
    /// runs on the calling thread, before this returns). Subscribers are named
    /// by their position ("subscriber 0", ...); see
    /// [`start_named`](Self::start_named). The thread has no seccomp
    /// filter: a VM's loop is started with its filters.
    pub fn start(subscribers: Vec<Subscriber>) -> Result<Self, EventLoopError> {
        Self::start_named(
            subscribers
                .into_iter()
                .enumerate()
                .map(|(i, s)| (format!("subscriber {i}"), s))
                .collect(),
        )
    }

    /// Like [`start`](Self::start), with a name for each subscriber that
    /// failure and pause reports use.
    pub fn start_named(subscribers: Vec<(String, Subscriber)>) -> Result<Self, EventLoopError> {
        let filters = ThreadFilters::new(&seccomp::SeccompPolicy::Disabled)?;
        Self::start_filtered(subscribers, Arc::new(filters), false)
    }

    /// Like [`start_named`](Self::start_named); the thread installs the
    /// device I/O filter of `filters` on itself first. If `paused`, the
    /// loop starts paused: it parks before it runs any subscriber, until
    /// [`resume`](Self::resume), and this does not wait for it to get
    /// there.
    pub(crate) fn start_filtered(
        subscribers: Vec<(String, Subscriber)>,
        filters: Arc<ThreadFilters>,
        paused: bool,
    ) -> Result<Self, EventLoopError> {
        let health = Arc::new(Health {
            names: subscribers.iter().map(|(n, _)| n.clone()).collect(),
            busy: AtomicUsize::new(IDLE),
            failure: Mutex::new(None),
        });
        let subscribers: Vec<Subscriber> = subscribers
            .into_iter()
            .enumerate()
            .map(|(index, (_, inner))| {
                Arc::new(Mutex::new(Tracked {
                    index,
                    inner,
                    health: health.clone(),
                })) as Subscriber
            })
            .collect();
        let stop =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(EventLoopError::Io)?;
        let stopper = Stopper {
            evt: stop.try_clone().map_err(EventLoopError::Io)?,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let pause =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(EventLoopError::Io)?;
        let park = Arc::new(Park::default());
        park.lock().requested = paused;
        let first_park = park.clone();
        let parker = Parker {
            evt: pause.try_clone().map_err(EventLoopError::Io)?,
            park: park.clone(),
        };
        // Set up here, so start-up errors are this call's and nothing
        // waits for the new thread: each subscriber's `init` registers its
        // fds now.
        let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Manager)?;
        let stop_flag = stopper.stop.clone();
        manager.add_subscriber(Arc::new(Mutex::new(stopper)));
        manager.add_subscriber(Arc::new(Mutex::new(parker)));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let thread_health = health.clone();
        let thread = thread::Builder::new()
            .name("dormouse-io".into())
            .spawn(move || {
                let _seccomp = match filters.enter(ThreadKind::DeviceIo, None) {
                    Ok(guard) => guard,
                    Err(e) => {
                        thread_health.fail(IoFailure::Manager(format!(
                            "the device I/O thread could not install its seccomp filter: {e}"
                        )));
                        return;
                    }
                };
                run(manager, &stop_flag, &thread_health, &filters, &first_park)
            })
            .map_err(EventLoopError::Io)?;
        Ok(Self {
            stop,
            pause,
            park,
            health,
            thread: Some(thread),
        })
    }
}

impl EventLoop {
    /// Parks the loop thread between two passes and returns once it is
    /// parked: no device runs until [`resume`](Self::resume). Returns
    /// false if the thread is gone or did not park within 10 s.
    pub fn pause(&self) -> bool {
        self.pause_within(Duration::from_secs(10)).is_ok()
    }

    /// Parks the loop thread between two passes, waiting at most
    /// `deadline`. On [`PauseError::Stuck`] the request stays pending: the
    /// loop parks as soon as it can, and a later call (or
    /// [`resume`](Self::resume)) takes it from there.
    pub fn pause_within(&self, deadline: Duration) -> Result<(), PauseError> {
        let until = Instant::now() + deadline;
        let mut state = self.park.lock();
        state.requested = true;
        drop(state);
        if self.pause.write(1).is_err() {
            return Err(self.ended());
        }
        let mut state = self.park.lock();
        while !state.parked {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return Err(self.ended());
            }
            let now = Instant::now();
            if now >= until {
                return Err(PauseError::Stuck {
                    device: self.health.busy_device(),
                });
            }
            let (next, _) = self
                .park
                .changed
                .wait_timeout(state, (until - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner());
            state = next;
        }
        Ok(())
    }

    /// Why the loop thread ended, if it ended before it was stopped.
    pub fn failure(&self) -> Option<IoFailure> {
        self.health.failure()
    }

    /// The failure of a loop whose thread is gone.
    fn ended(&self) -> PauseError {
        PauseError::Failed(self.failure().unwrap_or_else(|| {
            IoFailure::Manager("the device I/O thread ended without a report".into())
        }))
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
    mut manager: EventManager<Subscriber>,
    stop: &AtomicBool,
    health: &Health,
    filters: &ThreadFilters,
    park: &Park,
) {
    // Started paused: no subscriber runs before the first resume.
    park.park_while_requested();
    while !stop.load(Ordering::Acquire) {
        match catch_unwind(AssertUnwindSafe(|| manager.run())) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                health.fail(IoFailure::Manager(format!("{e:?}")));
                return;
            }
            Err(payload) => {
                health.fail(IoFailure::DevicePanicked {
                    device: health
                        .busy_device()
                        .unwrap_or_else(|| "(none: the loop itself)".to_string()),
                    message: panic_message(payload.as_ref()),
                });
                return;
            }
        }
        if let Some(v) = seccomp::checkpoint(ThreadKind::DeviceIo) {
            log::error!("device event loop stopped: {v}, which its seccomp filter forbids");
            filters.check();
            return;
        }
    }
}

/// How long dropping a loop (or a VM) waits for its threads before leaving
/// stuck ones behind.
pub(crate) const DROP_GRACE: Duration = Duration::from_secs(5);

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.resume();
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let until = Instant::now() + DROP_GRACE;
            while !t.is_finished() && Instant::now() < until {
                thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                // Stuck inside a device: leave the thread behind rather than
                // hang the owner. It owns what it uses (the subscribers and
                // their fds, guest memory through its own handles), so
                // nothing it touches is freed under it.
                log::error!(
                    "the device I/O thread did not stop (busy in {}); leaving it behind",
                    self.health
                        .busy_device()
                        .unwrap_or_else(|| "the loop itself".into())
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
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
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
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
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
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

    /// Panics, or blocks until released, when its eventfd is written.
    struct Faulty {
        evt: EventFd,
        action: &'static str,
        release: Arc<(Mutex<bool>, Condvar)>,
    }

    impl MutEventSubscriber for Faulty {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            match self.action {
                "panic" => panic!("injected device bug"),
                _ => {
                    let (lock, cvar) = &*self.release;
                    let mut released = lock.lock().unwrap();
                    while !*released {
                        released = cvar.wait(released).unwrap();
                    }
                }
            }
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    fn faulty(action: &'static str) -> (EventFd, Arc<(Mutex<bool>, Condvar)>, EventLoop) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let dev = Faulty {
            evt: evt.try_clone().unwrap(),
            action,
            release: release.clone(),
        };
        let lp = EventLoop::start_named(vec![
            (
                "quiet".to_string(),
                Arc::new(Mutex::new(Counter {
                    evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    seen: mpsc::channel().0,
                })) as Subscriber,
            ),
            (
                "virtio-blk 0".to_string(),
                Arc::new(Mutex::new(dev)) as Subscriber,
            ),
        ])
        .unwrap();
        (evt, release, lp)
    }

    #[test]
    fn a_device_panic_ends_the_loop_with_a_report_naming_the_device() {
        let (evt, _release, lp) = faulty("panic");
        assert_eq!(lp.failure(), None);
        evt.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lp.failure().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let expected = IoFailure::DevicePanicked {
            device: "virtio-blk 0".into(),
            message: "injected device bug".into(),
        };
        assert_eq!(lp.failure(), Some(expected.clone()));
        assert_eq!(
            lp.pause_within(Duration::from_secs(5)),
            Err(PauseError::Failed(expected))
        );
    }

    #[test]
    fn a_pause_past_its_deadline_names_the_busy_device_and_completes_later() {
        let (evt, release, lp) = faulty("block");
        evt.write(1).unwrap();
        // Let the loop enter the device.
        let deadline = Instant::now() + Duration::from_secs(10);
        while lp.health.busy_device().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let started = Instant::now();
        assert_eq!(
            lp.pause_within(Duration::from_millis(200)),
            Err(PauseError::Stuck {
                device: Some("virtio-blk 0".into())
            })
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // Released, the device returns and the pending pause completes.
        *release.0.lock().unwrap() = true;
        release.1.notify_all();
        assert_eq!(lp.pause_within(Duration::from_secs(10)), Ok(()));
        assert_eq!(lp.failure(), None);
    }
}
