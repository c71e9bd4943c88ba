//! `cargo xtask lint`: formatting, clippy on the host (rustup) and for
//! aarch64 (Debian's rust-web-clippy), and the payload freshness check.
//! Every check runs even if an earlier one failed; the exit status says
//! whether all passed.

use std::time::Instant;

use crate::cross;
use crate::payloads;
use crate::setup;
use crate::util::{self, bail, Result};

pub fn lint() -> Result<()> {
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, result: Result<()>| {
        if let Err(e) = result {
            util::say(format!("lint: {name} FAILED"));
            println!("{e}");
            failures.push(name.to_string());
        } else {
            util::say(format!("lint: {name} ok"));
        }
    };

    let start = Instant::now();
    check("cargo fmt", fmt());
    check("clippy (host)", host_clippy());
    match setup::setup_packages() {
        Ok(()) => {
            check("clippy (aarch64)", cross_clippy());
            check("payloads", payloads::payloads(true));
        }
        Err(e) => check("setup (for the aarch64 checks)", Err(e)),
    }

    if failures.is_empty() {
        util::say(format!(
            "lint: all checks passed in {}",
            util::secs(start.elapsed())
        ));
        Ok(())
    } else {
        bail!(
            "lint failed: {} (details above; `cargo fmt --all` fixes formatting)",
            failures.join(", ")
        )
    }
}

fn fmt() -> Result<()> {
    let mut cmd = cross::host_cargo();
    cmd.args(["fmt", "--all", "--check"]);
    util::run(
        &mut cmd,
        "formatting differs: run `cargo fmt --all` and commit the result",
    )
}

fn host_clippy() -> Result<()> {
    let mut cmd = cross::host_cargo();
    cmd.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    util::run(
        &mut cmd,
        "fix the clippy findings above (host build, rustup's toolchain)",
    )
}

/// Debian's clippy: `/usr/bin/cargo-clippy clippy ...` (how cargo itself calls
/// the subcommand), with CARGO pointing at Debian's cargo. Going through
/// `cargo clippy` would find rustup's cargo-clippy proxy in ~/.cargo/bin first.
fn cross_clippy() -> Result<()> {
    cross::check_debian_toolchain()?;
    let mut cmd = cross::debian_command(cross::DEBIAN_CARGO_CLIPPY);
    cmd.args(["clippy", "--package", cross::PACKAGE, "--all-targets"]);
    cross::cross_args(&mut cmd);
    cmd.args(["--", "-D", "warnings"]);
    util::run(
        &mut cmd,
        "fix the clippy findings above (aarch64 build, Debian's rust-web-clippy); \
         if cargo-clippy is missing run `cargo xtask setup`",
    )
}
