//! Warnings a guest (or a host process) can trigger at will are
//! rate-limited, so that nobody can flood the embedder's log: at most
//! [`BURST`] per [`WINDOW`]; the first one let through after a quiet spell
//! says how many were held back.

use std::time::{Duration, Instant};

/// The most warnings logged per window.
pub(crate) const BURST: u32 = 10;
/// The window.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);

/// A per-device warning budget.
#[derive(Debug, Default)]
pub(crate) struct WarnLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
    /// Warnings let through so far (for tests).
    logged: u64,
}

impl WarnLimiter {
    /// Whether a warning may be logged at `now`; `Some(n)` if so, with
    /// `n` the warnings suppressed since the last one logged.
    pub(crate) fn check(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= WINDOW);
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= BURST {
            self.suppressed += 1;
            return None;
        }
        self.in_window += 1;
        self.logged += 1;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// How many warnings were logged.
    #[cfg(test)]
    pub(crate) fn logged(&self) -> u64 {
        self.logged
    }
}

/// `log::warn!` through a [`WarnLimiter`].
macro_rules! limited_warn {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(held_back) = $limiter.check(std::time::Instant::now()) {
            if held_back > 0 {
                log::warn!("vsock: {held_back} similar warnings were suppressed");
            }
            log::warn!($($arg)+);
        }
    };
}
pub(crate) use limited_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_a_count_of_what_was_held_back() {
        let mut l = WarnLimiter::default();
        let t0 = Instant::now();
        for i in 0..BURST {
            assert_eq!(l.check(t0 + Duration::from_millis(u64::from(i))), Some(0));
        }
        for _ in 0..100 {
            assert_eq!(l.check(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(l.logged(), u64::from(BURST));
        // The next window lets one through, with the count.
        assert_eq!(l.check(t0 + WINDOW), Some(100));
        assert_eq!(l.check(t0 + WINDOW), Some(0));
        // A clock that goes backwards does not open a window.
        for _ in 0..BURST {
            l.check(t0);
        }
        assert_eq!(l.check(t0), None);
    }
}
