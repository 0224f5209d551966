//! The microvm driver: each `RUN` step runs in a fresh QEMU microVM, through the same
//! namespace driver and step executor as on the host, inside the guest.
//!
//! Owns turning one step into VM inputs and the VM's answers back into the step's upper
//! directory; knows QEMU only through [`crate::vm::machine`].
//!
//! # How a step travels
//!
//! ```text
//! host                                          guest (kiln-agent as PID 1)
//! lowers ──overlay view──► Tree ──mkext4──► root.ext4 (ro disk) ──► lower of the overlay
//! blank ext4 of builder_disk_mb (cached, snapshot=on) ───────────► upper + work
//! RUN --mount bind/cache sources ──tar──► context disk (ro) ──────► extracted on scratch
//! StepMessage (IR, mounts, secrets) ──virtio-serial──────────────► NamespaceDriver::run_step
//! output lines, outcome ◄─────────────────────────────────────────┘
//! upper ◄── oci::unpack (hardened) ◄── OCI tar frames ◄────────── the guest's upper dir
//! cache mounts ◄── the same, swapped in after the step
//! ```
//!
//! So layers come back as directories, the step cache and every later step work exactly as
//! with the namespace driver, and the guest (the untrusted part) is only ever read through the
//! hardened layer unpacker. The alternative, per-step qcow2 overlays of one root disk, would
//! make layers disk images that the namespace driver and the snapshot writer cannot share.
//! Measured on the 2-core TCG host (busybox base): boot to the agent's hello about 2 s, root
//! disk of a busybox tree a few ms, the upper of a small step back in milliseconds; a fresh VM
//! per step is the cost of TCG here, well under 1 s per step with KVM.
//!
//! # Timeouts and failures
//!
//! Every phase has a limit: QEMU must connect the channel within 10 s, the agent must say
//! hello within [`MicrovmOptions::boot_timeout`], the agent sends a heartbeat every second
//! (silence for [`MicrovmOptions::idle_timeout`] is a hung guest), the step's own timeout runs
//! in the guest with a host-side backstop, and after `Done` QEMU has 10 s to power off. A VM
//! that stops without `Done` crashed (QEMU exits 0 even on a kernel panic; the console tells
//! which). QEMU is killed on every path ([`crate::vm::machine::Machine`]).

use super::{Driver, DriverError, StepOutcome, StepRequest};
use crate::build::cgroup::Limits;
use crate::build::executor::{ExitStatus, PreparedMount, SignalGuard, Stdio, Stream};
use crate::build::run::View;
use crate::doctor::Accel;
use crate::home::Home;
use crate::ir;
use crate::oci::unpack::{UnpackOptions, unpack_layer};
use crate::snapshot::ext4::{self, WriteOptions};
use crate::snapshot::{SnapshotError, tree::Tree};
use crate::vm::guest::USER_NET_DNS;
use crate::vm::kernel::{self, Kernel};
use crate::vm::machine::{self, Disk, DiskMode, Machine, MachineConfig};
use crate::vm::protocol::{
    self, CONTEXT_SERIAL, GuestExit, GuestFailure, GuestMount, GuestOutcome, Hello, Kind,
    PORT_NAME, ROOT_SERIAL, RootAttrs, SCRATCH_SERIAL, StepMessage, TarHeader,
};
use crate::vm::session::{Recv, Session, TarReader, TarStop};
use crate::vm::{self, VmError, agent, initramfs};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How builder VMs are sized and timed.
#[derive(Debug, Clone, PartialEq)]
pub struct MicrovmOptions {
    /// vCPUs when the step has no `--cpus` limit.
    pub cpus: u32,
    /// Guest RAM (MiB) when the step has no `--memory` limit.
    pub memory_mb: u64,
    /// The scratch disk (upper layer, `RUN --mount` copies), MiB.
    pub scratch_mb: u64,
    /// From QEMU's start to the agent's hello.
    pub boot_timeout: Duration,
    /// The longest the guest may stay silent (it sends a heartbeat every second).
    pub idle_timeout: Duration,
    /// Extra kernel command-line words (`KILN_VM_APPEND`).
    pub append: String,
}

impl Default for MicrovmOptions {
    fn default() -> Self {
        MicrovmOptions {
            cpus: 2,
            memory_mb: 1024,
            scratch_mb: 2 * crate::snapshot::DEFAULT_DISK_MB,
            boot_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            append: std::env::var(crate::envvars::KILN_VM_APPEND).unwrap_or_default(),
        }
    }
}

/// Runs steps in QEMU microVMs. Making one finds QEMU, the kernel (fetching it if needed)
/// and the agent, and writes the initramfs and the blank scratch disk once.
#[derive(Debug)]
pub struct MicrovmDriver {
    qemu: PathBuf,
    accel: Accel,
    accel_reason: String,
    kernel: Kernel,
    initrd: PathBuf,
    scratch: PathBuf,
    work: PathBuf,
    opts: MicrovmOptions,
}

fn home_err(e: crate::home::HomeError) -> VmError {
    VmError::Prepare {
        what: "use KILN_HOME".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn snap_err(what: &'static str) -> impl FnOnce(SnapshotError) -> VmError {
    move |e| VmError::Prepare {
        what: what.into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Writes `tree` as ext4 to `out`, as small as it fits (the disk is read-only in the VM).
fn write_fitting(tree: &Tree, out: &Path) -> Result<(), VmError> {
    let guess = (tree.data_bytes() + tree.entry_count() as u64 * 8192) / (1 << 20) * 5 / 4 + 32;
    let mut disk_mb = guess;
    for _ in 0..3 {
        match ext4::write_without_digest(
            tree,
            WriteOptions {
                disk_mb,
                epoch: None,
            },
            out,
        ) {
            Ok(_) => return Ok(()),
            Err(SnapshotError::TooSmall { needed_mb, .. }) => disk_mb = needed_mb + 16,
            Err(e) => return Err(snap_err("write the root disk")(e)),
        }
    }
    Err(VmError::Prepare {
        what: "size the root disk".into(),
        source: std::io::Error::other(format!("the tree does not fit in {disk_mb} MiB")),
    })
}

/// The blank ext4 scratch disk of `mb` MiB, made once under `dir`.
fn blank_disk(dir: &Path, mb: u64) -> Result<PathBuf, VmError> {
    let path = dir.join(format!("blank-{mb}.ext4"));
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(dir).map_err(VmError::prepare(format!("create {}", dir.display())))?;
    let empty = tempfile::tempdir_in(dir).map_err(VmError::prepare("create an empty tree"))?;
    let tree = Tree::from_dir(empty.path()).map_err(snap_err("read an empty tree"))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(VmError::prepare("create a disk"))?;
    ext4::write_without_digest(
        &tree,
        WriteOptions {
            disk_mb: mb,
            epoch: Some(0),
        },
        tmp.path(),
    )
    .map_err(snap_err("write the scratch disk"))?;
    tmp.persist(&path)
        .map_err(|e| VmError::prepare("store the scratch disk")(e.error))?;
    Ok(path)
}

/// What the guest sent back.
#[derive(Default)]
struct Answer {
    hello: Option<Hello>,
    outcome: Option<GuestOutcome>,
    failure: Option<GuestFailure>,
    upper_received: bool,
    done: bool,
}

impl MicrovmDriver {
    /// Finds everything a builder VM needs and prepares the files shared by all steps.
    pub fn new(home: &Home, opts: MicrovmOptions) -> Result<MicrovmDriver, VmError> {
        let vm_dir = home.dir(vm::HOME_DIR).map_err(home_err)?;
        let qemu = crate::doctor::qemu()
            .map_err(|reason| VmError::Qemu { reason })?
            .path;
        let (accel, accel_reason) = machine::accelerator()?;
        static SAID: std::sync::Once = std::sync::Once::new();
        if accel == Accel::Tcg {
            SAID.call_once(|| {
                tracing::warn!(
                "microVMs run under QEMU TCG here (software emulation, several times slower): {accel_reason}"
                )
            });
        }
        let kernel = kernel::find(&vm_dir, true)?;
        let agent = agent::locate()?;
        let initrd = initramfs::ensure(&vm_dir.join("initramfs"), &agent, &kernel)?;
        let scratch = blank_disk(&vm_dir.join("disks"), opts.scratch_mb)?;
        let work = vm_dir.join("run");
        fs::create_dir_all(&work).map_err(VmError::prepare("create the VM work directory"))?;
        Ok(MicrovmDriver {
            qemu,
            accel,
            accel_reason,
            kernel,
            initrd,
            scratch,
            work,
            opts,
        })
    }

    /// The accelerator the VMs use, and why.
    pub fn accel(&self) -> (Accel, &str) {
        (self.accel, &self.accel_reason)
    }

    /// The guest kernel.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// The machine for a step: its disks and size.
    fn config(&self, disks: Vec<Disk>, limits: &Limits, network: bool) -> MachineConfig {
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let cpus = limits
            .cpus
            .map_or(self.opts.cpus, |c| c.ceil().max(1.0) as u32)
            .clamp(1, host_cpus.max(1));
        let memory_mb = limits
            .memory_bytes
            .map_or(self.opts.memory_mb, |b| (b >> 20).max(128));
        MachineConfig {
            qemu: self.qemu.clone(),
            accel: self.accel,
            kernel: self.kernel.image.clone(),
            initrd: self.initrd.clone(),
            cpus,
            memory_mb,
            disks,
            network,
            append: self.opts.append.clone(),
            port_name: PORT_NAME,
        }
    }

    /// Boots a VM with no step disks but the scratch one, waits for the agent's hello and
    /// powers it off: the boot-to-agent time (`cargo xtask bench vm`).
    pub fn boot_probe(&self) -> Result<(Duration, Hello), VmError> {
        let cfg = self.config(vec![], &Limits::default(), false);
        let mut m = Machine::launch(&cfg, Duration::from_secs(10))?;
        let mut s =
            Session::new(m.channel()?).map_err(VmError::prepare("read the agent channel"))?;
        let hello = wait_hello(&mut m, &mut s, self.opts.boot_timeout)?;
        let took = m.started().elapsed();
        m.kill();
        Ok((took, hello))
    }
}

fn wait_hello(m: &mut Machine, s: &mut Session, timeout: Duration) -> Result<Hello, VmError> {
    let deadline = m.started() + timeout;
    loop {
        match s.recv(Duration::from_millis(100)) {
            Recv::Frame(Kind::Hello, p) => {
                return protocol::decode("hello", &p).map_err(|e| VmError::Protocol {
                    reason: e.to_string(),
                });
            }
            Recv::Frame(Kind::Log, _) => {}
            Recv::Frame(Kind::Failure, p) => {
                let f: GuestFailure =
                    protocol::decode("failure", &p).map_err(|e| VmError::Protocol {
                        reason: e.to_string(),
                    })?;
                return Err(VmError::Guest { message: f.message });
            }
            Recv::Frame(k, _) => {
                return Err(VmError::Protocol {
                    reason: format!("{k:?} before hello"),
                });
            }
            Recv::Broken(reason) => return Err(VmError::Protocol { reason }),
            Recv::Closed => return Err(crashed(m, "while booting")),
            Recv::Timeout => {
                if m.try_wait().is_some() {
                    return Err(crashed(m, "while booting"));
                }
                if Instant::now() > deadline {
                    m.kill();
                    return Err(VmError::Boot {
                        timeout,
                        console: m.console(),
                    });
                }
            }
        }
    }
}

/// The VM stopped: give QEMU and the console readers a moment, then say how.
fn crashed(m: &mut Machine, phase: &'static str) -> VmError {
    m.wait_or_kill(Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(50));
    VmError::Crashed {
        phase,
        panic: m.panic_line(),
        console: m.console(),
    }
}

fn root_attrs(upper: &Path) -> Result<RootAttrs, DriverError> {
    let md = fs::metadata(upper).map_err(|source| DriverError::Dirs {
        what: "read",
        path: upper.to_path_buf(),
        source,
    })?;
    Ok(RootAttrs {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec(),
    })
}

/// The guest's view of the mounts, and the context tar holding their sources (if any).
fn guest_mounts(
    prepared: &[PreparedMount],
    context_tar: &Path,
) -> Result<(Vec<GuestMount>, bool), VmError> {
    let file =
        fs::File::create(context_tar).map_err(VmError::prepare("create the context disk"))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    let mut any = false;
    let mut out = Vec::with_capacity(prepared.len());
    for (i, p) in prepared.iter().enumerate() {
        let name = format!("m{i}");
        out.push(match p {
            PreparedMount::Bind { source } => {
                vm::tarball::append_entry(&mut b, source, &name)
                    .map_err(VmError::prepare(format!("pack {}", source.display())))?;
                any = true;
                GuestMount::Bind { name }
            }
            PreparedMount::Cache { dir } => {
                if dir.is_dir() {
                    vm::tarball::append_entry(&mut b, dir, &name)
                        .map_err(VmError::prepare(format!("pack {}", dir.display())))?;
                    any = true;
                }
                GuestMount::Cache { name }
            }
            PreparedMount::Tmpfs => GuestMount::Tmpfs,
            PreparedMount::Secret { file: None } => GuestMount::Secret { content: None },
            PreparedMount::Secret { file: Some(f) } => GuestMount::Secret {
                content: Some(
                    fs::read(f)
                        .map_err(VmError::prepare(format!("read the secret {}", f.display())))?,
                ),
            },
            PreparedMount::Ssh => GuestMount::Ssh,
        });
    }
    b.into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .map_err(VmError::prepare("write the context disk"))?;
    Ok((out, any))
}

/// What the agent gets for `req`.
fn step_message(
    req: &StepRequest<'_>,
    mounts: Vec<GuestMount>,
    root: RootAttrs,
    sandbox: bool,
) -> StepMessage {
    StepMessage {
        run: req.run.clone(),
        hostname: req.hostname.to_string(),
        resolv_conf: req.resolv_conf.unwrap_or(USER_NET_DNS).to_string(),
        mounts,
        timeout_ms: req.timeout.map(|t| t.as_millis() as u64),
        network: req.run.network != ir::Network::None,
        root,
        sandbox,
    }
}

/// A sandbox command's output line, to this process's own stream.
fn print_line(stream: Stream, line: &str) {
    use std::io::Write;
    let _ = match stream {
        Stream::Stdout => writeln!(std::io::stdout().lock(), "{line}"),
        Stream::Stderr => writeln!(std::io::stderr().lock(), "{line}"),
    };
}

fn protocol_err(reason: impl Into<String>) -> VmError {
    VmError::Protocol {
        reason: reason.into(),
    }
}

impl Driver for MicrovmDriver {
    fn name(&self) -> &'static str {
        "microvm"
    }

    fn run_step(
        &self,
        lowers: &[PathBuf],
        upper: &Path,
        req: StepRequest<'_>,
    ) -> Result<StepOutcome, DriverError> {
        let started = Instant::now();
        let signals = SignalGuard::install();
        fs::create_dir_all(upper).map_err(|source| DriverError::Dirs {
            what: "create",
            path: upper.to_path_buf(),
            source,
        })?;
        let dir = tempfile::Builder::new()
            .prefix("step-")
            .tempdir_in(&self.work)
            .map_err(VmError::prepare("create a step directory"))?;

        // The root disk: the merged lower layers.
        let root = dir.path().join("root.ext4");
        {
            let bottom_first: Vec<PathBuf> = lowers.iter().rev().cloned().collect();
            let view = View::mount(&bottom_first, dir.path()).map_err(|e| VmError::Prepare {
                what: "mount the step's layers".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let tree = Tree::from_dir(view.path()).map_err(snap_err("read the step's layers"))?;
            write_fitting(&tree, &root)?;
        }
        let mut disks = vec![
            Disk {
                path: root,
                serial: ROOT_SERIAL,
                mode: DiskMode::ReadOnly,
            },
            Disk {
                path: self.scratch.clone(),
                serial: SCRATCH_SERIAL,
                mode: DiskMode::Throwaway,
            },
        ];
        let context = dir.path().join("context.tar");
        let (mounts, has_context) = guest_mounts(req.mounts, &context)?;
        if has_context {
            disks.push(Disk {
                path: context,
                serial: CONTEXT_SERIAL,
                mode: DiskMode::ReadOnly,
            });
        }
        let msg = step_message(&req, mounts, root_attrs(upper)?, false);
        self.converse(disks, &msg, req, Some(upper), started, &signals)
    }
}

impl MicrovmDriver {
    /// Runs one sandbox command in a VM booted from `disk`, the sandbox's own qcow2 clone of
    /// its image's snapshot: the guest mounts it writable and the command's writes stay in
    /// it. Output comes back as lines (printed to this process's stdout and stderr with
    /// [`Stdio::Inherit`]); stdin is empty.
    pub fn run_in_disk(
        &self,
        disk: &Path,
        req: StepRequest<'_>,
    ) -> Result<StepOutcome, DriverError> {
        let started = Instant::now();
        let signals = SignalGuard::install();
        if !req.mounts.is_empty() {
            return Err(protocol_err("a sandbox command has no RUN --mount").into());
        }
        let disks = vec![Disk {
            path: disk.to_path_buf(),
            serial: ROOT_SERIAL,
            mode: DiskMode::Qcow2,
        }];
        let msg = step_message(&req, Vec::new(), RootAttrs::default(), true);
        self.converse(disks, &msg, req, None, started, &signals)
    }

    /// Boots the VM, sends `msg`, and relays the guest's answers until it is done; the upper
    /// layer lands in `upper` (a build step) or nowhere (a sandbox command).
    fn converse(
        &self,
        disks: Vec<Disk>,
        msg: &StepMessage,
        req: StepRequest<'_>,
        upper: Option<&Path>,
        started: Instant,
        signals: &SignalGuard,
    ) -> Result<StepOutcome, DriverError> {
        let network = msg.network;
        let prepared_at = Instant::now();

        let cfg = self.config(disks, &req.limits, network);
        let mut m = Machine::launch(&cfg, Duration::from_secs(10))?;
        let mut s =
            Session::new(m.channel()?).map_err(VmError::prepare("read the agent channel"))?;
        let mut answer = Answer {
            hello: Some(wait_hello(&mut m, &mut s, self.opts.boot_timeout)?),
            ..Answer::default()
        };
        let booted = m.started().elapsed();
        tracing::info!(
            accel = self.accel.as_str(),
            kernel = %answer.hello.as_ref().map(|h| h.kernel.as_str()).unwrap_or_default(),
            prepare_ms = (prepared_at - started).as_millis() as u64,
            boot_ms = booted.as_millis() as u64,
            "builder VM up"
        );
        s.send_json(Kind::Step, msg)
            .map_err(|_| crashed(&mut m, "before the step started"))?;
        let step_sent = Instant::now();
        // The guest enforces the step's timeout; this is the backstop if it cannot.
        let backstop = req.timeout.map(|t| step_sent + t + Duration::from_secs(60));
        let interrupted = || signals.interrupted().is_some();
        let inherit = req.stdio == Stdio::Inherit;
        let output = req.output;

        while !answer.done {
            match s.recv(Duration::from_millis(200)) {
                Recv::Frame(kind, payload) => match kind {
                    Kind::Stdout | Kind::Stderr => {
                        let stream = if kind == Kind::Stdout {
                            Stream::Stdout
                        } else {
                            Stream::Stderr
                        };
                        let line = String::from_utf8_lossy(&payload);
                        if inherit {
                            print_line(stream, &line);
                        } else {
                            output(stream, &line);
                        }
                    }
                    Kind::Heartbeat | Kind::Log => {}
                    Kind::Outcome if answer.outcome.is_none() && answer.failure.is_none() => {
                        answer.outcome = Some(
                            protocol::decode("outcome", &payload)
                                .map_err(|e| protocol_err(e.to_string()))?,
                        );
                    }
                    Kind::Failure if answer.outcome.is_none() => {
                        answer.failure = Some(
                            protocol::decode("failure", &payload)
                                .map_err(|e| protocol_err(e.to_string()))?,
                        );
                    }
                    Kind::TarBegin => {
                        let header: TarHeader = protocol::decode("tar header", &payload)
                            .map_err(|e| protocol_err(e.to_string()))?;
                        self.receive_tree(
                            &mut m,
                            &mut s,
                            &header,
                            upper,
                            req.mounts,
                            &answer,
                            &interrupted,
                        )?;
                        if header == TarHeader::Upper {
                            answer.upper_received = true;
                        }
                    }
                    Kind::Done => answer.done = true,
                    other => {
                        return Err(protocol_err(format!("unexpected {other:?} frame")).into());
                    }
                },
                Recv::Broken(reason) => return Err(protocol_err(reason).into()),
                Recv::Closed => {
                    let phase = if answer.outcome.is_some() {
                        "while sending the step's results"
                    } else {
                        "while the step ran"
                    };
                    return Err(crashed(&mut m, phase).into());
                }
                Recv::Timeout => {
                    if let Some(signal) = signals.interrupted() {
                        m.kill();
                        return Err(DriverError::Interrupted { signal });
                    }
                    if m.try_wait().is_some() {
                        return Err(crashed(&mut m, "while the step ran").into());
                    }
                    if s.last_frame.elapsed() > self.opts.idle_timeout {
                        m.kill();
                        return Err(VmError::Hung {
                            phase: "while the step ran",
                            idle: s.last_frame.elapsed(),
                            console: m.console(),
                        }
                        .into());
                    }
                    if answer.outcome.is_none()
                        && let Some(b) = backstop
                        && Instant::now() > b
                    {
                        m.kill();
                        return Ok(StepOutcome {
                            status: ExitStatus::Signaled(9),
                            exit_code: 137,
                            timed_out: true,
                            oom_killed: false,
                            run_time: step_sent.elapsed(),
                            total_time: started.elapsed(),
                        });
                    }
                }
            }
        }
        let _ = s.send(Kind::PowerOff, &[]);
        if !m.wait_or_kill(Duration::from_secs(10)) {
            tracing::warn!("the builder VM did not power off; killed");
        }
        if let Some(f) = answer.failure {
            return Err(VmError::Guest { message: f.message }.into());
        }
        let o = answer
            .outcome
            .ok_or_else(|| protocol_err("done without an outcome"))?;
        let status = match o.exit {
            GuestExit::Exited(c) => ExitStatus::Exited(c),
            GuestExit::Signaled(s) => ExitStatus::Signaled(s),
        };
        if upper.is_some() && status.code() == 0 && !answer.upper_received {
            return Err(protocol_err("the step succeeded but no upper layer came back").into());
        }
        Ok(StepOutcome {
            status,
            exit_code: status.code(),
            timed_out: o.timed_out,
            oom_killed: o.oom_killed,
            run_time: Duration::from_millis(o.run_ms),
            total_time: started.elapsed(),
        })
    }
}

impl MicrovmDriver {
    /// Reads one tar stream into the upper directory or a cache mount.
    #[allow(clippy::too_many_arguments)]
    fn receive_tree(
        &self,
        m: &mut Machine,
        s: &mut Session,
        header: &TarHeader,
        upper: Option<&Path>,
        mounts: &[PreparedMount],
        answer: &Answer,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(), DriverError> {
        let (dest, what, swap_into) = match header {
            TarHeader::Upper => {
                let ok = answer
                    .outcome
                    .is_some_and(|o| o.exit == GuestExit::Exited(0));
                let Some(upper) = upper.filter(|_| ok && !answer.upper_received) else {
                    return Err(protocol_err("an upper layer the host did not expect").into());
                };
                (upper.to_path_buf(), "upper layer", None)
            }
            TarHeader::Cache { index } => {
                let Some(PreparedMount::Cache { dir }) = mounts.get(*index) else {
                    return Err(protocol_err(format!("cache mount {index} does not exist")).into());
                };
                let mut name = dir.as_os_str().to_owned();
                name.push(format!(".vm-{}-new", std::process::id()));
                let fresh = PathBuf::from(name);
                let _ = fs::remove_dir_all(&fresh);
                fs::create_dir_all(&fresh).map_err(|source| DriverError::Dirs {
                    what: "create",
                    path: fresh.clone(),
                    source,
                })?;
                (fresh, "cache mount", Some(dir.clone()))
            }
        };
        let opts = UnpackOptions {
            max_bytes: self.opts.scratch_mb.saturating_mul(1 << 20),
            preserve_owners: true,
        };
        let mut r = TarReader::new(s, self.opts.idle_timeout, interrupted);
        let unpacked = unpack_layer(&mut r, &dest, &opts)
            .map(|_| ())
            .map_err(|e| e.to_string());
        let unpacked = unpacked.and_then(|()| r.drain().map_err(|e| e.to_string()));
        let stopped = r.stopped.clone();
        match (unpacked, stopped) {
            (Ok(()), _) => {}
            (Err(_), Some(TarStop::Interrupted)) => {
                m.kill();
                return Err(DriverError::Interrupted { signal: 2 });
            }
            (Err(_), Some(TarStop::Closed)) => {
                return Err(crashed(m, "while sending the step's results").into());
            }
            (Err(_), Some(TarStop::Idle)) => {
                m.kill();
                return Err(VmError::Hung {
                    phase: "while sending the step's results",
                    idle: self.opts.idle_timeout,
                    console: m.console(),
                }
                .into());
            }
            (Err(_), Some(TarStop::Protocol(reason))) => return Err(protocol_err(reason).into()),
            (Err(reason), None) => return Err(VmError::Unpack { what, reason }.into()),
        }
        if let Some(dir) = swap_into {
            let mut old = dir.as_os_str().to_owned();
            old.push(format!(".vm-{}-old", std::process::id()));
            let old = PathBuf::from(old);
            let had = dir.exists();
            let swap = || -> std::io::Result<()> {
                if had {
                    fs::rename(&dir, &old)?;
                }
                fs::rename(&dest, &dir)?;
                if had {
                    fs::remove_dir_all(&old)?;
                }
                Ok(())
            };
            swap().map_err(|source| DriverError::Dirs {
                what: "replace the cache mount",
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }
}
