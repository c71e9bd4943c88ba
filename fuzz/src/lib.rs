//! Shared pieces of dormouse's fuzz targets (`fuzz_targets/*.rs`).
//!
//! Every target plays the guest driver: it builds guest memory
//! ([`guest::Guest`]), lays out split virtqueues and descriptor chains from
//! the fuzz input ([`ring::Ring`], [`ring::DescSpec`]), and runs the real
//! device code through a real event-manager loop ([`event::Loop`]). After
//! each event-loop pass it checks what the device did against what the
//! input described:
//!
//! - every byte the device changed lies in a device-writable buffer of a
//!   chain the driver made available, or in that queue's used ring;
//! - every page the device changed is marked in the dirty bitmap;
//! - every used element names the next chain on the avail ring (dormouse's
//!   devices use chains in order), with a length no larger than that
//!   chain's writable bytes, and no more chains are used than were there;
//! - the event loop settles (a device that keeps itself busy forever is a
//!   finding too).
//!
//! A panic is a finding. Inputs are read with [`input::Input`]: a cursor
//! that yields zeros once the data runs out, so every input means
//! something and short inputs stay cheap.

pub mod event;
pub mod fixture;
pub mod guest;
pub mod input;
pub mod ring;

/// Size of the guest memory every target uses (512 KiB at address 0).
pub const MEM_SIZE: u64 = 0x8_0000;

/// The standard layout: up to three queues' rings at 0, 8 and 16 KiB,
/// indirect tables at 32 KiB, buffers from 64 KiB to the end.
pub fn areas() -> ring::Areas {
    ring::Areas {
        data: (DATA_START, MEM_SIZE),
        indirect: 0x8000,
        mem_end: MEM_SIZE,
    }
}

/// Where buffers start.
pub const DATA_START: u64 = 0x1_0000;

/// The base of queue `q`'s rings.
pub fn ring_base(q: usize) -> u64 {
    q as u64 * ring::RING_SPAN
}

/// Where targets put the files their code under test needs a path for
/// (disk images, snapshot directories, sockets): `/dev/shm` (a tmpfs, so
/// per-input files cost no disk I/O and fsyncs are free) when it is
/// there, the temporary directory otherwise.
pub fn scratch_dir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A path of this process in [`scratch_dir`]:
/// `dormouse-fuzz-<name>-<pid>`. Whatever is there when the process exits
/// (libFuzzer ends a run with `exit`) is removed then.
pub fn scratch_path(name: &str) -> std::path::PathBuf {
    use std::sync::{Mutex, Once};
    static PATHS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());
    static AT_EXIT: Once = Once::new();
    extern "C" fn remove_all() {
        let paths = PATHS.lock().map(|p| p.clone()).unwrap_or_default();
        for p in paths {
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }
    AT_EXIT.call_once(|| {
        // SAFETY: atexit(3) with a plain `extern "C"` function that takes
        // no arguments and lives as long as the program.
        unsafe { libc::atexit(remove_all) };
    });
    let path = scratch_dir().join(format!("dormouse-fuzz-{name}-{}", std::process::id()));
    if let Ok(mut paths) = PATHS.lock() {
        paths.push(path.clone());
    }
    path
}

/// Runs one step of the standard check: walks what each ring made
/// available, runs `pass` (the device's event-loop work), then checks the
/// device's memory writes and used rings. Returns each ring's new used
/// elements.
pub fn checked_pass(
    guest: &mut guest::Guest,
    rings: &mut [&mut ring::Ring],
    pass: impl FnOnce(),
) -> Vec<Vec<ring::Used>> {
    let mut allowed = Vec::new();
    for r in rings.iter_mut() {
        r.expect(guest);
        r.allowed(&mut allowed);
    }
    pass();
    guest.check(&allowed);
    rings.iter_mut().map(|r| r.take_used(guest)).collect()
}

#[cfg(test)]
mod seeds;
