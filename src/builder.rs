//! [`MicroVmBuilder`]: plain configuration in, a live [`MicroVm`] out.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use linux_loader::cmdline::Cmdline;

use vm_memory::GuestAddress;

use crate::arch::aarch64::layout::{self, DRAM_START};
use crate::device_manager::MAX_VIRTIO_DEVICES;
use crate::devices::serial::{SerialInput, SerialOutput};
pub use crate::devices::virtio::block::DiskLayers;
use crate::devices::virtio::net::TapConfig;
use crate::devices::virtio::vsock::{VsockConfig, VsockConfigError};
use crate::memory;
use crate::rate_limiter::{RateLimiterConfig, RateLimiterConfigError};
use crate::{Error, MicroVm};

/// Default guest RAM size: 128 MiB.
pub const DEFAULT_MEMORY_SIZE: u64 = 128 << 20;
/// The kernel command line used unless [`MicroVmBuilder::cmdline`] replaces
/// it: the console on the UART, and a reboot (so [`ExitReason::Reset`](crate::ExitReason::Reset))
/// on a kernel panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";
/// The longest kernel command line arm64 Linux accepts (COMMAND_LINE_SIZE,
/// terminating NUL included).
pub const CMDLINE_MAX: usize = 2048;
/// The KVM device node used unless [`MicroVmBuilder::kvm_device`] says otherwise.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Mistakes in a VM's configuration, found before any KVM resource exists.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A VM needs at least one vCPU.
    #[error("a VM needs at least one vCPU: call .vcpus(n) with n >= 1")]
    NoVcpus,
    /// More vCPUs than KVM or the layout allows.
    #[error("{requested} vCPUs asked for, but this host allows at most {max}")]
    TooManyVcpus {
        /// How many were asked for.
        requested: u32,
        /// The limit (KVM's and the memory map's, whichever is lower).
        max: u32,
    },
    /// Nothing to run.
    #[error("no boot source: give the VM a kernel with .kernel(path) or raw code with .payload(bytes, address)")]
    NoBootSource,
    /// Both a kernel and a raw payload were given.
    #[error("both .kernel() and .payload() were given: a VM boots one or the other")]
    ConflictingBootSources,
    /// An initrd or command line was given without a kernel.
    #[error(".initrd() and .cmdline() need a .kernel() to go with them")]
    KernelOptionWithoutKernel,
    /// More virtio devices than the memory map has slots for.
    #[error("{0} virtio devices asked for; the memory map has room for {MAX_VIRTIO_DEVICES}")]
    TooManyDevices(usize),
    /// Every GIC interrupt line is taken by virtio devices, so none is left
    /// for the VM generation ID device.
    #[error(
        "{0} virtio devices take every interrupt line, leaving none for the VM generation ID \
         device: use fewer devices, or turn it off with .vmgenid(false)"
    )]
    NoSpiForVmGenId(usize),
    /// A device's rate limits cannot work.
    #[error("{device}: {source}")]
    RateLimiter {
        /// Which device (and direction), e.g. `virtio-blk 0` or
        /// `virtio-net 1 receive`, counted from 0 in attach order per kind.
        device: String,
        /// What is wrong.
        #[source]
        source: RateLimiterConfigError,
    },
    /// A VM has at most one vsock device.
    #[error("a VM has at most one vsock device (it is the VM's only CID)")]
    MultipleVsock,
    /// The guest CID is reserved.
    #[error(
        "guest CID {0} is reserved (0, 1 and 2 are, and CIDs must fit 32 bits): use 3 or more"
    )]
    InvalidCid(u64),
    /// The vsock listener handed in has no filesystem path.
    #[error(
        "the vsock listener has no filesystem path (unnamed or abstract socket): bind it to a \
         path, which guest connections to host port P extend to <path>_P"
    )]
    UnnamedVsockListener,
    /// The vsock device's [`VsockConfig`] is out of range.
    #[error(transparent)]
    Vsock(#[from] VsockConfigError),
    /// The command line is longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes; arm64 Linux accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit (without the terminating NUL).
        max: usize,
    },
    /// The command line has characters the kernel cannot take.
    #[error("invalid kernel command line: {0} (use printable ASCII, no NUL or newline)")]
    InvalidCmdline(String),
    /// The payload is empty.
    #[error("the payload is empty: it must hold at least one instruction")]
    EmptyPayload,
    /// The payload's entry point is not instruction-aligned.
    #[error("payload load address {0:#x} is not 4-byte aligned, so it cannot be an entry point")]
    MisalignedPayload(u64),
    /// The payload does not lie inside guest RAM.
    #[error(
        "payload of {len:#x} bytes at {addr:#x} does not fit guest RAM \
         [{ram_start:#x}, {ram_end:#x}): load it inside RAM or give the VM more memory"
    )]
    PayloadOutsideMemory {
        /// Where it was to be loaded.
        addr: u64,
        /// Its length.
        len: u64,
        /// First byte of RAM.
        ram_start: u64,
        /// First byte past RAM.
        ram_end: u64,
    },
}

/// Raw guest code loaded at an address and entered there.
#[derive(Debug, Clone)]
pub(crate) struct Payload {
    pub(crate) bytes: Vec<u8>,
    pub(crate) addr: GuestAddress,
}

/// A virtio device to attach, as plain data.
#[derive(Debug)]
// Only aarch64 hosts build VMs; elsewhere the fields are validated, not used.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
pub(crate) enum VirtioConfig {
    Block {
        path: PathBuf,
        read_only: bool,
        rate_limiter: RateLimiterConfig,
        /// A layered disk; `path` is then its top.
        layers: Option<DiskLayers>,
    },
    Net {
        tap: TapConfig,
        mac: [u8; 6],
        rx_rate_limiter: RateLimiterConfig,
        tx_rate_limiter: RateLimiterConfig,
    },
    Vsock {
        cid: u64,
        host: VsockHost,
        config: VsockConfig,
    },
}

/// Where a vsock device's host side listens.
#[derive(Debug)]
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
pub(crate) enum VsockHost {
    /// The device binds this path (and removes it when dropped).
    Path(PathBuf),
    /// The embedder's listener; its path stays the embedder's.
    Listener(UnixListener),
}

impl VsockHost {
    /// Checks that a listener handed in has a path to record.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        match self {
            Self::Listener(l) if crate::devices::virtio::vsock::listener_path(l).is_err() => {
                Err(ConfigError::UnnamedVsockListener)
            }
            _ => Ok(()),
        }
    }
}

/// A virtio-blk disk, for [`MicroVmBuilder::block_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw disk image (a regular file or a block device); for a
    /// layered disk, its top (what a snapshot records as the disk's path).
    pub path: PathBuf,
    /// Whether guest writes are refused.
    pub read_only: bool,
    /// Limits on requests and bytes (default: none). Each request costs one
    /// operation and its data bytes.
    pub rate_limiter: RateLimiterConfig,
    /// A layered copy-on-write disk instead of the one image at `path`
    /// (default: none); see [`BlockConfig::layered`].
    pub layers: Option<DiskLayers>,
}

impl BlockConfig {
    /// A read-write disk on `path`, not rate limited.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            rate_limiter: RateLimiterConfig::default(),
            layers: None,
        }
    }

    /// A read-write layered copy-on-write disk, not rate limited: the
    /// guest sees `layers.base` with the frozen `layers.layers` over it,
    /// and its writes go to `layers.top` only (created if missing). No byte
    /// of the base is copied, so any number of VMs can share one base.
    /// See [`DiskLayers`] for the files and their locks, and
    /// [`MicroVm::snapshot_diff`](crate::MicroVm::snapshot_diff): each
    /// snapshot writes the top's presence map, so that afterwards the top
    /// is a frozen layer matching the snapshot's memory. The snapshot
    /// records the top as the disk's path; a restore names the layers
    /// again with [`Restore::block_layers`](crate::snapshot::Restore::block_layers).
    pub fn layered(layers: DiskLayers) -> Self {
        Self {
            path: layers.top.clone(),
            read_only: false,
            rate_limiter: RateLimiterConfig::default(),
            layers: Some(layers),
        }
    }

    /// Whether guest writes are refused.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Limits on requests and bytes.
    pub fn rate_limiter(mut self, limits: RateLimiterConfig) -> Self {
        self.rate_limiter = limits;
        self
    }
}

/// A virtio-net interface, for [`MicroVmBuilder::net_with`].
#[derive(Debug)]
pub struct NetConfig {
    /// The TAP.
    pub tap: TapConfig,
    /// The MAC address; `None` for `06:64:6d:73:00:<n>` on the n-th
    /// interface.
    pub mac: Option<[u8; 6]>,
    /// Limits on frames and bytes delivered to the guest (default: none).
    pub rx_rate_limiter: RateLimiterConfig,
    /// Limits on frames and bytes the guest sends (default: none).
    pub tx_rate_limiter: RateLimiterConfig,
}

impl NetConfig {
    /// An interface on `tap` with the default MAC, not rate limited.
    pub fn new(tap: TapConfig) -> Self {
        Self {
            tap,
            mac: None,
            rx_rate_limiter: RateLimiterConfig::default(),
            tx_rate_limiter: RateLimiterConfig::default(),
        }
    }

    /// The MAC address the guest sees (unicast).
    pub fn mac(mut self, mac: [u8; 6]) -> Self {
        self.mac = Some(mac);
        self
    }

    /// Limits on frames and bytes delivered to the guest. Each frame costs
    /// one operation and its Ethernet bytes.
    pub fn rx_rate_limiter(mut self, limits: RateLimiterConfig) -> Self {
        self.rx_rate_limiter = limits;
        self
    }

    /// Limits on frames and bytes the guest sends. Each frame costs one
    /// operation and its Ethernet bytes.
    pub fn tx_rate_limiter(mut self, limits: RateLimiterConfig) -> Self {
        self.tx_rate_limiter = limits;
        self
    }
}

/// Checks every device's rate limits; errors name the device as
/// `virtio-blk <n>` or `virtio-net <n> receive|transmit`.
pub(crate) fn validate_rate_limiters(devices: &[VirtioConfig]) -> Result<(), ConfigError> {
    let (mut blocks, mut nets) = (0usize, 0usize);
    for device in devices {
        let check = |config: &RateLimiterConfig, device: String| {
            config
                .validate()
                .map_err(|source| ConfigError::RateLimiter { device, source })
        };
        match device {
            VirtioConfig::Block { rate_limiter, .. } => {
                check(rate_limiter, format!("virtio-blk {blocks}"))?;
                blocks += 1;
            }
            VirtioConfig::Net {
                rx_rate_limiter,
                tx_rate_limiter,
                ..
            } => {
                check(rx_rate_limiter, format!("virtio-net {nets} receive"))?;
                check(tx_rate_limiter, format!("virtio-net {nets} transmit"))?;
                nets += 1;
            }
            VirtioConfig::Vsock { .. } => {}
        }
    }
    Ok(())
}

/// Configures and builds a [`MicroVm`].
///
/// Every setter takes plain data; nothing touches KVM until
/// [`build`](Self::build).
pub struct MicroVmBuilder {
    pub(crate) memory_size: u64,
    pub(crate) vcpus: u32,
    pub(crate) serial_output: Option<SerialOutput>,
    pub(crate) serial_input: Option<SerialInput>,
    pub(crate) payload: Option<Payload>,
    pub(crate) kernel: Option<PathBuf>,
    pub(crate) initrd: Option<PathBuf>,
    pub(crate) cmdline: Option<String>,
    pub(crate) rtc: bool,
    pub(crate) dirty_tracking: bool,
    pub(crate) dirty_ring: bool,
    pub(crate) vmgenid: bool,
    pub(crate) virtio: Vec<VirtioConfig>,
    pub(crate) kvm_device: PathBuf,
    pub(crate) test_hooks: TestHooks,
    pub(crate) seccomp: crate::seccomp::SeccompPolicy,
}

/// Extra devices that dormouse's own tests attach to reach failure paths a
/// healthy guest cannot (a device stuck on a vCPU thread, a device panic on
/// the I/O thread). Not saved in snapshots.
#[derive(Default)]
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
pub(crate) struct TestHooks {
    pub mmio: Vec<(u64, u64, crate::bus::SharedDevice)>,
    pub io: Vec<(String, crate::event_loop::Subscriber)>,
}

impl std::fmt::Debug for MicroVmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVmBuilder")
            .field("memory_size", &self.memory_size)
            .field("vcpus", &self.vcpus)
            .field("serial_output", &self.serial_output.is_some())
            .field(
                "payload",
                &self.payload.as_ref().map(|p| (p.addr, p.bytes.len())),
            )
            .field("kvm_device", &self.kvm_device)
            .field("seccomp", &self.seccomp)
            .finish()
    }
}

impl Default for MicroVmBuilder {
    fn default() -> Self {
        Self {
            memory_size: DEFAULT_MEMORY_SIZE,
            vcpus: 1,
            serial_output: None,
            serial_input: None,
            payload: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            rtc: true,
            dirty_tracking: false,
            dirty_ring: true,
            vmgenid: true,
            virtio: Vec::new(),
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            test_hooks: TestHooks::default(),
            seccomp: crate::seccomp::SeccompPolicy::Default,
        }
    }
}

impl MicroVmBuilder {
    /// A builder with the defaults: 128 MiB, one vCPU, console discarded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Guest RAM size in bytes (a multiple of 4 KiB).
    pub fn memory_size(mut self, bytes: u64) -> Self {
        self.memory_size = bytes;
        self
    }

    /// Guest RAM size in MiB.
    pub fn memory_mib(self, mib: u64) -> Self {
        self.memory_size(mib.saturating_mul(1 << 20))
    }

    /// Number of vCPUs. vCPU 0 boots; the others start powered off until
    /// the guest starts them with PSCI CPU_ON.
    pub fn vcpus(mut self, count: u32) -> Self {
        self.vcpus = count;
        self
    }

    /// Where the guest's console (UART) output goes. Without one, it is
    /// discarded.
    pub fn serial_output(mut self, sink: impl Write + Send + 'static) -> Self {
        self.serial_output = Some(Box::new(sink));
        self
    }

    /// Where the guest's console input comes from (e.g. stdin). A thread
    /// feeds it to the UART as the guest drains it; it ends at end of input
    /// or when the VM is dropped.
    pub fn serial_input(mut self, source: impl Read + Send + 'static) -> Self {
        self.serial_input = Some(Box::new(source));
        self
    }

    /// Boots an arm64 Linux `Image` (uncompressed) from `path`.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// An initrd (initramfs) for the kernel.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// The kernel command line, replacing [`DEFAULT_CMDLINE`] (extend it
    /// with `format!("{DEFAULT_CMDLINE} ...")` to keep the defaults).
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = Some(cmdline.into());
        self
    }

    /// Whether the VM has a PL031 real-time clock (default: yes).
    pub fn rtc(mut self, enabled: bool) -> Self {
        self.rtc = enabled;
        self
    }

    /// Tracks which guest pages change (KVM's dirty log OR'ed with the
    /// VMM's own writes), so that [`MicroVm::snapshot_diff`] writes only
    /// those. Off by default; the cost is the kernel's write-protection
    /// faults on the first write to each page after a snapshot.
    pub fn dirty_tracking(mut self, enabled: bool) -> Self {
        self.dirty_tracking = enabled;
        self
    }

    /// With dirty tracking on, whether to use KVM's dirty ring where the
    /// host has it (default: yes; harvests then cost what was dirtied) or
    /// always its per-slot bitmap log.
    pub fn dirty_ring(mut self, prefer_ring: bool) -> Self {
        self.dirty_ring = prefer_ring;
        self
    }

    /// Whether the VM has a VM generation ID device (`microsoft,vmgenid`
    /// in the device tree; default: yes). Its 16-byte ID is random at
    /// boot, and every restore of a snapshot of the VM writes a new one and
    /// interrupts the guest, whose kernel (Linux 6.10+) then reseeds its
    /// RNG: clones of one snapshot stop sharing random numbers. See
    /// [`MicroVm::generation_id`].
    pub fn vmgenid(mut self, enabled: bool) -> Self {
        self.vmgenid = enabled;
        self
    }

    /// A virtio-blk disk backed by the raw image at `path`. Read-only disks
    /// refuse guest writes with an I/O error. Attach order is the guest's
    /// discovery order (`vda`, `vdb`, ...).
    pub fn block(self, path: impl Into<PathBuf>, read_only: bool) -> Self {
        self.block_with(BlockConfig::new(path).read_only(read_only))
    }

    /// A virtio-blk disk with every option, rate limits included (see
    /// [`BlockConfig`]).
    pub fn block_with(mut self, config: BlockConfig) -> Self {
        self.virtio.push(VirtioConfig::Block {
            path: config
                .layers
                .as_ref()
                .map_or(config.path, |l| l.top.clone()),
            read_only: config.read_only,
            rate_limiter: config.rate_limiter,
            layers: config.layers,
        });
        self
    }

    /// A virtio-net interface on a TAP device, with a MAC address of
    /// `06:64:6d:73:00:<n>` for the n-th interface (locally administered).
    pub fn net(self, tap: TapConfig) -> Self {
        self.net_with(NetConfig::new(tap))
    }

    /// A virtio-net interface on a TAP device with the given MAC address.
    pub fn net_with_mac(self, tap: TapConfig, mac: [u8; 6]) -> Self {
        self.net_with(NetConfig::new(tap).mac(mac))
    }

    /// A virtio-net interface with every option, rate limits included (see
    /// [`NetConfig`]).
    pub fn net_with(mut self, config: NetConfig) -> Self {
        let n = self
            .virtio
            .iter()
            .filter(|d| matches!(d, VirtioConfig::Net { .. }))
            .count();
        let mac = config
            .mac
            .unwrap_or([0x06, 0x64, 0x6d, 0x73, 0x00, n.to_le_bytes()[0]]);
        self.virtio.push(VirtioConfig::Net {
            tap: config.tap,
            mac,
            rx_rate_limiter: config.rx_rate_limiter,
            tx_rate_limiter: config.tx_rate_limiter,
        });
        self
    }

    /// A virtio-vsock device: the guest's CID, and the Unix socket the host
    /// side listens on (host processes connect to it and write
    /// `CONNECT <port>\n`), with the default [`VsockConfig`]: the guest
    /// may not connect to any host port. Use
    /// [`vsock_with`](Self::vsock_with) to allow some.
    pub fn vsock(self, guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        self.vsock_with(guest_cid, uds_path, VsockConfig::default())
    }

    /// A virtio-vsock device as [`vsock`](Self::vsock) makes, with its
    /// configuration: guest connections to an allowed host port P go to
    /// `<uds_path>_P`; the connection limit, buffer size and timeouts. A
    /// snapshot keeps the configuration, and a restore uses it again.
    pub fn vsock_with(
        mut self,
        guest_cid: u64,
        uds_path: impl Into<PathBuf>,
        config: VsockConfig,
    ) -> Self {
        self.virtio.push(VirtioConfig::Vsock {
            cid: guest_cid,
            host: VsockHost::Path(uds_path.into()),
            config,
        });
        self
    }

    /// A virtio-vsock device whose host side is `listener`, a Unix socket
    /// the embedder bound and keeps: the device accepts on it (connections
    /// already waiting in its backlog included) instead of binding a path,
    /// and never removes its path. Guest connections to an allowed host
    /// port P go to `<path>_P`, and a snapshot records the path. Give the
    /// next VM (a restore, see
    /// [`Restore::vsock_listener`](crate::snapshot::Restore::vsock_listener))
    /// a [`try_clone`](UnixListener::try_clone) of it, and clients that
    /// connect in between wait in the backlog.
    ///
    /// The listener must have a filesystem path
    /// ([`ConfigError::UnnamedVsockListener`]); it becomes non-blocking, and
    /// its owner must not accept on it while a VM uses it.
    pub fn vsock_listener(
        mut self,
        guest_cid: u64,
        listener: UnixListener,
        config: VsockConfig,
    ) -> Self {
        self.virtio.push(VirtioConfig::Vsock {
            cid: guest_cid,
            host: VsockHost::Listener(listener),
            config,
        });
        self
    }

    /// Raw guest code: `bytes` are copied to guest physical `addr`, and vCPU
    /// 0 starts there in EL1h with the MMU off and interrupts masked.
    pub fn payload(mut self, bytes: impl Into<Vec<u8>>, addr: GuestAddress) -> Self {
        self.payload = Some(Payload {
            bytes: bytes.into(),
            addr,
        });
        self
    }

    /// The KVM device node to open (default `/dev/kvm`), for hosts that
    /// expose it elsewhere, e.g. inside a jail.
    pub fn kvm_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_device = path.into();
        self
    }

    /// Which seccomp filters the VM's threads install (default:
    /// [`SeccompPolicy::Default`](crate::seccomp::SeccompPolicy::Default),
    /// dormouse's own per thread kind). See [`crate::seccomp`];
    /// `SeccompPolicy::Disabled` is unsafe.
    pub fn seccomp_policy(mut self, policy: crate::seccomp::SeccompPolicy) -> Self {
        self.seccomp = policy;
        self
    }

    /// Checks the configuration on its own, before any KVM resource exists.
    pub fn validate(&self) -> Result<(), Error> {
        memory::validate_size(self.memory_size)?;
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus.into());
        }
        if self.vcpus > layout::MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max: layout::MAX_VCPUS,
            }
            .into());
        }
        self.validate_devices()?;
        match (&self.payload, &self.kernel) {
            (Some(_), Some(_)) => Err(ConfigError::ConflictingBootSources.into()),
            (None, None) => Err(ConfigError::NoBootSource.into()),
            (Some(payload), None) => {
                if self.initrd.is_some() || self.cmdline.is_some() {
                    return Err(ConfigError::KernelOptionWithoutKernel.into());
                }
                self.validate_payload(payload)
            }
            (None, Some(_)) => self.kernel_cmdline().map(drop).map_err(Error::from),
        }
    }

    fn validate_devices(&self) -> Result<(), ConfigError> {
        if self.virtio.len() as u64 > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(self.virtio.len()));
        }
        if self.vmgenid && crate::device_manager::free_spis(self.virtio.len()).is_empty() {
            return Err(ConfigError::NoSpiForVmGenId(self.virtio.len()));
        }
        let mut vsocks = self.virtio.iter().filter_map(|d| match d {
            VirtioConfig::Vsock { cid, host, config } => Some((*cid, host, config)),
            _ => None,
        });
        if let Some((cid, host, config)) = vsocks.next() {
            if cid <= 2 || cid >= u64::from(u32::MAX) {
                return Err(ConfigError::InvalidCid(cid));
            }
            config.validate()?;
            host.validate()?;
        }
        if vsocks.next().is_some() {
            return Err(ConfigError::MultipleVsock);
        }
        validate_rate_limiters(&self.virtio)
    }

    fn validate_payload(&self, payload: &Payload) -> Result<(), Error> {
        if payload.bytes.is_empty() {
            return Err(ConfigError::EmptyPayload.into());
        }
        if !payload.addr.0.is_multiple_of(4) {
            return Err(ConfigError::MisalignedPayload(payload.addr.0).into());
        }
        let ram_start = DRAM_START.0;
        let ram_end = ram_start + self.memory_size;
        let len = payload.bytes.len() as u64;
        let fits = payload.addr.0 >= ram_start
            && payload
                .addr
                .0
                .checked_add(len)
                .is_some_and(|end| end <= ram_end);
        if !fits {
            return Err(ConfigError::PayloadOutsideMemory {
                addr: payload.addr.0,
                len,
                ram_start,
                ram_end,
            }
            .into());
        }
        Ok(())
    }

    /// The command line the kernel gets, checked.
    pub(crate) fn kernel_cmdline(&self) -> Result<String, ConfigError> {
        let text = self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
        // The kernel needs room for the terminating NUL.
        let max = CMDLINE_MAX - 1;
        if text.len() > max {
            return Err(ConfigError::CmdlineTooLong {
                len: text.len(),
                max,
            });
        }
        let cmdline = Cmdline::try_from(text, CMDLINE_MAX)
            .map_err(|e| ConfigError::InvalidCmdline(e.to_string()))?;
        let cstring = cmdline
            .as_cstring()
            .map_err(|e| ConfigError::InvalidCmdline(e.to_string()))?;
        cstring
            .into_string()
            .map_err(|e| ConfigError::InvalidCmdline(e.to_string()))
    }

    /// Test hook, not a supported API: puts `device` on the MMIO bus at
    /// `[base, base + len)` (outside RAM and dormouse's own devices). Its
    /// handlers run on vCPU threads. Not saved in snapshots.
    #[doc(hidden)]
    pub fn test_hook_mmio_device(
        mut self,
        base: u64,
        len: u64,
        device: crate::bus::SharedDevice,
    ) -> Self {
        self.test_hooks.mmio.push((base, len, device));
        self
    }

    /// Test hook, not a supported API: runs `subscriber` on the VM's device
    /// I/O thread, named `name` in failure reports. Not saved in snapshots.
    #[doc(hidden)]
    pub fn test_hook_io_subscriber(
        mut self,
        name: impl Into<String>,
        subscriber: crate::event_loop::Subscriber,
    ) -> Self {
        self.test_hooks.io.push((name.into(), subscriber));
        self
    }

    /// Validates the configuration, creates the VM, and leaves it ready to
    /// [`run`](MicroVm::run).
    pub fn build(self) -> Result<MicroVm, Error> {
        MicroVm::from_builder(self)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Address as _;

    use super::*;
    use crate::memory::MemoryError;

    fn valid() -> MicroVmBuilder {
        MicroVmBuilder::new().payload(vec![0; 8], DRAM_START)
    }

    #[test]
    fn a_valid_config_passes() {
        valid().validate().unwrap();
    }

    #[test]
    fn memory_size_zero_and_unaligned_are_refused() {
        assert!(matches!(
            valid().memory_size(0).validate(),
            Err(Error::Memory(MemoryError::SizeZero))
        ));
        assert!(matches!(
            valid().memory_size((64 << 20) + 100).validate(),
            Err(Error::Memory(MemoryError::NotPageAligned(_)))
        ));
    }

    #[test]
    fn vcpu_counts_are_checked() {
        assert!(matches!(
            valid().vcpus(0).validate(),
            Err(Error::Config(ConfigError::NoVcpus))
        ));
        assert!(matches!(
            valid().vcpus(layout::MAX_VCPUS + 1).validate(),
            Err(Error::Config(ConfigError::TooManyVcpus { .. }))
        ));
    }

    #[test]
    fn payloads_must_lie_in_ram() {
        let err = |b: MicroVmBuilder| match b.validate() {
            Err(Error::Config(e)) => e,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(err(MicroVmBuilder::new()), ConfigError::NoBootSource);
        assert_eq!(
            err(MicroVmBuilder::new().payload(Vec::new(), DRAM_START)),
            ConfigError::EmptyPayload
        );
        assert_eq!(
            err(MicroVmBuilder::new().payload(vec![0; 4], DRAM_START.unchecked_add(2))),
            ConfigError::MisalignedPayload(DRAM_START.0 + 2)
        );
        // Below RAM, straddling its end, past it, and wrapping the address space.
        for addr in [
            0,
            DRAM_START.0 + DEFAULT_MEMORY_SIZE - 4,
            DRAM_START.0 + DEFAULT_MEMORY_SIZE,
            u64::MAX - 3,
        ] {
            let e = err(MicroVmBuilder::new().payload(vec![0; 8], GuestAddress(addr)));
            assert!(
                matches!(e, ConfigError::PayloadOutsideMemory { .. }),
                "{addr:#x}: {e:?}"
            );
        }
        // The very last 8 bytes of RAM are fine.
        MicroVmBuilder::new()
            .payload(
                vec![0; 8],
                GuestAddress(DRAM_START.0 + DEFAULT_MEMORY_SIZE - 8),
            )
            .validate()
            .unwrap();
    }

    #[test]
    fn kernel_boot_options_are_checked() {
        let err = |b: MicroVmBuilder| match b.validate() {
            Err(Error::Config(e)) => e,
            other => panic!("expected a config error, got {other:?}"),
        };
        let kernel = || MicroVmBuilder::new().kernel("/boot/Image");
        kernel().validate().unwrap();
        assert_eq!(kernel().kernel_cmdline().unwrap(), DEFAULT_CMDLINE);
        assert_eq!(
            err(kernel().payload(vec![0; 4], DRAM_START)),
            ConfigError::ConflictingBootSources
        );
        assert_eq!(
            err(valid().initrd("/boot/initrd")),
            ConfigError::KernelOptionWithoutKernel
        );
        assert_eq!(
            err(valid().cmdline("quiet")),
            ConfigError::KernelOptionWithoutKernel
        );
        // 2047 characters fit (with the NUL), 2048 do not.
        kernel().cmdline("a".repeat(2047)).validate().unwrap();
        assert_eq!(
            err(kernel().cmdline("a".repeat(2048))),
            ConfigError::CmdlineTooLong {
                len: 2048,
                max: 2047
            }
        );
        assert!(matches!(
            err(kernel().cmdline("console=ttyS0\0quiet")),
            ConfigError::InvalidCmdline(_)
        ));
    }

    #[test]
    fn device_lists_are_checked() {
        let err = |b: MicroVmBuilder| match b.validate() {
            Err(Error::Config(e)) => e,
            other => panic!("expected a config error, got {other:?}"),
        };
        valid()
            .block("/a", false)
            .block("/b", true)
            .vsock(3, "/tmp/v.sock")
            .validate()
            .unwrap();
        assert_eq!(err(valid().vsock(2, "/v")), ConfigError::InvalidCid(2));
        assert_eq!(
            err(valid().vsock(1 << 32, "/v")),
            ConfigError::InvalidCid(1 << 32)
        );
        assert_eq!(
            err(valid().vsock(3, "/v").vsock(4, "/w")),
            ConfigError::MultipleVsock
        );
        let bad = VsockConfig {
            buffer_size: 0,
            ..VsockConfig::default()
        };
        let e = err(valid().vsock_with(3, "/v", bad));
        assert_eq!(e, ConfigError::Vsock(VsockConfigError::BufferSize(0)));
        assert!(e.to_string().contains("buffer_size"), "{e}");
        valid()
            .vsock_with(3, "/v", VsockConfig::default().allow_host_port(1))
            .validate()
            .unwrap();
        let mut many = valid();
        for i in 0..=MAX_VIRTIO_DEVICES {
            many = many.block(format!("/disk{i}"), false);
        }
        assert!(matches!(err(many), ConfigError::TooManyDevices(_)));
    }

    #[test]
    fn a_vsock_listener_needs_a_path() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::SocketAddr;

        let dir = std::env::temp_dir().join(format!("dormouse-builder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let named = UnixListener::bind(&path).unwrap();
        valid()
            .vsock_listener(3, named, VsockConfig::default())
            .validate()
            .unwrap();
        let name = format!("dormouse-builder-{}", std::process::id());
        let unnamed =
            || UnixListener::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let e = match valid()
            .vsock_listener(3, unnamed(), VsockConfig::default())
            .validate()
        {
            Err(Error::Config(e)) => e,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(e, ConfigError::UnnamedVsockListener);
        assert!(e.to_string().contains("bind it to a"), "{e}");
        // A restore checks it before it reads the snapshot.
        let e = crate::MicroVm::restore(dir.join("no-such-snapshot"))
            .vsock_listener(unnamed())
            .build()
            .unwrap_err();
        assert!(
            matches!(e, Error::Config(ConfigError::UnnamedVsockListener)),
            "{e:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vmgenid_is_on_by_default_and_needs_a_free_interrupt() {
        assert!(valid().vmgenid);
        assert!(!valid().vmgenid(false).vmgenid);
        let err = |b: MicroVmBuilder| match b.validate() {
            Err(Error::Config(e)) => e,
            other => panic!("expected a config error, got {other:?}"),
        };
        let mut full = valid();
        for i in 0..MAX_VIRTIO_DEVICES {
            full = full.block(format!("/disk{i}"), false);
        }
        let n = full.virtio.len();
        let e = err(full);
        assert_eq!(e, ConfigError::NoSpiForVmGenId(n));
        assert!(e.to_string().contains(".vmgenid(false)"), "{e}");
        // Without the device, the same devices fit; one fewer fits with it.
        let mut without = valid().vmgenid(false);
        let mut one_fewer = valid();
        for i in 0..MAX_VIRTIO_DEVICES {
            without = without.block(format!("/disk{i}"), false);
            if i > 0 {
                one_fewer = one_fewer.block(format!("/disk{i}"), false);
            }
        }
        without.validate().unwrap();
        one_fewer.validate().unwrap();
    }

    #[test]
    fn rate_limits_are_checked_per_device() {
        use crate::rate_limiter::{BucketKind, TokenBucketConfig};

        let err = |b: MicroVmBuilder| match b.validate() {
            Err(Error::Config(e)) => e,
            other => panic!("expected a config error, got {other:?}"),
        };
        let good = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::per_second(10 << 20).with_one_time_burst(1 << 30)),
            ops: Some(TokenBucketConfig::new(100, 100)),
        };
        let zero_refill = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig::new(100, 0)),
        };
        let zero_size = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(0, 1000)),
            ops: None,
        };
        let tap = || TapConfig::Name("tap0".into());
        valid()
            .block_with(BlockConfig::new("/a").rate_limiter(good))
            .net_with(
                NetConfig::new(tap())
                    .rx_rate_limiter(good)
                    .tx_rate_limiter(good),
            )
            .validate()
            .unwrap();
        assert_eq!(
            err(valid()
                .block("/a", false)
                .block_with(BlockConfig::new("/b").rate_limiter(zero_refill))),
            ConfigError::RateLimiter {
                device: "virtio-blk 1".into(),
                source: RateLimiterConfigError::ZeroRefillTime(BucketKind::Ops),
            }
        );
        assert_eq!(
            err(valid().net_with(NetConfig::new(tap()).tx_rate_limiter(zero_size))),
            ConfigError::RateLimiter {
                device: "virtio-net 0 transmit".into(),
                source: RateLimiterConfigError::ZeroSize(BucketKind::Bandwidth),
            }
        );
        let huge = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(u64::MAX, 1000)),
            ops: None,
        };
        let e = err(valid().net_with(NetConfig::new(tap()).rx_rate_limiter(huge)));
        assert!(
            matches!(
                &e,
                ConfigError::RateLimiter {
                    source: RateLimiterConfigError::SizeTooLarge { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("virtio-net 0 receive: "), "{e}");
    }

    #[test]
    fn a_layered_block_config_records_its_top_as_the_path() {
        let layers = DiskLayers::new("/base", "/top").layer("/l1").layer("/l2");
        assert_eq!(layers.layers, [PathBuf::from("/l1"), PathBuf::from("/l2")]);
        let config = BlockConfig::layered(layers.clone()).read_only(true);
        assert_eq!(config.path, PathBuf::from("/top"));
        let b = valid().block_with(config);
        match &b.virtio[..] {
            [VirtioConfig::Block {
                path,
                read_only: true,
                layers: Some(l),
                ..
            }] => {
                assert_eq!(path, &PathBuf::from("/top"));
                assert_eq!(l, &layers);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn block_and_net_shorthands_match_their_configs() {
        let b = valid()
            .block("/a", true)
            .net_with_mac(TapConfig::Name("t".into()), [2, 0, 0, 0, 0, 9]);
        match &b.virtio[..] {
            [VirtioConfig::Block {
                path,
                read_only: true,
                rate_limiter: b_limits,
                layers: None,
            }, VirtioConfig::Net {
                mac,
                rx_rate_limiter,
                tx_rate_limiter,
                ..
            }] => {
                assert_eq!(path, &PathBuf::from("/a"));
                assert_eq!(mac, &[2, 0, 0, 0, 0, 9]);
                assert!(b_limits.is_unlimited());
                assert!(rx_rate_limiter.is_unlimited() && tx_rate_limiter.is_unlimited());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn net_interfaces_get_distinct_macs() {
        let b = valid()
            .net(TapConfig::Name("tap0".into()))
            .net(TapConfig::Name("tap1".into()));
        let macs: Vec<_> = b
            .virtio
            .iter()
            .filter_map(|d| match d {
                VirtioConfig::Net { mac, .. } => Some(*mac),
                _ => None,
            })
            .collect();
        assert_eq!(
            macs,
            vec![[6, 0x64, 0x6d, 0x73, 0, 0], [6, 0x64, 0x6d, 0x73, 0, 1]]
        );
    }

    #[test]
    fn a_missing_kvm_device_is_a_clear_error() {
        let e = valid().kvm_device("/nonexistent/kvm").build().unwrap_err();
        assert!(
            matches!(e, Error::Vm(crate::vm::VmError::KvmNotFound { .. })),
            "{e:?}"
        );
    }
}
