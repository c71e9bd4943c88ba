//! Layered disks through the device: reads falling through the layers,
//! copy-up, discard, the presence map on disk and its validation, and
//! `merge_layers`. A child of `tests`, whose mock-queue rig it uses.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::SystemTime;

use super::super::layered::{map_path, ChunkMap, CHUNK_SIZE, MAP_VERSION};
use super::super::{merge_layers, DiskLayers, LayerError};
use super::*;

const CHUNK: usize = 4096;
/// The test disk: 8 chunks (the shared rig's 64 sectors).
const SIZE: u64 = SECTORS * 512;
/// Sectors per chunk.
const SPC: u64 = 8;

/// A directory of its own in the temp directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "dormouse-layered-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A base of `size` bytes filled with `pattern(1, ..)`.
fn base(dir: &Dir, size: u64) -> PathBuf {
    let path = dir.path("base");
    std::fs::write(&path, pattern(1, usize::try_from(size).unwrap())).unwrap();
    path
}

/// The bytes chunk `c` holds in a layer made by [`layer`] with `seed`.
fn chunk_data(seed: u8, c: u64) -> Vec<u8> {
    pattern(seed.wrapping_add(u8::try_from(c).unwrap()), CHUNK)
}

/// A frozen layer of a `size`-byte disk holding `chunks`, each filled
/// with [`chunk_data`]`(seed, c)`, with its map.
fn layer(dir: &Dir, name: &str, size: u64, seed: u8, chunks: &[u64]) -> PathBuf {
    let path = dir.path(name);
    let file = File::create(&path).unwrap();
    file.set_len(size).unwrap();
    let mut map = ChunkMap::empty(size.div_ceil(CHUNK_SIZE));
    for &c in chunks {
        let start = c * CHUNK_SIZE;
        let len = usize::try_from((size - start).min(CHUNK_SIZE)).unwrap();
        file.write_all_at(&chunk_data(seed, c)[..len], start)
            .unwrap();
        map.set_range(c, c);
    }
    std::fs::write(map_path(&path), map.encode(size)).unwrap();
    path
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

/// A device over `layers`, every feature acked.
fn layered_dev(layers: &DiskLayers, read_only: bool) -> Block {
    let mut dev = Block::layered(layers, read_only).unwrap();
    dev.set_acked_features(dev.device_features());
    dev
}

/// Reads the whole disk through the device, in uneven segments.
fn read_all(rig: &mut Rig) -> Vec<u8> {
    let len = usize::try_from(SIZE).unwrap();
    rig.fill(DATA, &vec![0xee; len]);
    let (a, b) = (1000u32, u32::try_from(SIZE).unwrap() - 1000);
    assert_eq!(
        rig.request(
            VIRTIO_BLK_T_IN,
            0,
            &[D::W(DATA, a), D::W(DATA + 0x8_0000, b)]
        ),
        (OK, a + b + 1)
    );
    let mut out = rig.guest(DATA, 1000);
    out.extend(rig.guest(DATA + 0x8_0000, usize::try_from(b).unwrap()));
    out
}

fn chunk(bytes: &[u8], c: usize) -> &[u8] {
    &bytes[c * CHUNK..(c + 1) * CHUNK]
}

fn layer_err(e: BlockError) -> LayerError {
    match e {
        BlockError::Layer(e) => e,
        other => panic!("not a layer error: {other:?}"),
    }
}

#[test]
fn layered_reads_fall_through_top_layers_and_base() {
    let dir = Dir::new();
    let base_path = base(&dir, SIZE);
    let base_bytes = read_file(&base_path);
    let old = layer(&dir, "l1", SIZE, 10, &[1, 2, 5]);
    let new = layer(&dir, "l2", SIZE, 50, &[2, 3, 5, 6]);
    let layers = DiskLayers::new(&base_path, dir.path("top"))
        .layer(&old)
        .layer(&new);
    let mem = guest_memory();
    let mut rig = Rig::with_device(&mem, layered_dev(&layers, false));
    // The top takes chunk 3 and 7 whole.
    for c in [3u64, 7] {
        rig.fill(DATA, &chunk_data(90, c));
        assert_eq!(
            rig.request(VIRTIO_BLK_T_OUT, c * SPC, &[D::R(DATA, 4096)]),
            (OK, 1)
        );
    }
    let all = read_all(&mut rig);
    let want: [&[u8]; 8] = [
        chunk(&base_bytes, 0),
        &chunk_data(10, 1),
        &chunk_data(50, 2),
        &chunk_data(90, 3),
        chunk(&base_bytes, 4),
        &chunk_data(50, 5),
        &chunk_data(50, 6),
        &chunk_data(90, 7),
    ];
    for (c, want) in want.iter().enumerate() {
        assert_eq!(chunk(&all, c), *want, "chunk {c}");
    }
    // A read across a layer boundary, sector by sector.
    rig.fill(DATA, &[0; 1024]);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 2 * SPC - 1, &[D::W(DATA, 1024)]),
        (OK, 1025)
    );
    assert_eq!(rig.guest(DATA, 512), chunk_data(10, 1)[3584..]);
    assert_eq!(rig.guest(DATA + 512, 512), chunk_data(50, 2)[..512]);
    // Out of range, as for a plain disk.
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, SECTORS, &[D::W(DATA, S)]),
        (IOERR, 1)
    );
}

#[test]
fn layered_partial_writes_copy_up_and_never_touch_lower_files() {
    let dir = Dir::new();
    let base_path = base(&dir, SIZE);
    let frozen = layer(&dir, "l1", SIZE, 10, &[1]);
    let top = dir.path("top");
    let before: Vec<_> = [&base_path, &frozen, &map_path(&frozen)]
        .iter()
        .map(|p| (read_file(p), mtime(p)))
        .collect();
    let base_bytes = before[0].0.clone();
    let mem = guest_memory();
    let mut rig = Rig::with_device(
        &mem,
        layered_dev(&DiskLayers::new(&base_path, &top).layer(&frozen), false),
    );
    // Created sparse, private, the size of the base; no map yet.
    let meta = std::fs::metadata(&top).unwrap();
    assert_eq!(meta.len(), SIZE);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(!map_path(&top).exists());

    // 512 bytes into chunk 1 (held by the frozen layer) at sector 9.
    let sector = pattern(200, 512);
    rig.fill(DATA, &sector);
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 9, &[D::R(DATA, S)]), (OK, 1));
    // 1 KiB across chunks 3 and 4 (both from the base): sectors 31 and 32.
    let across = pattern(201, 1024);
    rig.fill(DATA, &across);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 4 * SPC - 1, &[D::R(DATA, 1024)]),
        (OK, 1)
    );
    let map = match rig.dev.backend() {
        super::super::backend::Backend::Layered(d) => d.top_map().clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (0..8).filter(|&c| map.has(c)).collect::<Vec<_>>(),
        [1, 3, 4]
    );

    let mut want = base_bytes.clone();
    want[CHUNK..2 * CHUNK].copy_from_slice(&chunk_data(10, 1));
    want[CHUNK + 512..CHUNK + 1024].copy_from_slice(&sector);
    want[4 * CHUNK - 512..4 * CHUNK + 512].copy_from_slice(&across);
    assert_eq!(read_all(&mut rig), want);
    // The top holds the copied-up chunks whole.
    let top_bytes = read_file(&top);
    assert_eq!(chunk(&top_bytes, 1), chunk(&want, 1));
    assert_eq!(chunk(&top_bytes, 3), chunk(&want, 3));
    assert_eq!(chunk(&top_bytes, 4), chunk(&want, 4));
    assert_eq!(chunk(&top_bytes, 2), vec![0; CHUNK], "chunk 2 untouched");
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));

    // The base and the frozen layer (and its map): same bytes, same mtime.
    let after: Vec<_> = [&base_path, &frozen, &map_path(&frozen)]
        .iter()
        .map(|p| (read_file(p), mtime(p)))
        .collect();
    assert_eq!(before, after);
}

#[test]
fn layered_discard_and_write_zeroes_hide_lower_data() {
    let dir = Dir::new();
    let base_path = base(&dir, SIZE);
    let base_bytes = read_file(&base_path);
    let frozen = layer(&dir, "l1", SIZE, 10, &[2]);
    let mem = guest_memory();
    let dev = layered_dev(
        &DiskLayers::new(&base_path, dir.path("top")).layer(&frozen),
        false,
    );
    if dev.device_features() & (1 << VIRTIO_BLK_F_DISCARD) == 0 {
        eprintln!("skipped: the temp file system cannot punch holes");
        return;
    }
    let mut rig = Rig::with_device(&mem, dev);
    let mut want = base_bytes.clone();
    want[2 * CHUNK..3 * CHUNK].copy_from_slice(&chunk_data(10, 2));
    // Discard: sectors 12..20 (half of chunk 1, half of chunk 2).
    rig.discard_segment(DATA2, 12, 8, 0);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, &[D::R(DATA2, 16)]),
        (OK, 1)
    );
    want[12 * 512..20 * 512].fill(0);
    assert_eq!(read_all(&mut rig), want);
    // Write-zeroes, with and without unmap: chunk 5 whole, the last sector.
    for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
        rig.discard_segment(DATA2, 5 * SPC, 8, flags);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[D::R(DATA2, 16)]),
            (OK, 1)
        );
        rig.discard_segment(DATA2, SECTORS - 1, 1, flags);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[D::R(DATA2, 16)]),
            (OK, 1)
        );
    }
    want[5 * CHUNK..6 * CHUNK].fill(0);
    want[usize::try_from(SIZE).unwrap() - 512..].fill(0);
    assert_eq!(read_all(&mut rig), want);
    // Out of range.
    rig.discard_segment(DATA2, SECTORS - 1, 2, 0);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, &[D::R(DATA2, 16)]),
        (IOERR, 1)
    );
    assert_eq!(read_file(&base_path), base_bytes);
}

#[test]
fn layered_top_map_persists_and_reloads() {
    let dir = Dir::new();
    let base_path = base(&dir, SIZE);
    let top = dir.path("top");
    let layers = DiskLayers::new(&base_path, &top);
    let mem = guest_memory();
    let mut rig = Rig::with_device(&mem, layered_dev(&layers, false));
    rig.fill(DATA, &pattern(77, 1024));
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 2 * SPC + 2, &[D::R(DATA, 1024)]),
        (OK, 1)
    );
    let seen = read_all(&mut rig);
    // A map that cannot be written fails the save, with the top's map
    // left as it was (none yet).
    let tmp = dir.path("top.map.tmp");
    std::fs::create_dir(&tmp).unwrap();
    let err = rig.dev.save_backend().unwrap_err();
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<LayerError>());
    assert!(matches!(inner, Some(LayerError::Persist { .. })), "{err:?}");
    assert!(!map_path(&top).exists());
    std::fs::remove_dir(&tmp).unwrap();
    // What a snapshot does.
    rig.dev.save_backend().unwrap();
    let map = map_path(&top);
    assert_eq!(
        std::fs::metadata(&map).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!dir.path("top.map.tmp").exists());
    // The top stays locked while its device lives.
    let err = layer_err(Block::layered(&layers, false).unwrap_err());
    assert!(matches!(err, LayerError::Locked { .. }), "{err}");
    drop(rig);

    // The same top again: its map comes back.
    let mem2 = guest_memory();
    let mut again = Rig::with_device(&mem2, layered_dev(&layers, false));
    assert_eq!(read_all(&mut again), seen);
    // A write after reopening keeps the reloaded chunks.
    again.fill(DATA, &pattern(78, 512));
    assert_eq!(
        again.request(VIRTIO_BLK_T_OUT, 0, &[D::R(DATA, S)]),
        (OK, 1)
    );
    let mut seen2 = seen.clone();
    seen2[..512].copy_from_slice(&pattern(78, 512));
    assert_eq!(read_all(&mut again), seen2);
    again.dev.save_backend().unwrap();
    drop(again);

    // Frozen under a new top: the same disk; then read-only.
    let fresh = DiskLayers::new(&base_path, dir.path("top2")).layer(&top);
    let mem3 = guest_memory();
    let mut frozen = Rig::with_device(&mem3, layered_dev(&fresh, false));
    assert_eq!(read_all(&mut frozen), seen2);
    drop(frozen);
    let mem4 = guest_memory();
    let mut ro = Rig::with_device(&mem4, layered_dev(&fresh, true));
    assert_ne!(ro.dev.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro.dev.device_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    ro.fill(DATA, &pattern(79, 512));
    assert_eq!(
        ro.request(VIRTIO_BLK_T_OUT, 0, &[D::R(DATA, S)]),
        (IOERR, 1)
    );
    assert_eq!(read_all(&mut ro), seen2);
    ro.dev.save_backend().unwrap();
    assert!(
        !map_path(&dir.path("top2")).exists(),
        "a read-only top is not written"
    );
}

#[test]
fn a_corrupt_or_mismatched_layer_gets_its_own_error() {
    let dir = Dir::new();
    // 6 chunks, the last one partial: the bitmap byte has 2 spare bits.
    let size = 5 * CHUNK_SIZE + 1024;
    let base_path = base(&dir, size);
    let good = layer(&dir, "good", size, 10, &[0, 5]);
    let map = map_path(&good);
    let valid = read_file(&map);
    let open = |bytes: Option<&[u8]>| {
        match bytes {
            Some(b) => std::fs::write(&map, b).unwrap(),
            None => std::fs::remove_file(&map).unwrap(),
        }
        let layers = DiskLayers::new(&base_path, dir.path("top")).layer(&good);
        let result = Block::layered(&layers, false).map(drop);
        let _ = std::fs::remove_file(dir.path("top"));
        result.map_err(layer_err)
    };
    open(Some(&valid)).unwrap();
    // Re-seals a map after an edit, so the check after the CRC fires.
    let resealed = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = valid[..valid.len() - 8].to_vec();
        edit(&mut b);
        let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ).checksum(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    };
    let mut bad_magic = valid.clone();
    bad_magic[0] ^= 1;
    let mut flipped = valid.clone();
    flipped[32] ^= 0b10;
    let mut version = valid.clone();
    version[8..12].copy_from_slice(&(MAP_VERSION + 1).to_le_bytes());
    type Case = (&'static str, Option<Vec<u8>>, fn(&LayerError) -> bool);
    let cases: Vec<Case> = vec![
        ("missing", None, |e| {
            matches!(e, LayerError::MissingMap { .. })
        }),
        ("empty", Some(Vec::new()), |e| {
            matches!(e, LayerError::NotAMap { .. })
        }),
        ("bad magic", Some(bad_magic), |e| {
            matches!(e, LayerError::NotAMap { .. })
        }),
        ("newer version", Some(version), |e| {
            matches!(e, LayerError::MapVersion { found: 2, .. })
        }),
        ("flipped bit", Some(flipped), |e| {
            matches!(e, LayerError::MapChecksum { .. })
        }),
        ("truncated", Some(valid[..valid.len() - 1].to_vec()), |e| {
            matches!(e, LayerError::MapChecksum { .. })
        }),
        (
            "chunk size",
            Some(resealed(&|b| {
                b[12..16].copy_from_slice(&512u32.to_le_bytes())
            })),
            |e| matches!(e, LayerError::MapChunkSize { found: 512, .. }),
        ),
        (
            "disk size",
            Some(resealed(&|b| {
                b[16..24].copy_from_slice(&(size + 512).to_le_bytes())
            })),
            |e| matches!(e, LayerError::MapDiskSize { .. }),
        ),
        (
            "chunk count",
            Some(resealed(&|b| {
                b[24..32].copy_from_slice(&7u64.to_le_bytes())
            })),
            |e| {
                matches!(
                    e,
                    LayerError::MapChunkCount {
                        found: 7,
                        expected: 6,
                        ..
                    }
                )
            },
        ),
        ("trailing byte", Some(resealed(&|b| b.push(0))), |e| {
            matches!(
                e,
                LayerError::MapLength {
                    len: 42,
                    expected: 41,
                    ..
                }
            )
        }),
        (
            "short bitmap",
            Some(resealed(&|b| {
                b.pop();
            })),
            |e| {
                matches!(
                    e,
                    LayerError::MapLength {
                        len: 40,
                        expected: 41,
                        ..
                    }
                )
            },
        ),
        ("stray bit", Some(resealed(&|b| b[32] |= 0x80)), |e| {
            matches!(e, LayerError::MapStrayBits { .. })
        }),
    ];
    for (name, bytes, check) in cases {
        let err = open(bytes.as_deref()).unwrap_err();
        assert!(check(&err), "{name}: {err:?}");
        assert!(!err.to_string().is_empty());
    }
    std::fs::write(&map, &valid).unwrap();

    // A layer of another size.
    let short = layer(&dir, "short", size - 512, 10, &[0]);
    let err = layer_err(
        Block::layered(
            &DiskLayers::new(&base_path, dir.path("t1")).layer(&short),
            false,
        )
        .unwrap_err(),
    );
    assert!(
        matches!(
            err,
            LayerError::MapDiskSize { .. } | LayerError::SizeMismatch { .. }
        ),
        "{err}"
    );
    // Right map, data file of another length.
    let stretched = layer(&dir, "stretched", size, 10, &[0]);
    File::options()
        .write(true)
        .open(&stretched)
        .unwrap()
        .set_len(size + 512)
        .unwrap();
    let err = layer_err(
        Block::layered(
            &DiskLayers::new(&base_path, dir.path("t2")).layer(&stretched),
            false,
        )
        .unwrap_err(),
    );
    assert!(
        matches!(err, LayerError::SizeMismatch { size: s, .. } if s == size + 512),
        "{err}"
    );
    // A top holding data without a map (never snapshotted).
    let orphan = dir.path("orphan");
    std::fs::write(&orphan, vec![1u8; usize::try_from(size).unwrap()]).unwrap();
    let err = layer_err(Block::layered(&DiskLayers::new(&base_path, &orphan), false).unwrap_err());
    assert!(matches!(err, LayerError::MissingMap { .. }), "{err}");
    // A frozen layer that does not exist, or is a directory.
    let err = layer_err(
        Block::layered(
            &DiskLayers::new(&base_path, dir.path("t3")).layer(dir.path("nope")),
            false,
        )
        .unwrap_err(),
    );
    assert!(matches!(err, LayerError::Open { .. }), "{err}");
    let err = layer_err(
        Block::layered(
            &DiskLayers::new(&base_path, dir.path("t4")).layer(&dir.0),
            false,
        )
        .unwrap_err(),
    );
    assert!(matches!(err, LayerError::NotAFile { .. }), "{err}");
    // The base as its own top: the top's exclusive lock meets the base's
    // shared one.
    let err =
        layer_err(Block::layered(&DiskLayers::new(&base_path, &base_path), false).unwrap_err());
    assert!(matches!(err, LayerError::Locked { .. }), "{err}");
    // A layer opened as a plain disk.
    let err = layer_err(Block::new(&good, true).unwrap_err());
    assert!(
        matches!(err, LayerError::LayerOpenedAsPlainDisk { .. }),
        "{err}"
    );
    // A base that is not whole sectors is the plain disk's error.
    let odd = dir.path("odd");
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    let err = Block::layered(&DiskLayers::new(&odd, dir.path("t5")), false).unwrap_err();
    assert!(
        matches!(err, BlockError::NotSectorAligned { size: 1000, .. }),
        "{err}"
    );
}

#[test]
fn merge_layers_newest_wins_and_absent_chunks_stay_absent() {
    let dir = Dir::new();
    let base_path = base(&dir, SIZE);
    let l1 = layer(&dir, "l1", SIZE, 10, &[0, 1, 4]);
    let l2 = layer(&dir, "l2", SIZE, 50, &[1, 2]);
    let l3 = layer(&dir, "l3", SIZE, 90, &[2, 7]);
    let inputs = [l1.clone(), l2.clone(), l3.clone()];
    let before: Vec<_> = inputs.iter().map(|p| read_file(p)).collect();
    let out = dir.path("merged");
    merge_layers(&inputs, &out).unwrap();
    assert_eq!(
        before,
        inputs.iter().map(|p| read_file(p)).collect::<Vec<_>>()
    );

    let data = read_file(&out);
    assert_eq!(data.len() as u64, SIZE);
    let expect: [Option<Vec<u8>>; 8] = [
        Some(chunk_data(10, 0)),
        Some(chunk_data(50, 1)),
        Some(chunk_data(90, 2)),
        None,
        Some(chunk_data(10, 4)),
        None,
        None,
        Some(chunk_data(90, 7)),
    ];
    let map_bytes = read_file(&map_path(&out));
    let map = ChunkMap::empty(8);
    let mut want_map = map.clone();
    for (c, e) in expect.iter().enumerate() {
        match e {
            Some(bytes) => {
                assert_eq!(chunk(&data, c), &bytes[..], "chunk {c}");
                want_map.set_range(c as u64, c as u64);
            }
            None => assert_eq!(chunk(&data, c), vec![0; CHUNK], "chunk {c}"),
        }
    }
    assert_eq!(map_bytes, want_map.encode(SIZE));
    // Only present chunks were written: the output is sparse.
    let blocks = std::fs::metadata(&out).unwrap().blocks();
    assert!(blocks * 512 < SIZE, "{blocks} blocks");

    // The merged layer gives the same disk as the chain.
    let mem = guest_memory();
    let chain = DiskLayers {
        base: base_path.clone(),
        layers: inputs.to_vec(),
        top: dir.path("top-a"),
    };
    let mut a = Rig::with_device(&mem, layered_dev(&chain, false));
    let via_chain = read_all(&mut a);
    drop(a);
    let mem2 = guest_memory();
    let merged = DiskLayers::new(&base_path, dir.path("top-b")).layer(&out);
    let mut b = Rig::with_device(&mem2, layered_dev(&merged, false));
    assert_eq!(read_all(&mut b), via_chain);
    drop(b);

    // The output is never replaced; nothing to merge is an error; inputs
    // are checked like a restore checks them.
    let err = merge_layers(&inputs, &out).unwrap_err();
    assert!(matches!(err, LayerError::MergeOutputExists { .. }), "{err}");
    let err = merge_layers(&[], &dir.path("none")).unwrap_err();
    assert!(matches!(err, LayerError::MergeNothing), "{err}");
    // A leftover temporary in the way: the merge fails, and leaves it.
    std::fs::write(dir.path("blocked.merge-tmp"), b"x").unwrap();
    let err = merge_layers(&inputs, &dir.path("blocked")).unwrap_err();
    assert!(
        matches!(err, LayerError::Merge { what: "create", .. }),
        "{err}"
    );
    assert!(!dir.path("blocked").exists());
    assert_eq!(read_file(&dir.path("blocked.merge-tmp")), b"x");
    std::fs::remove_file(map_path(&l2)).unwrap();
    let err = merge_layers(&inputs, &dir.path("again")).unwrap_err();
    assert!(matches!(err, LayerError::MissingMap { .. }), "{err}");
    assert!(!dir.path("again").exists());
    assert!(!dir.path("again.merge-tmp").exists());
}

#[test]
fn a_base_with_a_partial_last_chunk() {
    let dir = Dir::new();
    // 3 chunks and 1 KiB.
    let size = 3 * CHUNK_SIZE + 1024;
    let base_path = base(&dir, size);
    let base_bytes = read_file(&base_path);
    let frozen = layer(&dir, "l1", size, 10, &[3]);
    let top = dir.path("top");
    let layers = DiskLayers::new(&base_path, &top).layer(&frozen);
    let mem = guest_memory();
    let mut rig = Rig::with_device(&mem, layered_dev(&layers, false));
    let mut cap = [0u8; 8];
    rig.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), size / 512);
    // The last sector: chunk 3 (1 KiB) is copied up from the frozen layer.
    rig.fill(DATA, &pattern(33, 512));
    let last = size / 512 - 1;
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, last, &[D::R(DATA, S)]),
        (OK, 1)
    );
    let len = u32::try_from(size).unwrap();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &[D::W(DATA2, len)]),
        (OK, len + 1)
    );
    let mut want = base_bytes.clone();
    want[3 * CHUNK..].copy_from_slice(&chunk_data(10, 3)[..1024]);
    want[3 * CHUNK + 512..].copy_from_slice(&pattern(33, 512));
    assert_eq!(rig.guest(DATA2, want.len()), want);
    // Past the end.
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, last, &[D::R(DATA, 1024)]),
        (IOERR, 1)
    );
    rig.dev.save_backend().unwrap();
    drop(rig);
    assert_eq!(std::fs::metadata(&top).unwrap().len(), size);
    assert_eq!(read_file(&top)[3 * CHUNK..], want[3 * CHUNK..]);
    // Reloaded as a frozen layer, and merged with the one below it.
    let merged = dir.path("merged");
    merge_layers(&[frozen.clone(), top.clone()], &merged).unwrap();
    for l in [
        DiskLayers::new(&base_path, dir.path("t2"))
            .layer(&frozen)
            .layer(&top),
        DiskLayers::new(&base_path, dir.path("t3")).layer(&merged),
    ] {
        let mem = guest_memory();
        let mut rig = Rig::with_device(&mem, layered_dev(&l, false));
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, 0, &[D::W(DATA2, len)]),
            (OK, len + 1)
        );
        assert_eq!(rig.guest(DATA2, want.len()), want);
    }
    assert_eq!(read_file(&base_path), base_bytes);
}
