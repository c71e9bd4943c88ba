//! The default filter of each thread kind: what that thread needs, and
//! nothing else. Any other system call traps (`SECCOMP_RET_TRAP`): the
//! call fails with `EPERM` and the VM is stopped as failed.
//!
//! The lists are written by name and resolved with the aarch64 table in
//! [`super::syscalls`], so that the aarch64 filters can be compiled and
//! checked on any host.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{syscalls, SeccompError, ThreadKind};

/// `_IO(KVMIO, 0x80)`: enter the guest.
pub(super) const KVM_RUN: u64 = 0xae80;
/// `_IO(KVMIO, 0xc7)`: give drained dirty-ring entries back to KVM.
pub(super) const KVM_RESET_DIRTY_RINGS: u64 = 0xaec7;
/// `FIONBIO` (asm-generic): what `set_nonblocking` on a socket uses.
pub(super) const FIONBIO: u64 = 0x5421;

/// What every dormouse thread needs: memory (glibc malloc: `mmap`,
/// `munmap`, `mremap`, `madvise`, `brk`, `mprotect`), locks and channels
/// (`futex`), signals (the kick, `SIGSYS` itself), time, sleeping, the
/// random keys of a `HashMap`, writing to an eventfd or to stderr, closing
/// what it owns, and ending.
const COMMON: &[&str] = &[
    "brk",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "exit",
    "exit_group",
    "futex",
    "getrandom",
    "gettid",
    "gettimeofday",
    "madvise",
    "mremap",
    "munmap",
    "nanosleep",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_yield",
    "sigaltstack",
    "write",
];

/// The vCPU thread: KVM_RUN and dirty-ring resets (`ioctl`, by number),
/// eventfd writes (interrupts, queue notifications) and reads (a device
/// reset drops a stale queue notification): everything else a vCPU does
/// (MMIO dispatch, console bytes into the output ring) is memory.
const VCPU: &[&str] = &["read"];

/// The device I/O thread: epoll, file and socket I/O for disks, TAPs and
/// vsock's Unix sockets.
const DEVICE_IO: &[&str] = &[
    "accept4",
    "connect",
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_pwait2",
    "fallocate",
    "fdatasync",
    "fsync",
    "getsockopt",
    "lseek",
    "pread64",
    "preadv",
    "pwrite64",
    "pwritev",
    "read",
    "readv",
    "recvfrom",
    "recvmsg",
    "sendmsg",
    "sendto",
    "shutdown",
    // Rate limiters' and vsock's wake-up timers.
    "timerfd_gettime",
    "timerfd_settime",
    "writev",
];

/// The console input thread: reads from the embedder's source (a file, a
/// pipe or a socket), and sleeps while the guest's FIFO is full.
const CONSOLE_INPUT: &[&str] = &["read", "readv", "recvfrom", "recvmsg"];

/// The console output thread: writes to the embedder's sink (a file, a
/// pipe or a socket).
const CONSOLE_OUTPUT: &[&str] = &["fdatasync", "fsync", "sendmsg", "sendto", "writev"];

/// The guest memory threads: `madvise` (common) to load a working set,
/// `pread64` to read `/proc/self/pagemap` when recording one, `mincore`
/// and `pread64` to read memory files into huge pages.
const MEMORY: &[&str] = &["mincore", "pread64"];

/// The system calls a thread kind's default filter allows without looking
/// at their arguments, sorted.
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<&'static str> {
    let own = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::DeviceIo => DEVICE_IO,
        ThreadKind::ConsoleInput => CONSOLE_INPUT,
        ThreadKind::ConsoleOutput => CONSOLE_OUTPUT,
        ThreadKind::Memory => MEMORY,
        // A deny list: everything but SESSION_DENIED.
        ThreadKind::Session => return Vec::new(),
    };
    let mut all: Vec<&'static str> = COMMON.iter().chain(own).copied().collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The system calls a thread kind's default filter allows only with
/// certain arguments, and which.
pub fn restricted_syscalls(kind: ThreadKind) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![
        ("mmap", "without PROT_EXEC"),
        ("mprotect", "without PROT_EXEC"),
    ];
    match kind {
        ThreadKind::Vcpu => {
            out.push(("ioctl", "KVM_RUN, KVM_RESET_DIRTY_RINGS"));
            out.push(("fcntl", "F_GETFD"));
        }
        ThreadKind::DeviceIo => {
            out.push(("ioctl", "FIONBIO"));
            out.push(("socket", "AF_UNIX"));
            out.push(("fcntl", "F_GETFD, F_SETFD, F_GETFL, F_SETFL"));
        }
        // Debug builds of std check that an fd is open before closing it
        // (fcntl F_GETFD): any thread that drops a file needs it.
        ThreadKind::ConsoleInput | ThreadKind::ConsoleOutput | ThreadKind::Memory => {
            out.push(("fcntl", "F_GETFD"));
        }
        ThreadKind::Session => {}
    }
    out
}

/// What session threads (endpoint accept and forwarding, the session
/// root's manager, chain merges) may not do. They run VMM setup code
/// (restores and snapshots open files, map memory, create KVM VMs, start
/// the VM's own threads, which then install their own filters), so their
/// filter is a deny list rather than an allow list: what dormouse never
/// needs and whoever took over such a thread would want (running programs,
/// other processes' memory, the kernel's modules, mounts, namespaces,
/// keys, the clock, the machine), plus `mmap`/`mprotect` with `PROT_EXEC`.
pub const SESSION_DENIED: &[&str] = &[
    "acct",
    "add_key",
    "adjtimex",
    "bpf",
    "chroot",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "execve",
    "execveat",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "mknodat",
    "mount",
    "move_mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "personality",
    "pidfd_getfd",
    "pivot_root",
    "process_madvise",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "umount2",
    "unshare",
];

fn number(name: &'static str) -> Result<i64, SeccompError> {
    syscalls::AARCH64
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, nr)| *nr)
        .ok_or(SeccompError::UnknownSyscall(name))
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SeccompError::Compile)
}

/// One rule per allowed value of argument `arg`.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .iter()
        .map(|&v| {
            SeccompRule::new(vec![cond(arg, SeccompCmpOp::Eq, v)?]).map_err(SeccompError::Compile)
        })
        .collect()
}

fn no_exec(prot_arg: u8) -> Result<Vec<SeccompRule>, SeccompError> {
    let prot_exec = u64::from(libc::PROT_EXEC.unsigned_abs());
    let rule = SeccompRule::new(vec![cond(prot_arg, SeccompCmpOp::MaskedEq(prot_exec), 0)?])
        .map_err(SeccompError::Compile)?;
    Ok(vec![rule])
}

fn as_u64(v: libc::c_int) -> u64 {
    u64::from(v.unsigned_abs())
}

/// The session deny list's rules: a match traps.
fn session_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules = BTreeMap::new();
    for name in SESSION_DENIED {
        rules.insert(number(name)?, Vec::new());
    }
    let prot_exec = u64::from(libc::PROT_EXEC.unsigned_abs());
    for name in ["mmap", "mprotect"] {
        let rule = SeccompRule::new(vec![cond(2, SeccompCmpOp::MaskedEq(prot_exec), prot_exec)?])
            .map_err(SeccompError::Compile)?;
        rules.insert(number(name)?, vec![rule]);
    }
    Ok(rules)
}

/// The rules of `kind`'s default filter, by system call number.
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules = BTreeMap::new();
    for name in allowed_syscalls(kind) {
        rules.insert(number(name)?, Vec::new());
    }
    rules.insert(number("mmap")?, no_exec(2)?);
    rules.insert(number("mprotect")?, no_exec(2)?);
    match kind {
        ThreadKind::Vcpu => {
            rules.insert(
                number("ioctl")?,
                any_of(1, &[KVM_RUN, KVM_RESET_DIRTY_RINGS])?,
            );
            rules.insert(number("fcntl")?, any_of(1, &[as_u64(libc::F_GETFD)])?);
        }
        ThreadKind::DeviceIo => {
            rules.insert(number("ioctl")?, any_of(1, &[FIONBIO])?);
            rules.insert(number("socket")?, any_of(0, &[as_u64(libc::AF_UNIX)])?);
            let fcntl = [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL];
            rules.insert(number("fcntl")?, any_of(1, &fcntl.map(as_u64))?);
        }
        // See restricted_syscalls: std's debug-build check before close.
        ThreadKind::ConsoleInput | ThreadKind::ConsoleOutput | ThreadKind::Memory => {
            rules.insert(number("fcntl")?, any_of(1, &[as_u64(libc::F_GETFD)])?);
        }
        ThreadKind::Session => {}
    }
    Ok(rules)
}

/// Compiles `kind`'s default filter for an aarch64 host. It allows what
/// [`allowed_syscalls`] and [`restricted_syscalls`] list and traps
/// everything else.
pub fn default_filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    if kind == ThreadKind::Session {
        let filter = SeccompFilter::new(
            session_rules()?,
            SeccompAction::Allow,
            SeccompAction::Trap,
            TargetArch::aarch64,
        )
        .map_err(SeccompError::Compile)?;
        return BpfProgram::try_from(filter).map_err(SeccompError::Compile);
    }
    let filter = SeccompFilter::new(
        rules(kind)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::aarch64,
    )
    .map_err(SeccompError::Compile)?;
    BpfProgram::try_from(filter).map_err(SeccompError::Compile)
}
