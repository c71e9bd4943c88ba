//! The real-time clock: an ARM PL031 (vm-superio's `Rtc`) on the MMIO bus.
//!
//! The guest reads the host's wall-clock time from it at boot. Registers are
//! 32 bits wide; accesses of any other width read as zero and writes are
//! dropped (the guest controls the width).

use serde::{Deserialize, Serialize};
use vm_superio::rtc_pl031::{NoEvents, RtcState};
use vm_superio::Rtc;

use crate::bus::BusDevice;

/// Size of the PL031's register window (it spans one 4 KiB page, the
/// PrimeCell ID registers sitting at its top).
pub const RTC_SIZE: u64 = 0x1000;

/// A PL031 real-time clock.
#[derive(Default)]
pub struct RtcDevice {
    rtc: Rtc<NoEvents>,
}

impl std::fmt::Debug for RtcDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtcDevice").finish_non_exhaustive()
    }
}

/// The PL031's registers, for snapshots. The clock keeps following the
/// host's wall clock across a restore, as a real RTC keeps time while the
/// machine is off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcSnapshot {
    /// Load register.
    pub lr: u32,
    /// Offset from the host clock.
    pub offset: i64,
    /// Match register.
    pub mr: u32,
    /// Interrupt mask.
    pub imsc: u32,
    /// Raw interrupt status.
    pub ris: u32,
}

impl RtcDevice {
    /// A clock that reads the host's current time.
    pub fn new() -> Self {
        Self::default()
    }

    /// Saves the registers.
    pub fn save(&self) -> RtcSnapshot {
        let s = self.rtc.state();
        RtcSnapshot {
            lr: s.lr,
            offset: s.offset,
            mr: s.mr,
            imsc: s.imsc,
            ris: s.ris,
        }
    }

    /// A clock in a saved state.
    pub fn restore(saved: &RtcSnapshot) -> Self {
        let state = RtcState {
            lr: saved.lr,
            offset: saved.offset,
            mr: saved.mr,
            imsc: saved.imsc,
            ris: saved.ris,
        };
        Self {
            rtc: Rtc::from_state(&state, NoEvents),
        }
    }
}

impl BusDevice for RtcDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u16::try_from(offset), <&mut [u8; 4]>::try_from(&mut *data)) {
            (Ok(offset), Ok(word)) => self.rtc.read(offset, word),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Ok(word)) = (u16::try_from(offset), <&[u8; 4]>::try_from(data)) {
            self.rtc.write(offset, word);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    const RTCDR: u64 = 0x000;
    const PERIPH_ID0: u64 = 0xfe0;

    #[test]
    fn data_register_holds_the_host_time() {
        let mut rtc = RtcDevice::new();
        let mut word = [0u8; 4];
        rtc.read(RTCDR, &mut word);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let guest = u64::from(u32::from_le_bytes(word));
        assert!(now.abs_diff(guest) <= 2, "host {now}, rtc {guest}");
    }

    #[test]
    fn primecell_id_identifies_a_pl031() {
        let mut rtc = RtcDevice::new();
        let mut word = [0u8; 4];
        rtc.read(PERIPH_ID0, &mut word);
        assert_eq!(word[0], 0x31);
    }

    #[test]
    fn save_and_restore_keep_the_registers() {
        let mut rtc = RtcDevice::new();
        rtc.write(0x4, &7u32.to_le_bytes()); // match register
        let saved = rtc.save();
        assert_eq!(saved.mr, 7);
        assert_eq!(RtcDevice::restore(&saved).save(), saved);
    }

    #[test]
    fn odd_widths_and_offsets_are_harmless() {
        let mut rtc = RtcDevice::new();
        let mut byte = [0xffu8; 1];
        rtc.read(RTCDR, &mut byte);
        assert_eq!(byte, [0]);
        let mut word = [0xffu8; 4];
        rtc.read(u64::MAX, &mut word);
        assert_eq!(word, [0; 4]);
        rtc.write(RTCDR, &[1, 2]);
        rtc.write(u64::MAX, &[1, 2, 3, 4]);
    }
}
