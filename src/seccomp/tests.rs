use std::sync::mpsc;

use seccompiler::{SeccompAction, SeccompFilter, TargetArch};

use super::*;

#[test]
fn every_default_filter_compiles_for_aarch64_within_the_kernel_limit() {
    for kind in ThreadKind::ALL {
        let program = default_filter(kind).unwrap();
        assert!(
            program.len() > allowed_syscalls(kind).len(),
            "{kind}: at least one instruction per allowed call"
        );
        assert!(program.len() <= BPF_MAXINSNS, "{kind}: {}", program.len());
        eprintln!(
            "@@seccomp {kind}: {} BPF instructions; allows {:?} and {:?}",
            program.len(),
            allowed_syscalls(kind),
            restricted_syscalls(kind)
        );
    }
}

#[test]
fn the_session_filter_is_a_deny_list_that_compiles() {
    let program = default_filter(ThreadKind::Session).unwrap();
    assert!(program.len() > SESSION_DENIED.len());
    assert!(program.len() <= BPF_MAXINSNS);
    for denied in ["execve", "ptrace", "init_module", "mount", "unshare"] {
        assert!(SESSION_DENIED.contains(&denied), "{denied}");
    }
    eprintln!(
        "@@seccomp session: {} BPF instructions; denies {:?} and {:?}",
        program.len(),
        SESSION_DENIED,
        restricted_syscalls(ThreadKind::Session)
    );
}

#[test]
fn the_filters_differ_by_thread() {
    let vcpu = allowed_syscalls(ThreadKind::Vcpu);
    let io = allowed_syscalls(ThreadKind::DeviceIo);
    for io_only in ["connect", "accept4", "recvfrom", "epoll_pwait", "fallocate"] {
        assert!(!vcpu.contains(&io_only), "a vCPU does no {io_only}");
    }
    assert!(io.contains(&"epoll_pwait") && io.contains(&"connect"));
    for kind in ThreadKind::ALL {
        let all = allowed_syscalls(kind);
        for never in [
            "openat", "execve", "ptrace", "socket", "ioctl", "mmap", "clone",
        ] {
            assert!(
                !all.contains(&never),
                "{kind} allows {never} unconditionally"
            );
        }
    }
}

#[test]
fn the_syscall_table_has_unique_names_and_numbers() {
    let mut names: Vec<_> = syscalls::AARCH64.iter().map(|(n, _)| *n).collect();
    let mut numbers: Vec<_> = syscalls::AARCH64.iter().map(|(_, nr)| *nr).collect();
    names.sort_unstable();
    names.dedup();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(names.len(), syscalls::AARCH64.len());
    assert_eq!(numbers.len(), syscalls::AARCH64.len());
}

/// On an aarch64 host, the table agrees with libc for every call the
/// filters name.
#[cfg(target_arch = "aarch64")]
#[test]
fn the_table_matches_libc_on_aarch64() {
    let libc_numbers = [
        ("read", libc::SYS_read),
        ("write", libc::SYS_write),
        ("ioctl", libc::SYS_ioctl),
        ("mmap", libc::SYS_mmap),
        ("futex", libc::SYS_futex),
        ("epoll_pwait", libc::SYS_epoll_pwait),
        ("socket", libc::SYS_socket),
        ("accept4", libc::SYS_accept4),
        ("rt_sigreturn", libc::SYS_rt_sigreturn),
        ("openat", libc::SYS_openat),
        ("getppid", libc::SYS_getppid),
    ];
    for (name, nr) in libc_numbers {
        let ours = syscalls::AARCH64
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        assert_eq!(ours, nr, "{name}");
    }
}

#[test]
fn custom_filters_are_checked() {
    let empty = SeccompPolicy::Custom([(ThreadKind::DeviceIo, Vec::new())].into());
    assert!(matches!(
        ThreadFilters::new(&empty),
        Err(SeccompError::EmptyFilter(ThreadKind::DeviceIo))
    ));
    let one = default_filter(ThreadKind::Vcpu).unwrap();
    let long: BpfProgram = (0..BPF_MAXINSNS).flat_map(|_| one.clone()).collect();
    let long = SeccompPolicy::Custom([(ThreadKind::Vcpu, long)].into());
    assert!(matches!(
        ThreadFilters::new(&long),
        Err(SeccompError::FilterTooLong {
            thread: ThreadKind::Vcpu,
            max: BPF_MAXINSNS,
            ..
        })
    ));
}

#[test]
fn policies_pick_the_programs() {
    let none = ThreadFilters::new(&SeccompPolicy::Disabled).unwrap();
    assert!(ThreadKind::ALL.iter().all(|k| none.program(*k).is_none()));
    let default = ThreadFilters::new(&SeccompPolicy::Default).unwrap();
    for kind in ThreadKind::ALL {
        assert_eq!(default.program(kind), Some(&default_filter(kind).unwrap()));
    }
    let mine = vec![seccompiler::sock_filter {
        code: 0x06, // BPF_RET | BPF_K
        jt: 0,
        jf: 0,
        k: 0x7fff_0000, // SECCOMP_RET_ALLOW
    }];
    let custom = SeccompPolicy::Custom([(ThreadKind::ConsoleOutput, mine.clone())].into());
    let custom = ThreadFilters::new(&custom).unwrap();
    assert_eq!(custom.program(ThreadKind::ConsoleOutput), Some(&mine));
    assert_eq!(
        custom.program(ThreadKind::Vcpu),
        Some(&default_filter(ThreadKind::Vcpu).unwrap()),
        "a kind the embedder left out gets the default"
    );
}

#[test]
fn a_violation_names_the_thread_and_the_call() {
    let slot = Slot::default();
    assert_eq!(slot.get(), None);
    slot.record(tag(ThreadKind::Vcpu, Some(3)), 56);
    slot.record(tag(ThreadKind::DeviceIo, None), 198);
    let v = slot.get().unwrap();
    assert_eq!(
        v,
        Violation {
            thread: ThreadKind::Vcpu,
            vcpu: Some(3),
            syscall: 56
        },
        "the first one is kept"
    );
    let text = SeccompError::Violation(v).to_string();
    assert!(text.contains("vCPU 3 thread"), "{text}");
    assert!(text.contains("system call 56"), "{text}");
    if cfg!(target_arch = "aarch64") {
        assert!(text.contains("openat"), "{text}");
    }
}

/// A filter for this host that traps `getppid` and allows the rest.
fn trap_getppid() -> BpfProgram {
    let arch = TargetArch::try_from(std::env::consts::ARCH).unwrap();
    let filter = SeccompFilter::new(
        [(libc::SYS_getppid, vec![])].into(),
        SeccompAction::Allow,
        SeccompAction::Trap,
        arch,
    )
    .unwrap();
    filter.try_into().unwrap()
}

/// The whole trap path on this host, on a thread of its own (a filter
/// stays with its thread): the call fails with EPERM, the thread goes on,
/// the slot names it, and `check` wakes the waiter.
#[test]
fn a_trapped_call_fails_with_eperm_and_is_recorded() {
    let policy = SeccompPolicy::Custom([(ThreadKind::ConsoleInput, trap_getppid())].into());
    let filters = Arc::new(ThreadFilters::new(&policy).unwrap());
    let (woken_tx, woken) = mpsc::channel();
    filters.set_waker(Some(Box::new(move |v| {
        let _ = woken_tx.send(v);
    })));
    let on_thread = filters.clone();
    let (errno, stopped) = std::thread::spawn(move || {
        let _guard = on_thread.enter(ThreadKind::ConsoleInput, None).unwrap();
        assert!(!on_thread.check());
        assert_eq!(checkpoint(ThreadKind::ConsoleInput), None);
        // SAFETY: getppid takes no arguments.
        let ret = unsafe { libc::syscall(libc::SYS_getppid) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        assert_eq!(ret, -1);
        assert!(checkpoint(ThreadKind::ConsoleInput).is_some());
        (errno, on_thread.check())
    })
    .join()
    .unwrap();
    assert_eq!(errno, Some(libc::EPERM));
    assert!(stopped, "the thread saw its own violation");
    let v = woken.try_recv().expect("the waiter was woken");
    assert_eq!(Some(v), filters.violation());
    assert_eq!(v.thread, ThreadKind::ConsoleInput);
    assert_eq!(v.vcpu, None);
    assert_eq!(v.syscall, libc::SYS_getppid);
    // This thread has no filter: the same call works here.
    // SAFETY: getppid takes no arguments.
    assert!(unsafe { libc::syscall(libc::SYS_getppid) } > 0);
}

#[test]
fn the_guard_clears_the_slot_pointer_on_unwinding() {
    let filters = ThreadFilters::new(&SeccompPolicy::Disabled).unwrap();
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _guard = filters.enter(ThreadKind::DeviceIo, None).unwrap();
        assert!(!SLOT.with(Cell::get).is_null());
        panic!("a device bug");
    }));
    assert!(unwound.is_err());
    assert!(SLOT.with(Cell::get).is_null());
}

#[test]
fn injection_happens_once_on_the_asked_thread_kind() {
    let policy = SeccompPolicy::Custom([(ThreadKind::DeviceIo, trap_getppid())].into());
    let filters = Arc::new(ThreadFilters::new(&policy).unwrap());
    filters.inject(ThreadKind::DeviceIo);
    let on_thread = filters.clone();
    spawn_thread("seccomp-test", ThreadKind::DeviceIo, &filters, move || {
        assert_eq!(checkpoint(ThreadKind::Vcpu), None, "not a vCPU's turn");
        assert_eq!(on_thread.injected_errno(), None);
        // This filter allows the AF_INET socket: the call works.
        assert_eq!(checkpoint(ThreadKind::DeviceIo), None);
        assert_eq!(on_thread.slot.inject.load(Ordering::Acquire), NO_INJECTION);
        assert_eq!(on_thread.injected_errno(), Some(0));
    })
    .unwrap()
    .join()
    .unwrap();
}

#[test]
fn a_thread_whose_filter_cannot_be_installed_does_not_start() {
    let bad = vec![seccompiler::sock_filter {
        code: 0xffff, // no such BPF instruction: the kernel refuses it
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let filters = Arc::new(
        ThreadFilters::new(&SeccompPolicy::Custom(
            [(ThreadKind::ConsoleOutput, bad)].into(),
        ))
        .unwrap(),
    );
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ran.clone();
    let started = spawn_thread(
        "seccomp-test",
        ThreadKind::ConsoleOutput,
        &filters,
        move || flag.store(true, Ordering::Release),
    );
    assert!(matches!(
        started,
        Err(SeccompError::Install {
            thread: ThreadKind::ConsoleOutput,
            ..
        })
    ));
    assert!(!ran.load(Ordering::Acquire));
}
