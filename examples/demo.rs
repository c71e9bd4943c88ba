//! The dormouse demo: boots an unmodified arm64 Linux guest to a busybox
//! init, then suspends the running session to a snapshot and resumes it
//! from there, showing what the guest prints and what each step cost.
//!
//! ```text
//! cargo xtask demo                       # in the emulated arm64 host
//! cargo run --example demo -- KERNEL BUSYBOX [--vcpus N] [--interactive]
//! ```
//!
//! KERNEL is an arm64 `Image`, BUSYBOX a static aarch64 busybox; both default
//! to $DORMOUSE_GUEST_KERNEL and $DORMOUSE_GUEST_BUSYBOX. With
//! `--interactive` the guest runs a shell on the console wired to stdin
//! instead of the suspend/resume tour.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::MicroVm;

#[path = "../tests/common/initramfs.rs"]
mod initramfs;
#[path = "../tests/common/marker.rs"]
mod marker;

/// Prints the guest's facts, starts a counting process, and answers
/// `report` and `off` on the console.
const INIT: &str = r#"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /tmp
echo "@@init: hello from the guest's init"
echo "kernel:  $(uname -sr)"
echo "cpus:    $(grep -c ^processor /proc/cpuinfo)"
echo "memory:  $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2-)"
echo "clock:   $(date -u) (from the PL031 RTC)"
(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done) &
CPID=$!
echo "session: process $CPID counts in /tmp/counter"
echo "@@ready"
while read cmd; do
  case "$cmd" in
    report) echo "@@report: uptime $(cut -d' ' -f1 /proc/uptime) s, process $CPID alive: $(kill -0 $CPID && echo yes), counter $(cat /tmp/counter)";;
    off) poweroff -f;;
  esac
done
"#;

const SHELL: &str = r#"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "@@init: hello from the guest's init (interactive shell: exit or poweroff -f to stop)"
setsid cttyhack sh
poweroff -f
"#;

struct Args {
    kernel: PathBuf,
    busybox: PathBuf,
    vcpus: u32,
    interactive: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut vcpus = 2;
    let mut interactive = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--vcpus" => {
                vcpus = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--vcpus takes a number")?
            }
            "--interactive" => interactive = true,
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    let mut positional = positional.into_iter();
    let mut path = |var: &str| {
        positional
            .next()
            .or_else(|| std::env::var_os(var).map(PathBuf::from))
            .ok_or(format!("give the path as an argument or set {var}"))
    };
    Ok(Args {
        kernel: path("DORMOUSE_GUEST_KERNEL")?,
        busybox: path("DORMOUSE_GUEST_BUSYBOX")?,
        vcpus,
        interactive,
    })
}

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:9.1} ms", d.as_secs_f64() * 1000.0)
}

/// Waits until the guest printed a whole line starting with `what` (at
/// most 10 minutes) and returns the rest of it.
fn wait_for(console: &marker::MarkerClock, what: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = console.text();
        let mut lines: Vec<&str> = text.split('\n').collect();
        lines.pop(); // not finished yet
        if let Some(rest) = lines.iter().find_map(|l| l.trim_end().strip_prefix(what)) {
            return Ok(rest.trim().to_string());
        }
        if Instant::now() > deadline {
            return Err(format!("the guest never printed {what:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let busybox = std::fs::read(&args.busybox)
        .map_err(|e| format!("reading {}: {e}", args.busybox.display()))?;
    let mut fs = initramfs::Initramfs::new();
    fs.file("bin/busybox", 0o755, &busybox)
        .init_script(if args.interactive { SHELL } else { INIT });
    let work = std::env::temp_dir().join(format!("dormouse-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let initrd = fs.write_to(&work, "initrd.cpio")?;

    let console = marker::MarkerClock::echoing();
    let (guest_input, mut input) = UnixStream::pair()?;
    let mut builder = MicroVm::builder()
        .vcpus(args.vcpus)
        .memory_mib(256)
        .kernel(&args.kernel)
        .initrd(&initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
        .serial_output(console.clone());
    builder = if args.interactive {
        builder.serial_input(std::io::stdin())
    } else {
        builder.serial_input(guest_input)
    };

    println!(
        "dormouse demo: booting {} on {} vCPUs",
        args.kernel.display(),
        args.vcpus
    );
    let start = Instant::now();
    let mut vm = builder.build()?;
    let built = start.elapsed();
    vm.start()?;
    if args.interactive {
        let exit = vm.wait()?;
        println!("\nguest stopped: {exit:?}");
        return Ok(());
    }
    wait_for(&console, "@@ready")?;
    let boot = console.seen().map(|t| t - start);
    writeln!(input, "report")?;
    let before = wait_for(&console, "@@report:")?;

    // Suspend: pause, snapshot to disk, and let the VM go.
    let snap = work.join("snapshot");
    let t = Instant::now();
    vm.pause()?;
    let paused = t.elapsed();
    let info = vm.snapshot(&snap)?;
    drop(vm);
    println!("\n--- suspended to {} ---", snap.display());

    // Resume: restore from the snapshot and carry on.
    let console2 = marker::MarkerClock::echoing();
    let (guest_input, mut input) = UnixStream::pair()?;
    let t = Instant::now();
    let mut vm = MicroVm::restore(&snap)
        .serial_output(console2.clone())
        .serial_input(guest_input)
        .resume(true)
        .build()?;
    let restored = t.elapsed();
    println!("--- resumed from the snapshot ---");
    writeln!(input, "report")?;
    let after = wait_for(&console2, "@@report:")?;
    writeln!(input, "off")?;
    let exit = vm.wait()?;

    println!("\n--- dormouse ---");
    println!("guest stopped:             {exit:?}");
    println!("VMM setup (build):         {}", ms(built));
    if let Some(boot) = boot {
        println!("build() to init's output:  {}", ms(boot));
    }
    println!("pause:                     {}", ms(paused));
    println!(
        "snapshot:                  {} ({} MiB memory, {} KiB state)",
        ms(info.save_state + info.write_files),
        info.memory_bytes >> 20,
        info.state_bytes >> 10
    );
    println!("restore until running:     {}", ms(restored));
    println!("guest before suspend:      {before}");
    println!("guest after resume:        {after}");
    println!("(times under emulation are 10-100x those on arm64 hardware)");
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
