//! virtio-vsock driven by the guest's own vsock drivers: host-to-guest
//! (CONNECT <port> on the device's Unix socket) and guest-to-host
//! (`<uds_path>_<port>`) connections, 1 MiB echoed each way, 50 connections
//! in a row and 8 at once; only allowed host ports reachable; a guest that
//! closes after writing to a slow reader loses nothing; a host CONNECT
//! nobody answers times out; a guest flooding connections cannot starve
//! another VM of fds. Handed-in host sides (`vsock_handoff_*`): a
//! connection from `MicroVm::vsock_connect` with no socket, and a listener
//! the embedder owns across a suspend, whose backlog the restored VM
//! serves.
#![cfg(target_arch = "aarch64")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{fact, guest_assets, guest_initrd, modules, run_guest, Session, TempDir};
use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::devices::virtio::vsock::{VsockConfig, DEFAULT_CONNECT_TIMEOUT};
use dormouse::{ExitReason, MicroVm};

const GUEST_CID: u64 = 42;
const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 6000;
/// A host port with a listener that the guest is not allowed to reach.
const DENIED_PORT: u32 = 6001;
const SLOW_READER_PORT: u32 = 6002;
const FLOOD_PORT: u32 = 6003;
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

/// The Unix socket a guest connection to host port `port` goes to.
fn port_path(uds: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", uds.display()))
}

/// The pattern `guest_vsock write` sends (its seed 0).
fn guest_pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31) % 251).to_le_bytes()[0])
        .collect()
}

/// A host echo server on `<uds>_<HOST_PORT>` for guest-initiated streams.
fn host_echo_server(uds: &Path) -> PathBuf {
    let path = port_path(uds, HOST_PORT);
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
    let config = VsockConfig::default()
        .allow_host_port(HOST_PORT)
        .allow_host_port(SLOW_READER_PORT)
        .allow_host_port(FLOOD_PORT);
    vm_with(tmp, &[modules::VIRTIO_MMIO, modules::VSOCK], script, config)
}

fn vm_with(
    tmp: &Path,
    guest_modules: &[&[&str]],
    script: &str,
    config: VsockConfig,
) -> (dormouse::MicroVmBuilder, PathBuf) {
    let uds = tmp.join("vsock.sock");
    let builder = guest(tmp, guest_modules, script).vsock_with(GUEST_CID, &uds, config);
    (builder, uds)
}

/// A VM running `script` with the vsock tool, without a vsock device.
fn guest(tmp: &Path, guest_modules: &[&[&str]], script: &str) -> dormouse::MicroVmBuilder {
    let mut initrd_script = String::new();
    initrd_script.push_str(script);
    let initrd = {
        // The tool goes in /bin next to busybox.
        let path = guest_initrd(tmp, guest_modules, &initrd_script);
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
    MicroVm::builder()
        .vcpus(2)
        .memory_mib(256)
        .kernel(guest_assets().kernel)
        .initrd(initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
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
         guest_vsock send 2 {DENIED_PORT} 16 || echo @@denied=yes\n\
         poweroff -f\n"
    );
    let (builder, uds) = vm(&tmp.0, &script);
    host_echo_server(&uds);
    // A listener the configuration does not allow the guest to reach.
    let denied = UnixListener::bind(port_path(&uds, DENIED_PORT)).unwrap();
    denied.set_nonblocking(true).unwrap();
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
    // Something listens on the denied port, and the guest does not reach it.
    assert!(results[4].starts_with("error"), "console:\n{text}");
    assert_eq!(fact(&text, "denied"), "yes");
    assert_eq!(
        denied.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "a guest connection reached a port it is not allowed"
    );
}

#[test]
fn a_guest_closing_after_writing_to_a_slow_reader_loses_nothing() {
    let tmp = TempDir::new("vsock-drain");
    let script = format!(
        "echo @@ready\n\
         guest_vsock write 2 {SLOW_READER_PORT} {MIB}\n\
         read line\npoweroff -f\n"
    );
    let (builder, uds) = vm(&tmp.0, &script);
    let listener = UnixListener::bind(port_path(&uds, SLOW_READER_PORT)).unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let reader = {
        let progress = progress.clone();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            // A slow reader: 8 KiB every 8 ms (at most ~1 MB/s).
            let mut all = Vec::new();
            let mut buf = vec![0u8; 8192];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Ok(all),
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(format!("{e} after {} bytes", all.len())),
                }
                progress.store(all.len(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(8));
            }
        })
    };
    let in_flight = Arc::new(Mutex::new(None));
    let (exit, text) = run_guest(builder, |console| {
        let start = Instant::now();
        while !console.text().contains("@@vsock_written=") {
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "the guest never closed:\n{}",
                console.text()
            );
            thread::sleep(Duration::from_millis(20));
        }
        // The guest has closed; what the reader has not had yet drains.
        *in_flight.lock().unwrap() = Some(MIB - progress.load(Ordering::Relaxed));
        while !reader.is_finished() {
            assert!(start.elapsed() < Duration::from_secs(600));
            thread::sleep(Duration::from_millis(20));
        }
    });
    assert_eq!(exit, ExitReason::Shutdown, "console:\n{text}");
    assert_eq!(fact(&text, "vsock_written"), MIB.to_string());
    let got = reader
        .join()
        .unwrap()
        .expect("the host stream ends cleanly");
    let in_flight = in_flight.lock().unwrap().expect("measured");
    common::report(&format!(
        "virtio-vsock: guest closed with {in_flight} of {MIB} bytes not yet read by the host; all drained"
    ));
    assert!(
        in_flight > 0,
        "the reader had everything before the guest closed: nothing was left to drain"
    );
    assert_eq!(got.len(), MIB, "bytes lost");
    assert!(got == guest_pattern(MIB), "bytes differ");
}

#[test]
fn an_unanswered_host_connect_times_out() {
    let tmp = TempDir::new("vsock-timeout");
    // No vsock driver in the guest: nobody ever answers a CONNECT.
    let (builder, uds) = vm_with(
        &tmp.0,
        &[modules::VIRTIO_MMIO],
        "echo @@ready\nread line\npoweroff -f\n",
        VsockConfig::default(),
    );
    let (exit, text) = run_guest(builder, |_| {
        let mut stream = UnixStream::connect(&uds).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let start = Instant::now();
        writeln!(stream, "CONNECT {GUEST_PORT}").unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let took = start.elapsed();
        common::report(&format!(
            "virtio-vsock: an unanswered CONNECT was closed after {:.2} s (timeout {:?})",
            took.as_secs_f64(),
            DEFAULT_CONNECT_TIMEOUT
        ));
        assert!(answer.is_empty(), "answered {answer:?}");
        // Not before the timeout, and not much after (emulation is slow).
        assert!(
            took >= DEFAULT_CONNECT_TIMEOUT - Duration::from_millis(50),
            "{took:?}"
        );
        assert!(
            took < DEFAULT_CONNECT_TIMEOUT + Duration::from_secs(8),
            "{took:?}"
        );
    });
    assert_eq!(exit, ExitReason::Shutdown, "console:\n{text}");
}

/// Lowers this process's soft RLIMIT_NOFILE to at most `max`, so that an
/// unlimited flood would exhaust it whatever the environment's default.
fn lower_nofile(max: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = lim.rlim_cur.min(max);
    // SAFETY: setrlimit reads only the struct we pass.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    lim.rlim_cur
}

#[test]
fn a_connection_flood_cannot_stop_another_vm_from_building() {
    const ATTEMPTS: usize = 1500;
    let soft = lower_nofile(1024);
    let tmp = TempDir::new("vsock-flood");
    let script = format!(
        "guest_vsock flood 2 {FLOOD_PORT} {ATTEMPTS} &\n\
         while [ ! -e /flood.done ]; do sleep 1; done\n\
         echo @@ready\nread line\npoweroff -f\n"
    );
    // Default limits: only the port is configured.
    let (builder, uds) = vm_with(
        &tmp.0,
        &[modules::VIRTIO_MMIO, modules::VSOCK],
        &script,
        VsockConfig::default().allow_host_port(FLOOD_PORT),
    );
    // The host accepts every connection and holds it: each costs this
    // process two fds (the device's and this one).
    let listener = UnixListener::bind(port_path(&uds, FLOOD_PORT)).unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = held.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => held.lock().unwrap().push(s),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }
    let (exit, text) = run_guest(builder, |console| {
        let flood = fact(&console.text(), "flood");
        let counts: Vec<usize> = flood.split(' ').map(|n| n.parse().unwrap()).collect();
        let (connected, refused) = (counts[0], counts[1]);
        // While A holds its connections, B is built and boots.
        let tmp_b = TempDir::new("vsock-flood-b");
        let initrd = guest_initrd(&tmp_b.0, &[], "echo @@ready\nread line\npoweroff -f\n");
        let b = MicroVm::builder()
            .vcpus(1)
            .memory_mib(128)
            .kernel(guest_assets().kernel)
            .initrd(initrd)
            .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
            .vsock(GUEST_CID + 1, tmp_b.0.join("b.sock"));
        let (exit_b, text_b) = run_guest(b, |_| {});
        assert_eq!(exit_b, ExitReason::Shutdown, "VM B console:\n{text_b}");
        let accepted = held.lock().unwrap().len();
        common::report(&format!(
            "virtio-vsock flood: soft RLIMIT_NOFILE {soft}, {ATTEMPTS} guest connects: \
             {connected} connected, {refused} refused, {accepted} held by the host; VM B booted"
        ));
        assert!(refused > 0, "the flood was never refused: {flood}");
        assert!(connected > 0, "no connection at all: {flood}");
        assert!(
            2 * connected < usize::try_from(soft).unwrap() / 2,
            "the device held {connected} connections with a soft fd limit of {soft}"
        );
    });
    assert_eq!(exit, ExitReason::Shutdown, "console:\n{text}");
}

/// The guest of the hand-off tests: an echo server on `GUEST_PORT`, then
/// it waits for a console line and powers off.
fn echo_guest() -> String {
    format!(
        "guest_vsock echo-server {GUEST_PORT} &\nsleep 1\necho @@ready=yes\nread line\npoweroff -f\n"
    )
}
const MINUTE: Duration = Duration::from_secs(60);

/// Sends `data` on `stream` (from another thread) and reads its echo.
fn echo_on(stream: UnixStream, data: &[u8]) -> Vec<u8> {
    stream.set_read_timeout(Some(MINUTE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sent = data.to_vec();
    let sender = thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut back = vec![0u8; data.len()];
    let mut reader = stream;
    reader.read_exact(&mut back).unwrap();
    sender.join().unwrap();
    back
}

/// Whether the stream ends (EOF or reset) without a byte.
fn ends_empty(mut stream: UnixStream) -> bool {
    stream.set_read_timeout(Some(MINUTE)).unwrap();
    let mut b = [0u8; 1];
    match stream.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn vsock_handoff_connect_reaches_a_guest_port_with_no_socket() {
    let tmp = TempDir::new("vsock-handoff-connect");
    let (builder, _uds) = vm(&tmp.0, &echo_guest());
    let (mut session, input) = Session::new();
    let mut vm = builder
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    vm.start().unwrap();
    session.wait_fact("ready", 10 * MINUTE);

    let data = pattern(7, MIB);
    let start = Instant::now();
    let stream = vm.vsock_connect(GUEST_PORT).unwrap();
    assert!(echo_on(stream, &data) == data, "the echo differs");
    common::report(&format!(
        "virtio-vsock vsock_connect echo of 1 MiB: {:.2} s",
        start.elapsed().as_secs_f64()
    ));
    // Nobody listens on this port: the guest refuses, the stream ends.
    assert!(ends_empty(vm.vsock_connect(GUEST_PORT + 1).unwrap()));

    // On a paused VM the connection waits, and is served after resume.
    vm.pause().unwrap();
    let waiting = vm.vsock_connect(GUEST_PORT).unwrap();
    (&waiting).write_all(b"made while paused").unwrap();
    vm.resume().unwrap();
    let mut back = [0u8; 17];
    waiting.set_read_timeout(Some(MINUTE)).unwrap();
    (&waiting).read_exact(&mut back).unwrap();
    assert_eq!(&back, b"made while paused");

    session.send("done");
    assert_eq!(vm.wait().unwrap(), ExitReason::Shutdown);
    assert!(
        matches!(
            vm.vsock_connect(GUEST_PORT),
            Err(dormouse::Error::AlreadyStopped(ExitReason::Shutdown))
        ),
        "a stopped VM takes no connection"
    );

    // A VM without a vsock device says so.
    let plain = guest(&tmp.0, &[], "poweroff -f\n").build().unwrap();
    let err = plain.vsock_connect(GUEST_PORT).unwrap_err();
    assert!(
        matches!(
            err,
            dormouse::Error::VsockConnect(
                dormouse::devices::virtio::vsock::VsockConnectError::NoDevice
            )
        ),
        "{err:?}"
    );
}

#[test]
fn vsock_handoff_listener_serves_its_backlog_after_a_restore() {
    let tmp = TempDir::new("vsock-handoff-listener");
    let path = tmp.0.join("owned.sock");
    let snap = tmp.0.join("snap");
    let listener = UnixListener::bind(&path).unwrap();
    // Generous: the restored guest must handle the transport reset first.
    let config = VsockConfig {
        connect_timeout: MINUTE,
        ..VsockConfig::default()
    };
    let (session, input) = Session::new();
    let mut vm = guest(
        &tmp.0,
        &[modules::VIRTIO_MMIO, modules::VSOCK],
        &echo_guest(),
    )
    .vsock_listener(GUEST_CID, listener.try_clone().unwrap(), config)
    .serial_output(session.console.clone())
    .serial_input(input)
    .build()
    .unwrap();
    // The snapshot records the listener's path.
    assert!(
        matches!(
            &vm.config().devices[..],
            [dormouse::snapshot::SavedDevice::Vsock { uds_path, .. }] if *uds_path == path
        ),
        "{:?}",
        vm.config().devices
    );
    vm.start().unwrap();
    session.wait_fact("ready", 10 * MINUTE);
    // The listener serves CONNECT as a socket path does.
    let stream = connect_to_guest(&path, GUEST_PORT);
    assert_eq!(echo_on(stream, b"before"), b"before");
    vm.pause().unwrap();
    vm.snapshot(&snap).unwrap();
    drop(vm);
    assert!(path.exists(), "the VM removed its owner's socket path");

    // No VM exists: the client's connect succeeds into the backlog.
    let mut client = UnixStream::connect(&path).unwrap();
    client.set_read_timeout(Some(MINUTE)).unwrap();
    write!(client, "CONNECT {GUEST_PORT}\nwaited in the backlog").unwrap();

    let (mut session, input) = Session::new();
    let start = Instant::now();
    let mut vm = MicroVm::restore(&snap)
        .vsock_listener(listener.try_clone().unwrap())
        .serial_output(session.console.clone())
        .serial_input(input)
        .resume(true)
        .build()
        .unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        client.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(line.starts_with("OK "), "handshake answered {line:?}");
    let mut back = [0u8; 21];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"waited in the backlog");
    common::report(&format!(
        "virtio-vsock: a client that waited in the backlog was served {:.2} s after the restore began",
        start.elapsed().as_secs_f64()
    ));
    session.send("done");
    assert_eq!(vm.wait().unwrap(), ExitReason::Shutdown);
    drop(vm);
    assert!(path.exists());
}
