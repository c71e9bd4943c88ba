//! CPU interface (ICC_*_EL1) system registers, one set per vCPU.

use kvm_bindings::{
    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, KVM_REG_ARM64_SYSREG_CRM_SHIFT,
    KVM_REG_ARM64_SYSREG_CRN_SHIFT, KVM_REG_ARM64_SYSREG_OP0_SHIFT, KVM_REG_ARM64_SYSREG_OP1_SHIFT,
    KVM_REG_ARM64_SYSREG_OP2_SHIFT,
};
use kvm_ioctls::DeviceFd;

use super::regs::{self, Reg, RegWords};
use crate::arch::aarch64::state::IccState;
use crate::arch::aarch64::ArchError;

const fn sys_reg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> Reg {
    Reg::new(
        (op0 << KVM_REG_ARM64_SYSREG_OP0_SHIFT)
            | (op1 << KVM_REG_ARM64_SYSREG_OP1_SHIFT)
            | (crn << KVM_REG_ARM64_SYSREG_CRN_SHIFT)
            | (crm << KVM_REG_ARM64_SYSREG_CRM_SHIFT)
            | (op2 << KVM_REG_ARM64_SYSREG_OP2_SHIFT),
        8,
    )
}

const ICC_CTLR_EL1: Reg = sys_reg(3, 0, 12, 12, 4);

/// The registers every GICv3 CPU interface has, in restore order
/// (SRE before the rest).
const MAIN: &[(&str, Reg)] = &[
    ("ICC_SRE_EL1", sys_reg(3, 0, 12, 12, 5)),
    ("ICC_CTLR_EL1", ICC_CTLR_EL1),
    ("ICC_IGRPEN0_EL1", sys_reg(3, 0, 12, 12, 6)),
    ("ICC_IGRPEN1_EL1", sys_reg(3, 0, 12, 12, 7)),
    ("ICC_PMR_EL1", sys_reg(3, 0, 4, 6, 0)),
    ("ICC_BPR0_EL1", sys_reg(3, 0, 12, 8, 3)),
    ("ICC_BPR1_EL1", sys_reg(3, 0, 12, 12, 3)),
];

/// Active-priority register `n` of group 0 or 1. How many exist depends on
/// the priority bits the CPU interface implements.
const fn ap_reg(group: u64, n: u64) -> Reg {
    if group == 0 {
        sys_reg(3, 0, 12, 8, 4 | n)
    } else {
        sys_reg(3, 0, 12, 9, n)
    }
}

/// How many AP<g>R<n> registers exist: 1 with 5 priority bits, 2 with 6,
/// 4 with 7 (ICC_CTLR_EL1.PRIbits + 1).
fn ap_count(fd: &DeviceFd, vcpu: u64) -> Result<u64, ArchError> {
    let ctlr: RegWords<u64> = regs::get(
        fd,
        KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
        vcpu,
        ICC_CTLR_EL1,
        "ICC_CTLR_EL1",
    )?;
    let pri_bits = ((ctlr.words[0] >> 8) & 0x7) + 1;
    Ok(match pri_bits {
        7 => 4,
        6 => 2,
        _ => 1,
    })
}

fn ap_regs(count: u64) -> impl Iterator<Item = Reg> {
    (0..2).flat_map(move |group| (0..count).map(move |n| ap_reg(group, n)))
}

/// Reads the CPU interface of the vCPU with this MPIDR.
pub(super) fn save(fd: &DeviceFd, mpidr: u64) -> Result<IccState, ArchError> {
    let vcpu = regs::vcpu_attr(mpidr);
    let group = KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS;
    let main = MAIN
        .iter()
        .map(|(name, reg)| regs::get(fd, group, vcpu, *reg, name))
        .collect::<Result<_, _>>()?;
    let active_priorities = ap_regs(ap_count(fd, vcpu)?)
        .map(|reg| regs::get(fd, group, vcpu, reg, "ICC_APxRn_EL1"))
        .collect::<Result<_, _>>()?;
    Ok(IccState {
        main,
        active_priorities,
    })
}

/// Writes it back. The host's CPU interface must implement as many
/// priority bits as the one the state was saved on.
pub(super) fn restore(fd: &DeviceFd, mpidr: u64, saved: &IccState) -> Result<(), ArchError> {
    let vcpu = regs::vcpu_attr(mpidr);
    let group = KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS;
    if saved.main.len() != MAIN.len() {
        return Err(ArchError::GicState(format!(
            "{} ICC registers saved, expected {}",
            saved.main.len(),
            MAIN.len()
        )));
    }
    for ((name, reg), words) in MAIN.iter().zip(&saved.main) {
        regs::set(fd, group, vcpu, *reg, words, name, false)?;
    }
    let count = ap_count(fd, vcpu)?;
    if saved.active_priorities.len() as u64 != 2 * count {
        return Err(ArchError::GicState(format!(
            "{} active-priority registers saved but this host's GIC has {}: restore on a \
             host with the same GIC",
            saved.active_priorities.len(),
            2 * count
        )));
    }
    for (reg, words) in ap_regs(count).zip(&saved.active_priorities) {
        regs::set(fd, group, vcpu, reg, words, "ICC_APxRn_EL1", false)?;
    }
    Ok(())
}
