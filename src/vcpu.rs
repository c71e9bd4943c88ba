//! vCPU threads: the KVM_RUN loop, exit dispatch, and how a vCPU is kicked
//! out of the guest.
//!
//! Each vCPU runs on its own thread. MMIO exits go to the [`MmioBus`];
//! system events (PSCI SYSTEM_OFF, SYSTEM_RESET) end the VM. PSCI CPU_ON and
//! friends are handled by KVM in the kernel.
//!
//! **Kicking.** To stop a vCPU that may be inside KVM_RUN, the owner sets the
//! shared stop flag and sends the thread [`kick_signal`]. The signal handler
//! sets `immediate_exit` in that vCPU's `kvm_run` page, so a kick that lands
//! just before the thread enters KVM_RUN still makes KVM_RUN return at once
//! with EINTR: no kick is ever lost. dormouse claims `SIGRTMIN + 0` for this
//! in processes that embed it.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

use crate::bus::MmioBus;
use crate::seccomp::{self, SeccompError, ThreadFilters, ThreadKind};

/// Why a VM stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The guest powered off (PSCI SYSTEM_OFF).
    Shutdown,
    /// The guest asked for a reboot (PSCI SYSTEM_RESET), e.g. after a kernel
    /// panic with `panic=-1`. dormouse does not reboot by itself: the caller
    /// decides whether to build a new VM.
    Reset,
    /// KVM reported a guest crash event.
    Crash,
}

/// Errors on a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("could not create vCPU {index}")]
    Create {
        /// The vCPU index.
        index: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_RUN failed. `ENOSYS` here usually means the guest touched MMIO
    /// with an instruction KVM cannot decode (e.g. a load pair).
    #[error("KVM_RUN on vCPU {index} failed; the VM was stopped")]
    Run {
        /// The vCPU index.
        index: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM returned an exit dormouse does not handle.
    #[error("vCPU {index} stopped on an unexpected KVM exit: {exit}; the VM was stopped")]
    UnexpectedExit {
        /// The vCPU index.
        index: u32,
        /// What the exit was.
        exit: String,
    },
    /// The kick signal handler could not be installed.
    #[error("could not install the vCPU kick signal handler (SIGRTMIN)")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread could not be spawned.
    #[error("could not spawn the thread for vCPU {index}")]
    Spawn {
        /// The vCPU index.
        index: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU thread could not install its seccomp filter, or a thread
    /// of the VM made a system call its filter forbids.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A vCPU thread panicked (a dormouse bug).
    #[error("the thread of vCPU {index} panicked: please report this as a dormouse bug")]
    ThreadPanicked {
        /// The vCPU index.
        index: u32,
    },
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's vCPU `immediate_exit` byte, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Only async-signal-safe work here: a volatile store to a byte.
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is set by `Vcpu::run_until_stopped` on this
            // very thread to the `immediate_exit` byte of the vCPU's kvm_run
            // mapping and cleared before that function returns, while the
            // mapping is alive (it lives as long as the `VcpuFd`, which the
            // function borrows). KVM reads this byte on entry to KVM_RUN; a
            // byte store cannot tear.
            unsafe { ptr::write_volatile(p, 1) };
        }
    });
}

/// Points this thread's kick handler at a vCPU's `immediate_exit` byte
/// while it lives; dropping it (returning or unwinding) clears the pointer.
struct KickTarget;

impl KickTarget {
    fn arm(immediate_exit: *mut u8) -> Self {
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        KickTarget
    }

    /// Whether this thread's kick handler currently points anywhere.
    #[cfg(test)]
    fn armed() -> bool {
        IMMEDIATE_EXIT.with(|p| !p.get().is_null())
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|p| p.set(ptr::null_mut()));
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal);
    });
    result
}

/// A vCPU's dirty ring and where a full one is drained to.
type RingParts = (crate::dirty::DirtyRing, Arc<crate::dirty::RingSink>);

/// One vCPU: its KVM fd and what it dispatches exits to.
#[derive(Debug)]
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    ring: Option<RingParts>,
}

impl Vcpu {
    /// Wraps a created (and arch-initialised) vCPU.
    pub fn new(index: u32, fd: VcpuFd) -> Self {
        Self {
            index,
            fd,
            ring: None,
        }
    }

    /// Gives the vCPU its dirty ring: a full ring is drained into `sink` on
    /// the vCPU thread, and the guest goes on.
    pub fn set_dirty_ring(
        &mut self,
        ring: crate::dirty::DirtyRing,
        sink: Arc<crate::dirty::RingSink>,
    ) {
        self.ring = Some((ring, sink));
    }

    /// The vCPU's dirty ring, if it has one.
    pub fn dirty_ring_mut(&mut self) -> Option<&mut crate::dirty::DirtyRing> {
        self.ring.as_mut().map(|(ring, _)| ring)
    }

    /// The vCPU's index (its KVM vCPU id).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The KVM fd, for arch-specific register setup.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the guest on the calling thread until it stops the VM or `stop`
    /// is set (then `Ok(None)`). The caller sets `stop` and sends
    /// [`kick_signal`] to this thread to end it early.
    pub fn run_until_stopped(
        &mut self,
        bus: &MmioBus,
        stop: &AtomicBool,
    ) -> Result<Option<ExitReason>, VcpuError> {
        // The thread may have inherited a mask that blocks the kick.
        let _ = unblock_signal(kick_signal());
        let immediate_exit = ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        // Cleared when the guard drops: on return and on unwinding alike,
        // so a kick that arrives after this function can never write to a
        // kvm_run page that is gone.
        let _armed = KickTarget::arm(immediate_exit);
        let result = self.run_loop(bus, stop);
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    fn run_loop(
        &mut self,
        bus: &MmioBus,
        stop: &AtomicBool,
    ) -> Result<Option<ExitReason>, VcpuError> {
        let index = self.index;
        loop {
            // A forbidden call (here, or on another thread of this VM)
            // stops the vCPU.
            if let Some(v) = seccomp::checkpoint(ThreadKind::Vcpu) {
                return Err(SeccompError::Violation(v).into());
            }
            if stop.load(Ordering::Acquire) {
                // An MMIO read handled just before is only committed to the
                // guest's registers on the next KVM_RUN: run once with
                // immediate_exit so KVM completes it and returns at once,
                // leaving the vCPU in a state that can be saved.
                self.fd.set_kvm_immediate_exit(1);
                let _ = self.fd.run();
                self.fd.set_kvm_immediate_exit(0);
                return Ok(None);
            }
            match self.fd.run() {
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    bus.read(addr, data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    bus.write(addr, data);
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => return Ok(Some(ExitReason::Shutdown)),
                    KVM_SYSTEM_EVENT_RESET => return Ok(Some(ExitReason::Reset)),
                    KVM_SYSTEM_EVENT_CRASH => return Ok(Some(ExitReason::Crash)),
                    other => {
                        return Err(VcpuError::UnexpectedExit {
                            index,
                            exit: format!("system event {other}"),
                        })
                    }
                },
                Ok(VcpuExit::Intr) => {}
                Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => {
                    let Some((ring, sink)) = self.ring.as_mut() else {
                        return Err(VcpuError::UnexpectedExit {
                            index,
                            exit: "dirty ring full, but the vCPU has no ring".into(),
                        });
                    };
                    sink.drain(ring).map_err(|e| VcpuError::UnexpectedExit {
                        index,
                        exit: format!("dirty ring full and draining it failed: {e}"),
                    })?;
                }
                Ok(other) => {
                    return Err(VcpuError::UnexpectedExit {
                        index,
                        exit: format!("{other:?}"),
                    })
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked (or a spurious signal): clear the flag the
                    // handler may have set, then look at `stop` again.
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(source) => return Err(VcpuError::Run { index, source }),
            }
        }
    }
}

/// What a vCPU thread reports when it ends.
type VcpuReport = (u32, Result<Option<ExitReason>, VcpuError>);

/// The vCPU threads of a running VM.
pub(crate) struct VcpuThreads {
    stop: Arc<AtomicBool>,
    reports: mpsc::Receiver<VcpuReport>,
    threads: Vec<(u32, JoinHandle<Option<Vcpu>>)>,
    filters: Arc<ThreadFilters>,
}

/// How the threads of a VM ended.
pub(crate) struct Stopped {
    /// The vCPUs, in index order, back from their threads.
    pub vcpus: Vec<Vcpu>,
    /// The first guest exit or vCPU error any thread reported, if one did.
    pub outcome: Option<Result<ExitReason, VcpuError>>,
}

impl VcpuThreads {
    /// Runs each vCPU on a thread of its own, which installs the vCPU
    /// filter of `filters` before it enters the guest. If a thread cannot
    /// be created, the ones already started are stopped and the error
    /// returned (the vCPU whose thread failed is lost with it: the VM
    /// cannot run on). A violation noticed on another thread of the VM
    /// wakes [`wait`](Self::wait) too.
    pub fn spawn(
        vcpus: Vec<Vcpu>,
        bus: &Arc<crate::bus::MmioBus>,
        filters: &Arc<ThreadFilters>,
    ) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let (tx, reports) = mpsc::channel();
        let waker = tx.clone();
        filters.set_waker(Some(Box::new(move |v| {
            let _ = waker.send((u32::MAX, Err(SeccompError::Violation(v).into())));
        })));
        let mut me = Self {
            stop: Arc::new(AtomicBool::new(false)),
            reports,
            threads: Vec::with_capacity(vcpus.len()),
            filters: filters.clone(),
        };
        for mut vcpu in vcpus {
            let index = vcpu.index();
            let (bus, stop, tx) = (bus.clone(), me.stop.clone(), tx.clone());
            let filters = filters.clone();
            let spawned = thread::Builder::new()
                .name(format!("dormouse-vcpu{index}"))
                .spawn(move || {
                    let result = catch_unwind(AssertUnwindSafe(|| {
                        let _seccomp = filters.enter(ThreadKind::Vcpu, Some(index))?;
                        vcpu.run_until_stopped(&bus, &stop)
                    }));
                    match result {
                        Ok(report) => {
                            let _ = tx.send((index, report));
                            Some(vcpu)
                        }
                        Err(_) => {
                            let _ = tx.send((index, Err(VcpuError::ThreadPanicked { index })));
                            None
                        }
                    }
                });
            match spawned {
                Ok(handle) => me.threads.push((index, handle)),
                Err(source) => {
                    drop(me.stop());
                    return Err(VcpuError::Spawn { index, source });
                }
            }
        }
        Ok(me)
    }

    /// Waits up to `timeout` (forever with `None`) for a vCPU to stop the
    /// VM: a guest exit or a vCPU error.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Result<ExitReason, VcpuError>> {
        loop {
            let report = match timeout {
                None => self.reports.recv().ok(),
                Some(t) => match self.reports.recv_timeout(t) {
                    Ok(r) => Some(r),
                    Err(mpsc::RecvTimeoutError::Timeout) => return None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => None,
                },
            };
            match report {
                Some((_, Ok(Some(reason)))) => return Some(Ok(reason)),
                Some((_, Err(e))) => return Some(Err(e)),
                // Only after `stop` is set, which this type does itself.
                Some((_, Ok(None))) => continue,
                // Every thread ended without a report: all panicked.
                None => return Some(Err(VcpuError::ThreadPanicked { index: 0 })),
            }
        }
    }

    /// Sends every running thread the kick without stopping it: each goes
    /// round its loop once (past its seccomp checkpoint and its stop flag).
    pub fn kick(&self) {
        for (_, handle) in &self.threads {
            if !handle.is_finished() {
                // ESRCH (thread just ended) is fine: it saw `stop` or ended.
                let _ = handle.kill(kick_signal());
            }
        }
    }

    /// Stops every thread and takes the vCPUs back, waiting as long as it
    /// takes.
    pub fn stop(self) -> Stopped {
        self.request_stop();
        self.join()
    }

    /// Stops every thread, waiting at most `deadline` for them to end. If
    /// some did not, gives the threads back with the indices of those still
    /// running: the stop stays requested, so a later call can finish it.
    pub fn stop_within(self, deadline: Duration) -> Result<Stopped, (Self, Vec<u32>)> {
        self.request_stop();
        let until = std::time::Instant::now() + deadline;
        loop {
            let running: Vec<u32> = self
                .threads
                .iter()
                .filter(|(_, h)| !h.is_finished())
                .map(|(i, _)| *i)
                .collect();
            if running.is_empty() {
                return Ok(self.join());
            }
            if std::time::Instant::now() >= until {
                return Err((self, running));
            }
            // Threads normally end within microseconds of their kick.
            thread::sleep(Duration::from_micros(100));
        }
    }

    /// Sets the stop flag and kicks every thread out of KVM_RUN.
    fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.kick();
    }

    /// Leaves the threads to end on their own (each owns its vCPU), for a
    /// VM dropped while a vCPU is stuck.
    pub fn detach(self) {
        self.filters.set_waker(None);
        self.request_stop();
    }

    /// Joins every thread (they must have been asked to stop).
    fn join(self) -> Stopped {
        self.filters.set_waker(None);
        let mut vcpus = Vec::with_capacity(self.threads.len());
        let mut outcome = None;
        for (index, handle) in self.threads {
            match handle.join() {
                Ok(Some(vcpu)) => vcpus.push(vcpu),
                Ok(None) | Err(_) => {
                    outcome.get_or_insert(Err(VcpuError::ThreadPanicked { index }));
                }
            }
        }
        for (_, report) in self.reports.try_iter() {
            match report {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    outcome.get_or_insert(Ok(reason));
                }
                Err(e) => {
                    outcome.get_or_insert(Err(e));
                }
            }
        }
        vcpus.sort_by_key(Vcpu::index);
        Stopped { vcpus, outcome }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kick_target_is_cleared_on_return_and_on_unwinding() {
        let mut byte = 0u8;
        {
            let _armed = KickTarget::arm(&mut byte);
            assert!(KickTarget::armed());
        }
        assert!(!KickTarget::armed());
        let unwound = std::panic::catch_unwind(|| {
            let mut byte = 0u8;
            let _armed = KickTarget::arm(&mut byte);
            assert!(KickTarget::armed());
            panic!("a device bug on the vCPU thread");
        });
        assert!(unwound.is_err());
        assert!(
            !KickTarget::armed(),
            "unwinding left a dangling kick pointer"
        );
    }
}
