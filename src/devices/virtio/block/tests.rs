//! Device tests over a mock split queue and a temporary disk image.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_SCSI_CMD, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};

use super::{Block, BlockError, QUEUE_SIZE};
use crate::devices::virtio::{
    interrupt_status, ActivateError, Interrupt, Queue, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::devices::EventFdTrigger;
use crate::memory::GuestMemoryMmap;
use crate::rate_limiter::{
    BucketKind, RateLimiterConfig, RateLimiterConfigError, RateLimiterError, TokenBucketConfig,
};

#[path = "tests_layered.rs"]
mod layered;

const MEM_SIZE: u64 = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const DATA2: u64 = 0x40_0000;
const STATUS: u64 = 0x30_0000;
/// Where the used ring goes: virtio-queue 0.18's `MockSplitQueue` lays its
/// used ring over the second half of its avail ring (its `end()` counts ring
/// entries, not bytes), so the tests move it.
const USED_RING: u64 = 0x8000;
/// Sectors in the test disk.
const SECTORS: u64 = 64;
const S: u32 = 512;

/// A disk image in the temp directory, removed on drop.
struct TempDisk {
    path: PathBuf,
}

impl TempDisk {
    fn new(size: u64) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "dormouse-blk-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        File::create(&path).unwrap().set_len(size).unwrap();
        Self { path }
    }

    fn file(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.file().read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.file().write_all_at(data, offset).unwrap();
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())]).unwrap()
}

/// A descriptor: device-readable or device-writable buffer.
#[derive(Clone, Copy)]
enum D {
    R(u64, u32),
    W(u64, u32),
}

/// The driver side: a mock queue, its avail ring and the device.
struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    dev: Block,
    interrupt: Arc<Interrupt>,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl<'a> Rig<'a> {
    /// A device on `path` with every offered feature acked, activated.
    fn new(mem: &'a GuestMemoryMmap, path: &Path, read_only: bool) -> Self {
        let mut dev = Block::new(path, read_only).unwrap();
        dev.set_acked_features(dev.device_features());
        Self::with_device(mem, dev)
    }

    /// Activates `dev` (features already acked) over a fresh mock queue.
    fn with_device(mem: &'a GuestMemoryMmap, dev: Block) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let mut rig = Self {
            mem,
            vq,
            dev,
            interrupt: Arc::new(Interrupt::new(EventFdTrigger::new().unwrap())),
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        rig.activate();
        rig
    }

    fn activate(&mut self) {
        let mut queue: Queue = self.vq.create_queue().unwrap();
        queue.set_used_ring_address(Some(u32::try_from(USED_RING).unwrap()), Some(0));
        self.dev
            .activate(self.mem.clone(), self.interrupt.clone(), vec![queue])
            .unwrap();
        assert!(self.dev.is_activated());
        // activate() kicks the eventfd for the event loop; drain it.
        assert_eq!(self.dev.queue_events()[0].read().unwrap(), 1);
    }

    /// Puts raw descriptors at the next table slots (as given, no flag
    /// fix-ups) and returns the first slot.
    fn put_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let first = self.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let slot = (first + u16::try_from(i).unwrap()) % QUEUE_SIZE;
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.vq.desc_table().store(slot, desc).unwrap();
        }
        self.next_desc = (first + u16::try_from(descs.len()).unwrap()) % QUEUE_SIZE;
        first
    }

    /// Adds a chain to the table and makes it available.
    fn add_chain(&mut self, descs: &[D]) -> u16 {
        let first = self.next_desc;
        let n = descs.len();
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (addr, len, mut flags) = match *d {
                    D::R(a, l) => (a, l, 0),
                    D::W(a, l) => (a, l, F_WRITE),
                };
                let next = (first + u16::try_from(i + 1).unwrap()) % QUEUE_SIZE;
                if i + 1 < n {
                    flags |= F_NEXT;
                }
                (addr, len, flags, next)
            })
            .collect();
        let head = self.put_raw(&raw);
        self.make_available(head);
        head
    }

    fn make_available(&mut self, head: u16) {
        let avail = self.vq.avail_addr();
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(head, avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, self.vq.avail_addr().unchecked_add(2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED_RING).unchecked_add(2))
            .unwrap()
    }

    /// The next used element (id, len); panics if there is none.
    fn next_used(&mut self) -> (u32, u32) {
        assert_ne!(self.used_idx(), self.used_seen, "no used buffer");
        let slot = u64::from(self.used_seen % QUEUE_SIZE);
        let at = GuestAddress(USED_RING).unchecked_add(4 + 8 * slot);
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        (id, len)
    }

    fn write_header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Runs one chain; returns (status byte, used length).
    fn run(&mut self, descs: &[D]) -> (u8, u32) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = self.add_chain(descs);
        self.dev.process_queue();
        let (id, len) = self.next_used();
        assert_eq!(id, u32::from(head));
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (status, len)
    }

    /// A request: header, `data`, then a 1-byte status descriptor.
    fn request(&mut self, kind: u32, sector: u64, data: &[D]) -> (u8, u32) {
        self.write_header(kind, sector);
        let mut descs = vec![D::R(HDR, 16)];
        descs.extend_from_slice(data);
        descs.push(D::W(STATUS, 1));
        self.run(&descs)
    }

    fn fill(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn discard_segment(&self, addr: u64, sector: u64, sectors: u32, flags: u32) {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        self.fill(addr, &seg);
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            seed.wrapping_add(u8::try_from(i % 251).unwrap())
                .wrapping_mul(7)
        })
        .collect()
}

// The status values are 0, 1 and 2 and the flags 1 and 2: they fit.
#[allow(clippy::cast_possible_truncation)]
const OK: u8 = VIRTIO_BLK_S_OK as u8;
#[allow(clippy::cast_possible_truncation)]
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
#[allow(clippy::cast_possible_truncation)]
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
#[allow(clippy::cast_possible_truncation)]
const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
#[allow(clippy::cast_possible_truncation)]
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn disk() -> TempDisk {
    TempDisk::new(SECTORS * 512)
}

#[test]
fn new_refuses_bad_images() {
    let odd = TempDisk::new(1000);
    let err = Block::new(&odd.path, false).unwrap_err();
    assert!(matches!(
        err,
        BlockError::NotSectorAligned { size: 1000, .. }
    ));
    assert!(err.to_string().contains("multiple of 512"), "{err}");

    let missing = std::env::temp_dir().join("dormouse-blk-test-does-not-exist.img");
    let err = Block::new(&missing, true).unwrap_err();
    assert!(matches!(err, BlockError::Open { .. }), "{err}");
}

#[test]
fn features_and_config_space() {
    let d = disk();
    let dev = Block::new(&d.path, false).unwrap();
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.queue_max_sizes(), &[256]);
    assert_eq!(dev.queue_events().len(), 1);
    let f = dev.device_features();
    for bit in [VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);

    let mut capacity = [0u8; 8];
    dev.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS);
    // Byte-wise reads see the same bytes.
    let mut low = [0u8; 4];
    dev.read_config(0, &mut low);
    assert_eq!(u32::from_le_bytes(low), 64);
    let mut seg_max = [0u8; 4];
    dev.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), 254);

    let word = |offset| {
        let mut w = [0u8; 4];
        dev.read_config(offset, &mut w);
        u32::from_le_bytes(w)
    };
    if f & (1 << VIRTIO_BLK_F_DISCARD) != 0 {
        assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(word(36), 1 << 22, "max_discard_sectors");
        assert_eq!(word(40), 1, "max_discard_seg");
        assert_eq!(word(44), 8, "discard_sector_alignment");
        assert_eq!(word(48), 1 << 22, "max_write_zeroes_sectors");
        assert_eq!(word(52), 1, "max_write_zeroes_seg");
        let mut unmap = [0u8; 1];
        dev.read_config(56, &mut unmap);
        assert_eq!(unmap, [1]);
    }

    // Past the end: zeros, no panic.
    let mut far = [0xaau8; 8];
    dev.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 8]);
    dev.read_config(0x1000, &mut far);
    assert_eq!(far, [0; 8]);
    // Writes are ignored.
    let mut dev = dev;
    dev.write_config(0, &[0xff; 8]);
    dev.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS);
}

#[test]
fn read_only_disk_offers_ro_and_refuses_writes() {
    let d = disk();
    d.write(0, &pattern(3, 512));
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, true);
    let f = rig.dev.device_features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);

    rig.fill(DATA, &pattern(9, 512));
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 0, &[D::R(DATA, S)]),
        (IOERR, 1)
    );
    assert_eq!(d.read(0, 512), pattern(3, 512), "the disk is unchanged");

    // Reads, flush and get-id work.
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &[D::W(DATA, S)]), (OK, 513));
    assert_eq!(rig.guest(DATA, 512), pattern(3, 512));
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(rig.request(VIRTIO_BLK_T_GET_ID, 0, &[D::W(DATA, 20)]).0, OK);

    // Discard and write-zeroes were not offered.
    rig.discard_segment(DATA2, 0, 1, 0);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, &[D::R(DATA2, 16)]),
        (UNSUPP, 1)
    );
    assert_eq!(
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[D::R(DATA2, 16)]),
        (UNSUPP, 1)
    );
    assert_eq!(d.read(0, 512), pattern(3, 512));
}

#[test]
fn first_and_last_sector_round_trip() {
    let d = disk();
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    for sector in [0, SECTORS - 1] {
        let data = pattern(u8::try_from(sector % 200).unwrap(), 512);
        rig.fill(DATA, &data);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_OUT, sector, &[D::R(DATA, S)]),
            (OK, 1)
        );
        assert_eq!(d.read(sector * 512, 512), data);
        rig.fill(DATA2, &[0; 512]);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, sector, &[D::W(DATA2, S)]),
            (OK, 513)
        );
        assert_eq!(rig.guest(DATA2, 512), data);
    }
    // A read of the whole disk in one request.
    let all = u32::try_from(SECTORS * 512).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &[D::W(DATA2, all)]),
        (OK, all + 1)
    );
    assert_eq!(rig.guest(DATA2, 512), d.read(0, 512));
}

#[test]
fn multi_descriptor_reads_and_writes() {
    let d = disk();
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    let data = pattern(42, 4096);
    // Written from three uneven pieces (not sector-sized on their own).
    rig.fill(DATA, &data[..700]);
    rig.fill(DATA2, &data[700..3000]);
    rig.fill(DATA2 + 0x10_0000, &data[3000..]);
    let (status, len) = rig.request(
        VIRTIO_BLK_T_OUT,
        4,
        &[
            D::R(DATA, 700),
            D::R(DATA2, 2300),
            D::R(DATA2 + 0x10_0000, 1096),
        ],
    );
    assert_eq!((status, len), (OK, 1));
    assert_eq!(d.read(4 * 512, 4096), data);

    // Read back into a different split, with an empty descriptor in it.
    rig.fill(DATA, &[0; 4096]);
    let (status, len) = rig.request(
        VIRTIO_BLK_T_IN,
        4,
        &[
            D::W(DATA, 1000),
            D::W(DATA + 0x8000, 0),
            D::W(DATA + 1000, 3096),
        ],
    );
    assert_eq!((status, len), (OK, 4097));
    assert_eq!(rig.guest(DATA, 4096), data);
}

#[test]
fn any_layout_header_split_and_status_in_data_descriptor() {
    let d = disk();
    d.write(512, &pattern(5, 512));
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    rig.write_header(VIRTIO_BLK_T_IN, 1);
    // Header in two pieces; data and status in one writable descriptor.
    let head = rig.add_chain(&[D::R(HDR, 10), D::R(HDR + 10, 6), D::W(DATA, 513)]);
    rig.dev.process_queue();
    assert_eq!(rig.next_used(), (u32::from(head), 513));
    assert_eq!(rig.guest(DATA, 512), pattern(5, 512));
    assert_eq!(rig.guest(DATA + 512, 1), [OK]);
}

#[test]
fn flush_and_get_id() {
    let d = disk();
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    // The sector of a flush is ignored.
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, u64::MAX, &[]), (OK, 1));

    assert_eq!(
        rig.request(VIRTIO_BLK_T_GET_ID, 0, &[D::W(DATA, 20)]),
        (OK, 21)
    );
    let id = rig.guest(DATA, 20);
    assert!(id.starts_with(b"dm-"), "{id:?}");
    // A different file has a different id.
    let other = disk();
    let mem3 = guest_memory();
    let mut rig3 = Rig::new(&mem3, &other.path, false);
    rig3.request(VIRTIO_BLK_T_GET_ID, 0, &[D::W(DATA, 20)]);
    assert_ne!(rig3.guest(DATA, 20), id);
    // A short buffer gets what fits; a long one only 20 bytes.
    rig.fill(DATA2, &[0xee; 64]);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_GET_ID, 0, &[D::W(DATA2, 8)]),
        (OK, 9)
    );
    assert_eq!(rig.guest(DATA2, 8), id[..8]);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_GET_ID, 0, &[D::W(DATA2, 64)]),
        (OK, 21)
    );
    assert_eq!(rig.guest(DATA2, 20), id);
    assert_eq!(rig.guest(DATA2 + 20, 1), [0xee]);
    // Stable: another device on the same file has the same id (once the
    // first, which locks the file, is gone).
    drop(rig);
    let mem2 = guest_memory();
    let mut rig2 = Rig::new(&mem2, &d.path, true);
    rig2.request(VIRTIO_BLK_T_GET_ID, 0, &[D::W(DATA, 20)]);
    assert_eq!(rig2.guest(DATA, 20), id);
}

#[test]
fn out_of_capacity_and_overflowing_sectors() {
    let d = disk();
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    rig.fill(DATA, &pattern(1, 1024));
    for (kind, data) in [
        (VIRTIO_BLK_T_IN, D::W(DATA, 1024)),
        (VIRTIO_BLK_T_OUT, D::R(DATA, 1024)),
    ] {
        for sector in [
            SECTORS - 1,
            SECTORS,
            SECTORS + 1,
            u64::MAX,
            u64::MAX / 512,
            u64::MAX / 512 + 1,
            (u64::MAX - 1023) / 512,
        ] {
            assert_eq!(
                rig.request(kind, sector, &[data]),
                (IOERR, 1),
                "type {kind} sector {sector}"
            );
        }
    }
    assert_eq!(
        d.read(0, usize::try_from(SECTORS * 512).unwrap()),
        vec![0; 32768]
    );
}

#[test]
fn data_must_be_whole_sectors() {
    let d = disk();
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    for len in [1, 100, 511, 513, 1000] {
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, 0, &[D::W(DATA, len)]),
            (IOERR, 1)
        );
        assert_eq!(
            rig.request(VIRTIO_BLK_T_OUT, 0, &[D::R(DATA, len)]),
            (IOERR, 1)
        );
    }
    // No data at all.
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &[]), (IOERR, 1));
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, &[]), (IOERR, 1));
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 0, &[D::R(DATA, 0)]),
        (IOERR, 1)
    );
}

#[test]
fn unknown_types_are_unsupported() {
    let d = disk();
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    for kind in [VIRTIO_BLK_T_SCSI_CMD, 3, 99, 0x8000_0000, u32::MAX] {
        assert_eq!(
            rig.request(kind, 0, &[D::W(DATA, 512)]),
            (UNSUPP, 1),
            "type {kind}"
        );
    }
}

/// Whether the temp directory's file system can punch holes and zero
/// ranges (skip the discard tests where it cannot).
fn fallocate_works(d: &TempDisk) -> bool {
    use vmm_sys_util::fallocate::{fallocate, FallocateMode};
    let f = d.file();
    fallocate(&f, FallocateMode::PunchHole, true, 0, 512).is_ok()
        && fallocate(&f, FallocateMode::ZeroRange, true, 0, 512).is_ok()
}

#[test]
fn discard_and_write_zeroes_zero_data() {
    let d = disk();
    if !fallocate_works(&d) {
        eprintln!("skipped: the temp file system has no fallocate");
        return;
    }
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    let f = rig.dev.device_features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let full = pattern(77, usize::try_from(SECTORS * 512).unwrap());

    let cases = [
        (VIRTIO_BLK_T_DISCARD, 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        ),
    ];
    for (kind, flags) in cases {
        d.write(0, &full);
        // Sectors 8..24, and the last sector.
        rig.discard_segment(DATA2, 8, 16, flags);
        assert_eq!(rig.request(kind, 0, &[D::R(DATA2, 16)]), (OK, 1));
        rig.discard_segment(DATA2, SECTORS - 1, 1, flags);
        assert_eq!(rig.request(kind, 0, &[D::R(DATA2, 16)]), (OK, 1));
        let now = d.read(0, full.len());
        assert_eq!(now[..8 * 512], full[..8 * 512]);
        assert!(now[8 * 512..24 * 512].iter().all(|&b| b == 0));
        assert_eq!(now[24 * 512..63 * 512], full[24 * 512..63 * 512]);
        assert!(now[63 * 512..].iter().all(|&b| b == 0));
        // And the guest reads zeroes back.
        rig.fill(DATA, &[0xff; 512]);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, 10, &[D::W(DATA, S)]),
            (OK, 513)
        );
        assert_eq!(rig.guest(DATA, 512), vec![0; 512]);

        // Zero sectors: nothing to do.
        rig.discard_segment(DATA2, 0, 0, flags);
        assert_eq!(rig.request(kind, 0, &[D::R(DATA2, 16)]), (OK, 1));
        // Out of range or overflowing.
        for (sector, n) in [
            (SECTORS, 1),
            (SECTORS - 1, 2),
            (u64::MAX, 1),
            (u64::MAX / 512, 1),
        ] {
            rig.discard_segment(DATA2, sector, n, flags);
            assert_eq!(rig.request(kind, 0, &[D::R(DATA2, 16)]), (IOERR, 1));
        }
        // More than max_discard_sectors.
        rig.discard_segment(DATA2, 0, (1 << 22) + 1, flags);
        assert_eq!(rig.request(kind, 0, &[D::R(DATA2, 16)]), (IOERR, 1));
        // Two segments (max_*_seg is 1), half a segment, none.
        rig.discard_segment(DATA2 + 16, 0, 1, flags);
        assert_eq!(rig.request(kind, 0, &[D::R(DATA2, 32)]), (IOERR, 1));
        assert_eq!(rig.request(kind, 0, &[D::R(DATA2, 8)]), (IOERR, 1));
        assert_eq!(rig.request(kind, 0, &[]), (IOERR, 1));
        // Unknown flags.
        rig.discard_segment(DATA2, 0, 1, 0x2);
        assert_eq!(rig.request(kind, 0, &[D::R(DATA2, 16)]), (UNSUPP, 1));
    }
    // Unmap on a discard is not allowed.
    rig.discard_segment(DATA2, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, &[D::R(DATA2, 16)]),
        (UNSUPP, 1)
    );
    // The segment as device-writable: wrong direction.
    rig.discard_segment(DATA2, 0, 1, 0);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, &[D::W(DATA2, 16)]),
        (IOERR, 1)
    );
}

#[test]
fn discard_needs_the_feature_negotiated() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = Block::new(&d.path, false).unwrap();
    let features = dev.device_features()
        & !(1 << VIRTIO_BLK_F_DISCARD)
        & !(1 << VIRTIO_BLK_F_WRITE_ZEROES)
        & !(1 << VIRTIO_BLK_F_FLUSH);
    dev.set_acked_features(features);
    let mut rig = Rig::with_device(&mem, dev);
    d.write(0, &pattern(1, 512));
    rig.discard_segment(DATA2, 0, 1, 0);
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        assert_eq!(rig.request(kind, 0, &[D::R(DATA2, 16)]), (UNSUPP, 1));
    }
    assert_eq!(d.read(0, 512), pattern(1, 512));
    // Without FLUSH negotiated writes are written through; they still work.
    rig.fill(DATA, &pattern(2, 512));
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, &[D::R(DATA, S)]), (OK, 1));
    assert_eq!(d.read(0, 512), pattern(2, 512));
}

#[test]
fn chains_without_a_status_byte_are_returned_with_length_zero() {
    let d = disk();
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    rig.write_header(VIRTIO_BLK_T_IN, 0);
    let cases: Vec<Vec<D>> = vec![
        // Status outside guest memory.
        vec![D::R(HDR, 16), D::W(DATA, 512), D::W(MEM_SIZE, 1)],
        vec![D::R(HDR, 16), D::W(u64::MAX, 1)],
        // Status wrapping the address space.
        vec![D::R(HDR, 16), D::W(u64::MAX - 1, 4)],
        // Zero-length status.
        vec![D::R(HDR, 16), D::W(DATA, 512), D::W(STATUS, 0)],
        // Last descriptor device-readable.
        vec![D::R(HDR, 16), D::W(DATA, 512), D::R(STATUS, 1)],
        // Only a header.
        vec![D::R(HDR, 16)],
        // Status length near u32::MAX, past the end of memory.
        vec![D::R(HDR, 16), D::W(STATUS, u32::MAX)],
        // The chain passes 4 GiB: virtio-queue cuts it before the status.
        vec![D::R(HDR, 16), D::W(DATA, u32::MAX), D::W(STATUS, 1)],
    ];
    for descs in cases {
        let head = rig.add_chain(&descs);
        rig.dev.process_queue();
        assert_eq!(rig.next_used(), (u32::from(head), 0));
        assert!(!rig.dev.needs_reset());
    }
}

#[test]
fn malformed_chains_get_ioerr() {
    let d = disk();
    d.write(0, &pattern(8, 1024));
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    rig.write_header(VIRTIO_BLK_T_OUT, 0);
    rig.fill(DATA, &pattern(1, 1024));
    let cases: Vec<(&str, Vec<D>)> = vec![
        (
            "header outside memory",
            vec![D::R(MEM_SIZE, 16), D::W(STATUS, 1)],
        ),
        (
            "header at u64::MAX",
            vec![D::R(u64::MAX - 3, 16), D::W(STATUS, 1)],
        ),
        (
            "data outside memory",
            vec![D::R(HDR, 16), D::R(MEM_SIZE - 512, 1024), D::W(STATUS, 1)],
        ),
        (
            "data near u32::MAX",
            vec![D::R(HDR, 16), D::R(DATA, u32::MAX - 32), D::W(STATUS, 1)],
        ),
        ("zero-length header", vec![D::R(HDR, 0), D::W(STATUS, 1)]),
        ("short header", vec![D::R(HDR, 8), D::W(STATUS, 1)]),
        ("status only", vec![D::W(STATUS, 1)]),
        (
            "header device-writable",
            vec![D::W(HDR, 16), D::R(DATA, 512), D::W(STATUS, 1)],
        ),
        (
            "write data device-writable",
            vec![D::R(HDR, 16), D::W(DATA, 512), D::W(STATUS, 1)],
        ),
        (
            "readable after writable",
            vec![
                D::R(HDR, 16),
                D::W(DATA2, 512),
                D::R(DATA, 512),
                D::W(STATUS, 1),
            ],
        ),
    ];
    for (what, descs) in cases {
        assert_eq!(rig.run(&descs), (IOERR, 1), "{what}");
    }
    // A read whose data is device-readable: wrong direction too.
    rig.write_header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.run(&[D::R(HDR, 16), D::R(DATA, 512), D::W(STATUS, 1)]),
        (IOERR, 1)
    );
    assert_eq!(d.read(0, 1024), pattern(8, 1024), "nothing was written");
    assert!(!rig.dev.needs_reset());
}

#[test]
fn descriptor_loops_end() {
    let d = disk();
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    rig.write_header(VIRTIO_BLK_T_IN, 0);
    let w = F_WRITE;
    let n = F_NEXT;
    // header -> data -> back to header, forever.
    let head = rig.put_raw(&[(HDR, 16, n, 1), (DATA, 512, n | w, 0)]);
    rig.make_available(head);
    rig.mem.write_obj(0xffu8, GuestAddress(DATA + 511)).unwrap();
    rig.dev.process_queue();
    let (id, len) = rig.next_used();
    assert_eq!(id, u32::from(head));
    // The chain is cut at the queue size; whatever it ends on, the request
    // fails (readable after writable) or is returned unanswered.
    assert!(len <= 1, "{len}");
    if len == 1 {
        assert_eq!(rig.guest(DATA + 511, 1), [IOERR]);
    }
    // A self-loop of readable descriptors: no status byte.
    let head = rig.put_raw(&[(HDR, 16, n, 2)]);
    assert_eq!(head, 2);
    rig.make_available(head);
    rig.dev.process_queue();
    assert_eq!(rig.next_used(), (2, 0));
    // Next index past the table.
    let head = rig.put_raw(&[(HDR, 16, n, 1000)]);
    rig.make_available(head);
    rig.dev.process_queue();
    assert_eq!(rig.next_used(), (u32::from(head), 0));
    assert!(!rig.dev.needs_reset());
    // The device still works.
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &[D::W(DATA, S)]), (OK, 513));
}

#[test]
fn corrupt_avail_index_needs_reset() {
    let d = disk();
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    rig.interrupt.ack(u32::MAX);
    rig.set_avail_idx(QUEUE_SIZE + 1);
    rig.dev.process_queue();
    assert!(rig.dev.needs_reset());
    assert_ne!(rig.interrupt.status() & interrupt_status::CONFIG_CHANGE, 0);
    assert_eq!(rig.used_idx(), 0, "nothing was processed");
    // Nothing more is processed until reset.
    rig.set_avail_idx(1);
    rig.dev.process_queue();
    assert_eq!(rig.used_idx(), 0);

    rig.dev.reset();
    assert!(!rig.dev.needs_reset());
    assert!(!rig.dev.is_activated());
    rig.dev.set_acked_features(rig.dev.device_features());
    rig.set_avail_idx(0);
    rig.avail_idx = 0;
    rig.mem
        .write_obj(0u16, GuestAddress(USED_RING).unchecked_add(2))
        .unwrap();
    rig.activate();
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &[D::W(DATA, S)]), (OK, 513));
}

#[test]
fn activation_checks_queues() {
    let d = disk();
    let mem = guest_memory();
    let mut dev = Block::new(&d.path, false).unwrap();
    let irq = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
    assert!(matches!(
        dev.activate(mem.clone(), irq.clone(), vec![]),
        Err(ActivateError::BadQueue(0))
    ));
    let two = vec![Queue::new(16).unwrap(), Queue::new(16).unwrap()];
    assert!(dev.activate(mem, irq, two).is_err());
    assert!(!dev.is_activated());
    // Not activated: processing is a no-op.
    dev.process_queue();
}

#[test]
fn a_full_queue_is_served_and_signalled_once() {
    let d = disk();
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    rig.interrupt.ack(u32::MAX);
    rig.write_header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..QUEUE_SIZE / 2 {
        rig.add_chain(&[D::R(HDR, 16), D::W(STATUS, 1)]);
    }
    rig.dev.process_queue();
    assert_eq!(rig.used_idx(), QUEUE_SIZE / 2);
    assert_ne!(rig.interrupt.status() & interrupt_status::USED_RING, 0);
    assert_eq!(rig.interrupt.eventfd().read().unwrap(), 1);
    for _ in 0..QUEUE_SIZE / 2 {
        assert_eq!(rig.next_used().1, 1);
    }
    // Wrap the rings a few times.
    for round in 0..3u8 {
        for _ in 0..QUEUE_SIZE {
            rig.add_chain(&[D::R(HDR, 16), D::W(STATUS, 1)]);
        }
        rig.dev.process_queue();
        assert_eq!(rig.used_idx(), rig.avail_idx, "round {round}");
        // A full queue uses the whole budget: the device re-kicks itself.
        assert_eq!(rig.dev.queue_events()[0].read().unwrap(), 1);
        rig.used_seen = rig.used_idx();
    }
}

#[test]
fn requests_flow_through_the_event_loop() {
    let d = disk();
    d.write(0, &pattern(4, 512));
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, &d.path, false);
    rig.write_header(VIRTIO_BLK_T_IN, 0);
    rig.add_chain(&[D::R(HDR, 16), D::W(DATA, 512), D::W(STATUS, 1)]);

    let evt = rig.dev.queue_events()[0].try_clone().unwrap();
    // A stand-in on another image: this one is locked by the rig's device.
    let spare = disk();
    let dev = std::mem::replace(&mut rig.dev, Block::new(&spare.path, true).unwrap());
    let dev = Arc::new(Mutex::new(dev));
    let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    manager.add_subscriber(dev.clone());
    evt.write(1).unwrap();
    assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(rig.next_used().1, 513);
    assert_eq!(rig.guest(DATA, 512), pattern(4, 512));
    // The eventfd was drained: nothing more to do.
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);

    // A notification before activation is drained and ignored.
    dev.lock().unwrap().reset();
    rig.add_chain(&[D::R(HDR, 16), D::W(DATA, 512), D::W(STATUS, 1)]);
    evt.write(1).unwrap();
    assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
    assert_eq!(rig.used_idx(), 1);
}

fn limits(bandwidth: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> RateLimiterConfig {
    let bucket = |(size, ms)| TokenBucketConfig::new(size, ms);
    RateLimiterConfig {
        bandwidth: bandwidth.map(bucket),
        ops: ops.map(bucket),
    }
}

/// A device on `path` limited by `config`, every feature acked, activated.
fn limited_rig<'a>(mem: &'a GuestMemoryMmap, path: &Path, config: RateLimiterConfig) -> Rig<'a> {
    let mut dev = Block::new(path, false)
        .unwrap()
        .with_rate_limiter(&config)
        .unwrap();
    assert_eq!(dev.rate_limiter_config(), config);
    dev.set_acked_features(dev.device_features());
    Rig::with_device(mem, dev)
}

#[test]
fn an_ops_limit_leaves_refused_requests_in_the_ring() {
    let d = disk();
    let mem = guest_memory();
    // Two requests a minute: the test never sees a refill.
    let mut rig = limited_rig(&mem, &d.path, limits(None, Some((2, 60_000))));
    rig.write_header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..4 {
        rig.add_chain(&[D::R(HDR, 16), D::W(STATUS, 1)]);
    }
    rig.dev.process_queue();
    assert_eq!(rig.used_idx(), 2);
    assert!(rig.dev.rate_limiter.as_ref().unwrap().is_blocked());
    // The timer, not a self-kick, brings the device back.
    assert!(rig.dev.queue_events()[0].read().is_err());
    // Guest notifications meanwhile change nothing.
    rig.dev.process_queue();
    assert_eq!(rig.used_idx(), 2);
    // The refused requests are still there, in order, once the limit goes.
    rig.dev.rate_limiter = None;
    rig.dev.process_queue();
    assert_eq!(rig.used_idx(), 4);
    let heads: Vec<u32> = (0..4).map(|_| rig.next_used().0).collect();
    assert_eq!(heads, vec![0, 2, 4, 6]);
}

#[test]
fn a_bandwidth_limit_charges_data_bytes_only() {
    let d = disk();
    let mem = guest_memory();
    // 1024 bytes a minute: exactly two 512-byte reads (headers and status
    // bytes are free).
    let mut rig = limited_rig(&mem, &d.path, limits(Some((1024, 60_000)), None));
    rig.write_header(VIRTIO_BLK_T_IN, 0);
    for _ in 0..3 {
        rig.add_chain(&[D::R(HDR, 16), D::W(DATA, 512), D::W(STATUS, 1)]);
    }
    rig.dev.process_queue();
    assert_eq!(rig.used_idx(), 2);
    let bucket = rig.dev.rate_limiter.as_ref().unwrap().bandwidth().unwrap();
    assert_eq!(bucket.budget(), 0);
}

#[test]
fn a_request_larger_than_the_bucket_still_passes() {
    let d = disk();
    let mem = guest_memory();
    // A 4 KiB read against a 1 KiB bucket: it passes on the full bucket,
    // and the next one waits for the debt.
    let mut rig = limited_rig(&mem, &d.path, limits(Some((1024, 60_000)), None));
    d.write(0, &pattern(9, 4096));
    rig.write_header(VIRTIO_BLK_T_IN, 0);
    for _ in 0..2 {
        rig.add_chain(&[D::R(HDR, 16), D::W(DATA, 4096), D::W(STATUS, 1)]);
    }
    rig.dev.process_queue();
    assert_eq!(rig.used_idx(), 1);
    assert_eq!(rig.next_used().1, 4097);
    assert_eq!(rig.guest(DATA, 4096), pattern(9, 4096));
    let bucket = rig.dev.rate_limiter.as_ref().unwrap().bandwidth().unwrap();
    assert_eq!(bucket.budget(), 1024 - 4096);
}

#[test]
fn the_limiter_timer_resumes_the_queue_on_the_event_loop() {
    let d = disk();
    let mem = guest_memory();
    // One request per 30 ms.
    let mut rig = limited_rig(&mem, &d.path, limits(None, Some((1, 30))));
    rig.write_header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..3 {
        rig.add_chain(&[D::R(HDR, 16), D::W(STATUS, 1)]);
    }
    let evt = rig.dev.queue_events()[0].try_clone().unwrap();
    // A placeholder on its own image: the rig's device holds `d` locked.
    let placeholder = disk();
    let dev = std::mem::replace(&mut rig.dev, Block::new(&placeholder.path, true).unwrap());
    let dev = Arc::new(Mutex::new(dev));
    let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    manager.add_subscriber(dev.clone());
    let start = std::time::Instant::now();
    evt.write(1).unwrap();
    assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(rig.used_idx(), 1);
    // Each of the other two comes with a timer wake-up.
    for served in 2..=3 {
        assert_eq!(manager.run_with_timeout(5000).unwrap(), 1, "no wake-up");
        assert_eq!(rig.used_idx(), served);
    }
    // Two refills of 30 ms (a slow host only makes it later).
    assert!(start.elapsed() >= std::time::Duration::from_millis(59));
    assert!(!dev
        .lock()
        .unwrap()
        .rate_limiter
        .as_ref()
        .unwrap()
        .is_blocked());
}

#[test]
fn an_invalid_rate_limit_is_a_typed_error() {
    let d = disk();
    let err = Block::new(&d.path, false)
        .unwrap()
        .with_rate_limiter(&limits(None, Some((10, 0))))
        .unwrap_err();
    assert!(
        matches!(
            err,
            BlockError::RateLimiter(RateLimiterError::Config(
                RateLimiterConfigError::ZeroRefillTime(BucketKind::Ops)
            ))
        ),
        "{err:?}"
    );
    // Unlimited: no limiter (and no timerfd).
    let dev = Block::new(&d.path, false)
        .unwrap()
        .with_rate_limiter(&RateLimiterConfig::unlimited())
        .unwrap();
    assert!(dev.rate_limiter.is_none());
}

#[test]
fn rate_limiter_budgets_survive_save_and_restore() {
    let d = disk();
    let mem = guest_memory();
    let config = limits(Some((1 << 20, 60_000)), Some((5, 60_000)));
    let mut rig = limited_rig(&mem, &d.path, config);
    rig.write_header(VIRTIO_BLK_T_IN, 0);
    for _ in 0..2 {
        rig.add_chain(&[D::R(HDR, 16), D::W(DATA, 512), D::W(STATUS, 1)]);
    }
    rig.dev.process_queue();
    assert_eq!(rig.used_idx(), 2);
    let states = rig.dev.rate_limiter_states();
    let bytes = postcard::to_allocvec(&states).unwrap();
    let states: Vec<crate::rate_limiter::RateLimiterState> = postcard::from_bytes(&bytes).unwrap();

    // Another image: the first device still holds `d` locked.
    let other = disk();
    let mut fresh = Block::new(&other.path, false)
        .unwrap()
        .with_rate_limiter(&config)
        .unwrap();
    fresh.restore_rate_limiters(&states);
    let limiter = fresh.rate_limiter.as_ref().unwrap();
    assert_eq!(limiter.ops().unwrap().budget(), 3);
    // Time between save and restore earns nothing; the test's own run
    // time may earn a few bytes.
    let budget = limiter.bandwidth().unwrap().budget();
    assert!(
        ((1 << 20) - 1024..(1 << 20) - 512).contains(&budget),
        "{budget}"
    );
    // Without a limiter there is nothing to restore into.
    let third = disk();
    let mut unlimited = Block::new(&third.path, false).unwrap();
    unlimited.restore_rate_limiters(&states);
    assert!(unlimited.rate_limiter.is_none());
    assert_eq!(
        unlimited.rate_limiter_states(),
        vec![crate::rate_limiter::RateLimiterState::default()]
    );
}
