//! A minimal newc cpio writer for test initramfs images: a static busybox,
//! an init script each test writes, and the few nodes init needs.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// An initramfs being assembled.
pub struct Initramfs {
    out: Vec<u8>,
    ino: u32,
}

impl Initramfs {
    /// An archive with /bin, /dev, /proc, /sys, /tmp, /mnt and /dev/console.
    pub fn new() -> Self {
        let mut me = Self {
            out: Vec::new(),
            ino: 1,
        };
        for dir in [
            "bin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "mnt",
            "lib",
            "lib/modules",
        ] {
            me.dir(dir);
        }
        // The kernel opens /dev/console for init before any devtmpfs exists.
        me.entry("dev/console", S_IFCHR | 0o600, (5, 1), &[]);
        me
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
        self
    }

    /// Adds a file with the given permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | mode, (0, 0), data);
        self
    }

    /// Adds `/init`, a busybox shell script.
    pub fn init_script(&mut self, script: &str) -> &mut Self {
        let text = format!("#!/bin/busybox sh\n/bin/busybox --install -s /bin\n{script}");
        self.file("init", 0o755, text.as_bytes())
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let name_len = path.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name_len,
            0, // check
        );
        self.ino += 1;
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// Finishes the archive and writes it to a fresh file in `dir`.
    pub fn write_to(mut self, dir: &Path, name: &str) -> io::Result<PathBuf> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        let path = dir.join(name);
        std::fs::File::create(&path)?.write_all(&self.out)?;
        Ok(path)
    }
}
