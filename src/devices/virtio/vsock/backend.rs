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

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnKey, Connection, Line, RxOutcome, State, Verdict};
use super::packet::{op, Header};
use super::unix::connect_nonblocking;
use super::{LOCAL_PORT_START, MAX_CONNECTIONS, RST_QUEUE_MAX, RST_QUEUE_SOFT_MAX};

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

/// The listener and the connections.
#[derive(Debug)]
pub(crate) struct Backend {
    listener: UnixListener,
    uds_path: PathBuf,
    guest_cid: u64,
    pub(crate) max_connections: usize,
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
    pub(crate) fn new(listener: UnixListener, uds_path: &Path, guest_cid: u64) -> Self {
        Self {
            listener,
            uds_path: uds_path.to_path_buf(),
            guest_cid,
            max_connections: MAX_CONNECTIONS,
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
        self.conns.insert(key, conn);
        self.touch(key);
        Some(key)
    }

    fn push_rst(&mut self, hdr: Header) {
        if self.rst_queue.len() >= RST_QUEUE_MAX {
            log::warn!(
                "vsock: dropping a RST for guest port {}: the guest takes no rx buffers",
                hdr.dst_port
            );
            return;
        }
        self.rst_queue.push_back(hdr);
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
            self.by_ports.remove(&(conn.local_port, conn.peer_port));
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
        if self.conns.len() >= self.max_connections {
            log::warn!(
                "vsock: refusing a guest connection to port {}: {} connections are open",
                req.dst_port,
                self.conns.len()
            );
            self.reply_rst(req);
            return;
        }
        let path = self.host_port_path(req.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                if self.insert(Connection::from_guest(stream, req)).is_none() {
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
                    if self.conns.len() >= self.max_connections {
                        log::warn!(
                            "vsock: refusing a host connection: {} connections are open",
                            self.conns.len()
                        );
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("vsock: cannot make a host connection non-blocking: {e}");
                        continue;
                    }
                    self.insert(Connection::from_host(stream));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    log::warn!(
                        "vsock: accept failed ({e}); new host connections wait until one closes"
                    );
                    self.listener_paused = true;
                    break;
                }
            }
        }
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
                    log::warn!("vsock: cannot watch a connection's stream ({e:?}): closing it");
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
                Err(e) => log::error!("vsock: cannot (un)watch the listener: {e:?}"),
            }
        }
    }

    fn bury(&mut self, ops: &mut EventOps) {
        for conn in self.graveyard.drain(..) {
            if let Some(set) = conn.registered {
                if let Err(e) = ops.remove(Events::with_data(&conn.stream, 0, set)) {
                    log::warn!("vsock: cannot unwatch a closed connection: {e:?}");
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
