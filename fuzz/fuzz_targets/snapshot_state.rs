//! The snapshot state-file decoder: header parsing, CRC and length checks,
//! the postcard payload and the state's own consistency checks.
//!
//! Input: a mode byte, then either a whole state file (mode even), or a
//! payload that the target wraps in a valid header and CRC (mode odd), so
//! that the payload decoder and the consistency checks are reached, not
//! only the CRC. Checks: no panic, and whatever decodes re-encodes to a
//! file that decodes to the same state.

#![no_main]

use dormouse::snapshot::{format, VmState};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    let Some((&mode, rest)) = data.split_first() else {
        return Corpus::Reject;
    };
    let file = if mode & 1 == 1 {
        // A valid header and CRC around arbitrary payload bytes.
        let crc = format::crc64(rest);
        let mut file = Vec::with_capacity(format::HEADER_LEN + rest.len());
        file.extend_from_slice(&format::MAGIC);
        file.extend_from_slice(&format::MAJOR.to_le_bytes());
        file.extend_from_slice(&format::MINOR.to_le_bytes());
        file.extend_from_slice(&format::ARCH_AARCH64.to_le_bytes());
        file.extend_from_slice(&(rest.len() as u64).to_le_bytes());
        file.extend_from_slice(&crc.to_le_bytes());
        file.resize(format::HEADER_LEN, 0);
        file.extend_from_slice(rest);
        file
    } else {
        rest.to_vec()
    };
    let _ = format::Header::parse(&file);
    if let Ok(state) = format::decode(&file) {
        let _ = state.validate();
        let again = format::encode(&state).expect("a decoded state encodes");
        let back: VmState = format::decode(&again).expect("an encoded state decodes");
        assert_eq!(back, state, "decode(encode(state)) != state");
    }
    Corpus::Keep
});
