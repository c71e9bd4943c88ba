//! A minimal writer for the "newc" cpio format the Linux kernel unpacks as
//! an initramfs. Written here rather than piping `find | cpio` so that the
//! archive can hold device nodes (/dev/console) without mknod, symlinks, and
//! files under names other than their names on disk, deterministically.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::util::{Context, Result};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

pub struct CpioWriter<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
    /// Directories already written (parents are created on demand).
    dirs: BTreeSet<String>,
}

impl CpioWriter<BufWriter<File>> {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).context(|| format!("cannot create {}", path.display()))?;
        Ok(CpioWriter::new(BufWriter::with_capacity(1 << 20, file)))
    }
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            offset: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: u32, rdev: (u32, u32)) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let namesize = name.len() as u32 + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            maj = 0,
            min = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        self.write_raw(header.as_bytes())?;
        self.write_raw(name.as_bytes())?;
        self.write_raw(&[0])?;
        self.pad()
    }

    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.offset % 4) as usize) % 4;
        self.write_raw(&[0u8; 3][..pad])
    }

    /// Archive names are relative ("bin/sh"); leading slashes are dropped.
    fn clean(name: &str) -> String {
        name.trim_start_matches('/')
            .trim_end_matches('/')
            .to_string()
    }

    fn ensure_parents(&mut self, name: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !self.dirs.contains(&prefix) {
                let dir = prefix.clone();
                self.dirs.insert(dir.clone());
                self.header(&dir, S_IFDIR | 0o755, 0, (0, 0))?;
            }
        }
        Ok(())
    }

    pub fn dir(&mut self, name: &str) -> Result<()> {
        let name = Self::clean(name);
        let io = (|| {
            self.ensure_parents(&name)?;
            if self.dirs.insert(name.clone()) {
                self.header(&name, S_IFDIR | 0o755, 0, (0, 0))?;
            }
            Ok::<_, io::Error>(())
        })();
        io.context(|| format!("cannot write directory {name} to the initramfs"))
    }

    pub fn bytes(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let name = Self::clean(name);
        let io = (|| {
            self.ensure_parents(&name)?;
            self.header(&name, S_IFREG | (mode & 0o7777), data.len() as u32, (0, 0))?;
            self.write_raw(data)?;
            self.pad()
        })();
        io.context(|| format!("cannot write {name} to the initramfs"))
    }

    /// Adds the file at `from` (streamed, not read into memory).
    pub fn file(&mut self, name: &str, mode: u32, from: &Path) -> Result<()> {
        let name = Self::clean(name);
        let mut source = File::open(from).context(|| format!("cannot open {}", from.display()))?;
        let len = source
            .metadata()
            .context(|| format!("cannot stat {}", from.display()))?
            .len();
        let size = u32::try_from(len)
            .ok()
            .filter(|s| *s < u32::MAX)
            .ok_or_else(|| {
                crate::util::Error::msg(format!("{} is too big for a cpio archive", from.display()))
            })?;
        let io = (|| {
            self.ensure_parents(&name)?;
            self.header(&name, S_IFREG | (mode & 0o7777), size, (0, 0))?;
            let copied = io::copy(&mut source, &mut self.out)?;
            if copied != len {
                return Err(io::Error::other("file changed size while being copied"));
            }
            self.offset += copied;
            self.pad()
        })();
        io.context(|| format!("cannot add {} to the initramfs", from.display()))
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        let name = Self::clean(name);
        let io = (|| {
            self.ensure_parents(&name)?;
            self.header(&name, S_IFLNK | 0o777, target.len() as u32, (0, 0))?;
            self.write_raw(target.as_bytes())?;
            self.pad()
        })();
        io.context(|| format!("cannot write symlink {name} to the initramfs"))
    }

    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        let name = Self::clean(name);
        let io = (|| {
            self.ensure_parents(&name)?;
            self.header(&name, S_IFCHR | (mode & 0o7777), 0, (major, minor))
        })();
        io.context(|| format!("cannot write device {name} to the initramfs"))
    }

    /// Writes the trailer and flushes; returns the archive's size.
    pub fn finish(mut self) -> Result<u64> {
        let io = (|| {
            self.header("TRAILER!!!", 0, 0, (0, 0))?;
            // The kernel wants the archive padded to 512 bytes, like cpio does.
            let pad = (512 - (self.offset % 512) as usize) % 512;
            self.write_raw(&vec![0u8; pad])?;
            self.out.flush()
        })();
        io.context(|| "cannot finish the initramfs".to_string())?;
        Ok(self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let mut buf = Vec::new();
        let mut w = CpioWriter::new(&mut buf);
        w.bytes("/a/b/init", 0o755, b"hi").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        let size = w.finish().unwrap();
        assert_eq!(size as usize, buf.len());
        assert_eq!(buf.len() % 512, 0);
        let text = String::from_utf8_lossy(&buf);
        // Parents come before children, every header is aligned.
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let init = text.find("a/b/init\0").unwrap();
        assert!(a < ab && ab < init);
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
        assert!(text.contains("TRAILER!!!"));
        // Mode of the regular file: 0100755.
        assert!(text.contains(&format!("{:08x}", 0o100755)));
    }
}
