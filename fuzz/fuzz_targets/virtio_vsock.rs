//! virtio-vsock: guest packets on the transmit queue, receive and event
//! buffers, and host processes on real Unix sockets in a temporary
//! directory (`CONNECT <port>` lines, stream data, hang-ups, and listeners
//! for guest-initiated connections), with connection state carried across
//! packets, all through a real event loop.
//!
//! Input: three bytes for the queue sizes, then operations (see `run`).
//! Checks, besides the common ones (`dormouse_fuzz` docs): the last
//! receive buffer of each pass holds a well-formed packet from the host to
//! this guest whose length field matches its used length.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use dormouse::devices::virtio::vsock::{Vsock, VsockConfig};
use dormouse::devices::virtio::{Interrupt, VirtioDevice};
use dormouse::devices::EventFdTrigger;
use dormouse_fuzz::event::Loop;
use dormouse_fuzz::guest::Guest;
use dormouse_fuzz::input::Input;
use dormouse_fuzz::ring::{queue_size, DescSpec, Ring, Used};
use dormouse_fuzz::{areas, checked_pass, ring_base, MEM_SIZE};
use libfuzzer_sys::{fuzz_target, Corpus};

const MAX_OPS: usize = 256;
const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
const HDR_LEN: usize = 44;
const MAX_PKT_LEN: usize = 64 * 1024;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// Host ports with a listener (guest-initiated connections go there); the
/// device allows the first, so the second exercises the refusal.
const HOST_PORTS: [u32; 2] = [1024, 1025];
/// Guest ports the host asks for, and the device's first local ports.
const GUEST_PORTS: [u32; 2] = [52, 53];
const LOCAL_PORTS: [u32; 2] = [1 << 30, (1 << 30) + 1];
/// The most host streams open at once.
const MAX_STREAMS: usize = 8;

/// The socket directory: one per process.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = dormouse_fuzz::scratch_path("vsock");
        std::fs::create_dir_all(&d).expect("creating the socket directory");
        d
    })
}

struct Rig {
    guest: Guest,
    dev: Arc<Mutex<Vsock>>,
    lp: Loop<Arc<Mutex<Vsock>>>,
    rings: [Ring; 3],
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
    uds: PathBuf,
}

impl Rig {
    fn activate(&mut self, sizes: [u16; 3]) {
        let mut queues = Vec::new();
        for (q, &size) in sizes.iter().enumerate() {
            let (ring, queue) = Ring::new(&mut self.guest, ring_base(q), size);
            self.rings[q] = ring;
            queues.push(queue);
        }
        let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
        let mut dev = self.dev.lock().unwrap();
        let offered = dev.device_features();
        dev.set_acked_features(offered);
        dev.activate(self.guest.mem.clone(), interrupt, queues)
            .expect("activation with valid queues");
    }

    fn pump(&mut self) {
        let Rig {
            guest, lp, rings, ..
        } = self;
        let [rx, tx, ev] = rings;
        let used = checked_pass(guest, &mut [rx, tx, ev], || lp.pump());
        if let Some(u) = used[RXQ].last() {
            self.check_rx(u);
        }
    }

    /// A filled receive buffer holds a packet from the host to this guest.
    fn check_rx(&self, u: &Used) {
        let len = usize::try_from(u.len).unwrap();
        if len == 0 || u.chain.ranges.is_empty() || !u.chain.disjoint() {
            // Returned unfilled (the device failed on it), the avail ring
            // is corrupt and the driver no longer knows the chain, or the
            // chain's buffers overlap (the packet overwrote itself).
            return;
        }
        assert!(
            (HDR_LEN..=HDR_LEN + MAX_PKT_LEN).contains(&len),
            "an rx buffer used with length {len}"
        );
        let p = u.written(&self.guest);
        let le32 = |at: usize| u32::from_le_bytes(p[at..at + 4].try_into().unwrap());
        let le64 = |at: usize| u64::from_le_bytes(p[at..at + 8].try_into().unwrap());
        let le16 = |at: usize| u16::from_le_bytes(p[at..at + 2].try_into().unwrap());
        assert_eq!((le64(0), le64(8)), (HOST_CID, GUEST_CID), "rx packet CIDs");
        assert_eq!(le32(24) as usize, len - HDR_LEN, "rx packet length field");
        assert_eq!(le16(28), 1, "rx packet type");
        assert!((1..=7).contains(&le16(30)), "rx packet op {}", le16(30));
    }

    fn kick(&self, q: usize) {
        self.dev.lock().unwrap().queue_events()[q].write(1).unwrap();
    }

    fn stream(&mut self, b: u8) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        (n > 0).then(|| &mut self.streams[usize::from(b) % n])
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for port in HOST_PORTS {
            let _ = std::fs::remove_file(port_path(&self.uds, port));
        }
    }
}

fn port_path(uds: &std::path::Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    p.into()
}

/// Picks from a few meaningful values, or takes the raw one.
fn pick(sel: u8, raw: u32, values: &[u32]) -> u32 {
    values.get(usize::from(sel)).copied().unwrap_or(raw)
}

/// A guest packet: a header (fields chosen by the input, mostly valid) and
/// payload, written to the buffers area; returns its descriptors.
fn tx_packet(rig: &mut Rig, input: &mut Input<'_>) -> Vec<DescSpec> {
    let areas = areas();
    let sel = input.u16();
    let raw = input.u32();
    let op = u16::from(input.u8() % 8);
    let flags = input.u32() & if sel & 0x8000 != 0 { u32::MAX } else { 3 };
    let buf_alloc = input.u32();
    let fwd_cnt = input.u32();
    let payload_len = usize::from(input.u16()) % (MAX_PKT_LEN + 2);
    let seed = input.u8();
    let split = input.u16();
    let src_port = pick((sel & 3) as u8, raw, &GUEST_PORTS);
    let ports = [HOST_PORTS[0], HOST_PORTS[1], LOCAL_PORTS[0], LOCAL_PORTS[1]];
    let dst_port = pick((sel >> 2 & 7) as u8, raw, &ports);
    let src_cid = if sel & 0x20 != 0 {
        u64::from(raw)
    } else {
        GUEST_CID
    };
    let dst_cid = if sel & 0x40 != 0 {
        u64::from(raw)
    } else {
        HOST_CID
    };
    let type_: u16 = if sel & 0x80 != 0 { raw as u16 } else { 1 };
    // Bit 8: the length field lies.
    let len_field = if sel & 0x100 != 0 {
        raw
    } else {
        payload_len as u32
    };
    let mut pkt = Vec::with_capacity(HDR_LEN + payload_len);
    pkt.extend_from_slice(&src_cid.to_le_bytes());
    pkt.extend_from_slice(&dst_cid.to_le_bytes());
    pkt.extend_from_slice(&src_port.to_le_bytes());
    pkt.extend_from_slice(&dst_port.to_le_bytes());
    pkt.extend_from_slice(&len_field.to_le_bytes());
    pkt.extend_from_slice(&type_.to_le_bytes());
    pkt.extend_from_slice(&op.to_le_bytes());
    pkt.extend_from_slice(&flags.to_le_bytes());
    pkt.extend_from_slice(&buf_alloc.to_le_bytes());
    pkt.extend_from_slice(&fwd_cnt.to_le_bytes());
    pkt.extend((0..payload_len).map(|i| (i as u8).wrapping_add(seed)));
    // Put it at the start of a 128 KiB-aligned window of the data area,
    // cut into two descriptors at `split` (bit 9 makes the second
    // device-writable).
    let offset = u32::from(sel >> 10) % 3 * 0x2_0000;
    rig.guest.write(areas.data.0 + u64::from(offset), &pkt);
    let total = pkt.len();
    let cut = usize::from(split) % (total + 1);
    let part = |at: usize, len: usize| -> (u32, u16) {
        (offset + at as u32, u16::try_from(len).unwrap_or(u16::MAX))
    };
    let mut descs = Vec::new();
    let mut at = 0;
    for (i, len) in [cut, total - cut].into_iter().enumerate() {
        // Descriptor lengths are u16 here: longer parts are cut again.
        let mut left = len;
        while left > 0 || (i == 0 && len == 0) {
            let n = left.min(0xffff);
            let (addr, l) = part(at, n);
            let mut d = DescSpec::r(addr, l);
            if i == 1 && sel & 0x200 != 0 {
                d.mode |= 1;
            }
            descs.push(d);
            at += n;
            left -= n;
            if n == 0 {
                break;
            }
        }
    }
    descs
}

fn run(data: &[u8]) -> Corpus {
    let mut input = Input::new(data);
    let sizes = [
        queue_size(input.u8()),
        queue_size(input.u8()),
        queue_size(input.u8()),
    ];
    let uds = dir().join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let dev = Arc::new(Mutex::new(
        Vsock::with_config(
            GUEST_CID,
            &uds,
            VsockConfig::default().allow_host_port(HOST_PORTS[0]),
        )
        .expect("creating the vsock device"),
    ));
    let mut guest = Guest::new(MEM_SIZE as usize);
    let rings = [0, 1, 2].map(|q| Ring::new(&mut guest, ring_base(q), 1).0);
    let listeners = HOST_PORTS
        .iter()
        .map(|&p| {
            let path = port_path(&uds, p);
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path).expect("binding a host port");
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    let mut rig = Rig {
        guest,
        lp: Loop::new(dev.clone()),
        dev,
        rings,
        listeners,
        streams: Vec::new(),
        uds,
    };
    rig.activate(sizes);
    rig.pump();
    let areas = areas();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 14 {
            0 => {
                let offset = u64::from(input.u32()) % (areas.data.1 - areas.data.0);
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                rig.guest.write(areas.data.0 + offset, bytes);
            }
            1 => {
                rig.rings[TXQ].add_chain_from(&mut rig.guest, &mut input, &areas);
            }
            // A guest packet, sent at once.
            2 => {
                let descs = tx_packet(&mut rig, &mut input);
                rig.rings[TXQ].add_chain(&mut rig.guest, &descs, &[], &areas);
                rig.kick(TXQ);
                rig.pump();
            }
            3 => {
                let q = usize::from(input.u8()) % 3;
                rig.rings[q].add_chain_from(&mut rig.guest, &mut input, &areas);
            }
            // Receive buffers: `n` single ones of one length, in
            // 16 KiB-spaced slots of the data area.
            4 => {
                let n = input.u8() % 8 + 1;
                let len = input.u16();
                let slot = u32::from(input.u8());
                for i in 0..u32::from(n) {
                    let d = DescSpec::w((slot + i) * 0x4000, len);
                    rig.rings[RXQ].add_chain(&mut rig.guest, &[d], &[], &areas);
                }
                rig.kick(RXQ);
                rig.pump();
            }
            5 => {
                let q = usize::from(input.u8()) % 3;
                rig.kick(q);
                rig.pump();
            }
            // A host process connects, or a guest-initiated connection is
            // accepted on a host port.
            6 => {
                let b = input.u8();
                if rig.streams.len() < MAX_STREAMS {
                    let s = if b & 1 == 0 {
                        UnixStream::connect(&rig.uds).ok()
                    } else {
                        let l = &rig.listeners[usize::from(b >> 1) % HOST_PORTS.len()];
                        l.accept().ok().map(|(s, _)| s)
                    };
                    if let Some(s) = s {
                        s.set_nonblocking(true).unwrap();
                        rig.streams.push(s);
                    }
                }
                rig.pump();
            }
            // A host process writes: a CONNECT line (sel bit 0) for one of
            // the guest ports or raw bytes.
            7 => {
                let which = input.u8();
                let sel = input.u8();
                let n = usize::from(input.u8());
                let bytes = if sel & 1 != 0 {
                    format!("CONNECT {}\n", GUEST_PORTS[usize::from(sel >> 1) % 2]).into_bytes()
                } else {
                    input.bytes(n).to_vec()
                };
                if let Some(s) = rig.stream(which) {
                    let _ = s.write(&bytes);
                }
                rig.pump();
            }
            // A host process reads what it has.
            8 => {
                let which = input.u8();
                if let Some(s) = rig.stream(which) {
                    let mut buf = [0u8; 4096];
                    for _ in 0..64 {
                        match s.read(&mut buf) {
                            Ok(n) if n > 0 => {}
                            _ => break,
                        }
                    }
                }
                rig.pump();
            }
            // A host process shuts a direction or goes away.
            9 => {
                let which = input.u8();
                let how = input.u8() % 4;
                let n = rig.streams.len();
                if n > 0 {
                    let i = usize::from(which) % n;
                    match how {
                        0 => drop(rig.streams.swap_remove(i)),
                        1 => drop(rig.streams[i].shutdown(Shutdown::Write)),
                        2 => drop(rig.streams[i].shutdown(Shutdown::Read)),
                        _ => drop(rig.streams[i].shutdown(Shutdown::Both)),
                    }
                }
                rig.pump();
            }
            // The VMM sends a transport reset (as after a restore).
            10 => {
                let _ = rig.dev.lock().unwrap().send_transport_reset();
                rig.pump();
            }
            11 => {
                rig.dev.lock().unwrap().reset();
                rig.pump();
                let sizes = [
                    queue_size(input.u8()),
                    queue_size(input.u8()),
                    queue_size(input.u8()),
                ];
                rig.activate(sizes);
                rig.pump();
            }
            12 => {
                let q = usize::from(input.u8()) % 3;
                let idx = input.u16();
                rig.rings[q].set_avail_idx(&mut rig.guest, idx);
            }
            _ => rig.pump(),
        }
    }
    for q in [RXQ, TXQ, EVQ] {
        rig.kick(q);
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
