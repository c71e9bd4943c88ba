//! What a session's user waits for, with a real Linux guest service built
//! from an image (tests/common/session.rs):
//!
//! - `session_launch/<size>`: `SessionRoot::launch` from an image until
//!   the guest answered its first request through a TCP endpoint;
//! - `session_request/running/<size>`: request -> first response byte on a
//!   running session (connect, send `hit`, read the answer's first byte);
//! - `session_request/suspended/<size>`: the same on a suspended session:
//!   the connection is held while the session resumes from its chain;
//! - `session_suspend/<size>`: `Session::suspend` after the guest dirtied
//!   8 MiB, until the VM is gone and the suspend committed.
//!
//! Needs an aarch64 host with KVM and the guest assets: `cargo xtask bench`
//! runs it in the emulated arm64 host (absolute times there are 10-100x
//! hardware's; compare the ratios). DORMOUSE_BENCH_SESSION_MIB lists the
//! guest sizes (default "256,1024").

// criterion's macros generate undocumented items; a bench is no public API.
#![allow(missing_docs)]

#[cfg(target_arch = "aarch64")]
#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::time::{Duration, Instant};

    use criterion::{BenchmarkId, Criterion};
    use dormouse::session::{Endpoint, Image, RootOptions, SessionConfig, SessionRoot};

    use super::common::session::{ask, service_image, SERVICE_PORT};
    use super::common::TempDir;

    fn sizes() -> Vec<u64> {
        std::env::var("DORMOUSE_BENCH_SESSION_MIB")
            .unwrap_or_else(|_| "256,1024".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    }

    /// Connect, send `hit`, and time until the first answer byte; then
    /// read the rest of the line.
    fn first_byte(endpoint: &Endpoint) -> Duration {
        let Endpoint::Tcp { addr, .. } = endpoint else {
            unreachable!("the bench uses TCP endpoints")
        };
        let start = Instant::now();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(b"hit\n").unwrap();
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).unwrap();
        let took = start.elapsed();
        let mut rest = String::new();
        BufReader::new(s).read_line(&mut rest).unwrap();
        assert!(byte[0] == b'p' && rest.starts_with("id="), "answer: {rest}");
        took
    }

    fn config() -> SessionConfig {
        SessionConfig::new().endpoint(Endpoint::loopback(0, SERVICE_PORT))
    }

    pub fn benches(c: &mut Criterion) {
        super::common::init_logging();
        let tmp = TempDir::new("bench-session");
        let root = SessionRoot::open_with(tmp.0.join("root"), RootOptions::default()).unwrap();
        let images: Vec<(u64, Image)> = sizes()
            .into_iter()
            .map(|mib| {
                let dir = tmp.0.join(format!("{mib}"));
                std::fs::create_dir_all(&dir).unwrap();
                let started = Instant::now();
                let image = service_image(&dir, mib);
                eprintln!("image of {mib} MiB created in {:?}", started.elapsed());
                (mib, image)
            })
            .collect();

        let mut launch = c.benchmark_group("session_launch");
        launch
            .sample_size(10)
            .warm_up_time(Duration::from_millis(1));
        launch.measurement_time(Duration::from_secs(5));
        for (mib, image) in &images {
            launch.bench_with_input(
                BenchmarkId::from_parameter(format!("{mib}MiB")),
                image,
                |b, image| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let start = Instant::now();
                            let s = root.launch(image, config()).unwrap();
                            let answer = ask(&s.endpoints()[0], "hit");
                            total += start.elapsed();
                            assert!(answer.starts_with("pid="), "{answer}");
                            s.terminate().unwrap();
                        }
                        total
                    })
                },
            );
        }
        launch.finish();

        let mut request = c.benchmark_group("session_request");
        request
            .sample_size(10)
            .warm_up_time(Duration::from_millis(1));
        request.measurement_time(Duration::from_secs(5));
        let mut suspend = Vec::new();
        for (mib, image) in &images {
            let s = root.launch(image, config()).unwrap();
            let endpoint = s.endpoints()[0].clone();
            request.bench_with_input(
                BenchmarkId::new("running", format!("{mib}MiB")),
                &endpoint,
                |b, e| b.iter_custom(|iters| (0..iters).map(|_| first_byte(e)).sum()),
            );
            request.bench_with_input(
                BenchmarkId::new("suspended", format!("{mib}MiB")),
                &endpoint,
                |b, e| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                s.suspend().unwrap();
                                first_byte(e)
                            })
                            .sum()
                    })
                },
            );
            suspend.push((*mib, s));
        }
        request.finish();

        let mut group = c.benchmark_group("session_suspend");
        group.sample_size(10).warm_up_time(Duration::from_millis(1));
        group.measurement_time(Duration::from_secs(5));
        for (mib, s) in &suspend {
            let endpoint = s.endpoints()[0].clone();
            group.bench_function(BenchmarkId::from_parameter(format!("{mib}MiB")), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        s.resume().unwrap();
                        assert_eq!(ask(&endpoint, "touch 8"), "touched=8");
                        let start = Instant::now();
                        s.suspend().unwrap();
                        total += start.elapsed();
                    }
                    total
                })
            });
            s.terminate().unwrap();
        }
        group.finish();
    }
}

#[cfg(target_arch = "aarch64")]
criterion::criterion_group!(benches, aarch64::benches);
#[cfg(target_arch = "aarch64")]
criterion::criterion_main!(benches);

#[cfg(not(target_arch = "aarch64"))]
fn main() {
    eprintln!("benches/session.rs measures sessions on aarch64: run it with `cargo xtask bench`");
}
