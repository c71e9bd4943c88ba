//! The emulated host's data disk: a sparse raw ext4 image made on this side
//! before each boot, attached to QEMU as a virtio-blk (PCI) drive, mounted
//! at `/data` by the rig's `/init`, and read back after QEMU exits with
//! `debugfs` (no root, no loop mount).
//!
//! Jobs see `DORMOUSE_RIG_DATA=/data` when the disk is mounted: snapshot
//! files written there live on a real block device, so a bench can drop the
//! emulated host's page cache (`echo 3 > /proc/sys/vm/drop_caches`) and
//! measure a cold restore.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, bail, Context, Result};

/// Size of the data disk unless `DORMOUSE_RIG_DISK_MB` says otherwise.
pub const DEFAULT_DISK_MB: u64 = 8192;
/// The variable that sizes the disk; `0` boots without one.
pub const DISK_MB_VAR: &str = "DORMOUSE_RIG_DISK_MB";
/// Where `/init` mounts the disk inside the emulated host.
pub const MOUNT_POINT: &str = "/data";
/// The variable that tells jobs where the mounted disk is.
pub const DATA_VAR: &str = "DORMOUSE_RIG_DATA";
/// The filesystem label `mkfs.ext4` gives the disk.
const LABEL: &str = "dormouse-data";
/// The block device the disk becomes inside the emulated host: it is the
/// host's only virtio disk.
pub const GUEST_DEVICE: &str = "/dev/vda";
/// The host kernel's virtio-blk driver, relative to `modules/<version>/`
/// (a module in Debian's cloud-arm64 kernel; virtio-pci is built in).
pub const VIRTIO_BLK_MODULE: &str = "kernel/drivers/block/virtio_blk.ko";
/// Where the initramfs carries that module.
pub const VIRTIO_BLK_IN_INITRAMFS: &str = "rig/host-modules/virtio_blk.ko";

/// A formatted data disk, ready to attach.
#[derive(Debug, Clone)]
pub struct DataDisk {
    pub path: PathBuf,
    /// QEMU's `cache=` mode: `none` (O_DIRECT: the x86 page cache does not
    /// turn the emulated host's cold reads into memory copies) when the
    /// file system allows it, else `writeback`.
    pub cache: &'static str,
}

impl DataDisk {
    /// QEMU arguments that attach it as a virtio-blk PCI device.
    pub fn qemu_args(&self) -> Vec<String> {
        vec![
            "-drive".to_string(),
            format!(
                "file={},format=raw,if=none,id=data,cache={}",
                qemu_escape(&self.path.to_string_lossy()),
                self.cache
            ),
            "-device".to_string(),
            "virtio-blk-pci,drive=data".to_string(),
        ]
    }
}

/// QEMU option values separate on `,`; a literal comma is written twice.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// Parses `DORMOUSE_RIG_DISK_MB`: unset = the default, `0` = no disk.
pub fn size_from_env(value: Option<&str>) -> Result<Option<u64>> {
    let Some(value) = value else {
        return Ok(Some(DEFAULT_DISK_MB));
    };
    match value.trim().parse::<u64>() {
        Ok(0) => Ok(None),
        // ext4 needs a few MiB for its metadata and journal; 64 MiB is the
        // smallest size that leaves room for anything.
        Ok(mb) if mb < 64 => bail!(
            "{DISK_MB_VAR}={value:?} is too small for an ext4 data disk: use at least 64, \
             or 0 to boot without one"
        ),
        // 16 TiB: ext4's limit with 4 KiB blocks and no 64bit feature is
        // well past anything a sparse test disk needs.
        Ok(mb) if mb > 16 << 20 => {
            bail!("{DISK_MB_VAR}={value:?} is larger than 16 TiB; pick a smaller size")
        }
        Ok(mb) => Ok(Some(mb)),
        Err(_) => bail!(
            "{DISK_MB_VAR}={value:?} is not a whole number of MiB; unset it (default \
             {DEFAULT_DISK_MB}), or set 0 to boot without a data disk"
        ),
    }
}

/// Makes a fresh sparse ext4 image of `size_mb` MiB at `path` (whatever
/// was there is replaced), empty or holding a copy of the directory `seed`
/// (its contents become the file system's root: `mkfs.ext4 -d`).
pub fn create(path: &Path, size_mb: u64, seed: Option<&Path>) -> Result<DataDisk> {
    util::remove_all(path)?;
    if let Some(parent) = path.parent() {
        util::mkdir(parent)?;
    }
    let file = std::fs::File::create(path)
        .context(|| format!("cannot create the data disk {}", path.display()))?;
    file.set_len(size_mb << 20).context(|| {
        format!(
            "cannot size the data disk {} to {size_mb} MiB (is the file system full? \
             lower {DISK_MB_VAR})",
            path.display()
        )
    })?;
    drop(file);
    let mut cmd = Command::new("mkfs.ext4");
    // Inode tables stay uninitialised (lazy): /init mounts with
    // noinit_itable, so no kernel thread zeroes them during a bench.
    cmd.args(["-q", "-F", "-L", LABEL, "-m", "0"]);
    if let Some(seed) = seed {
        cmd.arg("-d").arg(seed);
    }
    cmd.arg(path);
    util::capture(
        &mut cmd,
        "mkfs.ext4 comes with e2fsprogs: run `cargo xtask setup` (or apt-get install \
         e2fsprogs), or set DORMOUSE_RIG_DISK_MB=0 to boot without a data disk",
    )?;
    Ok(DataDisk {
        path: path.to_path_buf(),
        cache: if supports_direct_io(path) {
            "none"
        } else {
            "writeback"
        },
    })
}

/// Copies the tree `from` to `to` (files and directories; symlinks and
/// other special files are left out), replacing `to`.
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    util::remove_all(to)?;
    util::mkdir(to)?;
    let entries = std::fs::read_dir(from).context(|| format!("cannot list {}", from.display()))?;
    for entry in entries {
        let entry = entry.context(|| format!("cannot list {}", from.display()))?;
        let kind = entry
            .file_type()
            .context(|| format!("cannot stat {}", entry.path().display()))?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else if kind.is_file() {
            util::copy_file(&entry.path(), &dest)?;
        }
    }
    Ok(())
}

#[cfg(target_arch = "aarch64")]
const O_DIRECT: i32 = 0o200000;
#[cfg(not(target_arch = "aarch64"))]
const O_DIRECT: i32 = 0o40000;

/// Whether `path` can be opened with O_DIRECT (QEMU's `cache=none`); tmpfs
/// before Linux 6.6 and some overlay setups refuse it.
fn supports_direct_io(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_DIRECT)
        .open(path)
        .is_ok()
}

/// Copies the directory `from` (absolute, inside the image) out of the ext4
/// image to `to`, replacing `to`. Returns false if the image has no such
/// directory. Uses `debugfs rdump`, which needs no root; the image must not
/// be in use.
pub fn copy_out(image: &Path, from: &str, to: &Path) -> Result<bool> {
    let name = from
        .rsplit('/')
        .find(|part| !part.is_empty())
        .ok_or_else(|| util::Error::msg(format!("`{from}` names no directory")))?;
    let staging = to.with_extension("partial");
    util::remove_all(&staging)?;
    util::mkdir(&staging)?;
    let mut cmd = Command::new("debugfs");
    cmd.arg("-R")
        .arg(format!(
            "rdump {} {}",
            debugfs_quote(from),
            debugfs_quote(&staging.to_string_lossy())
        ))
        .arg(image);
    let output = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| util::spawn_error(cmd.get_program(), e))?;
    let copied = staging.join(name);
    if !output.status.success() || !copied.is_dir() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors = debugfs_errors(&stderr);
        util::remove_all(&staging)?;
        if !output.status.success() {
            bail!(
                "`{}` failed ({}): {}; debugfs comes with e2fsprogs (`cargo xtask setup`)",
                util::describe(&cmd),
                util::status_text(output.status),
                errors.join("; ")
            );
        }
        if errors.iter().any(|e| e.contains("not found")) || errors.is_empty() {
            return Ok(false);
        }
        bail!(
            "`{}` copied nothing: {}",
            util::describe(&cmd),
            errors.join("; ")
        );
    }
    util::remove_all(to)?;
    std::fs::rename(&copied, to)
        .context(|| format!("cannot move {} to {}", copied.display(), to.display()))?;
    util::remove_all(&staging)?;
    Ok(true)
}

/// debugfs's own argument quoting: double quotes around words with spaces.
fn debugfs_quote(word: &str) -> String {
    if word.contains([' ', '\t', '"']) {
        format!("\"{}\"", word.replace('"', "\\\""))
    } else {
        word.to_string()
    }
}

/// The lines of debugfs's stderr that report a real problem: its banner,
/// and the ownership errors every file gives when we are not root (the
/// files belong to the emulated host's root), are not.
pub fn debugfs_errors(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("debugfs ") && !l.contains("while changing ownership")
        })
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_knob() {
        assert_eq!(size_from_env(None).unwrap(), Some(DEFAULT_DISK_MB));
        assert_eq!(size_from_env(Some("0")).unwrap(), None);
        assert_eq!(size_from_env(Some(" 1024 ")).unwrap(), Some(1024));
        let small = size_from_env(Some("8")).unwrap_err().to_string();
        assert!(small.contains("too small"), "{small}");
        let junk = size_from_env(Some("8G")).unwrap_err().to_string();
        assert!(junk.contains("not a whole number"), "{junk}");
        let huge = size_from_env(Some("99999999999")).unwrap_err().to_string();
        assert!(huge.contains("larger than 16 TiB"), "{huge}");
    }

    #[test]
    fn qemu_arguments() {
        let disk = DataDisk {
            path: PathBuf::from("/t/rig/a,b.img"),
            cache: "none",
        };
        assert_eq!(
            disk.qemu_args(),
            [
                "-drive",
                "file=/t/rig/a,,b.img,format=raw,if=none,id=data,cache=none",
                "-device",
                "virtio-blk-pci,drive=data"
            ]
        );
    }

    #[test]
    fn debugfs_stderr() {
        let stderr = "debugfs 1.47.0 (5-Feb-2023)\n\
                      rdump: Operation not permitted while changing ownership of /x/a\n\
                      /criterion: File not found by ext2_lookup \n";
        assert_eq!(
            debugfs_errors(stderr),
            ["/criterion: File not found by ext2_lookup"]
        );
        assert_eq!(debugfs_quote("/a b"), "\"/a b\"");
        assert_eq!(debugfs_quote("/ab"), "/ab");
    }

    /// A real round trip through mkfs.ext4 and debugfs (both from
    /// e2fsprogs, which `cargo xtask setup` installs): files put into the
    /// image with `debugfs -w` come back out with `copy_out`.
    #[test]
    fn create_and_copy_out() {
        let dir = std::env::temp_dir().join(format!("xtask-disk-{}", std::process::id()));
        util::remove_all(&dir).unwrap();
        let image = dir.join("data.img");
        let disk = create(&image, 64, None).unwrap();
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < meta.len(), "the image is not sparse");
        assert!(disk.cache == "none" || disk.cache == "writeback");

        let dest = dir.join("out");
        // Nothing there yet: not an error.
        assert!(!copy_out(&image, "/criterion", &dest).unwrap());
        assert!(!dest.exists());

        let src = dir.join("hello.json");
        std::fs::write(&src, "{\"x\": 1}\n").unwrap();
        let script = format!(
            "mkdir /criterion\nmkdir /criterion/report\nwrite {} /criterion/report/index.html\n",
            src.display()
        );
        std::fs::write(dir.join("script"), script).unwrap();
        let status = Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(dir.join("script"))
            .arg(&image)
            .output()
            .unwrap()
            .status;
        assert!(status.success());
        // An old copy is replaced.
        util::mkdir(&dest.join("stale")).unwrap();
        assert!(copy_out(&image, "/criterion", &dest).unwrap());
        assert_eq!(
            std::fs::read_to_string(dest.join("report/index.html")).unwrap(),
            "{\"x\": 1}\n"
        );
        assert!(!dest.join("stale").exists());

        // A seeded disk holds a copy of the seed, which comes back out.
        let seed = dir.join("seed");
        copy_tree(&dest, &seed.join("criterion")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", seed.join("criterion/link")).unwrap();
        copy_tree(&dest, &dir.join("other")).unwrap();
        create(&image, 64, Some(&seed)).unwrap();
        let back = dir.join("back");
        assert!(copy_out(&image, "/criterion", &back).unwrap());
        assert_eq!(
            std::fs::read_to_string(back.join("report/index.html")).unwrap(),
            "{\"x\": 1}\n"
        );
        assert!(back.join("link").symlink_metadata().is_ok());
        // copy_tree leaves symlinks out.
        copy_tree(&seed, &dir.join("seed2")).unwrap();
        assert!(dir.join("seed2/criterion/report/index.html").is_file());
        assert!(dir.join("seed2/criterion/link").symlink_metadata().is_err());
        util::remove_all(&dir).unwrap();
    }
}
