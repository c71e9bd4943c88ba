//! virtio-blk requests: descriptor chains (headers, sectors, lengths,
//! directions, indirect tables, wild addresses) against a `Block` device
//! on a small temporary disk image, served through a real event loop.
//!
//! Input: a byte for the queue size, a byte of feature and disk choices, a
//! byte for the disk size, then operations (see `Op`). Checks, besides the
//! common ones (`dormouse_fuzz` docs): the image never changes size, and
//! the last request of each pass leaves a valid status byte.
//!
//! Bit 5 of the choices makes the disk a layered one: the image is its
//! base and a fresh top takes the writes. Then the base must never change,
//! and at the end the top's map must save (as a snapshot saves it).

#![no_main]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use dormouse::devices::virtio::block::{map_path, Block, DiskLayers};
use dormouse::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use dormouse::devices::EventFdTrigger;
use dormouse_fuzz::event::Loop;
use dormouse_fuzz::guest::Guest;
use dormouse_fuzz::input::Input;
use dormouse_fuzz::ring::{queue_size, Ring};
use dormouse_fuzz::{areas, checked_pass, ring_base, MEM_SIZE};
use libfuzzer_sys::{fuzz_target, Corpus};

/// The most operations one input runs.
const MAX_OPS: usize = 256;

/// The directory of the image, the top and its map (on a tmpfs when
/// there is one): one per process.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = dormouse_fuzz::scratch_path("blk");
        std::fs::create_dir_all(&d).expect("creating the disk directory");
        d
    })
}

/// The disk image: one per process, refilled for every input.
fn image_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| dir().join("image"))
}

/// The top of a layered disk over the image: removed (with its map) for
/// every input.
fn top_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| dir().join("top"))
}

/// The most sectors an image has.
const MAX_SECTORS: u64 = 64;

/// The image's bytes: `sectors` sectors of a known pattern (made once:
/// making it for every input was a large share of the target's time).
fn pattern(sectors: u64) -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    let all = PATTERN.get_or_init(|| (0..MAX_SECTORS * 512).map(|i| (i % 251) as u8).collect());
    &all[..(sectors.min(MAX_SECTORS) * 512) as usize]
}

/// Recreates the image with `sectors` sectors of a known pattern.
fn fill_image(sectors: u64) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(image_path())
        .expect("creating the disk image");
    file.write_all_at(pattern(sectors), 0)
        .expect("filling the disk image");
    file
}

struct Rig {
    guest: Guest,
    dev: Arc<Mutex<Block>>,
    lp: Loop<Arc<Mutex<Block>>>,
    ring: Ring,
    features: u64,
    image: File,
    image_len: u64,
}

impl Rig {
    fn activate(&mut self, size: u16) {
        let (ring, queue) = Ring::new(&mut self.guest, ring_base(0), size);
        self.ring = ring;
        let mut dev = self.dev.lock().unwrap();
        dev.set_acked_features(self.features);
        let interrupt = Arc::new(Interrupt::new(EventFdTrigger::new().unwrap()));
        dev.activate(self.guest.mem.clone(), interrupt, vec![queue])
            .expect("activation with a valid queue");
    }

    fn pump(&mut self) {
        let Rig {
            guest, lp, ring, ..
        } = self;
        let used = checked_pass(guest, &mut [ring], || lp.pump());
        let image_len = self.image.metadata().unwrap().len();
        assert_eq!(image_len, self.image_len, "the disk image changed size");
        // The last request of the pass wrote its status byte last.
        if let Some(u) = used[0].last().filter(|u| u.len > 0) {
            let &(_, end) = u
                .chain
                .ranges
                .last()
                .expect("a used request has a status byte");
            let status = self.guest.read(end - 1, 1)[0];
            assert!(status <= 2, "status byte {status} is no VIRTIO_BLK_S_*");
        }
    }
}

fn run(data: &[u8]) -> Corpus {
    let mut input = Input::new(data);
    let size = queue_size(input.u8());
    let choice = input.u8();
    let sectors = u64::from(input.u8()) % MAX_SECTORS + 1;
    let image = fill_image(sectors);
    let layered = choice & (1 << 5) != 0;
    let dev = if layered {
        let _ = std::fs::remove_file(top_path());
        let _ = std::fs::remove_file(map_path(top_path()));
        if choice & 1 != 0 {
            // A read-only disk does not create its top: an empty one.
            File::create(top_path()).expect("creating an empty top");
        }
        let layers = DiskLayers::new(image_path(), top_path());
        Block::layered(&layers, choice & 1 != 0).expect("opening the layered disk")
    } else {
        Block::new(image_path(), choice & 1 != 0).expect("opening the disk image")
    };
    let offered = dev.device_features();
    // Bits 1..=4 of `choice` drop FLUSH, DISCARD, WRITE_ZEROES, EVENT_IDX.
    let mut features = offered;
    for (bit, feature) in [(1, 9), (2, 13), (3, 14), (4, 29)] {
        if choice & (1 << bit) != 0 {
            features &= !(1u64 << feature);
        }
    }
    features |= VIRTIO_F_VERSION_1;
    let dev = Arc::new(Mutex::new(dev));
    let mut guest = Guest::new(MEM_SIZE as usize);
    let (ring, _) = Ring::new(&mut guest, ring_base(0), size);
    let mut rig = Rig {
        guest,
        lp: Loop::new(dev.clone()),
        dev,
        ring,
        features,
        image,
        image_len: sectors * 512,
    };
    rig.activate(size);
    let areas = areas();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 8 {
            // Driver writes into the buffers area.
            0 => {
                let offset = u64::from(input.u32()) % (areas.data.1 - areas.data.0);
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                rig.guest.write(areas.data.0 + offset, bytes);
            }
            // A request header: type, ioprio, sector.
            1 => {
                let offset = u64::from(input.u32()) % (areas.data.1 - areas.data.0);
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(&input.u32().to_le_bytes());
                h[8..].copy_from_slice(&input.u64().to_le_bytes());
                rig.guest.write(areas.data.0 + offset, &h);
            }
            2 => {
                rig.ring.add_chain_from(&mut rig.guest, &mut input, &areas);
            }
            3 => {
                rig.dev.lock().unwrap().queue_events()[0].write(1).unwrap();
                rig.pump();
            }
            4 => {
                let idx = input.u16();
                rig.ring.set_avail_idx(&mut rig.guest, idx);
            }
            5 => {
                let value = input.u16();
                let event = input.u8() & 1 != 0;
                rig.ring.set_avail_flags(&mut rig.guest, value, event);
            }
            // The driver resets the device and starts it again.
            6 => {
                rig.dev.lock().unwrap().reset();
                rig.pump();
                rig.guest.resync();
                let size = queue_size(input.u8());
                rig.activate(size);
            }
            // A notification without waiting for the device.
            _ => {
                rig.dev.lock().unwrap().queue_events()[0].write(1).unwrap();
            }
        }
    }
    rig.dev.lock().unwrap().queue_events()[0].write(1).unwrap();
    rig.pump();
    if layered {
        let mut base = vec![0u8; (sectors * 512) as usize];
        rig.image.read_exact_at(&mut base, 0).unwrap();
        assert!(
            base == pattern(sectors),
            "the base of a layered disk changed"
        );
        rig.dev
            .lock()
            .unwrap()
            .save_backend()
            .expect("saving the top's map");
    }
    // Bytes past the last operation mean nothing: keep such inputs out
    // of the corpus.
    if input.is_empty() {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
}

fuzz_target!(|data: &[u8]| -> Corpus { run(data) });
