//! Architecture support. dormouse targets aarch64; the memory map is plain
//! data and compiles everywhere, while the KVM register and vGIC code is only
//! built for aarch64 hosts.

pub mod aarch64;
