//! Distributor registers (GICv3 architecture spec, 12.9).

use kvm_bindings::KVM_DEV_ARM_VGIC_GRP_DIST_REGS;
use kvm_ioctls::DeviceFd;

use super::regs::{self, Reg, RegWords};
use crate::arch::aarch64::layout::GIC_NR_IRQS;
use crate::arch::aarch64::ArchError;

/// Interrupts below 32 (SGIs, PPIs) live in the redistributors; their part
/// of each shared register is RAZ/WI in the distributor.
const FIRST_SPI: u64 = 32;

/// A register array with `bits` bits per interrupt, SPIs only.
const fn per_spi(offset: u64, bits: u64) -> Reg {
    let nr = GIC_NR_IRQS as u64;
    Reg::new(offset + FIRST_SPI * bits / 8, (nr - FIRST_SPI) * bits / 8)
}

/// The read/write distributor state, in restore order: controls first,
/// then routing and configuration, then pending/active (clear, then set, as
/// KVM's uaccess writes set state exactly), priorities last.
pub(super) const REGS: &[(&str, Reg)] = &[
    ("GICD_CTLR", Reg::new(0x0000, 4)),
    ("GICD_STATUSR", Reg::new(0x0010, 4)),
    ("GICD_ICENABLER", per_spi(0x0180, 1)),
    ("GICD_ISENABLER", per_spi(0x0100, 1)),
    ("GICD_IGROUPR", per_spi(0x0080, 1)),
    ("GICD_IROUTER", per_spi(0x6000, 64)),
    ("GICD_ICFGR", per_spi(0x0c00, 2)),
    ("GICD_ICPENDR", per_spi(0x0280, 1)),
    ("GICD_ISPENDR", per_spi(0x0200, 1)),
    ("GICD_ICACTIVER", per_spi(0x0380, 1)),
    ("GICD_ISACTIVER", per_spi(0x0300, 1)),
    ("GICD_IPRIORITYR", per_spi(0x0400, 8)),
];

/// Reads every distributor register in [`REGS`].
pub(super) fn save(fd: &DeviceFd) -> Result<Vec<RegWords<u32>>, ArchError> {
    REGS.iter()
        .map(|(name, reg)| regs::get(fd, KVM_DEV_ARM_VGIC_GRP_DIST_REGS, 0, *reg, name))
        .collect()
}

/// Registers a new vGIC holds as zero (KVM's vgic init: SPI routing
/// `mpidr = 0`, priority 0).
pub(super) const ZERO_WHEN_NEW: &[&str] = &["GICD_IROUTER", "GICD_IPRIORITYR"];

/// Writes them back; onto a `fresh` vGIC, not the zero words of
/// [`ZERO_WHEN_NEW`] registers, which it holds already.
pub(super) fn restore(
    fd: &DeviceFd,
    saved: &[RegWords<u32>],
    fresh: bool,
) -> Result<(), ArchError> {
    if saved.len() != REGS.len() {
        return Err(ArchError::GicState(format!(
            "{} distributor registers saved, expected {}",
            saved.len(),
            REGS.len()
        )));
    }
    for ((name, reg), words) in REGS.iter().zip(saved) {
        let skip_zeros = fresh && ZERO_WHEN_NEW.contains(name);
        regs::set(
            fd,
            KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
            0,
            *reg,
            words,
            name,
            skip_zeros,
        )?;
    }
    Ok(())
}
