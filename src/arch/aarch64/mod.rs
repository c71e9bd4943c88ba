//! aarch64: the memory map, vCPU initialisation and boot registers, and the
//! vGICv3.

pub mod fdt;
pub mod layout;
pub mod state;

#[cfg(target_arch = "aarch64")]
pub mod boot;
#[cfg(target_arch = "aarch64")]
pub mod gic;
#[cfg(target_arch = "aarch64")]
pub mod regs;

#[cfg(target_arch = "aarch64")]
pub use boot::BootError;
pub use fdt::FdtError;

/// Errors from aarch64 VM and vCPU setup.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// KVM_ARM_PREFERRED_TARGET failed.
    #[error("KVM could not name a preferred vCPU target for this host CPU")]
    PreferredTarget(#[source] kvm_ioctls::Error),
    /// KVM_ARM_VCPU_INIT failed.
    #[error("KVM_ARM_VCPU_INIT failed for vCPU {index}")]
    VcpuInit {
        /// The vCPU index.
        index: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Setting a vCPU register failed.
    #[error("could not set register {name} of vCPU {index}")]
    SetRegister {
        /// The vCPU index.
        index: u32,
        /// The register's name.
        name: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading a vCPU register failed.
    #[error("could not read register {name} of vCPU {index}")]
    GetRegister {
        /// The vCPU index.
        index: u32,
        /// The register's name.
        name: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Creating the vGICv3 failed.
    #[error(
        "KVM could not create a GICv3: the host needs a GICv3 (or GICv4) interrupt controller \
         with virtualisation support"
    )]
    CreateGic(#[source] kvm_ioctls::Error),
    /// Configuring the vGIC failed.
    #[error("could not set vGIC attribute {what}")]
    GicAttribute {
        /// Which attribute.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Raising an interrupt line (KVM_IRQ_LINE) failed.
    #[error("KVM_IRQ_LINE for SPI {spi} failed")]
    IrqLine {
        /// The SPI.
        spi: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved vGIC state does not fit this VM.
    #[error("the saved vGIC state does not fit this VM: {0}")]
    GicState(String),
    /// Reading the vCPU register list failed.
    #[error("KVM_GET_REG_LIST failed for vCPU {index}")]
    RegList {
        /// The vCPU index.
        index: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Saving or restoring a vCPU's multiprocessing state failed.
    #[error("KVM_{what}_MP_STATE failed for vCPU {index}")]
    MpState {
        /// GET or SET.
        what: &'static str,
        /// The vCPU index.
        index: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved register does not fit.
    #[error("saved register {id:#x} of vCPU {index} could not be restored")]
    RestoreRegister {
        /// The vCPU index.
        index: u32,
        /// The KVM register id.
        id: u64,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Loading the kernel or initrd failed.
    #[cfg(target_arch = "aarch64")]
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Building the device tree failed.
    #[error(transparent)]
    Fdt(#[from] FdtError),
}
