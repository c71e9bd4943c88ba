//! Token-bucket rate limiters for virtio devices (Firecracker's model,
//! written for dormouse): a device may have a *bandwidth* bucket (tokens are
//! bytes) and an *operations* bucket (tokens are requests or frames).
//!
//! A [`TokenBucket`] holds at most `size` tokens and refills continuously at
//! `size` tokens per `refill_time_ms`, so its long-run rate is
//! `size * 1000 / refill_time_ms` tokens per second. It starts full, and
//! may also have a *one-time burst*: extra tokens spent before the regular
//! budget and never refilled (a fast boot, say).
//!
//! Consuming is all or nothing, and never splits a request:
//!
//! - A request of `n` tokens passes if the burst plus the budget covers it;
//!   the burst is spent first.
//! - A request larger than the whole bucket (`n > size` plus what is left
//!   of the burst) could never be covered. It passes when the bucket is
//!   full, and *overdraws* it: the budget goes negative by the excess, and
//!   the refills repay that debt before anything else passes. So the
//!   long-run rate holds for any request size, and a request is never cut.
//! - Otherwise the request is refused, nothing is taken, and the bucket
//!   tells how long until it would pass.
//!
//! A [`RateLimiter`] puts the two buckets together: a request passes only if
//! both buckets let it (then both are charged). When it refuses, the limiter
//! arms its timerfd for the moment the budget returns and stays *blocked*
//! (refusing everything without looking) until the device, woken by that
//! timerfd on its event loop, calls [`RateLimiter::timer_fired`]. The device
//! meanwhile leaves the refused request where it was (in the available ring
//! or held as pending) and stops processing that queue.
//!
//! A snapshot keeps each bucket's budget and what is left of its burst
//! ([`RateLimiterState`]); the time between snapshot and restore earns
//! nothing, so a restored device continues where it left off.
//!
//! Time comes from the caller (`*_at` methods take an [`Instant`]), so the
//! buckets are tested with an exact clock; the devices pass
//! [`Instant::now`].

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// The largest bucket size or one-time burst accepted: 2^50 (a PiB of
/// bandwidth, or 10^15 operations), far above any real limit.
pub const MAX_TOKENS: u64 = 1 << 50;
/// The longest refill time accepted: one day.
pub const MAX_REFILL_TIME_MS: u64 = 24 * 60 * 60 * 1000;
/// The shortest wait the timer is armed for (a zero wait would disarm it).
const MIN_WAIT: Duration = Duration::from_micros(1);
/// Nanoseconds in a millisecond.
const NS_PER_MS: u128 = 1_000_000;

/// Which of a limiter's two buckets a configuration error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketKind {
    /// The bandwidth bucket (bytes).
    Bandwidth,
    /// The operations bucket (requests or frames).
    Ops,
}

impl std::fmt::Display for BucketKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BucketKind::Bandwidth => "bandwidth",
            BucketKind::Ops => "operations",
        })
    }
}

/// A token bucket's configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimiterConfigError {
    /// A bucket of size zero would never let anything through.
    #[error(
        "the {0} bucket has size 0, which would block the device forever: give it a size of at \
         least 1, or leave the bucket out for no limit"
    )]
    ZeroSize(BucketKind),
    /// A refill time of zero is an infinite rate.
    #[error(
        "the {0} bucket has a refill time of 0 ms (an infinite rate): give a refill time of at \
         least 1 ms, or leave the bucket out for no limit"
    )]
    ZeroRefillTime(BucketKind),
    /// The bucket size is beyond any real limit.
    #[error("the {bucket} bucket's size {size} is above the maximum {max}: give a smaller size")]
    SizeTooLarge {
        /// The bucket.
        bucket: BucketKind,
        /// The size given.
        size: u64,
        /// [`MAX_TOKENS`].
        max: u64,
    },
    /// The one-time burst is beyond any real limit.
    #[error(
        "the {bucket} bucket's one-time burst {burst} is above the maximum {max}: give a \
         smaller burst"
    )]
    BurstTooLarge {
        /// The bucket.
        bucket: BucketKind,
        /// The burst given.
        burst: u64,
        /// [`MAX_TOKENS`].
        max: u64,
    },
    /// The refill time is longer than a day.
    #[error(
        "the {bucket} bucket's refill time {refill_time_ms} ms is above the maximum {max} ms \
         (one day): scale size and refill time down together"
    )]
    RefillTimeTooLong {
        /// The bucket.
        bucket: BucketKind,
        /// The refill time given.
        refill_time_ms: u64,
        /// [`MAX_REFILL_TIME_MS`].
        max: u64,
    },
}

/// Why a rate limiter could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] RateLimiterConfigError),
    /// The timerfd that wakes the device could not be created or set up.
    #[error("could not create the rate limiter's timerfd (out of file descriptors?)")]
    Timer(#[source] io::Error),
}

/// One token bucket: `size` tokens, refilled in full every `refill_time_ms`
/// milliseconds, plus a `one_time_burst` spent once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketConfig {
    /// The most tokens the bucket holds (bytes or operations).
    pub size: u64,
    /// Extra tokens usable once, before the regular budget; never refilled.
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens from empty.
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    /// A bucket of `size` tokens refilled every `refill_time_ms`, with no
    /// one-time burst.
    pub fn new(size: u64, refill_time_ms: u64) -> Self {
        Self {
            size,
            one_time_burst: 0,
            refill_time_ms,
        }
    }

    /// `rate` tokens per second, at most one second's worth at once.
    pub fn per_second(rate: u64) -> Self {
        Self::new(rate, 1000)
    }

    /// The same bucket with a one-time burst of `tokens`.
    pub fn with_one_time_burst(mut self, tokens: u64) -> Self {
        self.one_time_burst = tokens;
        self
    }

    /// Checks that the bucket can work (the `bucket` names it in errors).
    pub fn validate(&self, bucket: BucketKind) -> Result<(), RateLimiterConfigError> {
        if self.size == 0 {
            return Err(RateLimiterConfigError::ZeroSize(bucket));
        }
        if self.refill_time_ms == 0 {
            return Err(RateLimiterConfigError::ZeroRefillTime(bucket));
        }
        if self.size > MAX_TOKENS {
            return Err(RateLimiterConfigError::SizeTooLarge {
                bucket,
                size: self.size,
                max: MAX_TOKENS,
            });
        }
        if self.one_time_burst > MAX_TOKENS {
            return Err(RateLimiterConfigError::BurstTooLarge {
                bucket,
                burst: self.one_time_burst,
                max: MAX_TOKENS,
            });
        }
        if self.refill_time_ms > MAX_REFILL_TIME_MS {
            return Err(RateLimiterConfigError::RefillTimeTooLong {
                bucket,
                refill_time_ms: self.refill_time_ms,
                max: MAX_REFILL_TIME_MS,
            });
        }
        Ok(())
    }

    /// The long-run rate in tokens per second.
    pub fn rate_per_second(&self) -> f64 {
        // Display only: precision loss above 2^53 tokens does not matter.
        #[allow(clippy::cast_precision_loss)]
        let rate = self.size as f64 * 1000.0 / self.refill_time_ms as f64;
        rate
    }
}

/// A device's (or one direction's) limits: either bucket may be absent,
/// and with neither the device is not limited.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterConfig {
    /// Bytes.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Requests (virtio-blk) or frames (virtio-net).
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// No limit.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Whether neither bucket is set.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Checks both buckets.
    pub fn validate(&self) -> Result<(), RateLimiterConfigError> {
        if let Some(b) = &self.bandwidth {
            b.validate(BucketKind::Bandwidth)?;
        }
        if let Some(b) = &self.ops {
            b.validate(BucketKind::Ops)?;
        }
        Ok(())
    }
}

/// A bucket's budget, for snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketState {
    /// Regular tokens left; negative while an oversize request is repaid.
    pub budget: i64,
    /// What is left of the one-time burst.
    pub one_time_burst: u64,
}

/// A rate limiter's buckets' budgets, for snapshots.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterState {
    /// The bandwidth bucket, if the limiter has one.
    pub bandwidth: Option<TokenBucketState>,
    /// The operations bucket, if the limiter has one.
    pub ops: Option<TokenBucketState>,
}

/// A token bucket (see the module documentation for how consuming works).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: TokenBucketConfig,
    /// Regular tokens; negative while a request larger than the bucket is
    /// being repaid. At most `size`.
    budget: i128,
    /// What is left of the one-time burst.
    burst: u64,
    /// Refill progress below one token, in token-nanoseconds (units of
    /// `1 / refill_ns` tokens): kept so that no refill time is lost.
    partial: u128,
    /// When the bucket was last refilled.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket as of `now`; `kind` names it in errors.
    pub fn new(
        config: TokenBucketConfig,
        kind: BucketKind,
        now: Instant,
    ) -> Result<Self, RateLimiterConfigError> {
        config.validate(kind)?;
        Ok(Self {
            config,
            budget: i128::from(config.size),
            burst: config.one_time_burst,
            partial: 0,
            last: now,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> TokenBucketConfig {
        self.config
    }

    /// Regular tokens available (negative while in debt), as of the last
    /// refill.
    pub fn budget(&self) -> i128 {
        self.budget
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.burst
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.config.refill_time_ms) * NS_PER_MS
    }

    fn size(&self) -> i128 {
        i128::from(self.config.size)
    }

    /// Adds the tokens earned since the last refill. Time going backwards
    /// (an `Instant` older than the last) earns nothing.
    pub fn refill(&mut self, now: Instant) {
        let Some(elapsed) = now.checked_duration_since(self.last) else {
            return;
        };
        self.last = now;
        if self.budget >= self.size() {
            self.partial = 0;
            return;
        }
        // Saturating: only an absurd clock jump could reach 2^128, and
        // then the bucket is full anyway.
        let total = elapsed
            .as_nanos()
            .saturating_mul(u128::from(self.config.size))
            .saturating_add(self.partial);
        let refill_ns = self.refill_ns();
        let earned = total / refill_ns;
        self.partial = total % refill_ns;
        // earned <= total < 2^127.
        let earned = i128::try_from(earned).unwrap_or(i128::MAX);
        self.budget = self.budget.saturating_add(earned).min(self.size());
        if self.budget == self.size() {
            self.partial = 0;
        }
    }

    /// After a [`refill`](Self::refill): `None` if `tokens` may be taken
    /// now, else how long until they may.
    fn wait_for(&self, tokens: u64) -> Option<Duration> {
        let have = i128::from(self.burst) + self.budget;
        let tokens = i128::from(tokens);
        if have >= tokens {
            return None;
        }
        // A request the bucket can never cover passes on a full bucket.
        let oversize = tokens > self.size() + i128::from(self.burst);
        if oversize && self.budget >= self.size() {
            return None;
        }
        let missing = if oversize {
            self.size() - self.budget
        } else {
            tokens - have
        };
        // missing > 0 and <= size + debt; the debt is at most one request.
        let missing = u128::try_from(missing).unwrap_or(0);
        let needed = missing
            .saturating_mul(self.refill_ns())
            .saturating_sub(self.partial);
        let ns = needed.div_ceil(u128::from(self.config.size));
        Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    /// Its budget as of `now`, for a snapshot.
    pub fn save_at(&self, now: Instant) -> TokenBucketState {
        let mut current = self.clone();
        current.refill(now);
        TokenBucketState {
            budget: i64::try_from(current.budget).unwrap_or(i64::MIN),
            one_time_burst: current.burst,
        }
    }

    /// Puts a saved budget back as of `now`. The state comes from a file:
    /// the budget is capped at the bucket's size and the burst at the
    /// configured one, so a snapshot can never grant more than a fresh
    /// bucket has.
    pub fn restore_at(&mut self, state: &TokenBucketState, now: Instant) {
        self.budget = i128::from(state.budget).min(self.size());
        self.burst = state.one_time_burst.min(self.config.one_time_burst);
        self.partial = 0;
        self.last = now;
    }

    /// Takes `tokens`, which [`wait_for`](Self::wait_for) allowed: the
    /// burst first, then the budget (into debt for an oversize request).
    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    /// Refills as of `now`, then takes `tokens` if the bucket allows it;
    /// otherwise takes nothing and returns how long until it would.
    pub fn consume_at(&mut self, tokens: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        match self.wait_for(tokens) {
            None => {
                self.take(tokens);
                Ok(())
            }
            Some(wait) => Err(wait),
        }
    }
}

/// A bandwidth bucket and an operations bucket, with the timerfd that
/// tells the device when a refused request may pass.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter with full buckets. The configuration is checked first.
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        config.validate()?;
        let now = Instant::now();
        let bucket = |c: Option<TokenBucketConfig>, kind| c.map(|c| TokenBucket::new(c, kind, now));
        let timer = TimerFd::new().map_err(|e| RateLimiterError::Timer(e.into()))?;
        crate::devices::set_nonblocking(&timer).map_err(RateLimiterError::Timer)?;
        Ok(Self {
            bandwidth: bucket(config.bandwidth, BucketKind::Bandwidth).transpose()?,
            ops: bucket(config.ops, BucketKind::Ops).transpose()?,
            timer,
            blocked: false,
        })
    }

    /// The configuration it was made from.
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// The bandwidth bucket, if it has one.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The operations bucket, if it has one.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// Whether it refused a request and waits for its timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The buckets' budgets now, for a snapshot.
    pub fn save(&self) -> RateLimiterState {
        let now = Instant::now();
        RateLimiterState {
            bandwidth: self.bandwidth.as_ref().map(|b| b.save_at(now)),
            ops: self.ops.as_ref().map(|b| b.save_at(now)),
        }
    }

    /// Puts saved budgets back into the buckets both the limiter and the
    /// state have (a bucket the state lacks stays as it is). The limiter is
    /// not blocked afterwards: the device's next pass finds out.
    pub fn restore(&mut self, state: &RateLimiterState) {
        let now = Instant::now();
        for (bucket, saved) in [
            (&mut self.bandwidth, &state.bandwidth),
            (&mut self.ops, &state.ops),
        ] {
            if let (Some(bucket), Some(saved)) = (bucket, saved) {
                bucket.restore_at(saved, now);
            }
        }
        self.blocked = false;
    }

    /// [`consume_at`](Self::consume_at) now.
    pub fn consume(&mut self, ops: u64, bytes: u64) -> bool {
        self.consume_at(ops, bytes, Instant::now())
    }

    /// Charges a request of `ops` operations and `bytes` bytes if both
    /// buckets allow it, and returns whether they did. When they do not,
    /// nothing is charged, the timer is armed for when both will, and the
    /// limiter refuses everything until [`timer_fired`](Self::timer_fired).
    pub fn consume_at(&mut self, ops: u64, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let mut wait: Option<Duration> = None;
        for (bucket, tokens) in [(&mut self.ops, ops), (&mut self.bandwidth, bytes)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                if let Some(w) = bucket.wait_for(tokens) {
                    wait = Some(wait.map_or(w, |old| old.max(w)));
                }
            }
        }
        let Some(wait) = wait else {
            for (bucket, tokens) in [(&mut self.ops, ops), (&mut self.bandwidth, bytes)] {
                if let Some(bucket) = bucket {
                    bucket.take(tokens);
                }
            }
            return true;
        };
        match self.timer.reset(wait.max(MIN_WAIT), None) {
            Ok(()) => self.blocked = true,
            // Not blocked: the device's next notification retries.
            Err(e) => log::error!("rate limiter: cannot arm its timer: {e}"),
        }
        false
    }

    /// The device's event loop saw the timerfd fire: drains it and lets
    /// requests be tried again. Returns whether the limiter was blocked (an
    /// unexpected wake-up is harmless).
    pub fn timer_fired(&mut self) -> bool {
        // Non-blocking: an unsignalled timerfd just fails with EAGAIN.
        let _ = self.timer.wait();
        std::mem::replace(&mut self.blocked, false)
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd, for the event loop.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn bucket(size: u64, refill_ms: u64, burst: u64) -> (TokenBucket, Instant) {
        let t0 = Instant::now();
        let config = TokenBucketConfig::new(size, refill_ms).with_one_time_burst(burst);
        (TokenBucket::new(config, BucketKind::Ops, t0).unwrap(), t0)
    }

    #[test]
    fn a_bucket_starts_full_and_refills_at_its_rate() {
        // 1000 tokens per 100 ms: 10 tokens per ms.
        let (mut b, t0) = bucket(1000, 100, 0);
        assert_eq!(b.consume_at(1000, t0), Ok(()));
        assert_eq!(b.budget(), 0);
        // Empty: 10 tokens need 1 ms.
        assert_eq!(b.consume_at(10, t0), Err(MS));
        assert_eq!(b.consume_at(10, t0 + MS), Ok(()));
        // 25 ms later: 250 tokens, 251 is one token short (0.1 ms).
        assert_eq!(
            b.consume_at(251, t0 + 26 * MS),
            Err(Duration::from_micros(100))
        );
        assert_eq!(b.consume_at(250, t0 + 26 * MS), Ok(()));
        // Never more than full.
        b.refill(t0 + Duration::from_secs(10));
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn refill_keeps_fractions_of_a_token() {
        // 3 tokens per 1000 ms: one every 333.3 ms. 1000 refills of 1 ms
        // must earn exactly as much as one of 1000 ms.
        let (mut b, t0) = bucket(3, 1000, 0);
        b.consume_at(3, t0).unwrap();
        for i in 1..=1000 {
            b.refill(t0 + i * MS);
        }
        assert_eq!(b.budget(), 3);
        let (mut b, t0) = bucket(3, 1000, 0);
        b.consume_at(3, t0).unwrap();
        b.refill(t0 + 333 * MS);
        assert_eq!(b.budget(), 0);
        // The wait accounts for the 333 ms already earned.
        assert_eq!(
            b.consume_at(1, t0 + 333 * MS),
            Err(Duration::from_nanos(333_334))
        );
        assert_eq!(b.consume_at(1, t0 + 334 * MS), Ok(()));
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_refilled() {
        let (mut b, t0) = bucket(100, 1000, 50);
        assert_eq!(b.consume_at(30, t0), Ok(()));
        assert_eq!((b.one_time_burst(), b.budget()), (20, 100));
        // 20 from the burst, 100 from the budget.
        assert_eq!(b.consume_at(120, t0), Ok(()));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 0));
        b.refill(t0 + Duration::from_secs(5));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
    }

    #[test]
    fn a_refused_request_takes_nothing() {
        let (mut b, t0) = bucket(100, 1000, 10);
        assert_eq!(b.consume_at(90, t0), Ok(()));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 20));
        assert!(b.consume_at(50, t0).is_err());
        assert_eq!((b.one_time_burst(), b.budget()), (0, 20));
    }

    #[test]
    fn an_oversize_request_passes_on_a_full_bucket_and_is_repaid() {
        // 100 tokens per 100 ms; a 250-token request.
        let (mut b, t0) = bucket(100, 100, 0);
        b.consume_at(1, t0).unwrap();
        // Not full: wait for the one missing token (1 ms).
        assert_eq!(b.consume_at(250, t0), Err(MS));
        assert_eq!(b.consume_at(250, t0 + MS), Ok(()));
        assert_eq!(b.budget(), -150);
        // The debt of 150 and one more token: 151 ms.
        assert_eq!(b.consume_at(1, t0 + MS), Err(151 * MS));
        assert_eq!(b.consume_at(1, t0 + 152 * MS), Ok(()));
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let (mut b, t0) = bucket(100, 100, 0);
        let later = t0 + 50 * MS;
        b.consume_at(100, later).unwrap();
        b.refill(t0);
        assert_eq!(b.budget(), 0);
        b.refill(later + 10 * MS);
        assert_eq!(b.budget(), 10);
    }

    #[test]
    fn extreme_configurations_do_not_overflow() {
        let (mut b, t0) = bucket(MAX_TOKENS, 1, MAX_TOKENS);
        b.consume_at(u64::MAX, t0).unwrap();
        assert!(b.budget() < 0);
        let far = t0 + Duration::from_secs(100 * 365 * 24 * 3600);
        b.refill(far);
        assert_eq!(b.budget(), i128::from(MAX_TOKENS));
        let (mut b, t0) = bucket(1, MAX_REFILL_TIME_MS, 0);
        b.consume_at(1, t0).unwrap();
        assert_eq!(
            b.consume_at(u64::MAX, t0),
            Err(Duration::from_millis(MAX_REFILL_TIME_MS))
        );
    }

    #[test]
    fn invalid_buckets_are_typed_errors() {
        use RateLimiterConfigError as E;
        let check = |c: TokenBucketConfig| c.validate(BucketKind::Ops);
        assert_eq!(
            check(TokenBucketConfig::new(0, 100)),
            Err(E::ZeroSize(BucketKind::Ops))
        );
        assert_eq!(
            check(TokenBucketConfig::new(10, 0)),
            Err(E::ZeroRefillTime(BucketKind::Ops))
        );
        assert_eq!(
            check(TokenBucketConfig::new(MAX_TOKENS + 1, 100)),
            Err(E::SizeTooLarge {
                bucket: BucketKind::Ops,
                size: MAX_TOKENS + 1,
                max: MAX_TOKENS
            })
        );
        assert_eq!(
            check(TokenBucketConfig::new(1, 100).with_one_time_burst(u64::MAX)),
            Err(E::BurstTooLarge {
                bucket: BucketKind::Ops,
                burst: u64::MAX,
                max: MAX_TOKENS
            })
        );
        assert_eq!(
            check(TokenBucketConfig::new(1, MAX_REFILL_TIME_MS + 1)),
            Err(E::RefillTimeTooLong {
                bucket: BucketKind::Ops,
                refill_time_ms: MAX_REFILL_TIME_MS + 1,
                max: MAX_REFILL_TIME_MS
            })
        );
        check(
            TokenBucketConfig::new(MAX_TOKENS, MAX_REFILL_TIME_MS).with_one_time_burst(MAX_TOKENS),
        )
        .unwrap();
        // The limiter names the bucket.
        let config = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(0, 1)),
            ops: None,
        };
        assert!(matches!(
            RateLimiter::new(&config),
            Err(RateLimiterError::Config(E::ZeroSize(BucketKind::Bandwidth)))
        ));
        assert!(RateLimiterConfig::unlimited().is_unlimited());
        RateLimiterConfig::unlimited().validate().unwrap();
    }

    fn limiter(bandwidth: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> RateLimiter {
        let b = |(size, ms)| TokenBucketConfig::new(size, ms);
        RateLimiter::new(&RateLimiterConfig {
            bandwidth: bandwidth.map(b),
            ops: ops.map(b),
        })
        .unwrap()
    }

    #[test]
    fn a_limiter_charges_both_buckets_or_neither() {
        // 2 ops and 1000 bytes per second.
        let mut l = limiter(Some((1000, 1000)), Some((2, 1000)));
        let t0 = Instant::now();
        assert!(l.consume_at(1, 600, t0));
        // Bytes refuse: the op is not charged either.
        assert!(!l.consume_at(1, 600, t0));
        assert!(l.is_blocked());
        assert_eq!(l.ops().unwrap().budget(), 1);
        assert_eq!(l.bandwidth().unwrap().budget(), 400);
        // Blocked until the timer says so, whatever the buckets hold.
        assert!(!l.consume_at(1, 0, t0 + Duration::from_secs(5)));
        assert!(l.timer_fired());
        assert!(l.consume_at(1, 0, t0 + Duration::from_secs(5)));
        assert_eq!(l.config().ops, Some(TokenBucketConfig::new(2, 1000)));
    }

    #[test]
    fn saved_budgets_come_back_and_cannot_grant_more_than_a_fresh_bucket() {
        let (mut b, t0) = bucket(1000, 1000, 500);
        b.consume_at(500, t0).unwrap();
        // Larger than the bucket, on a full bucket: 200 of debt.
        b.consume_at(1200, t0).unwrap();
        assert_eq!((b.budget(), b.one_time_burst()), (-200, 0));
        let saved = b.save_at(t0 + 100 * MS);
        assert_eq!(
            saved,
            TokenBucketState {
                budget: -100,
                one_time_burst: 0
            }
        );
        let (mut fresh, t1) = bucket(1000, 1000, 500);
        fresh.restore_at(&saved, t1);
        assert_eq!((fresh.budget(), fresh.one_time_burst()), (-100, 0));
        // Time before the restore earns nothing; after it, the usual rate.
        fresh.refill(t1 + 100 * MS);
        assert_eq!(fresh.budget(), 0);
        // A hostile state is capped.
        fresh.restore_at(
            &TokenBucketState {
                budget: i64::MAX,
                one_time_burst: u64::MAX,
            },
            t1,
        );
        assert_eq!((fresh.budget(), fresh.one_time_burst()), (1000, 500));
        fresh.restore_at(
            &TokenBucketState {
                budget: i64::MIN,
                one_time_burst: 0,
            },
            t1,
        );
        assert_eq!(fresh.budget(), i128::from(i64::MIN));
        assert!(fresh.consume_at(1, t1).is_err());
    }

    #[test]
    fn a_limiter_restores_the_buckets_it_has() {
        let mut l = limiter(Some((1000, 60_000)), Some((10, 60_000)));
        assert!(l.consume(3, 600));
        let saved = l.save();
        assert_eq!(saved.ops.unwrap().budget, 7);
        assert_eq!(saved.bandwidth.unwrap().budget, 400);
        let bytes = postcard::to_allocvec(&saved).unwrap();
        let saved: RateLimiterState = postcard::from_bytes(&bytes).unwrap();

        let mut fresh = limiter(Some((1000, 60_000)), None);
        fresh.restore(&saved);
        assert_eq!(fresh.bandwidth().unwrap().budget(), 400);
        assert!(fresh.ops().is_none());
        // A state without a bucket leaves it full.
        let mut other = limiter(Some((1000, 60_000)), Some((10, 60_000)));
        other.restore(&RateLimiterState::default());
        assert_eq!(other.ops().unwrap().budget(), 10);
    }

    #[test]
    fn a_limiter_without_buckets_never_refuses() {
        let mut l = limiter(None, None);
        for _ in 0..1000 {
            assert!(l.consume(1, u64::MAX));
        }
    }

    #[test]
    fn the_timer_fires_when_the_budget_returns() {
        // One op per 20 ms: the second waits about 20 ms.
        let mut l = limiter(None, Some((1, 20)));
        let start = Instant::now();
        assert!(l.consume(1, 0));
        assert!(!l.consume(1, 0));
        assert!(l.is_blocked());
        let mut fds = [libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is one valid pollfd for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) };
        assert_eq!(n, 1, "the timer did not fire within 5 s");
        // It fires no earlier than the refill (tolerant of a slow host).
        assert!(start.elapsed() >= Duration::from_millis(19));
        assert!(l.timer_fired());
        assert!(!l.is_blocked());
        assert!(l.consume(1, 0));
        // An unexpected wake-up is harmless (and does not block the caller).
        assert!(!l.timer_fired());
    }
}
