//! vCPU initialisation and the registers dormouse sets to start a guest.

use std::mem::offset_of;

use kvm_bindings::{
    kvm_regs, kvm_vcpu_init, user_pt_regs, PSR_MODE_EL1h, KVM_ARM_VCPU_POWER_OFF,
    KVM_ARM_VCPU_PSCI_0_2, KVM_REG_ARM64, KVM_REG_ARM64_SYSREG, KVM_REG_ARM64_SYSREG_CRM_SHIFT,
    KVM_REG_ARM64_SYSREG_CRN_SHIFT, KVM_REG_ARM64_SYSREG_OP0_SHIFT, KVM_REG_ARM64_SYSREG_OP1_SHIFT,
    KVM_REG_ARM64_SYSREG_OP2_SHIFT, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64, PSR_A_BIT, PSR_D_BIT,
    PSR_F_BIT, PSR_I_BIT,
};
use kvm_ioctls::{VcpuFd, VmFd};

pub use super::state::{SavedReg, VcpuState};
use super::ArchError;

/// PSTATE at boot: EL1 with SP_EL1, debug, SError, IRQ and FIQ masked (the
/// arm64 boot protocol).
pub const BOOT_PSTATE: u64 = (PSR_MODE_EL1h | PSR_D_BIT | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT) as u64;

/// The KVM register id of a 64-bit core register at `offset` in `kvm_regs`.
const fn core_reg_id(offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (offset / 4) as u64
}

/// Register id of the program counter.
pub const PC: u64 = core_reg_id(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pc));
/// Register id of PSTATE.
pub const PSTATE: u64 = core_reg_id(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pstate));
/// Register id of x0 (x1..x30 follow at 8-byte steps).
pub const X0: u64 = core_reg_id(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, regs));

/// The KVM register id of the system register (op0, op1, CRn, CRm, op2).
const fn sys_reg_id(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG as u64
        | (op0 << KVM_REG_ARM64_SYSREG_OP0_SHIFT)
        | (op1 << KVM_REG_ARM64_SYSREG_OP1_SHIFT)
        | (crn << KVM_REG_ARM64_SYSREG_CRN_SHIFT)
        | (crm << KVM_REG_ARM64_SYSREG_CRM_SHIFT)
        | (op2 << KVM_REG_ARM64_SYSREG_OP2_SHIFT)
}

/// Register id of MPIDR_EL1, the vCPU's affinity (what PSCI CPU_ON and the
/// device tree name it by).
pub const MPIDR_EL1: u64 = sys_reg_id(3, 0, 0, 0, 5);

/// Reads vCPU `index`'s MPIDR_EL1, as KVM assigned it.
pub fn mpidr(vcpu: &VcpuFd, index: u32) -> Result<u64, ArchError> {
    let mut bytes = [0u8; 8];
    vcpu.get_one_reg(MPIDR_EL1, &mut bytes)
        .map_err(|source| ArchError::GetRegister {
            index,
            name: "MPIDR_EL1",
            source,
        })?;
    Ok(u64::from_le_bytes(bytes))
}

/// Initialises vCPU `index` for PSCI 0.2. Every vCPU but the first starts
/// powered off, waiting for the guest's PSCI CPU_ON.
pub fn init_vcpu(vm: &VmFd, vcpu: &VcpuFd, index: u32) -> Result<(), ArchError> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(ArchError::PreferredTarget)?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    if index > 0 {
        kvi.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    vcpu.vcpu_init(&kvi)
        .map_err(|source| ArchError::VcpuInit { index, source })
}

fn set_reg(
    vcpu: &VcpuFd,
    index: u32,
    name: &'static str,
    id: u64,
    value: u64,
) -> Result<(), ArchError> {
    vcpu.set_one_reg(id, &value.to_le_bytes())
        .map(|_| ())
        .map_err(|source| ArchError::SetRegister {
            index,
            name,
            source,
        })
}

/// Points the boot vCPU at `entry` in EL1h with interrupts masked and `x0`
/// holding `x0` (the device tree address for a Linux kernel).
pub fn set_boot_registers(vcpu: &VcpuFd, index: u32, entry: u64, x0: u64) -> Result<(), ArchError> {
    set_reg(vcpu, index, "PSTATE", PSTATE, BOOT_PSTATE)?;
    set_reg(vcpu, index, "PC", PC, entry)?;
    set_reg(vcpu, index, "X0", X0, x0)
}

/// The largest register KVM has on arm64 (an SVE Z register, 2048 bits).
const MAX_REG_BYTES: usize = 256;

/// The size in bytes a register id encodes.
fn reg_size(id: u64) -> usize {
    let shift = (id & kvm_bindings::KVM_REG_SIZE_MASK) >> kvm_bindings::KVM_REG_SIZE_SHIFT;
    // The size field is 4 bits: at most 1 << 15, so the shift cannot overflow.
    1usize << shift.min(15)
}

/// The most registers kvm-bindings' `RegList` holds (arm64 vCPUs have a
/// few hundred without SVE).
const REG_LIST_CAPACITY: usize = 500;

fn reg_list(vcpu: &VcpuFd, index: u32) -> Result<Vec<u64>, ArchError> {
    let mut list = kvm_bindings::RegList::new(REG_LIST_CAPACITY)
        .map_err(|_| ArchError::GicState("cannot allocate the register list".into()))?;
    vcpu.get_reg_list(&mut list)
        .map_err(|source| ArchError::RegList { index, source })?;
    Ok(list.as_slice().to_vec())
}

/// Saves vCPU `index`. The vCPU must not be running.
pub fn save_vcpu(vcpu: &VcpuFd, index: u32) -> Result<VcpuState, ArchError> {
    let ids = reg_list(vcpu, index)?;
    let mut regs = Vec::with_capacity(ids.len());
    for id in ids {
        let mut value = vec![0u8; reg_size(id).min(MAX_REG_BYTES)];
        vcpu.get_one_reg(id, &mut value)
            .map_err(|source| ArchError::GetRegister {
                index,
                name: "(from KVM_GET_REG_LIST)",
                source,
            })?;
        regs.push(SavedReg { id, value });
    }
    let mp_state = vcpu
        .get_mp_state()
        .map_err(|source| ArchError::MpState {
            what: "GET",
            index,
            source,
        })?
        .mp_state;
    Ok(VcpuState {
        mpidr: mpidr(vcpu, index)?,
        mp_state,
        regs,
    })
}

/// Restores a saved vCPU onto `vcpu`, which must have been initialised
/// with [`init_vcpu`]. A register whose saved size does not match its id is
/// refused (the state file is untrusted input).
pub fn restore_vcpu(vcpu: &VcpuFd, index: u32, state: &VcpuState) -> Result<(), ArchError> {
    for reg in &state.regs {
        if reg.value.len() != reg_size(reg.id) || reg.value.len() > MAX_REG_BYTES {
            return Err(ArchError::GicState(format!(
                "register {:#x} of vCPU {index} holds {} bytes, its id says {}",
                reg.id,
                reg.value.len(),
                reg_size(reg.id)
            )));
        }
        vcpu.set_one_reg(reg.id, &reg.value)
            .map_err(|source| ArchError::RestoreRegister {
                index,
                id: reg.id,
                source,
            })?;
    }
    vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(|source| ArchError::MpState {
        what: "SET",
        index,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_sizes_come_from_the_id() {
        assert_eq!(reg_size(PC), 8);
        assert_eq!(reg_size(MPIDR_EL1), 8);
        // KVM_REG_SIZE_U128 (FP/SIMD V registers).
        assert_eq!(reg_size(KVM_REG_ARM64 | (4 << 52)), 16);
        assert_eq!(reg_size(KVM_REG_ARM64 | (2 << 52)), 4);
    }
}
