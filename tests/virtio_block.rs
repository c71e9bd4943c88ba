//! virtio-blk driven by the guest's own virtio_blk driver: an ext4 image
//! made on the x86 side is mounted, read and written; a read-only disk
//! refuses writes; a second disk works beside the first.
#![cfg(target_arch = "aarch64")]

mod common;

use std::path::PathBuf;

use common::{fact, guest_assets, guest_initrd, modules, run_guest, TempDir};
use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::{ExitReason, MicroVm};

/// The ext4 image `cargo xtask` makes with `mkfs.ext4 -d`: it holds
/// /hello.txt with [`HELLO`].
fn test_disk(dir: &std::path::Path, name: &str) -> PathBuf {
    let src = std::env::var_os("DORMOUSE_TEST_DISK")
        .expect("DORMOUSE_TEST_DISK is not set: run the tests with `cargo xtask test`");
    let dst = dir.join(name);
    std::fs::copy(&src, &dst).unwrap();
    dst
}

const HELLO: &str = "hello from the x86 side";

fn vm(initrd: PathBuf) -> dormouse::MicroVmBuilder {
    MicroVm::builder()
        .memory_mib(256)
        .kernel(guest_assets().kernel)
        .initrd(initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
}

#[test]
fn the_guest_mounts_reads_and_writes_an_ext4_disk() {
    let tmp = TempDir::new("blk-rw");
    let disk = test_disk(&tmp.0, "disk.ext4");
    // Unique bytes, so finding them in the image proves this write landed.
    let marker = format!("written-by-the-guest-{}", std::process::id());
    let script = format!(
        r#"
echo "@@size=$(cat /sys/block/vda/size)"
mount -t ext4 /dev/vda /mnt && echo "@@mounted=yes"
echo "@@hello=$(cat /mnt/hello.txt)"
echo "{marker}" > /mnt/guest-note.txt
sync
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of=/mnt/zeros bs=1M count=16 conv=fsync 2>/dev/null && t1=$(cut -d' ' -f1 /proc/uptime) && echo "@@dd_write=16777216 $t0 $t1"
rm /mnt/zeros
umount /mnt && echo "@@unmounted=yes"
echo 3 > /proc/sys/vm/drop_caches
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null && t1=$(cut -d' ' -f1 /proc/uptime) && echo "@@dd_read=33554432 $t0 $t1"
poweroff -f
"#
    );
    let initrd = guest_initrd(&tmp.0, &[modules::VIRTIO_MMIO, modules::BLOCK], &script);
    let (exit, text) = run_guest(vm(initrd).block(&disk, false), |_| {});
    assert_eq!(exit, ExitReason::Shutdown, "console:\n{text}");
    let size_sectors: u64 = fact(&text, "size").parse().unwrap();
    assert_eq!(size_sectors * 512, std::fs::metadata(&disk).unwrap().len());
    assert_eq!(fact(&text, "mounted"), "yes");
    assert_eq!(fact(&text, "hello"), HELLO);
    assert_eq!(fact(&text, "unmounted"), "yes");
    for key in ["dd_write", "dd_read"] {
        // "<bytes> <uptime before> <uptime after>", uptime in 10 ms steps.
        let line = fact(&text, key);
        let fields: Vec<f64> = line
            .split_whitespace()
            .map(|f| f.parse().unwrap_or_else(|_| panic!("{key}: {line}")))
            .collect();
        let [bytes, t0, t1] = fields[..] else {
            panic!("{key}: {line}")
        };
        let secs = (t1 - t0).max(0.01);
        common::report(&format!(
            "virtio-blk {key} (guest dd, bs=1M): {:.0} MiB in {secs:.2} s = {:.1} MiB/s",
            bytes / 1048576.0,
            bytes / 1048576.0 / secs
        ));
    }

    // The host side: the new file's name and content are in the image.
    let image = std::fs::read(&disk).unwrap();
    let contains = |needle: &[u8]| image.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(marker.as_bytes()),
        "the guest's data is not in the image"
    );
    assert!(
        contains(b"guest-note.txt"),
        "the guest's file name is not in the image"
    );
}

#[test]
fn a_read_only_disk_refuses_writes_and_a_second_disk_works_beside_it() {
    let tmp = TempDir::new("blk-ro");
    let ro = test_disk(&tmp.0, "ro.ext4");
    let rw = test_disk(&tmp.0, "rw.ext4");
    let before = std::fs::read(&ro).unwrap();
    let script = r#"
echo "@@vda_ro=$(cat /sys/block/vda/ro)"
echo "@@vdb_ro=$(cat /sys/block/vdb/ro)"
# Raw writes to the read-only disk must fail; the driver refuses them.
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; then echo "@@raw_write=ok"; else echo "@@raw_write=refused"; fi
mount -t ext4 -o ro /dev/vda /mnt && echo "@@vda_hello=$(cat /mnt/hello.txt)"
umount /mnt
mount -t ext4 /dev/vdb /mnt && echo "second disk" > /mnt/second.txt && sync && echo "@@vdb_hello=$(cat /mnt/hello.txt)"
umount /mnt
poweroff -f
"#;
    let initrd = guest_initrd(&tmp.0, &[modules::VIRTIO_MMIO, modules::BLOCK], script);
    let (exit, text) = run_guest(vm(initrd).block(&ro, true).block(&rw, false), |_| {});
    assert_eq!(exit, ExitReason::Shutdown, "console:\n{text}");
    assert_eq!(fact(&text, "vda_ro"), "1");
    assert_eq!(fact(&text, "vdb_ro"), "0");
    assert_eq!(fact(&text, "raw_write"), "refused");
    assert_eq!(fact(&text, "vda_hello"), HELLO);
    assert_eq!(fact(&text, "vdb_hello"), HELLO);
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        before,
        "the read-only image changed"
    );
    let second = std::fs::read(&rw).unwrap();
    assert!(second.windows(11).any(|w| w == b"second disk"));
}

#[test]
fn a_rate_limited_disk_holds_the_guest_to_its_bandwidth() {
    use dormouse::builder::BlockConfig;
    use dormouse::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

    const RATE: u64 = 1 << 20;
    const READ: u64 = 4 << 20;
    let tmp = TempDir::new("blk-limited");
    let disk = test_disk(&tmp.0, "disk.ext4");
    let script = format!(
        r#"
echo 3 > /proc/sys/vm/drop_caches
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/vda of=/dev/null bs=64k count={count} 2>/dev/null && t1=$(cut -d' ' -f1 /proc/uptime) && echo "@@dd_read=$t0 $t1"
poweroff -f
"#,
        count = READ / (64 << 10)
    );
    let initrd = guest_initrd(&tmp.0, &[modules::VIRTIO_MMIO, modules::BLOCK], &script);
    // 1 MiB/s, 100 KiB at once.
    let limits = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig::new(RATE / 10, 100)),
        ops: None,
    };
    let builder = vm(initrd).block_with(BlockConfig::new(&disk).rate_limiter(limits));
    let (exit, text) = run_guest(builder, |_| {});
    assert_eq!(exit, ExitReason::Shutdown, "console:\n{text}");
    let line = fact(&text, "dd_read");
    let times: Vec<f64> = line
        .split_whitespace()
        .map(|f| f.parse().unwrap_or_else(|_| panic!("dd_read: {line}")))
        .collect();
    let [t0, t1] = times[..] else {
        panic!("dd_read: {line}")
    };
    let secs = t1 - t0;
    // Boot spent part of the bucket; what the guest read beyond the
    // remaining 100 KiB came at 1 MiB/s at most. (A slow emulated host
    // only makes it slower, so there is no upper bound.)
    #[allow(clippy::cast_precision_loss)]
    let least = (READ - RATE / 10) as f64 / RATE as f64;
    #[allow(clippy::cast_precision_loss)]
    let achieved = READ as f64 / 1048576.0 / secs.max(0.01);
    common::report(&format!(
        "virtio-blk limited to 1 MiB/s: guest dd read 4 MiB in {secs:.2} s = {achieved:.2} MiB/s"
    ));
    assert!(
        secs >= least - 0.3,
        "4 MiB read in {secs:.2} s through a 1 MiB/s limit"
    );
}

#[test]
fn rate_limits_and_their_budgets_survive_a_snapshot() {
    use dormouse::builder::BlockConfig;
    use dormouse::rate_limiter::{RateLimiterConfig, TokenBucketConfig, MAX_REFILL_TIME_MS};
    use dormouse::snapshot::{read_state, SavedDevice};

    let tmp = TempDir::new("blk-limits-snap");
    let disk = test_disk(&tmp.0, "disk.ext4");
    // 16 MiB and 1000 requests a day, and 1000 more requests once: the
    // boot and the reads below spend some, and the refill is too slow to
    // matter during the test.
    let limits = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig::new(16 << 20, MAX_REFILL_TIME_MS)),
        ops: Some(TokenBucketConfig::new(1000, MAX_REFILL_TIME_MS).with_one_time_burst(1000)),
    };
    let script =
        "dd if=/dev/vda of=/dev/null bs=64k count=8 2>/dev/null\necho @@ready=yes\nread line\n";
    let initrd = guest_initrd(&tmp.0, &[modules::VIRTIO_MMIO, modules::BLOCK], script);
    let (session, input) = common::Session::new();
    let mut vm = vm(initrd)
        .block_with(BlockConfig::new(&disk).rate_limiter(limits))
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    vm.start().unwrap();
    session.wait_fact("ready", std::time::Duration::from_secs(600));
    vm.pause().unwrap();
    let first = tmp.0.join("first");
    vm.snapshot(&first).unwrap();
    drop(vm);

    let state = read_state(&first).unwrap();
    assert!(
        matches!(&state.config.devices[..], [SavedDevice::Block { rate_limiter, .. }] if *rate_limiter == limits),
        "{:?}",
        state.config.devices
    );
    let saved = state.virtio[0].rate_limiters[0];
    let (bandwidth, ops) = (saved.bandwidth.unwrap(), saved.ops.unwrap());
    // The guest read at least 512 KiB, in requests from the burst first.
    assert!(bandwidth.budget <= (16 << 20) - (512 << 10), "{saved:?}");
    assert_eq!(ops.budget, 1000, "{saved:?}");
    assert!(ops.one_time_burst < 1000, "{saved:?}");

    // A restored VM carries the limits and the budgets on.
    let mut restored = MicroVm::restore(&first)
        .block_path(0, &disk)
        .build()
        .unwrap();
    let second = tmp.0.join("second");
    restored.snapshot(&second).unwrap();
    let again = read_state(&second).unwrap();
    assert_eq!(again.config.devices, state.config.devices);
    let resaved = again.virtio[0].rate_limiters[0];
    assert_eq!(resaved.ops, saved.ops);
    // At most the few bytes a day-long refill earns in the meantime.
    let earned = resaved.bandwidth.unwrap().budget - bandwidth.budget;
    assert!((0..4096).contains(&earned), "{saved:?} then {resaved:?}");
}

#[test]
fn a_missing_disk_image_is_a_clear_error() {
    let e = MicroVm::builder()
        .kernel(guest_assets().kernel)
        .block("/nonexistent/disk.img", false)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            dormouse::Error::Device(dormouse::device_manager::DeviceError::Block(_))
        ),
        "{e:?}"
    );
}

/// A session on a disk: mount it, then run what the console says.
const LAYERED_SESSION: &str = r#"
mount -t ext4 /dev/vda /mnt && echo "@@mounted=yes"
echo @@ready=yes
while read cmd arg; do
  case "$cmd" in
    run) eval "$arg" ;;
    off) poweroff -f;;
  esac
done
"#;

/// What `cat` prints for a file the guest does not have.
const ABSENT: &str = "absent";

/// `/mnt/hello.txt|/mnt/<name>` as the guest reads them from the disk
/// (page cache dropped first).
fn layered_files(session: &mut common::Session, tag: &str, name: &str) -> String {
    session.run(&format!(
        "sync; echo 3 > /proc/sys/vm/drop_caches; echo \"@@{tag}=$(cat /mnt/hello.txt)|$(cat /mnt/{name} 2>/dev/null || echo {ABSENT})\""
    ));
    session.wait_fact(tag, std::time::Duration::from_secs(120))
}

#[test]
fn a_layered_disk_leaves_its_base_alone_and_its_top_freezes_with_snapshot_diff() {
    use dormouse::builder::{BlockConfig, DiskLayers};
    use dormouse::devices::virtio::block::map_path;

    let ten_minutes = std::time::Duration::from_secs(600);
    let minute = std::time::Duration::from_secs(60);
    let tmp = TempDir::new("blk-layered");
    let base = test_disk(&tmp.0, "base.ext4");
    let base_before = std::fs::read(&base).unwrap();
    let marker = format!("layered-{}", std::process::id());
    let initrd = guest_initrd(
        &tmp.0,
        &[modules::VIRTIO_MMIO, modules::BLOCK],
        LAYERED_SESSION,
    );

    // A session on the base with a fresh top: the top is created, sparse.
    let top1 = tmp.0.join("top1");
    let (mut session, input) = common::Session::new();
    let mut vm = vm(initrd.clone())
        .dirty_tracking(true)
        .block_with(BlockConfig::layered(DiskLayers::new(&base, &top1)))
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    vm.start().unwrap();
    session.wait_fact("ready", ten_minutes);
    assert_eq!(session.wait_fact("mounted", minute), "yes");
    vm.pause().unwrap();
    let full = tmp.0.join("s0");
    // A top whose map cannot be written fails the snapshot, which writes
    // nothing; the VM can still be snapshotted once that is fixed.
    let blocker = tmp.0.join("top1.map.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let err = vm.snapshot(&full).unwrap_err();
    assert!(
        matches!(
            err,
            dormouse::Error::Snapshot(dormouse::snapshot::SnapshotError::Backend { device: 0, .. })
        ),
        "{err:?}"
    );
    assert!(!full.exists() && !map_path(&top1).exists());
    std::fs::remove_dir(&blocker).unwrap();
    vm.snapshot(&full).unwrap();
    assert!(map_path(&top1).exists(), "the snapshot wrote the top's map");
    vm.resume().unwrap();
    session.run(&format!(
        "echo {marker} > /mnt/new.txt; sync; echo @@synced=yes"
    ));
    assert_eq!(session.wait_fact("synced", minute), "yes");
    assert_eq!(
        layered_files(&mut session, "before", "new.txt"),
        format!("{HELLO}|{marker}")
    );
    vm.pause().unwrap();
    let diff = tmp.0.join("s1");
    vm.snapshot_diff(&diff).unwrap();
    drop(vm);
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base image changed"
    );
    let top_bytes = std::fs::read(&top1).unwrap();
    assert_eq!(top_bytes.len(), base_before.len());
    assert!(
        top_bytes
            .windows(marker.len())
            .any(|w| w == marker.as_bytes()),
        "the guest's file is not in the top"
    );

    // Suspended: the top and its map become a frozen layer of the diff.
    let frozen = diff.join("disk.layer");
    std::fs::rename(&top1, &frozen).unwrap();
    std::fs::rename(map_path(&top1), map_path(&frozen)).unwrap();
    let frozen_before = std::fs::read(&frozen).unwrap();

    // Resumed on [base, frozen] + a new top: both files are there.
    let (mut resumed, input) = common::Session::new();
    let mut vm = MicroVm::restore_chain([full, diff])
        .block_layers(0, DiskLayers::new(&base, tmp.0.join("top2")).layer(&frozen))
        .serial_output(resumed.console.clone())
        .serial_input(input)
        .resume(true)
        .build()
        .unwrap();
    assert_eq!(
        layered_files(&mut resumed, "after", "new.txt"),
        format!("{HELLO}|{marker}")
    );
    resumed.run("echo more > /mnt/more.txt; sync; echo @@synced2=yes");
    assert_eq!(resumed.wait_fact("synced2", minute), "yes");

    // Meanwhile a second session on the same base, with an empty top,
    // does not see the first one's file.
    let (mut other, input) = common::Session::new();
    let mut second = self::vm(initrd)
        .block_with(BlockConfig::layered(DiskLayers::new(
            &base,
            tmp.0.join("top3"),
        )))
        .serial_output(other.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    second.start().unwrap();
    other.wait_fact("ready", ten_minutes);
    assert_eq!(
        layered_files(&mut other, "other", "new.txt"),
        format!("{HELLO}|{ABSENT}")
    );
    for (session, vm) in [(&mut resumed, &mut vm), (&mut other, &mut second)] {
        session.send("off");
        assert_eq!(vm.wait().unwrap(), ExitReason::Shutdown);
    }
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base image changed"
    );
    assert!(
        std::fs::read(&frozen).unwrap() == frozen_before,
        "the frozen layer changed"
    );
}
