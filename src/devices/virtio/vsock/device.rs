//! The virtio-vsock device model: features, config space, activation and
//! the rx, tx and event queues.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::backend::{Backend, Limits, NextRx};
use super::config::{VsockConfig, VsockConfigError};
use super::handoff::{self, Connector, Handoff};
use super::packet::{self, op, Header, EVENT_TRANSPORT_RESET, HDR_LEN};
use super::unix::{connect_nonblocking, set_nonblocking};
use super::warn_limit::limited_warn;
use super::{EVQ, HOST_CID, MAX_PKT_LEN, QUEUE_SIZE, RXQ, TXQ};
use crate::devices::virtio::{
    device_type, ActivateError, Interrupt, Queue, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

/// The device's three queues, all of the same maximum size.
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// The most rx buffers one pass fills (plus one visit per connection).
const RX_BUFFER_ROUNDS: usize = 2 * QUEUE_SIZE as usize;
/// The timer never fires sooner than this after it is set (a zero
/// duration would disarm it).
const MIN_TIMER: Duration = Duration::from_millis(1);

/// Errors from creating or driving the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0, 1 and 2 are reserved (2 is the host) and `u32::MAX` means
    /// "any"; larger values do not fit the guest's 32-bit CIDs.
    #[error("guest CID {0} is reserved or out of range: use a CID from 3 to 4294967294")]
    InvalidCid(u64),
    /// The socket path exists and nothing listens on it.
    #[error(
        "vsock socket path {} already exists (a stale socket from an earlier run?): remove it and retry",
        .0.display()
    )]
    StaleSocket(PathBuf),
    /// Another process listens on the socket path.
    #[error(
        "vsock socket path {} is in use by another listening process: stop it or choose another path",
        .0.display()
    )]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error(
        "vsock socket path {} exists and is not a socket: choose another path",
        .0.display()
    )]
    NotASocket(PathBuf),
    /// The listener could not be created.
    #[error(
        "cannot listen on vsock socket path {}: check that its directory exists and is writable",
        path.display()
    )]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A listener handed in has no filesystem path (it is unnamed or in
    /// the abstract namespace).
    #[error(
        "the vsock listener has no filesystem path (unnamed or abstract socket): bind it to a \
         path, which guest connections to host port P extend to <path>_P"
    )]
    UnnamedListener,
    /// An eventfd, the timer or a socket option could not be set up.
    #[error("could not set up the vsock device's file descriptors (out of fds?)")]
    Io(#[source] io::Error),
    /// The [`VsockConfig`] is out of range.
    #[error(transparent)]
    Config(#[from] VsockConfigError),
    /// The guest driver has not started the device (or reset it).
    #[error("the vsock device is not active: wait until the guest driver has started it")]
    NotActivated,
    /// The device hit a malformed request and waits for the driver to
    /// reset it.
    #[error("the vsock device needs a reset by the guest driver before it can be used")]
    NeedsReset,
    /// The event queue has no buffer for the event.
    #[error("the guest gave the vsock event queue no buffer: retry once its driver is up")]
    NoEventBuffer,
    /// The event queue's buffer is unusable (the device is now marked as
    /// needing a reset).
    #[error("the guest's vsock event buffer is malformed; the device now needs a reset")]
    BadEventBuffer,
}

/// The queues and memory of an activated device.
#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
}

/// A virtio-vsock device whose host side is a Unix socket listener (see the
/// module documentation for the protocol host processes speak).
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// (st_dev, st_ino) of the socket file this device created, so that
    /// dropping the device removes that file and no other; `None` for a
    /// listener handed in, whose path belongs to its owner.
    socket_id: Option<(u64, u64)>,
    /// Connections handed in by [`Connector`]s, and the sending end the
    /// connectors clone.
    handoffs: Receiver<Handoff>,
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    handoff_tx: Sender<Handoff>,
    queue_events: Vec<EventFd>,
    /// Written when connections were closed off the event-loop thread (reset,
    /// transport reset) so that the loop unregisters and closes them.
    /// Shared with the device's connectors (no second fd).
    pub(super) wake: Arc<EventFd>,
    /// Wakes the loop at the backend's earliest deadline (non-blocking).
    pub(super) timer: TimerFd,
    /// The deadline the timer is set for.
    pub(super) timer_at: Option<Instant>,
    config: VsockConfig,
    acked_features: u64,
    active: Option<Active>,
    broken: bool,
    pub(super) backend: Backend,
    /// One packet's worth of bytes between a host stream and guest memory.
    scratch: Vec<u8>,
    /// Guest transmission waits for RST replies to drain.
    tx_stalled: bool,
    /// A transport reset went to the guest and the guest has not kicked
    /// the event queue since: it has not dropped its old connections yet,
    /// so nothing goes to rx (a REQUEST the guest accepted before it
    /// handled the reset would be reset with the old ones).
    rx_held: bool,
    /// The event queue's available index when the reset went out: the
    /// guest has handled the reset once it put a buffer back (a kick alone
    /// is not enough: activation kicks every queue once).
    held_avail: Option<u16>,
}

fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(path)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            // Someone listens if a connect succeeds or finds a full backlog.
            let live = || match connect_nonblocking(path) {
                Ok(_) => true,
                Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            };
            if !is_socket {
                Err(VsockError::NotASocket(path.to_path_buf()))
            } else if live() {
                Err(VsockError::SocketInUse(path.to_path_buf()))
            } else {
                Err(VsockError::StaleSocket(path.to_path_buf()))
            }
        }
        Err(source) => Err(VsockError::Bind {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn check_cid(guest_cid: u64) -> Result<(), VsockError> {
    if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
        return Err(VsockError::InvalidCid(guest_cid));
    }
    Ok(())
}

/// The filesystem path `listener` is bound to: `Err(None)` when it has
/// none (unnamed, abstract), `Err(Some(_))` when it cannot be asked.
pub(crate) fn listener_path(listener: &UnixListener) -> Result<PathBuf, Option<io::Error>> {
    let addr = listener.local_addr().map_err(Some)?;
    addr.as_pathname().map(Path::to_path_buf).ok_or(None)
}

/// The device's own fds: queue eventfds, the wake-up eventfd, the timer.
struct Fds {
    queue_events: Vec<EventFd>,
    wake: EventFd,
    timer: TimerFd,
}

impl Fds {
    fn new() -> Result<Self, VsockError> {
        let timer = TimerFd::new().map_err(|e| VsockError::Io(e.into()))?;
        set_nonblocking(&timer).map_err(VsockError::Io)?;
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        let queue_events = (0..QUEUE_SIZES.len())
            .map(|_| eventfd())
            .collect::<io::Result<Vec<_>>>()
            .map_err(VsockError::Io)?;
        Ok(Self {
            queue_events,
            wake: eventfd().map_err(VsockError::Io)?,
            timer,
        })
    }
}

/// Takes the next available chain off `queue`; `Err` when the guest's
/// avail ring is corrupt.
fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, ()> {
    queue.iter(mem).map(|mut it| it.next()).map_err(|_| ())
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: usize) -> Result<(), ()> {
    let len = u32::try_from(len).map_err(|_| ())?;
    queue.add_used(mem, head, len).map_err(|_| ())
}

/// What a tx pass did.
#[derive(Debug, Default)]
struct TxPass {
    used: bool,
    /// A full queue's worth was processed; more may wait.
    more: bool,
    /// Stopped because too many RST replies wait for rx buffers.
    stalled: bool,
}

impl Vsock {
    /// A vsock device for a guest with CID `guest_cid`, listening for host
    /// processes on the Unix socket `uds_path` (which must not exist), with
    /// the default [`VsockConfig`]: the guest may connect to no host port.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        Self::with_config(guest_cid, uds_path, VsockConfig::default())
    }

    /// A vsock device as [`new`](Self::new) makes, with `config`: guest
    /// connections to an allowed host port `P` go to `<uds_path>_P`.
    pub fn with_config(
        guest_cid: u64,
        uds_path: &Path,
        config: VsockConfig,
    ) -> Result<Vsock, VsockError> {
        check_cid(guest_cid)?;
        config.validate()?;
        // Made before the listener so that a failure leaves no socket file.
        let fds = Fds::new()?;
        let listener = bind_listener(uds_path)?;
        let socket_id = std::fs::symlink_metadata(uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let mut dev = Self::assemble(guest_cid, listener, uds_path, config, fds);
        dev.socket_id = socket_id;
        dev.backend_listener_nonblocking()?;
        Ok(dev)
    }

    /// A vsock device whose host side is `listener`, bound already by its
    /// owner (who keeps the path: the device never removes it). Host
    /// processes connect to the listener's path as to a
    /// [`new`](Self::new) device's; guest connections to an allowed host
    /// port `P` go to `<path>_P`. Connections that wait in the listener's
    /// backlog when the device starts are served, so a listener (a
    /// `try_clone` of it) can go from one VM to the next.
    ///
    /// The listener is made non-blocking: the flag belongs to the socket,
    /// so the owner's copies become non-blocking too. The owner must not
    /// accept on it while a device uses it.
    pub fn with_listener(
        guest_cid: u64,
        listener: UnixListener,
        config: VsockConfig,
    ) -> Result<Vsock, VsockError> {
        check_cid(guest_cid)?;
        config.validate()?;
        let path = listener_path(&listener).map_err(|e| match e {
            Some(e) => VsockError::Io(e),
            None => VsockError::UnnamedListener,
        })?;
        let fds = Fds::new()?;
        let dev = Self::assemble(guest_cid, listener, &path, config, fds);
        dev.backend_listener_nonblocking()?;
        Ok(dev)
    }

    fn assemble(
        guest_cid: u64,
        listener: UnixListener,
        uds_path: &Path,
        config: VsockConfig,
        fds: Fds,
    ) -> Vsock {
        let (handoff_tx, handoffs) = mpsc::channel();
        Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            socket_id: None,
            handoffs,
            handoff_tx,
            queue_events: fds.queue_events,
            wake: Arc::new(fds.wake),
            timer: fds.timer,
            timer_at: None,
            acked_features: 0,
            active: None,
            broken: false,
            backend: Backend::new(listener, uds_path, guest_cid, Limits::new(&config)),
            config,
            scratch: vec![0; MAX_PKT_LEN],
            tx_stalled: false,
            rx_held: false,
            held_avail: None,
        }
    }

    fn backend_listener_nonblocking(&self) -> Result<(), VsockError> {
        self.backend
            .listener()
            .set_nonblocking(true)
            .map_err(VsockError::Io)
    }

    /// A handle that hands connections to this device from any thread
    /// (see `handoff`).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) fn connector(&self) -> Connector {
        Connector::new(
            self.handoff_tx.clone(),
            self.wake.clone(),
            &self.backend.limits,
        )
    }

    /// Takes the connections handed in since the last look.
    pub(super) fn take_handoffs(&mut self) {
        handoff::drain(&self.handoffs, &mut self.backend);
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The socket path host processes connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The device's configuration.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Closes the connections whose deadline passed.
    pub(super) fn expire(&mut self) {
        self.timer_at = None;
        self.backend.expire(Instant::now());
    }

    /// Sets the timer for the backend's earliest deadline.
    pub(super) fn arm_timer(&mut self) {
        let next = self.backend.next_deadline();
        if next == self.timer_at {
            return;
        }
        let result = match next {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now()).max(MIN_TIMER);
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        match result {
            Ok(()) => self.timer_at = next,
            Err(e) => limited_warn!(
                self.backend.warn,
                "vsock: cannot set the timer ({e}); timeouts wait for the next event"
            ),
        }
    }

    /// Puts a `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` event on the event
    /// queue (after a snapshot restore: the guest then drops every
    /// connection) and closes every host-side connection to match.
    pub fn send_transport_reset(&mut self) -> Result<(), VsockError> {
        if self.broken {
            return Err(VsockError::NeedsReset);
        }
        let active = self.active.as_mut().ok_or(VsockError::NotActivated)?;
        let mem = &active.mem;
        let queue = &mut active.queues[EVQ];
        let chain = match pop(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => return Err(VsockError::NoEventBuffer),
            Err(()) => {
                self.fail("corrupt event queue");
                return Err(VsockError::BadEventBuffer);
            }
        };
        let head = chain.head_index();
        let written = chain
            .writer(mem)
            .ok()
            .and_then(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).ok());
        let used = if written.is_some() { 4 } else { 0 };
        let added = add_used(queue, mem, head, used);
        if queue.needs_notification(mem).unwrap_or(true) {
            let _ = active.interrupt.signal_used_queue();
        }
        let avail = queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .ok()
            .map(|i| i.0);
        // Ask for the kick that says the guest put the buffer back: with
        // VIRTIO_F_EVENT_IDX the guest kicks only when its new available
        // index passes the avail_event we publish. Other event buffers are
        // still unused, so it is the index the guest has reached now, not
        // our next one (which the guest passed long ago).
        if let (true, Some(now)) = (queue.event_idx_enabled(), avail) {
            // The used ring was checked to lie in guest memory, its
            // trailing avail_event included, when the queue was activated.
            let offset = 4 + 8 * u64::from(queue.size());
            if let Some(at) = queue.used_ring().checked_add(offset) {
                let _ = vm_memory::Bytes::store(
                    mem,
                    now.to_le(),
                    vm_memory::GuestAddress(at),
                    std::sync::atomic::Ordering::SeqCst,
                );
            }
        }
        if written.is_none() || added.is_err() {
            self.fail("event buffer outside guest memory or smaller than an event");
            return Err(VsockError::BadEventBuffer);
        }
        self.backend.close_all();
        // Linux handles the event, refills the buffer and kicks the queue.
        self.rx_held = true;
        self.held_avail = avail;
        let _ = self.wake.write(1);
        Ok(())
    }

    /// The guest kicked the event queue: it has handled the events it was
    /// given (a transport reset among them), so rx may go on.
    pub(super) fn event_queue_kicked(&mut self) {
        if !self.rx_held {
            return;
        }
        // Only a buffer put back counts: the kick activation gives every
        // queue (a restore activates, then resets) must not end the hold.
        let refilled = match (&self.active, self.held_avail) {
            (Some(active), Some(then)) => active.queues[EVQ]
                .avail_idx(&active.mem, std::sync::atomic::Ordering::Acquire)
                .map_or(true, |now| now.0 != then),
            _ => true,
        };
        if refilled {
            self.rx_held = false;
            self.held_avail = None;
        }
    }

    /// Marks the device as needing a reset and tells the driver.
    fn fail(&mut self, why: &str) {
        if self.broken {
            return;
        }
        limited_warn!(
            self.backend.warn,
            "vsock: {why}; the device needs a reset by the guest driver"
        );
        self.broken = true;
        if let Some(active) = &self.active {
            let _ = active.interrupt.signal_config_change();
        }
    }

    /// Runs the queues: fills rx buffers with what the guest is owed, and
    /// (when `tx_kick` or a stalled transmission) processes guest packets.
    pub(super) fn run_queues(&mut self, tx_kick: bool) {
        if self.broken || self.active.is_none() {
            return;
        }
        let mut used = [false; 2];
        let result = self.queue_pass(tx_kick, &mut used);
        if result.is_err() {
            // Whatever was used before the failure is still announced.
            used = [true; 2];
        }
        if let Some(active) = self.active.as_mut() {
            let notify = used.iter().enumerate().any(|(q, &u)| {
                u && active.queues[q]
                    .needs_notification(&active.mem)
                    .unwrap_or(true)
            });
            if notify {
                let _ = active.interrupt.signal_used_queue();
            }
        }
        match result {
            // The rx pass stopped at its bound: come back for the rest.
            Ok(true) => {
                let _ = self.queue_events[RXQ].write(1);
            }
            Ok(false) => {}
            Err(why) => self.fail(why),
        }
    }

    /// One pass over rx, then tx and rx again. Returns whether rx has more
    /// to deliver than the pass's bound allowed.
    fn queue_pass(&mut self, tx_kick: bool, used: &mut [bool; 2]) -> Result<bool, &'static str> {
        if self.rx_held {
            // The refill may come without a kick of its own (or before
            // ours is read): any pass looks.
            self.event_queue_kicked();
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(false);
        };
        let hold = self.rx_held;
        let rx = |active: &mut Active, backend: &mut Backend, scratch: &mut Vec<u8>| {
            if hold {
                return Ok((false, false));
            }
            process_rx(active, backend, scratch)
        };
        let (rx_used, mut rx_more) = rx(active, &mut self.backend, &mut self.scratch)?;
        used[RXQ] = rx_used;
        if tx_kick || self.tx_stalled {
            let tx = process_tx(active, &mut self.backend, &mut self.scratch, self.guest_cid);
            let tx = tx.inspect_err(|_| {
                // A failed pass may have used buffers before failing.
                used[TXQ] = true;
            })?;
            used[TXQ] = tx.used;
            self.tx_stalled = tx.stalled;
            if tx.more {
                // Let other fds have the loop; come back for the rest.
                let _ = self.queue_events[TXQ].write(1);
            }
            let (rx_used, more) = rx(active, &mut self.backend, &mut self.scratch)?;
            used[RXQ] |= rx_used;
            rx_more = more;
        }
        Ok(rx_more)
    }

    /// The device's open connections.
    #[cfg(test)]
    pub(super) fn connection_count(&self) -> usize {
        self.backend.connection_count()
    }
}

/// Fills rx buffers. Returns whether any was used and whether the pass
/// stopped at its bound with more to do.
fn process_rx(
    active: &mut Active,
    backend: &mut Backend,
    scratch: &mut [u8],
) -> Result<(bool, bool), &'static str> {
    let mem = &active.mem;
    let queue = &mut active.queues[RXQ];
    let mut used = false;
    let rounds = RX_BUFFER_ROUNDS + backend.limits.max_connections.min(1 << 20);
    for _ in 0..rounds {
        if !backend.has_pending_rx() {
            return Ok((used, false));
        }
        let Some(chain) = pop(queue, mem).map_err(|()| "corrupt rx queue")? else {
            return Ok((used, false));
        };
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            Ok(w) if w.available_bytes() >= HDR_LEN => w,
            _ => {
                let _ = add_used(queue, mem, head, 0);
                return Err("rx buffer outside guest memory or smaller than a packet header");
            }
        };
        let cap = (writer.available_bytes() - HDR_LEN).min(MAX_PKT_LEN);
        match backend.next_rx(cap, scratch) {
            NextRx::Idle => {
                queue.go_to_previous_position();
                return Ok((used, false));
            }
            NextRx::Skip => queue.go_to_previous_position(),
            NextRx::Packet(hdr, n) => {
                let wrote = writer
                    .write_all(&hdr.to_bytes())
                    .and_then(|()| writer.write_all(&scratch[..n]));
                if wrote.is_err() {
                    let _ = add_used(queue, mem, head, 0);
                    return Err("could not write an rx buffer");
                }
                add_used(queue, mem, head, HDR_LEN + n).map_err(|()| "corrupt rx used ring")?;
                used = true;
            }
        }
    }
    Ok((used, backend.has_pending_rx()))
}

/// Processes guest packets, at most a queue's worth.
fn process_tx(
    active: &mut Active,
    backend: &mut Backend,
    scratch: &mut [u8],
    guest_cid: u64,
) -> Result<TxPass, &'static str> {
    let mem = &active.mem;
    let queue = &mut active.queues[TXQ];
    let mut pass = TxPass::default();
    for _ in 0..QUEUE_SIZE {
        if backend.rst_backlog_full() {
            pass.stalled = true;
            return Ok(pass);
        }
        let Some(chain) = pop(queue, mem).map_err(|()| "corrupt tx queue")? else {
            return Ok(pass);
        };
        let head = chain.head_index();
        let result = tx_packet(chain, mem, backend, scratch, guest_cid);
        add_used(queue, mem, head, 0).map_err(|()| "corrupt tx used ring")?;
        pass.used = true;
        result?;
    }
    pass.more = true;
    Ok(pass)
}

/// Reads, checks and hands over one guest packet.
fn tx_packet(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    backend: &mut Backend,
    scratch: &mut [u8],
    guest_cid: u64,
) -> Result<(), &'static str> {
    let mut reader = chain
        .reader(mem)
        .map_err(|_| "tx packet outside guest memory")?;
    let mut raw = [0u8; HDR_LEN];
    reader
        .read_exact(&mut raw)
        .map_err(|_| "tx packet shorter than its header (or not device-readable)")?;
    let hdr = Header::from_bytes(&raw);
    if let Err(why) = packet::validate(&hdr, reader.available_bytes(), guest_cid) {
        log::debug!("vsock: refusing guest packet ({why:?}): {hdr:?}");
        backend.reject(&hdr);
        return Ok(());
    }
    let payload = if hdr.op == op::RW {
        // validate() bounded len by MAX_PKT_LEN, the scratch buffer's size.
        let len = usize::try_from(hdr.len).map_err(|_| "tx packet too long")?;
        let data = scratch.get_mut(..len).ok_or("tx packet too long")?;
        reader
            .read_exact(data)
            .map_err(|_| "could not read a tx packet's data")?;
        &scratch[..len]
    } else {
        &[][..]
    };
    backend.on_guest_packet(&hdr, payload);
    Ok(())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.device_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        super::super::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "vsock: ignoring a {}-byte write to read-only config offset {offset}",
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
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::BadQueue(queues.len().min(QUEUE_SIZES.len())));
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        self.broken = false;
        self.tx_stalled = false;
        self.rx_held = false;
        // No I/O on the vCPU thread: let the event loop look at the queues.
        for evt in &self.queue_events {
            let _ = evt.write(1);
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn restored(&mut self) {
        // The host side of every connection is gone: tell the guest, as the
        // spec asks after a migration or restore.
        if let Err(e) = self.send_transport_reset() {
            log::warn!("vsock: could not send the transport reset after a restore: {e}");
        }
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(Queue::state).collect())
            .unwrap_or_default()
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        self.tx_stalled = false;
        self.rx_held = false;
        self.acked_features = 0;
        self.backend.close_all();
        // The event loop unregisters and closes the streams.
        let _ = self.wake.write(1);
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Remove the socket file, unless someone replaced it meanwhile.
        let current = std::fs::symlink_metadata(&self.uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_some() && current == self.socket_id {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}
