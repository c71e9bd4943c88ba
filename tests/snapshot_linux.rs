//! Snapshots of a real Linux session: a process keeps a counter, files live
//! in tmpfs, devices carry data; the VM is snapshotted and restored (in a
//! fresh process, and as clones) and everything carries on.
#![cfg(target_arch = "aarch64")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{guest_assets, guest_initrd, modules, Session, TempDir};
use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::{ExitReason, MicroVm};

const MINUTE: Duration = Duration::from_secs(60);

/// The session: a counting process, a tmpfs file, and a command loop on the
/// console (`report TAG` prints the session's facts as `@@TAG=...`).
const SESSION: &str = r#"
mount -t tmpfs tmpfs /tmp
echo "note-$(cat /proc/sys/kernel/random/uuid)" > /tmp/note
(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done) &
CPID=$!
echo @@ready=yes
while read cmd arg; do
  case "$cmd" in
    report) echo "@@$arg=pid:$(cut -d' ' -f1 /proc/$CPID/stat 2>/dev/null) counter:$(cat /tmp/counter) note:$(cat /tmp/note) uptime:$(cut -d' ' -f1 /proc/uptime) cpus:$(grep -c ^processor /proc/cpuinfo)";;
    run) eval "$arg" ;;
    off) poweroff -f;;
  esac
done
"#;

/// The facts of one report, by name.
fn parse_report(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(report: &HashMap<String, String>, key: &str) -> f64 {
    report[key]
        .parse()
        .unwrap_or_else(|_| panic!("{key} in {report:?}"))
}

const CHILD_ENV: &str = "DORMOUSE_SNAPSHOT_CHILD";

/// The child process: restores the snapshot, asks for two reports a second
/// apart, powers the guest off, and prints the reports for the parent.
fn child(dir: &Path) {
    let (mut session, input) = Session::new();
    let mut vm = MicroVm::restore(dir)
        .serial_output(session.console.clone())
        .serial_input(input)
        .resume(true)
        .build()
        .expect("restoring in the child process");
    session.send("report after1");
    let r2 = session.wait_fact("after1", MINUTE);
    std::thread::sleep(Duration::from_secs(1));
    session.send("report after2");
    let r3 = session.wait_fact("after2", MINUTE);
    session.send("off");
    assert_eq!(vm.wait().unwrap(), ExitReason::Shutdown);
    println!("CHILD-REPORT after1 {r2}");
    println!("CHILD-REPORT after2 {r3}");
}

fn session_survives_restore_in_a_new_process(test_name: &str, vcpus: u32) {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        return child(Path::new(&dir));
    }
    let tmp = TempDir::new(&format!("snap-session{vcpus}"));
    let dir = tmp.0.join("snap");
    let initrd = guest_initrd(&tmp.0, &[], SESSION);
    let (mut session, input) = Session::new();
    let mut vm = MicroVm::builder()
        .vcpus(vcpus)
        .memory_mib(256)
        .kernel(guest_assets().kernel)
        .initrd(&initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    vm.start().unwrap();
    session.wait_fact("ready", 10 * MINUTE);
    std::thread::sleep(Duration::from_secs(1));
    session.send("report before");
    let before = parse_report(&session.wait_fact("before", MINUTE));
    vm.pause().unwrap();
    vm.snapshot(&dir).unwrap();
    drop(vm);

    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let child_report = |tag: &str| {
        let prefix = format!("CHILD-REPORT {tag} ");
        // libtest may print "test <name> ... " on the same line first.
        let line = stdout
            .lines()
            .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("no {tag} report from the child:\n{stdout}"));
        parse_report(line)
    };
    let (after1, after2) = (child_report("after1"), child_report("after2"));

    // The same process, still alive, with its tmpfs file.
    assert_eq!(after1["pid"], before["pid"], "{before:?} / {after1:?}");
    assert_eq!(after2["pid"], before["pid"]);
    assert_eq!(after1["note"], before["note"]);
    assert_eq!(after1["cpus"], vcpus.to_string());
    // The counter continues from where it was, and keeps counting.
    assert!(num(&after1, "counter") >= num(&before, "counter"));
    assert!(num(&after2, "counter") > num(&after1, "counter"));
    // Guest time continues rather than restarting (a fresh boot would
    // read a few seconds at most, and time would not go backwards).
    assert!(num(&after1, "uptime") >= num(&before, "uptime"));
    assert!(num(&after2, "uptime") > num(&after1, "uptime"));
}

#[test]
fn a_session_survives_restore_in_a_new_process_1_vcpu() {
    session_survives_restore_in_a_new_process(
        "a_session_survives_restore_in_a_new_process_1_vcpu",
        1,
    );
}

#[test]
fn a_session_survives_restore_in_a_new_process_2_vcpus() {
    session_survives_restore_in_a_new_process(
        "a_session_survives_restore_in_a_new_process_2_vcpus",
        2,
    );
}

fn vsock_tool() -> Vec<u8> {
    let path = std::env::var_os("DORMOUSE_GUEST_VSOCK_TOOL")
        .expect("DORMOUSE_GUEST_VSOCK_TOOL is not set: run the tests with `cargo xtask test`");
    std::fs::read(path).unwrap()
}

/// An initrd with the session, the vsock tool, and the block and vsock
/// drivers loaded.
fn device_initrd(dir: &Path, extra_modules: &[&[&str]], script: &str) -> PathBuf {
    let mut mods = vec![modules::VIRTIO_MMIO, modules::BLOCK, modules::VSOCK];
    mods.extend_from_slice(extra_modules);
    let path = guest_initrd(dir, &mods, script);
    let mut cpio = std::fs::read(&path).unwrap();
    let mut extra = common::initramfs::Initramfs::new();
    extra.file("bin/guest_vsock", 0o755, &vsock_tool());
    let extra_path = extra.write_to(dir, "tool.cpio").unwrap();
    cpio.extend_from_slice(&std::fs::read(extra_path).unwrap());
    std::fs::write(&path, cpio).unwrap();
    path
}

fn test_disk(dir: &Path, name: &str) -> PathBuf {
    let src = std::env::var_os("DORMOUSE_TEST_DISK").expect("DORMOUSE_TEST_DISK");
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap();
    dst
}

/// Sends `msg` through the guest's vsock echo server on port 5000.
fn vsock_echo(uds: &Path, msg: &[u8]) -> Vec<u8> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(uds).unwrap();
    stream.set_read_timeout(Some(MINUTE)).unwrap();
    stream.write_all(b"CONNECT 5000\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "handshake: {line:?}");
    stream.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).unwrap();
    back
}

const DEVICE_SESSION: &str = r#"
mount -t ext4 /dev/vda /mnt
guest_vsock echo-server 5000 &
"#;

#[test]
fn devices_carry_on_across_restore() {
    use std::os::fd::AsFd;

    use dormouse::devices::virtio::net::TapConfig;

    let tmp = TempDir::new("snap-devices");
    let dir = tmp.0.join("snap");
    let disk = test_disk(&tmp.0, "disk.ext4");
    let uds = tmp.0.join("v.sock");
    // The test keeps the TAP open, so the interface (and its address)
    // outlives the first VM; each VM gets its own handle to it.
    let tap = common::isolated_tap("dmtap1", "10.201.0.1/24");
    let tap_fd = || TapConfig::Fd(tap.as_fd().try_clone_to_owned().unwrap());
    let net_setup = "ip addr add 10.201.0.2/24 dev eth0\nip link set eth0 up\n";
    let initrd = device_initrd(
        &tmp.0,
        &[modules::NET],
        &format!("{DEVICE_SESSION}{net_setup}{SESSION}"),
    );
    let (mut session, input) = Session::new();
    let mut vm = MicroVm::builder()
        .memory_mib(256)
        .kernel(guest_assets().kernel)
        .initrd(&initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
        .block(&disk, false)
        .net(tap_fd())
        .vsock(3, &uds)
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    vm.start().unwrap();
    session.wait_fact("ready", 10 * MINUTE);
    session.run("ping -c 1 -W 5 10.201.0.1 >/dev/null && echo @@ping1=ok");
    assert_eq!(session.wait_fact("ping1", MINUTE), "ok");
    session.run("echo written-before-the-snapshot > /mnt/before.txt; sync; echo @@synced=yes");
    session.wait_fact("synced", MINUTE);
    assert_eq!(vsock_echo(&uds, b"before"), b"before");
    vm.pause().unwrap();
    vm.snapshot(&dir).unwrap();
    drop(vm);

    let (mut session, input) = Session::new();
    let mut vm = MicroVm::restore(&dir)
        .serial_output(session.console.clone())
        .serial_input(input)
        .block_path(0, &disk)
        .tap(0, tap_fd())
        .vsock_uds(&uds)
        .resume(true)
        .build()
        .unwrap();
    session.run("echo \"@@before=$(cat /mnt/before.txt)\"");
    assert_eq!(
        session.wait_fact("before", MINUTE),
        "written-before-the-snapshot"
    );
    session.run("echo written-after > /mnt/after.txt; sync; echo @@synced2=yes");
    session.wait_fact("synced2", MINUTE);
    // A new vsock connection after the restore (the device reset the old
    // ones; the guest's listener survived).
    assert_eq!(vsock_echo(&uds, b"after the restore"), b"after the restore");
    // The network works after the restore.
    session.run("ping -c 1 -W 5 10.201.0.1 >/dev/null && echo @@ping2=ok");
    assert_eq!(session.wait_fact("ping2", MINUTE), "ok");
    session.send("off");
    assert_eq!(vm.wait().unwrap(), ExitReason::Shutdown);
    let image = std::fs::read(&disk).unwrap();
    assert!(image.windows(13).any(|w| w == b"written-after"));
}

#[test]
fn three_clones_run_side_by_side_from_one_snapshot() {
    let tmp = TempDir::new("snap-clones");
    let dir = tmp.0.join("snap");
    let disk = test_disk(&tmp.0, "disk.ext4");
    let initrd = device_initrd(&tmp.0, &[], &format!("{DEVICE_SESSION}{SESSION}"));
    let (session, input) = Session::new();
    let mut vm = MicroVm::builder()
        .memory_mib(256)
        .kernel(guest_assets().kernel)
        .initrd(&initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
        .block(&disk, false)
        .vsock(3, tmp.0.join("origin.sock"))
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    vm.start().unwrap();
    session.wait_fact("ready", 10 * MINUTE);
    vm.pause().unwrap();
    vm.snapshot(&dir).unwrap();
    drop(vm);

    let mut clones = Vec::new();
    for n in 0..3 {
        let copy = tmp.0.join(format!("clone{n}.ext4"));
        std::fs::copy(&disk, &copy).unwrap();
        let uds = tmp.0.join(format!("clone{n}.sock"));
        let (session, input) = Session::new();
        let vm = MicroVm::restore(&dir)
            .serial_output(session.console.clone())
            .serial_input(input)
            .block_path(0, &copy)
            .vsock_uds(&uds)
            .resume(true)
            .build()
            .unwrap();
        clones.push((vm, session, copy, uds));
    }
    for (n, (_, session, _, uds)) in clones.iter_mut().enumerate() {
        session.run(&format!(
            "echo clone-{n}-was-here > /mnt/clone.txt; sync; echo @@wrote=yes"
        ));
        session.wait_fact("wrote", MINUTE);
        let msg = format!("hello clone {n}");
        assert_eq!(vsock_echo(uds, msg.as_bytes()), msg.as_bytes());
    }
    for (vm, session, copy, _) in clones.iter_mut() {
        session.send("off");
        assert_eq!(vm.wait().unwrap(), ExitReason::Shutdown);
        let _ = copy;
    }
    for (n, (_, _, copy, _)) in clones.iter().enumerate() {
        let image = std::fs::read(copy).unwrap();
        let mine = format!("clone-{n}-was-here");
        assert!(
            image.windows(mine.len()).any(|w| w == mine.as_bytes()),
            "clone {n}"
        );
        for other in (0..3).filter(|o| *o != n) {
            let theirs = format!("clone-{other}-was-here");
            assert!(!image.windows(theirs.len()).any(|w| w == theirs.as_bytes()));
        }
    }
    // The snapshot's own disk was never written by a clone.
    let origin = std::fs::read(&disk).unwrap();
    assert!(!origin.windows(10).any(|w| w == b"-was-here\n"));
}

#[test]
fn diffs_of_a_busy_guest_restore_memory_byte_identical_to_a_full_snapshot() {
    let tmp = TempDir::new("snap-diffs");
    let disk = test_disk(&tmp.0, "disk.ext4");
    let initrd = guest_initrd(
        &tmp.0,
        &[modules::VIRTIO_MMIO, modules::BLOCK],
        &format!("mount -t ext4 -o ro /dev/vda /mnt\n{SESSION}"),
    );
    let (mut session, input) = Session::new();
    let mut vm = MicroVm::builder()
        .memory_mib(256)
        .dirty_tracking(true)
        .kernel(guest_assets().kernel)
        .initrd(&initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
        .block(&disk, true)
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    vm.start().unwrap();
    session.wait_fact("ready", 10 * MINUTE);
    let base = tmp.0.join("base");
    vm.pause().unwrap();
    vm.snapshot(&base).unwrap();

    let mut chain = vec![base];
    let full = tmp.0.join("full");
    for round in 1..=3 {
        vm.resume().unwrap();
        // Changing patterns into tmpfs (guest writes), and a file read back
        // from the disk after dropping the page cache: virtio-blk writes
        // it into guest memory (VMM writes, which KVM's log never sees).
        session.run(&format!(
            "dd if=/dev/urandom of=/tmp/work{round} bs=64k count=32 2>/dev/null; \
             sync; echo 3 > /proc/sys/vm/drop_caches; cat /mnt/hello.txt > /tmp/hello{round}; \
             echo @@round{round}=$(cat /tmp/hello{round})"
        ));
        assert_eq!(
            session.wait_fact(&format!("round{round}"), MINUTE),
            "hello from the x86 side"
        );
        vm.pause().unwrap();
        let diff = tmp.0.join(format!("diff{round}"));
        let info = vm.snapshot_diff(&diff).unwrap();
        assert!(
            info.memory_bytes < 64 << 20,
            "diff {round} wrote {} bytes of 256 MiB",
            info.memory_bytes
        );
        chain.push(diff);
    }
    vm.snapshot(&full).unwrap();
    drop(vm);
    let full_memory = full.join(dormouse::snapshot::MEMORY_FILE);

    // From the chain: the same memory, and the guest carries on.
    let (mut session, input) = Session::new();
    let mut restored = MicroVm::restore_chain(chain.clone())
        // The snapshot's own disk, which this test made: consent given.
        .reuse_saved_paths(true)
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    common::assert_memory_equals_file(&restored, &full_memory);
    restored.resume().unwrap();
    session.send("report after");
    let after = parse_report(&session.wait_fact("after", MINUTE));
    assert!(num(&after, "counter") > 0.0);
    session.run("echo @@kept=$(cat /tmp/hello3)");
    assert_eq!(session.wait_fact("kept", MINUTE), "hello from the x86 side");
    session.send("off");
    assert_eq!(restored.wait().unwrap(), ExitReason::Shutdown);

    // Merged into one full snapshot: the same memory file.
    let merged = tmp.0.join("merged");
    dormouse::snapshot::merge(&chain, &merged).unwrap();
    let a = std::fs::read(merged.join(dormouse::snapshot::MEMORY_FILE)).unwrap();
    let b = std::fs::read(&full_memory).unwrap();
    assert!(a == b, "the merged memory differs from the full snapshot's");
}
