//! The diff-chain reader and merge: chains of one to three snapshot
//! directories whose headers, ids, parent links, page runs and memory file
//! lengths come from the input, read with `read_chain` and, when accepted,
//! merged.
//!
//! Each layer's files are rewritten in place in one directory per layer
//! slot (the reader is under test here, not `write_dir`, which the unit
//! tests cover): no directory or file is created or removed per input but
//! the merge's output, so tmpfs pages are reused rather than allocated.
//!
//! Checks: no panic; a chain is accepted only if its first layer is full
//! and each diff names the layer before it; a merged snapshot holds, for
//! every page, the bytes of the newest layer whose runs include it (the
//! base's otherwise).

#![no_main]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use dormouse::snapshot::{format, merge, read_chain, SnapshotId, VmState, MEMORY_FILE, STATE_FILE};
use dormouse_fuzz::input::Input;
use libfuzzer_sys::{fuzz_target, Corpus};

const PAGE: u64 = 4096;
const PAGES: u64 = 16;
const MEM: u64 = PAGES * PAGE;

/// The scratch directory, with one directory per layer slot (made once).
fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = dormouse_fuzz::scratch_path("chain");
        let _ = std::fs::remove_dir_all(&root);
        for i in 0..3 {
            std::fs::create_dir_all(layer_dir(&root, i)).expect("creating a layer directory");
        }
        root
    })
}

fn layer_dir(root: &std::path::Path, i: usize) -> PathBuf {
    root.join(format!("layer{i}"))
}

/// Rewrites a layer's state and memory files in place: the memory file
/// `len` bytes of `fill`.
fn write_layer(dir: &std::path::Path, state: &[u8], len: u64, fill: u8) -> std::io::Result<()> {
    std::fs::write(dir.join(STATE_FILE), state)?;
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(MEMORY_FILE))?;
    memory.set_len(len)?;
    let page = [fill; PAGE as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(PAGE);
        memory.write_all_at(&page[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

fn state(id: u8, parent: Option<u8>, runs: Option<Vec<(u64, u64)>>) -> VmState {
    VmState {
        parent: parent.map(|p| SnapshotId([p; 16])),
        diff: runs.map(|r| vec![r]),
        ..dormouse_fuzz::fixture::minimal_state(SnapshotId([id; 16]), MEM, true)
    }
}

/// One layer as the input describes it.
struct Layer {
    state: VmState,
    /// Bytes written into the memory file (its length may be short).
    file_len: u64,
    fill: u8,
    corrupt: Option<usize>,
}

fuzz_target!(|data: &[u8]| -> Corpus {
    let mut input = Input::new(data);
    let count = usize::from(input.u8() % 3) + 1;
    let mut layers = Vec::with_capacity(count);
    for i in 0..count {
        let flags = input.u8();
        let id = input.u8();
        let parent = (flags & 1 == 1).then(|| input.u8());
        let runs = (flags & 2 == 2).then(|| {
            (0..usize::from(input.u8() % 5))
                .map(|_| (u64::from(input.u8() % 20), u64::from(input.u8() % 6)))
                .collect()
        });
        let file_len = if flags & 4 == 4 {
            u64::from(input.u8()) * 512
        } else {
            MEM
        };
        let corrupt = (flags & 8 == 8).then(|| usize::from(input.u16()));
        let _ = i;
        layers.push(Layer {
            state: state(id, parent, runs),
            file_len,
            fill: input.u8(),
            corrupt,
        });
    }
    if input.is_empty() && data.is_empty() {
        return Corpus::Reject;
    }

    let root = root();
    let mut dirs = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let dir = layer_dir(root, i);
        let mut bytes = format::encode(&layer.state).expect("a state encodes");
        if let Some(at) = layer.corrupt {
            let at = at % bytes.len();
            bytes[at] ^= 0x5a;
        }
        write_layer(&dir, &bytes, layer.file_len, layer.fill).expect("writing a layer");
        dirs.push(dir);
    }

    let Ok(chain) = read_chain(&dirs) else {
        return Corpus::Keep;
    };
    // Accepted: the links must really be right.
    assert!(chain[0].state.parent.is_none() && chain[0].state.diff.is_none());
    for pair in chain.windows(2) {
        assert_eq!(pair[1].state.parent, Some(pair[0].state.id));
        assert!(pair[1].state.diff.is_some());
    }
    let out = root.join("merged");
    let _ = std::fs::remove_dir_all(&out);
    merge(&dirs, &out).expect("an accepted chain merges");
    let merged = std::fs::read(out.join(MEMORY_FILE)).expect("the merged memory file");
    assert_eq!(merged.len() as u64, MEM);
    for page in 0..PAGES {
        let expected = layers[..chain.len()]
            .iter()
            .rev()
            .find(|l| match &l.state.diff {
                None => true,
                Some(runs) => runs[0].iter().any(|&(f, n)| page >= f && page < f + n),
            })
            .map(|l| l.fill)
            .expect("the base covers every page");
        let start = usize::try_from(page * PAGE).unwrap_or(0);
        let bytes = &merged[start..start + PAGE as usize];
        assert!(
            bytes.iter().all(|&b| b == expected),
            "page {page} of the merge is wrong"
        );
    }
    Corpus::Keep
});
