//! The working-set file decoder: header, length and CRC checks, and the
//! runs' own checks (inside guest memory, non-empty, not overlapping).
//!
//! Input: a mode byte, then either a whole file (mode even), or a body
//! that the target closes with a valid CRC (mode odd), so that the run
//! checks are reached, not only the CRC. Checks: no panic; whatever decodes
//! has runs inside the guest that do not overlap, and re-encodes to a
//! file that decodes to the same set.

#![no_main]

use dormouse::snapshot::working_set::format_crc;
use dormouse::snapshot::WorkingSet;
use libfuzzer_sys::{fuzz_target, Corpus};

const PAGE: u64 = 4096;

fuzz_target!(|data: &[u8]| -> Corpus {
    let Some((&mode, rest)) = data.split_first() else {
        return Corpus::Reject;
    };
    let file = if mode & 1 == 1 {
        let mut file = rest.to_vec();
        file.extend_from_slice(&format_crc(rest).to_le_bytes());
        file
    } else {
        rest.to_vec()
    };
    if let Ok(set) = WorkingSet::decode(&file) {
        let pages = set.memory_size() / PAGE;
        let mut seen: Vec<(u64, u64)> = Vec::new();
        for &(first, count) in set.runs() {
            assert!(
                count > 0 && first + count <= pages,
                "a run past guest memory"
            );
            seen.push((first, first + count));
        }
        seen.sort_unstable();
        assert!(seen.windows(2).all(|w| w[0].1 <= w[1].0), "runs overlap");
        // A newer minor version may fill the reserved word: compare sets.
        let again = WorkingSet::decode(&set.encode()).expect("an encoded set decodes");
        assert_eq!(again, set, "decode(encode(set)) != set");
    }
    Corpus::Keep
});
