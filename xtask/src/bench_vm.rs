//! `cargo xtask bench vm`: the microVM's costs, in one run, printing the accelerator used.
//!
//! - boot to agent: QEMU start to the agent's hello, p50 of `--boots` (a VM with only the
//!   scratch disk, powered off at once);
//! - build: `kiln image create examples/hello --no-cache` with `--builder microvm` against
//!   `--builder namespace`, medians of `--runs`;
//! - sandbox: `kiln sbx run --runtime microvm --image hello -- true` against the namespace
//!   runtime, p50 of `--launches`.
//!
//! Needs root, qemu-system-x86 and qemu-utils, and Debian's cloud kernel (or
//! `KILN_VM_KERNEL`); builds `kiln` (release) and the static agent first.

use crate::bench_build::{Kiln, kiln_binary, ms, repo_root, time};
use crate::bench_pull::{fresh_dir, median, need, secs};
use kiln::build::driver::microvm::{MicrovmDriver, MicrovmOptions};
use kiln::home::Home;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Options of `cargo xtask bench vm`.
#[derive(Debug, clap::Args)]
pub struct BenchVmArgs {
    /// Boots timed for boot-to-agent.
    #[arg(long, default_value_t = 10)]
    pub boots: u32,
    /// Builds of examples/hello on each builder.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// `sbx run` launches on each runtime.
    #[arg(long, default_value_t = 10)]
    pub launches: u32,
    /// Where the homes live (default: target/bench-vm).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Runs the benchmark; exit 1 if it cannot run.
pub fn main(args: BenchVmArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench vm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &BenchVmArgs) -> Result<(), String> {
    need("qemu-system-x86_64", "qemu-system-x86")?;
    need("qemu-img", "qemu-utils")?;
    let root = args
        .dir
        .clone()
        .unwrap_or_else(|| repo_root().join("target/bench-vm"));
    fresh_dir(&root)?;
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let bin = kiln_binary()?;
    let agent = crate::agent::build()?;
    // SAFETY: set before any thread is started; the driver and the kiln children read it.
    unsafe { std::env::set_var(kiln::envvars::KILN_AGENT, &agent) };

    let home = Home::at(root.join("home"));
    let opts = MicrovmOptions {
        cpus: 1,
        memory_mb: 512,
        scratch_mb: 256,
        ..MicrovmOptions::default()
    };
    let vm = MicrovmDriver::new(&home, opts).map_err(|e| e.to_string())?;
    let (accel, why) = vm.accel();
    let accel = accel.as_str().to_string();
    eprintln!(
        "accelerator: {accel} ({why}); kernel {}",
        vm.kernel().release
    );
    let mut boots = Vec::new();
    let mut guest_ms = Vec::new();
    for i in 0..args.boots.max(1) {
        eprintln!("boot {}/{}", i + 1, args.boots.max(1));
        let (took, hello) = vm.boot_probe().map_err(|e| e.to_string())?;
        boots.push(took);
        guest_ms.push(Duration::from_millis(hello.uptime_ms));
    }

    let kiln = Kiln {
        bin,
        home: home.root().to_path_buf(),
    };
    let hello = repo_root().join("examples/hello");
    let hello = hello.to_str().ok_or("path is not UTF-8")?;
    let build = |builder: &str| {
        kiln.json(&[
            "image",
            "create",
            hello,
            "-n",
            "hello",
            "--no-cache",
            "--builder",
            builder,
            "--cpus",
            "1",
            "--memory",
            "512",
            "--disk_mb",
            "64",
            "--builder_disk_mb",
            "256",
        ])
    };
    // The base is made once, outside the timings.
    build("namespace")?;
    let (mut b_vm, mut b_ns) = (vec![], vec![]);
    for i in 0..args.runs.max(1) {
        eprintln!("build {}/{}", i + 1, args.runs.max(1));
        let vm_first = i % 2 == 0;
        for v in [vm_first, !vm_first] {
            if v {
                b_vm.push(time(|| build("microvm"))?.0);
            } else {
                b_ns.push(time(|| build("namespace"))?.0);
            }
        }
    }

    let launch = |runtime: &str| -> Result<Duration, String> {
        let mut c = kiln.cmd(&[
            "sbx",
            "run",
            "--runtime",
            runtime,
            "--image",
            "hello",
            "--",
            "true",
        ]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let t0 = Instant::now();
        let status = c.status().map_err(|e| format!("kiln sbx run: {e}"))?;
        if !status.success() {
            return Err(format!(
                "kiln sbx run --runtime {runtime} -- true: {status}"
            ));
        }
        Ok(t0.elapsed())
    };
    // Not interleaved: right after a VM's teardown a namespace launch measures the host
    // settling (about 40 ms instead of 15).
    let (mut l_vm, mut l_ns) = (vec![], vec![]);
    for i in 0..args.launches.max(1) {
        eprintln!("launch {}/{}", i + 1, args.launches.max(1));
        l_vm.push(launch("microvm")?);
    }
    for _ in 0..args.launches.max(1) {
        l_ns.push(launch("namespace")?);
    }

    let boot = median(&boots);
    println!("bench vm: accelerator {accel} ({why})");
    println!(
        "  boot to agent: p50 {} of {} (guest uptime at hello p50 {}; aim on TCG <= 1.50 s: {})",
        secs(boot),
        boots.len(),
        secs(median(&guest_ms)),
        if boot <= Duration::from_millis(1500) {
            "met"
        } else {
            "NOT met"
        }
    );
    let (v, n) = (median(&b_vm), median(&b_ns));
    println!(
        "  examples/hello --no-cache: microvm {}  namespace {}  ratio {:.2}",
        secs(v),
        secs(n),
        v.as_secs_f64() / n.as_secs_f64()
    );
    let (v, n) = (median(&l_vm), median(&l_ns));
    println!(
        "  sbx run -- true: microvm p50 {}  namespace p50 {}  ratio {:.1}",
        ms(v),
        ms(n),
        v.as_secs_f64() / n.as_secs_f64()
    );
    Ok(())
}
