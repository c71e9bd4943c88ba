//! The flattened device tree the guest kernel boots with.
//!
//! Takes plain data ([`FdtConfig`]): no VMM objects, so it is built and
//! checked host-native with no VM.

use vm_fdt::{FdtWriter, FdtWriterResult};
use vm_memory::GuestAddress;

use super::layout::{gic_redist_size, GIC_DIST_SIZE, GIC_DIST_START, GIC_REDIST_START, PAGE_SIZE};

/// The largest device tree the arm64 boot protocol accepts.
pub const FDT_MAX_SIZE: u64 = 0x20_0000;

// Interrupt specifier cells (Documentation/devicetree/bindings/interrupt-controller/arm,gic-v3.yaml).
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_TYPE_EDGE_RISING: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
/// The GIC maintenance interrupt (PPI 9).
const GIC_MAINTENANCE_PPI: u32 = 9;
/// Architected timer PPIs: secure physical, non-secure physical, virtual,
/// hypervisor physical.
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];

const PHANDLE_GIC: u32 = 1;
const PHANDLE_APB_CLOCK: u32 = 2;

/// The UART's input clock, as for a PC's 16550.
const UART_CLOCK_HZ: u32 = 1_843_200;
/// The AMBA bus clock that PrimeCell devices (the PL031) name.
const APB_CLOCK_HZ: u32 = 24_000_000;

/// An MMIO device as the device tree sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Base of its register window.
    pub base: GuestAddress,
    /// Size of its register window.
    pub size: u64,
    /// Its GIC SPI number, if it raises an interrupt.
    pub spi: Option<u32>,
}

/// Everything the device tree describes, as plain data.
#[derive(Debug, Clone)]
pub struct FdtConfig {
    /// Each vCPU's MPIDR_EL1 (as KVM reports it), in vCPU order.
    pub vcpu_mpidrs: Vec<u64>,
    /// Guest RAM: start and size.
    pub memory: (GuestAddress, u64),
    /// The kernel command line.
    pub cmdline: String,
    /// The initrd: start and size.
    pub initrd: Option<(GuestAddress, u64)>,
    /// The 16550 console.
    pub serial: MmioDeviceInfo,
    /// The PL031 real-time clock.
    pub rtc: Option<MmioDeviceInfo>,
    /// virtio-mmio transports.
    pub virtio: Vec<MmioDeviceInfo>,
    /// The VM generation ID page and its interrupt (`microsoft,vmgenid`).
    pub vmgenid: Option<MmioDeviceInfo>,
    /// Seed for the guest's RNG (`/chosen/rng-seed`).
    pub rng_seed: [u8; 64],
    /// Seed for KASLR (`/chosen/kaslr-seed`).
    pub kaslr_seed: u64,
}

/// Errors from building the device tree.
#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    /// vm-fdt refused the tree.
    #[error("could not build the device tree")]
    Write(#[from] vm_fdt::Error),
    /// The tree is larger than the boot protocol allows.
    #[error("the device tree is {0} bytes, more than the 2 MiB the arm64 boot protocol allows: use fewer devices or a shorter command line")]
    TooLarge(usize),
}

/// Builds the device tree blob for `config`.
pub fn create_fdt(config: &FdtConfig) -> Result<Vec<u8>, FdtError> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", PHANDLE_GIC)?;

    cpus(&mut fdt, &config.vcpu_mpidrs)?;
    memory(&mut fdt, config.memory)?;
    chosen(&mut fdt, config)?;
    psci(&mut fdt)?;
    gic(&mut fdt, config.vcpu_mpidrs.len())?;
    timer(&mut fdt)?;
    apb_clock(&mut fdt)?;
    serial(&mut fdt, &config.serial)?;
    if let Some(rtc) = &config.rtc {
        pl031(&mut fdt, rtc)?;
    }
    for dev in &config.virtio {
        virtio_mmio(&mut fdt, dev)?;
    }
    if let Some(dev) = &config.vmgenid {
        vmgenid(&mut fdt, dev)?;
    }

    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(FdtError::TooLarge(blob.len()));
    }
    Ok(blob)
}

fn cpus(fdt: &mut FdtWriter, mpidrs: &[u64]) -> FdtWriterResult<()> {
    let node = fdt.begin_node("cpus")?;
    // Two address cells: Aff3 lives in MPIDR bits 32..40.
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for mpidr in mpidrs {
        // The affinity fields only: Aff3, Aff2, Aff1, Aff0.
        let reg = mpidr & 0xff_00ff_ffff;
        let cpu = fdt.begin_node(&format!("cpu@{reg:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", reg)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(node)
}

fn memory(fdt: &mut FdtWriter, (start, size): (GuestAddress, u64)) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("memory@{:x}", start.0))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[start.0, size])?;
    fdt.end_node(node)
}

fn chosen(fdt: &mut FdtWriter, config: &FdtConfig) -> FdtWriterResult<()> {
    let node = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", &config.cmdline)?;
    fdt.property_string("stdout-path", &format!("/uart@{:x}", config.serial.base.0))?;
    if let Some((start, size)) = config.initrd {
        fdt.property_u64("linux,initrd-start", start.0)?;
        fdt.property_u64("linux,initrd-end", start.0 + size)?;
    }
    fdt.property("rng-seed", &config.rng_seed)?;
    fdt.property_u64("kaslr-seed", config.kaslr_seed)?;
    fdt.end_node(node)
}

fn psci(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node("psci")?;
    fdt.property_string_list("compatible", vec!["arm,psci-0.2".into(), "arm,psci".into()])?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(node)
}

fn gic(fdt: &mut FdtWriter, vcpus: usize) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("intc@{:x}", GIC_DIST_START.0))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    let vcpus = u32::try_from(vcpus).unwrap_or(u32::MAX);
    fdt.property_array_u64(
        "reg",
        &[
            GIC_DIST_START.0,
            GIC_DIST_SIZE,
            GIC_REDIST_START.0,
            gic_redist_size(vcpus),
        ],
    )?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_PPI, GIC_MAINTENANCE_PPI, IRQ_TYPE_LEVEL_HIGH],
    )?;
    fdt.property_phandle(PHANDLE_GIC)?;
    fdt.end_node(node)
}

fn timer(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let cells: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|&ppi| [GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH])
        .collect();
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.end_node(node)
}

fn apb_clock(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", APB_CLOCK_HZ)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(PHANDLE_APB_CLOCK)?;
    fdt.end_node(node)
}

fn interrupts(fdt: &mut FdtWriter, dev: &MmioDeviceInfo, kind: u32) -> FdtWriterResult<()> {
    match dev.spi {
        Some(spi) => fdt.property_array_u32("interrupts", &[GIC_SPI, spi, kind]),
        None => Ok(()),
    }
}

fn serial(fdt: &mut FdtWriter, dev: &MmioDeviceInfo) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("uart@{:x}", dev.base.0))?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[dev.base.0, dev.size.max(PAGE_SIZE)])?;
    fdt.property_u32("clock-frequency", UART_CLOCK_HZ)?;
    // The interrupt is an irqfd pulse, so edge-triggered.
    interrupts(fdt, dev, IRQ_TYPE_EDGE_RISING)?;
    fdt.end_node(node)
}

fn pl031(fdt: &mut FdtWriter, dev: &MmioDeviceInfo) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("rtc@{:x}", dev.base.0))?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,pl031".into(), "arm,primecell".into()],
    )?;
    fdt.property_array_u64("reg", &[dev.base.0, dev.size])?;
    interrupts(fdt, dev, IRQ_TYPE_LEVEL_HIGH)?;
    fdt.property_u32("clocks", PHANDLE_APB_CLOCK)?;
    fdt.property_string("clock-names", "apb_pclk")?;
    fdt.end_node(node)
}

fn virtio_mmio(fdt: &mut FdtWriter, dev: &MmioDeviceInfo) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("virtio_mmio@{:x}", dev.base.0))?;
    fdt.property_string("compatible", "virtio,mmio")?;
    fdt.property_array_u64("reg", &[dev.base.0, dev.size])?;
    fdt.property_null("dma-coherent")?;
    interrupts(fdt, dev, IRQ_TYPE_EDGE_RISING)?;
    fdt.end_node(node)
}

/// Documentation/devicetree/bindings/rng/microsoft,vmgenid.yaml: the page
/// holding the 16-byte ID, and the edge interrupt raised when it changes.
fn vmgenid(fdt: &mut FdtWriter, dev: &MmioDeviceInfo) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("vmgenid@{:x}", dev.base.0))?;
    fdt.property_string("compatible", "microsoft,vmgenid")?;
    fdt.property_array_u64("reg", &[dev.base.0, dev.size])?;
    interrupts(fdt, dev, IRQ_TYPE_EDGE_RISING)?;
    fdt.end_node(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::aarch64::layout::{
        DRAM_START, RTC_START, SERIAL_SIZE, SERIAL_SPI, SERIAL_START, VMGENID_SIZE, VMGENID_START,
    };

    fn config(vcpus: u64) -> FdtConfig {
        FdtConfig {
            // MPIDRs as KVM assigns them: bit 31 (RES1) set, Aff0 = index.
            vcpu_mpidrs: (0..vcpus).map(|i| 0x8000_0000 | i).collect(),
            memory: (DRAM_START, 256 << 20),
            cmdline: "console=ttyS0 panic=-1".into(),
            initrd: Some((GuestAddress(0x8f00_0000), 0x1234)),
            serial: MmioDeviceInfo {
                base: SERIAL_START,
                size: SERIAL_SIZE,
                spi: Some(SERIAL_SPI),
            },
            rtc: Some(MmioDeviceInfo {
                base: RTC_START,
                size: 0x1000,
                spi: None,
            }),
            virtio: vec![MmioDeviceInfo {
                base: GuestAddress(0x1000_2000),
                size: 0x1000,
                spi: Some(2),
            }],
            vmgenid: Some(MmioDeviceInfo {
                base: VMGENID_START,
                size: VMGENID_SIZE,
                spi: Some(3),
            }),
            rng_seed: [7; 64],
            kaslr_seed: 0x1122_3344_5566_7788,
        }
    }

    fn cells(prop: &[u8]) -> Vec<u32> {
        prop.chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn u64s(prop: &[u8]) -> Vec<u64> {
        prop.chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn describes_cpus_memory_and_chosen() {
        let blob = create_fdt(&config(4)).unwrap();
        let fdt = fdt::Fdt::new(&blob).unwrap();

        let cpus: Vec<_> = fdt.find_node("/cpus").unwrap().children().collect();
        assert_eq!(cpus.len(), 4);
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(cpu.name, format!("cpu@{:x}", i));
            assert_eq!(u64s(cpu.property("reg").unwrap().value), vec![i as u64]);
            assert_eq!(
                cpu.property("enable-method").unwrap().as_str(),
                Some("psci")
            );
        }

        let mem = fdt.find_node("/memory@80000000").unwrap();
        assert_eq!(
            u64s(mem.property("reg").unwrap().value),
            vec![0x8000_0000, 256 << 20]
        );

        let chosen = fdt.find_node("/chosen").unwrap();
        assert_eq!(
            chosen.property("bootargs").unwrap().as_str(),
            Some("console=ttyS0 panic=-1")
        );
        assert_eq!(
            chosen.property("stdout-path").unwrap().as_str(),
            Some("/uart@10000000")
        );
        assert_eq!(
            u64s(chosen.property("linux,initrd-start").unwrap().value),
            vec![0x8f00_0000]
        );
        assert_eq!(
            u64s(chosen.property("linux,initrd-end").unwrap().value),
            vec![0x8f00_1234]
        );
        assert_eq!(chosen.property("rng-seed").unwrap().value, &[7; 64]);
        assert_eq!(
            u64s(chosen.property("kaslr-seed").unwrap().value),
            vec![0x1122_3344_5566_7788]
        );
    }

    #[test]
    fn describes_psci_gic_timer_and_devices() {
        let blob = create_fdt(&config(2)).unwrap();
        let fdt = fdt::Fdt::new(&blob).unwrap();

        let psci = fdt.find_node("/psci").unwrap();
        assert_eq!(psci.property("method").unwrap().as_str(), Some("hvc"));
        assert!(psci
            .compatible()
            .unwrap()
            .all()
            .any(|c| c == "arm,psci-0.2"));

        let gic = fdt.find_node("/intc@8000000").unwrap();
        assert!(gic.compatible().unwrap().all().any(|c| c == "arm,gic-v3"));
        assert_eq!(
            u64s(gic.property("reg").unwrap().value),
            vec![0x0800_0000, 0x1_0000, 0x0900_0000, 2 * 0x2_0000]
        );
        assert_eq!(
            cells(gic.property("#interrupt-cells").unwrap().value),
            vec![3]
        );
        assert_eq!(
            cells(gic.property("interrupts").unwrap().value),
            vec![1, 9, 4]
        );
        let root = fdt.find_node("/").unwrap();
        assert_eq!(
            cells(root.property("interrupt-parent").unwrap().value),
            cells(gic.property("phandle").unwrap().value)
        );

        let timer = fdt.find_node("/timer").unwrap();
        assert_eq!(
            cells(timer.property("interrupts").unwrap().value),
            vec![1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
        );

        let uart = fdt.find_node("/uart@10000000").unwrap();
        assert!(uart.compatible().unwrap().all().any(|c| c == "ns16550a"));
        assert_eq!(
            cells(uart.property("interrupts").unwrap().value),
            vec![0, 0, 1]
        );

        let rtc = fdt.find_node("/rtc@10001000").unwrap();
        assert!(rtc.compatible().unwrap().all().any(|c| c == "arm,pl031"));
        assert!(rtc.property("interrupts").is_none());
        let clock = fdt.find_node("/apb-pclk").unwrap();
        assert_eq!(
            cells(rtc.property("clocks").unwrap().value),
            cells(clock.property("phandle").unwrap().value)
        );
        assert_eq!(
            rtc.property("clock-names").unwrap().as_str(),
            Some("apb_pclk")
        );

        let virtio = fdt.find_node("/virtio_mmio@10002000").unwrap();
        assert!(virtio
            .compatible()
            .unwrap()
            .all()
            .any(|c| c == "virtio,mmio"));
        assert_eq!(
            cells(virtio.property("interrupts").unwrap().value),
            vec![0, 2, 1]
        );
    }

    #[test]
    fn describes_the_vmgenid_page_and_its_edge_interrupt() {
        let blob = create_fdt(&config(1)).unwrap();
        let fdt = fdt::Fdt::new(&blob).unwrap();
        let node = fdt.find_node("/vmgenid@d000000").unwrap();
        assert_eq!(
            node.property("compatible").unwrap().as_str(),
            Some("microsoft,vmgenid")
        );
        assert_eq!(
            u64s(node.property("reg").unwrap().value),
            vec![0x0d00_0000, 0x1000]
        );
        // GIC_SPI 3 IRQ_TYPE_EDGE_RISING.
        assert_eq!(
            cells(node.property("interrupts").unwrap().value),
            vec![0, 3, 1]
        );
        // Not RAM: outside the memory node.
        let mem = fdt.find_node("/memory@80000000").unwrap();
        let ram = u64s(mem.property("reg").unwrap().value);
        assert!(0x0d00_0000 + 0x1000 <= ram[0] || 0x0d00_0000 >= ram[0] + ram[1]);

        let mut cfg = config(1);
        cfg.vmgenid = None;
        let blob = create_fdt(&cfg).unwrap();
        let fdt = fdt::Fdt::new(&blob).unwrap();
        assert!(fdt.find_node("/vmgenid@d000000").is_none());
        assert!(fdt.all_nodes().all(|n| n
            .compatible()
            .is_none_or(|c| c.all().all(|c| c != "microsoft,vmgenid"))));
    }

    #[test]
    fn no_initrd_means_no_initrd_properties() {
        let mut cfg = config(1);
        cfg.initrd = None;
        let blob = create_fdt(&cfg).unwrap();
        let fdt = fdt::Fdt::new(&blob).unwrap();
        let chosen = fdt.find_node("/chosen").unwrap();
        assert!(chosen.property("linux,initrd-start").is_none());
    }

    #[test]
    fn the_blob_stays_within_the_boot_protocol_limit() {
        let mut cfg = config(512);
        cfg.cmdline = "x".repeat(2047);
        let blob = create_fdt(&cfg).unwrap();
        assert!(blob.len() as u64 <= FDT_MAX_SIZE);
    }
}
