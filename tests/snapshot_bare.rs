//! Pause, snapshot and restore on real KVM with a bare-metal payload whose
//! state lives in vCPU registers and guest memory.
#![cfg(target_arch = "aarch64")]

mod common;

use std::time::{Duration, Instant};

use common::{code, payloads, TempDir};
use dormouse::dirty::DirtyMode;
use dormouse::snapshot::SnapshotError;
use dormouse::{Error, GuestAddress, MicroVm, VmState, DRAM_START};
use vm_memory::Bytes;

/// Where vCPU n stores its count (see tests/payloads/counter.S).
fn counter(vm: &MicroVm, vcpu: u64) -> u64 {
    vm.memory()
        .read_obj(GuestAddress(0x8010_0000 + 8 * vcpu))
        .unwrap()
}

fn counting_vm(vcpus: u32) -> MicroVm {
    MicroVm::builder()
        .vcpus(vcpus)
        .memory_mib(64)
        .payload(code(payloads::COUNTER), DRAM_START)
        .build()
        .unwrap()
}

/// Waits until every vCPU's count passed `floor`.
fn wait_past(vm: &MicroVm, vcpus: u64, floor: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..vcpus).any(|v| counter(vm, v) <= floor) {
        assert!(Instant::now() < deadline, "the guest does not count");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let mut vm = counting_vm(2);
    assert_eq!(vm.state(), VmState::Paused);
    vm.start().unwrap();
    assert_eq!(vm.state(), VmState::Running);
    wait_past(&vm, 2, 1000);
    vm.pause().unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    let frozen = [counter(&vm, 0), counter(&vm, 1)];
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        [counter(&vm, 0), counter(&vm, 1)],
        frozen,
        "a paused guest ran"
    );
    assert!(matches!(vm.wait(), Err(Error::NotRunning)));
    vm.resume().unwrap();
    wait_past(&vm, 2, frozen[0].max(frozen[1]));
    vm.pause().unwrap();
}

#[test]
fn a_snapshot_needs_a_paused_vm() {
    let tmp = TempDir::new("snap-running");
    let mut vm = counting_vm(1);
    vm.start().unwrap();
    assert!(matches!(
        vm.snapshot(tmp.0.join("s")),
        Err(Error::Snapshot(SnapshotError::NotPaused))
    ));
    vm.pause().unwrap();
}

#[test]
fn a_restored_vm_continues_from_its_registers_and_memory() {
    for vcpus in [1u32, 2] {
        let tmp = TempDir::new(&format!("snap-bare{vcpus}"));
        let dir = tmp.0.join("snap");
        let mut vm = counting_vm(vcpus);
        vm.start().unwrap();
        wait_past(&vm, vcpus.into(), 10_000);
        vm.pause().unwrap();
        let saved: Vec<u64> = (0..vcpus.into()).map(|v| counter(&vm, v)).collect();
        let info = vm.snapshot(&dir).unwrap();
        // Sparse: the pages that hold data (code, counts), not 64 MiB.
        assert!(
            info.memory_bytes > 0 && info.memory_bytes < 1 << 20,
            "{info:?}"
        );
        // The original goes on, far past the snapshot.
        vm.resume().unwrap();
        wait_past(&vm, vcpus.into(), saved.iter().max().unwrap() + 100_000);
        drop(vm);

        let mut restored = MicroVm::restore(&dir).build().unwrap();
        assert_eq!(restored.state(), VmState::Paused);
        let now: Vec<u64> = (0..vcpus.into()).map(|v| counter(&restored, v)).collect();
        assert_eq!(now, saved, "memory is not the snapshot's");
        restored.resume().unwrap();
        // Every sample from now on is at least the saved count: the count
        // in x1 came back with the registers (else it would restart at 1).
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            for (v, &floor) in saved.iter().enumerate() {
                let c = counter(&restored, v as u64);
                assert!(c >= floor, "vCPU {v} restarted: {c} < {floor}");
            }
        }
        wait_past(&restored, vcpus.into(), *saved.iter().max().unwrap());
        restored.pause().unwrap();
    }
}

#[test]
fn restoring_twice_gives_two_independent_vms() {
    let tmp = TempDir::new("snap-twice");
    let dir = tmp.0.join("snap");
    let mut vm = counting_vm(1);
    vm.start().unwrap();
    wait_past(&vm, 1, 5000);
    vm.pause().unwrap();
    vm.snapshot(&dir).unwrap();
    drop(vm);
    let mut a = MicroVm::restore(&dir).resume(true).build().unwrap();
    let mut b = MicroVm::restore(&dir).build().unwrap();
    let b_start = counter(&b, 0);
    wait_past(&a, 1, b_start + 100_000);
    // `b` stayed paused: MAP_PRIVATE keeps a's writes out of b and the file.
    assert_eq!(counter(&b, 0), b_start);
    b.resume().unwrap();
    a.pause().unwrap();
    b.pause().unwrap();
}

#[test]
fn diffs_need_tracking_and_a_base() {
    let tmp = TempDir::new("snap-nodiff");
    let mut vm = counting_vm(1);
    assert!(matches!(
        vm.snapshot_diff(tmp.0.join("d")),
        Err(Error::Snapshot(SnapshotError::NoDiffBase(_)))
    ));
    let mut vm2 = MicroVm::builder()
        .dirty_tracking(true)
        .memory_mib(64)
        .payload(code(payloads::COUNTER), DRAM_START)
        .build()
        .unwrap();
    // Tracking on, but no snapshot yet to be relative to.
    assert!(matches!(
        vm2.snapshot_diff(tmp.0.join("d")),
        Err(Error::Snapshot(SnapshotError::NoDiffBase(_)))
    ));
    drop((vm.pause(), vm2.pause()));
}

#[test]
fn a_chain_of_diffs_restores_what_a_full_snapshot_holds_with_the_dirty_ring() {
    chain_matches_full_snapshot(true);
}

#[test]
fn a_chain_of_diffs_restores_what_a_full_snapshot_holds_with_the_dirty_log() {
    chain_matches_full_snapshot(false);
}

fn chain_matches_full_snapshot(prefer_ring: bool) {
    let tmp = TempDir::new(&format!("snap-chain-{prefer_ring}"));
    let (base, d1, d2, full) = (
        tmp.0.join("base"),
        tmp.0.join("d1"),
        tmp.0.join("d2"),
        tmp.0.join("full"),
    );
    let mut vm = MicroVm::builder()
        .vcpus(2)
        .memory_mib(64)
        .dirty_tracking(true)
        .dirty_ring(prefer_ring)
        .payload(code(payloads::COUNTER), DRAM_START)
        .build()
        .unwrap();
    match (prefer_ring, vm.dirty_mode()) {
        // The emulated host's 6.12 kernel has the ring; older ones do not.
        (true, Some(DirtyMode::Ring(_) | DirtyMode::Log)) => {}
        (false, Some(DirtyMode::Log)) => {}
        other => panic!("unexpected dirty mode {other:?}"),
    }
    vm.start().unwrap();
    wait_past(&vm, 2, 1000);
    vm.pause().unwrap();
    vm.snapshot(&base).unwrap();
    let mut floor = 0;
    for diff in [&d1, &d2] {
        vm.resume().unwrap();
        floor = counter(&vm, 0).max(counter(&vm, 1)) + 10_000;
        wait_past(&vm, 2, floor);
        vm.pause().unwrap();
        let info = vm.snapshot_diff(diff).unwrap();
        // The guest only wrote its two counters (one page): a diff is a
        // few pages, not 64 MiB.
        assert!(
            info.memory_bytes > 0 && info.memory_bytes <= 8 * 4096,
            "{} bytes in a diff",
            info.memory_bytes
        );
    }
    // A full snapshot at the same point, to compare with.
    vm.snapshot(&full).unwrap();
    let saved = [counter(&vm, 0), counter(&vm, 1)];
    drop(vm);
    let full_memory = full.join(dormouse::snapshot::MEMORY_FILE);

    let mut restored = MicroVm::restore_chain([base.clone(), d1.clone(), d2.clone()])
        .build()
        .unwrap();
    common::assert_memory_equals_file(&restored, &full_memory);
    assert_eq!([counter(&restored, 0), counter(&restored, 1)], saved);
    restored.resume().unwrap();
    wait_past(&restored, 2, floor);
    restored.pause().unwrap();

    let merged = tmp.0.join("merged");
    dormouse::snapshot::merge(&[base, d1, d2], &merged).unwrap();
    let merged_memory = std::fs::read(merged.join(dormouse::snapshot::MEMORY_FILE)).unwrap();
    assert!(
        merged_memory == std::fs::read(&full_memory).unwrap(),
        "the merged memory differs from the full snapshot's"
    );
    let mut from_merged = MicroVm::restore(&merged).resume(true).build().unwrap();
    wait_past(&from_merged, 2, floor);
    from_merged.pause().unwrap();
}

/// More distinct pages than one vCPU's dirty ring holds (65536 entries)
/// between two snapshots: full rings are drained on the vCPU thread and no
/// page goes missing from the diff.
#[test]
fn a_guest_that_overflows_its_dirty_ring_loses_no_page() {
    let tmp = TempDir::new("snap-ringfull");
    let (base, diff, full) = (tmp.0.join("base"), tmp.0.join("diff"), tmp.0.join("full"));
    let mut vm = MicroVm::builder()
        .memory_mib(512)
        .dirty_tracking(true)
        .payload(code(payloads::DIRTY), DRAM_START)
        .build()
        .unwrap();
    vm.snapshot(&base).unwrap();
    // tests/payloads/dirty.S: control page at +0x1000, pages from +0x2000.
    let pages: u64 = 100_000;
    let ctl = |w: u64| GuestAddress(DRAM_START.0 + 0x1000 + 8 * w);
    vm.memory().write_obj(pages, ctl(0)).unwrap();
    vm.memory().write_obj(1u64, ctl(1)).unwrap();
    vm.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while vm.memory().read_obj::<u64>(ctl(2)).unwrap() != 1 {
        assert!(
            Instant::now() < deadline,
            "the guest did not dirty its pages"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause().unwrap();
    let info = vm.snapshot_diff(&diff).unwrap();
    assert!(
        info.memory_bytes >= pages * 4096,
        "the diff holds {} pages, the guest wrote {pages}",
        info.memory_bytes / 4096
    );
    vm.snapshot(&full).unwrap();
    drop(vm);
    let restored = MicroVm::restore_chain([base, diff]).build().unwrap();
    common::assert_memory_equals_file(&restored, &full.join(dormouse::snapshot::MEMORY_FILE));
}

/// A diff of a guest that wrote here and there (hundreds of short page
/// runs) restores without a mapping per run: short runs are read into
/// place, so a process holding many restored VMs stays far from
/// `vm.max_map_count`. The restored memory is byte-identical to a full
/// snapshot of the same moment.
#[test]
fn a_diff_of_scattered_pages_restores_without_a_mapping_per_run() {
    let tmp = TempDir::new("snap-scattered");
    let (base, diff, full) = (tmp.0.join("base"), tmp.0.join("diff"), tmp.0.join("full"));
    let mut vm = MicroVm::builder()
        .memory_mib(64)
        .dirty_tracking(true)
        .payload(code(payloads::COUNTER), DRAM_START)
        .build()
        .unwrap();
    vm.snapshot(&base).unwrap();
    // 300 runs of one page, one page apart, written by the VMM (its own
    // writes are tracked too), plus one long run that stays mapped.
    let runs: u64 = 300;
    for i in 0..runs {
        let at = GuestAddress(DRAM_START.0 + 0x20_0000 + i * 2 * 4096);
        vm.memory().write_obj(0xD0D0_0000 + i, at).unwrap();
    }
    let long = vec![0x5Au8; 64 * 4096];
    vm.memory()
        .write_slice(&long, GuestAddress(DRAM_START.0 + 0x80_0000))
        .unwrap();
    let info = vm.snapshot_diff(&diff).unwrap();
    assert!(info.memory_bytes >= (runs + 64) * 4096, "{info:?}");
    vm.snapshot(&full).unwrap();
    drop(vm);
    let maps = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .count()
    };
    let before = maps();
    let restored = MicroVm::restore_chain([base, diff]).build().unwrap();
    let added = maps().saturating_sub(before);
    assert!(
        added < 40,
        "restoring a diff of {runs} short runs added {added} mappings"
    );
    common::assert_memory_equals_file(&restored, &full.join(dormouse::snapshot::MEMORY_FILE));
}
