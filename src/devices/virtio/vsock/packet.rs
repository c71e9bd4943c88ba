//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, virtio 1.2,
//! section 5.10.6) and the checks every packet from the guest passes before
//! the device acts on it.

use super::{HOST_CID, MAX_PKT_LEN};

/// The size of the header on the wire.
pub(crate) const HDR_LEN: usize = 44;

/// `type`: the only socket type the device supports.
pub(crate) const TYPE_STREAM: u16 = 1;

/// Packet operations (`op`).
pub(crate) mod op {
    /// Connection request.
    pub(crate) const REQUEST: u16 = 1;
    /// Connection accepted.
    pub(crate) const RESPONSE: u16 = 2;
    /// Connection reset (refused or aborted).
    pub(crate) const RST: u16 = 3;
    /// One or both directions closed (flags say which).
    pub(crate) const SHUTDOWN: u16 = 4;
    /// Stream data.
    pub(crate) const RW: u16 = 5;
    /// Buffer space advertisement.
    pub(crate) const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a CREDIT_UPDATE.
    pub(crate) const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags.
pub(crate) mod shutdown {
    /// The sender will receive no more data.
    pub(crate) const RCV: u32 = 1;
    /// The sender will send no more data.
    pub(crate) const SEND: u32 = 2;
    /// Both directions.
    pub(crate) const BOTH: u32 = RCV | SEND;
}

/// The event-queue event that tells the driver every connection is gone.
pub(crate) const EVENT_TRANSPORT_RESET: u32 = 0;

/// A packet header, host-endian.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) src_cid: u64,
    pub(crate) dst_cid: u64,
    pub(crate) src_port: u32,
    pub(crate) dst_port: u32,
    pub(crate) len: u32,
    pub(crate) type_: u16,
    pub(crate) op: u16,
    pub(crate) flags: u32,
    pub(crate) buf_alloc: u32,
    pub(crate) fwd_cnt: u32,
}

/// Splits `N` bytes off the front of `b`.
fn take<const N: usize>(b: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let (head, rest) = b.split_at(N);
    out.copy_from_slice(head);
    *b = rest;
    out
}

impl Header {
    /// Decodes the little-endian wire format.
    pub(crate) fn from_bytes(bytes: &[u8; HDR_LEN]) -> Self {
        // The field sizes below add up to HDR_LEN, so no split runs short.
        let mut b = &bytes[..];
        Self {
            src_cid: u64::from_le_bytes(take(&mut b)),
            dst_cid: u64::from_le_bytes(take(&mut b)),
            src_port: u32::from_le_bytes(take(&mut b)),
            dst_port: u32::from_le_bytes(take(&mut b)),
            len: u32::from_le_bytes(take(&mut b)),
            type_: u16::from_le_bytes(take(&mut b)),
            op: u16::from_le_bytes(take(&mut b)),
            flags: u32::from_le_bytes(take(&mut b)),
            buf_alloc: u32::from_le_bytes(take(&mut b)),
            fwd_cnt: u32::from_le_bytes(take(&mut b)),
        }
    }

    /// Encodes the little-endian wire format.
    pub(crate) fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut out = [0u8; HDR_LEN];
        let fields: [&[u8]; 10] = [
            &self.src_cid.to_le_bytes(),
            &self.dst_cid.to_le_bytes(),
            &self.src_port.to_le_bytes(),
            &self.dst_port.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.type_.to_le_bytes(),
            &self.op.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.buf_alloc.to_le_bytes(),
            &self.fwd_cnt.to_le_bytes(),
        ];
        let mut at = 0;
        for f in fields {
            out[at..at + f.len()].copy_from_slice(f);
            at += f.len();
        }
        out
    }

    /// The RST the device answers this guest packet with: from the port
    /// the packet was sent to, back to the port it came from.
    pub(crate) fn rst_reply(&self, guest_cid: u64) -> Self {
        Self {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Self::default()
        }
    }
}

/// Why a guest packet is refused (the device answers it with a RST).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    /// `src_cid` is not the guest's or `dst_cid` not the host's.
    WrongCid,
    /// A socket type other than STREAM.
    UnsupportedType,
    /// An op outside the spec's list.
    UnknownOp,
    /// `len` is larger than the chain's data or than [`MAX_PKT_LEN`].
    BadLength,
}

/// Checks a header read from the tx queue; `data_bytes` is how many bytes
/// the chain holds after the header.
pub(crate) fn validate(hdr: &Header, data_bytes: usize, guest_cid: u64) -> Result<(), Reject> {
    if hdr.src_cid != guest_cid || hdr.dst_cid != HOST_CID {
        return Err(Reject::WrongCid);
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(Reject::UnsupportedType);
    }
    if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op) {
        return Err(Reject::UnknownOp);
    }
    let len = usize::try_from(hdr.len).unwrap_or(usize::MAX);
    if len > data_bytes || len > MAX_PKT_LEN {
        return Err(Reject::BadLength);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1122_3344,
            dst_port: 52,
            len: 10,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[28..30], &TYPE_STREAM.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn validation_catches_each_field() {
        let ok = sample();
        assert_eq!(validate(&ok, 10, 3), Ok(()));
        assert_eq!(validate(&ok, 9, 3), Err(Reject::BadLength));
        assert_eq!(validate(&ok, 10, 4), Err(Reject::WrongCid));
        let h = Header { dst_cid: 5, ..ok };
        assert_eq!(validate(&h, 10, 3), Err(Reject::WrongCid));
        let h = Header { type_: 2, ..ok };
        assert_eq!(validate(&h, 10, 3), Err(Reject::UnsupportedType));
        for bad in [0, 8, u16::MAX] {
            let h = Header { op: bad, ..ok };
            assert_eq!(validate(&h, 10, 3), Err(Reject::UnknownOp));
        }
        let h = Header {
            len: u32::MAX,
            ..ok
        };
        assert_eq!(validate(&h, usize::MAX, 3), Err(Reject::BadLength));
        let h = Header {
            len: u32::try_from(MAX_PKT_LEN + 1).unwrap(),
            ..ok
        };
        assert_eq!(validate(&h, usize::MAX, 3), Err(Reject::BadLength));
    }

    #[test]
    fn rst_reply_swaps_ports() {
        let r = sample().rst_reply(3);
        assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, 3));
        assert_eq!((r.src_port, r.dst_port), (52, 0x1122_3344));
        assert_eq!((r.op, r.len, r.type_), (op::RST, 0, TYPE_STREAM));
    }
}
