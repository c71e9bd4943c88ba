//! Cross-compiling the `dormouse` package for aarch64 with Debian's
//! `rustc-web` toolchain (/usr/bin/cargo, /usr/bin/rustc, which ship an arm64
//! std), and running the host's own (rustup) cargo with a clean environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

use crate::util::{self, bail, Context, Result};

pub const TARGET: &str = "aarch64-unknown-linux-gnu";
pub const PACKAGE: &str = "dormouse";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_RUSTDOC: &str = "/usr/bin/rustdoc";
pub const DEBIAN_CARGO_CLIPPY: &str = "/usr/bin/cargo-clippy";

/// Target directory for the Debian toolchain: never shared with rustup's.
pub fn cross_target_dir() -> PathBuf {
    util::target_dir().join("cross")
}

/// Environment variables that `cargo run` (rustup's cargo) sets for xtask and
/// that must not leak into another cargo: they would select rustup's
/// toolchain, its libraries, or override our target flags.
fn is_leaky_var(name: &str) -> bool {
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
        "CARGO_INCREMENTAL",
    ];
    if name.starts_with("CARGO") {
        return !KEEP.iter().any(|k| name.starts_with(k));
    }
    name.starts_with("RUSTUP_")
        || name.starts_with("RUSTC")
        || name.starts_with("RUSTDOC")
        || name == "RUSTFLAGS"
        || name == "RUST_RECURSION_COUNT"
        || name == "LD_LIBRARY_PATH"
}

/// `/usr/bin/<program>` (Debian's toolchain) with an environment free of
/// rustup's and cargo's variables, /usr/bin first on PATH.
pub fn debian_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if is_leaky_var(&name.to_string_lossy()) {
            cmd.env_remove(&name);
        }
    }
    let old_path = std::env::var("PATH").unwrap_or_default();
    let rest: Vec<&str> = old_path
        .split(':')
        .filter(|p| !p.is_empty() && !p.contains(".cargo/bin") && !p.contains(".rustup"))
        .collect();
    let path = format!("/usr/bin:/bin:/usr/sbin:/sbin:{}", rest.join(":"));
    cmd.env("PATH", path)
        .env("CARGO", DEBIAN_CARGO)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTDOC", DEBIAN_RUSTDOC)
        .current_dir(util::workspace_root());
    cmd
}

/// The arguments every Debian cargo invocation shares, so that builds, tests
/// and clippy reuse one another's dependency artifacts.
pub fn cross_args(cmd: &mut Command) {
    cmd.args(["--target", TARGET])
        .arg("--target-dir")
        .arg(cross_target_dir())
        .args([
            "--config",
            "target.aarch64-unknown-linux-gnu.linker=\"aarch64-linux-gnu-gcc\"",
            "--config",
            "target.aarch64-unknown-linux-gnu.rustflags=[\"-C\",\"target-feature=+crt-static\"]",
        ]);
}

/// rustup's cargo (the one running xtask) for host-native work, minus the
/// variables `cargo run` added for xtask itself.
pub fn host_cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        let name_str = name.to_string_lossy();
        if name_str.starts_with("CARGO_PKG_")
            || name_str.starts_with("CARGO_MANIFEST_")
            || name_str.starts_with("CARGO_BIN_")
            || name_str.starts_with("CARGO_CRATE_")
            || name_str == "CARGO_PRIMARY_PACKAGE"
            || name_str == "LD_LIBRARY_PATH"
        {
            cmd.env_remove(&name);
        }
    }
    cmd.current_dir(util::workspace_root());
    cmd
}

/// One executable produced by a cross build.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// Unique, filesystem-friendly name: `<kind>-<target name>`, e.g.
    /// `lib-dormouse`, `test-vm_boot`, `bench-restore`, `example-demo`.
    pub name: String,
    pub path: PathBuf,
}

/// What to cross-build.
pub enum Build<'a> {
    /// Every test executable (lib unit tests, tests/*.rs).
    Tests,
    /// Every bench target (benches/*.rs), in the bench profile.
    Benches,
    /// One example.
    Example(&'a str),
}

/// Cross-builds and returns the executables, in cargo's order.
pub fn build(what: Build<'_>) -> Result<Vec<Artifact>> {
    let start = Instant::now();
    let mut cmd = debian_command(DEBIAN_CARGO);
    match what {
        Build::Tests => cmd.args(["test", "--package", PACKAGE, "--no-run"]),
        Build::Benches => cmd.args(["bench", "--package", PACKAGE, "--no-run"]),
        Build::Example(name) => cmd.args(["build", "--package", PACKAGE, "--example", name]),
    };
    cross_args(&mut cmd);
    cmd.arg("--message-format=json-render-diagnostics");
    cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    util::announce(&cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| util::spawn_error(cmd.get_program(), e))?;
    let mut artifacts = Vec::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    util::for_each_line(stdout, |line| match serde_json::from_str::<Value>(&line) {
        Ok(message) => {
            if let Some(artifact) = executable(&message, &what) {
                artifacts.push(artifact);
            }
        }
        // Not a JSON message (a build script or rustc printing directly).
        Err(_) => println!("{line}"),
    });
    let status = child
        .wait()
        .context(|| "waiting for Debian's cargo".to_string())?;
    if !status.success() {
        bail!(
            "the aarch64 cross build failed ({}): fix the errors above (they come from {} \
             building for {TARGET}; the code must build with rustup's toolchain too). If the \
             error is a missing std or linker for {TARGET}, run `cargo xtask setup`",
            util::status_text(status),
            debian_rustc_version()
        );
    }
    util::say(format!(
        "cross build: {} executable(s) for {TARGET} in {}",
        artifacts.len(),
        util::secs(start.elapsed())
    ));
    Ok(artifacts)
}

fn debian_rustc_version() -> String {
    debian_command(DEBIAN_RUSTC)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "Debian's rustc (not installed?)".to_string())
}

/// Picks the executable out of a `compiler-artifact` message, if it is one we want.
fn executable(message: &Value, what: &Build<'_>) -> Option<Artifact> {
    if message["reason"] != "compiler-artifact" {
        return None;
    }
    let path = message["executable"].as_str()?;
    let target = &message["target"];
    let name = target["name"].as_str()?;
    let kinds: Vec<&str> = target["kind"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let is_test_profile = message["profile"]["test"].as_bool() == Some(true);
    let wanted = match what {
        Build::Tests => is_test_profile,
        Build::Benches => kinds.contains(&"bench"),
        Build::Example(example) => kinds.contains(&"example") && name == *example,
    };
    if !wanted {
        return None;
    }
    let kind = match kinds.first().copied() {
        Some("lib" | "rlib" | "cdylib" | "dylib" | "staticlib" | "proc-macro") => "lib",
        Some(other) => other,
        None => "bin",
    };
    Some(Artifact {
        name: format!("{kind}-{name}"),
        path: PathBuf::from(path),
    })
}

/// Targets of the `dormouse` package of the given kind, from `cargo metadata`
/// (fast: no build).
pub fn package_targets(kind: &str) -> Result<Vec<String>> {
    let mut cmd = host_cargo();
    cmd.args(["metadata", "--no-deps", "--format-version", "1"]);
    let out = util::capture(
        &mut cmd,
        "cargo metadata failed: fix Cargo.toml (the error is above)",
    )?;
    let metadata: Value =
        serde_json::from_str(&out).context(|| "cargo metadata printed invalid JSON".to_string())?;
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let package = packages
        .iter()
        .find(|p| p["name"] == PACKAGE)
        .ok_or_else(|| util::Error::msg(format!("no package `{PACKAGE}` in the workspace")))?;
    let targets = package["targets"].as_array().cloned().unwrap_or_default();
    Ok(targets
        .iter()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect())
}

/// Whether Debian's toolchain is where we expect it.
pub fn check_debian_toolchain() -> Result<()> {
    for tool in [DEBIAN_CARGO, DEBIAN_RUSTC] {
        if !Path::new(tool).exists() {
            bail!(
                "{tool} is missing: run `cargo xtask setup` (it installs rustc-web and cargo-web)"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_test_executables() {
        let msg: Value = serde_json::from_str(
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"dormouse"},
                "profile":{"test":true},"executable":"/t/deps/dormouse-abc"}"#,
        )
        .unwrap();
        let a = executable(&msg, &Build::Tests).unwrap();
        assert_eq!(a.name, "lib-dormouse");
        assert_eq!(a.path, PathBuf::from("/t/deps/dormouse-abc"));
        assert!(executable(&msg, &Build::Benches).is_none());

        let msg: Value = serde_json::from_str(
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"dep"},
                "profile":{"test":false},"executable":null}"#,
        )
        .unwrap();
        assert!(executable(&msg, &Build::Tests).is_none());

        let msg: Value = serde_json::from_str(
            r#"{"reason":"compiler-artifact","target":{"kind":["example"],"name":"demo"},
                "profile":{"test":false},"executable":"/t/examples/demo"}"#,
        )
        .unwrap();
        assert_eq!(
            executable(&msg, &Build::Example("demo")).unwrap().name,
            "example-demo"
        );
        assert!(executable(&msg, &Build::Example("other")).is_none());
    }

    #[test]
    fn leaky_vars() {
        assert!(is_leaky_var("RUSTUP_TOOLCHAIN"));
        assert!(is_leaky_var("CARGO"));
        assert!(is_leaky_var("CARGO_MANIFEST_DIR"));
        assert!(is_leaky_var("RUSTFLAGS"));
        assert!(is_leaky_var("LD_LIBRARY_PATH"));
        assert!(!is_leaky_var("CARGO_HOME"));
        assert!(!is_leaky_var("CARGO_TERM_COLOR"));
        assert!(!is_leaky_var("RUST_BACKTRACE"));
        assert!(!is_leaky_var("HOME"));
    }
}
