//! `cargo xtask bench pull`: pull + unpack of `kiln/debian:bookworm` from a registry on
//! 127.0.0.1, by Kiln and by its peers (`skopeo copy` to an OCI layout, then `umoci unpack`),
//! alternating in one run; prints the medians and the ratio Kiln / peers (aim: ≤ 0.70).
//!
//! The image is Kiln's own built-in Debian base (made once with mmdebstrap and cached under
//! `target/bench-pull/`), exported as an OCI layout and pushed with skopeo. Every timed run
//! starts from an empty store or directory, after a `sync` so no side pays the other's
//! write-back. Needs root (umoci unpack, device nodes), docker-registry, skopeo and umoci.

use kiln::home::Home;
use kiln::oci::Reference;
use kiln::oci::pull::{self, PullOptions};
use kiln::oci::store::Store;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Options of `cargo xtask bench pull`.
#[derive(Debug, clap::Args)]
pub struct BenchPullArgs {
    /// Timed runs of each side; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Layers Kiln downloads at once.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// Where the Debian base is made once and kept (default: target/bench-pull).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Runs the benchmark; exit 1 if it cannot run (a missing tool, a failed pull).
pub fn pull_main(args: BenchPullArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench pull: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A `docker-registry` on 127.0.0.1, killed on drop.
pub(crate) struct Registry {
    child: Child,
    pub(crate) host: String,
}

impl Registry {
    pub(crate) fn start(dir: &Path) -> Result<Registry, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let host = format!("127.0.0.1:{port}");
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let cfg = dir.join("config.yml");
        let yaml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n  secret: kiln-bench\n",
            dir.join("data").display()
        );
        std::fs::write(&cfg, yaml).map_err(|e| e.to_string())?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("docker-registry: {e}"))?;
        let r = Registry { child, host };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(&r.host) {
                let _ = s
                    .write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", r.host).as_bytes());
                let mut b = [0u8; 8];
                if s.read(&mut b).is_ok_and(|n| n > 0) {
                    return Ok(r);
                }
            }
            if Instant::now() > deadline {
                return Err("docker-registry did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn need(tool: &str, package: &str) -> Result<(), String> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        Ok(())
    } else {
        Err(format!("{tool} is missing (apt-get install {package})"))
    }
}

pub(crate) fn sh(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Removes `dir` (if there) for a fresh start: first whatever is mounted below it (a Kiln
/// home keeps snapshot mounts for sandboxes), then the tree; a failure is an error, so a run
/// never measures against a cache an earlier run left.
pub(crate) fn fresh_dir(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    kiln::build::overlay::unmount_under(dir)
        .map_err(|e| format!("unmount under {}: {e}", dir.display()))?;
    std::fs::remove_dir_all(dir).map_err(|e| format!("remove {}: {e}", dir.display()))
}

pub(crate) fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn du(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if md.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0)
    } else {
        md.len()
    }
}

fn run(args: &BenchPullArgs) -> Result<(), String> {
    for (tool, pkg) in [
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("umoci", "umoci"),
        ("mmdebstrap", "mmdebstrap"),
    ] {
        need(tool, pkg)?;
    }
    let root = args
        .dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-pull"));
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let cache = Store::open(&Home::at(root.join("home"))).map_err(|e| e.to_string())?;
    let debian = Reference::parse("kiln/debian:bookworm").map_err(|e| e.to_string())?;
    eprintln!(
        "making kiln/debian:bookworm (once; cached in {})",
        root.join("home").display()
    );
    let rec =
        pull::pull_blocking(&cache, &debian, &PullOptions::default()).map_err(|e| e.to_string())?;
    let layout = root.join("layout");
    let _ = std::fs::remove_dir_all(&layout);
    cache
        .export_layout(&rec, &layout, "bookworm")
        .map_err(|e| e.to_string())?;

    let reg = Registry::start(&root.join("registry"))?;
    let name = format!("{}/kiln/debian:bookworm", reg.host);
    sh(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:bookworm", layout.display()))
        .arg(format!("docker://{name}")))?;
    let target = Reference::parse(&name).map_err(|e| e.to_string())?;
    eprintln!(
        "image: {} layer(s), {:.1} MB compressed; registry {}",
        rec.layers.len(),
        rec.size_bytes() as f64 / 1e6,
        reg.host
    );

    let runs_dir = root.join("runs");
    let (mut kiln_t, mut peer_t, mut skopeo_t, mut umoci_t) = (vec![], vec![], vec![], vec![]);
    let mut unpacked = 0;
    let opts = PullOptions { jobs: args.jobs };
    for i in 0..args.runs.max(1) {
        for kiln_first in [i % 2 == 0, i % 2 != 0] {
            let dir = runs_dir.join(format!(
                "run{i}-{}",
                if kiln_first { "kiln" } else { "peers" }
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            sh(&mut Command::new("sync"))?;
            if kiln_first {
                let store = Store::open(&Home::at(dir.join("home"))).map_err(|e| e.to_string())?;
                let t0 = Instant::now();
                pull::pull_blocking(&store, &target, &opts).map_err(|e| e.to_string())?;
                kiln_t.push(t0.elapsed());
                let local = store
                    .local(&target)
                    .map_err(|e| e.to_string())?
                    .ok_or("pulled image is not local")?;
                unpacked = local.layer_dirs.iter().map(|d| du(d)).sum();
            } else {
                let oci = dir.join("oci");
                let t0 = Instant::now();
                sh(Command::new("skopeo")
                    .args(["copy", "--quiet", "--src-tls-verify=false"])
                    .arg(format!("docker://{name}"))
                    .arg(format!("oci:{}:bookworm", oci.display())))?;
                let t1 = Instant::now();
                sh(Command::new("umoci")
                    .args(["unpack", "--image"])
                    .arg(format!("{}:bookworm", oci.display()))
                    .arg(dir.join("bundle")))?;
                let t2 = Instant::now();
                skopeo_t.push(t1 - t0);
                umoci_t.push(t2 - t1);
                peer_t.push(t2 - t0);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let (k, p) = (median(&kiln_t), median(&peer_t));
    let ratio = k.as_secs_f64() / p.as_secs_f64();
    println!(
        "bench pull: kiln/debian:bookworm from a loopback registry, {} runs each, medians",
        kiln_t.len()
    );
    println!(
        "  kiln base pull (fetch + verify + unpack, {:.0} MB tree): {}",
        unpacked as f64 / 1e6,
        secs(k)
    );
    println!(
        "  skopeo copy + umoci unpack: {} (skopeo {}, umoci {})",
        secs(p),
        secs(median(&skopeo_t)),
        secs(median(&umoci_t))
    );
    println!(
        "  all runs: kiln {:?}, peers {:?}",
        kiln_t.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
        peer_t.iter().map(|d| secs(*d)).collect::<Vec<_>>()
    );
    println!(
        "  ratio kiln / peers: {ratio:.2} (aim <= 0.70: {})",
        if ratio <= 0.70 { "met" } else { "NOT met" }
    );
    Ok(())
}
