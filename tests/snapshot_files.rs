//! Bad snapshot files: each is a distinct, clear error, found before any
//! KVM resource exists (so these run on any host).

use std::path::{Path, PathBuf};

use dormouse::arch::aarch64::state::{GicState, GicVcpuState, IccState, VcpuState};
use dormouse::devices::serial::SerialSnapshot;
use dormouse::snapshot::{
    format, write_dir, MemoryRegionState, SavedConfig, SnapshotError, VmState, MEMORY_FILE,
    STATE_FILE,
};
use dormouse::{Error, MicroVm, DRAM_START};

const MEM: u64 = 1 << 20;

/// A self-consistent state for a 1-vCPU, 1 MiB VM (its vGIC state is
/// empty, so only a restore on real KVM would refuse it).
fn state() -> VmState {
    VmState {
        config: SavedConfig {
            memory_size: MEM,
            vcpus: 1,
            rtc: false,
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
        MicroVm::restore(snap(&d)).vsock_uds("/tmp/x.sock"),
    ] {
        assert!(matches!(
            restore.build(),
            Err(Error::Snapshot(SnapshotError::Inconsistent(_)))
        ));
    }
}
