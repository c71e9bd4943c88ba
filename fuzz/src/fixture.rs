//! A minimal saved VM state for the targets that write snapshot files.

use dormouse::arch::aarch64::state::{GicState, GicVcpuState, IccState, VcpuState};
use dormouse::devices::serial::SerialSnapshot;
use dormouse::snapshot::{MemoryRegionState, SavedConfig, SnapshotId, VmState};
use dormouse::DRAM_START;

/// A full snapshot's state of a VM with `memory_size` bytes of RAM at
/// DRAM_START, one vCPU with no registers saved, an empty vGIC, a serial
/// port at reset and no devices: what the snapshot readers accept.
pub fn minimal_state(id: SnapshotId, memory_size: u64, dirty_tracking: bool) -> VmState {
    VmState {
        id,
        parent: None,
        diff: None,
        config: SavedConfig {
            memory_size,
            vcpus: 1,
            rtc: false,
            dirty_tracking,
            dirty_ring: false,
            devices: Vec::new(),
        },
        memory: vec![MemoryRegionState {
            guest_addr: DRAM_START.0,
            size: memory_size,
            file_offset: 0,
        }],
        vcpus: vec![VcpuState {
            mpidr: 0x8000_0000,
            mp_state: 0,
            regs: Vec::new(),
        }],
        gic: GicState {
            dist: Vec::new(),
            vcpus: vec![GicVcpuState {
                redist: Vec::new(),
                icc: IccState {
                    main: Vec::new(),
                    active_priorities: Vec::new(),
                },
            }],
        },
        serial: SerialSnapshot {
            baud_divisor: [0; 2],
            interrupt_enable: 0,
            interrupt_identification: 1,
            line_control: 0,
            line_status: 0x60,
            modem_control: 0,
            modem_status: 0,
            scratch: 0,
            in_buffer: Vec::new(),
        },
        rtc: None,
        virtio: Vec::new(),
        vmgenid: None,
    }
}
