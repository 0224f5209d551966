//! `kiln sbx run|create|exec|ls|snapshot|rm`: sandboxes launched from registered images.
//!
//! In text mode a command gets Kiln's own stdin, stdout and stderr, byte for byte, and Kiln
//! exits with its exit code. With `--output json` its output is captured and returned in the
//! result object (`stdout`, `stderr`, `exit_code`), and Kiln still exits with its code.
//! Docker's codes for a command that cannot start: 127 (not found), 126 (not executable).
//! On the microvm runtime the command's stdin is empty and its output arrives line by line
//! through the guest agent (text mode prints each line as it comes).

use super::Ctx;
use super::output::{CliError, Exit};
use super::snapshot::{import_child, open_registry};
use crate::build::driver::{DriverError, StepOutcome};
use crate::build::executor::{ExecError, Stdio, Stream};
use crate::registry::{self, Image};
use crate::sbx::{Exec, Overrides, Record, Sandbox, Sandboxes, SbxError, Settings};
use crate::snapshot::{SnapshotId, SnapshotState};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use std::time::Instant;

/// Which runtime runs the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeFlag {
    /// The microvm runtime where KVM works, else the namespace runtime.
    Auto,
    /// Linux namespaces over a copy-on-write overlay.
    Namespace,
    /// A QEMU microVM.
    Microvm,
}

/// The sandbox's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SbxNetwork {
    /// The host's network.
    Default,
    /// No network (a fresh network namespace).
    None,
}

/// Flags that change how commands run (launch and exec).
#[derive(Debug, Args, Clone)]
pub struct ExecFlags {
    /// An environment variable, `K=V`, or `K` to pass this process's value (repeat).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// The working directory.
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// The user: a name or uid, optionally `:group`.
    #[arg(short = 'u', long, value_name = "U")]
    pub user: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

/// `sbx run` and `sbx create`: which image, and the sandbox's resources.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// The registered image.
    #[arg(long, value_name = "N")]
    pub image: String,
    /// The runtime.
    #[arg(long, value_enum, default_value_t = RuntimeFlag::Auto)]
    pub runtime: RuntimeFlag,
    /// CPUs.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory, MiB (default: the image's `memory_mb`).
    #[arg(long)]
    pub memory: Option<u64>,
    /// Size of the root disk of `sbx snapshot`, MiB (default: the image's).
    #[arg(long = "disk_mb", alias = "disk-mb")]
    pub disk_mb: Option<u64>,
    /// The network.
    #[arg(long, value_enum, default_value_t = SbxNetwork::Default)]
    pub network: SbxNetwork,
    #[command(flatten)]
    /// How commands run.
    pub exec: ExecFlags,
}

/// Sandboxes.
#[derive(Debug, Subcommand)]
pub enum SbxCommand {
    /// Launch a sandbox, run a command (default: the image's ENTRYPOINT and CMD), remove it.
    Run {
        #[command(flatten)]
        /// The launch.
        launch: LaunchArgs,
        /// The command and its arguments, after `--`.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Launch a sandbox and print its id.
    Create {
        #[command(flatten)]
        /// The launch.
        launch: LaunchArgs,
    },
    /// Run a command in a sandbox.
    Exec {
        /// The sandbox id.
        id: String,
        #[command(flatten)]
        /// Overrides for this command.
        flags: ExecFlags,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// List the project's sandboxes.
    Ls,
    /// Snapshot a sandbox's root into a Completed snapshot `image register` accepts.
    Snapshot {
        /// The sandbox id.
        id: String,
        /// Size of the new root disk, MiB (default: the sandbox's).
        #[arg(long = "disk_mb", alias = "disk-mb")]
        disk_mb: Option<u64>,
    },
    /// Remove a sandbox.
    Rm {
        /// The sandbox id.
        id: String,
    },
}

impl From<SbxError> for CliError {
    fn from(e: SbxError) -> Self {
        let message = e.to_string();
        match &e {
            SbxError::NotFound { .. } => CliError::new(
                Exit::NotFound,
                "sandbox_not_found",
                message,
                Some("`kiln sbx ls` lists the project's sandboxes".into()),
            ),
            SbxError::Busy { .. } => CliError::new(Exit::Conflict, "sandbox_busy", message, None),
            SbxError::NoCommand => CliError::usage(message, None),
            SbxError::Vm(e) | SbxError::Driver(DriverError::Vm(e)) => vm_error(e),
            SbxError::Driver(DriverError::Exec(ExecError::User { .. })) => {
                CliError::new(Exit::BadInput, "bad_user", message, None)
            }
            SbxError::Io { .. }
            | SbxError::BadRecord { .. }
            | SbxError::Mount { .. }
            | SbxError::Driver(_)
            | SbxError::View(_) => CliError::new(Exit::Environment, "sandbox", message, None),
        }
    }
}

/// Parses `--env` entries; `K` alone takes this process's value, and is dropped if unset.
fn env_overrides(env: &[String]) -> Result<Vec<(String, String)>, CliError> {
    let mut out = Vec::new();
    for e in env {
        let (k, v) = match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match std::env::var(e) {
                Ok(v) => (e.clone(), v),
                Err(_) => continue,
            },
        };
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            return Err(CliError::usage(
                format!("--env {e:?}: expected K=V with a non-empty K"),
                None,
            ));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn overrides(flags: &ExecFlags) -> Result<Overrides, CliError> {
    if let Some(w) = &flags.workdir
        && !w.starts_with('/')
    {
        return Err(CliError::usage(
            format!("--workdir {w:?} must be an absolute path"),
            None,
        ));
    }
    Ok(Overrides {
        env: env_overrides(&flags.env)?,
        workdir: flags.workdir.clone(),
        user: flags.user.clone(),
        timeout_secs: flags.timeout,
        ..Overrides::default()
    })
}

/// The runtime `--runtime` asks for: `auto` is microvm where KVM works, else namespace.
fn runtime_name(r: RuntimeFlag) -> &'static str {
    match r {
        RuntimeFlag::Namespace => "namespace",
        RuntimeFlag::Microvm => crate::sbx::MICROVM,
        RuntimeFlag::Auto if crate::doctor::microvm_preferred() => crate::sbx::MICROVM,
        RuntimeFlag::Auto => "namespace",
    }
}

fn vm_error(e: &crate::vm::VmError) -> CliError {
    if e.is_environment() {
        CliError::new(
            Exit::Environment,
            "runtime_unavailable",
            format!("the microvm runtime cannot start: {e}"),
            Some("`kiln doctor` says what this host lacks; --runtime namespace needs no VM".into()),
        )
    } else {
        CliError::new(Exit::Failed, "sandbox_vm_failed", e.to_string(), None)
    }
}

fn open_sandboxes(ctx: &Ctx) -> Result<Sandboxes, CliError> {
    Ok(Sandboxes::open(&ctx.home()?)?)
}

/// Resolves the image and makes the sandbox (mounting the image's disk if needed).
async fn launch(
    ctx: &Ctx,
    args: &LaunchArgs,
    ephemeral: bool,
) -> Result<(Sandboxes, Sandbox), CliError> {
    let runtime = runtime_name(args.runtime);
    if let Some(c) = args.cpus
        && !(c > 0.0 && c.is_finite())
    {
        return Err(CliError::usage(
            format!("--cpus {c}: must be above 0"),
            None,
        ));
    }
    if args.memory == Some(0) {
        return Err(CliError::usage("--memory must be above 0".into(), None));
    }
    let mut o = overrides(&args.exec)?;
    o.no_network = args.network == SbxNetwork::None;
    o.cpus = args.cpus;
    o.memory_mb = args.memory;
    let project = registry::project(&ctx.project)?;
    let reg = open_registry(ctx).await?;
    let image: Image = reg.resolve_for_launch(&project, &args.image).await?;
    let (uri, disk_mb) = match &image.snapshot.state {
        SnapshotState::Completed { uri, .. } => (uri.clone(), image.snapshot.disk_mb),
        SnapshotState::Pending | SnapshotState::Failed { .. } => {
            return Err(registry::RegistryError::SnapshotNotCompleted {
                id: image.snapshot.id.to_string(),
                state: image.snapshot.state.name(),
            }
            .into());
        }
    };
    let disk = crate::snapshot::store::uri_path(&uri).ok_or_else(|| {
        CliError::new(
            Exit::Environment,
            "unsupported_uri",
            format!("cannot launch from {uri}: only file:// snapshots are local"),
            None,
        )
    })?;
    let settings = Settings::new(&image.config, Some(u64::from(image.defaults.memory_mb)), &o);
    let rec = Record {
        id: crate::sbx::new_id(),
        project: ctx.project.clone(),
        image: image.name.clone(),
        snapshot_id: image.snapshot.id.to_string(),
        disk,
        disk_mb: args.disk_mb.unwrap_or(disk_mb),
        runtime: runtime.into(),
        created_at: now_rfc3339(),
        settings,
        ephemeral,
    };
    let sandboxes = open_sandboxes(ctx)?;
    let sbx = sandboxes.create(&rec)?;
    Ok((sandboxes, sbx))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// What one command did, for JSON.
struct Ran {
    outcome: StepOutcome,
    stdout: String,
    stderr: String,
}

/// Runs `argv` in `sbx`; `Err` only when it could not start or Kiln was interrupted.
fn exec_in(
    ctx: &Ctx,
    sbx: &Sandbox,
    argv: Vec<String>,
    settings: &Settings,
) -> Result<Result<Ran, (i32, CliError)>, CliError> {
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let mut collect = |s: Stream, line: &str| {
        let buf = match s {
            Stream::Stdout => &mut stdout,
            Stream::Stderr => &mut stderr,
        };
        buf.push_str(line);
        buf.push('\n');
    };
    let stdio = if ctx.out.json() {
        Stdio::Capture
    } else {
        Stdio::Inherit
    };
    let r = sbx.exec(Exec {
        argv,
        settings,
        stdio,
        output: &mut collect,
    });
    match r {
        Ok(outcome) => Ok(Ok(Ran {
            outcome,
            stdout,
            stderr,
        })),
        Err(SbxError::Driver(DriverError::Interrupted { signal })) => Ok(Err((
            128 + signal,
            CliError::new(
                Exit::Failed,
                "interrupted",
                format!("interrupted by signal {signal}; the command was killed"),
                None,
            ),
        ))),
        Err(SbxError::Driver(DriverError::Exec(e))) if e.start_failure_code().is_some() => {
            let code = e.start_failure_code().unwrap_or(126);
            let (kind, message) = match (&e, std::error::Error::source(&e)) {
                (ExecError::NotFound { .. }, _) => ("command_not_found", e.to_string()),
                (_, Some(s)) => ("command_not_executable", format!("{e}: {s}")),
                (_, None) => ("command_not_executable", e.to_string()),
            };
            Ok(Err((
                code,
                CliError::new(Exit::Failed, kind, message, None),
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints the result of one command and returns the exit code.
fn report(ctx: &Ctx, sbx_id: &str, ran: Result<Ran, (i32, CliError)>) -> Result<u8, CliError> {
    let ran = match ran {
        Ok(r) => r,
        Err((code, e)) => {
            ctx.out.error(&e);
            return Ok(code.clamp(0, 255) as u8);
        }
    };
    let o = &ran.outcome;
    if o.timed_out {
        ctx.out
            .warn(&format!("{sbx_id}: the command timed out and was killed"));
    } else if o.oom_killed {
        ctx.out.warn(&format!(
            "{sbx_id}: the command ran out of memory and was killed"
        ));
    }
    // CLI.md: a timed-out command is a failure (1), not its signal's code.
    let code = if o.timed_out { 1 } else { o.exit_code };
    if ctx.out.json() {
        ctx.out.result(
            "",
            &json!({
                "sandbox_id": sbx_id,
                "exit_code": code,
                "timed_out": o.timed_out,
                "oom_killed": o.oom_killed,
                "duration_ms": o.run_time.as_millis() as u64,
                "stdout": ran.stdout,
                "stderr": ran.stderr,
            }),
        )?;
    }
    Ok(code.clamp(0, 255) as u8)
}

fn record_json(r: &Record) -> Value {
    json!({
        "sandbox_id": r.id,
        "image": r.image,
        "snapshot_id": r.snapshot_id,
        "runtime": r.runtime,
        "status": "ready",
        "created_at": r.created_at,
        "env": r.settings.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "workdir": r.settings.workdir,
        "user": r.settings.user,
        "network": if r.settings.network { "default" } else { "none" },
        "cpus": r.settings.cpus,
        "memory_mb": r.settings.memory_mb,
        "disk_mb": r.disk_mb,
    })
}

/// Runs an `sbx` subcommand; the exit code is the command's for `run` and `exec`.
pub fn run(cmd: &SbxCommand, ctx: &Ctx) -> Result<u8, CliError> {
    ctx.block_on(run_async(cmd, ctx))?
}

async fn run_async(cmd: &SbxCommand, ctx: &Ctx) -> Result<u8, CliError> {
    match cmd {
        SbxCommand::Run {
            launch: args,
            command,
        } => {
            let started = Instant::now();
            let (_sandboxes, sbx) = launch(ctx, args, true).await?;
            let id = sbx.record().id.clone();
            tracing::debug!(sandbox = %id, ms = started.elapsed().as_millis() as u64, "launched");
            let settings = sbx.record().settings.clone();
            let argv = match settings.launch_argv(command) {
                Ok(a) => a,
                Err(e) => {
                    let _ = sbx.remove();
                    return Err(e.into());
                }
            };
            let ran = exec_in(ctx, &sbx, argv, &settings);
            let removed = sbx.remove();
            let code = report(ctx, &id, ran?)?;
            removed?;
            Ok(code)
        }
        SbxCommand::Create { launch: args } => {
            let (_sandboxes, sbx) = launch(ctx, args, false).await?;
            let r = sbx.record();
            ctx.out.result(&format!("{}\n", r.id), &record_json(r))?;
            Ok(0)
        }
        SbxCommand::Exec { id, flags, command } => {
            let o = overrides(flags)?;
            let sandboxes = open_sandboxes(ctx)?;
            let sbx = sandboxes.get(&ctx.project, id)?;
            let mut settings = sbx.record().settings.clone();
            settings.apply(&o);
            // `docker exec`: the command as given, no ENTRYPOINT.
            let ran = exec_in(ctx, &sbx, command.clone(), &settings)?;
            report(ctx, id, ran)
        }
        SbxCommand::Ls => {
            let all = open_sandboxes(ctx)?.list(&ctx.project)?;
            let text: String = all
                .iter()
                .map(|r| format!("{}  {}  {}  {}\n", r.id, r.image, r.runtime, r.created_at))
                .collect();
            let json: Vec<Value> = all.iter().map(record_json).collect();
            ctx.out.result(&text, &json)?;
            Ok(0)
        }
        SbxCommand::Snapshot { id, disk_mb } => {
            let sandboxes = open_sandboxes(ctx)?;
            let sbx = sandboxes.get(&ctx.project, id)?;
            let home = ctx.home()?;
            let tmp = home
                .tmp()
                .map_err(|e| CliError::new(Exit::Environment, "no_home", e.to_string(), None))?;
            let view = sbx.view(&tmp)?;
            let parent = SnapshotId::parse(&sbx.record().snapshot_id);
            let reg = open_registry(ctx).await?;
            let disk_mb = disk_mb.unwrap_or(sbx.record().disk_mb);
            let rec = import_child(ctx, &reg, view.path(), disk_mb, parent.as_ref()).await?;
            drop(view);
            let mut v = super::snapshot::snapshot_json(&rec);
            v["sandbox_id"] = json!(id);
            ctx.out.result(&format!("{}\n", rec.id), &v)?;
            Ok(0)
        }
        SbxCommand::Rm { id } => {
            let r = open_sandboxes(ctx)?.remove(&ctx.project, id)?;
            ctx.out.result(
                &format!("removed {}\n", r.id),
                &json!({"sandbox_id": r.id, "removed": true}),
            )?;
            Ok(0)
        }
    }
}
