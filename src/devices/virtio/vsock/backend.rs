//! The host side: the listener, the connection table, what the guest is
//! owed next, and which fds the event loop watches.
//!
//! Nothing here touches the virtqueues: the device hands guest packets in
//! ([`Backend::on_guest_packet`], [`Backend::reject`]) and asks for the
//! next packet for the guest ([`Backend::next_rx`]). What the guest is owed
//! is bounded: each connection has flags (never a queue) and sits at most
//! once in `rx_ready`; replies to packets that belong to no connection go to
//! `rst_queue`, capped at [`RST_QUEUE_MAX`].
//!
//! Closing a connection moves it to `graveyard`; [`Backend::sync`], run at
//! the end of every event-loop pass, takes its stream off the event loop
//! before closing it (event-manager would otherwise keep the stale fd
//! number and refuse the next stream that gets it).
//!
//! Limits: a guest connection goes only to a host port the configuration
//! allows; the device holds at most `max_connections` connections, and
//! each takes one fd from the process-wide budget (`budget`). Deadlines
//! (a host `CONNECT` the guest does not answer, a closed connection still
//! draining) sit in a min-heap; the device's timer wakes the loop for the
//! earliest, and [`Backend::expire`] closes what is overdue.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;

use super::budget::{self, FdBudget, FdToken};
use super::config::{HostPorts, VsockConfig};
use super::connection::{ConnKey, Connection, Line, RxOutcome, Setup, State, Verdict};
use super::handoff::Handoff;
use super::packet::{op, Header};
use super::unix::connect_nonblocking;
use super::warn_limit::{limited_warn, WarnLimiter};
use super::{LOCAL_PORT_START, RST_QUEUE_SOFT_MAX};

/// The listener's token on the event loop.
pub(crate) const LISTENER_TOKEN: u32 = 4;
/// Connection keys (their streams' tokens) start here, above the device's
/// own tokens.
pub(crate) const FIRST_CONN_KEY: ConnKey = 16;
/// The most connections one listener event accepts (the listener stays
/// readable for the rest).
const ACCEPT_BATCH: usize = 32;

/// What the guest's next rx buffer gets.
#[derive(Debug)]
pub(crate) enum NextRx {
    /// Nothing is pending.
    Idle,
    /// A connection had nothing after all: ask again.
    Skip,
    /// A packet, with this many payload bytes in the scratch buffer.
    Packet(Header, usize),
}

/// The limits a backend enforces, from its [`VsockConfig`].
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) host_ports: HostPorts,
    pub(crate) max_connections: usize,
    /// Where this device's connections are counted (against
    /// `max_connections`), handed-in ones from the moment they are made.
    pub(crate) slots: Arc<FdBudget>,
    /// The fds all devices in the process may hold in connections.
    pub(crate) process_cap: usize,
    /// Where connection fds are counted.
    pub(crate) budget: Arc<FdBudget>,
    pub(crate) buf_alloc: u32,
    pub(crate) connect_timeout: Duration,
    pub(crate) drain_timeout: Duration,
}

impl Limits {
    /// The limits of a (validated) configuration, now, in this process.
    pub(crate) fn new(config: &VsockConfig) -> Self {
        Self {
            host_ports: config.host_ports.clone(),
            max_connections: config.effective_max_connections(),
            slots: Arc::new(FdBudget::new()),
            process_cap: budget::process_cap(budget::soft_nofile()),
            budget: budget::PROCESS.clone(),
            buf_alloc: config.buffer_size,
            connect_timeout: config.connect_timeout,
            drain_timeout: config.drain_timeout,
        }
    }
}

impl Limits {
    /// A place among the device's `max_connections` and one fd of the
    /// process's budget, or `None` when either is used up.
    pub(crate) fn admit(&self) -> Option<(FdToken, FdToken)> {
        let slot = self.slots.take(self.max_connections)?;
        let fd = self.budget.take(self.process_cap)?;
        Some((slot, fd))
    }
}

/// `now + d`, or the farthest representable instant (validated timeouts
/// are at most an hour, which never overflows a monotonic clock).
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or(now)
}

/// The listener and the connections.
#[derive(Debug)]
pub(crate) struct Backend {
    listener: UnixListener,
    uds_path: PathBuf,
    guest_cid: u64,
    pub(crate) limits: Limits,
    /// RST replies beyond this many are dropped: one per connection the
    /// device may kill, plus what stalls guest transmission.
    rst_queue_max: usize,
    /// Guest- and host-triggered warnings go through here.
    pub(crate) warn: WarnLimiter,
    /// (deadline, connection): the earliest first. An entry whose
    /// connection is gone or has another deadline by now is stale and
    /// skipped.
    deadlines: BinaryHeap<Reverse<(Instant, ConnKey)>>,
    conns: HashMap<ConnKey, Connection>,
    /// (local port, guest port) → connection.
    by_ports: HashMap<(u32, u32), ConnKey>,
    next_key: ConnKey,
    next_local_port: u32,
    rst_queue: VecDeque<Header>,
    rx_ready: VecDeque<ConnKey>,
    dirty: Vec<ConnKey>,
    graveyard: Vec<Connection>,
    listener_registered: bool,
    /// accept() failed (e.g. out of fds): the listener is off the event
    /// loop until a connection closes.
    listener_paused: bool,
}

/// Where a device starts handing out host-side ports: a random point in
/// [LOCAL_PORT_START, u32::MAX]. A device restored from a snapshot must not
/// reuse the ports its predecessor used: the guest may still hold sockets
/// for them until it has processed the transport reset, and would answer a
/// new REQUEST on the same port pair with RST.
fn first_local_port() -> u32 {
    let mut bytes = [0u8; 4];
    // Without randomness, fall back to the start of the range.
    let _ = crate::vm::host_random(&mut bytes);
    LOCAL_PORT_START + (u32::from_le_bytes(bytes) % (u32::MAX - LOCAL_PORT_START))
}

impl Backend {
    pub(crate) fn new(
        listener: UnixListener,
        uds_path: &Path,
        guest_cid: u64,
        limits: Limits,
    ) -> Self {
        Self {
            listener,
            uds_path: uds_path.to_path_buf(),
            guest_cid,
            rst_queue_max: RST_QUEUE_SOFT_MAX.saturating_add(limits.max_connections),
            limits,
            warn: WarnLimiter::default(),
            deadlines: BinaryHeap::new(),
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_key: FIRST_CONN_KEY,
            next_local_port: first_local_port(),
            rst_queue: VecDeque::new(),
            rx_ready: VecDeque::new(),
            dirty: Vec::new(),
            graveyard: Vec::new(),
            listener_registered: false,
            listener_paused: false,
        }
    }

    /// The listener host processes connect to.
    pub(crate) fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// How many connections are open.
    #[cfg(test)]
    pub(crate) fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether the guest is owed a packet.
    pub(crate) fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_ready.is_empty()
    }

    /// Whether guest transmission should wait for the guest to take the
    /// RST replies already queued.
    pub(crate) fn rst_backlog_full(&self) -> bool {
        self.rst_queue.len() >= RST_QUEUE_SOFT_MAX
    }

    fn alloc_key(&mut self) -> Option<ConnKey> {
        // At most `conns.len()` keys are taken, so this finds a free one.
        for _ in 0..=self.conns.len() {
            let key = self.next_key;
            self.next_key = key.checked_add(1).unwrap_or(FIRST_CONN_KEY);
            if !self.conns.contains_key(&key) {
                return Some(key);
            }
        }
        None
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        // At most `conns.len()` ports are taken, so this finds a free one.
        for _ in 0..=self.conns.len() {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(LOCAL_PORT_START);
            if !self
                .conns
                .values()
                .any(|c| c.has_ports() && c.local_port == port)
            {
                return Some(port);
            }
        }
        None
    }

    /// Notes that a connection changed: its interest is re-synced and it is
    /// queued for rx if it has something for the guest.
    fn touch(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key);
        }
        if !conn.in_rx_ready && conn.has_rx() {
            conn.in_rx_ready = true;
            self.rx_ready.push_back(key);
        }
    }

    fn insert(&mut self, conn: Connection) -> Option<ConnKey> {
        let key = self.alloc_key()?;
        if conn.has_ports() {
            self.by_ports.insert((conn.local_port, conn.peer_port), key);
        }
        let deadline = conn.deadline;
        self.conns.insert(key, conn);
        if let Some(at) = deadline {
            self.schedule(key, at);
        }
        self.touch(key);
        Some(key)
    }

    /// A place among the device's connections and the fd budget for one
    /// more, unless this device or the process holds as many as allowed.
    fn admit(&mut self) -> Option<(FdToken, FdToken)> {
        self.limits.admit()
    }

    /// What a new connection on `stream` is given, if it is admitted.
    fn setup(&mut self, stream: UnixStream, (slot, fd): (FdToken, FdToken)) -> Setup {
        Setup {
            stream,
            fd,
            slot,
            buf_alloc: self.limits.buf_alloc,
        }
    }

    /// Remembers that connection `key` has a deadline at `at`.
    fn schedule(&mut self, key: ConnKey, at: Instant) {
        self.deadlines.push(Reverse((at, key)));
        // Stale entries leave the heap when their time comes; if a churn
        // of short-lived connections piles them up, keep only live ones.
        let live_bound = 4 * self.conns.len().max(64);
        if self.deadlines.len() > live_bound {
            let conns = &self.conns;
            self.deadlines
                .retain(|Reverse((at, k))| conns.get(k).is_some_and(|c| c.deadline == Some(*at)));
        }
    }

    /// The earliest deadline (possibly of a connection that no longer
    /// has it: waking for nothing is harmless).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, _))| *at)
    }

    /// Closes every connection whose deadline passed by `now`: a host
    /// `CONNECT` the guest did not answer (the host stream closes without
    /// an `OK` line; the guest gets a RST if it was asked), or a drain that
    /// did not finish.
    pub(crate) fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((at, key))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(conn) = self.conns.get(&key) else {
                continue;
            };
            if conn.deadline != Some(at) {
                continue;
            }
            log::debug!(
                "vsock: closing the connection of host port {} and guest port {}: {}",
                conn.local_port,
                conn.peer_port,
                if conn.state == State::Draining {
                    "the host did not take the guest's last bytes in time"
                } else {
                    "the guest did not accept the host's CONNECT in time"
                }
            );
            self.kill(key, Verdict::Reset);
        }
    }

    fn push_rst(&mut self, hdr: Header) {
        if self.rst_queue.len() >= self.rst_queue_max {
            limited_warn!(
                self.warn,
                "vsock: dropping a RST for guest port {}: the guest takes no rx buffers",
                hdr.dst_port
            );
            return;
        }
        self.rst_queue.push_back(hdr);
    }

    /// Forgets `key`'s port pair, if it still names `key`.
    fn unmap_ports(&mut self, key: ConnKey, ports: (u32, u32)) {
        if self.by_ports.get(&ports) == Some(&key) {
            self.by_ports.remove(&ports);
        }
    }

    /// The guest closed connection `key` (its packet `hdr`): answer it
    /// with a RST if it expects one, and drain what waits for the host
    /// stream (bounded by the drain timeout) before closing it.
    fn close_from_guest(&mut self, key: ConnKey, rst: bool, hdr: &Header) {
        if rst {
            self.reply_rst(hdr);
        }
        let drain = self.limits.drain_timeout;
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if !conn.has_pending_write() || drain.is_zero() {
            self.kill(key, Verdict::Close);
            return;
        }
        let deadline = after(Instant::now(), drain);
        conn.start_draining(deadline);
        let ports = (conn.local_port, conn.peer_port);
        let queued = std::mem::take(&mut conn.in_rx_ready);
        if queued {
            self.rx_ready.retain(|&k| k != key);
        }
        self.unmap_ports(key, ports);
        self.schedule(key, deadline);
        self.touch(key);
    }

    /// Answers a guest packet with a RST (never a RST with a RST).
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op != op::RST {
            self.push_rst(hdr.rst_reply(self.guest_cid));
        }
    }

    /// Closes a connection; `Verdict::Reset` tells the guest (if it knows
    /// of the connection).
    fn kill(&mut self, key: ConnKey, how: Verdict) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if conn.has_ports() {
            self.unmap_ports(key, (conn.local_port, conn.peer_port));
        }
        if conn.in_rx_ready {
            self.rx_ready.retain(|&k| k != key);
        }
        if conn.dirty {
            self.dirty.retain(|&k| k != key);
        }
        if how == Verdict::Reset && conn.guest_knows() {
            let hdr = Header {
                src_port: conn.peer_port,
                dst_port: conn.local_port,
                ..Header::default()
            };
            self.push_rst(hdr.rst_reply(self.guest_cid));
        }
        self.graveyard.push(conn);
    }

    /// Closes every connection without telling the guest (device reset or
    /// transport reset) and forgets what the guest was owed.
    pub(crate) fn close_all(&mut self) {
        self.graveyard.extend(self.conns.drain().map(|(_, c)| c));
        self.by_ports.clear();
        self.rx_ready.clear();
        self.rst_queue.clear();
        self.deadlines.clear();
        self.dirty.clear();
        self.listener_paused = false;
    }

    /// Acts on a validated guest packet; `payload` is its data (RW only).
    pub(crate) fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        let Some(&key) = self.by_ports.get(&(hdr.dst_port, hdr.src_port)) else {
            if hdr.op == op::REQUEST {
                self.connect_to_host(hdr);
            } else {
                self.reply_rst(hdr);
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.on_guest_packet(hdr, payload) {
            Verdict::Keep => self.touch(key),
            Verdict::Close => self.kill(key, Verdict::Close),
            Verdict::Reset => {
                self.kill(key, Verdict::Close);
                self.reply_rst(hdr);
            }
            Verdict::Closing { rst } => self.close_from_guest(key, rst, hdr),
        }
    }

    /// Answers a guest packet that failed validation: a RST, and the
    /// connection it names (if the addresses are ours) is closed.
    pub(crate) fn reject(&mut self, hdr: &Header) {
        if hdr.src_cid == self.guest_cid && hdr.dst_cid == super::HOST_CID {
            if let Some(&key) = self.by_ports.get(&(hdr.dst_port, hdr.src_port)) {
                self.kill(key, Verdict::Close);
            }
        }
        self.reply_rst(hdr);
    }

    /// The Unix socket a guest connection to host port `port` goes to.
    fn host_port_path(&self, port: u32) -> PathBuf {
        let mut p = OsString::from(self.uds_path.as_os_str());
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    fn connect_to_host(&mut self, req: &Header) {
        if !self.limits.host_ports.allows(req.dst_port) {
            limited_warn!(
                self.warn,
                "vsock: refusing a guest connection to host port {}: the port is not allowed \
                 (see VsockConfig::host_ports)",
                req.dst_port
            );
            self.reply_rst(req);
            return;
        }
        let Some(fd) = self.admit() else {
            limited_warn!(
                self.warn,
                "vsock: refusing a guest connection to host port {}: {} connections are open \
                 ({} fds held by vsock devices in this process)",
                req.dst_port,
                self.conns.len(),
                self.limits.budget.held()
            );
            self.reply_rst(req);
            return;
        };
        let path = self.host_port_path(req.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let setup = self.setup(stream, fd);
                if self.insert(Connection::from_guest(setup, req)).is_none() {
                    self.reply_rst(req);
                }
            }
            Err(e) => {
                log::debug!("vsock: guest connection to {} refused: {e}", path.display());
                self.reply_rst(req);
            }
        }
    }

    /// Accepts host processes' connections on the listener.
    pub(crate) fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let Some(fd) = self.admit() else {
                        limited_warn!(
                            self.warn,
                            "vsock: refusing a host connection: {} connections are open \
                             ({} fds held by vsock devices in this process)",
                            self.conns.len(),
                            self.limits.budget.held()
                        );
                        continue;
                    };
                    if let Err(e) = stream.set_nonblocking(true) {
                        limited_warn!(
                            self.warn,
                            "vsock: cannot make a host connection non-blocking: {e}"
                        );
                        continue;
                    }
                    let deadline = after(Instant::now(), self.limits.connect_timeout);
                    let setup = self.setup(stream, fd);
                    self.insert(Connection::from_host(setup, deadline));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    limited_warn!(
                        self.warn,
                        "vsock: accept failed ({e}); new host connections wait until one closes"
                    );
                    self.listener_paused = true;
                    break;
                }
            }
        }
    }

    /// Takes a connection the embedder handed in (already admitted): the
    /// guest is asked to accept it on `handoff.port`, as for a `CONNECT`
    /// line, within the connect timeout counted from now.
    pub(crate) fn hand_in(&mut self, handoff: Handoff) {
        let Handoff {
            port,
            stream,
            slot,
            fd,
        } = handoff;
        let Some(local_port) = self.alloc_local_port() else {
            // Dropping the stream tells the embedder's end (EOF).
            limited_warn!(
                self.warn,
                "vsock: no host port left for a handed-in connection"
            );
            return;
        };
        let deadline = after(Instant::now(), self.limits.connect_timeout);
        let setup = self.setup(stream, (slot, fd));
        self.insert(Connection::handed_in(setup, local_port, port, deadline));
    }

    /// Acts on an event-loop event for connection `key`'s stream.
    pub(crate) fn on_host_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if !matches!(conn.state, State::AwaitingConnectLine { .. }) {
            match conn.on_host_event(set) {
                Verdict::Keep => self.touch(key),
                how => self.kill(key, how),
            }
            return;
        }
        match conn.read_connect_line() {
            Line::Incomplete => {}
            Line::Invalid => self.kill(key, Verdict::Close),
            Line::Port(peer_port) => {
                let Some(local_port) = self.alloc_local_port() else {
                    self.kill(key, Verdict::Close);
                    return;
                };
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.start_local_init(local_port, peer_port);
                    self.by_ports.insert((local_port, peer_port), key);
                    self.touch(key);
                }
            }
        }
    }

    /// The next packet for the guest, given an rx buffer with room for
    /// `cap` payload bytes.
    pub(crate) fn next_rx(&mut self, cap: usize, scratch: &mut [u8]) -> NextRx {
        if let Some(hdr) = self.rst_queue.pop_front() {
            return NextRx::Packet(hdr, 0);
        }
        let Some(key) = self.rx_ready.pop_front() else {
            return NextRx::Idle;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return NextRx::Skip;
        };
        conn.in_rx_ready = false;
        match conn.next_rx(self.guest_cid, cap, scratch) {
            RxOutcome::Packet(hdr, n) => {
                // Back of the queue if it has more: connections take turns.
                self.touch(key);
                NextRx::Packet(hdr, n)
            }
            RxOutcome::Nothing => {
                self.touch(key);
                NextRx::Skip
            }
            RxOutcome::Kill => {
                self.kill(key, Verdict::Reset);
                NextRx::Skip
            }
        }
    }

    /// Brings the event loop in line: closed streams leave it, changed
    /// connections get the events they now need, the listener is watched
    /// unless paused.
    pub(crate) fn sync(&mut self, ops: &mut EventOps) {
        self.bury(ops);
        for key in std::mem::take(&mut self.dirty) {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.dirty = false;
            let want = conn.interest();
            let result = match (conn.registered, want) {
                (None, None) => Ok(()),
                (Some(old), None) => ops.remove(Events::with_data(&conn.stream, key, old)),
                (None, Some(set)) => ops.add(Events::with_data(&conn.stream, key, set)),
                (Some(old), Some(set)) if old != set => {
                    ops.modify(Events::with_data(&conn.stream, key, set))
                }
                (Some(_), Some(_)) => Ok(()),
            };
            match result {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    limited_warn!(
                        self.warn,
                        "vsock: cannot watch a connection's stream ({e:?}): closing it"
                    );
                    self.kill(key, Verdict::Reset);
                }
            }
        }
        self.bury(ops);
        let want_listener = !self.listener_paused;
        if want_listener != self.listener_registered {
            let ev = Events::with_data(&self.listener, LISTENER_TOKEN, EventSet::IN);
            let result = if want_listener {
                ops.add(ev)
            } else {
                ops.remove(ev)
            };
            match result {
                Ok(()) => self.listener_registered = want_listener,
                Err(e) => limited_warn!(self.warn, "vsock: cannot (un)watch the listener: {e:?}"),
            }
        }
    }

    fn bury(&mut self, ops: &mut EventOps) {
        for conn in self.graveyard.drain(..) {
            if let Some(set) = conn.registered {
                if let Err(e) = ops.remove(Events::with_data(&conn.stream, 0, set)) {
                    limited_warn!(
                        self.warn,
                        "vsock: cannot unwatch a closed connection: {e:?}"
                    );
                }
            }
            // A connection closed: a paused listener may accept again.
            self.listener_paused = false;
        }
    }

    /// The graveyard's size (streams waiting for the event loop to close
    /// them).
    #[cfg(test)]
    pub(crate) fn graveyard_len(&self) -> usize {
        self.graveyard.len()
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn each_device_starts_its_host_ports_somewhere_else() {
        let starts: std::collections::HashSet<u32> = (0..8).map(|_| first_local_port()).collect();
        assert!(starts.iter().all(|&p| p >= LOCAL_PORT_START));
        // Eight draws from 2^31 values: a repeat would mean no randomness.
        assert!(starts.len() > 1, "every device starts at the same port");
    }
}
