//! virtio-blk request throughput through the real request path: requests
//! are put on a (mock) virtqueue in guest memory, the queue eventfd is
//! kicked, and an event-manager loop runs the device's handler, which
//! parses the chains and does the I/O against a 64 MiB temporary disk image
//! (mostly in the page cache, so this measures the device's own overhead
//! plus the copy through the kernel).
//!
//! - 4 KiB random reads and writes, 32 requests per queue kick;
//! - 1 MiB sequential reads and writes (16 segments of 64 KiB each, like a
//!   guest's scatter list), 4 requests per kick;
//! - 4 KiB random reads of a layered copy-on-write disk over the same image
//!   as its base: with an empty top and no frozen layer
//!   (`randread_4k_layered_0`), and with 4 frozen layers each holding every
//!   8th chunk at its own offset (`randread_4k_layered_4`: half the reads
//!   come from a layer, half fall through to the base).
//!
//! Host-native: `cargo bench --bench virtio_block` (add `-- --quick` for a
//! short run).

// criterion's macros generate undocumented items; a bench is no public API.
#![allow(missing_docs)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dormouse::devices::virtio::block::{Block, DiskLayers};
use dormouse::devices::virtio::{Interrupt, Queue, VirtioDevice};
use dormouse::devices::EventFdTrigger;
use dormouse::memory::GuestMemoryMmap;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 256;
const DISK_SIZE: u64 = 64 << 20;
const MEM_SIZE: usize = 32 << 20;
/// The used ring lives apart: virtio-queue 0.18's mock puts it over the
/// avail ring.
const USED_RING: u64 = 0x8000;
const HEADERS: u64 = 0x1_0000;
const STATUSES: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;

// The flags are 1 and 2: they fit.
#[allow(clippy::cast_possible_truncation)]
const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
#[allow(clippy::cast_possible_truncation)]
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A disk image in the temp directory, removed on drop.
struct TempDisk(PathBuf);

impl TempDisk {
    fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("dormouse-blk-bench-{}.img", std::process::id()));
        let mut f = File::create(&path).unwrap();
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|i: u32| u8::try_from(i % 251).unwrap())
            .collect();
        for _ in 0..DISK_SIZE / (1 << 20) {
            f.write_all(&chunk).unwrap();
        }
        Self(path)
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The driver side: guest memory, a queue, the device on an event loop.
struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    manager: EventManager<Subscriber>,
    kick: vmm_sys_util::eventfd::EventFd,
    avail_idx: u16,
    /// The device, also on the event loop.
    dev: Arc<Mutex<Block>>,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, mut dev: Block) -> Self {
        dev.set_acked_features(dev.device_features());
        let kick = dev.queue_events()[0].try_clone().unwrap();
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_used_ring_address(Some(u32::try_from(USED_RING).unwrap()), Some(0));
        // A fresh used ring: an earlier rig's index there would end `run`'s
        // wait before the device saw the requests.
        mem.write_obj(0u16, GuestAddress(USED_RING).unchecked_add(2))
            .unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
        dev.activate(mem.clone(), interrupt, vec![queue]).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut manager = EventManager::<Subscriber>::new().unwrap();
        manager.add_subscriber(dev.clone());
        // Serve activate()'s own kick.
        manager.run().unwrap();
        Self {
            mem,
            vq,
            manager,
            kick,
            avail_idx: 0,
            dev,
        }
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED_RING).unchecked_add(2))
            .unwrap()
    }

    /// Queues `sectors.len()` requests of `kind`, each `segments` x
    /// `seg_len` bytes, kicks the device and waits for it.
    fn run(&mut self, kind: u32, sectors: &[u64], segments: u16, seg_len: u32) {
        let per_chain = segments + 2;
        for (i, &sector) in sectors.iter().enumerate() {
            let i = u16::try_from(i).unwrap();
            let hdr = GuestAddress(HEADERS + 16 * u64::from(i));
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, hdr).unwrap();

            let first = i * per_chain;
            let data_flags = if kind == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
            let data_base = DATA + u64::from(i) * u64::from(segments) * u64::from(seg_len);
            let mut descs = vec![(hdr.raw_value(), 16, 0)];
            for s in 0..segments {
                let addr = data_base + u64::from(s) * u64::from(seg_len);
                descs.push((addr, seg_len, data_flags));
            }
            descs.push((STATUSES + u64::from(i), 1, F_WRITE));
            let last = descs.len() - 1;
            for (j, (addr, len, flags)) in descs.into_iter().enumerate() {
                let j16 = u16::try_from(j).unwrap();
                let (flags, next) = if j == last {
                    (flags, 0)
                } else {
                    (flags | F_NEXT, first + j16 + 1)
                };
                let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
                self.vq.desc_table().store(first + j16, desc).unwrap();
            }
            let slot = u64::from(self.avail_idx % QUEUE_SIZE);
            self.mem
                .write_obj(first, self.vq.avail_addr().unchecked_add(4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail_idx, self.vq.avail_addr().unchecked_add(2))
            .unwrap();
        self.kick.write(1).unwrap();
        while self.used_idx() != self.avail_idx {
            self.manager.run().unwrap();
        }
    }

    /// What a snapshot does to the device's backend (a layered disk's top
    /// becomes a frozen layer with its map).
    fn save(&mut self) {
        self.dev.lock().unwrap().save_backend().unwrap();
    }

    /// Runs `n` requests and returns their statuses unless all are OK.
    fn check(&mut self, kind: u32, n: usize, segments: u16, seg_len: u32) -> Result<(), Vec<u8>> {
        let poison = vec![0xffu8; n];
        self.mem
            .write_slice(&poison, GuestAddress(STATUSES))
            .unwrap();
        self.run(kind, &vec![0; n], segments, seg_len);
        let mut s = vec![0xffu8; n];
        self.mem.read_slice(&mut s, GuestAddress(STATUSES)).unwrap();
        if s.iter().all(|&b| b == 0) {
            Ok(())
        } else {
            Err(s)
        }
    }
}

/// xorshift64: reproducible random sectors.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Layer files in the temp directory, removed on drop.
struct TempLayers(PathBuf);

impl TempLayers {
    fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("dormouse-blk-bench-layers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempLayers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes 4 frozen layers over `base` through the device itself: layer `n`
/// gets every 8th chunk from chunk `2n`, written by the guest, and its map
/// from a snapshot's `save_backend`.
fn make_layers(mem: &GuestMemoryMmap, base: &Path, dir: &Path) -> Vec<PathBuf> {
    let mut frozen: Vec<PathBuf> = Vec::new();
    for n in 0..4u64 {
        let top = dir.join(format!("layer{n}"));
        let layers = DiskLayers {
            base: base.to_owned(),
            layers: frozen.clone(),
            top: top.clone(),
        };
        let dev = Block::layered(&layers, false).unwrap();
        let mut rig = Rig::new(mem, dev);
        let chunks: Vec<u64> = (0..DISK_SIZE / 4096)
            .filter(|c| c % 8 == 2 * n)
            .map(|c| c * 8)
            .collect();
        for batch in chunks.chunks(32) {
            rig.mem
                .write_slice(&vec![0xffu8; batch.len()], GuestAddress(STATUSES))
                .unwrap();
            rig.run(VIRTIO_BLK_T_OUT, batch, 1, 4096);
            let mut st = vec![0xffu8; batch.len()];
            rig.mem.read_slice(&mut st, GuestAddress(STATUSES)).unwrap();
            assert!(
                st.iter().all(|&b| b == 0),
                "layer {n}: a write failed: {st:?}"
            );
        }
        rig.save();
        frozen.push(top);
    }
    frozen
}

/// Prints warnings (a failed request's cause) on stderr.
struct Stderr;
impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("[{}] {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn benches(c: &mut Criterion) {
    if log::set_logger(&Stderr).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let disk = TempDisk::new();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut rig = Rig::new(&mem, Block::new(&disk.0, false).unwrap());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    let mut group = c.benchmark_group("virtio_block");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    // 4 KiB random I/O: 32 requests per kick.
    const BATCH_4K: usize = 32;
    let blocks_4k = DISK_SIZE / 4096;
    group.throughput(Throughput::Bytes(BATCH_4K as u64 * 4096));
    for (name, kind) in [
        ("randread_4k", VIRTIO_BLK_T_IN),
        ("randwrite_4k", VIRTIO_BLK_T_OUT),
    ] {
        let mut sectors = [0u64; BATCH_4K];
        if let Err(statuses) = rig.check(kind, BATCH_4K, 1, 4096) {
            panic!("{name}: a request failed: statuses {statuses:?}");
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                for s in &mut sectors {
                    *s = (rng.next() % blocks_4k) * 8;
                }
                rig.run(kind, &sectors, 1, 4096);
            })
        });
    }

    // 1 MiB sequential I/O: 4 requests per kick, 16 x 64 KiB segments each.
    const BATCH_1M: usize = 4;
    let mut next = 0u64;
    let sectors_1m = (1u64 << 20) / 512;
    let disk_sectors = DISK_SIZE / 512;
    group.throughput(Throughput::Bytes(BATCH_1M as u64 * (1 << 20)));
    for (name, kind) in [
        ("seqread_1m", VIRTIO_BLK_T_IN),
        ("seqwrite_1m", VIRTIO_BLK_T_OUT),
    ] {
        if let Err(statuses) = rig.check(kind, BATCH_1M, 16, 64 << 10) {
            panic!("{name}: a request failed: statuses {statuses:?}");
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut sectors = [0u64; BATCH_1M];
                for s in &mut sectors {
                    *s = next;
                    next = (next + sectors_1m) % disk_sectors;
                }
                rig.run(kind, &sectors, 16, 64 << 10);
            })
        });
    }
    drop(rig);

    // Layered disks over the same image: 4 KiB random reads.
    let dir = TempLayers::new();
    let frozen = make_layers(&mem, &disk.0, &dir.0);
    group.throughput(Throughput::Bytes(BATCH_4K as u64 * 4096));
    for (name, layers) in [
        ("randread_4k_layered_0", Vec::new()),
        ("randread_4k_layered_4", frozen),
    ] {
        let layers = DiskLayers {
            base: disk.0.clone(),
            layers,
            top: dir.0.join(format!("{name}.top")),
        };
        let mut rig = Rig::new(&mem, Block::layered(&layers, false).unwrap());
        if let Err(statuses) = rig.check(VIRTIO_BLK_T_IN, BATCH_4K, 1, 4096) {
            panic!("{name}: a request failed: statuses {statuses:?}");
        }
        let mut sectors = [0u64; BATCH_4K];
        group.bench_function(name, |b| {
            b.iter(|| {
                for s in &mut sectors {
                    *s = (rng.next() % blocks_4k) * 8;
                }
                rig.run(VIRTIO_BLK_T_IN, &sectors, 1, 4096);
            })
        });
    }
    group.finish();
}

criterion_group!(virtio_block, benches);
criterion_main!(virtio_block);
