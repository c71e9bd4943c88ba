//! Sessions with a real Linux guest service, built from one image: idle
//! suspend and resume on the next request (20 cycles, same process, same
//! counter, same files, memory returned to the host), 8 clones at once
//! with their own disks and RNGs, lifetimes, a connection racing a
//! suspend, a reopened root, an image that waits for the guest's
//! readiness connection to end, and every bad input's own error.
#![cfg(target_arch = "aarch64")]

mod common;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::session::{
    ask, pid_count, rss, service_image, service_initrd, service_spec, SERVICE_PORT,
};
use common::TempDir;
use dormouse::session::{
    Endpoint, Image, Readiness, RootOptions, SessionConfig, SessionError, SessionRoot, SessionState,
};

const MIB: u64 = 1 << 20;

/// The tests measure the process's RSS and share one image: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    common::init_logging();
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The one image every test launches from (it is the only boot).
fn image() -> &'static Image {
    static IMAGE: OnceLock<(TempDir, Image)> = OnceLock::new();
    &IMAGE
        .get_or_init(|| {
            let dir = TempDir::new("session-image");
            let started = Instant::now();
            let image = service_image(&dir.0, 256);
            eprintln!("image created in {:?}", started.elapsed());
            (dir, image)
        })
        .1
}

fn root(dir: &std::path::Path) -> SessionRoot {
    SessionRoot::open_with(
        dir.join("root"),
        RootOptions {
            tick: Duration::from_millis(50),
            ..RootOptions::default()
        },
    )
    .unwrap()
}

fn wait_for_state(session: &dormouse::session::Session, state: SessionState, within: Duration) {
    let deadline = Instant::now() + within;
    while session.state() != state {
        assert!(
            Instant::now() < deadline,
            "session {} is {} after {within:?}, expected {state}",
            session.id(),
            session.state()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn session_idles_suspends_and_resumes_on_the_next_request() {
    let _serial = serial();
    let image = image();
    let tmp = TempDir::new("session-idle");
    let root = root(&tmp.0);
    let unix = tmp.0.join("s.sock");
    let session = root
        .launch(
            image,
            SessionConfig::new()
                .endpoint(Endpoint::loopback(0, SERVICE_PORT))
                .endpoint(Endpoint::unix(&unix, SERVICE_PORT))
                .idle_timeout(Duration::from_secs(2)),
        )
        .unwrap();
    let endpoints = session.endpoints();
    let (tcp, unix) = (&endpoints[0], &endpoints[1]);
    let (pid, count) = pid_count(&ask(tcp, "hit"));
    assert_eq!(count, 1, "a fresh clone starts its counter from the image");
    assert_eq!(ask(unix, "put before.txt written-before-suspend"), "ok");
    // Touch guest memory so that the suspend has something to give back.
    assert_eq!(ask(tcp, "touch 64"), "touched=64");
    let running_rss = rss();

    // Idle: no connection, no byte for 2 s.
    wait_for_state(&session, SessionState::Suspended, Duration::from_secs(120));
    let info = session.info();
    assert_eq!(info.suspends, 1);
    assert_eq!(
        info.chain_len, 1,
        "the first suspend is a diff on the image"
    );
    let suspended_rss = rss();
    eprintln!(
        "RSS running {} MiB, suspended {} MiB; suspend took {:?}",
        running_rss / MIB,
        suspended_rss / MIB,
        info.last_suspend
    );
    assert!(
        running_rss.saturating_sub(suspended_rss) >= 48 * MIB,
        "the host kept the guest's memory: RSS {} MiB running, {} MiB suspended",
        running_rss / MIB,
        suspended_rss / MIB
    );

    // The next request resumes it: same process, counter continued, file there.
    let (pid2, count2) = pid_count(&ask(tcp, "hit"));
    assert_eq!((pid2, count2), (pid, 2));
    assert_eq!(ask(unix, "get before.txt"), "text=written-before-suspend");
    let info = session.info();
    assert_eq!(info.state, SessionState::Running);
    assert_eq!(info.resumes, 1);
    let first_byte = info.last_resume_to_first_byte.expect("measured");
    eprintln!("request -> first byte on a suspended session: {first_byte:?}");

    // 20 more cycles, each asserting the whole state the guest holds.
    let mut expected = 2;
    for cycle in 0..20 {
        session.suspend().unwrap();
        assert_eq!(session.state(), SessionState::Suspended);
        let answer = ask(if cycle % 2 == 0 { tcp } else { unix }, "hit");
        expected += 1;
        assert_eq!(pid_count(&answer), (pid, expected), "cycle {cycle}");
        assert_eq!(ask(tcp, &format!("put c{cycle} cycle-{cycle}")), "ok");
        for earlier in 0..=cycle {
            assert_eq!(
                ask(unix, &format!("get c{earlier}")),
                format!("text=cycle-{earlier}"),
                "cycle {cycle}: the file of cycle {earlier}"
            );
        }
        assert_eq!(ask(tcp, "get before.txt"), "text=written-before-suspend");
    }
    let info = session.info();
    assert_eq!(info.suspends, 21);
    assert_eq!(info.resumes, 21);
    assert!(info.merges >= 1, "a chain of 21 suspends was never merged");
    assert!(
        info.chain_len <= dormouse::session::DEFAULT_MERGE_AFTER + 1,
        "the chain is {} layers long",
        info.chain_len
    );
    session.terminate().unwrap();
}

#[test]
fn session_eight_clones_from_one_image() {
    let _serial = serial();
    let image = image();
    let tmp = TempDir::new("session-clones");
    let root = root(&tmp.0);
    let sessions: Vec<_> = (0..8)
        .map(|_| {
            root.launch(
                image,
                SessionConfig::new().endpoint(Endpoint::loopback(0, SERVICE_PORT)),
            )
            .unwrap()
        })
        .collect();
    let endpoints: Vec<Endpoint> = sessions.iter().map(|s| s.endpoints()[0].clone()).collect();
    // All running at once, each with its own counter and disk.
    for (i, e) in endpoints.iter().enumerate() {
        for n in 1..=i as u64 + 1 {
            assert_eq!(pid_count(&ask(e, "hit")).1, n, "session {i}");
        }
        assert_eq!(ask(e, &format!("put mine.txt session-{i}")), "ok");
    }
    let mut randoms = Vec::new();
    for (i, e) in endpoints.iter().enumerate() {
        assert_eq!(pid_count(&ask(e, "hit")).1, i as u64 + 2, "session {i}");
        assert_eq!(ask(e, "get mine.txt"), format!("text=session-{i}"));
        randoms.push(ask(e, "random 32"));
    }
    for s in &sessions {
        assert_eq!(s.state(), SessionState::Running);
    }
    let distinct: std::collections::HashSet<_> = randoms.iter().collect();
    assert_eq!(
        distinct.len(),
        randoms.len(),
        "clones of one image produced the same /dev/urandom bytes: {randoms:?}"
    );
    // A ninth clone sees the image's disk, none of the others' files.
    let fresh = root
        .launch(
            image,
            SessionConfig::new().endpoint(Endpoint::loopback(0, SERVICE_PORT)),
        )
        .unwrap();
    assert_eq!(ask(&fresh.endpoints()[0], "get mine.txt"), "missing");
    for s in sessions.iter().chain([&fresh]) {
        s.terminate().unwrap();
    }
}

#[test]
fn session_past_its_lifetime_is_terminated_and_removed() {
    let _serial = serial();
    let image = image();
    let tmp = TempDir::new("session-lifetime");
    let root = root(&tmp.0);
    let sock = tmp.0.join("life.sock");
    let session = root
        .launch(
            image,
            SessionConfig::new()
                .endpoint(Endpoint::unix(&sock, SERVICE_PORT))
                .max_lifetime(Duration::from_secs(3)),
        )
        .unwrap();
    let dir = session.dir().to_path_buf();
    assert!(dir.is_dir());
    wait_for_state(&session, SessionState::Terminated, Duration::from_secs(60));
    assert!(
        !dir.exists(),
        "the terminated session's files are still there"
    );
    assert!(!sock.exists(), "its endpoint still listens");
    assert!(root.get(session.id()).is_none());
    assert!(matches!(session.resume(), Err(SessionError::Terminated(_))));
}

#[test]
fn session_connection_racing_a_suspend_is_served() {
    let _serial = serial();
    let image = image();
    let tmp = TempDir::new("session-race");
    let root = root(&tmp.0);
    let session = root
        .launch(
            image,
            SessionConfig::new().endpoint(Endpoint::loopback(0, SERVICE_PORT)),
        )
        .unwrap();
    let endpoint = session.endpoints()[0].clone();
    let (pid, _) = pid_count(&ask(&endpoint, "hit"));
    for round in 0..3u64 {
        let s = session.clone();
        let suspender = std::thread::spawn(move || s.suspend());
        // Lands while the suspend runs (or right after): either way it is
        // held, then served by the resumed session.
        std::thread::sleep(Duration::from_millis(5 + 20 * round));
        let answer = ask(&endpoint, "hit");
        suspender.join().unwrap().unwrap();
        assert_eq!(pid_count(&answer), (pid, round + 2), "round {round}");
    }
    assert_eq!(session.state(), SessionState::Running);
    assert!(session.info().suspends >= 3);
    session.terminate().unwrap();
}

#[test]
fn session_root_reopened_resumes_its_sessions() {
    let _serial = serial();
    let image = image();
    let tmp = TempDir::new("session-reopen");
    let sock = tmp.0.join("re.sock");
    let (id, pid) = {
        let root = root(&tmp.0);
        // A second open of a root in use is refused, naming the holder.
        match SessionRoot::open(tmp.0.join("root")) {
            Err(SessionError::RootLocked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected RootLocked, got {other:?}"),
        }
        let s = root
            .launch(
                image,
                SessionConfig::new().endpoint(Endpoint::unix(&sock, SERVICE_PORT)),
            )
            .unwrap();
        let e = s.endpoints()[0].clone();
        let (pid, _) = pid_count(&ask(&e, "hit"));
        assert_eq!(ask(&e, "put kept.txt across-reopen"), "ok");
        (s.id().to_owned(), pid)
        // Dropping the root suspends the running session.
    };
    let root = root(&tmp.0);
    let session = root.get(&id).expect("the reopened root finds the session");
    assert_eq!(session.state(), SessionState::Suspended);
    let e = Endpoint::unix(&sock, SERVICE_PORT);
    assert_eq!(pid_count(&ask(&e, "hit")), (pid, 2));
    assert_eq!(ask(&e, "get kept.txt"), "text=across-reopen");
    session.terminate().unwrap();
}

/// An image is taken only once the guest is done with its readiness
/// connection. Here the listening service holds it for 3 s before it
/// writes and closes, and exits if that write fails: an image taken at the
/// connection (the host end is not in the image, so every restore resets
/// it) would give sessions whose service is gone.
#[test]
fn session_image_waits_until_the_guest_is_done_with_its_readiness_connection() {
    let _serial = serial();
    let tmp = TempDir::new("session-ready-hold");
    let script = "mount -t ext4 /dev/vda /mnt || echo '@@mount failed'\n\
                  guest_vsock serve 5000 /mnt 1025 3000 &\n\
                  while true; do sleep 3600; done\n";
    let spec = service_spec(&tmp.0, 128).initrd(service_initrd(&tmp.0, script));
    let image = Image::create(tmp.0.join("image"), &spec).expect("creating the image");
    let root = root(&tmp.0);
    let session = root
        .launch(
            &image,
            SessionConfig::new().endpoint(Endpoint::loopback(0, SERVICE_PORT)),
        )
        .unwrap();
    let endpoint = session.endpoints()[0].clone();
    assert_eq!(pid_count(&ask(&endpoint, "hit")).1, 1);
    assert_eq!(pid_count(&ask(&endpoint, "hit")).1, 2);
    session.terminate().unwrap();
}

#[test]
fn session_bad_inputs_get_their_own_errors() {
    let _serial = serial();
    let image = image();
    let tmp = TempDir::new("session-bad");
    let root = root(&tmp.0);

    // An endpoint already in use: refused, nothing left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let before = std::fs::read_dir(tmp.0.join("root/sessions"))
        .unwrap()
        .count();
    match root.launch(
        image,
        SessionConfig::new().endpoint(Endpoint::tcp(taken.local_addr().unwrap(), SERVICE_PORT)),
    ) {
        Err(SessionError::EndpointInUse { .. }) => {}
        other => panic!("expected EndpointInUse, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_dir(tmp.0.join("root/sessions"))
            .unwrap()
            .count(),
        before
    );

    // A copy of the image whose disk goes missing.
    let copy = tmp.0.join("image-copy");
    copy_dir(image.dir(), &copy);
    let opened = Image::open(&copy).unwrap();
    std::fs::remove_file(copy.join("disk0.img")).unwrap();
    assert!(matches!(
        Image::open(&copy),
        Err(SessionError::ImageDiskMissing { index: 0, .. })
    ));
    match root.launch(&opened, SessionConfig::new()) {
        Err(SessionError::ImageDiskMissing { index: 0, .. }) => {}
        other => panic!("expected ImageDiskMissing, got {other:?}"),
    }
    // Missing and corrupt parts of an image.
    std::fs::remove_dir_all(copy.join("snapshot")).unwrap();
    std::fs::copy(image.dir().join("disk0.img"), copy.join("disk0.img")).unwrap();
    assert!(matches!(
        Image::open(&copy),
        Err(SessionError::ImageIncomplete { .. })
    ));
    std::fs::write(copy.join("image.json"), b"{ not json").unwrap();
    assert!(matches!(
        Image::open(&copy),
        Err(SessionError::ImageCorrupt { .. })
    ));

    // A guest that never becomes ready: the error carries its console.
    let spec = service_spec(&tmp.0, 128)
        .readiness(Readiness::ConsoleLine("a line no guest prints".into()))
        .ready_timeout(Duration::from_secs(30));
    match Image::create(tmp.0.join("never"), &spec) {
        Err(SessionError::ReadinessTimeout { console, .. }) => {
            assert!(
                console.contains("@@serving"),
                "no guest console in the error: {console}"
            )
        }
        other => panic!("expected ReadinessTimeout, got {other:?}"),
    }
    assert!(!tmp.0.join("never").exists());
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target: PathBuf = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            let mut perm = std::fs::metadata(&target).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o600);
            std::fs::set_permissions(&target, perm).unwrap();
        }
    }
}

#[test]
fn session_threads_run_under_their_seccomp_filter() {
    let tmp = TempDir::new("session-seccomp");
    let root = root(&tmp.0);
    assert!(root.seccomp_violation().is_none());
    // The manager thread makes a call the session deny list forbids.
    root.inject_forbidden_syscall();
    let deadline = Instant::now() + Duration::from_secs(30);
    let errno = loop {
        if let Some(errno) = root.injected_syscall_errno() {
            break errno;
        }
        assert!(Instant::now() < deadline, "the manager never made the call");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(errno, libc::EPERM);
    let violation = root.seccomp_violation().expect("recorded");
    assert_eq!(violation.thread, dormouse::seccomp::ThreadKind::Session);
    assert_eq!(violation.syscall_name(), Some("unshare"));
}
