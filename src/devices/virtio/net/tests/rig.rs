//! A driver's side of the queues, and a device wired to a socket pair.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::super::{Net, Tap, VNET_HDR_LEN};
use crate::devices::virtio::{interrupt_status, Interrupt, Queue, VirtioDevice};
use crate::devices::EventFdTrigger;
use crate::memory::GuestMemoryMmap;

/// Guest memory size in the tests.
pub const MEM_SIZE: u64 = 0x100_0000;
/// An address past the end of guest memory.
pub const OUTSIDE: u64 = 0x1_0000_0000;
/// The guest's MAC address.
pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Queue size the mock driver sets up.
pub const QUEUE_SIZE: u16 = 256;

/// A descriptor flag as the u16 the ring stores.
fn flag(f: u32) -> u16 {
    u16::try_from(f).unwrap()
}

/// One descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// The driver's view of one split queue in guest memory.
pub struct DriverQueue {
    desc_table: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl DriverQueue {
    /// Lays out a queue at `base` and gives the device's copy of it.
    pub fn new(mem: &GuestMemoryMmap, base: u64) -> (Self, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE);
        let queue = mock.create_queue::<Queue>().unwrap();
        let dq = DriverQueue {
            desc_table: mock.desc_table_addr().0,
            avail: mock.avail_addr().0,
            used: mock.used_addr().0,
            size: QUEUE_SIZE,
            next_desc: 0,
            avail_idx: 0,
        };
        (dq, queue)
    }

    /// Writes descriptor `index` as given.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc_table + 16 * u64::from(index));
        mem.write_obj(Descriptor::new(addr, len, flags, next), at)
            .unwrap();
    }

    /// Builds a chain of `descs` from the next free descriptors and makes
    /// it available; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % self.size;
            self.next_desc = next;
            let mut flags = if d.writable {
                flag(VRING_DESC_F_WRITE)
            } else {
                0
            };
            if i + 1 < descs.len() {
                flags |= flag(VRING_DESC_F_NEXT);
            }
            self.write_desc(mem, index, d.addr, d.len, flags, next);
        }
        self.publish(mem, head);
        head
    }

    /// Reserves `n` descriptor indices for hand-written chains.
    pub fn reserve(&mut self, n: u16) -> u16 {
        let first = self.next_desc;
        self.next_desc = (first + n) % self.size;
        first
    }

    /// Puts `head` on the available ring.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes the available index as a (possibly lying) driver would.
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `i`: (head, length).
    pub fn used(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let slot = u64::from(i % self.size);
        let e: VirtqUsedElem = mem
            .read_obj(GuestAddress(self.used + 4 + 8 * slot))
            .unwrap();
        (e.id(), e.len())
    }
}

/// A device on a socket pair, activated by a mock driver. `N` is how the
/// test holds the device: itself, or shared with an event loop.
pub struct Rig<N = Net> {
    pub mem: GuestMemoryMmap,
    pub net: N,
    /// The kernel's end of the "TAP".
    pub peer: UnixDatagram,
    pub interrupt: Arc<Interrupt>,
    pub rxq: DriverQueue,
    pub txq: DriverQueue,
    next_buf: u64,
}

/// A device on a socket pair, not activated.
pub fn device() -> (Net, UnixDatagram) {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    peer.set_nonblocking(true).unwrap();
    let tap = Tap::from_frame_socket(OwnedFd::from(ours), "test-tap").unwrap();
    (Net::with_tap(tap, MAC).unwrap(), peer)
}

impl Rig {
    /// An activated device on a socket pair.
    pub fn new() -> Self {
        let (net, peer) = device();
        Self::with_net(net, peer)
    }

    /// Activates `net`.
    pub fn with_net(net: Net, peer: UnixDatagram) -> Self {
        let t = Self::activated(net, peer);
        // Activation kicked both queues; the tests run passes themselves.
        for evt in &t.net.queue_events {
            assert_eq!(evt.read().unwrap(), 1);
        }
        t
    }

    /// Activates `net`, leaving the activation's queue kicks pending.
    pub fn activated(mut net: Net, peer: UnixDatagram) -> Self {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())])
                .unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
        let (rxq, rx) = DriverQueue::new(&mem, 0x1_0000);
        let (txq, tx) = DriverQueue::new(&mem, 0x2_0000);
        net.activate(mem.clone(), interrupt.clone(), vec![rx, tx])
            .unwrap();
        Rig {
            mem,
            net,
            peer,
            interrupt,
            rxq,
            txq,
            next_buf: 0x10_0000,
        }
    }

    /// The same rig holding the device another way.
    pub fn map_net<M>(self, f: impl FnOnce(Net) -> M) -> Rig<M> {
        Rig {
            mem: self.mem,
            net: f(self.net),
            peer: self.peer,
            interrupt: self.interrupt,
            rxq: self.rxq,
            txq: self.txq,
            next_buf: self.next_buf,
        }
    }
}

impl<N> Rig<N> {
    /// A fresh guest buffer of `len` bytes (4 KiB aligned).
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buf;
        self.next_buf += (u64::from(len) + 0xfff) & !0xfff;
        assert!(self.next_buf <= MEM_SIZE, "test ran out of guest memory");
        addr
    }

    /// Puts `parts` in guest buffers, one descriptor each, as a transmit
    /// chain; returns its head.
    pub fn add_tx(&mut self, parts: &[&[u8]]) -> u16 {
        let descs: Vec<Desc> = parts
            .iter()
            .map(|p| {
                let len = u32::try_from(p.len()).unwrap();
                let addr = self.alloc(len.max(1));
                self.mem.write_slice(p, GuestAddress(addr)).unwrap();
                Desc {
                    addr,
                    len,
                    writable: false,
                }
            })
            .collect();
        self.txq.add_chain(&self.mem, &descs)
    }

    /// A receive chain of writable buffers of these sizes; returns its head
    /// and the buffers' addresses.
    pub fn add_rx(&mut self, lens: &[u32]) -> (u16, Vec<u64>) {
        let descs: Vec<Desc> = lens
            .iter()
            .map(|&len| Desc {
                addr: self.alloc(len.max(1)),
                len,
                writable: true,
            })
            .collect();
        let addrs = descs.iter().map(|d| d.addr).collect();
        (self.rxq.add_chain(&self.mem, &descs), addrs)
    }

    /// Concatenates guest buffers.
    pub fn read_guest(&self, bufs: &[(u64, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, len) in bufs {
            let mut b = vec![0u8; len];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
        }
        out
    }

    /// The next frame the device wrote to the "TAP", if any.
    pub fn peer_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        match self.peer.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("peer recv: {e}"),
        }
    }

    /// Sends a frame from the "kernel" to the device.
    pub fn peer_send(&self, with_header: &[u8]) {
        assert_eq!(self.peer.send(with_header).unwrap(), with_header.len());
    }

    /// Whether a used-buffer interrupt is pending; acknowledges it.
    pub fn take_used_irq(&self) -> bool {
        let pending = self.interrupt.status() & interrupt_status::USED_RING != 0;
        self.interrupt.ack(interrupt_status::USED_RING);
        pending
    }

    /// Whether the device flagged a configuration change (its failure).
    pub fn config_irq(&self) -> bool {
        self.interrupt.status() & interrupt_status::CONFIG_CHANGE != 0
    }
}

/// An Ethernet frame of `len` bytes: to the guest's MAC, a local
/// experimental ethertype, then a pattern seeded with `seed`.
pub fn ether(len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    f.extend_from_slice(&[0x88, 0xb5]);
    let mut x = seed;
    while f.len() < len {
        x = x.wrapping_mul(31).wrapping_add(7);
        f.push(x);
    }
    f.truncate(len);
    f
}

/// `frame` behind a virtio-net header with these flags and gso_type.
pub fn with_header(flags: u8, gso_type: u8, frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v[0] = flags;
    v[1] = gso_type;
    v.extend_from_slice(frame);
    v
}
