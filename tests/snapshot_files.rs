//! Bad snapshot files: each is a distinct, clear error, found before any
//! KVM resource exists (so these run on any host).

// Sizes here are small constants; casts between them cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};

use dormouse::arch::aarch64::state::{GicState, GicVcpuState, IccState, VcpuState};
use dormouse::devices::serial::SerialSnapshot;
use dormouse::devices::virtio::mmio::TransportState;
use dormouse::snapshot::{
    format, write_dir, MemoryRegionState, SavedConfig, SavedDevice, SnapshotError, SnapshotId,
    VmState, MAX_STATE_FILE, MEMORY_FILE, STATE_FILE,
};
use dormouse::{Error, MicroVm, DRAM_START};

const MEM: u64 = 1 << 20;

/// A self-consistent state for a 1-vCPU, 1 MiB VM (its vGIC state is
/// empty, so only a restore on real KVM would refuse it).
fn state() -> VmState {
    VmState {
        id: SnapshotId([1; 16]),
        parent: None,
        diff: None,
        config: SavedConfig {
            memory_size: MEM,
            vcpus: 1,
            rtc: false,
            dirty_tracking: false,
            dirty_ring: false,
            devices: Vec::new(),
        },
        memory: vec![MemoryRegionState {
            guest_addr: DRAM_START.0,
            size: MEM,
            file_offset: 0,
        }],
        vcpus: vec![VcpuState {
            mpidr: 0x8000_0000,
            mp_state: 0,
            regs: Vec::new(),
        }],
        gic: GicState {
            dist: Vec::new(),
            vcpus: vec![GicVcpuState {
                redist: Vec::new(),
                icc: IccState {
                    main: Vec::new(),
                    active_priorities: Vec::new(),
                },
            }],
        },
        serial: SerialSnapshot {
            baud_divisor: [0x0c, 0],
            interrupt_enable: 0,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 8,
            modem_status: 0xb0,
            scratch: 0,
            in_buffer: Vec::new(),
        },
        rtc: None,
        virtio: Vec::new(),
        vmgenid: None,
    }
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn snapshot_dir(name: &str, state: &VmState) -> Dir {
    let root = std::env::temp_dir().join(format!("dormouse-badsnap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dir = root.join("snap");
    let bytes = format::encode(state).unwrap();
    write_dir(&dir, &bytes, |f| f.set_len(MEM)).unwrap();
    Dir(root)
}

fn snap(d: &Dir) -> PathBuf {
    d.0.join("snap")
}

fn restore_error(dir: &Path) -> SnapshotError {
    match MicroVm::restore(dir).build() {
        Err(Error::Snapshot(e)) => e,
        Err(other) => panic!("expected a snapshot error, got {other:?}"),
        Ok(_) => panic!("a bad snapshot restored"),
    }
}

fn edit_state(dir: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join(STATE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    edit(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn a_good_snapshot_passes_every_file_check() {
    let d = snapshot_dir("good", &state());
    match MicroVm::restore(snap(&d)).build() {
        // Past the file checks, only the host decides.
        #[cfg(not(target_arch = "aarch64"))]
        Err(Error::UnsupportedArchitecture(_)) => {}
        // On KVM the synthetic (empty) vGIC state is refused.
        #[cfg(target_arch = "aarch64")]
        Err(Error::Arch(_)) => {}
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[test]
fn a_truncated_state_file_is_refused() {
    let d = snapshot_dir("trunc", &state());
    edit_state(&snap(&d), |b| b.truncate(b.len() - 3));
    assert!(matches!(
        restore_error(&snap(&d)),
        SnapshotError::Truncated { .. }
    ));
    edit_state(&snap(&d), |b| b.truncate(20));
    assert!(matches!(
        restore_error(&snap(&d)),
        SnapshotError::Truncated { .. }
    ));
}

#[test]
fn one_flipped_byte_fails_the_crc() {
    let d = snapshot_dir("flip", &state());
    edit_state(&snap(&d), |b| {
        let last = b.len() - 1;
        b[last] ^= 0x40;
    });
    let e = restore_error(&snap(&d));
    assert!(matches!(e, SnapshotError::Corrupt { .. }), "{e:?}");
    assert!(e.to_string().contains("corrupt"));
}

#[test]
fn a_newer_major_version_is_refused() {
    let d = snapshot_dir("major", &state());
    edit_state(&snap(&d), |b| {
        b[8..10].copy_from_slice(&(format::MAJOR + 1).to_le_bytes())
    });
    let e = restore_error(&snap(&d));
    assert!(
        matches!(e, SnapshotError::UnsupportedVersion { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("newer dormouse"));
}

#[test]
fn another_architecture_is_refused() {
    let d = snapshot_dir("arch", &state());
    edit_state(&snap(&d), |b| {
        b[12..16].copy_from_slice(&7u32.to_le_bytes())
    });
    assert!(matches!(
        restore_error(&snap(&d)),
        SnapshotError::WrongArchitecture(7)
    ));
}

#[test]
fn a_memory_file_shorter_than_the_layout_is_refused() {
    let d = snapshot_dir("short", &state());
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(snap(&d).join(MEMORY_FILE))
        .unwrap();
    mem.set_len(MEM - 4096).unwrap();
    assert!(matches!(
        restore_error(&snap(&d)),
        SnapshotError::MemoryFileTooShort { expected: MEM, found, .. } if found == MEM - 4096
    ));
}

#[test]
fn missing_files_are_named() {
    let d = snapshot_dir("missing", &state());
    std::fs::remove_file(snap(&d).join(MEMORY_FILE)).unwrap();
    match restore_error(&snap(&d)) {
        SnapshotError::MissingFile(p) => assert!(p.ends_with(MEMORY_FILE)),
        e => panic!("{e:?}"),
    }
    std::fs::remove_file(snap(&d).join(STATE_FILE)).unwrap();
    match restore_error(&snap(&d)) {
        SnapshotError::MissingFile(p) => assert!(p.ends_with(STATE_FILE)),
        e => panic!("{e:?}"),
    }
    assert!(matches!(
        restore_error(&d.0.join("no-such-snapshot")),
        SnapshotError::MissingFile(_)
    ));
}

#[test]
fn a_state_that_contradicts_itself_is_refused() {
    let mut s = state();
    s.config.vcpus = 2;
    let d = snapshot_dir("inconsistent", &s);
    assert!(matches!(
        restore_error(&snap(&d)),
        SnapshotError::Inconsistent(_)
    ));

    let mut s = state();
    s.memory[0].size = MEM * 2;
    let d = snapshot_dir("inconsistent-mem", &s);
    assert!(matches!(
        restore_error(&snap(&d)),
        SnapshotError::Inconsistent(_)
    ));
}

#[test]
fn a_file_that_is_not_a_snapshot_is_refused() {
    let d = snapshot_dir("garbage", &state());
    std::fs::write(snap(&d).join(STATE_FILE), vec![0x42; 4096]).unwrap();
    assert!(matches!(
        restore_error(&snap(&d)),
        SnapshotError::NotASnapshot
    ));
}

#[test]
fn overrides_for_devices_the_snapshot_lacks_are_refused() {
    let d = snapshot_dir("overrides", &state());
    for restore in [
        MicroVm::restore(snap(&d)).block_path(0, "/tmp/x"),
        MicroVm::restore(snap(&d)).block_layers(
            0,
            dormouse::builder::DiskLayers::new("/tmp/base", "/tmp/top"),
        ),
        MicroVm::restore(snap(&d)).vsock_uds("/tmp/x.sock"),
    ] {
        assert!(matches!(
            restore.build(),
            Err(Error::Snapshot(SnapshotError::Inconsistent(_)))
        ));
    }
}

const PAGE: u64 = 4096;

/// A diff on top of `parent` holding `runs`, each page filled with `fill`.
fn diff_dir(name: &str, parent: SnapshotId, id: u8, runs: &[(u64, u64)], fill: u8) -> Dir {
    let mut s = state();
    s.id = SnapshotId([id; 16]);
    s.parent = Some(parent);
    s.diff = Some(vec![runs.to_vec()]);
    let root = std::env::temp_dir().join(format!("dormouse-badsnap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let bytes = format::encode(&s).unwrap();
    let runs = runs.to_vec();
    write_dir(&root.join("snap"), &bytes, move |f| {
        use std::os::unix::fs::FileExt;
        f.set_len(MEM)?;
        for (first, count) in runs {
            f.write_all_at(&vec![fill; (count * PAGE) as usize], first * PAGE)?;
        }
        Ok(())
    })
    .unwrap();
    Dir(root)
}

#[test]
fn merging_a_chain_lays_each_diff_over_the_base() {
    // Base: every page holds its page number. The file is longer than the
    // memory layout, which restore accepts (found by the snapshot_chain
    // fuzz target: the merge used to copy the excess too).
    let base = snapshot_dir("merge-base", &state());
    let base_mem: Vec<u8> = (0..MEM + 1234).map(|i| (i / PAGE) as u8).collect();
    std::fs::write(snap(&base).join(MEMORY_FILE), &base_mem).unwrap();
    let d1 = diff_dir("merge-d1", state().id, 2, &[(1, 2)], 0xaa);
    let d2 = diff_dir("merge-d2", SnapshotId([2; 16]), 3, &[(2, 1), (5, 1)], 0xbb);
    let out = std::env::temp_dir().join(format!("dormouse-merged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let chain = [snap(&base), snap(&d1), snap(&d2)];
    dormouse::snapshot::merge(&chain, &out).unwrap();

    let merged = std::fs::read(out.join(MEMORY_FILE)).unwrap();
    let page = |n: u64| &merged[(n * PAGE) as usize..((n + 1) * PAGE) as usize];
    assert!(page(0).iter().all(|&b| b == 0), "untouched by the diffs");
    assert!(page(1).iter().all(|&b| b == 0xaa));
    assert!(page(2).iter().all(|&b| b == 0xbb), "the newest layer wins");
    assert!(
        page(3).iter().all(|&b| b == 3),
        "absent from a diff is unchanged, not zero"
    );
    assert!(page(5).iter().all(|&b| b == 0xbb));
    assert!(page(6).iter().all(|&b| b == 6));
    assert_eq!(merged.len() as u64, MEM);
    let state = dormouse::snapshot::read_state(&out).unwrap();
    assert_eq!(
        state.id,
        SnapshotId([3; 16]),
        "the merge keeps the newest id"
    );
    assert!(state.diff.is_none() && state.parent.is_none());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn chains_with_gaps_or_the_wrong_base_are_refused() {
    let base = snapshot_dir("chain-base", &state());
    let d1 = diff_dir("chain-d1", state().id, 2, &[(1, 1)], 1);
    let d2 = diff_dir("chain-d2", SnapshotId([2; 16]), 3, &[(1, 1)], 2);
    let read = |dirs: &[PathBuf]| dormouse::snapshot::read_chain(dirs).err();

    assert!(matches!(
        read(&[snap(&d1)]),
        Some(SnapshotError::ChainBaseNotFull(_))
    ));
    assert!(matches!(
        read(&[snap(&base), snap(&d2)]),
        Some(SnapshotError::ChainGap { .. })
    ));
    assert!(matches!(
        read(&[snap(&base), snap(&d2), snap(&d1)]),
        Some(SnapshotError::ChainGap { .. })
    ));
    assert!(matches!(
        read(&[snap(&base), snap(&base)]),
        Some(SnapshotError::FullInChain(_))
    ));
    assert!(read(&[snap(&base), snap(&d1), snap(&d2)]).is_none());
    // Restore refuses the same chains before touching KVM.
    assert!(matches!(
        MicroVm::restore_chain([snap(&base), snap(&d2)]).build(),
        Err(Error::Snapshot(SnapshotError::ChainGap { .. }))
    ));
}

#[test]
fn diff_runs_out_of_order_or_past_memory_are_refused() {
    for (name, runs) in [
        ("runs-past", vec![(MEM / PAGE - 1, 2)]),
        ("runs-order", vec![(5, 1), (2, 1)]),
        ("runs-empty", vec![(1, 0)]),
    ] {
        let d = diff_dir(name, state().id, 9, &[], 0);
        let mut s = state();
        s.id = SnapshotId([9; 16]);
        s.parent = Some(state().id);
        s.diff = Some(vec![runs]);
        std::fs::write(snap(&d).join(STATE_FILE), format::encode(&s).unwrap()).unwrap();
        assert!(
            matches!(
                dormouse::snapshot::read_state(&snap(&d)),
                Err(SnapshotError::Inconsistent(_))
            ),
            "{name}"
        );
    }
}

#[test]
fn invalid_saved_rate_limits_are_refused() {
    use dormouse::rate_limiter::{
        BucketKind, RateLimiterConfig, RateLimiterConfigError, TokenBucketConfig,
    };
    use dormouse::snapshot::SavedDevice;

    let mut s = state();
    s.config.devices.push(SavedDevice::Block {
        path: "/nonexistent/disk.img".into(),
        read_only: false,
        rate_limiter: RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig::new(100, 0)),
        },
    });
    let d = snapshot_dir("bad-rate-limiter", &s);
    assert!(matches!(
        restore_error(&snap(&d)),
        SnapshotError::InvalidRateLimiter {
            device: 0,
            source: RateLimiterConfigError::ZeroRefillTime(BucketKind::Ops),
        }
    ));
}

// Hostile files: each is refused before a byte of it is read.

/// A good snapshot at `snap(d)` whose `name` file is replaced by what
/// `plant` puts at its path.
fn planted(test: &str, name: &str, plant: impl FnOnce(&Path)) -> Dir {
    let d = snapshot_dir(test, &state());
    let path = snap(&d).join(name);
    std::fs::remove_file(&path).unwrap();
    plant(&path);
    d
}

/// The error reading the snapshot at `dir` gives, on another thread so
/// that a file that blocks the open fails the test instead of hanging it.
fn restore_error_within_seconds(dir: PathBuf) -> SnapshotError {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(restore_error(&dir));
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("reading the snapshot blocked")
}

#[test]
fn a_symlinked_snapshot_file_is_not_followed() {
    // Links to a perfectly good snapshot's files: still refused.
    let good = snapshot_dir("link-target", &state());
    for name in [STATE_FILE, MEMORY_FILE] {
        let target = snap(&good).join(name);
        let d = planted(&format!("link-{name}"), name, |p| {
            std::os::unix::fs::symlink(&target, p).unwrap()
        });
        match restore_error(&snap(&d)) {
            SnapshotError::SymlinkFile(p) => assert!(p.ends_with(name), "{p:?}"),
            e => panic!("{name}: {e:?}"),
        }
    }
}

#[test]
fn a_snapshot_file_linked_to_dev_zero_is_refused_unread() {
    for name in [STATE_FILE, MEMORY_FILE] {
        let d = planted(&format!("zero-{name}"), name, |p| {
            std::os::unix::fs::symlink("/dev/zero", p).unwrap()
        });
        let e = restore_error_within_seconds(snap(&d));
        assert!(
            matches!(&e, SnapshotError::SymlinkFile(p) if p.ends_with(name)),
            "{name}: {e:?}"
        );
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_fifo_in_a_snapshot_is_refused_without_blocking() {
    for name in [STATE_FILE, MEMORY_FILE] {
        let d = planted(&format!("fifo-{name}"), name, mkfifo);
        let e = restore_error_within_seconds(snap(&d));
        assert!(
            matches!(&e, SnapshotError::FifoFile(p) if p.ends_with(name)),
            "{name}: {e:?}"
        );
    }
}

#[test]
fn a_device_node_in_a_snapshot_is_refused_unread() {
    // A character device like /dev/zero (1, 5) in place of each file. Needs
    // CAP_MKNOD: the test rig and the emulated host run tests as root.
    for name in [STATE_FILE, MEMORY_FILE] {
        let d = planted(&format!("dev-{name}"), name, |p| {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: `c` is a NUL-terminated path that outlives the call.
            let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 5)) };
            assert_eq!(
                rc,
                0,
                "mknod (run the tests as root): {}",
                std::io::Error::last_os_error()
            );
        });
        let e = restore_error_within_seconds(snap(&d));
        assert!(
            matches!(&e, SnapshotError::DeviceFile(p) if p.ends_with(name)),
            "{name}: {e:?}"
        );
    }
}

#[test]
fn a_directory_in_place_of_a_snapshot_file_is_refused() {
    for name in [STATE_FILE, MEMORY_FILE] {
        let d = planted(&format!("dir-{name}"), name, |p| {
            std::fs::create_dir(p).unwrap()
        });
        assert!(
            matches!(
                restore_error(&snap(&d)),
                SnapshotError::NotARegularFile {
                    kind: "directory",
                    ..
                }
            ),
            "{name}"
        );
    }
}

#[test]
fn an_oversized_state_file_is_refused_before_it_is_read() {
    let d = snapshot_dir("huge", &state());
    // Sparse: as large as the bound allows plus one byte, at no disk cost.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(snap(&d).join(STATE_FILE))
        .unwrap();
    file.set_len(MAX_STATE_FILE + 1).unwrap();
    drop(file);
    match restore_error(&snap(&d)) {
        SnapshotError::StateFileTooLarge { size, max, .. } => {
            assert_eq!((size, max), (MAX_STATE_FILE + 1, MAX_STATE_FILE))
        }
        e => panic!("{e:?}"),
    }
    // At the bound itself the size passes and the header decides.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(snap(&d).join(STATE_FILE))
        .unwrap();
    file.set_len(MAX_STATE_FILE).unwrap();
    drop(file);
    assert!(matches!(
        restore_error(&snap(&d)),
        SnapshotError::Truncated { .. }
    ));
}

fn transport(device_type: u32) -> TransportState {
    TransportState {
        device_type,
        status: 0,
        device_features_sel: 0,
        driver_features_sel: 0,
        driver_features: 0,
        queue_sel: 0,
        interrupt_status: 0,
        config_generation: 0,
        queues: Vec::new(),
        rate_limiters: Vec::new(),
    }
}

/// A snapshot whose devices name host resources nobody should reopen
/// blindly.
fn state_with_devices() -> VmState {
    let mut s = state();
    s.config.devices = vec![
        SavedDevice::Block {
            path: "/nonexistent/saved-disk.img".into(),
            read_only: false,
            rate_limiter: Default::default(),
        },
        SavedDevice::Net {
            tap: "someone-elses-tap".into(),
            mac: [6, 0, 0, 0, 0, 1],
            rx_rate_limiter: Default::default(),
            tx_rate_limiter: Default::default(),
        },
        SavedDevice::Vsock {
            cid: 3,
            uds_path: "/run/another-vm.vsock".into(),
            config: Default::default(),
        },
    ];
    s.virtio = vec![transport(2), transport(1), transport(19)];
    s
}

fn assert_past_the_consent_check(result: Result<MicroVm, Error>) {
    match result {
        Err(Error::Snapshot(e @ SnapshotError::SavedResourceNotNamed { .. })) => {
            panic!("refused with consent: {e}")
        }
        #[cfg(not(target_arch = "aarch64"))]
        Err(Error::UnsupportedArchitecture(_)) => {}
        // On KVM the restore goes on and fails later (no such disk, or the
        // synthetic vGIC state).
        #[cfg(target_arch = "aarch64")]
        Err(_) => {}
        Ok(_) => panic!("a synthetic snapshot restored"),
        #[cfg(not(target_arch = "aarch64"))]
        Err(other) => panic!("unexpected {other:?}"),
    }
}

#[test]
fn stored_device_paths_are_not_reopened_without_consent() {
    use dormouse::devices::virtio::net::TapConfig;

    let d = snapshot_dir("consent", &state_with_devices());
    let unnamed = |r: dormouse::snapshot::Restore| match r.build() {
        Err(Error::Snapshot(SnapshotError::SavedResourceNotNamed {
            kind,
            index,
            saved,
            method,
        })) => (kind, index, saved, method),
        other => panic!("expected SavedResourceNotNamed, got {other:?}"),
    };
    let (kind, index, saved, method) = unnamed(MicroVm::restore(snap(&d)));
    assert_eq!((kind, index, method), ("disk", 0, "block_path"));
    assert_eq!(saved, "/nonexistent/saved-disk.img");
    let e = MicroVm::restore(snap(&d)).build().err().unwrap();
    assert!(e.to_string().contains("block_path"), "{e}");
    assert!(e.to_string().contains("reuse_saved_paths(true)"), "{e}");

    // A layered disk names the disk too.
    let layered = MicroVm::restore(snap(&d)).block_layers(
        0,
        dormouse::builder::DiskLayers::new("/tmp/base.img", "/tmp/top.img").layer("/tmp/l1"),
    );
    assert_eq!(
        unnamed(layered),
        ("network interface", 0, "someone-elses-tap".into(), "tap")
    );
    let restore = || MicroVm::restore(snap(&d)).block_path(0, "/tmp/my-disk.img");
    assert_eq!(
        unnamed(restore()),
        ("network interface", 0, "someone-elses-tap".into(), "tap")
    );
    let restore = || restore().tap(0, TapConfig::Name("mytap".into()));
    assert_eq!(
        unnamed(restore()),
        (
            "vsock device",
            0,
            "/run/another-vm.vsock".into(),
            "vsock_uds"
        )
    );
    // Everything named: past the check.
    assert_past_the_consent_check(restore().vsock_uds("/tmp/mine.vsock").build());
    // Or consent to what the snapshot names.
    assert_past_the_consent_check(MicroVm::restore(snap(&d)).reuse_saved_paths(true).build());
    // Consent covers whatever is not named; what is named still wins.
    assert_past_the_consent_check(
        MicroVm::restore(snap(&d))
            .block_path(0, "/tmp/my-disk.img")
            .reuse_saved_paths(true)
            .build(),
    );
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn snapshot_directories_and_files_are_private() {
    // Even with a permissive umask. (Process-wide: other tests that create
    // files meanwhile only get wider modes, which none of them checks.)
    // SAFETY: umask(2) takes no pointers and cannot fail.
    let old = unsafe { libc::umask(0) };
    let d = snapshot_dir("modes", &state());
    let out = d.0.join("merged");
    dormouse::snapshot::merge(&[snap(&d)], &out).unwrap();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    for dir in [snap(&d), out] {
        assert_eq!(mode(&dir), 0o700, "{dir:?}");
        assert_eq!(mode(&dir.join(STATE_FILE)), 0o600, "{dir:?}");
        assert_eq!(mode(&dir.join(MEMORY_FILE)), 0o600, "{dir:?}");
    }
}

// Disk images: one writer, or any number of readers.

fn disk_image(name: &str) -> (Dir, PathBuf) {
    let root =
        std::env::temp_dir().join(format!("dormouse-disklock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let path = root.join("disk.img");
    std::fs::write(&path, vec![0u8; 64 * 512]).unwrap();
    (Dir(root), path)
}

#[test]
fn a_disk_in_use_by_another_vm_is_refused() {
    use dormouse::devices::virtio::block::{Block, BlockError};

    let (_d, path) = disk_image("rw");
    let first = Block::new(&path, false).unwrap();
    for read_only in [false, true] {
        match Block::new(&path, read_only) {
            Err(e @ BlockError::Locked { .. }) => {
                assert!(matches!(e, BlockError::Locked { read_only: r, .. } if r == read_only));
                assert!(e.to_string().contains("disk.img"), "{e}");
                assert!(e.to_string().contains("in use"), "{e}");
            }
            other => panic!("read_only {read_only}: {other:?}"),
        }
    }
    // Dropping the device releases the image.
    drop(first);
    let readers = [
        Block::new(&path, true).unwrap(),
        Block::new(&path, true).unwrap(),
    ];
    // Readers share; a writer waits for all of them to go.
    assert!(matches!(
        Block::new(&path, false),
        Err(BlockError::Locked {
            read_only: false,
            ..
        })
    ));
    drop(readers);
    Block::new(&path, false).unwrap();
}

#[test]
fn a_fifo_as_a_disk_is_refused_without_blocking() {
    use dormouse::devices::virtio::block::{Block, BlockError};

    let (d, _) = disk_image("fifo");
    let fifo = d.0.join("fifo");
    mkfifo(&fifo);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(Block::new(&path, true).map(drop));
    });
    let result = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("opening a FIFO as a disk blocked");
    assert!(
        matches!(&result, Err(BlockError::NotADisk { path }) if *path == fifo),
        "{result:?}"
    );
}

#[test]
fn a_vmgenid_page_saved_outside_the_free_holes_is_refused() {
    use dormouse::arch::aarch64::layout::VMGENID_START;
    use dormouse::devices::vmgenid::VmGenIdSnapshot;

    let mut good = state();
    good.vmgenid = Some(VmGenIdSnapshot {
        addr: VMGENID_START.0,
        spi: 1,
        id: [9; 16],
    });
    good.validate().unwrap();
    // In guest RAM, on the UART, unaligned.
    for addr in [DRAM_START.0, 0x1000_0000, VMGENID_START.0 + 8] {
        let mut s = good.clone();
        s.vmgenid.as_mut().unwrap().addr = addr;
        let d = snapshot_dir(&format!("genaddr{addr:x}"), &s);
        let e = restore_error(&snap(&d));
        assert!(
            matches!(e, SnapshotError::VmGenIdAddress(a) if a == addr),
            "{e:?}"
        );
        assert!(e.to_string().contains("restore another snapshot"), "{e}");
    }
}

#[test]
fn a_vmgenid_interrupt_saved_on_another_device_is_refused() {
    use dormouse::arch::aarch64::layout::VMGENID_START;
    use dormouse::devices::vmgenid::VmGenIdSnapshot;

    let mut s = state_with_devices();
    // Three virtio devices take SPIs 1..=3 (the UART SPI 0); 4 is free,
    // 96 is past the vGIC's 96 SPIs.
    s.vmgenid = Some(VmGenIdSnapshot {
        addr: VMGENID_START.0,
        spi: 4,
        id: [9; 16],
    });
    s.validate().unwrap();
    for spi in [0, 1, 3, 96, u32::MAX] {
        s.vmgenid.as_mut().unwrap().spi = spi;
        let d = snapshot_dir(&format!("genspi{spi}"), &s);
        let e = restore_error(&snap(&d));
        assert!(
            matches!(e, SnapshotError::VmGenIdSpi { spi: got, virtio: 3 } if got == spi),
            "{e:?}"
        );
    }
}
