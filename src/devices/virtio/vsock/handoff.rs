//! Connections handed in by the embedder, with no socket path and no
//! handshake: [`Connector::connect`] makes a socket pair on the caller's
//! thread, counts the device's end against the device's `max_connections`
//! and the process's fd budget, and sends it down a channel; the device's
//! wake-up eventfd tells the event loop, which takes it as if a host
//! process had connected to the listener and sent `CONNECT <port>\n`
//! (the guest gets a REQUEST for that port), except that no `OK` line is
//! written when the guest accepts. The caller keeps the other end.
//!
//! The channel holds at most `max_connections` streams: each message holds
//! its place among them. A device that goes away (the VM is dropped) drops
//! what waits in the channel, and the caller's end reads EOF.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::budget::{FdBudget, FdToken};

/// A connection on its way from [`Connector::connect`] to the device.
#[derive(Debug)]
pub(crate) struct Handoff {
    /// The guest port to connect to.
    pub(crate) port: u32,
    /// The device's end (non-blocking).
    pub(crate) stream: UnixStream,
    /// Its place among the device's connections.
    pub(crate) slot: FdToken,
    /// Its fd in the process's budget.
    pub(crate) fd: FdToken,
}

/// Why a connection could not be handed to a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockConnectError {
    /// The VM was built or restored without a vsock device.
    #[error(
        "this VM has no vsock device: add one with MicroVmBuilder::vsock() or .vsock_listener()"
    )]
    NoDevice,
    /// The device holds `max_connections` connections already.
    #[error(
        "the vsock device holds its maximum of {0} connections: close one, or raise \
         VsockConfig::max_connections"
    )]
    TooManyConnections(usize),
    /// The vsock devices of this process hold half of `RLIMIT_NOFILE` in
    /// connections already.
    #[error(
        "the vsock devices of this process hold {0} connection fds, half of RLIMIT_NOFILE: \
         close connections or raise the fd limit"
    )]
    FdBudget(usize),
    /// The socket pair could not be made.
    #[error("could not create a socket pair for the vsock connection (out of fds?)")]
    SocketPair(#[source] io::Error),
    /// The device's event loop is gone.
    #[error("the vsock device is gone (its VM failed or was dropped): restore or build a new VM")]
    DeviceGone,
}

/// Hands connections to one vsock device from any thread.
#[derive(Debug)]
pub(crate) struct Connector {
    tx: Sender<Handoff>,
    /// The device's wake-up eventfd.
    wake: Arc<EventFd>,
    slots: Arc<FdBudget>,
    max_connections: usize,
    budget: Arc<FdBudget>,
    process_cap: usize,
}

impl Connector {
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) fn new(
        tx: Sender<Handoff>,
        wake: Arc<EventFd>,
        limits: &super::backend::Limits,
    ) -> Self {
        Self {
            tx,
            wake,
            slots: limits.slots.clone(),
            max_connections: limits.max_connections,
            budget: limits.budget.clone(),
            process_cap: limits.process_cap,
        }
    }

    /// A new connection to guest port `port`; returns the caller's end.
    /// The guest accepting it, refusing it (RST) or not answering within
    /// the connect timeout shows only on that stream: data, or EOF.
    pub(crate) fn connect(&self, port: u32) -> Result<UnixStream, VsockConnectError> {
        let slot = self
            .slots
            .take(self.max_connections)
            .ok_or(VsockConnectError::TooManyConnections(self.max_connections))?;
        let fd = self
            .budget
            .take(self.process_cap)
            .ok_or_else(|| VsockConnectError::FdBudget(self.budget.held()))?;
        let (ours, theirs) = UnixStream::pair().map_err(VsockConnectError::SocketPair)?;
        ours.set_nonblocking(true)
            .map_err(VsockConnectError::SocketPair)?;
        let handoff = Handoff {
            port,
            stream: ours,
            slot,
            fd,
        };
        self.tx
            .send(handoff)
            .map_err(|_| VsockConnectError::DeviceGone)?;
        // Fails only when the counter is full, and then the loop has a
        // wake-up pending anyway.
        let _ = self.wake.write(1);
        Ok(theirs)
    }
}

/// Takes every connection that waits in `rx` into the device's backend.
pub(crate) fn drain(rx: &Receiver<Handoff>, backend: &mut super::backend::Backend) {
    while let Ok(handoff) = rx.try_recv() {
        backend.hand_in(handoff);
    }
}
