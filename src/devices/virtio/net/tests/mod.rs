//! Device tests over mock queues, with a frame-preserving socket pair in
//! place of the TAP (its peer plays the kernel's side: it reads and writes
//! each frame behind a 12-byte virtio-net header), plus one test on a real
//! TAP when the host allows it.

mod event_loop;
mod rate_limit;
mod real_tap;
mod rig;
mod rx;
mod tx;
mod virtio;
