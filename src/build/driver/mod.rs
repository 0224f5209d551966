//! Build drivers: what runs one `RUN` step on top of a stack of layers and leaves its changes
//! in an upper directory. The step loop calls [`Driver::run_step`] and never sees namespaces,
//! overlays or VMs.
//!
//! Owns the interface and the outcome type; `namespace` is the in-process driver (Linux
//! namespaces + overlayfs), `microvm` runs each step in a QEMU microVM (which runs the
//! namespace driver inside the guest).

#[cfg(feature = "host")]
pub mod microvm;
pub mod namespace;

use super::cgroup::Limits;
use super::executor::{ExecError, ExitStatus, PreparedMount, Stdio, Stream};
use super::overlay::OverlayError;
use crate::ir;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[cfg(feature = "host")]
pub use microvm::{MicrovmDriver, MicrovmOptions};
pub use namespace::NamespaceDriver;

/// One step for a driver: the executor's request without the root (the driver makes it).
pub struct StepRequest<'a> {
    /// The step.
    pub run: &'a ir::Run,
    /// The hostname inside the step.
    pub hostname: &'a str,
    /// One entry per `run.mounts` entry, same order (the caller resolved the host sides).
    pub mounts: &'a [PreparedMount],
    /// `/etc/resolv.conf` content; `None` copies the host's.
    pub resolv_conf: Option<&'a str>,
    /// Resource limits.
    pub limits: Limits,
    /// Receives each output line as it arrives (the caller prefixes the step number).
    pub output: &'a mut dyn FnMut(Stream, &str),
    /// Where the command's standard streams go (build steps capture them).
    pub stdio: Stdio,
    /// Kill the step after this long.
    pub timeout: Option<Duration>,
}

/// How a step went. A non-zero exit is an outcome, not an error: the step loop decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    /// How the command ended.
    pub status: ExitStatus,
    /// The shell's view of `status` (128 + signal when killed; 137 for a timeout or OOM).
    pub exit_code: i32,
    /// Killed at the timeout.
    pub timed_out: bool,
    /// The memory limit's OOM killer struck.
    pub oom_killed: bool,
    /// Time the command ran.
    pub run_time: Duration,
    /// Time for the whole step, mounting and clean-up included.
    pub total_time: Duration,
}

/// What went wrong in a driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The step's directories could not be prepared or removed.
    #[error("cannot {what} {path}")]
    Dirs {
        /// The action.
        what: &'static str,
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mounting or unmounting the overlay failed.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// Running the step failed (setup, not the command's exit code).
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The builder VM failed (see [`crate::vm::VmError::is_environment`]).
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// Kiln got a termination signal; the step was killed and cleaned up.
    #[error("interrupted by signal {signal}")]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
}

/// Runs steps.
pub trait Driver {
    /// The name `describe` records (`namespace`, `microvm`).
    fn name(&self) -> &'static str;

    /// Runs `req` on top of `lowers` (read-only layers, top first; empty for scratch),
    /// writing its changes into `upper` (an empty directory, created if missing), and returns
    /// once everything the step mounted or started is gone.
    fn run_step(
        &self,
        lowers: &[PathBuf],
        upper: &Path,
        req: StepRequest<'_>,
    ) -> Result<StepOutcome, DriverError>;
}
