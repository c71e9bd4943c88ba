//! Shared helpers for the integration tests.

// Each test binary uses a different subset of the helpers and payloads.
#![allow(dead_code)]

pub mod initramfs;
pub mod marker;
pub mod payloads;

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
