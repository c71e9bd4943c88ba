//! The hand-made seed inputs in `corpus/<target>/seed-*`: each reaches a
//! deep path of its target (a full handshake, a valid request, a
//! connection carrying data). `cargo +nightly test --lib` in `fuzz/`
//! checks that the committed files are what this module makes;
//! `DORMOUSE_FUZZ_WRITE_SEEDS=1` rewrites them.

use std::path::Path;

use crate::input::Encoder;
use crate::ring::DescSpec;

/// Appends a chain in the format `Ring::add_chain_from` reads (no
/// indirect descriptors).
fn chain(e: &mut Encoder, descs: &[DescSpec]) {
    e.u8(u8::try_from(descs.len() - 1).expect("at most 8 descriptors"));
    for d in descs {
        e.bytes(&d.encode());
    }
}

fn r(addr: u32, len: u16) -> DescSpec {
    DescSpec::r(addr, len)
}

fn w(addr: u32, len: u16) -> DescSpec {
    DescSpec::w(addr, len)
}

/// A size byte for `Ring` queue sizes: 16 entries.
const SIZE_16: u8 = 4;

mod blk {
    use super::*;

    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;

    pub fn header(e: &mut Encoder, at: u32, kind: u32, sector: u64) {
        e.u8(1).u32(at).u32(kind).u64(sector);
    }

    pub fn kick(e: &mut Encoder) {
        e.u8(3);
    }

    /// A request: header at `hdr`, `data` descriptors, status at `status`.
    pub fn request(
        e: &mut Encoder,
        hdr: u32,
        kind: u32,
        sector: u64,
        data: &[DescSpec],
        status: u32,
    ) {
        header(e, hdr, kind, sector);
        let mut descs = vec![r(hdr, 16)];
        descs.extend_from_slice(data);
        descs.push(w(status, 1));
        e.u8(2);
        chain(e, &descs);
    }
}

fn blk_seeds() -> Seeds {
    use blk::*;
    let mut out = Vec::new();

    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(0).u8(63);
    request(&mut e, 0, IN, 2, &[w(0x1000, 1024)], 0x2000);
    kick(&mut e);
    out.push(("seed-read", e.0));

    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(0).u8(63);
    e.u8(0).u32(0x3000).u8(64).bytes(&[0xa5; 64]);
    request(&mut e, 0x100, OUT, 5, &[r(0x3000, 512)], 0x2001);
    request(&mut e, 0x200, FLUSH, 0, &[], 0x2002);
    request(&mut e, 0x300, GET_ID, 0, &[w(0x4000, 20)], 0x2003);
    request(
        &mut e,
        0x400,
        IN,
        5,
        &[w(0x5000, 256), w(0x6000, 256)],
        0x2004,
    );
    kick(&mut e);
    out.push(("seed-write-flush-id-read", e.0));

    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(0).u8(63);
    // Discard and write-zeroes segments: sector, sectors, flags.
    e.u8(0).u32(0x510).u8(16).u64(8).u32(8).u32(0);
    request(&mut e, 0x500, DISCARD, 0, &[r(0x510, 16)], 0x2005);
    e.u8(0).u32(0x610).u8(16).u64(16).u32(8).u32(1);
    request(&mut e, 0x600, WRITE_ZEROES, 0, &[r(0x610, 16)], 0x2006);
    kick(&mut e);
    out.push(("seed-discard-write-zeroes", e.0));

    // A layered disk (choice bit 5): a partial write copies a chunk up, a
    // discard zeroes part of the top, a read crosses chunks.
    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(1 << 5).u8(63);
    e.u8(0).u32(0x3000).u8(64).bytes(&[0x5a; 64]);
    request(&mut e, 0x100, OUT, 5, &[r(0x3000, 512)], 0x2001);
    e.u8(0).u32(0x510).u8(16).u64(12).u32(8).u32(0);
    request(&mut e, 0x500, DISCARD, 0, &[r(0x510, 16)], 0x2005);
    request(
        &mut e,
        0x400,
        IN,
        4,
        &[w(0x5000, 4096), w(0x7000, 1024)],
        0x2004,
    );
    kick(&mut e);
    out.push(("seed-layered", e.0));

    // An indirect table, a reset, a lying avail index.
    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(0).u8(63);
    header(&mut e, 0, IN, 1);
    e.u8(2).u8(0);
    e.bytes(
        &DescSpec {
            mode: 2,
            addr: 0,
            len: 0,
            aux: 3,
        }
        .encode(),
    );
    for d in [r(0, 16), w(0x1000, 512), w(0x2000, 1)] {
        e.bytes(&d.encode());
    }
    kick(&mut e);
    e.u8(6).u8(3);
    request(&mut e, 0x100, IN, 0, &[w(0x1000, 512)], 0x2000);
    kick(&mut e);
    e.u8(4).u16(0x1234);
    kick(&mut e);
    out.push(("seed-indirect-reset-bad-idx", e.0));
    out
}

fn net_seeds() -> Seeds {
    let mut out = Vec::new();
    let frame: Vec<u8> = (0..60u8).collect();

    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(SIZE_16);
    e.u8(0).u32(12).u8(60).bytes(&frame);
    e.u8(1);
    chain(&mut e, &[r(0, 12), r(12, 60)]);
    e.u8(1);
    chain(&mut e, &[r(0x100, 72)]);
    e.u8(3);
    out.push(("seed-tx", e.0));

    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(SIZE_16);
    e.u8(2);
    chain(&mut e, &[w(0x8000, 2048)]);
    e.u8(2);
    chain(&mut e, &[w(0x9000, 12), w(0xa000, 1024)]);
    e.u8(4);
    e.u8(5).u8(0).u8(0).u8(7).u16(100);
    e.u8(5).u8(0).u8(0).u8(9).u16(600);
    out.push(("seed-rx", e.0));

    // Frames at the size limit both ways, and a reset in between.
    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(SIZE_16);
    e.u8(2);
    chain(&mut e, &[w(0x1_0000, 0xffff), w(0x2_0000, 0x1000)]);
    e.u8(5).u8(0x80).u8(0).u8(1).u16(150);
    e.u8(5).u8(0x80).u8(0).u8(2).u16(50);
    e.u8(1);
    chain(&mut e, &[r(0x3_0000, 0xffff), r(0x4_0000, 0x100)]);
    e.u8(3);
    e.u8(7).u8(SIZE_16).u8(SIZE_16);
    e.u8(1);
    chain(&mut e, &[r(0, 72)]);
    e.u8(3);
    out.push(("seed-large-reset", e.0));
    out
}

mod net_rx {
    use super::*;

    /// `n` plain receive chains of `parts` descriptors of `len` bytes from
    /// slot `slot`; notified unless `quiet`.
    pub fn buffers(e: &mut Encoder, n: u8, parts: u8, len: u16, slot: u8, quiet: bool) {
        let shape = (parts - 1) | if quiet { 0x80 } else { 0 };
        e.u8(2).u8(n - 1).u8(shape).u16(len).u8(slot);
    }

    /// A frame spec: header kind and byte, length class and raw length,
    /// content seed.
    pub fn spec(e: &mut Encoder, header: u8, hdr: u8, class: u8, len: u16, seed: u8) {
        e.u8(header | class << 2).u8(hdr).u16(len).u8(seed);
    }

    /// The host sends one frame of class 1 (`1 + len % 2048` bytes).
    pub fn frame(e: &mut Encoder, len: u16) {
        e.u8(4);
        spec(e, 0, 0, 1, len, 3);
    }

    pub fn kick(e: &mut Encoder) {
        e.u8(3);
    }
}

fn net_rx_seeds() -> Seeds {
    use net_rx::*;
    let mut out = Vec::new();

    // Buffers, then frames: delivered, asking for checksum offload
    // (dropped), larger than the buffers (dropped), a burst.
    let mut e = Encoder::default();
    e.u8(SIZE_16);
    buffers(&mut e, 4, 1, 2048, 0, false);
    frame(&mut e, 99);
    e.u8(4);
    spec(&mut e, 1, 1, 1, 99, 4);
    e.u8(4);
    spec(&mut e, 0, 0, 3, 3000, 5);
    e.u8(5).u8(4).u8(10);
    spec(&mut e, 0, 0, 1, 59, 6);
    kick(&mut e);
    out.push(("seed-deliver", e.0));

    // A frame held without buffers, buffers added without a notification,
    // the notification, a frame held at a reset.
    let mut e = Encoder::default();
    e.u8(2);
    frame(&mut e, 200);
    buffers(&mut e, 1, 2, 512, 1, true);
    frame(&mut e, 300);
    kick(&mut e);
    frame(&mut e, 400);
    e.u8(7).u8(2);
    buffers(&mut e, 2, 1, 4096, 2, false);
    frame(&mut e, 500);
    out.push(("seed-held-reset", e.0));

    // Frames at the largest size (delivered into two-descriptor chains)
    // and one byte past it, then the end of file and a frame after it.
    let mut e = Encoder::default();
    e.u8(SIZE_16);
    buffers(&mut e, 2, 2, 0xffff, 0, false);
    e.u8(4);
    spec(&mut e, 0, 0, 2, 64, 7);
    e.u8(4);
    spec(&mut e, 0, 0, 2, 65, 8);
    e.u8(9);
    frame(&mut e, 80);
    kick(&mut e);
    out.push(("seed-large-eof", e.0));
    out
}

/// The fixture image's snapshot id (`session_records`).
const SNAPSHOT_ID: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn record_seeds() -> Seeds {
    let session = |json: &str| {
        let mut v = vec![0u8];
        v.extend_from_slice(json.as_bytes());
        v
    };
    let image = |json: String| {
        let mut v = vec![1u8];
        v.extend_from_slice(json.as_bytes());
        v
    };
    vec![
        (
            "seed-session-suspended",
            session(
                r#"{"format":1,"id":"0123456789abcdef","image":"/srv/images/python","image_snapshot":"5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a","created_unix_ms":1700000000000,"idle_timeout_ms":30000,"max_lifetime_ms":28800000,"allow_non_loopback":false,"endpoints":[{"Tcp":{"addr":"127.0.0.1:5000","guest_port":5000}},{"Unix":{"path":"/run/s1.sock","guest_port":5000}}],"chain":["l000001","m000002"],"next_layer":3,"launches":1,"suspends":2,"resumes":1,"merges":1,"suspended_unix_ms":1700000100000}"#,
            ),
        ),
        (
            "seed-session-fresh",
            session(
                r#"{"format":1,"id":"fedcba9876543210","image":"/i","image_snapshot":"00","created_unix_ms":0,"idle_timeout_ms":null,"max_lifetime_ms":1,"allow_non_loopback":true,"endpoints":[{"Tcp":{"addr":"[::1]:0","guest_port":1}}],"chain":[],"next_layer":1,"launches":1,"suspends":0,"resumes":0,"merges":0,"suspended_unix_ms":null}"#,
            ),
        ),
        (
            "seed-image",
            image(format!(
                r#"{{"format":1,"created_unix_ms":1700000000000,"snapshot_id":"{SNAPSHOT_ID}","memory_mib":256,"vcpus":1,"guest_cid":3,"disks":[]}}"#
            )),
        ),
        (
            "seed-image-disks",
            image(format!(
                r#"{{"format":1,"created_unix_ms":1,"snapshot_id":"{SNAPSHOT_ID}","memory_mib":64,"vcpus":2,"guest_cid":3,"disks":[{{"file":"disk0.img","size":4096}},{{"file":"disk1.img","size":0}}]}}"#
            )),
        ),
    ]
}

mod vsock {
    use super::*;

    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const SHUTDOWN: u8 = 4;
    pub const RW: u8 = 5;
    pub const CREDIT_REQUEST: u8 = 7;

    /// A valid guest packet (op 2 of the target). `dst` picks the port:
    /// 0/1 the host listeners, 2/3 the device's first local ports.
    pub fn packet(e: &mut Encoder, op: u8, src: u16, dst: u16, flags: u32, payload: u16) {
        let sel = src | dst << 2;
        e.u8(2)
            .u16(sel)
            .u32(0)
            .u8(op)
            .u32(flags)
            .u32(0x4_0000)
            .u32(0);
        e.u16(payload).u8(0x11).u16(44 + payload);
    }

    pub fn rx_buffers(e: &mut Encoder, n: u8, len: u16, slot: u8) {
        e.u8(4).u8(n - 1).u16(len).u8(slot);
    }
}

fn vsock_seeds() -> Seeds {
    use vsock::*;
    let mut out = Vec::new();

    // The guest connects to host port 1024, sends data both ways, shuts
    // down.
    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(SIZE_16).u8(SIZE_16);
    rx_buffers(&mut e, 4, 4096, 0);
    packet(&mut e, REQUEST, 0, 0, 0, 0);
    e.u8(6).u8(1); // accept on port 1024
    packet(&mut e, RW, 0, 0, 0, 100);
    e.u8(8).u8(0);
    e.u8(7).u8(0).u8(0).u8(5).bytes(b"hello");
    packet(&mut e, CREDIT_REQUEST, 0, 0, 0, 0);
    rx_buffers(&mut e, 4, 4096, 4);
    packet(&mut e, SHUTDOWN, 0, 0, 3, 0);
    out.push(("seed-guest-connect", e.0));

    // A host process connects to guest port 52 and the guest accepts.
    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(SIZE_16).u8(SIZE_16);
    rx_buffers(&mut e, 4, 4096, 0);
    e.u8(6).u8(0);
    e.u8(7).u8(0).u8(1).u8(0);
    packet(&mut e, RESPONSE, 0, 2, 0, 0);
    e.u8(8).u8(0);
    e.u8(7).u8(0).u8(0).u8(4).bytes(b"ping");
    packet(&mut e, RW, 0, 2, 0, 300);
    e.u8(8).u8(0);
    e.u8(9).u8(0).u8(0);
    out.push(("seed-host-connect", e.0));

    // An event buffer, a transport reset, a device reset.
    let mut e = Encoder::default();
    e.u8(SIZE_16).u8(SIZE_16).u8(SIZE_16);
    e.u8(3).u8(2);
    chain(&mut e, &[w(0x3_0000, 8)]);
    e.u8(5).u8(2);
    e.u8(6).u8(0);
    e.u8(10);
    e.u8(11).u8(SIZE_16).u8(SIZE_16).u8(SIZE_16);
    rx_buffers(&mut e, 2, 64, 0);
    packet(&mut e, REQUEST, 0, 1, 0, 0);
    out.push(("seed-transport-reset", e.0));
    out
}

mod mmio {
    use super::*;

    pub const STATUS: u16 = 0x70 / 4;

    /// A raw 32-bit register write.
    pub fn w32(e: &mut Encoder, reg: u16, value: u32) {
        e.u8(0).u16(reg).u8(2).u64(u64::from(value));
    }

    /// The shortcuts: negotiate everything, queues at 0, 8, 16 KiB.
    pub fn bring_up(e: &mut Encoder, queues: u8) {
        e.u8(4).u64(u64::MAX);
        for q in 0..queues {
            e.u8(5).u8(q).u16(u16::from(q)).u8(SIZE_16);
        }
        e.u8(6);
    }
}

fn mmio_seeds() -> Seeds {
    use mmio::*;
    let mut out = Vec::new();

    // virtio-blk by raw register writes: the handshake, one queue at
    // 64 KiB, DRIVER_OK, a read request, a notification.
    let mut e = Encoder::default();
    e.u8(0);
    w32(&mut e, STATUS, 1);
    w32(&mut e, STATUS, 3);
    w32(&mut e, 0x24 / 4, 1); // DriverFeaturesSel
    w32(&mut e, 0x20 / 4, 1); // VERSION_1
    w32(&mut e, STATUS, 11);
    w32(&mut e, 0x30 / 4, 0); // QueueSel
    w32(&mut e, 0x38 / 4, 16); // QueueNum
    w32(&mut e, 0x80 / 4, 0x1_0000); // QueueDescLow
    w32(&mut e, 0x90 / 4, 0x1_1000); // QueueDriverLow
    w32(&mut e, 0xa0 / 4, 0x1_2000); // QueueDeviceLow
    w32(&mut e, 0x44 / 4, 1); // QueueReady
    w32(&mut e, STATUS, 15);
    // Descriptor 0..2 at 0x10000: header at 0x20000, data, status.
    let mut table = Vec::new();
    for (addr, len, flags, next) in [
        (0x2_0000u64, 16u32, 1u16, 1u16),
        (0x2_1000, 512, 3, 2),
        (0x2_2000, 1, 2, 0),
    ] {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
        table.extend_from_slice(&next.to_le_bytes());
    }
    e.u8(3).u32(0x1_0000).u8(48).bytes(&table);
    e.u8(3).u32(0x2_0000).u8(16).bytes(&[0; 16]); // IN, sector 0
    e.u8(3).u32(0x1_1000).u8(6).bytes(&[0, 0, 1, 0, 0, 0]); // avail: idx 1, head 0
    w32(&mut e, 0x50 / 4, 0); // QueueNotify
    e.u8(9);
    w32(&mut e, STATUS, 0);
    out.push(("seed-blk-raw-handshake", e.0));

    // virtio-blk through the shortcuts, a request, reset, again.
    let mut e = Encoder::default();
    e.u8(0);
    bring_up(&mut e, 1);
    e.u8(3).u32(0x1_0000).u8(16).bytes(&[0; 16]);
    e.u8(7).u8(0);
    chain(&mut e, &[r(0, 16), w(0x1000, 512), w(0x2000, 1)]);
    e.u8(9);
    e.u8(10);
    bring_up(&mut e, 1);
    out.push(("seed-blk-shortcuts", e.0));

    // virtio-net: a transmitted frame and a received one.
    let mut e = Encoder::default();
    e.u8(1);
    bring_up(&mut e, 2);
    e.u8(7).u8(0);
    chain(&mut e, &[w(0x8000, 2048)]);
    e.u8(7).u8(1);
    chain(&mut e, &[r(0, 80)]);
    e.u8(11).u16(200);
    e.u8(9);
    e.u8(10);
    out.push(("seed-net", e.0));

    // virtio-vsock: queues up, an rx buffer, a RST-provoking packet.
    let mut e = Encoder::default();
    e.u8(2);
    bring_up(&mut e, 3);
    e.u8(7).u8(0);
    chain(&mut e, &[w(0x8000, 4096)]);
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&3u64.to_le_bytes());
    pkt.extend_from_slice(&2u64.to_le_bytes());
    pkt.extend_from_slice(&52u32.to_le_bytes());
    pkt.extend_from_slice(&9999u32.to_le_bytes());
    pkt.extend_from_slice(&0u32.to_le_bytes());
    pkt.extend_from_slice(&1u16.to_le_bytes());
    pkt.extend_from_slice(&5u16.to_le_bytes()); // RW on no connection
    pkt.extend_from_slice(&[0; 12]);
    e.u8(3).u32(0x1_0000).u8(44).bytes(&pkt);
    e.u8(7).u8(1);
    chain(&mut e, &[r(0, 44)]);
    e.u8(9);
    e.u8(10);
    out.push(("seed-vsock", e.0));
    out
}

/// Named seed inputs.
type Seeds = Vec<(&'static str, Vec<u8>)>;

/// Every target's seeds.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("virtio_blk", blk_seeds()),
        ("virtio_mmio", mmio_seeds()),
        ("virtio_net_tx", net_seeds()),
        ("virtio_net_rx", net_rx_seeds()),
        ("session_records", record_seeds()),
        ("virtio_vsock", vsock_seeds()),
    ]
}

#[test]
fn committed_seeds_are_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = std::env::var_os("DORMOUSE_FUZZ_WRITE_SEEDS").is_some();
    for (target, seeds) in all() {
        let dir = root.join(target);
        for (name, bytes) in seeds {
            let path = dir.join(name);
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            } else {
                let committed = std::fs::read(&path).unwrap_or_default();
                assert!(
                    committed == bytes,
                    "{} is stale: run `DORMOUSE_FUZZ_WRITE_SEEDS=1 cargo +nightly test --lib` in fuzz/",
                    path.display()
                );
            }
        }
    }
}
