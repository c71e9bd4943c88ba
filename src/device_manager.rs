//! The device manager: owns the MMIO bus and the one allocator of MMIO
//! slots and GIC SPIs, attaches devices to both the bus and KVM (irqfds,
//! ioeventfds), and keeps the plain description the device tree is built
//! from.

use std::io;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestAddress;

use crate::arch::aarch64::fdt::MmioDeviceInfo;
use crate::arch::aarch64::layout;
use crate::bus::{BusError, MmioBus};
use crate::devices::rtc::{RtcDevice, RtcSnapshot, RTC_SIZE};
use crate::devices::serial::{SerialDevice, SerialOutput, SerialSnapshot};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_SIZE, QUEUE_NOTIFY};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::vmgenid::{VmGenId, VmGenIdError, VmGenIdSnapshot, VMGENID_LEN};
use crate::devices::{EventFdTrigger, StateError};
use crate::event_loop::{EventLoop, EventLoopError, Subscriber};
use crate::memory::GuestMemoryMmap;
use crate::vm::{self, VmError};

/// The first MMIO slot and SPI handed to virtio devices (slot 0 and SPI 0
/// are the UART's, slot 1 the RTC's).
const FIRST_VIRTIO_SLOT: u64 = 2;
const FIRST_VIRTIO_SPI: u32 = 1;

/// Errors from attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("could not create an eventfd for a device")]
    EventFd(#[source] io::Error),
    /// The bus refused the device's range.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// KVM refused an irqfd.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// KVM refused an ioeventfd.
    #[error("KVM_IOEVENTFD for queue {queue} at {addr:#x} failed")]
    Ioeventfd {
        /// The queue index.
        queue: usize,
        /// The QueueNotify address.
        addr: u64,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// No MMIO slot or interrupt line is left.
    #[error("too many devices: the memory map has room for {max} virtio devices")]
    OutOfSlots {
        /// How many fit.
        max: u64,
    },
    /// The virtio-blk device could not be created.
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    /// The virtio-net device could not be created.
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::NetError),
    /// The virtio-vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// A device's saved state could not be restored.
    #[error(transparent)]
    State(#[from] StateError),
    /// The event loop could not start.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The VM generation ID device could not be created.
    #[error(transparent)]
    VmGenId(#[from] VmGenIdError),
}

/// The most virtio devices the layout (MMIO slots) and the vGIC (SPIs) hold.
pub const MAX_VIRTIO_DEVICES: u64 = {
    let slots =
        (layout::MMIO_END.0 - layout::MMIO_START.0) / layout::MMIO_SLOT_SIZE - FIRST_VIRTIO_SLOT;
    let spis = (layout::GIC_NR_IRQS - 32 - FIRST_VIRTIO_SPI) as u64;
    if slots < spis {
        slots
    } else {
        spis
    }
};

/// The SPIs a VM with `virtio` virtio devices leaves free (after the
/// UART's and theirs): where the VM generation ID device's interrupt may
/// go.
pub fn free_spis(virtio: usize) -> std::ops::Range<u32> {
    let used = u32::try_from(virtio).map_or(u32::MAX, |n| n.saturating_add(FIRST_VIRTIO_SPI));
    let end = layout::GIC_NR_IRQS - 32;
    used.min(end)..end
}

/// Devices attached so far, and how the device tree describes them.
pub struct DeviceManager {
    /// The bus vCPUs dispatch MMIO exits on.
    pub bus: MmioBus,
    /// The console UART, once attached.
    pub serial: Option<(Arc<Mutex<SerialDevice>>, MmioDeviceInfo)>,
    /// The RTC and its description, once attached.
    pub rtc: Option<(Arc<Mutex<RtcDevice>>, MmioDeviceInfo)>,
    /// Each virtio transport's description, in attach order.
    pub virtio: Vec<MmioDeviceInfo>,
    /// Each virtio transport, in attach order.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Hands connections to the vsock device, once attached.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) vsock: Option<crate::devices::virtio::vsock::Connector>,
    /// The VM generation ID device and its description, once attached.
    pub vmgenid: Option<(VmGenId, MmioDeviceInfo)>,
    subscribers: Vec<(String, Subscriber)>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("bus", &self.bus)
            .field("virtio", &self.virtio)
            .finish_non_exhaustive()
    }
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self {
            bus: MmioBus::new(),
            serial: None,
            rtc: None,
            virtio: Vec::new(),
            transports: Vec::new(),
            vsock: None,
            vmgenid: None,
            subscribers: Vec::new(),
        }
    }

    /// Attaches the console UART at slot 0, its interrupt an irqfd on SPI 0,
    /// fresh or in a saved state.
    pub fn attach_serial(
        &mut self,
        vm: &VmFd,
        output: SerialOutput,
        saved: Option<&SerialSnapshot>,
    ) -> Result<(), DeviceError> {
        let trigger = EventFdTrigger::new().map_err(DeviceError::EventFd)?;
        let serial_trigger = trigger.try_clone().map_err(DeviceError::EventFd)?;
        let device = match saved {
            Some(state) => SerialDevice::restore(serial_trigger, output, state)?,
            None => SerialDevice::new(serial_trigger, output),
        };
        let serial = Arc::new(Mutex::new(device));
        vm::register_irqfd(vm, trigger.eventfd(), layout::SERIAL_SPI)?;
        self.bus
            .insert(layout::SERIAL_START.0, layout::SERIAL_SIZE, serial.clone())?;
        let info = MmioDeviceInfo {
            base: layout::SERIAL_START,
            size: layout::SERIAL_SIZE,
            spi: Some(layout::SERIAL_SPI),
        };
        self.serial = Some((serial, info));
        Ok(())
    }

    /// Attaches the PL031 RTC at slot 1, fresh or in a saved state.
    pub fn attach_rtc(&mut self, saved: Option<&RtcSnapshot>) -> Result<(), DeviceError> {
        let rtc = Arc::new(Mutex::new(match saved {
            Some(state) => RtcDevice::restore(state),
            None => RtcDevice::new(),
        }));
        self.bus
            .insert(layout::RTC_START.0, RTC_SIZE, rtc.clone())?;
        // vm-superio's PL031 raises no alarm interrupt, so none is wired.
        let info = MmioDeviceInfo {
            base: layout::RTC_START,
            size: RTC_SIZE,
            spi: None,
        };
        self.rtc = Some((rtc, info));
        Ok(())
    }

    /// Attaches a virtio device behind a virtio-mmio transport in the next
    /// free slot: an irqfd on its SPI, an ioeventfd per queue on
    /// QueueNotify, and the device on the event loop. Returns the device.
    pub fn attach_virtio<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        device: D,
    ) -> Result<Arc<Mutex<D>>, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let index = self.virtio.len() as u64;
        if index >= MAX_VIRTIO_DEVICES {
            return Err(DeviceError::OutOfSlots {
                max: MAX_VIRTIO_DEVICES,
            });
        }
        let base = GuestAddress(
            layout::MMIO_START.0 + (FIRST_VIRTIO_SLOT + index) * layout::MMIO_SLOT_SIZE,
        );
        // Bounded by MAX_VIRTIO_DEVICES, which the SPI count bounds.
        let spi = FIRST_VIRTIO_SPI + u32::try_from(index).unwrap_or(u32::MAX);

        let device = Arc::new(Mutex::new(device));
        let interrupt = Arc::new(Interrupt::new(
            EventFdTrigger::new().map_err(DeviceError::EventFd)?,
        ));
        vm::register_irqfd(vm, interrupt.eventfd(), spi)?;
        {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner());
            let notify = base.0 + QUEUE_NOTIFY;
            for (queue, evt) in dev.queue_events().iter().enumerate() {
                // The driver writes the queue index, as a 32-bit value.
                let datamatch = u32::try_from(queue).unwrap_or(u32::MAX);
                vm.register_ioevent(evt, &IoEventAddress::Mmio(notify), datamatch)
                    .map_err(|source| DeviceError::Ioeventfd {
                        queue,
                        addr: notify,
                        source,
                    })?;
            }
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device.clone(),
            mem.clone(),
            interrupt,
        )));
        self.bus.insert(base.0, MMIO_SIZE, transport.clone())?;
        self.transports.push(transport);
        let name = {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner());
            format!(
                "{} (virtio slot {index})",
                crate::devices::virtio::device_type_name(dev.device_type())
            )
        };
        self.subscribers.push((name, device.clone()));
        self.virtio.push(MmioDeviceInfo {
            base,
            size: MMIO_SIZE,
            spi: Some(spi),
        });
        Ok(device)
    }

    /// Attaches the VM generation ID device holding `id`: its page as a
    /// read-only memory slot after guest RAM's, at the layout's address and
    /// on the first free SPI, or where `saved` (a snapshot's, already
    /// validated) says the guest found it. Attach it after the virtio
    /// devices. The caller raises its interrupt when the ID changes.
    pub fn attach_vmgenid(
        &mut self,
        vm: &VmFd,
        memory: &GuestMemoryMmap,
        id: [u8; VMGENID_LEN],
        saved: Option<&VmGenIdSnapshot>,
    ) -> Result<(), DeviceError> {
        use vm_memory::GuestMemoryBackend as _;

        let (addr, spi) = match saved {
            Some(s) => (GuestAddress(s.addr), s.spi),
            None => {
                // The builder refuses this first
                // (ConfigError::NoSpiForVmGenId).
                let spi = free_spis(self.virtio.len())
                    .next()
                    .ok_or(DeviceError::OutOfSlots {
                        max: MAX_VIRTIO_DEVICES,
                    })?;
                (layout::VMGENID_START, spi)
            }
        };
        let device = VmGenId::new(addr, spi, id)?;
        // Guest RAM's regions take slots 0..n.
        let slot = u32::try_from(memory.num_regions()).map_err(|_| VmError::TooManyRegions)?;
        vm::register_device_page(vm, slot, addr, device.page())?;
        let info = MmioDeviceInfo {
            base: addr,
            size: layout::VMGENID_SIZE,
            spi: Some(spi),
        };
        self.vmgenid = Some((device, info));
        Ok(())
    }

    /// Adds a subscriber of the caller's to the event loop (test hooks).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) fn add_subscriber(&mut self, name: String, subscriber: Subscriber) {
        self.subscribers.push((name, subscriber));
    }

    /// Starts the event loop over every attached device's I/O; its thread
    /// installs the device I/O filter of `filters`.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) fn start_event_loop(
        &mut self,
        filters: Arc<crate::seccomp::ThreadFilters>,
    ) -> Result<EventLoop, DeviceError> {
        Ok(EventLoop::start_filtered(
            std::mem::take(&mut self.subscribers),
            filters,
            true,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_free_spis_follow_the_virtio_devices() {
        assert_eq!(free_spis(0), 1..96);
        assert_eq!(free_spis(3), 4..96);
        // Every SPI taken: none left, not a wrapped range.
        let all = usize::try_from(MAX_VIRTIO_DEVICES).unwrap();
        assert!(free_spis(all).is_empty());
        assert!(free_spis(usize::MAX).is_empty());
        assert!(!free_spis(all - 1).is_empty());
    }
}
