//! Resource limits for one build step (`--memory`, `--cpus`, a pids limit) through cgroups.
//!
//! Owns finding where each controller lives (cgroup v2 when the controller is enabled there,
//! else its v1 hierarchy: hybrid hosts have v1 `memory`, `pids`, `cpu` and a v2 tree with
//! only `hugetlb`), creating one child cgroup per step *under Kiln's own cgroup* (read from
//! `/proc/self/cgroup`, since Kiln may itself run inside a limited cgroup), moving the step's
//! first process in, and removing the child afterwards. It does not start processes.
//!
//! Every function takes the cgroup mount root as a `&Path`, so tests run against a tempdir.
//! A step cgroup whose processes were killed by SIGKILL of Kiln stays behind (named
//! `kiln-step-PID-N`); `kiln gc` removes empty ones.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The host's cgroup mount root.
pub const HOST_ROOT: &str = "/sys/fs/cgroup";

/// What went wrong setting up limits.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A limit was asked for but its controller is not available to Kiln.
    #[error(
        "cannot apply a {controller} limit: no usable {controller} cgroup controller (see `kiln doctor`)"
    )]
    Unavailable {
        /// `memory`, `pids` or `cpu`.
        controller: &'static str,
    },
    /// A limit value is out of range.
    #[error("invalid {what} limit {value}")]
    InvalidLimit {
        /// Which limit.
        what: &'static str,
        /// The value as given.
        value: String,
    },
    /// `/proc/self/cgroup` could not be read.
    #[error("cannot read /proc/self/cgroup")]
    SelfCgroup(#[source] io::Error),
    /// Creating the step's cgroup failed.
    #[error("cannot create cgroup {path}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing a control file failed.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The control file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Removing the step's cgroup failed.
    #[error("cannot remove cgroup {path}")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Limits for one step. `None` is "no limit".
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// `--memory`, in bytes (also the memory+swap limit, so a step cannot swap past it).
    pub memory_bytes: Option<u64>,
    /// `--cpus`, as a fraction of CPUs (1.5 = one and a half).
    pub cpus: Option<f64>,
    /// The maximum number of tasks.
    pub pids: Option<u64>,
}

impl Limits {
    /// True when no limit is set.
    pub fn is_empty(&self) -> bool {
        self.memory_bytes.is_none() && self.cpus.is_none() && self.pids.is_none()
    }
}

/// Where one controller is, as seen from Kiln's own cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A v1 hierarchy; `dir` is Kiln's own cgroup in it.
    V1 {
        /// Kiln's cgroup directory in that hierarchy.
        dir: PathBuf,
    },
    /// The v2 tree, with the controller enabled for Kiln's cgroup; `dir` is Kiln's cgroup.
    V2 {
        /// Kiln's cgroup directory.
        dir: PathBuf,
    },
}

impl Placement {
    /// Kiln's own cgroup directory for this controller.
    pub fn dir(&self) -> &Path {
        match self {
            Placement::V1 { dir } | Placement::V2 { dir } => dir,
        }
    }
}

/// The host's cgroup layout for the controllers Kiln uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    /// The v2 tree (Kiln's own cgroup in it), if one is mounted.
    pub v2: Option<PathBuf>,
    /// The memory controller.
    pub memory: Option<Placement>,
    /// The pids controller.
    pub pids: Option<Placement>,
    /// The cpu controller.
    pub cpu: Option<Placement>,
}

/// One parsed `/proc/self/cgroup` line.
struct SelfLine<'a> {
    controllers: &'a str,
    path: &'a str,
}

fn self_lines(text: &str) -> impl Iterator<Item = SelfLine<'_>> {
    text.lines().filter_map(|l| {
        let mut it = l.splitn(3, ':');
        let _id = it.next()?;
        let controllers = it.next()?;
        let path = it.next()?;
        Some(SelfLine { controllers, path })
    })
}

fn join_cgroup(base: &Path, cgroup_path: &str) -> PathBuf {
    base.join(cgroup_path.trim_start_matches('/'))
}

impl Layout {
    /// Finds the controllers under `root` (the cgroup mount root, `/sys/fs/cgroup` on a host)
    /// given the text of `/proc/self/cgroup`. A v2 controller counts when it is listed in Kiln's
    /// own `cgroup.controllers`; otherwise the v1 hierarchy named after the controller (or the
    /// comma-joined name in `/proc/self/cgroup`, such as `cpu,cpuacct`) is used.
    pub fn detect(root: &Path, proc_self_cgroup: &str) -> Layout {
        let v2_mount = if root.join("cgroup.controllers").is_file() {
            Some(root.to_path_buf())
        } else if root.join("unified/cgroup.controllers").is_file() {
            Some(root.join("unified"))
        } else {
            None
        };
        let v2 = v2_mount.and_then(|m| {
            self_lines(proc_self_cgroup)
                .find(|l| l.controllers.is_empty())
                .map(|l| join_cgroup(&m, l.path))
        });
        let v2_controllers = v2
            .as_ref()
            .and_then(|d| fs::read_to_string(d.join("cgroup.controllers")).ok())
            .unwrap_or_default();
        let find = |name: &str| -> Option<Placement> {
            if let Some(d) = &v2
                && v2_controllers.split_whitespace().any(|c| c == name)
            {
                return Some(Placement::V2 { dir: d.clone() });
            }
            let line = self_lines(proc_self_cgroup)
                .find(|l| l.controllers.split(',').any(|c| c == name))?;
            [line.controllers, name]
                .iter()
                .map(|mount| join_cgroup(&root.join(mount), line.path))
                .find(|d| d.join("cgroup.procs").is_file())
                .map(|dir| Placement::V1 { dir })
        };
        Layout {
            memory: find("memory"),
            pids: find("pids"),
            cpu: find("cpu"),
            v2,
        }
    }

    /// The host's layout (`/sys/fs/cgroup` and `/proc/self/cgroup`).
    pub fn host() -> Result<Layout, CgroupError> {
        let text = fs::read_to_string("/proc/self/cgroup").map_err(CgroupError::SelfCgroup)?;
        Ok(Layout::detect(Path::new(HOST_ROOT), &text))
    }
}

/// What `kiln doctor` says about limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `"v2"`, `"v1"`, `"hybrid"` or `"none"`.
    pub mode: &'static str,
    /// Where memory limits go (`None`: `--memory` is refused).
    pub memory: Option<Placement>,
    /// Where pids limits go.
    pub pids: Option<Placement>,
    /// Where cpu limits go (`None`: `--cpus` is refused).
    pub cpu: Option<Placement>,
    /// A child cgroup could be created and removed under each placement.
    pub writable: bool,
}

/// Detects the layout under `root` and checks that step cgroups can be made there.
pub fn report(root: &Path, proc_self_cgroup: &str) -> Report {
    let layout = Layout::detect(root, proc_self_cgroup);
    let any_v1 = [&layout.memory, &layout.pids, &layout.cpu]
        .iter()
        .any(|p| matches!(p, Some(Placement::V1 { .. })));
    let mode = match (layout.v2.is_some(), any_v1) {
        (true, true) => "hybrid",
        (true, false) => "v2",
        (false, true) => "v1",
        (false, false) => "none",
    };
    let dirs = placements(
        &layout,
        &Limits {
            memory_bytes: Some(1),
            cpus: Some(1.0),
            pids: Some(1),
        },
    );
    let writable = !dirs.is_empty()
        && dirs.iter().all(|d| {
            let probe = d.join(format!("kiln-doctor-{}", std::process::id()));
            fs::create_dir(&probe).is_ok() && fs::remove_dir(&probe).is_ok()
        });
    Report {
        mode,
        memory: layout.memory,
        pids: layout.pids,
        cpu: layout.cpu,
        writable,
    }
}

/// Kiln's own cgroup directories that hold the controllers `limits` needs, deduplicated.
fn placements(layout: &Layout, limits: &Limits) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (want, p) in [
        (limits.memory_bytes.is_some(), &layout.memory),
        (limits.pids.is_some(), &layout.pids),
        (limits.cpus.is_some(), &layout.cpu),
    ] {
        if let (true, Some(p)) = (want, p)
            && !dirs.iter().any(|d| d == p.dir())
        {
            dirs.push(p.dir().to_path_buf());
        }
    }
    dirs
}

/// A step's cgroup: one directory per hierarchy its limits need. Removed on drop.
#[derive(Debug)]
pub struct StepCgroup {
    dirs: Vec<PathBuf>,
    memory: Option<Placement>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn write(path: PathBuf, value: String) -> Result<(), CgroupError> {
    fs::write(&path, &value).map_err(|source| CgroupError::Write {
        path,
        value,
        source,
    })
}

const CPU_PERIOD_US: u64 = 100_000;

impl StepCgroup {
    /// Creates the step's cgroup (`kiln-step-PID-N`) under Kiln's own cgroup in every hierarchy
    /// `limits` needs and writes the limits. With no limits, nothing is created.
    pub fn create(layout: &Layout, limits: &Limits) -> Result<StepCgroup, CgroupError> {
        let name = format!(
            "kiln-step-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        for (want, p, controller) in [
            (limits.memory_bytes.is_some(), &layout.memory, "memory"),
            (limits.pids.is_some(), &layout.pids, "pids"),
            (limits.cpus.is_some(), &layout.cpu, "cpu"),
        ] {
            if want && p.is_none() {
                return Err(CgroupError::Unavailable { controller });
            }
        }
        let quota = match limits.cpus {
            Some(c) if c.is_finite() && c > 0.0 => {
                Some(((c * CPU_PERIOD_US as f64).round() as u64).max(1000))
            }
            Some(c) => {
                return Err(CgroupError::InvalidLimit {
                    what: "cpus",
                    value: c.to_string(),
                });
            }
            None => None,
        };
        let mut cg = StepCgroup {
            dirs: Vec::new(),
            memory: None,
        };
        // v2 needs the controllers enabled in Kiln's own cgroup for its children.
        if let Some(v2) = &layout.v2 {
            let mut enable = Vec::new();
            for (want, p, c) in [
                (limits.memory_bytes.is_some(), &layout.memory, "+memory"),
                (limits.pids.is_some(), &layout.pids, "+pids"),
                (limits.cpus.is_some(), &layout.cpu, "+cpu"),
            ] {
                if want && matches!(p, Some(Placement::V2 { .. })) {
                    enable.push(c);
                }
            }
            if !enable.is_empty() {
                write(v2.join("cgroup.subtree_control"), enable.join(" "))?;
            }
        }
        for own in placements(layout, limits) {
            let dir = own.join(&name);
            fs::create_dir(&dir).map_err(|source| CgroupError::Create {
                path: dir.clone(),
                source,
            })?;
            cg.dirs.push(dir);
        }
        let child = |p: &Placement| p.dir().join(&name);
        if let (Some(bytes), Some(p)) = (limits.memory_bytes, &layout.memory) {
            let dir = child(p);
            match p {
                Placement::V1 { .. } => {
                    write(dir.join("memory.limit_in_bytes"), bytes.to_string())?;
                    // Only where swap accounting exists; it must not be below the limit.
                    if dir.join("memory.memsw.limit_in_bytes").exists() {
                        write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string())?;
                    }
                }
                Placement::V2 { .. } => {
                    write(dir.join("memory.max"), bytes.to_string())?;
                    if dir.join("memory.swap.max").exists() {
                        write(dir.join("memory.swap.max"), "0".into())?;
                    }
                }
            }
            cg.memory = Some(match p {
                Placement::V1 { .. } => Placement::V1 { dir },
                Placement::V2 { .. } => Placement::V2 { dir },
            });
        }
        if let (Some(n), Some(p)) = (limits.pids, &layout.pids) {
            write(child(p).join("pids.max"), n.to_string())?;
        }
        if let (Some(q), Some(p)) = (quota, &layout.cpu) {
            let dir = child(p);
            match p {
                Placement::V1 { .. } => {
                    write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                    write(dir.join("cpu.cfs_quota_us"), q.to_string())?;
                }
                Placement::V2 { .. } => write(dir.join("cpu.max"), format!("{q} {CPU_PERIOD_US}"))?,
            }
        }
        Ok(cg)
    }

    /// The directories created (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves process `pid` (and so its future children) into the step's cgroup.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write(d.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// True when the kernel's OOM killer killed a process in the step's memory cgroup.
    pub fn oom_killed(&self) -> bool {
        let Some(p) = &self.memory else { return false };
        let (file, key) = match p {
            Placement::V1 { dir } => (dir.join("memory.oom_control"), "oom_kill"),
            Placement::V2 { dir } => (dir.join("memory.events"), "oom_kill"),
        };
        fs::read_to_string(file)
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse::<u64>().ok()).flatten()
                })
            })
            .is_some_and(|n| n > 0)
    }

    /// Removes the step's directories. The step's processes must be gone; a cgroup whose last
    /// task has only just exited can report EBUSY briefly, so removal is retried a few times.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.remove_dirs()
    }

    fn remove_dirs(&mut self) -> Result<(), CgroupError> {
        let mut first_err = None;
        for d in std::mem::take(&mut self.dirs) {
            let mut attempt = 0;
            loop {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 50 => {
                        attempt += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(source) => {
                        first_err.get_or_insert(CgroupError::Remove { path: d, source });
                        break;
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for StepCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove_dirs() {
            tracing::warn!(error = %e, "step cgroup left behind");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/agent/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    fn hybrid_tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for d in ["memory/agent/abc", "pids", "cpu", "cpuacct", "unified"] {
            fs::create_dir_all(t.path().join(d)).unwrap();
            fs::write(t.path().join(d).join("cgroup.procs"), "").unwrap();
        }
        fs::write(t.path().join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        t
    }

    #[test]
    fn hybrid_host_uses_v1_controllers_under_our_own_cgroup() {
        let t = hybrid_tree();
        let l = Layout::detect(t.path(), HYBRID);
        assert_eq!(
            l.memory,
            Some(Placement::V1 {
                dir: t.path().join("memory/agent/abc")
            })
        );
        assert_eq!(
            l.pids,
            Some(Placement::V1 {
                dir: t.path().join("pids")
            })
        );
        assert_eq!(
            l.cpu,
            Some(Placement::V1 {
                dir: t.path().join("cpu")
            })
        );
        assert_eq!(l.v2, Some(t.path().join("unified")));
        assert_eq!(report(t.path(), HYBRID).mode, "hybrid");
    }

    #[test]
    fn v1_limits_are_written_to_the_step_cgroup() {
        let t = hybrid_tree();
        let l = Layout::detect(t.path(), HYBRID);
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpus: Some(1.5),
            pids: Some(100),
        };
        let cg = StepCgroup::create(&l, &limits).unwrap();
        assert_eq!(cg.dirs().len(), 3);
        let mem = &cg.dirs()[0];
        assert!(mem.starts_with(t.path().join("memory/agent/abc")));
        assert_eq!(
            fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap(),
            "67108864"
        );
        assert_eq!(
            fs::read_to_string(cg.dirs()[1].join("pids.max")).unwrap(),
            "100"
        );
        assert_eq!(
            fs::read_to_string(cg.dirs()[2].join("cpu.cfs_quota_us")).unwrap(),
            "150000"
        );
        cg.add_process(42).unwrap();
        assert_eq!(fs::read_to_string(mem.join("cgroup.procs")).unwrap(), "42");
    }

    #[test]
    fn v2_host_enables_controllers_and_writes_v2_files() {
        let t = tempfile::tempdir().unwrap();
        let own = t.path().join("kiln.slice");
        fs::create_dir_all(&own).unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(own.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let l = Layout::detect(t.path(), "0::/kiln.slice\n");
        assert_eq!(l.memory, Some(Placement::V2 { dir: own.clone() }));
        let cg = StepCgroup::create(
            &l,
            &Limits {
                memory_bytes: Some(1 << 30),
                cpus: Some(2.0),
                pids: None,
            },
        )
        .unwrap();
        assert_eq!(cg.dirs().len(), 1);
        assert_eq!(
            fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu"
        );
        assert_eq!(
            fs::read_to_string(cg.dirs()[0].join("cpu.max")).unwrap(),
            "200000 100000"
        );
        assert_eq!(
            fs::read_to_string(cg.dirs()[0].join("memory.max")).unwrap(),
            "1073741824"
        );
    }

    #[test]
    fn a_limit_without_its_controller_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let l = Layout::detect(t.path(), "0::/\n");
        let r = StepCgroup::create(
            &l,
            &Limits {
                memory_bytes: Some(1),
                ..Limits::default()
            },
        );
        assert!(matches!(
            r,
            Err(CgroupError::Unavailable {
                controller: "memory"
            })
        ));
        assert_eq!(report(t.path(), "0::/\n").mode, "none");
    }

    #[test]
    fn no_limits_create_no_cgroup() {
        let t = hybrid_tree();
        let cg = StepCgroup::create(&Layout::detect(t.path(), HYBRID), &Limits::default()).unwrap();
        assert!(cg.dirs().is_empty());
    }
}
