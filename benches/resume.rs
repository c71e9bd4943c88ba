//! Resume to useful work: from the restore call until the guest has
//! touched its working set, with and without a recorded working set.
//!
//! - `resume_ws/<size>/<pattern>/{lazy,prefetch}`: `MicroVm::restore(dir)`
//!   until the guest (tests/payloads/touch.S) has read one word of every
//!   page of a working set: `seq32` (32 MiB in a row), `scat32` (32 MiB,
//!   every 7th page, visited in a scrambled order) or `all` (every page).
//!   `lazy` restores with `prefetch(false)` (pages fault in on first
//!   touch); `prefetch` restores with the working set recorded on an
//!   earlier restore of the same snapshot.
//! - `resume_ws_cold/<size>/<seq32|scat32>/{lazy,prefetch}`: the same
//!   with the snapshot on a real disk and the page cache dropped before
//!   each restore; only when DORMOUSE_BENCH_COLD_DIR (or the emulated
//!   host's data disk, DORMOUSE_RIG_DATA) names a place for the files.
//! - `restore_call/<size>/{lazy,prefetch}`: the restore call alone, with
//!   and without the `seq32` working set.
//!
//! Each configuration also prints the process's major and minor page
//! faults per restore (`getrusage`). Snapshot files live on the rig's
//! tmpfs, so the page cache is hot. Needs an aarch64 host with KVM;
//! `cargo xtask bench` runs it in the emulated arm64 host (absolute times
//! there are 10-100x hardware's: compare ratios). DORMOUSE_BENCH_MAX_MIB
//! caps the guest size (default 1024), DORMOUSE_BENCH_SNAPSHOT_DIR picks
//! where snapshots go.

// criterion's macros generate undocumented items; a bench is no public API.
#![allow(missing_docs)]

#[cfg(target_arch = "aarch64")]
#[path = "../tests/common/payloads.rs"]
#[allow(dead_code)] // the tests use the other payloads
mod payloads;

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use criterion::{BenchmarkId, Criterion};
    use dormouse::snapshot::{MEMORY_FILE, STATE_FILE, WORKING_SET_FILE};
    use dormouse::{GuestAddress, MicroVm, DRAM_START};
    use vm_memory::Bytes;

    use super::payloads;

    const PAGE: u64 = 4096;
    const FIRST: u64 = 2;
    const WS_PAGES: u64 = 32 * (1 << 20) / PAGE;

    /// A word of touch.S's control page.
    fn ctl(word: u64) -> GuestAddress {
        GuestAddress(DRAM_START.0 + 0x1000 + 8 * word)
    }

    #[derive(Clone, Copy)]
    struct Round {
        op: u64,
        first: u64,
        count: u64,
        spacing: u64,
        mult: u64,
    }

    /// Asks the paused guest for a round; returns its generation.
    fn ask(vm: &MicroVm, r: Round) -> u64 {
        let m = vm.memory();
        let generation = m.read_obj::<u64>(ctl(6)).unwrap() + 1;
        for (i, v) in [r.op, r.first, r.count, r.spacing, r.mult]
            .into_iter()
            .enumerate()
        {
            m.write_obj(v, ctl(i as u64)).unwrap();
        }
        m.write_obj(generation, ctl(5)).unwrap();
        generation
    }

    fn wait(vm: &MicroVm, generation: u64) {
        let deadline = Instant::now() + Duration::from_secs(900);
        while vm.memory().read_obj::<u64>(ctl(6)).unwrap() != generation {
            assert!(Instant::now() < deadline, "the guest does not finish");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn root() -> PathBuf {
        std::env::var_os("DORMOUSE_BENCH_SNAPSHOT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join("dormouse-bench-resume")
    }

    fn sizes() -> Vec<u64> {
        let max: u64 = std::env::var("DORMOUSE_BENCH_MAX_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        [256, 1024].into_iter().filter(|&s| s <= max).collect()
    }

    /// Process-wide (major, minor) page faults so far.
    fn faults() -> (i64, i64) {
        // SAFETY: getrusage fills the struct it is given, nothing else.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; RUSAGE_SELF is always valid.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
        (r.ru_majflt, r.ru_minflt)
    }

    /// A snapshot of a `mib` MiB guest that wrote every page once.
    fn filled(dir: &Path, mib: u64) {
        let code: Vec<u8> = payloads::TOUCH
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let mut vm = MicroVm::builder()
            .memory_mib(mib)
            .payload(code, DRAM_START)
            .build()
            .unwrap();
        let pages = mib * (1 << 20) / PAGE;
        let generation = ask(
            &vm,
            Round {
                op: 1,
                first: FIRST,
                count: pages - FIRST,
                spacing: 1,
                mult: 1,
            },
        );
        vm.start().unwrap();
        wait(&vm, generation);
        vm.pause().unwrap();
        vm.snapshot(dir).unwrap();
    }

    /// The same snapshot under another directory (hard links), with the
    /// working set of `round` recorded on a restore of it.
    fn with_working_set(base: &Path, dir: &Path, round: Round) {
        std::fs::create_dir_all(dir).unwrap();
        for f in [STATE_FILE, MEMORY_FILE] {
            std::fs::hard_link(base.join(f), dir.join(f)).unwrap();
        }
        let mut vm = MicroVm::restore(dir)
            .prefetch(false)
            .record_working_set(true)
            .build()
            .unwrap();
        let generation = ask(&vm, round);
        vm.start().unwrap();
        wait(&vm, generation);
        vm.pause().unwrap();
        let set = vm.record_working_set().unwrap();
        eprintln!(
            "working set of {}: {} pages in {} runs",
            dir.display(),
            set.pages(),
            set.runs().len()
        );
        set.save(dir).unwrap();
    }

    /// Where the cold runs keep their snapshots: a directory on a real
    /// disk (DORMOUSE_BENCH_COLD_DIR, or `cold` under the emulated host's
    /// data disk, DORMOUSE_RIG_DATA); none, no cold runs.
    fn cold_root() -> Option<PathBuf> {
        std::env::var_os("DORMOUSE_BENCH_COLD_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("DORMOUSE_RIG_DATA").map(|d| PathBuf::from(d).join("cold"))
            })
    }

    /// Writes back dirty pages and empties the page cache (needs root, as
    /// the emulated host runs benches).
    fn drop_caches() {
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        std::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .expect("dropping the page cache needs root (/proc/sys/vm/drop_caches)");
    }

    /// Benchmarks restore -> the guest touched `round`'s pages, and prints
    /// the page faults per restore. `cold`: the page cache is dropped
    /// before each restore (not timed).
    #[allow(clippy::too_many_arguments)]
    fn resume(
        group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        id: BenchmarkId,
        label: &str,
        dir: &Path,
        round: Round,
        prefetch: bool,
        cold: bool,
    ) {
        let mut seen = (0i64, 0i64, 0i64);
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if cold {
                        drop_caches();
                    }
                    let before = faults();
                    let start = Instant::now();
                    let vm = MicroVm::restore(dir).prefetch(prefetch).build();
                    let mut vm = vm.unwrap();
                    let generation = ask(&vm, round);
                    vm.start().unwrap();
                    wait(&vm, generation);
                    total += start.elapsed();
                    let after = faults();
                    seen.0 += after.0 - before.0;
                    seen.1 += after.1 - before.1;
                    seen.2 += 1;
                    vm.pause().unwrap();
                }
                total
            })
        });
        eprintln!(
            "faults {label}: {} major, {} minor per restore",
            seen.0 / seen.2.max(1),
            seen.1 / seen.2.max(1)
        );
    }

    /// Log lines to stderr when RUST_LOG names a level (e.g. debug).
    fn init_logging() {
        struct Stderr;
        impl log::Log for Stderr {
            fn enabled(&self, _: &log::Metadata<'_>) -> bool {
                true
            }
            fn log(&self, record: &log::Record<'_>) {
                eprintln!("[{}] {}", record.level(), record.args());
            }
            fn flush(&self) {}
        }
        static LOGGER: Stderr = Stderr;
        if let Some(level) = std::env::var("RUST_LOG").ok().and_then(|l| l.parse().ok()) {
            if log::set_logger(&LOGGER).is_ok() {
                log::set_max_level(level);
            }
        }
    }

    pub fn benches(c: &mut Criterion) {
        init_logging();
        let root = root();
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let mut group = c.benchmark_group("resume_ws");
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(100));
        let mut call = Vec::new();
        let cold_root = cold_root();
        if let Some(dir) = &cold_root {
            let _ = std::fs::remove_dir_all(dir);
        }
        let mut cold_dirs = Vec::new();
        for mib in sizes() {
            let pages = mib * (1 << 20) / PAGE;
            let base = root.join(format!("{mib}"));
            filled(&base, mib);
            let patterns = [
                (
                    "seq32",
                    Round {
                        op: 0,
                        first: FIRST,
                        count: WS_PAGES,
                        spacing: 1,
                        mult: 1,
                    },
                ),
                (
                    "scat32",
                    Round {
                        op: 0,
                        first: FIRST,
                        count: WS_PAGES,
                        spacing: 7,
                        // Odd, so k * mult mod count visits every page.
                        mult: 2_654_435_761,
                    },
                ),
                (
                    "all",
                    Round {
                        op: 0,
                        first: FIRST,
                        count: pages - FIRST,
                        spacing: 1,
                        mult: 1,
                    },
                ),
            ];
            for (name, round) in patterns {
                let dir = root.join(format!("{mib}-{name}"));
                with_working_set(&base, &dir, round);
                for mode in ["lazy", "prefetch"] {
                    let prefetch = mode == "prefetch";
                    let id = BenchmarkId::new(format!("{mib}MiB/{name}"), mode);
                    let label = format!("resume_ws/{mib}MiB/{name}/{mode}");
                    resume(&mut group, id, &label, &dir, round, prefetch, false);
                }
                if let (Some(cold_root), true) = (&cold_root, name != "all") {
                    // The same files on the real disk, for the cold runs.
                    let cold = cold_root.join(format!("{mib}-{name}"));
                    std::fs::create_dir_all(&cold).unwrap();
                    for f in [STATE_FILE, MEMORY_FILE, WORKING_SET_FILE] {
                        std::fs::copy(dir.join(f), cold.join(f)).unwrap();
                    }
                    cold_dirs.push((mib, name, round, cold));
                }
                if name == "seq32" {
                    call.push((mib, dir));
                }
            }
        }
        group.finish();

        // The page cache dropped before each restore: the memory file is
        // read from the disk, on demand (lazy) or ahead (prefetch).
        if !cold_dirs.is_empty() {
            let mut group = c.benchmark_group("resume_ws_cold");
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(100));
            for (mib, name, round, dir) in &cold_dirs {
                for mode in ["lazy", "prefetch"] {
                    let id = BenchmarkId::new(format!("{mib}MiB/{name}"), mode);
                    let label = format!("resume_ws_cold/{mib}MiB/{name}/{mode}");
                    resume(
                        &mut group,
                        id,
                        &label,
                        dir,
                        *round,
                        mode == "prefetch",
                        true,
                    );
                }
            }
            group.finish();
            if let Some(cold_root) = &cold_root {
                let _ = std::fs::remove_dir_all(cold_root);
            }
        }

        let mut group = c.benchmark_group("restore_call");
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500));
        for (mib, dir) in &call {
            for mode in ["lazy", "prefetch"] {
                let prefetch = mode == "prefetch";
                group.bench_function(BenchmarkId::new(format!("{mib}MiB"), mode), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let start = Instant::now();
                            let vm = MicroVm::restore(dir)
                                .prefetch(prefetch)
                                .resume(true)
                                .build();
                            total += start.elapsed();
                            let mut vm = vm.unwrap();
                            vm.pause().unwrap();
                        }
                        total
                    })
                });
            }
        }
        group.finish();
        let _ = std::fs::remove_dir_all(&root);
    }
}

#[cfg(target_arch = "aarch64")]
criterion::criterion_group!(benches, aarch64::benches);
#[cfg(target_arch = "aarch64")]
criterion::criterion_main!(benches);

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("benches/resume.rs measures KVM on aarch64: run it with `cargo xtask bench`");
}
