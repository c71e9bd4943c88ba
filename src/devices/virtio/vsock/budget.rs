//! The file descriptors vsock connections hold, counted against the
//! process's `RLIMIT_NOFILE`: every connection holds one stream fd, and all
//! the vsock devices in the process together hold at most half of the soft
//! limit, so that guests flooding connections leave the rest of the
//! process (other VMs being built, the embedder) the fds it needs.
//!
//! The same counter, one per device, counts a device's connections against
//! its `max_connections`: a connection handed in from another thread
//! (`handoff`) takes its place before the device's event loop sees it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

/// The fds every vsock device in this process holds in connections.
pub(crate) static PROCESS: LazyLock<Arc<FdBudget>> = LazyLock::new(|| Arc::new(FdBudget::new()));

/// Linux's default soft `RLIMIT_NOFILE`, assumed if it cannot be read.
const FALLBACK_NOFILE: u64 = 1024;

/// The process's soft `RLIMIT_NOFILE` (`u64::MAX` when unlimited).
pub(crate) fn soft_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the `struct rlimit` we pass, which
    // lives across the call.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if ret == 0 {
        limit.rlim_cur
    } else {
        FALLBACK_NOFILE
    }
}

/// How many connection fds all vsock devices together may hold in a
/// process whose soft `RLIMIT_NOFILE` is `soft_nofile`: half of it.
pub(crate) fn process_cap(soft_nofile: u64) -> usize {
    usize::try_from(soft_nofile / 2).unwrap_or(usize::MAX)
}

/// A count of fds held, shared by the devices that take from it.
#[derive(Debug)]
pub(crate) struct FdBudget {
    held: AtomicUsize,
}

/// One fd counted in a budget; dropping it gives it back.
#[derive(Debug)]
pub(crate) struct FdToken {
    budget: Arc<FdBudget>,
}

impl FdBudget {
    pub(crate) const fn new() -> Self {
        Self {
            held: AtomicUsize::new(0),
        }
    }

    /// Counts one more fd, unless `cap` are held already.
    pub(crate) fn take(self: &Arc<Self>, cap: usize) -> Option<FdToken> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < cap).then_some(held + 1)
            })
            .ok()
            .map(|_| FdToken {
                budget: self.clone(),
            })
    }

    /// How many fds are counted now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for FdToken {
    fn drop(&mut self) {
        // Every token was counted once in `take`, so this never underflows.
        self.budget.held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_beyond_its_cap_and_takes_back_on_drop() {
        let budget = Arc::new(FdBudget::new());
        let a = budget.take(2).unwrap();
        let b = budget.take(2).unwrap();
        assert!(budget.take(2).is_none(), "a third fd beyond a cap of 2");
        assert_eq!(budget.held(), 2);
        drop(a);
        let c = budget.take(2).unwrap();
        assert!(budget.take(2).is_none());
        drop((b, c));
        assert_eq!(budget.held(), 0);
        assert!(budget.take(0).is_none());
    }

    #[test]
    fn the_process_cap_is_half_the_soft_limit() {
        assert_eq!(process_cap(1024), 512);
        assert_eq!(process_cap(1), 0);
        assert!(process_cap(u64::MAX) >= usize::MAX / 2);
        let soft = soft_nofile();
        assert!(soft >= 3, "a process has at least stdin, stdout, stderr");
    }
}
