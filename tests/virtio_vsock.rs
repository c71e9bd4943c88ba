//! virtio-vsock driven by the guest's own vsock drivers: host-to-guest
//! (CONNECT <port> on the device's Unix socket) and guest-to-host
//! (`<uds_path>_<port>`) connections, 1 MiB echoed each way, 50 connections
//! in a row and 8 at once.
#![cfg(target_arch = "aarch64")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;

use common::{fact, guest_assets, guest_initrd, modules, run_guest, TempDir};
use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::{ExitReason, MicroVm};

const GUEST_CID: u64 = 42;
const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 6000;
const MIB: usize = 1 << 20;

fn vsock_tool() -> Vec<u8> {
    let path = std::env::var_os("DORMOUSE_GUEST_VSOCK_TOOL")
        .expect("DORMOUSE_GUEST_VSOCK_TOOL is not set: run the tests with `cargo xtask test`");
    std::fs::read(&path).unwrap()
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 17 + seed * 13) % 253).to_le_bytes()[0])
        .collect()
}

/// Connects to the guest's port through the device's Unix socket.
fn connect_to_guest(uds: &Path, port: u32) -> UnixStream {
    let mut stream = UnixStream::connect(uds).expect("connecting to the vsock socket");
    writeln!(stream, "CONNECT {port}").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "handshake answered {line:?}");
    // A BufReader could hold bytes past the line; the guest sends nothing
    // before it receives, so none were read.
    stream
}

/// Sends `len` bytes to the guest's echo server and checks the echo.
fn echo_through_guest(uds: &Path, len: usize, seed: usize) {
    let stream = connect_to_guest(uds, GUEST_PORT);
    let mut reader = stream.try_clone().unwrap();
    let data = pattern(seed, len);
    let sent = data.clone();
    let mut writer = stream;
    let sender = thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut back = vec![0u8; len];
    reader.read_exact(&mut back).unwrap();
    sender.join().unwrap();
    assert!(back == data, "echo {seed} differs");
}

/// A host echo server on `<uds>_<HOST_PORT>` for guest-initiated streams.
fn host_echo_server(uds: &Path) -> PathBuf {
    let path = PathBuf::from(format!("{}_{HOST_PORT}", uds.display()));
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    path
}

fn vm(tmp: &Path, script: &str) -> (dormouse::MicroVmBuilder, PathBuf) {
    let mut initrd_script = String::new();
    initrd_script.push_str(script);
    let initrd = {
        // The tool goes in /bin next to busybox.
        let path = guest_initrd(tmp, &[modules::VIRTIO_MMIO, modules::VSOCK], &initrd_script);
        let mut cpio = std::fs::read(&path).unwrap();
        // Append a second archive holding the tool: the kernel unpacks
        // concatenated newc archives in order.
        let mut extra = common::initramfs::Initramfs::new();
        extra.file("bin/guest_vsock", 0o755, &vsock_tool());
        let extra_path = extra.write_to(tmp, "tool.cpio").unwrap();
        cpio.extend_from_slice(&std::fs::read(extra_path).unwrap());
        std::fs::write(&path, cpio).unwrap();
        path
    };
    let uds = tmp.join("vsock.sock");
    let builder = MicroVm::builder()
        .vcpus(2)
        .memory_mib(256)
        .kernel(guest_assets().kernel)
        .initrd(initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
        .vsock(GUEST_CID, &uds);
    (builder, uds)
}

#[test]
fn host_to_guest_streams() {
    let tmp = TempDir::new("vsock-h2g");
    let script = format!(
        "guest_vsock echo-server {GUEST_PORT} &\n\
         sleep 1\necho @@ready\nread line\npoweroff -f\n"
    );
    let (builder, uds) = vm(&tmp.0, &script);
    let (exit, text) = run_guest(builder, |_| {
        let start = std::time::Instant::now();
        echo_through_guest(&uds, 4 * MIB, 0);
        let secs = start.elapsed().as_secs_f64();
        common::report(&format!(
            "virtio-vsock host->guest->host echo of 4 MiB: {secs:.2} s, {:.1} MiB/s each way",
            4.0 / secs
        ));
        for i in 0..50 {
            echo_through_guest(&uds, 4096, i + 1);
        }
        let parallel: Vec<_> = (0..8)
            .map(|i| {
                let uds = uds.clone();
                thread::spawn(move || echo_through_guest(&uds, 256 * 1024, 100 + i))
            })
            .collect();
        for p in parallel {
            p.join().unwrap();
        }
    });
    assert_eq!(exit, ExitReason::Shutdown, "console:\n{text}");
    assert_eq!(fact(&text, "vsock_listening"), GUEST_PORT.to_string());
}

#[test]
fn guest_to_host_streams() {
    let tmp = TempDir::new("vsock-g2h");
    let script = format!(
        "guest_vsock send 2 {HOST_PORT} {MIB}\n\
         guest_vsock send 2 {HOST_PORT} 4096 50 1\n\
         guest_vsock send 2 {HOST_PORT} 262144 1 8\n\
         guest_vsock send 2 7777 16 || echo @@refused=yes\n\
         poweroff -f\n"
    );
    let (builder, uds) = vm(&tmp.0, &script);
    host_echo_server(&uds);
    let (exit, text) = run_guest(builder, |_| {});
    assert_eq!(exit, ExitReason::Shutdown, "console:\n{text}");
    let results: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .split_once("@@vsock=")
                .map(|(_, v)| v)
        })
        .collect();
    assert_eq!(
        results[..3],
        [format!("ok 1 {MIB}").as_str(), "ok 50 4096", "ok 8 262144"],
        "console:\n{text}"
    );
    // Nothing listens on host port 7777: the guest's connect is refused.
    assert!(results[3].starts_with("error"), "console:\n{text}");
    assert_eq!(fact(&text, "refused"), "yes");
}
