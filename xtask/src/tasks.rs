//! `cargo xtask test`, `bench` and `demo`: host-native runs with rustup's
//! cargo, and aarch64 runs inside the emulated arm64 host (see rig.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use crate::cross::{self, Artifact, Build};
use crate::disk;
use crate::libtest::{self, Counts};
use crate::rig::{self, Job};
use crate::setup::{self, Rig};
use crate::util::{self, bail, Context, Line, Result};

/// On a real arm64 machine with KVM, everything runs natively.
pub fn native_kvm_host() -> bool {
    cfg!(target_arch = "aarch64") && std::path::Path::new("/dev/kvm").exists()
}

/// Results of one side (host-native or emulated).
struct Side {
    label: &'static str,
    counts: Counts,
    /// One line per test binary.
    details: Vec<String>,
    /// Things that went wrong beyond failing tests; each counts as a failure.
    problems: Vec<String>,
    warnings: Vec<String>,
    seconds: f64,
}

impl Side {
    fn new(label: &'static str) -> Side {
        Side {
            label,
            counts: Counts::default(),
            details: Vec::new(),
            problems: Vec::new(),
            warnings: Vec::new(),
            seconds: 0.0,
        }
    }

    fn problem(&mut self, message: String) {
        self.problems.push(message);
        self.counts.failed += 1;
    }

    fn print(&self) {
        util::say(format!(
            "{}: {} ({:.0}s)",
            self.label, self.counts, self.seconds
        ));
        for line in &self.details {
            util::say(format!("  {line}"));
        }
        for warning in &self.warnings {
            util::say(format!("  warning: {warning}"));
        }
        for problem in &self.problems {
            util::say(format!("  FAILED: {problem}"));
        }
    }
}

/// `cargo test --workspace` with rustup's toolchain, output streamed and parsed.
fn host_tests(label: &'static str, args: &[String], env: &[(&str, std::path::PathBuf)]) -> Side {
    let start = Instant::now();
    let mut side = Side::new(label);
    let mut cmd = cross::host_cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"]);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    util::announce(&cmd);
    let mut parse = CargoTestOutput::default();
    let result = (|| -> Result<std::process::ExitStatus> {
        let mut child = cmd
            .spawn()
            .map_err(|e| util::spawn_error(cmd.get_program(), e))?;
        let (tx, rx) = mpsc::channel();
        util::pump(child.stdout.take().expect("piped"), tx.clone(), Line::Out);
        util::pump(child.stderr.take().expect("piped"), tx, Line::Err);
        for line in rx {
            match line {
                Line::Out(line) => {
                    println!("{line}");
                    parse.stdout(&line);
                }
                Line::Err(line) => {
                    eprintln!("{line}");
                    parse.stderr(&line);
                }
            }
        }
        child
            .wait()
            .context(|| "waiting for cargo test".to_string())
    })();
    side.counts = parse.counts;
    let silent = parse.failed_targets.saturating_sub(parse.failed_summaries);
    if silent > 0 {
        side.counts.failed += silent;
        side.details.push(format!(
            "{silent} test binaries failed without a libtest summary (crashed?): see cargo's \
             `targets failed` list above"
        ));
    }
    match result {
        Err(e) => side.problem(e.to_string()),
        Ok(status) if !status.success() && side.counts.failed == 0 => side.problem(format!(
            "`cargo test --workspace` failed ({}) without a failing test: \
             read its errors above (a build error?)",
            util::status_text(status)
        )),
        Ok(_) => {}
    }
    side.details.insert(
        0,
        format!(
            "{} libtest summaries (unit, integration and doc tests)",
            parse.summaries
        ),
    );
    side.seconds = start.elapsed().as_secs_f64();
    side
}

/// What `cargo test` printed: libtest summaries on stdout, and on stderr
/// cargo's list of failed targets (which includes binaries that crashed
/// before printing a summary).
#[derive(Default)]
struct CargoTestOutput {
    counts: Counts,
    summaries: u64,
    failed_summaries: u64,
    failed_targets: u64,
}

impl CargoTestOutput {
    fn stdout(&mut self, line: &str) {
        if let Some(counts) = libtest::parse_summary(line) {
            self.counts.add(counts);
            self.summaries += 1;
            if counts.failed > 0 || line.contains("test result: FAILED") {
                self.failed_summaries += 1;
            }
        }
    }

    fn stderr(&mut self, line: &str) {
        // "error: test failed, to rerun pass `--test x`" (one target) or
        // "error: 2 targets failed:" (several, with --no-fail-fast).
        if line.starts_with("error: test failed, to rerun pass") {
            self.failed_targets = self.failed_targets.max(1);
        } else if let Some(rest) = line.strip_prefix("error: ") {
            let mut words = rest.split_whitespace();
            if let (Some(n), Some(word)) = (words.next(), words.next()) {
                if (word == "targets" || word == "target") && rest.ends_with("failed:") {
                    if let Ok(n) = n.parse::<u64>() {
                        self.failed_targets = self.failed_targets.max(n);
                    }
                }
            }
        }
    }
}

/// Arguments for a test binary: one test thread (the emulated host has 2
/// slow CPUs and tests share /dev/kvm) unless the user chose otherwise.
fn libtest_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    if !args.iter().any(|a| a.starts_with("--test-threads")) {
        out.push("--test-threads=1".to_string());
    }
    out.extend(args.iter().cloned());
    out
}

fn jobs(artifacts: &[Artifact], args: &[String]) -> Vec<Job> {
    artifacts
        .iter()
        .map(|a| Job {
            name: a.name.clone(),
            path: a.path.clone(),
            args: args.to_vec(),
        })
        .collect()
}

/// Cross-built test binaries run inside the emulated arm64 host.
fn emulated_tests(rig: &Rig, args: &[String]) -> Side {
    let start = Instant::now();
    let mut side = Side::new("emulated arm64 host (aarch64, nested KVM)");
    let artifacts = match cross::check_debian_toolchain()
        .and_then(|()| build_guest_tools(rig))
        .and_then(|()| cross::build(Build::Tests))
    {
        Ok(artifacts) => artifacts,
        Err(e) => {
            side.problem(e.to_string());
            return side;
        }
    };
    if artifacts.is_empty() {
        side.warnings
            .push("the cross build produced no test executables".to_string());
        return side;
    }
    // The tests' own logger (tests/common init_logging) prints dormouse's
    // log at info level unless told otherwise: a failure in the emulated
    // host, where nothing can be looked at afterwards, comes with its why.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "info");
    }
    match rig::run(
        rig,
        &jobs(&artifacts, &libtest_args(args)),
        "test",
        &rig::DataUse::default(),
    ) {
        Err(e) => side.problem(e.to_string()),
        Ok(outcome) => {
            side.counts = outcome.counts();
            side.details = outcome.binaries.iter().map(|b| b.describe()).collect();
            for problem in outcome.problems() {
                side.problem(problem);
            }
            if outcome.counts().total() == 0 && outcome.done {
                let message = format!(
                    "the emulated host ran zero tests although {} test binaries exist",
                    artifacts.len()
                );
                if args.is_empty() {
                    side.problem(message);
                } else {
                    side.warnings
                        .push(format!("{message} (your filter matched none?)"));
                }
            }
        }
    }
    side.seconds = start.elapsed().as_secs_f64();
    side
}

/// Cross-builds the programs tests copy into their guests.
fn build_guest_tools(rig: &Rig) -> Result<()> {
    let tool = cross::build(Build::Example(GUEST_VSOCK_EXAMPLE))?
        .into_iter()
        .next()
        .ok_or_else(|| {
            util::Error::msg(format!("cargo built no `{GUEST_VSOCK_EXAMPLE}` example"))
        })?;
    if let Some(parent) = rig.guest_vsock.parent() {
        util::mkdir(parent)?;
    }
    std::fs::copy(&tool.path, &rig.guest_vsock).context(|| {
        format!(
            "copying {} to {}",
            tool.path.display(),
            rig.guest_vsock.display()
        )
    })?;
    Ok(())
}

/// The guest-side vsock tool in examples/.
const GUEST_VSOCK_EXAMPLE: &str = "guest_vsock";

pub struct TestOptions {
    pub host: bool,
    pub emulated: bool,
    pub args: Vec<String>,
}

/// `cargo xtask test`: returns the process exit code.
pub fn test(options: &TestOptions) -> Result<i32> {
    let rig = setup::setup()?;
    let mut sides = Vec::new();
    if native_kvm_host() {
        util::say("arm64 host with /dev/kvm: running the tests natively, no emulation");
        sides.push(host_tests(
            "native (aarch64, KVM)",
            &options.args,
            &rig.native_guest_env(),
        ));
    } else {
        if options.host {
            sides.push(host_tests("host-native (x86_64)", &options.args, &[]));
        }
        if options.emulated {
            sides.push(emulated_tests(&rig, &options.args));
        }
    }
    let mut total = Counts::default();
    println!();
    util::say("===== summary =====");
    for side in &sides {
        side.print();
        total.add(side.counts);
    }
    // The very last line: the plain total.
    println!("{total}");
    Ok(if total.failed > 0 { 1 } else { 0 })
}

/// Runs a command natively (arm64 hosts), returning its exit code.
fn run_native(mut cmd: Command) -> Result<i32> {
    util::announce(&cmd);
    let status = cmd
        .status()
        .map_err(|e| util::spawn_error(cmd.get_program(), e))?;
    Ok(status.code().unwrap_or(1))
}

/// Runs an example natively (arm64 hosts) with the guest assets in its
/// environment, returning its exit code.
fn run_native_example(rig: &Rig, example: &str, args: &[String]) -> Result<i32> {
    let mut cmd = cross::host_cargo();
    cmd.args([
        "run",
        "--package",
        cross::PACKAGE,
        "--example",
        example,
        "--",
    ])
    .args(args);
    for (name, value) in rig.native_guest_env() {
        cmd.env(name, value);
    }
    run_native(cmd)
}

/// `cargo xtask bench`: criterion benches inside the emulated host.
pub fn bench(args: &[String]) -> Result<i32> {
    if native_kvm_host() {
        let mut cmd = cross::host_cargo();
        cmd.args(["bench", "--package", cross::PACKAGE, "--"])
            .args(args);
        for (name, value) in setup::setup()?.native_guest_env() {
            cmd.env(name, value);
        }
        return run_native(cmd);
    }
    let benches = cross::package_targets("bench")?;
    if benches.is_empty() {
        util::say(format!(
            "bench: the {} package has no benches yet (benches/*.rs): nothing to run. \
             Host-native benches are just `cargo bench`.",
            cross::PACKAGE
        ));
        return Ok(0);
    }
    let rig = setup::setup()?;
    cross::check_debian_toolchain()?;
    // benches/session.rs puts the tool in its guests.
    build_guest_tools(&rig)?;
    let mut artifacts = cross::build(Build::Benches)?;
    // DORMOUSE_BENCH_ONLY=resume,snapshot runs only those bench binaries: a
    // criterion filter skips measurements, not a binary's own set-up.
    if let Ok(only) = std::env::var("DORMOUSE_BENCH_ONLY") {
        let wanted: Vec<String> = only
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|n| format!("bench-{}", n.trim()))
            .collect();
        artifacts.retain(|a| wanted.contains(&a.name));
        if artifacts.is_empty() {
            bail!("DORMOUSE_BENCH_ONLY={only:?} names no bench binary (benches/*.rs)");
        }
    }
    if artifacts.is_empty() {
        bail!(
            "cargo metadata lists benches ({}) but the cross build produced no bench executable",
            benches.join(", ")
        );
    }
    let mut bench_args = vec!["--bench".to_string()];
    bench_args.extend(args.iter().cloned());
    // criterion writes to the data disk, which starts with the last run's
    // results: its "change" lines compare against them, and results of
    // benches this run skipped stay for `cargo xtask charts`.
    let criterion_home = format!("{}/{CRITERION_DIR}", disk::MOUNT_POINT);
    let last = criterion_rig_dir();
    let outcome = rig::run(
        &rig,
        &jobs(&artifacts, &bench_args),
        "bench",
        &rig::DataUse {
            env: &[("CRITERION_HOME", &criterion_home)],
            seed: Some((&last, CRITERION_DIR)),
        },
    )?;
    let reports = copy_criterion_reports(&outcome);
    println!();
    util::say("===== bench summary =====");
    let mut failed = false;
    for binary in &outcome.binaries {
        let ok = binary.rc == Some(0);
        failed |= !ok;
        let rc = binary
            .rc
            .map(|rc| format!("rc={rc}"))
            .unwrap_or_else(|| "did not finish".to_string());
        util::say(format!(
            "  {} {}: {rc}",
            if ok { "ok    " } else { "FAILED" },
            binary.name
        ));
    }
    for problem in outcome.problems() {
        failed = true;
        util::say(format!("  FAILED: {problem}"));
    }
    match reports {
        Ok(report) => util::say(format!("criterion reports: {}", report.display())),
        Err(why) => util::say(format!("criterion reports: none ({why})")),
    }
    Ok(if failed { 1 } else { 0 })
}

/// Where criterion writes inside the data disk (CRITERION_HOME is
/// `/data/criterion`), and the name of its copy under target/.
const CRITERION_DIR: &str = "criterion";
/// The copy of the emulated host's criterion directory on this side.
pub fn criterion_rig_dir() -> PathBuf {
    util::target_dir().join("criterion-rig")
}

/// Copies criterion's output (estimates, HTML reports, SVG plots) out of
/// the bench run's data disk into target/criterion-rig/, replacing the last
/// copy. Returns the report index (relative to the workspace when it can),
/// or why there is none.
fn copy_criterion_reports(outcome: &rig::Outcome) -> std::result::Result<PathBuf, String> {
    let Some(data) = &outcome.data_disk else {
        return Err("the emulated host had no data disk".to_string());
    };
    if let rig::DataState::Unavailable(why) = &outcome.data {
        return Err(format!("the data disk did not mount: {why}"));
    }
    let dest = criterion_rig_dir();
    match disk::copy_out(&data.path, &format!("/{CRITERION_DIR}"), &dest) {
        Err(e) => Err(e.to_string()),
        Ok(false) => Err(format!(
            "no /{CRITERION_DIR} on the data disk {}: did any bench run?",
            data.path.display()
        )),
        Ok(true) => {
            let index = dest.join("report/index.html");
            if !index.is_file() {
                return Err(format!(
                    "copied {}, but it has no report/index.html: criterion makes HTML \
                     reports only with its `plotters` feature (Cargo.toml dev-dependencies)",
                    dest.display()
                ));
            }
            let root = util::workspace_root();
            Ok(index
                .strip_prefix(&root)
                .map(Path::to_path_buf)
                .unwrap_or(index))
        }
    }
}

/// `cargo xtask demo`: examples/demo.rs inside the emulated host.
pub fn demo(args: &[String]) -> Result<i32> {
    const EXAMPLE: &str = "demo";
    let examples = cross::package_targets("example")?;
    if !examples.iter().any(|e| e == EXAMPLE) {
        bail!(
            "the {} package has no example `{EXAMPLE}` yet: write examples/{EXAMPLE}.rs first",
            cross::PACKAGE
        );
    }
    let rig = setup::setup()?;
    if native_kvm_host() {
        return run_native_example(&rig, EXAMPLE, args);
    }
    cross::check_debian_toolchain()?;
    // The demo's guest service is the tool.
    build_guest_tools(&rig)?;
    let artifacts = cross::build(Build::Example(EXAMPLE))?;
    let [artifact] = artifacts.as_slice() else {
        bail!(
            "expected one `{EXAMPLE}` executable from the cross build, got {}",
            artifacts.len()
        );
    };
    let outcome = rig::run(
        &rig,
        &jobs(std::slice::from_ref(artifact), args),
        "demo",
        &rig::DataUse::default(),
    )?;
    Ok(finish("demo", &outcome))
}

/// Says how a rig run of programs (not only libtest binaries) went and
/// returns the exit code: 0 only if every job ended with rc=0 and ran no
/// failed test, and the rig saw no problem.
fn finish(label: &str, outcome: &rig::Outcome) -> i32 {
    let problems = outcome.problems();
    for problem in &problems {
        util::say(format!("{label}: FAILED: {problem}"));
    }
    let mut failed = !problems.is_empty() || outcome.binaries.is_empty();
    for binary in &outcome.binaries {
        util::say(format!("{label}: {}", binary.describe()));
        failed |= binary.effective().failed > 0;
    }
    if failed {
        util::say(format!("{label}: FAILED"));
        1
    } else {
        util::say(format!("{label}: finished with rc=0"));
        0
    }
}

/// Options of `cargo xtask soak`.
pub struct SoakOptions {
    /// CI's form: fewer cycles and sessions, no fault binaries.
    pub short: bool,
    /// Scenario names passed to examples/soak.rs.
    pub args: Vec<String>,
}

/// The fault-injection test binaries the long soak runs beside the soak
/// scenarios (they also run in `cargo xtask test`).
const SOAK_FAULT_TESTS: &[&str] = &["test-faults", "test-snapshot_enospc"];

/// `cargo xtask soak`: examples/soak.rs (cycles, density) inside the
/// emulated host; the long form also runs the fault-injection tests.
pub fn soak(options: &SoakOptions) -> Result<i32> {
    const EXAMPLE: &str = "soak";
    let rig = setup::setup()?;
    let mut args = options.args.clone();
    if options.short {
        args.insert(0, "--short".to_string());
    }
    if native_kvm_host() {
        return run_native_example(&rig, EXAMPLE, &args);
    }
    // The long form holds 32 sessions and runs for an hour or more.
    if !options.short {
        for (name, value) in [
            ("DORMOUSE_RIG_MEM_MB", "8192"),
            ("DORMOUSE_RIG_TIMEOUT_SECS", "10800"),
        ] {
            if std::env::var_os(name).is_none() {
                std::env::set_var(name, value);
            }
        }
    }
    cross::check_debian_toolchain()?;
    build_guest_tools(&rig)?;
    let soak = cross::build(Build::Example(EXAMPLE))?;
    let mut jobs = jobs(&soak, &args);
    if !options.short {
        let tests = cross::build(Build::Tests)?;
        let faults: Vec<Artifact> = tests
            .into_iter()
            .filter(|a| SOAK_FAULT_TESTS.contains(&a.name.as_str()))
            .collect();
        if faults.len() != SOAK_FAULT_TESTS.len() {
            bail!(
                "the cross build lacks some of the fault tests {SOAK_FAULT_TESTS:?} (found {:?})",
                faults.iter().map(|a| &a.name).collect::<Vec<_>>()
            );
        }
        jobs.extend(self::jobs(&faults, &libtest_args(&[])));
    }
    let outcome = rig::run(&rig, &jobs, "soak", &rig::DataUse::default())?;
    Ok(finish("soak", &outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_test_output() {
        let mut p = CargoTestOutput::default();
        p.stdout("test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
        p.stdout("test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        p.stderr("error: 2 targets failed:");
        assert_eq!(
            p.counts,
            Counts {
                passed: 3,
                failed: 1
            }
        );
        assert_eq!(
            (p.summaries, p.failed_summaries, p.failed_targets),
            (2, 1, 2)
        );
        let mut p = CargoTestOutput::default();
        p.stderr("error: test failed, to rerun pass `-p dormouse --test x`");
        assert_eq!(p.failed_targets, 1);
    }

    #[test]
    fn test_threads() {
        assert_eq!(libtest_args(&[]), ["--test-threads=1"]);
        assert_eq!(
            libtest_args(&["--test-threads=2".into(), "x".into()]),
            ["--test-threads=2", "x"]
        );
    }
}
