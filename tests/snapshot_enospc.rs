//! No dirty page is lost when a snapshot fails: a full snapshot or a diff
//! that runs out of space part-way (a small tmpfs, ENOSPC) leaves the VM's
//! diff base as it was and puts back every page it took from the dirty
//! log, so a chain taken afterwards still restores guest memory
//! byte-identical to a full snapshot taken at the same moment. A live diff
//! (taken while the guest runs) that fails also leaves the VM running.
//!
//! Mounts tmpfs, so it runs as root: the emulated host runs tests as root.
#![cfg(target_arch = "aarch64")]

mod common;

use std::path::{Path, PathBuf};

use common::{code, dirty, payloads, TempDir};
use dormouse::snapshot::{SnapshotError, MEMORY_FILE};
use dormouse::{Error, MicroVm, DRAM_START};

/// A tmpfs of `size` bytes mounted on a fresh directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: u64) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (source, target, fstype) = (c("tmpfs"), c(at.to_str().unwrap()), c("tmpfs"));
        let data = c(&format!("size={size},mode=0700"));
        // SAFETY: every pointer is a NUL-terminated string that outlives
        // the call; mount(2) only reads them.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mounting a tmpfs (run as root): {}",
            std::io::Error::last_os_error()
        );
        Self(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn dirtying_vm() -> MicroVm {
    MicroVm::builder()
        .memory_mib(64)
        .dirty_tracking(true)
        .payload(code(payloads::DIRTY), DRAM_START)
        .build()
        .unwrap()
}

fn assert_out_of_space(result: Result<dormouse::snapshot::SnapshotInfo, Error>, small: &Tmpfs) {
    match result {
        Err(Error::Snapshot(SnapshotError::Io { source, .. })) => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}")
        }
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    // The failed snapshot left nothing behind.
    assert_eq!(std::fs::read_dir(&small.0).unwrap().count(), 0);
}

fn assert_chain_equals(chain: &[PathBuf], full: &Path) {
    let restored = MicroVm::restore_chain(chain.to_vec()).build().unwrap();
    common::assert_memory_equals_file(&restored, &full.join(MEMORY_FILE));
}

/// Pages written before the failure and never again afterwards: lost, a
/// chain would restore the base's zeroes for them.
const BEFORE_FAILURE: u64 = 3000;
const AFTER_FAILURE: u64 = 10;

#[test]
fn a_full_snapshot_that_runs_out_of_space_loses_no_dirty_page() {
    let tmp = TempDir::new("enospc-full");
    let (base, diff, full) = (tmp.0.join("base"), tmp.0.join("diff"), tmp.0.join("full"));
    let mut vm = dirtying_vm();
    vm.snapshot(&base).unwrap();
    dirty(&mut vm, BEFORE_FAILURE, 1);

    // 64 MiB of memory into 8 MiB: ENOSPC part-way through the memory file.
    let small = Tmpfs::mount(tmp.0.join("small"), 8 << 20);
    assert_out_of_space(vm.snapshot(small.0.join("full")), &small);

    dirty(&mut vm, AFTER_FAILURE, 2);
    // Still relative to `base`, and holding what the failed one harvested.
    let info = vm.snapshot_diff(&diff).unwrap();
    assert!(
        info.memory_bytes >= BEFORE_FAILURE * 4096,
        "the diff holds {} pages, the guest wrote {BEFORE_FAILURE} since the base",
        info.memory_bytes / 4096
    );
    vm.snapshot(&full).unwrap();
    drop(vm);
    assert_chain_equals(&[base, diff], &full);
}

#[test]
fn a_diff_that_runs_out_of_space_loses_no_dirty_page() {
    let tmp = TempDir::new("enospc-diff");
    let (base, d1, d2, full) = (
        tmp.0.join("base"),
        tmp.0.join("d1"),
        tmp.0.join("d2"),
        tmp.0.join("full"),
    );
    let mut vm = dirtying_vm();
    vm.snapshot(&base).unwrap();
    dirty(&mut vm, 50, 1);
    vm.snapshot_diff(&d1).unwrap();
    dirty(&mut vm, BEFORE_FAILURE, 2);

    // About 12 MiB of dirty pages into 4 MiB.
    let small = Tmpfs::mount(tmp.0.join("small"), 4 << 20);
    assert_out_of_space(vm.snapshot_diff(small.0.join("d")), &small);

    dirty(&mut vm, AFTER_FAILURE, 3);
    // On top of d1 (the failed diff is no layer), with its pages.
    let info = vm.snapshot_diff(&d2).unwrap();
    assert!(
        info.memory_bytes >= BEFORE_FAILURE * 4096,
        "the diff holds {} pages, the guest wrote {BEFORE_FAILURE} since d1",
        info.memory_bytes / 4096
    );
    vm.snapshot(&full).unwrap();
    drop(vm);
    assert_chain_equals(&[base, d1, d2], &full);
}

#[test]
fn a_live_diff_that_runs_out_of_space_loses_no_dirty_page_and_the_vm_runs_on() {
    let tmp = TempDir::new("enospc-live");
    let (base, d1, full) = (tmp.0.join("base"), tmp.0.join("d1"), tmp.0.join("full"));
    let mut vm = dirtying_vm();
    vm.snapshot(&base).unwrap();
    dirty(&mut vm, BEFORE_FAILURE, 1);
    vm.resume().unwrap();

    // About 12 MiB of dirty pages into 4 MiB, while the guest runs.
    let small = Tmpfs::mount(tmp.0.join("small"), 4 << 20);
    assert_out_of_space(
        vm.snapshot_diff_live(small.0.join("d")).map(|l| l.info),
        &small,
    );
    assert_eq!(vm.state(), dormouse::VmState::Running, "the VM runs on");

    vm.pause().unwrap();
    dirty(&mut vm, AFTER_FAILURE, 2);
    let info = vm.snapshot_diff(&d1).unwrap();
    assert!(
        info.memory_bytes >= BEFORE_FAILURE * 4096,
        "the diff holds {} pages, the guest wrote {BEFORE_FAILURE} since the base",
        info.memory_bytes / 4096
    );
    vm.snapshot(&full).unwrap();
    drop(vm);
    assert_chain_equals(&[base, d1], &full);
}
