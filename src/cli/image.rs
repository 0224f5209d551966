//! `kiln image register|ls|describe|update|history|rm` (`image create` needs the builder and
//! lives with it).

use super::Ctx;
use super::output::CliError;
use super::snapshot::{open_registry, snapshot_json};
use crate::ir::ImageConfig;
use crate::registry::{self, DefaultsPatch, Image, Registration};
use crate::snapshot::SnapshotState;
use clap::Subcommand;
use serde_json::{Value, json};
use std::path::PathBuf;

/// Registered images: names that sandboxes launch from.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a Dockerfile (or SDK definition), snapshot it and register the name.
    Create(Box<super::create::CreateArgs>),
    /// Point a name at an existing Completed snapshot (a name that exists moves; history is
    /// kept, so registering an older snapshot is a rollback).
    Register {
        /// The name: [a-z0-9][a-z0-9._-]{0,62}.
        name: String,
        /// The snapshot id (`snap_…`).
        snapshot_id: String,
        /// A Dockerfile whose text `describe` shows.
        #[arg(long, value_name = "F")]
        dockerfile: Option<PathBuf>,
        /// Make the name public: visible from every project, unique across all.
        #[arg(long)]
        public: bool,
    },
    /// Names visible from the project: its own and all public ones.
    Ls,
    /// Everything about one image.
    Describe {
        /// A name or an image id (`img_…`).
        name: String,
    },
    /// Change per-image sandbox defaults.
    Update {
        /// A name the project owns.
        name: String,
        /// Sandbox memory, 256–8192 MiB.
        #[arg(long, value_name = "N")]
        memory_mb: Option<u32>,
        /// Sandbox lifetime in seconds.
        #[arg(long, value_name = "N")]
        ttl_seconds: Option<u64>,
        /// A TCP port that answers once the sandbox is ready.
        #[arg(long, value_name = "P")]
        readiness_port: Option<u16>,
        /// Whether sandboxes may launch from the image.
        #[arg(long, value_name = "true|false")]
        enabled: Option<bool>,
    },
    /// The snapshots a name pointed to, newest first.
    History {
        /// The name.
        name: String,
    },
    /// Remove a name (its snapshot stays until `kiln gc` finds it unreferenced).
    Rm {
        /// A name the project owns.
        name: String,
    },
}

fn config_json(c: &ImageConfig) -> Value {
    json!({
        "env": c.env,
        "workdir": c.workdir,
        "user": c.user,
        "cmd": c.cmd,
        "entrypoint": c.entrypoint,
        "exposed_ports": c.exposed_ports,
        "labels": c.labels,
        "healthcheck": c.healthcheck,
        "stop_signal": c.stop_signal,
        "volumes": c.volumes,
        "shell": c.shell,
    })
}

/// One `image ls` row (CLI.md).
fn summary_json(i: &Image) -> Value {
    let size = match &i.snapshot.state {
        SnapshotState::Completed { size_bytes, .. } => Some(*size_bytes),
        SnapshotState::Pending | SnapshotState::Failed { .. } => None,
    };
    json!({
        "name": i.name,
        "project": i.project,
        "public": i.public,
        "image_id": i.id.as_str(),
        "snapshot_id": i.snapshot.id.as_str(),
        "status": i.status.name(),
        "size_bytes": size,
        "created_at": i.created_at,
    })
}

/// The `image describe` JSON: the `image create` fields that a registration knows, plus the
/// Dockerfile, config, base and sandbox defaults.
fn describe_json(i: &Image) -> Value {
    let snap = snapshot_json(&i.snapshot);
    json!({
        "name": i.name,
        "project": i.project,
        "public": i.public,
        "image_id": i.id.as_str(),
        "snapshot_id": i.snapshot.id.as_str(),
        "snapshot_uri": snap["snapshot_uri"],
        "status": i.status.name(),
        "snapshot_status": i.snapshot.state.name(),
        "disk_mb": i.snapshot.disk_mb,
        "size_bytes": snap["size_bytes"],
        "sha256": snap["sha256"],
        "builder": i.builder,
        "created_at": i.created_at,
        "updated_at": i.updated_at,
        "dockerfile": i.dockerfile,
        "config": config_json(&i.config),
        "base": i.base.as_ref().map(|b| json!({"reference": b.reference, "digest": b.digest})),
        "memory_mb": i.defaults.memory_mb,
        "ttl_seconds": i.defaults.ttl_seconds,
        "readiness_port": i.defaults.readiness_port,
        "enabled": i.defaults.enabled,
    })
}

fn describe_text(i: &Image) -> String {
    let scope = if i.public { "public" } else { "private" };
    let d = &i.defaults;
    format!(
        "{}  ({scope}, project {})\n  image     {}\n  snapshot  {} ({})\n  status    {}\n  memory_mb {}  ttl_seconds {}  readiness_port {}  enabled {}\n",
        i.name,
        i.project,
        i.id,
        i.snapshot.id,
        i.snapshot.state.name(),
        i.status.name(),
        d.memory_mb,
        d.ttl_seconds.map_or("-".into(), |t| t.to_string()),
        d.readiness_port.map_or("-".into(), |p| p.to_string()),
        d.enabled,
    )
}

/// Runs an `image` subcommand.
pub fn run(cmd: &ImageCommand, ctx: &Ctx) -> Result<(), CliError> {
    // Building is blocking work with its own short async parts; it is not run on a runtime.
    if let ImageCommand::Create(args) = cmd {
        return super::create::run(args, ctx);
    }
    ctx.block_on(run_async(cmd, ctx))?
}

async fn run_async(cmd: &ImageCommand, ctx: &Ctx) -> Result<(), CliError> {
    let project = registry::project(&ctx.project)?;
    match cmd {
        ImageCommand::Register {
            name,
            snapshot_id,
            dockerfile,
            public,
        } => {
            let name = registry::name(name)?;
            let dockerfile = match dockerfile {
                Some(p) => {
                    Some(std::fs::read_to_string(p).map_err(|e| CliError::unreadable(p, &e))?)
                }
                None => None,
            };
            let reg = open_registry(ctx).await?;
            let r = reg
                .register(
                    &project,
                    &name,
                    snapshot_id,
                    Registration {
                        public: *public,
                        dockerfile,
                        ..Registration::default()
                    },
                )
                .await?;
            let mut v = describe_json(&r.image);
            v["previous_snapshot_id"] = json!(r.previous);
            let text = match &r.previous {
                Some(p) if p != r.image.snapshot.id.as_str() => format!(
                    "{} moved from {p} to {}\n",
                    r.image.name, r.image.snapshot.id
                ),
                Some(_) | None => format!("{} -> {}\n", r.image.name, r.image.snapshot.id),
            };
            ctx.out.result(&text, &v)
        }
        ImageCommand::Ls => {
            let reg = open_registry(ctx).await?;
            let all = reg.list(&project).await?;
            let text: String = all
                .iter()
                .map(|i| {
                    let scope = if i.public { "public" } else { "private" };
                    format!(
                        "{}  {}  {}  {}  {}  {}\n",
                        i.name,
                        i.project,
                        scope,
                        i.id,
                        i.snapshot.id,
                        i.status.name()
                    )
                })
                .collect();
            let json: Vec<Value> = all.iter().map(summary_json).collect();
            ctx.out.result(&text, &json)
        }
        ImageCommand::Describe { name } => {
            let reg = open_registry(ctx).await?;
            let img = reg.describe(&project, name).await?;
            ctx.out.result(&describe_text(&img), &describe_json(&img))
        }
        ImageCommand::Update {
            name,
            memory_mb,
            ttl_seconds,
            readiness_port,
            enabled,
        } => {
            let patch = DefaultsPatch {
                memory_mb: *memory_mb,
                ttl_seconds: *ttl_seconds,
                readiness_port: *readiness_port,
                enabled: *enabled,
            };
            patch.validate()?;
            let reg = open_registry(ctx).await?;
            let img = reg.update(&project, name, patch).await?;
            ctx.out.result(&describe_text(&img), &describe_json(&img))
        }
        ImageCommand::History { name } => {
            let reg = open_registry(ctx).await?;
            let (img, entries) = reg.history(&project, name).await?;
            let text: String = entries
                .iter()
                .map(|e| {
                    let mark = if e.current { "*" } else { " " };
                    format!("{mark} {}  {}\n", e.snapshot_id, e.registered_at)
                })
                .collect();
            let json: Vec<Value> = entries
                .iter()
                .map(|e| {
                    json!({
                        "name": img.name,
                        "project": img.project,
                        "image_id": img.id.as_str(),
                        "snapshot_id": e.snapshot_id,
                        "registered_at": e.registered_at,
                        "current": e.current,
                    })
                })
                .collect();
            ctx.out.result(&text, &json)
        }
        // Handled in `run`, outside the runtime (building blocks).
        ImageCommand::Create(_) => Err(CliError::new(
            super::output::Exit::Environment,
            "internal",
            "image create cannot run inside the async runtime".into(),
            None,
        )),
        ImageCommand::Rm { name } => {
            let reg = open_registry(ctx).await?;
            let img = reg.remove(&project, name).await?;
            ctx.out.result(
                &format!(
                    "removed {} (snapshot {} stays until `kiln gc`)\n",
                    img.name, img.snapshot.id
                ),
                &json!({
                    "name": img.name,
                    "project": img.project,
                    "image_id": img.id.as_str(),
                    "snapshot_id": img.snapshot.id.as_str(),
                    "removed": true,
                }),
            )
        }
    }
}
