//! The namespace driver: each `RUN` step runs on an overlayfs stack in Linux namespaces on
//! this host (see [`crate::build::executor`] for the namespaces and their limits).
//!
//! Owns the per-step directories beside the upper layer (`UPPER.work` for overlayfs,
//! `UPPER.merged` for the mount, `UPPER.stub` for mount points) and their removal.
//!
//! The stub is a small lower layer stacked on top holding the mount points the image lacks
//! (`/proc`, `/dev`, `/sys`, `/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname`, `RUN --mount`
//! targets), so creating them leaves nothing in the upper layer. Stub directories copy the
//! owner and mode of the image's directory of the same path. A mount point whose path crosses
//! a symlink or non-directory in the image is not stubbed; the executor then creates it inside
//! the root and removes it afterwards (its parent directories may stay in the upper layer as
//! empty copied-up directories).

use super::{Driver, DriverError, StepOutcome, StepRequest};
use crate::build::executor::{self, ExecError, ExecRequest, SignalGuard};
use crate::build::overlay::{self, Layers};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Runs steps in namespaces on this host (needs root).
#[derive(Debug, Clone, Default)]
pub struct NamespaceDriver;

fn sibling(upper: &Path, suffix: &str) -> PathBuf {
    let mut s = upper.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn dirs_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DriverError {
    let path = path.to_path_buf();
    move |source| DriverError::Dirs { what, path, source }
}

/// Removes the step's scratch directories on drop.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for d in &self.0 {
            if let Err(e) = fs::remove_dir_all(d)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %d.display(), error = %e, "step directory left behind");
            }
        }
    }
}

/// What the topmost layer holding `rel` has there (`None`: absent or whited out).
fn lookup(lowers: &[PathBuf], rel: &Path) -> Option<fs::Metadata> {
    for l in lowers {
        if let Ok(m) = fs::symlink_metadata(l.join(rel)) {
            if m.file_type().is_char_device() && m.rdev() == 0 {
                return None;
            }
            return Some(m);
        }
    }
    None
}

/// Adds `mp` to the stub unless the image already has it or its path is not plain
/// directories. Returns whether anything was added.
fn stub_mountpoint(
    stub: &Path,
    lowers: &[PathBuf],
    mp: &executor::Mountpoint,
) -> std::io::Result<bool> {
    let comps: Vec<&str> = mp
        .path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if comps.is_empty() || comps.contains(&"..") {
        return Ok(false);
    }
    let full: PathBuf = comps.iter().collect();
    if let Some(m) = lookup(lowers, &full) {
        // Present already (or something else is there: the executor reports it).
        let _ = m;
        return Ok(false);
    }
    let mut rel = PathBuf::new();
    for (i, c) in comps.iter().enumerate() {
        rel.push(c);
        let last = i + 1 == comps.len();
        let in_image = lookup(lowers, &rel);
        if !last && in_image.as_ref().is_some_and(|m| !m.is_dir()) {
            return Ok(false);
        }
        let at = stub.join(&rel);
        if fs::symlink_metadata(&at).is_ok() {
            continue;
        }
        if last && !mp.dir {
            fs::File::create(&at)?;
            continue;
        }
        fs::create_dir(&at)?;
        if let Some(m) = in_image {
            fs::set_permissions(&at, fs::Permissions::from_mode(m.mode() & 0o7777))?;
            std::os::unix::fs::lchown(&at, Some(m.uid()), Some(m.gid()))?;
        }
    }
    Ok(true)
}

impl Driver for NamespaceDriver {
    fn name(&self) -> &'static str {
        "namespace"
    }

    fn run_step(
        &self,
        lowers: &[PathBuf],
        upper: &Path,
        req: StepRequest<'_>,
    ) -> Result<StepOutcome, DriverError> {
        let started = Instant::now();
        // Held across mount, run and unmount, so a ^C in between still unwinds cleanly.
        let signals = SignalGuard::install();
        fs::create_dir_all(upper).map_err(dirs_err("create", upper))?;
        let work = sibling(upper, ".work");
        let merged = sibling(upper, ".merged");
        let stub = sibling(upper, ".stub");
        let scratch = Scratch(vec![work.clone(), merged.clone(), stub.clone()]);
        for d in &scratch.0 {
            match fs::remove_dir_all(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(dirs_err("clear", d)(e)),
            }
            fs::create_dir(d).map_err(dirs_err("create", d))?;
        }
        let mut stubbed = false;
        for mp in executor::mountpoints(req.run, req.mounts) {
            stubbed |= stub_mountpoint(&stub, lowers, &mp)
                .map_err(dirs_err("create a mount point in", &stub))?;
        }
        let mut stack = Vec::with_capacity(lowers.len() + 1);
        if stubbed {
            stack.push(stub.clone());
        }
        stack.extend_from_slice(lowers);
        let mounted = overlay::mount(
            &Layers {
                lowers: &stack,
                upper,
                work: &work,
            },
            &merged,
        )?;
        let result = exec_in(&merged, req);
        mounted.unmount()?;
        drop(scratch);
        step_outcome(result, &signals, started)
    }
}

impl NamespaceDriver {
    /// Runs the step with `root` itself as its root tree, so its writes land there (a
    /// microVM sandbox's own disk, in the guest); mount points the tree lacks are made and
    /// removed by the executor.
    pub fn run_in_root(
        &self,
        root: &Path,
        req: StepRequest<'_>,
    ) -> Result<StepOutcome, DriverError> {
        let started = Instant::now();
        let signals = SignalGuard::install();
        let result = exec_in(root, req);
        step_outcome(result, &signals, started)
    }
}

fn exec_in(root: &Path, req: StepRequest<'_>) -> Result<executor::ExecOutcome, ExecError> {
    executor::run(ExecRequest {
        root,
        run: req.run,
        hostname: req.hostname,
        mounts: req.mounts,
        resolv_conf: req.resolv_conf,
        limits: req.limits,
        output: req.output,
        stdio: req.stdio,
        timeout: req.timeout,
    })
}

fn step_outcome(
    result: Result<executor::ExecOutcome, ExecError>,
    signals: &SignalGuard,
    started: Instant,
) -> Result<StepOutcome, DriverError> {
    if let Some(signal) = signals.interrupted() {
        return Err(DriverError::Interrupted { signal });
    }
    let outcome = match result {
        Ok(o) => o,
        Err(ExecError::Interrupted { signal }) => {
            return Err(DriverError::Interrupted { signal });
        }
        Err(e) => return Err(e.into()),
    };
    Ok(StepOutcome {
        status: outcome.status,
        exit_code: outcome.status.code(),
        timed_out: outcome.timed_out,
        oom_killed: outcome.oom_killed,
        run_time: outcome.elapsed,
        total_time: started.elapsed(),
    })
}
