//! One test on a real TAP. It needs /dev/net/tun and CAP_NET_ADMIN; where
//! the host lacks either it prints why and passes without checking (a unit
//! test cannot make the host provide them). Moving frames through the
//! kernel also needs `ip` (to bring the link up) and CAP_NET_RAW (for a
//! packet socket on the link); without them only the TAP's set-up is checked.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use super::super::{Net, NetError, Tap, VNET_HDR_LEN};
use super::rig::{ether, with_header, Rig, MAC};

#[test]
fn a_real_tap_carries_frames_both_ways() {
    let tap = match Tap::open("dmnet%d") {
        Ok(tap) => tap,
        Err(
            e @ (NetError::NoTunDevice(_)
            | NetError::OpenTun(_)
            | NetError::PermissionDenied { .. }),
        ) => {
            eprintln!("note: real-TAP test skipped, this host cannot create a TAP: {e}");
            return;
        }
        Err(e) => panic!("opening a TAP: {e}"),
    };
    let name = tap.name().to_owned();
    assert!(name.starts_with("dmnet"), "{name}");
    assert_eq!(tap.vnet_hdr_size().unwrap(), 12);
    let mut buf = [0u8; 64];
    let err = tap.read_frame(&mut buf).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "non-blocking");

    // The same TAP again by name is busy; a non-TAP name is refused.
    assert!(matches!(Tap::open(&name), Err(NetError::Busy { .. })));
    assert!(matches!(
        Tap::open("lo"),
        Err(NetError::NotATapInterface { .. })
    ));
    // By descriptor: a duplicate of ours is accepted and configured.
    let dup = tap.as_fd().try_clone_to_owned().unwrap();
    let by_fd = Tap::from_fd(dup).unwrap();
    assert_eq!(by_fd.name(), name);
    assert_eq!(by_fd.vnet_hdr_size().unwrap(), 12);
    drop(by_fd);

    let net = Net::with_tap(tap, MAC).unwrap();
    let (unused, _) = UnixDatagram::pair().unwrap();
    let mut t = Rig::with_net(net, unused);

    // Without IPv6 the kernel sends nothing on its own once the link is up.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let up = Command::new("ip")
        .args(["link", "set", "dev", &name, "up"])
        .status();
    if !matches!(up, Ok(s) if s.success()) {
        eprintln!("note: real-TAP frames not checked: `ip link set dev {name} up` failed");
        return;
    }
    let sock = match packet_socket(&name) {
        Ok(sock) => sock,
        Err(e) => {
            eprintln!("note: real-TAP frames not checked: no packet socket: {e}");
            return;
        }
    };

    // Guest to host: the TAP takes the header off; the link sees the frame.
    let mut out = ether(300, 0x51);
    out[..6].fill(0xff);
    out[6..12].copy_from_slice(&MAC);
    t.add_tx(&[&with_header(0, 0, &out)]);
    t.net.tx_pass();
    assert_eq!(t.net.counters().tx_frames, 1, "{:?}", t.net.counters());
    assert!(
        wait_for(|| recv_matching(&sock, &out)),
        "the frame never showed up on {name}"
    );

    // Host to guest: the TAP adds a header; the guest gets ours and the frame.
    let chains: Vec<_> = (0..8).map(|_| t.add_rx(&[2048])).collect();
    let into = ether(200, 0x52);
    // SAFETY: `into` is a live buffer of the length given.
    let sent = unsafe { libc::send(sock.as_raw_fd(), into.as_ptr().cast(), into.len(), 0) };
    assert_eq!(usize::try_from(sent).ok(), Some(into.len()));
    let found = wait_for(|| {
        t.net.rx_pass();
        (0..t.rxq.used_idx(&t.mem)).any(|i| {
            let (head, len) = t.rxq.used(&t.mem, i);
            let addr = chains
                .iter()
                .find(|(h, _)| u32::from(*h) == head)
                .map(|(_, a)| a[0])
                .unwrap();
            let got = t.read_guest(&[(addr, len as usize)]);
            got[..VNET_HDR_LEN] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
                && got[VNET_HDR_LEN..] == into[..]
        })
    });
    assert!(
        found,
        "the frame never reached the guest: {:?}",
        t.net.counters()
    );
}

/// Polls `f` for up to two seconds.
fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Reads every frame waiting on `sock`; whether one equals `want`.
fn recv_matching(sock: &OwnedFd, want: &[u8]) -> bool {
    let mut buf = vec![0u8; 70_000];
    loop {
        // SAFETY: `buf` is a live buffer of the length given.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            return false;
        };
        if buf[..n] == *want {
            return true;
        }
    }
}

/// A raw packet socket bound to interface `name`, seeing every protocol.
fn packet_socket(name: &str) -> io::Result<OwnedFd> {
    let all = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
    let cname = CString::new(name).unwrap();
    // SAFETY: `cname` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain socket creation; no memory of ours is involved.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(all),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid (plain integers).
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    addr.sll_protocol = all;
    addr.sll_ifindex = i32::try_from(index).unwrap();
    let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>()).unwrap();
    // SAFETY: `addr` is a sockaddr_ll of the length given, alive for the
    // call; bind only reads it.
    let ret = unsafe { libc::bind(sock.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}
