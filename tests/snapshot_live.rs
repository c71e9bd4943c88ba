//! Live diffs (`MicroVm::snapshot_diff_live`): taken while the guest runs,
//! the guest paused only for the last step, and still exactly the guest's
//! memory at that last pause, even when the guest writes pages the copy
//! rounds already took.
#![cfg(target_arch = "aarch64")]

mod common;

use std::time::{Duration, Instant};

use common::{code, dirty, payloads, TempDir};
use dormouse::{GuestAddress, MicroVm, VmState, DRAM_START};
use vm_memory::Bytes;

const PAGE: u64 = 4096;
/// The DIRTY payload's first page to write (tests/payloads/dirty.S).
const FIRST: u64 = 2;

fn ctl(word: u64) -> GuestAddress {
    GuestAddress(DRAM_START.0 + 0x1000 + 8 * word)
}

/// The first word of the payload's `n`th page.
fn page(n: u64) -> GuestAddress {
    GuestAddress(DRAM_START.0 + (FIRST + n) * PAGE)
}

fn dirtying_vm(mib: u64) -> MicroVm {
    MicroVm::builder()
        .memory_mib(mib)
        .dirty_tracking(true)
        .payload(code(payloads::DIRTY), DRAM_START)
        .build()
        .unwrap()
}

#[test]
fn a_live_diff_holds_the_guest_at_its_last_pause_and_the_vm_runs_on() {
    let tmp = TempDir::new("live-diff");
    let (base, d1) = (tmp.0.join("base"), tmp.0.join("d1"));
    let mut vm = dirtying_vm(64);
    vm.snapshot(&base).unwrap();
    // 8 MiB dirty, then the guest spins: the rounds copy it while it runs.
    const PAGES: u64 = 2048;
    dirty(&mut vm, PAGES, 1);
    vm.resume().unwrap();
    let live = vm.snapshot_diff_live(&d1).unwrap();
    assert_eq!(vm.state(), VmState::Running, "the VM runs on");
    assert!(live.rounds >= 1, "{live:?}");
    assert!(
        live.precopied_bytes >= PAGES * PAGE,
        "the rounds copied {} bytes of the {} the guest dirtied: {live:?}",
        live.precopied_bytes,
        PAGES * PAGE
    );
    assert!(live.info.memory_bytes >= PAGES * PAGE, "{live:?}");
    assert!(live.last_pause <= live.paused, "{live:?}");

    // The guest goes on where it was.
    vm.pause().unwrap();
    dirty(&mut vm, 10, 2);
    drop(vm);

    let restored = MicroVm::restore_chain([base, d1]).build().unwrap();
    let mem = restored.memory();
    assert_eq!(mem.read_obj::<u64>(ctl(2)).unwrap(), 1, "round 1 done");
    for n in 0..PAGES {
        assert_eq!(mem.read_obj::<u64>(page(n)).unwrap(), 1, "page {n}");
    }
    assert_eq!(mem.read_obj::<u64>(page(PAGES)).unwrap(), 0);
}

/// The guest rewrites pages while the rounds copy them: whatever page a
/// round took too early is dirty again and goes in again, so the snapshot
/// is one moment of the guest: generation 2 in a prefix of the pages (up
/// to where the guest was at the last pause), generation 1 after it. A
/// page lost by the copy would show up as a 1 inside the prefix.
#[test]
fn a_live_diff_of_a_guest_writing_during_the_copy_is_one_moment_of_it() {
    let tmp = TempDir::new("live-diff-busy");
    let (base, d1) = (tmp.0.join("base"), tmp.0.join("d1"));
    const MIB: u64 = 256;
    let pages = (MIB << 20) / PAGE - FIRST;
    let mut vm = dirtying_vm(MIB);
    vm.snapshot(&base).unwrap();
    dirty(&mut vm, pages, 1);
    // Generation 2 over every page: the guest writes while the diff runs.
    vm.memory().write_obj(2u64, ctl(1)).unwrap();
    vm.resume().unwrap();
    let live = vm.snapshot_diff_live(&d1).unwrap();
    assert_eq!(vm.state(), VmState::Running);
    // Let the guest finish its round: it was stopped mid-way, not broken.
    let deadline = Instant::now() + Duration::from_secs(300);
    while vm.memory().read_obj::<u64>(ctl(2)).unwrap() != 2 {
        assert!(Instant::now() < deadline, "the guest did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(vm);

    let mut restored = MicroVm::restore_chain([base, d1]).build().unwrap();
    let mem = restored.memory();
    let values: Vec<u64> = (0..pages)
        .map(|n| mem.read_obj::<u64>(page(n)).unwrap())
        .collect();
    let prefix = values.iter().take_while(|v| **v == 2).count();
    let bad = values[prefix..].iter().position(|v| *v != 1);
    assert!(
        bad.is_none(),
        "page {} holds {} after the guest's position {prefix} (rounds {}): a torn snapshot",
        prefix + bad.unwrap_or(0),
        values[prefix + bad.unwrap_or(0)],
        live.rounds
    );
    let done = mem.read_obj::<u64>(ctl(2)).unwrap();
    if prefix < values.len() {
        assert_eq!(done, 1, "mid-round, round 1 is the last one done");
    }
    // And the restored guest finishes generation 2 from where it was.
    restored.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while restored.memory().read_obj::<u64>(ctl(2)).unwrap() != 2 {
        assert!(
            Instant::now() < deadline,
            "the restored guest did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    restored.pause().unwrap();
    for n in 0..pages {
        assert_eq!(
            restored.memory().read_obj::<u64>(page(n)).unwrap(),
            2,
            "page {n}"
        );
    }
}

#[test]
fn a_live_diff_of_a_paused_vm_is_a_plain_diff_and_it_stays_paused() {
    let tmp = TempDir::new("live-diff-paused");
    let (base, d1) = (tmp.0.join("base"), tmp.0.join("d1"));
    let mut vm = dirtying_vm(64);
    vm.snapshot(&base).unwrap();
    dirty(&mut vm, 100, 1);
    let live = vm.snapshot_diff_live(&d1).unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert_eq!((live.rounds, live.precopied_bytes), (0, 0));
    assert!(live.info.memory_bytes >= 100 * PAGE);
    drop(vm);
    let restored = MicroVm::restore_chain([base, d1]).build().unwrap();
    assert_eq!(restored.memory().read_obj::<u64>(page(99)).unwrap(), 1);
}
