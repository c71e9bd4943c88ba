//! The console sink of image and session VMs: keeps the last lines (for
//! errors and [`Session::console_tail`](super::Session::console_tail)) and
//! wakes whoever waits for a given line.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How many complete lines the tail keeps.
const TAIL_LINES: usize = 40;
/// The longest line kept whole; longer lines are cut (a guest could print
/// without newlines forever).
const MAX_LINE: usize = 512;

#[derive(Default)]
struct Lines {
    done: VecDeque<String>,
    partial: Vec<u8>,
    /// Every complete line ever seen, counted.
    seen: u64,
}

/// A console sink shared between the VM's console thread and its owner.
#[derive(Clone, Default)]
pub(crate) struct ConsoleTail {
    inner: Arc<(Mutex<Lines>, Condvar)>,
}

impl ConsoleTail {
    /// The last lines, oldest first (the unfinished one last).
    pub(crate) fn lines(&self) -> Vec<String> {
        let Ok(lines) = self.inner.0.lock() else {
            return Vec::new();
        };
        let mut out: Vec<String> = lines.done.iter().cloned().collect();
        if !lines.partial.is_empty() {
            out.push(String::from_utf8_lossy(&lines.partial).into_owned());
        }
        out
    }

    /// Waits until a complete line contains `needle`, for at most
    /// `timeout`; true if one did.
    pub(crate) fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.inner;
        let Ok(mut lines) = lock.lock() else {
            return false;
        };
        loop {
            if lines.done.iter().any(|l| l.contains(needle)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            lines = match cvar.wait_timeout(lines, deadline - now) {
                Ok((l, _)) => l,
                Err(_) => return false,
            };
        }
    }
}

impl Write for ConsoleTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (lock, cvar) = &*self.inner;
        let mut lines = lock.lock().map_err(|_| std::io::Error::other("poisoned"))?;
        let mut ended = false;
        for &b in buf {
            match b {
                b'\n' => {
                    let line = String::from_utf8_lossy(&lines.partial)
                        .trim_end_matches('\r')
                        .to_owned();
                    lines.partial.clear();
                    if lines.done.len() == TAIL_LINES {
                        lines.done.pop_front();
                    }
                    lines.done.push_back(line);
                    lines.seen += 1;
                    ended = true;
                }
                _ if lines.partial.len() < MAX_LINE => lines.partial.push(b),
                _ => {}
            }
        }
        if ended {
            cvar.notify_all();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_and_finds_a_marker() {
        let mut tail = ConsoleTail::default();
        for i in 0..100 {
            writeln!(tail, "line {i}").unwrap();
        }
        write!(tail, "partial").unwrap();
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES + 1);
        assert_eq!(lines[0], "line 60");
        assert_eq!(lines.last().unwrap(), "partial");
        assert!(tail.wait_for("line 99", Duration::ZERO));
        assert!(!tail.wait_for("partial", Duration::from_millis(10)));
        let waiter = tail.clone();
        let t = std::thread::spawn(move || waiter.wait_for("READY", Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        writeln!(tail, "init: READY").unwrap();
        assert!(t.join().unwrap());
    }

    #[test]
    fn a_line_without_end_is_cut() {
        let mut tail = ConsoleTail::default();
        tail.write_all(&vec![b'x'; 10 * MAX_LINE]).unwrap();
        assert_eq!(tail.lines()[0].len(), MAX_LINE);
    }
}
