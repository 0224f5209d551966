//! MicroVMs: the guest kernel, the initramfs with the static guest agent, QEMU, and the
//! protocol between host and agent.
//!
//! Owns everything about a VM that is not a build: finding or fetching the kernel
//! ([`kernel`]), the initramfs ([`initramfs`], a cpio written here), the agent binary
//! ([`agent`]), launching and always killing QEMU ([`machine`]), the host end of the agent
//! channel ([`session`]), the frames on it ([`protocol`]), and the agent itself ([`guest`],
//! which runs build steps with the namespace driver inside the VM). The microvm build driver
//! (`build::driver::microvm`) and the microVM sandbox runtime use these; neither knows QEMU's
//! command line.
//!
//! Without the `host` feature only the guest side is compiled ([`protocol`], [`guest`],
//! [`tarball`]): that is what the static `kiln-agent` links.
//!
//! # Choices, measured on this project's 2-core TCG host (see `research/vmlab.md`)
//!
//! - **QEMU `-M microvm`**, KVM when `/dev/kvm` works and the CPU has `vmx`/`svm`, else TCG
//!   (`crate::doctor::kvm`); `KILN_VM_ACCEL=kvm|tcg` overrides. Under TCG the kernel gets
//!   `tsc_early_khz=<host kHz>`: without it microvm boots hang at random (no HPET, no PIT
//!   calibration under TCG).
//! - **Debian's cloud kernel** (`KILN_VM_KERNEL`, else `/boot/vmlinuz-*-cloud-amd64`, else one
//!   Kiln fetched into `KILN_HOME/vm-v1/kernels` with `apt-get download` + `dpkg -x`). It has
//!   virtio as modules, so the initramfs carries them: `virtio_mmio`, `virtio_blk`,
//!   `virtio_console`, `virtio_net`, `overlay` and what they depend on (read from each
//!   module's `.modinfo`), decompressed when the package ships `.ko.xz`/`.ko.zst`.
//! - **Channel: virtio-serial** (a port named [`protocol::PORT_NAME`]; QEMU connects to a Unix
//!   socket Kiln listens on). It needs no extra daemon (vsock here needs `vhost-device-vsock`)
//!   and moved ~200 MB/s in vmlab.
//! - **Disks** are found by virtio-blk serial, not by order: the root disk (read-only ext4 of
//!   the step's merged lower layers), a scratch disk (a cached blank ext4 of
//!   `builder_disk_mb`, opened with `snapshot=on` so the guest's writes are thrown away with
//!   the VM), and a context disk (a raw tar of what `RUN --mount` binds, when there is any).

pub mod guest;
pub mod protocol;
pub mod sys;
pub mod tarball;

#[cfg(feature = "host")]
pub mod agent;
#[cfg(feature = "host")]
pub mod disk;
#[cfg(feature = "host")]
pub mod initramfs;
#[cfg(feature = "host")]
pub mod kernel;
#[cfg(feature = "host")]
pub mod machine;
#[cfg(feature = "host")]
pub mod session;

use std::time::Duration;

/// What went wrong with a VM. [`VmError::is_environment`] tells a host problem (exit 5) from
/// a guest that failed the step (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// QEMU is missing or unusable.
    #[error("QEMU: {reason}")]
    Qemu {
        /// Why.
        reason: String,
    },
    /// No usable guest kernel.
    #[error("guest kernel: {reason}")]
    Kernel {
        /// Why.
        reason: String,
    },
    /// No usable guest agent binary.
    #[error("guest agent: {reason}")]
    Agent {
        /// Why.
        reason: String,
    },
    /// Preparing the VM's files failed (initramfs, disks, sockets).
    #[error("cannot {what}: {source}")]
    Prepare {
        /// The action.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started, or exited before the agent was up.
    #[error("the VM did not start: {reason}{}", tail(console))]
    Launch {
        /// Why.
        reason: String,
        /// The last console lines.
        console: String,
    },
    /// The agent did not say hello in time.
    #[error("the VM did not come up within {}s{}", timeout.as_secs(), tail(console))]
    Boot {
        /// How long it was given.
        timeout: Duration,
        /// The last console lines.
        console: String,
    },
    /// The guest died before it finished (kernel panic, agent crash, QEMU exit).
    #[error("the VM stopped {phase}{}{}", panic.as_ref().map(|l| format!(" (guest {l})")).unwrap_or_default(), tail(console))]
    Crashed {
        /// What it was doing (`while the step ran`, …).
        phase: &'static str,
        /// The console's kernel panic line.
        panic: Option<String>,
        /// The last console lines.
        console: String,
    },
    /// The guest stopped answering.
    #[error("the VM stopped answering {phase} (nothing for {}s){}", idle.as_secs(), tail(console))]
    Hung {
        /// What it was doing.
        phase: &'static str,
        /// How long it was silent.
        idle: Duration,
        /// The last console lines.
        console: String,
    },
    /// The agent reported that it could not run the step.
    #[error("in the VM: {message}")]
    Guest {
        /// The agent's error.
        message: String,
    },
    /// The guest sent something the protocol does not allow.
    #[error("the VM broke the protocol: {reason}")]
    Protocol {
        /// What.
        reason: String,
    },
    /// A tree the guest sent back was refused.
    #[error("the {what} the VM sent back was refused: {reason}")]
    Unpack {
        /// `upper layer`, `cache mount`.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

impl VmError {
    /// A problem of this host (missing tools, files), not of the step.
    pub fn is_environment(&self) -> bool {
        match self {
            VmError::Qemu { .. }
            | VmError::Kernel { .. }
            | VmError::Agent { .. }
            | VmError::Prepare { .. }
            | VmError::Launch { .. }
            | VmError::Boot { .. } => true,
            VmError::Crashed { .. }
            | VmError::Hung { .. }
            | VmError::Guest { .. }
            | VmError::Protocol { .. }
            | VmError::Unpack { .. } => false,
        }
    }

    /// A [`VmError::Prepare`] for `what`.
    pub fn prepare(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let what = what.into();
        move |source| VmError::Prepare { what, source }
    }
}

fn tail(console: &str) -> String {
    if console.trim().is_empty() {
        String::new()
    } else {
        let lines: Vec<&str> = console.lines().collect();
        let start = lines.len().saturating_sub(15);
        format!("\nlast console lines:\n  {}", lines[start..].join("\n  "))
    }
}

/// Where Kiln keeps VM files under `KILN_HOME` (kernels, initramfs images, blank disks).
pub const HOME_DIR: &str = "vm-v1";
