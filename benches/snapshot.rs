//! Snapshot create and restore latency against guest memory size.
//!
//! - `snapshot_create/<size>`: a paused VM's full snapshot (state + every
//!   byte of guest memory written and fsync'd) to a directory.
//! - `snapshot_restore/<size>`: `MicroVm::restore(dir).resume(true).build()`,
//!   from the call until the vCPUs run. Memory is mapped, not read, so this
//!   should not grow with memory size beyond KVM's own memory-slot cost.
//! - `floor_build/<size>`: building a fresh VM of the same size (KVM VM,
//!   memory mapped and registered, vCPU, vGIC), the floor restore is judged
//!   against.
//!
//! Needs an aarch64 host with KVM; `cargo xtask bench` runs it in the
//! emulated arm64 host (absolute times there are 10-100x hardware's).
//! DORMOUSE_BENCH_SNAPSHOT_DIR picks where snapshots are written (default:
//! the temp dir), DORMOUSE_BENCH_MAX_MIB the largest guest (default 2048).

// criterion's macros generate undocumented items; a bench is no public API.
#![allow(missing_docs)]

#[cfg(target_arch = "aarch64")]
#[path = "../tests/common/payloads.rs"]
#[allow(dead_code)] // the tests use the other payloads
mod payloads;

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use criterion::{BenchmarkId, Criterion};
    use dormouse::{MicroVm, DRAM_START};

    use super::payloads;

    fn code() -> Vec<u8> {
        payloads::COUNTER
            .iter()
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

    pub fn benches(c: &mut Criterion) {
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
        }
        create.finish();

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
            let _ = std::fs::remove_dir_all(dir(mib));
        }
        restore.finish();
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
