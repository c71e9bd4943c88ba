//! The driver's side of a split virtqueue: descriptor chains built from the
//! fuzz input, the available ring, and checks of what the device puts in
//! the used ring.
//!
//! The rings are laid out here (not with virtio-queue's `MockSplitQueue`,
//! whose used ring overlaps its avail ring for large queues and which does
//! not wrap the avail index). The driver keeps a second `Queue` over the
//! same rings ("shadow"). Before every event-loop pass it walks, from the
//! first one not yet used, every chain on the avail ring as the device
//! will see it in that pass (the input may rewrite descriptors and ring
//! slots of chains already made available, as a buggy driver could), so it
//! knows each chain's buffers exactly. dormouse's devices use chains in the
//! order the avail ring gives them, which the checks rely on.

use std::collections::VecDeque;

use dormouse::devices::virtio::Queue;
use virtio_queue::{QueueOwnedT, QueueT};

use crate::guest::{Guest, Range};
use crate::input::Input;

/// `VRING_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = 4;

/// Bytes a queue of up to 256 entries needs at its base: the descriptor
/// table (4 KiB), the avail ring at +4 KiB, the used ring at +5 KiB.
pub const RING_SPAN: u64 = 0x2000;
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x1400;
/// Largest queue the layout has room for.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Where chains may point.
#[derive(Debug, Clone, Copy)]
pub struct Areas {
    /// Buffers: `[start, end)`, disjoint from every ring and indirect table.
    pub data: Range,
    /// Indirect descriptor tables: 16 slots of 8 descriptors.
    pub indirect: u64,
    /// The end of guest memory.
    pub mem_end: u64,
}

/// Indirect table slots in [`Areas::indirect`], each 8 descriptors long.
pub const INDIRECT_SLOTS: u64 = 16;
/// Bytes of one indirect table slot.
const INDIRECT_SLOT: u64 = 8 * 16;
/// Bytes [`Areas::indirect`] must have.
pub const INDIRECT_SPAN: u64 = INDIRECT_SLOTS * INDIRECT_SLOT;

/// One descriptor as the input describes it (8 bytes, see
/// [`Ring::add_chain_from`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescSpec {
    /// Bit 0 device-writable, bit 1 indirect table (the next `aux % 8`
    /// descriptors of the input go in it), bit 2 `aux` is the raw next
    /// index, bit 3 a wild address (outside guest memory, straddling its
    /// end or wrapping around), bit 4 flips whether NEXT is set.
    pub mode: u8,
    /// The address: an offset into the data area unless wild.
    pub addr: u32,
    /// The length.
    pub len: u16,
    /// The raw next index or the indirect table's length.
    pub aux: u8,
}

impl DescSpec {
    /// Reads one from the input.
    pub fn read(input: &mut Input<'_>) -> Self {
        Self {
            mode: input.u8(),
            addr: input.u32(),
            len: input.u16(),
            aux: input.u8(),
        }
    }

    /// The 8 bytes [`read`](Self::read) reads.
    pub fn encode(&self) -> [u8; 8] {
        let a = self.addr.to_le_bytes();
        let l = self.len.to_le_bytes();
        [self.mode, a[0], a[1], a[2], a[3], l[0], l[1], self.aux]
    }

    /// A plain device-readable buffer at data offset `addr`.
    pub fn r(addr: u32, len: u16) -> Self {
        Self {
            mode: 0,
            addr,
            len,
            aux: 0,
        }
    }

    /// A plain device-writable buffer at data offset `addr`.
    pub fn w(addr: u32, len: u16) -> Self {
        Self {
            mode: 1,
            addr,
            len,
            aux: 0,
        }
    }

    /// The guest address it stands for.
    fn address(&self, areas: &Areas) -> u64 {
        let a = u64::from(self.addr);
        if self.mode & 8 == 0 {
            let (start, end) = areas.data;
            return start + a % (end - start).max(1);
        }
        match a % 3 {
            0 => areas.mem_end.saturating_sub(a >> 2 & 0xfff),
            1 => u64::MAX - (a >> 2 & 0xfff),
            _ => (1u64 << 32) + a,
        }
    }
}

/// The driver's view of one split queue.
#[derive(Debug)]
pub struct Ring {
    /// The descriptor table's address.
    pub desc: u64,
    /// The avail ring's address.
    pub avail: u64,
    /// The used ring's address.
    pub used: u64,
    /// The queue size.
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    next_indirect: u64,
    shadow: Queue,
    /// The chains on the avail ring not yet used, in ring order, with
    /// their heads (as of the last [`expect`](Self::expect)).
    outstanding: VecDeque<(u16, Chain)>,
    /// The avail ring is bad as of the last [`expect`](Self::expect) (the
    /// shadow could not read it): the pass's used elements are not checked.
    corrupt: bool,
}

/// A queue set up by the driver as the transport would hand it to the
/// device: ready, with the given size and ring addresses.
pub fn device_queue(size: u16, desc: u64, avail: u64, used: u64) -> Queue {
    let mut q = Queue::new(MAX_QUEUE_SIZE).expect("queue");
    q.set_size(size);
    let split = |a: u64| {
        (
            Some(u32::try_from(a & 0xffff_ffff).unwrap_or(0)),
            Some(u32::try_from(a >> 32).unwrap_or(0)),
        )
    };
    let (lo, hi) = split(desc);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(avail);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(used);
    q.set_used_ring_address(lo, hi);
    q.set_ready(true);
    q
}

/// A queue size from a byte: a power of two from 1 to 256.
pub fn queue_size(b: u8) -> u16 {
    1 << (b % 9)
}

impl Ring {
    /// Lays out a queue of `size` entries at `base` (zeroing its ring
    /// headers) and returns the driver's view and the device's queue.
    pub fn new(guest: &mut Guest, base: u64, size: u16) -> (Self, Queue) {
        let size = size.clamp(1, MAX_QUEUE_SIZE);
        let (desc, avail, used) = (base, base + AVAIL_OFFSET, base + USED_OFFSET);
        guest.write(desc, &[0; 16 * MAX_QUEUE_SIZE as usize]);
        guest.write(avail, &[0; 4]);
        guest.write(used, &[0; 4]);
        let ring = Self {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            next_indirect: 0,
            shadow: device_queue(size, desc, avail, used),
            outstanding: VecDeque::new(),
            corrupt: false,
        };
        (ring, device_queue(size, desc, avail, used))
    }

    /// The bytes the device may write for this queue: its used ring
    /// (with `avail_event`).
    pub fn used_ring_range(&self) -> Range {
        (self.used, self.used + 6 + 8 * u64::from(self.size))
    }

    /// Writes descriptor `index`.
    pub fn write_desc(
        &self,
        guest: &mut Guest,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + 16 * u64::from(index % self.size);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        guest.write(at, &raw);
    }

    /// Reads a chain from the input, writes it to the next free
    /// descriptors and makes it available; returns its head. Format: a
    /// byte `n` (the chain has `n % 8 + 1` descriptors), then `n` 8-byte
    /// [`DescSpec`]s (an indirect one is followed by its table's entries).
    pub fn add_chain_from(
        &mut self,
        guest: &mut Guest,
        input: &mut Input<'_>,
        areas: &Areas,
    ) -> u16 {
        let n = usize::from(input.u8() % 8) + 1;
        let specs: Vec<DescSpec> = (0..n).map(|_| DescSpec::read(input)).collect();
        let mut tables = Vec::new();
        for s in &specs {
            if s.mode & 2 != 0 {
                let k = usize::from(s.aux % 8);
                tables.push((0..k).map(|_| DescSpec::read(input)).collect::<Vec<_>>());
            }
        }
        self.add_chain(guest, &specs, &tables, areas)
    }

    /// Writes a chain (`tables` holds the entries of its indirect
    /// descriptors, in order) and makes it available; returns its head.
    pub fn add_chain(
        &mut self,
        guest: &mut Guest,
        specs: &[DescSpec],
        tables: &[Vec<DescSpec>],
        areas: &Areas,
    ) -> u16 {
        let head = self.next_desc % self.size;
        let mut tables = tables.iter();
        for (i, s) in specs.iter().enumerate() {
            let index = (self.next_desc + u16::try_from(i).unwrap_or(0)) % self.size;
            let last = i + 1 == specs.len();
            let (addr, len, mut flags) = if s.mode & 2 != 0 {
                let entries = tables.next().map(Vec::as_slice).unwrap_or(&[]);
                let table = self.write_indirect(guest, entries, areas);
                let len = if s.mode & 8 != 0 {
                    u32::from(s.len)
                } else {
                    16 * u32::try_from(entries.len()).unwrap_or(0)
                };
                (table, len, F_INDIRECT | (u16::from(s.mode & 1) * F_WRITE))
            } else {
                (
                    s.address(areas),
                    u32::from(s.len),
                    u16::from(s.mode & 1) * F_WRITE,
                )
            };
            let mut next = (index + 1) % self.size;
            if s.mode & 4 != 0 {
                next = u16::from(s.aux);
            }
            if last == (s.mode & 16 != 0) {
                flags |= F_NEXT;
            }
            self.write_desc(guest, index, addr, len, flags, next);
        }
        self.next_desc = (self.next_desc + u16::try_from(specs.len()).unwrap_or(0)) % self.size;
        self.publish(guest, head);
        head
    }

    /// Writes an indirect table (chained in order) into the next slot;
    /// returns its address.
    fn write_indirect(&mut self, guest: &mut Guest, entries: &[DescSpec], areas: &Areas) -> u64 {
        let table = areas.indirect + (self.next_indirect % INDIRECT_SLOTS) * INDIRECT_SLOT;
        self.next_indirect += 1;
        for (i, s) in entries.iter().enumerate() {
            let last = i + 1 == entries.len();
            let mut flags = u16::from(s.mode & 1) * F_WRITE;
            if s.mode & 2 != 0 {
                // A nested indirect descriptor: virtio-queue refuses it.
                flags |= F_INDIRECT;
            }
            let mut next = u16::try_from(i + 1).unwrap_or(0);
            if s.mode & 4 != 0 {
                next = u16::from(s.aux);
            }
            if last == (s.mode & 16 != 0) {
                flags |= F_NEXT;
            }
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&s.address(areas).to_le_bytes());
            raw[8..12].copy_from_slice(&u32::from(s.len).to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            guest.write(table + 16 * i as u64, &raw);
        }
        table
    }

    /// Puts `head` on the avail ring and bumps its index.
    pub fn publish(&mut self, guest: &mut Guest, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        guest.write_obj(self.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        guest.write_obj(self.avail + 2, self.avail_idx);
    }

    /// Writes the avail index as a lying driver would.
    pub fn set_avail_idx(&mut self, guest: &mut Guest, idx: u16) {
        self.avail_idx = idx;
        guest.write_obj(self.avail + 2, idx);
    }

    /// Writes the avail ring's flags (bit 0: no interrupts, please) or, with
    /// `event` set, its `used_event` field.
    pub fn set_avail_flags(&mut self, guest: &mut Guest, value: u16, event: bool) {
        if event {
            guest.write_obj(self.avail + 4 + 2 * u64::from(self.size), value);
        } else {
            guest.write_obj(self.avail, value);
        }
    }

    /// Walks every chain on the avail ring from the first one not yet
    /// used, as the device will see it in the coming pass.
    pub fn expect(&mut self, guest: &Guest) {
        self.corrupt = false;
        self.outstanding.clear();
        self.shadow.set_next_avail(self.used_seen);
        let mem = &guest.mem;
        let mut iter = match self.shadow.iter(mem) {
            Ok(iter) => iter,
            Err(_) => {
                self.corrupt = true;
                return;
            }
        };
        for chain in &mut iter {
            let head = chain.head_index();
            let mut c = Chain::default();
            for d in chain {
                let start = d.addr().0;
                let range = (start, start.saturating_add(u64::from(d.len())));
                if d.is_write_only() {
                    c.writable += u64::from(d.len());
                    c.ranges.push(range);
                } else {
                    c.readable.push(range);
                }
            }
            self.outstanding.push_back((head, c));
        }
    }

    /// The writable ranges of every outstanding chain, and the used ring.
    pub fn allowed(&self, out: &mut Vec<Range>) {
        out.push(self.used_ring_range());
        if self.corrupt {
            // The avail ring is garbage: the device may have read chains
            // the shadow could not. Allow any data buffer.
            out.push((0, u64::MAX));
            return;
        }
        for (_, c) in &self.outstanding {
            out.extend_from_slice(&c.ranges);
        }
    }

    /// Reads the used elements the device added since the last call and
    /// checks each: the head of the next chain on the avail ring, a length
    /// within its writable bytes.
    pub fn take_used(&mut self, guest: &Guest) -> Vec<Used> {
        let idx: u16 = guest.read_obj(self.used + 2);
        let new = idx.wrapping_sub(self.used_seen);
        let outstanding = self.outstanding.len();
        if !self.corrupt {
            assert!(
                usize::from(new) <= outstanding,
                "the device used {new} buffers but only {outstanding} were available"
            );
        }
        let mut out = Vec::new();
        for _ in 0..new {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = guest.read_obj(at);
            let len: u32 = guest.read_obj(at + 4);
            self.used_seen = self.used_seen.wrapping_add(1);
            let head = u16::try_from(id).unwrap_or(u16::MAX);
            if self.corrupt {
                out.push(Used {
                    head,
                    len,
                    chain: Chain::default(),
                });
                continue;
            }
            let Some((expected, chain)) = self.outstanding.pop_front() else {
                panic!("the device used head {id}, which the driver did not make available");
            };
            assert_eq!(
                head, expected,
                "the device used head {id} where the avail ring has {expected}"
            );
            assert!(
                u64::from(len) <= chain.writable,
                "used length {len} for head {head} exceeds its {} writable bytes",
                chain.writable
            );
            out.push(Used { head, len, chain });
        }
        out
    }

    /// Whether the avail ring was bad for the last pass.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt
    }

    /// The first chain of the last [`expect`](Self::expect) that the
    /// device has not used (after [`take_used`](Self::take_used): the one
    /// it tries next). `None` if there is none or the ring is corrupt.
    pub fn front(&self) -> Option<&Chain> {
        if self.corrupt {
            return None;
        }
        self.outstanding.front().map(|(_, c)| c)
    }
}

/// A chain as the device saw it when it was made available.
#[derive(Debug, Default, Clone)]
pub struct Chain {
    /// Its device-writable bytes.
    pub writable: u64,
    /// Its device-writable buffers, in order.
    pub ranges: Vec<Range>,
    /// Its device-readable buffers, in order.
    pub readable: Vec<Range>,
}

impl Chain {
    /// Whether its writable buffers overlap nowhere (then what the device
    /// wrote into one is not overwritten by its write into another).
    pub fn disjoint(&self) -> bool {
        let mut r: Vec<Range> = self.ranges.iter().copied().filter(|(s, e)| s < e).collect();
        r.sort_unstable();
        r.windows(2).all(|w| w[0].1 <= w[1].0)
    }

    /// Whether its readable buffers hold `bytes` from offset `from` on,
    /// and are exactly as long: now, or (`before`) as they were before the
    /// last [`Guest::check`]'s pass, when the device read them.
    pub fn holds(&self, guest: &Guest, bytes: &[u8], from: usize, before: bool) -> bool {
        let total: u64 = self.readable.iter().map(|(s, e)| e.saturating_sub(*s)).sum();
        // Empty buffers are never touched, wherever they point.
        let outside = |&(s, e): &Range| s < e && e > guest.size();
        if total != bytes.len() as u64 || self.readable.iter().any(outside) {
            return false;
        }
        let view = guest.view();
        let mut at = 0usize;
        for &(s, e) in self.readable.iter().filter(|(s, e)| s < e) {
            // Inside guest memory (checked above), so these fit usize.
            let (s, n) = (s as usize, (e - s) as usize);
            let skip = from.saturating_sub(at).min(n);
            let want = &bytes[at + skip..at + n];
            let same = if before {
                guest.read_before((s + skip) as u64, n - skip) == want
            } else {
                &view[s + skip..s + n] == want
            };
            if !same {
                return false;
            }
            at += n;
        }
        true
    }
}

/// A used element, checked.
#[derive(Debug)]
pub struct Used {
    /// The chain's head.
    pub head: u16,
    /// The used length.
    pub len: u32,
    /// The chain (empty when the avail ring was corrupt).
    pub chain: Chain,
}

impl Used {
    /// The guest ranges holding the first `len` bytes of the chain's
    /// writable buffers: where the device may have written.
    pub fn written_ranges(&self) -> Vec<Range> {
        let mut out = Vec::new();
        let mut left = u64::from(self.len);
        for &(start, end) in &self.chain.ranges {
            if left == 0 {
                break;
            }
            let n = left.min(end - start);
            out.push((start, start + n));
            left -= n;
        }
        out
    }

    /// The first `len` bytes the device wrote into the chain.
    pub fn written(&self, guest: &Guest) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = self.len as usize;
        for &(start, end) in &self.chain.ranges {
            if left == 0 {
                break;
            }
            let n = left.min(usize::try_from(end - start).unwrap_or(usize::MAX));
            out.extend_from_slice(&guest.read(start, n));
            left -= n;
        }
        out
    }
}
