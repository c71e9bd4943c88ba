//! One virtio-blk request: a descriptor chain turned into a checked request
//! and run against the disk (virtio 1.2, section 5.2.6).
//!
//! The chain is read as two byte streams, whatever its layout: the
//! device-readable one (the 16-byte header, then OUT data or the
//! discard/write-zeroes segment) and the device-writable one (IN data or the
//! id, then the status byte, which is the last byte of the last
//! descriptor). Everything in it is guest controlled: a request that breaks
//! the protocol gets `VIRTIO_BLK_S_IOERR`, one the device does not offer
//! `VIRTIO_BLK_S_UNSUPP`, and a chain with no writable last byte for the
//! status is returned with used length 0.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::backend::Backend;
use super::disk::{write_id, Segment};
use super::{MAX_DISCARD_SECTORS, QUEUE_SIZE, SECTOR_SHIFT, SECTOR_SIZE};
use crate::memory::GuestMemoryMmap;

/// The request header: type, reserved (ioprio), sector.
const HEADER_LEN: usize = 16;
/// One `virtio_blk_discard_write_zeroes` segment.
const DISCARD_SEGMENT_LEN: usize = 16;
/// The longest chain accepted: no indirect descriptors are offered, so a
/// driver never builds one longer than the queue.
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// What the request needs from the device besides the disk.
#[derive(Clone, Copy, Debug)]
pub(super) struct Negotiated {
    /// Features the driver accepted.
    pub(super) features: u64,
}

impl Negotiated {
    fn has(self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    /// Without VIRTIO_BLK_F_FLUSH the driver expects every write to be on
    /// stable storage when it completes.
    fn write_through(self) -> bool {
        !self.has(virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH)
    }
}

/// A chain split into its two streams, all in guest memory.
#[derive(Debug)]
struct Layout {
    readable: Vec<Segment>,
    /// The writable stream without the status byte.
    writable: Vec<Segment>,
    status: GuestAddress,
    /// Whether the chain broke a rule that still leaves a status byte
    /// (readable after writable, a buffer outside guest memory).
    malformed: bool,
}

/// A chain read into its two streams, not yet run.
#[derive(Debug)]
pub(super) struct Request {
    /// `None` if the chain has no place for the status byte.
    layout: Option<Layout>,
}

impl Request {
    /// Reads `chain`'s descriptors (not the data they point at).
    pub(super) fn parse(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Self {
        Self {
            layout: Layout::parse(mem, chain),
        }
    }

    /// The most data bytes the request can move between guest memory and
    /// the disk, whatever its header says: every buffer but the header
    /// and the status byte. This is what a rate limiter charges, and it
    /// does not depend on guest memory the driver could change before the
    /// request runs.
    pub(super) fn data_len(&self) -> u64 {
        self.layout.as_ref().map_or(0, |l| {
            (total(&l.readable) + total(&l.writable)).saturating_sub(HEADER_LEN as u64)
        })
    }

    /// Runs the request and returns the used length for it.
    pub(super) fn run(
        self,
        disk: &mut Backend,
        mem: &GuestMemoryMmap,
        negotiated: Negotiated,
    ) -> u32 {
        let Some(mut layout) = self.layout else {
            log::debug!("virtio-blk: chain without a writable status byte; returned unanswered");
            return 0;
        };
        let (status, written) = if layout.malformed {
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            execute(disk, mem, &mut layout, negotiated)
        };
        // `status` is one of the VIRTIO_BLK_S_* values, all below 256.
        let status = u8::try_from(status).unwrap_or(u8::MAX);
        if mem.write_obj(status, layout.status).is_err() {
            return 0;
        }
        // The writable stream is at most the chain's length, which
        // virtio-queue caps at u32::MAX bytes, and `written` does not count
        // the status byte.
        u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX)
    }
}

impl Layout {
    /// `None` if there is no place for the status byte.
    fn parse(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Option<Self> {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut malformed = false;
        let mut last = None;
        // virtio-queue ends the chain at a loop, at the queue size and at
        // 4 GiB in total; MAX_DESCRIPTORS bounds what an indirect table
        // could add.
        for (n, desc) in chain.enumerate() {
            if n >= MAX_DESCRIPTORS {
                return None;
            }
            let seg = Segment {
                addr: desc.addr(),
                len: usize::try_from(desc.len()).ok()?,
            };
            if desc.is_write_only() {
                writable.push(seg);
            } else {
                malformed |= !writable.is_empty();
                readable.push(seg);
            }
            last = Some(desc);
        }
        let last = last?;
        if !last.is_write_only() || last.len() == 0 {
            return None;
        }
        let status = last.addr().checked_add(u64::from(last.len()) - 1)?;
        mem.check_address(status)?;
        // The last descriptor is the last writable segment: drop its last byte.
        let tail = writable.last_mut()?;
        tail.len -= 1;
        for seg in readable.iter().chain(&writable) {
            malformed |= !GuestMemoryBackend::check_range(mem, seg.addr, seg.len);
        }
        readable.retain(|s| s.len > 0);
        writable.retain(|s| s.len > 0);
        Some(Self {
            readable,
            writable,
            status,
            malformed,
        })
    }
}

/// Total length of `segments` in bytes.
fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| s.len as u64).sum()
}

/// Reads `buf.len()` bytes from the front of `segments` and removes them.
fn take_front(mem: &GuestMemoryMmap, segments: &mut Vec<Segment>, buf: &mut [u8]) -> Option<()> {
    let mut filled = 0;
    let mut used = 0;
    for seg in segments.iter_mut() {
        if filled == buf.len() {
            break;
        }
        let n = seg.len.min(buf.len() - filled);
        mem.read_slice(&mut buf[filled..filled + n], seg.addr)
            .ok()?;
        filled += n;
        seg.addr = seg.addr.checked_add(n as u64)?;
        seg.len -= n;
        if seg.len == 0 {
            used += 1;
        }
    }
    if filled < buf.len() {
        return None;
    }
    segments.drain(..used);
    Some(())
}

/// Runs a well-formed request: returns the status and the number of bytes
/// written to the guest before the status byte.
fn execute(
    disk: &mut Backend,
    mem: &GuestMemoryMmap,
    layout: &mut Layout,
    negotiated: Negotiated,
) -> (u32, u64) {
    let mut header = [0u8; HEADER_LEN];
    if take_front(mem, &mut layout.readable, &mut header).is_none() {
        return (VIRTIO_BLK_S_IOERR, 0);
    }
    let (kind, _, sector) = parse_header(header);
    match kind {
        VIRTIO_BLK_T_IN => read(disk, mem, layout, sector),
        VIRTIO_BLK_T_OUT => (write(disk, mem, layout, sector, negotiated), 0),
        VIRTIO_BLK_T_FLUSH => match disk.flush() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(e) => {
                crate::guest_warn!("virtio-blk: flush failed: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        },
        VIRTIO_BLK_T_GET_ID => match write_id(mem, &layout.writable, disk.id()) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        },
        VIRTIO_BLK_T_DISCARD if negotiated.has(VIRTIO_BLK_F_DISCARD) => {
            (discard(disk, mem, layout, false), 0)
        }
        VIRTIO_BLK_T_WRITE_ZEROES if negotiated.has(VIRTIO_BLK_F_WRITE_ZEROES) => {
            (discard(disk, mem, layout, true), 0)
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

/// Type, reserved, sector.
fn parse_header(h: [u8; HEADER_LEN]) -> (u32, u32, u64) {
    let [t0, t1, t2, t3, r0, r1, r2, r3, s @ ..] = h;
    (
        u32::from_le_bytes([t0, t1, t2, t3]),
        u32::from_le_bytes([r0, r1, r2, r3]),
        u64::from_le_bytes(s),
    )
}

/// The disk offset of a data transfer of `len` bytes at `sector`, if it is
/// a whole, non-zero number of sectors inside the disk.
fn data_range(disk: &Backend, sector: u64, len: u64) -> Option<u64> {
    if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    disk.range(sector, len)
}

fn read(disk: &Backend, mem: &GuestMemoryMmap, layout: &Layout, sector: u64) -> (u32, u64) {
    // Device-readable data after the header: the driver mixed up directions.
    if !layout.readable.is_empty() {
        return (VIRTIO_BLK_S_IOERR, 0);
    }
    let Some(offset) = data_range(disk, sector, total(&layout.writable)) else {
        return (VIRTIO_BLK_S_IOERR, 0);
    };
    match disk.read_into(mem, &layout.writable, offset) {
        Ok(n) => (VIRTIO_BLK_S_OK, n),
        Err((n, e)) => {
            crate::guest_warn!("virtio-blk: read at sector {sector} failed: {e}");
            (VIRTIO_BLK_S_IOERR, n)
        }
    }
}

fn write(
    disk: &mut Backend,
    mem: &GuestMemoryMmap,
    layout: &Layout,
    sector: u64,
    negotiated: Negotiated,
) -> u32 {
    if disk.read_only() || !layout.writable.is_empty() {
        return VIRTIO_BLK_S_IOERR;
    }
    let Some(offset) = data_range(disk, sector, total(&layout.readable)) else {
        return VIRTIO_BLK_S_IOERR;
    };
    let result = disk
        .write_from(mem, &layout.readable, offset)
        .and_then(|()| {
            if negotiated.write_through() {
                disk.flush()
            } else {
                Ok(())
            }
        });
    match result {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) => {
            crate::guest_warn!("virtio-blk: write at sector {sector} failed: {e}");
            VIRTIO_BLK_S_IOERR
        }
    }
}

/// DISCARD (`zeroes` false) or WRITE_ZEROES (`zeroes` true): exactly one
/// segment (max_discard_seg and max_write_zeroes_seg are 1).
fn discard(disk: &mut Backend, mem: &GuestMemoryMmap, layout: &mut Layout, zeroes: bool) -> u32 {
    if disk.read_only() || total(&layout.readable) != DISCARD_SEGMENT_LEN as u64 {
        return VIRTIO_BLK_S_IOERR;
    }
    let mut seg = [0u8; DISCARD_SEGMENT_LEN];
    if take_front(mem, &mut layout.readable, &mut seg).is_none() {
        return VIRTIO_BLK_S_IOERR;
    }
    // Same layout as the header: sector u64, num_sectors u32, flags u32.
    let [s @ .., n0, n1, n2, n3, f0, f1, f2, f3] = seg;
    let sector = u64::from_le_bytes(s);
    let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
    let flags = u32::from_le_bytes([f0, f1, f2, f3]);
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    // Unknown flags, and unmap on a discard, are unsupported (5.2.6.2).
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && !zeroes) {
        return VIRTIO_BLK_S_UNSUPP;
    }
    if sectors > MAX_DISCARD_SECTORS {
        return VIRTIO_BLK_S_IOERR;
    }
    let len = u64::from(sectors) << SECTOR_SHIFT;
    let Some(offset) = disk.range(sector, len) else {
        return VIRTIO_BLK_S_IOERR;
    };
    if len == 0 {
        return VIRTIO_BLK_S_OK;
    }
    let result = if zeroes && !unmap {
        disk.zero_range(offset, len)
    } else {
        disk.punch_hole(offset, len)
    };
    match result {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => VIRTIO_BLK_S_UNSUPP,
        Err(e) => {
            crate::guest_warn!("virtio-blk: discard/write-zeroes at sector {sector} failed: {e}");
            VIRTIO_BLK_S_IOERR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_are_little_endian() {
        let mut h = [0u8; HEADER_LEN];
        h[0] = 1;
        h[4] = 2;
        h[8..].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(parse_header(h), (1, 2, 0x0102_0304_0506_0708));
    }

    #[test]
    fn take_front_splits_segments() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        mem.write_slice(&[1, 2, 3], GuestAddress(0x100)).unwrap();
        mem.write_slice(&[4, 5, 6], GuestAddress(0x200)).unwrap();
        let mut segs = vec![
            Segment {
                addr: GuestAddress(0x100),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 3,
            },
        ];
        let mut buf = [0u8; 4];
        take_front(&mem, &mut segs, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        assert_eq!(
            segs,
            vec![Segment {
                addr: GuestAddress(0x201),
                len: 2
            }]
        );
        let mut big = [0u8; 3];
        assert!(take_front(&mem, &mut segs, &mut big).is_none());
    }
}
