//! Shared helpers for the integration tests.

// Each test binary uses a different subset of the helpers and payloads.
#![allow(dead_code)]

pub mod initramfs;
pub mod marker;
pub mod payloads;
pub mod session;

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A console sink the test can read back.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    /// Everything the guest printed so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Little-endian bytes of an instruction stream.
pub fn code(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The guest kernel and busybox that `cargo xtask` provides (in the
/// emulated host, or on an arm64 host after `cargo xtask setup`).
pub struct GuestAssets {
    /// The arm64 Linux Image.
    pub kernel: std::path::PathBuf,
    /// A static aarch64 busybox.
    pub busybox: Vec<u8>,
}

/// Reads the guest assets named by DORMOUSE_GUEST_KERNEL and
/// DORMOUSE_GUEST_BUSYBOX.
pub fn guest_assets() -> GuestAssets {
    let var = |name: &str| {
        std::env::var_os(name).unwrap_or_else(|| {
            panic!("{name} is not set: run the tests with `cargo xtask test`, or point it at the file `cargo xtask setup` put under target/rig/")
        })
    };
    let busybox_path = var("DORMOUSE_GUEST_BUSYBOX");
    GuestAssets {
        kernel: var("DORMOUSE_GUEST_KERNEL").into(),
        busybox: std::fs::read(&busybox_path)
            .unwrap_or_else(|e| panic!("reading {busybox_path:?}: {e}")),
    }
}

/// A scratch directory unique to this test, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/dormouse-<name>-<pid>`.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dormouse-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kernel modules (relative to $DORMOUSE_GUEST_MODULES) in load order.
pub mod modules {
    /// The virtio-mmio transport driver.
    pub const VIRTIO_MMIO: &[&str] = &["kernel/drivers/virtio/virtio_mmio.ko"];
    /// virtio-blk.
    pub const BLOCK: &[&str] = &["kernel/drivers/block/virtio_blk.ko"];
    /// virtio-net and what it needs.
    pub const NET: &[&str] = &[
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko",
    ];
    /// virtio-vsock and what it needs.
    pub const VSOCK: &[&str] = &[
        "kernel/net/vmw_vsock/vsock.ko",
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
    ];
}

/// Builds an initramfs with busybox, the given modules (loaded in order by
/// the init script before `script` runs) and `script`, in `dir`.
pub fn guest_initrd(
    dir: &std::path::Path,
    modules: &[&[&str]],
    script: &str,
) -> std::path::PathBuf {
    let assets = guest_assets();
    let root = std::env::var_os("DORMOUSE_GUEST_MODULES").unwrap_or_else(|| {
        panic!("DORMOUSE_GUEST_MODULES is not set: run the tests with `cargo xtask test`")
    });
    let mut fs = initramfs::Initramfs::new();
    fs.file("bin/busybox", 0o755, &assets.busybox);
    let mut preamble = String::from(
        "mount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs dev /dev\n",
    );
    for (i, rel) in modules.iter().flat_map(|m| m.iter()).enumerate() {
        let path = std::path::Path::new(&root).join(rel);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path:?}: {e}"));
        let name = format!("lib/modules/{i:02}.ko");
        fs.file(&name, 0o644, &bytes);
        preamble.push_str(&format!(
            "insmod /{name} || echo '@@insmod failed: {rel}'\n"
        ));
    }
    fs.init_script(&format!("{preamble}{script}"));
    fs.write_to(dir, "initrd.cpio").unwrap()
}

/// The value after `@@key=` in the guest's output.
pub fn fact(console: &str, key: &str) -> String {
    let tag = format!("@@{key}=");
    console
        .lines()
        .find_map(|l| {
            l.trim_end_matches('\r')
                .split_once(&tag)
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("guest did not report {key}; console:\n{console}"))
}

/// Boots `builder` (a kernel VM), runs it to its end on another thread,
/// and returns the exit and the console text. `on_ready` runs once the guest
/// printed `@@ready`, while the guest keeps running; then a line is written
/// to the guest's console input (init scripts `read` it before powering off).
pub fn run_guest(
    builder: dormouse::MicroVmBuilder,
    on_ready: impl FnOnce(&Console),
) -> (dormouse::ExitReason, String) {
    let console = Console::default();
    let (guest_input, mut host_input) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut vm = builder
        .serial_output(console.clone())
        .serial_input(guest_input)
        .build()
        .expect("building the VM");
    let runner = std::thread::spawn(move || vm.run());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
    while !console.text().contains("@@ready") {
        assert!(
            std::time::Instant::now() < deadline,
            "guest never got ready:\n{}",
            console.text()
        );
        if runner.is_finished() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if console.text().contains("@@ready") {
        on_ready(&console);
        let _ = host_input.write_all(b"done\n");
    }
    let exit = runner.join().expect("vCPU runner thread").expect("run()");
    (exit, console.text())
}

/// Prints a measurement to stderr directly, past libtest's output capture,
/// so it shows up in `cargo xtask test` logs.
pub fn report(line: &str) {
    let _ = std::io::stderr().write_all(format!("@@measure {line}\n").as_bytes());
}

/// A guest console driven line by line: what the guest prints is captured,
/// commands go to its console input.
pub struct Session {
    /// Everything the guest printed.
    pub console: Console,
    input: std::os::unix::net::UnixStream,
}

impl Session {
    /// A console sink and the guest end of its input, for a builder or a
    /// restore.
    pub fn new() -> (Self, std::os::unix::net::UnixStream) {
        let (guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
        (
            Self {
                console: Console::default(),
                input: host,
            },
            guest,
        )
    }

    /// Types a line into the guest's console.
    pub fn send(&mut self, line: &str) {
        self.input
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    /// Runs a shell command in the guest (the session scripts `eval` what
    /// follows `run`). The tty echoes what is typed, so every `@@` in the
    /// command is typed as `@""@`: only the command's output, not its echo,
    /// can then match [`wait_fact`](Self::wait_fact).
    pub fn run(&mut self, command: &str) {
        self.send(&format!("run {}", command.replace("@@", "@\"\"@")));
    }

    /// Waits for the guest to print a whole line `@@key=value` and returns
    /// the value.
    pub fn wait_fact(&self, key: &str, timeout: std::time::Duration) -> String {
        let tag = format!("@@{key}=");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let text = self.console.text();
            // Every piece but the last ended with a newline: whole lines.
            let mut lines: Vec<&str> = text.split('\n').collect();
            lines.pop();
            if let Some(value) = lines
                .iter()
                .find_map(|l| l.trim_end_matches('\r').split_once(&tag).map(|(_, v)| v))
            {
                return value.trim().to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "guest never printed {tag}; console:\n{text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Runs busybox (the rig's static one) in the host.
pub fn host_busybox(args: &[&str]) {
    let bb = std::env::var_os("DORMOUSE_GUEST_BUSYBOX").expect("DORMOUSE_GUEST_BUSYBOX");
    let status = std::process::Command::new(&bb).args(args).status().unwrap();
    assert!(status.success(), "busybox {args:?} failed: {status}");
}

/// Moves the calling test thread (and every thread and process it starts
/// from now on) into a network namespace of its own, with a TAP named
/// `name` whose host end has `host_cidr`.
pub fn isolated_tap(name: &str, host_cidr: &str) -> dormouse::devices::virtio::net::Tap {
    // The TAP driver, from the same kernel's modules (already loaded is fine).
    let modules = std::env::var_os("DORMOUSE_GUEST_MODULES").expect("DORMOUSE_GUEST_MODULES");
    let tun = std::path::Path::new(&modules).join("kernel/drivers/net/tun.ko");
    let bb = std::env::var_os("DORMOUSE_GUEST_BUSYBOX").expect("DORMOUSE_GUEST_BUSYBOX");
    let _ = std::process::Command::new(&bb)
        .arg("insmod")
        .arg(&tun)
        .status();
    // SAFETY: unshare(2) takes no pointers; it only changes this thread's
    // network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    host_busybox(&["ip", "link", "set", "lo", "up"]);
    let tap = dormouse::devices::virtio::net::Tap::open(name).expect("opening the TAP");
    host_busybox(&["ip", "addr", "add", host_cidr, "dev", name]);
    host_busybox(&["ip", "link", "set", name, "up"]);
    tap
}

/// Asserts that a VM's guest RAM equals the memory file of a snapshot.
pub fn assert_memory_equals_file(vm: &dormouse::MicroVm, file: &std::path::Path) {
    use std::io::Read;

    use vm_memory::Bytes;
    let mut f = std::fs::File::open(file).unwrap();
    let size = vm.config().memory_size;
    let mut from_vm = vec![0u8; 1 << 20];
    let mut from_file = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < size {
        let n =
            usize::try_from(size - offset).map_or(from_vm.len(), |left| left.min(from_vm.len()));
        vm.memory()
            .read_slice(
                &mut from_vm[..n],
                dormouse::GuestAddress(dormouse::DRAM_START.0 + offset),
            )
            .unwrap();
        f.read_exact(&mut from_file[..n]).unwrap();
        if from_vm[..n] != from_file[..n] {
            let at = from_vm[..n]
                .iter()
                .zip(&from_file[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "guest memory differs from {} at offset {:#x}",
                file.display(),
                offset + at as u64
            );
        }
        offset += n as u64;
    }
}

/// Sends the `log` records of dormouse to stderr, with the time since the
/// first one, when RUST_LOG is set (`error`, `warn`, `info`, `debug`).
pub fn init_logging() {
    struct Stderr(std::time::Instant);
    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            use std::io::Write;
            if self.enabled(record.metadata()) {
                // Straight to stderr, not through libtest's capture: a
                // forked child (tests/session_restart.rs) never hands its
                // captured output back.
                let line = format!(
                    "[{:9.3} {} {:?}] {}\n",
                    self.0.elapsed().as_secs_f64(),
                    record.level(),
                    std::thread::current().name().unwrap_or("?"),
                    record.args()
                );
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: std::sync::OnceLock<Stderr> = std::sync::OnceLock::new();
    let Ok(level) = std::env::var("RUST_LOG") else {
        return;
    };
    let level = level.parse().unwrap_or(log::LevelFilter::Info);
    let logger = LOGGER.get_or_init(|| Stderr(std::time::Instant::now()));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// Runs the paused VM (the DIRTY payload, tests/payloads/dirty.S) until the
/// guest wrote `generation` into the first word of `pages` pages (from
/// DRAM + 0x2000), then pauses it again.
#[cfg(target_arch = "aarch64")]
pub fn dirty(vm: &mut dormouse::MicroVm, pages: u64, generation: u64) {
    use vm_memory::Bytes;
    let ctl = |word: u64| dormouse::GuestAddress(dormouse::DRAM_START.0 + 0x1000 + 8 * word);
    vm.memory().write_obj(pages, ctl(0)).unwrap();
    vm.memory().write_obj(generation, ctl(1)).unwrap();
    vm.resume().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while vm.memory().read_obj::<u64>(ctl(2)).unwrap() != generation {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not dirty its pages"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    vm.pause().unwrap();
}
