//! Device tests: the test guest of `tests_util` against real Unix sockets,
//! on a real event-manager loop.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::packet::{op, shutdown, Header, HDR_LEN};
use super::tests_util::*;
use super::{
    Vsock, VsockError, DEFAULT_BUFFER_SIZE as CONN_BUF_ALLOC, HOST_CID, MAX_PKT_LEN,
    RST_QUEUE_SOFT_MAX, RXQ, TXQ,
};
use crate::devices::virtio::{device_type, interrupt_status, VirtioDevice, VIRTIO_F_VERSION_1};

/// Reads exactly `n` bytes from a host stream (5 s timeout).
fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Whether the host stream reads as ended (EOF or reset).
fn at_eof(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    }
}

/// Whether nothing is readable on the host stream right now.
fn nothing_to_read(s: &mut UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = s.read(&mut b);
    s.set_nonblocking(false).unwrap();
    matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

#[test]
fn new_validates_the_cid() {
    let dir = TempDir::new();
    for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let err = Vsock::new(bad, &dir.path().join("a")).unwrap_err();
        assert!(matches!(err, VsockError::InvalidCid(c) if c == bad));
        assert!(err.to_string().contains("use a CID from 3"));
    }
    for good in [3, u64::from(u32::MAX) - 1] {
        let path = dir.path().join(format!("ok{good}"));
        let dev = Vsock::new(good, &path).unwrap();
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), good);
        drop(dev);
        assert!(!path.exists(), "the socket file goes with the device");
    }
}

#[test]
fn new_explains_stale_and_busy_paths() {
    let dir = TempDir::new();
    let stale = dir.path().join("stale");
    drop(UnixListener::bind(&stale).unwrap()); // leaves the file behind
    let err = Vsock::new(3, &stale).unwrap_err();
    assert!(matches!(err, VsockError::StaleSocket(_)));
    assert!(err.to_string().contains("remove it"), "{err}");

    let busy = dir.path().join("busy");
    let _l = UnixListener::bind(&busy).unwrap();
    assert!(matches!(
        Vsock::new(3, &busy).unwrap_err(),
        VsockError::SocketInUse(_)
    ));

    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Vsock::new(3, &file).unwrap_err(),
        VsockError::NotASocket(_)
    ));

    let err = Vsock::new(3, &dir.path().join("no/such/dir/s")).unwrap_err();
    assert!(matches!(err, VsockError::Bind { .. }));
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn device_identity_and_config_space() {
    let rig = Rig::inactive();
    let dev = rig.dev();
    assert_eq!(dev.device_type(), device_type::VSOCK);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.queue_events().len(), 3);
    assert_eq!(dev.device_features(), VIRTIO_F_VERSION_1);
    let mut w = [0u8; 4];
    dev.read_config(0, &mut w);
    assert_eq!(u32::from_le_bytes(w), 3);
    dev.read_config(4, &mut w);
    assert_eq!(w, [0; 4]);
    let mut w = [0xffu8; 4];
    dev.read_config(6, &mut w); // runs past the end
    assert_eq!(w, [0; 4]);
    dev.read_config(u64::MAX, &mut w);
    assert_eq!(w, [0; 4]);
    drop(dev);
    rig.dev().write_config(0, &[9; 8]);
    let mut cfg = [0u8; 8];
    rig.dev().read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), GUEST_CID, "config is read-only");
}

#[test]
fn activate_wants_three_queues() {
    let rig = Rig::inactive();
    let queues = vec![device_queue(0), device_queue(1)];
    let err = rig
        .dev()
        .activate(rig.mem.clone(), rig.interrupt.clone(), queues)
        .unwrap_err();
    assert!(matches!(
        err,
        crate::devices::virtio::ActivateError::BadQueue(2)
    ));
    assert!(!rig.dev().is_activated());
}

#[test]
fn host_initiated_connect_handshake() {
    let mut rig = Rig::new();
    let mut s = UnixStream::connect(&rig.uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The line may arrive in pieces.
    s.write_all(b"CONN").unwrap();
    rig.pump();
    s.write_all(b"ECT 52\n").unwrap();
    rig.pump();
    // No rx buffer yet: the REQUEST waits for one.
    assert!(rig.rx().is_empty());
    rig.add_rx(1, 4096);
    let req = rig.rx_one();
    assert_eq!(req.hdr.op, op::REQUEST);
    assert_eq!((req.hdr.src_cid, req.hdr.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.hdr.dst_port, 52);
    assert!(req.hdr.src_port >= 1 << 30);
    assert_eq!(req.hdr.buf_alloc, CONN_BUF_ALLOC);
    assert_ne!(rig.interrupt.status() & interrupt_status::USED_RING, 0);

    assert!(nothing_to_read(&mut s), "no OK before the guest accepts");
    rig.send(&hdr(op::RESPONSE, 52, req.hdr.src_port), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", req.hdr.src_port));

    // Data flows once established.
    s.write_all(b"ping").unwrap();
    rig.pump();
    rig.add_rx(1, 4096);
    let p = rig.rx_one();
    assert_eq!((p.hdr.op, p.data.as_slice()), (op::RW, &b"ping"[..]));
    rig.send(&rw(52, req.hdr.src_port, 4), b"pong");
    assert_eq!(read_n(&mut s, 4), b"pong");

    // A second connection gets another local port.
    let (_s2, local2) = rig.host_connect(52, 4096);
    assert_ne!(local2, req.hdr.src_port);
}

#[test]
fn bytes_after_the_connect_line_belong_to_the_connection() {
    let mut rig = Rig::new();
    let mut s = UnixStream::connect(&rig.uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"connect 7\nearly bytes").unwrap();
    rig.pump();
    rig.add_rx(1, 4096);
    let req = rig.rx_one();
    rig.send(&hdr(op::RESPONSE, 7, req.hdr.src_port), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", req.hdr.src_port));
    rig.add_rx(1, 4096);
    let p = rig.rx_one();
    assert_eq!(p.data, b"early bytes");
}

#[test]
fn guest_refusing_a_host_connection_closes_the_stream() {
    let mut rig = Rig::new();
    let mut s = UnixStream::connect(&rig.uds).unwrap();
    s.write_all(b"CONNECT 99\n").unwrap();
    rig.pump();
    rig.add_rx(1, 4096);
    let req = rig.rx_one();
    rig.send(&hdr(op::RST, 99, req.hdr.src_port), &[]);
    assert!(at_eof(&mut s));
    assert_eq!(rig.dev().connection_count(), 0);
    assert!(rig.rx().is_empty(), "no RST answers a RST");
}

#[test]
fn junk_connect_lines_close_the_stream() {
    let mut rig = Rig::new();
    let junk: [&[u8]; 6] = [
        b"HELLO 52\n",
        b"CONNECT abc\n",
        b"CONNECT 1 2\n",
        b"CONNECT 99999999999\n",
        &[b'x'; 40],
        b"\xff\xfe\n",
    ];
    for line in junk {
        let mut s = UnixStream::connect(&rig.uds).unwrap();
        s.write_all(line).unwrap();
        rig.pump();
        assert!(at_eof(&mut s), "{line:?}");
    }
    // A host that hangs up mid-line is forgotten too.
    let mut s = UnixStream::connect(&rig.uds).unwrap();
    s.write_all(b"CONNE").unwrap();
    rig.pump();
    s.shutdown(Shutdown::Write).unwrap();
    rig.pump();
    assert!(at_eof(&mut s));
    rig.pump();
    assert_eq!(rig.dev().connection_count(), 0);
    rig.add_rx(4, 4096);
    assert!(rig.rx().is_empty(), "the guest heard of none of them");
}

#[test]
fn a_host_giving_up_before_the_response_is_reset_to_the_guest() {
    let mut rig = Rig::new();
    let s = UnixStream::connect(&rig.uds).unwrap();
    (&s).write_all(b"CONNECT 5\n").unwrap();
    rig.pump();
    rig.add_rx(1, 4096);
    let req = rig.rx_one();
    drop(s);
    rig.pump();
    rig.add_rx(1, 4096);
    let rst = rig.rx_one();
    assert_eq!(rst.hdr.op, op::RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (req.hdr.src_port, 5));
    // A late RESPONSE is for an unknown connection now.
    rig.send(&hdr(op::RESPONSE, 5, req.hdr.src_port), &[]);
    rig.add_rx(1, 4096);
    assert_eq!(rig.rx_one().hdr.op, op::RST);
}

#[test]
fn a_host_giving_up_before_the_request_went_out_is_forgotten() {
    let mut rig = Rig::new();
    let s = UnixStream::connect(&rig.uds).unwrap();
    (&s).write_all(b"CONNECT 5\n").unwrap();
    rig.pump();
    drop(s);
    rig.pump();
    assert_eq!(rig.dev().connection_count(), 0);
    rig.add_rx(2, 4096);
    assert!(rig.rx().is_empty());
}

#[test]
fn guest_initiated_connect() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_path(5000)).unwrap();
    let mut s = rig.guest_connect(&listener, 1234, 5000);
    rig.send(&rw(1234, 5000, 5), b"hello");
    assert_eq!(read_n(&mut s, 5), b"hello");
    s.write_all(b"world").unwrap();
    rig.pump();
    rig.add_rx(1, 4096);
    let p = rig.rx_one();
    assert_eq!(p.hdr.op, op::RW);
    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (5000, 1234));
    assert_eq!(p.data, b"world");

    // Nobody listens on port 5001: RST.
    rig.add_rx(1, 4096);
    rig.send(&hdr(op::REQUEST, 1235, 5001), &[]);
    let rst = rig.rx_one();
    assert_eq!(rst.hdr.op, op::RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (5001, 1235));
    assert_eq!(rig.dev().connection_count(), 1);
}

#[test]
fn data_both_ways_is_byte_exact() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_path(80)).unwrap();
    let mut s = rig.guest_connect(&listener, 4000, 80);

    // Guest to host: packets of odd sizes, in descriptors of odd sizes,
    // the header split across descriptors too.
    let out = pattern(200_000, 1);
    let mut sent = 0;
    let sizes = [1, 17, 4096, 65536, 999, 12345];
    let mut i = 0;
    let mut received = Vec::new();
    while sent < out.len() {
        let n = sizes[i % sizes.len()].min(out.len() - sent);
        // At most ~100 descriptors per packet.
        let piece = [7, 44, 100, 4096, 16384][i % 5].max((n + HDR_LEN).div_ceil(100));
        rig.send_split(&rw(4000, 80, n), &out[sent..sent + n], piece);
        sent += n;
        i += 1;
        // The host reads as it goes.
        s.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            received.extend_from_slice(&buf[..k]);
        }
        s.set_nonblocking(false).unwrap();
        rig.pump();
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let rest = out.len() - received.len();
    received.extend(read_n(&mut s, rest));
    assert_eq!(received, out);

    // Host to guest.
    let back = pattern(150_000, 2);
    let writer = {
        let mut s = s.try_clone().unwrap();
        let back = back.clone();
        std::thread::spawn(move || s.write_all(&back).unwrap())
    };
    let mut got = Vec::new();
    for _ in 0..10_000 {
        if got.len() == back.len() {
            break;
        }
        // Buffers the device has not used yet stay queued: add more only
        // while the ring has room (the writer thread may lag under load).
        if rig.free_descs(RXQ) >= 8 {
            rig.add_rx(8, 4096);
        } else {
            rig.pump();
        }
        for p in rig.rx() {
            if p.hdr.op == op::RW {
                got.extend_from_slice(&p.data);
            }
        }
        let mut cu = hdr(op::CREDIT_UPDATE, 4000, 80);
        cu.fwd_cnt = u32::try_from(got.len()).unwrap();
        rig.send(&cu, &[]);
        std::thread::sleep(Duration::from_micros(200));
    }
    writer.join().unwrap();
    assert_eq!(got.len(), back.len());
    assert!(got == back, "host-to-guest bytes differ");
}

#[test]
fn rx_packets_fill_multi_descriptor_buffers() {
    let mut rig = Rig::new();
    let (mut s, local) = rig.host_connect(9, 1 << 20);
    s.write_all(&pattern(10_000, 3)).unwrap();
    rig.pump();
    // Header split across two descriptors, data across three.
    rig.add_rx_chain(&[20, 30, 1000, 6]);
    let p = rig.rx_one();
    assert_eq!(p.hdr.op, op::RW);
    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (local, 9));
    assert_eq!(p.data.len(), 20 + 30 + 1000 + 6 - HDR_LEN);
    assert_eq!(p.data, pattern(10_000, 3)[..p.data.len()]);
}

#[test]
fn host_data_stops_at_the_guest_credit() {
    let mut rig = Rig::new();
    let (mut s, local) = rig.host_connect(77, 8192);
    let data = pattern(65536, 4);
    s.write_all(&data).unwrap();
    rig.pump();
    rig.add_rx(64, 4096);
    let got: Vec<u8> = rig.rx().into_iter().flat_map(|p| p.data).collect();
    assert_eq!(got.len(), 8192, "exactly the advertised credit");
    // More buffers do not help without credit.
    rig.add_rx(8, 4096);
    assert!(rig.rx().is_empty());
    // The guest consumed 4096: that much more flows.
    let mut cu = hdr(op::CREDIT_UPDATE, 77, local);
    cu.buf_alloc = 8192;
    cu.fwd_cnt = 4096;
    rig.send(&cu, &[]);
    let more: Vec<u8> = rig.rx().into_iter().flat_map(|p| p.data).collect();
    assert_eq!(more.len(), 4096);
    // A bigger buffer in an RW packet raises it too.
    let mut w = rw(77, local, 1);
    w.buf_alloc = 65536;
    w.fwd_cnt = 12288;
    rig.send(&w, b"x");
    assert_eq!(read_n(&mut s, 1), b"x");
    let rest: Vec<u8> = rig.rx().into_iter().flat_map(|p| p.data).collect();
    let mut all = got;
    all.extend(more);
    all.extend(rest);
    assert_eq!(all, data);
}

/// An rx buffer with room for a header and no data cannot carry the data
/// the host wrote. Found by the `virtio_vsock` fuzz target: the device
/// skipped such a buffer, kept the connection ready, and re-kicked itself
/// forever, so a guest could pin the event-loop thread with one buffer.
#[test]
fn header_only_rx_buffers_get_credit_updates_while_data_waits() {
    let mut rig = Rig::new();
    let (mut s, local) = rig.host_connect(9, 1 << 20);
    let data = pattern(5000, 7);
    s.write_all(&data).unwrap();
    rig.pump();
    rig.add_rx(3, u32::try_from(HDR_LEN).unwrap());
    rig.kick(RXQ);
    // Settles (pump panics on a busy loop): each buffer is used once, for
    // a packet that fits, and no data is lost.
    rig.pump();
    let got = rig.rx();
    assert_eq!(got.len(), 3, "every header-sized buffer is used: {got:?}");
    for p in &got {
        assert_eq!(p.hdr.op, op::CREDIT_UPDATE);
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (local, 9));
        assert!(p.data.is_empty());
    }
    rig.add_rx(2, 4096);
    let rest: Vec<u8> = rig.rx().into_iter().flat_map(|p| p.data).collect();
    assert_eq!(rest, data[..rest.len()]);
    assert_eq!(rest.len(), 5000.min(2 * (4096 - HDR_LEN)));
}

#[test]
fn credit_request_gets_a_credit_update() {
    let mut rig = Rig::new();
    let (mut s, local) = rig.host_connect(3, 4096);
    rig.send(&rw(3, local, 100), &[1; 100]);
    assert_eq!(read_n(&mut s, 100), vec![1; 100]);
    rig.add_rx(1, 4096);
    rig.send(&hdr(op::CREDIT_REQUEST, 3, local), &[]);
    let p = rig.rx_one();
    assert_eq!(p.hdr.op, op::CREDIT_UPDATE);
    assert_eq!((p.hdr.buf_alloc, p.hdr.fwd_cnt), (CONN_BUF_ALLOC, 100));
}

#[test]
fn the_device_tells_the_guest_as_it_forwards() {
    let mut rig = Rig::new();
    let (mut s, local) = rig.host_connect(3, 4096);
    rig.add_rx(4, 4096);
    let chunk = pattern(MAX_PKT_LEN, 5);
    for _ in 0..4 {
        rig.send(&rw(3, local, chunk.len()), &chunk);
        assert_eq!(read_n(&mut s, chunk.len()), chunk);
    }
    let updates: Vec<_> = rig
        .rx()
        .into_iter()
        .filter(|p| p.hdr.op == op::CREDIT_UPDATE)
        .collect();
    assert!(
        !updates.is_empty(),
        "a CREDIT_UPDATE after 64 KiB forwarded"
    );
    assert_eq!(updates.last().unwrap().hdr.fwd_cnt, 4 * 65536);
}

#[test]
fn writes_that_would_block_are_buffered_and_flushed() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_path(81)).unwrap();
    let mut s = rig.guest_connect(&listener, 4001, 81);
    // The host does not read; the guest sends its full credit.
    let data = pattern(usize::try_from(CONN_BUF_ALLOC).unwrap(), 6);
    let mut sent = 0;
    while sent < data.len() {
        let n = MAX_PKT_LEN.min(data.len() - sent);
        rig.send(&rw(4001, 81, n), &data[sent..sent + n]);
        sent += n;
    }
    // The loop is quiet (no busy EPOLLOUT) while the host does not read,
    // and nothing was lost: the host now reads everything.
    rig.pump();
    let reader = std::thread::spawn(move || read_n(&mut s, data.len()) == data);
    for _ in 0..2000 {
        if reader.is_finished() {
            break;
        }
        rig.pump();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(reader.join().unwrap());
    rig.pump();
    rig.add_rx(8, 4096);
    rig.send(&hdr(op::CREDIT_REQUEST, 4001, 81), &[]);
    let last = rig.rx().pop().unwrap();
    assert_eq!(last.hdr.op, op::CREDIT_UPDATE);
    assert_eq!(last.hdr.fwd_cnt, CONN_BUF_ALLOC);
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_path(82)).unwrap();
    let mut s = rig.guest_connect(&listener, 4002, 82);
    rig.add_rx(64, 4096);
    let chunk = pattern(MAX_PKT_LEN, 7);
    let mut reset = false;
    // The host never reads: socket buffer, then our buffer, then RST.
    for _ in 0..64 {
        rig.send(&rw(4002, 82, chunk.len()), &chunk);
        if rig.rx().iter().any(|p| p.hdr.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "the overrun was reset");
    assert_eq!(rig.dev().connection_count(), 0);
    // The host gets what was accepted before, then the end.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => total += k,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(total <= 64 * chunk.len());
}

#[test]
fn host_shutdown_reaches_the_guest_and_the_guest_may_still_send() {
    let mut rig = Rig::new();
    let (mut s, local) = rig.host_connect(10, 65536);
    s.write_all(b"last words").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    rig.pump();
    rig.add_rx(4, 4096);
    let p = rig.rx();
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(
        (p[0].hdr.op, p[0].data.as_slice()),
        (op::RW, &b"last words"[..])
    );
    assert_eq!(
        (p[1].hdr.op, p[1].hdr.flags),
        (op::SHUTDOWN, shutdown::SEND)
    );
    // Half-closed: the guest's answer still reaches the host.
    rig.send(&rw(10, local, 5), b"reply");
    assert_eq!(read_n(&mut s, 5), b"reply");
    // The guest closes: SHUTDOWN both → RST and the stream closes.
    let mut sd = hdr(op::SHUTDOWN, 10, local);
    sd.flags = shutdown::BOTH;
    rig.send(&sd, &[]);
    assert_eq!(rig.rx_one().hdr.op, op::RST);
    assert!(at_eof(&mut s));
    assert_eq!(rig.dev().connection_count(), 0);
}

#[test]
fn guest_shutdown_send_ends_the_host_stream_after_the_data() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_path(83)).unwrap();
    let mut s = rig.guest_connect(&listener, 4003, 83);
    rig.send(&rw(4003, 83, 3), b"abc");
    let mut sd = hdr(op::SHUTDOWN, 4003, 83);
    sd.flags = shutdown::SEND;
    rig.send(&sd, &[]);
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"abc");
    // The other direction still works.
    s.write_all(b"xyz").unwrap();
    rig.pump();
    rig.add_rx(1, 4096);
    assert_eq!(rig.rx_one().data, b"xyz");
    // Data after the guest's SHUTDOWN(SEND) is a protocol error.
    rig.add_rx(1, 4096);
    rig.send(&rw(4003, 83, 1), b"!");
    assert_eq!(rig.rx_one().hdr.op, op::RST);
}

#[test]
fn guest_shutdown_rcv_stops_reading_the_host() {
    let mut rig = Rig::new();
    let (mut s, local) = rig.host_connect(11, 65536);
    let mut sd = hdr(op::SHUTDOWN, 11, local);
    sd.flags = shutdown::RCV;
    rig.send(&sd, &[]);
    s.write_all(b"ignored").unwrap();
    rig.pump();
    rig.add_rx(2, 4096);
    assert!(rig.rx().is_empty());
    rig.send(&rw(11, local, 2), b"ok");
    assert_eq!(read_n(&mut s, 2), b"ok");
}

#[test]
fn rst_both_ways() {
    let mut rig = Rig::new();
    // Guest RST closes the host stream, with no reply.
    let (mut s, local) = rig.host_connect(12, 65536);
    rig.send(&hdr(op::RST, 12, local), &[]);
    assert!(at_eof(&mut s));
    rig.add_rx(1, 4096);
    assert!(rig.rx().is_empty());

    // The host closing: the guest sees SHUTDOWN(SEND); its next write
    // fails on the host side and is answered with a RST.
    let (s, local) = rig.host_connect(13, 65536);
    drop(s);
    rig.pump();
    rig.add_rx(2, 4096);
    let p = rig.rx_one();
    assert_eq!((p.hdr.op, p.hdr.flags), (op::SHUTDOWN, shutdown::SEND));
    rig.send(&rw(13, local, 4), b"late");
    let p = rig.rx_one();
    assert_eq!(p.hdr.op, op::RST);
    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (local, 13));
    assert_eq!(rig.dev().connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_get_a_rst() {
    let mut rig = Rig::new();
    rig.add_rx(8, 4096);
    for o in [
        op::RESPONSE,
        op::SHUTDOWN,
        op::RW,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
    ] {
        let h = if o == op::RW {
            rw(50, 60, 1)
        } else {
            hdr(o, 50, 60)
        };
        rig.send(&h, b"z");
        let p = rig.rx_one();
        assert_eq!(p.hdr.op, op::RST, "op {o}");
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (60, 50));
    }
    rig.send(&hdr(op::RST, 50, 60), &[]);
    assert!(rig.rx().is_empty(), "RST is never answered");
}

#[test]
fn sixty_four_concurrent_connections() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_path(90)).unwrap();
    let mut conns = Vec::new(); // (stream, guest port, host port)
    for i in 0..32u32 {
        let (s, local) = rig.host_connect(1000 + i, 65536);
        conns.push((s, 1000 + i, local));
        let s = rig.guest_connect(&listener, 2000 + i, 90);
        conns.push((s, 2000 + i, 90));
    }
    assert_eq!(rig.dev().connection_count(), 64);
    // Every host stream writes its own bytes; the guest sends its own.
    for (i, (s, gport, hport)) in conns.iter_mut().enumerate() {
        let seed = u8::try_from(i).unwrap();
        s.write_all(&pattern(3000, seed)).unwrap();
        let msg = pattern(2000, seed.wrapping_add(100));
        rig.send(&rw(*gport, *hport, msg.len()), &msg);
    }
    rig.pump();
    let mut by_port: std::collections::HashMap<(u32, u32), Vec<u8>> = Default::default();
    for _ in 0..100 {
        rig.add_rx(64, 4096);
        let p = rig.rx();
        if p.is_empty() {
            break;
        }
        for p in p {
            assert_eq!(p.hdr.op, op::RW);
            by_port
                .entry((p.hdr.dst_port, p.hdr.src_port))
                .or_default()
                .extend(p.data);
        }
    }
    for (i, (s, gport, hport)) in conns.iter_mut().enumerate() {
        let seed = u8::try_from(i).unwrap();
        assert_eq!(by_port[&(*gport, *hport)], pattern(3000, seed), "conn {i}");
        assert_eq!(read_n(s, 2000), pattern(2000, seed.wrapping_add(100)));
    }
    // Closing them all frees everything.
    for (_, gport, hport) in &conns {
        rig.send(&hdr(op::RST, *gport, *hport), &[]);
    }
    assert_eq!(rig.dev().connection_count(), 0);
    assert_eq!(rig.dev().backend.graveyard_len(), 0);
}

#[test]
fn connections_are_capped() {
    let mut rig = Rig::with_config(super::VsockConfig {
        max_connections: Some(4),
        ..test_config()
    });
    let listener = UnixListener::bind(rig.port_path(91)).unwrap();
    let mut keep = Vec::new();
    for i in 0..4 {
        keep.push(rig.guest_connect(&listener, 100 + i, 91));
    }
    rig.add_rx(1, 4096);
    rig.send(&hdr(op::REQUEST, 200, 91), &[]);
    assert_eq!(rig.rx_one().hdr.op, op::RST);
    let mut s = UnixStream::connect(&rig.uds).unwrap();
    rig.pump();
    assert!(at_eof(&mut s), "host connections beyond the cap are closed");
    assert_eq!(rig.dev().connection_count(), 4);
}

#[test]
fn tx_stalls_while_rst_replies_wait_for_rx_buffers() {
    let mut rig = Rig::new();
    // 300 packets for unknown connections, no rx buffers.
    let mut done = 0;
    for batch in 0..3u32 {
        for i in 0..100 {
            rig.push_tx(&hdr(op::CREDIT_UPDATE, batch * 100 + i, 1), &[], 64);
        }
        rig.kick(TXQ);
        rig.pump();
        done += rig.used(TXQ).len();
    }
    assert_eq!(
        done, RST_QUEUE_SOFT_MAX,
        "transmission waits for rx buffers"
    );
    // Buffers let everything through.
    let mut rsts = 0;
    for _ in 0..4 {
        rig.add_rx(100, 256);
        rsts += rig.rx().len();
        done += rig.used(TXQ).len();
    }
    assert_eq!(rsts, 300);
    assert_eq!(done, 300);
}

#[test]
fn invalid_packets_are_answered_with_rst() {
    let mut rig = Rig::new();
    let (mut s, local) = rig.host_connect(20, 65536);
    rig.add_rx(16, 4096);
    let good = hdr(op::CREDIT_UPDATE, 20, local);
    let cases = [
        ("wrong src_cid", Header { src_cid: 4, ..good }),
        ("wrong dst_cid", Header { dst_cid: 7, ..good }),
        (
            "host cid as src",
            Header {
                src_cid: HOST_CID,
                ..good
            },
        ),
        ("seqpacket", Header { type_: 2, ..good }),
        ("op 0", Header { op: 0, ..good }),
        ("op 8", Header { op: 8, ..good }),
        (
            "len beyond the chain",
            Header {
                len: 10,
                op: op::RW,
                ..good
            },
        ),
        (
            "len near u32::MAX",
            Header {
                len: u32::MAX - 3,
                op: op::RW,
                ..good
            },
        ),
    ];
    for (what, h) in cases {
        rig.send(&h, &[]);
        let p = rig.rx_one();
        assert_eq!(p.hdr.op, op::RST, "{what}");
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (local, 20), "{what}");
        assert!(!rig.dev().needs_reset(), "{what}");
    }
    // A packet longer than 64 KiB (the chain holds it all).
    rig.send(&rw(30, 31, MAX_PKT_LEN + 1), &pattern(MAX_PKT_LEN + 1, 0));
    assert_eq!(rig.rx_one().hdr.op, op::RST);
    // Invalid packets naming a live connection (with our CIDs) reset it.
    assert!(at_eof(&mut s));
    assert_eq!(rig.dev().connection_count(), 0);
    // A duplicate REQUEST resets the connection it collides with.
    let listener = UnixListener::bind(rig.port_path(84)).unwrap();
    let mut s = rig.guest_connect(&listener, 4004, 84);
    rig.add_rx(1, 4096);
    rig.send(&hdr(op::REQUEST, 4004, 84), &[]);
    assert_eq!(rig.rx_one().hdr.op, op::RST);
    assert!(at_eof(&mut s));
}

/// Sends a raw tx chain and reports whether the device marked itself
/// failed; the rig is reset and re-activated afterwards.
fn tx_breaks_device(rig: &mut Rig, descs: &[(u64, u32, u16)]) -> bool {
    rig.push_raw(TXQ, descs);
    rig.kick(TXQ);
    rig.pump();
    let broken = rig.dev().needs_reset();
    let used = rig.used(TXQ);
    assert_eq!(used.len(), 1, "the chain is returned");
    assert_eq!(used[0].1, 0);
    if broken {
        assert_ne!(rig.interrupt.status() & interrupt_status::CONFIG_CHANGE, 0);
        rig.dev().reset();
        rig.pump();
        rig.interrupt.clear();
        rig.activate();
    }
    broken
}

#[test]
fn malformed_tx_chains_mark_the_device_failed() {
    let mut rig = Rig::new();
    let base = 0x20_0000u64;
    let h = rw(1, 2, 0).to_bytes();
    rig.mem.write_slice(&h, GuestAddress(base)).unwrap();
    let outside = 0x1_0000_0000u64;
    let hdr_len = u32::try_from(HDR_LEN).unwrap();
    // Short header.
    assert!(tx_breaks_device(&mut rig, &[(base, 20, 0)]));
    // Zero-length descriptors only.
    assert!(tx_breaks_device(&mut rig, &[(base, 0, 0), (base, 0, 0)]));
    // Header outside guest memory.
    assert!(tx_breaks_device(&mut rig, &[(outside, hdr_len, 0)]));
    // Length near u32::MAX (runs past the end of memory).
    assert!(tx_breaks_device(&mut rig, &[(base, u32::MAX - 8, 0)]));
    // Payload outside guest memory.
    assert!(tx_breaks_device(
        &mut rig,
        &[(base, hdr_len, 0), (outside, 10, 0)]
    ));
    // Wrong direction: a device-writable "packet".
    assert!(tx_breaks_device(&mut rig, &[(base, hdr_len, WRITE)]));
    // After each reset the device works again.
    rig.add_rx(1, 4096);
    rig.send(&hdr(op::CREDIT_REQUEST, 1, 2), &[]);
    assert_eq!(rig.rx_one().hdr.op, op::RST);
    // A well-formed header followed by a device-writable descriptor is
    // fine (the writable part is ignored).
    assert!(!tx_breaks_device(
        &mut rig,
        &[(base, hdr_len, 0), (base + 0x1000, 64, WRITE)]
    ));
}

#[test]
fn a_descriptor_loop_ends_and_breaks_nothing() {
    let mut rig = Rig::new();
    // Two descriptors pointing at each other: the chain iterator stops
    // at the queue size.
    let base = 0x20_0000u64;
    rig.mem
        .write_slice(
            &hdr(op::CREDIT_REQUEST, 1, 2).to_bytes(),
            GuestAddress(base),
        )
        .unwrap();
    // A fresh rig hands out descriptors 0 and 1.
    assert_eq!(rig.push_raw(TXQ, &[(base, 44, 0), (base, 44, 0)]), 0);
    // Point the second descriptor back at the head (flag 1 is NEXT).
    let raw = virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
        base, 44, 1, 0,
    ));
    rig.mem.write_obj(raw, GuestAddress(0x4000 + 16)).unwrap();
    rig.add_rx(2, 4096);
    rig.kick(TXQ);
    rig.pump();
    // Either way, the loop terminated: a RST for the unknown connection
    // (the header is valid), or a failed device.
    let got = rig.rx();
    assert!(rig.dev().needs_reset() || got.iter().all(|p| p.hdr.op == op::RST));
}

#[test]
fn malformed_rx_buffers_mark_the_device_failed() {
    let outside = 0x1_0000_0000u64;
    let cases: [&[(u64, u32, u16)]; 4] = [
        &[(0x20_0000, 4096, 0)],         // read-only
        &[(0x20_0000, 20, WRITE)],       // smaller than a header
        &[(outside, 4096, WRITE)],       // outside memory
        &[(0x20_0000, u32::MAX, WRITE)], // past the end
    ];
    for descs in cases {
        let mut rig = Rig::new();
        rig.send(&hdr(op::CREDIT_REQUEST, 1, 2), &[]); // owes a RST
        rig.push_raw(RXQ, descs);
        rig.kick(RXQ);
        rig.pump();
        assert!(rig.dev().needs_reset(), "{descs:?}");
        assert_eq!(rig.used(RXQ), vec![(0, 0)]);
        // Failed: further notifications do nothing.
        rig.add_rx(1, 4096);
        assert!(rig.rx().is_empty());
    }
}

#[test]
fn reset_closes_every_connection() {
    let mut rig = Rig::new();
    let (mut a, _) = rig.host_connect(1, 65536);
    let listener = UnixListener::bind(rig.port_path(85)).unwrap();
    let mut b = rig.guest_connect(&listener, 2, 85);
    let mut pending = UnixStream::connect(&rig.uds).unwrap();
    rig.pump();
    rig.dev().reset();
    assert!(!rig.dev().is_activated());
    rig.pump();
    assert_eq!(rig.dev().connection_count(), 0);
    assert_eq!(rig.dev().backend.graveyard_len(), 0);
    for s in [&mut a, &mut b, &mut pending] {
        assert!(at_eof(s));
    }
    // Inactive: guest notifications are drained and ignored.
    rig.push_tx(&hdr(op::REQUEST, 3, 85), &[], 4096);
    rig.kick(TXQ);
    rig.pump();
    assert!(rig.used(TXQ).is_empty());
    // Host connections wait for the driver.
    let mut c = UnixStream::connect(&rig.uds).unwrap();
    c.write_all(b"CONNECT 8\n").unwrap();
    rig.pump();
    rig.activate();
    rig.add_rx(1, 4096);
    assert_eq!(rig.rx_one().hdr.op, op::REQUEST);
}

#[test]
fn transport_reset_event() {
    let mut rig = Rig::inactive();
    assert!(matches!(
        rig.dev().send_transport_reset(),
        Err(VsockError::NotActivated)
    ));
    rig.activate();
    assert!(matches!(
        rig.dev().send_transport_reset(),
        Err(VsockError::NoEventBuffer)
    ));
    let (mut s, _) = rig.host_connect(1, 65536);
    rig.add_event_buffer(8);
    rig.interrupt.clear();
    rig.dev().send_transport_reset().unwrap();
    assert_eq!(rig.events(), vec![(4, 0)]);
    assert_ne!(rig.interrupt.status() & interrupt_status::USED_RING, 0);
    rig.pump();
    assert!(at_eof(&mut s), "host connections go with the transport");
    assert_eq!(rig.dev().connection_count(), 0);
    // A buffer too small for an event fails the device.
    rig.add_event_buffer(2);
    assert!(matches!(
        rig.dev().send_transport_reset(),
        Err(VsockError::BadEventBuffer)
    ));
    assert!(rig.dev().needs_reset());
    assert!(matches!(
        rig.dev().send_transport_reset(),
        Err(VsockError::NeedsReset)
    ));
}

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_guest_traffic_never_panics() {
    let mut rig = Rig::new();
    let listener = UnixListener::bind(rig.port_path(86)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut accepted = Vec::new();
    let (mut rx_packets, mut connections, mut resets) = (0, 0, 0);
    let ops_ = [0, 1, 2, 3, 4, 5, 6, 7, 8, 0xffff];
    for round in 0..3000 {
        let mut h = Header {
            src_cid: if rng.below(10) == 0 {
                rng.next()
            } else {
                GUEST_CID
            },
            dst_cid: if rng.below(10) == 0 {
                rng.next()
            } else {
                HOST_CID
            },
            src_port: u32::try_from(rng.below(4)).unwrap(),
            dst_port: if rng.below(2) == 0 { 86 } else { 1 << 30 },
            len: 0,
            type_: if rng.below(20) == 0 { 2 } else { 1 },
            op: ops_[usize::try_from(rng.below(10)).unwrap()],
            flags: u32::try_from(rng.below(4)).unwrap(),
            buf_alloc: u32::try_from(rng.below(1 << 18)).unwrap(),
            fwd_cnt: u32::try_from(rng.below(1 << 18)).unwrap(),
        };
        let n = usize::try_from(rng.below(3000)).unwrap();
        let payload = pattern(n, 9);
        h.len = match rng.below(8) {
            0 => u32::try_from(rng.next() >> 32).unwrap(),
            1 => u32::try_from(n + 1).unwrap(),
            _ => u32::try_from(n).unwrap(),
        };
        let piece = usize::try_from(rng.below(200) + 1)
            .unwrap()
            .max((n + HDR_LEN).div_ceil(32));
        if rig.free_descs(TXQ) < 64 || rig.free_descs(RXQ) < 16 {
            // The device is stalled or failed: give it buffers, reset it.
            rig.add_rx(1, 4096);
            rig.dev().reset();
            rig.pump();
            rig.activate();
            continue;
        }
        if rng.below(50) == 0 {
            // A raw chain with a random address and length.
            let addr = rng.next() % 0x200_0000;
            let len = u32::try_from(rng.next() >> 32).unwrap();
            let flags = if rng.below(2) == 0 { WRITE } else { 0 };
            let q = if rng.below(2) == 0 { RXQ } else { TXQ };
            rig.push_raw(q, &[(addr, len, flags)]);
            rig.kick(q);
        } else {
            rig.push_tx(&h, &payload, piece);
            rig.kick(TXQ);
        }
        if rng.below(3) == 0 && rig.free_descs(RXQ) > 32 {
            rig.add_rx(4, u32::try_from(rng.below(4096) + 1).unwrap());
        }
        rig.pump();
        rig.used(TXQ);
        rx_packets += rig.rx_lenient();
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true).unwrap();
            accepted.push(s);
            connections += 1;
        }
        for s in &mut accepted {
            if rng.below(4) == 0 {
                let _ = s.write(&pattern(100, 1));
            }
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
        }
        if rig.dev().needs_reset() {
            resets += 1;
        }
        if rig.dev().needs_reset() || round % 500 == 499 {
            rig.dev().reset();
            rig.pump();
            rig.interrupt.clear();
            rig.activate();
            accepted.clear();
        }
    }
    // The traffic reached the interesting paths.
    assert!(rx_packets > 500, "{rx_packets} rx packets");
    assert!(connections > 20, "{connections} connections");
    assert!(resets > 0);
    eprintln!("{rx_packets} rx packets, {connections} connections, {resets} failures");
}

#[test]
fn runs_on_the_vm_event_loop_thread() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<Vsock>();

    let (mut rig, lp) = Rig::on_event_loop();
    let listener = UnixListener::bind(rig.port_path(70)).unwrap();
    // Guest-initiated, then host-initiated; polling stands in for pump().
    let wait = |rig: &mut Rig| -> RxPacket {
        for _ in 0..250 {
            let mut p = rig.rx();
            if let Some(p) = p.pop() {
                return p;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no packet within 5 s");
    };
    rig.add_rx(2, 4096);
    rig.push_tx(&hdr(op::REQUEST, 5, 70), &[], 4096);
    rig.kick(TXQ);
    assert_eq!(wait(&mut rig).hdr.op, op::RESPONSE);
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"from the host").unwrap();
    assert_eq!(wait(&mut rig).data, b"from the host");

    let mut h = UnixStream::connect(&rig.uds).unwrap();
    h.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.write_all(b"CONNECT 6\n").unwrap();
    rig.add_rx(1, 4096);
    let req = wait(&mut rig);
    assert_eq!(req.hdr.op, op::REQUEST);
    rig.push_tx(&hdr(op::RESPONSE, 6, req.hdr.src_port), &[], 4096);
    rig.kick(TXQ);
    assert_eq!(read_line(&mut h), format!("OK {}", req.hdr.src_port));
    drop(lp);
}

/// The guest connects to host port `port` and sends `total` bytes the
/// host does not read; returns the host stream, the bytes, and how many of
/// them the device had forwarded (the rest wait in its buffer).
fn fill_unread(rig: &mut Rig, gport: u32, port: u32, total: usize) -> (UnixStream, Vec<u8>, u32) {
    let listener = UnixListener::bind(rig.port_path(port)).unwrap();
    let s = rig.guest_connect(&listener, gport, port);
    let data = pattern(total, 12);
    for chunk in data.chunks(MAX_PKT_LEN) {
        rig.send(&rw(gport, port, chunk.len()), chunk);
    }
    rig.add_rx(8, 4096);
    rig.send(&hdr(op::CREDIT_REQUEST, gport, port), &[]);
    let update = rig.rx().pop().unwrap();
    assert_eq!(update.hdr.op, op::CREDIT_UPDATE);
    let forwarded = update.hdr.fwd_cnt;
    assert!(
        usize::try_from(forwarded).unwrap() < total,
        "some bytes must still wait for the host"
    );
    (s, data, forwarded)
}

/// Reads a host stream to its end while the rig's loop runs, `chunk`
/// bytes at a time with `pause` between reads (a slow reader).
fn read_slowly(rig: &mut Rig, s: UnixStream, chunk: usize, pause: Duration) -> Vec<u8> {
    let reader = std::thread::spawn(move || {
        let mut s = s;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut all = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return all,
                Ok(k) => all.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return all,
                Err(e) => panic!("{e}"),
            }
            std::thread::sleep(pause);
        }
    });
    assert!(
        rig.pump_until(|_| reader.is_finished()),
        "reader never done"
    );
    reader.join().unwrap()
}

#[test]
fn a_guest_closing_leaves_its_last_bytes_draining_to_a_slow_host() {
    for (by_rst, gport) in [(false, 4100), (true, 4101)] {
        let mut rig = Rig::new();
        let port = 93 + gport - 4100;
        let total = usize::try_from(CONN_BUF_ALLOC).unwrap();
        let (s, data, _) = fill_unread(&mut rig, gport, port, total);
        if by_rst {
            rig.send(&hdr(op::RST, gport, port), &[]);
            assert!(rig.rx().is_empty(), "no RST answers a RST");
        } else {
            let mut sd = hdr(op::SHUTDOWN, gport, port);
            sd.flags = shutdown::BOTH;
            rig.send(&sd, &[]);
            // The guest is answered at once; only the host side waits.
            let rst = rig.rx_one();
            assert_eq!(rst.hdr.op, op::RST);
            assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (port, gport));
        }
        assert_eq!(rig.dev().connection_count(), 1, "draining, and counted");
        // The guest has forgotten the connection: its packets get a RST.
        rig.add_rx(1, 4096);
        rig.send(&rw(gport, port, 1), b"!");
        assert_eq!(rig.rx_one().hdr.op, op::RST);
        // A reader that takes 4 KiB every 2 ms gets every byte, then EOF.
        let got = read_slowly(&mut rig, s, 4096, Duration::from_millis(2));
        assert_eq!(got.len(), data.len(), "rst={by_rst}");
        assert!(got == data, "drained bytes differ (rst={by_rst})");
        assert!(rig.pump_until(|r| r.dev().connection_count() == 0));
        assert_eq!(rig.dev().backend.graveyard_len(), 0);
    }
}

#[test]
fn a_drain_gives_up_at_its_timeout() {
    let timeout = Duration::from_millis(300);
    let mut rig = Rig::with_config(super::VsockConfig {
        drain_timeout: timeout,
        ..test_config()
    });
    let total = usize::try_from(CONN_BUF_ALLOC).unwrap();
    let (mut s, data, forwarded) = fill_unread(&mut rig, 4200, 95, total);
    let mut sd = hdr(op::SHUTDOWN, 4200, 95);
    sd.flags = shutdown::BOTH;
    let start = std::time::Instant::now();
    rig.send(&sd, &[]);
    assert_eq!(rig.rx_one().hdr.op, op::RST);
    assert_eq!(rig.dev().connection_count(), 1);
    // The host never reads: the drain ends at its timeout, not before.
    assert!(rig.pump_until(|r| r.dev().connection_count() == 0));
    let took = start.elapsed();
    assert!(took >= timeout, "closed after {took:?}");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    // What reached the socket is there, then the end.
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), usize::try_from(forwarded).unwrap());
    assert!(got == data[..got.len()]);

    // A zero drain timeout drops what waits at once.
    let mut rig = Rig::with_config(super::VsockConfig {
        drain_timeout: Duration::ZERO,
        ..test_config()
    });
    let (mut s, _, _) = fill_unread(&mut rig, 4201, 96, total);
    rig.send(&hdr(op::RST, 4201, 96), &[]);
    assert_eq!(rig.dev().connection_count(), 0);
    rig.pump();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert!(got.len() < total);
}

#[test]
fn an_unanswered_host_connect_times_out() {
    let timeout = Duration::from_millis(300);
    let config = || super::VsockConfig {
        connect_timeout: timeout,
        ..test_config()
    };
    let timed_out = |rig: &mut Rig, s: &mut UnixStream| {
        let start = std::time::Instant::now();
        rig.pump();
        assert!(nothing_to_read(s), "closed before the timeout");
        assert!(rig.pump_until(|r| r.dev().connection_count() == 0));
        let took = start.elapsed();
        assert!(took < Duration::from_secs(3), "closed after {took:?}");
        assert!(at_eof(s), "no OK line, just the end");
    };

    // The guest never takes the REQUEST (no rx buffers): it never hears
    // of the connection.
    let mut rig = Rig::with_config(config());
    let mut s = UnixStream::connect(&rig.uds).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    timed_out(&mut rig, &mut s);
    rig.add_rx(2, 4096);
    assert!(rig.rx().is_empty());

    // The guest takes the REQUEST and never answers: it gets a RST.
    let mut rig = Rig::with_config(config());
    let mut s = UnixStream::connect(&rig.uds).unwrap();
    s.write_all(b"CONNECT 53\n").unwrap();
    rig.pump();
    rig.add_rx(1, 4096);
    let req = rig.rx_one();
    assert_eq!(req.hdr.op, op::REQUEST);
    rig.add_rx(1, 4096);
    timed_out(&mut rig, &mut s);
    let rst = rig.rx_one();
    assert_eq!(rst.hdr.op, op::RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (req.hdr.src_port, 53));
    // A late RESPONSE is for an unknown connection.
    rig.add_rx(1, 4096);
    rig.send(&hdr(op::RESPONSE, 53, req.hdr.src_port), &[]);
    assert_eq!(rig.rx_one().hdr.op, op::RST);

    // A host process that never finishes its CONNECT line.
    let mut rig = Rig::with_config(config());
    let mut s = UnixStream::connect(&rig.uds).unwrap();
    s.write_all(b"CONN").unwrap();
    timed_out(&mut rig, &mut s);

    // An answered CONNECT outlives the timeout.
    let mut rig = Rig::with_config(config());
    let (mut s, local) = rig.host_connect(54, 65536);
    rig.pump_for(timeout * 2);
    assert_eq!(rig.dev().connection_count(), 1);
    rig.send(&rw(54, local, 2), b"hi");
    assert_eq!(read_n(&mut s, 2), b"hi");
}

#[test]
fn guest_connections_go_only_to_allowed_host_ports() {
    // Accepted streams stay open so that no hang-up reaches the guest.
    let mut open = Vec::new();
    let mut try_port = |rig: &mut Rig, port: u32| -> bool {
        let listener = UnixListener::bind(rig.port_path(port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        rig.add_rx(1, 4096);
        let gport = port.wrapping_add(7000);
        rig.send(&hdr(op::REQUEST, gport, port), &[]);
        let answer = rig.rx_one();
        assert_eq!((answer.hdr.src_port, answer.hdr.dst_port), (port, gport));
        let accepted = listener.accept();
        let reached = accepted.is_ok();
        assert_eq!(reached, answer.hdr.op == op::RESPONSE, "port {port}");
        open.push((listener, accepted));
        reached
    };
    // The default allows none.
    let mut rig = Rig::with_config(super::VsockConfig::default());
    assert!(!try_port(&mut rig, 5000));
    assert!(!try_port(&mut rig, 1));
    assert_eq!(rig.dev().connection_count(), 0);
    // A list allows what it lists.
    let mut rig = Rig::with_config(super::VsockConfig::default().allow_host_port(5000));
    assert!(try_port(&mut rig, 5000));
    assert!(!try_port(&mut rig, 5001));
    // Any allows any.
    let mut rig = Rig::with_config(super::VsockConfig {
        host_ports: super::HostPorts::Any,
        ..super::VsockConfig::default()
    });
    assert!(try_port(&mut rig, 5002));
    assert!(try_port(&mut rig, u32::MAX));
    // Host-initiated connections need no allowance.
    let mut rig = Rig::with_config(super::VsockConfig::default());
    let (_s, _) = rig.host_connect(8, 4096);
}

#[test]
fn the_buffer_size_is_configurable() {
    let mut rig = Rig::with_config(super::VsockConfig {
        buffer_size: 8192,
        ..test_config()
    });
    // Advertised in the RESPONSE (guest_connect checks) and every packet.
    let listener = UnixListener::bind(rig.port_path(97)).unwrap();
    let mut s = rig.guest_connect(&listener, 4300, 97);
    // A CREDIT_UPDATE after a quarter of it is forwarded.
    rig.add_rx(4, 4096);
    rig.send(&rw(4300, 97, 2048), &pattern(2048, 1));
    assert_eq!(read_n(&mut s, 2048), pattern(2048, 1));
    let p = rig.rx_one();
    assert_eq!(p.hdr.op, op::CREDIT_UPDATE);
    assert_eq!((p.hdr.buf_alloc, p.hdr.fwd_cnt), (8192, 2048));
    assert_eq!(rig.dev().config().buffer_size, 8192);
}

#[test]
fn every_connection_counts_in_the_process_fd_budget() {
    let mut rig = Rig::new();
    // A process budget of two fds (standing in for half of RLIMIT_NOFILE).
    let budget = std::sync::Arc::new(super::budget::FdBudget::new());
    rig.dev().backend.limits.budget = budget.clone();
    rig.dev().backend.limits.process_cap = 2;
    let listener = UnixListener::bind(rig.port_path(98)).unwrap();
    let _a = rig.guest_connect(&listener, 1, 98);
    let (_b, local) = rig.host_connect(2, 4096);
    assert_eq!(budget.held(), 2);
    // Beyond it: a guest connection gets a RST, a host one is closed.
    rig.add_rx(1, 4096);
    rig.send(&hdr(op::REQUEST, 3, 98), &[]);
    assert_eq!(rig.rx_one().hdr.op, op::RST);
    let mut c = UnixStream::connect(&rig.uds).unwrap();
    rig.pump();
    assert!(at_eof(&mut c));
    // Closing one gives its fd back.
    rig.send(&hdr(op::RST, 2, local), &[]);
    rig.pump();
    assert_eq!(budget.held(), 1);
    let _d = rig.guest_connect(&listener, 4, 98);
    assert_eq!(budget.held(), 2);
    drop(rig);
    assert_eq!(budget.held(), 0, "a dropped device gives every fd back");
}

#[test]
fn the_default_connection_limit_follows_rlimit_nofile() {
    let rig = Rig::with_config(super::VsockConfig::default());
    let soft = super::budget::soft_nofile();
    let limits = &rig.dev().backend.limits;
    assert_eq!(
        limits.max_connections,
        usize::try_from(super::config::default_max_connections(soft)).unwrap()
    );
    assert!(u64::try_from(limits.max_connections).unwrap() <= soft / 8 || soft < 8);
    assert_eq!(limits.process_cap, super::budget::process_cap(soft));
}

#[test]
fn guest_triggered_warnings_are_rate_limited() {
    let mut rig = Rig::with_config(super::VsockConfig::default());
    let mut rsts = 0;
    for i in 0..10 {
        rig.add_rx(50, 256);
        for j in 0..50 {
            rig.push_tx(&hdr(op::REQUEST, i * 50 + j, 6000), &[], 64);
        }
        rig.kick(TXQ);
        rig.pump();
        rig.used(TXQ);
        rsts += rig.rx().len();
    }
    assert_eq!(rsts, 500, "every denied connection is refused");
    let logged = rig.dev().backend.warn.logged();
    assert!(logged > 0, "the first ones are logged");
    assert!(
        logged <= u64::from(super::warn_limit::BURST),
        "{logged} warnings for 500 refusals"
    );
}

#[test]
fn with_config_refuses_a_bad_config_before_binding() {
    let dir = TempDir::new();
    let path = dir.path().join("v.sock");
    let bad = super::VsockConfig {
        connect_timeout: Duration::ZERO,
        ..super::VsockConfig::default()
    };
    let err = Vsock::with_config(3, &path, bad).unwrap_err();
    assert!(matches!(
        err,
        VsockError::Config(super::VsockConfigError::ConnectTimeout(d)) if d.is_zero()
    ));
    assert!(err.to_string().contains("connect_timeout"), "{err}");
    assert!(!path.exists(), "no socket file is left behind");
}

/// The guest's REQUEST for a handed-in connection to `port`; returns the
/// host-side port.
fn handed_in_request(rig: &mut Rig, port: u32) -> u32 {
    rig.pump();
    rig.add_rx(1, 4096);
    let req = rig.rx_one();
    assert_eq!(req.hdr.op, op::REQUEST);
    assert_eq!((req.hdr.src_cid, req.hdr.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.hdr.dst_port, port);
    assert!(req.hdr.src_port >= 1 << 30);
    assert_eq!(req.hdr.buf_alloc, CONN_BUF_ALLOC);
    req.hdr.src_port
}

#[test]
fn a_handed_in_connection_is_a_request_and_carries_data_both_ways() {
    let mut rig = Rig::new();
    let connector = rig.dev().connector();
    let mut s = connector.connect(52).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = handed_in_request(&mut rig, 52);
    rig.send(&hdr(op::RESPONSE, 52, local), &[]);
    rig.pump();
    assert!(nothing_to_read(&mut s), "no OK line on a handed-in stream");

    s.write_all(b"ping").unwrap();
    rig.pump();
    rig.add_rx(1, 4096);
    let p = rig.rx_one();
    assert_eq!((p.hdr.op, p.data.as_slice()), (op::RW, &b"ping"[..]));
    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (local, 52));
    rig.send(&rw(52, local, 4), b"pong");
    assert_eq!(read_n(&mut s, 4), b"pong");

    // The caller closing its end reaches the guest as a SHUTDOWN.
    drop(s);
    rig.pump();
    rig.add_rx(1, 4096);
    let shut = rig.rx_one();
    assert_eq!(shut.hdr.op, op::SHUTDOWN);
    // A second connection, to another port, from another host port.
    let _s2 = connector.connect(53).unwrap();
    assert_ne!(handed_in_request(&mut rig, 53), local);
}

#[test]
fn a_refused_handed_in_connection_ends_the_stream() {
    let mut rig = Rig::new();
    let connector = rig.dev().connector();
    let mut s = connector.connect(99).unwrap();
    let local = handed_in_request(&mut rig, 99);
    rig.send(&hdr(op::RST, 99, local), &[]);
    assert!(at_eof(&mut s));
    assert_eq!(rig.dev().connection_count(), 0);
}

#[test]
fn an_unanswered_handed_in_connection_times_out() {
    let mut rig = Rig::with_config(super::VsockConfig {
        connect_timeout: Duration::from_millis(300),
        ..test_config()
    });
    let connector = rig.dev().connector();
    let mut s = connector.connect(7).unwrap();
    let local = handed_in_request(&mut rig, 7);
    assert!(nothing_to_read(&mut s));
    assert!(rig.pump_until(|r| r.dev().connection_count() == 0));
    assert!(at_eof(&mut s));
    rig.add_rx(1, 4096);
    let rst = rig.rx_one();
    assert_eq!((rst.hdr.op, rst.hdr.src_port), (op::RST, local));
}

#[test]
fn handed_in_connections_count_against_the_connection_limit() {
    let mut rig = Rig::with_config(super::VsockConfig {
        max_connections: Some(2),
        ..test_config()
    });
    let connector = rig.dev().connector();
    // Counted as soon as they are made, before the loop sees them.
    let _a = connector.connect(1).unwrap();
    let mut b = connector.connect(2).unwrap();
    let err = connector.connect(3).unwrap_err();
    assert!(
        matches!(err, super::VsockConnectError::TooManyConnections(2)),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_connections"), "{err}");
    // A host process beyond the limit is closed as before.
    let mut c = UnixStream::connect(&rig.uds).unwrap();
    rig.pump();
    assert!(at_eof(&mut c));
    // Once one closes, there is room again.
    handed_in_request(&mut rig, 1);
    rig.add_rx(1, 4096);
    let req_b = rig.rx_one();
    assert_eq!(req_b.hdr.dst_port, 2);
    rig.send(&hdr(op::RST, 2, req_b.hdr.src_port), &[]);
    assert!(at_eof(&mut b));
    rig.pump();
    let _d = connector.connect(4).unwrap();
}

#[test]
fn handed_in_connections_count_in_the_process_fd_budget() {
    let rig = Rig::new();
    let budget = std::sync::Arc::new(super::budget::FdBudget::new());
    rig.dev().backend.limits.budget = budget.clone();
    rig.dev().backend.limits.process_cap = 1;
    let connector = rig.dev().connector();
    let a = connector.connect(1).unwrap();
    assert_eq!(budget.held(), 1);
    let err = connector.connect(2).unwrap_err();
    assert!(
        matches!(err, super::VsockConnectError::FdBudget(1)),
        "{err:?}"
    );
    assert!(err.to_string().contains("RLIMIT_NOFILE"), "{err}");
    drop(a);
    drop(rig);
    assert_eq!(budget.held(), 0, "a dropped device gives every fd back");
}

#[test]
fn a_dropped_device_ends_what_was_handed_to_it() {
    let rig = Rig::new();
    let connector = rig.dev().connector();
    // Never seen by the loop: it waits in the channel.
    let mut s = connector.connect(5).unwrap();
    drop(rig);
    assert!(at_eof(&mut s));
    let err = connector.connect(5).unwrap_err();
    assert!(
        matches!(err, super::VsockConnectError::DeviceGone),
        "{err:?}"
    );
}

#[test]
fn a_listener_handed_in_serves_its_backlog_and_outlives_the_device() {
    let dir = TempDir::new();
    let path = dir.path().join("owned.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // A client connects while no device exists: it waits in the backlog.
    let mut early = UnixStream::connect(&path).unwrap();
    early
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    early.write_all(b"CONNECT 52\nhello").unwrap();

    let dev =
        Vsock::with_listener(GUEST_CID, listener.try_clone().unwrap(), test_config()).unwrap();
    assert_eq!(dev.uds_path(), path);
    let mut rig = Rig::with_device(dev, TempDir::new());
    let local = handed_in_request(&mut rig, 52);
    rig.send(&hdr(op::RESPONSE, 52, local), &[]);
    assert_eq!(read_line(&mut early), format!("OK {local}"));
    rig.add_rx(1, 4096);
    assert_eq!(rig.rx_one().data, b"hello");
    // Guest connections go to <path>_<port>.
    let side = UnixListener::bind(rig.port_path(5000)).unwrap();
    assert_eq!(rig.port_path(5000), dir.path().join("owned.sock_5000"));
    let _g = rig.guest_connect(&side, 1234, 5000);

    drop(rig);
    assert!(at_eof(&mut early), "the device's connections end with it");
    assert!(path.exists(), "the owner's socket path stays");
    // The next device, on another clone, serves the next client.
    let mut late = UnixStream::connect(&path).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    late.write_all(b"CONNECT 53\n").unwrap();
    let dev =
        Vsock::with_listener(GUEST_CID, listener.try_clone().unwrap(), test_config()).unwrap();
    let mut rig = Rig::with_device(dev, TempDir::new());
    let local = handed_in_request(&mut rig, 53);
    rig.send(&hdr(op::RESPONSE, 53, local), &[]);
    assert_eq!(read_line(&mut late), format!("OK {local}"));
    drop(rig);
    assert!(path.exists());
}

#[test]
fn a_listener_without_a_path_is_refused() {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(format!(
        "dormouse-vsock-test-{}",
        std::process::id()
    ))
    .unwrap();
    let abstract_listener = UnixListener::bind_addr(&addr).unwrap();
    let err = Vsock::with_listener(GUEST_CID, abstract_listener, test_config()).unwrap_err();
    assert!(matches!(err, VsockError::UnnamedListener), "{err:?}");
    assert!(err.to_string().contains("bind it to a path"), "{err}");
}

#[test]
fn after_a_transport_reset_rx_waits_for_the_guest_to_handle_it() {
    let mut rig = Rig::new();
    rig.add_event_buffer(8);
    rig.dev().send_transport_reset().unwrap();
    assert_eq!(rig.events(), vec![(4, 0)]);
    // A host connection (e.g. one that waited in the backlog while the VM
    // was restored) is not offered before the guest dropped its old ones.
    let connector = rig.dev().connector();
    let _s = connector.connect(52).unwrap();
    rig.pump();
    rig.add_rx(1, 4096);
    assert!(
        rig.rx().is_empty(),
        "a REQUEST before the guest saw the reset"
    );
    // A kick with no buffer put back (activation kicks every queue once,
    // and a restore activates before it resets) does not end the hold.
    rig.kick(super::EVQ);
    rig.pump();
    assert!(rig.rx().is_empty(), "a REQUEST after a stale kick");
    // The guest handles the event, puts the buffer back and kicks.
    rig.add_event_buffer(8);
    rig.pump();
    let req = rig.rx_one();
    assert_eq!((req.hdr.op, req.hdr.dst_port), (op::REQUEST, 52));
}
