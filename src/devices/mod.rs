//! Device models.
//!
//! Devices know nothing of KVM: each sees its registers through
//! [`BusDevice`](crate::bus::BusDevice), raises interrupts through an
//! [`EventFdTrigger`] (which the VM wires to a GIC SPI with a KVM irqfd), and
//! writes to a backend it was given. That keeps them testable with no VM.

pub mod rtc;
pub mod serial;
pub mod virtio;
pub mod vmgenid;

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// A saved device state that cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid saved state for the {device}: {reason}")]
pub struct StateError {
    /// Which device.
    pub device: &'static str,
    /// What is wrong with the state.
    pub reason: String,
}

/// An interrupt line backed by an eventfd: writing to it raises the
/// interrupt once the VM has registered the eventfd as an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// A new, unconnected trigger.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?))
    }

    /// The eventfd to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    /// Another handle to the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Makes `fd` non-blocking (`O_NONBLOCK`): device fds are read on the
/// event loop, which must never wait on one.
pub(crate) fn set_nonblocking(fd: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL takes no pointer and only reads the flags of `fd`,
    // which the caller's borrow keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL takes an integer and changes only the
    // file status flags of `fd`.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
