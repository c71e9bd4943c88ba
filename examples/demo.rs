//! The dormouse demo: boots an unmodified arm64 Linux guest to a busybox
//! init, shows what it prints, and how long the VMM's setup and the boot took.
//!
//! ```text
//! cargo xtask demo                       # in the emulated arm64 host
//! cargo run --example demo -- KERNEL BUSYBOX [--vcpus N] [--interactive]
//! ```
//!
//! KERNEL is an arm64 `Image`, BUSYBOX a static aarch64 busybox; both default
//! to $DORMOUSE_GUEST_KERNEL and $DORMOUSE_GUEST_BUSYBOX. With
//! `--interactive` the guest runs a shell on the console wired to stdin.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use dormouse::builder::DEFAULT_CMDLINE;
use dormouse::MicroVm;

#[path = "../tests/common/initramfs.rs"]
mod initramfs;
#[path = "../tests/common/marker.rs"]
mod marker;

const INIT: &str = r#"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "@@init: hello from the guest's init"
echo "kernel:  $(uname -sr)"
echo "cpus:    $(grep -c ^processor /proc/cpuinfo)"
echo "memory:  $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2-)"
echo "clock:   $(date -u) (from the PL031 RTC)"
echo "uptime:  $(cut -d' ' -f1 /proc/uptime) s"
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

fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let busybox = std::fs::read(&args.busybox)
        .map_err(|e| format!("reading {}: {e}", args.busybox.display()))?;
    let tail = if args.interactive {
        "echo '(interactive shell: exit or poweroff -f to stop)'\nsetsid cttyhack sh\npoweroff -f\n"
    } else {
        "poweroff -f\n"
    };
    let mut fs = initramfs::Initramfs::new();
    fs.file("bin/busybox", 0o755, &busybox)
        .init_script(&format!("{INIT}{tail}"));
    let initrd = fs.write_to(&std::env::temp_dir(), "dormouse-demo-initrd.cpio")?;

    let console = marker::MarkerClock::echoing();
    let mut builder = MicroVm::builder()
        .vcpus(args.vcpus)
        .memory_mib(256)
        .kernel(&args.kernel)
        .initrd(&initrd)
        .cmdline(format!("{DEFAULT_CMDLINE} quiet"))
        .serial_output(console.clone());
    if args.interactive {
        builder = builder.serial_input(std::io::stdin());
    }

    println!(
        "dormouse demo: booting {} on {} vCPUs",
        args.kernel.display(),
        args.vcpus
    );
    let start = Instant::now();
    let mut vm = builder.build()?;
    let built = Instant::now();
    let exit = vm.run()?;
    let end = Instant::now();

    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!("\n--- dormouse ---");
    println!("guest stopped:            {exit:?}");
    println!("VMM setup (build):        {:9.1} ms", ms(built - start));
    if let Some(first) = console.seen() {
        println!("build() to init's output: {:9.1} ms", ms(first - start));
    }
    println!("total run:                {:9.1} ms", ms(end - built));
    println!("(times under emulation are 10-100x those on arm64 hardware)");
    Ok(())
}
