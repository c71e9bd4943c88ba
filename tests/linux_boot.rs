//! Boots the unmodified Debian arm64 cloud kernel to a busybox init and
//! checks what the guest sees: CPUs, memory, the RTC's date, console input
//! and output, and how power-off, reboot and panic end `run()`.
#![cfg(target_arch = "aarch64")]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::initramfs::Initramfs;
use common::{fact, guest_assets, Console, TempDir};
use dormouse::arch::aarch64::{ArchError, BootError};
use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::{ConfigError, Error, ExitReason, MicroVm};

/// Prints facts for the test to check, waits for one line of console input,
/// echoes it, and powers off.
const REPORT_AND_ECHO: &str = r#"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "@@cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "@@memtotal_kb=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
echo "@@rtc=$(cat /sys/class/rtc/rtc0/name)"
echo "@@date=$(date +%s)"
echo "@@ready"
read line
echo "@@echo=$line"
poweroff -f
"#;

fn initrd(dir: &Path, script: &str) -> std::path::PathBuf {
    let assets = guest_assets();
    let mut fs = Initramfs::new();
    fs.file("bin/busybox", 0o755, &assets.busybox)
        .init_script(script);
    fs.write_to(dir, "initrd.cpio").unwrap()
}

fn boot_report_and_echo(vcpus: u32, memory_mib: u64, cmdline: &str) {
    let tmp = TempDir::new(&format!("boot{vcpus}"));
    let initrd = initrd(&tmp.0, REPORT_AND_ECHO);
    let console = Console::default();
    let (input_guest, mut input_host) = UnixStream::pair().unwrap();
    let mut vm = MicroVm::builder()
        .vcpus(vcpus)
        .memory_mib(memory_mib)
        .kernel(guest_assets().kernel)
        .initrd(initrd)
        .cmdline(cmdline)
        .serial_output(console.clone())
        .serial_input(input_guest)
        .build()
        .expect("building the VM");
    let runner = std::thread::spawn(move || vm.run());

    // Answer the guest's prompt once it is ready for input.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !console.text().contains("@@ready") {
        assert!(
            Instant::now() < deadline,
            "guest never got ready:\n{}",
            console.text()
        );
        assert!(
            !runner.is_finished(),
            "guest stopped early:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    input_host.write_all(b"hello from the host\n").unwrap();

    let exit = runner.join().unwrap();
    let text = console.text();
    assert_eq!(exit.unwrap(), ExitReason::Shutdown, "console:\n{text}");
    assert_eq!(fact(&text, "cpus"), vcpus.to_string(), "console:\n{text}");
    let mem_kb: u64 = fact(&text, "memtotal_kb").parse().unwrap();
    let ram_kb = memory_mib * 1024;
    // The kernel keeps some memory for itself; what is left must be most of it.
    assert!(
        mem_kb <= ram_kb && mem_kb >= ram_kb * 3 / 4,
        "MemTotal {mem_kb} kB for {ram_kb} kB of RAM"
    );
    assert!(
        fact(&text, "rtc").starts_with("rtc-pl031"),
        "console:\n{text}"
    );
    let guest_date: u64 = fact(&text, "date").parse().unwrap();
    let host_date = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        host_date.abs_diff(guest_date) < 120,
        "guest clock {guest_date}, host clock {host_date}"
    );
    assert_eq!(fact(&text, "echo"), "hello from the host");
}

#[test]
fn boots_to_init_on_1_vcpu() {
    boot_report_and_echo(1, 256, &format!("{DEFAULT_CMDLINE} quiet"));
}

#[test]
fn boots_to_init_on_2_vcpus() {
    boot_report_and_echo(2, 256, &format!("{DEFAULT_CMDLINE} quiet"));
}

#[test]
fn boots_to_init_on_4_vcpus_more_than_host_cores() {
    boot_report_and_echo(4, 512, &format!("{DEFAULT_CMDLINE} quiet"));
}

fn boot_until_exit(script: &str, cmdline: &str) -> (ExitReason, String) {
    let tmp = TempDir::new("exit");
    let initrd = initrd(&tmp.0, script);
    let console = Console::default();
    let mut vm = MicroVm::builder()
        .kernel(guest_assets().kernel)
        .initrd(initrd)
        .cmdline(cmdline)
        .serial_output(console.clone())
        .build()
        .unwrap();
    let exit = vm.run().unwrap();
    (exit, console.text())
}

#[test]
fn earlycon_prints_the_first_kernel_lines() {
    let (exit, text) = boot_until_exit("poweroff -f\n", &format!("{DEFAULT_CMDLINE} earlycon"));
    assert_eq!(exit, ExitReason::Shutdown);
    assert!(
        text.contains("earlycon: ns16550a0 at MMIO 0x0000000010000000"),
        "console:\n{text}"
    );
    assert!(
        text.contains("Booting Linux on physical CPU 0x"),
        "console:\n{text}"
    );
}

#[test]
fn sysrq_reboot_gives_reset() {
    let script = "mount -t proc proc /proc\necho b > /proc/sysrq-trigger\nsleep 60\n";
    let (exit, text) = boot_until_exit(script, &format!("{DEFAULT_CMDLINE} quiet"));
    assert_eq!(exit, ExitReason::Reset, "console:\n{text}");
}

#[test]
fn a_kernel_panic_gives_reset() {
    // init exiting makes the kernel panic; panic=-1 reboots at once.
    let (exit, text) = boot_until_exit("echo @@exiting\nexit 1\n", DEFAULT_CMDLINE);
    assert_eq!(exit, ExitReason::Reset, "console:\n{text}");
    assert!(text.contains("Kernel panic"), "console:\n{text}");
}

#[test]
fn a_missing_kernel_file_is_a_clear_error() {
    let e = MicroVm::builder()
        .kernel("/nonexistent/Image")
        .build()
        .unwrap_err();
    match e {
        Error::Arch(ArchError::Boot(BootError::Read { what, source, .. })) => {
            assert_eq!(what, "kernel");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a read error for the kernel, got {other:?}"),
    }
}

#[test]
fn a_file_that_is_not_an_arm64_image_is_refused() {
    let tmp = TempDir::new("notimage");
    for (name, bytes) in [
        ("busybox", guest_assets().busybox),
        ("short", b"ARM".to_vec()),
        ("zeros", vec![0; 4096]),
    ] {
        let path = tmp.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = MicroVm::builder().kernel(&path).build().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Arch(ArchError::Boot(BootError::NotAnImage { .. }))
            ),
            "{name}: {e:?}"
        );
        assert!(e.to_string().contains("not an arm64 Linux Image"), "{e}");
    }
}

#[test]
fn an_initrd_larger_than_memory_is_refused() {
    let tmp = TempDir::new("bigrd");
    let big = tmp.0.join("big.cpio");
    // Sparse: 1 GiB of apparent size, no disk used.
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let e = MicroVm::builder()
        .memory_mib(128)
        .kernel(guest_assets().kernel)
        .initrd(&big)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Arch(ArchError::Boot(BootError::InitrdTooLarge { size, .. })) if size == 1 << 30
        ),
        "{e:?}"
    );
}

#[test]
fn a_kernel_larger_than_memory_is_refused() {
    let e = MicroVm::builder()
        .memory_mib(16)
        .kernel(guest_assets().kernel)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Arch(ArchError::Boot(BootError::KernelTooLarge { .. }))
        ),
        "{e:?}"
    );
}

#[test]
fn a_command_line_longer_than_the_kernel_accepts_is_refused() {
    let e = MicroVm::builder()
        .kernel(guest_assets().kernel)
        .cmdline(format!("{DEFAULT_CMDLINE} {}", "x".repeat(2048)))
        .build()
        .unwrap_err();
    assert!(
        matches!(e, Error::Config(ConfigError::CmdlineTooLong { .. })),
        "{e:?}"
    );
}
