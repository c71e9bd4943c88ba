//! A guest-side AF_VSOCK tool for dormouse's vsock tests (busybox has no
//! vsock support). Cross-built as a static aarch64 binary and copied into
//! test guests.
//!
//! ```text
//! guest_vsock echo-server PORT                 echo every connection, forever
//! guest_vsock echo-report PORT                 the same, and print how each
//!                                              connection ended
//! guest_vsock send CID PORT BYTES [N] [PAR]    N rounds (default 1) of PAR
//!                                              parallel connections (default
//!                                              1), each sending BYTES and
//!                                              checking the echo
//! guest_vsock write CID PORT BYTES             one connection: sends BYTES
//!                                              (pattern seed 0), then closes
//! guest_vsock flood CID PORT N                 opens up to N connections and
//!                                              holds them, forever
//! guest_vsock serve PORT [DIR [READY_PORT [HOLD_MS]]]
//!                                              a session's service: one line in,
//!                                              one line out, per request; once
//!                                              listening, notifies host
//!                                              READY_PORT (an image's readiness,
//!                                              as `notify` does) and exits if
//!                                              that fails
//! guest_vsock notify CID PORT [HOLD_MS]        connects once and closes (an
//!                                              image's readiness signal); with
//!                                              HOLD_MS, first holds the
//!                                              connection that long and
//!                                              writes one byte on it
//! guest_vsock hostile SECONDS SEED             attacks every device through
//!                                              /dev/mem, as a fuzzer would
//!                                              (examples/common/hostile.rs)
//! ```
//!
//! `serve` answers each request line on a connection (files live in DIR,
//! default `/mnt`):
//! - `hit` -> `pid=<pid> count=<n>`: n counts every `hit` this process
//!   served, so a resumed session continues it;
//! - `put NAME TEXT` -> `ok`, once NAME holds TEXT and is fsynced;
//! - `get NAME` -> `text=<contents>` or `missing`;
//! - `random N` -> `random=<hex>`: N bytes of getrandom(2) (N <= 4096);
//! - `touch MIB` -> `touched=<MIB>`: (re)sizes one buffer to MIB MiB and
//!   writes every page of it (the same pages each time: MIB MiB dirtied);
//! - `mem SEED` -> `mem=<hex>`: applies soak step SEED to a 4 MiB buffer
//!   (`examples/common/workload.rs`) and answers the checksum of the whole
//!   buffer; `memsum` answers that checksum without writing;
//! - `append NAME SEED` -> `ok len=<n>`: appends soak block SEED to NAME and
//!   fsyncs it;
//! - `sum NAME` -> `sum=<hex> len=<n>` (or `missing`): drops NAME's cached
//!   pages, then reads it back from the disk and checksums it;
//! - anything else -> `error unknown request`.
//!
//! `echo-report` prints `@@vsock_end_<n>=<bytes echoed> <how>` when its n-th
//! connection (from 1) ends: `how` is `eof` (the peer closed or reset it,
//! read returned 0) or `error:<errno>` (a read or write failed).
//!
//! `send` prints `@@vsock=ok <connections> <bytes>` when every echo matched;
//! `write` prints `@@vsock_written=<bytes>` once it closed the connection;
//! `flood` prints `@@flood=<connected> <refused> <other errors>` once it
//! tried N times, then creates `/flood.done` and keeps the connections.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::thread;

#[path = "common/hostile.rs"]
mod hostile;
#[path = "common/workload.rs"]
mod workload;

/// A connected or listening vsock stream socket.
fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    // AF_VSOCK is 40: it fits sa_family_t.
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// sizeof(struct sockaddr_vm): 16 bytes.
#[allow(clippy::cast_possible_truncation)]
const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn connect(cid: u32, port: u32) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let fd = vsock_socket()?;
    let addr = address(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes for the call.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) })?;
    Ok(std::fs::File::from(fd))
}

/// Echoes one connection; returns the bytes echoed and how it ended.
fn echo(mut stream: std::fs::File) -> (u64, String) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoed = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (echoed, "eof".to_string()),
            Ok(n) => {
                if let Err(e) = stream.write_all(&buf[..n]) {
                    return (echoed, format!("error:{}", e.raw_os_error().unwrap_or(0)));
                }
                echoed += n as u64;
            }
            Err(e) => return (echoed, format!("error:{}", e.raw_os_error().unwrap_or(0))),
        }
    }
}

fn echo_server(port: u32, report: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = vsock_socket()?;
    let addr = address(libc::VMADDR_CID_ANY, port);
    // SAFETY: as in `connect`.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) })?;
    // SAFETY: listen(2) takes no pointers.
    check(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
    println!("@@vsock_listening={port}");
    let mut accepted = 0u64;
    loop {
        // SAFETY: null address arguments are allowed by accept(2).
        let conn =
            unsafe { libc::accept(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
        if conn < 0 {
            continue;
        }
        // SAFETY: `conn` is a fresh descriptor that nothing else owns.
        let stream = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(conn) });
        accepted += 1;
        let n = accepted;
        thread::spawn(move || {
            let (bytes, how) = echo(stream);
            if report {
                println!("@@vsock_end_{n}={bytes} {how}");
            }
        });
    }
}

/// A bound and listening vsock socket on `port`, any CID.
fn listen(port: u32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let fd = vsock_socket()?;
    let addr = address(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes for the call.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) })?;
    // SAFETY: listen(2) takes no pointers.
    check(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
    Ok(fd)
}

/// The session service behind `serve`: its state is this process's memory
/// (the counter, the touched buffers) and the files under `dir`.
struct Service {
    dir: std::path::PathBuf,
    hits: std::sync::atomic::AtomicU64,
    scratch: std::sync::Mutex<Vec<u8>>,
    soak: std::sync::Mutex<Vec<u8>>,
}

impl Service {
    fn answer(&self, line: &str) -> String {
        let mut words = line.splitn(3, ' ');
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        };
        match (words.next(), words.next(), words.next()) {
            (Some("hit"), None, None) => {
                let n = self.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                format!("pid={} count={n}", std::process::id())
            }
            (Some("put"), Some(name), text) if name_ok(name) => {
                let path = self.dir.join(name);
                let result = std::fs::File::create(&path).and_then(|mut f| {
                    f.write_all(text.unwrap_or("").as_bytes())?;
                    f.sync_all()
                });
                match result {
                    Ok(()) => "ok".into(),
                    Err(e) => format!("error {e}"),
                }
            }
            (Some("get"), Some(name), None) if name_ok(name) => {
                match std::fs::read_to_string(self.dir.join(name)) {
                    Ok(text) => format!("text={text}"),
                    Err(_) => "missing".into(),
                }
            }
            (Some("random"), Some(n), None) => match n.parse::<usize>() {
                Ok(n) if n <= 4096 => {
                    let mut buf = vec![0u8; n];
                    // SAFETY: `buf` is valid for writes of `n` bytes.
                    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), n, 0) };
                    if usize::try_from(got).ok() != Some(n) {
                        return "error getrandom".into();
                    }
                    let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
                    format!("random={hex}")
                }
                _ => "error bad size".into(),
            },
            (Some("touch"), Some(mib), None) => match mib.parse::<usize>() {
                Ok(mib) if mib <= 4096 => {
                    let Ok(mut scratch) = self.scratch.lock() else {
                        return "error poisoned".into();
                    };
                    scratch.resize(mib << 20, 0);
                    for page in scratch.chunks_mut(4096) {
                        page[0] = page[0].wrapping_add(1);
                    }
                    format!("touched={mib}")
                }
                _ => "error bad size".into(),
            },
            (Some("mem"), Some(seed), None) => match (seed.parse::<u64>(), self.soak.lock()) {
                (Ok(seed), Ok(mut buf)) => {
                    workload::mem_step(&mut buf, seed);
                    format!("mem={:016x}", workload::checksum(&buf))
                }
                _ => "error bad seed".into(),
            },
            (Some("memsum"), None, None) => match self.soak.lock() {
                Ok(mut buf) => {
                    buf.resize(workload::MEM_PAGES * 4096, 0);
                    format!("mem={:016x}", workload::checksum(&buf))
                }
                Err(_) => "error poisoned".into(),
            },
            (Some("append"), Some(name), Some(seed)) if name_ok(name) => {
                let Ok(seed) = seed.parse::<u64>() else {
                    return "error bad seed".into();
                };
                let result = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(self.dir.join(name))
                    .and_then(|mut f| {
                        f.write_all(&workload::file_block(seed))?;
                        f.sync_all()?;
                        f.metadata()
                    });
                match result {
                    Ok(meta) => format!("ok len={}", meta.len()),
                    Err(e) => format!("error {e}"),
                }
            }
            (Some("sum"), Some(name), None) if name_ok(name) => {
                use std::os::fd::AsRawFd;
                let Ok(mut file) = std::fs::File::open(self.dir.join(name)) else {
                    return "missing".into();
                };
                // Clean cached pages go, so the read below comes from the
                // disk (its data was fsynced by `append`).
                // SAFETY: posix_fadvise takes no pointers; `file` is open.
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                let mut bytes = Vec::new();
                match file.read_to_end(&mut bytes) {
                    Ok(n) => format!("sum={:016x} len={n}", workload::checksum(&bytes)),
                    Err(e) => format!("error {e}"),
                }
            }
            _ => "error unknown request".into(),
        }
    }
}

/// Connects to host `port` and closes; with `hold_ms`, first holds the
/// connection that long and writes one byte on it.
fn notify(cid: u32, port: u32, hold_ms: usize) -> io::Result<()> {
    let mut stream = connect(cid, port)?;
    if hold_ms > 0 {
        thread::sleep(std::time::Duration::from_millis(
            u64::try_from(hold_ms).unwrap_or(0),
        ));
        stream.write_all(b"r")?;
        println!("@@notify wrote after {hold_ms} ms");
    }
    Ok(())
}

fn serve(port: u32, dir: &str, ready_port: Option<u32>, hold_ms: usize) -> io::Result<()> {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let listener = listen(port)?;
    let service = std::sync::Arc::new(Service {
        dir: dir.into(),
        hits: Default::default(),
        scratch: Default::default(),
        soak: Default::default(),
    });
    println!("@@serving={port} pid={}", std::process::id());
    if let Some(ready) = ready_port {
        notify(libc::VMADDR_CID_HOST, ready, hold_ms)?;
    }
    loop {
        // SAFETY: null address arguments are allowed by accept(2).
        let conn = unsafe {
            libc::accept(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        if conn < 0 {
            continue;
        }
        // SAFETY: `conn` is a fresh descriptor that nothing else owns.
        let stream = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(conn) });
        let service = service.clone();
        thread::spawn(move || {
            let Ok(mut out) = stream.try_clone() else {
                return;
            };
            for line in io::BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                let reply = service.answer(line.trim_end());
                if writeln!(out, "{reply}").is_err() {
                    return;
                }
            }
        });
    }
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251).to_le_bytes()[0])
        .collect()
}

/// Sends `bytes` on a new connection and checks they come back.
fn round_trip(cid: u32, port: u32, bytes: usize, seed: usize) -> io::Result<()> {
    let stream = connect(cid, port)?;
    let mut reader = stream.try_clone()?;
    let data = pattern(seed, bytes);
    let sent = data.clone();
    let mut writer = stream;
    let sender = thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; bytes];
    reader.read_exact(&mut back)?;
    sender
        .join()
        .map_err(|_| io::Error::other("sender panicked"))??;
    if back != data {
        return Err(io::Error::other("echo differs from what was sent"));
    }
    Ok(())
}

fn send(cid: u32, port: u32, bytes: usize, rounds: usize, parallel: usize) -> io::Result<()> {
    for round in 0..rounds {
        let workers: Vec<_> = (0..parallel)
            .map(|p| thread::spawn(move || round_trip(cid, port, bytes, round * parallel + p)))
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| io::Error::other("worker panicked"))??;
        }
    }
    println!("@@vsock=ok {} {}", rounds * parallel, bytes);
    Ok(())
}

/// Sends `bytes` bytes of pattern 0 on one connection, then closes it.
fn write_and_close(cid: u32, port: u32, bytes: usize) -> io::Result<()> {
    let mut stream = connect(cid, port)?;
    stream.write_all(&pattern(0, bytes))?;
    drop(stream);
    println!("@@vsock_written={bytes}");
    Ok(())
}

/// Opens up to `n` connections one after another and holds them.
fn flood(cid: u32, port: u32, n: usize) -> io::Result<()> {
    // More fds than the default 1024, so the device's limit is what stops
    // the flood (root may raise its own limit).
    let want = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: setrlimit only reads the struct, which lives across the call.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) })?;
    let mut held = Vec::new();
    let (mut refused, mut other) = (0usize, 0usize);
    for _ in 0..n {
        match connect(cid, port) {
            Ok(s) => held.push(s),
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => refused += 1,
            Err(_) => other += 1,
        }
    }
    println!("@@flood={} {refused} {other}", held.len());
    std::fs::write("/flood.done", b"")?;
    loop {
        thread::park();
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: usize| -> usize {
        args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
    };
    let port = u32::try_from(num(1, 0)).unwrap_or(0);
    let result = match args.first().map(String::as_str) {
        Some("echo-server") => echo_server(port, false),
        Some("echo-report") => echo_server(port, true),
        Some("serve") => serve(
            port,
            args.get(2).map_or("/mnt", String::as_str),
            args.get(3).and_then(|p| p.parse().ok()),
            num(4, 0),
        ),
        Some("hostile") => hostile::run(
            args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10),
            args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1),
        ),
        Some("notify") => {
            let cid = u32::try_from(num(1, 2)).unwrap_or(2);
            let port = u32::try_from(num(2, 0)).unwrap_or(0);
            notify(cid, port, num(3, 0))
        }
        Some("send") => {
            let cid = u32::try_from(num(1, 2)).unwrap_or(2);
            let port = u32::try_from(num(2, 0)).unwrap_or(0);
            send(cid, port, num(3, 4096), num(4, 1), num(5, 1))
        }
        Some(cmd @ ("write" | "flood")) => {
            let cid = u32::try_from(num(1, 2)).unwrap_or(2);
            let port = u32::try_from(num(2, 0)).unwrap_or(0);
            if cmd == "write" {
                write_and_close(cid, port, num(3, 4096))
            } else {
                flood(cid, port, num(3, 1))
            }
        }
        _ => Err(io::Error::other(
            "usage: guest_vsock echo-server PORT | echo-report PORT | send CID PORT BYTES [ROUNDS] \
             [PARALLEL] | write CID PORT BYTES | flood CID PORT N | serve PORT [DIR [READY_PORT [HOLD_MS]]] \
             | notify CID PORT [HOLD_MS] | hostile SECONDS SEED",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("@@vsock=error {e}");
            ExitCode::FAILURE
        }
    }
}
