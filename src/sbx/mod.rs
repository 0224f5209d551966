//! Sandboxes: a copy-on-write root over an image's snapshot, and commands run in it with
//! the image's ENV, WORKDIR and USER, on the namespace runtime or in a microVM.
//!
//! Owns `KILN_HOME/sandboxes-v1/ID/` (the record `sandbox.json`, the writable layer `upper/`
//! or the microVM's disk `root.qcow2`, and a `lock` file) and the shared read-only mounts of
//! snapshot disks under `KILN_HOME/mnt-v1/SNAP/`. It does not resolve names (the CLI asks the
//! registry) and does not write snapshots (the CLI imports a [`Sandbox::view`]).
//!
//! # Namespace runtime
//!
//! A snapshot's ext4 disk is loop-mounted read-only once, at `mnt-v1/SNAP`, and stays mounted
//! for every sandbox of that image: launching a sandbox costs one overlayfs mount, not a loop
//! device and an ext4 mount. `kiln gc` unmounts the ones no sandbox uses
//! ([`Sandboxes::unmount_unused`]). A sandbox's root is overlayfs with that mount as its only
//! lower and `upper/` as its upper, so nothing is copied and the disk is never written.
//!
//! Each [`Sandbox::exec`] mounts the overlay, runs one command through the namespace driver
//! (new mount, pid, uts, ipc and user namespaces; `--network none` adds a net namespace) and
//! unmounts. Files persist between commands; processes do not: when the command exits, the
//! pid namespace ends and everything it started goes with it. Commands in one sandbox run one
//! at a time (an exclusive `flock` on `lock`), since two overlays may not share an upper.
//!
//! # MicroVM runtime
//!
//! The sandbox's disk is a qcow2 file backed by the snapshot's disk ([`crate::vm::disk`]):
//! made in milliseconds, a few hundred KiB, and the snapshot is never written. Each command
//! boots a microVM from it (the build's kernel, initramfs and agent); the agent mounts the
//! disk writable and runs the command with the same executor, on the disk itself, then
//! unmounts it cleanly and powers off. So files persist between commands and processes do
//! not, as on the namespace runtime. Output comes back line by line; stdin is empty.
//! `sbx snapshot` reads the disk through a sparse raw copy, loop-mounted read-only.

use crate::build::cgroup::Limits;
use crate::build::driver::microvm::{MicrovmDriver, MicrovmOptions};
use crate::build::driver::{Driver, DriverError, NamespaceDriver, StepOutcome, StepRequest};
use crate::build::executor::{Stdio, Stream};
use crate::build::run::View;
use crate::home::Home;
use crate::ir;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What went wrong with a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SbxError {
    /// No sandbox of this id in the project.
    #[error("no sandbox {id}")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// Another command holds the sandbox.
    #[error("sandbox {id} is busy: another command is running in it")]
    Busy {
        /// The sandbox.
        id: String,
    },
    /// A file or directory of the sandbox could not be read or written.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// The action.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A sandbox record is not valid JSON.
    #[error("sandbox record {} is damaged", path.display())]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The snapshot disk could not be mounted.
    #[error("cannot mount {}: {detail}", disk.display())]
    Mount {
        /// The disk.
        disk: PathBuf,
        /// mount(8)'s message.
        detail: String,
    },
    /// The image gives nothing to run and the command line neither.
    #[error("no command: the image has no ENTRYPOINT or CMD; pass one after --")]
    NoCommand,
    /// Running the command failed before it started (not its exit code).
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The root view for a snapshot could not be mounted.
    #[error("cannot mount the sandbox's root: {0}")]
    View(String),
    /// The microVM runtime failed before the command ran (QEMU, kernel, disks).
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
}

type Result<T> = std::result::Result<T, SbxError>;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SbxError {
    let path = path.to_path_buf();
    move |source| SbxError::Io { what, path, source }
}

/// [`Record::runtime`] of a microVM sandbox (the other is `namespace`).
pub const MICROVM: &str = "microvm";

/// A microVM sandbox's root disk in its directory: a qcow2 clone of the snapshot disk.
const ROOT_QCOW2: &str = "root.qcow2";

/// A sandbox id: `sbx_` + a ULID.
pub fn new_id() -> String {
    format!("sbx_{}", ulid::Ulid::generate())
}

/// Whether `s` is shaped like a sandbox id (so it is safe as a directory name).
pub fn valid_id(s: &str) -> bool {
    s.strip_prefix("sbx_")
        .is_some_and(|u| ulid::Ulid::from_string(u).is_ok() && u.len() == 26)
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// How commands run in a sandbox: the image's settings with the launch flags applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The environment, in order (`K`, `V`).
    pub env: Vec<(String, String)>,
    /// The working directory.
    pub workdir: String,
    /// The user (`None`: root).
    pub user: Option<String>,
    /// `false` with `--network none`.
    pub network: bool,
    /// `--cpus`.
    pub cpus: Option<f64>,
    /// `--memory`, MiB.
    pub memory_mb: Option<u64>,
    /// `--timeout`, seconds, for each command.
    pub timeout_secs: Option<u64>,
    /// The image's ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// The image's CMD.
    pub cmd: Vec<String>,
}

/// Launch flags that override an image's settings (`None`/empty: keep the image's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--env K=V`, applied in order over the image's ENV.
    pub env: Vec<(String, String)>,
    /// `--workdir`.
    pub workdir: Option<String>,
    /// `--user`.
    pub user: Option<String>,
    /// `--network none`.
    pub no_network: bool,
    /// `--cpus`.
    pub cpus: Option<f64>,
    /// `--memory`, MiB.
    pub memory_mb: Option<u64>,
    /// `--timeout`, seconds.
    pub timeout_secs: Option<u64>,
}

/// Sets `key` in `env`, replacing an earlier value in place (Docker keeps the first position).
pub fn set_env(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(e) => e.1 = value.to_string(),
        None => env.push((key.to_string(), value.to_string())),
    }
}

impl Settings {
    /// An image's settings (`config` from the registry), with `o` applied.
    pub fn new(config: &ir::ImageConfig, default_memory_mb: Option<u64>, o: &Overrides) -> Self {
        let mut s = Settings {
            env: Vec::new(),
            workdir: config.workdir.clone().unwrap_or_else(|| "/".into()),
            user: config.user.clone().filter(|u| !u.is_empty()),
            network: true,
            cpus: None,
            memory_mb: default_memory_mb,
            timeout_secs: None,
            entrypoint: config.entrypoint.clone().unwrap_or_default(),
            cmd: config.cmd.clone().unwrap_or_default(),
        };
        for kv in &config.env {
            let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
            set_env(&mut s.env, k, v);
        }
        s.apply(o);
        s
    }

    /// Applies launch or exec flags.
    pub fn apply(&mut self, o: &Overrides) {
        for (k, v) in &o.env {
            set_env(&mut self.env, k, v);
        }
        if let Some(w) = &o.workdir {
            self.workdir = w.clone();
        }
        if let Some(u) = &o.user {
            self.user = Some(u.clone());
        }
        if o.no_network {
            self.network = false;
        }
        self.cpus = o.cpus.or(self.cpus);
        self.memory_mb = o.memory_mb.or(self.memory_mb);
        self.timeout_secs = o.timeout_secs.or(self.timeout_secs);
    }

    /// The argv of `sbx run`/`create`'s command as Docker's `run` makes it: ENTRYPOINT, then
    /// the given arguments or else CMD.
    pub fn launch_argv(&self, args: &[String]) -> Result<Vec<String>> {
        let mut argv = self.entrypoint.clone();
        if args.is_empty() {
            argv.extend(self.cmd.iter().cloned());
        } else {
            argv.extend(args.iter().cloned());
        }
        if argv.is_empty() {
            return Err(SbxError::NoCommand);
        }
        Ok(argv)
    }

    fn limits(&self) -> Limits {
        Limits {
            memory_bytes: self.memory_mb.map(|m| m.saturating_mul(1 << 20)),
            cpus: self.cpus,
            pids: None,
        }
    }
}

/// What `sandbox.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `sbx_…`.
    pub id: String,
    /// The project that made it.
    pub project: String,
    /// The image name it was launched from.
    pub image: String,
    /// The snapshot under its root.
    pub snapshot_id: String,
    /// The snapshot's disk.
    pub disk: PathBuf,
    /// The snapshot's size, MiB (the default size of `sbx snapshot`).
    pub disk_mb: u64,
    /// `namespace` or [`MICROVM`].
    pub runtime: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// How commands run.
    pub settings: Settings,
    /// Made by `sbx run` and removed when its command ends: a record whose lock no process
    /// holds is a run whose `kiln` was killed, and `kiln gc` removes it.
    #[serde(default)]
    pub ephemeral: bool,
}

/// The sandboxes of one home.
#[derive(Debug, Clone)]
pub struct Sandboxes {
    home: Home,
    /// The microVM runtime, made on first use and shared by every clone (`sbx run` checks it
    /// at launch and runs on it at exec: QEMU, the KVM probe and the initramfs once).
    vm: std::sync::Arc<std::sync::OnceLock<MicrovmDriver>>,
    root: PathBuf,
    mounts: PathBuf,
}

/// Loop-mounts the ext4 disk `disk` read-only at `target`.
fn mount_ro(disk: &Path, target: &Path) -> Result<()> {
    crate::mount::loop_mount(disk, target, true).map_err(|detail| SbxError::Mount {
        disk: disk.to_path_buf(),
        detail,
    })
}

/// Whether `dir` is a mount point other than its parent's file system.
fn is_mounted(dir: &Path) -> bool {
    match (fs::metadata(dir), dir.parent().map(fs::metadata)) {
        (Ok(d), Some(Ok(p))) => d.dev() != p.dev(),
        _ => false,
    }
}

fn lock(path: &Path, wait: bool) -> std::io::Result<Option<Flock<File>>> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let arg = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(f, arg) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

impl Sandboxes {
    /// The sandboxes of `home` (directories created if missing).
    pub fn open(home: &Home) -> Result<Self> {
        let dir = |name: &str| {
            home.dir(name).map_err(|e| SbxError::Io {
                what: "create",
                path: home.root().join(name),
                source: std::io::Error::other(e.to_string()),
            })
        };
        Ok(Sandboxes {
            home: home.clone(),
            vm: Default::default(),
            root: dir("sandboxes-v1")?,
            mounts: dir("mnt-v1")?,
        })
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// The microVM runtime: QEMU, the kernel, the initramfs (a sandbox needs no scratch disk
    /// of a builder's size).
    fn vm(&self) -> Result<&MicrovmDriver> {
        if let Some(d) = self.vm.get() {
            return Ok(d);
        }
        let opts = MicrovmOptions {
            scratch_mb: 64,
            ..MicrovmOptions::default()
        };
        let made = MicrovmDriver::new(&self.home, opts)?;
        Ok(self.vm.get_or_init(|| made))
    }

    /// The read-only mount of a snapshot's disk, mounting it first if needed.
    pub fn image_root(&self, snapshot_id: &str, disk: &Path) -> Result<PathBuf> {
        let target = self.mounts.join(snapshot_id);
        if is_mounted(&target) {
            return Ok(target);
        }
        let lock_path = self.mounts.join(format!("{snapshot_id}.lock"));
        let _l = lock(&lock_path, true).map_err(io_err("lock", &lock_path))?;
        if is_mounted(&target) {
            return Ok(target);
        }
        fs::create_dir_all(&target).map_err(io_err("create", &target))?;
        mount_ro(disk, &target)?;
        Ok(target)
    }

    /// Unmounts every snapshot mount whose snapshot is not in `in_use`; returns their ids.
    pub fn unmount_unused(&self, in_use: &BTreeSet<String>) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let entries = fs::read_dir(&self.mounts).map_err(io_err("read", &self.mounts))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".lock") || in_use.contains(&name) {
                continue;
            }
            let target = e.path();
            let lock_path = self.mounts.join(format!("{name}.lock"));
            let Some(_l) = lock(&lock_path, false).map_err(io_err("lock", &lock_path))? else {
                continue;
            };
            if is_mounted(&target)
                && let Err(detail) = crate::mount::umount(&target)
            {
                tracing::warn!(mount = %target.display(), %detail, "snapshot mount left");
                continue;
            }
            let _ = fs::remove_dir(&target);
            let _ = fs::remove_file(&lock_path);
            done.push(name);
        }
        Ok(done)
    }

    /// Makes a sandbox: its directory, its record, its empty upper layer; mounts the image.
    pub fn create(&self, rec: &Record) -> Result<Sandbox> {
        let microvm = rec.runtime == MICROVM;
        if microvm {
            // Fails here, before anything is made, on a host that cannot boot one.
            self.vm()?;
        } else {
            self.image_root(&rec.snapshot_id, &rec.disk)?;
        }
        let dir = self.dir(&rec.id);
        fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        // Locked before the record exists, so `kiln gc` never takes a new run for a dead one.
        let lock_path = dir.join("lock");
        let held = match lock(&lock_path, false) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(SbxError::Busy { id: rec.id.clone() }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(io_err("lock", &lock_path)(e));
            }
        };
        let made = (|| {
            if microvm {
                crate::vm::disk::clone_overlay(&rec.disk, &dir.join(ROOT_QCOW2))?;
            } else {
                let upper = dir.join("upper");
                fs::create_dir(&upper).map_err(io_err("create", &upper))?;
            }
            let json = serde_json::to_vec_pretty(rec).map_err(|source| SbxError::BadRecord {
                path: dir.join("sandbox.json"),
                source,
            })?;
            let path = dir.join("sandbox.json");
            crate::fs::write_atomic(&path, &json).map_err(io_err("write", &path))
        })();
        if let Err(e) = made {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(Sandbox {
            rec: rec.clone(),
            dir,
            _lock: held,
            sandboxes: self.clone(),
        })
    }

    fn read(&self, id: &str) -> Result<Option<Record>> {
        let path = self.dir(id).join("sandbox.json");
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| SbxError::BadRecord { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    /// The project's sandbox `id`, locked for this process until dropped (waits for a
    /// command running in it to end).
    pub fn get(&self, project: &str, id: &str) -> Result<Sandbox> {
        self.open_locked(project, id, true)
    }

    fn open_locked(&self, project: &str, id: &str, wait: bool) -> Result<Sandbox> {
        let not_found = || SbxError::NotFound { id: id.to_string() };
        if !valid_id(id) {
            return Err(not_found());
        }
        let dir = self.dir(id);
        let lock_path = dir.join("lock");
        if !dir.is_dir() {
            return Err(not_found());
        }
        let lock = lock(&lock_path, wait)
            .map_err(io_err("lock", &lock_path))?
            .ok_or_else(|| SbxError::Busy { id: id.to_string() })?;
        let rec = self
            .read(id)?
            .filter(|r| r.project == project)
            .ok_or_else(not_found)?;
        Ok(Sandbox {
            rec,
            dir,
            _lock: lock,
            sandboxes: self.clone(),
        })
    }

    /// The project's sandboxes, oldest first.
    pub fn list(&self, project: &str) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for r in self.all()? {
            if r.project == project {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Every sandbox of every project (records that cannot be read are skipped with a
    /// warning).
    pub fn all(&self) -> Result<Vec<Record>> {
        let mut ids: Vec<String> = fs::read_dir(&self.root)
            .map_err(io_err("read", &self.root))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| valid_id(n))
            .collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            match self.read(&id) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping a sandbox"),
            }
        }
        Ok(out)
    }

    /// Removes the project's sandbox `id`; a running command makes it [`SbxError::Busy`].
    pub fn remove(&self, project: &str, id: &str) -> Result<Record> {
        let sbx = self.open_locked(project, id, false)?;
        sbx.remove()
    }
}

/// One sandbox, locked while this value lives.
pub struct Sandbox {
    rec: Record,
    dir: PathBuf,
    _lock: Flock<File>,
    sandboxes: Sandboxes,
}

/// One command to run in a sandbox.
pub struct Exec<'a> {
    /// The argv (`argv[0]` looked up in the sandbox's PATH).
    pub argv: Vec<String>,
    /// How it runs.
    pub settings: &'a Settings,
    /// Where its output goes.
    pub stdio: Stdio,
    /// Output lines with [`Stdio::Capture`].
    pub output: &'a mut dyn FnMut(Stream, &str),
}

impl Sandbox {
    /// The record.
    pub fn record(&self) -> &Record {
        &self.rec
    }

    /// The hostname inside: the id, as a valid host name.
    pub fn hostname(&self) -> String {
        self.rec.id.to_ascii_lowercase().replace('_', "-")
    }

    /// Runs one command and waits for it.
    pub fn exec(&self, e: Exec<'_>) -> Result<StepOutcome> {
        let s = e.settings;
        let run = ir::Run {
            command: ir::Command::Exec { args: e.argv },
            env: s.env.clone(),
            user: s.user.clone(),
            workdir: s.workdir.clone(),
            network: if s.network {
                ir::Network::Host
            } else {
                ir::Network::None
            },
            security: ir::Security::Sandbox,
            mounts: Vec::new(),
            devices: Vec::new(),
        };
        let hostname = self.hostname();
        let req = StepRequest {
            run: &run,
            hostname: &hostname,
            mounts: &[],
            resolv_conf: None,
            limits: s.limits(),
            output: e.output,
            stdio: e.stdio,
            timeout: s.timeout_secs.map(Duration::from_secs),
        };
        if self.rec.runtime == MICROVM {
            let vm = self.sandboxes.vm()?;
            return Ok(vm.run_in_disk(&self.dir.join(ROOT_QCOW2), req)?);
        }
        let lower = self
            .sandboxes
            .image_root(&self.rec.snapshot_id, &self.rec.disk)?;
        Ok(NamespaceDriver.run_step(&[lower], &self.dir.join("upper"), req)?)
    }

    /// A read-only view of the sandbox's root as it is now, mounted under `scratch`.
    pub fn view(&self, scratch: &Path) -> Result<RootView> {
        if self.rec.runtime == MICROVM {
            return DiskView::mount(&self.dir.join(ROOT_QCOW2), scratch).map(RootView::Disk);
        }
        let lower = self
            .sandboxes
            .image_root(&self.rec.snapshot_id, &self.rec.disk)?;
        View::mount(&[lower, self.dir.join("upper")], scratch)
            .map(RootView::Overlay)
            .map_err(|e| SbxError::View(e.to_string()))
    }

    /// Deletes the sandbox (its upper layer and record).
    pub fn remove(self) -> Result<Record> {
        // The record goes first, so a crash half-way leaves a directory `all()` skips and
        // `kiln gc` removes, never a record without its files.
        let rec_path = self.dir.join("sandbox.json");
        fs::remove_file(&rec_path).map_err(io_err("remove", &rec_path))?;
        fs::remove_dir_all(&self.dir).map_err(io_err("remove", &self.dir))?;
        Ok(self.rec)
    }
}

/// A sandbox's root tree, mounted read-only until dropped.
pub enum RootView {
    /// The namespace runtime's image mount and upper layer, merged.
    Overlay(View),
    /// A microVM sandbox's disk.
    Disk(DiskView),
}

impl RootView {
    /// The tree.
    pub fn path(&self) -> &Path {
        match self {
            RootView::Overlay(v) => v.path(),
            RootView::Disk(d) => &d.mount,
        }
    }
}

/// A microVM sandbox's qcow2 disk as a sparse raw copy, loop-mounted read-only.
pub struct DiskView {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl DiskView {
    fn mount(qcow2: &Path, scratch: &Path) -> Result<DiskView> {
        let dir = tempfile::Builder::new()
            .prefix("disk-view-")
            .tempdir_in(scratch)
            .map_err(io_err("create a directory in", scratch))?;
        let raw = dir.path().join("root.ext4");
        crate::vm::disk::to_raw(qcow2, &raw)?;
        let mount = dir.path().join("root");
        fs::create_dir(&mount).map_err(io_err("create", &mount))?;
        mount_ro(&raw, &mount)?;
        Ok(DiskView { _dir: dir, mount })
    }
}

impl Drop for DiskView {
    fn drop(&mut self) {
        if let Err(detail) = crate::mount::umount(&self.mount) {
            tracing::warn!(mount = %self.mount.display(), %detail, "sandbox disk view left mounted");
        }
    }
}

impl Sandboxes {
    /// Removes sandbox directories that have no record (a crash during create or rm) and
    /// `sbx run` sandboxes whose `kiln` died (no lock held); returns how many.
    pub fn remove_leftovers(&self) -> Result<usize> {
        let mut n = 0;
        for e in fs::read_dir(&self.root)
            .map_err(io_err("read", &self.root))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !valid_id(&name) {
                continue;
            }
            let Some(_l) = lock(&e.path().join("lock"), false).ok().flatten() else {
                continue;
            };
            // Kept: a sandbox of `sbx create`, or one whose record this build cannot read.
            match self.read(&name) {
                Ok(Some(r)) if !r.ephemeral => continue,
                Ok(None) | Ok(Some(_)) => {}
                Err(_) => continue,
            }
            // A killed run leaves its overlay mounted in the sandbox's directory.
            let dir = e.path();
            crate::build::overlay::unmount_under(&dir).map_err(io_err("unmount", &dir))?;
            fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_before_they_become_paths() {
        let id = new_id();
        assert!(valid_id(&id));
        for bad in [
            "",
            "sbx_",
            "../x",
            "sbx_../../etc",
            "snap_01J0000000000000000000000",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn flags_override_the_image_and_argv_follows_docker_run() {
        let config = ir::ImageConfig {
            env: vec!["PATH=/bin".into(), "A=1".into(), "B".into()],
            workdir: Some("/app".into()),
            user: Some("app".into()),
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            cmd: Some(vec!["echo hi".into()]),
            ..Default::default()
        };
        let o = Overrides {
            env: vec![("A".into(), "2".into()), ("C".into(), "3".into())],
            workdir: Some("/tmp".into()),
            no_network: true,
            ..Default::default()
        };
        let s = Settings::new(&config, Some(512), &o);
        assert_eq!(
            s.env,
            vec![
                ("PATH".into(), "/bin".into()),
                ("A".into(), "2".into()),
                ("B".into(), String::new()),
                ("C".into(), "3".into())
            ]
        );
        assert_eq!(s.workdir, "/tmp");
        assert_eq!(s.user.as_deref(), Some("app"));
        assert!(!s.network);
        assert_eq!(s.memory_mb, Some(512));
        assert_eq!(
            s.launch_argv(&[]).expect("argv"),
            ["/bin/sh", "-c", "echo hi"]
        );
        assert_eq!(
            s.launch_argv(&["exit 3".into()]).expect("argv"),
            ["/bin/sh", "-c", "exit 3"]
        );
        let bare = Settings::new(&ir::ImageConfig::default(), None, &Overrides::default());
        assert!(matches!(bare.launch_argv(&[]), Err(SbxError::NoCommand)));
        assert_eq!(bare.workdir, "/");
    }
}
