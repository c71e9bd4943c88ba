//! The VM's life cycle when something goes wrong: a device thread that
//! fails, a vCPU that does not stop in time for a pause, and the file
//! descriptors a VM leaves to child processes (none).
//!
//! These run only on aarch64 hosts with /dev/kvm (`cargo xtask test` runs
//! them inside the emulated arm64 host).
#![cfg(target_arch = "aarch64")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{code, payloads, Console};
use dormouse::bus::BusDevice;
use dormouse::event_loop::IoFailure;
use dormouse::{Error, ExitReason, MicroVm, VmState, DRAM_START};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Panics on the device I/O thread when its eventfd is written.
struct PanickingDevice(EventFd);

impl MutEventSubscriber for PanickingDevice {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.read();
        panic!("injected device failure");
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.0, EventSet::IN))
            .expect("watching the test eventfd");
    }
}

#[test]
fn a_device_thread_failure_makes_wait_return_an_error_naming_it() {
    let trigger = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let device = PanickingDevice(trigger.try_clone().unwrap());
    let mut vm = MicroVm::builder()
        .memory_mib(128)
        .payload(code(payloads::COUNTER), DRAM_START)
        .test_hook_io_subscriber("the test's device", Arc::new(Mutex::new(device)))
        .build()
        .expect("building the VM");
    vm.start().unwrap();
    // The guest counts forever: nothing ends the VM but the failure.
    assert_eq!(vm.wait_timeout(Duration::from_millis(300)).unwrap(), None);
    trigger.write(1).unwrap();

    let started = Instant::now();
    let err = vm.wait_timeout(Duration::from_secs(60)).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "wait() took {:?} to see the failure",
        started.elapsed()
    );
    match &err {
        Error::DeviceThread(IoFailure::DevicePanicked { device, message }) => {
            assert_eq!(device, "the test's device");
            assert_eq!(message, "injected device failure");
        }
        other => panic!("expected a device-thread failure, got {other:?}"),
    }
    assert_eq!(vm.state(), VmState::Failed);
    // The VM stays failed: waiting, pausing and starting all say so.
    assert!(matches!(vm.wait(), Err(Error::VmFailed)));
    assert!(matches!(vm.pause(), Err(Error::VmFailed)));
    assert!(matches!(vm.start(), Err(Error::VmFailed)));
}

/// An MMIO device whose write handler blocks (on the vCPU thread) until
/// the test releases it.
struct StuckDevice {
    entered: Arc<AtomicBool>,
    release: Arc<(Mutex<bool>, Condvar)>,
}

impl BusDevice for StuckDevice {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _: u64, _: &[u8]) {
        self.entered.store(true, Ordering::Release);
        let (lock, cvar) = &*self.release;
        let mut released = lock.lock().unwrap();
        while !*released {
            released = cvar.wait(released).unwrap();
        }
    }
}

#[test]
fn a_pause_past_its_deadline_names_the_stuck_vcpu_and_can_be_finished() {
    let entered = Arc::new(AtomicBool::new(false));
    let release = Arc::new((Mutex::new(false), Condvar::new()));
    let device = StuckDevice {
        entered: entered.clone(),
        release: release.clone(),
    };
    let console = Console::default();
    // UNOWNED writes to 0x3000_0000 first: here the stuck device owns it.
    let mut vm = MicroVm::builder()
        .memory_mib(128)
        .serial_output(console.clone())
        .payload(code(payloads::UNOWNED), DRAM_START)
        .test_hook_mmio_device(0x3000_0000, 0x1000, Arc::new(Mutex::new(device)))
        .build()
        .expect("building the VM");
    vm.start().unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while !entered.load(Ordering::Acquire) {
        assert!(Instant::now() < until, "the guest never reached the device");
        std::thread::sleep(Duration::from_millis(10));
    }

    let started = Instant::now();
    let err = vm.pause_within(Duration::from_millis(500)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    match &err {
        Error::PauseTimeout { vcpus, device, .. } => {
            assert_eq!(vcpus, &[0]);
            assert_eq!(device, &None);
        }
        other => panic!("expected a pause timeout, got {other:?}"),
    }
    assert!(err.to_string().contains("vCPUs [0]"), "{err}");
    assert_eq!(vm.state(), VmState::Pausing);
    assert!(matches!(vm.start(), Err(Error::PauseIncomplete)));
    assert!(matches!(vm.wait(), Err(Error::PauseIncomplete)));

    // Once the device lets go, a second pause completes, and the VM runs
    // on from where it was.
    *release.0.lock().unwrap() = true;
    release.1.notify_all();
    vm.pause().expect("the second pause");
    assert_eq!(vm.state(), VmState::Paused);
    assert_eq!(vm.run().unwrap(), ExitReason::Shutdown);
    assert_eq!(console.text(), "unowned reads gave zero\n");
}

/// The fds open in this process, with whether each is close-on-exec.
fn open_fds() -> Vec<(i32, bool, String)> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|fd| {
            // SAFETY: F_GETFD on any integer is harmless; a closed fd (the
            // read_dir's own, gone by now) gives -1 and is skipped.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            (flags >= 0).then_some((fd, flags & libc::FD_CLOEXEC != 0, target))
        })
        .collect()
}

#[test]
fn every_fd_a_vm_opens_is_close_on_exec() {
    let dir = std::env::temp_dir().join(format!("dormouse-cloexec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    use std::os::fd::AsFd;

    use dormouse::devices::virtio::net::TapConfig;
    let tap = common::isolated_tap("dmcloexec0", "10.0.91.1/24");
    let tap_fd = || TapConfig::Fd(tap.as_fd().try_clone_to_owned().unwrap());
    let before: Vec<i32> = open_fds().into_iter().map(|(fd, _, _)| fd).collect();

    // Every device kind, dirty tracking (ring and bitmaps) and a snapshot
    // restored from, in one VM family.
    let mut vm = MicroVm::builder()
        .memory_mib(128)
        .dirty_tracking(true)
        .payload(code(payloads::COUNTER), DRAM_START)
        .block(&disk, false)
        .net(tap_fd())
        .vsock(3, dir.join("vsock"))
        .build()
        .expect("building the VM");
    vm.start().unwrap();
    assert_eq!(vm.wait_timeout(Duration::from_millis(200)).unwrap(), None);
    vm.pause().unwrap();
    vm.snapshot(dir.join("snap")).unwrap();
    drop(vm);
    let _ = std::fs::remove_file(dir.join("vsock"));
    let mut restored = MicroVm::restore(dir.join("snap"))
        .block_path(0, &disk)
        .vsock_uds(dir.join("vsock"))
        .tap(0, tap_fd())
        .resume(true)
        .build()
        .expect("restoring");

    let leaked: Vec<_> = open_fds()
        .into_iter()
        .filter(|(fd, cloexec, _)| !before.contains(fd) && !cloexec)
        .collect();
    assert!(
        leaked.is_empty(),
        "fds a child process would inherit: {leaked:?}"
    );
    restored.pause().unwrap();
    drop(restored);
    let _ = std::fs::remove_dir_all(&dir);
}
