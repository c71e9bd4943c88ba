//! The Virtual Machine Generation ID device (`microsoft,vmgenid`).
//!
//! A 16-byte identifier in a page of its own that the guest maps and reads
//! (Linux's `drivers/virt/vmgenid.c`, which reads the device tree binding
//! since 6.10). Whenever the identifier changes, the device raises an edge
//! interrupt; the guest reads the page again and, seeing a new value, mixes
//! it into its RNG and reseeds it (`add_vmfork_randomness`), so two clones
//! restored from one snapshot stop producing the same random numbers.
//!
//! The page is host memory this device owns, mapped into the guest as a
//! read-only KVM memory slot of its own: a guest read never traps (Linux
//! copies the ID with `memcpy`, whose load-pairs KVM could not decode as
//! MMIO), and the page is not guest RAM, so snapshots' memory files and
//! dirty logs do not include it. The identifier is written only while no
//! vCPU of the VM has run since the page was mapped (at build, and at
//! restore into a new VM), so KVM's own cache maintenance when it first maps
//! the page for the guest makes the value visible to the guest's
//! non-cacheable (device) mapping.

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, VolatileMemory};

use crate::arch::aarch64::layout;

/// Bytes in a generation ID.
pub const VMGENID_LEN: usize = 16;

/// The page's size, as a host length.
const PAGE_BYTES: usize = 4096;
const _: () = assert!(PAGE_BYTES as u64 == layout::VMGENID_SIZE);

/// Errors from creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    /// The host could not map the page.
    #[error("could not map a page of host memory for the VM generation ID (out of memory?)")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// The ID could not be written into the page.
    #[error("could not write the VM generation ID into its page")]
    Write(#[source] vm_memory::VolatileMemoryError),
}

/// The device's state in a snapshot: where the guest found it and the ID
/// the guest last saw. A restore keeps the address and interrupt (the
/// guest's driver holds both) and writes a new ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGenIdSnapshot {
    /// Guest physical address of the page.
    pub addr: u64,
    /// The GIC SPI it raises when the ID changes.
    pub spi: u32,
    /// The generation ID at the time of the snapshot.
    pub id: [u8; VMGENID_LEN],
}

/// The device: its page and the ID the page holds.
pub struct VmGenId {
    page: MmapRegion<()>,
    addr: GuestAddress,
    spi: u32,
    id: [u8; VMGENID_LEN],
}

impl std::fmt::Debug for VmGenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmGenId")
            .field("addr", &self.addr)
            .field("spi", &self.spi)
            .finish_non_exhaustive()
    }
}

impl VmGenId {
    /// A device at guest `addr`, raising SPI `spi`, holding `id`.
    pub fn new(addr: GuestAddress, spi: u32, id: [u8; VMGENID_LEN]) -> Result<Self, VmGenIdError> {
        let page = MmapRegion::new(PAGE_BYTES).map_err(VmGenIdError::Map)?;
        let mut device = Self {
            page,
            addr,
            spi,
            id: [0; VMGENID_LEN],
        };
        device.set_id(id)?;
        Ok(device)
    }

    /// Writes a new ID into the page (at its start, as the binding says).
    /// The caller raises the interrupt.
    pub fn set_id(&mut self, id: [u8; VMGENID_LEN]) -> Result<(), VmGenIdError> {
        self.page
            .get_slice(0, VMGENID_LEN)
            .map_err(VmGenIdError::Write)?
            .copy_from(&id);
        self.id = id;
        Ok(())
    }

    /// The current generation ID.
    pub fn id(&self) -> [u8; VMGENID_LEN] {
        self.id
    }

    /// Where the guest finds the page.
    pub fn addr(&self) -> GuestAddress {
        self.addr
    }

    /// The SPI the device raises.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// The page as the guest sees it, for registering it with KVM. It
    /// stays mapped as long as the device lives.
    pub fn page(&self) -> &MmapRegion<()> {
        &self.page
    }

    /// Saves the device.
    pub fn save(&self) -> VmGenIdSnapshot {
        VmGenIdSnapshot {
            addr: self.addr.0,
            spi: self.spi,
            id: self.id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(dev: &VmGenId) -> Vec<u8> {
        let len = dev.page().size();
        let mut out = vec![0u8; len];
        dev.page.get_slice(0, len).unwrap().copy_to(&mut out);
        out
    }

    #[test]
    fn the_page_holds_the_id_at_its_start_and_nothing_else() {
        let id = *b"0123456789abcdef";
        let mut dev = VmGenId::new(layout::VMGENID_START, 7, id).unwrap();
        assert_eq!(dev.page().size() as u64, layout::VMGENID_SIZE);
        let bytes = page(&dev);
        assert_eq!(&bytes[..VMGENID_LEN], &id);
        assert!(bytes[VMGENID_LEN..].iter().all(|&b| b == 0));
        assert_eq!(dev.id(), id);

        let next = *b"fedcba9876543210";
        dev.set_id(next).unwrap();
        assert_eq!(&page(&dev)[..VMGENID_LEN], &next);
        assert_eq!(dev.id(), next);
    }

    #[test]
    fn a_snapshot_names_the_address_interrupt_and_id() {
        let dev = VmGenId::new(GuestAddress(0x0d00_0000), 9, [5; VMGENID_LEN]).unwrap();
        assert_eq!(
            dev.save(),
            VmGenIdSnapshot {
                addr: 0x0d00_0000,
                spi: 9,
                id: [5; VMGENID_LEN],
            }
        );
        assert_eq!(dev.addr(), GuestAddress(0x0d00_0000));
        assert_eq!(dev.spi(), 9);
    }
}
