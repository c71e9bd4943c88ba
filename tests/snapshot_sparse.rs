//! Sparse full snapshots on real KVM: a fresh VM's snapshot allocates what
//! its guest wrote, not its memory size; a restored VM's snapshot takes
//! the pages the guest did not write from the files it was restored from,
//! and costs what changed since. Every snapshot restores and runs on.
#![cfg(target_arch = "aarch64")]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{code, dirty, payloads, TempDir};
use dormouse::snapshot::{SnapshotOptions, MEMORY_FILE};
use dormouse::{GuestAddress, MicroVm, DRAM_START};
use vm_memory::Bytes;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// The guest's memory: far more than any of these guests writes.
const MEMORY_MIB: u64 = 256;

/// Bytes the file takes on its filesystem (holes take none).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn memory_file(dir: &Path) -> PathBuf {
    dir.join(MEMORY_FILE)
}

/// The first word of the `n`-th page the DIRTY payload writes.
fn dirtied(vm: &MicroVm, n: u64) -> u64 {
    vm.memory()
        .read_obj(GuestAddress(DRAM_START.0 + 0x2000 + n * PAGE))
        .unwrap()
}

fn dirtying_vm(tracking: bool) -> MicroVm {
    MicroVm::builder()
        .memory_mib(MEMORY_MIB)
        .dirty_tracking(tracking)
        .payload(code(payloads::DIRTY), DRAM_START)
        .build()
        .unwrap()
}

/// Asserts the first `pages` pages the payload writes hold `generation`,
/// and the next one is still untouched.
fn assert_dirtied(vm: &MicroVm, pages: u64, generation: u64, untouched_from: u64) {
    for n in [0, pages / 2, pages - 1] {
        assert_eq!(dirtied(vm, n), generation, "page {n}");
    }
    assert_eq!(dirtied(vm, untouched_from), 0, "page {untouched_from}");
}

/// Where vCPU n stores its count (see tests/payloads/counter.S).
fn counter(vm: &MicroVm) -> u64 {
    vm.memory().read_obj(GuestAddress(0x8010_0000)).unwrap()
}

fn wait_past(vm: &MicroVm, floor: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter(vm) <= floor {
        assert!(Instant::now() < deadline, "the guest does not count");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sparse_snapshot_of_a_fresh_counting_vm_is_holes_but_a_few_pages_and_restores() {
    let tmp = TempDir::new("sparse-counter");
    let dir = tmp.0.join("snap");
    let mut vm = MicroVm::builder()
        .memory_mib(MEMORY_MIB)
        .payload(code(payloads::COUNTER), DRAM_START)
        .build()
        .unwrap();
    vm.start().unwrap();
    wait_past(&vm, 10_000);
    vm.pause().unwrap();
    let saved = counter(&vm);
    let info = vm.snapshot(&dir).unwrap();
    drop(vm);

    let file = memory_file(&dir);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), MEMORY_MIB * MIB);
    // The code page and the counter's: nothing else holds data.
    assert!(
        allocated(&file) <= 64 * 1024,
        "{} bytes allocated",
        allocated(&file)
    );
    assert!(info.memory_bytes > 0 && info.memory_bytes <= 64 * 1024);

    let mut restored = MicroVm::restore(&dir).build().unwrap();
    assert_eq!(counter(&restored), saved);
    restored.resume().unwrap();
    wait_past(&restored, saved + 10_000);
    restored.pause().unwrap();
}

#[test]
fn sparse_snapshot_of_a_fresh_vm_allocates_what_its_guest_wrote() {
    let tmp = TempDir::new("sparse-fresh");
    let dir = tmp.0.join("snap");
    let pages = 1024; // 4 MiB
    let mut vm = dirtying_vm(false);
    dirty(&mut vm, pages, 1);
    let info = vm.snapshot(&dir).unwrap();
    drop(vm);

    let file = memory_file(&dir);
    let written = pages * PAGE;
    assert!(
        (written..written + 256 * 1024).contains(&allocated(&file)),
        "{} bytes allocated for {written} bytes the guest wrote",
        allocated(&file)
    );
    assert!((written..written + 256 * 1024).contains(&info.memory_bytes));

    let mut restored = MicroVm::restore(&dir).build().unwrap();
    assert_dirtied(&restored, pages, 1, pages);
    // The guest runs on from the snapshot: it takes the next round.
    dirty(&mut restored, 2 * pages, 2);
    assert_dirtied(&restored, 2 * pages, 2, 2 * pages);
}

#[test]
fn sparse_and_dense_snapshots_restore_the_same_memory() {
    let tmp = TempDir::new("sparse-dense");
    let (dense, sparse) = (tmp.0.join("dense"), tmp.0.join("sparse"));
    let mut vm = dirtying_vm(false);
    dirty(&mut vm, 256, 1);
    vm.snapshot(&sparse).unwrap();
    let info = vm
        .snapshot_with(&dense, &SnapshotOptions::default().sparse(false))
        .unwrap();
    assert_eq!(info.memory_bytes, MEMORY_MIB * MIB);
    assert!(allocated(&memory_file(&dense)) >= MEMORY_MIB * MIB);
    drop(vm);
    let restored = MicroVm::restore(&dense).build().unwrap();
    common::assert_memory_equals_file(&restored, &memory_file(&sparse));
}

#[test]
fn sparse_snapshot_of_a_restored_vm_costs_what_changed_since() {
    let tmp = TempDir::new("sparse-restored");
    let (a, b) = (tmp.0.join("a"), tmp.0.join("b"));
    let mut vm = dirtying_vm(false);
    dirty(&mut vm, 1024, 1);
    vm.snapshot(&a).unwrap();
    drop(vm);

    let mut restored = MicroVm::restore(&a).build().unwrap();
    // Writes pages 0..256 again, and the control page.
    dirty(&mut restored, 256, 2);
    let info = restored.snapshot(&b).unwrap();
    // Every page: the ones taken from `a` and the ones the guest wrote.
    common::assert_memory_equals_file(&restored, &memory_file(&b));
    drop(restored);

    let (held, changed) = (allocated(&memory_file(&a)), 257 * PAGE);
    assert!(
        allocated(&memory_file(&b)) <= held + changed,
        "{} bytes allocated, the source held {held} and {changed} changed",
        allocated(&memory_file(&b))
    );
    assert!(info.memory_bytes <= held + changed, "{info:?}");

    let mut again = MicroVm::restore(&b).build().unwrap();
    assert_dirtied(&again, 256, 2, 1024);
    for n in [256, 700, 1023] {
        assert_eq!(dirtied(&again, n), 1, "page {n} from the first snapshot");
    }
    dirty(&mut again, 300, 3);
    assert_dirtied(&again, 300, 3, 1024);
}

#[test]
fn sparse_snapshot_of_a_restored_chain_takes_each_page_from_its_layer() {
    let tmp = TempDir::new("sparse-chain");
    let (base, d1, full) = (tmp.0.join("base"), tmp.0.join("d1"), tmp.0.join("full"));
    let mut vm = dirtying_vm(true);
    dirty(&mut vm, 64, 1);
    vm.snapshot(&base).unwrap();
    dirty(&mut vm, 512, 2);
    vm.snapshot_diff(&d1).unwrap();
    drop(vm);

    let mut restored = MicroVm::restore_chain([base.clone(), d1.clone()])
        .build()
        .unwrap();
    dirty(&mut restored, 128, 3);
    restored.snapshot(&full).unwrap();
    common::assert_memory_equals_file(&restored, &memory_file(&full));
    drop(restored);

    let held = allocated(&memory_file(&base)) + allocated(&memory_file(&d1));
    let changed = 129 * PAGE;
    assert!(
        allocated(&memory_file(&full)) <= held + changed,
        "{} bytes allocated, the chain held {held} and {changed} changed",
        allocated(&memory_file(&full))
    );
    let again = MicroVm::restore(&full).build().unwrap();
    assert_dirtied(&again, 128, 3, 512);
    assert_eq!(dirtied(&again, 128), 2, "a page of the diff");
    assert_eq!(dirtied(&again, 511), 2, "a page of the diff");
}
