//! dormouse: an embeddable aarch64 KVM microVM monitor, built for
//! restoring, suspending and resuming many small VMs fast.
//!
//! ```no_run
//! use dormouse::{ExitReason, GuestAddress, MicroVm, DRAM_START};
//!
//! // aarch64 code: `mov x0, #0x84000000; movk x0, #8; hvc #0` (PSCI SYSTEM_OFF).
//! let code: Vec<u8> = [0xd2b08000u32, 0xf2800100, 0xd4000002]
//!     .iter()
//!     .flat_map(|w| w.to_le_bytes())
//!     .collect();
//!
//! let mut vm = MicroVm::builder()
//!     .memory_mib(128)
//!     .vcpus(1)
//!     .serial_output(std::io::stdout())
//!     .payload(code, DRAM_START)
//!     .build()?;
//! assert_eq!(vm.run()?, ExitReason::Shutdown);
//! # let _ = GuestAddress(0);
//! # Ok::<(), dormouse::Error>(())
//! ```
//!
//! # What is inside
//!
//! - [`session`]: the product on top of the VMM. [`session::Image`]s (a guest
//!   booted once and snapshotted), sessions launched from them by restore,
//!   host endpoints that outlive the VM, idle suspend to disk and resume on
//!   the next request, a session root that survives a host restart.
//! - [`MicroVmBuilder`]: plain configuration (memory, vCPUs, boot payload,
//!   console sink), validated before any KVM resource exists.
//! - [`MicroVm`]: the VM, its vCPU threads ([`vcpu`]), guest memory
//!   ([`memory`]), the MMIO bus ([`bus`]) and devices ([`devices`]).
//! - [`arch::aarch64`]: the memory map, vCPU registers and the vGICv3.
//! - [`MicroVm::pause`], [`MicroVm::snapshot`], [`MicroVm::restore`]:
//!   suspend a session to a snapshot directory and resume it, in this or
//!   another process ([`snapshot`], docs/snapshot-format.md).
//!
//! dormouse runs aarch64 guests on aarch64 Linux hosts with KVM and a GICv3.
//! The crate compiles on other hosts (so that its arch-neutral parts can be
//! tested there), where [`MicroVmBuilder::build`] returns
//! [`Error::UnsupportedArchitecture`].
//!
//! # Signals
//!
//! vCPU threads are kicked out of the guest with `SIGRTMIN`, and seccomp
//! violations are caught with `SIGSYS` ([`seccomp`]); a program that embeds
//! dormouse must leave both signals to it.
//!
//! # Seccomp
//!
//! Every thread dormouse starts installs its own seccomp filter before it
//! touches the guest ([`seccomp`]); [`MicroVmBuilder::seccomp_policy`]
//! chooses the filters.

pub mod arch;
mod build;
pub mod builder;
pub mod bus;
pub mod device_manager;
pub mod devices;
pub mod dirty;
pub mod event_loop;
mod fsutil;
pub mod log_limit;
pub mod memory;
mod microvm;
pub mod rate_limiter;
pub mod seccomp;
pub mod session;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use arch::aarch64::layout::DRAM_START;
pub use builder::{ConfigError, MicroVmBuilder};
pub use microvm::{MicroVm, VmState, DEFAULT_PAUSE_DEADLINE};
pub use vcpu::ExitReason;
pub use vm_memory::GuestAddress;

/// Everything that can go wrong building or running a [`MicroVm`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// KVM (the device, the VM, memory slots, irqfds) failed.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// aarch64 vCPU or vGIC setup failed.
    #[error(transparent)]
    Arch(#[from] arch::aarch64::ArchError),
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// Devices could not be placed on the bus.
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    /// A device could not be created or attached.
    #[error(transparent)]
    Device(#[from] device_manager::DeviceError),
    /// A host resource (a thread, the RNG) failed.
    #[error("a host resource failed: {0}")]
    Host(#[source] std::io::Error),
    /// A dormouse bug: an invariant of its own did not hold.
    #[error("internal error: {0}; please report this as a dormouse bug")]
    Internal(&'static str),
    /// This host cannot run dormouse guests.
    #[error("dormouse runs aarch64 guests on aarch64 hosts only; this host is {0}")]
    UnsupportedArchitecture(&'static str),
    /// The VM already stopped.
    #[error("the VM already stopped ({0:?}); build or restore a new one to run again")]
    AlreadyStopped(ExitReason),
    /// The VM is paused, so waiting for it would never end.
    #[error("the VM is paused: call start() or resume() first")]
    NotRunning,
    /// A vCPU failed earlier; the VM cannot run again.
    #[error("the VM failed earlier and cannot run again; build or restore a new one")]
    VmFailed,
    /// The device I/O thread failed (a device panicked, or its event loop
    /// broke): the VM was stopped and cannot run again.
    #[error(
        "the VM's device I/O thread failed, so the VM was stopped; build or restore a new one"
    )]
    DeviceThread(#[source] event_loop::IoFailure),
    /// A pause ran out of time: the named vCPUs or device did not stop.
    #[error(
        "the VM did not pause within {deadline:?}: {}{}; call pause() again to finish, or drop \
         the VM",
        if .vcpus.is_empty() { String::new() } else { format!("vCPUs {:?} still running", .vcpus) },
        .device.as_ref().map(|d| format!("device I/O thread busy in {d}")).unwrap_or_default()
    )]
    PauseTimeout {
        /// The deadline that ran out.
        deadline: std::time::Duration,
        /// vCPUs that had not stopped.
        vcpus: Vec<u32>,
        /// The device (or the device thread) that had not stopped, when
        /// every vCPU had.
        device: Option<String>,
    },
    /// A pause timed out earlier and has not been completed.
    #[error("an earlier pause timed out and is still pending: call pause() again to finish it")]
    PauseIncomplete,
    /// A connection could not be handed to the vsock device
    /// ([`MicroVm::vsock_connect`]).
    #[error(transparent)]
    VsockConnect(#[from] devices::virtio::vsock::VsockConnectError),
    /// Dirty-page tracking failed.
    #[error(transparent)]
    Dirty(#[from] dirty::DirtyError),
    /// Taking or restoring a snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// A working set could not be recorded or saved.
    #[error(transparent)]
    WorkingSet(#[from] snapshot::working_set::WorkingSetError),
    /// A seccomp filter could not be built or installed, or a thread made
    /// a system call its filter forbids.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}
