//! A session image of a small Linux guest service for the session tests,
//! bench and demo: `guest_vsock serve` on vsock port [`SERVICE_PORT`], its
//! files on an ext4 disk mounted at /mnt, ready when it connects to host
//! port 1025.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::session::{Endpoint, Image, ImageSpec};

use super::{guest_assets, guest_initrd, modules};

/// The guest port the service listens on.
pub const SERVICE_PORT: u32 = 5000;

/// The init script of the service guest.
pub const SERVICE_INIT: &str = "mount -t ext4 /dev/vda /mnt || echo '@@mount failed'\n\
     guest_vsock serve 5000 /mnt 1025 &\n\
     while true; do sleep 3600; done\n";

/// An initramfs with busybox, the modules and `guest_vsock`.
pub fn service_initrd(dir: &Path, script: &str) -> std::path::PathBuf {
    tool_initrd(
        dir,
        &[modules::VIRTIO_MMIO, modules::BLOCK, modules::VSOCK],
        script,
    )
}

/// An initramfs with busybox, `modules` (loaded in order) and the guest
/// tool `guest_vsock` (examples/guest_vsock.rs), running `script`.
pub fn tool_initrd(dir: &Path, modules: &[&[&str]], script: &str) -> std::path::PathBuf {
    let path = guest_initrd(dir, modules, script);
    let mut cpio = std::fs::read(&path).unwrap();
    let tool = std::env::var_os("DORMOUSE_GUEST_VSOCK_TOOL")
        .expect("DORMOUSE_GUEST_VSOCK_TOOL is not set: run the tests with `cargo xtask test`");
    let mut extra = super::initramfs::Initramfs::new();
    extra.file("bin/guest_vsock", 0o755, &std::fs::read(tool).unwrap());
    let extra = extra.write_to(dir, "tool.cpio").unwrap();
    cpio.extend_from_slice(&std::fs::read(extra).unwrap());
    std::fs::write(&path, cpio).unwrap();
    path
}

/// The spec of the service image: `memory_mib`, one vCPU, a copy of the
/// test disk.
pub fn service_spec(dir: &Path, memory_mib: u64) -> ImageSpec {
    let disk = std::env::var_os("DORMOUSE_TEST_DISK")
        .expect("DORMOUSE_TEST_DISK is not set: run the tests with `cargo xtask test`");
    ImageSpec::new(guest_assets().kernel)
        .initrd(service_initrd(dir, SERVICE_INIT))
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
        .memory_mib(memory_mib)
        .disk(disk)
        .ready_timeout(Duration::from_secs(600))
}

/// Creates the service image in `dir/image` (work files in `dir`).
pub fn service_image(dir: &Path, memory_mib: u64) -> Image {
    Image::create(dir.join("image"), &service_spec(dir, memory_mib)).expect("creating the image")
}

/// Sends one request line to an endpoint and returns the answer line.
pub fn ask(endpoint: &Endpoint, request: &str) -> String {
    let timeout = Some(Duration::from_secs(300));
    let (mut writer, reader): (Box<dyn Write>, Box<dyn std::io::Read>) = match endpoint {
        Endpoint::Tcp { addr, .. } => {
            let s = std::net::TcpStream::connect(addr).expect("connecting to the endpoint");
            s.set_read_timeout(timeout).unwrap();
            (Box::new(s.try_clone().unwrap()), Box::new(s))
        }
        Endpoint::Unix { path, .. } => {
            let s =
                std::os::unix::net::UnixStream::connect(path).expect("connecting to the endpoint");
            s.set_read_timeout(timeout).unwrap();
            (Box::new(s.try_clone().unwrap()), Box::new(s))
        }
    };
    writeln!(writer, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(reader).read_line(&mut line).unwrap();
    line.trim_end().to_owned()
}

/// `pid=<p> count=<n>` -> (p, n).
pub fn pid_count(answer: &str) -> (u32, u64) {
    let field = |k: &str| {
        answer
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {answer:?}"))
            .to_owned()
    };
    (
        field("pid=").parse().unwrap(),
        field("count=").parse().unwrap(),
    )
}

/// The host process's resident memory in bytes.
pub fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}
