//! virtio-vsock stream throughput through the real packet path: a
//! connection is set up with the Firecracker-style handshake on a real Unix
//! socket, the test plays the guest driver over rings in guest memory, and
//! an event-manager loop runs the device's handler.
//!
//! - host to guest: the host process writes 64 KiB to its stream; the guest
//!   gives 4 KiB rx buffers (Linux's size) until all of it arrived, and
//!   returns credit;
//! - guest to host: the guest sends 64 KiB (one packet of the largest size,
//!   header and data in two descriptors, as Linux does); the host reads it.
//!
//! Host-native and public API only: `cargo bench --bench vsock` (add
//! `-- --quick` for a short run).

// criterion's macros generate undocumented items; a bench is no public API.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dormouse::devices::virtio::vsock::Vsock;
use dormouse::devices::virtio::{Interrupt, Queue, VirtioDevice};
use dormouse::devices::EventFdTrigger;
use dormouse::memory::GuestMemoryMmap;
use event_manager::{EventManager, SubscriberOps};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 256;
const MEM_SIZE: usize = 64 << 20;
const GUEST_CID: u64 = 3;
const HDR_LEN: usize = 44;
const CHUNK: usize = 64 * 1024;
const RX_BUF: u32 = 4096;
/// Queue q's descriptor table; its avail ring is 4 KiB on, its used ring
/// 5 KiB on (virtio-queue 0.18's mock would put the used ring over the
/// avail ring).
const RING_BASE: [u64; 3] = [0, 0x4000, 0x8000];
/// Descriptor d of queue q owns `SLOT_BASE[q] + d * SLOT[q]`.
const SLOT_BASE: [u64; 3] = [0x10_0000, 0x20_0000, 0x1f0_0000];
const SLOT: [u64; 3] = [0x1000, 0x1_1000, 0x100];
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const RXQ: usize = 0;
const TXQ: usize = 1;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;

/// A 44-byte virtio_vsock_hdr from the guest.
fn header(op: u16, src_port: u32, dst_port: u32, len: u32, fwd_cnt: u32) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
    h[8..16].copy_from_slice(&2u64.to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&1u16.to_le_bytes()); // STREAM
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&(256u32 * 1024).to_le_bytes()); // buf_alloc
    h[40..44].copy_from_slice(&fwd_cnt.to_le_bytes());
    h
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The guest driver: descriptor bookkeeping over the three rings.
struct Guest {
    mem: GuestMemoryMmap,
    free: [Vec<u16>; 3],
    chains: [HashMap<u16, Vec<u16>>; 3],
    used_seen: [u16; 3],
}

impl Guest {
    fn avail(q: usize) -> GuestAddress {
        GuestAddress(RING_BASE[q] + 0x1000)
    }

    fn used_ring(q: usize) -> GuestAddress {
        GuestAddress(RING_BASE[q] + 0x1400)
    }

    fn slot(q: usize, d: u16) -> u64 {
        SLOT_BASE[q] + u64::from(d) * SLOT[q]
    }

    fn queue(q: usize) -> Queue {
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        let lo = |a: u64| Some(u32::try_from(a & 0xffff_ffff).unwrap());
        let hi = |a: u64| Some(u32::try_from(a >> 32).unwrap());
        let (d, a, u) = (
            RING_BASE[q],
            Self::avail(q).raw_value(),
            Self::used_ring(q).raw_value(),
        );
        queue.set_desc_table_address(lo(d), hi(d));
        queue.set_avail_ring_address(lo(a), hi(a));
        queue.set_used_ring_address(lo(u), hi(u));
        queue.set_ready(true);
        queue
    }

    /// Puts a chain on queue q: (length, flags) per descriptor, each in
    /// its own slot; returns the descriptor indices.
    fn push(&mut self, q: usize, descs: &[(u32, u16)]) -> Vec<u16> {
        let idx: Vec<u16> = (0..descs.len())
            .map(|_| self.free[q].pop().expect("out of descriptors"))
            .collect();
        for (i, &(len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match idx.get(i + 1) {
                Some(&n) => (flags | F_NEXT, n),
                None => (flags, 0),
            };
            let d = SplitDescriptor::new(Self::slot(q, idx[i]), len, flags, next);
            self.mem
                .write_obj(
                    RawDescriptor::from(d),
                    GuestAddress(RING_BASE[q] + 16 * u64::from(idx[i])),
                )
                .unwrap();
        }
        let avail = Self::avail(q);
        let at: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
        self.mem
            .write_obj(
                idx[0],
                avail.unchecked_add(4 + 2 * u64::from(at % QUEUE_SIZE)),
            )
            .unwrap();
        self.mem
            .write_obj(at.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
        self.chains[q].insert(idx[0], idx.clone());
        idx
    }

    /// New used entries of queue q: (head, length); descriptors are freed.
    fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = Self::used_ring(q);
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let at = used.unchecked_add(4 + 8 * u64::from(self.used_seen[q] % QUEUE_SIZE));
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            let head = u16::try_from(id).unwrap();
            let chain = self.chains[q].remove(&head).unwrap();
            self.free[q].extend(chain);
            out.push((head, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }
}

/// A device on its event loop, a guest, and one established connection.
struct Rig {
    guest: Guest,
    dev: Arc<Mutex<Vsock>>,
    manager: EventManager<Arc<Mutex<Vsock>>>,
    host: UnixStream,
    guest_port: u32,
    host_port: u32,
    /// Bytes the guest received (its fwd_cnt).
    received: u32,
    dir: PathBuf,
}

impl Rig {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("dormouse-vsock-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let _ = std::fs::remove_file(&uds);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &uds).unwrap()));
        let mut manager = EventManager::new().unwrap();
        manager.add_subscriber(dev.clone());
        let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
        dev.lock()
            .unwrap()
            .activate(mem.clone(), interrupt, (0..3).map(Guest::queue).collect())
            .unwrap();
        let guest = Guest {
            mem,
            free: std::array::from_fn(|_| (0..QUEUE_SIZE).rev().collect()),
            chains: Default::default(),
            used_seen: [0; 3],
        };
        let mut host = UnixStream::connect(&uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let guest_port = 1234;
        host.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let mut rig = Self {
            guest,
            dev,
            manager,
            host,
            guest_port,
            host_port: 0,
            received: 0,
            dir,
        };
        rig.pump();
        // The REQUEST, then the guest's RESPONSE, then the host's OK line.
        let req = rig.receive();
        assert_eq!(u16_at(&req, 30), OP_REQUEST);
        rig.host_port = u32_at(&req, 16);
        rig.send(&header(OP_RESPONSE, guest_port, rig.host_port, 0, 0), 0);
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            rig.host.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        assert!(line.starts_with(b"OK "));
        rig
    }

    fn pump(&mut self) {
        while self.manager.run_with_timeout(0).unwrap() > 0 {}
    }

    fn kick(&mut self, q: usize) {
        self.dev.lock().unwrap().queue_events()[q].write(1).unwrap();
    }

    /// Gives one rx buffer and returns the one packet it gets.
    fn receive(&mut self) -> Vec<u8> {
        self.guest.push(RXQ, &[(RX_BUF, F_WRITE)]);
        self.kick(RXQ);
        self.pump();
        let used = self.guest.used(RXQ);
        assert_eq!(used.len(), 1);
        let (head, len) = used[0];
        let mut b = vec![0u8; usize::try_from(len).unwrap()];
        self.guest
            .mem
            .read_slice(&mut b, GuestAddress(Guest::slot(RXQ, head)))
            .unwrap();
        b
    }

    /// Sends a header and `data_len` bytes of whatever the data slot holds.
    fn send(&mut self, hdr: &[u8; HDR_LEN], data_len: u32) {
        let descs: &[(u32, u16)] = if data_len == 0 {
            &[(44, 0)]
        } else {
            &[(44, 0), (data_len, 0)]
        };
        let idx = self.guest.push(TXQ, descs);
        self.guest
            .mem
            .write_slice(hdr, GuestAddress(Guest::slot(TXQ, idx[0])))
            .unwrap();
        self.kick(TXQ);
        self.pump();
        self.guest.used(TXQ);
    }

    /// Host → guest: 64 KiB written by the host, taken by the guest in
    /// 4 KiB rx buffers; credit returned at the end.
    fn host_to_guest(&mut self, data: &[u8]) {
        self.host.write_all(data).unwrap();
        let mut got = 0;
        while got < data.len() {
            let n = 32.min(self.guest.free[RXQ].len());
            for _ in 0..n {
                self.guest.push(RXQ, &[(RX_BUF, F_WRITE)]);
            }
            self.kick(RXQ);
            self.pump();
            for (_, len) in self.guest.used(RXQ) {
                got += usize::try_from(len).unwrap() - HDR_LEN;
            }
        }
        self.received = self
            .received
            .wrapping_add(u32::try_from(data.len()).unwrap());
        let cu = header(
            OP_CREDIT_UPDATE,
            self.guest_port,
            self.host_port,
            0,
            self.received,
        );
        self.send(&cu, 0);
    }

    /// Guest → host: one 64 KiB packet, read by the host.
    fn guest_to_host(&mut self, buf: &mut [u8]) {
        let len = u32::try_from(buf.len()).unwrap();
        let hdr = header(OP_RW, self.guest_port, self.host_port, len, self.received);
        self.send(&hdr, len);
        self.host.read_exact(buf).unwrap();
        // Reclaim any CREDIT_UPDATE the device sent.
        if self.guest.free[RXQ].len() > 8 {
            self.guest.push(RXQ, &[(RX_BUF, F_WRITE)]);
            self.kick(RXQ);
            self.pump();
        }
        self.guest.used(RXQ);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("vsock");
    group.throughput(Throughput::Bytes(u64::try_from(CHUNK).unwrap()));

    let mut rig = Rig::new();
    let data = vec![0xa5u8; CHUNK];
    group.bench_function("host_to_guest_64KiB_4KiB_buffers", |b| {
        b.iter(|| rig.host_to_guest(&data))
    });

    let mut buf = vec![0u8; CHUNK];
    group.bench_function("guest_to_host_64KiB_packets", |b| {
        b.iter(|| rig.guest_to_host(&mut buf))
    });
    group.finish();
}

criterion_group! {
    name = vsock;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(vsock);
