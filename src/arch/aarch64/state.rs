//! The saved state of aarch64 vCPUs and the vGICv3, as plain data.
//!
//! These types compile on every host, so snapshot files can be decoded and
//! checked (and fuzzed) anywhere; saving and restoring them needs KVM on an
//! aarch64 host (`regs.rs`, `gic/`).

use serde::{Deserialize, Serialize};

/// One saved vCPU register: its KVM id and little-endian value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedReg {
    /// The KVM_{GET,SET}_ONE_REG id (which also encodes the size).
    pub id: u64,
    /// The value, as KVM gave it.
    pub value: Vec<u8>,
}

/// Everything KVM holds for one vCPU: every register in its
/// KVM_GET_REG_LIST (core, FP/SIMD, system registers, the timers and
/// counter, firmware pseudo-registers) and its power state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// MPIDR_EL1 (also in `regs`; kept apart for the vGIC).
    pub mpidr: u64,
    /// KVM_GET_MP_STATE: runnable, stopped (PSCI off), suspended.
    pub mp_state: u32,
    /// The registers, in KVM's list order.
    pub regs: Vec<SavedReg>,
}

/// The saved words of one vGIC register (or register array).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegWords<T> {
    /// The register's words, from its first offset up.
    pub words: Vec<T>,
}

/// One vCPU's GIC CPU interface (ICC_*_EL1) registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IccState {
    /// SRE, CTLR, IGRPEN0, IGRPEN1, PMR, BPR0, BPR1, in that order.
    pub main: Vec<RegWords<u64>>,
    /// ICC_AP0R<n>_EL1 then ICC_AP1R<n>_EL1 for each n the GIC implements.
    pub active_priorities: Vec<RegWords<u64>>,
}

/// One vCPU's redistributor and CPU interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicVcpuState {
    /// Redistributor registers.
    pub redist: Vec<RegWords<u32>>,
    /// CPU interface system registers.
    pub icc: IccState,
}

/// The state of the vGICv3 and of each vCPU's interface to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicState {
    /// Distributor registers.
    pub dist: Vec<RegWords<u32>>,
    /// Per vCPU, in vCPU order.
    pub vcpus: Vec<GicVcpuState>,
}
