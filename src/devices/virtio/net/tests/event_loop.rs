//! The device on a real event-manager loop: which descriptors it watches,
//! and that a TAP it cannot drain never makes the loop spin.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use super::super::event_handler::TapWatch;
use super::super::{Net, Tap, VNET_HDR_LEN};
use super::rig::{device, ether, with_header, Rig, MAC};
use crate::devices::virtio::VirtioDevice;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
type Shared = Arc<Mutex<Net>>;

struct LoopRig {
    t: Rig<Shared>,
    manager: EventManager<Subscriber>,
}

impl LoopRig {
    /// `net` activated (its queue kicks pending) and on a loop.
    fn new(net: Net, peer: UnixDatagram) -> Self {
        let t = Rig::activated(net, peer).map_net(|n| Arc::new(Mutex::new(n)));
        let mut manager = EventManager::<Subscriber>::new().unwrap();
        let sub: Subscriber = t.net.clone();
        manager.add_subscriber(sub);
        LoopRig { t, manager }
    }

    fn net(&self) -> MutexGuard<'_, Net> {
        self.t.net.lock().unwrap()
    }

    /// Runs the loop until nothing is ready; returns how many events it
    /// handled. A loop that never goes idle is a spinning loop.
    fn settle(&mut self) -> usize {
        let mut total = 0;
        for _ in 0..50 {
            match self.manager.run_with_timeout(0).unwrap() {
                0 => return total,
                n => total += n,
            }
        }
        panic!("the event loop never went idle: it spins");
    }

    /// Whether anything wakes the loop within 20 ms.
    fn wakes(&mut self) -> bool {
        self.manager.run_with_timeout(20).unwrap() > 0
    }

    /// The driver notifies queue `q`, as the transport would.
    fn notify(&self, q: usize) {
        self.net().queue_events()[q].write(1).unwrap();
    }
}

#[test]
fn a_tap_with_no_receive_buffer_does_not_spin_the_loop() {
    let (net, peer) = device();
    let mut l = LoopRig::new(net, peer);
    assert_eq!(l.settle(), 2, "the two activation kicks");
    assert_eq!(l.net().tap_watch, TapWatch::Readable);

    let (f1, f2) = (ether(100, 1), ether(300, 2));
    l.t.peer_send(&with_header(0, 0, &f1));
    l.t.peer_send(&with_header(0, 0, &f2));
    // The device takes one frame, finds no buffer, and stops watching,
    // although the TAP stays readable.
    assert_eq!(l.settle(), 1);
    assert_eq!(l.net().tap_watch, TapWatch::Idle);
    assert!(!l.wakes());

    // The driver adds buffers and notifies: both frames arrive.
    let (_, a1) = l.t.add_rx(&[2048]);
    let (_, a2) = l.t.add_rx(&[2048]);
    l.notify(0);
    l.settle();
    assert_eq!(l.t.rxq.used_idx(&l.t.mem), 2);
    assert_eq!(&l.t.read_guest(&[(a1[0], 112)])[VNET_HDR_LEN..], &f1[..]);
    assert_eq!(&l.t.read_guest(&[(a2[0], 312)])[VNET_HDR_LEN..], &f2[..]);
    assert!(l.t.take_used_irq());
    assert_eq!(l.net().tap_watch, TapWatch::Readable);

    // With buffers left, a new frame comes in through the TAP's readiness.
    let (_, a3) = l.t.add_rx(&[2048]);
    l.notify(0);
    l.settle();
    let f3 = ether(60, 3);
    l.t.peer_send(&with_header(0, 0, &f3));
    assert_eq!(l.settle(), 1);
    assert_eq!(&l.t.read_guest(&[(a3[0], 72)])[VNET_HDR_LEN..], &f3[..]);
}

#[test]
fn transmit_notifications_reach_the_tap() {
    let (net, peer) = device();
    let mut l = LoopRig::new(net, peer);
    l.settle();
    let frame = with_header(0, 0, &ether(500, 1));
    l.t.add_tx(&[&frame[..12], &frame[12..]]);
    l.notify(1);
    assert_eq!(l.settle(), 1);
    assert_eq!(l.t.peer_recv(), Some(frame));
    assert_eq!(l.t.txq.used_idx(&l.t.mem), 1);
}

#[test]
fn a_failed_or_reset_device_stops_watching_the_tap() {
    let (net, peer) = device();
    let mut l = LoopRig::new(net, peer);
    l.settle();
    l.t.rxq.set_avail_idx(&l.t.mem, 1000);
    l.t.peer_send(&with_header(0, 0, &ether(60, 1)));
    l.t.peer_send(&with_header(0, 0, &ether(60, 2)));
    l.settle();
    assert!(l.net().needs_reset());
    assert_eq!(l.net().tap_watch, TapWatch::Idle);
    assert!(!l.wakes());
    // Notifications to a failed device are drained and ignored.
    l.notify(0);
    l.notify(1);
    assert_eq!(l.settle(), 2);
    assert!(!l.wakes());

    l.net().reset();
    l.notify(0);
    l.settle();
    assert_eq!(l.net().tap_watch, TapWatch::Idle);
    assert!(!l.wakes());
}

#[test]
fn before_activation_nothing_is_read_and_kicks_are_drained() {
    let (net, peer) = device();
    let peer_clone = peer.try_clone().unwrap();
    let net = Arc::new(Mutex::new(net));
    let mut manager = EventManager::<Subscriber>::new().unwrap();
    let sub: Subscriber = net.clone();
    manager.add_subscriber(sub);
    peer_clone.send(&with_header(0, 0, &ether(60, 1))).unwrap();
    assert_eq!(manager.run_with_timeout(20).unwrap(), 0);
    net.lock().unwrap().queue_events()[0].write(1).unwrap();
    net.lock().unwrap().queue_events()[1].write(1).unwrap();
    assert_eq!(manager.run_with_timeout(0).unwrap(), 2);
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
    // The frame is still there for later.
    let mut buf = [0u8; 128];
    assert!(peer.recv(&mut buf).is_err(), "the peer sees nothing back");
    assert_eq!(net.lock().unwrap().counters().rx_dropped, 0);
}

/// A connected `SOCK_SEQPACKET` pair: frame boundaries like a TAP, and a
/// hang-up when one end closes.
fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array it is given,
    // which has room for two.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh from socketpair and nothing else
    // owns them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn a_hung_up_tap_leaves_the_loop() {
    let (ours, theirs) = seqpacket_pair();
    let tap = Tap::from_frame_socket(ours, "seqpacket").unwrap();
    let net = Net::with_tap(tap, MAC).unwrap();
    // send/recv on a connected SOCK_SEQPACKET behave as on a datagram
    // socket; the type only carries the descriptor.
    let peer = UnixDatagram::from(theirs);
    peer.set_nonblocking(true).unwrap();
    let mut l = LoopRig::new(net, peer);
    l.settle();
    let (_, addrs) = l.t.add_rx(&[2048]);
    l.notify(0);
    l.settle();
    let f = ether(70, 1);
    l.t.peer_send(&with_header(0, 0, &f));
    l.settle();
    assert_eq!(&l.t.read_guest(&[(addrs[0], 82)])[VNET_HDR_LEN..], &f[..]);

    // The kernel's end goes away: the TAP is dropped from the loop for good.
    let LoopRig { t, mut manager } = l;
    let Rig { net, peer, .. } = t;
    drop(peer);
    assert!(manager.run_with_timeout(0).unwrap() >= 1);
    assert_eq!(manager.run_with_timeout(20).unwrap(), 0, "no spinning");
    let n = net.lock().unwrap();
    assert!(n.tap_gone);
    assert_eq!(n.tap_watch, TapWatch::Removed);
    assert!(!n.needs_reset(), "the guest's side is fine");
}

#[test]
fn limiter_timers_resume_both_directions_without_spinning() {
    use super::rate_limit::limits;

    // One frame per 30 ms each way.
    let (net, peer) = device();
    let one_per_30ms = limits(None, Some((1, 30)));
    let net = net
        .with_rate_limiters(&one_per_30ms, &one_per_30ms)
        .unwrap();
    let mut l = LoopRig::new(net, peer);
    l.settle();
    for seed in 1..=3 {
        l.t.add_rx(&[2048]);
        l.t.peer_send(&with_header(0, 0, &ether(100, seed)));
        l.t.add_tx(&[&with_header(0, 0, &ether(100, seed + 10))]);
    }
    let start = std::time::Instant::now();
    l.notify(0);
    l.notify(1);
    l.settle();
    assert_eq!(l.t.rxq.used_idx(&l.t.mem), 1);
    assert_eq!(l.t.txq.used_idx(&l.t.mem), 1);
    // Throttled: the readable TAP is not watched, so the loop sleeps until
    // a timer fires.
    assert_eq!(l.net().tap_watch, TapWatch::Idle);
    while l.t.rxq.used_idx(&l.t.mem) < 3 || l.t.txq.used_idx(&l.t.mem) < 3 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the timers did not bring the frames"
        );
        l.manager.run_with_timeout(1000).unwrap();
        l.settle();
    }
    // Two refills of 30 ms (a slow host only makes it later).
    assert!(start.elapsed() >= std::time::Duration::from_millis(59));
    for seed in 11..=13 {
        assert_eq!(l.t.peer_recv(), Some(with_header(0, 0, &ether(100, seed))));
    }
    assert_eq!(l.net().counters().rx_frames, 3);
}
