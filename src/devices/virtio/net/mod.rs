//! virtio-net (device type 1) over a host TAP interface.
//!
//! Two queues: receive (0) and transmit (1), 256 entries each. The device
//! offers `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC` and `VIRTIO_NET_F_STATUS`
//! (link always up); no checksum or segmentation offloads and no mergeable
//! receive buffers. Every frame, in both directions, is preceded by the
//! 12-byte `virtio_net_hdr_v1`, which the TAP (opened with `IFF_VNET_HDR`)
//! consumes on write and produces on read.
//!
//! - Transmit: each chain's device-readable bytes (header and frame, at most
//!   [`MAX_BUFFER_LEN`]) are gathered and written to the TAP in one write.
//!   The header is zeroed first: the driver negotiated no offload, so the
//!   host kernel must not be asked for one. A chain that is too short, too
//!   long or holds device-writable descriptors is dropped and counted.
//! - Receive: a frame read from the TAP goes whole into one chain's
//!   device-writable descriptors behind a header with no offload and
//!   `num_buffers = 1`. A frame larger than the chain is dropped and counted
//!   (the chain stays available for the next one); never truncated. While the
//!   driver has no receive buffer, the device holds one frame and stops
//!   watching the TAP until the driver's next receive-queue notification.
//! - Rate limits ([`Net::with_rate_limiters`]): receive and transmit have
//!   a limiter each; a frame costs one operation and its Ethernet bytes (a
//!   malformed transmit chain one operation). A refused transmit chain
//!   stays in the ring; a refused received frame is held like a frame
//!   without a buffer, and the TAP is not watched. The limiter's timerfd
//!   starts the next pass.
//! - A ring the driver broke (a descriptor outside guest memory, a looping
//!   or truncated chain, an available index from nowhere, readable
//!   descriptors in a receive chain) marks the device failed: `needs_reset()`
//!   and a configuration-change interrupt.
//!
//! Files: `device.rs` (the model and its queue processing), `event_handler.rs`
//! (its file descriptors on the event loop), `frame.rs` (frames in descriptor
//! chains), `tap.rs` (the host TAP).

mod device;
mod event_handler;
mod frame;
mod tap;
#[cfg(test)]
mod tests;

use std::io;

pub use device::{Net, NetCounters};
pub use frame::{MAX_BUFFER_LEN, VNET_HDR_LEN};
pub use tap::{Tap, TapConfig};

/// Errors from creating a virtio-net device or its TAP.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// There is no TUN/TAP driver on the host.
    #[error("/dev/net/tun does not exist: load the tun kernel module (`modprobe tun`)")]
    NoTunDevice(#[source] io::Error),
    /// /dev/net/tun exists but could not be opened.
    #[error(
        "could not open /dev/net/tun: let this user read and write it (it is usually mode 0666) \
         or run as root"
    )]
    OpenTun(#[source] io::Error),
    /// The interface name cannot be a Linux interface name.
    #[error(
        "TAP name {0:?} is invalid: use at most 15 bytes and no NUL (empty lets the kernel pick)"
    )]
    InvalidName(String),
    /// The caller may not create or attach this TAP.
    #[error(
        "not allowed to attach TAP {name:?}: run with CAP_NET_ADMIN, or pre-create the TAP \
         owned by this user (`ip tuntap add dev {name} mode tap user $USER`)"
    )]
    PermissionDenied {
        /// The TAP's name.
        name: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Another file descriptor (another process, or another device) has the
    /// TAP attached.
    #[error(
        "TAP {name:?} is busy: another process or device has it open; close it there or use \
         another TAP"
    )]
    Busy {
        /// The TAP's name.
        name: String,
    },
    /// An interface of that name exists but is not a single-queue TAP.
    #[error(
        "interface {name:?} exists but is not a single-queue TAP (a TUN, a multi-queue TAP or \
         another kind of link): delete it or choose another name"
    )]
    NotATapInterface {
        /// The interface's name.
        name: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A file descriptor given as a TAP is not an attached TUN/TAP descriptor.
    #[error(
        "the file descriptor given as a TAP is not an attached /dev/net/tun descriptor: open \
         /dev/net/tun and attach it with TUNSETIFF first"
    )]
    NotATapFd(#[source] io::Error),
    /// A TAP given by file descriptor was attached with the wrong flags.
    #[error(
        "TAP {name:?} was attached with flags {flags:#x}: it needs IFF_TAP | IFF_NO_PI | \
         IFF_VNET_HDR (0x5002); attach it with those flags"
    )]
    WrongTapFlags {
        /// The TAP's name.
        name: String,
        /// The flags it has.
        flags: i32,
    },
    /// An ioctl configuring the TAP failed.
    #[error("{op} on TAP {name:?} failed: the host kernel's TUN driver refused it")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The TAP's name.
        name: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The TAP's descriptor could not be made non-blocking.
    #[error("could not make the TAP descriptor non-blocking")]
    NonBlocking(#[source] io::Error),
    /// The MAC address is not a unicast address.
    #[error(
        "MAC address {} is not a unicast address (multicast bit set, or all zero): use one like \
         52:54:00:12:34:56",
        format_mac(.0)
    )]
    InvalidMac([u8; 6]),
    /// An eventfd for a queue could not be created.
    #[error("could not create the queue eventfds (out of file descriptors?)")]
    EventFd(#[source] io::Error),
    /// A rate limiter's configuration is invalid or its timer could not be
    /// created.
    #[error("virtio-net {direction} rate limiter: {source}")]
    RateLimiter {
        /// "receive" or "transmit".
        direction: &'static str,
        /// What is wrong.
        #[source]
        source: crate::rate_limiter::RateLimiterError,
    },
}

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
