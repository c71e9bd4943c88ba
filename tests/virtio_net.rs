//! virtio-net driven by the guest's own virtio_net driver, on a TAP in a
//! network namespace of its own inside the (emulated) host: the guest
//! configures eth0, pings the host end, and moves a file each way over TCP
//! with busybox nc, bytes verified.
#![cfg(target_arch = "aarch64")]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fact, guest_assets, guest_initrd, modules, run_guest, TempDir};
use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::devices::virtio::net::{Tap, TapConfig};
use dormouse::{ExitReason, MicroVm};

const HOST_IP: &str = "10.200.0.1";
const GUEST_IP: &str = "10.200.0.2";
const FILE_LEN: usize = 1 << 20;

fn busybox(args: &[&str]) {
    let bb = std::env::var_os("DORMOUSE_GUEST_BUSYBOX").expect("DORMOUSE_GUEST_BUSYBOX");
    let status = Command::new(&bb).args(args).status().unwrap();
    assert!(status.success(), "busybox {args:?} failed: {status}");
}

fn payload() -> Vec<u8> {
    (0..FILE_LEN)
        .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
        .collect()
}

/// Moves this test into a network namespace of its own (the thread, and
/// every thread and process it starts from now on) with a fresh TAP.
fn isolated_tap(name: &str) -> Tap {
    // The TAP driver, from the same kernel's modules (already loaded is fine).
    let modules = std::env::var_os("DORMOUSE_GUEST_MODULES").expect("DORMOUSE_GUEST_MODULES");
    let tun = std::path::Path::new(&modules).join("kernel/drivers/net/tun.ko");
    let bb = std::env::var_os("DORMOUSE_GUEST_BUSYBOX").expect("DORMOUSE_GUEST_BUSYBOX");
    let _ = Command::new(&bb).arg("insmod").arg(&tun).status();
    // SAFETY: unshare(2) takes no pointers; it only changes this thread's
    // network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    busybox(&["ip", "link", "set", "lo", "up"]);
    let tap = Tap::open(name).expect("opening the TAP");
    busybox(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", name]);
    busybox(&["ip", "link", "set", name, "up"]);
    tap
}

#[test]
fn the_guest_pings_the_host_and_moves_files_over_tcp() {
    let tmp = TempDir::new("net");
    let tap = isolated_tap("dmtap0");
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
