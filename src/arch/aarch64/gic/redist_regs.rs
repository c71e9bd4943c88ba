//! Redistributor registers, one set per vCPU (GICv3 spec, 12.10 and 12.11).

use kvm_bindings::KVM_DEV_ARM_VGIC_GRP_REDIST_REGS;
use kvm_ioctls::DeviceFd;

use super::regs::{self, Reg, RegWords};
use crate::arch::aarch64::ArchError;

/// The SGI_base frame follows RD_base.
const SGI: u64 = 0x1_0000;

/// RD_base controls, then the SGI/PPI state in restore order.
pub(super) const REGS: &[(&str, Reg)] = &[
    ("GICR_CTLR", Reg::new(0x0000, 4)),
    ("GICR_STATUSR", Reg::new(0x0010, 4)),
    ("GICR_WAKER", Reg::new(0x0014, 4)),
    ("GICR_PROPBASER", Reg::new(0x0070, 8)),
    ("GICR_PENDBASER", Reg::new(0x0078, 8)),
    ("GICR_IGROUPR0", Reg::new(SGI + 0x0080, 4)),
    ("GICR_ICENABLER0", Reg::new(SGI + 0x0180, 4)),
    ("GICR_ISENABLER0", Reg::new(SGI + 0x0100, 4)),
    ("GICR_ICFGR0", Reg::new(SGI + 0x0c00, 8)),
    ("GICR_ICPENDR0", Reg::new(SGI + 0x0280, 4)),
    ("GICR_ISPENDR0", Reg::new(SGI + 0x0200, 4)),
    ("GICR_ICACTIVER0", Reg::new(SGI + 0x0380, 4)),
    ("GICR_ISACTIVER0", Reg::new(SGI + 0x0300, 4)),
    ("GICR_IPRIORITYR", Reg::new(SGI + 0x0400, 32)),
];

/// Reads the redistributor of the vCPU with this MPIDR.
pub(super) fn save(fd: &DeviceFd, mpidr: u64) -> Result<Vec<RegWords<u32>>, ArchError> {
    let vcpu = regs::vcpu_attr(mpidr);
    REGS.iter()
        .map(|(name, reg)| regs::get(fd, KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, vcpu, *reg, name))
        .collect()
}

/// Registers a new vCPU's redistributor holds as zero (priority 0).
pub(super) const ZERO_WHEN_NEW: &[&str] = &["GICR_IPRIORITYR"];

/// Writes it back; onto a `fresh` vGIC, not the zero words of
/// [`ZERO_WHEN_NEW`] registers, which it holds already.
pub(super) fn restore(
    fd: &DeviceFd,
    mpidr: u64,
    saved: &[RegWords<u32>],
    fresh: bool,
) -> Result<(), ArchError> {
    if saved.len() != REGS.len() {
        return Err(ArchError::GicState(format!(
            "{} redistributor registers saved, expected {}",
            saved.len(),
            REGS.len()
        )));
    }
    let vcpu = regs::vcpu_attr(mpidr);
    for ((name, reg), words) in REGS.iter().zip(saved) {
        regs::set(
            fd,
            KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
            vcpu,
            *reg,
            words,
            name,
            fresh && ZERO_WHEN_NEW.contains(name),
        )?;
    }
    Ok(())
}
