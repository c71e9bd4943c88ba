//! The virtio-mmio transport: sequences of register reads and writes
//! (offset, width, value) against an `MmioTransport` wrapping a real device
//! (virtio-blk on a temporary image, virtio-net on a socket pair, or
//! virtio-vsock on a temporary Unix socket), with the handshake, queue
//! setup at fuzzed addresses, DRIVER_OK, notifications and resets, and the
//! device's event loop run between accesses.
//!
//! Input: a byte choosing the device, then operations (see `run`). Some
//! operations are shortcuts for what a driver does in several accesses
//! (negotiate features, set up a queue), so that the fuzzer reaches a
//! running device quickly; the raw accesses stay available for everything
//! else. Checks, besides "no panic and the event loop settles": the
//! identification registers never change, the status register holds only
//! defined bits, and every page the device changed is marked dirty.

#![no_main]

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use dormouse::bus::BusDevice;
use dormouse::devices::virtio::block::Block;
use dormouse::devices::virtio::mmio::MmioTransport;
use dormouse::devices::virtio::net::{Net, Tap};
use dormouse::devices::virtio::vsock::Vsock;
use dormouse::devices::virtio::{Interrupt, VirtioDevice};
use dormouse::devices::EventFdTrigger;
use dormouse_fuzz::event::Loop;
use dormouse_fuzz::guest::Guest;
use dormouse_fuzz::input::Input;
use dormouse_fuzz::ring::{queue_size, Ring, RING_SPAN};
use dormouse_fuzz::{areas, MEM_SIZE};
use event_manager::MutEventSubscriber;
use libfuzzer_sys::{fuzz_target, Corpus};

const MAX_OPS: usize = 512;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
}

/// Every bit the status register may hold.
const STATUS_BITS: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x40 | 0x80;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

fn tmp(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = dormouse_fuzz::scratch_path("mmio");
        std::fs::create_dir_all(&d).expect("creating the temporary directory");
        d
    })
    .join(name)
}

/// The device under the transport; the loop serves it. The socket pair's
/// other end is kept open for net.
fn device(
    kind: u8,
) -> (
    Arc<Mutex<dyn VirtioDevice>>,
    Subscriber,
    Option<UnixDatagram>,
) {
    match kind % 3 {
        0 => {
            let path = tmp("disk.img");
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("creating the disk image");
            f.write_all_at(&[0x5a; 8 * 512], 0).unwrap();
            let d = Arc::new(Mutex::new(Block::new(&path, false).expect("block device")));
            (d.clone(), d, None)
        }
        1 => {
            let (ours, peer) = UnixDatagram::pair().expect("socket pair");
            peer.set_nonblocking(true).unwrap();
            let tap = Tap::from_frame_socket(OwnedFd::from(ours), "fuzz").unwrap();
            let mac = [0x06, 0x64, 0x6d, 0x73, 0x00, 0x02];
            let d = Arc::new(Mutex::new(Net::with_tap(tap, mac).expect("net device")));
            (d.clone(), d, Some(peer))
        }
        _ => {
            let path = tmp("m.sock");
            let _ = std::fs::remove_file(&path);
            let d = Arc::new(Mutex::new(Vsock::new(3, &path).expect("vsock device")));
            (d.clone(), d, None)
        }
    }
}

struct Rig {
    guest: Guest,
    transport: MmioTransport,
    device: Arc<Mutex<dyn VirtioDevice>>,
    lp: Loop<Subscriber>,
    /// Rings the shortcut set up, per queue, for adding chains.
    rings: Vec<Option<Ring>>,
    peer: Option<UnixDatagram>,
}

impl Rig {
    fn read(&mut self, offset: u64, width: usize) -> u64 {
        let mut b = [0u8; 8];
        self.transport.read(offset, &mut b[..width]);
        u64::from_le_bytes(b)
    }

    fn write(&mut self, offset: u64, width: usize, value: u64) {
        self.transport.write(offset, &value.to_le_bytes()[..width]);
    }

    fn w32(&mut self, offset: u64, value: u32) {
        self.write(offset, 4, u64::from(value));
    }

    fn status(&mut self) -> u32 {
        self.read(reg::STATUS, 4) as u32
    }

    /// Runs the device's event loop and checks what is cheap to check.
    fn pump(&mut self) {
        self.lp.pump();
        // Anything may be a buffer here (rings are where the input put
        // them); what is checked is that the dirty bitmap saw every write.
        self.guest.check(&[(0, u64::MAX)]);
        assert_eq!(self.read(reg::MAGIC, 4), 0x7472_6976, "MagicValue changed");
        assert_eq!(self.read(reg::VERSION, 4), 2, "Version changed");
        let status = self.status();
        assert_eq!(
            status & !STATUS_BITS,
            0,
            "status {status:#x} has undefined bits"
        );
        if let Some(peer) = &self.peer {
            let mut buf = vec![0u8; 70_000];
            while peer.recv(&mut buf).is_ok() {}
        }
    }

    /// ACKNOWLEDGE, DRIVER, the features (`mask` of what is offered),
    /// FEATURES_OK: what a driver does before setting up queues.
    fn negotiate(&mut self, mask: u64) {
        self.w32(reg::STATUS, 1);
        self.w32(reg::STATUS, 3);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.w32(reg::DEVICE_FEATURES_SEL, sel);
            offered |= self.read(reg::DEVICE_FEATURES, 4) << (32 * sel);
        }
        let features = offered & (mask | 1 << 32);
        for sel in 0..2u32 {
            self.w32(reg::DRIVER_FEATURES_SEL, sel);
            self.w32(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        self.w32(reg::STATUS, 11);
    }

    /// Sets up queue `q` of `size` entries with its rings at `base`.
    fn setup_queue(&mut self, q: u32, base: u64, size: u16) {
        let (ring, _) = Ring::new(&mut self.guest, base, size);
        let split = |a: u64| ((a & 0xffff_ffff) as u32, (a >> 32) as u32);
        self.w32(reg::QUEUE_SEL, q);
        self.w32(reg::QUEUE_NUM, u32::from(size));
        let (lo, hi) = split(ring.desc);
        self.w32(reg::QUEUE_DESC_LOW, lo);
        self.w32(reg::QUEUE_DESC_HIGH, hi);
        let (lo, hi) = split(ring.avail);
        self.w32(reg::QUEUE_DRIVER_LOW, lo);
        self.w32(reg::QUEUE_DRIVER_HIGH, hi);
        let (lo, hi) = split(ring.used);
        self.w32(reg::QUEUE_DEVICE_LOW, lo);
        self.w32(reg::QUEUE_DEVICE_HIGH, hi);
        self.w32(reg::QUEUE_READY, 1);
        let q = q as usize;
        if q < self.rings.len() {
            self.rings[q] = Some(ring);
        }
    }
}

fn run(data: &[u8]) -> Corpus {
    let mut input = Input::new(data);
    let (device, subscriber, peer) = device(input.u8());
    let mut guest = Guest::new(MEM_SIZE as usize);
    let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
    let transport = MmioTransport::new(device.clone(), guest.mem.clone(), interrupt.clone());
    guest.resync();
    let mut lp: Loop<Subscriber> = Loop::empty();
    lp.add(subscriber);
    let queues = device.lock().unwrap().queue_max_sizes().len();
    let mut rig = Rig {
        guest,
        transport,
        device,
        lp,
        rings: (0..queues).map(|_| None).collect(),
        peer,
    };
    rig.pump();
    let areas = areas();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 12 {
            // A raw register write: offset (bit 15: any byte offset in the
            // window and config space, else a register), width, value.
            0 | 1 => {
                let off = input.u16();
                let offset = if off & 0x8000 != 0 {
                    u64::from(off) % 0x1000
                } else {
                    u64::from(off % 0x40) * 4
                };
                let width = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                let value = input.u64();
                rig.write(offset, width, value);
                rig.pump();
            }
            2 => {
                let off = input.u16();
                let offset = if off & 0x8000 != 0 {
                    u64::from(off) % 0x1000
                } else {
                    u64::from(off % 0x40) * 4
                };
                let width = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                rig.read(offset, width);
            }
            // Driver writes anywhere in guest memory.
            3 => {
                let addr = u64::from(input.u32()) % MEM_SIZE;
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                rig.guest.write(addr, bytes);
            }
            4 => {
                let mask = input.u64();
                rig.negotiate(mask);
                rig.pump();
            }
            // Queue setup at a fuzzed place: rings at a multiple of 8 KiB
            // (bit 15 of `at`: anywhere, even outside memory).
            5 => {
                let q = u32::from(input.u8() % 4);
                let at = input.u16();
                let size = queue_size(input.u8());
                let base = if at & 0x8000 != 0 {
                    u64::from(input.u32()) << (at & 7)
                } else {
                    u64::from(at) % (MEM_SIZE / RING_SPAN) * RING_SPAN
                };
                if base + RING_SPAN <= MEM_SIZE {
                    rig.setup_queue(q, base, size);
                } else {
                    // Only the registers: the memory is not there.
                    let split = |a: u64| ((a & 0xffff_ffff) as u32, (a >> 32) as u32);
                    rig.w32(reg::QUEUE_SEL, q);
                    rig.w32(reg::QUEUE_NUM, u32::from(size));
                    let (lo, hi) = split(base);
                    rig.w32(reg::QUEUE_DESC_LOW, lo);
                    rig.w32(reg::QUEUE_DESC_HIGH, hi);
                    rig.w32(reg::QUEUE_DRIVER_LOW, lo.wrapping_add(0x1000));
                    rig.w32(reg::QUEUE_DRIVER_HIGH, hi);
                    rig.w32(reg::QUEUE_DEVICE_LOW, lo.wrapping_add(0x1400));
                    rig.w32(reg::QUEUE_DEVICE_HIGH, hi);
                    rig.w32(reg::QUEUE_READY, 1);
                }
                rig.pump();
            }
            // DRIVER_OK.
            6 => {
                let s = rig.status();
                rig.w32(reg::STATUS, s | 4);
                rig.pump();
            }
            // A chain on a queue the shortcut set up, then a notification.
            7 => {
                let q = usize::from(input.u8()) % rig.rings.len().max(1);
                if let Some(ring) = rig.rings.get_mut(q).and_then(Option::as_mut) {
                    ring.add_chain_from(&mut rig.guest, &mut input, &areas);
                }
                rig.w32(reg::QUEUE_NOTIFY, q as u32);
                rig.pump();
            }
            8 => {
                let q = u32::from(input.u8());
                rig.w32(reg::QUEUE_NOTIFY, q);
                rig.pump();
            }
            // The driver's interrupt handler.
            9 => {
                let pending = rig.read(reg::INTERRUPT_STATUS, 4) as u32;
                rig.w32(reg::INTERRUPT_ACK, pending);
            }
            // Reset.
            10 => {
                rig.w32(reg::STATUS, 0);
                rig.rings.iter_mut().for_each(|r| *r = None);
                rig.pump();
                assert_eq!(rig.status(), 0, "the status after a reset");
                assert!(
                    !rig.device.lock().unwrap().is_activated(),
                    "active after reset"
                );
            }
            // A frame from the host, for net.
            _ => {
                let len = usize::from(input.u16()) % 2048;
                if let Some(peer) = &rig.peer {
                    let mut frame = vec![0u8; len];
                    frame.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
                    let _ = peer.send(&frame);
                }
                rig.pump();
            }
        }
    }
    rig.pump();
    // Bytes past the last operation mean nothing: keep such inputs out
    // of the corpus.
    if input.is_empty() {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
}

fuzz_target!(|data: &[u8]| -> Corpus { run(data) });
