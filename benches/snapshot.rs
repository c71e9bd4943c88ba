//! Snapshot create and restore latency against guest memory size.
//!
//! - `snapshot_create/<size>`: a paused VM's full snapshot (state + guest
//!   memory, written and fsync'd) to a directory; the memory file is sparse
//!   (the default), and this guest touched only a few pages.
//! - `snapshot_create_touched/1024MiB/{sparse,dense}`: a full snapshot of
//!   a 1 GiB guest that wrote 64 MiB (tests/payloads/dirty.S), sparse (the
//!   pages that hold data) against dense (every byte,
//!   `SnapshotOptions::sparse(false)`), a fresh VM each.
//! - `snapshot_restore/<size>`: `MicroVm::restore(dir).resume(true).build()`,
//!   from the call until the vCPUs run. Memory is mapped, not read, so this
//!   should not grow with memory size beyond KVM's own memory-slot cost.
//! - `floor_restore/<size>`: the honest floor for that restore, with no
//!   dormouse code: kvm-ioctls directly open /dev/kvm, create the VM, map
//!   the same snapshot memory file `MAP_PRIVATE` as one memory slot at
//!   DRAM_START, create and init the vCPUs (PSCI 0.2) and the vGICv3
//!   (addresses, CTRL_INIT), set vCPU 0's PC to DRAM_START and run it until
//!   its first exit: the payload's first instruction pair is an MMIO write
//!   to an unmapped address (dormouse drops it and the payload goes on
//!   counting). Timed from the open to that exit.
//! - `floor_build/<size>`: building a fresh VM of the same size (KVM VM,
//!   memory mapped and registered, vCPU, vGIC), with dormouse.
//!
//! Needs an aarch64 host with KVM; `cargo xtask bench` runs it in the
//! emulated arm64 host (absolute times there are 10-100x hardware's).
//! DORMOUSE_BENCH_SNAPSHOT_DIR picks where snapshots are written (default:
//! the temp dir), DORMOUSE_BENCH_MAX_MIB the largest guest (default 2048).

// criterion's macros generate undocumented items; a bench is no public API.
#![allow(missing_docs)]

#[cfg(target_arch = "aarch64")]
#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

#[cfg(target_arch = "aarch64")]
use common::payloads;

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use criterion::{BenchmarkId, Criterion, SamplingMode};
    use dormouse::snapshot::{SnapshotOptions, MEMORY_FILE};
    use dormouse::{GuestAddress, MicroVm, DRAM_START};
    use vm_memory::Bytes;

    use super::payloads;

    /// Where the payload's first instruction writes: no memory slot and no
    /// device there (layout.rs: "unused (faults as MMIO)").
    const UNMAPPED: u64 = 0x1000;

    /// `mov x9, #0x1000; str w9, [x9]`: one MMIO write to UNMAPPED, so the
    /// floor's first KVM_RUN exits; dormouse drops the write and the
    /// COUNTER payload after it runs on.
    const MMIO_PROLOGUE: [u32; 2] = [0xd282_0009, 0xb900_0129];

    fn code() -> Vec<u8> {
        MMIO_PROLOGUE
            .iter()
            .chain(payloads::COUNTER)
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    fn vm(mib: u64) -> MicroVm {
        MicroVm::builder()
            .vcpus(1)
            .memory_mib(mib)
            .payload(code(), DRAM_START)
            .build()
            .unwrap()
    }

    fn sizes() -> Vec<u64> {
        let max: u64 = std::env::var("DORMOUSE_BENCH_MAX_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2048);
        let mut sizes = vec![128, 1024, max];
        sizes.retain(|&s| s <= max);
        sizes.dedup();
        sizes
    }

    fn dir(mib: u64) -> PathBuf {
        let root = std::env::var_os("DORMOUSE_BENCH_SNAPSHOT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        root.join(format!("dormouse-bench-snap-{mib}"))
    }

    /// The DIRTY payload's control words (tests/payloads/dirty.S).
    fn control(word: u64) -> GuestAddress {
        GuestAddress(DRAM_START.0 + 0x1000 + 8 * word)
    }

    /// A paused `mib` MiB guest that has written `pages` pages.
    fn touched_vm(mib: u64, pages: u64) -> MicroVm {
        let code: Vec<u8> = payloads::DIRTY
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let mut vm = MicroVm::builder()
            .memory_mib(mib)
            .payload(code, DRAM_START)
            .build()
            .unwrap();
        vm.memory().write_obj(pages, control(0)).unwrap();
        vm.memory().write_obj(1u64, control(1)).unwrap();
        vm.start().unwrap();
        let deadline = Instant::now() + Duration::from_secs(600);
        while vm.memory().read_obj::<u64>(control(2)).unwrap() != 1 {
            assert!(Instant::now() < deadline, "the guest does not write");
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.pause().unwrap();
        vm
    }

    /// The floor for `snapshot_restore`: see the module docs. Returns the
    /// time from opening /dev/kvm to vCPU 0's first exit.
    fn floor_restore(memory: &std::path::Path, size: u64, vcpus: u64) -> Duration {
        use std::os::fd::AsRawFd;

        use kvm_bindings::{
            kvm_create_device, kvm_device_attr, kvm_userspace_memory_region, kvm_vcpu_init,
            KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT,
            KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_REG_ARM64, KVM_REG_ARM_CORE,
            KVM_REG_SIZE_U64, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
        };
        use kvm_ioctls::{Kvm, VcpuExit};

        // As src/arch/aarch64/layout.rs places them.
        const DRAM: u64 = 0x8000_0000;
        const GIC_DIST: u64 = 0x0800_0000;
        const GIC_REDIST: u64 = 0x0900_0000;
        // KVM_REG_ARM_CORE id of regs.pc: offset 32 * 8 bytes into
        // kvm_regs, in 32-bit words.
        const PC: u64 = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (256 / 4);

        let start = Instant::now();
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let file = std::fs::File::open(memory).unwrap();
        let len = usize::try_from(size).unwrap();
        // SAFETY: a new private mapping of `len` bytes of our own file at
        // an address the kernel picks; nothing else is touched.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            host,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        let slot = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: DRAM,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` maps `size` bytes until the munmap below, after
        // the VM fd (and with it the slot) is gone.
        unsafe { vm.set_user_memory_region(slot) }.unwrap();
        let mut init = kvm_vcpu_init::default();
        vm.get_preferred_target(&mut init).unwrap();
        init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
        let fds: Vec<_> = (0..vcpus)
            .map(|i| {
                let fd = vm.create_vcpu(i).unwrap();
                let mut init = init;
                if i > 0 {
                    init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
                }
                fd.vcpu_init(&init).unwrap();
                fd
            })
            .collect();
        let mut device = kvm_create_device {
            type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            fd: 0,
            flags: 0,
        };
        let gic = vm.create_device(&mut device).unwrap();
        for (group, attr, value) in [
            (
                KVM_DEV_ARM_VGIC_GRP_ADDR,
                KVM_VGIC_V3_ADDR_TYPE_DIST,
                GIC_DIST,
            ),
            (
                KVM_DEV_ARM_VGIC_GRP_ADDR,
                KVM_VGIC_V3_ADDR_TYPE_REDIST,
                GIC_REDIST,
            ),
            (KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, 0),
        ] {
            let attr = kvm_device_attr {
                group,
                attr: attr.into(),
                addr: std::ptr::addr_of!(value) as u64,
                flags: 0,
            };
            gic.set_device_attr(&attr).unwrap();
        }
        let mut vcpu = fds.into_iter();
        let mut first = vcpu.next().unwrap();
        first.set_one_reg(PC, &DRAM.to_le_bytes()).unwrap();
        match first.run().unwrap() {
            VcpuExit::MmioWrite(addr, _) => assert_eq!(addr, UNMAPPED),
            other => panic!("the floor's first exit is {other:?}, not the MMIO write"),
        }
        let elapsed = start.elapsed();
        drop((first, vcpu, gic, vm));
        // SAFETY: the mapping made above, no longer used by KVM (the VM
        // fd is closed) or by us.
        unsafe { libc::munmap(host, len) };
        elapsed
    }

    pub fn benches(c: &mut Criterion) {
        // RUST_LOG=debug: each restore's phases (dormouse::snapshot).
        super::common::init_logging();
        let sizes = sizes();
        // A clean start: an earlier run may have stopped half way.
        for &mib in &sizes {
            let _ = std::fs::remove_dir_all(dir(mib));
        }
        let mut floor = c.benchmark_group("floor_build");
        floor.sample_size(20).warm_up_time(Duration::from_secs(1));
        for &mib in &sizes {
            floor.bench_with_input(
                BenchmarkId::from_parameter(format!("{mib}MiB")),
                &mib,
                |b, &mib| b.iter_with_large_drop(|| vm(mib)),
            );
        }
        floor.finish();

        let mut create = c.benchmark_group("snapshot_create");
        create.sample_size(10).warm_up_time(Duration::from_secs(1));
        for &mib in &sizes {
            let mut paused = vm(mib);
            paused.start().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            paused.pause().unwrap();
            create.bench_with_input(
                BenchmarkId::from_parameter(format!("{mib}MiB")),
                &mib,
                |b, &mib| b.iter(|| paused.snapshot(dir(mib)).unwrap()),
            );
            // The restore benches below need it even when a filter skipped
            // the measurement above.
            if !dir(mib).join(MEMORY_FILE).exists() {
                paused.snapshot(dir(mib)).unwrap();
            }
        }
        create.finish();

        let mut touched = c.benchmark_group("snapshot_create_touched");
        touched
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(1));
        let mib = 1024;
        if sizes.contains(&mib) {
            // 64 MiB of 4 KiB pages.
            let pages = 64 * 256;
            for (name, sparse) in [("sparse", true), ("dense", false)] {
                let options = SnapshotOptions::default().sparse(sparse);
                let dir = dir(mib).with_extension("touched");
                let mut vm = touched_vm(mib, pages);
                touched.bench_function(BenchmarkId::new(format!("{mib}MiB"), name), |b| {
                    b.iter(|| vm.snapshot_with(&dir, &options).unwrap())
                });
                drop(vm);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        touched.finish();

        let mut restore = c.benchmark_group("snapshot_restore");
        restore.sample_size(20).warm_up_time(Duration::from_secs(1));
        for &mib in &sizes {
            restore.bench_with_input(
                BenchmarkId::from_parameter(format!("{mib}MiB")),
                &mib,
                |b, &mib| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let start = Instant::now();
                            let mut restored =
                                MicroVm::restore(dir(mib)).resume(true).build().unwrap();
                            total += start.elapsed();
                            restored.pause().unwrap();
                        }
                        total
                    })
                },
            );
        }
        restore.finish();

        let mut floor = c.benchmark_group("floor_restore");
        floor.sample_size(20).warm_up_time(Duration::from_secs(1));
        for &mib in &sizes {
            let memory = dir(mib).join(MEMORY_FILE);
            floor.bench_with_input(
                BenchmarkId::from_parameter(format!("{mib}MiB")),
                &mib,
                |b, &mib| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| floor_restore(&memory, mib << 20, 1))
                            .sum()
                    })
                },
            );
            let _ = std::fs::remove_dir_all(dir(mib));
        }
        floor.finish();
    }
}

#[cfg(target_arch = "aarch64")]
criterion::criterion_group!(benches, aarch64::benches);
#[cfg(target_arch = "aarch64")]
criterion::criterion_main!(benches);

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("benches/snapshot.rs measures KVM on aarch64: run it with `cargo xtask bench`");
}
