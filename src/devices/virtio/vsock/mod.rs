//! virtio-vsock (virtio 1.2, section 5.10) with its host side on Unix
//! sockets, the scheme Firecracker users know.
//!
//! - Host-initiated: a host process connects to the device's socket path
//!   (`uds_path`) and writes `CONNECT <port>\n`; the device asks the guest to
//!   accept a connection on `<port>` and, once it does, answers
//!   `OK <local port>\n` on the stream. From then on the stream carries the
//!   connection's bytes.
//! - Guest-initiated: a guest connection to host port `P` becomes a
//!   connection to the Unix socket at `<uds_path>_P`.
//!
//! The module:
//! - [`device`](Vsock): the model: features, config space, activation, the
//!   rx/tx/event queue processing.
//! - `packet`: the 44-byte packet header and the checks a guest packet must
//!   pass.
//! - `connection`: one connection's state: its host stream, the
//!   virtio-vsock credit accounting both ways, the bytes waiting for the host
//!   stream to become writable.
//! - `backend`: the listener and the connection table: which connection a
//!   guest packet belongs to, what the guest is owed next, which fds the
//!   event loop watches.
//! - `event_handler`: the queue eventfds, the listener and every connection's
//!   stream on the VM's event loop.
//! - `unix`: a connect that never blocks the event loop.
//!
//! Everything the guest can make the device hold is bounded: at most
//! [`MAX_CONNECTIONS`] connections, each buffering at most [`CONN_BUF_ALLOC`]
//! bytes for its host stream, and at most [`RST_QUEUE_MAX`] replies to
//! packets that belong to no connection (guest transmission stalls while
//! [`RST_QUEUE_SOFT_MAX`] of them wait for rx buffers).

mod backend;
mod connection;
mod device;
mod event_handler;
mod packet;
mod unix;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_util;

pub use device::{Vsock, VsockError};

/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// The maximum size of each of the device's three queues.
const QUEUE_SIZE: u16 = 256;
/// Queue indices.
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// The most payload one packet may carry either way (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
const MAX_PKT_LEN: usize = 64 * 1024;
/// The receive buffer the device advertises for each connection: how many
/// bytes from the guest it buffers for a host stream that is not reading.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// After forwarding this many bytes to the host since it last told the
/// guest, the device sends a CREDIT_UPDATE.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// The most connections (host streams) the device keeps open at once,
/// including host streams that have not finished their `CONNECT` line.
pub const MAX_CONNECTIONS: usize = 1024;
/// Guest transmission stalls while this many RST replies wait for rx buffers.
pub const RST_QUEUE_SOFT_MAX: usize = 256;
/// RST replies beyond this many are dropped (and logged).
pub const RST_QUEUE_MAX: usize = RST_QUEUE_SOFT_MAX + MAX_CONNECTIONS;
/// The longest `CONNECT <port>\n` line a host process may send.
const CONNECT_LINE_MAX: usize = 32;
/// Host-side ports for host-initiated connections are picked from here up.
const LOCAL_PORT_START: u32 = 1 << 30;
