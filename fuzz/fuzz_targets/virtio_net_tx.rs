//! virtio-net: transmit chains against a `Net` device whose "TAP" is one
//! end of a datagram socket pair (`Tap::from_frame_socket`), and frames
//! from the other end (the host kernel's side) into receive buffers, all
//! through a real event loop.
//!
//! Input: two bytes for the queue sizes, then operations (see `run`).
//! Checks, besides the common ones (`dormouse_fuzz` docs): every frame the
//! TAP gets is a transmit chain the device used, header zeroed, in order;
//! every receive buffer the device fills holds the no-offload header and a
//! frame the host sent, in order, and its used length says exactly that.

#![no_main]

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use dormouse::devices::virtio::net::{Net, Tap, MAX_BUFFER_LEN, VNET_HDR_LEN};
use dormouse::devices::virtio::{Interrupt, VirtioDevice};
use dormouse::devices::EventFdTrigger;
use dormouse_fuzz::event::Loop;
use dormouse_fuzz::guest::Guest;
use dormouse_fuzz::input::Input;
use dormouse_fuzz::ring::{queue_size, Ring, Used};
use dormouse_fuzz::{areas, checked_pass, ring_base, MEM_SIZE};
use libfuzzer_sys::{fuzz_target, Corpus};

const MAX_OPS: usize = 256;
const MAC: [u8; 6] = [0x06, 0x64, 0x6d, 0x73, 0x00, 0x01];
const RX: usize = 0;
const TX: usize = 1;
/// The header the device puts before every received frame.
const RX_HEADER: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

struct Rig {
    guest: Guest,
    dev: Arc<Mutex<Net>>,
    lp: Loop<Arc<Mutex<Net>>>,
    peer: Option<UnixDatagram>,
    rx: Ring,
    tx: Ring,
    /// Frames the host sent that the guest may still get (header stripped).
    sent: VecDeque<Vec<u8>>,
    /// Room for one frame from the TAP.
    frame: Vec<u8>,
}

impl Rig {
    fn activate(&mut self, rx_size: u16, tx_size: u16) {
        let (rx, rxq) = Ring::new(&mut self.guest, ring_base(RX), rx_size);
        let (tx, txq) = Ring::new(&mut self.guest, ring_base(TX), tx_size);
        self.rx = rx;
        self.tx = tx;
        let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
        let mut dev = self.dev.lock().unwrap();
        let offered = dev.device_features();
        dev.set_acked_features(offered);
        dev.activate(self.guest.mem.clone(), interrupt, vec![rxq, txq])
            .expect("activation with valid queues");
    }

    fn pump(&mut self) {
        let Rig {
            guest, lp, rx, tx, ..
        } = self;
        let used = checked_pass(guest, &mut [rx, tx], || lp.pump());
        self.check_tx(&used[TX]);
        self.check_rx(&used[RX]);
    }

    /// Every frame on the TAP is one of the transmit chains used in this
    /// pass (header zeroed), in order.
    fn check_tx(&mut self, used: &[Used]) {
        let Some(peer) = &self.peer else { return };
        // A bad avail ring: the driver does not know what the device read.
        let unknown = self.tx.is_corrupt();
        let mut candidates = used.iter();
        let buf = &mut self.frame;
        while let Ok(n) = peer.recv(buf) {
            let frame = &buf[..n];
            assert!(
                (VNET_HDR_LEN + 14..=MAX_BUFFER_LEN).contains(&n),
                "the device sent a {n}-byte frame"
            );
            assert!(
                frame[..VNET_HDR_LEN].iter().all(|&b| b == 0),
                "the device passed on the driver's virtio-net header"
            );
            if unknown {
                continue;
            }
            // What the device read (the chain before the pass), or what
            // it holds now if a later write of the pass changed that.
            let matches = |u: &Used| {
                [false, true]
                    .into_iter()
                    .any(|before| u.chain.holds(&self.guest, frame, VNET_HDR_LEN, before))
            };
            assert!(
                candidates.any(matches),
                "the TAP got a {n}-byte frame that matches no used transmit chain"
            );
        }
    }

    /// Every filled receive buffer holds a frame the host sent, in order.
    fn check_rx(&mut self, used: &[Used]) {
        if self.rx.is_corrupt() {
            return;
        }
        for (i, u) in used.iter().enumerate() {
            if u.chain.ranges.is_empty() && u.len == 0 {
                continue;
            }
            let len = usize::try_from(u.len).unwrap();
            assert!(len >= VNET_HDR_LEN + 14, "a {len}-byte receive buffer");
            let frame_len = len - VNET_HDR_LEN;
            // Later buffers of the same pass may overlap earlier ones: the
            // last one is intact, unless its own buffers overlap. Its
            // content must be a frame sent; the others' lengths.
            let written = (i + 1 == used.len() && u.chain.disjoint()).then(|| {
                let w = u.written(&self.guest);
                assert_eq!(w[..VNET_HDR_LEN], RX_HEADER, "receive header");
                w
            });
            // Frames may have been dropped (offloads, too large, pending at
            // a reset): skip them.
            loop {
                let Some(f) = self.sent.pop_front() else {
                    panic!("a receive buffer holds a {frame_len}-byte frame the host never sent");
                };
                let same = match &written {
                    Some(w) => w[VNET_HDR_LEN..] == f[..],
                    None => f.len() == frame_len,
                };
                if same {
                    break;
                }
            }
        }
    }

    fn kick(&self, q: usize) {
        self.dev.lock().unwrap().queue_events()[q].write(1).unwrap();
    }
}

fn run(data: &[u8]) -> Corpus {
    let mut input = Input::new(data);
    let rx_size = queue_size(input.u8());
    let tx_size = queue_size(input.u8());
    let (ours, peer) = UnixDatagram::pair().expect("socket pair");
    peer.set_nonblocking(true).unwrap();
    let tap = Tap::from_frame_socket(OwnedFd::from(ours), "fuzz-tap").expect("frame socket");
    let dev = Arc::new(Mutex::new(Net::with_tap(tap, MAC).expect("net device")));
    let mut guest = Guest::new(MEM_SIZE as usize);
    let (rx, _) = Ring::new(&mut guest, ring_base(RX), 1);
    let (tx, _) = Ring::new(&mut guest, ring_base(TX), 1);
    let mut rig = Rig {
        guest,
        lp: Loop::new(dev.clone()),
        dev,
        peer: Some(peer),
        rx,
        tx,
        sent: VecDeque::new(),
        frame: vec![0; MAX_BUFFER_LEN + 100],
    };
    rig.activate(rx_size, tx_size);
    rig.pump();
    let areas = areas();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 10 {
            0 => {
                let offset = u64::from(input.u32()) % (areas.data.1 - areas.data.0);
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                rig.guest.write(areas.data.0 + offset, bytes);
            }
            1 => {
                rig.tx.add_chain_from(&mut rig.guest, &mut input, &areas);
            }
            2 => {
                rig.rx.add_chain_from(&mut rig.guest, &mut input, &areas);
            }
            3 => {
                rig.kick(TX);
                rig.pump();
            }
            4 => {
                rig.kick(RX);
                rig.pump();
            }
            // The host sends a frame: header flags and gso_type, a length
            // (bit 7 of the first byte makes it near or past the largest).
            5 => {
                let flags = input.u8();
                let gso = input.u8();
                let seed = input.u8();
                let raw = usize::from(input.u16());
                let len = if flags & 0x80 != 0 {
                    MAX_BUFFER_LEN - 100 + raw % 200
                } else {
                    raw % 2048
                };
                let mut frame: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                    .collect();
                if len >= 2 {
                    frame[0] = flags & 0x7f;
                    frame[1] = gso;
                }
                if let Some(peer) = &rig.peer {
                    if peer.send(&frame).is_ok() && frame.len() >= VNET_HDR_LEN {
                        rig.sent.push_back(frame[VNET_HDR_LEN..].to_vec());
                    }
                }
                rig.pump();
            }
            6 => {
                let q = usize::from(input.u8() & 1);
                let idx = input.u16();
                let ring = if q == RX { &mut rig.rx } else { &mut rig.tx };
                ring.set_avail_idx(&mut rig.guest, idx);
            }
            7 => {
                rig.dev.lock().unwrap().reset();
                rig.pump();
                let rx_size = queue_size(input.u8());
                let tx_size = queue_size(input.u8());
                rig.activate(rx_size, tx_size);
                rig.pump();
            }
            // The host side goes away.
            8 => {
                rig.peer = None;
                rig.pump();
            }
            _ => {
                let q = usize::from(input.u8() & 1);
                let value = input.u16();
                let event = input.u8() & 1 != 0;
                let ring = if q == RX { &mut rig.rx } else { &mut rig.tx };
                ring.set_avail_flags(&mut rig.guest, value, event);
            }
        }
    }
    rig.kick(TX);
    rig.kick(RX);
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
