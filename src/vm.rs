//! The KVM side of a VM that is the same on every architecture: opening
//! `/dev/kvm`, creating the VM, registering guest memory and irqfds.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

/// Errors from the KVM VM itself.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device node is not there.
    #[error(
        "{path} does not exist: KVM is not available on this host (load the kvm module, \
         or run on a host or VM with virtualisation enabled)"
    )]
    KvmNotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The KVM device node exists but may not be opened.
    #[error(
        "no permission to open {path}: add this user to the group that owns it \
         (usually `kvm`) or grant read/write access"
    )]
    KvmPermission {
        /// The path that was tried.
        path: PathBuf,
    },
    /// Opening the KVM device node failed otherwise.
    #[error("could not open {path}")]
    KvmOpen {
        /// The path that was tried.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The file opened is not a KVM device, or speaks an unknown API.
    #[error(
        "{path} is not a KVM device (KVM_GET_API_VERSION gave {got:?}, want {KVM_API_VERSION})"
    )]
    NotKvm {
        /// The path that was tried.
        path: PathBuf,
        /// What the version ioctl returned (`None`: it failed).
        got: Option<i32>,
    },
    /// KVM refused to create a VM.
    #[error("KVM_CREATE_VM failed: the host may be out of memory or limit VMs")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed")]
    SetMemoryRegion {
        /// The slot number.
        slot: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest memory has more regions than KVM has slots.
    #[error("guest memory has more regions than KVM memory slots")]
    TooManyRegions,
    /// KVM refused an irqfd.
    #[error("KVM_IRQFD for GSI {gsi} failed")]
    RegisterIrqfd {
        /// The GSI (GIC SPI number).
        gsi: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Opens the KVM device at `path` and checks it speaks the KVM API.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let owned = || path.to_path_buf();
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VmError::KvmNotFound { path: owned() })?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|e| classify_open_error(path, e))?;
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(kvm),
        got if got < 0 => Err(VmError::NotKvm {
            path: owned(),
            got: None,
        }),
        got => Err(VmError::NotKvm {
            path: owned(),
            got: Some(got),
        }),
    }
}

fn classify_open_error(path: &Path, e: kvm_ioctls::Error) -> VmError {
    let path = path.to_path_buf();
    match e.errno() {
        libc::ENOENT | libc::ENOTDIR => VmError::KvmNotFound { path },
        libc::EACCES | libc::EPERM => VmError::KvmPermission { path },
        _ => VmError::KvmOpen { path, source: e },
    }
}

/// Creates a VM, retrying on EINTR as KVM documents.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    loop {
        match kvm.create_vm() {
            Err(e) if e.errno() == libc::EINTR => continue,
            other => return other.map_err(VmError::CreateVm),
        }
    }
}

/// Registers every region of `memory` with `vm`, one slot each, from slot 0,
/// with KVM's dirty log on when `log_dirty` is set.
pub fn register_memory(
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), VmError> {
    for (index, region) in memory.iter().enumerate() {
        let slot = u32::try_from(index).map_err(|_| VmError::TooManyRegions)?;
        let mem_region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live host mapping of exactly `memory_size`
        // bytes owned by `memory`. Its owner (`MicroVm`) drops the VM fd
        // before the memory, so KVM never outlives the mapping it was given;
        // were it to, KVM only ever reaches the mapping through the process's
        // page tables, so no memory outside this process could be touched.
        unsafe { vm.set_user_memory_region(mem_region) }
            .map_err(|source| VmError::SetMemoryRegion { slot, source })?;
    }
    Ok(())
}

/// Maps a device's page of host memory into the guest at `guest_addr` as
/// memory slot `slot`, read-only: guest reads go straight to the page (no
/// exit), guest writes exit as MMIO. Not dirty-logged: it is not guest RAM.
pub fn register_device_page(
    vm: &VmFd,
    slot: u32,
    guest_addr: GuestAddress,
    page: &MmapRegion<()>,
) -> Result<(), VmError> {
    let mem_region = kvm_userspace_memory_region {
        slot,
        flags: kvm_bindings::KVM_MEM_READONLY,
        guest_phys_addr: guest_addr.0,
        memory_size: page.size() as u64,
        userspace_addr: page.as_ptr() as u64,
    };
    // SAFETY: `page` is a live host mapping of exactly `memory_size` bytes.
    // Its owner (the device, held by `MicroVm`) is dropped after the VM fd,
    // so KVM never outlives the mapping it was given; were it to, KVM only
    // reaches the mapping through the process's page tables, so no memory
    // outside this process could be touched. The slot is read-only, so the
    // guest cannot change the page.
    unsafe { vm.set_user_memory_region(mem_region) }
        .map_err(|source| VmError::SetMemoryRegion { slot, source })
}

/// Fills `buf` from the host's RNG (getrandom(2)).
pub(crate) fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes;
        // getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// Makes every write to `evt` raise GSI `gsi` (for the vGIC: SPI `gsi`).
pub fn register_irqfd(vm: &VmFd, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
    vm.register_irqfd(evt, gsi)
        .map_err(|source| VmError::RegisterIrqfd { gsi, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_node_says_so() {
        let err = open_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, VmError::KvmNotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/kvm"));
    }

    #[test]
    fn a_file_that_is_not_kvm_is_refused() {
        let err = open_kvm(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, VmError::NotKvm { .. }), "{err:?}");
    }

    #[test]
    fn permission_errors_tell_what_to_do() {
        // As root the kernel skips permission checks, so the classification
        // of the errno is what is tested here.
        let err = classify_open_error(Path::new("/dev/kvm"), kvm_ioctls::Error::new(libc::EACCES));
        assert!(matches!(err, VmError::KvmPermission { .. }));
        assert!(err.to_string().contains("kvm"));
    }
}
