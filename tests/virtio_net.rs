//! virtio-net driven by the guest's own virtio_net driver, on a TAP in a
//! network namespace of its own inside the (emulated) host: the guest
//! configures eth0, pings the host end, and moves a file each way over TCP
//! with busybox nc, bytes verified.
#![cfg(target_arch = "aarch64")]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::{fact, guest_assets, guest_initrd, isolated_tap, modules, run_guest, TempDir};
use dormouse::builder::{NetConfig, DEFAULT_CMDLINE};
use dormouse::devices::virtio::net::TapConfig;
use dormouse::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use dormouse::{ExitReason, MicroVm};

const HOST_IP: &str = "10.200.0.1";
const GUEST_IP: &str = "10.200.0.2";
const FILE_LEN: usize = 1 << 20;

fn payload() -> Vec<u8> {
    (0..FILE_LEN)
        .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
        .collect()
}

#[test]
fn the_guest_pings_the_host_and_moves_files_over_tcp() {
    transfer(
        RateLimiterConfig::unlimited(),
        RateLimiterConfig::unlimited(),
    );
}

#[test]
fn rate_limited_frames_hold_the_guest_to_its_bandwidth() {
    // 128 KiB/s each way, 12.8 KiB at once: the 1 MiB file takes 8 s.
    const RATE: u64 = 128 << 10;
    let limits = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig::new(RATE / 10, 100)),
        ops: None,
    };
    let g2h = transfer(limits, limits);
    let secs = g2h.as_secs_f64();
    // Frames carry the file plus TCP/IP headers; the bucket was at most
    // full when the transfer began. A slow host only makes it slower.
    #[allow(clippy::cast_precision_loss)]
    let least = (FILE_LEN as u64 - RATE / 10) as f64 / RATE as f64;
    #[allow(clippy::cast_precision_loss)]
    let achieved = FILE_LEN as f64 / 1024.0 / secs;
    common::report(&format!(
        "virtio-net limited to 128 KiB/s: guest sent 1 MiB in {secs:.2} s = {achieved:.1} KiB/s"
    ));
    assert!(
        secs >= least - 0.3,
        "1 MiB sent in {secs:.2} s through a 128 KiB/s limit"
    );
}

/// The ping and a 1 MiB file each way, through an interface with these
/// limits; returns how long the guest-to-host file took.
fn transfer(rx: RateLimiterConfig, tx: RateLimiterConfig) -> Duration {
    let tmp = TempDir::new("net");
    let tap = isolated_tap("dmtap0", &format!("{HOST_IP}/24"));
    let data = payload();
    // The guest's copy of the file rides in its initramfs.
    let script = format!(
        r#"
ip addr add {GUEST_IP}/24 dev eth0
ip link set eth0 up
echo "@@mac=$(cat /sys/class/net/eth0/address)"
if ping -c 3 -W 5 {HOST_IP} >/dev/null; then echo "@@ping=ok"; else echo "@@ping=failed"; fi
(nc -l -p 7001 > /tmp/in; if cmp -s /tmp/in /payload.bin; then echo "@@h2g=ok"; else echo "@@h2g=differs $(wc -c < /tmp/in)"; fi) &
sleep 1
echo @@ready
nc {HOST_IP} 7000 < /payload.bin
read line
wait
poweroff -f
"#
    );
    let initrd = guest_initrd(&tmp.0, &[modules::VIRTIO_MMIO, modules::NET], &script);
    let mut cpio = std::fs::read(&initrd).unwrap();
    let mut extra = common::initramfs::Initramfs::new();
    extra.file("payload.bin", 0o644, &data);
    let extra_path = extra.write_to(&tmp.0, "payload.cpio").unwrap();
    cpio.extend_from_slice(&std::fs::read(extra_path).unwrap());
    std::fs::write(&initrd, cpio).unwrap();

    let listener = TcpListener::bind((HOST_IP, 7000)).unwrap();
    let tap_fd = tap.as_fd().try_clone_to_owned().unwrap();
    let builder = MicroVm::builder()
        .memory_mib(256)
        .kernel(guest_assets().kernel)
        .initrd(&initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
        .net_with(
            NetConfig::new(TapConfig::Fd(tap_fd))
                .mac([0x06, 0, 0, 0, 0, 0x42])
                .rx_rate_limiter(rx)
                .tx_rate_limiter(tx),
        );

    let mut g2h = Duration::ZERO;
    let (exit, text) = run_guest(builder, |_| {
        // Guest to host: exactly the file's bytes.
        let (mut conn, _) = listener.accept().unwrap();
        let start = Instant::now();
        conn.set_read_timeout(Some(Duration::from_secs(300)))
            .unwrap();
        let mut received = vec![0u8; FILE_LEN];
        conn.read_exact(&mut received).unwrap();
        g2h = start.elapsed();
        assert!(received == data, "the file the guest sent differs");
        drop(conn);

        // Host to guest: connect once the guest's nc listens.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut stream = loop {
            match TcpStream::connect((GUEST_IP, 7001)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("connecting to the guest: {e}"),
            }
        };
        stream.write_all(&data).unwrap();
    });
    drop(tap);
    assert_eq!(exit, ExitReason::Shutdown, "console:\n{text}");
    assert_eq!(fact(&text, "mac"), "06:00:00:00:00:42");
    assert_eq!(fact(&text, "ping"), "ok", "console:\n{text}");
    assert_eq!(fact(&text, "h2g"), "ok", "console:\n{text}");
    g2h
}
