//! virtio-vsock (virtio 1.2, section 5.10) with its host side on Unix
//! sockets, the scheme Firecracker users know.
//!
//! - Host-initiated: a host process connects to the device's socket path
//!   (`uds_path`) and writes `CONNECT <port>\n`; the device asks the guest to
//!   accept a connection on `<port>` and, once it does, answers
//!   `OK <local port>\n` on the stream. From then on the stream carries the
//!   connection's bytes.
//! - Guest-initiated: a guest connection to host port `P` becomes a
//!   connection to the Unix socket at `<uds_path>_P`, if the device's
//!   [`VsockConfig`] allows port `P` (by default no port is allowed, so a
//!   guest cannot reach sockets that are not meant for it, such as another
//!   VM's `<uds_path>_P`); otherwise the guest gets a RST.
//!
//! The host side can also come from the embedder, so that it outlives a VM
//! (a session suspended to disk and resumed later):
//! - A listener it bound ([`Vsock::with_listener`],
//!   `MicroVmBuilder::vsock_listener`, `Restore::vsock_listener`): the
//!   device accepts on it instead of binding `uds_path`, and leaves the
//!   path alone when dropped. Clients that connect while no VM exists
//!   wait in its backlog for the next VM given a clone of it; `<path>_P`
//!   still names guest connections' sockets.
//! - A connection with no socket at all (`MicroVm::vsock_connect`,
//!   `handoff`): a socket pair whose one end the device takes as a host
//!   connection to a guest port, without the `CONNECT`/`OK` lines.
//!
//! After a transport reset (a restore), the guest is offered nothing on
//! rx until it kicks the event queue, which Linux does once it has dropped
//! its old connections: a host connection made meanwhile (one that waited
//! in the backlog) would otherwise be reset along with them.
//!
//! Timeouts ([`VsockConfig`]): a host `CONNECT` the guest has not accepted
//! within `connect_timeout` (default 2 s) is closed without an `OK` line,
//! so a host process never waits forever on a guest that does not answer
//! (no driver, no listener that answers, a stuck guest). When the guest
//! closes a connection while bytes it sent still wait for a slow host
//! reader, the device keeps writing them for up to `drain_timeout` (default
//! 2 s, as Firecracker), then closes the host stream.
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
//! - `handoff`: connections handed in from other threads, through a
//!   channel and the device's wake-up eventfd.
//! - `unix`: a connect that never blocks the event loop.
//! - [`config`](VsockConfig): what the embedder decides; `budget`: the fds
//!   connections hold, counted against `RLIMIT_NOFILE`; `warn_limit`: the
//!   rate limit on warnings a guest can trigger.
//!
//! Everything the guest can make the device hold is bounded: at most
//! `max_connections` connections (by default an eighth of the process's
//! soft `RLIMIT_NOFILE`, at most [`MAX_DEFAULT_CONNECTIONS`]; all vsock
//! devices in a process together at most half of it), each buffering at
//! most `buffer_size` bytes for its host stream, and at most
//! [`RST_QUEUE_SOFT_MAX`] plus `max_connections` replies to packets that
//! belong to no connection (guest transmission stalls while
//! [`RST_QUEUE_SOFT_MAX`] of them wait for rx buffers). Warnings a guest
//! can trigger are rate-limited.

mod backend;
mod budget;
mod config;
mod connection;
mod device;
mod event_handler;
mod handoff;
mod packet;
mod unix;
mod warn_limit;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_util;

pub use config::{
    HostPorts, VsockConfig, VsockConfigError, DEFAULT_BUFFER_SIZE, DEFAULT_CONNECTIONS_FD_DIVISOR,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, MAX_BUFFER_SIZE, MAX_DEFAULT_CONNECTIONS,
    MAX_TIMEOUT, MIN_BUFFER_SIZE,
};
pub(crate) use device::listener_path;
pub use device::{Vsock, VsockError};
pub(crate) use handoff::Connector;
pub use handoff::VsockConnectError;

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
/// Guest transmission stalls while this many RST replies wait for rx buffers.
pub const RST_QUEUE_SOFT_MAX: usize = 256;
/// The longest `CONNECT <port>\n` line a host process may send.
const CONNECT_LINE_MAX: usize = 32;
/// Host-side ports for host-initiated connections are picked from here up.
const LOCAL_PORT_START: u32 = 1 << 30;
