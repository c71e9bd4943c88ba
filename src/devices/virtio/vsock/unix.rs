//! Unix-socket helpers for the event loop: a connect that never blocks, and
//! a send that never raises SIGPIPE.
//!
//! `std::os::unix::net::UnixStream::connect` blocks while the listener's
//! backlog is full; the device connects from the VM's one event-loop
//! thread, so it creates the socket non-blocking first. A non-blocking
//! AF_UNIX stream connect completes at once or fails (`EAGAIN` for a full
//! backlog), it never returns `EINPROGRESS`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects a new non-blocking stream socket to the listener at `path`.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data (an integer and a byte array),
    // for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // One byte stays zero: the path's terminator.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path is empty, too long for a Unix socket or contains NUL",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::new(io::ErrorKind::Unsupported, "AF_UNIX out of range"))?;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    let addr_len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let addr_len = libc::socklen_t::try_from(addr_len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"))?;

    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un that lives across the call and
    // `addr_len` (family + path + terminator) is within its size.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            addr_len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

pub(crate) use crate::devices::set_nonblocking;

/// Writes to a stream socket without blocking and without SIGPIPE when the
/// peer has gone (`EPIPE` comes back as an error instead): the embedding
/// program may not ignore SIGPIPE, and a host process closing its end must
/// not kill the VMM.
pub(crate) fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid slice for `buf.len()` bytes for the whole
    // call, and the fd is a socket owned by `stream`.
    let ret = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::devices::virtio::vsock::tests_util::TempDir;

    #[test]
    fn connects_without_blocking_or_fails() {
        let dir = TempDir::new();
        let path = dir.path().join("l");
        assert!(connect_nonblocking(&path).is_err(), "nobody listens yet");
        let listener = UnixListener::bind(&path).unwrap();
        let mut s = connect_nonblocking(&path).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        s.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        // Non-blocking: nothing to read is WouldBlock, not a hang.
        assert_eq!(
            s.read(&mut b).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // A closed peer is EPIPE, not a signal.
        drop(peer);
        assert_eq!(
            send(&s, b"x").unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
