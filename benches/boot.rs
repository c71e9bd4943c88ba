//! Boot latency: VMM setup (`build()` until the vCPUs run) and boot to the
//! guest's init, with Debian's arm64 cloud kernel and a busybox initramfs.
//!
//! Needs an aarch64 host with KVM; `cargo xtask bench` runs it in the
//! emulated arm64 host (absolute times there are 10-100x hardware's).

// criterion's macros generate undocumented items; a bench is no public API.
#![allow(missing_docs)]

#[cfg(target_arch = "aarch64")]
#[path = "../tests/common/initramfs.rs"]
mod initramfs;
#[cfg(target_arch = "aarch64")]
#[path = "../tests/common/marker.rs"]
#[allow(dead_code)] // the demo uses the rest
mod marker;

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use std::time::{Duration, Instant};

    use criterion::Criterion;
    use dormouse::builder::DEFAULT_CMDLINE;
    use dormouse::{ExitReason, MicroVm};

    use super::initramfs;
    use super::marker::MarkerClock;

    struct Assets {
        kernel: std::path::PathBuf,
        initrd: std::path::PathBuf,
    }

    fn assets() -> Assets {
        let var = |name: &str| {
            std::env::var_os(name)
                .unwrap_or_else(|| panic!("{name} is not set: run with `cargo xtask bench`"))
        };
        let busybox = std::fs::read(var("DORMOUSE_GUEST_BUSYBOX")).unwrap();
        let mut fs = initramfs::Initramfs::new();
        fs.file("bin/busybox", 0o755, &busybox)
            .init_script("echo @@init\npoweroff -f\n");
        let dir = std::env::temp_dir();
        Assets {
            kernel: var("DORMOUSE_GUEST_KERNEL").into(),
            initrd: fs.write_to(&dir, "dormouse-bench-initrd.cpio").unwrap(),
        }
    }

    fn builder(a: &Assets, vcpus: u32, sink: MarkerClock) -> dormouse::MicroVmBuilder {
        MicroVm::builder()
            .vcpus(vcpus)
            .memory_mib(256)
            .kernel(&a.kernel)
            .initrd(&a.initrd)
            .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
            .serial_output(sink)
    }

    pub fn benches(c: &mut Criterion) {
        let a = assets();

        let mut setup = c.benchmark_group("vmm_setup");
        for vcpus in [1, 2] {
            setup.bench_function(format!("build_{vcpus}vcpu_256MiB"), |b| {
                b.iter_with_large_drop(|| {
                    builder(&a, vcpus, MarkerClock::default()).build().unwrap()
                })
            });
        }
        setup.finish();

        let mut boot = c.benchmark_group("boot_to_init");
        boot.sample_size(10)
            .measurement_time(Duration::from_secs(120))
            .warm_up_time(Duration::from_secs(1));
        for vcpus in [1, 2] {
            boot.bench_function(format!("{vcpus}vcpu_256MiB"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let clock = MarkerClock::default();
                        let start = Instant::now();
                        let mut vm = builder(&a, vcpus, clock.clone()).build().unwrap();
                        assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
                        let seen = clock.seen().expect("init never printed");
                        total += seen - start;
                    }
                    total
                })
            });
        }
        boot.finish();
    }
}

#[cfg(target_arch = "aarch64")]
criterion::criterion_group!(benches, aarch64::benches);
#[cfg(target_arch = "aarch64")]
criterion::criterion_main!(benches);

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("benches/boot.rs measures KVM on aarch64: run it with `cargo xtask bench`");
}
