//! virtio-net receive: frames from the host side of the "TAP" (one end of
//! a datagram socket pair, `Tap::from_frame_socket`) into receive chains
//! the guest controls, through a real event loop.
//!
//! Input: a byte for the receive queue's size, then operations (see
//! `run`): receive chains from raw descriptors or as plain buffers of a
//! chosen shape, host frames (header offload bits, lengths from tiny to
//! past the largest, bursts), notifications, lying avail indices, resets,
//! and an empty datagram (end of file on the socket).
//!
//! The target keeps a model of every frame the host sent and not yet
//! accounted for, and after each event-loop pass checks, besides the
//! common ones (`dormouse_fuzz` docs):
//!
//! - the device wrote only the first `len` bytes of the chains it used
//!   (and used rings): never a chain it did not use, never past the frame;
//! - each used chain holds the oldest frame not yet accounted for that can
//!   be delivered and fits it: `len` is header plus frame, the header is
//!   the no-offload one with `num_buffers = 1`, the frame is the host's
//!   byte for byte (when no later chain of the pass overwrote it);
//! - every frame the device skipped is counted as dropped and was one it
//!   must drop: too short, too long, asking for an offload, or larger than
//!   the chain at the front of the ring; no frame is dropped for any other
//!   reason, except the one held when the driver resets;
//! - nothing is delivered after the socket's end of file;
//! - after a receive notification, no frame waits while the driver has a
//!   receive chain (unless the device failed: then the driver must reset).

#![no_main]

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use dormouse::devices::virtio::net::{Net, NetCounters, Tap, MAX_BUFFER_LEN, VNET_HDR_LEN};
use dormouse::devices::virtio::{Interrupt, VirtioDevice};
use dormouse::devices::EventFdTrigger;
use dormouse_fuzz::event::Loop;
use dormouse_fuzz::guest::{Guest, Range};
use dormouse_fuzz::input::Input;
use dormouse_fuzz::ring::{queue_size, DescSpec, Ring, Used};
use dormouse_fuzz::{areas, ring_base, MEM_SIZE};
use libfuzzer_sys::{fuzz_target, Corpus};

const MAX_OPS: usize = 256;
const MAC: [u8; 6] = [0x06, 0x64, 0x6d, 0x73, 0x00, 0x02];
const RX: usize = 0;
const TX: usize = 1;
/// The header the device puts before every received frame.
const RX_HEADER: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
/// The shortest header-plus-frame the device delivers (an Ethernet header).
const MIN_LEN: usize = VNET_HDR_LEN + 14;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const NEEDS_CSUM: u8 = 1;
/// Spacing of the plain receive buffers operation 2 lays out.
const SLOT: u32 = 0x4000;

/// What the host put on the socket, in order.
#[derive(Debug)]
enum Sent {
    /// A datagram: virtio-net header and frame.
    Frame(Vec<u8>),
    /// An empty datagram: the device reads it as end of file.
    Eof,
}

/// Whether the device may deliver this header-plus-frame at all (the
/// module documentation of `net`: no offload was negotiated, so frames
/// asking for one are dropped, as are runts and frames past the largest).
fn deliverable(f: &[u8]) -> bool {
    (MIN_LEN..=MAX_BUFFER_LEN).contains(&f.len()) && f[0] & NEEDS_CSUM == 0 && f[1] == 0
}

/// Frame bytes: a frame of `len` bytes with seed `s` is `[s..s + len]`
/// (made once; longer than the longest frame `FrameSpec` builds plus the
/// largest seed).
fn content() -> &'static [u8] {
    static CONTENT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CONTENT.get_or_init(|| {
        (0..0x2_0000usize)
            .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 8) as u8)
            .collect()
    })
}

/// A host frame as the input describes it (5 bytes).
struct FrameSpec {
    /// Bits 0-1: the header (zero, flags, gso_type, all bytes); bits 2-3:
    /// the length class.
    kind: u8,
    /// The header byte(s).
    hdr: u8,
    /// The raw length.
    len: u16,
    /// The content's seed.
    seed: u8,
}

impl FrameSpec {
    fn read(input: &mut Input<'_>) -> Self {
        Self {
            kind: input.u8(),
            hdr: input.u8(),
            len: input.u16(),
            seed: input.u8(),
        }
    }

    /// The datagram, `extra` bytes longer than the spec says, carrying
    /// `serial` (so that every frame is told apart) when there is room.
    fn build(&self, extra: usize, serial: u32) -> Vec<u8> {
        let raw = usize::from(self.len) + extra;
        let len = match self.kind >> 2 & 3 {
            0 => 1 + raw % 64,
            1 => 1 + raw % 2048,
            2 => MAX_BUFFER_LEN - 64 + raw % 128,
            _ => raw.clamp(1, MAX_BUFFER_LEN + 0x1000),
        };
        let seed = usize::from(self.seed);
        let mut f = content()[seed..seed + len].to_vec();
        let hdr = &mut f[..len.min(VNET_HDR_LEN)];
        match self.kind & 3 {
            0 => hdr.fill(0),
            1 => {
                hdr.fill(0);
                hdr[0] = self.hdr;
            }
            2 => {
                hdr.fill(0);
                if let Some(b) = hdr.get_mut(1) {
                    *b = self.hdr;
                }
            }
            _ => hdr.fill(self.hdr),
        }
        if len >= VNET_HDR_LEN + 4 {
            f[VNET_HDR_LEN..VNET_HDR_LEN + 4].copy_from_slice(&serial.to_le_bytes());
        }
        f
    }
}

struct Rig {
    guest: Guest,
    dev: Arc<Mutex<Net>>,
    lp: Loop<Arc<Mutex<Net>>>,
    peer: UnixDatagram,
    rx: Ring,
    tx: Ring,
    /// Datagrams sent that the device has neither delivered nor dropped.
    sent: VecDeque<Sent>,
    serial: u32,
}

impl Rig {
    fn activate(&mut self, rx_size: u16) {
        let (rx, rxq) = Ring::new(&mut self.guest, ring_base(RX), rx_size);
        let (tx, txq) = Ring::new(&mut self.guest, ring_base(TX), 1);
        self.rx = rx;
        self.tx = tx;
        let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
        let mut dev = self.dev.lock().unwrap();
        let offered = dev.device_features();
        dev.set_acked_features(offered);
        dev.activate(self.guest.mem.clone(), interrupt, vec![rxq, txq])
            .expect("activation with valid queues");
    }

    fn counters(&self) -> NetCounters {
        self.dev.lock().unwrap().counters()
    }

    fn kick(&self) {
        self.dev.lock().unwrap().queue_events()[RX]
            .write(1)
            .unwrap();
    }

    /// Sends a datagram; the model keeps it if the socket took it.
    fn send(&mut self, frame: Vec<u8>) {
        self.serial = self.serial.wrapping_add(1);
        if self.peer.send(&frame).is_ok() {
            self.sent.push_back(if frame.is_empty() {
                Sent::Eof
            } else {
                Sent::Frame(frame)
            });
        }
    }

    /// One event-loop pass and its checks; `notified`: the driver
    /// notified the receive queue before it.
    fn pump(&mut self, notified: bool) {
        let before = self.counters();
        self.rx.expect(&self.guest);
        self.tx.expect(&self.guest);
        let mut everything = Vec::new();
        self.rx.allowed(&mut everything);
        self.lp.pump();
        let used = self.rx.take_used(&self.guest);
        assert!(
            self.tx.take_used(&self.guest).is_empty(),
            "the device used a transmit chain that was never made available"
        );
        let after = self.counters();
        let broken = self.dev.lock().unwrap().needs_reset();
        let corrupt = self.rx.is_corrupt();

        // Writes: the used rings and the first `len` bytes of each used
        // chain, nothing else.
        let written: Vec<Vec<Range>> = used.iter().map(Used::written_ranges).collect();
        let mut allowed = vec![self.rx.used_ring_range(), self.tx.used_ring_range()];
        if corrupt {
            allowed.extend(everything);
        } else {
            allowed.extend(written.iter().flatten().copied());
        }
        self.guest.check(&allowed);

        assert_eq!(
            after.rx_frames - before.rx_frames,
            used.len() as u64,
            "frames counted as delivered != receive chains used"
        );
        if corrupt {
            // The device cannot read the avail ring either: it fails
            // before it takes a chain.
            assert!(used.is_empty(), "the device used a chain of a corrupt ring");
        }
        let mut drops = after.rx_dropped - before.rx_dropped;
        for (i, u) in used.iter().enumerate() {
            // The frame is the oldest one the device may deliver that fits
            // this chain; those before it were dropped.
            let frame = loop {
                match self.sent.pop_front() {
                    None => panic!(
                        "receive chain {} holds {} bytes though no frame was sent",
                        u.head, u.len
                    ),
                    Some(Sent::Eof) => panic!("a frame was delivered after the end of file"),
                    Some(Sent::Frame(f)) => {
                        if deliverable(&f) && f.len() as u64 <= u.chain.writable {
                            break f;
                        }
                        assert!(
                            drops > 0,
                            "a {}-byte frame before the one in chain {} was skipped but not \
                             counted as dropped",
                            f.len(),
                            u.head
                        );
                        drops -= 1;
                    }
                }
            };
            assert_eq!(
                u.len as usize,
                frame.len(),
                "chain {} (of {} writable bytes) used with length {} for a {}-byte \
                 header-and-frame",
                u.head,
                u.chain.writable,
                u.len,
                frame.len()
            );
            let overlaps = |a: &[Range], b: &[Range]| {
                a.iter()
                    .any(|&(s, e)| b.iter().any(|&(t, f)| s < f && t < e))
            };
            let own = &written[i];
            let intact = own
                .iter()
                .enumerate()
                .all(|(k, r)| !overlaps(&own[k + 1..], std::slice::from_ref(r)))
                && written[i + 1..].iter().all(|later| !overlaps(own, later));
            if intact {
                let bytes = u.written(&self.guest);
                assert_eq!(bytes[..VNET_HDR_LEN], RX_HEADER, "the receive header");
                assert!(
                    bytes[VNET_HDR_LEN..] == frame[VNET_HDR_LEN..],
                    "chain {} does not hold the frame the host sent",
                    u.head
                );
            }
        }
        // Dropped after the last chain used: each must be undeliverable or
        // too large for the chain the device tries next.
        let next = self.rx.front().map(|c| c.writable);
        for _ in 0..drops {
            match self.sent.pop_front() {
                Some(Sent::Frame(f)) => assert!(
                    !deliverable(&f) || next.is_some_and(|w| f.len() as u64 > w),
                    "a deliverable {}-byte frame was dropped though the next receive chain \
                     has {next:?} writable bytes",
                    f.len()
                ),
                Some(Sent::Eof) | None => {
                    panic!("the device counts a dropped frame the host never sent")
                }
            }
        }
        // A notified device takes every waiting frame while it has chains.
        if notified && !broken && !corrupt && self.rx.front().is_some() {
            assert!(
                matches!(self.sent.front(), None | Some(Sent::Eof)),
                "a frame waits though the driver notified and has a receive chain"
            );
        }
    }

    /// A driver reset: the frame the device held, if any, is dropped.
    fn reset(&mut self, rx_size: u16) {
        let before = self.counters();
        self.dev.lock().unwrap().reset();
        let dropped = self.counters().rx_dropped - before.rx_dropped;
        assert!(dropped <= 1, "a reset dropped {dropped} frames");
        if dropped == 1 {
            match self.sent.pop_front() {
                Some(Sent::Frame(f)) => assert!(
                    deliverable(&f),
                    "the device held a {}-byte frame it must drop",
                    f.len()
                ),
                _ => panic!("a reset dropped a frame the host never sent"),
            }
        }
        self.pump(false);
        self.activate(rx_size);
        self.pump(false);
    }
}

fn run(data: &[u8]) -> Corpus {
    let mut input = Input::new(data);
    let rx_size = queue_size(input.u8());
    let (ours, peer) = UnixDatagram::pair().expect("socket pair");
    peer.set_nonblocking(true).unwrap();
    let tap = Tap::from_frame_socket(OwnedFd::from(ours), "fuzz-rx").expect("frame socket");
    let dev = Arc::new(Mutex::new(Net::with_tap(tap, MAC).expect("net device")));
    let mut guest = Guest::new(MEM_SIZE as usize);
    let (rx, _) = Ring::new(&mut guest, ring_base(RX), 1);
    let (tx, _) = Ring::new(&mut guest, ring_base(TX), 1);
    let mut rig = Rig {
        guest,
        lp: Loop::new(dev.clone()),
        dev,
        peer,
        rx,
        tx,
        sent: VecDeque::new(),
        serial: 0,
    };
    rig.activate(rx_size);
    rig.pump(false);
    let areas = areas();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 11 {
            // Driver writes into the buffers area.
            0 => {
                let offset = u64::from(input.u32()) % (areas.data.1 - areas.data.0);
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                rig.guest.write(areas.data.0 + offset, bytes);
            }
            // A chain from raw descriptor specs.
            1 => {
                rig.rx.add_chain_from(&mut rig.guest, &mut input, &areas);
            }
            // `n` plain receive chains of `parts` writable descriptors of
            // `len` bytes each, in 16 KiB-spaced slots of the data area;
            // then a notification unless bit 7 of the shape says not.
            2 => {
                let n = u32::from(input.u8() % 8) + 1;
                let shape = input.u8();
                let len = input.u16();
                let slot = u32::from(input.u8());
                let parts = u32::from(shape & 3) + 1;
                for i in 0..n {
                    let base = (slot + i) * SLOT;
                    let descs: Vec<DescSpec> = (0..parts)
                        .map(|j| DescSpec::w(base + j * u32::from(len), len))
                        .collect();
                    rig.rx.add_chain(&mut rig.guest, &descs, &[], &areas);
                }
                if shape & 0x80 == 0 {
                    rig.kick();
                    rig.pump(true);
                }
            }
            3 => {
                rig.kick();
                rig.pump(true);
            }
            // The host sends a frame.
            4 => {
                let spec = FrameSpec::read(&mut input);
                let frame = spec.build(0, rig.serial);
                rig.send(frame);
                rig.pump(false);
            }
            // The host sends a burst of frames, each `step` longer.
            5 => {
                let count = usize::from(input.u8() % 16) + 1;
                let step = usize::from(input.u8());
                let spec = FrameSpec::read(&mut input);
                for i in 0..count {
                    let frame = spec.build(i * step, rig.serial);
                    rig.send(frame);
                }
                rig.pump(false);
            }
            6 => {
                let idx = input.u16();
                rig.rx.set_avail_idx(&mut rig.guest, idx);
            }
            7 => {
                let size = queue_size(input.u8());
                rig.reset(size);
            }
            8 => {
                let value = input.u16();
                let event = input.u8() & 1 != 0;
                rig.rx.set_avail_flags(&mut rig.guest, value, event);
            }
            // The host's end says end of file.
            9 => {
                rig.send(Vec::new());
                rig.pump(false);
            }
            _ => rig.pump(false),
        }
    }
    rig.kick();
    rig.pump(true);
    // Bytes past the last operation mean nothing: keep such inputs out
    // of the corpus.
    if input.is_empty() {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
}

fuzz_target!(|data: &[u8]| -> Corpus { run(data) });
