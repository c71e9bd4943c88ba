//! Host endpoints of a session: listening sockets the session (not its
//! VM) owns, so they stay open while the session is suspended. Each
//! accepted client is held while the session resumes, then forwarded to a
//! guest vsock port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{files, SessionError};
use crate::seccomp::{ThreadFilters, ThreadKind};

/// Where clients reach a session, and the guest vsock port they reach.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Endpoint {
    /// A TCP listener. Port 0 picks a free port at launch, which the
    /// session then keeps (also across a host restart).
    Tcp {
        /// The address to listen on.
        addr: SocketAddr,
        /// The guest vsock port.
        guest_port: u32,
    },
    /// A Unix stream socket, created `0600`.
    Unix {
        /// The socket's path.
        path: PathBuf,
        /// The guest vsock port.
        guest_port: u32,
    },
}

impl Endpoint {
    /// A TCP endpoint on `127.0.0.1:port` (0: any free port).
    pub fn loopback(port: u16, guest_port: u32) -> Self {
        Endpoint::Tcp {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            guest_port,
        }
    }

    /// A TCP endpoint on `addr`. Endpoints not on a loopback address need
    /// [`SessionConfig::allow_non_loopback`](super::SessionConfig::allow_non_loopback).
    pub fn tcp(addr: SocketAddr, guest_port: u32) -> Self {
        Endpoint::Tcp { addr, guest_port }
    }

    /// A Unix socket endpoint at `path`.
    pub fn unix(path: impl Into<PathBuf>, guest_port: u32) -> Self {
        Endpoint::Unix {
            path: path.into(),
            guest_port,
        }
    }

    /// The guest vsock port this endpoint forwards to.
    pub fn guest_port(&self) -> u32 {
        match self {
            Endpoint::Tcp { guest_port, .. } | Endpoint::Unix { guest_port, .. } => *guest_port,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { addr, guest_port } => write!(f, "tcp {addr} -> vsock {guest_port}"),
            Endpoint::Unix { path, guest_port } => {
                write!(f, "unix {} -> vsock {guest_port}", path.display())
            }
        }
    }
}

/// A bound listener.
pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// An accepted client.
pub(super) enum Client {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Client::Tcp(s) => s.as_fd(),
            Client::Unix(s) => s.as_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Client::Tcp(s) => s.read(buf),
            Client::Unix(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Client::Tcp(s) => s.write_all(buf),
            Client::Unix(s) => s.write_all(buf),
        }
    }

    fn shutdown(&self, how: std::net::Shutdown) {
        let _ = match self {
            Client::Tcp(s) => s.shutdown(how),
            Client::Unix(s) => s.shutdown(how),
        };
    }
}

impl Listener {
    /// Binds `endpoint`: TCP on loopback unless `allow_non_loopback`, Unix
    /// sockets `0600` (a stale socket file left by a dead process is
    /// replaced; anything else at the path is an error). Returns the
    /// endpoint as bound (a TCP port 0 replaced by the real one).
    pub(super) fn bind(
        endpoint: &Endpoint,
        allow_non_loopback: bool,
    ) -> Result<(Listener, Endpoint), SessionError> {
        let in_use = |source: std::io::Error| SessionError::EndpointInUse {
            endpoint: endpoint.to_string(),
            source,
        };
        let listener = match endpoint {
            Endpoint::Tcp { addr, guest_port } => {
                if !addr.ip().is_loopback() && !allow_non_loopback {
                    return Err(SessionError::Config(format!(
                        "endpoint {endpoint} is not on a loopback address: use \
                         SessionConfig::allow_non_loopback(true) to expose a session beyond this host"
                    )));
                }
                let l = TcpListener::bind(addr).map_err(in_use)?;
                let bound = l.local_addr().map_err(in_use)?;
                (
                    Listener::Tcp(l),
                    Endpoint::Tcp {
                        addr: bound,
                        guest_port: *guest_port,
                    },
                )
            }
            Endpoint::Unix { path, .. } => {
                remove_stale_socket(path).map_err(in_use)?;
                // 0600 from the start: the umask covers the window between
                // bind and chmod.
                let l = with_umask(0o177, || UnixListener::bind(path)).map_err(in_use)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(files::io("set the mode of", path))?;
                (Listener::Unix(l, path.clone()), endpoint.clone())
            }
        };
        match &listener.0 {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
        .map_err(in_use)?;
        Ok(listener)
    }

    fn accept(&self) -> std::io::Result<Client> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Client::Tcp(s)
            }),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Client::Unix(s)),
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Replaces a Unix socket file nobody listens on; refuses anything else.
fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => Err(std::io::Error::from(std::io::ErrorKind::AddrInUse)),
            Err(_) => std::fs::remove_file(path),
        },
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a file that is not a socket is at that path",
        )),
    }
}

fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask(2) only swaps the process's file mode mask.
    let old = unsafe { libc::umask(mask) };
    let out = f();
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    out
}

/// What the accept loop and the pumps need from their session.
pub(super) trait Forward: Send + Sync + 'static {
    /// A connection to the guest's vsock `port`, resuming the session
    /// first if it is suspended; `Ok(true)` in the pair when it resumed.
    fn guest_stream(&self, port: u32) -> Result<(UnixStream, bool), SessionError>;
    /// A client connection opened (`true`) or closed (`false`).
    fn connection(&self, open: bool);
    /// A stream [`guest_stream`](Self::guest_stream) gave is done with.
    fn guest_stream_closed(&self);
    /// Bytes went through.
    fn activity(&self, bytes: u64);
    /// The first byte from the guest reached a client whose connection
    /// resumed the session, `since` its accept.
    fn first_byte_after_resume(&self, since: Duration);
    /// The session is ending: stop accepting and forwarding.
    fn stopping(&self) -> bool;
}

/// Runs the accept loop of `listener` until `stop`.
pub(super) fn serve(
    listener: Listener,
    guest_port: u32,
    session: Arc<dyn Forward>,
    stop: Arc<AtomicBool>,
    filters: Arc<ThreadFilters>,
) {
    while !stop.load(Ordering::Acquire) && !session.stopping() {
        if !poll_in(&[listener.as_fd()], 100)
            .first()
            .copied()
            .unwrap_or(false)
        {
            continue;
        }
        let client = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e)
                if e.raw_os_error() == Some(libc::EMFILE)
                    || e.raw_os_error() == Some(libc::ENFILE) =>
            {
                log::warn!("endpoint accept: {e}; retrying shortly");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => {
                log::warn!("endpoint accept: {e}");
                continue;
            }
        };
        let session = session.clone();
        session.connection(true);
        let spawned =
            crate::seccomp::spawn_thread("dormouse-endpoint", ThreadKind::Session, &filters, {
                let session = session.clone();
                move || {
                    forward(client, guest_port, &*session);
                    session.connection(false);
                }
            });
        if let Err(e) = spawned {
            log::warn!("endpoint: cannot start a forwarding thread: {e}");
            session.connection(false);
        }
    }
}

/// Holds `client` while the session resumes, then copies bytes both ways
/// until both sides have closed.
fn forward(mut client: Client, guest_port: u32, session: &dyn Forward) {
    let accepted = std::time::Instant::now();
    let (mut guest, resumed) = match session.guest_stream(guest_port) {
        Ok(g) => g,
        Err(e) => {
            log::warn!("endpoint: cannot reach guest port {guest_port}: {e}");
            client.shutdown(std::net::Shutdown::Both);
            return;
        }
    };
    let mut first_byte_pending = resumed;
    let mut answered = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut client_open = true;
    while !session.stopping() {
        // A closed client stays readable (EOF): poll it only while open.
        let ready = if client_open {
            poll_in(&[client.as_fd(), guest.as_fd()], 100)
        } else {
            let mut r = poll_in(&[guest.as_fd()], 100);
            r.insert(0, false);
            r
        };
        if ready.len() < 2 {
            continue;
        }
        if client_open && ready[0] {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => {
                    client_open = false;
                    let _ = guest.shutdown(std::net::Shutdown::Write);
                }
                Ok(n) => {
                    session.activity(n as u64);
                    if guest.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        if ready[1] {
            match guest.read(&mut buf) {
                Ok(0) | Err(_) => {
                    // The guest side is gone: nothing more can be answered.
                    if !answered {
                        log::info!(
                            "endpoint: the guest closed the connection to its port {guest_port} \
                             without sending a byte"
                        );
                    }
                    client.shutdown(std::net::Shutdown::Write);
                    break;
                }
                Ok(n) => {
                    answered = true;
                    if first_byte_pending {
                        first_byte_pending = false;
                        session.first_byte_after_resume(accepted.elapsed());
                    }
                    session.activity(n as u64);
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    }
    client.shutdown(std::net::Shutdown::Both);
    let _ = guest.shutdown(std::net::Shutdown::Both);
    session.guest_stream_closed();
}

/// poll(2) for input (or hang-up) on `fds` for at most `timeout_ms`;
/// per fd, whether it is readable. Empty on an error.
fn poll_in(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(pfds.len()).unwrap_or(0);
    // SAFETY: `pfds` is a valid array of `n` pollfds for the whole call, and
    // each fd is borrowed (open) for its duration.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), n, timeout_ms) };
    if rc < 0 {
        return Vec::new();
    }
    pfds.iter().map(|p| p.revents != 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_endpoints_are_private_and_tcp_stays_on_loopback() {
        let dir = std::env::temp_dir().join(format!("dormouse-ep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let (listener, _) = Listener::bind(&Endpoint::unix(&path, 5), false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second bind of a live socket is refused; a stale one replaced.
        assert!(matches!(
            Listener::bind(&Endpoint::unix(&path, 5), false),
            Err(SessionError::EndpointInUse { .. })
        ));
        drop(listener);
        assert!(!path.exists());
        let l = UnixListener::bind(&path).unwrap();
        drop(l); // leaves a stale socket file
        Listener::bind(&Endpoint::unix(&path, 5), false).unwrap();

        let public = Endpoint::tcp("0.0.0.0:0".parse().unwrap(), 5);
        assert!(matches!(
            Listener::bind(&public, false),
            Err(SessionError::Config(_))
        ));
        let (l, bound) = Listener::bind(&Endpoint::loopback(0, 5), false).unwrap();
        let Endpoint::Tcp { addr, .. } = bound else {
            panic!()
        };
        assert_ne!(addr.port(), 0);
        assert!(matches!(
            Listener::bind(&Endpoint::tcp(addr, 5), false),
            Err(SessionError::EndpointInUse { .. })
        ));
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
