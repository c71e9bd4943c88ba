//! Golden state files: a file written by an older dormouse keeps loading.
//!
//! `tests/golden/v1_0/state` was written by the format 1.0 encoder (before
//! any serialized struct changed) from [`state_1_0`], `v1_1/state` by the
//! 1.1 encoder from [`state_1_1`], `v1_2/state` by the 1.2 encoder from
//! [`state_1_2`]. None is ever regenerated: a build that cannot read it has broken every 1.0 snapshot
//! users have on disk. When a minor version adds fields, the expected
//! state below gains them with the defaults the 1.0 conversion gives
//! (`src/snapshot/compat.rs`); see docs/snapshot-format.md.

use dormouse::arch::aarch64::state::{
    GicState, GicVcpuState, IccState, RegWords, SavedReg, VcpuState,
};
use dormouse::devices::rtc::RtcSnapshot;
use dormouse::devices::serial::SerialSnapshot;
use dormouse::devices::virtio::mmio::{SavedQueue, TransportState};
use dormouse::devices::virtio::vsock::{HostPorts, VsockConfig};
use dormouse::devices::vmgenid::VmGenIdSnapshot;
use dormouse::rate_limiter::{
    RateLimiterConfig, RateLimiterState, TokenBucketConfig, TokenBucketState,
};
use dormouse::snapshot::compat::{v1_0, v1_1};
use dormouse::snapshot::{
    format, MemoryRegionState, SavedConfig, SavedDevice, SnapshotId, VmState,
};

/// `tests/golden/v1_0/state`, built into the test (the emulated host has
/// no source tree).
const GOLDEN_1_0: &[u8] = include_bytes!("golden/v1_0/state");
/// `tests/golden/v1_1/state`, written by the format 1.1 encoder from
/// [`state_1_1`].
const GOLDEN_1_1: &[u8] = include_bytes!("golden/v1_1/state");
/// `tests/golden/v1_2/state`, written by the format 1.2 encoder from
/// [`state_1_2`].
const GOLDEN_1_2: &[u8] = include_bytes!("golden/v1_2/state");

fn queue(n: u16) -> SavedQueue {
    SavedQueue {
        max_size: 256,
        next_avail: 17 + n,
        next_used: 15 + n,
        event_idx_enabled: n != 1,
        size: 128,
        ready: true,
        desc_table: 0x8100_0000 + u64::from(n) * 0x1_0000,
        avail_ring: 0x8100_1000 + u64::from(n) * 0x1_0000,
        used_ring: 0x8100_2000 + u64::from(n) * 0x1_0000,
    }
}

fn transport(device_type: u32, queues: u16) -> TransportState {
    TransportState {
        device_type,
        status: 0x0f,
        device_features_sel: 1,
        driver_features_sel: 0,
        driver_features: 0x1_3000_0246,
        queue_sel: u32::from(queues) - 1,
        interrupt_status: 1,
        config_generation: 3,
        queues: (0..queues).map(queue).collect(),
        rate_limiters: Vec::new(),
    }
}

/// The state in `tests/golden/v1_0/state`, as this build's structs hold it:
/// a 2-vCPU diff with one device of each kind, an RTC, and every field set
/// to something other than its default.
fn state_1_0() -> VmState {
    let vcpu = |n: u8| VcpuState {
        mpidr: 0x8000_0000 | u64::from(n),
        mp_state: u32::from(n),
        regs: vec![
            SavedReg {
                id: 0x6030_0000_0010_0000,
                value: vec![n, 1, 2, 3, 4, 5, 6, 7],
            },
            SavedReg {
                id: 0x6040_0000_0010_0054,
                value: (0..16).map(|b| b ^ n).collect(),
            },
        ],
    };
    let gic_vcpu = |n: u32| GicVcpuState {
        redist: vec![
            RegWords {
                words: vec![n, 0xffff_0000],
            },
            RegWords { words: vec![7] },
        ],
        icc: IccState {
            main: vec![RegWords {
                words: vec![7, 0, 1, u64::from(n)],
            }],
            active_priorities: vec![RegWords { words: vec![0, 1] }],
        },
    };
    VmState {
        id: SnapshotId(*b"golden-v1.0-id!!"),
        parent: Some(SnapshotId(*b"golden-v1.0-base")),
        diff: Some(vec![vec![(0, 3), (100, 1), (4000, 96)]]),
        config: SavedConfig {
            memory_size: 64 << 20,
            vcpus: 2,
            rtc: true,
            dirty_tracking: true,
            dirty_ring: true,
            devices: vec![
                // Fields added in 1.1 hold what a 1.0 file meant: no rate
                // limits, and a guest that may connect to any host port.
                SavedDevice::Block {
                    path: "/disks/golden.ext4".into(),
                    read_only: true,
                    rate_limiter: RateLimiterConfig::default(),
                },
                SavedDevice::Net {
                    tap: "dmtap-golden".into(),
                    mac: [6, 0x64, 0x6d, 0x73, 0, 1],
                    rx_rate_limiter: RateLimiterConfig::default(),
                    tx_rate_limiter: RateLimiterConfig::default(),
                },
                SavedDevice::Vsock {
                    cid: 42,
                    uds_path: "/run/golden.vsock".into(),
                    config: VsockConfig {
                        host_ports: HostPorts::Any,
                        ..VsockConfig::default()
                    },
                },
            ],
        },
        memory: vec![MemoryRegionState {
            guest_addr: 0x8000_0000,
            size: 64 << 20,
            file_offset: 0,
        }],
        vcpus: vec![vcpu(0), vcpu(1)],
        gic: GicState {
            dist: vec![
                RegWords {
                    words: vec![0x37, 0x1f],
                },
                RegWords {
                    words: vec![0xa0a0_a0a0; 4],
                },
            ],
            vcpus: vec![gic_vcpu(0), gic_vcpu(1)],
        },
        serial: SerialSnapshot {
            baud_divisor: [0x0c, 0],
            interrupt_enable: 1,
            interrupt_identification: 0xc1,
            line_control: 3,
            line_status: 0x61,
            modem_control: 8,
            modem_status: 0xb0,
            scratch: 0x5a,
            in_buffer: b"ls\n".to_vec(),
        },
        rtc: Some(RtcSnapshot {
            lr: 0x6000_0000,
            offset: -12345,
            mr: 7,
            imsc: 1,
            ris: 0,
        }),
        virtio: vec![transport(2, 1), transport(1, 2), transport(19, 3)],
        // Added in 1.2: 1.0 VMs had no VM generation ID device.
        vmgenid: None,
    }
}

#[test]
fn the_format_1_0_golden_file_decodes_to_its_state() {
    let bytes = GOLDEN_1_0;
    let header = format::Header::parse(bytes).unwrap();
    assert_eq!((header.major, header.minor), (1, 0));
    assert_eq!(format::decode(bytes).unwrap(), state_1_0());
}

#[test]
fn the_format_1_0_golden_file_restores_through_read_state() {
    // The whole read path: open checks, size bound, decode, validation.
    let dir = std::env::temp_dir().join(format!("dormouse-golden-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(dormouse::snapshot::STATE_FILE), GOLDEN_1_0).unwrap();
    let state = dormouse::snapshot::read_state(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(state.unwrap(), state_1_0());
}

#[test]
fn the_frozen_1_0_structs_reencode_the_golden_file_byte_for_byte() {
    let bytes = GOLDEN_1_0;
    let (_, payload) = format::check(bytes).unwrap();
    let old: v1_0::VmState = postcard::from_bytes(payload).unwrap();
    assert_eq!(format::encode_version(&old, 0).unwrap(), bytes);
    assert_eq!(VmState::from(old), state_1_0());
}

/// A state this build writes reads back as itself.
#[test]
fn a_state_this_build_writes_reads_back_unchanged() {
    for state in [state_1_0(), state_1_2()] {
        let bytes = format::encode(&state).unwrap();
        assert_eq!(format::decode(&bytes).unwrap(), state);
    }
}

/// The state in `tests/golden/v1_1/state`: [`state_1_0`] with every field
/// 1.1 added set to something other than its default.
fn state_1_1() -> VmState {
    let mut state = state_1_0();
    state.id = SnapshotId(*b"golden-v1.1-id!!");
    let bucket = |size, burst, ms| TokenBucketConfig {
        size,
        one_time_burst: burst,
        refill_time_ms: ms,
    };
    for device in &mut state.config.devices {
        match device {
            SavedDevice::Block { rate_limiter, .. } => {
                *rate_limiter = RateLimiterConfig {
                    bandwidth: Some(bucket(1 << 20, 4 << 20, 1000)),
                    ops: Some(bucket(500, 0, 1000)),
                }
            }
            SavedDevice::Net {
                rx_rate_limiter,
                tx_rate_limiter,
                ..
            } => {
                *rx_rate_limiter = RateLimiterConfig {
                    bandwidth: Some(bucket(128 << 10, 0, 100)),
                    ops: None,
                };
                *tx_rate_limiter = RateLimiterConfig {
                    bandwidth: None,
                    ops: Some(bucket(1000, 50, 250)),
                };
            }
            SavedDevice::Vsock { config, .. } => {
                let mut ports = std::collections::BTreeSet::new();
                ports.insert(1025);
                ports.insert(52);
                *config = VsockConfig {
                    host_ports: HostPorts::Only(ports),
                    max_connections: Some(77),
                    buffer_size: 64 << 10,
                    connect_timeout: std::time::Duration::from_millis(1500),
                    drain_timeout: std::time::Duration::from_millis(2500),
                };
            }
        }
    }
    state.virtio[0].rate_limiters = vec![RateLimiterState {
        bandwidth: Some(TokenBucketState {
            budget: -4096,
            one_time_burst: 12345,
        }),
        ops: Some(TokenBucketState {
            budget: 499,
            one_time_burst: 0,
        }),
    }];
    state.virtio[1].rate_limiters = vec![
        RateLimiterState {
            bandwidth: Some(TokenBucketState {
                budget: 1500,
                one_time_burst: 0,
            }),
            ops: None,
        },
        RateLimiterState {
            bandwidth: None,
            ops: Some(TokenBucketState {
                budget: 3,
                one_time_burst: 50,
            }),
        },
    ];
    state
}

#[test]
fn the_format_1_1_golden_file_decodes_to_its_state() {
    let header = format::Header::parse(GOLDEN_1_1).unwrap();
    assert_eq!((header.major, header.minor), (1, 1));
    // Added in 1.2: 1.1 VMs had no VM generation ID device.
    assert_eq!(state_1_1().vmgenid, None);
    assert_eq!(format::decode(GOLDEN_1_1).unwrap(), state_1_1());
}

#[test]
fn the_frozen_1_1_structs_reencode_the_golden_file_byte_for_byte() {
    let (_, payload) = format::check(GOLDEN_1_1).unwrap();
    let old: v1_1::VmState = postcard::from_bytes(payload).unwrap();
    assert_eq!(format::encode_version(&old, 1).unwrap(), GOLDEN_1_1);
    assert_eq!(VmState::from(old), state_1_1());
}

#[test]
fn the_format_1_1_golden_file_restores_through_read_state() {
    let dir = std::env::temp_dir().join(format!("dormouse-golden11-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(dormouse::snapshot::STATE_FILE), GOLDEN_1_1).unwrap();
    let state = dormouse::snapshot::read_state(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(state.unwrap(), state_1_1());
}

/// The state in `tests/golden/v1_2/state`: [`state_1_1`] with the VM
/// generation ID device 1.2 added (its page where the layout puts it, the
/// first SPI after the three virtio devices').
fn state_1_2() -> VmState {
    let mut state = state_1_1();
    state.id = SnapshotId(*b"golden-v1.2-id!!");
    state.vmgenid = Some(VmGenIdSnapshot {
        addr: 0x0d00_0000,
        spi: 4,
        id: *b"golden-v1.2-gen!",
    });
    state
}

#[test]
fn the_format_1_2_golden_file_decodes_to_its_state() {
    let header = format::Header::parse(GOLDEN_1_2).unwrap();
    assert_eq!((header.major, header.minor), (1, 2));
    assert_eq!(format::decode(GOLDEN_1_2).unwrap(), state_1_2());
    state_1_2().validate().unwrap();
    // This build writes 1.2 byte for byte as the file holds it.
    assert_eq!(format::encode(&state_1_2()).unwrap(), GOLDEN_1_2);
}

// The runnable goldens (tests/golden_runs.rs restores and runs them in the
// emulated host): one snapshot of the ticker guest, as format 1.0 and 1.1
// wrote it, and a session image holding it. Here, on any host, what can be
// checked without KVM.

/// `tests/golden/v1_0/runnable/state`.
const RUNNABLE_1_0: &[u8] = include_bytes!("golden/v1_0/runnable/state");
/// `tests/golden/v1_1/runnable/state`.
const RUNNABLE_1_1: &[u8] = include_bytes!("golden/v1_1/runnable/state");
/// `tests/golden/image_v1/image.json`.
const IMAGE_1_MANIFEST: &[u8] = include_bytes!("golden/image_v1/image.json");
/// `tests/golden/image_v1/snapshot/state`.
const IMAGE_1_STATE: &[u8] = include_bytes!("golden/image_v1/snapshot/state");
/// `tests/golden/image_v1/snapshot/memory`.
const IMAGE_1_MEMORY: &[u8] = include_bytes!("golden/image_v1/snapshot/memory");

#[test]
fn the_runnable_golden_snapshots_are_one_state_in_two_formats() {
    let h0 = format::Header::parse(RUNNABLE_1_0).unwrap();
    let h1 = format::Header::parse(RUNNABLE_1_1).unwrap();
    assert_eq!(
        [(h0.major, h0.minor), (h1.major, h1.minor)],
        [(1, 0), (1, 1)]
    );
    let state = format::decode(RUNNABLE_1_1).unwrap();
    state.validate().unwrap();
    assert_eq!(format::decode(RUNNABLE_1_0).unwrap(), state);
    // What a 1.0 file means, in the fields 1.0 did not have.
    let vsock = VsockConfig {
        host_ports: HostPorts::Any,
        ..VsockConfig::default()
    };
    assert!(matches!(
        &state.config.devices[..],
        [SavedDevice::Vsock { config, .. }] if *config == vsock
    ));
    assert!(state.virtio.iter().all(|t| t.rate_limiters.is_empty()));
    // The 1.0 file is what the frozen 1.0 structs write, byte for byte.
    let (_, payload) = format::check(RUNNABLE_1_0).unwrap();
    let old: v1_0::VmState = postcard::from_bytes(payload).unwrap();
    assert_eq!(format::encode_version(&old, 0).unwrap(), RUNNABLE_1_0);
}

#[test]
fn the_golden_image_opens() {
    use dormouse::session::{Image, IMAGE_MANIFEST, IMAGE_SNAPSHOT};
    let dir = std::env::temp_dir().join(format!("dormouse-golden-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join(IMAGE_SNAPSHOT)).unwrap();
    std::fs::write(dir.join(IMAGE_MANIFEST), IMAGE_1_MANIFEST).unwrap();
    let snapshot = dir.join(IMAGE_SNAPSHOT);
    std::fs::write(snapshot.join(dormouse::snapshot::STATE_FILE), IMAGE_1_STATE).unwrap();
    std::fs::write(
        snapshot.join(dormouse::snapshot::MEMORY_FILE),
        IMAGE_1_MEMORY,
    )
    .unwrap();
    let image = Image::open(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let image = image.unwrap();
    let manifest = image.manifest();
    assert_eq!(manifest.format, 1);
    assert_eq!((manifest.memory_mib, manifest.vcpus), (2, 2));
    assert!(manifest.disks.is_empty());
    let state = format::decode(IMAGE_1_STATE).unwrap();
    assert_eq!(manifest.snapshot_id, state.id.to_string());
    assert_eq!(state.config.memory_size, IMAGE_1_MEMORY.len() as u64);
    assert!(state.config.dirty_tracking, "sessions suspend as diffs");
}
