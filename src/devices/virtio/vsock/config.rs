//! What an embedder decides about a vsock device: which host ports the
//! guest may reach, how many connections it may hold, how much it may
//! buffer per connection, and how long the device waits for a guest that
//! does not answer or a host that does not read.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The receive buffer the device advertises for each connection unless
/// [`VsockConfig::buffer_size`] says otherwise: how many bytes from the
/// guest it holds for a host stream that is not reading.
pub const DEFAULT_BUFFER_SIZE: u32 = 256 * 1024;
/// The smallest per-connection buffer a configuration may ask for.
pub const MIN_BUFFER_SIZE: u32 = 4 * 1024;
/// The largest per-connection buffer a configuration may ask for.
pub const MAX_BUFFER_SIZE: u32 = 16 * 1024 * 1024;
/// How long a host `CONNECT` waits for the guest to accept, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long data from a guest that closed its connection keeps draining
/// to a slow host reader, by default (Firecracker's 2 s).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest timeout a configuration may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The most connections a device holds by default, whatever the fd limit.
pub const MAX_DEFAULT_CONNECTIONS: u32 = 1024;
/// By default a device holds at most this fraction (1/N) of the process's
/// soft `RLIMIT_NOFILE` in connections.
pub const DEFAULT_CONNECTIONS_FD_DIVISOR: u64 = 8;

/// The host ports a guest may connect to (each is the Unix socket
/// `<uds_path>_<port>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostPorts {
    /// Only these ports; the empty set (the default) refuses every
    /// guest-initiated connection.
    Only(BTreeSet<u32>),
    /// Any port. Only for a guest you trust: it may then reach every
    /// `<uds_path>_<port>` socket, which matters when the sockets of
    /// several VMs or services share one directory.
    Any,
}

impl Default for HostPorts {
    fn default() -> Self {
        HostPorts::Only(BTreeSet::new())
    }
}

impl HostPorts {
    /// Whether a guest connection to host port `port` is allowed.
    pub fn allows(&self, port: u32) -> bool {
        match self {
            HostPorts::Only(ports) => ports.contains(&port),
            HostPorts::Any => true,
        }
    }
}

/// The configuration of a vsock device. The default is hardened: no
/// guest-initiated connection is allowed, and the connection limit is
/// derived from the process's file-descriptor limit.
///
/// ```
/// use std::time::Duration;
/// use dormouse::devices::virtio::vsock::VsockConfig;
///
/// let config = VsockConfig::default()
///     .allow_host_port(6000)
///     .allow_host_port(6001);
/// let config = VsockConfig {
///     max_connections: Some(64),
///     connect_timeout: Duration::from_secs(5),
///     ..config
/// };
/// assert!(config.validate().is_ok());
/// assert!(config.host_ports.allows(6000) && !config.host_ports.allows(7000));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The host ports the guest may connect to; a connection to any other
    /// is refused (the guest gets a RST). Default: none.
    pub host_ports: HostPorts,
    /// The most connections (host streams, one fd each, counting host
    /// processes that have not finished their `CONNECT` line and closed
    /// connections still draining) the device holds; beyond it, guest
    /// connections get a RST and host ones are closed. `None` (the
    /// default): an eighth of the process's soft `RLIMIT_NOFILE`, at most
    /// [`MAX_DEFAULT_CONNECTIONS`], at least 1. Whatever this says, all
    /// vsock devices in the process together hold at most half of the soft
    /// `RLIMIT_NOFILE` in connections, so that a flooding guest cannot
    /// make another VM fail for want of fds.
    pub max_connections: Option<u32>,
    /// The receive buffer each connection advertises to the guest: how
    /// many bytes the device holds for a host stream that does not read.
    /// From [`MIN_BUFFER_SIZE`] to [`MAX_BUFFER_SIZE`]; default
    /// [`DEFAULT_BUFFER_SIZE`].
    pub buffer_size: u32,
    /// How long a host process's connection may take from being accepted
    /// to the guest accepting its `CONNECT` (the line included). When it
    /// runs out, the device closes the host stream without an `OK` line
    /// and, if the guest was asked, sends the guest a RST. More than zero,
    /// at most [`MAX_TIMEOUT`]; default [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// When the guest closes a connection (SHUTDOWN of both directions,
    /// or RST) while bytes it sent still wait for the host stream, how long
    /// the device keeps writing them before it closes the stream anyway.
    /// Zero drops them at once; at most [`MAX_TIMEOUT`]; default
    /// [`DEFAULT_DRAIN_TIMEOUT`].
    pub drain_timeout: Duration,
}

impl Default for VsockConfig {
    fn default() -> Self {
        Self {
            host_ports: HostPorts::default(),
            max_connections: None,
            buffer_size: DEFAULT_BUFFER_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// Mistakes in a [`VsockConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VsockConfigError {
    /// `max_connections` is `Some(0)`.
    #[error("vsock max_connections is 0, which refuses every connection: use None for the default or a limit of at least 1")]
    ZeroMaxConnections,
    /// `buffer_size` is outside the allowed range.
    #[error(
        "vsock buffer_size {0} is out of range: use {MIN_BUFFER_SIZE} to {MAX_BUFFER_SIZE} bytes"
    )]
    BufferSize(u32),
    /// `connect_timeout` is zero or too long.
    #[error("vsock connect_timeout {0:?} is out of range: use more than zero and at most {MAX_TIMEOUT:?}")]
    ConnectTimeout(Duration),
    /// `drain_timeout` is too long.
    #[error("vsock drain_timeout {0:?} is too long: use at most {MAX_TIMEOUT:?}")]
    DrainTimeout(Duration),
}

impl VsockConfig {
    /// Allows guest connections to host port `port` (adds it to an
    /// [`HostPorts::Only`] list; [`HostPorts::Any`] stays as it is).
    pub fn allow_host_port(mut self, port: u32) -> Self {
        if let HostPorts::Only(ports) = &mut self.host_ports {
            ports.insert(port);
        }
        self
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), VsockConfigError> {
        if self.max_connections == Some(0) {
            return Err(VsockConfigError::ZeroMaxConnections);
        }
        if !(MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&self.buffer_size) {
            return Err(VsockConfigError::BufferSize(self.buffer_size));
        }
        if self.connect_timeout.is_zero() || self.connect_timeout > MAX_TIMEOUT {
            return Err(VsockConfigError::ConnectTimeout(self.connect_timeout));
        }
        if self.drain_timeout > MAX_TIMEOUT {
            return Err(VsockConfigError::DrainTimeout(self.drain_timeout));
        }
        Ok(())
    }

    /// The connection limit a device made now would use: the configured
    /// one, or the default derived from the process's soft
    /// `RLIMIT_NOFILE`.
    pub fn effective_max_connections(&self) -> usize {
        let n = self
            .max_connections
            .unwrap_or_else(|| default_max_connections(super::budget::soft_nofile()));
        usize::try_from(n).unwrap_or(usize::MAX)
    }
}

/// The default connection limit for a process whose soft `RLIMIT_NOFILE`
/// is `soft_nofile`.
pub(crate) fn default_max_connections(soft_nofile: u64) -> u32 {
    let share = soft_nofile / DEFAULT_CONNECTIONS_FD_DIVISOR;
    u32::try_from(share)
        .unwrap_or(u32::MAX)
        .clamp(1, MAX_DEFAULT_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_hardened_and_valid() {
        let c = VsockConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert!(!c.host_ports.allows(0) && !c.host_ports.allows(6000));
        assert_eq!(c.buffer_size, DEFAULT_BUFFER_SIZE);
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.drain_timeout, Duration::from_secs(2));
        let c = c.allow_host_port(6000);
        assert!(c.host_ports.allows(6000) && !c.host_ports.allows(6001));
        let any = VsockConfig {
            host_ports: HostPorts::Any,
            ..VsockConfig::default()
        }
        .allow_host_port(1);
        assert_eq!(any.host_ports, HostPorts::Any);
        assert!(any.host_ports.allows(u32::MAX));
    }

    #[test]
    fn each_bad_field_has_its_own_error() {
        let ok = VsockConfig::default();
        let check = |c: VsockConfig| c.validate().unwrap_err();
        let e = check(VsockConfig {
            max_connections: Some(0),
            ..ok.clone()
        });
        assert_eq!(e, VsockConfigError::ZeroMaxConnections);
        assert!(e.to_string().contains("at least 1"), "{e}");
        for bad in [0, MIN_BUFFER_SIZE - 1, MAX_BUFFER_SIZE + 1, u32::MAX] {
            let e = check(VsockConfig {
                buffer_size: bad,
                ..ok.clone()
            });
            assert_eq!(e, VsockConfigError::BufferSize(bad));
        }
        for bad in [Duration::ZERO, MAX_TIMEOUT + Duration::from_nanos(1)] {
            let e = check(VsockConfig {
                connect_timeout: bad,
                ..ok.clone()
            });
            assert_eq!(e, VsockConfigError::ConnectTimeout(bad));
        }
        let e = check(VsockConfig {
            drain_timeout: Duration::MAX,
            ..ok.clone()
        });
        assert_eq!(e, VsockConfigError::DrainTimeout(Duration::MAX));
        // The edges are fine.
        let edges = VsockConfig {
            max_connections: Some(1),
            buffer_size: MIN_BUFFER_SIZE,
            connect_timeout: MAX_TIMEOUT,
            drain_timeout: Duration::ZERO,
            ..ok
        };
        assert_eq!(edges.validate(), Ok(()));
        assert_eq!(edges.effective_max_connections(), 1);
    }

    #[test]
    fn a_config_survives_the_snapshot_encoding() {
        for config in [
            VsockConfig::default(),
            VsockConfig {
                host_ports: HostPorts::Any,
                max_connections: Some(7),
                buffer_size: MIN_BUFFER_SIZE,
                connect_timeout: Duration::from_millis(1500),
                drain_timeout: Duration::ZERO,
            },
            VsockConfig::default()
                .allow_host_port(0)
                .allow_host_port(u32::MAX),
        ] {
            let bytes = postcard::to_allocvec(&config).unwrap();
            let back: VsockConfig = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, config);
        }
    }

    #[test]
    fn the_default_connection_limit_follows_the_fd_limit() {
        assert_eq!(default_max_connections(1024), 128);
        assert_eq!(default_max_connections(4096), 512);
        assert_eq!(default_max_connections(1 << 20), MAX_DEFAULT_CONNECTIONS);
        assert_eq!(default_max_connections(u64::MAX), MAX_DEFAULT_CONNECTIONS);
        assert_eq!(default_max_connections(16), 2);
        assert_eq!(default_max_connections(0), 1);
        let auto = VsockConfig::default().effective_max_connections();
        let soft = super::super::budget::soft_nofile();
        assert_eq!(
            auto,
            usize::try_from(default_max_connections(soft)).unwrap()
        );
    }
}
