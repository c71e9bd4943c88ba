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

/// What a vCPU of each index holds right after [`init_vcpu`], learnt by
/// this process from fresh vCPUs it restored onto: a register whose saved
/// value equals it needs no write. Registers whose fresh value changed
/// between two samples (counters, timers) are never skipped.
#[derive(Default)]
struct FreshValues {
    /// Restores of this vCPU index seen so far (counts up to LEARN_FROM + 2).
    restores: u32,
    /// Per register id: its fresh value, `None` if two samples differed.
    values: std::collections::HashMap<u64, Option<Vec<u8>>>,
}

/// The first restore of each vCPU index in a process learns nothing (a
/// process that restores once pays nothing); the next two each read the
/// fresh vCPU's registers before writing them; from then on registers
/// equal to their fresh value are not written. A long-lived process (a
/// sessions server, a bench) restores many times.
const LEARN_FROM: u32 = 1;

fn fresh_values() -> &'static std::sync::Mutex<std::collections::HashMap<u32, FreshValues>> {
    static FRESH: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<u32, FreshValues>>,
    > = std::sync::OnceLock::new();
    FRESH.get_or_init(Default::default)
}

/// Restores a saved vCPU onto `vcpu`, which must have been initialised
/// with [`init_vcpu`]. A register whose saved size does not match its id is
/// refused (the state file is untrusted input).
pub fn restore_vcpu(vcpu: &VcpuFd, index: u32, state: &VcpuState) -> Result<(), ArchError> {
    restore_registers(vcpu, index, state, false)
}

/// [`restore_vcpu`] onto a vCPU just initialised that has never run:
/// registers that hold their saved value already, as every fresh vCPU of
/// this index did (see [`FreshValues`]), are not written.
pub(crate) fn restore_fresh_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    state: &VcpuState,
) -> Result<(), ArchError> {
    restore_registers(vcpu, index, state, true)
}

fn restore_registers(
    vcpu: &VcpuFd,
    index: u32,
    state: &VcpuState,
    fresh: bool,
) -> Result<(), ArchError> {
    for reg in &state.regs {
        if reg.value.len() != reg_size(reg.id) || reg.value.len() > MAX_REG_BYTES {
            return Err(ArchError::GicState(format!(
                "register {:#x} of vCPU {index} holds {} bytes, its id says {}",
                reg.id,
                reg.value.len(),
                reg_size(reg.id)
            )));
        }
    }
    let skips = if fresh {
        learn_fresh_values(vcpu, index, state)
    } else {
        vec![false; state.regs.len()]
    };
    let mut skipped = 0usize;
    for (reg, skip) in state.regs.iter().zip(skips) {
        if skip {
            skipped += 1;
            continue;
        }
        vcpu.set_one_reg(reg.id, &reg.value)
            .map_err(|source| ArchError::RestoreRegister {
                index,
                id: reg.id,
                source,
            })?;
    }
    log::trace!(
        "vCPU {index}: {} registers restored, {skipped} already held their value",
        state.regs.len() - skipped
    );
    vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(|source| ArchError::MpState {
        what: "SET",
        index,
        source,
    })
}

/// For each of `state`'s registers, whether the fresh `vcpu` holds its
/// saved value already (known from earlier restores); samples this fresh
/// vCPU while [`FreshValues`] is learning.
fn learn_fresh_values(vcpu: &VcpuFd, index: u32, state: &VcpuState) -> Vec<bool> {
    let mut all = fresh_values()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let fresh = all.entry(index).or_default();
    fresh.restores = fresh.restores.saturating_add(1);
    let learning = fresh.restores > LEARN_FROM && fresh.restores <= LEARN_FROM + 2;
    let first_sample = fresh.restores == LEARN_FROM + 1;
    let known = fresh.restores > LEARN_FROM + 2;
    if learning {
        let mut seen = std::collections::HashSet::with_capacity(state.regs.len());
        for reg in &state.regs {
            let mut value = vec![0u8; reg.value.len()];
            let read = vcpu.get_one_reg(reg.id, &mut value).ok().map(|_| value);
            seen.insert(reg.id);
            match fresh.values.get_mut(&reg.id) {
                Some(known) if known.as_ref() != read.as_ref() => *known = None,
                Some(_) => {}
                None => {
                    // Missing from the first sample: never skipped.
                    let value = if first_sample { read } else { None };
                    fresh.values.insert(reg.id, value);
                }
            }
        }
        // Missing from this sample: never skipped either.
        for (id, value) in &mut fresh.values {
            if !seen.contains(id) {
                *value = None;
            }
        }
    }
    state
        .regs
        .iter()
        .map(|reg| {
            known
                && fresh
                    .values
                    .get(&reg.id)
                    .and_then(Option::as_ref)
                    .is_some_and(|v| *v == reg.value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_restore_that_skips_registers_still_restores_every_one() {
        let fresh_vcpu = || {
            let kvm = kvm_ioctls::Kvm::new().unwrap();
            let vm = crate::vm::create_vm(&kvm).unwrap();
            let vcpu = vm.create_vcpu(0).unwrap();
            init_vcpu(&vm, &vcpu, 0).unwrap();
            (vm, vcpu)
        };
        let (_vm, vcpu) = fresh_vcpu();
        set_boot_registers(&vcpu, 0, 0x8008_0000, 0x1234_5678).unwrap();
        let saved = save_vcpu(&vcpu, 0).unwrap();
        // The virtual and physical counters move on by themselves.
        let counters = [sys_reg_id(3, 3, 14, 3, 2), sys_reg_id(3, 3, 14, 0, 1)];
        // Enough restores for the fresh values to be learnt and used.
        for round in 0..LEARN_FROM + 4 {
            let (_vm, vcpu) = fresh_vcpu();
            restore_fresh_vcpu(&vcpu, 0, &saved).unwrap();
            let back = save_vcpu(&vcpu, 0).unwrap();
            assert_eq!(back.regs.len(), saved.regs.len());
            for (b, s) in back.regs.iter().zip(&saved.regs) {
                assert_eq!(b.id, s.id);
                if !counters.contains(&b.id) {
                    assert_eq!(b.value, s.value, "round {round}: register {:#x}", b.id);
                }
            }
        }
        let all = fresh_values().lock().unwrap();
        let learnt = all[&0].values.values().filter(|v| v.is_some()).count();
        assert!(
            learnt > saved.regs.len() / 4,
            "only {learnt} fresh values learnt"
        );
    }

    #[test]
    fn register_sizes_come_from_the_id() {
        assert_eq!(reg_size(PC), 8);
        assert_eq!(reg_size(MPIDR_EL1), 8);
        // KVM_REG_SIZE_U128 (FP/SIMD V registers).
        assert_eq!(reg_size(KVM_REG_ARM64 | (4 << 52)), 16);
        assert_eq!(reg_size(KVM_REG_ARM64 | (2 << 52)), 4);
    }
}
