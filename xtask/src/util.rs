//! Small helpers shared by every command: the error type, running child
//! processes with their command line printed first, and workspace paths.

use std::ffi::OsStr;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// An error whose message already says what went wrong and what to do next.
pub struct Error(String);

impl Error {
    pub fn msg(message: impl Into<String>) -> Self {
        Error(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Returns early with an [`Error`] built like `format!`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::util::Error::msg(format!($($arg)*)))
    };
}
pub(crate) use bail;

/// Adds a sentence of context (what we were doing, what to do) to any error.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

/// Prints one of xtask's own progress lines (prefixed so they stand out
/// from the output of the tools it runs).
pub fn say(message: impl fmt::Display) {
    println!("xtask: {message}");
}

/// Prints a warning line.
pub fn warn(message: impl fmt::Display) {
    println!("xtask: warning: {message}");
}

/// The workspace root (the directory holding the root Cargo.toml).
///
/// `cargo run` sets `CARGO_MANIFEST_DIR` to `<root>/xtask`; when the binary
/// runs by itself we fall back to where it was compiled.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.join("..").join("Cargo.toml").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(manifest_dir)
}

/// `<root>/target`, honouring neither `CARGO_TARGET_DIR` nor config: the rig
/// keeps its cache in a fixed place.
pub fn target_dir() -> PathBuf {
    workspace_root().join("target")
}

/// Quotes a word for display (and for /bin/sh) if it needs it.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The command line of `cmd` as one could paste it into a shell.
pub fn describe(cmd: &Command) -> String {
    let mut words = vec![shell_quote(&cmd.get_program().to_string_lossy())];
    words.extend(cmd.get_args().map(|a| shell_quote(&a.to_string_lossy())));
    words.join(" ")
}

/// Prints the command line about to run.
pub fn announce(cmd: &Command) {
    match cmd.get_current_dir() {
        Some(dir) => println!("xtask: $ (cd {} && {})", dir.display(), describe(cmd)),
        None => println!("xtask: $ {}", describe(cmd)),
    }
}

/// A human description of how a process ended.
pub fn status_text(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "unknown exit status".to_string(),
    }
}

/// Explains a failure to start `program`.
pub fn spawn_error(program: &OsStr, err: std::io::Error) -> Error {
    let name = program.to_string_lossy();
    if err.kind() == std::io::ErrorKind::NotFound {
        Error(format!(
            "`{name}` was not found: run `cargo xtask setup` to install the tools \
             (it needs root and Debian's apt), or install the package providing `{name}`"
        ))
    } else {
        Error(format!("could not start `{name}`: {err}"))
    }
}

/// Runs `cmd` with inherited stdio; `hint` says what to do if it fails.
pub fn run(cmd: &mut Command, hint: &str) -> Result<()> {
    announce(cmd);
    let status = cmd
        .status()
        .map_err(|e| spawn_error(cmd.get_program(), e))?;
    if !status.success() {
        bail!(
            "`{}` failed ({}): {hint}",
            describe(cmd),
            status_text(status)
        );
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; stderr is captured too and shown only
/// if the command fails. Nothing is printed when it succeeds.
pub fn capture(cmd: &mut Command, hint: &str) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd.get_program(), e))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "`{}` failed ({}): {}\n{hint}",
            describe(cmd),
            status_text(output.status),
            stderr.trim()
        );
    }
    String::from_utf8(output.stdout).context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}

/// Reads `reader` line by line (lossy UTF-8, `\r` stripped), calling `f` on each
/// line; a final line without a newline is delivered too.
pub fn for_each_line(reader: impl Read, mut f: impl FnMut(String)) {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                f(String::from_utf8_lossy(&buf).replace('\r', ""));
            }
        }
    }
}

/// A line from a child's stdout or stderr.
pub enum Line {
    Out(String),
    Err(String),
}

/// Forwards the lines of `reader` to `tx` from a new thread.
pub fn pump(
    reader: impl Read + Send + 'static,
    tx: std::sync::mpsc::Sender<Line>,
    wrap: fn(String) -> Line,
) {
    std::thread::spawn(move || {
        for_each_line(reader, |line| {
            let _ = tx.send(wrap(line));
        });
    });
}

/// Creates `dir` and its parents.
pub fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).context(|| format!("cannot create directory {}", dir.display()))
}

/// Removes `path` (a file or a whole tree) if it exists.
pub fn remove_all(path: &Path) -> Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    result.context(|| format!("cannot remove {}", path.display()))
}

/// Copies a file, creating the destination's parent directories.
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        mkdir(parent)?;
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

/// Formats a duration in seconds with one decimal.
pub fn secs(d: std::time::Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Whether we run as root (reads /proc, so no libc dependency).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc-1.x"), "abc-1.x");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn lines_strip_cr() {
        let mut lines = Vec::new();
        for_each_line(&b"one\r\ntwo\r\r\nthree"[..], |l| lines.push(l));
        assert_eq!(lines, ["one", "two", "three"]);
    }
}
