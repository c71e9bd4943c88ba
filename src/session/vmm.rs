//! What sessions need from the VMM, in one place: disk layers and guest
//! connections.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::{files, SessionError};
use crate::devices::virtio::block::{map_path, merge_layers, DiskLayers};
use crate::snapshot::Restore;
use crate::MicroVm;

/// Removes a disk layer (its data file and its map): a running VM's top
/// left by a crash.
pub(super) fn remove_layer(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(map_path(path));
}

/// Gives the restored VM's `index`-th disk its layers: the image's disk
/// as the read-only base, the session's frozen layers, a new top. Nothing
/// is copied.
pub(super) fn attach(
    restore: Restore,
    index: usize,
    base: PathBuf,
    layers: Vec<PathBuf>,
    top: PathBuf,
) -> Restore {
    restore.block_layers(index, DiskLayers { base, layers, top })
}

/// Turns a suspended VM's disk top into a frozen layer at `layer`: the
/// snapshot just wrote its map, so the pair is consistent; both move.
pub(super) fn freeze(top: &Path, layer: &Path) -> Result<(), SessionError> {
    std::fs::rename(top, layer).map_err(files::io("move the disk layer", top))?;
    let map = map_path(top);
    std::fs::rename(&map, map_path(layer)).map_err(files::io("move the disk layer map", &map))
}

/// Merges consecutive frozen layers (oldest first) into one at `out`.
pub(super) fn merge(layers: &[PathBuf], out: &Path) -> Result<(), SessionError> {
    merge_layers(layers, out).map_err(SessionError::Disk)
}

/// A stream to the guest's vsock `port`, handed straight to the VM's
/// vsock device (no socket path, no `CONNECT` handshake). A port the guest
/// does not listen on ends the stream (EOF), like a refused connection.
pub(super) fn connect(vm: &MicroVm, port: u32) -> Result<UnixStream, SessionError> {
    Ok(vm.vsock_connect(port)?)
}
