//! The soak suite's driver (issue 13): suspend/resume cycles without leaks,
//! and a density wave, each checked by the guest's own view of its state.
//!
//! ```text
//! cargo xtask soak --short        # CI's form: a few minutes
//! cargo xtask soak                # the long form: 200 cycles, 32 sessions
//! soak [--short] [SCENARIO...]    # in an arm64 host with /dev/kvm
//! ```
//!
//! Scenarios (default: all):
//! - `vm-cycles`: one `MicroVm` (Linux, 128 MiB, an ext4 disk, vsock)
//!   through N suspend/resume cycles: pause, full snapshot, drop, restore in
//!   this process, resume.
//! - `session-cycles`: one session through N cycles of `suspend()` and a
//!   resume on the next request.
//! - `density`: M sessions at 128 MiB at once, all suspended and resumed in
//!   waves.
//! - `hostile`: a guest attacks every device from inside for a fixed time
//!   (`guest_vsock hostile`, examples/common/hostile.rs) while the host
//!   floods its TAP and vsock and a well-behaved VM in the same process
//!   serves requests; see [`hostile`].
//!
//! In every cycle the guest service (`examples/guest_vsock.rs serve`) writes
//! a step of its 4 MiB memory buffer and appends a block to a file on its
//! disk (`examples/common/workload.rs`), then answers checksums it computes
//! over its own memory and over the file read back from the disk. The host
//! keeps the same model and compares: any lost page or block fails the
//! cycle. The service's process id and request counter must carry on.
//!
//! Leaks: the process's fds, threads, mappings and resident memory outside
//! guest memory are taken after the first cycle and after the last; they
//! must be back within [`LEAK_TOLERANCE`]. Guest memory is what is mapped
//! from snapshot memory files (a restored VM's RAM), counted apart because
//! it is the guest's own.
//!
//! Each scenario prints `@@soak <scenario> pass|FAIL ...` with its numbers;
//! the exit code is 1 if one failed. The guest assets come from the
//! environment `cargo xtask` sets (DORMOUSE_GUEST_KERNEL, ...).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::session::{Endpoint, Image, RootOptions, Session, SessionConfig, SessionRoot};
use dormouse::snapshot::MEMORY_FILE;
use dormouse::MicroVm;

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[path = "common/workload.rs"]
mod workload;

use common::session::{ask, service_image, service_initrd, SERVICE_PORT};
use common::{guest_assets, Console, TempDir};

/// How far the process may be from where it was after the first cycle:
/// fds and threads exactly back, at most 8 more mappings (allocator
/// arenas), at most 16 MiB more resident memory outside guest memory.
const LEAK_TOLERANCE: Tolerance = Tolerance {
    maps: 8,
    rss_mib: 16,
};

struct Tolerance {
    maps: usize,
    rss_mib: u64,
}

/// The sizes of a run.
struct Params {
    cycles: usize,
    sessions: usize,
    waves: usize,
    storm_secs: u64,
}

const MIB: u64 = 1 << 20;

/// What the process holds, from /proc/self.
#[derive(Clone, Copy, Debug)]
struct Proc {
    fds: usize,
    threads: usize,
    maps: usize,
    rss: u64,
    /// Resident pages of guest RAM: mapped snapshot memory files (restored
    /// VMs) and the ranges of the VMs named to `with_guests`.
    guest_rss: u64,
}

/// The host address ranges of a VM's guest memory.
fn guest_ranges(vm: &MicroVm) -> Vec<(u64, u64)> {
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
    vm.memory()
        .iter()
        .map(|r| (r.as_ptr() as u64, r.as_ptr() as u64 + r.len()))
        .collect()
}

impl Proc {
    fn now() -> Self {
        Self::with_guests(&[])
    }

    /// As `now`, counting the memory of these VMs' guests (booted VMs'
    /// RAM is anonymous memory, known only by its address) as guest memory.
    fn with_guests(vms: &[&MicroVm]) -> Self {
        let ranges: Vec<(u64, u64)> = vms.iter().flat_map(|vm| guest_ranges(vm)).collect();
        let count = |dir: &str| std::fs::read_dir(dir).map_or(0, |d| d.count());
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let (mut maps, mut guest_kb, mut in_guest) = (0, 0u64, false);
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if first.contains('-') && !first.ends_with(':') {
                // A mapping's header: range, perms, offset, dev, inode, path.
                maps += 1;
                let start = first
                    .split('-')
                    .next()
                    .and_then(|a| u64::from_str_radix(a, 16).ok())
                    .unwrap_or(0);
                let path = words.nth(4).unwrap_or("");
                in_guest = Path::new(path)
                    .file_name()
                    .is_some_and(|n| n == MEMORY_FILE)
                    || ranges.iter().any(|&(lo, hi)| (lo..hi).contains(&start));
            } else if first == "Rss:" && in_guest {
                guest_kb += words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            }
        }
        Self {
            fds: count("/proc/self/fd"),
            threads: count("/proc/self/task"),
            maps,
            rss: common::session::rss(),
            guest_rss: guest_kb * 1024,
        }
    }

    /// Resident memory that is not guest memory: the VMM's own.
    fn vmm_rss(&self) -> u64 {
        self.rss.saturating_sub(self.guest_rss)
    }

    fn describe(&self) -> String {
        format!(
            "fds {} threads {} maps {} rss {:.1} MiB (guest {:.1}, vmm {:.1})",
            self.fds,
            self.threads,
            self.maps,
            mib(self.rss),
            mib(self.guest_rss),
            mib(self.vmm_rss())
        )
    }
}

#[allow(clippy::cast_precision_loss)] // Display only.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Panics unless `last` is back where `first` was, within LEAK_TOLERANCE.
fn assert_no_leak(what: &str, first: &Proc, last: &Proc) {
    let t = &LEAK_TOLERANCE;
    assert_eq!(
        last.fds, first.fds,
        "{what}: fds leaked: {first:?} -> {last:?}"
    );
    assert_eq!(
        last.threads, first.threads,
        "{what}: threads leaked: {first:?} -> {last:?}"
    );
    assert!(
        last.maps <= first.maps + t.maps,
        "{what}: mappings grew past {}: {first:?} -> {last:?}",
        t.maps
    );
    assert!(
        last.vmm_rss() <= first.vmm_rss() + t.rss_mib * MIB,
        "{what}: VMM memory grew past {} MiB: {first:?} -> {last:?}",
        t.rss_mib
    );
}

/// The host's copy of what the guest service should hold.
#[derive(Default)]
struct Model {
    mem: Vec<u8>,
    file: Vec<u8>,
    hits: u64,
    pid: Option<u32>,
}

impl Model {
    /// One step of guest work (seed `seed`), each answer checked.
    fn step(&mut self, seed: u64, ask: &mut dyn FnMut(&str) -> String) {
        workload::mem_step(&mut self.mem, seed);
        let want = format!("mem={:016x}", workload::checksum(&self.mem));
        let got = ask(&format!("mem {seed}"));
        assert_eq!(got, want, "memory checksum after step {seed}");
        self.file.extend_from_slice(&workload::file_block(seed));
        let got = ask(&format!("append soak.dat {seed}"));
        assert_eq!(got, format!("ok len={}", self.file.len()), "append {seed}");
        self.hit(ask);
    }

    fn hit(&mut self, ask: &mut dyn FnMut(&str) -> String) {
        self.hits += 1;
        let (pid, count) = common::session::pid_count(&ask("hit"));
        assert_eq!(count, self.hits, "the service's request counter");
        assert_eq!(*self.pid.get_or_insert(pid), pid, "the service's process");
    }

    /// The guest's view of its memory and of its file (read back from the
    /// disk) equals the model.
    fn check(&self, ask: &mut dyn FnMut(&str) -> String) {
        let mut mem = self.mem.clone();
        mem.resize(workload::MEM_PAGES * 4096, 0);
        let want = format!("mem={:016x}", workload::checksum(&mem));
        assert_eq!(ask("memsum"), want, "guest memory after a resume");
        let want = if self.file.is_empty() {
            "missing".to_string()
        } else {
            format!(
                "sum={:016x} len={}",
                workload::checksum(&self.file),
                self.file.len()
            )
        };
        assert_eq!(ask("sum soak.dat"), want, "the guest's file after a resume");
    }
}

/// Median and maximum of some durations, in ms.
fn stats(times: &mut [Duration]) -> String {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match (times.get(times.len() / 2), times.last()) {
        (Some(&mid), Some(&max)) => format!("median {:.0} ms, max {:.0} ms", ms(mid), ms(max)),
        _ => "none".into(),
    }
}

/// Sends one request line on a new vsock connection to the service.
fn ask_vm(vm: &MicroVm, request: &str) -> String {
    let stream: UnixStream = vm
        .vsock_connect(SERVICE_PORT)
        .expect("connecting to the guest service");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .expect("setting a read timeout");
    let mut writer = stream.try_clone().expect("cloning the stream");
    writeln!(writer, "{request}").expect("sending the request");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("reading the answer");
    line.trim_end().to_owned()
}

/// The plain-VM guest: the service without an image's readiness signal.
const VM_INIT: &str = "mount -t ext4 /dev/vda /mnt || echo '@@mount failed'\n\
     guest_vsock serve 5000 /mnt &\n\
     while true; do sleep 3600; done\n";

/// A booted service VM (128 MiB, a copy of the test disk, vsock on a
/// listener the host keeps for its restores).
struct ServiceVm {
    vm: MicroVm,
    console: Console,
    listener: UnixListener,
}

impl ServiceVm {
    fn boot(dir: &Path) -> Self {
        let disk = dir.join("disk.ext4");
        let src = std::env::var_os("DORMOUSE_TEST_DISK").expect("DORMOUSE_TEST_DISK");
        std::fs::copy(src, &disk).expect("copying the test disk");
        let listener = UnixListener::bind(dir.join("vsock.sock")).expect("binding the vsock");
        let console = Console::default();
        let mut vm = MicroVm::builder()
            .memory_mib(128)
            .kernel(guest_assets().kernel)
            .initrd(service_initrd(dir, VM_INIT))
            .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
            .serial_output(console.clone())
            .block(&disk, false)
            .vsock_listener(3, Self::clone_of(&listener), Default::default())
            .build()
            .expect("building the VM");
        vm.start().expect("starting the VM");
        wait_for(&console, "@@serving=", Duration::from_secs(600));
        Self {
            vm,
            console,
            listener,
        }
    }

    fn clone_of(listener: &UnixListener) -> UnixListener {
        listener.try_clone().expect("cloning the vsock listener")
    }
}

/// Waits until the console shows `text`.
fn wait_for(console: &Console, text: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !console.text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "the guest never printed {text:?}:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vm_cycles(p: &Params) -> String {
    let tmp = TempDir::new("soak-vm");
    let ServiceVm {
        mut vm,
        console,
        listener,
    } = ServiceVm::boot(&tmp.0);
    let clone = || ServiceVm::clone_of(&listener);
    let mut model = Model::default();
    let (mut suspends, mut resumes) = (Vec::new(), Vec::new());
    let mut first = None;
    for cycle in 0..p.cycles {
        model.step(cycle as u64, &mut |r| ask_vm(&vm, r));
        let dir = tmp.0.join(format!("snap{}", cycle % 2));
        let _ = std::fs::remove_dir_all(&dir);
        let t = Instant::now();
        vm.pause().expect("pause");
        vm.snapshot(&dir).expect("snapshot");
        drop(vm);
        suspends.push(t.elapsed());
        let t = Instant::now();
        vm = MicroVm::restore(&dir)
            .reuse_saved_paths(true)
            .vsock_listener(clone())
            .serial_output(console.clone())
            .resume(true)
            .build()
            .unwrap_or_else(|e| panic!("restore of cycle {cycle}: {e}"));
        resumes.push(t.elapsed());
        model.check(&mut |r| ask_vm(&vm, r));
        if cycle == 0 {
            first = Some(Proc::now());
        }
    }
    let last = Proc::now();
    let first = first.expect("at least one cycle");
    assert_no_leak("vm-cycles", &first, &last);
    let summary = format!(
        "{} cycles; suspend {}; restore {}; after cycle 1: {}; after the last: {}",
        p.cycles,
        stats(&mut suspends),
        stats(&mut resumes),
        first.describe(),
        last.describe()
    );
    vm.pause().expect("pause at the end");
    summary
}

/// The hostile guest: no virtio driver; `guest_vsock hostile` drives the
/// devices itself for the storm, then the guest prints a heartbeat.
fn hostile_init(seconds: u64) -> String {
    format!(
        "guest_vsock hostile {seconds} 7\n\
         i=0; while true; do i=$((i+1)); echo \"@@beat=$i\"; sleep 1; done\n"
    )
}

/// The last heartbeat the guest printed.
fn last_beat(console: &Console) -> u64 {
    console
        .text()
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("@@beat="))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// Pause, snapshot into `dir`, drop, restore from it, resume: the hostile
/// VM's suspend and resume.
fn cycle_hostile(
    vm: MicroVm,
    dir: &Path,
    console: &Console,
    tap: &dormouse::devices::virtio::net::Tap,
) -> MicroVm {
    use std::os::fd::AsFd;
    let mut vm = vm;
    vm.pause_within(Duration::from_secs(30))
        .unwrap_or_else(|e| {
            panic!(
                "pausing the hostile VM: {e}; its console:\n{}",
                console.text()
            )
        });
    vm.snapshot(dir).expect("snapshotting the hostile VM");
    drop(vm);
    MicroVm::restore(dir)
        .reuse_saved_paths(true)
        .tap(
            0,
            dormouse::devices::virtio::net::TapConfig::Fd(
                tap.as_fd()
                    .try_clone_to_owned()
                    .expect("duplicating the TAP fd"),
            ),
        )
        .vsock_uds(dir.join("v.sock"))
        .serial_output(console.clone())
        .resume(true)
        .build()
        .expect("restoring the hostile VM")
}

/// A guest attacks every device for `seconds` while a well-behaved VM
/// in the same process serves requests; the host floods the hostile VM's
/// network and vsock from outside too. The VMM must stay healthy (no
/// device thread fails, memory bounded), the other VM unaffected, and the
/// hostile VM must pause, snapshot and restore, in the middle of the storm
/// and after it.
fn hostile(seconds: u64) -> String {
    use dormouse::devices::virtio::net::TapConfig;
    use std::os::fd::AsFd;
    let tmp = TempDir::new("soak-hostile");
    // The bystander first, before this thread moves to its own netns.
    let mut bystander = ServiceVm::boot(&tmp.0);
    let mut model = Model::default();
    model.step(0, &mut |r| ask_vm(&bystander.vm, r));
    let tap = common::isolated_tap("hostile0", "10.99.0.1/24");
    let disk = tmp.0.join("hostile.ext4");
    std::fs::copy(
        std::env::var_os("DORMOUSE_TEST_DISK").expect("DORMOUSE_TEST_DISK"),
        &disk,
    )
    .expect("copying the test disk");
    let hdir = tmp.0.join("hostile");
    std::fs::create_dir_all(&hdir).expect("creating the hostile VM's directory");
    let console = Console::default();
    let mut vm = MicroVm::builder()
        .vcpus(2)
        // 128 MiB with two vCPUs leaves the kernel too little beside its
        // CMA reserve and the initramfs: it runs out of memory at boot.
        .memory_mib(256)
        .kernel(guest_assets().kernel)
        .initrd(common::session::tool_initrd(
            &hdir,
            &[],
            &hostile_init(seconds),
        ))
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
        .serial_output(console.clone())
        .block(&disk, false)
        .net(TapConfig::Fd(
            tap.as_fd()
                .try_clone_to_owned()
                .expect("duplicating the TAP fd"),
        ))
        .vsock(4, hdir.join("v.sock"))
        .build()
        .expect("building the hostile VM");
    vm.start().expect("starting the hostile VM");
    let start_rss = Proc::with_guests(&[&vm, &bystander.vm]).vmm_rss();

    // Outside pressure: broadcast frames into the hostile VM's TAP, and
    // host connections to a guest port nothing serves.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders = {
        let stop = stop.clone();
        let sock = hdir.join("v.sock");
        std::thread::spawn(move || {
            let udp = std::net::UdpSocket::bind("10.99.0.1:0").expect("binding a UDP socket");
            udp.set_broadcast(true).expect("SO_BROADCAST");
            let (mut frames, mut connects) = (0u64, 0u64);
            let payload = [0xA5u8; 1200];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..200 {
                    if udp.send_to(&payload, "10.99.0.255:9").is_ok() {
                        frames += 1;
                    }
                }
                if let Ok(mut s) = UnixStream::connect(&sock) {
                    let _ = s.write_all(b"CONNECT 5000\n");
                    connects += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (frames, connects)
        })
    };

    // Watch until the storm is over; snapshot and restore half-way.
    let deadline = Instant::now() + Duration::from_secs(seconds + 900);
    let half = Instant::now() + Duration::from_secs(seconds / 2);
    let (mut max_rss, mut steps, mut mid_done) = (start_rss, 1u64, false);
    let mut unhandled = 0;
    while !console.text().contains("@@storm=done") {
        assert!(
            Instant::now() < deadline,
            "the storm never ended:\n{}",
            console.text()
        );
        match vm.wait_timeout(Duration::ZERO) {
            Ok(None) => {}
            other => panic!(
                "the hostile VM stopped during the storm: {other:?}; its console:\n{}",
                console.text()
            ),
        }
        model.step(steps, &mut |r| ask_vm(&bystander.vm, r));
        steps += 1;
        max_rss = max_rss.max(Proc::with_guests(&[&vm, &bystander.vm]).vmm_rss());
        if !mid_done && Instant::now() > half {
            unhandled += vm.unhandled_mmio_accesses();
            vm = cycle_hostile(vm, &tmp.0.join("mid"), &console, &tap);
            mid_done = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (frames, connects) = flooders.join().expect("the flooder thread");
    let storm = common::fact(&console.text(), "storm");
    for id in ["1", "2", "19"] {
        assert!(
            storm.split_whitespace().any(|w| w
                .strip_prefix("devices=")
                .is_some_and(|d| d.split(',').any(|x| x == id))),
            "the hostile program did not reach device type {id}: {storm}"
        );
    }
    // The guest lives on after the storm.
    let beat = {
        let deadline = Instant::now() + Duration::from_secs(300);
        while last_beat(&console) < 2 {
            assert!(
                Instant::now() < deadline,
                "no heartbeat after the storm:\n{}",
                console.text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        last_beat(&console)
    };
    unhandled += vm.unhandled_mmio_accesses();
    let vm = cycle_hostile(vm, &tmp.0.join("end"), &console, &tap);
    let deadline = Instant::now() + Duration::from_secs(300);
    while last_beat(&console) <= beat {
        assert!(
            Instant::now() < deadline,
            "no heartbeat after the restore:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(vm);
    // The bystander never noticed.
    model.check(&mut |r| ask_vm(&bystander.vm, r));
    bystander.vm.pause().expect("pausing the bystander");
    let _ = (&mut bystander.console, &bystander.listener);
    assert!(unhandled > 0, "the storm reached no empty MMIO slot");
    let grown = max_rss.saturating_sub(start_rss);
    assert!(
        grown <= 64 * MIB,
        "VMM memory grew by {:.1} MiB during the storm",
        mib(grown)
    );
    format!(
        "{seconds} s storm: {storm}; host sent {frames} broadcast frames and {connects} vsock connects; \
         {unhandled} accesses to empty MMIO; bystander answered {steps} steps, all checksums right; \
         VMM memory grew {:.1} MiB at most; paused, snapshotted and restored mid-storm and after it",
        mib(grown)
    )
}

fn root(dir: &Path) -> SessionRoot {
    SessionRoot::open_with(
        dir,
        RootOptions {
            tick: Duration::from_millis(50),
            ..RootOptions::default()
        },
    )
    .expect("opening the session root")
}

fn session_ask(session: &Session) -> impl FnMut(&str) -> String + '_ {
    move |request| {
        let answer = ask(&session.endpoints()[0], request);
        // A connection closed without an answer: say what the session and
        // its guest were doing.
        assert!(
            !answer.is_empty(),
            "session {} closed {request:?} unanswered: {:?}; its console ends with:\n{}",
            session.id(),
            session.info(),
            session.console_tail().join("\n")
        );
        answer
    }
}

fn session_cycles(p: &Params, image: &Image, tmp: &Path) -> String {
    let root = root(&tmp.join("root-cycles"));
    let endpoint = Endpoint::unix(tmp.join("cycles.sock"), SERVICE_PORT);
    let session = root
        .launch(image, SessionConfig::new().endpoint(endpoint))
        .expect("launching the session");
    let mut model = Model::default();
    let (mut suspends, mut resumes) = (Vec::new(), Vec::new());
    // (chain length the VM was restored from, the process after the cycle)
    let mut after: Vec<(usize, Proc)> = Vec::new();
    for cycle in 0..p.cycles {
        model.step(cycle as u64, &mut session_ask(&session));
        let t = Instant::now();
        session.suspend().expect("suspend");
        suspends.push(t.elapsed());
        let depth = session.info().chain_len;
        // The next request resumes it: the first check is that request.
        let t = Instant::now();
        model.check(&mut session_ask(&session));
        resumes.push(t.elapsed());
        // A background merge that finished in between changes what the
        // VM was restored from: such a cycle says nothing about leaks.
        if session.info().chain_len == depth {
            after.push((depth, Proc::now()));
        }
    }
    // A restored VM holds one disk layer and one memory mapping set per
    // chain layer, and merges keep the chain short: the process is
    // compared with the first cycle restored from a chain as long as the
    // last one.
    let (depth, last) = *after.last().expect("a cycle without a merge race");
    let (_, first) = *after
        .iter()
        .find(|(d, _)| *d == depth)
        .expect("the last cycle is in the list");
    assert!(
        after.iter().filter(|(d, _)| *d == depth).count() > 1,
        "the chain never came back to {depth} layers in {} cycles: merges do not keep it short",
        p.cycles
    );
    assert_no_leak("session-cycles", &first, &last);
    let info = session.info();
    session.terminate().expect("terminate");
    format!(
        "{} cycles; suspend {}; resume + first two answers {}; {info:?}; chain of {depth}: first {}, last {}",
        p.cycles,
        stats(&mut suspends),
        stats(&mut resumes),
        first.describe(),
        last.describe()
    )
}

fn density(p: &Params, image: &Image, tmp: &Path) -> String {
    let root = root(&tmp.join("root-density"));
    let base = Proc::now();
    let sessions: Vec<Session> = (0..p.sessions)
        .map(|i| {
            let endpoint = Endpoint::unix(tmp.join(format!("d{i}.sock")), SERVICE_PORT);
            root.launch(image, SessionConfig::new().endpoint(endpoint))
                .unwrap_or_else(|e| panic!("launching session {i} of {}: {e}", p.sessions))
        })
        .collect();
    let mut models: Vec<Model> = sessions.iter().map(|_| Model::default()).collect();
    let mut running = Vec::new();
    let mut suspended = Vec::new();
    let mut suspend_all = Vec::new();
    for wave in 0..p.waves {
        for (i, (s, m)) in sessions.iter().zip(&mut models).enumerate() {
            m.step((wave * 1000 + i) as u64, &mut session_ask(s));
        }
        running.push(Proc::now());
        let t = Instant::now();
        for s in &sessions {
            s.suspend().expect("suspend");
        }
        suspend_all.push(t.elapsed());
        suspended.push(Proc::now());
        for (s, m) in sessions.iter().zip(&models) {
            m.check(&mut session_ask(s));
        }
        println!(
            "@@soak density wave {wave}: {} sessions stepped, suspended in {:?} and checked",
            p.sessions,
            suspend_all.last().copied().unwrap_or_default()
        );
    }
    let n = p.sessions as u64;
    let per = |a: usize, b: usize| (a.saturating_sub(b)) as f64 / n as f64;
    let last = running.last().copied().unwrap_or(base);
    // Every wave holds the same sessions, one chain layer longer: with all
    // of them suspended the process holds only their endpoints, and each
    // running VM has the same threads.
    for (w, (r, s)) in running.iter().zip(&suspended).enumerate().skip(1) {
        let (r0, s0) = (&running[0], &suspended[0]);
        assert_eq!(
            r.threads, r0.threads,
            "density, wave {w}: threads {r0:?} -> {r:?}"
        );
        assert_eq!(
            s.threads, s0.threads,
            "density, wave {w}: threads {s0:?} -> {s:?}"
        );
        assert_eq!(
            s.fds, s0.fds,
            "density, wave {w}: fds when suspended {s0:?} -> {s:?}"
        );
        assert!(
            s.vmm_rss() <= s0.vmm_rss() + LEAK_TOLERANCE.rss_mib * MIB,
            "density, wave {w}: memory when suspended {s0:?} -> {s:?}"
        );
    }
    let overhead = last.vmm_rss().saturating_sub(base.vmm_rss()) / n;
    for s in &sessions {
        s.terminate().expect("terminate");
    }
    format!(
        "{} sessions at 128 MiB, {} waves; all suspended in {}; per running session: VMM memory {:.1} MiB (RSS minus guest memory), guest memory {:.1} MiB, {:.1} threads, {:.1} fds; before: {}; all running: {}; all suspended: {}",
        p.sessions,
        p.waves,
        stats(&mut suspend_all),
        mib(overhead),
        mib(last.guest_rss.saturating_sub(base.guest_rss) / n),
        per(last.threads, base.threads),
        per(last.fds, base.fds),
        base.describe(),
        last.describe(),
        suspended.last().copied().unwrap_or(base).describe()
    )
}

fn run(name: &str, body: impl FnOnce() -> String) -> bool {
    println!("@@soak {name} start");
    let t = Instant::now();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(summary) => {
            println!(
                "@@soak {name} pass in {:.0} s: {summary}",
                t.elapsed().as_secs_f64()
            );
            true
        }
        Err(e) => {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            println!(
                "@@soak {name} FAIL after {:.0} s: {why}",
                t.elapsed().as_secs_f64()
            );
            false
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as a server holding
/// many VMs would: each running session holds about 26 fds, and the
/// default soft limit (1024) would end the density wave near 35 sessions.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct, which
    // lives across both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

fn main() -> ExitCode {
    common::init_logging();
    println!("@@soak fd limit {}", raise_fd_limit());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let short = args.iter().any(|a| a == "--short");
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let p = Params {
        cycles: env("DORMOUSE_SOAK_CYCLES", if short { 12 } else { 200 }),
        sessions: env("DORMOUSE_SOAK_SESSIONS", if short { 6 } else { 32 }),
        waves: env("DORMOUSE_SOAK_WAVES", if short { 2 } else { 3 }),
        storm_secs: env("DORMOUSE_SOAK_STORM_SECS", if short { 40 } else { 300 }) as u64,
    };
    let all = ["vm-cycles", "session-cycles", "density", "hostile"];
    let chosen: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    if let Some(bad) = chosen.iter().find(|c| !all.contains(c)) {
        eprintln!("unknown scenario {bad:?}: one of {all:?}");
        return ExitCode::from(2);
    }
    let want = |s: &str| chosen.is_empty() || chosen.contains(&s);
    let mut ok = true;
    if want("vm-cycles") {
        ok &= run("vm-cycles", || vm_cycles(&p));
    }
    if want("session-cycles") || want("density") {
        let tmp = TempDir::new("soak-sessions");
        let t = Instant::now();
        let image = service_image(&tmp.0, 128);
        println!("@@soak image created in {:.0} s", t.elapsed().as_secs_f64());
        if want("session-cycles") {
            ok &= run("session-cycles", || session_cycles(&p, &image, &tmp.0));
        }
        if want("density") {
            ok &= run("density", || density(&p, &image, &tmp.0));
        }
    }
    if want("hostile") {
        // In a thread of its own: it moves into a network namespace.
        let secs = p.storm_secs;
        ok &= std::thread::spawn(move || run("hostile", || hostile(secs)))
            .join()
            .unwrap_or(false);
    }
    println!("@@soak {}", if ok { "passed" } else { "FAILED" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
