//! A guest driver for the vsock tests: it fills rx buffers, pushes tx
//! packets, reads the used rings, and runs the device on a real
//! event-manager loop (on the test's thread) with real Unix sockets in a
//! temporary directory.
//!
//! Guest memory layout (16 MiB): queue `q`'s rings at `RING_BASE[q]`
//! (descriptors, then the avail ring at +4 KiB, the used ring at +5 KiB);
//! descriptor `d` of queue `q` points into its own 16 KiB slot at
//! `SLOT_BASE[q] + d * SLOT`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};

use super::packet::{op, Header, HDR_LEN, TYPE_STREAM};
use super::{HostPorts, Vsock, VsockConfig, EVQ, HOST_CID, QUEUE_SIZE, RXQ, TXQ};
use crate::devices::virtio::{Interrupt, Queue, VirtioDevice};
use crate::devices::EventFdTrigger;
use crate::memory::GuestMemoryMmap;

/// The guest's CID in every test.
pub(crate) const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 0x100_0000;
/// Each descriptor's own buffer.
pub(crate) const SLOT: u64 = 0x4000;
const RING_BASE: [u64; 3] = [0x0, 0x4000, 0x8000];
const SLOT_BASE: [u64; 3] = [0x10_0000, 0x50_0000, 0x90_0000];
/// Device-writable descriptor flag (`VRING_DESC_F_WRITE`).
pub(crate) const WRITE: u16 = 2;
/// `VRING_DESC_F_NEXT`.
const NEXT: u16 = 1;
const _: () = assert!(VRING_DESC_F_WRITE == 2 && VRING_DESC_F_NEXT == 1);

/// A chain's descriptors: (index, address, length).
type Chain = Vec<(u16, u64, u32)>;

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "dormouse-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A packet the device put in an rx buffer.
#[derive(Debug, Clone)]
pub(crate) struct RxPacket {
    pub(crate) hdr: Header,
    pub(crate) data: Vec<u8>,
}

#[derive(Debug)]
struct Ring {
    free: Vec<u16>,
    /// Head → (descriptor, address, length) of each descriptor in the chain.
    chains: HashMap<u16, Chain>,
    used_seen: u16,
}

impl Ring {
    fn new() -> Self {
        Self {
            free: (0..QUEUE_SIZE).rev().collect(),
            chains: HashMap::new(),
            used_seen: 0,
        }
    }
}

/// A device on an event loop, driven by a test's guest.
pub(crate) struct Rig {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) dev: Arc<Mutex<Vsock>>,
    /// The rig's own loop, or `None` when the device runs on the VM's
    /// event-loop thread instead.
    manager: Option<EventManager<Arc<Mutex<Vsock>>>>,
    pub(crate) interrupt: Arc<Interrupt>,
    /// Holds the socket directory for the rig's lifetime.
    _dir: TempDir,
    pub(crate) uds: PathBuf,
    rings: [Ring; 3],
    /// The device's advertised buffer per connection.
    pub(crate) buf_alloc: u32,
}

/// The configuration of most test devices: every host port up to 10000
/// allowed, the rest as default.
pub(crate) fn test_config() -> VsockConfig {
    VsockConfig {
        host_ports: HostPorts::Only((0..=10_000).collect()),
        ..VsockConfig::default()
    }
}

impl Rig {
    /// A device, registered on its event loop, not activated.
    pub(crate) fn inactive() -> Self {
        Self::build(true, test_config())
    }

    /// An activated device with `config`.
    pub(crate) fn with_config(config: VsockConfig) -> Self {
        let mut rig = Self::build(true, config);
        rig.activate();
        rig
    }

    /// A device on the VM's event-loop thread (`crate::event_loop`),
    /// activated; `pump` then only gives the thread time.
    pub(crate) fn on_event_loop() -> (Self, crate::event_loop::EventLoop) {
        let mut rig = Self::build(false, test_config());
        let lp = crate::event_loop::EventLoop::start(vec![rig.dev.clone()]).unwrap();
        rig.activate();
        (rig, lp)
    }

    fn build(own_loop: bool, config: VsockConfig) -> Self {
        let dir = TempDir::new();
        let uds = dir.path().join("v.sock");
        let dev = Vsock::with_config(GUEST_CID, &uds, config).unwrap();
        Self::around(dev, own_loop, dir)
    }

    /// An activated device, on the rig's own loop, made by the caller
    /// (e.g. on a listener handed in); `dir` lives as long as the rig.
    pub(crate) fn with_device(dev: Vsock, dir: TempDir) -> Self {
        let mut rig = Self::around(dev, true, dir);
        rig.activate();
        rig
    }

    fn around(dev: Vsock, own_loop: bool, dir: TempDir) -> Self {
        let uds = dev.uds_path().to_path_buf();
        let buf_alloc = dev.config().buffer_size;
        let dev = Arc::new(Mutex::new(dev));
        let manager = own_loop.then(|| {
            let mut m = EventManager::new().unwrap();
            m.add_subscriber(dev.clone());
            m
        });
        Self {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            dev,
            manager,
            interrupt: Arc::new(Interrupt::new(EventFdTrigger::new().unwrap())),
            _dir: dir,
            uds,
            rings: [Ring::new(), Ring::new(), Ring::new()],
            buf_alloc,
        }
    }

    /// A device activated with the rig's three queues.
    pub(crate) fn new() -> Self {
        let mut rig = Self::inactive();
        rig.activate();
        rig
    }

    /// Activates the device (fresh rings, as a driver does after a reset).
    pub(crate) fn activate(&mut self) {
        for q in 0..3 {
            // Zero the avail and used ring headers.
            self.mem.write_obj(0u32, avail_addr(q)).unwrap();
            self.mem.write_obj(0u32, used_addr(q)).unwrap();
        }
        self.rings = [Ring::new(), Ring::new(), Ring::new()];
        let queues: Vec<Queue> = (0..3).map(device_queue).collect();
        self.dev()
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
            .unwrap();
        self.pump();
    }

    pub(crate) fn dev(&self) -> MutexGuard<'_, Vsock> {
        self.dev.lock().unwrap()
    }

    /// Runs the event loop until nothing is ready. Panics if it never
    /// settles: a busy loop is a bug.
    pub(crate) fn pump(&mut self) {
        let Some(manager) = self.manager.as_mut() else {
            std::thread::sleep(Duration::from_millis(20));
            return;
        };
        for _ in 0..10_000 {
            if manager.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never settles: something is always ready (busy loop)");
    }

    /// Runs the event loop, waiting for events (timers included) for
    /// `dur`.
    pub(crate) fn pump_for(&mut self, dur: Duration) {
        let end = Instant::now() + dur;
        let manager = self.manager.as_mut().expect("a rig with its own loop");
        while Instant::now() < end {
            manager.run_with_timeout(10).unwrap();
        }
    }

    /// Runs the event loop (timers included) until `done` or 5 s passed;
    /// returns whether `done` came true.
    pub(crate) fn pump_until(&mut self, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if done(self) {
                return true;
            }
            self.pump_for(Duration::from_millis(10));
        }
        done(self)
    }

    /// Notifies queue `q` (as the transport would on QueueNotify).
    pub(crate) fn kick(&mut self, q: usize) {
        self.dev().queue_events()[q].write(1).unwrap();
    }

    /// Puts a chain of descriptors (address, length, flags) on queue `q`
    /// without notifying; NEXT flags and links are set here.
    pub(crate) fn push_raw(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let ring = &mut self.rings[q];
        assert!(ring.free.len() >= descs.len(), "out of descriptors");
        let idx: Vec<u16> = (0..descs.len()).map(|_| ring.free.pop().unwrap()).collect();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match idx.get(i + 1) {
                Some(&n) => (flags | NEXT, n),
                None => (flags & !NEXT, 0),
            };
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.mem
                .write_obj(raw, GuestAddress(RING_BASE[q] + 16 * u64::from(idx[i])))
                .unwrap();
        }
        let head = idx[0];
        ring.chains.insert(
            head,
            idx.iter()
                .zip(descs)
                .map(|(&d, &(a, l, _))| (d, a, l))
                .collect(),
        );
        let avail = avail_addr(q);
        let avail_idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
        let slot = u64::from(avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(head, avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.mem
            .write_obj(avail_idx.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
        head
    }

    /// How many descriptors of queue `q` the guest has not given out.
    pub(crate) fn free_descs(&self, q: usize) -> usize {
        self.rings[q].free.len()
    }

    /// The slot address descriptor `d` of queue `q` would use.
    fn slot(q: usize, d: u16) -> u64 {
        SLOT_BASE[q] + u64::from(d) * SLOT
    }

    /// The descriptor index the next `push_raw` on `q` takes first.
    fn next_free(&self, q: usize, nth_from_top: usize) -> u16 {
        let free = &self.rings[q].free;
        free[free.len() - 1 - nth_from_top]
    }

    /// Gives the device `n` single-descriptor rx buffers of `len` bytes
    /// each, notifies and runs the loop.
    pub(crate) fn add_rx(&mut self, n: usize, len: u32) {
        assert!(u64::from(len) <= SLOT);
        for _ in 0..n {
            let d = self.next_free(RXQ, 0);
            self.push_raw(RXQ, &[(Self::slot(RXQ, d), len, WRITE)]);
        }
        self.kick(RXQ);
        self.pump();
    }

    /// Gives the device one rx chain of several descriptors.
    pub(crate) fn add_rx_chain(&mut self, lens: &[u32]) {
        let descs: Vec<_> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| (Self::slot(RXQ, self.next_free(RXQ, i)), l, WRITE))
            .collect();
        self.push_raw(RXQ, &descs);
        self.kick(RXQ);
        self.pump();
    }

    /// Gives the event queue a buffer of `len` bytes.
    pub(crate) fn add_event_buffer(&mut self, len: u32) {
        let d = self.next_free(EVQ, 0);
        self.push_raw(EVQ, &[(Self::slot(EVQ, d), len, WRITE)]);
        self.kick(EVQ);
        self.pump();
    }

    /// Puts a packet on the tx queue, header and payload cut into
    /// descriptors of at most `piece` bytes (the header may span several).
    pub(crate) fn push_tx(&mut self, hdr: &Header, payload: &[u8], piece: usize) {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        let piece = piece.clamp(1, usize::try_from(SLOT).unwrap());
        assert!(
            bytes.len().div_ceil(piece) <= self.rings[TXQ].free.len(),
            "not enough free tx descriptors for {} pieces",
            bytes.len().div_ceil(piece)
        );
        let mut descs = Vec::new();
        for (i, chunk) in bytes.chunks(piece).enumerate() {
            let addr = Self::slot(TXQ, self.next_free(TXQ, i));
            self.mem.write_slice(chunk, GuestAddress(addr)).unwrap();
            descs.push((addr, u32::try_from(chunk.len()).unwrap(), 0));
        }
        self.push_raw(TXQ, &descs);
    }

    /// Sends one packet (in 16 KiB descriptors), notifies, runs the loop and
    /// reclaims finished tx descriptors.
    pub(crate) fn send(&mut self, hdr: &Header, payload: &[u8]) {
        self.send_split(hdr, payload, usize::try_from(SLOT).unwrap());
    }

    /// [`send`](Self::send) with descriptors of at most `piece` bytes.
    pub(crate) fn send_split(&mut self, hdr: &Header, payload: &[u8], piece: usize) {
        self.push_tx(hdr, payload, piece);
        self.kick(TXQ);
        self.pump();
        self.used(TXQ);
    }

    /// New used-ring entries of queue `q` (head, length); their
    /// descriptors are freed. Returns the chains' descriptors too.
    pub(crate) fn used_chains(&mut self, q: usize) -> Vec<(u16, u32, Chain)> {
        let used = used_addr(q);
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        let ring = &mut self.rings[q];
        while ring.used_seen != idx {
            let at = used.unchecked_add(4 + 8 * u64::from(ring.used_seen % QUEUE_SIZE));
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            let head = u16::try_from(id).unwrap();
            let chain = ring
                .chains
                .remove(&head)
                .expect("used id is a head we gave");
            ring.free.extend(chain.iter().map(|&(d, _, _)| d));
            out.push((head, len, chain));
            ring.used_seen = ring.used_seen.wrapping_add(1);
        }
        out
    }

    /// New used-ring entries of queue `q`: (head, length).
    pub(crate) fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        self.used_chains(q)
            .into_iter()
            .map(|(h, l, _)| (h, l))
            .collect()
    }

    /// The packets the device wrote into rx buffers since the last call.
    pub(crate) fn rx(&mut self) -> Vec<RxPacket> {
        let mut out = Vec::new();
        for (_, len, chain) in self.used_chains(RXQ) {
            let mut bytes = Vec::new();
            let mut left = usize::try_from(len).unwrap();
            for (_, addr, dlen) in chain {
                let n = left.min(usize::try_from(dlen).unwrap());
                let mut buf = vec![0u8; n];
                self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                bytes.extend_from_slice(&buf);
                left -= n;
            }
            assert_eq!(left, 0, "used length larger than the chain");
            assert!(bytes.len() >= HDR_LEN, "rx packet without a full header");
            let hdr = Header::from_bytes(&bytes[..HDR_LEN].try_into().unwrap());
            let data = bytes[HDR_LEN..].to_vec();
            assert_eq!(usize::try_from(hdr.len).unwrap(), data.len());
            assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
            assert_eq!(hdr.type_, TYPE_STREAM);
            out.push(RxPacket { hdr, data });
        }
        out
    }

    /// How many rx buffers the device used since the last call (no checks:
    /// a failed device may return buffers it could not fill).
    pub(crate) fn rx_lenient(&mut self) -> usize {
        self.used_chains(RXQ)
            .iter()
            .filter(|(_, len, _)| usize::try_from(*len).unwrap() >= HDR_LEN)
            .count()
    }

    /// Reads the 4-byte event of each used event buffer.
    pub(crate) fn events(&mut self) -> Vec<(u32, u32)> {
        self.used_chains(EVQ)
            .into_iter()
            .map(|(_, len, chain)| {
                let id: u32 = self.mem.read_obj(GuestAddress(chain[0].1)).unwrap();
                (len, id)
            })
            .collect()
    }

    /// The one packet the device sent since the last call.
    pub(crate) fn rx_one(&mut self) -> RxPacket {
        let mut p = self.rx();
        assert_eq!(p.len(), 1, "expected exactly one packet, got {p:?}");
        p.pop().unwrap()
    }

    /// Connects a host process (`CONNECT port`), lets the guest accept
    /// from `guest_port`... and returns the host stream and the host-side
    /// port the device picked. The guest advertises `buf_alloc`.
    pub(crate) fn host_connect(&mut self, guest_port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        self.pump();
        self.add_rx(1, 4096);
        let req = self.rx_one();
        assert_eq!(req.hdr.op, op::REQUEST);
        assert_eq!(req.hdr.dst_port, guest_port);
        let local = req.hdr.src_port;
        let mut resp = hdr(op::RESPONSE, guest_port, local);
        resp.buf_alloc = buf_alloc;
        self.send(&resp, &[]);
        assert_eq!(read_line(&mut s), format!("OK {local}"));
        (s, local)
    }

    /// The guest connects from `guest_port` to host port `port`, where the
    /// test listens; returns the accepted host stream.
    pub(crate) fn guest_connect(
        &mut self,
        listener: &std::os::unix::net::UnixListener,
        guest_port: u32,
        port: u32,
    ) -> UnixStream {
        self.add_rx(1, 4096);
        self.send(&hdr(op::REQUEST, guest_port, port), &[]);
        let resp = self.rx_one();
        assert_eq!(resp.hdr.op, op::RESPONSE);
        assert_eq!((resp.hdr.src_port, resp.hdr.dst_port), (port, guest_port));
        assert_eq!(resp.hdr.buf_alloc, self.buf_alloc);
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// The Unix socket path for host port `port`.
    pub(crate) fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.uds.clone().into_os_string();
        p.push(format!("_{port}"));
        p.into()
    }
}

/// Queue `q`'s avail ring (its descriptor table is at `RING_BASE[q]`).
fn avail_addr(q: usize) -> GuestAddress {
    GuestAddress(RING_BASE[q] + 0x1000)
}

/// Queue `q`'s used ring.
fn used_addr(q: usize) -> GuestAddress {
    GuestAddress(RING_BASE[q] + 0x1400)
}

/// The device's view of queue `q`, set up as a driver would.
pub(crate) fn device_queue(q: usize) -> Queue {
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(QUEUE_SIZE);
    let split = |a: GuestAddress| {
        let a = a.raw_value();
        (
            Some(u32::try_from(a & 0xffff_ffff).unwrap()),
            Some(u32::try_from(a >> 32).unwrap()),
        )
    };
    let (lo, hi) = split(GuestAddress(RING_BASE[q]));
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(avail_addr(q));
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(used_addr(q));
    queue.set_used_ring_address(lo, hi);
    queue.set_ready(true);
    queue
}

/// A guest packet header from `src_port` to host port `dst_port`, with a
/// 256 KiB guest buffer and nothing forwarded yet.
pub(crate) fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

/// An RW header carrying `len` bytes.
pub(crate) fn rw(src_port: u32, dst_port: u32, len: usize) -> Header {
    Header {
        len: u32::try_from(len).unwrap(),
        ..hdr(op::RW, src_port, dst_port)
    }
}

/// Reads one `\n`-terminated line (without the newline).
pub(crate) fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        assert_eq!(s.read(&mut b).unwrap(), 1, "stream ended before a newline");
        if b[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b[0]);
    }
}

/// `n` bytes of a pattern that depends on `seed`.
pub(crate) fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| u8::try_from((i * 31 + usize::from(seed) * 7) % 251).unwrap())
        .collect()
}
