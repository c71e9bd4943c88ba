//! How vGIC registers are read and written through KVM device attributes,
//! shared by the register groups.
//!
//! The distributor and redistributor are accessed 32 bits at a time at their
//! MMIO offsets; the CPU interface (ICC) registers 64 bits at a time by
//! their system-register encoding. Redistributor and ICC accesses name the
//! vCPU by its affinity (Aff3.Aff2.Aff1.Aff0) in the attribute's upper 32
//! bits (Documentation/virt/kvm/devices/arm-vgic-v3.rst).

pub use crate::arch::aarch64::state::RegWords;
use crate::arch::aarch64::ArchError;
use kvm_bindings::kvm_device_attr;
use kvm_ioctls::DeviceFd;

/// A register (or an array of registers): `len` bytes from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reg {
    pub offset: u64,
    pub len: u64,
}

impl Reg {
    pub const fn new(offset: u64, len: u64) -> Self {
        Self { offset, len }
    }
}

/// The vCPU part of a redistributor or ICC attribute: the affinity fields
/// of MPIDR_EL1 packed as Aff3.Aff2.Aff1.Aff0, in bits 63..32.
pub(super) fn vcpu_attr(mpidr: u64) -> u64 {
    let aff3 = (mpidr >> 32) & 0xff;
    let aff210 = mpidr & 0x00ff_ffff;
    ((aff3 << 24) | aff210) << 32
}

/// A register word width: u32 for MMIO groups, u64 for system registers.
pub(super) trait Word: Copy + Default {
    const BYTES: u64;
}

impl Word for u32 {
    const BYTES: u64 = 4;
}

impl Word for u64 {
    const BYTES: u64 = 8;
}

fn attr<T: Word>(group: u32, attr: u64, value: &mut T) -> kvm_device_attr {
    kvm_device_attr {
        group,
        attr,
        addr: std::ptr::from_mut(value) as u64,
        flags: 0,
    }
}

/// Reads `reg` word by word.
pub(super) fn get<T: Word>(
    fd: &DeviceFd,
    group: u32,
    vcpu: u64,
    reg: Reg,
    what: &'static str,
) -> Result<RegWords<T>, ArchError> {
    let mut words = Vec::new();
    let mut offset = reg.offset;
    while offset < reg.offset + reg.len {
        let mut value = T::default();
        let mut request = attr(group, vcpu | offset, &mut value);
        // SAFETY: KVM writes at most 8 bytes (the attribute's register
        // width, which `T` matches: u32 for MMIO groups, u64 for system
        // registers) through `request.addr`, which points at `value`, a live
        // `T` on this frame for the whole call.
        unsafe { fd.get_device_attr(&mut request) }
            .map_err(|source| ArchError::GicAttribute { what, source })?;
        words.push(value);
        offset += T::BYTES;
    }
    Ok(RegWords { words })
}

/// Writes `reg` word by word from `saved`, which must have the register's
/// length; with `skip_zeros`, not the words that are zero (for a register
/// the vGIC holds as zero already).
pub(super) fn set<T: Word + PartialEq>(
    fd: &DeviceFd,
    group: u32,
    vcpu: u64,
    reg: Reg,
    saved: &RegWords<T>,
    what: &'static str,
    skip_zeros: bool,
) -> Result<(), ArchError> {
    let expected = usize::try_from(reg.len / T::BYTES).unwrap_or(usize::MAX);
    if saved.words.len() != expected {
        return Err(ArchError::GicState(format!(
            "{what} has {} words, expected {expected}",
            saved.words.len()
        )));
    }
    for (i, word) in saved.words.iter().enumerate() {
        if skip_zeros && *word == T::default() {
            continue;
        }
        let mut value = *word;
        let offset = reg.offset + i as u64 * T::BYTES;
        fd.set_device_attr(&attr(group, vcpu | offset, &mut value))
            .map_err(|source| ArchError::GicAttribute { what, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_attrs_pack_the_affinity() {
        // KVM's default MPIDRs: bit 31 set, Aff0 = id % 16, Aff1 = id / 16.
        assert_eq!(vcpu_attr(0x8000_0000), 0);
        assert_eq!(vcpu_attr(0x8000_0001), 1 << 32);
        assert_eq!(vcpu_attr(0x8000_0102), 0x0102 << 32);
        assert_eq!(vcpu_attr(0x0000_0012_0034_5678), 0x1234_5678 << 32);
    }
}
