//! The guest physical address map of a dormouse aarch64 microVM.
//!
//! ```text
//!  0x0000_0000 ┌──────────────────────────────┐
//!              │ unused (faults as MMIO)      │
//!  0x0800_0000 ├──────────────────────────────┤ GIC_DIST_START
//!              │ GICv3 distributor (64 KiB)   │
//!  0x0801_0000 ├──────────────────────────────┤
//!              │ unused                       │
//!  0x0900_0000 ├──────────────────────────────┤ GIC_REDIST_START
//!              │ GICv3 redistributors,        │
//!              │ 128 KiB per vCPU, 512 max    │
//!  0x0D00_0000 ├──────────────────────────────┤ VMGENID_START
//!              │ VM generation ID (one page,  │
//!              │ RAM-backed, not guest RAM)   │
//!  0x0D00_1000 ├──────────────────────────────┤
//!              │ unused                       │
//!  0x1000_0000 ├──────────────────────────────┤ MMIO_START
//!              │ device slots, 4 KiB each:    │
//!              │  slot 0: 16550 UART          │
//!              │  slot 1: PL031 RTC           │
//!              │  slot 2..: further devices   │
//!  0x4000_0000 ├──────────────────────────────┤ MMIO_END
//!              │ unused                       │
//!  0x8000_0000 ├──────────────────────────────┤ DRAM_START
//!              │ guest RAM                    │
//!              │ (up to DRAM_MAX_SIZE)        │
//!  1 << 40     └──────────────────────────────┘ end of the 40-bit IPA space
//! ```
//!
//! The constants are plain data and compile on every host architecture so
//! that arch-neutral code and host-native tests can reason about the map.

use vm_memory::GuestAddress;

/// Size of a guest page. KVM on arm64 hosts with 4 KiB pages is what dormouse
/// supports; memory sizes and slots are multiples of this.
pub const PAGE_SIZE: u64 = 0x1000;

/// Start of the GICv3 distributor.
pub const GIC_DIST_START: GuestAddress = GuestAddress(0x0800_0000);
/// Size of the GICv3 distributor region.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;

/// Start of the GICv3 redistributor region (one frame pair per vCPU).
pub const GIC_REDIST_START: GuestAddress = GuestAddress(0x0900_0000);
/// Size of one vCPU's redistributor (RD_base + SGI_base frames, 64 KiB each).
pub const GIC_REDIST_SIZE_PER_VCPU: u64 = 0x2_0000;
/// The most vCPUs the redistributor region has room for (KVM's own vGICv3
/// limit is also 512).
pub const MAX_VCPUS: u32 = 512;

/// Start of the region where MMIO devices live.
pub const MMIO_START: GuestAddress = GuestAddress(0x1000_0000);
/// End (exclusive) of the MMIO device region.
pub const MMIO_END: GuestAddress = GuestAddress(0x4000_0000);
/// Size of one MMIO device slot.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;

/// Where the console UART (a 16550, 8 byte-wide registers) lives: slot 0.
pub const SERIAL_START: GuestAddress = MMIO_START;
/// Size of the UART's register window.
pub const SERIAL_SIZE: u64 = 8;
/// The GIC SPI (interrupt number minus 32) the UART raises.
pub const SERIAL_SPI: u32 = 0;

/// Where the PL031 real-time clock lives: slot 1.
pub const RTC_START: GuestAddress = GuestAddress(MMIO_START.0 + MMIO_SLOT_SIZE);

/// Where the VM generation ID device's page lives: its own KVM memory slot
/// (reads do not trap), outside guest RAM (the guest `ioremap`s it, which
/// arm64 Linux refuses for RAM) and outside the MMIO device window.
pub const VMGENID_START: GuestAddress = GuestAddress(0x0D00_0000);
/// Size of the VM generation ID page.
pub const VMGENID_SIZE: u64 = PAGE_SIZE;

/// Number of interrupt lines the vGIC is configured with, private ones
/// (SGIs and PPIs, 32) included. Must be a multiple of 32.
pub const GIC_NR_IRQS: u32 = 128;

/// Start of guest RAM.
pub const DRAM_START: GuestAddress = GuestAddress(0x8000_0000);
/// The end of the guest physical address space with KVM's default 40-bit IPA.
pub const IPA_END: u64 = 1 << 40;
/// The largest guest RAM size this layout admits.
pub const DRAM_MAX_SIZE: u64 = IPA_END - DRAM_START.0;

/// The redistributor region size for `vcpus` vCPUs.
pub const fn gic_redist_size(vcpus: u32) -> u64 {
    GIC_REDIST_SIZE_PER_VCPU * vcpus as u64
}

/// Whether `[start, start + len)` lies wholly in one of the map's unused
/// holes below guest RAM (no GIC frame, MMIO slot or RAM), with room left
/// for the most vCPUs' redistributors. `len` 0 is never unused.
pub const fn is_unused(start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    let holes = [
        (0, GIC_DIST_START.0),
        (GIC_DIST_START.0 + GIC_DIST_SIZE, GIC_REDIST_START.0),
        (
            GIC_REDIST_START.0 + gic_redist_size(MAX_VCPUS),
            MMIO_START.0,
        ),
        (MMIO_END.0, DRAM_START.0),
    ];
    let mut i = 0;
    while i < holes.len() {
        if len > 0 && start >= holes[i].0 && end <= holes[i].1 {
            return true;
        }
        i += 1;
    }
    false
}

// The map is checked when the crate compiles: regions must not overlap.
const _: () = {
    assert!(GIC_DIST_START.0 + GIC_DIST_SIZE <= GIC_REDIST_START.0);
    assert!(GIC_REDIST_START.0 + gic_redist_size(MAX_VCPUS) <= MMIO_START.0);
    assert!(MMIO_END.0 <= DRAM_START.0);
    assert!(SERIAL_START.0 + SERIAL_SIZE <= MMIO_START.0 + MMIO_SLOT_SIZE);
    assert!(RTC_START.0 >= SERIAL_START.0 + MMIO_SLOT_SIZE);
    assert!(GIC_NR_IRQS.is_multiple_of(32));
    assert!(VMGENID_START.0.is_multiple_of(PAGE_SIZE));
    assert!(is_unused(VMGENID_START.0, VMGENID_SIZE));
    // The arm64 boot protocol wants the kernel 2 MiB aligned from RAM start.
    assert!(DRAM_START.0.is_multiple_of(2 << 20));
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_holes_of_the_map_are_unused() {
        assert!(is_unused(0, PAGE_SIZE));
        assert!(is_unused(VMGENID_START.0, VMGENID_SIZE));
        assert!(is_unused(MMIO_END.0, DRAM_START.0 - MMIO_END.0));
        // Overlapping the GIC, the device window or RAM.
        assert!(!is_unused(GIC_DIST_START.0, PAGE_SIZE));
        assert!(!is_unused(GIC_DIST_START.0 - PAGE_SIZE, 2 * PAGE_SIZE));
        assert!(!is_unused(GIC_REDIST_START.0 + PAGE_SIZE, PAGE_SIZE));
        assert!(!is_unused(SERIAL_START.0, PAGE_SIZE));
        assert!(!is_unused(MMIO_END.0 - PAGE_SIZE, PAGE_SIZE));
        assert!(!is_unused(DRAM_START.0, PAGE_SIZE));
        assert!(!is_unused(DRAM_START.0 - PAGE_SIZE, 2 * PAGE_SIZE));
        // Empty, and wrapping ranges.
        assert!(!is_unused(VMGENID_START.0, 0));
        assert!(!is_unused(u64::MAX, 2));
    }
}
