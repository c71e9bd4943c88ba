//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `fuzz/` once and
//! runs each for a fixed time, then says per target how far it got and
//! whether it found anything.
//!
//! The targets need the nightly toolchain (cargo-fuzz builds with
//! `-Zsanitizer=address`) and cargo-fuzz, which this installs from
//! crates.io when it is missing. New corpus entries go to
//! `fuzz/target/xtask-corpus/<target>/` (kept between local runs, never in
//! the repository); the committed seeds in `fuzz/corpus/<target>/` are only
//! read. Crashes, timeouts and out-of-memory inputs land in
//! `fuzz/artifacts/<target>/`, as with `cargo fuzz run`.
//!
//! Each target runs on every core (`--workers`, default: all of them):
//! libFuzzer's `-jobs=N -workers=N` starts N independent fuzzing processes
//! that share the corpus directory, so a target gets N times the
//! executions in the same time. Their logs are concatenated in the
//! target's log, and the executions counted are their sum.
//!
//! `--runs N` makes a target's run a check of speed too: it stops once its
//! workers have run N inputs in all, and fails if `--seconds` ran out
//! first (`--runs 1000000 --seconds 600`: a million inputs in ten minutes).
//!
//! `--sanitizer none` builds without AddressSanitizer (into
//! `fuzz/target/no-sanitizer/`, beside the default build), for long runs:
//! about three times the executions. What the targets check themselves
//! (panics, the harness's memory and ring checks, vm-memory's bounds)
//! works the same; what only ASan sees (a wild access by `unsafe` code
//! into host memory) does not, which is why the default, and CI, keep it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::util::{self, bail, Context, Result};

/// Seconds each target runs unless `--seconds` says otherwise.
pub const DEFAULT_SECONDS: u64 = 20;
/// libFuzzer's memory limit per target process.
const RSS_LIMIT_MB: u32 = 2048;
/// libFuzzer's limit for one input, in seconds (a hang is a finding).
const INPUT_TIMEOUT_SECS: u32 = 10;
/// Lines of a failed run's log shown (the panic and the top of its
/// stack; the log has the rest).
const FAILURE_TAIL_LINES: usize = 16;

pub struct FuzzOptions {
    pub seconds: u64,
    /// Fuzzing processes per target; `None`: one per core.
    pub workers: Option<u32>,
    /// Inputs a target must run (in all its workers) before `seconds` end.
    pub runs: Option<u64>,
    /// Build with AddressSanitizer (the default) or without.
    pub asan: bool,
    /// Targets to run; empty means all of them.
    pub targets: Vec<String>,
}

/// What one target's run came to.
struct Outcome {
    target: String,
    /// `None` when libFuzzer printed no final stats (it died early).
    execs: Option<u64>,
    cov: Option<u64>,
    ft: Option<u64>,
    corpus: Option<u64>,
    /// `ok`, or what libFuzzer found.
    result: String,
    failed: bool,
    artifact: Option<String>,
    log: PathBuf,
    seconds: f64,
}

/// What `cargo xtask fuzz` takes.
const USAGE: &str =
    "it takes [--seconds N] [--workers N] [--runs N] [--sanitizer address|none] [TARGET...]";

/// `[--seconds N] [--workers N] [--runs N] [--sanitizer address|none]
/// [TARGET...]`.
pub fn parse_args(args: &[String]) -> Result<FuzzOptions> {
    let mut options = FuzzOptions {
        seconds: DEFAULT_SECONDS,
        workers: None,
        runs: None,
        asan: true,
        targets: Vec::new(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (name, value) = if let Some((name, v)) = arg.split_once('=') {
            (name, Some(v))
        } else if ["--seconds", "--workers", "--runs", "--sanitizer"].contains(&arg.as_str()) {
            (arg.as_str(), args.next().map(String::as_str))
        } else if arg.starts_with('-') {
            bail!("`cargo xtask fuzz` has no option {arg}: {USAGE}");
        } else {
            options.targets.push(arg.clone());
            continue;
        };
        if name == "--sanitizer" {
            options.asan = match value {
                Some("address") => true,
                Some("none") => false,
                _ => bail!("--sanitizer takes `address` or `none`"),
            };
            continue;
        }
        let number = match value.map(str::parse::<u64>) {
            Some(Ok(n)) if n > 0 => n,
            _ => bail!("{name} takes a positive number"),
        };
        match name {
            "--seconds" => options.seconds = number,
            "--runs" => options.runs = Some(number),
            "--workers" => {
                options.workers = Some(
                    u32::try_from(number)
                        .ok()
                        .filter(|&n| n <= 256)
                        .ok_or_else(|| util::Error::msg("--workers takes at most 256"))?,
                );
            }
            _ => bail!("`cargo xtask fuzz` has no option {name}: {USAGE}"),
        }
    }
    Ok(options)
}

pub fn fuzz(options: &FuzzOptions) -> Result<i32> {
    let start = Instant::now();
    let fuzz_dir = util::workspace_root().join("fuzz");
    check_nightly()?;
    ensure_cargo_fuzz()?;

    let all = list_targets()?;
    let targets = if options.targets.is_empty() {
        all.clone()
    } else {
        for t in &options.targets {
            if !all.contains(t) {
                bail!(
                    "there is no fuzz target `{t}`: the targets are {}",
                    all.join(", ")
                );
            }
        }
        options.targets.clone()
    };

    let sanitizer = Sanitizer::new(options.asan, &fuzz_dir);
    let mut build = nightly_cargo();
    build.args(["fuzz", "build"]).args(&sanitizer.args);
    let build_start = Instant::now();
    util::run(
        &mut build,
        "the fuzz targets do not build: fix the errors above (they use dormouse's test-utils \
         helpers, so a changed device API shows up here)",
    )?;
    util::say(format!(
        "fuzz: built {} targets ({}) in {}",
        all.len(),
        sanitizer.name,
        util::secs(build_start.elapsed())
    ));

    // The harness's own tests (its memory checker, the committed seeds).
    let mut test = nightly_cargo();
    test.args(["test", "--lib", "--manifest-path"])
        .arg(fuzz_dir.join("Cargo.toml"));
    util::run(
        &mut test,
        "the fuzz harness's own tests failed (fuzz/src/): fix them before fuzzing, or a \
         finding may be the harness's",
    )?;

    let logs = fuzz_dir.join("target").join("xtask-logs");
    util::mkdir(&logs)?;
    let workers = options.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .ok()
            .and_then(|n| u32::try_from(n.get()).ok())
            .unwrap_or(1)
    });
    let plan = Plan {
        seconds: options.seconds,
        workers,
        runs: options.runs,
        sanitizer,
    };
    let mut outcomes = Vec::new();
    for target in &targets {
        outcomes.push(run_target(&fuzz_dir, &logs, target, &plan)?);
    }

    let goal = options
        .runs
        .map_or_else(String::new, |r| format!(", {r} inputs each"));
    util::say(format!(
        "fuzz: {} targets ({}), at most {}s each{goal} on {workers} worker(s), {} in all",
        outcomes.len(),
        plan.sanitizer.name,
        options.seconds,
        util::secs(start.elapsed())
    ));
    let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    for o in &outcomes {
        #[allow(clippy::cast_precision_loss)] // a rate for people to read
        let rate = o.execs.map_or_else(
            || "?".to_string(),
            |e| format!("{:.0}", e as f64 / o.seconds.max(1.0)),
        );
        util::say(format!(
            "  {:<16} {:>9} execs {:>7}/s  cov {:>5}  ft {:>6}  corpus {:>5}  {:>5.1}s  {}",
            o.target,
            show(o.execs),
            rate,
            show(o.cov),
            show(o.ft),
            show(o.corpus),
            o.seconds,
            o.result
        ));
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failed).collect();
    for o in &failed {
        util::say(format!("fuzz: {} FAILED: {}", o.target, o.result));
        print_tail(&o.log);
        util::say(format!("  full log: {}", o.log.display()));
        match &o.artifact {
            Some(artifact) => {
                util::say(format!("  input: {artifact}"));
                let s = plan.sanitizer.cli();
                util::say(format!(
                    "  reproduce: cargo +nightly fuzz run{s} {} {artifact}",
                    o.target
                ));
                util::say(format!(
                    "  minimize:  cargo +nightly fuzz tmin{s} {} {artifact}",
                    o.target
                ));
            }
            None => util::say("  (libFuzzer wrote no input; see the log)"),
        }
    }
    if failed.is_empty() {
        util::say("fuzz: no findings");
        Ok(0)
    } else {
        util::say(format!(
            "fuzz: {} of {} targets found a problem (details above)",
            failed.len(),
            outcomes.len()
        ));
        Ok(1)
    }
}

/// rustup's `cargo` proxy, so that `+nightly` works (the `CARGO` xtask
/// runs under is a toolchain's own cargo, which does not take it), without
/// the variables `cargo run` set for xtask.
fn rustup_cargo() -> Command {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let proxy = cargo_home
        .map(|h| h.join("bin").join("cargo"))
        .filter(|p| p.is_file())
        .map_or_else(|| "cargo".into(), PathBuf::into_os_string);
    let mut cmd = Command::new(proxy);
    for (name, _) in std::env::vars_os() {
        let name_str = name.to_string_lossy();
        if name_str == "CARGO"
            || name_str == "RUSTUP_TOOLCHAIN"
            || name_str == "RUSTC"
            || name_str == "RUSTDOC"
            || name_str == "LD_LIBRARY_PATH"
            || name_str.starts_with("CARGO_PKG_")
            || name_str.starts_with("CARGO_MANIFEST_")
            || name_str.starts_with("CARGO_BIN_")
            || name_str.starts_with("CARGO_CRATE_")
            || name_str == "CARGO_PRIMARY_PACKAGE"
        {
            cmd.env_remove(&name);
        }
    }
    cmd.current_dir(util::workspace_root());
    cmd
}

/// `cargo +nightly` at the workspace root.
fn nightly_cargo() -> Command {
    let mut cmd = rustup_cargo();
    cmd.arg("+nightly");
    cmd
}

fn check_nightly() -> Result<()> {
    let mut cmd = nightly_cargo();
    cmd.arg("--version");
    util::capture(
        &mut cmd,
        "the fuzz targets need rustup's nightly toolchain (cargo-fuzz builds with \
         -Zsanitizer=address); install it with `rustup toolchain install nightly`",
    )
    .map(|_| ())
}

/// Installs cargo-fuzz from crates.io unless `cargo fuzz` already works.
fn ensure_cargo_fuzz() -> Result<()> {
    let mut probe = nightly_cargo();
    probe.args(["fuzz", "--version"]);
    if let Ok(version) = util::capture(&mut probe, "") {
        util::say(format!("fuzz: using {}", version.trim()));
        return Ok(());
    }
    util::say("fuzz: cargo-fuzz is missing; installing it from crates.io (about a minute)");
    let start = Instant::now();
    let mut install = rustup_cargo();
    install.args(["install", "cargo-fuzz", "--locked"]);
    util::run(
        &mut install,
        "installing cargo-fuzz failed: check that crates.io is reachable, or install it by hand \
         with `cargo install cargo-fuzz --locked`",
    )?;
    util::say(format!(
        "fuzz: installed cargo-fuzz in {}",
        util::secs(start.elapsed())
    ));
    Ok(())
}

/// The targets `fuzz/Cargo.toml` declares.
fn list_targets() -> Result<Vec<String>> {
    let mut cmd = nightly_cargo();
    cmd.args(["fuzz", "list"]);
    let out = util::capture(
        &mut cmd,
        "`cargo fuzz list` failed: is fuzz/Cargo.toml intact?",
    )?;
    let targets: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if targets.is_empty() {
        bail!("fuzz/Cargo.toml declares no fuzz targets");
    }
    Ok(targets)
}

/// How each target runs.
struct Plan {
    seconds: u64,
    workers: u32,
    runs: Option<u64>,
    sanitizer: Sanitizer,
}

/// The sanitizer the targets are built with, as cargo-fuzz options.
struct Sanitizer {
    /// For messages.
    name: &'static str,
    /// For `cargo fuzz build` and `run`.
    args: Vec<std::ffi::OsString>,
}

impl Sanitizer {
    fn new(asan: bool, fuzz_dir: &Path) -> Self {
        if asan {
            return Self {
                name: "AddressSanitizer",
                args: Vec::new(),
            };
        }
        // Its own target directory: switching would rebuild everything.
        let dir = fuzz_dir.join("target").join("no-sanitizer");
        Self {
            name: "no sanitizer",
            args: vec![
                "--sanitizer".into(),
                "none".into(),
                "--target-dir".into(),
                dir.into_os_string(),
            ],
        }
    }

    /// `args` as they go on a printed command line (each after a space).
    fn cli(&self) -> String {
        self.args
            .iter()
            .map(|a| format!(" {}", a.to_string_lossy()))
            .collect()
    }
}

fn run_target(fuzz_dir: &Path, logs: &Path, target: &str, plan: &Plan) -> Result<Outcome> {
    let Plan {
        seconds,
        workers,
        runs,
        ref sanitizer,
    } = *plan;
    let work_corpus = fuzz_dir.join("target").join("xtask-corpus").join(target);
    let seeds = fuzz_dir.join("corpus").join(target);
    util::mkdir(&work_corpus)?;
    util::mkdir(&seeds)?;
    // libFuzzer's workers write `fuzz-<n>.log` in their working directory
    // (the parent then prints each one whole): one directory per target.
    let work_dir = logs.join(format!("{target}.workers"));
    util::mkdir(&work_dir)?;
    let log = logs.join(format!("{target}.log"));
    let file = File::create(&log).context(|| format!("cannot create {}", log.display()))?;
    let file2 = file
        .try_clone()
        .context(|| format!("cannot reopen {}", log.display()))?;

    let mut cmd = nightly_cargo();
    cmd.args(["fuzz", "run"])
        .args(&sanitizer.args)
        .arg("--fuzz-dir")
        .arg(fuzz_dir)
        .arg(target)
        .arg(&work_corpus)
        .arg(&seeds)
        .arg("--")
        .args(
            (workers > 1)
                .then(|| [format!("-jobs={workers}"), format!("-workers={workers}")])
                .into_iter()
                .flatten(),
        )
        .args(runs.map(|r| format!("-runs={}", r.div_ceil(u64::from(workers)))))
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(file2))
        .current_dir(&work_dir);
    util::announce(&cmd);
    let start = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| util::spawn_error(cmd.get_program(), e))?;
    let elapsed = start.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut outcome = parse_log(target, &text, status.success());
    if !status.success() && !outcome.failed {
        outcome.failed = true;
        outcome.result = format!("cargo fuzz run failed ({})", util::status_text(status));
    }
    if let (Some(goal), false) = (runs, outcome.failed) {
        let done = outcome.execs.unwrap_or(0);
        if done < goal {
            outcome.failed = true;
            outcome.result = format!("too slow: {done} of {goal} inputs in {seconds} s");
        }
    }
    outcome.log = log;
    outcome.seconds = elapsed;
    Ok(outcome)
}

/// Reads libFuzzer's output (one process's, or several workers' one after
/// the other): the largest cov/ft/corpus of the status lines, the sum of
/// the final stats' executions, and what went wrong if anything did.
fn parse_log(target: &str, text: &str, success: bool) -> Outcome {
    let mut o = Outcome {
        target: target.to_string(),
        execs: None,
        cov: None,
        ft: None,
        corpus: None,
        result: "ok".to_string(),
        failed: !success,
        artifact: None,
        log: PathBuf::new(),
        seconds: 0.0,
    };
    let mut last_execs = None;
    let max = |a: Option<u64>, b: Option<u64>| a.max(b);
    for line in text.lines() {
        // "#22170	DONE   cov: 1021 ft: 4087 corp: 236/3046b lim: 38 ..."
        if line.starts_with('#') && line.contains("cov: ") {
            last_execs = line[1..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok());
            o.cov = max(field(line, "cov:"), o.cov);
            o.ft = max(field(line, "ft:"), o.ft);
            o.corpus = max(field(line, "corp:"), o.corpus);
        }
        if let Some(rest) = line.strip_prefix("stat::number_of_executed_units:") {
            if let Ok(n) = rest.trim().parse::<u64>() {
                o.execs = Some(o.execs.unwrap_or(0) + n);
            }
        }
        if let Some(at) = line.find("Test unit written to ") {
            o.artifact = Some(
                line[at + "Test unit written to ".len()..]
                    .trim()
                    .to_string(),
            );
        }
        let finding = if line.contains("ERROR: libFuzzer: timeout") {
            Some("timeout (an input ran too long)")
        } else if line.contains("ERROR: libFuzzer: out-of-memory") {
            Some("out of memory")
        } else if line.contains("ERROR: AddressSanitizer") {
            Some("memory error (AddressSanitizer)")
        } else if line.contains("panicked at") {
            Some("panic")
        } else if line.contains("ERROR: libFuzzer: deadly signal") {
            Some("crash")
        } else {
            None
        };
        // The first finding names it (a panic also ends in "deadly signal").
        if let Some(f) = finding {
            if o.result == "ok" {
                o.result = f.to_string();
            }
            o.failed = true;
        }
    }
    if o.execs.is_none() {
        o.execs = last_execs;
    }
    if o.failed && o.result == "ok" {
        o.result = "failed".to_string();
    }
    o
}

/// The number after `key` in a libFuzzer status line (`corp: 236/3046b`
/// gives 236).
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn print_tail(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    // From the first line that says what happened, if there is one.
    let first = lines
        .iter()
        .position(|l| l.contains("panicked at") || l.contains("ERROR: "))
        .unwrap_or(lines.len().saturating_sub(FAILURE_TAIL_LINES));
    for line in lines.iter().skip(first).take(FAILURE_TAIL_LINES) {
        println!("    {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = parse_args(&words(&[])).unwrap();
        assert_eq!((o.seconds, o.targets.len()), (DEFAULT_SECONDS, 0));
        let o = parse_args(&words(&["--seconds", "5", "virtio_blk", "--seconds=7"])).unwrap();
        assert_eq!((o.seconds, o.targets), (7, vec!["virtio_blk".to_string()]));
        assert!(parse_args(&words(&["--seconds"])).is_err());
        assert!(parse_args(&words(&["--seconds", "0"])).is_err());
        assert!(parse_args(&words(&["--jobs", "2"])).is_err());
        assert!(parse_args(&words(&["--jobs=2"])).is_err());
        assert!(parse_args(&words(&["--workers", "0"])).is_err());
        let o = parse_args(&words(&["--workers=2", "a", "b"])).unwrap();
        assert_eq!((o.workers, o.targets.len()), (Some(2), 2));
        assert_eq!(parse_args(&words(&[])).unwrap().workers, None);
        let o = parse_args(&words(&["--runs", "1000000", "--seconds=600"])).unwrap();
        assert_eq!((o.runs, o.seconds), (Some(1_000_000), 600));
        assert!(parse_args(&words(&["--runs=x"])).is_err());
        assert!(parse_args(&words(&[])).unwrap().asan);
        assert!(!parse_args(&words(&["--sanitizer", "none"])).unwrap().asan);
        assert!(parse_args(&words(&["--sanitizer=address"])).unwrap().asan);
        assert!(parse_args(&words(&["--sanitizer=memory"])).is_err());
        assert!(parse_args(&words(&["--sanitizer"])).is_err());
    }

    #[test]
    fn workers_logs_add_up() {
        let log = "\
================== Job 1 exited with exit code 0 ============
#2\tINITED cov: 100 ft: 120 corp: 4/200b exec/s: 0 rss: 50Mb
#9000\tDONE   cov: 990 ft: 4000 corp: 230/3000b exec/s: 900 rss: 251Mb
stat::number_of_executed_units: 9000
================== Job 0 exited with exit code 0 ============
#8000\tDONE   cov: 1021 ft: 3900 corp: 236/3046b exec/s: 800 rss: 251Mb
stat::number_of_executed_units: 8000
";
        let o = parse_log("t", log, true);
        assert!(!o.failed);
        assert_eq!(
            (o.execs, o.cov, o.ft, o.corpus),
            (Some(17000), Some(1021), Some(4000), Some(236))
        );
    }

    #[test]
    fn a_clean_run_is_parsed() {
        let log = "\
INFO: Seed: 1
#2\tINITED cov: 100 ft: 120 corp: 4/200b exec/s: 0 rss: 50Mb
#22170\tDONE   cov: 1021 ft: 4087 corp: 236/3046b lim: 38 exec/s: 715 rss: 251Mb
Done 22170 runs in 31 second(s)
stat::number_of_executed_units: 22170
stat::average_exec_per_sec:     715
";
        let o = parse_log("t", log, true);
        assert!(!o.failed);
        assert_eq!(o.result, "ok");
        assert_eq!(
            (o.execs, o.cov, o.ft, o.corpus),
            (Some(22170), Some(1021), Some(4087), Some(236))
        );
    }

    #[test]
    fn a_panic_is_parsed_with_its_artifact() {
        let log = "\
#1024\tpulse  cov: 900 ft: 2000 corp: 50/1kb exec/s: 500 rss: 200Mb
thread '<unnamed>' panicked at fuzz_targets/x.rs:1:1:
boom
==1== ERROR: libFuzzer: deadly signal
artifact_prefix='/r/fuzz/artifacts/t/'; Test unit written to /r/fuzz/artifacts/t/crash-abc
stat::number_of_executed_units: 1030
";
        let o = parse_log("t", log, false);
        assert!(o.failed);
        assert_eq!(o.result, "panic");
        assert_eq!(o.artifact.as_deref(), Some("/r/fuzz/artifacts/t/crash-abc"));
        assert_eq!((o.execs, o.cov), (Some(1030), Some(900)));

        let o = parse_log(
            "t",
            "==2== ERROR: libFuzzer: timeout after 10 seconds\n",
            false,
        );
        assert_eq!(o.result, "timeout (an input ran too long)");
        let o = parse_log(
            "t",
            "==3== ERROR: libFuzzer: out-of-memory (used: 2100Mb)\n",
            false,
        );
        assert_eq!(o.result, "out of memory");
    }
}
