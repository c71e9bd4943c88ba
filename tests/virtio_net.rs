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
use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::devices::virtio::net::TapConfig;
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
        .net_with_mac(TapConfig::Fd(tap_fd), [0x06, 0, 0, 0, 0, 0x42]);

    let (exit, text) = run_guest(builder, |_| {
        // Guest to host: exactly the file's bytes.
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(300)))
            .unwrap();
        let mut received = vec![0u8; FILE_LEN];
        conn.read_exact(&mut received).unwrap();
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
}
