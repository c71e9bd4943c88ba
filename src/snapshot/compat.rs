//! Reading state files written by older minor versions of the format.
//!
//! The payload is postcard, which has no field names or tags: a struct
//! decodes only with exactly the fields, in exactly the order, it was
//! encoded with. So each minor version the format ever had keeps a frozen
//! copy of the serialized structs that changed after it (a module here,
//! `v1_0` for format 1.0), and [`decode_payload`] picks the decoder by the
//! header's minor version, then converts the old structs into this build's
//! [`VmState`] with a default for every field added since.
//!
//! The rule (also in docs/snapshot-format.md):
//!
//! - Adding a field to a serialized struct, or a variant to a serialized
//!   enum, bumps [`MINOR`](super::format::MINOR). Before changing the
//!   struct, the version about to become old gets its frozen copy here
//!   (structs that do not change stay shared), its arm in
//!   [`decode_payload`], and a conversion that gives the new fields their
//!   defaults: the value that means what an old file meant.
//! - A frozen module never changes; `tests/golden/v<major>_<minor>/state`,
//!   written by that version's encoder, must keep decoding to the same
//!   state. Removing or re-typing a field is a major bump.
//!
//! History:
//! - 1.0: the first format.
//! - 1.1: `SavedDevice::Block` and `SavedDevice::Net` gained their rate
//!   limits (1.0: unlimited), `SavedDevice::Vsock` its `VsockConfig` (1.0:
//!   any host port, as 1.0 builds allowed; the other limits at their
//!   defaults), and `TransportState` its rate limiters' budgets (1.0: none
//!   saved, the buckets start full).
//! - 1.2: `VmState` gained `vmgenid`, the VM generation ID device's address,
//!   interrupt and ID (1.0 and 1.1: `None`, the VM has no such device).

use super::format::{MAJOR, MINOR};
use super::{SnapshotError, VmState};

/// Decodes a payload the header says is format `MAJOR.minor` into this
/// build's [`VmState`]. The header was checked: `minor <= MINOR`.
pub fn decode_payload(minor: u16, payload: &[u8]) -> Result<VmState, SnapshotError> {
    match minor {
        0 => v1_0::decode(payload),
        1 => v1_1::decode(payload),
        m if m == MINOR => postcard::from_bytes(payload).map_err(SnapshotError::Decode),
        m => Err(SnapshotError::UnsupportedVersion {
            file: (MAJOR, m),
            reader: (MAJOR, MINOR),
        }),
    }
}

/// Format 1.0's serialized structs, frozen. vCPU, vGIC, UART, RTC and
/// queue states are shared with the current format (they have not changed
/// since 1.0); the golden file test fails if one of them does without a
/// copy here.
pub mod v1_0 {
    use std::path::PathBuf;

    use serde::{Deserialize, Serialize};

    use crate::arch::aarch64::state::{GicState, VcpuState};
    use crate::devices::rtc::RtcSnapshot;
    use crate::devices::serial::SerialSnapshot;
    use crate::devices::virtio::mmio::SavedQueue;
    use crate::devices::virtio::vsock::{HostPorts, VsockConfig};
    use crate::rate_limiter::RateLimiterConfig;
    use crate::snapshot::{SnapshotError, SnapshotId};

    /// Format 1.0's [`crate::devices::virtio::mmio::TransportState`].
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct TransportState {
        /// The device type.
        pub device_type: u32,
        /// The status register.
        pub status: u32,
        /// DeviceFeaturesSel.
        pub device_features_sel: u32,
        /// DriverFeaturesSel.
        pub driver_features_sel: u32,
        /// The features the driver wrote.
        pub driver_features: u64,
        /// QueueSel.
        pub queue_sel: u32,
        /// Pending InterruptStatus bits.
        pub interrupt_status: u32,
        /// ConfigGeneration.
        pub config_generation: u32,
        /// The queues.
        pub queues: Vec<SavedQueue>,
    }

    /// Format 1.0's [`crate::snapshot::SavedDevice`].
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub enum SavedDevice {
        /// virtio-blk on a raw file.
        Block {
            /// The disk image.
            path: PathBuf,
            /// Whether guest writes are refused.
            read_only: bool,
        },
        /// virtio-net on a TAP.
        Net {
            /// The TAP's interface name.
            tap: String,
            /// The MAC address.
            mac: [u8; 6],
        },
        /// virtio-vsock.
        Vsock {
            /// The guest's CID.
            cid: u64,
            /// The host-side Unix socket.
            uds_path: PathBuf,
        },
    }

    /// Format 1.0's [`crate::snapshot::SavedConfig`].
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct SavedConfig {
        /// Guest RAM in bytes.
        pub memory_size: u64,
        /// vCPU count.
        pub vcpus: u32,
        /// Whether the VM has the PL031 RTC.
        pub rtc: bool,
        /// Whether dirty pages are tracked.
        pub dirty_tracking: bool,
        /// Whether KVM's dirty ring is preferred to its bitmap log.
        pub dirty_ring: bool,
        /// virtio devices, in attach (MMIO slot) order.
        pub devices: Vec<SavedDevice>,
    }

    /// Format 1.0's [`crate::snapshot::MemoryRegionState`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MemoryRegionState {
        /// Guest physical start.
        pub guest_addr: u64,
        /// Size in bytes.
        pub size: u64,
        /// Offset in the memory file.
        pub file_offset: u64,
    }

    /// Format 1.0's [`crate::snapshot::VmState`].
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct VmState {
        /// This snapshot's identity.
        pub id: SnapshotId,
        /// For a diff, the snapshot it was taken on top of.
        pub parent: Option<SnapshotId>,
        /// For a diff, per memory region, its runs of pages.
        pub diff: Option<Vec<Vec<(u64, u64)>>>,
        /// How to rebuild the VM.
        pub config: SavedConfig,
        /// The guest RAM layout in the memory file.
        pub memory: Vec<MemoryRegionState>,
        /// Each vCPU, in order.
        pub vcpus: Vec<VcpuState>,
        /// The vGICv3.
        pub gic: GicState,
        /// The console UART.
        pub serial: SerialSnapshot,
        /// The RTC, if the VM has one.
        pub rtc: Option<RtcSnapshot>,
        /// Each virtio transport, in slot order.
        pub virtio: Vec<TransportState>,
    }

    /// Decodes a format 1.0 payload into this build's state.
    pub fn decode(payload: &[u8]) -> Result<crate::snapshot::VmState, SnapshotError> {
        let old: VmState = postcard::from_bytes(payload).map_err(SnapshotError::Decode)?;
        Ok(old.into())
    }

    // The conversions name every field on both sides (no `..`): a field
    // added to a current struct does not compile until it gets its 1.0
    // default here.

    impl From<SavedDevice> for crate::snapshot::SavedDevice {
        fn from(old: SavedDevice) -> Self {
            match old {
                SavedDevice::Block { path, read_only } => Self::Block {
                    path,
                    read_only,
                    rate_limiter: RateLimiterConfig::default(),
                },
                SavedDevice::Net { tap, mac } => Self::Net {
                    tap,
                    mac,
                    rx_rate_limiter: RateLimiterConfig::default(),
                    tx_rate_limiter: RateLimiterConfig::default(),
                },
                // 1.0 builds let the guest connect to any host port: a
                // suspended session keeps working as it did.
                SavedDevice::Vsock { cid, uds_path } => Self::Vsock {
                    cid,
                    uds_path,
                    config: VsockConfig {
                        host_ports: HostPorts::Any,
                        ..VsockConfig::default()
                    },
                },
            }
        }
    }

    impl From<TransportState> for crate::devices::virtio::mmio::TransportState {
        fn from(old: TransportState) -> Self {
            let TransportState {
                device_type,
                status,
                device_features_sel,
                driver_features_sel,
                driver_features,
                queue_sel,
                interrupt_status,
                config_generation,
                queues,
            } = old;
            Self {
                device_type,
                status,
                device_features_sel,
                driver_features_sel,
                driver_features,
                queue_sel,
                interrupt_status,
                config_generation,
                queues,
                rate_limiters: Vec::new(),
            }
        }
    }

    impl From<SavedConfig> for crate::snapshot::SavedConfig {
        fn from(old: SavedConfig) -> Self {
            let SavedConfig {
                memory_size,
                vcpus,
                rtc,
                dirty_tracking,
                dirty_ring,
                devices,
            } = old;
            Self {
                memory_size,
                vcpus,
                rtc,
                dirty_tracking,
                dirty_ring,
                devices: devices.into_iter().map(Into::into).collect(),
            }
        }
    }

    impl From<MemoryRegionState> for crate::snapshot::MemoryRegionState {
        fn from(old: MemoryRegionState) -> Self {
            let MemoryRegionState {
                guest_addr,
                size,
                file_offset,
            } = old;
            Self {
                guest_addr,
                size,
                file_offset,
            }
        }
    }

    impl From<VmState> for crate::snapshot::VmState {
        fn from(old: VmState) -> Self {
            let VmState {
                id,
                parent,
                diff,
                config,
                memory,
                vcpus,
                gic,
                serial,
                rtc,
                virtio,
            } = old;
            Self {
                id,
                parent,
                diff,
                config: config.into(),
                memory: memory.into_iter().map(Into::into).collect(),
                vcpus,
                gic,
                serial,
                rtc,
                virtio: virtio.into_iter().map(Into::into).collect(),
                // 1.0 VMs had no VM generation ID device.
                vmgenid: None,
            }
        }
    }
}

/// Format 1.1's serialized structs, frozen: only [`VmState`](v1_1::VmState)
/// changed after 1.1; everything it holds is shared with the current
/// format.
pub mod v1_1 {
    use serde::{Deserialize, Serialize};

    use crate::arch::aarch64::state::{GicState, VcpuState};
    use crate::devices::rtc::RtcSnapshot;
    use crate::devices::serial::SerialSnapshot;
    use crate::devices::virtio::mmio::TransportState;
    use crate::snapshot::{MemoryRegionState, SavedConfig, SnapshotError, SnapshotId};

    /// Format 1.1's [`crate::snapshot::VmState`].
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct VmState {
        /// This snapshot's identity.
        pub id: SnapshotId,
        /// For a diff, the snapshot it was taken on top of.
        pub parent: Option<SnapshotId>,
        /// For a diff, per memory region, its runs of pages.
        pub diff: Option<Vec<Vec<(u64, u64)>>>,
        /// How to rebuild the VM.
        pub config: SavedConfig,
        /// The guest RAM layout in the memory file.
        pub memory: Vec<MemoryRegionState>,
        /// Each vCPU, in order.
        pub vcpus: Vec<VcpuState>,
        /// The vGICv3.
        pub gic: GicState,
        /// The console UART.
        pub serial: SerialSnapshot,
        /// The RTC, if the VM has one.
        pub rtc: Option<RtcSnapshot>,
        /// Each virtio transport, in slot order.
        pub virtio: Vec<TransportState>,
    }

    /// Decodes a format 1.1 payload into this build's state.
    pub fn decode(payload: &[u8]) -> Result<crate::snapshot::VmState, SnapshotError> {
        let old: VmState = postcard::from_bytes(payload).map_err(SnapshotError::Decode)?;
        Ok(old.into())
    }

    // Names every field on both sides, as v1_0's conversions do.
    impl From<VmState> for crate::snapshot::VmState {
        fn from(old: VmState) -> Self {
            let VmState {
                id,
                parent,
                diff,
                config,
                memory,
                vcpus,
                gic,
                serial,
                rtc,
                virtio,
            } = old;
            Self {
                id,
                parent,
                diff,
                config,
                memory,
                vcpus,
                gic,
                serial,
                rtc,
                virtio,
                // 1.1 VMs had no VM generation ID device.
                vmgenid: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minor_this_build_does_not_know_is_refused() {
        assert!(matches!(
            decode_payload(MINOR + 1, &[]),
            Err(SnapshotError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn a_payload_that_is_not_a_1_0_state_is_a_decode_error() {
        assert!(matches!(
            decode_payload(0, &[0xff; 3]),
            Err(SnapshotError::Decode(_))
        ));
    }

    #[test]
    fn a_payload_that_is_not_a_1_1_state_is_a_decode_error() {
        assert!(matches!(
            decode_payload(1, &[0xff; 3]),
            Err(SnapshotError::Decode(_))
        ));
    }
}
