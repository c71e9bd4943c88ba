//! Rate-limited logging for what a guest can trigger.
//!
//! A guest controls how often its drivers misbehave, so a warning it can
//! provoke must not let it flood the host's log. [`guest_warn!`] logs at
//! most [`BURST`] messages per call site in each [`WINDOW`], and the first
//! message of the next window says how many were suppressed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Messages one call site may log per window.
pub const BURST: u64 = 10;
/// The window the burst is counted in.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One call site's budget. Lock-free: callers on any thread.
#[derive(Debug)]
pub struct LogLimiter {
    /// The current window's number since the process's first message.
    window: AtomicU64,
    /// Messages asked for in the current window.
    count: AtomicU64,
    /// Messages suppressed and not yet reported.
    suppressed: AtomicU64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogLimiter {
    /// A fresh budget.
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a message may be logged now: `Some(n)` with the number of
    /// messages suppressed since the last one logged, or `None`.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(epoch().elapsed())
    }

    /// [`allow`](Self::allow) at a given time since the process's epoch.
    pub fn allow_at(&self, now: Duration) -> Option<u64> {
        let window = u64::try_from(now.as_nanos() / WINDOW.as_nanos()).unwrap_or(u64::MAX);
        let seen = self.window.load(Ordering::Acquire);
        if window > seen
            && self
                .window
                .compare_exchange(seen, window, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.count.store(0, Ordering::Release);
        }
        if self.count.fetch_add(1, Ordering::AcqRel) < BURST {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

/// `log::warn!` for messages a guest can provoke, limited per call site
/// (see the [module docs](crate::log_limit)).
#[macro_export]
#[doc(hidden)]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimiter = $crate::log_limit::LogLimiter::new();
        if let Some(suppressed) = LIMIT.allow() {
            if suppressed > 0 {
                log::warn!(
                    "{} ({suppressed} similar messages suppressed)",
                    format_args!($($arg)+)
                );
            } else {
                log::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_messages_are_counted_until_the_next_window() {
        let limit = LogLimiter::new();
        let t0 = Duration::from_secs(1);
        for _ in 0..BURST {
            assert_eq!(limit.allow_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(limit.allow_at(t0), None);
        }
        // The next window: the first message reports what was dropped.
        let t1 = t0 + WINDOW;
        assert_eq!(limit.allow_at(t1), Some(1000));
        assert_eq!(limit.allow_at(t1), Some(0));
    }
}
