//! `cargo xtask bench snapshot`: making a Kiln snapshot (scan the tree, write the ext4 image
//! with mkext4, sha256 the whole disk, fsync) against plain `mkfs.ext4 -d` of the same tree into
//! a disk of the same size, on (a) a Debian minbase tree and (b) 50,000 small files in a few
//! directories. Prints wall times (best of `--runs`), MB/s of tree data and the ratio
//! `mkfs.ext4 -d` time / Kiln time (≥ 1.0 means Kiln is at least as fast), for the whole snapshot
//! and for writing the disk alone (without the sha256). Every Kiln image is
//! checked with `e2fsck -fn`, and the runs of one tree must give one sha256.
//!
//! Needs root for mmdebstrap (unless `--minbase DIR` names an existing tree), and e2fsprogs.

use clap::Args;
use kiln::snapshot::{Tree, WriteOptions, ext4};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// Options of `cargo xtask bench snapshot`.
#[derive(Debug, Args)]
pub struct BenchSnapshotArgs {
    /// An existing minbase tree (default: make one with mmdebstrap in the work dir).
    #[arg(long, value_name = "DIR")]
    pub minbase: Option<PathBuf>,
    /// Size of every disk, in MiB (Kiln's default root disk).
    #[arg(long = "disk-mb", default_value_t = 10240)]
    pub disk_mb: u64,
    /// Number of small files in tree (b).
    #[arg(long, default_value_t = 50_000)]
    pub files: usize,
    /// Number of directories they are spread over.
    #[arg(long, default_value_t = 5)]
    pub dirs: usize,
    /// Runs per tool and tree; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Work directory (default: a temp dir under /var/tmp, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
}

/// Runs the benchmark.
pub fn main(args: BenchSnapshotArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench snapshot: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, String>;

fn run(args: &BenchSnapshotArgs) -> Result<()> {
    let tmp;
    let work = match &args.work {
        Some(w) => {
            std::fs::create_dir_all(w).map_err(|e| format!("{}: {e}", w.display()))?;
            w.clone()
        }
        None => {
            tmp = tempfile_dir()?;
            tmp.clone()
        }
    };
    let minbase = match &args.minbase {
        Some(m) => m.clone(),
        None => make_minbase(&work.join("minbase"))?,
    };
    let small = work.join("small-files");
    if !small.exists() {
        make_small_files(&small, args.files, args.dirs)?;
    }
    println!(
        "disk {} MiB, best of {} runs; Kiln = scan + mkext4 write + sha256 of the whole disk + fsync",
        args.disk_mb, args.runs
    );
    println!(
        "{:<24} {:>9} {:>10} {:>9} {:>10} {:>9} {:>7}",
        "tree", "entries", "data MB", "kiln s", "kiln MB/s", "mkfs s", "ratio"
    );
    let mut ok = true;
    for (label, tree) in [
        ("(a) debian minbase", &minbase),
        ("(b) 50k small files", &small),
    ] {
        let r = bench_tree(tree, args, &work)?;
        let mb = r.data_bytes as f64 / 1e6;
        let ratio = r.mkfs.as_secs_f64() / r.kiln.as_secs_f64();
        println!(
            "{:<24} {:>9} {:>10.1} {:>9.2} {:>10.1} {:>9.2} {:>6.2}x",
            label,
            r.entries,
            mb,
            r.kiln.as_secs_f64(),
            mb / r.kiln.as_secs_f64(),
            r.mkfs.as_secs_f64(),
            ratio
        );
        println!(
            "{:<24} write alone (same image, no sha256): {:.2} s ({:.2} s of it scanning) = {:.1} MB/s, {:.2}x mkfs.ext4 -d ({:.1} MB/s); sha256 of the {} MiB disk: {:.2} s; sha256 {}",
            "",
            r.fill.as_secs_f64(),
            r.scan.as_secs_f64(),
            mb / r.fill.as_secs_f64(),
            r.mkfs.as_secs_f64() / r.fill.as_secs_f64(),
            mb / r.mkfs.as_secs_f64(),
            args.disk_mb,
            r.kiln.saturating_sub(r.fill).as_secs_f64(),
            &r.sha256[..16]
        );
        match loop_copy(tree, args.disk_mb, &work)? {
            Some(d) => println!(
                "{:<24} mkfs.ext4 + loop mount + tar copy (once; not reproducible): {:.2} s = {:.1} MB/s",
                "",
                d.as_secs_f64(),
                mb / d.as_secs_f64()
            ),
            None => println!("{:<24} (loop mount + copy skipped: needs root)", ""),
        }
        ok &= ratio >= 1.0;
    }
    if args.work.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    if !ok {
        println!("note: Kiln was slower than mkfs.ext4 -d on at least one tree");
    }
    Ok(())
}

struct Figures {
    entries: usize,
    data_bytes: u64,
    kiln: Duration,
    fill: Duration,
    scan: Duration,
    mkfs: Duration,
    sha256: String,
}

fn bench_tree(tree: &Path, args: &BenchSnapshotArgs, work: &Path) -> Result<Figures> {
    let out = work.join("kiln.ext4");
    let mkfs_out = work.join("mkfs.ext4");
    let mut best: Option<Figures> = None;
    let mut sha: Option<String> = None;
    for _ in 0..args.runs.max(1) {
        // mkfs.ext4 -d, plain defaults, same size.
        let _ = std::fs::remove_file(&mkfs_out);
        let t = Instant::now();
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(tree)
            .arg(&mkfs_out)
            .arg(format!("{}M", args.disk_mb))
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("mkfs.ext4: {e} (apt-get install e2fsprogs)"))?;
        let mkfs = t.elapsed();
        if !st.success() {
            return Err(format!("mkfs.ext4 -d {} failed", tree.display()));
        }
        let _ = std::fs::remove_file(&mkfs_out);

        // Kiln: the same work `kiln snapshot import` does to the disk.
        let _ = std::fs::remove_file(&out);
        let t = Instant::now();
        let scanned = Tree::scan(tree).map_err(|e| e.to_string())?;
        let scan = t.elapsed();
        let opts = WriteOptions {
            disk_mb: args.disk_mb,
            epoch: None,
        };
        let info = ext4::write(&scanned, opts, &out).map_err(|e| e.to_string())?;
        let kiln = t.elapsed();
        fsck(&out)?;
        // The same image without the sha256: what filling the disk costs on its own.
        let _ = std::fs::remove_file(&out);
        let t = Instant::now();
        let rescanned = Tree::scan(tree).map_err(|e| e.to_string())?;
        ext4::write_without_digest(&rescanned, opts, &out).map_err(|e| e.to_string())?;
        let fill = t.elapsed();
        match &sha {
            Some(s) if *s != info.sha256 => {
                return Err(format!("{}: two runs gave two sha256s", tree.display()));
            }
            Some(_) => {}
            None => sha = Some(info.sha256.clone()),
        }
        let _ = std::fs::remove_file(&out);
        let f = Figures {
            entries: scanned.entry_count(),
            data_bytes: scanned.data_bytes(),
            kiln,
            fill,
            scan,
            mkfs,
            sha256: info.sha256,
        };
        best = Some(match best {
            None => f,
            Some(b) => Figures {
                kiln: b.kiln.min(f.kiln),
                fill: b.fill.min(f.fill),
                scan: b.scan.min(f.scan),
                mkfs: b.mkfs.min(f.mkfs),
                ..f
            },
        });
    }
    best.ok_or_else(|| "no runs".into())
}

/// The other way envlab.md measured: `mkfs.ext4` of an empty disk, a loop mount and a
/// `tar | tar` copy, then umount and fsync. Linear in directory size, but it needs root and a
/// loop device, drops sockets, and cannot be reproducible (the kernel stamps every ctime with
/// the wall clock), so Kiln does not use it. `None` when not root.
fn loop_copy(tree: &Path, disk_mb: u64, work: &Path) -> Result<Option<Duration>> {
    if !is_root() {
        return Ok(None);
    }
    let img = work.join("loop.ext4");
    let mnt = work.join("loop-mnt");
    std::fs::create_dir_all(&mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
    let _ = std::fs::remove_file(&img);
    let run = |c: &mut Command, what: &str| -> Result<()> {
        let st = c
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("{what}: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("{what} failed"))
        }
    };
    let t = Instant::now();
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .arg(format!("{disk_mb}M")),
        "mkfs.ext4",
    )?;
    run(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt),
        "mount -o loop",
    )?;
    let copy = format!(
        "tar -C '{}' --xattrs --xattrs-include='*' --numeric-owner -cf - . 2>/dev/null | \
         tar -C '{}' --xattrs --xattrs-include='*' --numeric-owner -xpf -",
        tree.display(),
        mnt.display()
    );
    let copied = run(Command::new("sh").args(["-c", &copy]), "tar | tar");
    run(Command::new("umount").arg(&mnt), "umount")?;
    copied?;
    std::fs::File::open(&img)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("fsync {}: {e}", img.display()))?;
    let took = t.elapsed();
    let _ = std::fs::remove_file(&img);
    Ok(Some(took))
}

fn is_root() -> bool {
    // /proc/self/status "Uid:" real, effective, …: no libc dependency needed here.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn fsck(disk: &Path) -> Result<()> {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(disk)
        .output()
        .map_err(|e| format!("e2fsck: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "e2fsck -fn {} failed:\n{}",
            disk.display(),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let base = Path::new("/var/tmp");
    let dir = base.join(format!("kiln-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn make_minbase(dir: &Path) -> Result<PathBuf> {
    if dir.join("etc/os-release").exists() {
        return Ok(dir.to_path_buf());
    }
    let out = Command::new("apt-config")
        .args(["shell", "D", "Dir::Etc::sourceparts/d"])
        .output()
        .map_err(|e| format!("apt-config: {e}"))?;
    let s = String::from_utf8_lossy(&out.stdout);
    let parts = s
        .split('\'')
        .nth(1)
        .unwrap_or("/etc/apt/sources.list.d/")
        .to_string();
    let sources = Path::new(&parts).join("debian.sources");
    eprintln!("making a Debian minbase tree with mmdebstrap (needs the package mirror)…");
    let st = Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--variant=minbase",
            "--customize-hook=rm -f \"$1\"/etc/resolv.conf \"$1\"/etc/hostname",
            "bookworm",
        ])
        .arg(dir)
        .arg(&sources)
        .status()
        .map_err(|e| format!("mmdebstrap: {e} (apt-get install mmdebstrap)"))?;
    if !st.success() {
        return Err("mmdebstrap failed".into());
    }
    Ok(dir.to_path_buf())
}

/// `files` files of 1–4 KiB over `dirs` directories, deterministic contents.
fn make_small_files(root: &Path, files: usize, dirs: usize) -> Result<()> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut buf = vec![0u8; 4096];
    for d in 0..dirs.max(1) {
        let dir = root.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for i in 0..files {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1024 + (x % 3072) as usize;
        for (j, b) in buf[..len].iter_mut().enumerate() {
            *b = (x >> (j % 56)) as u8;
        }
        let p = root
            .join(format!("d{}", i % dirs.max(1)))
            .join(format!("file-{i:06}.txt"));
        std::fs::write(&p, &buf[..len]).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}
