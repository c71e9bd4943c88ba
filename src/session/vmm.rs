//! What sessions need from the VMM, in one place: disk layers and guest
//! connections.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::{files, SessionError};
use crate::snapshot::Restore;
use crate::MicroVm;

/// Removes a disk layer file (a running VM's top left by a crash).
pub(super) fn remove_layer(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Gives the restored VM's `index`-th disk its layers.
pub(super) fn attach(
    restore: Restore,
    index: usize,
    base: PathBuf,
    layers: Vec<PathBuf>,
    top: PathBuf,
) -> Restore {
    // INTERIM: full copies, until the layered disk lands.
    let from = layers.last().cloned().unwrap_or(base);
    let _ = std::fs::copy(&from, &top);
    let _ = std::fs::set_permissions(&top, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    restore.block_path(index, top)
}

/// Turns a suspended VM's disk top into a frozen layer at `layer`.
pub(super) fn freeze(top: &Path, layer: &Path) -> Result<(), SessionError> {
    std::fs::rename(top, layer).map_err(files::io("move the disk layer", top))
}

/// Merges consecutive frozen layers into one at `out`.
pub(super) fn merge(layers: &[PathBuf], out: &Path) -> Result<(), SessionError> {
    let Some(newest) = layers.last() else {
        return Ok(());
    };
    std::fs::copy(newest, out)
        .map(drop)
        .map_err(files::io("merge disk layers into", out))
}

/// A stream to the guest's vsock `port`, handed straight to the VM's
/// vsock device (no socket path, no `CONNECT` handshake). A port the guest
/// does not listen on ends the stream (EOF), like a refused connection.
pub(super) fn connect(vm: &MicroVm, port: u32) -> Result<UnixStream, SessionError> {
    Ok(vm.vsock_connect(port)?)
}
