//! Receive: TAP frames to guest buffers.

use super::super::{MAX_BUFFER_LEN, VNET_HDR_LEN};
use super::rig::{ether, with_header, Desc, Rig, OUTSIDE};
use crate::devices::virtio::VirtioDevice;

/// What the guest finds before every frame: no offload, one buffer.
const RX_HEADER: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

#[test]
fn a_frame_lands_whole_behind_a_clean_header() {
    let mut t = Rig::new();
    // The header itself split over two descriptors.
    let (head, addrs) = t.add_rx(&[5, 2000]);
    let frame = ether(1000, 1);
    // DATA_VALID from the TAP is not passed on: GUEST_CSUM is not offered.
    t.peer_send(&with_header(2, 0, &frame));
    t.net.rx_pass();

    assert_eq!(t.rxq.used_idx(&t.mem), 1);
    assert_eq!(t.rxq.used(&t.mem, 0), (u32::from(head), 1012));
    let got = t.read_guest(&[(addrs[0], 5), (addrs[1], 1007)]);
    assert_eq!(&got[..VNET_HDR_LEN], &RX_HEADER);
    assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);
    assert!(t.take_used_irq());
    let c = t.net.counters();
    assert_eq!((c.rx_frames, c.rx_bytes, c.rx_dropped), (1, 1000, 0));
    assert!(t.net.rx_wants_tap, "the TAP is drained: watch it again");
}

#[test]
fn frames_fill_buffers_in_order() {
    let mut t = Rig::new();
    let chains: Vec<_> = (0..3).map(|_| t.add_rx(&[1526])).collect();
    let frames: Vec<_> = [60usize, 1514, 14]
        .iter()
        .zip(1u8..)
        .map(|(&n, s)| ether(n, s))
        .collect();
    for f in &frames {
        t.peer_send(&with_header(0, 0, f));
    }
    t.net.rx_pass();
    for (i, ((head, addrs), f)) in chains.iter().zip(&frames).enumerate() {
        let i = u16::try_from(i).unwrap();
        let len = VNET_HDR_LEN + f.len();
        assert_eq!(
            t.rxq.used(&t.mem, i),
            (u32::from(*head), u32::try_from(len).unwrap())
        );
        assert_eq!(&t.read_guest(&[(addrs[0], len)])[VNET_HDR_LEN..], &f[..]);
    }
}

#[test]
fn a_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_kept() {
    let mut t = Rig::new();
    let (head, addrs) = t.add_rx(&[50, 50]);
    t.peer_send(&with_header(0, 0, &ether(200, 1)));
    let small = ether(60, 2);
    t.peer_send(&with_header(0, 0, &small));
    t.net.rx_pass();

    // The big frame went nowhere, not even partly; the small one took the
    // same buffer.
    assert_eq!(t.rxq.used_idx(&t.mem), 1);
    assert_eq!(t.rxq.used(&t.mem, 0), (u32::from(head), 72));
    let got = t.read_guest(&[(addrs[0], 50), (addrs[1], 22)]);
    assert_eq!(&got[VNET_HDR_LEN..], &small[..]);
    let c = t.net.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 1));
    assert!(!t.net.needs_reset());
}

#[test]
fn a_frame_that_exactly_fits_is_delivered() {
    let mut t = Rig::new();
    let (_, addrs) = t.add_rx(&[72]);
    let f = ether(60, 3);
    t.peer_send(&with_header(0, 0, &f));
    t.net.rx_pass();
    assert_eq!(t.rxq.used(&t.mem, 0).1, 72);
    assert_eq!(&t.read_guest(&[(addrs[0], 72)])[VNET_HDR_LEN..], &f[..]);
}

/// Found by the `virtio_net_tx` fuzz target: a frame longer than
/// `MAX_BUFFER_LEN` from the backend (here a datagram socket, which cuts it
/// to the read buffer) reached the guest truncated, as if it were whole.
#[test]
fn a_frame_longer_than_the_largest_is_dropped_not_truncated() {
    let mut t = Rig::new();
    let (head, addrs) = t.add_rx(&[0xffff, 0x1000]);
    let huge = ether(MAX_BUFFER_LEN + 50 - VNET_HDR_LEN, 1);
    t.peer_send(&with_header(0, 0, &huge));
    let f = ether(100, 2);
    t.peer_send(&with_header(0, 0, &f));
    t.net.rx_pass();

    assert_eq!(t.rxq.used_idx(&t.mem), 1);
    assert_eq!(t.rxq.used(&t.mem, 0), (u32::from(head), 112));
    assert_eq!(&t.read_guest(&[(addrs[0], 112)])[VNET_HDR_LEN..], &f[..]);
    let c = t.net.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 1));
    assert!(!t.net.needs_reset());
}

#[test]
fn frames_asking_for_offloads_or_too_short_are_dropped() {
    let mut t = Rig::new();
    t.add_rx(&[2048]);
    t.peer_send(&with_header(1, 0, &ether(100, 1))); // NEEDS_CSUM
    t.peer_send(&with_header(0, 4, &ether(100, 2))); // GSO_TCPV6
    t.peer_send(&with_header(0, 0, &ether(13, 3))); // no Ethernet header
    t.peer_send(&[0u8; 5]); // not even a virtio-net header
    t.net.rx_pass();
    assert_eq!(t.rxq.used_idx(&t.mem), 0, "the buffer is still free");
    assert_eq!(t.net.counters().rx_dropped, 4);
    assert!(!t.net.needs_reset());
}

#[test]
fn without_buffers_one_frame_waits_and_the_tap_is_not_watched() {
    let mut t = Rig::new();
    let (f1, f2) = (ether(100, 1), ether(200, 2));
    t.peer_send(&with_header(0, 0, &f1));
    t.peer_send(&with_header(0, 0, &f2));
    t.net.rx_pass();
    assert!(t.net.has_pending_rx());
    assert!(
        !t.net.rx_wants_tap,
        "nothing to put frames in: stop watching"
    );
    assert_eq!(t.net.counters().rx_dropped, 0);
    // Still nothing without a buffer.
    t.net.rx_pass();
    assert!(!t.net.rx_wants_tap);

    // One buffer: the waiting frame takes it, the next one waits.
    let (_, a1) = t.add_rx(&[2048]);
    t.net.rx_pass();
    assert_eq!(t.rxq.used_idx(&t.mem), 1);
    assert_eq!(&t.read_guest(&[(a1[0], 112)])[VNET_HDR_LEN..], &f1[..]);
    assert!(t.net.has_pending_rx());
    assert!(!t.net.rx_wants_tap);

    let (_, a2) = t.add_rx(&[2048]);
    t.net.rx_pass();
    assert_eq!(t.rxq.used_idx(&t.mem), 2);
    assert_eq!(&t.read_guest(&[(a2[0], 212)])[VNET_HDR_LEN..], &f2[..]);
    assert!(!t.net.has_pending_rx());
    assert!(t.net.rx_wants_tap, "drained: watch the TAP again");
    assert_eq!(t.net.counters().rx_frames, 2);
}

#[test]
fn a_pass_moves_at_most_its_share() {
    let mut t = Rig::new();
    for _ in 0..256 {
        t.add_rx(&[128]);
    }
    let frame = with_header(0, 0, &ether(60, 1));
    // As many as the socket buffers take (about 280 with Linux defaults).
    let mut sent = 0;
    while sent < 300 && t.peer.send(&frame).is_ok() {
        sent += 1;
    }
    t.net.rx_pass();
    let delivered = t.net.counters().rx_frames;
    assert_eq!(delivered, sent.min(256));
    if sent > 256 {
        assert!(t.net.rx_wants_tap, "more may wait: keep watching");
        assert!(!t.net.has_pending_rx());
    }
}

/// A fresh rig with one frame waiting on the TAP and `chain` offered.
fn rx_with_chain(chain: &[Desc]) -> Rig {
    let mut t = Rig::new();
    t.rxq.add_chain(&t.mem, chain);
    t.peer_send(&with_header(0, 0, &ether(100, 9)));
    t.net.rx_pass();
    t
}

#[test]
fn malformed_receive_chains_fail_the_device() {
    let cases: Vec<(&str, Vec<Desc>)> = vec![
        (
            "a device-readable descriptor",
            vec![
                Desc {
                    addr: 0x10_0000,
                    len: 12,
                    writable: false,
                },
                Desc {
                    addr: 0x10_1000,
                    len: 2048,
                    writable: true,
                },
            ],
        ),
        (
            "outside guest memory",
            vec![Desc {
                addr: OUTSIDE,
                len: 2048,
                writable: true,
            }],
        ),
        (
            "a length near u32::MAX",
            vec![Desc {
                addr: 0x10_0000,
                len: u32::MAX,
                writable: true,
            }],
        ),
        (
            "lengths overflowing u32",
            vec![
                Desc {
                    addr: 0x10_0000,
                    len: u32::MAX - 4,
                    writable: true,
                },
                Desc {
                    addr: 0x10_0000,
                    len: 10,
                    writable: true,
                },
            ],
        ),
    ];
    for (what, chain) in cases {
        let t = rx_with_chain(&chain);
        assert!(t.net.needs_reset(), "{what}");
        assert!(t.config_irq(), "{what}");
        assert_eq!(t.rxq.used_idx(&t.mem), 0, "{what}");
        assert!(
            !t.net.rx_wants_tap,
            "{what}: a failed device stops watching"
        );
    }
}

#[test]
fn an_empty_or_zero_length_chain_cannot_hold_a_frame() {
    // Zero-length buffers only: the frame does not fit and is dropped; the
    // chain is well formed, so the device carries on.
    let t = rx_with_chain(&[
        Desc {
            addr: 0x10_0000,
            len: 0,
            writable: true,
        },
        Desc {
            addr: 0x10_1000,
            len: 0,
            writable: true,
        },
    ]);
    assert!(!t.net.needs_reset());
    assert_eq!(t.net.counters().rx_dropped, 1);
    assert_eq!(t.rxq.used_idx(&t.mem), 0);
}

#[test]
fn zero_length_descriptors_between_buffers_are_harmless() {
    let t = rx_with_chain(&[
        Desc {
            addr: 0x10_0000,
            len: 0,
            writable: true,
        },
        Desc {
            addr: 0x10_1000,
            len: 12,
            writable: true,
        },
        Desc {
            addr: OUTSIDE,
            len: 0,
            writable: true,
        },
        Desc {
            addr: 0x10_2000,
            len: 2000,
            writable: true,
        },
    ]);
    assert!(!t.net.needs_reset());
    assert_eq!(t.net.counters().rx_frames, 1);
    assert_eq!(t.rxq.used(&t.mem, 0).1, 112);
}

#[test]
fn ring_corruption_on_the_receive_queue_fails_the_device() {
    // A loop.
    let mut t = Rig::new();
    let a = t.rxq.reserve(2);
    t.rxq.write_desc(&t.mem, a, 0x10_0000, 8, 1 | 2, a + 1);
    t.rxq.write_desc(&t.mem, a + 1, 0x10_1000, 8, 1 | 2, a);
    t.rxq.publish(&t.mem, a);
    t.peer_send(&with_header(0, 0, &ether(100, 1)));
    t.net.rx_pass();
    assert!(t.net.needs_reset());

    // A head past the queue.
    let mut t = Rig::new();
    t.rxq.publish(&t.mem, 4000);
    t.peer_send(&with_header(0, 0, &ether(100, 1)));
    t.net.rx_pass();
    assert!(t.net.needs_reset());

    // An available index from nowhere.
    let t = {
        let mut t = Rig::new();
        t.rxq.set_avail_idx(&t.mem, 0x8000);
        t.peer_send(&with_header(0, 0, &ether(100, 1)));
        t.net.rx_pass();
        t
    };
    assert!(t.net.needs_reset());
}

#[test]
fn reset_drops_the_waiting_frame_and_the_device_comes_back() {
    let mut t = Rig::new();
    t.peer_send(&with_header(0, 0, &ether(100, 1)));
    t.net.rx_pass();
    assert!(t.net.has_pending_rx());
    t.net.reset();
    assert!(!t.net.has_pending_rx());
    assert!(!t.net.is_activated());
    assert_eq!(t.net.counters().rx_dropped, 1);
    // Inactive: passes do nothing and consume nothing.
    let f = ether(80, 2);
    t.peer_send(&with_header(0, 0, &f));
    t.net.rx_pass();
    t.net.tx_pass();
    assert!(!t.net.has_pending_rx());

    // Brought up again, the frame sent meanwhile arrives.
    let Rig { net, peer, .. } = t;
    let mut t = Rig::with_net(net, peer);
    let (_, addrs) = t.add_rx(&[2048]);
    t.net.rx_pass();
    assert_eq!(&t.read_guest(&[(addrs[0], 92)])[VNET_HDR_LEN..], &f[..]);
}
