//! One connection between a guest socket and a host Unix stream.
//!
//! Credit (virtio 1.2, section 5.10.6.3): each side advertises its receive
//! buffer (`buf_alloc`) and how many received bytes it has passed on
//! (`fwd_cnt`) in every packet. The device never sends the guest more than
//! `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes; the guest may send the
//! device [`CONN_BUF_ALLOC`] bytes beyond what the device last said it
//! forwarded, and those bytes wait in `wbuf` while the host stream is not
//! writable. A guest that sends more is reset.
//!
//! Closing: when the guest closes the connection (SHUTDOWN of both
//! directions, or RST) while its bytes still wait in `wbuf`, the connection
//! becomes [`State::Draining`]: the guest is done with it, and the device
//! keeps writing to the host stream until `wbuf` is empty or the drain
//! deadline passes.

use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::budget::FdToken;
use super::packet::{op, shutdown, Header, TYPE_STREAM};
use super::unix::send;
use super::{CONNECT_LINE_MAX, HOST_CID};

/// A connection's key: its token on the event loop.
pub(crate) type ConnKey = u32;

/// The most `write` calls one flush makes; a stream that takes more is
/// flushed further on its next EPOLLOUT.
const FLUSH_ROUNDS: usize = 64;
/// A write buffer that grew past this is freed once it empties.
const WBUF_KEEP: usize = 64 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// A host process connected to the listener; the device is reading its
    /// `CONNECT <port>\n` line.
    AwaitingConnectLine {
        line: [u8; CONNECT_LINE_MAX],
        len: usize,
    },
    /// Host-initiated: the REQUEST is queued for the guest (or sent, when
    /// `request_sent`) and the device waits for its RESPONSE.
    LocalInit { request_sent: bool },
    /// Data flows.
    Established,
    /// The guest closed the connection; the device writes what the guest
    /// sent before to the host stream, then closes it. The guest knows
    /// nothing of it any more.
    Draining,
}

/// What a `CONNECT` line read came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// No newline yet.
    Incomplete,
    /// The guest port to connect to.
    Port(u32),
    /// Junk, too long, or the stream ended: close it.
    Invalid,
}

/// What the connection has for the guest's next rx buffer.
#[derive(Debug)]
pub(crate) enum RxOutcome {
    /// A packet: its header and how many payload bytes it took from the
    /// scratch buffer.
    Packet(Header, usize),
    /// Nothing now.
    Nothing,
    /// The host stream failed: reset the connection.
    Kill,
}

/// What a guest packet or a host event did to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It lives on.
    Keep,
    /// Close it without telling the guest (the guest reset it).
    Close,
    /// Close it and send the guest a RST (when the guest knows of it).
    Reset,
    /// The guest closed it: forget it on the guest's side (and answer the
    /// guest with a RST if `rst`), drain what waits for the host stream,
    /// then close it.
    Closing {
        /// Whether the guest expects a RST (it sent SHUTDOWN, not RST).
        rst: bool,
    },
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) stream: UnixStream,
    pub(crate) state: State,
    /// The host-side port (the guest's destination port for guest-initiated
    /// connections, an allocated one for host-initiated connections).
    pub(crate) local_port: u32,
    /// The guest-side port.
    pub(crate) peer_port: u32,

    need_response: bool,
    need_credit_update: bool,
    need_shutdown: u32,

    /// The host stream is (believed) readable: the device stops watching
    /// EPOLLIN until a read says WouldBlock.
    host_readable: bool,
    /// Nothing more is read from the host stream (EOF seen, or the guest
    /// will receive no more).
    read_closed: bool,
    /// Bytes for the host stream that it did not take yet; `wbuf[wpos..]`
    /// is pending.
    wbuf: Vec<u8>,
    wpos: usize,
    /// How many of the pending bytes are the device's own (the `OK` line),
    /// not guest data that counts in `fwd_cnt`.
    wbuf_own: usize,
    shut_write_after_flush: bool,
    write_closed: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,

    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,

    /// The events the stream is registered for on the event loop, if it is.
    pub(crate) registered: Option<EventSet>,
    /// The key sits in the backend's rx-ready queue.
    pub(crate) in_rx_ready: bool,
    /// The key sits in the backend's dirty list (its interest may change).
    pub(crate) dirty: bool,
    /// When the handshake (host-initiated) or the drain gives up.
    pub(crate) deadline: Option<Instant>,
    /// The receive buffer advertised to the guest.
    buf_alloc: u32,
    /// Whether the host stream gets `OK <port>\n` when the guest accepts
    /// (a listener's connection does, a handed-in one does not).
    announce: bool,
    /// This connection's fd, counted in the process's budget.
    _fd: FdToken,
    /// Its place among the device's `max_connections`.
    _slot: FdToken,
}

fn wrap(n: usize) -> Wrapping<u32> {
    // Callers pass packet-sized counts (at most a few hundred KiB).
    Wrapping(u32::try_from(n).unwrap_or(u32::MAX))
}

/// What every new connection is given.
#[derive(Debug)]
pub(crate) struct Setup {
    pub(crate) stream: UnixStream,
    pub(crate) fd: FdToken,
    pub(crate) slot: FdToken,
    pub(crate) buf_alloc: u32,
}

impl Connection {
    fn new(setup: Setup, state: State, local_port: u32, peer_port: u32) -> Self {
        let Setup {
            stream,
            fd,
            slot,
            buf_alloc,
        } = setup;
        Self {
            stream,
            state,
            local_port,
            peer_port,
            need_response: false,
            need_credit_update: false,
            need_shutdown: 0,
            host_readable: false,
            read_closed: false,
            wbuf: Vec::new(),
            wpos: 0,
            wbuf_own: 0,
            shut_write_after_flush: false,
            write_closed: false,
            peer_shutdown: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            registered: None,
            in_rx_ready: false,
            dirty: false,
            deadline: None,
            buf_alloc,
            announce: true,
            _fd: fd,
            _slot: slot,
        }
    }

    /// A stream a host process opened on the listener; its handshake must
    /// be over by `deadline`.
    pub(crate) fn from_host(setup: Setup, deadline: Instant) -> Self {
        let state = State::AwaitingConnectLine {
            line: [0; CONNECT_LINE_MAX],
            len: 0,
        };
        let mut c = Self::new(setup, state, 0, 0);
        c.deadline = Some(deadline);
        c
    }

    /// A stream the embedder handed in (`MicroVm::vsock_connect`) for guest
    /// port `peer_port`: the REQUEST goes out from `local_port` as for a
    /// `CONNECT` line, and the guest must accept by `deadline`; no `OK`
    /// line is written when it does.
    pub(crate) fn handed_in(
        setup: Setup,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let state = State::LocalInit {
            request_sent: false,
        };
        let mut c = Self::new(setup, state, local_port, peer_port);
        c.deadline = Some(deadline);
        c.announce = false;
        c
    }

    /// A guest REQUEST (`req`) the device connected to a host listener.
    pub(crate) fn from_guest(setup: Setup, req: &Header) -> Self {
        let mut c = Self::new(setup, State::Established, req.dst_port, req.src_port);
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c.need_response = true;
        c
    }

    /// The host process asked for guest port `peer_port`; the device will
    /// send the guest a REQUEST from `local_port`.
    pub(crate) fn start_local_init(&mut self, local_port: u32, peer_port: u32) {
        self.local_port = local_port;
        self.peer_port = peer_port;
        self.state = State::LocalInit {
            request_sent: false,
        };
    }

    /// Whether the guest has heard of this connection (a reset must be
    /// told to it).
    pub(crate) fn guest_knows(&self) -> bool {
        matches!(
            self.state,
            State::Established | State::LocalInit { request_sent: true }
        )
    }

    /// Whether the connection has an identity (ports) on the vsock side
    /// (a draining one keeps its host port until it is closed).
    pub(crate) fn has_ports(&self) -> bool {
        !matches!(self.state, State::AwaitingConnectLine { .. })
    }

    /// Whether bytes wait for the host stream.
    pub(crate) fn has_pending_write(&self) -> bool {
        self.pending_write() > 0
    }

    /// The guest closed the connection: from now on only the bytes that
    /// wait are written, until `deadline`.
    pub(crate) fn start_draining(&mut self, deadline: Instant) {
        self.state = State::Draining;
        self.deadline = Some(deadline);
        self.read_closed = true;
        self.host_readable = false;
        self.need_response = false;
        self.need_credit_update = false;
        self.need_shutdown = 0;
    }

    /// Reads what there is of the `CONNECT <port>\n` line, one byte at a
    /// time so that no byte after the newline is consumed: those belong to
    /// the connection.
    pub(crate) fn read_connect_line(&mut self) -> Line {
        let State::AwaitingConnectLine { line, len } = &mut self.state else {
            return Line::Invalid;
        };
        // Each round reads one byte or stops; the line is bounded.
        for _ in 0..=CONNECT_LINE_MAX {
            if *len >= CONNECT_LINE_MAX {
                return Line::Invalid;
            }
            let mut b = [0u8; 1];
            match self.stream.read(&mut b) {
                Ok(0) => return Line::Invalid,
                Ok(_) if b[0] == b'\n' => return parse_connect_line(&line[..*len]),
                Ok(_) => {
                    line[*len] = b[0];
                    *len += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Line::Incomplete,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Line::Invalid,
            }
        }
        Line::Invalid
    }

    /// How many bytes the guest can take now.
    pub(crate) fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn pending_write(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// The events to watch the stream for, or `None` to not watch it at
    /// all (EPOLLHUP cannot be masked: a hung-up stream the device cannot
    /// act on must leave the epoll set, or the loop spins).
    pub(crate) fn interest(&self) -> Option<EventSet> {
        match self.state {
            State::AwaitingConnectLine { .. } => Some(EventSet::IN),
            // Only hang-ups and errors: the host process gave up waiting.
            State::LocalInit { .. } => Some(EventSet::empty()),
            State::Draining => (self.pending_write() > 0).then_some(EventSet::OUT),
            State::Established => {
                let mut set = EventSet::empty();
                if !self.host_readable && !self.read_closed {
                    set |= EventSet::IN;
                }
                if self.pending_write() > 0 {
                    set |= EventSet::OUT;
                }
                (!set.is_empty()).then_some(set)
            }
        }
    }

    /// Whether the connection has a packet for the guest now.
    pub(crate) fn has_rx(&self) -> bool {
        match self.state {
            State::LocalInit {
                request_sent: false,
            } => true,
            State::Established => {
                self.need_response
                    || self.need_shutdown != 0
                    || self.need_credit_update
                    || self.data_waits()
            }
            _ => false,
        }
    }

    /// Whether the host stream has data the guest has credit for.
    fn data_waits(&self) -> bool {
        self.host_readable && !self.read_closed && self.peer_credit() > 0
    }

    /// A header for a packet to the guest; it carries the current credit,
    /// so no separate CREDIT_UPDATE is owed after it.
    fn header(&mut self, guest_cid: u64, op: u16, len: usize, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.need_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: wrap(len).0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, given an rx buffer with room for
    /// `cap` payload bytes. Stream data is read into `scratch`.
    pub(crate) fn next_rx(&mut self, guest_cid: u64, cap: usize, scratch: &mut [u8]) -> RxOutcome {
        match self.state {
            State::LocalInit {
                request_sent: false,
            } => {
                self.state = State::LocalInit { request_sent: true };
                return RxOutcome::Packet(self.header(guest_cid, op::REQUEST, 0, 0), 0);
            }
            State::Established => {}
            _ => return RxOutcome::Nothing,
        }
        if self.need_response {
            self.need_response = false;
            return RxOutcome::Packet(self.header(guest_cid, op::RESPONSE, 0, 0), 0);
        }
        if self.host_readable && !self.read_closed {
            let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
            let n = cap.min(credit).min(scratch.len());
            // A read interrupted by a signal is retried a few times.
            for _ in 0..4 {
                if n == 0 {
                    break;
                }
                match self.stream.read(&mut scratch[..n]) {
                    Ok(0) => {
                        self.read_closed = true;
                        self.host_readable = false;
                        self.need_shutdown |= shutdown::SEND;
                        break;
                    }
                    Ok(k) => {
                        self.tx_cnt += wrap(k);
                        return RxOutcome::Packet(self.header(guest_cid, op::RW, k, 0), k);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.host_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return RxOutcome::Kill,
                }
            }
        }
        if self.need_shutdown != 0 {
            let flags = std::mem::take(&mut self.need_shutdown);
            return RxOutcome::Packet(self.header(guest_cid, op::SHUTDOWN, 0, flags), 0);
        }
        // Data waits but the buffer has room for a header only: a credit
        // update fits, uses the buffer, and says nothing untrue. Returning
        // nothing here would leave the connection ready and the buffer
        // first in line, so the device would look at it again forever.
        if self.need_credit_update || (cap == 0 && self.data_waits()) {
            return RxOutcome::Packet(self.header(guest_cid, op::CREDIT_UPDATE, 0, 0), 0);
        }
        RxOutcome::Nothing
    }

    /// Acts on a (validated) guest packet for this connection; `payload`
    /// is its data (RW only).
    pub(crate) fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) -> Verdict {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (self.state, hdr.op) {
            (State::Established, op::RST) => {
                let _ = self.flush();
                Verdict::Closing { rst: false }
            }
            (_, op::RST) => Verdict::Close,
            (State::LocalInit { request_sent: true }, op::RESPONSE) => {
                self.state = State::Established;
                self.deadline = None;
                if !self.announce {
                    return Verdict::Keep;
                }
                let line = format!("OK {}\n", self.local_port);
                self.append(line.as_bytes());
                self.wbuf_own += line.len();
                self.flush_verdict()
            }
            (State::Established, op::RW) => self.recv_data(payload),
            (State::Established, op::CREDIT_UPDATE) => Verdict::Keep,
            (State::Established, op::CREDIT_REQUEST) => {
                self.need_credit_update = true;
                Verdict::Keep
            }
            (State::Established, op::SHUTDOWN) => self.recv_shutdown(hdr.flags),
            _ => Verdict::Reset,
        }
    }

    fn recv_shutdown(&mut self, flags: u32) -> Verdict {
        self.peer_shutdown |= flags & shutdown::BOTH;
        if self.peer_shutdown == shutdown::BOTH {
            // The guest closed its socket: give the host what can be
            // written without blocking now (the rest drains), and answer
            // with the RST the guest expects.
            let _ = self.flush();
            return Verdict::Closing { rst: true };
        }
        if flags & shutdown::RCV != 0 {
            self.read_closed = true;
        }
        if flags & shutdown::SEND != 0 {
            self.shut_write_after_flush = true;
            return self.flush_verdict();
        }
        Verdict::Keep
    }

    fn recv_data(&mut self, data: &[u8]) -> Verdict {
        if self.peer_shutdown & shutdown::SEND != 0 || self.write_closed {
            return Verdict::Reset;
        }
        let guest_pending = self.pending_write() - self.wbuf_own;
        let limit = usize::try_from(self.buf_alloc).unwrap_or(usize::MAX);
        if guest_pending + data.len() > limit {
            log::debug!(
                "vsock: guest port {} overran its credit on host port {}: resetting",
                self.peer_port,
                self.local_port
            );
            return Verdict::Reset;
        }
        let mut rest = data;
        if self.pending_write() == 0 {
            match write_nonblocking(&self.stream, rest) {
                Ok(n) => {
                    self.fwd_cnt += wrap(n);
                    rest = &rest[n..];
                }
                Err(_) => return Verdict::Reset,
            }
        }
        self.append(rest);
        self.check_credit_threshold();
        Verdict::Keep
    }

    fn append(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // Keep the buffer at most the pending bytes plus this packet.
        if self.wpos > 0 {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        self.wbuf.extend_from_slice(data);
    }

    fn check_credit_threshold(&mut self) {
        // After forwarding a quarter of its buffer since it last told the
        // guest, the device sends a CREDIT_UPDATE.
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= self.buf_alloc / 4 {
            self.need_credit_update = true;
        }
    }

    fn flush_verdict(&mut self) -> Verdict {
        match self.flush() {
            Ok(()) => Verdict::Keep,
            Err(_) => Verdict::Reset,
        }
    }

    /// Writes pending bytes to the host stream until it would block; shuts
    /// the stream's write side once empty if the guest asked for that.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        for _ in 0..FLUSH_ROUNDS {
            if self.pending_write() == 0 {
                break;
            }
            match send(&self.stream, &self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.wpos += n;
                    let own = n.min(self.wbuf_own);
                    self.wbuf_own -= own;
                    self.fwd_cnt += wrap(n - own);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.pending_write() == 0 {
            self.wpos = 0;
            if self.wbuf.capacity() > WBUF_KEEP {
                self.wbuf = Vec::new();
            } else {
                self.wbuf.clear();
            }
            if self.shut_write_after_flush && !self.write_closed {
                self.write_closed = true;
                // The host may have closed its end already; nothing to do.
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        self.check_credit_threshold();
        Ok(())
    }

    /// Acts on an event-loop event for the stream.
    pub(crate) fn on_host_event(&mut self, set: EventSet) -> Verdict {
        let trouble = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        match self.state {
            // Read by the backend, which owns port allocation.
            State::AwaitingConnectLine { .. } => Verdict::Keep,
            State::LocalInit { .. } => {
                if trouble {
                    Verdict::Reset
                } else {
                    Verdict::Keep
                }
            }
            State::Draining => {
                // Done when empty; a host that hung up or failed gets no
                // more.
                let flushed = if set.contains(EventSet::OUT) || trouble {
                    self.flush()
                } else {
                    Ok(())
                };
                if flushed.is_err() || self.pending_write() == 0 {
                    Verdict::Close
                } else {
                    Verdict::Keep
                }
            }
            State::Established => {
                let watching = self.registered.unwrap_or(EventSet::empty());
                if watching.contains(EventSet::IN)
                    && (trouble || set.contains(EventSet::IN))
                    && !self.read_closed
                {
                    self.host_readable = true;
                }
                if self.pending_write() > 0 && (trouble || set.contains(EventSet::OUT)) {
                    return self.flush_verdict();
                }
                Verdict::Keep
            }
        }
    }
}

/// Writes as much of `data` as the stream takes without blocking.
fn write_nonblocking(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    for _ in 0..FLUSH_ROUNDS {
        if done == data.len() {
            break;
        }
        match send(stream, &data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// `CONNECT <port>` (the keyword in any case, spaces around tolerated).
fn parse_connect_line(line: &[u8]) -> Line {
    let Ok(text) = std::str::from_utf8(line) else {
        return Line::Invalid;
    };
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(cmd), Some(port), None) if cmd.eq_ignore_ascii_case("connect") => {
            port.parse().map_or(Line::Invalid, Line::Port)
        }
        _ => Line::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Line::Port(52));
        assert_eq!(
            parse_connect_line(b"connect 4294967295\r"),
            Line::Port(u32::MAX)
        );
        assert_eq!(parse_connect_line(b"CONNECT"), Line::Invalid);
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), Line::Invalid);
        assert_eq!(parse_connect_line(b"CONNECT -1"), Line::Invalid);
        assert_eq!(parse_connect_line(b"CONNECT 1 2"), Line::Invalid);
        assert_eq!(parse_connect_line(b"HELLO 1"), Line::Invalid);
        assert_eq!(parse_connect_line(&[0xff, 0xfe]), Line::Invalid);
    }

    #[test]
    fn credit_saturates_when_the_guest_shrinks_its_buffer() {
        let budget = std::sync::Arc::new(crate::devices::virtio::vsock::budget::FdBudget::new());
        let (a, _b) = UnixStream::pair().unwrap();
        let setup = Setup {
            stream: a,
            fd: budget.take(2).unwrap(),
            slot: budget.take(2).unwrap(),
            buf_alloc: 4096,
        };
        let mut c = Connection::from_host(setup, Instant::now());
        c.peer_buf_alloc = 100;
        c.tx_cnt = Wrapping(5);
        c.peer_fwd_cnt = Wrapping(u32::MAX - 4); // wrapped: 10 in flight
        assert_eq!(c.peer_credit(), 90);
        c.peer_buf_alloc = 4;
        assert_eq!(c.peer_credit(), 0);
        // A guest claiming to have forwarded more than was sent gets none.
        c.peer_buf_alloc = 100;
        c.peer_fwd_cnt = Wrapping(6);
        assert_eq!(c.peer_credit(), 0);
    }
}
