//! The session layer's JSON records: a session's `session.json`, read and
//! checked as a root that finds the session reads it, and an image's
//! `image.json`, read by `Image::open` with everything it checks after
//! parsing (format, disk names, disk files, the snapshot's id and disk
//! count), in an image directory on a tmpfs whose snapshot is a small full
//! one without disks.
//!
//! Input: a mode byte (even: a session record, odd: an image manifest),
//! then the file's bytes. Checks: no panic; an accepted session record
//! names nothing outside its directory, has non-zero lifetimes and a
//! format this build reads, and never lets a suspend or merge reuse the
//! name of a layer in its chain; an accepted manifest names only plain
//! disk files and the image's snapshot; whatever is accepted, written
//! back with the layer's own writer, reads back equal.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use dormouse::session::fuzzing::{read_session_record, write_image_manifest, write_session_record};
use dormouse::session::{Image, IMAGE_FORMAT, IMAGE_MANIFEST, IMAGE_SNAPSHOT, SESSION_FORMAT};
use dormouse::snapshot::{format, write_dir, SnapshotId, VmState};
use libfuzzer_sys::{fuzz_target, Corpus};

const MEM: u64 = 0x1_0000;
/// The id of the fixture image's snapshot.
const SNAPSHOT_ID: SnapshotId = SnapshotId([0x5a; 16]);

/// The fixture: a session directory and an image directory.
struct Fixture {
    /// Where the input goes as `session.json`.
    record: PathBuf,
    /// Where an accepted record is written back.
    again: PathBuf,
    /// The image directory.
    image: PathBuf,
}

fn full_state() -> VmState {
    dormouse_fuzz::fixture::minimal_state(SNAPSHOT_ID, MEM, false)
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = dormouse_fuzz::scratch_path("records");
        let _ = std::fs::remove_dir_all(&root);
        let session = root.join("session");
        let image = root.join("image");
        std::fs::create_dir_all(&session).expect("creating the session directory");
        std::fs::create_dir_all(&image).expect("creating the image directory");
        let bytes = format::encode(&full_state()).expect("the fixture state encodes");
        write_dir(&image.join(IMAGE_SNAPSHOT), &bytes, |f| f.set_len(MEM))
            .expect("writing the fixture snapshot");
        // Disk candidates for the manifest's checks: a file, an empty file,
        // a directory and a symbolic link.
        std::fs::write(image.join("disk0.img"), [0u8; 4096]).expect("a disk file");
        std::fs::write(image.join("disk1.img"), []).expect("an empty disk file");
        std::fs::create_dir_all(image.join("dir")).expect("a directory");
        let _ = std::os::unix::fs::symlink("disk0.img", image.join("link"));
        Fixture {
            record: session.join("session.json"),
            again: session.join("again.json"),
            image,
        }
    })
}

/// Whether `name`, joined to a directory, stays a direct entry of it.
fn stays_inside(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

fn session(fx: &Fixture, bytes: &[u8]) {
    std::fs::write(&fx.record, bytes).expect("writing the record");
    let Ok(record) = read_session_record(&fx.record) else {
        return;
    };
    write_session_record(&fx.again, &record).expect("an accepted record is written");
    let written = std::fs::read(&fx.again).expect("reading the written record");
    let json: serde_json::Value =
        serde_json::from_slice(&written).expect("the written record is JSON");
    let u64_of = |key: &str| json[key].as_u64().expect("a number field");
    let format = u64_of("format");
    assert!(
        (1..=u64::from(SESSION_FORMAT)).contains(&format),
        "accepted record format {format}"
    );
    let id = json["id"].as_str().expect("the id");
    assert!(stays_inside(id), "accepted session id {id:?}");
    assert_ne!(u64_of("max_lifetime_ms"), 0, "accepted a zero lifetime");
    assert_ne!(
        json["idle_timeout_ms"].as_u64(),
        Some(0),
        "accepted a zero idle timeout"
    );
    let next_layer = u64_of("next_layer");
    assert_ne!(
        next_layer,
        u64::MAX,
        "accepted a next layer number that cannot grow"
    );
    let chain = json["chain"].as_array().expect("the chain");
    // The next suspend writes l<next_layer>, the next merge m<next_layer>:
    // neither may be a committed layer (the suspend removes what is there
    // first).
    let next = [format!("l{next_layer:06}"), format!("m{next_layer:06}")];
    for name in chain {
        let name = name.as_str().expect("a chain entry");
        assert!(stays_inside(name), "accepted chain entry {name:?}");
        assert!(
            !next.iter().any(|n| n == name),
            "accepted chain entry {name:?} with next layer {next_layer}: the next suspend \
             would overwrite it"
        );
    }
    let back = read_session_record(&fx.again).expect("a written record reads back");
    assert_eq!(back, record, "read(write(record)) != record");
}

fn image(fx: &Fixture, bytes: &[u8]) {
    let path = fx.image.join(IMAGE_MANIFEST);
    std::fs::write(&path, bytes).expect("writing the manifest");
    let Ok(image) = Image::open(&fx.image) else {
        return;
    };
    let manifest = image.manifest().clone();
    assert!(
        (1..=IMAGE_FORMAT).contains(&manifest.format),
        "accepted image format {}",
        manifest.format
    );
    assert_eq!(manifest.snapshot_id, SNAPSHOT_ID.to_string());
    // The fixture's snapshot has no disks.
    assert!(
        manifest.disks.is_empty(),
        "accepted disks the snapshot lacks"
    );
    write_image_manifest(&path, &manifest).expect("an accepted manifest is written");
    let again = Image::open(&fx.image).expect("a written manifest opens");
    assert_eq!(
        again.manifest(),
        &manifest,
        "open(write(manifest)) != manifest"
    );
    assert_eq!(again.dir(), image.dir());
}

fuzz_target!(|data: &[u8]| -> Corpus {
    let Some((&mode, rest)) = data.split_first() else {
        return Corpus::Reject;
    };
    let fx = fixture();
    if mode & 1 == 0 {
        session(fx, rest);
    } else {
        image(fx, rest);
    }
    Corpus::Keep
});
