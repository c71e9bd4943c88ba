//! The host side of a virtio-net device: a TAP interface whose frames carry
//! a 12-byte `virtio_net_hdr_v1` in both directions.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use libc::{c_char, c_int, c_short};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::frame::VNET_HDR_LEN;
use super::NetError;

/// How a virtio-net device gets its TAP.
#[derive(Debug)]
pub enum TapConfig {
    /// Open (or create) the TAP of this name through /dev/net/tun. Needs
    /// CAP_NET_ADMIN, unless the TAP already exists and belongs to this user.
    Name(String),
    /// A /dev/net/tun descriptor already attached to a TAP with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (e.g. handed over by a privileged
    /// parent). The device sets its header size and makes it non-blocking.
    Fd(OwnedFd),
}

/// The `ioctl` numbers of linux/if_tun.h.
mod ioctls {
    use libc::{c_int, c_uint};

    const TUNTAP: c_uint = 0x54; // 'T'

    vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, c_int);
    vmm_sys_util::ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, c_uint);
    vmm_sys_util::ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, c_uint);
    vmm_sys_util::ioctl_ior_nr!(TUNGETVNETHDRSZ, TUNTAP, 215, c_int);
    vmm_sys_util::ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, c_int);
}

/// The flags every dormouse TAP is attached with.
const TAP_FLAGS: c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// A non-blocking TAP descriptor that reads and writes whole frames, each
/// preceded by a `virtio_net_hdr_v1`.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens /dev/net/tun and attaches it to the TAP called `name`, creating
    /// the interface if it does not exist (an empty name, or one with `%d`,
    /// lets the kernel pick; [`name`](Self::name) then tells which).
    pub fn open(name: &str) -> Result<Tap, NetError> {
        let mut ifr = ifreq_named(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => NetError::NoTunDevice(e),
                _ => NetError::OpenTun(e),
            })?;
        // 0x5002 fits a c_short, the type of ifr_flags.
        let flags = c_short::try_from(TAP_FLAGS).expect("IFF_TAP | IFF_NO_PI | IFF_VNET_HDR");
        ifr.ifr_ifru.ifru_flags = flags;
        // SAFETY: `file` is an open /dev/net/tun descriptor and TUNSETIFF
        // reads and writes exactly one `struct ifreq`, which `ifr` is; the
        // kernel keeps no reference to it.
        let ret = unsafe { ioctl_with_mut_ref(&file, ioctls::TUNSETIFF(), &mut ifr) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_owned();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    NetError::PermissionDenied { name, source }
                }
                Some(libc::EBUSY) => NetError::Busy { name },
                Some(libc::EINVAL) => NetError::NotATapInterface { name, source },
                _ => NetError::Ioctl {
                    op: "TUNSETIFF",
                    name,
                    source,
                },
            });
        }
        let tap = Tap {
            file,
            name: ifreq_name(&ifr),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Takes a /dev/net/tun descriptor already attached to a TAP with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, sets its virtio-net header size
    /// and makes it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, NetError> {
        let file = File::from(fd);
        // SAFETY: an all-zero `ifreq` is valid: integers, byte arrays and
        // null pointers.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes exactly one `struct ifreq`, which `ifr`
        // is; on a descriptor that is not a TUN/TAP the kernel fails the call
        // without writing anything.
        let ret = unsafe { ioctl_with_mut_ref(&file, ioctls::TUNGETIFF(), &mut ifr) };
        if ret < 0 {
            return Err(NetError::NotATapFd(io::Error::last_os_error()));
        }
        let name = ifreq_name(&ifr);
        // SAFETY: `ifr` was zero-initialised, so every union member holds
        // initialised bytes, and any bit pattern is a valid c_short.
        let flags = c_int::from(unsafe { ifr.ifr_ifru.ifru_flags });
        if flags & (TAP_FLAGS | libc::IFF_TUN) != TAP_FLAGS {
            return Err(NetError::WrongTapFlags { name, flags });
        }
        set_nonblocking(&file)?;
        let tap = Tap { file, name };
        tap.configure()?;
        Ok(tap)
    }

    /// Wraps any descriptor that keeps frame boundaries (a `SOCK_DGRAM` or
    /// `SOCK_SEQPACKET` socket) as if it were a TAP: its peer writes and
    /// reads each frame behind a 12-byte virtio-net header, as the kernel's
    /// end of a TAP does. For tests and benchmarks, or to put a user-space
    /// network stack behind the device.
    pub fn from_frame_socket(fd: OwnedFd, name: &str) -> Result<Tap, NetError> {
        let file = File::from(fd);
        set_nonblocking(&file)?;
        Ok(Tap {
            file,
            name: name.to_owned(),
        })
    }

    /// The interface's name (as the kernel reported it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame, header included. Non-blocking: `WouldBlock` when
    /// there is none.
    pub(super) fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame, header included.
    pub(super) fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }

    /// Header size and offloads: every frame carries a `virtio_net_hdr_v1`,
    /// and the kernel hands over only complete, checksummed frames (no
    /// offload was negotiated with the guest; a persistent TAP may still
    /// have offloads from a previous user).
    fn configure(&self) -> Result<(), NetError> {
        // The header is 12 bytes.
        let size = c_int::try_from(VNET_HDR_LEN).expect("virtio-net header size fits c_int");
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which
        // points at `size`, alive for the call.
        let ret = unsafe { ioctl_with_ref(&self.file, ioctls::TUNSETVNETHDRSZ(), &size) };
        if ret < 0 {
            return Err(self.ioctl_error("TUNSETVNETHDRSZ"));
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no
        // memory of ours.
        let ret = unsafe { ioctl_with_val(&self.file, ioctls::TUNSETOFFLOAD(), 0) };
        if ret < 0 {
            return Err(self.ioctl_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    fn ioctl_error(&self, op: &'static str) -> NetError {
        NetError::Ioctl {
            op,
            name: self.name.clone(),
            source: io::Error::last_os_error(),
        }
    }

    /// The virtio-net header size the kernel uses for this TAP.
    #[cfg(test)]
    pub(super) fn vnet_hdr_size(&self) -> io::Result<c_int> {
        let mut size: c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one c_int through the pointer, which
        // points at `size`, alive for the call.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, ioctls::TUNGETVNETHDRSZ(), &mut size) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// A zeroed `ifreq` carrying `name`, checked against IFNAMSIZ.
fn ifreq_named(name: &str) -> Result<libc::ifreq, NetError> {
    if name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
        return Err(NetError::InvalidName(name.to_owned()));
    }
    // SAFETY: an all-zero `ifreq` is valid: integers, byte arrays and null
    // pointers.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = c_char::from_ne_bytes([src]);
    }
    Ok(ifr)
}

/// The NUL-terminated name in an `ifreq`.
fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .map(|c| c.to_ne_bytes()[0])
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn set_nonblocking(file: &File) -> Result<(), NetError> {
    crate::devices::set_nonblocking(file).map_err(NetError::NonBlocking)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    #[test]
    fn names_that_cannot_be_interface_names_are_refused() {
        assert!(matches!(
            Tap::open("a-name-longer-than-15"),
            Err(NetError::InvalidName(_))
        ));
        assert!(matches!(Tap::open("nul\0"), Err(NetError::InvalidName(_))));
        let err = Tap::open("0123456789abcdef").unwrap_err();
        assert!(err.to_string().contains("at most 15 bytes"), "{err}");
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let err = Tap::from_fd(OwnedFd::from(a)).unwrap_err();
        assert!(matches!(err, NetError::NotATapFd(_)), "{err:?}");
        // An unattached /dev/net/tun descriptor is not a TAP either.
        if let Ok(f) = File::options().read(true).write(true).open("/dev/net/tun") {
            let err = Tap::from_fd(OwnedFd::from(f)).unwrap_err();
            assert!(matches!(err, NetError::NotATapFd(_)), "{err:?}");
        }
    }

    #[test]
    fn ifreq_names_round_trip() {
        let ifr = ifreq_named("dm-tap0").unwrap();
        assert_eq!(ifreq_name(&ifr), "dm-tap0");
        let ifr = ifreq_named("0123456789abcde").unwrap();
        assert_eq!(ifreq_name(&ifr), "0123456789abcde");
    }

    #[test]
    fn frame_sockets_are_made_non_blocking() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let tap = Tap::from_frame_socket(OwnedFd::from(a), "test").unwrap();
        let mut buf = [0u8; 16];
        let err = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(tap.name(), "test");
    }
}
