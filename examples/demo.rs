//! The dormouse demo: sessions. It boots a small Linux guest service once
//! and snapshots it as an image, launches three sessions from the image,
//! sends each a request, lets them go idle so they suspend to disk, and
//! sends another request that resumes one: the same guest process answers
//! with its counter continued. Every step prints its latency.
//!
//! ```text
//! cargo xtask demo          # in the emulated arm64 host
//! ```
//!
//! The guest service is `examples/guest_vsock.rs serve` (one line in, one
//! line out: `hit` answers `pid=<pid> count=<n>`), on an initramfs with
//! busybox, its files on an ext4 disk. The guest assets come from the
//! environment `cargo xtask` sets up (DORMOUSE_GUEST_KERNEL,
//! DORMOUSE_GUEST_BUSYBOX, DORMOUSE_GUEST_MODULES, DORMOUSE_GUEST_VSOCK_TOOL,
//! DORMOUSE_TEST_DISK). Timings in the emulated host are 10-100x
//! hardware's.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use dormouse::session::{Endpoint, RootOptions, Session, SessionConfig, SessionRoot, SessionState};

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::session::{ask, rss, service_image, SERVICE_PORT};

const IDLE: Duration = Duration::from_secs(3);

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn timed_ask(session: &Session, request: &str) -> (String, Duration) {
    let start = Instant::now();
    let answer = ask(&session.endpoints()[0], request);
    (answer, start.elapsed())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    common::init_logging();
    let work = std::env::temp_dir().join(format!("dormouse-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    println!("dormouse demo: sessions from an image, idle suspend, resume on the next request");
    println!("(emulated arm64 host: times are 10-100x hardware's)\n");

    let start = Instant::now();
    let image = service_image(&work, 256);
    println!(
        "image   booted the guest service once and snapshotted it: {} ({})",
        ms(start.elapsed()),
        image.dir().display()
    );

    let root = SessionRoot::open_with(
        work.join("root"),
        RootOptions {
            tick: Duration::from_millis(50),
            ..RootOptions::default()
        },
    )?;
    let mut sessions = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let start = Instant::now();
        let s = root.launch(
            &image,
            SessionConfig::new()
                .endpoint(Endpoint::loopback(0, SERVICE_PORT))
                .idle_timeout(IDLE),
        )?;
        let (answer, first) = timed_ask(&s, "hit");
        println!(
            "launch  {name:5} session {} on {}: answered `{answer}` {} after the launch call",
            s.id(),
            s.endpoints()[0],
            ms(start.elapsed()),
        );
        let _ = first;
        sessions.push((name, s));
    }
    for (name, s) in &sessions {
        let (answer, took) = timed_ask(s, "hit");
        println!("request {name:5} `{answer}` in {} (running)", ms(took));
    }
    let running = rss();
    println!(
        "\nidle    no traffic for {}s: each session suspends to disk (diff on the image)...",
        IDLE.as_secs()
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    while sessions
        .iter()
        .any(|(_, s)| s.state() != SessionState::Suspended)
    {
        if Instant::now() > deadline {
            return Err("the sessions did not suspend".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, s) in &sessions {
        let info = s.info();
        println!(
            "suspend {name:5} {}; its chain: {} layer(s) on the image",
            info.last_suspend.map(ms).unwrap_or_default(),
            info.chain_len
        );
    }
    println!(
        "memory  host RSS {} MiB with 3 running, {} MiB with 3 suspended",
        running >> 20,
        rss() >> 20
    );

    let (name, bob) = &sessions[1];
    let (answer, took) = timed_ask(bob, "hit");
    let info = bob.info();
    println!(
        "\nresume  {name:5} a request to the suspended session: `{answer}` in {} \
         (restore {}, first byte {})",
        ms(took),
        info.last_resume.map(ms).unwrap_or_default(),
        info.last_resume_to_first_byte.map(ms).unwrap_or_default()
    );
    println!("        same pid, counter continued: the guest process never knew it was suspended");
    println!();
    for (name, s) in &sessions {
        let i = s.info();
        println!(
            "state   {name:5} {:9} launches {} suspends {} resumes {}",
            i.state.to_string(),
            i.launches,
            i.suspends,
            i.resumes
        );
    }
    for (_, s) in &sessions {
        s.terminate()?;
    }
    drop(root);
    std::fs::remove_dir_all(&work)?;
    println!("\ndone: sessions terminated and their files removed");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
