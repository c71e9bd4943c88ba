//! [`MicroVm`]: a built VM, and the phases that build it.

#[cfg(target_arch = "aarch64")]
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};

use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::signal::Killable;

use crate::arch::aarch64::layout;
use crate::builder::{ConfigError, MicroVmBuilder};
use crate::bus::MmioBus;
use crate::devices::serial::SerialDevice;
#[cfg(target_arch = "aarch64")]
use vm_memory::{Bytes, GuestAddress};

#[cfg(target_arch = "aarch64")]
use crate::arch::aarch64::fdt::{create_fdt, FdtConfig};
#[cfg(target_arch = "aarch64")]
use crate::arch::aarch64::ArchError;
#[cfg(target_arch = "aarch64")]
use crate::device_manager::DeviceManager;
#[cfg(target_arch = "aarch64")]
use crate::devices::serial;
use crate::event_loop::EventLoop;
#[cfg(target_arch = "aarch64")]
use crate::memory;
use crate::memory::GuestMemoryMmap;
use crate::vcpu::{self, ExitReason, Vcpu, VcpuError};
use crate::{vm, Error};

/// A built microVM.
///
/// Made by [`MicroVm::builder`]; started with [`run`](Self::run).
// Field order is drop order: the device I/O thread stops first, vCPUs and
// the vGIC go before the VM fd, and the VM fd before the guest memory it maps.
pub struct MicroVm {
    _event_loop: EventLoop,
    vcpus: Vec<Vcpu>,
    #[cfg(target_arch = "aarch64")]
    _gic: crate::arch::aarch64::gic::Gic,
    bus: Arc<MmioBus>,
    serial: Arc<Mutex<SerialDevice>>,
    _vm: VmFd,
    memory: GuestMemoryMmap,
    exit: Option<ExitReason>,
}

impl std::fmt::Debug for MicroVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVm")
            .field("vcpus", &self.vcpus.len())
            .field("bus", &self.bus)
            .field("exit", &self.exit)
            .finish_non_exhaustive()
    }
}

/// What a vCPU thread reports when it ends.
type VcpuReport = (u32, Result<Option<ExitReason>, VcpuError>);

impl MicroVm {
    /// Starts configuring a VM.
    pub fn builder() -> MicroVmBuilder {
        MicroVmBuilder::new()
    }

    pub(crate) fn from_builder(config: MicroVmBuilder) -> Result<Self, Error> {
        config.validate()?;
        let kvm = vm::open_kvm(&config.kvm_device)?;
        check_vcpu_limit(&kvm, config.vcpus)?;
        build_for_arch(kvm, config)
    }

    /// Guest memory, for inspecting or preparing guest state.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// How many guest MMIO accesses hit an address no device owns (they read
    /// as zero and writes are dropped; see [`crate::bus`]).
    pub fn unhandled_mmio_accesses(&self) -> u64 {
        self.bus.unhandled_accesses()
    }

    /// How many console bytes could not be delivered to the serial sink.
    pub fn serial_output_errors(&self) -> u64 {
        self.serial
            .lock()
            .map(|s| s.output_errors())
            .unwrap_or_else(|p| p.into_inner().output_errors())
    }

    /// Runs the guest until it powers off, resets, or a vCPU fails.
    ///
    /// Each vCPU runs on its own thread; this call blocks the caller until
    /// the VM stops, then stops every vCPU before returning. A VM runs once:
    /// calling `run` again after it stopped gives [`Error::AlreadyStopped`].
    pub fn run(&mut self) -> Result<ExitReason, Error> {
        if let Some(reason) = self.exit {
            return Err(Error::AlreadyStopped(reason));
        }
        vcpu::install_kick_handler()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<VcpuReport>();
        let mut threads = Vec::with_capacity(self.vcpus.len());
        let mut outcome = None;
        for vcpu in self.vcpus.drain(..) {
            match spawn_vcpu(vcpu, self.bus.clone(), stop.clone(), tx.clone()) {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    outcome = Some(Err(e));
                    break;
                }
            }
        }
        drop(tx);
        let outcome = outcome.unwrap_or_else(|| first_stop(&rx));

        stop.store(true, Ordering::Release);
        for (_, handle) in &threads {
            // ESRCH (thread already gone) is fine: it saw `stop` or ended.
            let _ = handle.kill(vcpu::kick_signal());
        }
        let mut panicked = None;
        for (index, handle) in threads {
            match handle.join() {
                Ok(Some(vcpu)) => self.vcpus.push(vcpu),
                Ok(None) | Err(_) => panicked = Some(index),
            }
        }
        self.vcpus.sort_by_key(Vcpu::index);
        let reason = outcome?;
        if let Some(index) = panicked {
            return Err(VcpuError::ThreadPanicked { index }.into());
        }
        self.exit = Some(reason);
        Ok(reason)
    }
}

/// Waits for the first vCPU that stops the VM.
fn first_stop(rx: &mpsc::Receiver<VcpuReport>) -> Result<ExitReason, Error> {
    loop {
        match rx.recv() {
            Ok((_, Ok(Some(reason)))) => return Ok(reason),
            Ok((_, Err(e))) => return Err(e.into()),
            // Only happens once `stop` is set, which is after this returns.
            Ok((_, Ok(None))) => continue,
            // Every thread ended without a report: all panicked.
            Err(mpsc::RecvError) => return Err(VcpuError::ThreadPanicked { index: 0 }.into()),
        }
    }
}

type VcpuThread = (u32, JoinHandle<Option<Vcpu>>);

fn spawn_vcpu(
    mut vcpu: Vcpu,
    bus: Arc<MmioBus>,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<VcpuReport>,
) -> Result<VcpuThread, Error> {
    let index = vcpu.index();
    let handle = thread::Builder::new()
        .name(format!("dormouse-vcpu{index}"))
        .spawn(move || {
            let result = catch_unwind(AssertUnwindSafe(|| vcpu.run_until_stopped(&bus, &stop)));
            match result {
                Ok(report) => {
                    // The receiver only goes away once `run` returns, after
                    // every thread was joined; a failed send cannot happen.
                    let _ = tx.send((index, report));
                    Some(vcpu)
                }
                Err(_) => {
                    let _ = tx.send((index, Err(VcpuError::ThreadPanicked { index })));
                    None
                }
            }
        })
        .map_err(|source| VcpuError::Spawn { index, source })?;
    Ok((index, handle))
}

fn check_vcpu_limit(kvm: &Kvm, requested: u32) -> Result<(), Error> {
    let kvm_max = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
    let max = kvm_max.min(layout::MAX_VCPUS);
    if requested > max {
        return Err(ConfigError::TooManyVcpus { requested, max }.into());
    }
    Ok(())
}

#[cfg(not(target_arch = "aarch64"))]
fn build_for_arch(_kvm: Kvm, _config: MicroVmBuilder) -> Result<MicroVm, Error> {
    Err(Error::UnsupportedArchitecture(std::env::consts::ARCH))
}

/// The build recipe: VM → memory → vCPUs → vGIC → devices → boot source
/// (kernel, initrd, device tree, or a raw payload) → boot registers. vCPUs
/// are left stopped until [`MicroVm::run`].
#[cfg(target_arch = "aarch64")]
fn build_for_arch(kvm: Kvm, mut config: MicroVmBuilder) -> Result<MicroVm, Error> {
    use crate::arch::aarch64::gic::Gic;
    use crate::arch::aarch64::regs;

    let vm = vm::create_vm(&kvm)?;
    let memory = memory::create(config.memory_size)?;
    vm::register_memory(&vm, &memory)?;

    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let fd = vm
            .create_vcpu(index.into())
            .map_err(|source| VcpuError::Create { index, source })?;
        regs::init_vcpu(&vm, &fd, index)?;
        vcpus.push(Vcpu::new(index, fd));
    }

    let gic = Gic::new(&vm)?;
    gic.finalize()?;

    let mut devices = DeviceManager::new();
    let output = config
        .serial_output
        .take()
        .unwrap_or_else(|| Box::new(io::sink()));
    devices.attach_serial(&vm, output)?;
    if config.rtc {
        devices.attach_rtc()?;
    }
    attach_virtio_devices(&mut devices, &vm, &memory, &mut config)?;
    let event_loop = devices.start_event_loop()?;

    let (entry, x0) = load_boot_source(&memory, &vcpus, &devices, &config)?;
    regs::set_boot_registers(vcpus[0].fd(), 0, entry.0, x0)?;

    let (serial, _) = devices
        .serial
        .ok_or(Error::Internal("the console UART was not attached"))?;
    // Last: nothing can fail once the console thread runs.
    if let Some(input) = config.serial_input.take() {
        serial::spawn_input_thread(Arc::downgrade(&serial), input).map_err(Error::Host)?;
    }

    Ok(MicroVm {
        _event_loop: event_loop,
        vcpus,
        _gic: gic,
        bus: Arc::new(devices.bus),
        serial,
        _vm: vm,
        memory,
        exit: None,
    })
}

/// Creates and attaches the configured virtio devices, in order.
#[cfg(target_arch = "aarch64")]
fn attach_virtio_devices(
    devices: &mut DeviceManager,
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    config: &mut MicroVmBuilder,
) -> Result<(), Error> {
    use crate::builder::VirtioConfig;
    use crate::device_manager::DeviceError;
    use crate::devices::virtio::{block::Block, net::Net, vsock::Vsock};

    for device in config.virtio.drain(..) {
        match device {
            VirtioConfig::Block { path, read_only } => {
                let block = Block::new(&path, read_only).map_err(DeviceError::from)?;
                devices.attach_virtio(vm, memory, block)?;
            }
            VirtioConfig::Net { tap, mac } => {
                let net = Net::new(tap, mac).map_err(DeviceError::from)?;
                devices.attach_virtio(vm, memory, net)?;
            }
            VirtioConfig::Vsock { cid, uds_path } => {
                let vsock = Vsock::new(cid, &uds_path).map_err(DeviceError::from)?;
                devices.attach_virtio(vm, memory, vsock)?;
            }
        }
    }
    Ok(())
}

/// Loads the kernel, initrd and device tree, or the raw payload. Returns
/// the entry point and the value for x0.
#[cfg(target_arch = "aarch64")]
fn load_boot_source(
    memory: &GuestMemoryMmap,
    vcpus: &[Vcpu],
    devices: &DeviceManager,
    config: &MicroVmBuilder,
) -> Result<(GuestAddress, u64), Error> {
    use crate::arch::aarch64::{boot, regs};

    if let Some(payload) = &config.payload {
        memory
            .write_slice(&payload.bytes, payload.addr)
            .map_err(|_| ConfigError::PayloadOutsideMemory {
                addr: payload.addr.0,
                len: payload.bytes.len() as u64,
                ram_start: layout::DRAM_START.0,
                ram_end: memory::end(memory).0,
            })?;
        return Ok((payload.addr, 0));
    }
    let kernel = config.kernel.as_deref().ok_or(ConfigError::NoBootSource)?;
    let ram = (layout::DRAM_START, config.memory_size);
    let loaded =
        boot::load(memory, ram, kernel, config.initrd.as_deref()).map_err(ArchError::from)?;

    let vcpu_mpidrs = vcpus
        .iter()
        .map(|v| regs::mpidr(v.fd(), v.index()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rng_seed = [0u8; 64];
    host_random(&mut rng_seed).map_err(Error::Host)?;
    let mut kaslr_seed = [0u8; 8];
    host_random(&mut kaslr_seed).map_err(Error::Host)?;
    let fdt = create_fdt(&FdtConfig {
        vcpu_mpidrs,
        memory: ram,
        cmdline: config.kernel_cmdline()?,
        initrd: loaded.initrd,
        serial: devices
            .serial
            .as_ref()
            .map(|(_, info)| *info)
            .ok_or(Error::Internal("the console UART was not attached"))?,
        rtc: devices.rtc,
        virtio: devices.virtio.clone(),
        rng_seed,
        kaslr_seed: u64::from_le_bytes(kaslr_seed),
    })
    .map_err(ArchError::from)?;
    boot::write_fdt(memory, loaded.fdt, &fdt).map_err(ArchError::from)?;
    Ok((loaded.entry, loaded.fdt.0))
}

/// Fills `buf` from the host's RNG.
#[cfg(target_arch = "aarch64")]
fn host_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes;
        // getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}
