//! A session outlives its process: a new process that opens the session
//! root resumes what the old one suspended, and a process killed in the
//! middle of a suspend leaves the session resumable from its last complete
//! snapshot, with the disk that matches it. Each "process" is a fork of
//! this test (the only test in this binary, so no other test thread is
//! forked in the middle of anything).
#![cfg(target_arch = "aarch64")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::session::{ask, pid_count, service_image, SERVICE_PORT};
use common::TempDir;
use dormouse::session::{
    test_hook_crash_during_suspend, CrashPoint, Endpoint, RootOptions, SessionConfig, SessionRoot,
    SessionState,
};

fn open_root(dir: &Path) -> SessionRoot {
    SessionRoot::open_with(
        dir,
        RootOptions {
            tick: Duration::from_millis(50),
            ..RootOptions::default()
        },
    )
    .unwrap()
}

/// Runs `body` in a forked child; returns how the child ended (its exit
/// code, or the signal that killed it, negated). A panic in the child is
/// exit code 101 and its message goes to `log`.
fn in_child(log: &Path, body: impl FnOnce()) -> i32 {
    // SAFETY: fork(2); the child only runs `body` (on this thread, the only
    // one the test harness has busy) and then _exits without unwinding
    // into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let log = log.to_path_buf();
        std::panic::set_hook(Box::new(move |info| {
            let _ = std::fs::write(&log, info.to_string());
        }));
        let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(()) => 0,
            Err(_) => 101,
        };
        // SAFETY: ends the child at once, running nothing of the parent's.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    }
}

#[test]
fn session_survives_its_process_and_a_kill_during_suspend() {
    common::init_logging();
    let tmp = TempDir::new("session-restart");
    let image = service_image(&tmp.0, 256);
    let root_dir = tmp.0.join("root");
    let sock = tmp.0.join("svc.sock");
    let endpoint = Endpoint::unix(&sock, SERVICE_PORT);
    let log = tmp.0.join("child.log");
    let check = |what: &str, got: i32, want: i32| {
        let why = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(got, want, "{what}: {why}");
    };

    // Process 1 launches, works, suspends, and dies without cleaning up.
    let code = in_child(&log, || {
        let root = open_root(&root_dir);
        let s = root
            .launch(&image, SessionConfig::new().endpoint(endpoint.clone()))
            .unwrap();
        let (pid, n) = pid_count(&ask(&endpoint, "hit"));
        assert_eq!(n, 1);
        std::fs::write(root_dir.join("../guest.pid"), pid.to_string()).unwrap();
        assert_eq!(ask(&endpoint, "put a.txt from-process-1"), "ok");
        s.suspend().unwrap();
        // SAFETY: the process ends here, as a crash would end it.
        unsafe { libc::_exit(0) };
    });
    check("process 1", code, 0);
    let pid: u32 = std::fs::read_to_string(tmp.0.join("guest.pid"))
        .unwrap()
        .parse()
        .unwrap();

    // Process 2 finds it, resumes it, and is killed in the middle of a
    // suspend, after the memory was written.
    let code = in_child(&log, || {
        let root = open_root(&root_dir);
        let sessions = root.sessions();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].state(), SessionState::Suspended);
        assert_eq!(pid_count(&ask(&endpoint, "hit")), (pid, 2));
        assert_eq!(ask(&endpoint, "get a.txt"), "text=from-process-1");
        assert_eq!(ask(&endpoint, "put b.txt lost-with-process-2"), "ok");
        test_hook_crash_during_suspend(CrashPoint::AfterMemory);
        let _ = sessions[0].suspend();
        panic!("the crash hook did not fire");
    });
    check("process 2", code, -libc::SIGKILL);

    // Process 3: the session resumes from process 1's suspend (the last
    // complete one): counter and disk as they were then. Killed again, at
    // the last step before the commit.
    let code = in_child(&log, || {
        let root = open_root(&root_dir);
        let s = &root.sessions()[0];
        assert_eq!(pid_count(&ask(&endpoint, "hit")), (pid, 2));
        assert_eq!(ask(&endpoint, "get b.txt"), "missing");
        assert_eq!(ask(&endpoint, "get a.txt"), "text=from-process-1");
        assert_eq!(ask(&endpoint, "put c.txt lost-with-process-3"), "ok");
        test_hook_crash_during_suspend(CrashPoint::BeforeCommit);
        let _ = s.suspend();
        panic!("the crash hook did not fire");
    });
    check("process 3", code, -libc::SIGKILL);

    // This process: still process 1's state, and the leftovers are gone.
    let root = open_root(&root_dir);
    let s = root.sessions().pop().expect("the session is still there");
    assert_eq!(pid_count(&ask(&endpoint, "hit")), (pid, 2));
    assert_eq!(ask(&endpoint, "get c.txt"), "missing");
    assert_eq!(ask(&endpoint, "get a.txt"), "text=from-process-1");
    let entries: Vec<String> = std::fs::read_dir(s.dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        entries.iter().filter(|n| n.starts_with('l')).count(),
        1,
        "only the committed layer is left: {entries:?}"
    );
    s.terminate().unwrap();
}
