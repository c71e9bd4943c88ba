//! The emulated arm64 host: packs aarch64 executables into an initramfs with
//! a busybox `/init` that runs them one by one, boots it under
//! `qemu-system-aarch64` (EL2 + GICv3, so /dev/kvm works inside), streams the
//! console, and reads back per-binary results from marker lines:
//!
//! ```text
//! @@RIG HOST kernel=<release> cpus=<n> kvm=yes
//! @@RIG DATA /data <free> MiB free         (or: @@RIG data disk unavailable: <why>)
//! @@RIG BEGIN <name>
//! ... whatever the binary prints ...
//! @@RIG END <name> rc=<exit code> uptime=<seconds>
//! @@RIG DONE
//! ```
//!
//! Besides the initramfs (tmpfs, lost at poweroff) the host gets a data disk
//! (see disk.rs): a fresh ext4 image mounted at `/data`, exported to the
//! jobs as `DORMOUSE_RIG_DATA`, unmounted before poweroff and readable from
//! this side afterwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cpio::CpioWriter;
use crate::disk::{self, DataDisk};
use crate::libtest::{self, Counts};
use crate::setup::Rig;
use crate::util::{self, shell_quote, Context, Line, Result};

const DEFAULT_MEM_MB: u64 = 4096;
const DEFAULT_TIMEOUT_SECS: u64 = 1500;
const MARK: &str = "@@RIG ";
/// Marker text (after `@@RIG `) when the data disk is not mounted.
const DATA_UNAVAILABLE: &str = "data disk unavailable:";
/// Marker text when it could not be unmounted before poweroff.
const DATA_UNCLEAN: &str = "data disk unclean:";

/// Where guest assets live inside the emulated host (exported to binaries).
const GUEST_ENV: &[(&str, &str)] = &[
    ("DORMOUSE_RIG", "1"),
    ("DORMOUSE_GUEST_KERNEL", "/rig/assets/Image"),
    ("DORMOUSE_GUEST_BUSYBOX", "/rig/assets/busybox"),
    ("DORMOUSE_GUEST_MODULES", "/rig/assets/modules"),
    ("DORMOUSE_TEST_DISK", "/rig/assets/disk.ext4"),
    ("DORMOUSE_GUEST_VSOCK_TOOL", "/rig/assets/guest_vsock"),
];

/// Variables passed through from our environment into the emulated host.
fn forwarded_env() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(name, _)| {
            matches!(
                name.as_str(),
                "RUST_BACKTRACE" | "RUST_LIB_BACKTRACE" | "RUST_LOG" | "RUST_TEST_NOCAPTURE"
            ) || (name.starts_with("DORMOUSE_")
                && !name.starts_with("DORMOUSE_RIG")
                && !GUEST_ENV.iter().any(|(n, _)| n == name))
        })
        .collect();
    vars.sort();
    vars
}

/// One executable to run inside the emulated host.
pub struct Job {
    pub name: String,
    pub path: PathBuf,
    pub args: Vec<String>,
}

/// What one executable did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryResult {
    pub name: String,
    /// Exit code, or None if it never reached its END marker.
    pub rc: Option<i32>,
    /// Sum of its libtest summary lines.
    pub counts: Counts,
    pub summaries: usize,
}

impl BinaryResult {
    /// Its counts, plus one failure if it exited non-zero (or never ended)
    /// without reporting a failed test (a crash, a panic outside a test, a
    /// bad argument).
    pub fn effective(&self) -> Counts {
        let mut counts = self.counts;
        if self.rc != Some(0) && counts.failed == 0 {
            counts.failed += 1;
        }
        counts
    }

    pub fn describe(&self) -> String {
        let rc = match self.rc {
            Some(rc) => format!("rc={rc}"),
            None => "did not finish".to_string(),
        };
        if self.summaries == 0 {
            format!("{}: {rc}, no libtest summary", self.name)
        } else {
            format!("{}: {rc}, {}", self.name, self.counts)
        }
    }
}

/// Everything learnt from one boot.
#[derive(Debug, Default)]
pub struct Outcome {
    pub binaries: Vec<BinaryResult>,
    pub done: bool,
    pub panic: Option<String>,
    pub timed_out: Option<Duration>,
    pub qemu_status: Option<ExitStatus>,
    pub kvm: Option<bool>,
    pub boot_time: Option<Duration>,
    pub total_time: Duration,
    pub expected: Vec<String>,
    /// The data disk attached to this boot (its image on this side).
    pub data_disk: Option<DataDisk>,
    /// What `/init` said about the data disk.
    pub data: DataState,
    /// `/init` could not unmount the data disk before poweroff: what it said.
    pub data_unclean: Option<String>,
}

/// Whether the emulated host mounted its data disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DataState {
    /// `/init` said nothing (it never got that far).
    #[default]
    Unknown,
    /// Mounted at /data; the rest of the marker line (free space).
    Ready(String),
    /// Not mounted; why.
    Unavailable(String),
}

impl Outcome {
    /// Problems with the rig itself (not with a test), each one sentence.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(limit) = self.timed_out {
            problems.push(format!(
                "the emulated host did not finish within {}s and was killed; a test may hang \
                 (the last @@RIG BEGIN above names it), or raise DORMOUSE_RIG_TIMEOUT_SECS",
                limit.as_secs()
            ));
        }
        if let Some(line) = &self.panic {
            if !self.done {
                problems.push(format!("the emulated host's kernel panicked: `{line}`"));
            }
        }
        let started = self.kvm.is_some();
        if !started && self.timed_out.is_none() && self.panic.is_none() {
            let status = self
                .qemu_status
                .map(util::status_text)
                .unwrap_or_else(|| "unknown status".to_string());
            problems.push(format!(
                "the emulated host never reached /init (qemu-system-aarch64 ended with {status}): \
                 read the `qemu:` lines and console output above; if a file or package is \
                 missing run `cargo xtask setup`, or delete target/rig and rerun it"
            ));
        } else if !self.done && self.timed_out.is_none() && self.panic.is_none() {
            let status = self
                .qemu_status
                .map(util::status_text)
                .unwrap_or_else(|| "unknown status".to_string());
            problems.push(format!(
                "the emulated host stopped ({status}) without printing `@@RIG DONE`: \
                 read the console output above (out of memory? raise DORMOUSE_RIG_MEM_MB)"
            ));
        }
        if let Some(status) = self.qemu_status {
            if self.done && !status.success() {
                problems.push(format!(
                    "qemu-system-aarch64 exited with {} after the run",
                    util::status_text(status)
                ));
            }
        }
        if self.done {
            for name in &self.expected {
                if !self.binaries.iter().any(|b| &b.name == name) {
                    problems.push(format!("{name} never started in the emulated host"));
                }
            }
        }
        problems
    }

    /// Test counts, plus one failure per binary that failed without saying so.
    pub fn counts(&self) -> Counts {
        let mut total = Counts::default();
        for binary in &self.binaries {
            total.add(binary.effective());
        }
        total
    }
}

/// Turns console lines into an [`Outcome`].
#[derive(Default)]
pub struct Parser {
    pub outcome: Outcome,
    current: Option<BinaryResult>,
}

impl Parser {
    pub fn line(&mut self, line: &str) {
        if let Some(pos) = line.find(MARK) {
            let marker = &line[pos + MARK.len()..];
            let mut words = marker.split_whitespace();
            match words.next() {
                Some("BEGIN") => {
                    self.close_current();
                    self.current = Some(BinaryResult {
                        name: words.next().unwrap_or("?").to_string(),
                        rc: None,
                        counts: Counts::default(),
                        summaries: 0,
                    });
                    return;
                }
                Some("END") => {
                    let name = words.next().unwrap_or("?").to_string();
                    let rc = words
                        .find_map(|w| w.strip_prefix("rc="))
                        .and_then(|rc| rc.parse::<i32>().ok())
                        // An END without a readable rc is still an end, but a failed one.
                        .or(Some(-1));
                    let mut current = self.current.take().unwrap_or(BinaryResult {
                        name: name.clone(),
                        rc: None,
                        counts: Counts::default(),
                        summaries: 0,
                    });
                    current.rc = rc;
                    self.outcome.binaries.push(current);
                    return;
                }
                Some("DONE") => {
                    self.close_current();
                    self.outcome.done = true;
                    return;
                }
                Some("HOST") => {
                    self.outcome.kvm = Some(marker.contains("kvm=yes"));
                    return;
                }
                Some("DATA") => {
                    let rest = marker["DATA".len()..].trim();
                    self.outcome.data = DataState::Ready(rest.to_string());
                    return;
                }
                Some("data") => {
                    if let Some(why) = marker.strip_prefix(DATA_UNAVAILABLE) {
                        self.outcome.data = DataState::Unavailable(why.trim().to_string());
                        return;
                    }
                    if let Some(why) = marker.strip_prefix(DATA_UNCLEAN) {
                        self.outcome.data_unclean = Some(why.trim().to_string());
                        return;
                    }
                }
                _ => {}
            }
        }
        if let Some(counts) = libtest::parse_summary(line) {
            if let Some(current) = &mut self.current {
                current.counts.add(counts);
                current.summaries += 1;
            }
        }
        if line.contains("Kernel panic") && self.outcome.panic.is_none() {
            self.outcome.panic = Some(line.trim().to_string());
        }
    }

    /// A binary whose END never came (the host died under it).
    fn close_current(&mut self) {
        if let Some(current) = self.current.take() {
            self.outcome.binaries.push(current);
        }
    }

    pub fn finish(mut self) -> Outcome {
        self.close_current();
        self.outcome
    }
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(value) => value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| {
                util::Error::msg(format!(
                    "{name}={value:?} is not a positive whole number; unset it or fix it"
                ))
            }),
    }
}

/// Whether `/init` gets a data disk, and what it exports once it mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataPlan {
    /// A disk is attached; these variables (besides `DORMOUSE_RIG_DATA`)
    /// are exported to the jobs only if it mounts.
    Attached(Vec<(String, String)>),
    /// None is attached; why (`/init` prints it in its unavailable marker).
    Missing(String),
}

/// The part of `/init` that loads virtio-blk and mounts the data disk, or
/// says why not; jobs run either way.
fn data_disk_script(data: &DataPlan) -> String {
    let env = match data {
        DataPlan::Missing(why) => {
            return format!(
                "echo {}\n",
                shell_quote(&format!("{MARK}{DATA_UNAVAILABLE} {why}"))
            );
        }
        DataPlan::Attached(env) => env,
    };
    let mut s = format!(
        r#"# The data disk (xtask/src/disk.rs): virtio-blk is a module in this kernel.
data_disk() {{
    if ! grep -q '^virtio_blk ' /proc/modules; then
        if [ ! -f /{module} ]; then
            echo "the initramfs has no virtio_blk.ko: target/rig/host/modules is incomplete (delete target/rig/host and rerun cargo xtask setup)"
            return 1
        fi
        insmod /{module} || {{ echo "insmod virtio_blk.ko failed"; return 1; }}
    fi
    n=0
    while [ ! -b {dev} ] && [ $n -lt 10 ]; do sleep 1; n=$((n + 1)); done
    if [ ! -b {dev} ]; then
        echo "no {dev} after loading virtio_blk (is the virtio-blk-pci drive attached?)"
        return 1
    fi
    mkdir -p {mnt}
    mount -t ext4 -o noatime,noinit_itable {dev} {mnt} || {{ echo "mount -t ext4 {dev} {mnt} failed"; return 1; }}
}}
if why=$(data_disk 2>&1); then
    free=$(df -m {mnt} | awk 'NR == 2 {{ print $4 }}')
    echo "{MARK}DATA {mnt} $free MiB free"
    export {var}={mnt}
"#,
        module = disk::VIRTIO_BLK_IN_INITRAMFS,
        dev = disk::GUEST_DEVICE,
        mnt = disk::MOUNT_POINT,
        var = disk::DATA_VAR,
    );
    for (name, value) in env {
        s.push_str(&format!(
            "    export {name}={}
",
            shell_quote(value)
        ));
    }
    s.push_str(&format!(
        r#"else
    echo "{MARK}{DATA_UNAVAILABLE} $(echo "$why" | tr '\n' ' ')"
fi
"#
    ));
    s
}

/// The end of `/init`: the data disk unmounted (so what the jobs wrote is on
/// it, not in a journal debugfs does not replay), then poweroff.
fn poweroff_script() -> String {
    format!(
        r#"cd /
sync
if grep -q ' {mnt} ' /proc/mounts; then
    if ! umount {mnt} 2>/tmp/rig-umount.err; then
        echo "{MARK}{DATA_UNCLEAN} umount {mnt} failed ($(tr '\n' ' ' </tmp/rig-umount.err)); what the jobs wrote may be incomplete"
        mount -o remount,ro {mnt} 2>/dev/null
    fi
fi
echo "{MARK}DONE"
sync
poweroff -f
sleep 10
echo o >/proc/sysrq-trigger
"#,
        mnt = disk::MOUNT_POINT
    )
}

/// The `/init` script: mounts, then runs each job between markers, then powers off.
pub fn init_script(jobs: &[Job], data: &DataPlan) -> String {
    let mut s = String::new();
    s.push_str(
        r#"#!/bin/sh
# Generated by `cargo xtask` (xtask/src/rig.rs): runs the rig's binaries, then powers off.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
ip link set lo up 2>/dev/null
"#,
    );
    // Backtraces by default; a RUST_BACKTRACE set on our side overrides it.
    s.push_str("export RUST_BACKTRACE=1\n");
    for (name, value) in GUEST_ENV {
        s.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    for (name, value) in forwarded_env() {
        s.push_str(&format!("export {name}={}\n", shell_quote(&value)));
    }
    s.push_str(
        r#"if [ -e /dev/kvm ]; then kvm=yes; else kvm=no; fi
echo "@@RIG HOST kernel=$(uname -r) cpus=$(nproc) kvm=$kvm"
"#,
    );
    s.push_str(&data_disk_script(data));
    s.push_str(
        r#"run() {
    name=$1
    shift
    mkdir -p "/tmp/rig/$name"
    cd "/tmp/rig/$name" || cd /tmp
    echo "@@RIG BEGIN $name"
    # Through a pipe, so the binary's stdout is not a terminal (no colours or
    # progress-bar escapes from criterion & co. in the log).
    rm -f "/tmp/rig/$name.rc"
    { "$@" </dev/null 2>&1; echo $? >"/tmp/rig/$name.rc"; } | cat
    rc=$(cat "/tmp/rig/$name.rc" 2>/dev/null || echo 255)
    cd /
    read -r up _ </proc/uptime
    echo
    echo "@@RIG END $name rc=$rc uptime=$up"
}
"#,
    );
    for job in jobs {
        let mut words = vec![
            shell_quote(&job.name),
            shell_quote(&format!("/rig/bin/{}", job.name)),
        ];
        words.extend(job.args.iter().map(|a| shell_quote(a)));
        s.push_str(&format!("run {}\n", words.join(" ")));
    }
    s.push_str(&poweroff_script());
    s
}

/// Lists files under `dir` (sorted, recursively) as paths relative to it.
fn tree(dir: &Path, prefix: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        let rel = prefix.join(path.file_name().unwrap_or_default());
        if path.is_dir() {
            tree(&path, &rel, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

/// The host kernel's virtio-blk module (`modules/<version>/...`), if setup
/// fetched it.
fn host_virtio_blk(rig: &Rig) -> Option<PathBuf> {
    std::fs::read_dir(&rig.host_modules)
        .ok()?
        .flatten()
        .map(|e| e.path().join(disk::VIRTIO_BLK_MODULE))
        .find(|p| p.is_file())
}

/// Writes the initramfs for `jobs` to `out`; returns its size in bytes.
pub fn build_initramfs(rig: &Rig, jobs: &[Job], data: &DataPlan, out: &Path) -> Result<u64> {
    let mut w = CpioWriter::create(out)?;
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root", "etc", "rig/bin",
    ] {
        w.dir(dir)?;
    }
    // The kernel opens /dev/console for init before anything is mounted.
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file("bin/busybox", 0o755, &rig.busybox)?;
    w.symlink("bin/sh", "busybox")?;
    w.bytes("init", 0o755, init_script(jobs, data).as_bytes())?;
    // Without it /init says the data disk is unavailable, and names why.
    if let (DataPlan::Attached(_), Some(module)) = (data, host_virtio_blk(rig)) {
        w.file(disk::VIRTIO_BLK_IN_INITRAMFS, 0o644, &module)?;
    }
    for job in jobs {
        w.file(&format!("rig/bin/{}", job.name), 0o755, &job.path)?;
    }
    w.file("rig/assets/Image", 0o644, &rig.guest_image)?;
    w.file("rig/assets/busybox", 0o755, &rig.busybox)?;
    w.file("rig/assets/disk.ext4", 0o644, &rig.test_disk)?;
    // Cross-built by `cargo xtask test` only; benches and the demo do
    // without it.
    if rig.guest_vsock.is_file() {
        w.file("rig/assets/guest_vsock", 0o755, &rig.guest_vsock)?;
    }
    w.dir("rig/assets/modules")?;
    let mut modules = Vec::new();
    tree(&rig.guest_modules, Path::new(""), &mut modules)?;
    for rel in modules {
        w.file(
            &format!("rig/assets/modules/{}", rel.display()),
            0o644,
            &rig.guest_modules.join(&rel),
        )?;
    }
    w.finish()
}

/// Makes this boot's data disk (`target/rig/data-<label>.img`, fresh and
/// empty). A disk that cannot be made is a warning, not an error: the jobs
/// run without one, and `/init` says why.
fn prepare_data_disk(
    rig: &Rig,
    label: &str,
    data: &DataUse,
) -> Result<(Option<DataDisk>, Option<String>)> {
    let size = disk::size_from_env(std::env::var(disk::DISK_MB_VAR).ok().as_deref())?;
    let Some(size_mb) = size else {
        return Ok((
            None,
            Some(format!("{}=0 (none attached)", disk::DISK_MB_VAR)),
        ));
    };
    let path = rig.dir.join(format!("data-{label}.img"));
    let start = Instant::now();
    // What to copy onto it: `<seed root>/<name>` becomes `/data/<name>`.
    let seed_root = rig.dir.join(format!("data-{label}.seed"));
    let mut seeded = None;
    if let Some((from, name)) = data.seed.filter(|(from, _)| from.is_dir()) {
        match disk::copy_tree(from, &seed_root.join(name)) {
            Ok(()) => seeded = Some(format!(", holding a copy of {} as /{name}", from.display())),
            Err(e) => util::warn(format!(
                "the data disk starts empty: could not copy {} for it: {e}",
                from.display()
            )),
        }
    }
    let made = disk::create(&path, size_mb, seeded.as_ref().map(|_| seed_root.as_path()));
    let _ = util::remove_all(&seed_root);
    match made {
        Ok(disk) => {
            util::say(format!(
                "data disk: {} ({size_mb} MiB sparse ext4, cache={}{}, {}) -> {} in the emulated host",
                path.display(),
                disk.cache,
                seeded.unwrap_or_default(),
                util::secs(start.elapsed()),
                disk::MOUNT_POINT
            ));
            Ok((Some(disk), None))
        }
        Err(e) => {
            util::warn(format!("no data disk for this boot: {e}"));
            Ok((None, Some(format!("the x86 side could not make it: {e}"))))
        }
    }
}

/// What a run puts on its data disk and tells its jobs about it.
#[derive(Default)]
pub struct DataUse<'a> {
    /// Exported to the jobs (besides `DORMOUSE_RIG_DATA`) only if the disk
    /// mounts.
    pub env: &'a [(&'a str, &'a str)],
    /// A directory on this side copied onto the fresh disk as
    /// `/data/<name>` (skipped if it does not exist).
    pub seed: Option<(&'a Path, &'a str)>,
}

/// Packs `jobs`, boots the emulated host, streams its console and parses it.
/// `label` names the initramfs file (`target/rig/initramfs-<label>.cpio`)
/// and the data disk (`target/rig/data-<label>.img`).
pub fn run(rig: &Rig, jobs: &[Job], label: &str, data: &DataUse) -> Result<Outcome> {
    let mem_mb = env_number("DORMOUSE_RIG_MEM_MB", DEFAULT_MEM_MB)?;
    let timeout = Duration::from_secs(env_number(
        "DORMOUSE_RIG_TIMEOUT_SECS",
        DEFAULT_TIMEOUT_SECS,
    )?);

    let (data_disk, missing) = prepare_data_disk(rig, label, data)?;
    let plan = match missing {
        Some(why) => DataPlan::Missing(why),
        None => DataPlan::Attached(
            data.env
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        ),
    };
    let start = Instant::now();
    let initramfs = rig.dir.join(format!("initramfs-{label}.cpio"));
    let size = build_initramfs(rig, jobs, &plan, &initramfs)?;
    util::say(format!(
        "initramfs: {} ({} MiB, {} binaries) in {}",
        initramfs.display(),
        size >> 20,
        jobs.len(),
        util::secs(start.elapsed())
    ));

    let mut cmd = Command::new("qemu-system-aarch64");
    cmd.args([
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        "max,pauth-impdef=on",
        "-smp",
        "2",
        "-m",
        &mem_mb.to_string(),
        "-nographic",
        "-no-reboot",
        // No NIC: the default virtio-net one needs ipxe's efi-virtio.rom, which a
        // --no-install-recommends qemu lacks, and nothing here uses it.
        "-nic",
        "none",
        "-kernel",
    ])
    .arg(&rig.host_image)
    .arg("-initrd")
    .arg(&initramfs)
    .args(data_disk.iter().flat_map(DataDisk::qemu_args))
    .args(["-append", "console=ttyAMA0 panic=-1 quiet"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    util::announce(&cmd);
    util::say(format!(
        "booting the emulated arm64 host (timeout {}s, DORMOUSE_RIG_TIMEOUT_SECS)",
        timeout.as_secs()
    ));

    let boot_start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| util::spawn_error(cmd.get_program(), e))?;
    let (tx, rx) = mpsc::channel();
    util::pump(child.stdout.take().expect("piped"), tx.clone(), Line::Out);
    util::pump(child.stderr.take().expect("piped"), tx, Line::Err);

    let mut parser = Parser::default();
    parser.outcome.expected = jobs.iter().map(|j| j.name.clone()).collect();
    let deadline = boot_start + timeout;
    let mut timed_out = false;
    let mut boot_time = None;
    loop {
        let now = Instant::now();
        let wait = if timed_out {
            Duration::from_secs(5)
        } else {
            deadline.saturating_duration_since(now)
        };
        match rx.recv_timeout(wait) {
            Ok(Line::Out(line)) => {
                println!("{line}");
                if boot_time.is_none() && line.contains("@@RIG HOST") {
                    boot_time = Some(boot_start.elapsed());
                }
                parser.line(&line);
            }
            Ok(Line::Err(line)) => eprintln!("qemu: {line}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if timed_out => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                println!();
                util::warn(format!(
                    "the emulated host is still running after {}s: killing qemu",
                    timeout.as_secs()
                ));
                kill(&mut child);
                timed_out = true;
            }
        }
    }
    let status = child
        .wait()
        .context(|| "waiting for qemu-system-aarch64".to_string())?;
    let mut outcome = parser.finish();
    outcome.qemu_status = Some(status);
    outcome.timed_out = timed_out.then_some(timeout);
    outcome.boot_time = boot_time;
    outcome.total_time = boot_start.elapsed();
    outcome.data_disk = data_disk;
    util::say(format!(
        "emulated host: reached /init after {}, ran for {} in all ({})",
        boot_time
            .map(util::secs)
            .unwrap_or_else(|| "(never)".to_string()),
        util::secs(outcome.total_time),
        util::status_text(status)
    ));
    match &outcome.data {
        DataState::Unavailable(why) => util::warn(format!(
            "the emulated host ran without its data disk: {why}"
        )),
        DataState::Ready(_) | DataState::Unknown => {}
    }
    if let Some(why) = &outcome.data_unclean {
        util::warn(format!("the emulated host's data disk: {why}"));
    }
    if outcome.kvm == Some(false) {
        util::warn("the emulated host has no /dev/kvm: tests that need KVM will fail");
    }
    if outcome.panic.is_some() && outcome.done {
        util::warn(
            "a `Kernel panic` line appeared, but the emulated host finished its run: \
             probably an L2 guest's console",
        );
    }
    Ok(outcome)
}

fn kill(child: &mut Child) {
    if let Err(e) = child.kill() {
        util::warn(format!("could not kill qemu (pid {}): {e}", child.id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Outcome {
        let mut p = Parser::default();
        for line in text.lines() {
            p.line(line);
        }
        p.finish()
    }

    #[test]
    fn full_run() {
        let o = parse(
            "booting\n@@RIG HOST kernel=6.12 cpus=2 kvm=yes\n\
             @@RIG BEGIN lib-dormouse\nrunning 2 tests\n\
             test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.1s\n\
             \n@@RIG END lib-dormouse rc=0 uptime=3.1\n\
             @@RIG BEGIN test-smoke\n\
             test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out\n\
             @@RIG END test-smoke rc=101 uptime=4.0\n\
             @@RIG BEGIN test-crash\nSegmentation fault\n@@RIG END test-crash rc=139\n\
             @@RIG DONE\n",
        );
        assert!(o.done);
        assert_eq!(o.kvm, Some(true));
        assert_eq!(o.binaries.len(), 3);
        assert_eq!(o.binaries[1].rc, Some(101));
        assert_eq!(
            o.counts(),
            Counts {
                passed: 3,
                failed: 3
            }
        );
        assert!(o.problems().is_empty());
    }

    #[test]
    fn host_died() {
        let mut o = parse(
            "@@RIG HOST kernel=6.12 cpus=2 kvm=yes\n@@RIG BEGIN lib-dormouse\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             [ 9.0] Kernel panic - not syncing: Attempted to kill init!\n",
        );
        o.expected = vec!["lib-dormouse".into()];
        assert!(!o.done);
        assert_eq!(o.binaries[0].rc, None);
        assert_eq!(
            o.counts(),
            Counts {
                passed: 1,
                failed: 1
            }
        );
        let problems = o.problems();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("panicked"));
    }

    #[test]
    fn never_booted() {
        let o = parse("");
        let problems = o.problems();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("never reached /init"));
    }

    #[test]
    fn marker_after_partial_line() {
        let o = parse("no newline at end@@RIG END x rc=0\n@@RIG DONE");
        assert_eq!(o.binaries[0].rc, Some(0));
        assert!(o.done);
    }

    #[test]
    fn script_quotes_args() {
        let jobs = [Job {
            name: "test-a".into(),
            path: PathBuf::from("/x"),
            args: vec!["--test-threads=1".into(), "it's".into()],
        }];
        let s = init_script(&jobs, &DataPlan::Missing("none".into()));
        assert!(s.contains(r"run test-a /rig/bin/test-a --test-threads=1 'it'\''s'"));
        assert!(s.contains("export DORMOUSE_GUEST_KERNEL=/rig/assets/Image"));
        assert!(s.ends_with("echo o >/proc/sysrq-trigger\n"));
    }

    /// Where the data disk's pieces sit in `/init`: mounted after the HOST
    /// marker and before the first job; its variables exported only in the
    /// branch where the mount worked; unmounted before DONE.
    #[test]
    fn script_data_disk() {
        let jobs = [Job {
            name: "bench-x".into(),
            path: PathBuf::from("/x"),
            args: vec![],
        }];
        let env = vec![("CRITERION_HOME".to_string(), "/data/criterion".to_string())];
        let s = init_script(&jobs, &DataPlan::Attached(env));
        let at = |needle: &str| {
            s.find(needle)
                .unwrap_or_else(|| panic!("no `{needle}` in:\n{s}"))
        };
        assert!(at("@@RIG HOST") < at("insmod /rig/host-modules/virtio_blk.ko"));
        assert!(at("mount -t ext4 -o noatime,noinit_itable /dev/vda /data") < at("run bench-x"));
        let ok = at("if why=$(data_disk 2>&1); then");
        let export = at("    export DORMOUSE_RIG_DATA=/data\n");
        let criterion = at("    export CRITERION_HOME=/data/criterion\n");
        let otherwise = at("echo \"@@RIG data disk unavailable: $(echo \"$why\"");
        assert!(ok < export && export < criterion && criterion < otherwise);
        assert!(otherwise < at("run bench-x"));
        assert!(at("umount /data") < at("echo \"@@RIG DONE\""));
        assert!(at("echo \"@@RIG DONE\"") < at("poweroff -f"));
        // Exactly one export of each, both inside the mounted branch.
        assert_eq!(s.matches("export DORMOUSE_RIG_DATA").count(), 1);
        assert_eq!(s.matches("export CRITERION_HOME").count(), 1);

        let s = init_script(&jobs, &DataPlan::Missing("DORMOUSE_RIG_DISK_MB=0".into()));
        assert!(s.contains("echo '@@RIG data disk unavailable: DORMOUSE_RIG_DISK_MB=0'\n"));
        assert!(!s.contains("insmod"));
        assert!(!s.contains("export DORMOUSE_RIG_DATA"));
        assert!(!s.contains("CRITERION_HOME"));
    }

    /// Both variants of `/init` parse as shell (`sh -n`), and the mounted
    /// branch's marker is what the parser reads back.
    #[test]
    fn script_syntax() {
        let jobs = [Job {
            name: "t".into(),
            path: PathBuf::from("/x"),
            args: vec!["a b".into()],
        }];
        for plan in [
            DataPlan::Attached(vec![("CRITERION_HOME".into(), "/data/c d".into())]),
            DataPlan::Missing("it's gone".into()),
        ] {
            let script = init_script(&jobs, &plan);
            let out = Command::new("sh")
                .args(["-n", "-c", &script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}\n{script}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn data_markers() {
        let o = parse(
            "@@RIG HOST kernel=6.12 cpus=2 kvm=yes\n@@RIG DATA /data 8000 MiB free\n@@RIG DONE\n",
        );
        assert_eq!(o.data, DataState::Ready("/data 8000 MiB free".into()));
        assert_eq!(o.data_unclean, None);
        let o = parse(
            "@@RIG HOST kernel=6.12 cpus=2 kvm=yes\n\
             @@RIG data disk unavailable: mount -t ext4 /dev/vda /data failed \n\
             @@RIG data disk unclean: umount /data failed (busy)\n@@RIG DONE\n",
        );
        assert_eq!(
            o.data,
            DataState::Unavailable("mount -t ext4 /dev/vda /data failed".into())
        );
        assert_eq!(
            o.data_unclean.as_deref(),
            Some("umount /data failed (busy)")
        );
        // Neither is a rig problem: the jobs ran.
        assert!(o.problems().is_empty());
        assert_eq!(parse("@@RIG DONE\n").data, DataState::Unknown);
    }
}
