//! Fault injection on a running Linux guest (issue 13, "Faults"): each test
//! boots a real guest, breaks one thing under it, and checks both the
//! documented outcome and that nothing the guest holds was lost, by the
//! guest's own account (a counting process, a note in tmpfs, files on a
//! disk), and that the VM runs on.
//!
//! The outcomes, one test each:
//! - the block backing file returns EIO: the guest's requests on that disk
//!   fail with an I/O error, the VM and its other disk run on;
//! - the TAP is deleted: the interface moves no more frames (one error in
//!   the log), nothing spins, the VM runs on and a restore onto a new TAP
//!   networks again;
//! - the vsock host peer is SIGKILLed mid-stream: the guest's side ends,
//!   the next connection to the port moves its bytes intact;
//! - the VMM process is SIGKILLed while it writes a snapshot: that
//!   snapshot does not exist, restoring it is an error, the previous one
//!   restores the guest exactly;
//! - the memory file of a restored VM is written under it: see
//!   [`fault_memory_file_written_under_a_restored_vm`].
//!
//! ENOSPC in the middle of a full snapshot and of a diff is
//! tests/snapshot_enospc.rs.
//!
//! Runs as root in the emulated host (mounts, TAPs, ioctls):
//! `cargo xtask test --emulated-only -- fault_`.
#![cfg(target_arch = "aarch64")]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest_assets, guest_initrd, host_busybox, modules, Session, TempDir};
use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::devices::virtio::net::{Tap, TapConfig};
use dormouse::snapshot::SnapshotError;
use dormouse::{Error, ExitReason, MicroVm, VmState};

const MINUTE: Duration = Duration::from_secs(60);
const BOOT: Duration = Duration::from_secs(600);

/// The guest's life: a counting process, a note in tmpfs, and a command
/// loop on the console (`report TAG` prints the facts as `@@TAG=...`).
const SESSION: &str = r#"
mount -t tmpfs tmpfs /tmp
echo "note-$(cat /proc/sys/kernel/random/uuid)" > /tmp/note
(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done) &
CPID=$!
echo @@ready=yes
while read cmd arg; do
  case "$cmd" in
    report) echo "@@$arg=pid:$(cut -d' ' -f1 /proc/$CPID/stat 2>/dev/null) counter:$(cat /tmp/counter) note:$(cat /tmp/note)";;
    run) eval "$arg" ;;
    off) poweroff -f;;
  esac
done
"#;

/// Reports the runtime of a test when dropped.
struct Timed(&'static str, Instant);

impl Drop for Timed {
    fn drop(&mut self) {
        common::report(&format!(
            "{}: {:.1} s",
            self.0,
            self.1.elapsed().as_secs_f64()
        ));
    }
}

/// Starts a test: dormouse's log on stderr (RUST_LOG), and its timer.
fn start(name: &'static str) -> Timed {
    common::init_logging();
    Timed(name, Instant::now())
}

/// The facts of one report, by name.
type Facts = HashMap<String, String>;

fn parse_report(line: &str) -> Facts {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn report(session: &mut Session, tag: &str) -> Facts {
    session.send(&format!("report {tag}"));
    parse_report(&session.wait_fact(tag, MINUTE))
}

fn counter(facts: &Facts) -> u64 {
    facts["counter"]
        .parse()
        .unwrap_or_else(|_| panic!("counter in {facts:?}"))
}

/// Asserts that `after` is the same guest as `before`, its counter
/// continued (the process lived, its memory kept), and it still counts.
fn assert_same_guest(session: &mut Session, before: &Facts, tag: &str) {
    let after = report(session, tag);
    assert_eq!(after["pid"], before["pid"], "{before:?} / {after:?}");
    assert_eq!(after["note"], before["note"], "{before:?} / {after:?}");
    assert!(counter(&after) >= counter(before), "{before:?} / {after:?}");
    std::thread::sleep(Duration::from_millis(500));
    let later = report(session, &format!("{tag}_later"));
    assert!(counter(&later) > counter(&after), "{after:?} / {later:?}");
}

/// Runs `command` in the guest and returns what it printed as `@@tag=`.
fn ask(session: &mut Session, tag: &str, command: &str) -> String {
    session.run(&format!("echo \"@@{tag}=$({command})\""));
    session.wait_fact(tag, MINUTE)
}

fn test_disk(dir: &Path, name: &str) -> PathBuf {
    let src = std::env::var_os("DORMOUSE_TEST_DISK").expect("DORMOUSE_TEST_DISK");
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap();
    dst
}

/// An initramfs with the modules, `guest_vsock`, and `script`.
fn initrd_with_tool(dir: &Path, mods: &[&[&str]], script: &str) -> PathBuf {
    let path = guest_initrd(dir, mods, script);
    let mut cpio = std::fs::read(&path).unwrap();
    let tool = std::env::var_os("DORMOUSE_GUEST_VSOCK_TOOL").expect("DORMOUSE_GUEST_VSOCK_TOOL");
    let mut extra = common::initramfs::Initramfs::new();
    extra.file("bin/guest_vsock", 0o755, &std::fs::read(tool).unwrap());
    let extra = extra.write_to(dir, "tool.cpio").unwrap();
    cpio.extend_from_slice(&std::fs::read(extra).unwrap());
    std::fs::write(&path, cpio).unwrap();
    path
}

fn builder(initrd: &Path) -> dormouse::MicroVmBuilder {
    MicroVm::builder()
        .memory_mib(256)
        .kernel(guest_assets().kernel)
        .initrd(initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
}

/// Boots `builder` with a console session and waits for the guest.
fn boot(builder: dormouse::MicroVmBuilder) -> (MicroVm, Session) {
    let (session, input) = Session::new();
    let mut vm = builder
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .expect("building the VM");
    vm.start().unwrap();
    session.wait_fact("ready", BOOT);
    (vm, session)
}

/// Powers the guest off and checks it ended as asked.
fn power_off(mut vm: MicroVm, mut session: Session) {
    session.send("off");
    assert_eq!(vm.wait().unwrap(), ExitReason::Shutdown);
}

// ---------------------------------------------------------------------
// 1. The block backing file returns EIO.

/// `_IOR('X', 125, __u32)`: shuts an ext4 filesystem down; from then on
/// every read, write and fsync of its files fails with EIO.
const EXT4_IOC_SHUTDOWN: u32 = 0x8004_587d;
/// Shut down without flushing the journal.
const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;

/// An ext4 image loop-mounted in the host, unmounted on drop.
struct LoopMount(PathBuf);

impl LoopMount {
    fn new(image: &Path, at: PathBuf) -> Self {
        // The loop driver, from the same kernel's modules (loaded or built
        // in is fine: then insmod fails and mount works anyway).
        let modules = std::env::var_os("DORMOUSE_GUEST_MODULES").expect("DORMOUSE_GUEST_MODULES");
        let ko = Path::new(&modules).join("kernel/drivers/block/loop.ko");
        let bb = std::env::var_os("DORMOUSE_GUEST_BUSYBOX").expect("DORMOUSE_GUEST_BUSYBOX");
        let _ = Command::new(&bb).arg("insmod").arg(&ko).status();
        std::fs::create_dir_all(&at).unwrap();
        host_busybox(&[
            "mount",
            "-t",
            "ext4",
            "-o",
            "loop",
            image.to_str().unwrap(),
            at.to_str().unwrap(),
        ]);
        Self(at)
    }

    /// Breaks the filesystem: every I/O on its files now fails with EIO.
    fn shut_down(&self) {
        use std::os::fd::AsRawFd;
        let dir = std::fs::File::open(&self.0).unwrap();
        let flags: u32 = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: EXT4_IOC_SHUTDOWN reads one u32 through the pointer,
        // which points at `flags`, alive for the call; `dir` is open.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_SHUTDOWN as _, &flags) };
        assert_eq!(
            rc,
            0,
            "EXT4_IOC_SHUTDOWN: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// 4 MiB with a recognisable start, for the disk that will break.
fn pattern_disk(path: &Path) {
    let mut data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(7) ^ (i >> 12)).to_le_bytes()[0])
        .collect();
    data[..11].copy_from_slice(b"vdb-pattern");
    std::fs::write(path, data).unwrap();
}

/// The block backing file starts failing every read and write with EIO
/// (the ext4 filesystem it lives on, loop-mounted in the host, is shut
/// down). Documented outcome: the guest's reads and writes of that disk
/// fail with an I/O error (the device answers `VIRTIO_BLK_S_IOERR`; the
/// guest's dmesg logs "I/O error"), and nothing else changes: the VM keeps
/// running, the second disk reads and writes, the guest's processes and
/// files are as they were, and it pauses and snapshots; restored with the
/// broken disk replaced by a good copy, the guest reads the same bytes it
/// read before the fault.
#[test]
fn fault_block_backing_file_returns_eio() {
    let _timed = start("fault_block_backing_file_returns_eio");
    let tmp = TempDir::new("fault-eio");
    let healthy = test_disk(&tmp.0, "healthy.ext4");
    let fs_image = test_disk(&tmp.0, "fs.ext4");
    let mount = LoopMount::new(&fs_image, tmp.0.join("fs"));
    let breaking = mount.0.join("vdb.raw");
    pattern_disk(&breaking);
    let pristine = tmp.0.join("vdb-copy.raw");
    std::fs::copy(&breaking, &pristine).unwrap();

    let initrd = guest_initrd(
        &tmp.0,
        &[modules::VIRTIO_MMIO, modules::BLOCK],
        &format!("mount -t ext4 /dev/vda /mnt\n{SESSION}"),
    );
    let (mut vm, mut session) = boot(
        builder(&initrd)
            .block(&healthy, false)
            .block(&breaking, false),
    );
    session.run("echo state-before > /mnt/state.txt; sync; echo @@synced=yes");
    session.wait_fact("synced", MINUTE);
    let vdb_sum = "dd if=/dev/vdb bs=64k 2>/dev/null | md5sum | cut -d' ' -f1";
    assert_eq!(
        ask(&mut session, "magic", "head -c 11 /dev/vdb"),
        "vdb-pattern"
    );
    let sum_before = ask(&mut session, "sum1", vdb_sum);
    let before = report(&mut session, "before");

    mount.shut_down();
    session.run(
        "echo 3 > /proc/sys/vm/drop_caches; \
         if dd if=/dev/vdb of=/dev/null bs=4k count=16 2>/dev/null; then echo @@read=ok; else echo @@read=failed; fi",
    );
    assert_eq!(session.wait_fact("read", MINUTE), "failed");
    session.run(
        "if dd if=/dev/zero of=/dev/vdb bs=4k count=1 conv=fsync 2>/dev/null; then echo @@write=ok; else echo @@write=failed; fi",
    );
    assert_eq!(session.wait_fact("write", MINUTE), "failed");
    let errors: u32 = ask(&mut session, "ioerrors", "dmesg | grep -c 'I/O error'")
        .parse()
        .unwrap();
    assert!(errors > 0, "the guest logged no I/O error");
    // The other disk, the guest's processes and memory: all there.
    session.run(
        "echo state-after > /mnt/after.txt; sync; echo 3 > /proc/sys/vm/drop_caches; \
         echo @@healthy=$(cat /mnt/state.txt),$(cat /mnt/after.txt)",
    );
    assert_eq!(
        session.wait_fact("healthy", MINUTE),
        "state-before,state-after"
    );
    assert_same_guest(&mut session, &before, "after");
    assert_eq!(vm.state(), VmState::Running);

    vm.pause().unwrap();
    let snap = tmp.0.join("snap");
    vm.snapshot(&snap).unwrap();
    drop(vm);
    drop(mount);

    // The broken disk replaced by a good copy: the same bytes as before.
    let (mut session, input) = Session::new();
    let restored = MicroVm::restore(&snap)
        .block_path(0, &healthy)
        .block_path(1, &pristine)
        .serial_output(session.console.clone())
        .serial_input(input)
        .resume(true)
        .build()
        .unwrap();
    session.run("echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(ask(&mut session, "sum2", vdb_sum), sum_before);
    assert_eq!(
        ask(
            &mut session,
            "files",
            "echo $(cat /mnt/state.txt),$(cat /mnt/after.txt)"
        ),
        "state-before,state-after"
    );
    assert_same_guest(&mut session, &before, "restored");
    power_off(restored, session);
}

// ---------------------------------------------------------------------
// 2. The TAP goes away.

/// CPU time (user + system, in clock ticks) of this process's threads
/// named `name`.
fn thread_ticks(name: &str) -> u64 {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|stat| {
            // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            num(11) + num(12)
        })
        .sum()
}

/// The TAP is deleted from the host (`ip link delete`) while the VM runs.
/// Documented outcome: the device logs one error and stops watching the
/// TAP (reads end, frames the guest sends are dropped and counted); the
/// guest's eth0 stays, its pings go unanswered; the device thread does not
/// spin (under a third of a CPU while the guest keeps sending); the VM,
/// its console, its disk and its processes run on, and it pauses and
/// snapshots. Restored onto a new TAP of the same name, the guest pings
/// the host again.
#[test]
fn fault_tap_deleted_while_the_vm_runs() {
    const HOST_MAC: &str = "02:00:00:0a:ca:01";
    const NAME: &str = "dmfault0";
    let _timed = start("fault_tap_deleted_while_the_vm_runs");
    let tmp = TempDir::new("fault-tap");
    let disk = test_disk(&tmp.0, "disk.ext4");
    let tap = common::isolated_tap(NAME, "10.202.0.1/24");
    // The replacement TAP gets the same host MAC: the guest's ARP entry
    // for the host stays right across the restore.
    host_busybox(&["ip", "link", "set", "dev", NAME, "address", HOST_MAC]);
    let initrd = guest_initrd(
        &tmp.0,
        &[modules::VIRTIO_MMIO, modules::BLOCK, modules::NET],
        &format!(
            "mount -t ext4 /dev/vda /mnt\nip addr add 10.202.0.2/24 dev eth0\nip link set eth0 up\n{SESSION}"
        ),
    );
    let (mut vm, mut session) = boot(
        builder(&initrd)
            .block(&disk, false)
            .net(TapConfig::Fd(tap.as_fd().try_clone_to_owned().unwrap())),
    );
    let ping = "if ping -c 2 -W 3 10.202.0.1 >/dev/null; then echo ok; else echo failed; fi";
    assert_eq!(ask(&mut session, "ping1", ping), "ok");
    session.run("echo before > /mnt/state.txt; sync; echo @@synced=yes");
    session.wait_fact("synced", MINUTE);
    let before = report(&mut session, "before");

    drop(tap);
    host_busybox(&["ip", "link", "delete", NAME]);
    // The guest keeps sending while the device thread is watched.
    let ticks_before = thread_ticks("dormouse-io");
    let started = Instant::now();
    assert_eq!(ask(&mut session, "ping2", ping), "failed");
    session.run("ping -c 5 -i 0.5 -W 1 10.202.0.1 >/dev/null 2>&1; echo @@pinged=yes");
    session.wait_fact("pinged", MINUTE);
    let ticks = thread_ticks("dormouse-io") - ticks_before;
    // SAFETY: sysconf takes no pointers.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let elapsed = started.elapsed();
    #[allow(clippy::cast_precision_loss)]
    let cpu = ticks as f64 / hz as f64;
    common::report(&format!(
        "TAP deleted: device thread used {cpu:.2} s of CPU in {:.2} s",
        elapsed.as_secs_f64()
    ));
    assert!(
        cpu < elapsed.as_secs_f64() / 3.0,
        "the device thread spun: {cpu:.2} s of CPU in {elapsed:?}"
    );
    // The interface stays in the guest; it just moves nothing.
    assert_eq!(
        ask(
            &mut session,
            "eth0",
            "test -d /sys/class/net/eth0 && echo present"
        ),
        "present"
    );
    session.run("echo after > /mnt/after.txt; sync; echo 3 > /proc/sys/vm/drop_caches; echo @@disk=$(cat /mnt/state.txt),$(cat /mnt/after.txt)");
    assert_eq!(session.wait_fact("disk", MINUTE), "before,after");
    assert_same_guest(&mut session, &before, "after");
    assert_eq!(vm.state(), VmState::Running);
    vm.pause().unwrap();
    let snap = tmp.0.join("snap");
    vm.snapshot(&snap).unwrap();
    drop(vm);

    // A new TAP under the same name (this thread is still in the test's
    // network namespace): the restored guest networks again.
    let tap = Tap::open(NAME).expect("a new TAP");
    host_busybox(&["ip", "link", "set", "dev", NAME, "address", HOST_MAC]);
    host_busybox(&["ip", "addr", "add", "10.202.0.1/24", "dev", NAME]);
    host_busybox(&["ip", "link", "set", NAME, "up"]);
    let (mut session, input) = Session::new();
    let restored = MicroVm::restore(&snap)
        .block_path(0, &disk)
        .tap(0, TapConfig::Fd(tap.as_fd().try_clone_to_owned().unwrap()))
        .serial_output(session.console.clone())
        .serial_input(input)
        .resume(true)
        .build()
        .unwrap();
    assert_eq!(ask(&mut session, "ping3", ping), "ok");
    assert_same_guest(&mut session, &before, "restored");
    power_off(restored, session);
}

// ---------------------------------------------------------------------
// 3. The vsock host peer dies mid-stream.

const VSOCK_CHILD: &str = "DORMOUSE_FAULT_VSOCK_CHILD";
const VSOCK_PORT: u32 = 5000;

fn vsock_pattern(i: u64) -> u8 {
    (i.wrapping_mul(13) % 251).to_le_bytes()[0]
}

/// Connects to the guest's port through the device's socket.
fn connect_to_guest(uds: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(uds).expect("connecting to the vsock socket");
    stream.set_read_timeout(Some(MINUTE)).unwrap();
    writeln!(stream, "CONNECT {VSOCK_PORT}").unwrap();
    // Byte by byte: nothing past the line may be taken from the stream.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert!(line.starts_with(b"OK "), "handshake answered {line:?}");
    stream
}

/// The child: streams the pattern to the guest's echo server and checks
/// what comes back, printing `ECHOED <bytes>` after each MiB, until it is
/// killed.
fn vsock_child(uds: &Path) {
    let stream = connect_to_guest(uds);
    let mut writer = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut at = 0u64;
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            for b in chunk.iter_mut() {
                *b = vsock_pattern(at);
                at += 1;
            }
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut reader = stream;
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0u64;
    let mut next_report = 1u64 << 20;
    let mut out = std::io::stdout();
    loop {
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "the echo ended");
        for &b in &buf[..n] {
            assert_eq!(b, vsock_pattern(got), "echo byte {got} differs");
            got += 1;
        }
        if got >= next_report {
            writeln!(out, "ECHOED {got}").unwrap();
            out.flush().unwrap();
            next_report += 1 << 20;
        }
    }
}

/// A host process streaming data both ways through a guest vsock port
/// (host -> guest echo server -> host, bytes checked) is SIGKILLed in the
/// middle. Documented outcome: the guest's side of the connection ends (its
/// read returns end-of-stream, or a read or write fails), having echoed
/// at least what the host had checked; the VM runs on, and a new connection
/// to the same port echoes 1 MiB intact, after which the guest counts it
/// as a second connection that ended cleanly with exactly that many bytes.
#[test]
fn fault_vsock_host_peer_killed_mid_stream() {
    if let Some(uds) = std::env::var_os(VSOCK_CHILD) {
        return vsock_child(Path::new(&uds));
    }
    let _timed = start("fault_vsock_host_peer_killed_mid_stream");
    let tmp = TempDir::new("fault-vsock");
    let uds = tmp.0.join("vsock.sock");
    let initrd = initrd_with_tool(
        &tmp.0,
        &[modules::VIRTIO_MMIO, modules::VSOCK],
        &format!("guest_vsock echo-report {VSOCK_PORT} &\n{SESSION}"),
    );
    let (mut vm, mut session) = boot(builder(&initrd).vsock(3, &uds));
    session.wait_fact("vsock_listening", MINUTE);
    let before = report(&mut session, "before");

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fault_vsock_host_peer_killed_mid_stream",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(VSOCK_CHILD, &uds)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let checked = loop {
        let line = lines
            .next()
            .expect("the child ended before it echoed 2 MiB")
            .unwrap();
        if let Some(n) = line.split_once("ECHOED ").map(|(_, n)| n) {
            let n: u64 = n.trim().parse().unwrap();
            if n >= 2 << 20 {
                break n;
            }
        }
    };
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed: {status}");

    let end = session.wait_fact("vsock_end_1", MINUTE);
    let (bytes, how) = end.split_once(' ').unwrap();
    let bytes: u64 = bytes.parse().unwrap();
    assert!(
        bytes >= checked,
        "guest echoed {bytes}, host checked {checked}"
    );
    assert!(how == "eof" || how.starts_with("error:"), "{end}");
    common::report(&format!(
        "vsock peer killed after {checked} bytes checked: guest saw {how} after echoing {bytes}"
    ));

    // A new connection to the same port: 1 MiB intact.
    let stream = connect_to_guest(&uds);
    let mut writer = stream.try_clone().unwrap();
    let data: Vec<u8> = (0..1u64 << 20).map(|i| vsock_pattern(i + 7)).collect();
    let sent = data.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    let mut reader = stream;
    reader.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    assert!(
        back == data,
        "the second connection's echo differs ({} bytes)",
        back.len()
    );
    assert_eq!(session.wait_fact("vsock_end_2", MINUTE), "1048576 eof");

    assert_same_guest(&mut session, &before, "after");
    vm.pause().unwrap();
    vm.snapshot(tmp.0.join("snap")).unwrap();
    vm.resume().unwrap();
    assert_same_guest(&mut session, &before, "resumed");
    power_off(vm, session);
}

// ---------------------------------------------------------------------
// 4. The VMM process is SIGKILLed during a snapshot write.

const SNAPSHOT_CHILD: &str = "DORMOUSE_FAULT_SNAPSHOT_CHILD";

/// Writes `text` to `path` so that a reader sees all of it or nothing.
fn publish(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The child: boots, takes snapshot `a`, changes the guest (a file, and
/// 64 MiB of random data in tmpfs so that the next snapshot takes a
/// while), and writes snapshot `b` until it is killed.
fn snapshot_child(dir: &Path) {
    let initrd = guest_initrd(dir, &[], SESSION);
    let (mut vm, mut session) = boot(builder(&initrd));
    session
        .run("echo \"a-$(cat /proc/sys/kernel/random/uuid)\" > /tmp/a.txt; echo @@a_written=yes");
    session.wait_fact("a_written", MINUTE);
    let a_file = ask(&mut session, "a_file", "cat /tmp/a.txt");
    let facts = report(&mut session, "a");
    vm.pause().unwrap();
    vm.snapshot(dir.join("a")).unwrap();
    publish(
        &dir.join("facts-a"),
        &format!(
            "pid:{} note:{} counter:{} file:{a_file}",
            facts["pid"], facts["note"], facts["counter"]
        ),
    );
    vm.resume().unwrap();
    session.run(
        "echo b > /tmp/b.txt; dd if=/dev/urandom of=/tmp/fill bs=1M count=64 2>/dev/null; \
         echo @@filled=yes",
    );
    session.wait_fact("filled", Duration::from_secs(600));
    vm.pause().unwrap();
    publish(&dir.join("writing-b"), "");
    vm.snapshot(dir.join("b")).unwrap();
    publish(&dir.join("b-done"), "");
    loop {
        std::thread::park();
    }
}

/// The memory file of the temporary directory snapshot `b` is being
/// written into, once it holds at least `least` bytes.
fn staged_memory(dir: &Path, least: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name();
        let staged = name.to_string_lossy().starts_with(".b.tmp-");
        let memory = e.path().join(dormouse::snapshot::MEMORY_FILE);
        let size = std::fs::metadata(&memory).map_or(0, |m| m.blocks() * 512);
        (staged && size >= least).then(|| e.path())
    })
}

/// A process running a plain VM (no session) is SIGKILLed while it writes
/// snapshot B, after B's memory file holds 4 MiB. Documented outcome: B
/// does not exist (a snapshot is written into a hidden temporary directory
/// and renamed into place only when complete), so restoring B fails with
/// `SnapshotError::MissingFile` and no VM; the temporary directory left
/// behind has no state file, and restoring it fails the same way. Snapshot
/// A, the last complete one, restores guest memory byte-identical to its
/// memory file, and the guest is exactly as it was at A: the same process
/// and note, A's file, and nothing it did after A.
#[test]
fn fault_vmm_killed_during_a_snapshot_write() {
    if let Some(dir) = std::env::var_os(SNAPSHOT_CHILD) {
        return snapshot_child(Path::new(&dir));
    }
    let _timed = start("fault_vmm_killed_during_a_snapshot_write");
    let tmp = TempDir::new("fault-kill");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fault_vmm_killed_during_a_snapshot_write",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SNAPSHOT_CHILD, &tmp.0)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(1200);
    let staged = loop {
        if let Some(staged) = staged_memory(&tmp.0, 4 << 20) {
            break staged;
        }
        assert!(
            !tmp.0.join("b-done").exists(),
            "snapshot b was complete before it could be interrupted"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the child ended before snapshot b: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the child never wrote snapshot b"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let staged_bytes = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(staged.join(dormouse::snapshot::MEMORY_FILE))
            .map_or(0, |m| m.blocks() * 512)
    };
    common::report(&format!(
        "VMM killed with {} KiB of snapshot b's memory file written",
        staged_bytes >> 10
    ));
    assert!(tmp.0.join("writing-b").exists());
    assert!(
        !tmp.0.join("b-done").exists(),
        "b completed before the kill"
    );

    // B: no snapshot, a clear error, no VM.
    assert!(
        !tmp.0.join("b").exists(),
        "an interrupted snapshot is in place"
    );
    for dir in [tmp.0.join("b"), staged.clone()] {
        match MicroVm::restore(&dir).build() {
            Err(Error::Snapshot(SnapshotError::MissingFile(path))) => {
                assert_eq!(path, dir.join(dormouse::snapshot::STATE_FILE));
            }
            Err(other) => panic!("restoring {}: {other:?}", dir.display()),
            Ok(_) => panic!("{} restored", dir.display()),
        }
    }

    // A: exactly as it was.
    let facts = parse_report(&std::fs::read_to_string(tmp.0.join("facts-a")).unwrap());
    let a = tmp.0.join("a");
    let (mut session, input) = Session::new();
    let mut restored = MicroVm::restore(&a)
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    common::assert_memory_equals_file(&restored, &a.join(dormouse::snapshot::MEMORY_FILE));
    restored.resume().unwrap();
    assert_eq!(ask(&mut session, "a_file", "cat /tmp/a.txt"), facts["file"]);
    assert_eq!(
        ask(
            &mut session,
            "after_a",
            "ls /tmp/b.txt /tmp/fill 2>/dev/null | wc -l"
        ),
        "0"
    );
    assert_same_guest(&mut session, &facts, "restored");
    power_off(restored, session);
}

// ---------------------------------------------------------------------
// 5. The memory file changes under a restored VM.

/// The offsets of the pages of `file` that hold nothing but `byte`.
fn pages_of(file: &std::fs::File, byte: u8) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let len = file.metadata().unwrap().len();
    let mut at = 0u64;
    while at < len {
        let n = usize::try_from((len - at).min(buf.len() as u64)).unwrap();
        file.read_exact_at(&mut buf[..n], at).unwrap();
        for (i, page) in buf[..n].chunks_exact(4096).enumerate() {
            if page.iter().all(|&b| b == byte) {
                found.push(at + i as u64 * 4096);
            }
        }
        at += n as u64;
    }
    found
}

/// The memory file of a restored VM is written in place while the VM
/// runs. What happens: the file is mapped `MAP_PRIVATE`, so a page the
/// guest has not touched since the restore reads the file's new bytes (a
/// tmpfs file's page, full of `Q` at the snapshot, reads all `R` once the
/// host rewrote that page of the memory file). Detected: the restore
/// records each memory file's size and modification time, and
/// `check_memory_files()` and every snapshot after the change fail with
/// `SnapshotError::MemoryFileChanged` naming the file (nothing is
/// written), while the VM itself runs on, its other state as it was.
#[test]
fn fault_memory_file_written_under_a_restored_vm() {
    use std::os::unix::fs::FileExt;
    let _timed = start("fault_memory_file_written_under_a_restored_vm");
    let tmp = TempDir::new("fault-memfile");
    let initrd = guest_initrd(&tmp.0, &[], SESSION);
    let (mut vm, mut session) = boot(builder(&initrd));
    // A page of 'Q' in tmpfs; the command itself holds a single Q (and no
    // backslash, which the console loop's `read` would eat).
    session.run(
        "printf %4096s | tr ' ' Q > /tmp/q; echo @@q=$(wc -c < /tmp/q),$(tr -d Q < /tmp/q | wc -c)",
    );
    assert_eq!(session.wait_fact("q", MINUTE), "4096,0");
    let before = report(&mut session, "before");
    vm.pause().unwrap();
    let snap = tmp.0.join("snap");
    vm.snapshot(&snap).unwrap();
    drop(vm);

    let (mut session, input) = Session::new();
    let mut restored = MicroVm::restore(&snap)
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    restored.check_memory_files().unwrap();
    // Before the guest runs: every page of 'Q' in the file (the tmpfs page
    // and freed copies of it) becomes 'R', with a later modification time.
    std::thread::sleep(Duration::from_millis(1100));
    let path = snap.join(dormouse::snapshot::MEMORY_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let pages = pages_of(&file, b'Q');
    assert!(!pages.is_empty(), "no page of Q in the memory file");
    for &at in &pages {
        file.write_all_at(&[b'R'; 4096], at).unwrap();
    }
    restored.resume().unwrap();
    // The guest reads the new bytes: its file changed behind its back.
    assert_eq!(
        ask(&mut session, "q_after", "tr -d R < /tmp/q | wc -c"),
        "0"
    );
    assert_same_guest(&mut session, &before, "after");
    match restored.check_memory_files() {
        Err(SnapshotError::MemoryFileChanged(p)) => assert_eq!(p, path),
        other => panic!("the change went unseen: {other:?}"),
    }
    restored.pause().unwrap();
    let again = tmp.0.join("again");
    match restored.snapshot(&again) {
        Err(Error::Snapshot(SnapshotError::MemoryFileChanged(p))) => assert_eq!(p, path),
        other => panic!("a snapshot of changed memory: {other:?}"),
    }
    assert!(!again.exists());
    restored.resume().unwrap();
    assert_same_guest(&mut session, &before, "resumed");
    power_off(restored, session);
}
