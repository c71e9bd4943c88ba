//! The state file: a fixed 64-byte header, then a postcard payload.
//!
//! ```text
//! offset size field
//!      0    8 magic        "DMSNAPST"
//!      8    2 major        format major version (u16 LE)
//!     10    2 minor        format minor version (u16 LE)
//!     12    4 arch         1 = aarch64 (u32 LE)
//!     16    8 payload_len  bytes after the header (u64 LE)
//!     24    8 crc64        CRC-64/XZ of the payload (u64 LE)
//!     32   32 reserved     zero
//! ```
//!
//! Any build can read any file's header; a reader accepts its own major
//! version with an equal or older minor, and refuses a newer major or minor,
//! another architecture, a truncated file or a CRC mismatch, each with its
//! own error. Payloads of older minor versions are decoded with that
//! version's frozen structs ([`super::compat`]). See docs/snapshot-format.md.

use serde::Serialize;

use super::{SnapshotError, VmState};

/// The magic at the start of every state file.
pub const MAGIC: [u8; 8] = *b"DMSNAPST";
/// The format's major version: bumped by changes old readers cannot read.
pub const MAJOR: u16 = 1;
/// The format's minor version.
pub const MINOR: u16 = 2;
/// The header's size in bytes.
pub const HEADER_LEN: usize = 64;
/// The architecture code for aarch64.
pub const ARCH_AARCH64: u32 = 1;
/// The largest payload a reader accepts (vCPU and device state is small;
/// this bounds what a hostile file can make us allocate).
pub const MAX_PAYLOAD: u64 = 64 << 20;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// CRC-64/XZ of `bytes`, as state files carry it.
pub fn crc64(bytes: &[u8]) -> u64 {
    CRC.checksum(bytes)
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format major version.
    pub major: u16,
    /// Format minor version.
    pub minor: u16,
    /// Architecture code.
    pub arch: u32,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// CRC-64/XZ of the payload.
    pub crc64: u64,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl Header {
    /// Parses and checks the header at the start of `bytes` (the version
    /// rule, the architecture and the payload bound; not yet the CRC).
    pub fn parse(bytes: &[u8]) -> Result<Header, SnapshotError> {
        if bytes.len() < HEADER_LEN {
            return Err(SnapshotError::Truncated {
                expected: HEADER_LEN as u64,
                found: bytes.len() as u64,
            });
        }
        if bytes[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let header = Header {
            major: le_u16(bytes, 8),
            minor: le_u16(bytes, 10),
            arch: le_u32(bytes, 12),
            payload_len: le_u64(bytes, 16),
            crc64: le_u64(bytes, 24),
        };
        if header.major != MAJOR || header.minor > MINOR {
            return Err(SnapshotError::UnsupportedVersion {
                file: (header.major, header.minor),
                reader: (MAJOR, MINOR),
            });
        }
        if header.arch != ARCH_AARCH64 {
            return Err(SnapshotError::WrongArchitecture(header.arch));
        }
        if header.payload_len > MAX_PAYLOAD {
            return Err(SnapshotError::PayloadTooLarge(header.payload_len));
        }
        Ok(header)
    }

    fn write(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&self.major.to_le_bytes());
        out[10..12].copy_from_slice(&self.minor.to_le_bytes());
        out[12..16].copy_from_slice(&self.arch.to_le_bytes());
        out[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        out[24..32].copy_from_slice(&self.crc64.to_le_bytes());
        out
    }
}

/// Encodes `state` as a complete state file (header and payload) of the
/// current version, `MAJOR.MINOR`.
pub fn encode(state: &VmState) -> Result<Vec<u8>, SnapshotError> {
    encode_version(state, MINOR)
}

/// Encodes any payload under a `MAJOR.minor` header: for tests and tools
/// that write files as an older version did (with that version's frozen
/// structs, [`super::compat`]). [`encode`] is what snapshots use.
pub fn encode_version<T: Serialize>(payload: &T, minor: u16) -> Result<Vec<u8>, SnapshotError> {
    let payload = postcard::to_allocvec(payload).map_err(SnapshotError::Encode)?;
    let header = Header {
        major: MAJOR,
        minor,
        arch: ARCH_AARCH64,
        payload_len: payload.len() as u64,
        crc64: crc64(&payload),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.write());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks a complete state file's header, length and CRC, and returns the
/// header and the payload.
pub fn check(bytes: &[u8]) -> Result<(Header, &[u8]), SnapshotError> {
    let header = Header::parse(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    // parse() bounded payload_len by MAX_PAYLOAD, which fits usize.
    let expected = usize::try_from(header.payload_len).unwrap_or(usize::MAX);
    if payload.len() != expected {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64 + header.payload_len,
            found: bytes.len() as u64,
        });
    }
    let crc = crc64(payload);
    if crc != header.crc64 {
        return Err(SnapshotError::Corrupt {
            expected: header.crc64,
            found: crc,
        });
    }
    Ok((header, payload))
}

/// Decodes a complete state file, checking header, length and CRC first,
/// with the decoder of the file's minor version ([`super::compat`]): a file
/// an older dormouse wrote becomes this build's [`VmState`].
pub fn decode(bytes: &[u8]) -> Result<VmState, SnapshotError> {
    let (header, payload) = check(bytes)?;
    super::compat::decode_payload(header.minor, payload)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm".into(),
            regs: (0..100).collect(),
        }
    }

    fn decode_sample(bytes: &[u8]) -> Result<Sample, SnapshotError> {
        let (_, payload) = check(bytes)?;
        postcard::from_bytes(payload).map_err(SnapshotError::Decode)
    }

    #[test]
    fn round_trips() {
        let bytes = encode_version(&sample(), MINOR).unwrap();
        assert_eq!(&bytes[..8], b"DMSNAPST");
        assert_eq!(decode_sample(&bytes).unwrap(), sample());
    }

    #[test]
    fn every_kind_of_damage_is_its_own_error() {
        let good = encode_version(&sample(), MINOR).unwrap();

        let truncated = &good[..good.len() - 1];
        assert!(matches!(
            decode_sample(truncated),
            Err(SnapshotError::Truncated { .. })
        ));
        assert!(matches!(
            decode_sample(&good[..10]),
            Err(SnapshotError::Truncated { .. })
        ));

        for at in [HEADER_LEN, good.len() / 2, good.len() - 1] {
            let mut flipped = good.clone();
            flipped[at] ^= 0x01;
            assert!(
                matches!(decode_sample(&flipped), Err(SnapshotError::Corrupt { .. })),
                "flip at {at}"
            );
        }

        let mut newer_major = good.clone();
        newer_major[8..10].copy_from_slice(&(MAJOR + 1).to_le_bytes());
        assert!(matches!(
            decode_sample(&newer_major),
            Err(SnapshotError::UnsupportedVersion { file: (2, _), .. })
        ));
        let mut newer_minor = good.clone();
        newer_minor[10..12].copy_from_slice(&(MINOR + 1).to_le_bytes());
        assert!(matches!(
            decode_sample(&newer_minor),
            Err(SnapshotError::UnsupportedVersion { .. })
        ));

        let mut x86 = good.clone();
        x86[12..16].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            decode_sample(&x86),
            Err(SnapshotError::WrongArchitecture(2))
        ));

        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(
            decode_sample(&magic),
            Err(SnapshotError::NotASnapshot)
        ));

        let mut huge = good;
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_sample(&huge),
            Err(SnapshotError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn a_valid_crc_over_garbage_is_a_decode_error() {
        // A file whose CRC matches but whose payload is not our state.
        let bytes = encode_version(&vec![0xffu8; 3], MINOR).unwrap();
        assert!(matches!(decode(&bytes), Err(SnapshotError::Decode(_))));
    }
}
