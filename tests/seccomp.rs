//! Seccomp in a real VM: a forbidden system call on a vCPU thread or on the
//! device I/O thread (made through a test hook) fails the VM with an error
//! that names the thread and the call; with filters off the same call goes
//! through; a restore takes its own policy.
//!
//! These run only on aarch64 hosts with /dev/kvm (`cargo xtask test` runs
//! them inside the emulated arm64 host).
#![cfg(target_arch = "aarch64")]

mod common;

use std::time::Duration;

use common::{code, Console, TempDir};
use dormouse::seccomp::{SeccompError, SeccompPolicy, ThreadKind, Violation};
use dormouse::{Error, MicroVm, VmState, DRAM_START};

/// `b .`: the guest spins and never exits to the VMM by itself.
const SPIN: &[u32] = &[0x1400_0000];

fn spinning_vm(policy: SeccompPolicy) -> MicroVm {
    MicroVm::builder()
        .memory_mib(64)
        .vcpus(2)
        .serial_output(Console::default())
        .payload(code(SPIN), DRAM_START)
        .seccomp_policy(policy)
        .build()
        .expect("building the VM")
}

/// Waits for the VM to fail and returns the violation it reports.
fn violation(vm: &mut MicroVm) -> Violation {
    let err = vm
        .wait_timeout(Duration::from_secs(120))
        .expect_err("the VM kept running after a forbidden system call");
    let text = err.to_string();
    match err {
        Error::Seccomp(SeccompError::Violation(v)) => {
            assert!(text.contains(&v.thread.to_string()), "{text}");
            assert!(text.contains(v.syscall_name().unwrap()), "{text}");
            v
        }
        other => panic!("expected a seccomp violation, got {other:?}"),
    }
}

#[test]
fn a_forbidden_syscall_on_a_vcpu_thread_fails_the_vm() {
    let mut vm = spinning_vm(SeccompPolicy::Default);
    vm.start().unwrap();
    vm.inject_forbidden_syscall(ThreadKind::Vcpu);
    let v = violation(&mut vm);
    assert_eq!(v.thread, ThreadKind::Vcpu);
    assert!(matches!(v.vcpu, Some(0 | 1)), "{v:?}");
    assert_eq!(v.syscall_name(), Some("openat"));
    assert_eq!(
        vm.injected_syscall_errno(),
        Some(libc::EPERM),
        "the call failed"
    );
    assert_eq!(vm.state(), VmState::Failed);
    assert!(matches!(vm.start(), Err(Error::VmFailed)));
}

#[test]
fn a_forbidden_syscall_on_the_io_thread_fails_the_vm() {
    let mut vm = spinning_vm(SeccompPolicy::Default);
    vm.start().unwrap();
    vm.inject_forbidden_syscall(ThreadKind::DeviceIo);
    let v = violation(&mut vm);
    assert_eq!(v.thread, ThreadKind::DeviceIo);
    assert_eq!(v.vcpu, None);
    // `socket` is allowed on that thread for AF_UNIX only.
    assert_eq!(v.syscall_name(), Some("socket"));
    assert_eq!(vm.injected_syscall_errno(), Some(libc::EPERM));
    assert_eq!(vm.state(), VmState::Failed);
}

/// Has a thread of `kind` make the call, waits until it did, and returns
/// its errno (0: it worked).
fn inject_and_wait(vm: &MicroVm, kind: ThreadKind) -> i32 {
    vm.inject_forbidden_syscall(kind);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(errno) = vm.injected_syscall_errno() {
            return errno;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the {kind} thread never made the call"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn with_filters_disabled_the_same_calls_go_through() {
    let mut vm = spinning_vm(SeccompPolicy::Disabled);
    vm.start().unwrap();
    assert_eq!(inject_and_wait(&vm, ThreadKind::Vcpu), 0);
    assert_eq!(inject_and_wait(&vm, ThreadKind::DeviceIo), 0);
    vm.pause().expect("nothing failed");
    assert_eq!(vm.state(), VmState::Paused);
}

#[test]
fn a_restore_takes_its_own_policy() {
    let dir = TempDir::new("seccomp-restore");
    let snap = dir.0.join("snap");
    let mut vm = spinning_vm(SeccompPolicy::Disabled);
    vm.start().unwrap();
    vm.pause().unwrap();
    vm.snapshot(&snap).unwrap();
    drop(vm);

    let mut open = MicroVm::restore(&snap)
        .seccomp_policy(SeccompPolicy::Disabled)
        .resume(true)
        .build()
        .unwrap();
    assert_eq!(inject_and_wait(&open, ThreadKind::Vcpu), 0);
    open.pause().expect("nothing failed");
    drop(open);

    // The default policy: filters on, whatever the snapshotted VM had.
    let mut filtered = MicroVm::restore(&snap).resume(true).build().unwrap();
    filtered.inject_forbidden_syscall(ThreadKind::Vcpu);
    assert_eq!(violation(&mut filtered).thread, ThreadKind::Vcpu);
    assert_eq!(filtered.injected_syscall_errno(), Some(libc::EPERM));
}

/// A console input that ends at once (here /dev/null) makes the console
/// input thread close it. In debug builds std checks the fd with
/// `fcntl(F_GETFD)` before closing it: the thread's filter allows that, so
/// the VM keeps running and still pauses and resumes. (Found by the fault
/// tests: before, the VM failed with a violation of call 25.)
#[test]
fn a_console_input_at_its_end_does_not_trip_the_filter() {
    let mut vm = MicroVm::builder()
        .memory_mib(64)
        .serial_output(Console::default())
        .serial_input(std::fs::File::open("/dev/null").unwrap())
        .payload(code(SPIN), DRAM_START)
        .build()
        .expect("building the VM");
    vm.start().unwrap();
    assert!(
        vm.wait_timeout(Duration::from_secs(5)).unwrap().is_none(),
        "the VM stopped"
    );
    vm.pause().unwrap();
    vm.resume().unwrap();
    assert!(vm.wait_timeout(Duration::from_secs(1)).unwrap().is_none());
    vm.pause().unwrap();
}
