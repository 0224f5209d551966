//! Runs one `ir::Run` inside a prepared root directory, in Linux namespaces.
//!
//! Owns everything between "here is a root tree" and "the command exited with this code":
//! user resolution against the image's `/etc/passwd` and `/etc/group`, the namespaces, the
//! mounts a step sees (`/proc`, a minimal `/dev`, a read-only `/sys`, `/etc/resolv.conf`,
//! `/etc/hosts`, `/etc/hostname`, `RUN --mount`), limits through [`super::cgroup`], output
//! streaming, timeouts, and killing the whole process tree. It does not mount the root (the
//! driver stacks the overlay) and depends only on `ir` and the OS, so the guest agent can link
//! it without the rest of Kiln.
//!
//! # Process layout
//!
//! ```text
//! kiln ── fork ─► C (setsid; unshare mount, pid, uts, ipc [, net]) ── fork ─► D = pid 1
//!  │                 waits for D, exits with its status                 │ mounts, pivot_root,
//!  │                                                                    │ unshare(user), setuid,
//!  └── writes D's uid_map/gid_map (identity), streams stdout/stderr     └ execve(the command)
//! ```
//!
//! The mounts are made by real root *before* the user namespace is created, so the mount, pid
//! and uts namespaces belong to the initial user namespace: the step (root in a child user
//! namespace, mapped root→root) can neither undo them nor mount anything, `mknod` and module
//! loading need capabilities in the initial namespace, and `/proc/sys`, `/proc/sysrq-trigger`
//! and friends are read-only or masked as Docker does. The step keeps Docker's default
//! capability set (root) or none (another user). An unprivileged Kiln would have to create
//! the user namespace first (with a single-id map) and mount inside it; the plan built here
//! is a list of mount operations, so only the ordering in [`spawn`] would change.
//!
//! When D (pid 1) exits, the kernel kills every other process in its pid namespace, so nothing
//! started by the step outlives it. A timeout or a SIGINT/SIGTERM of Kiln SIGKILLs D (see
//! [`SignalGuard`]); both children have `PR_SET_PDEATHSIG(SIGKILL)`, so a SIGKILL of Kiln
//! still kills the step (C dies with Kiln's thread, D with C). All mounts made here live in the
//! step's mount namespace and vanish with it. What a SIGKILL of Kiln leaves for `kiln gc`: the
//! driver's overlay mount, the step cgroup (`kiln-step-PID-N`), this module's scratch directory
//! (`$TMPDIR/kiln-step-*`), and mount points created inside a root that had no stub for them.
//!
//! # Forked child
//!
//! The children run only the prepared [`Plan`] (paths are C strings built beforehand). They
//! are forked with `fork(2)` from libc, whose atfork handlers leave malloc usable in the child,
//! so the few allocations `nix` makes there (`execve`'s pointer array) cannot deadlock.

use super::cgroup::{CgroupError, Layout, Limits, StepCgroup};
use super::sys;
use crate::ir;
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// The host side of one `RUN --mount`, prepared by the caller (same order as `run.mounts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreparedMount {
    /// `type=bind`: the host file or directory the caller resolved the source to (context,
    /// stage or image tree). Mounted read-only unless `readwrite`; with `readwrite` writes go
    /// to this path, so the caller passes a disposable copy.
    Bind {
        /// The host path.
        source: PathBuf,
    },
    /// `type=cache`: the persistent host directory for this cache id. Created with the mount's
    /// mode and owner if it does not exist yet.
    Cache {
        /// The host directory.
        dir: PathBuf,
    },
    /// `type=tmpfs`: nothing to prepare.
    Tmpfs,
    /// `type=secret`: the host file holding the secret, or `None` when not provided. Its
    /// content is copied into a private tmpfs in the step's mount namespace; the file itself is
    /// never mounted or copied into the root.
    Secret {
        /// The host file.
        file: Option<PathBuf>,
    },
    /// `type=ssh`: not supported yet.
    Ssh,
}

/// Where the command's standard streams go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stdio {
    /// stdin is `/dev/null`; stdout and stderr are read line by line into the `output`
    /// callback (build steps).
    #[default]
    Capture,
    /// The command gets Kiln's own stdin, stdout and stderr, byte for byte (sandbox
    /// commands); the `output` callback is not called.
    Inherit,
}

/// Everything one step needs.
pub struct ExecRequest<'a> {
    /// The root tree (the merged overlay).
    pub root: &'a Path,
    /// The step.
    pub run: &'a ir::Run,
    /// The hostname inside the step (also in `/etc/hostname` and `/etc/hosts`).
    pub hostname: &'a str,
    /// One entry per `run.mounts` entry, same order.
    pub mounts: &'a [PreparedMount],
    /// `/etc/resolv.conf` content; `None` copies the host's.
    pub resolv_conf: Option<&'a str>,
    /// Resource limits.
    pub limits: Limits,
    /// Receives each output line (without its newline) as it arrives.
    pub output: &'a mut dyn FnMut(Stream, &str),
    /// Where the standard streams go.
    pub stdio: Stdio,
    /// Kill the step after this long.
    pub timeout: Option<Duration>,
}

impl ExecError {
    /// Docker's exit code for a command that could not start (`docker run`'s 127 for not
    /// found, 126 for not runnable); `None` for the failures that are Kiln's, not the command's.
    pub fn start_failure_code(&self) -> Option<i32> {
        match self {
            ExecError::NotFound { .. } => Some(127),
            ExecError::Exec { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => {
                Some(127)
            }
            ExecError::Exec { .. } => Some(126),
            _ => None,
        }
    }
}

/// How the step's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

impl ExitStatus {
    /// The shell's view: the exit code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }
}

/// The result of a step that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// How the command ended.
    pub status: ExitStatus,
    /// Killed because it ran past the timeout.
    pub timed_out: bool,
    /// The memory cgroup's OOM killer struck.
    pub oom_killed: bool,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

/// What went wrong before or while running a step (a non-zero exit is not an error).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// `mounts` does not pair with `run.mounts`.
    #[error("{given} prepared mounts for {expected} RUN --mount entries")]
    MountCount {
        /// Entries in `run.mounts`.
        expected: usize,
        /// Entries given.
        given: usize,
    },
    /// A prepared mount's kind does not match the `RUN --mount` it pairs with.
    #[error("prepared mount {index} does not match RUN --mount type {kind}")]
    MountKind {
        /// Its index.
        index: usize,
        /// The IR's mount type.
        kind: &'static str,
    },
    /// `RUN --mount=type=ssh`.
    #[error("RUN --mount=type=ssh is not supported yet")]
    SshUnsupported,
    /// A required secret was not provided.
    #[error("secret {id} is required but was not provided")]
    SecretMissing {
        /// The secret id.
        id: String,
    },
    /// A secret file could not be read.
    #[error("cannot read secret {id} from {path}")]
    SecretRead {
        /// The secret id.
        id: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A path (mount target, workdir, script name) cannot be used.
    #[error("{what} {path:?}: {why}")]
    BadPath {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        why: &'static str,
    },
    /// `USER` names a user or group the image does not have.
    #[error("USER {spec}: {reason}")]
    User {
        /// The spec as given.
        spec: String,
        /// Why it does not resolve.
        reason: String,
    },
    /// The root is not a usable directory.
    #[error("cannot open the root {path}")]
    Root {
        /// The root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Preparing the root or the host side failed.
    #[error("cannot {what} {path}")]
    Prepare {
        /// The action.
        what: &'static str,
        /// The path (in the root, or on the host).
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The command is not in the root.
    #[error("{program}: executable file not found in PATH={path}")]
    NotFound {
        /// The program.
        program: String,
        /// The PATH searched.
        path: String,
    },
    /// Setting up limits failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Starting the step's processes failed.
    #[error("cannot {what} for the step")]
    Spawn {
        /// The action.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing the user namespace's id maps failed.
    #[error("cannot write the step's {file}")]
    IdMap {
        /// `uid_map` or `gid_map`.
        file: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A step inside the children failed.
    #[error("step setup failed: cannot {what}")]
    Setup {
        /// The failed operation.
        what: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// `execve` of the command failed.
    #[error("cannot execute {program}")]
    Exec {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Waiting for the step failed.
    #[error("waiting for the step failed")]
    Wait(#[source] io::Error),
    /// Kiln got SIGINT/SIGTERM/SIGHUP; the step was killed and cleaned up. Callers should exit
    /// with 128 + signal.
    #[error("interrupted by signal {signal}")]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
}

// ---------------------------------------------------------------------------------------
// Users

/// A `USER` resolved against the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// Supplementary gids: the primary gid first (containerd's `ensureAdditionalGids`, which
    /// BuildKit and `docker run` apply), then the groups in `/etc/group` listing the user
    /// when no group was given.
    pub groups: Vec<u32>,
    /// The passwd home directory, if the user has an entry.
    pub home: Option<String>,
}

/// Resolves `spec` (`name`, `uid`, `name:group`, `uid:gid`; `None` is root) against the
/// text of the image's `/etc/passwd` and `/etc/group`, as runc does: a numeric uid without
/// an entry runs with gid 0; an explicit group disables the supplementary groups (but the
/// primary gid is always one of them, as containerd makes it).
pub fn resolve_user(spec: Option<&str>, passwd: &str, group: &str) -> Result<ResolvedUser, String> {
    let spec = spec.unwrap_or("").trim();
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "root" } else { user };
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .collect();
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let entry = if numeric(user) {
        entries.iter().find(|f| f[2] == user)
    } else {
        entries.iter().find(|f| f[0] == user)
    };
    let (uid, mut gid, name, home) = match entry {
        Some(f) => {
            let uid = f[2]
                .parse::<u32>()
                .map_err(|_| format!("bad uid in /etc/passwd for {}", f[0]))?;
            let gid = f[3]
                .parse::<u32>()
                .map_err(|_| format!("bad gid in /etc/passwd for {}", f[0]))?;
            (uid, gid, Some(f[0]), Some(f[5].to_string()))
        }
        None if numeric(user) => (
            user.parse::<u32>()
                .map_err(|_| format!("uid {user} out of range"))?,
            0,
            None,
            None,
        ),
        None if user == "root" => (0, 0, Some("root"), Some("/root".to_string())),
        None => {
            return Err(format!(
                "unable to find user {user}: no matching entries in passwd file"
            ));
        }
    };
    let groups: Vec<(String, u32, Vec<&str>)> = group
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            let g = f[2].parse::<u32>().ok()?;
            let members = f
                .get(3)
                .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
                .unwrap_or_default();
            Some((f[0].to_string(), g, members))
        })
        .collect();
    let mut supplementary = Vec::new();
    match grp {
        Some(g) if numeric(g) => {
            gid = g
                .parse::<u32>()
                .map_err(|_| format!("gid {g} out of range"))?
        }
        Some(g) => {
            gid = groups
                .iter()
                .find(|(n, _, _)| n == g)
                .map(|(_, id, _)| *id)
                .ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in group file")
                })?
        }
        None => {
            if let Some(name) = name {
                for (_, id, members) in &groups {
                    if members.contains(&name) && !supplementary.contains(id) {
                        supplementary.push(*id);
                    }
                }
            }
        }
    }
    supplementary.retain(|g| *g != gid);
    supplementary.insert(0, gid);
    Ok(ResolvedUser {
        uid,
        gid,
        groups: supplementary,
        home,
    })
}

// ---------------------------------------------------------------------------------------
// Mount points

/// A path the step mounts over, which must exist in the root before the step starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mountpoint {
    /// Absolute path in the root.
    pub path: String,
    /// A directory (else a regular file).
    pub dir: bool,
}

/// The mount points a step needs (`/proc`, `/dev`, `/sys`, the three `/etc` files and the
/// `RUN --mount` targets). The namespace driver puts the missing ones into a stub lower layer
/// so they never reach the upper layer; the executor creates whatever is still missing and
/// removes it again after the step.
pub fn mountpoints(run: &ir::Run, mounts: &[PreparedMount]) -> Vec<Mountpoint> {
    let mut v: Vec<Mountpoint> = ["/proc", "/dev", "/sys"]
        .iter()
        .map(|p| Mountpoint {
            path: p.to_string(),
            dir: true,
        })
        .chain(ETC_FILES.iter().map(|(p, _)| Mountpoint {
            path: format!("/etc/{p}"),
            dir: false,
        }))
        .collect();
    for (m, p) in run.mounts.iter().zip(mounts) {
        if let Some((target, dir)) = mount_target(m, p) {
            v.push(Mountpoint { path: target, dir });
        }
    }
    v
}

const ETC_FILES: [(&str, usize); 3] = [("resolv.conf", 0), ("hosts", 1), ("hostname", 2)];

fn mount_target(m: &ir::Mount, p: &PreparedMount) -> Option<(String, bool)> {
    match (m, p) {
        (ir::Mount::Bind { target, .. }, PreparedMount::Bind { source }) => {
            Some((target.clone(), !source.is_file()))
        }
        (ir::Mount::Cache { target, .. }, _) | (ir::Mount::Tmpfs { target, .. }, _) => {
            Some((target.clone(), true))
        }
        (
            ir::Mount::Secret {
                id, target, env, ..
            },
            _,
        ) => match (target, env) {
            (Some(t), _) => Some((t.clone(), false)),
            (None, None) => Some((format!("/run/secrets/{id}"), false)),
            (None, Some(_)) => None,
        },
        _ => None,
    }
}

/// Splits an absolute in-root path into plain components.
fn components<'p>(what: &'static str, path: &'p str) -> Result<Vec<&'p str>, ExecError> {
    let bad = |why| ExecError::BadPath {
        what,
        path: path.to_string(),
        why,
    };
    if !path.starts_with('/') {
        return Err(bad("not absolute"));
    }
    if path.contains('\0') {
        return Err(bad("contains NUL"));
    }
    let comps: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if comps.contains(&"..") {
        return Err(bad("contains .."));
    }
    Ok(comps)
}

fn in_root() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

fn open_in_root(root: &OwnedFd, rel: &str, flags: OFlag) -> nix::Result<OwnedFd> {
    let rel = if rel.is_empty() { "." } else { rel };
    openat2(
        root.as_fd(),
        rel,
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(in_root()),
    )
}

/// The host path an open descriptor refers to.
fn fd_path(fd: &OwnedFd) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// An entry the executor created in the root, removed after the step.
#[derive(Debug)]
struct Created {
    /// In-root path, symlinks resolved.
    rel: String,
    dir: bool,
}

/// Makes sure `path` exists in the root as a directory (`dir`) or file, creating what is
/// missing (resolving symlinks inside the root), and returns its host path with every
/// symlink resolved. Created entries are appended to `created` when `created` is given, and
/// chowned to `owner`.
fn ensure(
    root: &OwnedFd,
    root_host: &Path,
    what: &'static str,
    path: &str,
    dir: bool,
    owner: Option<(u32, u32)>,
    mut created: Option<&mut Vec<Created>>,
) -> Result<PathBuf, ExecError> {
    let comps = components(what, path)?;
    let prep = |action: &'static str, source: io::Error| ExecError::Prepare {
        what: action,
        path: path.to_string(),
        source,
    };
    for i in 0..comps.len() {
        let prefix = comps[..=i].join("/");
        match open_in_root(root, &prefix, OFlag::O_PATH) {
            Ok(_) => continue,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(prep("resolve", e.into())),
        }
        let parent = open_in_root(
            root,
            &comps[..i].join("/"),
            OFlag::O_PATH | OFlag::O_DIRECTORY,
        )
        .map_err(|e| prep("resolve the parent of", e.into()))?;
        let last = i + 1 == comps.len();
        let name = comps[i];
        let fd = if !last || dir {
            nix::sys::stat::mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o755))
                .map_err(|e| prep("create", e.into()))?;
            nix::fcntl::openat(
                parent.as_fd(),
                name,
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
        } else {
            nix::fcntl::openat(
                parent.as_fd(),
                name,
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_WRONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
        }
        .map_err(|e| prep("create", e.into()))?;
        if let Some((uid, gid)) = owner {
            nix::unistd::fchownat(
                parent.as_fd(),
                name,
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| prep("chown", e.into()))?;
        }
        if let Some(c) = created.as_deref_mut() {
            let host = fd_path(&fd).map_err(|e| prep("resolve", e))?;
            let rel = host
                .strip_prefix(root_host)
                .map_err(|_| prep("resolve", io::Error::other("outside the root")))?;
            c.push(Created {
                rel: rel.to_string_lossy().into_owned(),
                dir: !last || dir,
            });
        }
    }
    let fd = open_in_root(root, &comps.join("/"), OFlag::O_PATH)
        .map_err(|e| prep("resolve", e.into()))?;
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| prep("stat", e.into()))?;
    let is_dir = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR;
    if is_dir != dir {
        return Err(ExecError::BadPath {
            what,
            path: path.to_string(),
            why: if dir {
                "exists and is not a directory"
            } else {
                "is a directory"
            },
        });
    }
    let host = fd_path(&fd).map_err(|e| prep("resolve", e))?;
    if !host.starts_with(root_host) {
        return Err(prep("resolve", io::Error::other("outside the root")));
    }
    Ok(host)
}

/// Removes what [`ensure`] created, newest first; directories only when empty.
fn remove_created(root: &OwnedFd, created: &[Created]) {
    for c in created.iter().rev() {
        let p = Path::new(&c.rel);
        let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
            continue;
        };
        let Ok(dirfd) = open_in_root(
            root,
            &parent.to_string_lossy(),
            OFlag::O_PATH | OFlag::O_DIRECTORY,
        ) else {
            continue;
        };
        let flag = if c.dir {
            nix::unistd::UnlinkatFlags::RemoveDir
        } else {
            nix::unistd::UnlinkatFlags::NoRemoveDir
        };
        if let Err(e) = nix::unistd::unlinkat(dirfd.as_fd(), name, flag)
            && e != Errno::ENOTEMPTY
        {
            tracing::warn!(path = %c.rel, error = %e, "cannot remove a mount point the step left");
        }
    }
}

fn read_in_root(root: &OwnedFd, rel: &str) -> Result<String, ExecError> {
    match open_in_root(root, rel, OFlag::O_RDONLY) {
        Ok(fd) => {
            let mut s = Vec::new();
            File::from(fd)
                .read_to_end(&mut s)
                .map_err(|source| ExecError::Prepare {
                    what: "read",
                    path: format!("/{rel}"),
                    source,
                })?;
            Ok(String::from_utf8_lossy(&s).into_owned())
        }
        Err(Errno::ENOENT) => Ok(String::new()),
        Err(e) => Err(ExecError::Prepare {
            what: "read",
            path: format!("/{rel}"),
            source: e.into(),
        }),
    }
}

fn find_program(root: &OwnedFd, program: &str, path_var: &str) -> Option<String> {
    if program.contains('/') {
        return Some(program.to_string());
    }
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let cand = format!("{}/{program}", dir.trim_end_matches('/'));
        let Ok(fd) = open_in_root(root, cand.trim_start_matches('/'), OFlag::O_PATH) else {
            continue;
        };
        if let Ok(st) = nix::sys::stat::fstat(fd.as_fd())
            && SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
            && st.st_mode & 0o111 != 0
        {
            return Some(cand);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// The plan the children run

/// One operation D performs before `pivot_root` (host paths).
enum Op {
    Mount {
        what: &'static str,
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: MsFlags,
        data: Option<CString>,
        /// ENOENT is fine (a masked `/proc` file this kernel does not have).
        optional: bool,
    },
    Mkdir {
        path: CString,
    },
    Touch {
        path: CString,
    },
    Symlink {
        target: &'static CStr,
        link: CString,
    },
    Write {
        path: CString,
        content: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

impl Op {
    fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Op::Mount { what, target, .. } => format!("mount {what} on {}", s(target)),
            Op::Mkdir { path } => format!("create directory {}", s(path)),
            Op::Touch { path } => format!("create {}", s(path)),
            Op::Symlink { link, .. } => format!("create symlink {}", s(link)),
            Op::Write { path, .. } => format!("write {}", s(path)),
        }
    }
}

/// What the children do, computed entirely before forking.
struct Plan {
    ops: Vec<Op>,
    root: CString,
    hostname: CString,
    unshare: CloneFlags,
    uid: u32,
    gid: u32,
    groups: Vec<Gid>,
    /// Capabilities kept (bounding set; also effective/permitted for root).
    caps: u64,
    last_cap: u32,
    workdir: CString,
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    stdio: Stdio,
}

/// Docker's default capabilities: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
/// NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
const DEFAULT_CAPS: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 10)
    | (1 << 13)
    | (1 << 18)
    | (1 << 27)
    | (1 << 29)
    | (1 << 31);

/// Named steps D and C report failures of (the index of the failing [`Op`] otherwise).
const STAGES: [&str; 16] = [
    "unshare the namespaces",
    "fork the step's init",
    "set the hostname",
    "open the new root",
    "pivot_root into the root",
    "detach the old root",
    "create the user namespace",
    "sync with kiln",
    "set supplementary groups",
    "drop capabilities",
    "set the gid",
    "set the uid",
    "set capabilities",
    "enter the working directory",
    "redirect standard streams",
    "reset signals",
];

fn cstr(what: &'static str, s: impl AsRef<[u8]>) -> Result<CString, ExecError> {
    CString::new(s.as_ref()).map_err(|_| ExecError::BadPath {
        what,
        path: String::from_utf8_lossy(s.as_ref()).into_owned(),
        why: "contains NUL",
    })
}

fn hostp(p: &Path, rest: &str) -> Result<CString, ExecError> {
    let mut b = p.as_os_str().as_bytes().to_vec();
    b.extend_from_slice(rest.as_bytes());
    cstr("host path", b)
}

fn mount_op(
    what: &'static str,
    src: Option<&str>,
    target: CString,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Op {
    Op::Mount {
        what,
        src: src.map(|s| CString::new(s).unwrap_or_default()),
        target,
        fstype: fstype.map(|s| CString::new(s).unwrap_or_default()),
        flags,
        data: data.map(|s| CString::new(s).unwrap_or_default()),
        optional: false,
    }
}

fn bind_op(what: &'static str, src: CString, target: CString, flags: MsFlags) -> Op {
    Op::Mount {
        what,
        src: Some(src),
        target,
        fstype: None,
        flags: MsFlags::MS_BIND | flags,
        data: None,
        optional: false,
    }
}

fn ro_remount(what: &'static str, target: CString, optional: bool) -> Op {
    Op::Mount {
        what,
        src: None,
        target,
        fstype: None,
        flags: MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        data: None,
        optional,
    }
}

/// Host-side state of a prepared step, cleaned up on drop.
struct Prepared {
    plan: Plan,
    root_fd: OwnedFd,
    created: Vec<Created>,
    _scratch: tempfile::TempDir,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        remove_created(&self.root_fd, &self.created);
    }
}

fn prepare(req: &ExecRequest<'_>) -> Result<Prepared, ExecError> {
    let run = req.run;
    if run.mounts.len() != req.mounts.len() {
        return Err(ExecError::MountCount {
            expected: run.mounts.len(),
            given: req.mounts.len(),
        });
    }
    let root_err = |source: io::Error| ExecError::Root {
        path: req.root.to_path_buf(),
        source,
    };
    let root_host = std::fs::canonicalize(req.root).map_err(root_err)?;
    let root_fd = nix::fcntl::open(
        &root_host,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| root_err(e.into()))?;
    let mut prepared_created = Vec::new();

    // USER, HOME, PATH.
    let passwd = read_in_root(&root_fd, "etc/passwd")?;
    let group = read_in_root(&root_fd, "etc/group")?;
    let user =
        resolve_user(run.user.as_deref(), &passwd, &group).map_err(|reason| ExecError::User {
            spec: run.user.clone().unwrap_or_else(|| "root".into()),
            reason,
        })?;
    let mut env: Vec<Vec<u8>> = run
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}").into_bytes())
        .collect();
    if !run.env.iter().any(|(k, _)| k == "HOME") {
        env.push(format!("HOME={}", user.home.as_deref().unwrap_or("/")).into_bytes());
    }
    let path_var = run
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(ir::DEFAULT_PATH);

    let scratch = tempfile::Builder::new()
        .prefix("kiln-step-")
        .tempdir()
        .map_err(|source| ExecError::Prepare {
            what: "create the scratch directory",
            path: std::env::temp_dir().display().to_string(),
            source,
        })?;
    let sp = scratch.path();
    let host_resolv;
    let resolv = match req.resolv_conf {
        Some(r) => r,
        None => {
            host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            &host_resolv
        }
    };
    let etc_content = [
        resolv.to_string(),
        format!(
            "127.0.0.1\tlocalhost {0}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            req.hostname
        ),
        format!("{}\n", req.hostname),
    ];
    for ((name, i), content) in ETC_FILES.iter().zip(&etc_content) {
        let _ = i;
        std::fs::write(sp.join(name), content).map_err(|source| ExecError::Prepare {
            what: "write",
            path: sp.join(name).display().to_string(),
            source,
        })?;
    }

    let mut ops = vec![
        mount_op(
            "private /",
            None,
            c"/".into(),
            None,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None,
        ),
        bind_op(
            "the root",
            hostp(&root_host, "")?,
            hostp(&root_host, "")?,
            MsFlags::MS_REC,
        ),
    ];
    let ens = |what, p: &str, dir, created: &mut Vec<Created>| {
        ensure(&root_fd, &root_host, what, p, dir, None, Some(created))
    };

    // /proc, with Docker's masked and read-only paths.
    let proc_ = ens("mount point", "/proc", true, &mut prepared_created)?;
    let nosuid_all = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    ops.push(mount_op(
        "proc",
        Some("proc"),
        hostp(&proc_, "")?,
        Some("proc"),
        nosuid_all,
        None,
    ));
    for f in [
        "kcore",
        "keys",
        "timer_list",
        "sched_debug",
        "latency_stats",
        "timer_stats",
    ] {
        ops.push(Op::Mount {
            what: "a /proc mask",
            src: Some(c"/dev/null".into()),
            target: hostp(&proc_, &format!("/{f}"))?,
            fstype: None,
            flags: MsFlags::MS_BIND,
            data: None,
            optional: true,
        });
    }
    for d in ["acpi", "scsi", "asound"] {
        ops.push(Op::Mount {
            what: "a /proc mask",
            src: Some(c"tmpfs".into()),
            target: hostp(&proc_, &format!("/{d}"))?,
            fstype: Some(c"tmpfs".into()),
            flags: MsFlags::MS_RDONLY | nosuid_all,
            data: Some(c"size=0".into()),
            optional: true,
        });
    }
    for p in ["sys", "sysrq-trigger", "bus", "fs", "irq"] {
        let t = hostp(&proc_, &format!("/{p}"))?;
        ops.push(Op::Mount {
            what: "a read-only /proc path",
            src: Some(t.clone()),
            target: t.clone(),
            fstype: None,
            flags: MsFlags::MS_BIND | MsFlags::MS_REC,
            data: None,
            optional: true,
        });
        ops.push(ro_remount("a read-only /proc path", t, true));
    }

    // A minimal /dev.
    let dev = ens("mount point", "/dev", true, &mut prepared_created)?;
    let devp = |rest: &str| hostp(&dev, rest);
    ops.push(mount_op(
        "/dev",
        Some("tmpfs"),
        devp("")?,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    ));
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        ops.push(Op::Touch {
            path: devp(&format!("/{n}"))?,
        });
        ops.push(bind_op(
            "a device",
            hostp(Path::new("/dev"), &format!("/{n}"))?,
            devp(&format!("/{n}"))?,
            MsFlags::empty(),
        ));
    }
    ops.push(Op::Mkdir {
        path: devp("/pts")?,
    });
    ops.push(mount_op(
        "/dev/pts",
        Some("devpts"),
        devp("/pts")?,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ));
    ops.push(Op::Symlink {
        target: c"pts/ptmx",
        link: devp("/ptmx")?,
    });
    ops.push(Op::Mkdir {
        path: devp("/shm")?,
    });
    ops.push(mount_op(
        "/dev/shm",
        Some("shm"),
        devp("/shm")?,
        Some("tmpfs"),
        nosuid_all,
        Some("mode=1777,size=65536k"),
    ));
    for (target, link) in [
        (c"/proc/self/fd", "/fd"),
        (c"/proc/self/fd/0", "/stdin"),
        (c"/proc/self/fd/1", "/stdout"),
        (c"/proc/self/fd/2", "/stderr"),
    ] {
        ops.push(Op::Symlink {
            target,
            link: devp(link)?,
        });
    }

    // /sys, read-only (a fresh sysfs: no host cgroup or debug mounts below it).
    let sys_ = ens("mount point", "/sys", true, &mut prepared_created)?;
    ops.push(mount_op(
        "/sys",
        Some("sysfs"),
        hostp(&sys_, "")?,
        Some("sysfs"),
        MsFlags::MS_RDONLY | nosuid_all,
        None,
    ));

    // /etc/resolv.conf, /etc/hosts, /etc/hostname from files Kiln wrote.
    for (name, _) in ETC_FILES {
        let t = ens(
            "mount point",
            &format!("/etc/{name}"),
            false,
            &mut prepared_created,
        )?;
        ops.push(bind_op(
            "an /etc file",
            hostp(sp, &format!("/{name}"))?,
            hostp(&t, "")?,
            MsFlags::empty(),
        ));
    }

    // RUN --mount, parents before children.
    let mut order: Vec<usize> = (0..run.mounts.len()).collect();
    let depth = |i: usize| {
        mount_target(&run.mounts[i], &req.mounts[i])
            .map(|(t, _)| t.split('/').filter(|c| !c.is_empty()).count())
            .unwrap_or(0)
    };
    order.sort_by_key(|&i| depth(i));
    let mut secrets_mounted = false;
    for i in order {
        let (m, p) = (&run.mounts[i], &req.mounts[i]);
        let kind_err = |kind| ExecError::MountKind { index: i, kind };
        let target = match mount_target(m, p) {
            Some((t, dir)) => {
                let c = components("mount target", &t)?;
                if matches!(c.first(), Some(&"proc" | &"dev" | &"sys")) {
                    return Err(ExecError::BadPath {
                        what: "mount target",
                        path: t,
                        why: "is under /proc, /dev or /sys",
                    });
                }
                Some(ens("mount point", &t, dir, &mut prepared_created)?)
            }
            None => None,
        };
        match (m, p) {
            (ir::Mount::Bind { readwrite, .. }, PreparedMount::Bind { source }) => {
                let t = hostp(target.as_deref().unwrap_or(Path::new("")), "")?;
                ops.push(bind_op(
                    "a bind mount",
                    hostp(source, "")?,
                    t.clone(),
                    MsFlags::MS_REC,
                ));
                if !readwrite {
                    ops.push(ro_remount("a read-only bind mount", t, false));
                }
            }
            (
                ir::Mount::Cache {
                    readonly,
                    mode,
                    uid,
                    gid,
                    ..
                },
                PreparedMount::Cache { dir },
            ) => {
                if !dir.exists() {
                    let prep = |source| ExecError::Prepare {
                        what: "create the cache directory",
                        path: dir.display().to_string(),
                        source,
                    };
                    std::fs::create_dir_all(dir).map_err(prep)?;
                    std::fs::set_permissions(
                        dir,
                        std::os::unix::fs::PermissionsExt::from_mode(*mode),
                    )
                    .map_err(prep)?;
                    std::os::unix::fs::chown(dir, Some(*uid), Some(*gid)).map_err(prep)?;
                }
                let t = hostp(target.as_deref().unwrap_or(Path::new("")), "")?;
                ops.push(bind_op(
                    "a cache mount",
                    hostp(dir, "")?,
                    t.clone(),
                    MsFlags::empty(),
                ));
                if *readonly {
                    ops.push(ro_remount("a read-only cache mount", t, false));
                }
            }
            (ir::Mount::Tmpfs { size, .. }, PreparedMount::Tmpfs) => {
                let data = match size {
                    Some(s) => format!("mode=1777,size={s}"),
                    None => "mode=1777".to_string(),
                };
                let t = hostp(target.as_deref().unwrap_or(Path::new("")), "")?;
                ops.push(mount_op(
                    "a tmpfs mount",
                    Some("tmpfs"),
                    t,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(&data),
                ));
            }
            (
                ir::Mount::Secret {
                    id,
                    env: var,
                    required,
                    mode,
                    uid,
                    gid,
                    ..
                },
                PreparedMount::Secret { file },
            ) => {
                let Some(file) = file else {
                    if *required {
                        return Err(ExecError::SecretMissing { id: id.clone() });
                    }
                    continue;
                };
                let content = std::fs::read(file).map_err(|source| ExecError::SecretRead {
                    id: id.clone(),
                    path: file.clone(),
                    source,
                })?;
                if let Some(var) = var {
                    let mut e = format!("{var}=").into_bytes();
                    e.extend_from_slice(&content);
                    env.push(e);
                }
                if let Some(t) = target {
                    // The copy lives in a tmpfs over the scratch dir, mounted only in the
                    // step's namespace and unreachable once the old root is detached.
                    if !secrets_mounted {
                        std::fs::create_dir(sp.join("secrets")).map_err(|source| {
                            ExecError::Prepare {
                                what: "create",
                                path: sp.join("secrets").display().to_string(),
                                source,
                            }
                        })?;
                        ops.push(mount_op(
                            "the secrets tmpfs",
                            Some("tmpfs"),
                            hostp(sp, "/secrets")?,
                            Some("tmpfs"),
                            nosuid_all,
                            Some("mode=0700"),
                        ));
                        secrets_mounted = true;
                    }
                    let copy = hostp(sp, &format!("/secrets/{i}"))?;
                    ops.push(Op::Write {
                        path: copy.clone(),
                        content,
                        mode: *mode,
                        uid: *uid,
                        gid: *gid,
                    });
                    let t = hostp(&t, "")?;
                    ops.push(bind_op("a secret", copy, t.clone(), MsFlags::empty()));
                    ops.push(ro_remount("a secret", t, false));
                }
            }
            (ir::Mount::Ssh { .. }, _) => return Err(ExecError::SshUnsupported),
            (ir::Mount::Bind { .. }, _) => return Err(kind_err("bind")),
            (ir::Mount::Cache { .. }, _) => return Err(kind_err("cache")),
            (ir::Mount::Tmpfs { .. }, _) => return Err(kind_err("tmpfs")),
            (ir::Mount::Secret { .. }, _) => return Err(kind_err("secret")),
        }
    }

    // WORKDIR: created if missing, owned by the user (as BuildKit's WORKDIR does); it stays.
    ensure(
        &root_fd,
        &root_host,
        "workdir",
        &run.workdir,
        true,
        Some((user.uid, user.gid)),
        None,
    )?;

    // The command.
    let (argv, program): (Vec<String>, String) = match &run.command {
        ir::Command::Shell { shell, script } => {
            let mut a = shell.clone();
            a.push(script.clone());
            let p = a.first().cloned().unwrap_or_default();
            (a, p)
        }
        ir::Command::Exec { args } => (args.clone(), args.first().cloned().unwrap_or_default()),
        ir::Command::Script { name, content } => {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(ExecError::BadPath {
                    what: "heredoc name",
                    path: name.clone(),
                    why: "must be a plain file name",
                });
            }
            ops.push(Op::Mkdir {
                path: devp("/pipes")?,
            });
            ops.push(Op::Write {
                path: devp(&format!("/pipes/{name}"))?,
                content: content.clone().into_bytes(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            });
            let p = format!("/dev/pipes/{name}");
            (vec![p.clone()], p)
        }
    };
    if program.is_empty() {
        return Err(ExecError::NotFound {
            program: String::new(),
            path: path_var.to_string(),
        });
    }
    let resolved = if program.starts_with("/dev/pipes/") {
        program.clone()
    } else {
        find_program(&root_fd, &program, path_var).ok_or_else(|| ExecError::NotFound {
            program: program.clone(),
            path: path_var.to_string(),
        })?
    };

    let mut unshare = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    match run.network {
        ir::Network::None => unshare |= CloneFlags::CLONE_NEWNET,
        ir::Network::Default | ir::Network::Host => {}
    }
    let caps = match run.security {
        ir::Security::Sandbox => DEFAULT_CAPS,
        ir::Security::Insecure => u64::MAX,
    };
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(sys::CAP_LAST_CAP_FALLBACK);
    let plan = Plan {
        ops,
        root: hostp(&root_host, "")?,
        hostname: cstr("hostname", req.hostname)?,
        unshare,
        uid: user.uid,
        gid: user.gid,
        groups: user.groups.iter().map(|g| Gid::from_raw(*g)).collect(),
        caps,
        last_cap,
        workdir: cstr("workdir", &run.workdir)?,
        program: cstr("program", &resolved)?,
        argv: argv
            .iter()
            .map(|a| cstr("argument", a))
            .collect::<Result<_, _>>()?,
        envp: env
            .into_iter()
            .map(|e| cstr("environment variable", e))
            .collect::<Result<_, _>>()?,
        stdio: req.stdio,
    };
    Ok(Prepared {
        plan,
        root_fd,
        created: prepared_created,
        _scratch: scratch,
    })
}

// ---------------------------------------------------------------------------------------
// Signals

const SLOTS: usize = 64;
static STEP_PIDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
static SIGNALLED: AtomicI32 = AtomicI32::new(0);
static GUARDS: Mutex<(usize, Vec<(Signal, SigAction)>)> = Mutex::new((0, Vec::new()));
const HANDLED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
    for slot in &STEP_PIDS {
        let pid = slot.load(Ordering::SeqCst);
        if pid > 0 {
            // kill(2) is async-signal-safe; the step's processes die, and the thread running
            // the step notices and cleans up.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// While alive, SIGINT, SIGTERM and SIGHUP do not kill Kiln: they SIGKILL every running step
/// and are remembered, so the step returns [`ExecError::Interrupted`] and every guard on the
/// way out (overlay, cgroup, scratch files) runs. The previous handlers come back when the
/// last guard drops. The driver holds one across mount, run and unmount; [`run`] holds one
/// too. Callers should exit with 128 + [`SignalGuard::interrupted`] afterwards.
pub struct SignalGuard {
    _private: (),
}

impl SignalGuard {
    /// Installs the handlers (reference-counted across threads).
    pub fn install() -> SignalGuard {
        let mut g = GUARDS.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 == 0 {
            let action = SigAction::new(
                SigHandler::Handler(on_signal),
                SaFlags::SA_RESTART,
                SigSet::empty(),
            );
            for s in HANDLED {
                // SAFETY: `on_signal` only does atomic loads/stores and kill(2), all
                // async-signal-safe, so it may interrupt any code.
                if let Ok(old) = unsafe { nix::sys::signal::sigaction(s, &action) } {
                    g.1.push((s, old));
                }
            }
        }
        g.0 += 1;
        SignalGuard { _private: () }
    }

    /// The signal that arrived while a guard was installed, if any.
    pub fn interrupted(&self) -> Option<i32> {
        match SIGNALLED.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        let mut g = GUARDS.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= 1;
        if g.0 == 0 {
            for (s, old) in std::mem::take(&mut g.1) {
                // SAFETY: restores the handler that was installed before ours; it was valid
                // then and handler functions are never unloaded.
                let _ = unsafe { nix::sys::signal::sigaction(s, &old) };
            }
        }
    }
}

/// A registered step pid, unregistered on drop.
struct Tracked(usize);

impl Tracked {
    fn new(pid: i32) -> Option<Tracked> {
        for (i, slot) in STEP_PIDS.iter().enumerate() {
            if slot
                .compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Some(Tracked(i));
            }
        }
        tracing::warn!("more than {SLOTS} steps at once: a signal will not reach this one");
        None
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        STEP_PIDS[self.0].store(0, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------
// Running

/// Runs the step and waits for it. Output lines go to `req.output` as they arrive.
pub fn run(req: ExecRequest<'_>) -> Result<ExecOutcome, ExecError> {
    let guard = SignalGuard::install();
    if let Some(signal) = guard.interrupted() {
        return Err(ExecError::Interrupted { signal });
    }
    let prepared = prepare(&req)?;
    let cgroup = if req.limits.is_empty() {
        None
    } else {
        Some(StepCgroup::create(&Layout::host()?, &req.limits)?)
    };
    let result = spawn(&prepared.plan, cgroup.as_ref(), req.output, req.timeout);
    let oom_killed = cgroup.as_ref().is_some_and(|c| c.oom_killed());
    if let Some(cg) = cgroup {
        cg.remove()?;
    }
    drop(prepared);
    let mut outcome = result?;
    outcome.oom_killed = oom_killed;
    if let Some(signal) = guard.interrupted() {
        return Err(ExecError::Interrupted { signal });
    }
    Ok(outcome)
}

fn spawn_err(what: &'static str) -> impl FnOnce(Errno) -> ExecError {
    move |e| ExecError::Spawn {
        what,
        source: e.into(),
    }
}

/// Messages from the children on the sync pipe.
const MSG_PID: u8 = b'P';
const MSG_USERNS: u8 = b'U';
const MSG_ERROR: u8 = b'E';
const ERR_OP: u8 = 0;
const ERR_STAGE: u8 = 1;
const ERR_EXEC: u8 = 2;

/// Kills the step if it is still running when dropped (an early return in the parent).
struct KillOnDrop {
    c: Pid,
    d: Option<Pid>,
    reaped: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        if let Some(d) = self.d {
            let _ = nix::sys::signal::kill(d, Signal::SIGKILL);
        }
        let _ = nix::sys::signal::kill(self.c, Signal::SIGKILL);
        let _ = waitpid(self.c, None);
    }
}

fn spawn(
    plan: &Plan,
    cgroup: Option<&StepCgroup>,
    output: &mut dyn FnMut(Stream, &str),
    timeout: Option<Duration>,
) -> Result<ExecOutcome, ExecError> {
    let (up_r, up_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(spawn_err("create a pipe"))?;
    let (down_r, down_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(spawn_err("create a pipe"))?;
    let ((out_r, out_w), (err_r, err_w)) = match plan.stdio {
        Stdio::Capture => {
            let pipe = || {
                nix::unistd::pipe2(OFlag::O_CLOEXEC)
                    .map(|(r, w)| (Some(r), w))
                    .map_err(spawn_err("create a pipe"))
            };
            (pipe()?, pipe()?)
        }
        Stdio::Inherit => {
            let dup = |fd: std::os::fd::BorrowedFd<'_>| {
                nix::unistd::dup(fd)
                    .map(|w| (None, w))
                    .map_err(spawn_err("duplicate a standard stream"))
            };
            (dup(io::stdout().as_fd())?, dup(io::stderr().as_fd())?)
        }
    };
    let parent = nix::unistd::getpid();
    let start = Instant::now();
    // SAFETY: the child only runs `child_c`, which uses the prepared plan, raw syscalls and
    // libc's post-fork-safe malloc, and never returns (it `_exit`s or `execve`s).
    let c = match unsafe { nix::unistd::fork() }.map_err(spawn_err("fork"))? {
        ForkResult::Child => {
            drop((up_r, down_w, out_r, err_r));
            child_c(plan, parent, up_w, down_r, out_w, err_w)
        }
        ForkResult::Parent { child } => child,
    };
    drop((up_w, down_r, out_w, err_w));
    let mut kill = KillOnDrop {
        c,
        d: None,
        reaped: false,
    };
    let _tc = Tracked::new(c.as_raw());
    let mut up = File::from(up_r);
    let mut down = File::from(down_w);

    if let Some(cg) = cgroup {
        cg.add_process(c.as_raw())?;
    }
    down.write_all(b"g").map_err(|source| ExecError::Spawn {
        what: "start the step",
        source,
    })?;

    let mut tag = [0u8; 1];
    let read_err = |source| ExecError::Spawn {
        what: "sync with the step",
        source,
    };
    let child_error = |up: &mut File| -> ExecError {
        let mut rest = [0u8; 9];
        if let Err(source) = up.read_exact(&mut rest) {
            return read_err(source);
        }
        let kind = rest[0];
        let idx = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let errno =
            io::Error::from_raw_os_error(i32::from_le_bytes([rest[5], rest[6], rest[7], rest[8]]));
        match kind {
            ERR_OP => ExecError::Setup {
                what: plan.ops.get(idx).map(Op::describe).unwrap_or_default(),
                source: errno,
            },
            ERR_EXEC => ExecError::Exec {
                program: plan.program.to_string_lossy().into_owned(),
                source: errno,
            },
            _ => ExecError::Setup {
                what: STAGES.get(idx).copied().unwrap_or("set up").to_string(),
                source: errno,
            },
        }
    };
    // 'P' + pid of D.
    let expect = |up: &mut File, tag: &mut [u8; 1], want: u8| -> Result<(), ExecError> {
        match up.read(tag) {
            Ok(0) => Err(read_err(io::Error::from(io::ErrorKind::UnexpectedEof))),
            Ok(_) if tag[0] == want => Ok(()),
            Ok(_) if tag[0] == MSG_ERROR => Err(child_error(up)),
            Ok(_) => Err(read_err(io::Error::other("unexpected message"))),
            Err(e) => Err(read_err(e)),
        }
    };
    expect(&mut up, &mut tag, MSG_PID)?;
    let mut pid = [0u8; 4];
    up.read_exact(&mut pid).map_err(read_err)?;
    let d = Pid::from_raw(i32::from_le_bytes(pid));
    kill.d = Some(d);
    let _td = Tracked::new(d.as_raw());
    expect(&mut up, &mut tag, MSG_USERNS)?;
    for file in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{}/{file}", d.as_raw()), "0 0 4294967295\n")
            .map_err(|source| ExecError::IdMap { file, source })?;
    }
    down.write_all(b"m").map_err(|source| ExecError::Spawn {
        what: "start the step",
        source,
    })?;
    // EOF: D has exec'd (the pipe is close-on-exec).
    match up.read(&mut tag) {
        Ok(0) => {}
        Ok(_) if tag[0] == MSG_ERROR => return Err(child_error(&mut up)),
        Ok(_) => return Err(read_err(io::Error::other("unexpected message"))),
        Err(e) => return Err(read_err(e)),
    }

    let pidfd = sys::pidfd_open(c.as_raw()).map_err(|source| ExecError::Spawn {
        what: "open a pidfd",
        source,
    })?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    let mut streams = [
        (out_r, Vec::new(), Stream::Stdout),
        (err_r, Vec::new(), Stream::Stderr),
    ];
    let mut exited = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if exited && streams.iter().all(|s| s.0.is_none()) {
            break;
        }
        let wait_ms = match deadline {
            Some(dl) if !timed_out => {
                let left = dl.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    timed_out = true;
                    let _ = nix::sys::signal::kill(d, Signal::SIGKILL);
                    continue;
                }
                (left.as_millis().min(60_000) as u16).max(1)
            }
            _ => 60_000,
        };
        let mut fds: Vec<nix::poll::PollFd<'_>> = Vec::new();
        let mut which = Vec::new();
        for (i, s) in streams.iter().enumerate() {
            if let Some(fd) = &s.0 {
                fds.push(nix::poll::PollFd::new(
                    fd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                ));
                which.push(Some(i));
            }
        }
        if !exited {
            fds.push(nix::poll::PollFd::new(
                pidfd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            ));
            which.push(None);
        }
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(wait_ms)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(ExecError::Wait(e.into())),
        }
        let ready: Vec<Option<usize>> = fds
            .iter()
            .zip(&which)
            .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, w)| *w)
            .collect();
        drop(fds);
        for w in ready {
            let Some(i) = w else {
                exited = true;
                continue;
            };
            let (fd, pending, stream) = &mut streams[i];
            let n = match fd.as_ref().map(|f| nix::unistd::read(f.as_fd(), &mut buf)) {
                Some(Ok(n)) => n,
                Some(Err(Errno::EINTR | Errno::EAGAIN)) => continue,
                Some(Err(_)) | None => 0,
            };
            if n == 0 {
                if !pending.is_empty() {
                    output(*stream, &String::from_utf8_lossy(pending));
                    pending.clear();
                }
                *fd = None;
                continue;
            }
            pending.extend_from_slice(&buf[..n]);
            while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                output(*stream, &String::from_utf8_lossy(&line[..line.len() - 1]));
            }
            if pending.len() > 64 * 1024 {
                output(*stream, &String::from_utf8_lossy(pending));
                pending.clear();
            }
        }
    }
    let status = loop {
        match waitpid(c, None) {
            Ok(WaitStatus::Exited(_, code)) => break ExitStatus::Exited(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => break ExitStatus::Signaled(sig as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(ExecError::Wait(e.into())),
        }
    };
    kill.reaped = true;
    Ok(ExecOutcome {
        status,
        timed_out,
        oom_killed: false,
        elapsed: start.elapsed(),
    })
}

/// Reports a failure to the parent and exits. Never returns.
fn fail(up: &OwnedFd, kind: u8, idx: usize, errno: Errno) -> ! {
    let mut msg = [0u8; 10];
    msg[0] = MSG_ERROR;
    msg[1] = kind;
    msg[2..6].copy_from_slice(&(idx as u32).to_le_bytes());
    msg[6..10].copy_from_slice(&(errno as i32).to_le_bytes());
    let _ = nix::unistd::write(up, &msg);
    // SAFETY: _exit ends the forked child without running the parent's atexit handlers or
    // destructors, which belong to the parent.
    unsafe { libc::_exit(125) }
}

fn stage(up: &OwnedFd, name: &str, r: nix::Result<()>) {
    if let Err(e) = r {
        let idx = STAGES.iter().position(|s| *s == name).unwrap_or(usize::MAX);
        fail(up, ERR_STAGE, idx, e);
    }
}

fn read_byte(fd: &OwnedFd) -> Option<u8> {
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(fd.as_fd(), &mut b) {
            Ok(1) => return Some(b[0]),
            Err(Errno::EINTR) => continue,
            _ => return None,
        }
    }
}

fn exit_now(code: i32) -> ! {
    // SAFETY: see `fail`.
    unsafe { libc::_exit(code) }
}

/// C: the namespaces' creator and D's reaper.
fn child_c(plan: &Plan, parent: Pid, up: OwnedFd, down: OwnedFd, out: OwnedFd, err: OwnedFd) -> ! {
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || nix::unistd::getppid() != parent
    {
        exit_now(125);
    }
    // Its own session: a terminal's ^C reaches Kiln, which kills the step, and not the step's
    // processes directly.
    let _ = nix::unistd::setsid();
    for s in HANDLED {
        // SAFETY: restoring the default disposition installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(s, SigHandler::SigDfl) };
    }
    if read_byte(&down) != Some(b'g') {
        exit_now(125);
    }
    stage(
        &up,
        "unshare the namespaces",
        nix::sched::unshare(plan.unshare),
    );
    // SAFETY: as for the first fork: D runs only `child_d`, which never returns.
    let d = match unsafe { nix::unistd::fork() } {
        Ok(ForkResult::Child) => child_d(plan, up, down, out, err),
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => fail(&up, ERR_STAGE, 1, e),
    };
    let mut msg = [0u8; 5];
    msg[0] = MSG_PID;
    msg[1..].copy_from_slice(&d.as_raw().to_le_bytes());
    let _ = nix::unistd::write(&up, &msg);
    drop((up, down, out, err));
    loop {
        match waitpid(d, None) {
            Ok(WaitStatus::Exited(_, code)) => exit_now(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                // Die the same way, so Kiln sees the signal.
                // SAFETY: restoring the default disposition installs no handler code.
                let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
                let _ = nix::sys::signal::kill(nix::unistd::getpid(), sig);
                exit_now(128 + sig as i32)
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => exit_now(125),
        }
    }
}

/// D: pid 1 of the step. Mounts, pivots, enters the user namespace, becomes the user, execs.
fn child_d(plan: &Plan, up: OwnedFd, down: OwnedFd, out: OwnedFd, err: OwnedFd) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    stage(
        &up,
        "redirect standard streams",
        nix::unistd::dup2_stdout(&out),
    );
    stage(
        &up,
        "redirect standard streams",
        nix::unistd::dup2_stderr(&err),
    );
    drop((out, err));
    for (i, op) in plan.ops.iter().enumerate() {
        if let Err(e) = run_op(op) {
            let optional = matches!(op, Op::Mount { optional: true, .. });
            if !(optional && matches!(e, Errno::ENOENT | Errno::ENOTDIR)) {
                fail(&up, ERR_OP, i, e);
            }
        }
    }
    stage(
        &up,
        "set the hostname",
        nix::unistd::sethostname(OsStr::from_bytes(plan.hostname.as_bytes())),
    );
    pivot(plan, &up);
    stage(
        &up,
        "create the user namespace",
        nix::sched::unshare(CloneFlags::CLONE_NEWUSER),
    );
    if nix::unistd::write(&up, &[MSG_USERNS]).is_err() || read_byte(&down) != Some(b'm') {
        exit_now(125);
    }
    stage(
        &up,
        "set supplementary groups",
        nix::unistd::setgroups(&plan.groups),
    );
    stage(
        &up,
        "drop capabilities",
        sys::drop_bounding_except(plan.caps, plan.last_cap)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0))),
    );
    let gid = Gid::from_raw(plan.gid);
    let uid = Uid::from_raw(plan.uid);
    stage(&up, "set the gid", nix::unistd::setresgid(gid, gid, gid));
    stage(&up, "set the uid", nix::unistd::setresuid(uid, uid, uid));
    if plan.uid == 0 && plan.caps != u64::MAX {
        stage(
            &up,
            "set capabilities",
            sys::set_capabilities(plan.caps)
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0))),
        );
    }
    stage(
        &up,
        "enter the working directory",
        nix::unistd::chdir(plan.workdir.as_c_str()),
    );
    if plan.stdio == Stdio::Capture {
        match nix::fcntl::open(c"/dev/null", OFlag::O_RDONLY, Mode::empty()) {
            Ok(null) => stage(
                &up,
                "redirect standard streams",
                nix::unistd::dup2_stdin(&null),
            ),
            Err(e) => fail(&up, ERR_STAGE, 14, e),
        }
    }
    // Rust ignores SIGPIPE; the command must get the default dispositions and an empty mask.
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: restoring the default disposition installs no handler code.
            let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
        }
    }
    stage(
        &up,
        "reset signals",
        nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&SigSet::empty()),
            None,
        ),
    );
    drop(down);
    let _ = sys::cloexec_from(3);
    let e = match nix::unistd::execve(plan.program.as_c_str(), &plan.argv, &plan.envp) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    fail(&up, ERR_EXEC, 0, e)
}

fn run_op(op: &Op) -> nix::Result<()> {
    match op {
        Op::Mount {
            src,
            target,
            fstype,
            flags,
            data,
            ..
        } => nix::mount::mount(
            src.as_deref(),
            target.as_c_str(),
            fstype.as_deref(),
            *flags,
            data.as_deref(),
        ),
        Op::Mkdir { path } => nix::unistd::mkdir(path.as_c_str(), Mode::from_bits_truncate(0o755)),
        Op::Touch { path } => nix::fcntl::open(
            path.as_c_str(),
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        )
        .map(drop),
        Op::Symlink { target, link } => {
            nix::unistd::symlinkat(*target, nix::fcntl::AT_FDCWD, link.as_c_str())
        }
        Op::Write {
            path,
            content,
            mode,
            uid,
            gid,
        } => {
            let fd = nix::fcntl::open(
                path.as_c_str(),
                OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )?;
            let mut rest = &content[..];
            while !rest.is_empty() {
                match nix::unistd::write(&fd, rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(Errno::EINTR) => {}
                    Err(e) => return Err(e),
                }
            }
            nix::unistd::fchown(&fd, Some(Uid::from_raw(*uid)), Some(Gid::from_raw(*gid)))?;
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(*mode))
        }
    }
}

/// `pivot_root(".", ".")` as runc does: no directory for the old root is needed in the image.
fn pivot(plan: &Plan, up: &OwnedFd) {
    let old = nix::fcntl::open(
        c"/",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    );
    let new = nix::fcntl::open(
        plan.root.as_c_str(),
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    );
    let (old, new) = match (old, new) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(e), _) | (_, Err(e)) => fail(up, ERR_STAGE, 3, e),
    };
    stage(up, "pivot_root into the root", nix::unistd::fchdir(&new));
    stage(
        up,
        "pivot_root into the root",
        nix::unistd::pivot_root(c".", c"."),
    );
    // "." is now the old root, stacked over the new one.
    stage(up, "detach the old root", nix::unistd::fchdir(&old));
    stage(
        up,
        "detach the old root",
        nix::mount::mount(
            None::<&CStr>,
            c".",
            None::<&CStr>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&CStr>,
        ),
    );
    stage(
        up,
        "detach the old root",
        nix::mount::umount2(c".", MntFlags::MNT_DETACH),
    );
    stage(up, "detach the old root", nix::unistd::chdir(c"/"));
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nalice:x:1000:\nwheel:x:10:alice,bob\naudio:x:29:alice\n";

    #[test]
    fn user_name_gets_passwd_ids_home_and_supplementary_groups() {
        let u = resolve_user(Some("alice"), PASSWD, GROUP).unwrap();
        assert_eq!(
            (u.uid, u.gid, u.groups, u.home.as_deref()),
            (1000, 1000, vec![1000, 10, 29], Some("/home/alice"))
        );
    }

    #[test]
    fn explicit_group_disables_supplementary_groups_but_keeps_the_primary() {
        let u = resolve_user(Some("alice:wheel"), PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.groups), (1000, 10, vec![10]));
        let u = resolve_user(Some("1000:4242"), PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.groups), (1000, 4242, vec![4242]));
    }

    #[test]
    fn numeric_uid_without_entry_runs_with_gid_zero() {
        let u = resolve_user(Some("4321"), PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.groups, u.home), (4321, 0, vec![0], None));
    }

    #[test]
    fn unknown_user_or_group_is_an_error() {
        assert!(
            resolve_user(Some("mallory"), PASSWD, GROUP)
                .unwrap_err()
                .contains("unable to find user mallory")
        );
        assert!(
            resolve_user(Some("alice:nogroup"), PASSWD, GROUP)
                .unwrap_err()
                .contains("unable to find group nogroup")
        );
    }

    #[test]
    fn root_resolves_without_a_passwd_file() {
        let u = resolve_user(None, "", "").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_deref()), (0, 0, Some("/root")));
    }

    #[test]
    fn mount_paths_with_dotdot_are_rejected() {
        assert!(components("mount target", "/a/../b").is_err());
        assert!(components("mount target", "rel").is_err());
        assert_eq!(
            components("mount target", "/a//b/./c").unwrap(),
            vec!["a", "b", "c"]
        );
    }
}
