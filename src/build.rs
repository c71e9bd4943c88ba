//! The phases that turn plain configuration into a live VM, shared by
//! [`MicroVmBuilder::build`](crate::MicroVmBuilder::build) and
//! [`MicroVm::restore`](crate::MicroVm::restore):
//!
//! KVM → VM → memory → vCPUs → vGIC → devices → (boot source and registers,
//! or saved state) → event loop. The VM comes out paused.

use kvm_ioctls::Kvm;

use crate::arch::aarch64::layout;
use crate::builder::ConfigError;
use crate::Error;
#[cfg(not(target_arch = "aarch64"))]
use crate::{builder::MicroVmBuilder, vm, MicroVm};

/// Checks a vCPU count against KVM's limit and the memory map's.
pub(crate) fn check_vcpu_limit(kvm: &Kvm, requested: u32) -> Result<(), Error> {
    let kvm_max = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
    let max = kvm_max.min(layout::MAX_VCPUS);
    if requested > max {
        return Err(ConfigError::TooManyVcpus { requested, max }.into());
    }
    Ok(())
}

/// Builds a VM from a validated configuration.
#[cfg(not(target_arch = "aarch64"))]
pub(crate) fn build(config: MicroVmBuilder) -> Result<MicroVm, Error> {
    let kvm = vm::open_kvm(&config.kvm_device)?;
    check_vcpu_limit(&kvm, config.vcpus)?;
    Err(Error::UnsupportedArchitecture(std::env::consts::ARCH))
}

#[cfg(target_arch = "aarch64")]
pub(crate) use aarch64::*;

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use std::io;
    use std::sync::Arc;

    use kvm_ioctls::{Kvm, VmFd};
    use vm_memory::{Bytes, GuestAddress};

    use super::check_vcpu_limit;
    use crate::arch::aarch64::fdt::{create_fdt, FdtConfig};
    use crate::arch::aarch64::gic::Gic;
    use crate::arch::aarch64::{boot, layout, regs, ArchError};
    use crate::builder::{ConfigError, MicroVmBuilder, VirtioConfig, VsockHost};
    use crate::device_manager::{DeviceError, DeviceManager};
    use crate::devices::serial::{self, ConsoleOutput, SerialInput, SerialOutput};
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::net::Net;
    use crate::devices::virtio::vsock::Vsock;
    use crate::devices::vmgenid::VMGENID_LEN;
    use crate::memory::{self, GuestMemoryMmap};
    use crate::microvm::RunState;
    use crate::seccomp::{SeccompPolicy, ThreadFilters};
    use crate::snapshot::{SavedConfig, SavedDevice};
    use crate::vcpu::{Vcpu, VcpuError};
    use crate::{vm, Error, MicroVm};

    /// The VM, its memory, vCPUs and vGIC: what build and restore share
    /// before devices differ.
    pub(crate) struct Core {
        pub vm: VmFd,
        pub memory: GuestMemoryMmap,
        pub vcpus: Vec<Vcpu>,
        pub gic: Gic,
        pub dirty: Option<crate::dirty::Tracking>,
    }

    /// Opens KVM, creates the VM (with dirty logging if asked), registers
    /// `memory`, creates and initialises `vcpus` vCPUs and the vGIC.
    pub(crate) fn create_core(
        kvm_device: &std::path::Path,
        memory: GuestMemoryMmap,
        vcpu_count: u32,
        dirty_tracking: Option<bool>,
    ) -> Result<Core, Error> {
        let kvm = vm::open_kvm(kvm_device)?;
        check_vcpu_limit(&kvm, vcpu_count)?;
        create_core_with(&kvm, memory, vcpu_count, dirty_tracking)
    }

    fn create_core_with(
        kvm: &Kvm,
        memory: GuestMemoryMmap,
        vcpu_count: u32,
        dirty_tracking: Option<bool>,
    ) -> Result<Core, Error> {
        use crate::dirty::{DirtyMode, DirtyRing, RingSink, Tracking};

        let vm = vm::create_vm(kvm)?;
        // `Some(prefer_ring)`: tracking on, with the ring where KVM has it.
        let mode = dirty_tracking.map(|prefer_ring| match prefer_ring {
            true => crate::dirty::ring_mode(&vm).unwrap_or(DirtyMode::Log),
            false => DirtyMode::Log,
        });
        if let Some(mode) = mode {
            crate::dirty::enable_mode(&vm, mode)?;
        }
        vm::register_memory(&vm, &memory, mode.is_some())?;
        let sink = match mode {
            Some(DirtyMode::Ring(_)) => {
                let pages: Vec<u64> = {
                    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
                    memory.iter().map(|r| r.len() / layout::PAGE_SIZE).collect()
                };
                Some(Arc::new(RingSink::new(&vm, &pages)?))
            }
            _ => None,
        };
        let mut vcpus = Vec::with_capacity(vcpu_count as usize);
        for index in 0..vcpu_count {
            let fd = vm
                .create_vcpu(index.into())
                .map_err(|source| VcpuError::Create { index, source })?;
            regs::init_vcpu(&vm, &fd, index)?;
            let mut vcpu = Vcpu::new(index, fd);
            if let (Some(DirtyMode::Ring(bytes)), Some(sink)) = (mode, &sink) {
                let ring = DirtyRing::map(vcpu.fd(), bytes)?;
                vcpu.set_dirty_ring(ring, sink.clone());
            }
            vcpus.push(vcpu);
        }
        let dirty = mode.map(|mode| Tracking { mode, sink });
        let gic = Gic::new(&vm)?;
        gic.finalize()?;
        Ok(Core {
            vm,
            memory,
            vcpus,
            gic,
            dirty,
        })
    }

    /// Creates and attaches virtio devices in order; returns how a snapshot
    /// records them.
    pub(crate) fn attach_virtio_devices(
        devices: &mut DeviceManager,
        vm: &VmFd,
        memory: &GuestMemoryMmap,
        configs: Vec<VirtioConfig>,
    ) -> Result<Vec<SavedDevice>, Error> {
        let mut saved = Vec::with_capacity(configs.len());
        for config in configs {
            match config {
                VirtioConfig::Block {
                    path,
                    read_only,
                    rate_limiter,
                    layers,
                } => {
                    let block = match &layers {
                        Some(layers) => Block::layered(layers, read_only),
                        None => Block::new(&path, read_only),
                    };
                    let block = block
                        .and_then(|b| b.with_rate_limiter(&rate_limiter))
                        .map_err(DeviceError::from)?;
                    devices.attach_virtio(vm, memory, block)?;
                    saved.push(SavedDevice::Block {
                        path,
                        read_only,
                        rate_limiter,
                    });
                }
                VirtioConfig::Net {
                    tap,
                    mac,
                    rx_rate_limiter,
                    tx_rate_limiter,
                } => {
                    let net = Net::new(tap, mac)
                        .and_then(|n| n.with_rate_limiters(&rx_rate_limiter, &tx_rate_limiter))
                        .map_err(DeviceError::from)?;
                    let tap = net.tap_name().to_string();
                    devices.attach_virtio(vm, memory, net)?;
                    saved.push(SavedDevice::Net {
                        tap,
                        mac,
                        rx_rate_limiter,
                        tx_rate_limiter,
                    });
                }
                VirtioConfig::Vsock { cid, host, config } => {
                    let vsock = match host {
                        VsockHost::Path(path) => Vsock::with_config(cid, &path, config.clone()),
                        VsockHost::Listener(l) => Vsock::with_listener(cid, l, config.clone()),
                    }
                    .map_err(DeviceError::from)?;
                    let connector = vsock.connector();
                    let uds_path = vsock.uds_path().to_path_buf();
                    devices.attach_virtio(vm, memory, vsock)?;
                    devices.vsock = Some(connector);
                    saved.push(SavedDevice::Vsock {
                        cid,
                        uds_path,
                        config,
                    });
                }
            }
        }
        Ok(saved)
    }

    /// What the VM's own threads need: the seccomp filters they install,
    /// the console output thread, and the console input.
    pub(crate) struct Threads {
        filters: Arc<ThreadFilters>,
        console: Option<ConsoleOutput>,
        input: Option<SerialInput>,
    }

    impl Threads {
        /// Compiles the filters of `policy` and starts the console output
        /// thread if there is a sink. Returns what the UART writes to.
        /// First of all phases: a bad policy is a configuration error.
        pub(crate) fn start(
            policy: &SeccompPolicy,
            output: Option<SerialOutput>,
            input: Option<SerialInput>,
        ) -> Result<(Self, SerialOutput), Error> {
            let filters = Arc::new(ThreadFilters::new(policy)?);
            let (console, writer): (_, SerialOutput) = match output {
                Some(sink) => {
                    let (console, writer) =
                        ConsoleOutput::start(sink, serial::CONSOLE_BUFFER_BYTES, &filters)?;
                    (Some(console), Box::new(writer))
                }
                None => (None, Box::new(io::sink())),
            };
            let threads = Self {
                filters,
                console,
                input,
            };
            Ok((threads, writer))
        }
    }

    /// Puts the pieces together: starts the device event loop parked and
    /// the console input thread. The VM comes out paused.
    pub(crate) fn assemble(
        core: Core,
        mut devices: DeviceManager,
        config: SavedConfig,
        threads: Threads,
    ) -> Result<MicroVm, Error> {
        // Started paused, as the VM: no device runs before start().
        let event_loop = devices.start_event_loop(threads.filters.clone())?;
        let (serial, _) = devices
            .serial
            .ok_or(Error::Internal("the console UART was not attached"))?;
        // Last: nothing can fail once the console thread runs.
        if let Some(input) = threads.input {
            serial::spawn_input_thread(Arc::downgrade(&serial), input, &threads.filters)?;
        }
        Ok(MicroVm {
            working_set: Default::default(),
            snapshot_id: None,
            dirty: core.dirty,
            run: RunState::Paused,
            event_loop,
            console: threads.console,
            seccomp: threads.filters,
            vcpus: core.vcpus,
            gic: core.gic,
            bus: Arc::new(devices.bus),
            serial,
            rtc: devices.rtc.map(|(rtc, _)| rtc),
            transports: devices.transports,
            vsock: devices.vsock,
            config,
            _vm: core.vm,
            vmgenid: devices.vmgenid.map(|(device, _)| device),
            memory: core.memory,
            memory_source: None,
        })
    }

    /// The build recipe for a new VM.
    pub(crate) fn build(mut config: MicroVmBuilder) -> Result<MicroVm, Error> {
        let (threads, output) = Threads::start(
            &config.seccomp,
            config.serial_output.take(),
            config.serial_input.take(),
        )?;
        let memory = memory::create(config.memory_size)?;
        let core = create_core(
            &config.kvm_device,
            memory,
            config.vcpus,
            config.dirty_tracking.then_some(config.dirty_ring),
        )?;

        let mut devices = DeviceManager::new();
        devices.attach_serial(&core.vm, output, None)?;
        if config.rtc {
            devices.attach_rtc(None)?;
        }
        let saved_devices = attach_virtio_devices(
            &mut devices,
            &core.vm,
            &core.memory,
            std::mem::take(&mut config.virtio),
        )?;

        if config.vmgenid {
            let mut id = [0u8; VMGENID_LEN];
            vm::host_random(&mut id).map_err(Error::Host)?;
            devices.attach_vmgenid(&core.vm, &core.memory, id, None)?;
        }

        for (base, len, device) in std::mem::take(&mut config.test_hooks.mmio) {
            devices.bus.insert(base, len, device)?;
        }
        for (name, subscriber) in std::mem::take(&mut config.test_hooks.io) {
            devices.add_subscriber(name, subscriber);
        }
        let (entry, x0) = load_boot_source(&core, &devices, &config)?;
        regs::set_boot_registers(core.vcpus[0].fd(), 0, entry.0, x0)?;

        let saved = SavedConfig {
            memory_size: config.memory_size,
            vcpus: config.vcpus,
            rtc: config.rtc,
            dirty_tracking: config.dirty_tracking,
            dirty_ring: config.dirty_ring,
            devices: saved_devices,
        };
        assemble(core, devices, saved, threads)
    }

    /// Loads the kernel, initrd and device tree, or the raw payload.
    /// Returns the entry point and the value for x0.
    fn load_boot_source(
        core: &Core,
        devices: &DeviceManager,
        config: &MicroVmBuilder,
    ) -> Result<(GuestAddress, u64), Error> {
        let memory = &core.memory;
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

        let vcpu_mpidrs = core
            .vcpus
            .iter()
            .map(|v| regs::mpidr(v.fd(), v.index()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut rng_seed = [0u8; 64];
        vm::host_random(&mut rng_seed).map_err(Error::Host)?;
        let mut kaslr_seed = [0u8; 8];
        vm::host_random(&mut kaslr_seed).map_err(Error::Host)?;
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
            rtc: devices.rtc.as_ref().map(|(_, info)| *info),
            virtio: devices.virtio.clone(),
            vmgenid: devices.vmgenid.as_ref().map(|(_, info)| *info),
            rng_seed,
            kaslr_seed: u64::from_le_bytes(kaslr_seed),
        })
        .map_err(ArchError::from)?;
        boot::write_fdt(memory, loaded.fdt, &fdt).map_err(ArchError::from)?;
        Ok((loaded.entry, loaded.fdt.0))
    }
}
