//! Turns the golden directories a test printed between `@@GOLDEN` markers
//! back into files, on the x86 side of the emulated test rig (which has
//! no shared directory with the emulated host):
//!
//! ```text
//! DORMOUSE_WRITE_GOLDEN=1 cargo xtask test --emulated-only -- golden_runs_todays 2>&1 | tee golden.log
//! cargo run --example golden_extract -- golden.log tests/golden
//! ```
//!
//! The markers (written by `tests/golden_runs.rs`):
//!
//! ```text
//! @@GOLDEN DIR <dir>                    a directory, relative to the output
//! @@GOLDEN FILE <file> <len> <crc64>    a file in it: its length, CRC-64/XZ in hex
//! @@GOLDEN DATA <file> <offset> <hex>   bytes at offset (the rest is zeros)
//! @@GOLDEN END <dir>
//! ```
//!
//! Golden files are never regenerated: a directory that already exists is
//! kept as it is (and said so); only new ones are written. Each file must
//! match its length and CRC, or nothing of its directory is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dormouse::snapshot::format::crc64;

/// One file being put back together.
struct File {
    len: usize,
    crc: u64,
    bytes: Vec<u8>,
}

/// One directory: its files, in the order printed.
#[derive(Default)]
struct Dir {
    files: BTreeMap<String, File>,
    ended: bool,
}

/// A relative path with no `..`, root or empty parts: what a marker may
/// name under the output directory.
fn plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

fn parse(log: &str) -> Result<BTreeMap<String, Dir>, String> {
    let mut dirs: BTreeMap<String, Dir> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (n, line) in log.lines().enumerate() {
        let Some(at) = line.find("@@GOLDEN ") else {
            continue;
        };
        let bad = |what: &str| format!("line {}: {what}: {line:.120}", n + 1);
        let words: Vec<&str> = line[at..].split_whitespace().collect();
        match words.as_slice() {
            ["@@GOLDEN", "DIR", dir] => {
                if !plain_relative(dir) {
                    return Err(bad("not a plain relative directory"));
                }
                dirs.insert((*dir).to_string(), Dir::default());
                current = Some((*dir).to_string());
            }
            ["@@GOLDEN", "FILE", file, len, crc] => {
                let dir = current.as_ref().ok_or_else(|| bad("FILE outside a DIR"))?;
                if !plain_relative(file) {
                    return Err(bad("not a plain relative file"));
                }
                let len: usize = len.parse().map_err(|_| bad("bad length"))?;
                let crc = u64::from_str_radix(crc, 16).map_err(|_| bad("bad CRC"))?;
                let entry = File {
                    len,
                    crc,
                    bytes: vec![0; len],
                };
                dirs.get_mut(dir)
                    .expect("DIR inserted it")
                    .files
                    .insert((*file).to_string(), entry);
            }
            ["@@GOLDEN", "DATA", file, offset, hex] => {
                let dir = current.as_ref().ok_or_else(|| bad("DATA outside a DIR"))?;
                let entry = dirs
                    .get_mut(dir)
                    .expect("DIR inserted it")
                    .files
                    .get_mut(*file)
                    .ok_or_else(|| bad("DATA before its FILE"))?;
                let offset: usize = offset.parse().map_err(|_| bad("bad offset"))?;
                if hex.len() % 2 != 0 {
                    return Err(bad("odd hex length"));
                }
                let data = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(|_| bad("bad hex"))?;
                let end = offset
                    .checked_add(data.len())
                    .filter(|&e| e <= entry.len)
                    .ok_or_else(|| bad("data past the file's end"))?;
                entry.bytes[offset..end].copy_from_slice(&data);
            }
            ["@@GOLDEN", "END", dir] => {
                if current.as_deref() != Some(*dir) {
                    return Err(bad("END of a directory not begun"));
                }
                dirs.get_mut(*dir).expect("DIR inserted it").ended = true;
                current = None;
            }
            _ => return Err(bad("not a @@GOLDEN marker this tool knows")),
        }
    }
    Ok(dirs)
}

fn write(out: &Path, name: &str, dir: &Dir) -> Result<(), String> {
    if !dir.ended {
        return Err(format!("{name}: the log ends before its END marker"));
    }
    for (file, entry) in &dir.files {
        let crc = crc64(&entry.bytes);
        if crc != entry.crc {
            return Err(format!(
                "{name}/{file}: CRC {crc:016x}, the test printed {:016x} (a console line was \
                 damaged: run the test again)",
                entry.crc
            ));
        }
    }
    let target = out.join(name);
    if target.exists() {
        println!(
            "kept {} (it exists: golden files are never regenerated)",
            target.display()
        );
        return Ok(());
    }
    for (file, entry) in &dir.files {
        let path: PathBuf = target.join(file);
        let parent = path.parent().expect("joined under the target");
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        std::fs::write(&path, &entry.bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {} ({} bytes)", path.display(), entry.bytes.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [log, out] = args.as_slice() else {
        eprintln!("usage: golden_extract LOG OUT_DIR (see the doc at the top of this file)");
        return ExitCode::from(2);
    };
    let result = std::fs::read_to_string(log)
        .map_err(|e| format!("cannot read {log}: {e}"))
        .and_then(|text| parse(&text))
        .and_then(|dirs| {
            if dirs.is_empty() {
                return Err(format!(
                    "{log} has no @@GOLDEN markers: was the test run with DORMOUSE_WRITE_GOLDEN=1?"
                ));
            }
            dirs.iter()
                .try_for_each(|(name, dir)| write(Path::new(out), name, dir))
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("golden_extract: {e}");
            ExitCode::FAILURE
        }
    }
}
