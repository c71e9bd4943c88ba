//! Bare-metal aarch64 payloads on real KVM: the UART, PSCI power states,
//! SMP bring-up, and guest accesses to addresses no device owns.
//!
//! These run only on aarch64 hosts with /dev/kvm (`cargo xtask test` runs
//! them inside the emulated arm64 host).
#![cfg(target_arch = "aarch64")]

mod common;

use common::{code, payloads, Console};
use dormouse::vcpu::VcpuError;
use dormouse::{ConfigError, Error, ExitReason, MicroVm, DRAM_START};

fn run(words: &[u32], vcpus: u32) -> (Result<ExitReason, Error>, Console, MicroVm) {
    let console = Console::default();
    let mut vm = MicroVm::builder()
        .memory_mib(128)
        .vcpus(vcpus)
        .serial_output(console.clone())
        .payload(code(words), DRAM_START)
        .build()
        .expect("building the VM");
    let result = vm.run();
    (result, console, vm)
}

/// A console sink whose first write never returns.
struct StuckSink;

impl std::io::Write for StuckSink {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        loop {
            std::thread::park();
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stuck_console_sink_does_not_stall_the_guest() {
    let mut vm = MicroVm::builder()
        .memory_mib(128)
        .serial_output(StuckSink)
        .payload(code(payloads::HELLO), DRAM_START)
        .build()
        .unwrap();
    // The guest prints all of its line into the console ring and powers
    // off, though the sink never takes a byte.
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    assert_eq!(vm.serial_output_dropped(), 0, "the ring held the line");
    assert_eq!(vm.serial_output_errors(), 0);
}

#[test]
fn hello_prints_through_the_uart_and_powers_off() {
    let (result, console, vm) = run(payloads::HELLO, 1);
    assert_eq!(result.unwrap(), ExitReason::Shutdown);
    assert_eq!(console.text(), "Hello from dormouse!\n");
    assert_eq!(vm.unhandled_mmio_accesses(), 0);
}

#[test]
fn secondary_vcpus_left_off_do_not_keep_the_vm_alive() {
    // vCPUs 1..3 stay powered off inside KVM_RUN; run() must still return.
    let (result, console, vm) = run(payloads::HELLO, 4);
    assert_eq!(result.unwrap(), ExitReason::Shutdown);
    assert_eq!(console.text(), "Hello from dormouse!\n");
    assert_eq!(vm.vcpu_count(), 4);
}

#[test]
fn system_reset_ends_run_with_reset() {
    let (result, console, _) = run(payloads::RESET, 1);
    assert_eq!(result.unwrap(), ExitReason::Reset);
    assert_eq!(console.text(), "rebooting\n");
}

#[test]
fn vcpu0_starts_vcpu1_with_psci_cpu_on_and_both_print() {
    let (result, console, _) = run(payloads::SMP, 2);
    assert_eq!(result.unwrap(), ExitReason::Shutdown);
    assert_eq!(
        console.text(),
        "cpu0: starting cpu1\ncpu1: hello, mpidr aff0 = 1\ncpu0: cpu1 done\n"
    );
}

#[test]
fn cpu_on_for_a_vcpu_that_does_not_exist_fails_cleanly() {
    // With one vCPU, PSCI CPU_ON for MPIDR 1 must fail inside the guest.
    let (result, console, _) = run(payloads::SMP, 1);
    assert_eq!(result.unwrap(), ExitReason::Shutdown);
    assert_eq!(console.text(), "cpu0: starting cpu1\ncpu0: CPU_ON failed\n");
}

#[test]
fn unowned_addresses_read_as_zero_and_drop_writes() {
    let (result, console, vm) = run(payloads::UNOWNED, 1);
    assert_eq!(result.unwrap(), ExitReason::Shutdown);
    assert_eq!(console.text(), "unowned reads gave zero\n");
    // Two writes and two reads hit no device.
    assert_eq!(vm.unhandled_mmio_accesses(), 4);
}

#[test]
fn an_undecodable_access_to_unowned_space_stops_the_vm_with_an_error() {
    let (result, _, _) = run(payloads::UNOWNED_PAIR, 2);
    match result {
        Err(Error::Vcpu(VcpuError::Run { index: 0, source })) => {
            assert_eq!(source.errno(), libc::ENOSYS)
        }
        other => panic!("expected KVM_RUN to fail with ENOSYS, got {other:?}"),
    }
}

#[test]
fn a_stopped_vm_does_not_run_again() {
    let (_, _, mut vm) = run(payloads::HELLO, 1);
    assert!(matches!(
        vm.run(),
        Err(Error::AlreadyStopped(ExitReason::Shutdown))
    ));
}

#[test]
fn guest_memory_holds_the_payload() {
    use dormouse::GuestAddress;
    use vm_memory::Bytes;
    let vm = MicroVm::builder()
        .payload(code(payloads::HELLO), DRAM_START)
        .build()
        .unwrap();
    let first: u32 = vm.memory().read_obj(GuestAddress(DRAM_START.0)).unwrap();
    assert_eq!(first, payloads::HELLO[0]);
}

#[test]
fn more_vcpus_than_kvm_allows_is_refused() {
    let e = MicroVm::builder()
        .vcpus(100_000)
        .payload(code(payloads::HELLO), DRAM_START)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Config(ConfigError::TooManyVcpus {
                requested: 100_000,
                ..
            })
        ),
        "{e:?}"
    );
}

#[test]
fn many_vms_can_run_one_after_another() {
    for _ in 0..5 {
        let (result, console, _) = run(payloads::HELLO, 2);
        assert_eq!(result.unwrap(), ExitReason::Shutdown);
        assert_eq!(console.text(), "Hello from dormouse!\n");
    }
}
