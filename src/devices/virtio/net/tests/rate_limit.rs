//! Receive and transmit rate limiters: what is refused waits, in order,
//! and each direction is limited on its own.

use super::super::{NetError, VNET_HDR_LEN};
use super::rig::{device, ether, with_header, Rig};
use crate::rate_limiter::{
    BucketKind, RateLimiterConfig, RateLimiterConfigError, RateLimiterError, TokenBucketConfig,
};

/// A limit that never refills within a test.
const MINUTE_MS: u64 = 60_000;

pub(super) fn limits(bandwidth: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> RateLimiterConfig {
    let bucket = |(size, ms)| TokenBucketConfig::new(size, ms);
    RateLimiterConfig {
        bandwidth: bandwidth.map(bucket),
        ops: ops.map(bucket),
    }
}

fn limited(rx: RateLimiterConfig, tx: RateLimiterConfig) -> Rig {
    let (net, peer) = device();
    let net = net.with_rate_limiters(&rx, &tx).unwrap();
    assert_eq!(net.rate_limiter_configs(), (rx, tx));
    Rig::with_net(net, peer)
}

#[test]
fn a_transmit_ops_limit_leaves_refused_frames_in_the_ring() {
    let unlimited = RateLimiterConfig::unlimited();
    let mut t = limited(unlimited, limits(None, Some((2, MINUTE_MS))));
    let frames: Vec<_> = (1..=4).map(|s| with_header(0, 0, &ether(100, s))).collect();
    for f in &frames {
        t.add_tx(&[f]);
    }
    t.net.tx_pass();
    assert_eq!(t.txq.used_idx(&t.mem), 2);
    assert!(t.net.tx_rate_limiter.as_ref().unwrap().is_blocked());
    // Notifications while blocked change nothing, and no self-kick.
    t.net.tx_pass();
    assert_eq!(t.txq.used_idx(&t.mem), 2);
    assert!(t.net.queue_events[1].read().is_err());
    // The rest follow in order once the limit goes.
    t.net.tx_rate_limiter = None;
    t.net.tx_pass();
    assert_eq!(t.txq.used_idx(&t.mem), 4);
    for f in &frames {
        assert_eq!(t.peer_recv().as_ref(), Some(f));
    }
    assert_eq!(t.peer_recv(), None);
    assert_eq!(t.net.counters().tx_frames, 4);
}

#[test]
fn a_transmit_bandwidth_limit_charges_ethernet_bytes() {
    // 1000 bytes a minute: two 500-byte frames (headers are free), then
    // not even a 60-byte one.
    let mut t = limited(
        RateLimiterConfig::unlimited(),
        limits(Some((1000, MINUTE_MS)), None),
    );
    for (len, seed) in [(500, 1), (500, 2), (60, 3)] {
        t.add_tx(&[&with_header(0, 0, &ether(len, seed))]);
    }
    t.net.tx_pass();
    assert_eq!(t.txq.used_idx(&t.mem), 2);
    let c = t.net.counters();
    assert_eq!((c.tx_frames, c.tx_bytes), (2, 1000));
    let bucket = t.net.tx_rate_limiter.as_ref().unwrap().bandwidth().unwrap();
    assert_eq!(bucket.budget(), 0);
}

#[test]
fn malformed_transmit_chains_cost_an_operation() {
    let mut t = limited(
        RateLimiterConfig::unlimited(),
        limits(Some((1000, MINUTE_MS)), Some((2, MINUTE_MS))),
    );
    // Too short to hold a header: dropped, but charged one operation.
    for _ in 0..3 {
        t.add_tx(&[&[0u8; 4]]);
    }
    t.net.tx_pass();
    assert_eq!(t.txq.used_idx(&t.mem), 2);
    assert_eq!(t.net.counters().tx_dropped, 2);
    let limiter = t.net.tx_rate_limiter.as_ref().unwrap();
    assert_eq!(limiter.bandwidth().unwrap().budget(), 1000);
}

#[test]
fn a_receive_limit_holds_the_frame_and_stops_reading_the_tap() {
    let mut t = limited(
        limits(None, Some((1, MINUTE_MS))),
        RateLimiterConfig::unlimited(),
    );
    let (_, a1) = t.add_rx(&[2048]);
    t.add_rx(&[2048]);
    let (f1, f2) = (ether(100, 1), ether(200, 2));
    t.peer_send(&with_header(0, 0, &f1));
    t.peer_send(&with_header(0, 0, &f2));
    t.net.rx_pass();
    assert_eq!(t.rxq.used_idx(&t.mem), 1);
    assert_eq!(&t.read_guest(&[(a1[0], 112)])[VNET_HDR_LEN..], &f1[..]);
    // The second frame waits in the device, the buffer stays the driver's,
    // and the TAP is not watched (the timer brings the next pass).
    assert!(t.net.has_pending_rx());
    assert!(!t.net.rx_wants_tap);
    assert!(t.net.rx_rate_limiter.as_ref().unwrap().is_blocked());
    t.net.rx_pass();
    assert_eq!(t.rxq.used_idx(&t.mem), 1);
    // Transmit is not limited by the receive side.
    t.add_tx(&[&with_header(0, 0, &ether(60, 9))]);
    t.net.tx_pass();
    assert_eq!(t.txq.used_idx(&t.mem), 1);
    // Without the limit, the held frame goes to the next buffer.
    t.net.rx_rate_limiter = None;
    t.net.rx_pass();
    assert_eq!(t.rxq.used_idx(&t.mem), 2);
    assert_eq!(t.rxq.used(&t.mem, 1).1, 212);
    let c = t.net.counters();
    assert_eq!((c.rx_frames, c.rx_bytes, c.rx_dropped), (2, 300, 0));
}

#[test]
fn an_invalid_rate_limit_is_a_typed_error() {
    let (net, _peer) = device();
    let err = net
        .with_rate_limiters(
            &RateLimiterConfig::unlimited(),
            &limits(Some((0, 100)), None),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            NetError::RateLimiter {
                direction: "transmit",
                source: RateLimiterError::Config(RateLimiterConfigError::ZeroSize(
                    BucketKind::Bandwidth
                )),
            }
        ),
        "{err:?}"
    );
    let (net, _peer) = device();
    let net = net
        .with_rate_limiters(
            &RateLimiterConfig::unlimited(),
            &RateLimiterConfig::unlimited(),
        )
        .unwrap();
    assert!(net.rx_rate_limiter.is_none() && net.tx_rate_limiter.is_none());
}

#[test]
fn receive_and_transmit_budgets_survive_save_and_restore() {
    use crate::devices::virtio::VirtioDevice;

    let tx = limits(None, Some((4, MINUTE_MS)));
    let mut t = limited(RateLimiterConfig::unlimited(), tx);
    t.add_tx(&[&with_header(0, 0, &ether(100, 1))]);
    t.net.tx_pass();
    let states = t.net.rate_limiter_states();
    assert_eq!(states.len(), 2);
    assert_eq!(states[0], Default::default());
    assert_eq!(states[1].ops.unwrap().budget, 3);

    let (net, _peer) = device();
    let mut fresh = net
        .with_rate_limiters(&RateLimiterConfig::unlimited(), &tx)
        .unwrap();
    fresh.restore_rate_limiters(&states);
    let budget = fresh
        .tx_rate_limiter
        .as_ref()
        .unwrap()
        .ops()
        .unwrap()
        .budget();
    assert_eq!(budget, 3);
    // Short or hostile lists are ignored or capped.
    fresh.restore_rate_limiters(&[]);
    assert_eq!(fresh.rate_limiter_configs().1, tx);
}
