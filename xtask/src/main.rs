//! Developer tooling for dormouse: `cargo xtask <command>`.
//!
//! dormouse is an aarch64 KVM monitor; the development and CI machines are
//! x86_64. xtask cross-compiles with Debian's rustc-web toolchain and runs
//! the aarch64 binaries inside an emulated arm64 host (qemu-system-aarch64
//! with EL2), where nested /dev/kvm works. See /work/shared/ARM64-RIG.md.

mod charts;
mod cpio;
mod cross;
mod disk;
mod fuzz;
mod libtest;
mod lint;
mod payloads;
mod rig;
mod setup;
mod svg;
mod tasks;
mod util;

use util::{bail, Result};

const USAGE: &str = "\
usage: cargo xtask <command> [options] [-- <args>]

commands:
  setup                     install the Debian packages (apt, needs root) and download
                            the emulated host's kernel, its modules and busybox into
                            target/rig/ (does nothing when all is there)
  test [--host-only | --emulated-only] [-- <libtest args>]
                            cargo test --workspace on this machine, then every aarch64
                            test binary of dormouse inside the emulated arm64 host;
                            the last line is `N passed, N failed`
  bench [-- <criterion args>]
                            dormouse's benches inside the emulated arm64 host; criterion's
                            output (HTML reports with plots) is copied back to
                            target/criterion-rig/ (report/index.html)
  charts                    SVG charts for the README from target/criterion-rig/ into
                            docs/charts/ (a chart without data is skipped)
  demo [-- <args>]          examples/demo.rs inside the emulated arm64 host
  lint                      cargo fmt --check, clippy (host and aarch64), payloads --check
  payloads [--check]        regenerate tests/common/payloads.rs from tests/payloads/*.S
  soak [--short] [SCENARIO...]
                            the soak suite inside the emulated arm64 host
                            (examples/soak.rs): suspend/resume cycles of a VM and a
                            session checked by the guest's own checksums, with no fd,
                            thread, mapping or memory leak; a density wave of
                            sessions; the long form (no --short: 200 cycles, 32
                            sessions, 8 GiB host) also runs the fault tests
  fuzz [--seconds N] [--workers N] [--runs N] [TARGET...]
                            build the cargo-fuzz targets in fuzz/ (nightly; installs
                            cargo-fuzz if missing) and run each (default: all) for N
                            seconds (default 20) on N fuzzing processes (default: one
                            per core); fails on any crash, timeout or OOM; with
                            --runs, stops a target after N inputs and fails it if
                            the time ran out first

environment:
  DORMOUSE_RIG_MEM_MB        memory of the emulated host (default 4096)
  DORMOUSE_RIG_TIMEOUT_SECS  kill the emulated host after this long (default 1500)
  DORMOUSE_RIG_DISK_MB       size of its ext4 data disk at /data (sparse, default 8192;
                             0 = none); jobs see DORMOUSE_RIG_DATA=/data when it mounts
  DORMOUSE_BENCH_ONLY        bench: run only these bench binaries (e.g. resume,snapshot)
  RUST_BACKTRACE, RUST_LOG, RUST_TEST_NOCAPTURE and DORMOUSE_* are passed into it
";

/// Splits `[options] [--] [args]`: words before `--` that are one of
/// `known` are options; everything else is passed through.
fn split_args(args: &[String], known: &[&str]) -> (Vec<String>, Vec<String>) {
    let mut options = Vec::new();
    let mut rest = Vec::new();
    let mut passthrough = false;
    for arg in args {
        if passthrough {
            rest.push(arg.clone());
        } else if arg == "--" {
            passthrough = true;
        } else if known.contains(&arg.as_str()) {
            options.push(arg.clone());
        } else {
            rest.push(arg.clone());
        }
    }
    (options, rest)
}

fn no_args(command: &str, args: &[String]) -> Result<()> {
    if !args.is_empty() {
        bail!("`cargo xtask {command}` takes no arguments (got {args:?})\n\n{USAGE}");
    }
    Ok(())
}

fn dispatch(args: &[String]) -> Result<i32> {
    let Some((command, rest)) = args.split_first() else {
        print!("{USAGE}");
        return Ok(2);
    };
    match command.as_str() {
        "setup" => {
            no_args("setup", rest)?;
            setup::setup()?;
            Ok(0)
        }
        "test" => {
            let (options, args) = split_args(rest, &["--host-only", "--emulated-only"]);
            let host_only = options.iter().any(|o| o == "--host-only");
            let emulated_only = options.iter().any(|o| o == "--emulated-only");
            if host_only && emulated_only {
                bail!("--host-only and --emulated-only exclude each other");
            }
            tasks::test(&tasks::TestOptions {
                host: !emulated_only,
                emulated: !host_only,
                args,
            })
        }
        "bench" => {
            let (_, args) = split_args(rest, &[]);
            tasks::bench(&args)
        }
        "charts" => {
            no_args("charts", rest)?;
            charts::charts()
        }
        "demo" => {
            let (_, args) = split_args(rest, &[]);
            tasks::demo(&args)
        }
        "lint" => {
            no_args("lint", rest)?;
            lint::lint()?;
            Ok(0)
        }
        "payloads" => {
            let (options, args) = split_args(rest, &["--check"]);
            no_args("payloads", &args)?;
            payloads::payloads(!options.is_empty())?;
            Ok(0)
        }
        "soak" => {
            let (options, args) = split_args(rest, &["--short"]);
            tasks::soak(&tasks::SoakOptions {
                short: !options.is_empty(),
                args,
            })
        }
        "fuzz" => fuzz::fuzz(&fuzz::parse_args(rest)?),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(0)
        }
        other => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match dispatch(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            1
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn args() {
        let (o, r) = split_args(
            &strings(&["--host-only", "filter", "--", "--host-only", "--nocapture"]),
            &["--host-only"],
        );
        assert_eq!(o, ["--host-only"]);
        assert_eq!(r, ["filter", "--host-only", "--nocapture"]);
    }
}
