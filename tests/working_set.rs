//! Working sets on real KVM: recorded after a restore, loaded on the next
//! restore of the same snapshot, and ignored (with the guest none the
//! worse) when the file is stale or damaged.
#![cfg(target_arch = "aarch64")]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{code, payloads, TempDir};
use dormouse::snapshot::working_set::WorkingSetError;
use dormouse::snapshot::{SnapshotId, WorkingSet, WORKING_SET_FILE};
use dormouse::{Error, GuestAddress, MicroVm, DRAM_START};
use vm_memory::{Bytes, GuestMemoryBackend as _};

const PAGE: u64 = 4096;
const MIB: u64 = 64;
const PAGES: u64 = MIB * (1 << 20) / PAGE;

/// A word of tests/payloads/touch.S's control page.
fn ctl(word: u64) -> GuestAddress {
    GuestAddress(DRAM_START.0 + 0x1000 + 8 * word)
}

/// A round of touch.S: `op` 0 reads, 1 writes; pages `first + k*spacing`.
struct Round {
    op: u64,
    first: u64,
    count: u64,
    spacing: u64,
}

impl Round {
    fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count).map(|k| self.first + k * self.spacing)
    }
}

/// Asks the (paused) guest for a round, runs it until done, pauses, and
/// returns the sum of the words it read.
fn run_round(vm: &mut MicroVm, r: &Round) -> u64 {
    let m = vm.memory();
    let generation = m.read_obj::<u64>(ctl(6)).unwrap() + 1;
    for (i, v) in [r.op, r.first, r.count, r.spacing, 1]
        .into_iter()
        .enumerate()
    {
        m.write_obj(v, ctl(i as u64)).unwrap();
    }
    m.write_obj(generation, ctl(5)).unwrap();
    vm.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while vm.memory().read_obj::<u64>(ctl(6)).unwrap() != generation {
        assert!(
            Instant::now() < deadline,
            "the guest does not finish its round"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    vm.pause().unwrap();
    vm.memory().read_obj::<u64>(ctl(7)).unwrap()
}

/// A snapshot of a guest that wrote every page of its memory (each page's
/// first word is the generation of the round that wrote it, 1).
fn filled_snapshot(dir: &Path) {
    let mut vm = MicroVm::builder()
        .memory_mib(MIB)
        .payload(code(payloads::TOUCH), DRAM_START)
        .build()
        .unwrap();
    run_round(
        &mut vm,
        &Round {
            op: 1,
            first: 2,
            count: PAGES - 2,
            spacing: 1,
        },
    );
    vm.snapshot(dir).unwrap();
}

/// Whether each guest page is in this process's page tables.
fn resident(vm: &MicroVm, pages: impl Iterator<Item = u64>) -> Vec<bool> {
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    pages
        .map(|p| {
            let host = vm
                .memory()
                .get_host_address(GuestAddress(DRAM_START.0 + p * PAGE))
                .unwrap() as u64;
            let mut entry = [0u8; 8];
            pagemap.read_exact_at(&mut entry, host / PAGE * 8).unwrap();
            u64::from_le_bytes(entry) >> 63 == 1
        })
        .collect()
}

fn covers(set: &WorkingSet, page: u64) -> bool {
    set.runs()
        .iter()
        .any(|&(first, count)| page >= first && page < first + count)
}

/// 300 pages, 5 apart, from page 1000: the guest's "first request".
fn request() -> Round {
    Round {
        op: 0,
        first: 1000,
        count: 300,
        spacing: 5,
    }
}

#[test]
fn a_recorded_working_set_is_loaded_by_the_next_restore() {
    common::init_logging();
    let tmp = TempDir::new("ws-record");
    let dir = tmp.0.join("snap");
    filled_snapshot(&dir);

    // Record: restore without prefetch, serve the request, record.
    let mut vm = MicroVm::restore(&dir)
        .prefetch(false)
        .record_working_set(true)
        .build()
        .unwrap();
    assert_eq!(vm.wait_for_prefetch(), None, "nothing to prefetch yet");
    let sum = run_round(&mut vm, &request());
    assert_eq!(sum, 300, "each page's first word is 1");
    let set = vm.record_working_set().unwrap();
    for page in request().pages() {
        assert!(
            covers(&set, page),
            "page {page} was touched but is not in the set"
        );
    }
    // The guest's own code and control pages are in it, and not much else:
    // the host maps at most a few neighbours of each touched page.
    assert!(covers(&set, 0) && covers(&set, 1));
    assert!(
        set.pages() < PAGES / 4,
        "a working set of {} pages for 302 touched",
        set.pages()
    );
    assert!(matches!(
        vm.record_working_set(),
        Err(Error::WorkingSet(WorkingSetError::NotRecording))
    ));
    // Recording ended cleanly: the VM still runs (its threads kept to
    // their seccomp filters).
    assert_eq!(run_round(&mut vm, &request()), 300);
    set.save(&dir).unwrap();
    drop(vm);

    // The next restore loads exactly those pages, and the rest stays lazy.
    let mut vm = MicroVm::restore(&dir).build().unwrap();
    assert_eq!(vm.wait_for_prefetch(), Some(set.pages()));
    assert!(
        resident(&vm, request().pages()).iter().all(|&r| r),
        "a working-set page is not resident after the prefetch"
    );
    let untouched = (PAGES - 64..PAGES).filter(|&p| !covers(&set, p));
    assert!(
        resident(&vm, untouched).iter().all(|&r| !r),
        "a page outside the working set was loaded"
    );
    // Guest memory is mapped 2 MiB-aligned, and the dense chunks of the
    // working set are huge pages now (KVM maps them as stage-2 blocks).
    let host = |p: u64| {
        vm.memory()
            .get_host_address(GuestAddress(DRAM_START.0 + p * PAGE))
            .unwrap() as u64
    };
    assert_eq!(host(0) % (2 << 20), 0, "guest memory is not 2 MiB-aligned");
    let chunk = host(1024) & !((2 << 20) - 1);
    assert!(
        anon_huge_kib(chunk) >= 2048,
        "the working set's chunk at {chunk:#x} is not a huge page"
    );
    // And the guest reads what it wrote before the snapshot.
    assert_eq!(run_round(&mut vm, &request()), 300);
}

/// The AnonHugePages of the mapping of this process that holds `addr`
/// (from /proc/self/smaps).
fn anon_huge_kib(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, end)) = range.split_once('-') {
                if let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
                {
                    inside = (start..end).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(kib) = line.strip_prefix("AnonHugePages:") {
                return kib.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
    }
    0
}

#[test]
fn a_stale_or_damaged_working_set_is_ignored_and_the_restore_works() {
    common::init_logging();
    let tmp = TempDir::new("ws-bad");
    let dir = tmp.0.join("snap");
    filled_snapshot(&dir);
    let state = dormouse::snapshot::read_state(&dir).unwrap();
    let runs = vec![(1000, 16)];
    let good = WorkingSet::new(state.id, MIB << 20, runs.clone()).unwrap();

    let stale = WorkingSet::new(SnapshotId([0x5a; 16]), MIB << 20, runs.clone()).unwrap();
    let mut flipped = good.encode();
    let last = flipped.len() - 9;
    flipped[last] ^= 1;
    let wrong_size = WorkingSet::new(state.id, 2 * (MIB << 20), runs).unwrap();
    let cases: [(&str, Vec<u8>); 4] = [
        ("stale", stale.encode()),
        ("corrupt", flipped),
        ("garbage", b"not a working set".to_vec()),
        ("another guest size", wrong_size.encode()),
    ];
    for (what, bytes) in cases {
        std::fs::write(dir.join(WORKING_SET_FILE), bytes).unwrap();
        let mut vm = MicroVm::restore(&dir)
            .build()
            .unwrap_or_else(|e| panic!("a {what} working set failed the restore: {e}"));
        assert_eq!(
            vm.wait_for_prefetch(),
            None,
            "a {what} working set was used"
        );
        assert_eq!(
            run_round(&mut vm, &request()),
            300,
            "with a {what} working set"
        );
    }
    // A directory in its place is not a file either.
    std::fs::remove_file(dir.join(WORKING_SET_FILE)).unwrap();
    std::fs::create_dir(dir.join(WORKING_SET_FILE)).unwrap();
    let mut vm = MicroVm::restore(&dir).build().unwrap();
    assert_eq!(vm.wait_for_prefetch(), None);
    std::fs::remove_dir(dir.join(WORKING_SET_FILE)).unwrap();

    // The good one is used.
    good.save(&dir).unwrap();
    let mut vm = MicroVm::restore(&dir).build().unwrap();
    assert_eq!(vm.wait_for_prefetch(), Some(16));
    assert_eq!(run_round(&mut vm, &request()), 300);
}
