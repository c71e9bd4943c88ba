//! The VM generation ID device with a real Linux guest: the kernel binds
//! its `vmgenid` driver to the device tree node, and every clone restored
//! from one snapshot gets a new ID and an interrupt, so its RNG is reseeded
//! and two clones read different bytes from /dev/urandom. The control:
//! without the device, two clones read the same bytes.
//!
//! Why the control is deterministic: Linux reseeds its CRNG on its own only
//! when the seed is older than an interval (`crng_has_old_seed`: half the
//! uptime, at least 1 s, at most 60 s). Before the snapshot, the guest
//! sleeps longer than that interval and then reads /dev/urandom, which
//! reseeds it; the snapshot follows at once, and the clones read within a
//! fraction of the interval after their restore, so no clone reseeds by
//! itself. The reading process (`od`) is started before the snapshot and
//! waits on a FIFO, so after the restore no process is created (no ASLR
//! draws) before it reads, and the kernel's timing-dependent draws are
//! turned off ([`CMDLINE`]): from the same CRNG state, the same read gives
//! the same bytes. Only the vmgenid interrupt (`add_vmfork_randomness`) makes
//! them differ.
#![cfg(target_arch = "aarch64")]

mod common;

use std::time::Duration;

use common::{guest_assets, guest_initrd, Session, TempDir};
use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::{ExitReason, MicroVm};

const MINUTE: Duration = Duration::from_secs(60);

/// The guest reports whether the driver bound and how often the vmgenid
/// interrupt fired, then waits on its console: `rand TAG` prints 32 bytes
/// of /dev/urandom as `@@TAG=<hex>`, `irqs TAG` the interrupt count.
const SCRIPT: &str = r#"
mkfifo /go
echo "@@bound=$(ls /sys/bus/platform/drivers/vmgenid/ | grep -c vmgenid)"
echo @@ready=yes
while read cmd arg; do
  case "$cmd" in
    arm)
      od -An -v -tx1 -N 33 /go /dev/urandom > /rand &
      u=$(cut -d. -f1 /proc/uptime)
      s=$((u + 3)); [ $s -lt 20 ] && s=20; [ $s -gt 62 ] && s=62
      sleep $s; head -c 1 /dev/urandom > /dev/null; echo "@@$arg=yes";;
    rand) printf x > /go; wait; echo "@@$arg=$(tr -d ' \n' < /rand)";;
    irqs) echo "@@$arg=$(awk '/vmgenid/ {print $2}' /proc/interrupts)";;
    off) poweroff -f;;
  esac
done
"#;

/// Kernel features that draw random numbers at moments the clones'
/// timing decides (each draw can refill a batch from the CRNG, which
/// changes what the next read returns): the kernel stack offset on every
/// system call, and KFENCE's sampled allocations on a timer. Off, the
/// control depends on nothing but the CRNG state.
const CMDLINE: &str = "quiet randomize_kstack_offset=off kfence.sample_interval=0";

/// Boots a guest with or without the device, checks whether its driver
/// bound, and snapshots it to `dir` right after the guest reseeded its
/// CRNG. Returns the generation ID at the snapshot.
fn boot_and_snapshot(tmp: &TempDir, vmgenid: bool) -> (std::path::PathBuf, Option<[u8; 16]>) {
    let dir = tmp.0.join("snap");
    let initrd = guest_initrd(&tmp.0, &[], SCRIPT);
    let (mut session, input) = Session::new();
    let mut vm = MicroVm::builder()
        .vmgenid(vmgenid)
        .kernel(guest_assets().kernel)
        .initrd(&initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} {CMDLINE}"))
        .serial_output(session.console.clone())
        .serial_input(input)
        .build()
        .unwrap();
    let original = vm.generation_id();
    assert_eq!(original.is_some(), vmgenid);
    vm.start().unwrap();
    session.wait_fact("ready", 10 * MINUTE);
    // The kernel found the node and bound its driver (the device's name
    // is <address>.vmgenid), or found none.
    let bound = if vmgenid { "1" } else { "0" };
    assert_eq!(session.wait_fact("bound", MINUTE), bound);
    session.send("irqs irqs");
    let irqs = if vmgenid { "0" } else { "" };
    assert_eq!(session.wait_fact("irqs", MINUTE), irqs, "no change yet");
    session.send("arm armed");
    session.wait_fact("armed", 2 * MINUTE);
    vm.pause().unwrap();
    vm.snapshot(&dir).unwrap();
    assert_eq!(vm.generation_id(), original, "a snapshot keeps the ID");
    drop(vm);
    let saved = dormouse::snapshot::read_state(&dir).unwrap();
    assert_eq!(saved.vmgenid.map(|g| g.id), original);
    (dir, original)
}

/// Restores a clone of `dir`, reads 32 random bytes in it as soon as it
/// runs, and returns them with the clone's generation ID and the number of
/// vmgenid interrupts its guest took.
fn clone_reads_random(dir: &std::path::Path) -> (String, Option<[u8; 16]>, String) {
    let (mut session, input) = Session::new();
    let mut vm = MicroVm::restore(dir)
        .serial_output(session.console.clone())
        .serial_input(input)
        .resume(true)
        .build()
        .expect("restoring a clone");
    session.send("rand random");
    let random = session.wait_fact("random", MINUTE);
    session.send("irqs irqs");
    let irqs = session.wait_fact("irqs", MINUTE);
    let id = vm.generation_id();
    session.send("off");
    assert_eq!(vm.wait().unwrap(), ExitReason::Shutdown);
    // The trigger byte ("x"), then the 32 random ones.
    assert_eq!(random.len(), 66, "{random}");
    assert!(random.starts_with("78"), "{random}");
    (random, id, irqs)
}

#[test]
fn vmgenid_clones_of_one_snapshot_get_new_ids_and_different_random_bytes() {
    let tmp = TempDir::new("vmgenid-clones");
    let (dir, original) = boot_and_snapshot(&tmp, true);
    let (random_a, id_a, irqs_a) = clone_reads_random(&dir);
    let (random_b, id_b, irqs_b) = clone_reads_random(&dir);
    // Each guest took exactly the one interrupt its restore raised.
    assert_eq!((irqs_a.as_str(), irqs_b.as_str()), ("1", "1"));
    assert_ne!(random_a, random_b, "the clones' RNGs were not reseeded");
    let (id_a, id_b) = (id_a.unwrap(), id_b.unwrap());
    assert_ne!(Some(id_a), original);
    assert_ne!(Some(id_b), original);
    assert_ne!(id_a, id_b);
}

/// The control: the same guest and steps without the device. Restores of
/// a snapshot without it work as before and add none, and the clones'
/// RNGs, never reseeded, give the same bytes: what the test above guards
/// against.
#[test]
fn vmgenid_off_clones_of_one_snapshot_read_the_same_random_bytes() {
    let tmp = TempDir::new("vmgenid-off");
    let (dir, original) = boot_and_snapshot(&tmp, false);
    assert_eq!(original, None);
    let (random_a, id_a, irqs_a) = clone_reads_random(&dir);
    let (random_b, id_b, irqs_b) = clone_reads_random(&dir);
    assert_eq!((id_a, id_b), (None, None));
    assert_eq!((irqs_a.as_str(), irqs_b.as_str()), ("", ""));
    assert_eq!(random_a, random_b, "the clones' RNGs diverged on their own");
}
