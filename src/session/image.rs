//! Images: a guest booted once, run until its init says it is ready, and
//! snapshotted, with its disks kept as the read-only base of every session
//! launched from it.
//!
//! An image directory holds:
//!
//! ```text
//! image.json      the manifest (written last: an image without it is incomplete)
//! snapshot/       the full snapshot (state, memory)
//! disk0.img ...   the disks as they were at the snapshot, 0400
//! ```

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::console::ConsoleTail;
use super::files;
use super::SessionError;
use crate::devices::virtio::vsock::VsockConfig;
use crate::MicroVm;

/// The image format this build writes and the newest it reads.
pub const IMAGE_FORMAT: u32 = 1;
/// The manifest's file name in an image directory.
pub const IMAGE_MANIFEST: &str = "image.json";
/// The snapshot's directory name in an image directory.
pub const IMAGE_SNAPSHOT: &str = "snapshot";
/// The guest CID images give their vsock device unless told otherwise.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// The host vsock port the guest connects to when its init is done
/// ([`Readiness::VsockConnect`]'s usual value).
pub const DEFAULT_READY_PORT: u32 = 1025;
/// How long a session's guest has to accept an endpoint's connection on
/// its vsock port (the image's `VsockConfig::connect_timeout`).
pub const GUEST_ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Image::create`] waits for the guest to be ready by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How [`Image::create`] knows the guest's init is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The guest connects to this host vsock port and then closes the
    /// connection or writes to it (for example with
    /// `socat -u /dev/null VSOCK-CONNECT:2:1025`).
    ///
    /// The image is taken only then: once the guest has closed or written,
    /// its `connect()` has returned. A guest snapshotted while it still
    /// waits for the connection to be accepted would wait in every session
    /// for an answer that never comes (the host end is not in the image;
    /// Linux does not reset a connection still being set up), and its
    /// connect would fail with `ETIMEDOUT` a little later.
    VsockConnect {
        /// The host port.
        port: u32,
    },
    /// A console line contains this text.
    ConsoleLine(String),
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Readiness::VsockConnect { port } => {
                write!(
                    f,
                    "waiting for the guest to connect to host vsock port {port} and close \
                     the connection or write to it"
                )
            }
            Readiness::ConsoleLine(text) => write!(f, "waiting for a console line with {text:?}"),
        }
    }
}

/// What an image is made of: the boot configuration of the one VM that
/// boots, and when it counts as ready.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    memory_mib: u64,
    vcpus: u32,
    disks: Vec<PathBuf>,
    guest_cid: u64,
    readiness: Readiness,
    ready_timeout: Duration,
    kvm_device: Option<PathBuf>,
}

impl ImageSpec {
    /// An image of the arm64 Linux `Image` at `kernel`: 256 MiB, one vCPU,
    /// a vsock device (guest CID [`DEFAULT_GUEST_CID`]), ready when the
    /// guest connects to host vsock port [`DEFAULT_READY_PORT`] and closes
    /// that connection (see [`Readiness::VsockConnect`]).
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            memory_mib: 256,
            vcpus: 1,
            disks: Vec::new(),
            guest_cid: DEFAULT_GUEST_CID,
            readiness: Readiness::VsockConnect {
                port: DEFAULT_READY_PORT,
            },
            ready_timeout: DEFAULT_READY_TIMEOUT,
            kvm_device: None,
        }
    }

    /// The initramfs.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// The kernel command line (default: the builder's).
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = Some(cmdline.into());
        self
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// vCPU count.
    pub fn vcpus(mut self, count: u32) -> Self {
        self.vcpus = count;
        self
    }

    /// Adds a disk (virtio-blk, writable while the image boots). Its
    /// contents are copied into the image once; every session then reads
    /// that copy as its read-only base and writes only its own layer.
    pub fn disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.disks.push(path.into());
        self
    }

    /// The guest's vsock CID.
    pub fn guest_cid(mut self, cid: u64) -> Self {
        self.guest_cid = cid;
        self
    }

    /// When the guest counts as ready.
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// How long the guest has to become ready.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The KVM device node (default `/dev/kvm`).
    pub fn kvm_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_device = Some(path.into());
        self
    }
}

/// One disk of an image, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDisk {
    /// The file's name in the image directory.
    pub file: String,
    /// Its size in bytes.
    pub size: u64,
}

/// An image's manifest (`image.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// The image format ([`IMAGE_FORMAT`]).
    pub format: u32,
    /// When the image was made, in ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// The id of the snapshot in `snapshot/`, hex.
    pub snapshot_id: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// The guest's vsock CID.
    pub guest_cid: u64,
    /// The disks, in attach order.
    pub disks: Vec<ImageDisk>,
}

/// A complete image on disk, checked. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Image {
    dir: PathBuf,
    manifest: ImageManifest,
    /// Whether its snapshot has a vsock device (endpoints need one).
    vsock: bool,
}

impl Image {
    /// Boots a VM as `spec` says, waits for it to be ready, pauses it and
    /// snapshots it into `dir` (which must not exist), with its disks. The
    /// only place a guest boots. On any error nothing is left at `dir`.
    pub fn create(dir: impl AsRef<Path>, spec: &ImageSpec) -> Result<Image, SessionError> {
        let dir = dir.as_ref();
        if dir.exists() {
            return Err(SessionError::ImageExists(dir.to_path_buf()));
        }
        let started = Instant::now();
        files::private_dir(dir)?;
        let made = Self::create_in(dir, spec);
        match made {
            Ok(image) => {
                log::info!("image {} created in {:?}", dir.display(), started.elapsed());
                Ok(image)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                Err(e)
            }
        }
    }

    fn create_in(dir: &Path, spec: &ImageSpec) -> Result<Image, SessionError> {
        let dir = std::fs::canonicalize(dir).map_err(files::io("resolve", dir))?;
        let mut disks = Vec::new();
        let mut builder = MicroVm::builder()
            .kernel(&spec.kernel)
            .memory_mib(spec.memory_mib)
            .vcpus(spec.vcpus)
            .dirty_tracking(true);
        if let Some(initrd) = &spec.initrd {
            builder = builder.initrd(initrd);
        }
        if let Some(cmdline) = &spec.cmdline {
            builder = builder.cmdline(cmdline.clone());
        }
        if let Some(kvm) = &spec.kvm_device {
            builder = builder.kvm_device(kvm);
        }
        for (i, source) in spec.disks.iter().enumerate() {
            let file = format!("disk{i}.img");
            let path = dir.join(&file);
            // copy_file_range under the hood: a reflink where the file
            // system has them. Once per image, never per session.
            let size = std::fs::copy(source, &path).map_err(files::io("copy the disk", source))?;
            builder = builder.block(&path, false);
            disks.push(ImageDisk { file, size });
        }
        let uds = dir.join("boot.vsock");
        // A resumed guest may take a while to accept: its first touches of
        // memory fault in from the snapshot (seconds under emulation).
        let mut vsock = VsockConfig {
            connect_timeout: GUEST_ACCEPT_TIMEOUT,
            ..VsockConfig::default()
        };
        // The socket the guest's readiness connection reaches, and its path.
        let ready_socket = match &spec.readiness {
            Readiness::VsockConnect { port } => {
                vsock = vsock.allow_host_port(*port);
                let path = PathBuf::from(format!("{}_{port}", uds.display()));
                let listener = UnixListener::bind(&path).map_err(files::io("listen on", &path))?;
                listener
                    .set_nonblocking(true)
                    .map_err(files::io("configure", &path))?;
                Some((listener, path))
            }
            Readiness::ConsoleLine(_) => None,
        };
        builder = builder.vsock_with(spec.guest_cid, &uds, vsock);
        let console = ConsoleTail::default();
        let mut vm = builder.serial_output(console.clone()).build()?;
        vm.start()?;
        let ready = wait_ready(
            &mut vm,
            spec,
            ready_socket.as_ref().map(|(l, _)| l),
            &console,
        );
        if let Some((listener, path)) = ready_socket {
            drop(listener);
            let _ = std::fs::remove_file(path);
        }
        ready?;
        vm.pause()?;
        let snapshot_dir = dir.join(IMAGE_SNAPSHOT);
        vm.snapshot(&snapshot_dir)?;
        drop(vm);
        let _ = std::fs::remove_file(&uds);
        let state = crate::snapshot::read_state(&snapshot_dir)?;
        for disk in &disks {
            let path = dir.join(&disk.file);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
                .map_err(files::io("make read-only", &path))?;
        }
        let manifest = ImageManifest {
            format: IMAGE_FORMAT,
            created_unix_ms: files::unix_ms(SystemTime::now()),
            snapshot_id: state.id.to_string(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            guest_cid: spec.guest_cid,
            disks,
        };
        files::write_record(&dir.join(IMAGE_MANIFEST), &manifest)?;
        Ok(Image {
            dir,
            manifest,
            vsock: true,
        })
    }

    /// Opens an image directory and checks it is complete: its manifest,
    /// its snapshot (whose id must match), and its disks (each present with
    /// its recorded size).
    pub fn open(dir: impl AsRef<Path>) -> Result<Image, SessionError> {
        let dir = dir.as_ref();
        let dir = std::fs::canonicalize(dir).map_err(|_| SessionError::ImageIncomplete {
            dir: dir.to_path_buf(),
            what: "the directory itself".into(),
        })?;
        let path = dir.join(IMAGE_MANIFEST);
        let manifest: ImageManifest = files::read_record(
            &path,
            || SessionError::ImageIncomplete {
                dir: dir.clone(),
                what: IMAGE_MANIFEST.into(),
            },
            |reason| SessionError::ImageCorrupt {
                path: path.clone(),
                reason,
            },
        )?;
        let corrupt = |reason: String| SessionError::ImageCorrupt {
            path: path.clone(),
            reason,
        };
        if manifest.format > IMAGE_FORMAT || manifest.format == 0 {
            return Err(SessionError::ImageVersion {
                dir: dir.clone(),
                found: manifest.format,
                supported: IMAGE_FORMAT,
            });
        }
        for (i, disk) in manifest.disks.iter().enumerate() {
            if !files::plain_name(&disk.file) {
                return Err(corrupt(format!("disk {i} is named {:?}", disk.file)));
            }
            let file = dir.join(&disk.file);
            match std::fs::symlink_metadata(&file) {
                Ok(meta) if meta.is_file() && meta.len() == disk.size => {}
                Ok(meta) if meta.is_file() => {
                    return Err(corrupt(format!(
                        "disk {i} ({}) has {} bytes, the manifest says {}",
                        disk.file,
                        meta.len(),
                        disk.size
                    )))
                }
                Ok(_) => return Err(corrupt(format!("disk {i} ({}) is not a file", disk.file))),
                Err(_) => {
                    return Err(SessionError::ImageDiskMissing {
                        dir: dir.clone(),
                        index: i,
                        path: file,
                    })
                }
            }
        }
        let snapshot = dir.join(IMAGE_SNAPSHOT);
        if !snapshot.is_dir() {
            return Err(SessionError::ImageIncomplete {
                dir: dir.clone(),
                what: format!("{IMAGE_SNAPSHOT}/"),
            });
        }
        let state =
            crate::snapshot::read_state(&snapshot).map_err(|e| SessionError::ImageCorrupt {
                path: snapshot.clone(),
                reason: e.to_string(),
            })?;
        if state.id.to_string() != manifest.snapshot_id {
            return Err(corrupt(format!(
                "its snapshot is {}, the manifest names {}",
                state.id, manifest.snapshot_id
            )));
        }
        if state.diff.is_some() {
            return Err(corrupt(
                "its snapshot is a diff, an image needs a full one".into(),
            ));
        }
        let disks = state
            .config
            .devices
            .iter()
            .filter(|d| matches!(d, crate::snapshot::SavedDevice::Block { .. }))
            .count();
        if disks != manifest.disks.len() {
            return Err(corrupt(format!(
                "its snapshot has {disks} disks, the manifest names {}",
                manifest.disks.len()
            )));
        }
        let vsock = state
            .config
            .devices
            .iter()
            .any(|d| matches!(d, crate::snapshot::SavedDevice::Vsock { .. }));
        Ok(Image {
            dir,
            manifest,
            vsock,
        })
    }

    /// The image directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    /// The snapshot directory.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join(IMAGE_SNAPSHOT)
    }

    /// Whether sessions of this image can have endpoints: its guest has a
    /// vsock device.
    pub fn has_vsock(&self) -> bool {
        self.vsock
    }

    /// The `index`-th disk's base file.
    pub fn disk_path(&self, index: usize) -> Option<PathBuf> {
        self.manifest
            .disks
            .get(index)
            .map(|d| self.dir.join(&d.file))
    }
}

fn wait_ready(
    vm: &mut MicroVm,
    spec: &ImageSpec,
    listener: Option<&UnixListener>,
    console: &ConsoleTail,
) -> Result<(), SessionError> {
    let deadline = Instant::now() + spec.ready_timeout;
    let timeout = |console: &ConsoleTail| SessionError::ReadinessTimeout {
        waited: spec.ready_timeout,
        condition: spec.readiness.to_string(),
        console: console.lines().join("\n"),
    };
    let socket_error = |what: &'static str| files::io(what, Path::new("the readiness socket"));
    // The guest's readiness connection, once accepted.
    let mut connection: Option<UnixStream> = None;
    loop {
        let ready = match (&spec.readiness, listener) {
            (Readiness::ConsoleLine(text), _) => console.wait_for(text, Duration::from_millis(50)),
            (Readiness::VsockConnect { .. }, Some(listener)) => {
                if connection.is_none() {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream
                                .set_nonblocking(true)
                                .map_err(socket_error("configure"))?;
                            connection = Some(stream);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(socket_error("accept on")(e)),
                    }
                }
                match connection.as_mut() {
                    Some(stream) => guest_done_connecting(stream).map_err(socket_error("read"))?,
                    None => false,
                }
            }
            (Readiness::VsockConnect { .. }, None) => false,
        };
        if ready {
            return Ok(());
        }
        if let Some(exit) = vm.wait_timeout(Duration::from_millis(50))? {
            return Err(SessionError::GuestStopped {
                exit: format!("{exit:?}"),
                console: console.lines().join("\n"),
            });
        }
        if Instant::now() >= deadline {
            return Err(timeout(console));
        }
    }
}

/// Whether the guest has closed its accepted readiness connection or
/// written to it: either means its `connect()` returned.
fn guest_done_connecting(stream: &mut UnixStream) -> std::io::Result<bool> {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        // EOF (the guest closed), or data (the guest wrote).
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(false),
        // The device reset the connection: the guest ended it.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(true),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("dormouse-image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn manifest(disks: Vec<ImageDisk>) -> ImageManifest {
        ImageManifest {
            format: IMAGE_FORMAT,
            created_unix_ms: 1,
            snapshot_id: "00".repeat(16),
            memory_mib: 128,
            vcpus: 1,
            guest_cid: 3,
            disks,
        }
    }

    fn write(dir: &Path, m: &ImageManifest) {
        std::fs::write(dir.join(IMAGE_MANIFEST), serde_json::to_vec(m).unwrap()).unwrap();
    }

    #[test]
    fn every_broken_image_gets_its_own_error() {
        let d = scratch("broken");
        let dir = &d.0;
        assert!(matches!(
            Image::open(dir.join("nope")),
            Err(SessionError::ImageIncomplete { .. })
        ));
        assert!(
            matches!(Image::open(dir), Err(SessionError::ImageIncomplete { what, .. }) if what == IMAGE_MANIFEST)
        );
        std::fs::write(dir.join(IMAGE_MANIFEST), b"{\"format\": 1,").unwrap();
        assert!(matches!(
            Image::open(dir),
            Err(SessionError::ImageCorrupt { .. })
        ));
        std::fs::remove_file(dir.join(IMAGE_MANIFEST)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join(IMAGE_MANIFEST)).unwrap();
        assert!(
            matches!(Image::open(dir), Err(SessionError::ImageCorrupt { reason, .. }) if reason.contains("symbolic link"))
        );
        std::fs::remove_file(dir.join(IMAGE_MANIFEST)).unwrap();

        let mut future = manifest(Vec::new());
        future.format = IMAGE_FORMAT + 1;
        write(dir, &future);
        assert!(matches!(
            Image::open(dir),
            Err(SessionError::ImageVersion { found, .. }) if found == IMAGE_FORMAT + 1
        ));

        let disk = |file: &str, size| ImageDisk {
            file: file.into(),
            size,
        };
        write(dir, &manifest(vec![disk("../escape.img", 4096)]));
        assert!(matches!(
            Image::open(dir),
            Err(SessionError::ImageCorrupt { .. })
        ));
        write(dir, &manifest(vec![disk("disk0.img", 4096)]));
        assert!(matches!(
            Image::open(dir),
            Err(SessionError::ImageDiskMissing { index: 0, .. })
        ));
        std::fs::write(dir.join("disk0.img"), vec![0u8; 512]).unwrap();
        assert!(
            matches!(Image::open(dir), Err(SessionError::ImageCorrupt { reason, .. }) if reason.contains("512 bytes"))
        );
        std::fs::write(dir.join("disk0.img"), vec![0u8; 4096]).unwrap();
        assert!(matches!(
            Image::open(dir),
            Err(SessionError::ImageIncomplete { what, .. }) if what.contains(IMAGE_SNAPSHOT)
        ));
        std::fs::create_dir(dir.join(IMAGE_SNAPSHOT)).unwrap();
        std::fs::write(dir.join(IMAGE_SNAPSHOT).join("state"), b"not a state file").unwrap();
        assert!(matches!(
            Image::open(dir),
            Err(SessionError::ImageCorrupt { .. })
        ));
    }

    #[test]
    fn create_refuses_an_existing_directory() {
        let d = scratch("exists");
        assert!(matches!(
            Image::create(&d.0, &ImageSpec::new("/nonexistent/Image")),
            Err(SessionError::ImageExists(_))
        ));
        // A failed create leaves nothing behind.
        let fresh = d.0.join("new");
        assert!(Image::create(&fresh, &ImageSpec::new("/nonexistent/Image")).is_err());
        assert!(!fresh.exists());
    }
}
