//! Seccomp filters, one per dormouse thread, installed by each thread on
//! itself before it touches the guest.
//!
//! Every thread dormouse starts has a [`ThreadKind`]: the vCPU threads, the
//! device I/O thread, and the console input and output threads. The
//! [`SeccompPolicy`] given to the builder (or to a restore) decides which
//! filter each kind gets: dormouse's default filters ([`default_filter`],
//! which allow only what that thread needs), none at all, or the
//! embedder's own.
//!
//! **Violations.** The default filters trap (`SECCOMP_RET_TRAP`) on any
//! other system call. dormouse's `SIGSYS` handler records which thread made
//! which call in a slot of that VM, makes the call fail with `EPERM`, and
//! lets the thread go on into its error path; the thread then stops, and
//! the VM fails: [`MicroVm::wait`](crate::MicroVm::wait),
//! [`pause`](crate::MicroVm::pause) and [`start`](crate::MicroVm::start)
//! return [`SeccompError::Violation`], which names the thread and the call.
//! An embedder's own filter should use `SECCOMP_RET_TRAP` too to get the
//! same report (a filter that kills the thread or the process is obeyed as
//! written).
//!
//! **Signals.** dormouse claims `SIGSYS` for the process, as it claims
//! `SIGRTMIN` for kicks: an embedding program must not install its own
//! `SIGSYS` handler. A `SIGSYS` from a seccomp trap on a thread that is not
//! dormouse's gets the default action (the process ends with a core dump),
//! as it would without dormouse.

mod filters;
mod syscalls;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};

pub use filters::{allowed_syscalls, default_filter, restricted_syscalls, SESSION_DENIED};
use libc::{c_int, c_void, siginfo_t};
pub use seccompiler::BpfProgram;

/// The kinds of thread dormouse starts; each gets its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// A vCPU thread (`dormouse-vcpu<N>`): runs the guest and its MMIO exits.
    Vcpu,
    /// The device I/O thread (`dormouse-io`): virtio queues and backends.
    DeviceIo,
    /// The console input thread (`dormouse-console-in`).
    ConsoleInput,
    /// The console output thread (`dormouse-console-out`).
    ConsoleOutput,
    /// A guest memory thread (`dormouse-prefetch`, `dormouse-wsrec`): loads
    /// a recorded working set, or records one from `/proc/self/pagemap`.
    Memory,
    /// A session thread (`dormouse-accept`, `dormouse-endpoint`,
    /// `dormouse-sessions`, `dormouse-merge`): not a VM's, so not in
    /// [`ThreadKind::ALL`]; its filter is a deny list
    /// ([`SESSION_DENIED`](filters::SESSION_DENIED)).
    Session,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::DeviceIo,
        ThreadKind::ConsoleInput,
        ThreadKind::ConsoleOutput,
        ThreadKind::Memory,
    ];

    fn code(self) -> u8 {
        match self {
            ThreadKind::Vcpu => 1,
            ThreadKind::DeviceIo => 2,
            ThreadKind::ConsoleInput => 3,
            ThreadKind::ConsoleOutput => 4,
            ThreadKind::Session => 5,
            ThreadKind::Memory => 6,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([ThreadKind::Session])
            .find(|k| k.code() == code)
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::DeviceIo => "device I/O",
            ThreadKind::ConsoleInput => "console input",
            ThreadKind::ConsoleOutput => "console output",
            ThreadKind::Session => "session",
            ThreadKind::Memory => "guest memory",
        })
    }
}

/// Which seccomp filters a VM's threads install.
#[derive(Clone, Default)]
pub enum SeccompPolicy {
    /// dormouse's default filter for each thread kind ([`default_filter`]).
    #[default]
    Default,
    /// No filters at all. **Unsafe**: a guest that escapes the device code
    /// can then make any system call the process may make. Only for
    /// debugging, or hosts without seccomp.
    Disabled,
    /// The embedder's own compiled filter per thread kind (for the host's
    /// architecture); a kind that has none gets the default filter. An
    /// embedder's sink or source that needs more than the console threads'
    /// defaults is the usual reason. A filter that traps must allow
    /// `rt_sigreturn`, or the thread cannot return from the `SIGSYS`
    /// handler and the kernel ends the process.
    Custom(BTreeMap<ThreadKind, BpfProgram>),
}

impl std::fmt::Debug for SeccompPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SeccompPolicy::Default => f.write_str("Default"),
            SeccompPolicy::Disabled => f.write_str("Disabled"),
            SeccompPolicy::Custom(map) => f
                .debug_map()
                .entries(map.iter().map(|(k, p)| (k, p.len())))
                .finish(),
        }
    }
}

/// A forbidden system call, and the thread that made it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// The kind of thread.
    pub thread: ThreadKind,
    /// The vCPU index, for a vCPU thread.
    pub vcpu: Option<u32>,
    /// The system call number (the host architecture's).
    pub syscall: i64,
}

impl Violation {
    /// The system call's name, where dormouse knows it.
    pub fn syscall_name(&self) -> Option<&'static str> {
        syscall_name(self.syscall)
    }
}

impl std::fmt::Debug for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Violation")
            .field("thread", &self.thread)
            .field("vcpu", &self.vcpu)
            .field("syscall", &self.syscall)
            .field("name", &self.syscall_name())
            .finish()
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.vcpu {
            Some(index) => write!(f, "the {} {index} thread", self.thread)?,
            None => write!(f, "the {} thread", self.thread)?,
        }
        match self.syscall_name() {
            Some(name) => write!(f, " made system call {} ({name})", self.syscall),
            None => write!(f, " made system call {}", self.syscall),
        }
    }
}

/// The name of an aarch64 system call number.
fn syscall_name(nr: i64) -> Option<&'static str> {
    if !cfg!(target_arch = "aarch64") {
        return None;
    }
    syscalls::AARCH64
        .iter()
        .find(|(_, n)| *n == nr)
        .map(|(name, _)| *name)
}

/// Errors from seccomp filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A default filter names a system call the table does not have (a
    /// dormouse bug).
    #[error("the default seccomp filter names an unknown system call `{0}`; please report this as a dormouse bug")]
    UnknownSyscall(&'static str),
    /// seccompiler refused to build a filter.
    #[error("could not compile a seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    /// An embedder's filter is empty (the kernel would refuse it).
    #[error("the custom seccomp filter for the {0} thread is empty; give it at least one instruction, or leave the kind out to use the default")]
    EmptyFilter(ThreadKind),
    /// An embedder's filter is longer than the kernel takes.
    #[error("the custom seccomp filter for the {thread} thread has {len} instructions; the kernel takes at most {max}")]
    FilterTooLong {
        /// The thread kind.
        thread: ThreadKind,
        /// The filter's length.
        len: usize,
        /// The kernel's limit (`BPF_MAXINSNS`).
        max: usize,
    },
    /// The `SIGSYS` handler could not be installed.
    #[error("could not install dormouse's SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
    /// A thread could not install its filter.
    #[error("the {thread} thread could not install its seccomp filter (does the host allow seccomp? SeccompPolicy::Disabled turns filters off)")]
    Install {
        /// The thread kind.
        thread: ThreadKind,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// A thread could not be started.
    #[error("could not start the {thread} thread")]
    Spawn {
        /// The thread kind.
        thread: ThreadKind,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A thread made a system call its filter forbids; the VM was stopped.
    #[error("{0}, which its seccomp filter forbids; the VM was stopped. If the thread runs your own console sink or source that needs it, give that thread kind a custom filter (SeccompPolicy::Custom)")]
    Violation(Violation),
}

/// `BPF_MAXINSNS`: the kernel's limit on a filter's length.
const BPF_MAXINSNS: usize = 4096;

/// A VM's violation slot, which the `SIGSYS` handler reaches through a
/// thread-local pointer; and the test hook's request.
#[derive(Debug)]
struct Slot {
    /// The first violation: 0 while there is none, else
    /// `1 << 63 | kind << 56 | vcpu << 32 | syscall`.
    first: AtomicU64,
    /// Test hook: the code of the thread kind asked to make a forbidden
    /// call, or `NO_INJECTION`.
    inject: AtomicU8,
    /// Test hook: the errno that forbidden call returned (0: it worked;
    /// `NOT_MADE`: not made yet).
    injected_errno: AtomicI32,
}

/// The test hook's injected call has not been made.
const NOT_MADE: i32 = i32::MIN;

impl Default for Slot {
    fn default() -> Self {
        Self {
            first: AtomicU64::new(0),
            inject: AtomicU8::new(NO_INJECTION),
            injected_errno: AtomicI32::new(NOT_MADE),
        }
    }
}

const RECORDED: u64 = 1 << 63;
/// The vCPU field's value for "not a vCPU".
const NO_VCPU: u64 = 0xff_ffff;

impl Slot {
    /// Async-signal-safe: one compare-and-swap.
    fn record(&self, tag: u64, syscall: c_int) {
        let value = tag | u64::from(syscall.unsigned_abs());
        let _ = self
            .first
            .compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire);
    }

    fn get(&self) -> Option<Violation> {
        let v = self.first.load(Ordering::Acquire);
        if v & RECORDED == 0 {
            return None;
        }
        let kind = u8::try_from((v >> 56) & 0x7f).unwrap_or(0);
        let vcpu = (v >> 32) & NO_VCPU;
        Some(Violation {
            thread: ThreadKind::from_code(kind).unwrap_or(ThreadKind::Vcpu),
            vcpu: (vcpu != NO_VCPU).then(|| u32::try_from(vcpu).unwrap_or(u32::MAX)),
            syscall: i64::from(u32::try_from(v & 0xffff_ffff).unwrap_or(u32::MAX)),
        })
    }
}

fn tag(kind: ThreadKind, vcpu: Option<u32>) -> u64 {
    let vcpu = vcpu.map_or(NO_VCPU, |i| u64::from(i).min(NO_VCPU - 1));
    RECORDED | u64::from(kind.code()) << 56 | vcpu << 32
}

thread_local! {
    /// This thread's VM violation slot, or null.
    static SLOT: Cell<*const Slot> = const { Cell::new(ptr::null()) };
    /// This thread's tag for the slot.
    static TAG: Cell<u64> = const { Cell::new(0) };
}

/// `SIGSYS`'s `si_code` for a seccomp trap.
const SYS_SECCOMP: c_int = 1;

extern "C" fn handle_sigsys(_: c_int, info: *mut siginfo_t, ucontext: *mut c_void) {
    // Only async-signal-safe work here: thread-local reads, one atomic
    // compare-and-swap, a store into the saved registers.
    if info.is_null() || ucontext.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    if unsafe { (*info).si_code } != SYS_SECCOMP {
        // Sent by someone, not a trap: there is no call to fail.
        return;
    }
    // SAFETY: for a SYS_SECCOMP SIGSYS, the union after the three ints (and
    // the padding to 8 bytes) is `_sigsys { void *call_addr; int syscall;
    // unsigned arch; }`: the call number is the int at byte 24 of the
    // 128-byte siginfo_t on 64-bit Linux.
    let syscall = unsafe { info.cast::<u8>().add(24).cast::<c_int>().read() };
    let slot = SLOT.with(Cell::get);
    if slot.is_null() {
        // Not a dormouse thread: let the default action (a core dump)
        // happen, as it would without dormouse's handler.
        // SAFETY: signal(2) and raise(3) are async-signal-safe; SIGSYS is
        // blocked while this handler runs, so it is delivered on return.
        unsafe {
            libc::signal(libc::SIGSYS, libc::SIG_DFL);
            libc::raise(libc::SIGSYS);
        }
    } else {
        let tag = TAG.with(Cell::get);
        // SAFETY: `slot` was set on this thread by `ThreadGuard::enter` from
        // an `Arc<Slot>` the guard owns, and is cleared by the guard's drop
        // before that Arc is released: it points to a live Slot.
        unsafe { (*slot).record(tag, syscall) };
    }
    // SAFETY: the kernel passes the interrupted context as a valid,
    // writable ucontext_t; the call was not made, and the thread resumes
    // after it with this return register.
    unsafe { set_return(ucontext.cast::<libc::ucontext_t>(), -libc::EPERM) };
}

/// Makes the trapped call return `value`.
///
/// # Safety
/// `uc` must be the valid ucontext_t a signal handler was given.
#[cfg(target_arch = "aarch64")]
unsafe fn set_return(uc: *mut libc::ucontext_t, value: c_int) {
    // SAFETY: as the caller promises; x0 holds a system call's result.
    unsafe { (*uc).uc_mcontext.regs[0] = i64::from(value).cast_unsigned() };
}

/// Makes the trapped call return `value`.
///
/// # Safety
/// `uc` must be the valid ucontext_t a signal handler was given.
#[cfg(target_arch = "x86_64")]
unsafe fn set_return(uc: *mut libc::ucontext_t, value: c_int) {
    let rax = usize::try_from(libc::REG_RAX).unwrap_or(0);
    // SAFETY: as the caller promises; rax holds a system call's result.
    unsafe { (*uc).uc_mcontext.gregs[rax] = i64::from(value) };
}

/// Makes the trapped call return `value` (not supported on this host).
///
/// # Safety
/// `uc` must be the valid ucontext_t a signal handler was given.
#[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
unsafe fn set_return(_uc: *mut libc::ucontext_t, _value: c_int) {}

/// Installs the `SIGSYS` handler once per process.
fn install_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    static FAILED: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys) {
            FAILED.store(e.errno(), Ordering::Release);
        }
    });
    match FAILED.load(Ordering::Acquire) {
        0 => Ok(()),
        errno => Err(SeccompError::Handler(vmm_sys_util::errno::Error::new(
            errno,
        ))),
    }
}

/// No thread is asked to make a forbidden call (the test hook's idle
/// state).
const NO_INJECTION: u8 = 0;

/// A VM's compiled filters, its violation slot, and how a violation wakes
/// whoever waits for the VM.
pub(crate) struct ThreadFilters {
    programs: BTreeMap<ThreadKind, Arc<BpfProgram>>,
    slot: Arc<Slot>,
    waker: Mutex<Option<Waker>>,
}

/// The default filter of `kind`, compiled once per process: every VM
/// (and every restore) would otherwise compile the same programs again.
fn cached_default_filter(kind: ThreadKind) -> Result<Arc<BpfProgram>, SeccompError> {
    static CACHE: Mutex<BTreeMap<ThreadKind, Arc<BpfProgram>>> = Mutex::new(BTreeMap::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(program) = cache.get(&kind) {
        return Ok(program.clone());
    }
    let program = Arc::new(default_filter(kind)?);
    cache.insert(kind, program.clone());
    Ok(program)
}

/// What a thread that noticed a violation calls to wake the VM's waiter.
pub(crate) type Waker = Box<dyn Fn(Violation) + Send>;

impl std::fmt::Debug for ThreadFilters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadFilters")
            .field("programs", &self.programs.keys().collect::<Vec<_>>())
            .field("violation", &self.slot.get())
            .finish_non_exhaustive()
    }
}

impl ThreadFilters {
    /// Compiles (or checks) the filters a policy asks for and installs the
    /// `SIGSYS` handler if there are any.
    pub fn new(policy: &SeccompPolicy) -> Result<Self, SeccompError> {
        let mut programs = BTreeMap::new();
        match policy {
            SeccompPolicy::Disabled => {}
            SeccompPolicy::Default | SeccompPolicy::Custom(_) => {
                let custom = match policy {
                    SeccompPolicy::Custom(map) => Some(map),
                    _ => None,
                };
                for kind in ThreadKind::ALL {
                    let program = match custom.and_then(|m| m.get(&kind)) {
                        Some(p) if p.is_empty() => return Err(SeccompError::EmptyFilter(kind)),
                        Some(p) if p.len() > BPF_MAXINSNS => {
                            return Err(SeccompError::FilterTooLong {
                                thread: kind,
                                len: p.len(),
                                max: BPF_MAXINSNS,
                            })
                        }
                        Some(p) => Arc::new(p.clone()),
                        None => cached_default_filter(kind)?,
                    };
                    programs.insert(kind, program);
                }
                install_handler()?;
            }
        }
        Ok(Self {
            programs,
            slot: Arc::new(Slot::default()),
            waker: Mutex::new(None),
        })
    }

    /// The filters of a session root's threads: the [`ThreadKind::Session`]
    /// deny list (on aarch64 hosts, whose system call numbers it uses), or
    /// none if `enabled` is false.
    pub fn for_sessions(enabled: bool) -> Result<Self, SeccompError> {
        let mut programs = BTreeMap::new();
        if enabled && cfg!(target_arch = "aarch64") {
            programs.insert(
                ThreadKind::Session,
                cached_default_filter(ThreadKind::Session)?,
            );
            install_handler()?;
        }
        Ok(Self {
            programs,
            slot: Arc::new(Slot::default()),
            waker: Mutex::new(None),
        })
    }

    /// No filters (for tests of the threads themselves).
    #[cfg(test)]
    pub fn disabled() -> Arc<Self> {
        Arc::new(Self::new(&SeccompPolicy::Disabled).expect("no filter to build"))
    }

    /// Called on a thread dormouse just started, before it touches the
    /// guest: points the `SIGSYS` handler at this VM's slot and installs
    /// the thread kind's filter. Keep the guard for the thread's life.
    pub fn enter(&self, kind: ThreadKind, vcpu: Option<u32>) -> Result<ThreadGuard, SeccompError> {
        let guard = ThreadGuard::enter(self.slot.clone(), tag(kind, vcpu));
        if let Some(program) = self.programs.get(&kind) {
            seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
                thread: kind,
                source,
            })?;
        }
        Ok(guard)
    }

    /// The first forbidden call a thread of this VM made, if one did.
    pub fn violation(&self) -> Option<Violation> {
        self.slot.get()
    }

    /// The first violation as an error.
    pub fn error(&self) -> Option<SeccompError> {
        self.violation().map(SeccompError::Violation)
    }

    /// Sets what a thread that noticed a violation calls to wake whoever
    /// waits for the VM (`None`: nobody waits).
    pub fn set_waker(&self, waker: Option<Waker>) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = waker;
    }

    /// Whether a thread of this VM made a forbidden call; if so, wakes
    /// whoever waits for the VM. Threads call this after anything that may
    /// have trapped, and stop when it says yes.
    pub fn check(&self) -> bool {
        let Some(violation) = self.slot.get() else {
            return false;
        };
        if let Some(wake) = &*self.waker.lock().unwrap_or_else(|p| p.into_inner()) {
            wake(violation);
        }
        true
    }

    /// Test hook: asks the next thread of `kind` that reaches a
    /// [`checkpoint`] to make a system call its default filter forbids.
    pub fn inject(&self, kind: ThreadKind) {
        self.slot.injected_errno.store(NOT_MADE, Ordering::Release);
        self.slot.inject.store(kind.code(), Ordering::Release);
    }

    /// Test hook: the errno the injected call returned (`Some(0)`: it
    /// worked), or `None` while it has not been made.
    pub fn injected_errno(&self) -> Option<i32> {
        match self.slot.injected_errno.load(Ordering::Acquire) {
            NOT_MADE => None,
            errno => Some(errno),
        }
    }

    /// The compiled program of a thread kind, if it has one.
    #[cfg(test)]
    pub fn program(&self, kind: ThreadKind) -> Option<&BpfProgram> {
        self.programs.get(&kind).map(|p| &**p)
    }
}

/// Called by a dormouse thread of `kind` after anything that may have
/// trapped: the first violation of this thread's VM, if there was one (the
/// thread then stops). Runs the test hook's forbidden call first, if asked.
pub(crate) fn checkpoint(kind: ThreadKind) -> Option<Violation> {
    let slot = SLOT.with(Cell::get);
    if slot.is_null() {
        return None;
    }
    // SAFETY: set by `ThreadGuard::enter` on this thread from an Arc the
    // guard owns, and cleared before the guard releases it.
    let slot = unsafe { &*slot };
    let asked = slot.inject.load(Ordering::Acquire);
    if asked == kind.code()
        && slot
            .inject
            .compare_exchange(asked, NO_INJECTION, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        slot.injected_errno
            .store(forbidden_call(kind), Ordering::Release);
    }
    slot.get()
}

/// Starts a thread named `name` of `kind` (not a vCPU) that installs its
/// filter, then runs `body`. Returns once the filter is in place, or the
/// error if it could not be installed.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
pub(crate) fn spawn_thread<F>(
    name: &str,
    kind: ThreadKind,
    filters: &Arc<ThreadFilters>,
    body: F,
) -> Result<std::thread::JoinHandle<()>, SeccompError>
where
    F: FnOnce() + Send + 'static,
{
    let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
    let filters = filters.clone();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _guard = match filters.enter(kind, None) {
                Ok(guard) => guard,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            drop(filters);
            body();
        })
        .map_err(|source| SeccompError::Spawn {
            thread: kind,
            source,
        })?;
    match ready.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(SeccompError::Spawn {
                thread: kind,
                source: std::io::Error::other("the thread ended before it started"),
            })
        }
    }
}

/// Makes a system call `kind`'s default filter forbids: a file open on a
/// vCPU or console thread, an `AF_INET` socket on the device thread (whose
/// filter allows `socket` for `AF_UNIX` only). Returns its errno.
fn forbidden_call(kind: ThreadKind) -> i32 {
    let ret = match kind {
        // SAFETY: unshare(0) takes no pointers and changes nothing.
        ThreadKind::Session => unsafe { libc::unshare(0) },
        ThreadKind::DeviceIo => {
            // SAFETY: socket() takes no pointers; a descriptor it returns
            // is closed at once.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                // SAFETY: `fd` was just created and nothing else owns it.
                unsafe { libc::close(fd) };
            }
            fd
        }
        _ => {
            // SAFETY: the path is a NUL-terminated literal; a descriptor
            // that comes back is closed at once.
            let fd = unsafe { libc::open(c"/".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd >= 0 {
                // SAFETY: `fd` was just created and nothing else owns it.
                unsafe { libc::close(fd) };
            }
            fd
        }
    };
    if ret >= 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// Points the `SIGSYS` handler at a VM's slot while the thread runs;
/// dropping it (returning or unwinding) clears the pointer.
pub(crate) struct ThreadGuard {
    _slot: Arc<Slot>,
}

impl ThreadGuard {
    fn enter(slot: Arc<Slot>, tag: u64) -> Self {
        TAG.with(|t| t.set(tag));
        SLOT.with(|s| s.set(Arc::as_ptr(&slot)));
        Self { _slot: slot }
    }
}

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        // Before `_slot` (and maybe the Slot) goes.
        SLOT.with(|s| s.set(ptr::null()));
    }
}

#[cfg(test)]
mod tests;
