//! [`MicroVm`]: a built or restored VM and its life cycle.
//!
//! ```text
//!   build() / restore() ──▶ Paused ──start()/resume()──▶ Running ──guest exit──▶ Stopped
//!                             ▲                             │
//!                             └───────────pause()───────────┘
//! ```
//!
//! Paused means every vCPU thread has stopped (any in-flight MMIO completed)
//! and the device event loop is parked: nothing changes guest memory or
//! device state, which is what [`MicroVm::snapshot`] needs.
//!
//! A pause has a deadline ([`MicroVm::pause_within`]). One that runs out
//! leaves the VM [`VmState::Pausing`] and names the vCPUs or the device that
//! did not stop; calling `pause` again finishes it. If the device I/O thread
//! fails (a device panics, or its event loop breaks), the VM becomes
//! [`VmState::Failed`] and `wait` and `pause` return
//! [`Error::DeviceThread`] naming the cause.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use crate::builder::MicroVmBuilder;
use crate::bus::MmioBus;
use crate::devices::rtc::RtcDevice;
use crate::devices::serial::{ConsoleOutput, SerialDevice};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::{Connector, VsockConnectError};
use crate::event_loop::{EventLoop, PauseError, DROP_GRACE};
use crate::memory::GuestMemoryMmap;
use crate::seccomp::{ThreadFilters, ThreadKind};
use crate::snapshot::SavedConfig;
use crate::vcpu::{ExitReason, Vcpu, VcpuThreads};
use crate::Error;

/// Where a VM is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Built or restored, or paused: vCPUs and devices stopped.
    Paused,
    /// vCPUs are running the guest.
    Running,
    /// A pause ran out of time before every vCPU and device stopped; call
    /// [`MicroVm::pause`] again to finish it.
    Pausing,
    /// The guest stopped the VM (power-off, reset).
    Stopped(ExitReason),
    /// A vCPU or the device I/O thread failed, or a thread made a system
    /// call its seccomp filter forbids; the VM cannot run again.
    Failed,
}

/// How long [`MicroVm::pause`] waits for every vCPU and device to stop.
pub const DEFAULT_PAUSE_DEADLINE: Duration = Duration::from_secs(10);

/// How often `wait` looks at the device I/O thread's health.
const HEALTH_POLL: Duration = Duration::from_millis(100);

pub(crate) enum RunState {
    Paused,
    Running(VcpuThreads),
    /// A pause timed out: the threads still to stop, if any (then the
    /// device loop is what remains to park).
    Pausing(Option<VcpuThreads>),
    Stopped(ExitReason),
    Failed,
}

/// A microVM: built by [`MicroVm::builder`] or restored by
/// [`MicroVm::restore`], then run with [`run`](Self::run) or
/// [`start`](Self::start)/[`wait`](Self::wait).
// Field order is drop order: the vCPU threads and the device I/O thread stop
// first, vCPUs and the vGIC go before the VM fd, and the VM fd before the
// guest memory it maps.
// Only aarch64 hosts build VMs; elsewhere some parts are never read.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
pub struct MicroVm {
    /// The working-set threads of a restored VM (first: they stop first).
    pub(crate) working_set: crate::snapshot::working_set::Threads,
    /// The snapshot this VM's memory was last written to or restored from:
    /// what a diff snapshot is relative to.
    pub(crate) snapshot_id: Option<crate::snapshot::SnapshotId>,
    /// Dirty tracking, when on.
    pub(crate) dirty: Option<crate::dirty::Tracking>,
    pub(crate) run: RunState,
    pub(crate) event_loop: EventLoop,
    /// The console output thread, when there is a sink.
    pub(crate) console: Option<ConsoleOutput>,
    /// The filters the VM's threads install, and its violation slot.
    pub(crate) seccomp: Arc<ThreadFilters>,
    pub(crate) vcpus: Vec<Vcpu>,
    #[cfg(target_arch = "aarch64")]
    pub(crate) gic: crate::arch::aarch64::gic::Gic,
    pub(crate) bus: Arc<MmioBus>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) rtc: Option<Arc<Mutex<RtcDevice>>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Hands connections to the vsock device, if there is one.
    pub(crate) vsock: Option<Connector>,
    pub(crate) config: SavedConfig,
    pub(crate) _vm: VmFd,
    /// The VM generation ID device: its page is a memory slot of the VM
    /// fd above, so it goes after it.
    pub(crate) vmgenid: Option<crate::devices::vmgenid::VmGenId>,
    pub(crate) memory: GuestMemoryMmap,
    /// For a VM restored from a snapshot: the memory files its guest
    /// memory is mapped from, which a sparse full snapshot takes the pages
    /// the guest has not written from.
    pub(crate) memory_source: Option<crate::snapshot::sparse::MemorySource>,
}

impl std::fmt::Debug for MicroVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVm")
            .field("state", &self.state())
            .field("config", &self.config)
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

impl MicroVm {
    /// Starts configuring a VM.
    pub fn builder() -> MicroVmBuilder {
        MicroVmBuilder::new()
    }

    pub(crate) fn from_builder(config: MicroVmBuilder) -> Result<Self, Error> {
        config.validate()?;
        crate::build::build(config)
    }

    /// Guest memory, for inspecting or preparing guest state.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.config.vcpus as usize
    }

    /// The configuration the VM was built or restored with (what a snapshot
    /// of it records).
    pub fn config(&self) -> &SavedConfig {
        &self.config
    }

    /// The VM generation ID the guest reads (`microsoft,vmgenid`), if the
    /// VM has the device ([`MicroVmBuilder::vmgenid`]): random at boot, and
    /// new after every restore.
    pub fn generation_id(&self) -> Option<[u8; 16]> {
        self.vmgenid.as_ref().map(|g| g.id())
    }

    /// How dirty pages are tracked, if they are: KVM's ring where the host
    /// has it, else its bitmap log.
    pub fn dirty_mode(&self) -> Option<crate::dirty::DirtyMode> {
        self.dirty.as_ref().map(|d| d.mode)
    }

    /// Where the VM is in its life cycle.
    pub fn state(&self) -> VmState {
        match &self.run {
            RunState::Paused => VmState::Paused,
            RunState::Running(_) if self.event_loop.failure().is_some() => VmState::Failed,
            RunState::Running(_) => VmState::Running,
            RunState::Pausing(_) => VmState::Pausing,
            RunState::Stopped(reason) => VmState::Stopped(*reason),
            RunState::Failed => VmState::Failed,
        }
    }

    /// How many guest MMIO accesses hit an address no device owns (they read
    /// as zero and writes are dropped; see [`crate::bus`]).
    pub fn unhandled_mmio_accesses(&self) -> u64 {
        self.bus.unhandled_accesses()
    }

    /// How many console bytes could not be delivered to the serial sink
    /// (it returned an error) or failed to raise the UART's interrupt.
    pub fn serial_output_errors(&self) -> u64 {
        let uart = self
            .serial
            .lock()
            .map(|s| s.output_errors())
            .unwrap_or_else(|p| p.into_inner().output_errors());
        uart + self.console.as_ref().map_or(0, ConsoleOutput::sink_errors)
    }

    /// How many console bytes were dropped because the serial sink was
    /// slower than the guest (the oldest go first once
    /// [`CONSOLE_BUFFER_BYTES`](crate::devices::serial::CONSOLE_BUFFER_BYTES)
    /// wait).
    pub fn serial_output_dropped(&self) -> u64 {
        self.console.as_ref().map_or(0, ConsoleOutput::dropped)
    }

    /// A new connection to guest vsock port `port`, with no socket path
    /// and no handshake: the device asks the guest to accept it exactly as
    /// for a host process that sent `CONNECT <port>` on the device's
    /// socket, and the returned stream carries the connection's bytes from
    /// the start (no `OK` line). If the guest refuses (nothing listens on
    /// the port) or does not accept within the
    /// [`connect_timeout`](crate::devices::virtio::vsock::VsockConfig::connect_timeout),
    /// the stream reads EOF (or a reset).
    ///
    /// The connection counts against the device's `max_connections` and the
    /// process's vsock fd budget from now on. On a paused VM it waits and is
    /// served after [`resume`](Self::resume) (its connect timeout starts
    /// then); a VM dropped meanwhile drops it (EOF). A VM that stopped or
    /// failed, or has no vsock device, is an error.
    pub fn vsock_connect(&self, port: u32) -> Result<std::os::unix::net::UnixStream, Error> {
        match self.run {
            RunState::Stopped(reason) => return Err(Error::AlreadyStopped(reason)),
            RunState::Failed => return Err(Error::VmFailed),
            _ if self.event_loop.failure().is_some() => return Err(Error::VmFailed),
            _ => {}
        }
        let connector = self.vsock.as_ref().ok_or(VsockConnectError::NoDevice)?;
        Ok(connector.connect(port)?)
    }

    /// The error to report for a failure. A device that failed on the I/O
    /// thread comes first: what followed may stem from it (a panic message
    /// with a backtrace reads files, which the I/O filter forbids). Then a
    /// seccomp violation, which explains the rest.
    fn failure(&self, e: Error) -> Error {
        if let Some(failure) = self.event_loop.failure() {
            return Error::DeviceThread(failure);
        }
        self.seccomp.error().map_or(e, Error::from)
    }

    /// The failure of a thread noticed at a checkpoint, if there was one.
    fn noticed_failure(&self) -> Option<Error> {
        self.seccomp.error().map(|e| self.failure(e.into()))
    }

    /// Test hook: asks a thread of `kind` to make a system call its default
    /// seccomp filter forbids (a file open on a vCPU or console thread, an
    /// `AF_INET` socket on the device thread), and wakes it so that it
    /// does. Not part of the API.
    #[doc(hidden)]
    pub fn inject_forbidden_syscall(&self, kind: ThreadKind) {
        self.seccomp.inject(kind);
        match (&self.run, kind) {
            (RunState::Running(threads), ThreadKind::Vcpu) => threads.kick(),
            (_, ThreadKind::DeviceIo) => self.event_loop.wake(),
            _ => {}
        }
    }

    /// Test hook: the errno the injected call returned (`Some(0)`: it
    /// worked), `None` while it has not been made. Not part of the API.
    #[doc(hidden)]
    pub fn injected_syscall_errno(&self) -> Option<i32> {
        self.seccomp.injected_errno()
    }

    /// Waits a moment for the console sink to take what the guest wrote.
    fn flush_console(&self) {
        if let Some(console) = &self.console {
            console.flush(Self::CONSOLE_FLUSH);
        }
    }

    /// How long a stopped VM waits for a slow console sink.
    const CONSOLE_FLUSH: Duration = Duration::from_secs(2);

    pub(crate) fn not_runnable(&self) -> Error {
        match self.run {
            RunState::Stopped(reason) => Error::AlreadyStopped(reason),
            RunState::Pausing(_) => Error::PauseIncomplete,
            _ => Error::VmFailed,
        }
    }

    /// Starts (or resumes) a paused VM: the devices, then one thread per
    /// vCPU. Returns at once; see [`wait`](Self::wait). Starting a running
    /// VM does nothing.
    pub fn start(&mut self) -> Result<(), Error> {
        match self.run {
            RunState::Running(_) => return Ok(()),
            RunState::Paused => {}
            _ => return Err(self.not_runnable()),
        }
        if let Some(e) = self.noticed_failure() {
            self.run = RunState::Failed;
            return Err(e);
        }
        self.event_loop.resume();
        match VcpuThreads::spawn(std::mem::take(&mut self.vcpus), &self.bus, &self.seccomp) {
            Ok(threads) => {
                self.run = RunState::Running(threads);
                Ok(())
            }
            Err(e) => {
                self.run = RunState::Failed;
                Err(self.failure(e.into()))
            }
        }
    }

    /// Same as [`start`](Self::start): resumes a paused VM.
    pub fn resume(&mut self) -> Result<(), Error> {
        self.start()
    }

    /// Pauses a running VM: stops every vCPU at a clean point, then parks the
    /// device event loop. Pausing a paused VM does nothing. If the guest
    /// stopped the VM meanwhile, that is the error. Waits at most
    /// [`DEFAULT_PAUSE_DEADLINE`]; see [`pause_within`](Self::pause_within).
    pub fn pause(&mut self) -> Result<(), Error> {
        self.pause_within(DEFAULT_PAUSE_DEADLINE)
    }

    /// Like [`pause`](Self::pause), waiting at most `deadline` for every
    /// vCPU and the device I/O thread to stop. If one did not,
    /// [`Error::PauseTimeout`] names it and the VM is left
    /// [`VmState::Pausing`]: the stop stays requested, and calling `pause`
    /// again (once whatever held it up lets go) completes the pause.
    pub fn pause_within(&mut self, deadline: Duration) -> Result<(), Error> {
        let until = Instant::now() + deadline;
        let threads = match std::mem::replace(&mut self.run, RunState::Paused) {
            RunState::Running(threads) => Some(threads),
            RunState::Pausing(threads) => threads,
            other => {
                self.run = other;
                return match self.run {
                    RunState::Paused => Ok(()),
                    _ => Err(self.not_runnable()),
                };
            }
        };
        let mut outcome = None;
        if let Some(threads) = threads {
            match threads.stop_within(deadline) {
                Ok(stopped) => {
                    self.vcpus = stopped.vcpus;
                    outcome = stopped.outcome;
                }
                Err((threads, vcpus)) => {
                    self.run = RunState::Pausing(Some(threads));
                    return Err(Error::PauseTimeout {
                        deadline,
                        vcpus,
                        device: None,
                    });
                }
            }
        }
        let parked = self
            .event_loop
            .pause_within(until.saturating_duration_since(Instant::now()));
        // A failed device or a forbidden system call on any thread
        // explains the rest.
        if let Some(e) = self.noticed_failure() {
            self.run = RunState::Failed;
            return Err(e);
        }
        match (outcome, parked) {
            (Some(Ok(reason)), _) => {
                self.run = RunState::Stopped(reason);
                Err(Error::AlreadyStopped(reason))
            }
            (Some(Err(e)), _) => {
                self.run = RunState::Failed;
                Err(e.into())
            }
            (None, Ok(())) => Ok(()),
            (None, Err(PauseError::Failed(failure))) => {
                self.run = RunState::Failed;
                Err(Error::DeviceThread(failure))
            }
            (None, Err(PauseError::Stuck { device })) => {
                self.run = RunState::Pausing(None);
                Err(Error::PauseTimeout {
                    deadline,
                    vcpus: Vec::new(),
                    device: Some(device.unwrap_or_else(|| "the device I/O thread".into())),
                })
            }
        }
    }

    /// Waits until the guest stops the VM (power-off, reset), a vCPU
    /// fails or a thread breaks its seccomp filter, then stops every vCPU
    /// and gives the console sink a moment to take the guest's last
    /// output. A VM that is not running is an error: this would wait
    /// forever.
    pub fn wait(&mut self) -> Result<ExitReason, Error> {
        loop {
            if let Some(reason) = self.wait_timeout(Duration::from_secs(3600))? {
                return Ok(reason);
            }
        }
    }

    /// Like [`wait`](Self::wait), but gives up after `timeout` with
    /// `Ok(None)`, leaving the VM running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitReason>, Error> {
        let until = Instant::now() + timeout;
        loop {
            let RunState::Running(threads) = &self.run else {
                return Err(match self.run {
                    RunState::Paused => Error::NotRunning,
                    _ => self.not_runnable(),
                });
            };
            if let Some(failure) = self.event_loop.failure() {
                // The devices are gone: stop the guest rather than let it
                // run on against dead queues.
                if let RunState::Running(threads) =
                    std::mem::replace(&mut self.run, RunState::Failed)
                {
                    match threads.stop_within(DROP_GRACE) {
                        Ok(stopped) => self.vcpus = stopped.vcpus,
                        Err((threads, _)) => threads.detach(),
                    }
                }
                return Err(self.failure(Error::DeviceThread(failure)));
            }
            let slice = until
                .saturating_duration_since(Instant::now())
                .min(HEALTH_POLL);
            let Some(outcome) = threads.wait(Some(slice)) else {
                if Instant::now() >= until {
                    return Ok(None);
                }
                continue;
            };
            let RunState::Running(threads) = std::mem::replace(&mut self.run, RunState::Failed)
            else {
                return Err(Error::Internal(
                    "the VM left the running state while waited on",
                ));
            };
            // The report `wait` returned is the outcome; `stop` only collects
            // the vCPUs (and would only add later reports).
            self.vcpus = threads.stop().vcpus;
            self.flush_console();
            let reason = outcome.map_err(|e| self.failure(e.into()))?;
            if let Some(e) = self.noticed_failure() {
                return Err(e);
            }
            self.run = RunState::Stopped(reason);
            return Ok(Some(reason));
        }
    }

    /// Runs the guest until it powers off, resets, or a vCPU fails:
    /// [`start`](Self::start) then [`wait`](Self::wait). A VM that already
    /// stopped gives [`Error::AlreadyStopped`].
    pub fn run(&mut self) -> Result<ExitReason, Error> {
        self.start()?;
        self.wait()
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        if let RunState::Running(threads) | RunState::Pausing(Some(threads)) =
            std::mem::replace(&mut self.run, RunState::Failed)
        {
            if let Err((threads, stuck)) = threads.stop_within(DROP_GRACE) {
                // Each thread owns its vCPU fd and handles to the bus and
                // guest memory, so leaving it behind frees nothing it uses.
                log::error!("vCPUs {stuck:?} did not stop; leaving their threads behind");
                threads.detach();
            }
        }
        if let Some(v) = self.seccomp.violation() {
            log::error!("VM dropped after {v}, which its seccomp filter forbids");
        }
    }
}
