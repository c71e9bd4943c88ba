//! What the transport sees: type, features, config space, activation.

use std::sync::Arc;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS};
use vm_memory::GuestAddress;

use super::super::{Net, NetError, Tap};
use super::rig::{device, Rig, MAC};
use virtio_queue::QueueT;

use crate::devices::virtio::{ActivateError, Interrupt, Queue, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::EventFdTrigger;
use crate::memory::GuestMemoryMmap;

#[test]
fn identifies_as_virtio_net_with_two_queues() {
    let (net, _peer) = device();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    assert_eq!(net.queue_events().len(), 2);
    assert_eq!(net.tap_name(), "test-tap");
    assert_eq!(net.mac(), MAC);
}

#[test]
fn offers_version_1_mac_and_status_and_no_offload() {
    let (mut net, _peer) = device();
    let expected = VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS);
    // Not CSUM (0), GUEST_CSUM (1), GUEST_TSO4/6 (7, 8), HOST_TSO4/6 (11,
    // 12), MRG_RXBUF (15), nor anything else.
    assert_eq!(net.device_features(), expected);
    net.set_acked_features(u64::MAX);
    assert_eq!(net.acked_features(), expected);
}

#[test]
fn config_space_holds_the_mac_and_link_up() {
    let (mut net, _peer) = device();
    let mut b = [0u8; 6];
    net.read_config(0, &mut b);
    assert_eq!(b, MAC);
    let mut s = [0u8; 2];
    net.read_config(6, &mut s);
    assert_eq!(u16::from_le_bytes(s), 1, "VIRTIO_NET_S_LINK_UP");
    // Byte by byte, as some drivers read.
    for (i, &m) in MAC.iter().enumerate() {
        let mut one = [0u8];
        net.read_config(u64::try_from(i).unwrap(), &mut one);
        assert_eq!(one[0], m);
    }
    // Out of range: zeros.
    for (offset, len) in [(7u64, 4usize), (8, 1), (0x1000, 4), (u64::MAX, 2)] {
        let mut b = vec![0xffu8; len];
        net.read_config(offset, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{offset:#x}+{len}");
    }
    // Writes do not change the MAC.
    net.write_config(0, &[0xff; 6]);
    net.write_config(u64::MAX, &[1]);
    let mut b = [0u8; 6];
    net.read_config(0, &mut b);
    assert_eq!(b, MAC);
}

#[test]
fn multicast_and_zero_macs_are_refused() {
    for mac in [[0x01, 0, 0x5e, 0, 0, 1], [0; 6], [0xff; 6]] {
        let (ours, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let tap = Tap::from_frame_socket(ours.into(), "t").unwrap();
        let err = Net::with_tap(tap, mac).unwrap_err();
        assert!(
            matches!(err, NetError::InvalidMac(m) if m == mac),
            "{err:?}"
        );
        assert!(err.to_string().contains("unicast"), "{err}");
    }
}

#[test]
fn activation_needs_exactly_two_queues_and_kicks_both() {
    let (mut net, _peer) = device();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
    let q = || Queue::new(256).unwrap();
    for (queues, bad) in [(vec![], 0), (vec![q()], 1), (vec![q(), q(), q()], 2)] {
        match net.activate(mem.clone(), irq.clone(), queues) {
            Err(ActivateError::BadQueue(i)) => assert_eq!(i, bad),
            other => panic!("{other:?}"),
        }
        assert!(!net.is_activated());
    }
    net.activate(mem, irq, vec![q(), q()]).unwrap();
    assert!(net.is_activated());
    for evt in net.queue_events() {
        assert_eq!(evt.read().unwrap(), 1);
    }
}

#[test]
fn reset_forgets_the_queues_and_the_failure() {
    let mut t = Rig::new();
    t.rxq.set_avail_idx(&t.mem, 999);
    t.peer_send(&super::rig::with_header(0, 0, &super::rig::ether(60, 1)));
    t.net.rx_pass();
    assert!(t.net.needs_reset());
    t.net.reset();
    assert!(!t.net.needs_reset());
    assert!(!t.net.is_activated());
    assert_eq!(t.net.acked_features(), 0);
}
