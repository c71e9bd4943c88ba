//! The soak workload's model, shared by the guest service
//! (`examples/guest_vsock.rs`, `serve`) and the host that checks it
//! (`examples/soak.rs`): what a seed writes into guest memory and into a
//! file, and the checksum both sides compute. The guest computes its
//! checksums over its own memory and over what it reads back from its disk;
//! the host computes them over this model. Equal checksums mean the guest's
//! state is exactly what it wrote, across every suspend and resume.

/// Pages of the service's soak buffer (4 MiB).
pub const MEM_PAGES: usize = 1024;
/// Pages one `mem` step writes.
pub const STEP_PAGES: usize = 16;
/// Bytes one `append` step adds to a file.
pub const BLOCK: usize = 4096;
const PAGE: usize = 4096;

/// A small deterministic generator (xorshift64*), seeded per step.
fn stream(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn fill(out: &mut [u8], next: &mut impl FnMut() -> u64) {
    for chunk in out.chunks_mut(8) {
        let word = next().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// The first page step `seed` writes: steps wander over the whole buffer.
pub fn step_first_page(seed: u64) -> usize {
    // The modulus is below usize::MAX: the cast back cannot truncate.
    usize::try_from(seed.wrapping_mul(37) % (MEM_PAGES - STEP_PAGES) as u64).unwrap_or(0)
}

/// Applies step `seed` to a buffer of `MEM_PAGES` pages (grown to that size
/// if smaller): `STEP_PAGES` pages from `step_first_page(seed)` get fresh
/// bytes.
pub fn mem_step(buf: &mut Vec<u8>, seed: u64) {
    buf.resize(MEM_PAGES * PAGE, 0);
    let first = step_first_page(seed) * PAGE;
    let mut next = stream(seed);
    fill(&mut buf[first..first + STEP_PAGES * PAGE], &mut next);
}

/// The `BLOCK` bytes that `append` step `seed` adds to a file.
pub fn file_block(seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK];
    fill(&mut out, &mut stream(seed ^ 0xF11E));
    out
}

/// FNV-1a (64-bit) over the little-endian 64-bit words of `bytes` (a
/// short tail is zero-padded), then over the length: a word at a time, so
/// the guest's debug build checksums its 4 MiB quickly.
pub fn checksum(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let words = bytes.chunks(8).map(|c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(w)
    });
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    words
        .chain(std::iter::once(len))
        .fold(0xcbf2_9ce4_8422_2325, |h, w| (h ^ w).wrapping_mul(PRIME))
}
