//! Shared helpers for the namespace driver tests: a busybox root tree and a step runner.
#![allow(dead_code)]

use kiln::build::cgroup::Limits;
use kiln::build::driver::{Driver, NamespaceDriver, StepOutcome, StepRequest};
use kiln::build::executor::{PreparedMount, Stream};
use kiln::ir;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Debian's `busybox-static` binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Writes a busybox root into `dir`: applets as symlinks in /bin, /etc/passwd and /etc/group
/// with root and alice (1000, also in wheel), a lower file /etc/motd and /data/keep. No /proc,
/// /dev, /sys or /etc/hosts: the driver must provide them without touching the upper layer.
pub fn busybox_root(dir: &Path) {
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .expect("busybox-static is not installed: apt-get install busybox-static");
    assert!(out.status.success(), "busybox --list failed");
    let file = Command::new("file").arg(BUSYBOX).output().ok();
    if let Some(f) = file {
        assert!(
            String::from_utf8_lossy(&f.stdout).contains("statically linked"),
            "{BUSYBOX} is not the static busybox"
        );
    }
    for d in ["bin", "etc", "tmp", "root", "home/alice", "data"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, dir.join("bin/busybox")).unwrap();
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\nwheel:x:10:alice\nalice:x:1000:\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/motd"), "hello\n").unwrap();
    std::fs::write(dir.join("data/keep"), "keep\n").unwrap();
    std::os::unix::fs::chown(dir.join("home/alice"), Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(
        dir.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
}

/// A shell-form RUN with Docker's default PATH.
pub fn shell(script: &str) -> ir::Run {
    ir::Run {
        command: ir::Command::Shell {
            shell: vec!["/bin/sh".into(), "-c".into()],
            script: script.into(),
        },
        env: vec![("PATH".into(), ir::DEFAULT_PATH.into())],
        user: None,
        workdir: "/".into(),
        network: ir::Network::Default,
        security: ir::Security::Sandbox,
        mounts: vec![],
        devices: vec![],
    }
}

/// A base layer plus a place for step layers.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub base: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("kiln-ns-test")
            .tempdir_in("/tmp")
            .unwrap();
        let base = dir.path().join("base");
        busybox_root(&base);
        Fixture { dir, base }
    }

    /// The base alone as a layer stack.
    pub fn base_stack(&self) -> &[PathBuf] {
        std::slice::from_ref(&self.base)
    }

    pub fn upper(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// What a step printed and how it ended.
pub struct Ran {
    pub outcome: StepOutcome,
    pub lines: Vec<(Stream, String)>,
}

impl Ran {
    pub fn stdout(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(s, _)| *s == Stream::Stdout)
            .map(|(_, l)| l.as_str())
            .collect()
    }
    pub fn stderr(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(s, _)| *s == Stream::Stderr)
            .map(|(_, l)| l.as_str())
            .collect()
    }
}

pub struct Opts<'a> {
    pub mounts: &'a [PreparedMount],
    pub limits: Limits,
    pub timeout: Option<Duration>,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            mounts: &[],
            limits: Limits::default(),
            timeout: Some(Duration::from_secs(120)),
        }
    }
}

pub fn try_step(
    lowers: &[PathBuf],
    upper: &Path,
    run: &ir::Run,
    opts: Opts<'_>,
) -> Result<Ran, kiln::build::driver::DriverError> {
    let mut lines = Vec::new();
    let mut sink = |s: Stream, l: &str| lines.push((s, l.to_string()));
    let outcome = NamespaceDriver.run_step(
        lowers,
        upper,
        StepRequest {
            run,
            hostname: "kiln-test",
            mounts: opts.mounts,
            resolv_conf: Some("nameserver 192.0.2.53\n"),
            limits: opts.limits,
            output: &mut sink,
            stdio: kiln::build::executor::Stdio::Capture,
            timeout: opts.timeout,
        },
    )?;
    Ok(Ran { outcome, lines })
}

pub fn step(lowers: &[PathBuf], upper: &Path, run: &ir::Run, opts: Opts<'_>) -> Ran {
    try_step(lowers, upper, run, opts).expect("step runs")
}

/// Every path under `dir`, relative, sorted.
pub fn tree(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            e.unwrap()
                .path()
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// Lines of this process's mountinfo that mention `needle`.
pub fn mounts_mentioning(needle: &Path) -> Vec<String> {
    let n = needle.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&n))
        .map(String::from)
        .collect()
}

/// Host processes whose command line is exactly `args`.
pub fn processes_with_cmdline(args: &[&str]) -> Vec<String> {
    let want: Vec<u8> = args
        .iter()
        .flat_map(|a| a.bytes().chain(std::iter::once(0)))
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Step cgroups this test process left behind in any hierarchy.
pub fn leftover_step_cgroups() -> Vec<PathBuf> {
    let prefix = format!("kiln-step-{}-", std::process::id());
    let layout = kiln::build::cgroup::Layout::host().unwrap();
    let mut v = Vec::new();
    for p in [&layout.memory, &layout.pids, &layout.cpu]
        .into_iter()
        .flatten()
    {
        for e in std::fs::read_dir(p.dir()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                v.push(e.path());
            }
        }
    }
    v
}
