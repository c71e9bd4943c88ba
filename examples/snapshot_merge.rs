//! Compacts a snapshot chain into one full snapshot.
//!
//! ```text
//! cargo run --example snapshot_merge -- OUT BASE DIFF [DIFF...]
//! ```
//!
//! BASE is a full snapshot directory, each DIFF a diff snapshot taken on top
//! of the one before it. OUT is written (or replaced) atomically; the inputs
//! are left as they are.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let Some((out, chain)) = args.split_first() else {
        eprintln!("usage: snapshot_merge OUT BASE DIFF [DIFF...]");
        return ExitCode::from(2);
    };
    if chain.len() < 2 {
        eprintln!("usage: snapshot_merge OUT BASE DIFF [DIFF...] (a chain has a base and diffs)");
        return ExitCode::from(2);
    }
    match dormouse::snapshot::merge(chain, out) {
        Ok(()) => {
            println!("merged {} layers into {}", chain.len(), out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("merge failed: {e}");
            ExitCode::FAILURE
        }
    }
}
