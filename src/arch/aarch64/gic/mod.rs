//! The in-kernel vGICv3: created, placed per the layout, initialised, and
//! saved and restored register group by register group.

mod dist_regs;
mod icc_regs;
mod redist_regs;
mod regs;

pub use crate::arch::aarch64::state::{GicState, GicVcpuState};

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
    KVM_ARM_IRQ_TYPE_SHIFT, KVM_ARM_IRQ_TYPE_SPI, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, VmFd};

use super::layout::{GIC_DIST_START, GIC_NR_IRQS, GIC_REDIST_START};
use super::ArchError;

/// Raises an edge on shared peripheral interrupt `spi` (KVM_IRQ_LINE
/// high, then low): an edge-triggered SPI becomes pending once, a
/// level-triggered one is left low. Call it after a restore of the
/// vGIC, which would otherwise overwrite the pending state.
pub fn pulse_spi(vm: &VmFd, spi: u32) -> Result<(), ArchError> {
    if spi >= GIC_NR_IRQS - 32 {
        return Err(ArchError::GicState(format!(
            "SPI {spi} is past the vGIC's {} SPIs",
            GIC_NR_IRQS - 32
        )));
    }
    // KVM's arm64 encoding: type in bits 24..32, INTID in bits 0..16.
    let line = (KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT) | (spi + 32);
    for level in [true, false] {
        vm.set_irq_line(line, level)
            .map_err(|source| ArchError::IrqLine { spi, source })?;
    }
    Ok(())
}

/// A vGICv3 device.
#[derive(Debug)]
pub struct Gic {
    fd: DeviceFd,
}

impl Gic {
    /// Creates the vGICv3 and places its distributor and redistributors.
    /// Call [`Gic::finalize`] once every vCPU exists.
    pub fn new(vm: &VmFd) -> Result<Self, ArchError> {
        let mut device = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            fd: 0,
            flags: 0,
        };
        let fd = vm
            .create_device(&mut device)
            .map_err(ArchError::CreateGic)?;
        let gic = Self { fd };
        gic.set(
            "distributor address",
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_DIST.into(),
            GIC_DIST_START.0,
        )?;
        gic.set(
            "redistributor address",
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_REDIST.into(),
            GIC_REDIST_START.0,
        )?;
        gic.set(
            "number of IRQs",
            KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
            0,
            GIC_NR_IRQS,
        )?;
        Ok(gic)
    }

    /// Initialises the vGIC (KVM_DEV_ARM_VGIC_CTRL_INIT). Every vCPU must
    /// have been created first; KVM_RUN fails with ENXIO without this.
    pub fn finalize(&self) -> Result<(), ArchError> {
        // CTRL_INIT takes no value; KVM ignores what `addr` points to.
        self.set(
            "CTRL_INIT",
            KVM_DEV_ARM_VGIC_GRP_CTRL,
            KVM_DEV_ARM_VGIC_CTRL_INIT.into(),
            0u64,
        )
    }

    /// Saves the vGIC. `mpidrs` are the vCPUs' MPIDR_EL1 values, in vCPU
    /// order. vCPUs must not run meanwhile.
    pub fn save(&self, mpidrs: &[u64]) -> Result<GicState, ArchError> {
        // Flushes pending LPI state into the guest's pending tables (guest
        // RAM), so the memory snapshot holds it. Without LPIs it changes
        // nothing.
        self.set(
            "SAVE_PENDING_TABLES",
            KVM_DEV_ARM_VGIC_GRP_CTRL,
            KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES.into(),
            0u64,
        )?;
        let dist = dist_regs::save(&self.fd)?;
        let vcpus = mpidrs
            .iter()
            .map(|&mpidr| {
                Ok(GicVcpuState {
                    redist: redist_regs::save(&self.fd, mpidr)?,
                    icc: icc_regs::save(&self.fd, mpidr)?,
                })
            })
            .collect::<Result<_, ArchError>>()?;
        Ok(GicState { dist, vcpus })
    }

    /// Restores a saved vGIC onto this (finalized) one.
    pub fn restore(&self, mpidrs: &[u64], state: &GicState) -> Result<(), ArchError> {
        self.restore_registers(mpidrs, state, false)
    }

    /// [`Gic::restore`] onto a vGIC just created and initialised, whose
    /// vCPUs have never run: words of registers that such a vGIC holds as
    /// zero (interrupt routing and priorities) are not written where the
    /// saved value is zero too. A one-vCPU VM's 96 SPIs route to vCPU 0,
    /// routing value 0: that skips 192 of the distributor's 250 writes.
    pub(crate) fn restore_fresh(&self, mpidrs: &[u64], state: &GicState) -> Result<(), ArchError> {
        self.restore_registers(mpidrs, state, true)
    }

    fn restore_registers(
        &self,
        mpidrs: &[u64],
        state: &GicState,
        fresh: bool,
    ) -> Result<(), ArchError> {
        if state.vcpus.len() != mpidrs.len() {
            return Err(ArchError::GicState(format!(
                "the saved GIC has {} vCPUs, the VM {}",
                state.vcpus.len(),
                mpidrs.len()
            )));
        }
        dist_regs::restore(&self.fd, &state.dist, fresh)?;
        for (&mpidr, vcpu) in mpidrs.iter().zip(&state.vcpus) {
            redist_regs::restore(&self.fd, mpidr, &vcpu.redist, fresh)?;
            icc_regs::restore(&self.fd, mpidr, &vcpu.icc)?;
        }
        Ok(())
    }

    /// Sets a vGIC attribute whose value KVM reads through `addr` (a `u32`
    /// or `u64`, depending on the attribute).
    fn set<T: Copy>(
        &self,
        what: &'static str,
        group: u32,
        attr: u64,
        value: T,
    ) -> Result<(), ArchError> {
        let attr = kvm_device_attr {
            group,
            attr,
            // KVM reads `size_of::<T>()` bytes from here during the call;
            // `value` lives on this frame until the call returns.
            addr: std::ptr::addr_of!(value) as u64,
            flags: 0,
        };
        self.fd
            .set_device_attr(&attr)
            .map_err(|source| ArchError::GicAttribute { what, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with `n` vCPUs and a finalized vGIC; the vCPUs' MPIDRs.
    fn fresh(n: u32) -> (VmFd, Vec<kvm_ioctls::VcpuFd>, Gic, Vec<u64>) {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = crate::vm::create_vm(&kvm).unwrap();
        let vcpus: Vec<_> = (0..n)
            .map(|i| {
                let vcpu = vm.create_vcpu(i.into()).unwrap();
                crate::arch::aarch64::regs::init_vcpu(&vm, &vcpu, i).unwrap();
                vcpu
            })
            .collect();
        let gic = Gic::new(&vm).unwrap();
        gic.finalize().unwrap();
        let mpidrs = (0..n)
            .map(|i| crate::arch::aarch64::regs::mpidr(&vcpus[i as usize], i).unwrap())
            .collect();
        (vm, vcpus, gic, mpidrs)
    }

    #[test]
    fn a_fresh_restore_skips_only_zeros_a_new_vgic_holds() {
        // What restore_fresh leaves unwritten is zero in a new vGIC.
        let (_vm, _vcpus, gic, mpidrs) = fresh(2);
        let new = gic.save(&mpidrs).unwrap();
        for ((name, _), words) in dist_regs::REGS.iter().zip(&new.dist) {
            if dist_regs::ZERO_WHEN_NEW.contains(name) {
                assert!(
                    words.words.iter().all(|w| *w == 0),
                    "{name}: {:x?}",
                    words.words
                );
            }
        }
        for vcpu in &new.vcpus {
            for ((name, _), words) in redist_regs::REGS.iter().zip(&vcpu.redist) {
                if redist_regs::ZERO_WHEN_NEW.contains(name) {
                    assert!(words.words.iter().all(|w| *w == 0), "{name}");
                }
            }
        }
        // A state with some routes to vCPU 1 and some priorities set comes
        // back exactly from a fresh restore.
        let mut state = new.clone();
        let at = |name: &str| {
            dist_regs::REGS
                .iter()
                .position(|(n, _)| *n == name)
                .unwrap()
        };
        let irouter = &mut state.dist[at("GICD_IROUTER")].words;
        irouter[2 * 5] = (mpidrs[1] & 0xff) as u32; // SPI 37 to vCPU 1
        irouter[2 * 9] = (mpidrs[1] & 0xff) as u32;
        let priorities = &mut state.dist[at("GICD_IPRIORITYR")].words;
        priorities[0] = 0xa0a0_a0a0;
        priorities[3] = 0x0000_8000;
        let redist = &mut state.vcpus[1].redist;
        let at = redist_regs::REGS
            .iter()
            .position(|(n, _)| *n == "GICR_IPRIORITYR")
            .unwrap();
        redist[at].words[1] = 0x1020_3040;
        let (_vm2, _vcpus2, gic2, mpidrs2) = fresh(2);
        gic2.restore_fresh(&mpidrs2, &state).unwrap();
        let back = gic2.save(&mpidrs2).unwrap();
        for (((name, _), b), s) in dist_regs::REGS.iter().zip(&back.dist).zip(&state.dist) {
            assert_eq!(b, s, "{name}");
        }
        for (i, (b, s)) in back.vcpus.iter().zip(&state.vcpus).enumerate() {
            for (((name, _), b), s) in redist_regs::REGS.iter().zip(&b.redist).zip(&s.redist) {
                // KVM sanitises these on any write (a 0 comes back with
                // cacheability bits set), whether or not a word is skipped.
                if !name.ends_with("BASER") {
                    assert_eq!(b, s, "vCPU {i}: {name}");
                }
            }
        }
    }

    #[test]
    fn vmgenid_interrupt_pulses_need_a_vgic_and_an_spi_it_has() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = crate::vm::create_vm(&kvm).unwrap();
        // No vGIC yet: KVM refuses the line, and the error names it.
        assert!(matches!(
            pulse_spi(&vm, 3),
            Err(ArchError::IrqLine { spi: 3, .. })
        ));
        let vcpu = vm.create_vcpu(0).unwrap();
        crate::arch::aarch64::regs::init_vcpu(&vm, &vcpu, 0).unwrap();
        let gic = Gic::new(&vm).unwrap();
        gic.finalize().unwrap();
        pulse_spi(&vm, 3).unwrap();
        pulse_spi(&vm, GIC_NR_IRQS - 33).unwrap();
        // Past the vGIC's SPIs: refused before KVM is asked.
        assert!(matches!(
            pulse_spi(&vm, GIC_NR_IRQS - 32),
            Err(ArchError::GicState(_))
        ));
    }
}
