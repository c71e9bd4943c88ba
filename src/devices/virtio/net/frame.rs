//! Frames in descriptor chains: gathering a transmitted frame, scattering a
//! received one, and checking both against what the driver negotiated.
//! Everything here is guest controlled.

use std::io::{self, Read, Write};
use std::mem::{offset_of, size_of};
use std::ops::Deref;

use virtio_bindings::virtio_net::{
    virtio_net_hdr_v1, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemory;

use crate::memory::GuestMemoryMmap;

/// Size of the `virtio_net_hdr_v1` before every frame (12 bytes).
pub const VNET_HDR_LEN: usize = size_of::<virtio_net_hdr_v1>();
/// Largest Ethernet frame the device moves: a 64 KiB IP packet, its
/// Ethernet header and a VLAN tag.
const MAX_FRAME_LEN: usize = 65_550;
/// Largest header-plus-frame the device moves in one chain (65562 bytes).
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Smallest frame worth sending: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;

/// The header of every received frame: no checksum offload, no
/// segmentation, one buffer (virtio 1.2, 5.1.6.4.1: without
/// `VIRTIO_NET_F_MRG_RXBUF` the device sets `num_buffers` to 1).
const RX_HEADER: [u8; VNET_HDR_LEN] = {
    let mut h = [0u8; VNET_HDR_LEN];
    h[offset_of!(virtio_net_hdr_v1, num_buffers)] = 1;
    h
};

/// A descriptor chain the device cannot use at all: the driver broke the
/// ring. The device marks itself failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum RingError {
    /// The available ring could not be read or its index is impossible.
    #[error("the available ring is corrupt")]
    AvailRing(#[source] virtio_queue::Error),
    /// The used ring could not be written.
    #[error("the used ring could not be written")]
    UsedRing(#[source] virtio_queue::Error),
    /// The chain ended early: a loop, a next index past the queue size, a
    /// bad indirect table, a head past the queue size or lengths that
    /// overflow.
    #[error("descriptor chain {head} is truncated (a loop or an index past the queue size)")]
    Truncated {
        /// The chain's head index.
        head: u16,
    },
    /// A descriptor points outside guest memory.
    #[error("descriptor chain {head} points outside guest memory")]
    OutsideMemory {
        /// The chain's head index.
        head: u16,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// A receive chain has buffers the device may only read.
    #[error("receive chain {head} has device-readable descriptors")]
    ReadableInRx {
        /// The chain's head index.
        head: u16,
    },
    /// Copying to or from guest memory failed after the chain checked out.
    #[error("copying descriptor chain {head} failed")]
    Copy {
        /// The chain's head index.
        head: u16,
        /// What the copy reported.
        #[source]
        source: io::Error,
    },
}

/// Why a transmitted frame was dropped (the chain itself was usable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxDrop {
    /// The chain holds device-writable descriptors.
    WritableDescriptor,
    /// Header and frame together are this short.
    TooShort(u64),
    /// Header and frame together are this long.
    TooLong(u64),
}

/// A transmit chain, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxFrame {
    /// This many bytes (header, zeroed, then frame) are in the buffer.
    Ready(usize),
    /// The frame is dropped.
    Drop(TxDrop),
}

/// Why a frame from the TAP was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RxDrop {
    /// Shorter than a header and an Ethernet header.
    TooShort(usize),
    /// The TAP asked for an offload the driver did not negotiate.
    Offload {
        /// The header's flags.
        flags: u8,
        /// The header's gso_type.
        gso_type: u8,
    },
}

/// The descriptors of a chain, counted by direction.
#[derive(Debug, Default)]
struct Shape {
    readable: usize,
    writable: usize,
    readable_len: u64,
    writable_len: u64,
}

/// Walks the chain once. virtio-queue's iterator stops at loops (after
/// queue-size descriptors), at indices past the table and at lengths that
/// overflow u32; a chain whose last descriptor still says NEXT was cut there.
fn shape<M>(chain: &DescriptorChain<M>) -> Result<Shape, RingError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mut shape = Shape::default();
    let mut cut = true;
    for desc in chain.clone() {
        cut = desc.has_next();
        if desc.is_write_only() {
            shape.writable += 1;
            shape.writable_len += u64::from(desc.len());
        } else {
            shape.readable += 1;
            shape.readable_len += u64::from(desc.len());
        }
    }
    if cut {
        return Err(RingError::Truncated {
            head: chain.head_index(),
        });
    }
    Ok(shape)
}

/// Gathers a transmit chain (header and frame) into `buf`, whose length is
/// the largest accepted, and zeroes the header.
pub(super) fn read_tx<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    buf: &mut [u8],
) -> Result<TxFrame, RingError>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let head = chain.head_index();
    let shape = shape(&chain)?;
    if shape.writable > 0 {
        return Ok(TxFrame::Drop(TxDrop::WritableDescriptor));
    }
    let total = shape.readable_len;
    if total < (VNET_HDR_LEN + MIN_FRAME_LEN) as u64 {
        return Ok(TxFrame::Drop(TxDrop::TooShort(total)));
    }
    let len = match usize::try_from(total) {
        Ok(len) if len <= buf.len() => len,
        _ => return Ok(TxFrame::Drop(TxDrop::TooLong(total))),
    };
    let mut reader: Reader<'_, _> =
        Reader::new(mem, chain).map_err(|source| RingError::OutsideMemory { head, source })?;
    let frame = &mut buf[..len];
    reader
        .read_exact(frame)
        .map_err(|source| RingError::Copy { head, source })?;
    // No offload was negotiated: whatever the driver put there, the host
    // kernel gets a plain frame.
    frame[..VNET_HDR_LEN].fill(0);
    Ok(TxFrame::Ready(len))
}

/// Checks a header-plus-frame read from the TAP.
pub(super) fn check_rx(buf: &[u8]) -> Result<(), RxDrop> {
    if buf.len() < VNET_HDR_LEN + MIN_FRAME_LEN {
        return Err(RxDrop::TooShort(buf.len()));
    }
    let flags = buf[offset_of!(virtio_net_hdr_v1, flags)];
    let gso_type = buf[offset_of!(virtio_net_hdr_v1, gso_type)];
    // With no offload set on the TAP the kernel hands over complete frames;
    // anything else would reach a driver that cannot handle it.
    if u32::from(flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
        || u32::from(gso_type) != VIRTIO_NET_HDR_GSO_NONE
    {
        return Err(RxDrop::Offload { flags, gso_type });
    }
    Ok(())
}

/// Scatters `frame` (without header) behind [`RX_HEADER`] into a receive
/// chain. `Ok(None)` when it does not fit: nothing was written.
pub(super) fn write_rx<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    frame: &[u8],
) -> Result<Option<u32>, RingError>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let head = chain.head_index();
    let shape = shape(&chain)?;
    if shape.readable > 0 {
        return Err(RingError::ReadableInRx { head });
    }
    let mut writer: Writer<'_, _> =
        Writer::new(mem, chain).map_err(|source| RingError::OutsideMemory { head, source })?;
    let len = VNET_HDR_LEN + frame.len();
    if shape.writable_len < len as u64 {
        return Ok(None);
    }
    writer
        .write_all(&RX_HEADER)
        .and_then(|()| writer.write_all(frame))
        .map_err(|source| RingError::Copy { head, source })?;
    // At most MAX_BUFFER_LEN bytes.
    Ok(Some(u32::try_from(len).unwrap_or(u32::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_twelve_bytes_and_rx_says_one_buffer() {
        assert_eq!(VNET_HDR_LEN, 12);
        assert_eq!(MAX_BUFFER_LEN, 65_562);
        assert_eq!(RX_HEADER, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn rx_headers_asking_for_offloads_are_refused() {
        let mut buf = [0u8; VNET_HDR_LEN + 60];
        assert_eq!(check_rx(&buf), Ok(()));
        // DATA_VALID is harmless: the device never forwards flags.
        buf[0] = 2;
        assert_eq!(check_rx(&buf), Ok(()));
        buf[0] = 1;
        assert_eq!(
            check_rx(&buf),
            Err(RxDrop::Offload {
                flags: 1,
                gso_type: 0
            })
        );
        buf[0] = 0;
        buf[1] = 1; // GSO_TCPV4
        assert!(check_rx(&buf).is_err());
        assert_eq!(
            check_rx(&buf[..VNET_HDR_LEN + 13]),
            Err(RxDrop::TooShort(25))
        );
        assert_eq!(check_rx(&[]), Err(RxDrop::TooShort(0)));
    }
}
