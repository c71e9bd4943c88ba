//! Runnable golden files: snapshots and a session image that older dormouse
//! builds wrote, which every later build must still restore AND run. Users
//! suspend sessions for hours; an update must never strand them.
//!
//! All of them hold the same tiny guest (`tests/payloads/ticker.S`, 2 MiB,
//! two vCPUs, a vsock device the guest never drives): each vCPU counts at
//! 0x8010_0000 + 8 * n, and vCPU 0 prints `tick <count>` every 2^16 counts.
//!
//! - `tests/golden/v1_0/runnable/`: a format 1.0 snapshot (`state`,
//!   `memory`). Taken from a running VM, its state converted to the frozen
//!   1.0 structs ([`to_1_0`]: every field added since holds what 1.0
//!   meant) and written under a 1.0 header.
//! - `tests/golden/v1_1/runnable/`: the same snapshot as format 1.1 wrote it.
//! - `tests/golden/image_v1/`: a session image of format 1 (`image.json`
//!   and the 1.1 snapshot), as `Image::create` lays one out.
//!
//! They are never regenerated (docs/snapshot-format.md). The generator is
//! [`golden_runs_todays_vm_converted_to_every_golden_format_runs`]: it runs
//! in every emulated test run (so it never rots), and with
//! `DORMOUSE_WRITE_GOLDEN=1` it also prints what it made between
//! `@@GOLDEN` markers, which `examples/golden_extract.rs` turns back into
//! files on the x86 side, writing only the directories that do not exist
//! yet:
//!
//! ```text
//! DORMOUSE_WRITE_GOLDEN=1 cargo xtask test --emulated-only -- golden_runs_todays 2>&1 | tee golden.log
//! cargo run --example golden_extract -- golden.log tests/golden
//! ```
#![cfg(target_arch = "aarch64")]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{code, payloads, Console, TempDir};
use dormouse::devices::virtio::mmio::TransportState;
use dormouse::devices::virtio::vsock::{HostPorts, VsockConfig};
use dormouse::rate_limiter::RateLimiterConfig;
use dormouse::session::{
    Image, ImageManifest, SessionConfig, SessionRoot, SessionState, DEFAULT_GUEST_CID,
    IMAGE_FORMAT, IMAGE_MANIFEST, IMAGE_SNAPSHOT,
};
use dormouse::snapshot::compat::v1_0;
use dormouse::snapshot::{self, format, MemoryRegionState, SavedConfig, SavedDevice};
use dormouse::{GuestAddress, MicroVm, DRAM_START};
use vm_memory::Bytes;

/// Guest memory of every golden guest.
const MEMORY_MIB: u64 = 2;
/// Its vCPUs.
const VCPUS: u32 = 2;
/// Where vCPU n keeps its count: `COUNTS + 8 * n` (tests/payloads/ticker.S).
const COUNTS: u64 = 0x8010_0000;
/// How long a guest gets to count or print what a test waits for (nested
/// KVM under TCG is slow).
const PATIENCE: Duration = Duration::from_secs(120);

/// One golden directory: its files, relative to it.
struct Golden {
    name: &'static str,
    files: &'static [(&'static str, &'static [u8])],
}

const GOLDEN_1_0: Golden = Golden {
    name: "v1_0/runnable",
    files: &[
        ("state", include_bytes!("golden/v1_0/runnable/state")),
        ("memory", include_bytes!("golden/v1_0/runnable/memory")),
    ],
};

const GOLDEN_1_1: Golden = Golden {
    name: "v1_1/runnable",
    files: &[
        ("state", include_bytes!("golden/v1_1/runnable/state")),
        ("memory", include_bytes!("golden/v1_1/runnable/memory")),
    ],
};

const GOLDEN_IMAGE_1: Golden = Golden {
    name: "image_v1",
    files: &[
        ("image.json", include_bytes!("golden/image_v1/image.json")),
        (
            "snapshot/state",
            include_bytes!("golden/image_v1/snapshot/state"),
        ),
        (
            "snapshot/memory",
            include_bytes!("golden/image_v1/snapshot/memory"),
        ),
    ],
};

impl Golden {
    /// Writes the files under `dir` (the emulated host has no source tree,
    /// so they are built into the test) and returns `dir`.
    fn write_to(&self, dir: &Path) -> PathBuf {
        for (rel, bytes) in self.files {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
        }
        dir.to_path_buf()
    }
}

fn count(vm: &MicroVm, vcpu: u64) -> u64 {
    vm.memory()
        .read_obj(GuestAddress(COUNTS + 8 * vcpu))
        .unwrap()
}

fn counts(vm: &MicroVm) -> Vec<u64> {
    (0..u64::from(VCPUS)).map(|v| count(vm, v)).collect()
}

/// The counts a snapshot's memory file holds.
fn saved_counts(dir: &Path) -> Vec<u64> {
    let memory = std::fs::read(dir.join(snapshot::MEMORY_FILE)).unwrap();
    let at = usize::try_from(COUNTS - DRAM_START.0).unwrap();
    (0..usize::try_from(VCPUS).unwrap())
        .map(|v| u64::from_le_bytes(memory[at + 8 * v..at + 8 * v + 8].try_into().unwrap()))
        .collect()
}

/// The numbers of the complete `tick` lines in `lines`, in order (a line cut
/// by a snapshot, or half-printed before one, is skipped).
fn ticks<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<u64> {
    lines
        .into_iter()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("tick "))
        .filter(|n| n.len() == 16)
        .filter_map(|n| u64::from_str_radix(n, 16).ok())
        .collect()
}

/// Waits until `ok()`, or fails with `what` after [`PATIENCE`].
fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Restores what `layers` holds (a full snapshot, then diffs), checks the
/// restored VM holds the newest layer's counts, resumes it and checks the
/// guest RUNS on from them: both counts pass their saved values and never
/// drop below them (a lost register would restart them at zero), and
/// vCPU 0 prints ticks from its saved count on, on the console. Returns it
/// paused again.
fn restore_and_run(layers: &[PathBuf], uds: &Path) -> MicroVm {
    // The newest layer holds the page of counts: a full snapshot all
    // pages, a diff the ones the guest dirtied.
    let saved = saved_counts(layers.last().unwrap());
    assert!(
        saved.iter().all(|&c| c > 0),
        "the snapshot's guest never counted on every vCPU: {saved:?}"
    );
    let console = Console::default();
    let mut vm = MicroVm::restore_chain(layers.to_vec())
        .vsock_uds(uds)
        .serial_output(console.clone())
        .build()
        .unwrap();
    assert_eq!(vm.state(), dormouse::VmState::Paused);
    assert_eq!(counts(&vm), saved, "memory is not the snapshot's");
    vm.resume().unwrap();
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        for (v, (now, floor)) in counts(&vm).iter().zip(&saved).enumerate() {
            assert!(
                now >= floor,
                "vCPU {v} restarted its count: {now} < {floor}"
            );
        }
    }
    wait_until("both vCPUs count past their saved counts", || {
        counts(&vm)
            .iter()
            .zip(&saved)
            .all(|(now, floor)| now > floor)
    });
    wait_until("vCPU 0 prints a tick past its saved count", || {
        let text = console.text();
        ticks(text.lines()).iter().any(|&t| t > saved[0])
    });
    let printed = ticks(console.text().lines());
    assert!(
        printed.iter().all(|&t| t >= saved[0]),
        "the restored guest printed counts below its saved {}: {printed:?}",
        saved[0]
    );
    vm.pause().unwrap();
    vm
}

fn header_version(dir: &Path) -> (u16, u16) {
    let state = std::fs::read(dir.join(snapshot::STATE_FILE)).unwrap();
    let header = format::Header::parse(&state).unwrap();
    (header.major, header.minor)
}

/// What every runnable golden snapshot must keep doing: restore and run;
/// then a diff on top of it, and a full snapshot, both in this build's
/// format, restore and run too.
fn golden_snapshot_runs(golden: &Golden, version: (u16, u16)) {
    let tmp = TempDir::new(&format!("golden-{}", golden.name.replace('/', "-")));
    let dir = golden.write_to(&tmp.0.join("golden"));
    assert_eq!(header_version(&dir), version);
    let uds = tmp.0.join("v.sock");

    let mut vm = restore_and_run(std::slice::from_ref(&dir), &uds);
    let diff = tmp.0.join("diff");
    vm.snapshot_diff(&diff).unwrap();
    drop(vm);
    assert_eq!(header_version(&diff), (format::MAJOR, format::MINOR));

    let chain = [dir.clone(), diff];
    let mut vm = restore_and_run(&chain, &uds);
    let full = tmp.0.join("full");
    vm.snapshot(&full).unwrap();
    drop(vm);
    assert_eq!(header_version(&full), (format::MAJOR, format::MINOR));
    drop(restore_and_run(&[full], &uds));
}

#[test]
fn golden_runs_format_1_0_snapshot_restores_and_runs() {
    golden_snapshot_runs(&GOLDEN_1_0, (1, 0));
}

#[test]
fn golden_runs_format_1_1_snapshot_restores_and_runs() {
    golden_snapshot_runs(&GOLDEN_1_1, (1, 1));
}

/// Launches a session from the image at `dir`, checks its guest runs on
/// from the image's counts (seen on its console), suspends and resumes it
/// and checks it runs on from where it was.
fn image_runs(dir: &Path, scratch: &Path) {
    let image = Image::open(dir).unwrap();
    assert_eq!(image.manifest().format, 1);
    assert_eq!(image.manifest().memory_mib, MEMORY_MIB);
    assert_eq!(image.manifest().vcpus, VCPUS);
    assert!(image.manifest().disks.is_empty());
    let saved = saved_counts(&image.snapshot_dir());
    let root = SessionRoot::open(scratch.join("root")).unwrap();
    let session = root.launch(&image, SessionConfig::new()).unwrap();
    assert_eq!(session.state(), SessionState::Running);

    // Every tick the session printed, in order, is at least the image's
    // count and at least the one before it: the guest went on from its
    // registers, across the suspend too. (A snapshot taken between the
    // count's store and its print prints the saved count itself.)
    let check = |floor: u64| {
        let tail = session.console_tail();
        let printed = ticks(tail.iter().map(String::as_str));
        assert!(
            printed.iter().all(|&t| t >= floor) && printed.windows(2).all(|w| w[0] <= w[1]),
            "the session's guest restarted or went back (floor {floor}): {printed:?}"
        );
        printed
    };
    wait_until("the launched guest prints a tick", || {
        !check(saved[0]).is_empty()
    });
    session.suspend().unwrap();
    assert_eq!(session.state(), SessionState::Suspended);
    assert_eq!(session.info().chain_len, 1);
    let before = *check(saved[0]).last().unwrap();
    session.resume().unwrap();
    assert_eq!(session.state(), SessionState::Running);
    wait_until("the resumed guest prints a tick past the suspend", || {
        check(saved[0]).last().is_some_and(|&t| t > before)
    });
    session.terminate().unwrap();
    drop(root);
}

#[test]
fn golden_image_runs_format_1_launches_suspends_and_resumes() {
    let tmp = TempDir::new("golden-image-v1");
    let dir = GOLDEN_IMAGE_1.write_to(&tmp.0.join("image"));
    image_runs(&dir, &tmp.0);
}

/// Today's state as format 1.0's frozen structs hold it. Every field added
/// since 1.0 must hold what a 1.0 file means (no rate limits, a guest
/// that may connect to any host port): a state that needs more is not
/// representable in 1.0, and this panics saying which field.
fn to_1_0(state: &snapshot::VmState) -> v1_0::VmState {
    let snapshot::VmState {
        id,
        parent,
        diff,
        config,
        memory,
        vcpus,
        gic,
        serial,
        rtc,
        virtio,
        vmgenid,
    } = state.clone();
    // Format 1.0 has no VM generation ID device: the generator's VM has none.
    assert!(
        vmgenid.is_none(),
        "a 1.0 snapshot cannot hold a VMGenID device"
    );
    let SavedConfig {
        memory_size,
        vcpus: vcpu_count,
        rtc: has_rtc,
        dirty_tracking,
        dirty_ring,
        devices,
    } = config;
    let devices = devices
        .into_iter()
        .map(|device| match device {
            SavedDevice::Block {
                path,
                read_only,
                rate_limiter,
            } => {
                assert_eq!(
                    rate_limiter,
                    RateLimiterConfig::default(),
                    "1.0 has no disk limits"
                );
                v1_0::SavedDevice::Block { path, read_only }
            }
            SavedDevice::Net {
                tap,
                mac,
                rx_rate_limiter,
                tx_rate_limiter,
            } => {
                for limit in [rx_rate_limiter, tx_rate_limiter] {
                    assert_eq!(limit, RateLimiterConfig::default(), "1.0 has no net limits");
                }
                v1_0::SavedDevice::Net { tap, mac }
            }
            SavedDevice::Vsock {
                cid,
                uds_path,
                config,
            } => {
                let meant = VsockConfig {
                    host_ports: HostPorts::Any,
                    ..VsockConfig::default()
                };
                assert_eq!(config, meant, "1.0 vsock has no configuration");
                v1_0::SavedDevice::Vsock { cid, uds_path }
            }
        })
        .collect();
    let virtio = virtio
        .into_iter()
        .map(|t| {
            let TransportState {
                device_type,
                status,
                device_features_sel,
                driver_features_sel,
                driver_features,
                queue_sel,
                interrupt_status,
                config_generation,
                queues,
                rate_limiters,
            } = t;
            assert!(
                rate_limiters
                    .iter()
                    .all(|r| r.bandwidth.is_none() && r.ops.is_none()),
                "1.0 saves no rate limiter budgets"
            );
            v1_0::TransportState {
                device_type,
                status,
                device_features_sel,
                driver_features_sel,
                driver_features,
                queue_sel,
                interrupt_status,
                config_generation,
                queues,
            }
        })
        .collect();
    let memory = memory
        .into_iter()
        .map(
            |MemoryRegionState {
                 guest_addr,
                 size,
                 file_offset,
             }| v1_0::MemoryRegionState {
                guest_addr,
                size,
                file_offset,
            },
        )
        .collect();
    v1_0::VmState {
        id,
        parent,
        diff,
        config: v1_0::SavedConfig {
            memory_size,
            vcpus: vcpu_count,
            rtc: has_rtc,
            dirty_tracking,
            dirty_ring,
            devices,
        },
        memory,
        vcpus,
        gic,
        serial,
        rtc,
        virtio,
    }
}

/// Prints the files under `dir` between `@@GOLDEN` markers as `name` (for
/// `examples/golden_extract.rs`): every 1 KiB chunk that is not all zeros,
/// in hex, with each file's length and CRC-64 to check the result.
fn print_golden(name: &str, dir: &Path, files: &[&str]) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n@@GOLDEN DIR {name}").unwrap();
    for rel in files {
        let bytes = std::fs::read(dir.join(rel)).unwrap();
        writeln!(
            out,
            "@@GOLDEN FILE {rel} {} {:016x}",
            bytes.len(),
            format::crc64(&bytes)
        )
        .unwrap();
        for (i, chunk) in bytes.chunks(1024).enumerate() {
            if chunk.iter().all(|&b| b == 0) {
                continue;
            }
            let hex: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(out, "@@GOLDEN DATA {rel} {} {hex}", i * 1024).unwrap();
        }
    }
    writeln!(out, "@@GOLDEN END {name}").unwrap();
    out.flush().unwrap();
}

/// The generator of every golden directory above, run on today's build:
/// a fresh ticker VM is snapshotted, and the snapshot written as format
/// 1.0, as this build's format, and as a session image; each must restore
/// and run. With `DORMOUSE_WRITE_GOLDEN=1` the directories are printed
/// for `examples/golden_extract.rs` (see the module doc).
#[test]
fn golden_runs_todays_vm_converted_to_every_golden_format_runs() {
    let tmp = TempDir::new("golden-gen");
    let mut vm = MicroVm::builder()
        .vcpus(VCPUS)
        .memory_mib(MEMORY_MIB)
        .dirty_tracking(true)
        // What formats 1.0 and 1.1 can hold.
        .vmgenid(false)
        .vsock_with(
            DEFAULT_GUEST_CID,
            tmp.0.join("boot.vsock"),
            VsockConfig {
                host_ports: HostPorts::Any,
                ..VsockConfig::default()
            },
        )
        .payload(code(payloads::TICKER), DRAM_START)
        .build()
        .unwrap();
    vm.start().unwrap();
    let started = Instant::now();
    // A few ticks in, so the golden memory holds counts well past zero.
    wait_until("the fresh guest counts", || {
        counts(&vm).iter().all(|&c| c > 3 << 16)
    });
    let took = started.elapsed();
    vm.pause().unwrap();
    let now = counts(&vm);
    println!("counted {now:?} in {took:?}");

    let current = tmp.0.join("current");
    vm.snapshot(&current).unwrap();
    drop(vm);
    let state = snapshot::read_state(&current).unwrap();
    assert_eq!(header_version(&current), (format::MAJOR, format::MINOR));

    // Format 1.0: the same snapshot, its state in the frozen structs. The
    // conversion loses nothing: 1.0's decoder gives today's state back.
    let old = to_1_0(&state);
    assert_eq!(snapshot::VmState::from(old.clone()), state);
    let v1_0_dir = tmp.0.join("v1_0");
    std::fs::create_dir_all(&v1_0_dir).unwrap();
    std::fs::write(
        v1_0_dir.join(snapshot::STATE_FILE),
        format::encode_version(&old, 0).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        current.join(snapshot::MEMORY_FILE),
        v1_0_dir.join(snapshot::MEMORY_FILE),
    )
    .unwrap();

    // A session image, laid out as Image::create writes one (which boots
    // only Linux kernels, so the manifest is made here from its struct).
    let image_dir = tmp.0.join("image");
    std::fs::create_dir_all(image_dir.join(IMAGE_SNAPSHOT)).unwrap();
    for file in [snapshot::STATE_FILE, snapshot::MEMORY_FILE] {
        std::fs::copy(
            current.join(file),
            image_dir.join(IMAGE_SNAPSHOT).join(file),
        )
        .unwrap();
    }
    let manifest = ImageManifest {
        format: IMAGE_FORMAT,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            .try_into()
            .unwrap(),
        snapshot_id: state.id.to_string(),
        memory_mib: MEMORY_MIB,
        vcpus: VCPUS,
        guest_cid: DEFAULT_GUEST_CID,
        disks: Vec::new(),
    };
    std::fs::write(
        image_dir.join(IMAGE_MANIFEST),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();

    if std::env::var_os("DORMOUSE_WRITE_GOLDEN").is_some() {
        let files = [snapshot::STATE_FILE, snapshot::MEMORY_FILE];
        print_golden("v1_0/runnable", &v1_0_dir, &files);
        print_golden(
            &format!("v{}_{}/runnable", format::MAJOR, format::MINOR),
            &current,
            &files,
        );
        print_golden(
            &format!("image_v{IMAGE_FORMAT}"),
            &image_dir,
            &[IMAGE_MANIFEST, "snapshot/state", "snapshot/memory"],
        );
    }

    let uds = tmp.0.join("v.sock");
    assert_eq!(header_version(&v1_0_dir), (1, 0));
    drop(restore_and_run(&[v1_0_dir], &uds));
    drop(restore_and_run(&[current], &uds));
    image_runs(&image_dir, &tmp.0);
}
