//! Diff snapshots: cost against dirty pages and against memory size.
//!
//! - `diff_create/<size>/<pct>`: `snapshot_diff` after the guest wrote
//!   `pct` percent of its pages (tests/payloads/dirty.S dirties them from
//!   the guest, so KVM's dirty log and write-protection are in the path).
//! - `diff_pause/<size>/32MiB/<paused|live>`: how long the guest is
//!   stopped when a diff of 32 MiB dirty is taken and the VM runs on:
//!   `pause` + `snapshot_diff` + `resume` against `snapshot_diff_live`
//!   (its `paused`: the copy rounds' short stops and the last step).
//! - `diff_harvest/<size>`: a diff with (almost) nothing dirty: the fixed
//!   cost, i.e. harvesting the dirty log, against memory size.
//! - `chain_restore/<len>`: restoring a chain of a 1 GiB base and `len - 1`
//!   diffs (1% dirty each) until the vCPUs run.
//!
//! Needs an aarch64 host with KVM; `cargo xtask bench` runs it in the
//! emulated arm64 host (absolute times there are 10-100x hardware's).
//! DORMOUSE_BENCH_SNAPSHOT_DIR picks where snapshots go (default: the temp
//! dir), DORMOUSE_BENCH_MAX_MIB the largest guest (default 2048).

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
    use dormouse::{GuestAddress, MicroVm, DRAM_START};
    use vm_memory::Bytes;

    use super::payloads;

    const PAGE: u64 = 4096;
    /// The payload's control page and first page to dirty.
    const CONTROL: u64 = 0x1000;
    const FIRST: u64 = 2;

    fn root() -> PathBuf {
        std::env::var_os("DORMOUSE_BENCH_SNAPSHOT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join("dormouse-bench-diff")
    }

    fn vm(mib: u64) -> MicroVm {
        let code: Vec<u8> = payloads::DIRTY
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        MicroVm::builder()
            .memory_mib(mib)
            .dirty_tracking(true)
            .payload(code, DRAM_START)
            .build()
            .unwrap()
    }

    fn control(word: u64) -> GuestAddress {
        GuestAddress(DRAM_START.0 + CONTROL + 8 * word)
    }

    /// Has the paused guest write `pages` pages, and pauses it again.
    fn dirty(vm: &mut MicroVm, pages: u64, generation: u64) {
        vm.memory().write_obj(pages, control(0)).unwrap();
        vm.memory().write_obj(generation, control(1)).unwrap();
        vm.start().unwrap();
        let deadline = Instant::now() + Duration::from_secs(600);
        while vm.memory().read_obj::<u64>(control(2)).unwrap() != generation {
            assert!(
                Instant::now() < deadline,
                "the guest does not dirty its pages"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.pause().unwrap();
    }

    fn sizes() -> Vec<u64> {
        let max: u64 = std::env::var("DORMOUSE_BENCH_MAX_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2048);
        let mut sizes = vec![256, 1024, max];
        sizes.retain(|&s| s <= max);
        sizes.dedup();
        sizes
    }

    pub fn benches(c: &mut Criterion) {
        let root = root();
        // A clean start: an earlier run may have stopped half way.
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::create_dir_all(&root);
        let mut generation = 0;

        let mut create = c.benchmark_group("diff_create");
        create
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500));
        for mib in sizes() {
            let mut vm = vm(mib);
            vm.snapshot(root.join("base")).unwrap();
            let pages = mib * (1 << 20) / PAGE - FIRST;
            for pct in [1, 10, 50, 100] {
                let n = pages * pct / 100;
                let id = BenchmarkId::new(format!("{mib}MiB"), format!("{pct}pct"));
                create.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            generation += 1;
                            dirty(&mut vm, n, generation);
                            // Only one diff on disk at a time: the emulated
                            // host's disk is its RAM.
                            let _ = std::fs::remove_dir_all(root.join("diff"));
                            let t = Instant::now();
                            vm.snapshot_diff(root.join("diff")).unwrap();
                            total += t.elapsed();
                        }
                        total
                    })
                });
            }
            drop(vm);
        }
        create.finish();

        // The pause the guest sees when a diff is taken and the VM goes on:
        // today's path (pause, snapshot_diff, resume) against a live diff
        // (copy rounds while the guest runs, then a short last pause).
        let mut pause = c.benchmark_group("diff_pause");
        pause
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500));
        for mib in sizes().into_iter().filter(|&m| m == 256 || m == 1024) {
            let mut vm = vm(mib);
            vm.snapshot(root.join("base")).unwrap();
            let n = (32 << 20) / PAGE;
            for live in [false, true] {
                let how = if live { "live" } else { "paused" };
                let id = BenchmarkId::new(format!("{mib}MiB"), format!("32MiB/{how}"));
                pause.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            generation += 1;
                            dirty(&mut vm, n, generation);
                            vm.start().unwrap();
                            let _ = std::fs::remove_dir_all(root.join("diff"));
                            total += if live {
                                let info = vm.snapshot_diff_live(root.join("diff")).unwrap();
                                // Every stop of the vCPUs, not only the last.
                                info.paused
                            } else {
                                let t = Instant::now();
                                vm.pause().unwrap();
                                vm.snapshot_diff(root.join("diff")).unwrap();
                                vm.start().unwrap();
                                t.elapsed()
                            };
                            vm.pause().unwrap();
                        }
                        total
                    })
                });
            }
            drop(vm);
        }
        pause.finish();

        let mut harvest = c.benchmark_group("diff_harvest");
        harvest
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500));
        for mib in sizes() {
            let mut vm = vm(mib);
            vm.snapshot(root.join("base")).unwrap();
            harvest.bench_function(format!("{mib}MiB"), |b| {
                b.iter(|| vm.snapshot_diff(root.join("diff")).unwrap())
            });
        }
        harvest.finish();

        // Its set-up takes minutes (a 1 GiB VM, 16 diffs): not when a
        // filter leaves the group out.
        if !super::wanted("chain_restore") {
            let _ = std::fs::remove_dir_all(&root);
            return;
        }
        let mut chains = c.benchmark_group("chain_restore");
        chains
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500));
        let mib = 1024;
        let mut vm = vm(mib);
        let base = root.join("chain-0");
        vm.snapshot(&base).unwrap();
        let mut layers = vec![base];
        let one_pct = (mib * (1 << 20) / PAGE - FIRST) / 100;
        for i in 1..16 {
            generation += 1;
            dirty(&mut vm, one_pct, generation);
            let layer = root.join(format!("chain-{i}"));
            vm.snapshot_diff(&layer).unwrap();
            layers.push(layer);
        }
        drop(vm);
        for len in [1usize, 4, 16] {
            let chain = layers[..len].to_vec();
            chains.bench_function(format!("{len}layers"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = Instant::now();
                        let mut vm = MicroVm::restore_chain(chain.clone())
                            .resume(true)
                            .build()
                            .unwrap();
                        total += t.elapsed();
                        vm.pause().unwrap();
                    }
                    total
                })
            });
        }
        chains.finish();
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// Whether the command line's filter (criterion's first free argument, a
/// regular expression) could select a benchmark of `group`: no filter, or
/// one that names the group. A guess on the safe side for plain filters.
#[cfg(target_arch = "aarch64")]
fn wanted(group: &str) -> bool {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--bench" {
            continue;
        }
        if arg.starts_with('-') {
            // criterion's options that take a value
            if !arg.contains('=')
                && [
                    "--save-baseline",
                    "--baseline",
                    "--load-baseline",
                    "--sample-size",
                    "--warm-up-time",
                    "--measurement-time",
                    "--nresamples",
                    "--noise-threshold",
                    "--confidence-level",
                    "--significance-level",
                    "--profile-time",
                    "--output-format",
                    "--color",
                    "--plotting-backend",
                    "--format",
                ]
                .contains(&arg.as_str())
            {
                args.next();
            }
            continue;
        }
        return arg.contains(group) || arg.contains(".*") || arg.is_empty();
    }
    true
}

#[cfg(target_arch = "aarch64")]
criterion::criterion_group!(benches, aarch64::benches);
#[cfg(target_arch = "aarch64")]
criterion::criterion_main!(benches);

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("benches/diff.rs measures KVM on aarch64: run it with `cargo xtask bench`");
}
