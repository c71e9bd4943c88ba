//! Loading an arm64 Linux `Image` and its initrd, and where the device
//! tree goes (Documentation/arch/arm64/booting.rst).
//!
//! ```text
//!  DRAM_START ┌─────────────────────────┐  2 MiB aligned
//!             │ text_offset             │
//!             │ kernel Image + BSS      │  image_size from the Image header
//!             ├─────────────────────────┤
//!             │ free for the kernel     │
//!             ├─────────────────────────┤  page aligned
//!             │ initrd                  │
//!  RAM end-2M ├─────────────────────────┤
//!             │ device tree (≤ 2 MiB)   │
//!    RAM end  └─────────────────────────┘
//! ```

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::pe::{arm64_image_header, PE};
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::fdt::FDT_MAX_SIZE;
use super::layout::PAGE_SIZE;
use crate::memory::GuestMemoryMmap;

/// Errors from loading the kernel and initrd.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A boot file could not be opened or read.
    #[error("cannot read the {what} at {path}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is not an arm64 `Image`.
    #[error(
        "{path} is not an arm64 Linux Image ({reason}): pass the uncompressed `Image` \
         (e.g. Debian's /boot/vmlinuz-*-arm64), not a zImage, vmlinux ELF or gzip"
    )]
    NotAnImage {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The kernel does not fit guest memory.
    #[error(
        "the kernel needs {needed:#x} bytes from the start of RAM but only {available:#x} are \
         free below the device tree: give the VM more memory"
    )]
    KernelTooLarge {
        /// Bytes the kernel occupies, BSS included.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The initrd does not fit between the kernel and the device tree.
    #[error(
        "the initrd is {size:#x} bytes but only {available:#x} are free between the kernel \
         and the device tree: give the VM more memory or use a smaller initrd"
    )]
    InitrdTooLarge {
        /// The initrd's size.
        size: u64,
        /// Bytes available.
        available: u64,
    },
    /// Copying a boot file into guest memory failed.
    #[error("could not copy the {what} into guest memory")]
    Copy {
        /// "initrd" or "device tree".
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// "ARM\x64", little-endian, at offset 56 of an arm64 Image.
const ARM64_IMAGE_MAGIC: u32 = 0x644d_5241;
/// Where kernels whose header has no image_size expect to be loaded.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;

/// Where the boot files went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootLayout {
    /// The kernel entry point (its load address).
    pub entry: GuestAddress,
    /// Where the device tree goes.
    pub fdt: GuestAddress,
    /// The initrd's address and size.
    pub initrd: Option<(GuestAddress, u64)>,
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the kernel at the start of RAM and the initrd below the device
/// tree slot at the top of RAM.
pub fn load(
    memory: &GuestMemoryMmap,
    ram: (GuestAddress, u64),
    kernel: &Path,
    initrd: Option<&Path>,
) -> Result<BootLayout, BootError> {
    let (ram_start, ram_size) = ram;
    let ram_end = ram_start.0 + ram_size;
    let fdt = GuestAddress(ram_end.saturating_sub(FDT_MAX_SIZE).max(ram_start.0));

    let mut file = open("kernel", kernel)?;
    let not_an_image = |reason: String| BootError::NotAnImage {
        path: kernel.to_path_buf(),
        reason,
    };
    let mut header = arm64_image_header::default();
    file.read_exact(header.as_mut_slice())
        .map_err(|e| not_an_image(format!("cannot read its 64-byte header: {e}")))?;
    if u32::from_le(header.magic) != ARM64_IMAGE_MAGIC {
        return Err(not_an_image("no \"ARM\\x64\" magic at offset 56".into()));
    }
    // The header says how much memory the kernel needs (BSS included),
    // which is more than the file's size. Check it before copying anything.
    let file_len = file
        .metadata()
        .map_err(|source| BootError::Read {
            what: "kernel",
            path: kernel.to_path_buf(),
            source,
        })?
        .len();
    let (text_offset, image_size) = match u64::from_le(header.image_size) {
        // Kernels before 3.17 leave image_size zero and load at 0x80000.
        0 => (LEGACY_TEXT_OFFSET, file_len),
        size => (u64::from_le(header.text_offset), size.max(file_len)),
    };
    let needed = text_offset.saturating_add(image_size);
    let available = fdt.0 - ram_start.0;
    if needed > available {
        return Err(BootError::KernelTooLarge { needed, available });
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|source| BootError::Read {
            what: "kernel",
            path: kernel.to_path_buf(),
            source,
        })?;
    let loaded = PE::load(memory, Some(ram_start), &mut file, None)
        .map_err(|e| not_an_image(e.to_string()))?;
    let kernel_end = ram_start.0 + needed;

    let initrd = match initrd {
        Some(path) => Some(load_initrd(memory, path, kernel_end, fdt)?),
        None => None,
    };
    Ok(BootLayout {
        entry: loaded.kernel_load,
        fdt,
        initrd,
    })
}

fn load_initrd(
    memory: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    fdt: GuestAddress,
) -> Result<(GuestAddress, u64), BootError> {
    let mut file = open("initrd", path)?;
    let read_err = |source| BootError::Read {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    };
    let size = file.metadata().map_err(read_err)?.len();
    let available = fdt.0 - kernel_end;
    let start = fdt
        .0
        .checked_sub(size)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|&s| s >= kernel_end)
        .ok_or(BootError::InitrdTooLarge { size, available })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, available })?;
    memory
        .read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|source| BootError::Copy {
            what: "initrd",
            source,
        })?;
    Ok((GuestAddress(start), size))
}

/// Writes the device tree blob at `addr`.
pub fn write_fdt(
    memory: &GuestMemoryMmap,
    addr: GuestAddress,
    blob: &[u8],
) -> Result<(), BootError> {
    memory
        .write_slice(blob, addr)
        .map_err(|source| BootError::Copy {
            what: "device tree",
            source,
        })
}
