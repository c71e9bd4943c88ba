//! Rate-limited virtio devices hold their configured rate.
//!
//! Each case drives a real device model on an event-manager loop, over mock
//! queues in guest memory, as `benches/virtio_block.rs` does: a virtio-blk
//! device on a temporary image, and a virtio-net device whose "TAP" is a
//! datagram socket pair. Every iteration queues a batch and waits until the
//! device has served all of it, sleeping in epoll until the limiter's timer
//! fires; so, once warm-up has spent the full bucket, the time per
//! iteration is the batch's cost divided by the configured rate, and
//! criterion's throughput line is the achieved rate.
//!
//! Each case then also measures the rate over two seconds of steady state
//! on its own, prints `configured` against `achieved`, and fails if they
//! differ by more than 5%.
//!
//! - `blk_bandwidth`: 64 KiB reads under a 32 MiB/s bandwidth limit;
//! - `blk_ops`: 4 KiB reads under a 2000 requests/s limit;
//! - `net_tx_bandwidth`: 1500-byte frames the guest sends, 10 MB/s limit;
//! - `net_rx_ops`: 1500-byte frames to the guest, 5000 frames/s limit;
//! - `consume`: the cost of one limiter check that passes (both buckets),
//!   what every request pays.
//!
//! Host-native: `cargo bench --bench rate_limiter`.

// criterion's macros generate undocumented items; a bench is no public API.
#![allow(missing_docs)]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dormouse::devices::virtio::block::Block;
use dormouse::devices::virtio::net::{Net, Tap, VNET_HDR_LEN};
use dormouse::devices::virtio::{Interrupt, Queue, VirtioDevice};
use dormouse::devices::EventFdTrigger;
use dormouse::memory::GuestMemoryMmap;
use dormouse::rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 256;
const MEM_SIZE: usize = 32 << 20;
const DISK_SIZE: u64 = 16 << 20;
/// Where each queue lives (descriptor table, then avail ring), and its
/// used ring: virtio-queue 0.18's mock puts the used ring over the avail
/// ring, so it is moved.
const BLK_QUEUE: (u64, u64) = (0, 0x8000);
const RX_QUEUE: (u64, u64) = (0x1_0000, 0x1_8000);
const TX_QUEUE: (u64, u64) = (0x2_0000, 0x2_8000);
const HEADERS: u64 = 0x4_0000;
const STATUSES: u64 = 0x5_0000;
const DATA: u64 = 0x10_0000;
/// The largest allowed gap between configured and achieved rates.
const TOLERANCE: f64 = 0.05;
/// How long the explicit check measures.
const HOLD_TIME: Duration = Duration::from_secs(2);

// The flags are 1 and 2: they fit.
#[allow(clippy::cast_possible_truncation)]
const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
#[allow(clippy::cast_possible_truncation)]
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A bucket refilled every 100 ms, holding 100 ms worth at `per_second`.
fn limit(per_second: u64) -> TokenBucketConfig {
    TokenBucketConfig::new(per_second / 10, 100)
}

/// A disk image in the temp directory, removed on drop.
struct TempDisk(PathBuf);

impl TempDisk {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "dormouse-ratelimit-bench-{}.img",
            std::process::id()
        ));
        File::create(&path).unwrap().set_len(DISK_SIZE).unwrap();
        Self(path)
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The driver's side of one split queue.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    used_ring: u64,
    avail_idx: u16,
}

impl<'a> Driver<'a> {
    /// The queue at `(base, used_ring)`, and the device's copy of it.
    fn new(mem: &'a GuestMemoryMmap, (base, used_ring): (u64, u64)) -> (Self, Queue) {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_used_ring_address(Some(u32::try_from(used_ring).unwrap()), Some(0));
        let driver = Self {
            mem,
            vq,
            used_ring,
            avail_idx: 0,
        };
        (driver, queue)
    }

    /// Writes a chain of `(addr, len, flags)` at descriptor `first` on and
    /// makes it available (published with [`Self::publish`]).
    fn add_chain(&mut self, first: u16, descs: &[(u64, u32, u16)]) {
        let last = descs.len() - 1;
        for (j, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = first + u16::try_from(j).unwrap();
            let (flags, next) = if j == last {
                (flags, 0)
            } else {
                (flags | F_NEXT, index + 1)
            };
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.vq.desc_table().store(index, desc).unwrap();
        }
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(first, self.vq.avail_addr().unchecked_add(4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes the chains added so far visible to the device.
    fn publish(&self) {
        self.mem
            .write_obj(self.avail_idx, self.vq.avail_addr().unchecked_add(2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used_ring).unchecked_add(2))
            .unwrap()
    }

    /// Whether the device has used everything made available.
    fn done(&self) -> bool {
        self.used_idx() == self.avail_idx
    }
}

/// A device on its own event loop.
struct Loop {
    manager: EventManager<Subscriber>,
}

impl Loop {
    fn new(device: Subscriber) -> Self {
        let mut manager = EventManager::<Subscriber>::new().unwrap();
        manager.add_subscriber(device);
        Self { manager }
    }

    /// Runs the loop (sleeping in epoll between timer wake-ups) until
    /// `done`.
    fn until(&mut self, mut done: impl FnMut() -> bool) {
        while !done() {
            self.manager.run_with_timeout(1000).unwrap();
        }
    }
}

/// A limited virtio-blk device serving batches of reads.
struct BlkRig<'a> {
    driver: Driver<'a>,
    lp: Loop,
    kick: EventFd,
    _disk: TempDisk,
}

impl<'a> BlkRig<'a> {
    fn new(mem: &'a GuestMemoryMmap, limits: RateLimiterConfig) -> Self {
        let disk = TempDisk::new();
        let mut dev = Block::new(&disk.0, false)
            .unwrap()
            .with_rate_limiter(&limits)
            .unwrap();
        dev.set_acked_features(dev.device_features());
        let kick = dev.queue_events()[0].try_clone().unwrap();
        let (driver, queue) = Driver::new(mem, BLK_QUEUE);
        let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
        dev.activate(mem.clone(), interrupt, vec![queue]).unwrap();
        let mut lp = Loop::new(Arc::new(Mutex::new(dev)));
        // Serve activate()'s own kick.
        lp.manager.run_with_timeout(0).unwrap();
        Self {
            driver,
            lp,
            kick,
            _disk: disk,
        }
    }

    /// `n` reads of `len` bytes each; returns when all are served.
    fn batch(&mut self, n: u16, len: u32) {
        let sectors = DISK_SIZE / 512;
        for i in 0..n {
            let hdr = HEADERS + 16 * u64::from(i);
            let sector = (u64::from(i) * u64::from(len / 512)) % sectors;
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.driver.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            let data = DATA + u64::from(i) * u64::from(len);
            self.driver.add_chain(
                3 * i,
                &[
                    (hdr, 16, 0),
                    (data, len, F_WRITE),
                    (STATUSES + u64::from(i), 1, F_WRITE),
                ],
            );
        }
        self.driver.publish();
        self.kick.write(1).unwrap();
        let driver = &self.driver;
        self.lp.until(|| driver.done());
    }
}

/// A limited virtio-net device on a socket pair.
struct NetRig<'a> {
    rx: Driver<'a>,
    tx: Driver<'a>,
    lp: Loop,
    kicks: [EventFd; 2],
    peer: UnixDatagram,
    frame: Vec<u8>,
}

impl<'a> NetRig<'a> {
    fn new(
        mem: &'a GuestMemoryMmap,
        rx_limits: RateLimiterConfig,
        tx_limits: RateLimiterConfig,
        frame_len: usize,
    ) -> Self {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        let tap = Tap::from_frame_socket(OwnedFd::from(ours), "bench").unwrap();
        let mut dev = Net::with_tap(tap, [0x06, 0, 0, 0, 0, 1])
            .unwrap()
            .with_rate_limiters(&rx_limits, &tx_limits)
            .unwrap();
        dev.set_acked_features(dev.device_features());
        let kicks = [
            dev.queue_events()[0].try_clone().unwrap(),
            dev.queue_events()[1].try_clone().unwrap(),
        ];
        let (rx, rxq) = Driver::new(mem, RX_QUEUE);
        let (tx, txq) = Driver::new(mem, TX_QUEUE);
        let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
        dev.activate(mem.clone(), interrupt, vec![rxq, txq])
            .unwrap();
        let mut lp = Loop::new(Arc::new(Mutex::new(dev)));
        lp.manager.run_with_timeout(0).unwrap();
        let mut frame = vec![0u8; VNET_HDR_LEN + frame_len];
        frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&[0x06, 0, 0, 0, 0, 1]);
        frame[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&[0x88, 0xb5]);
        mem.write_slice(&frame, GuestAddress(DATA)).unwrap();
        Self {
            rx,
            tx,
            lp,
            kicks,
            peer,
            frame,
        }
    }

    /// The guest sends `n` frames; returns when the device took them all.
    fn tx_batch(&mut self, n: u16) {
        let len = u32::try_from(self.frame.len()).unwrap();
        for i in 0..n {
            self.tx.add_chain(i, &[(DATA, len, 0)]);
        }
        self.tx.publish();
        self.kicks[1].write(1).unwrap();
        let tx = &self.tx;
        self.lp.until(|| tx.done());
        let mut buf = vec![0u8; self.frame.len() + 1];
        for _ in 0..n {
            assert_eq!(self.peer.recv(&mut buf).unwrap(), self.frame.len());
        }
    }

    /// The host sends `n` frames to the guest, which has a buffer for each;
    /// returns when they are all delivered.
    fn rx_batch(&mut self, n: u16) {
        let len = u32::try_from(self.frame.len()).unwrap();
        for i in 0..n {
            let buf = DATA + 0x10_0000 + u64::from(i) * 0x1000;
            self.rx.add_chain(i, &[(buf, len, F_WRITE)]);
            self.peer.send(&self.frame).unwrap();
        }
        self.rx.publish();
        self.kicks[0].write(1).unwrap();
        let rx = &self.rx;
        self.lp.until(|| rx.done());
    }
}

/// Runs `batch` (which moves `units` bytes or operations) for
/// [`HOLD_TIME`] after spending the bucket, prints the achieved rate
/// against `configured`, and fails beyond [`TOLERANCE`].
fn hold(name: &str, unit: &str, configured: u64, units: u64, mut batch: impl FnMut()) {
    // Spend the full bucket (100 ms worth) and any burst first.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        batch();
    }
    let t0 = Instant::now();
    let mut moved = 0u64;
    while t0.elapsed() < HOLD_TIME {
        batch();
        moved += units;
    }
    // Rates below 2^53: exact in f64.
    #[allow(clippy::cast_precision_loss)]
    let (achieved, configured_f) = (moved as f64 / t0.elapsed().as_secs_f64(), configured as f64);
    let error = (achieved - configured_f) / configured_f;
    println!(
        "{name}: configured {configured} {unit}/s, achieved {achieved:.0} {unit}/s ({:+.2}%)",
        error * 100.0
    );
    assert!(
        error.abs() <= TOLERANCE,
        "{name}: the achieved rate is {:+.2}% off the configured one",
        error * 100.0
    );
}

fn benches(c: &mut Criterion) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut group = c.benchmark_group("rate_limiter");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    // virtio-blk, bandwidth: 16 reads of 64 KiB (1 MiB) per batch.
    const BLK_BYTES_PER_S: u64 = 32 << 20;
    let (n, len) = (16u16, 64u32 << 10);
    let mut rig = BlkRig::new(
        &mem,
        RateLimiterConfig {
            bandwidth: Some(limit(BLK_BYTES_PER_S)),
            ops: None,
        },
    );
    let bytes = u64::from(n) * u64::from(len);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("blk_bandwidth_32MiBps", |b| b.iter(|| rig.batch(n, len)));
    hold("blk_bandwidth", "bytes", BLK_BYTES_PER_S, bytes, || {
        rig.batch(n, len)
    });
    drop(rig);

    // virtio-blk, operations: 20 reads of 4 KiB per batch.
    const BLK_OPS_PER_S: u64 = 2000;
    let (n, len) = (20u16, 4096u32);
    let mut rig = BlkRig::new(
        &mem,
        RateLimiterConfig {
            bandwidth: None,
            ops: Some(limit(BLK_OPS_PER_S)),
        },
    );
    group.throughput(Throughput::Elements(u64::from(n)));
    group.bench_function("blk_ops_2000ps", |b| b.iter(|| rig.batch(n, len)));
    hold("blk_ops", "requests", BLK_OPS_PER_S, u64::from(n), || {
        rig.batch(n, len)
    });
    drop(rig);

    // virtio-net transmit, bandwidth: 32 frames of 1500 bytes per batch.
    const TX_BYTES_PER_S: u64 = 10_000_000;
    let (n, frame_len) = (32u16, 1500usize);
    let mut rig = NetRig::new(
        &mem,
        RateLimiterConfig::unlimited(),
        RateLimiterConfig {
            bandwidth: Some(limit(TX_BYTES_PER_S)),
            ops: None,
        },
        frame_len,
    );
    let bytes = u64::from(n) * frame_len as u64;
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("net_tx_bandwidth_10MBps", |b| b.iter(|| rig.tx_batch(n)));
    hold("net_tx_bandwidth", "bytes", TX_BYTES_PER_S, bytes, || {
        rig.tx_batch(n)
    });
    drop(rig);

    // virtio-net receive, operations: 32 frames per batch.
    const RX_FRAMES_PER_S: u64 = 5000;
    let mut rig = NetRig::new(
        &mem,
        RateLimiterConfig {
            bandwidth: None,
            ops: Some(limit(RX_FRAMES_PER_S)),
        },
        RateLimiterConfig::unlimited(),
        frame_len,
    );
    group.throughput(Throughput::Elements(u64::from(n)));
    group.bench_function("net_rx_ops_5000ps", |b| b.iter(|| rig.rx_batch(n)));
    hold(
        "net_rx_ops",
        "frames",
        RX_FRAMES_PER_S,
        u64::from(n),
        || rig.rx_batch(n),
    );
    drop(rig);

    // One passing check of both buckets (they never run dry here).
    let mut limiter = RateLimiter::new(&RateLimiterConfig {
        bandwidth: Some(limit(u64::MAX >> 20)),
        ops: Some(limit(u64::MAX >> 20)),
    })
    .unwrap();
    group.throughput(Throughput::Elements(1));
    group.bench_function("consume", |b| {
        b.iter(|| assert!(limiter.consume(1, std::hint::black_box(4096))))
    });

    group.finish();
}

criterion_group!(rate_limiter, benches);
criterion_main!(rate_limiter);
