//! `cargo xtask bench build`: `kiln image create` against buildah's whole path to a root disk,
//! on examples/python-app, from the same base in a loopback registry, in one run.
//!
//! The base is Kiln's built-in `kiln/debian:bookworm` (made once with mmdebstrap, cached under
//! `target/bench-build/`), exported as an OCI layout and pushed with skopeo to a
//! `docker-registry` on 127.0.0.1; the example's `FROM` is rewritten to that registry, and both
//! tools pull it once before anything is timed. buildah uses overlay storage and chroot
//! isolation (envlab.md §5: the fastest setup that works on this host), in its own `--root`.
//!
//! - cold: `buildah bud --layers --no-cache` + `buildah from` + `buildah mount` +
//!   `mkfs.ext4 -d` into a 10 GiB sparse file (the peer's whole path to a root disk) vs
//!   `kiln image create --no-cache --disk_mb 10240` (build, ext4 snapshot, registration);
//! - no-op: the same build again: `kiln image create` vs `buildah bud --layers` alone (no
//!   export: a pipeline can see the image id did not change);
//! - changed: one context file edited (`app/greeting.py`), both rebuild to a disk;
//! - launch: `kiln sbx run --image … -- true`, p50 and p90 of `--launches`.
//!
//! The RUN step calls apt-get, so cold builds include the Debian mirror's time for both.
//! Sides alternate which goes first; the medians are printed with the ratio Kiln / buildah.
//! Needs root, docker-registry, skopeo, buildah, mmdebstrap and e2fsprogs.

use crate::bench_pull::{Registry, fresh_dir, median, need, secs, sh};
use kiln::home::Home;
use kiln::oci::Reference;
use kiln::oci::pull::{self, PullOptions};
use kiln::oci::store::Store;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// Options of `cargo xtask bench build`.
#[derive(Debug, clap::Args)]
pub struct BenchBuildArgs {
    /// Timed runs of each side for cold, no-op and changed builds; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// `sbx run` launches timed.
    #[arg(long, default_value_t = 50)]
    pub launches: u32,
    /// Where the base, both stores and the context live (default: target/bench-build).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Runs the benchmark; exit 1 if it cannot run (a missing tool, a failed build).
pub fn main(args: BenchBuildArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench build: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(".."))
        .to_path_buf()
}

/// Builds `kiln` in release mode and returns its path.
pub(crate) fn kiln_binary() -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    sh(Command::new(cargo).current_dir(repo_root()).args([
        "build",
        "--release",
        "--quiet",
        "--bin",
        "kiln",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    Ok(target.join("release/kiln"))
}

/// buildah with its own storage (overlay), configuration files and signature policy.
struct Buildah {
    dir: PathBuf,
}

impl Buildah {
    fn new(dir: &Path) -> Result<Buildah, String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        for (name, text) in [
            (
                "policy.json",
                r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
            ),
            ("registries.conf", "unqualified-search-registries = []\n"),
            (
                "storage.conf",
                "[storage]\ndriver = \"overlay\"\nrunroot = \"\"\ngraphroot = \"\"\n",
            ),
            (
                "containers.conf",
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\n",
            ),
        ] {
            std::fs::write(dir.join(name), text).map_err(|e| e.to_string())?;
        }
        Ok(Buildah {
            dir: dir.to_path_buf(),
        })
    }

    fn cmd(&self) -> Command {
        let d = &self.dir;
        let mut c = Command::new("buildah");
        c.env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("BUILDAH_ISOLATION", "chroot")
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--storage-driver", "overlay"]);
        c
    }

    /// Runs buildah and returns its trimmed stdout.
    fn out(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("buildah: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "buildah {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `bud` (`no_cache`: every step runs) and, with `disk`, the rootfs into a 10 GiB ext4
    /// file with `mkfs.ext4 -d`.
    fn build(&self, ctx: &Path, no_cache: bool, disk: Option<&Path>) -> Result<(), String> {
        let ctx = ctx.to_str().ok_or("context path is not UTF-8")?;
        let mut args = vec!["bud", "--isolation", "chroot", "--layers", "--quiet"];
        if no_cache {
            args.push("--no-cache");
        }
        args.extend(["-t", "localhost/bench-app:latest", ctx]);
        self.out(&args)?;
        let Some(disk) = disk else {
            return Ok(());
        };
        let c = self.out(&["from", "localhost/bench-app:latest"])?;
        let m = self.out(&["mount", &c])?;
        let _ = std::fs::remove_file(disk);
        sh(Command::new("truncate").arg("-s").arg("10G").arg(disk))?;
        let made = sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d", &m])
            .arg(disk));
        self.out(&["umount", &c])?;
        self.out(&["rm", &c])?;
        made
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "--all"]).output();
    }
}

/// Copies examples/python-app to `ctx`, its `FROM` pointing at `base`.
fn make_context(ctx: &Path, base: &str) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(ctx);
    sh(Command::new("cp")
        .arg("-a")
        .arg(repo_root().join("examples/python-app"))
        .arg(ctx))?;
    let df = ctx.join("Dockerfile");
    let text = std::fs::read_to_string(&df).map_err(|e| e.to_string())?;
    let text = text.replace("FROM kiln/debian:bookworm", &format!("FROM {base}"));
    if !text.contains(base) {
        return Err("examples/python-app/Dockerfile has no `FROM kiln/debian:bookworm`".into());
    }
    std::fs::write(&df, text).map_err(|e| e.to_string())
}

pub(crate) struct Kiln {
    pub(crate) bin: PathBuf,
    pub(crate) home: PathBuf,
}

impl Kiln {
    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--home")
            .arg(&self.home)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs kiln with `--json -q`; returns the JSON.
    pub(crate) fn json(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let mut all = args.to_vec();
        all.extend(["--json", "-q"]);
        let out = self.cmd(&all).output().map_err(|e| format!("kiln: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "kiln {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("kiln {}: {e}", args.join(" ")))
    }

    /// `image create` of `ctx`; returns how many steps came from the cache, of how many.
    fn build(&self, ctx: &Path, no_cache: bool) -> Result<(usize, usize), String> {
        let ctx = ctx.to_str().ok_or("context path is not UTF-8")?;
        let mut args = vec![
            "image",
            "create",
            ctx,
            "-n",
            "bench-app",
            "--disk_mb",
            "10240",
        ];
        if no_cache {
            args.push("--no-cache");
        }
        let v = self.json(&args)?;
        let steps = v["steps"].as_array().ok_or("no steps in the JSON")?;
        let cached = steps.iter().filter(|s| s["cached"] == true).count();
        Ok((cached, steps.len()))
    }
}

pub(crate) fn time<T>(f: impl FnOnce() -> Result<T, String>) -> Result<(Duration, T), String> {
    let t0 = Instant::now();
    let v = f()?;
    Ok((t0.elapsed(), v))
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn run(args: &BenchBuildArgs) -> Result<(), String> {
    for (tool, pkg) in [
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("buildah", "buildah"),
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
    ] {
        need(tool, pkg)?;
    }
    let root = args
        .dir
        .clone()
        .unwrap_or_else(|| repo_root().join("target/bench-build"));
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let bin = kiln_binary()?;

    // The base, made once, served from a loopback registry.
    let cache = Store::open(&Home::at(root.join("base-home"))).map_err(|e| e.to_string())?;
    let debian = Reference::parse("kiln/debian:bookworm").map_err(|e| e.to_string())?;
    eprintln!(
        "making kiln/debian:bookworm (once; cached in {})",
        root.display()
    );
    let rec =
        pull::pull_blocking(&cache, &debian, &PullOptions::default()).map_err(|e| e.to_string())?;
    let layout = root.join("layout");
    let _ = std::fs::remove_dir_all(&layout);
    cache
        .export_layout(&rec, &layout, "bookworm")
        .map_err(|e| e.to_string())?;
    let reg = Registry::start(&root.join("registry"))?;
    let base = format!("{}/kiln/debian:bookworm", reg.host);
    sh(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:bookworm", layout.display()))
        .arg(format!("docker://{base}")))?;
    let ctx = root.join("ctx");
    make_context(&ctx, &base)?;

    // Both pull the base before anything is timed.
    let kiln_home = root.join("kiln-home");
    // An earlier run's home still has its sandboxes' snapshot mounts: unmounted first, or
    // the removal fails and the step cache survives into this run.
    fresh_dir(&kiln_home)?;
    let kiln = Kiln {
        bin,
        home: kiln_home,
    };
    kiln.json(&["base", "pull", &base])?;
    let buildah = Buildah::new(&root.join("buildah"))?;
    buildah.out(&["pull", "--quiet", "--tls-verify=false", &base])?;
    let peer_disk = root.join("buildah-root.ext4");

    let runs = args.runs.max(1);
    let (mut cold_k, mut cold_b) = (vec![], vec![]);
    let (mut noop_k, mut noop_b) = (vec![], vec![]);
    let (mut chg_k, mut chg_b) = (vec![], vec![]);
    let mut steps = (0, 0, 0, 0);
    for i in 0..runs {
        let kiln_first = i % 2 == 0;
        eprintln!("run {}/{runs}: cold", i + 1);
        for k in [kiln_first, !kiln_first] {
            sh(&mut Command::new("sync"))?;
            if k {
                let (d, _) = time(|| kiln.build(&ctx, true))?;
                cold_k.push(d);
            } else {
                let (d, _) = time(|| buildah.build(&ctx, true, Some(&peer_disk)))?;
                cold_b.push(d);
            }
        }
        eprintln!("run {}/{runs}: no-op", i + 1);
        for k in [kiln_first, !kiln_first] {
            if k {
                let (d, (cached, total)) = time(|| kiln.build(&ctx, false))?;
                steps.0 = cached;
                steps.1 = total;
                noop_k.push(d);
            } else {
                let (d, _) = time(|| buildah.build(&ctx, false, None))?;
                noop_b.push(d);
            }
        }
        eprintln!("run {}/{runs}: one context file changed", i + 1);
        let greeting = ctx.join("app/greeting.py");
        let mut text = std::fs::read_to_string(&greeting).map_err(|e| e.to_string())?;
        text.push_str(&format!("# bench edit {i}\n"));
        std::fs::write(&greeting, text).map_err(|e| e.to_string())?;
        for k in [kiln_first, !kiln_first] {
            sh(&mut Command::new("sync"))?;
            if k {
                let (d, (cached, total)) = time(|| kiln.build(&ctx, false))?;
                steps.2 = cached;
                steps.3 = total;
                chg_k.push(d);
            } else {
                let (d, _) = time(|| buildah.build(&ctx, false, Some(&peer_disk)))?;
                chg_b.push(d);
            }
        }
    }
    let _ = std::fs::remove_file(&peer_disk);

    eprintln!("launching {} sandboxes", args.launches);
    let mut launches = Vec::new();
    for _ in 0..args.launches.max(1) {
        let mut c = kiln.cmd(&["sbx", "run", "--image", "bench-app", "--", "true"]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let t0 = Instant::now();
        let status = c.status().map_err(|e| format!("kiln sbx run: {e}"))?;
        launches.push(t0.elapsed());
        if !status.success() {
            return Err(format!("kiln sbx run -- true: {status}"));
        }
    }
    launches.sort();

    // Where the snapshot's time goes: hashing every byte of a 10 GiB disk (its sha256 is
    // the snapshot's digest), which does not depend on the tree.
    let empty = root.join("empty-tree");
    std::fs::create_dir_all(&empty).map_err(|e| e.to_string())?;
    let empty_s = empty.to_str().ok_or("path is not UTF-8")?;
    let mut floor = Vec::new();
    for mb in ["10240", "64"] {
        let (d, _) = time(|| kiln.json(&["snapshot", "import", empty_s, "--disk_mb", mb]))?;
        floor.push(d);
    }
    let p90 = launches[(launches.len() * 9 / 10).min(launches.len() - 1)];

    let row = |what: &str, k: &[Duration], b: &[Duration], aim: f64| {
        let (k, b) = (median(k), median(b));
        let ratio = k.as_secs_f64() / b.as_secs_f64();
        println!(
            "  {what:<44} kiln {:>10}  buildah {:>10}  ratio {ratio:.2} (aim <= {aim}: {})",
            secs(k),
            secs(b),
            if ratio <= aim { "met" } else { "NOT met" }
        );
    };
    println!(
        "bench build: examples/python-app FROM {base} (loopback), {runs} run(s) each, medians"
    );
    row(
        "cold (buildah: bud + mount + mkfs.ext4 -d)",
        &cold_k,
        &cold_b,
        0.7,
    );
    row("no-op rebuild (buildah: bud only)", &noop_k, &noop_b, 0.2);
    row("one context file changed (to a disk)", &chg_k, &chg_b, 0.7);
    let noop = median(&noop_k);
    println!(
        "  no-op rebuild: {} ({} of {} steps cached; aim <= 50 ms: {})",
        ms(noop),
        steps.0,
        steps.1,
        if noop <= Duration::from_millis(50) {
            "met"
        } else {
            "NOT met"
        }
    );
    println!("  changed file: {} of {} steps cached", steps.2, steps.3);
    println!(
        "  kiln snapshot import of an empty tree: {} at 10240 MiB, {} at 64 MiB (what the disk size alone costs)",
        secs(floor[0]),
        secs(floor[1])
    );
    let p50 = median(&launches);
    println!(
        "  sbx run --image bench-app -- true: p50 {} p90 {} of {} (aim p50 <= 20 ms: {})",
        ms(p50),
        ms(p90),
        launches.len(),
        if p50 <= Duration::from_millis(20) {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "  all runs: cold kiln {:?} buildah {:?}",
        cold_k.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
        cold_b.iter().map(|d| secs(*d)).collect::<Vec<_>>()
    );
    Ok(())
}
