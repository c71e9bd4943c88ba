//! `cargo xtask setup`: installs the Debian packages the rig needs and
//! downloads the emulated host's kernel, its modules and a static busybox into
//! the cache `target/rig/`. Idempotent: a second run makes no apt calls.
//!
//! Layout of the cache:
//!
//! ```text
//! target/rig/host/Image            the emulated host's kernel (plain arm64 Image)
//! target/rig/host/modules/<ver>/   its whole modules tree, .ko decompressed
//! target/rig/host/kernel-package   the Debian package it came from
//! target/rig/guest/Image           the same kernel, used as the L2 guest kernel
//! target/rig/guest/modules/        the few modules guests (and the host) need
//! target/rig/busybox               static aarch64 busybox
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::util::{self, bail, Context, Result};

/// The Debian release whose backports carry the 6.12 kernel and QEMU 10.
const BACKPORTS: &str = "bookworm-backports";
const BACKPORTS_LINE: &str = "deb http://deb.debian.org/debian bookworm-backports main";
const BACKPORTS_FILE: &str = "/etc/apt/sources.list.d/bookworm-backports.list";
/// Metapackage that depends on the current cloud-arm64 kernel image.
const KERNEL_META: &str = "linux-image-cloud-arm64:arm64";
const BUSYBOX_PACKAGE: &str = "busybox-static:arm64";

/// Packages that must come from backports (the image's qemu-utils is from
/// backports and bookworm's qemu-system 7.2 conflicts with it).
const X86_BACKPORTS_PACKAGES: &[&str] = &["qemu-system-arm", "qemu-user-static"];
/// Packages from bookworm (and its security updates).
const X86_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev:arm64",
    "rust-web-clippy",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "binutils-aarch64-linux-gnu",
    "cpio",
    "e2fsprogs",
    "xz-utils",
];
/// On a real arm64 host nothing is cross-compiled or emulated.
const ARM64_PACKAGES: &[&str] = &["cpio", "e2fsprogs", "xz-utils"];

/// Modules (paths under `lib/modules/<ver>/`) copied for guests: a directory
/// means everything below it. Whatever of these exists is taken.
const GUEST_MODULES: &[&str] = &[
    "kernel/drivers/virtio",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/net/core/failover.ko",
    "kernel/net/vmw_vsock",
    "kernel/drivers/net/tun.ko",
    // The host side of tests/faults.rs: a loop-mounted ext4 it can break.
    "kernel/drivers/block/loop.ko",
];

/// Paths of everything `setup` provides.
pub struct Rig {
    pub dir: PathBuf,
    pub host_image: PathBuf,
    pub host_modules: PathBuf,
    pub guest_image: PathBuf,
    pub guest_modules: PathBuf,
    pub busybox: PathBuf,
    /// An ext4 image made with `mkfs.ext4 -d`, holding /hello.txt.
    pub test_disk: PathBuf,
    /// The guest-side vsock tool (examples/guest_vsock.rs), cross-built by
    /// `cargo xtask test`.
    pub guest_vsock: PathBuf,
}

impl Rig {
    pub fn paths() -> Rig {
        let dir = util::target_dir().join("rig");
        Rig {
            host_image: dir.join("host/Image"),
            host_modules: dir.join("host/modules"),
            guest_image: dir.join("guest/Image"),
            guest_modules: dir.join("guest/modules"),
            busybox: dir.join("busybox"),
            test_disk: dir.join("guest/disk.ext4"),
            guest_vsock: dir.join("guest/guest_vsock"),
            dir,
        }
    }

    fn kernel_stamp(&self) -> PathBuf {
        self.dir.join("host/kernel-package")
    }

    /// Environment variables telling tests where the guest assets are, for
    /// tests running directly on this machine (a real arm64 host).
    pub fn native_guest_env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("DORMOUSE_GUEST_KERNEL", self.guest_image.clone()),
            ("DORMOUSE_GUEST_BUSYBOX", self.busybox.clone()),
            ("DORMOUSE_GUEST_MODULES", self.guest_modules.clone()),
            ("DORMOUSE_TEST_DISK", self.test_disk.clone()),
            ("DORMOUSE_GUEST_VSOCK_TOOL", self.guest_vsock.clone()),
        ]
    }
}

/// `cargo xtask setup`: packages, then the cached downloads.
pub fn setup() -> Result<Rig> {
    let start = Instant::now();
    let mut apt = Apt::default();
    ensure_packages(&mut apt)?;
    let rig = ensure_assets(&mut apt)?;
    if apt.used {
        util::say(format!("setup done in {}", util::secs(start.elapsed())));
    } else {
        util::say(format!(
            "setup: all packages and rig assets present in {} (nothing to do, {})",
            rig.dir.display(),
            util::secs(start.elapsed())
        ));
    }
    Ok(rig)
}

/// Only the packages (for `lint`, which needs the cross toolchain and
/// binutils but no kernel).
pub fn setup_packages() -> Result<()> {
    ensure_packages(&mut Apt::default())
}

/// Tracks whether apt was called in this run (and `apt-get update` done).
#[derive(Default)]
struct Apt {
    used: bool,
    updated: bool,
    sources_checked: bool,
}

impl Apt {
    /// Makes sure dpkg knows arm64 and apt has bookworm-backports; if either
    /// had to be added, refreshes apt's lists.
    fn ensure_sources(&mut self) -> Result<()> {
        if self.sources_checked {
            return Ok(());
        }
        self.sources_checked = true;
        let need_arch = !cfg!(target_arch = "aarch64") && !has_arm64_arch();
        let need_backports = !has_backports_source();
        if !need_arch && !need_backports {
            return Ok(());
        }
        if !util::is_root() {
            bail!(
                "apt needs the arm64 architecture and the {BACKPORTS} source: run \
                 `sudo cargo xtask setup`, or as root: `dpkg --add-architecture arm64`, add \
                 `{BACKPORTS_LINE}` to {BACKPORTS_FILE}, `apt-get update`"
            );
        }
        if need_arch {
            let mut cmd = self.command("dpkg");
            cmd.args(["--add-architecture", "arm64"]);
            util::run(&mut cmd, "could not enable the arm64 architecture in dpkg")?;
        }
        if need_backports {
            add_backports_source()?;
        }
        self.updated = false;
        self.update()
    }

    fn command(&mut self, program: &str) -> Command {
        self.used = true;
        let mut cmd = Command::new(program);
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        let mut cmd = self.command("apt-get");
        cmd.args(["update", "-q", "-o", "Dpkg::Use-Pty=0"]);
        // An unreachable third-party source makes `apt-get update` fail as a
        // whole although Debian's lists were refreshed: warn and go on; the
        // install or download that follows fails clearly if lists are missing.
        if let Err(e) = util::run(
            &mut cmd,
            "apt-get could not refresh all package lists; check that Debian's mirror is \
             reachable and that /etc/apt/sources.list.d/ is sane",
        ) {
            util::warn(format!("{e}; continuing with the lists apt has"));
        }
        self.updated = true;
        Ok(())
    }

    fn install(&mut self, packages: &[&str], target_release: Option<&str>) -> Result<()> {
        let mut cmd = self.command("apt-get");
        cmd.args(["install", "-y", "-q", "--no-install-recommends"]);
        cmd.args(["-o", "Dpkg::Use-Pty=0"]);
        if let Some(release) = target_release {
            cmd.args(["-t", release]);
        }
        cmd.args(packages);
        util::run(
            &mut cmd,
            "apt-get could not install the rig's packages; read apt's message above \
             (a conflict with an installed qemu means qemu must come from bookworm-backports)",
        )
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .output()
        .map(|o| o.status.success() && o.stdout.starts_with(b"ii"))
        .unwrap_or(false)
}

fn ensure_packages(apt: &mut Apt) -> Result<()> {
    let arm64_host = cfg!(target_arch = "aarch64");
    let (backports, main): (&[&str], &[&str]) = if arm64_host {
        (&[], ARM64_PACKAGES)
    } else {
        (X86_BACKPORTS_PACKAGES, X86_PACKAGES)
    };
    let missing_bpo: Vec<&str> = backports
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    let missing_main: Vec<&str> = main.iter().copied().filter(|p| !installed(p)).collect();
    if missing_bpo.is_empty() && missing_main.is_empty() {
        return Ok(());
    }
    let all_missing: Vec<&str> = missing_bpo.iter().chain(&missing_main).copied().collect();
    util::say(format!(
        "setup: missing packages: {}",
        all_missing.join(" ")
    ));
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "apt-get is not available: this rig needs Debian 12 (bookworm) with the packages {} \
             (qemu ones from bookworm-backports)",
            all_missing.join(" ")
        );
    }
    if !util::is_root() {
        bail!(
            "installing packages needs root: run `sudo cargo xtask setup`, or install them yourself:\n  \
             sudo apt-get install -t bookworm-backports {}\n  sudo apt-get install {}",
            missing_bpo.join(" "),
            missing_main.join(" ")
        );
    }
    apt.ensure_sources()?;
    apt.update()?;
    if !missing_bpo.is_empty() {
        apt.install(&missing_bpo, Some(BACKPORTS))?;
    }
    if !missing_main.is_empty() {
        apt.install(&missing_main, None)?;
    }
    let still_missing: Vec<&str> = all_missing
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "apt-get finished but these packages are still not installed: {}; \
             try `apt-get install` on them by hand to see why",
            still_missing.join(" ")
        );
    }
    Ok(())
}

fn has_arm64_arch() -> bool {
    let native = Command::new("dpkg").arg("--print-architecture").output();
    let foreign = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output();
    [native, foreign].into_iter().any(|out| {
        out.map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .any(|a| a == "arm64")
        })
        .unwrap_or(false)
    })
}

/// Whether any apt source (one-line or deb822 format) names bookworm-backports.
fn has_backports_source() -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext == "list" || ext == "sources" {
                files.push(path);
            }
        }
    }
    files.iter().any(|file| {
        std::fs::read_to_string(file)
            .map(|text| {
                text.lines().any(|line| {
                    let line = line.trim();
                    !line.starts_with('#') && line.contains(BACKPORTS)
                })
            })
            .unwrap_or(false)
    })
}

fn add_backports_source() -> Result<()> {
    util::say(format!(
        "setup: adding `{BACKPORTS_LINE}` to {BACKPORTS_FILE}"
    ));
    std::fs::write(BACKPORTS_FILE, format!("{BACKPORTS_LINE}\n")).context(|| {
        format!("cannot write {BACKPORTS_FILE} (run as root, or add the line `{BACKPORTS_LINE}` yourself)")
    })
}

fn ensure_assets(apt: &mut Apt) -> Result<Rig> {
    let rig = Rig::paths();
    util::mkdir(&rig.dir)?;
    let kernel_ready = rig.kernel_stamp().is_file()
        && rig.host_image.is_file()
        && rig.guest_image.is_file()
        && rig.guest_modules.is_dir();
    if !kernel_ready || !rig.busybox.is_file() {
        apt.ensure_sources()?;
    }
    if !kernel_ready {
        fetch_kernel(apt, &rig)?;
    } else {
        add_new_guest_modules(&rig)?;
    }
    if !rig.busybox.is_file() {
        fetch_busybox(apt, &rig)?;
    }
    if !rig.test_disk.is_file() {
        make_test_disk(&rig)?;
    }
    Ok(rig)
}

/// What the test disk's /hello.txt holds (tests/virtio_block.rs checks it).
const TEST_DISK_HELLO: &str = "hello from the x86 side\n";

/// Makes the ext4 test disk with `mkfs.ext4 -d` from a directory holding
/// /hello.txt: the guest mounts it and reads the file back.
fn make_test_disk(rig: &Rig) -> Result<()> {
    let scratch = Scratch::new(rig, "disk")?;
    let root = scratch.0.join("root");
    util::mkdir(&root)?;
    std::fs::write(root.join("hello.txt"), TEST_DISK_HELLO)
        .context(|| format!("writing {}", root.join("hello.txt").display()))?;
    let image = scratch.0.join("disk.ext4");
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "dormouse-test", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("32M");
    util::run(
        &mut cmd,
        "mkfs.ext4 comes with e2fsprogs: run `cargo xtask setup` (or apt-get install e2fsprogs)",
    )?;
    if let Some(parent) = rig.test_disk.parent() {
        util::mkdir(parent)?;
    }
    std::fs::rename(&image, &rig.test_disk)
        .context(|| format!("moving the test disk to {}", rig.test_disk.display()))?;
    util::say(format!(
        "made the ext4 test disk {}",
        rig.test_disk.display()
    ));
    Ok(())
}

/// A scratch directory under the rig cache, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(rig: &Rig, name: &str) -> Result<Scratch> {
        let dir = rig.dir.join(format!("tmp-{name}"));
        util::remove_all(&dir)?;
        util::mkdir(&dir)?;
        // apt-get download drops root privileges to `_apt`, which must be able
        // to write here (otherwise apt warns and downloads unsandboxed).
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `f`; if it fails and apt's lists were not refreshed in this run
/// (they may be stale: a newer kernel replaced the one they name), runs
/// `apt-get update` and tries once more.
fn with_fresh_lists<T>(apt: &mut Apt, mut f: impl FnMut(&mut Apt) -> Result<T>) -> Result<T> {
    match f(apt) {
        Ok(value) => Ok(value),
        Err(e) if !apt.updated => {
            util::say(format!(
                "setup: {e}
setup: refreshing apt's package lists and trying again"
            ));
            apt.update()?;
            f(apt)
        }
        Err(e) => Err(e),
    }
}

/// `apt-get download PACKAGE` into `dir`; returns the .deb's path.
fn download(apt: &mut Apt, package: &str, dir: &Path) -> Result<PathBuf> {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    let mut cmd = apt.command("apt-get");
    cmd.args(["download", "-q", package]).current_dir(dir);
    util::run(
        &mut cmd,
        &format!(
            "could not download {package}; check that the arm64 architecture is enabled \
             (`dpkg --add-architecture arm64`) and {BACKPORTS} is an apt source, then \
             `apt-get update` and rerun `cargo xtask setup`"
        ),
    )?;
    let debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    match debs.as_slice() {
        [deb] => Ok(deb.clone()),
        _ => bail!(
            "expected exactly one .deb in {} after downloading {package}, found {}",
            dir.display(),
            debs.len()
        ),
    }
}

fn extract(deb: &Path, into: &Path) -> Result<()> {
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("-x").arg(deb).arg(into);
    util::run(
        &mut cmd,
        "could not unpack the downloaded package; delete target/rig and rerun",
    )
}

/// Asks apt which versioned kernel package the metapackage currently points to.
fn resolve_kernel_package(apt: &mut Apt) -> Result<String> {
    let mut cmd = apt.command("apt-cache");
    cmd.args(["depends", "-t", BACKPORTS, KERNEL_META]);
    let out = util::capture(
        &mut cmd,
        &format!(
            "apt-cache could not resolve {KERNEL_META}: enable arm64 (`dpkg --add-architecture \
             arm64`), add `{BACKPORTS_LINE}` to /etc/apt/sources.list.d/, run `apt-get update`, \
             then rerun `cargo xtask setup`"
        ),
    )?;
    parse_kernel_depends(&out).ok_or_else(|| {
        util::Error::msg(format!(
            "`apt-cache depends -t {BACKPORTS} {KERNEL_META}` named no linux-image package:\n{out}"
        ))
    })
}

/// Picks `linux-image-6.12.x-cloud-arm64:arm64` out of `apt-cache depends` output.
fn parse_kernel_depends(out: &str) -> Option<String> {
    out.lines().find_map(|line| {
        let rest = line
            .trim()
            .trim_start_matches('|')
            .strip_prefix("Depends:")?;
        let name = rest.trim();
        (name.starts_with("linux-image-") && !name.starts_with('<')).then(|| {
            if name.contains(':') {
                name.to_string()
            } else {
                format!("{name}:arm64")
            }
        })
    })
}

fn fetch_kernel(apt: &mut Apt, rig: &Rig) -> Result<()> {
    let start = Instant::now();
    let scratch = Scratch::new(rig, "kernel")?;
    let (package, deb) = with_fresh_lists(apt, |apt| {
        let package = resolve_kernel_package(apt)?;
        util::say(format!(
            "setup: fetching the emulated host's kernel {package}"
        ));
        let deb = download(apt, &package, &scratch.0)?;
        Ok((package, deb))
    })?;
    let root = scratch.0.join("root");
    extract(&deb, &root)?;

    // The kernel image: a plain arm64 Image ("ARMd" magic at offset 0x38).
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .context(|| format!("{} has no boot/ directory", deb.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| util::Error::msg(format!("{} has no boot/vmlinuz-*", deb.display())))?;
    check_arm64_image(&vmlinuz)?;

    // Its modules, decompressed (busybox insmod wants plain .ko files).
    let modules_parent = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_dir())
        .ok_or_else(|| util::Error::msg(format!("{} has no lib/modules/", deb.display())))?;
    let version_dir = std::fs::read_dir(&modules_parent)
        .context(|| format!("cannot list {}", modules_parent.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            util::Error::msg(format!("{} has no lib/modules/<version>/", deb.display()))
        })?;
    let version = version_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    decompress_modules(&version_dir)?;

    // Move everything into place; the stamp goes last.
    util::remove_all(&rig.kernel_stamp())?;
    util::remove_all(&rig.host_modules)?;
    util::remove_all(&rig.guest_modules)?;
    util::copy_file(&vmlinuz, &rig.host_image)?;
    util::copy_file(&vmlinuz, &rig.guest_image)?;
    util::mkdir(&rig.host_modules)?;
    let host_version_dir = rig.host_modules.join(&version);
    std::fs::rename(&version_dir, &host_version_dir)
        .context(|| format!("cannot move the modules to {}", host_version_dir.display()))?;
    let copied = copy_guest_modules(&host_version_dir, &rig.guest_modules)?;
    std::fs::write(rig.kernel_stamp(), format!("{package}\n{version}\n"))
        .context(|| format!("cannot write {}", rig.kernel_stamp().display()))?;
    util::say(format!(
        "setup: kernel {version} -> {} and {}, modules -> {} ({copied} guest modules in {}) in {}",
        rig.host_image.display(),
        rig.guest_image.display(),
        host_version_dir.display(),
        rig.guest_modules.display(),
        util::secs(start.elapsed())
    ));
    Ok(())
}

fn check_arm64_image(path: &Path) -> Result<()> {
    let data = std::fs::read(path).context(|| format!("cannot read {}", path.display()))?;
    if data.len() > 0x40 && &data[0x38..0x3c] == b"ARMd" {
        return Ok(());
    }
    if data.starts_with(&[0x1f, 0x8b]) {
        bail!(
            "{} is gzip-compressed; this rig expects Debian's plain arm64 Image \
             (the kernel packaging changed: teach xtask/src/setup.rs to gunzip it)",
            path.display()
        );
    }
    bail!(
        "{} is not an arm64 Linux Image (no ARMd magic)",
        path.display()
    )
}

/// Lists files under `dir` whose name ends with `suffix`.
fn files_with_suffix(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let kind = entry
            .file_type()
            .context(|| format!("cannot stat {}", path.display()))?;
        if kind.is_dir() {
            files_with_suffix(&path, suffix, out)?;
        } else if path.to_string_lossy().ends_with(suffix) {
            out.push(path);
        }
    }
    Ok(())
}

fn decompress_modules(dir: &Path) -> Result<()> {
    let mut compressed = Vec::new();
    files_with_suffix(dir, ".ko.xz", &mut compressed)?;
    let mut zstd = Vec::new();
    files_with_suffix(dir, ".ko.zst", &mut zstd)?;
    if !zstd.is_empty() {
        bail!(
            "the kernel package ships .ko.zst modules ({}); teach xtask/src/setup.rs to \
             decompress them with `zstd -d` (and add zstd to the packages)",
            zstd[0].display()
        );
    }
    util::say(format!(
        "setup: decompressing {} modules with xz -d",
        compressed.len()
    ));
    for chunk in compressed.chunks(256) {
        let mut cmd = Command::new("xz");
        cmd.arg("-d").arg("-f").args(chunk);
        let status = cmd
            .status()
            .map_err(|e| util::spawn_error(cmd.get_program(), e))?;
        if !status.success() {
            bail!(
                "`xz -d` failed on kernel modules under {} ({}); install xz-utils and rerun",
                dir.display(),
                util::status_text(status)
            );
        }
    }
    Ok(())
}

/// Copies modules added to [`GUEST_MODULES`] since the cache was made from
/// the host's cached modules tree (no download): an older cache gets them.
fn add_new_guest_modules(rig: &Rig) -> Result<()> {
    let Some(version_dir) = std::fs::read_dir(&rig.host_modules)
        .context(|| format!("cannot list {}", rig.host_modules.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
    else {
        return Ok(());
    };
    let missing = GUEST_MODULES
        .iter()
        .any(|rel| version_dir.join(rel).exists() && !rig.guest_modules.join(rel).exists());
    if missing {
        let copied = copy_guest_modules(&version_dir, &rig.guest_modules)?;
        util::say(format!(
            "setup: {copied} guest modules refreshed in {}",
            rig.guest_modules.display()
        ));
    }
    Ok(())
}

/// Copies the guest module subset, keeping paths relative to `lib/modules/<ver>/`.
fn copy_guest_modules(version_dir: &Path, dest: &Path) -> Result<usize> {
    util::mkdir(dest)?;
    let mut copied = 0;
    for rel in GUEST_MODULES {
        let from = version_dir.join(rel);
        if from.is_dir() {
            let mut files = Vec::new();
            files_with_suffix(&from, ".ko", &mut files)?;
            for file in files {
                let rel_file = file.strip_prefix(version_dir).unwrap_or(&file);
                util::copy_file(&file, &dest.join(rel_file))?;
                copied += 1;
            }
        } else if from.is_file() {
            util::copy_file(&from, &dest.join(rel))?;
            copied += 1;
        }
    }
    if copied == 0 {
        bail!(
            "none of the guest modules ({}) exist under {}",
            GUEST_MODULES.join(", "),
            version_dir.display()
        );
    }
    Ok(copied)
}

fn fetch_busybox(apt: &mut Apt, rig: &Rig) -> Result<()> {
    util::say(format!("setup: fetching {BUSYBOX_PACKAGE}"));
    let scratch = Scratch::new(rig, "busybox")?;
    let deb = with_fresh_lists(apt, |apt| download(apt, BUSYBOX_PACKAGE, &scratch.0))?;
    let root = scratch.0.join("root");
    extract(&deb, &root)?;
    let binary = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| util::Error::msg(format!("{} has no bin/busybox", deb.display())))?;
    let header = std::fs::read(&binary).context(|| format!("cannot read {}", binary.display()))?;
    // ELF, e_machine = EM_AARCH64 (183).
    if !(header.starts_with(b"\x7fELF") && header.len() > 20 && header[18] == 183) {
        bail!("{} is not an aarch64 ELF binary", binary.display());
    }
    let tmp = rig.busybox.with_extension("partial");
    util::copy_file(&binary, &tmp)?;
    std::fs::rename(&tmp, &rig.busybox)
        .context(|| format!("cannot move busybox to {}", rig.busybox.display()))?;
    util::say(format!("setup: busybox -> {}", rig.busybox.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_depends() {
        let out = "linux-image-cloud-arm64:arm64\n  Depends: linux-image-6.12.95+deb12-cloud-arm64:arm64\n";
        assert_eq!(
            parse_kernel_depends(out).as_deref(),
            Some("linux-image-6.12.95+deb12-cloud-arm64:arm64")
        );
        let out = "linux-image-cloud-arm64\n |Depends: linux-image-6.1.0-9-cloud-arm64\n";
        assert_eq!(
            parse_kernel_depends(out).as_deref(),
            Some("linux-image-6.1.0-9-cloud-arm64:arm64")
        );
        assert_eq!(
            parse_kernel_depends("x\n  Depends: <linux-image-virtual>\n"),
            None
        );
    }
}
