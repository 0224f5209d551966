//! `kiln snapshot import|ls|describe|rm|export`.

use super::Ctx;
use super::output::{CliError, Exit};
use crate::registry::{Owner, Registry, RegistryError, Removal, SnapshotRecord};
use crate::snapshot::{
    self, DEFAULT_DISK_MB, SnapshotError, SnapshotId, SnapshotState, Store, Tree, WriteOptions,
};
use clap::Subcommand;
use serde_json::{Value, json};
use std::path::PathBuf;

/// Snapshots: ext4 root disks made from a root tree.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Make a Completed snapshot from a root tree made elsewhere (a directory or a tar).
    Import {
        /// ROOTFS.tar or a directory.
        source: PathBuf,
        /// Size of the root disk in MiB (sparse on the host).
        #[arg(long = "disk_mb", alias = "disk-mb", value_name = "MB", default_value_t = DEFAULT_DISK_MB)]
        disk_mb: u64,
    },
    /// List snapshots.
    Ls,
    /// Show one snapshot.
    Describe {
        /// The snapshot id (`snap_…`).
        snapshot: String,
    },
    /// Remove a snapshot no name uses.
    Rm {
        /// The snapshot id.
        snapshot: String,
    },
    /// Write a snapshot's root tree as a tar (numeric owners, modes, xattrs, links).
    Export {
        /// The snapshot id.
        snapshot: String,
        /// The tar to write (`-o`; the long form is not `--output`, which is the format).
        #[arg(short = 'o', long = "out", value_name = "FILE.tar")]
        out: PathBuf,
    },
}

/// Opens the registry of the context's home (call inside `ctx.block_on`, and keep every use of
/// it inside that one runtime).
pub async fn open_registry(ctx: &Ctx) -> Result<Registry, CliError> {
    let home = ctx.home()?;
    Ok(Registry::open(&home.database()).await?)
}

/// The store of the context's home.
pub fn open_store(ctx: &Ctx) -> Result<Store, CliError> {
    let home = ctx.home()?;
    let dir = home
        .snapshots()
        .map_err(|e| CliError::new(Exit::Environment, "no_home", e.to_string(), None))?;
    Ok(Store::new(dir))
}

impl From<SnapshotError> for CliError {
    fn from(e: SnapshotError) -> Self {
        let message = e.to_string();
        match &e {
            SnapshotError::ReadTree { .. } => {
                CliError::new(Exit::BadInput, "unreadable_input", message, None)
            }
            SnapshotError::ReadTar { .. } => {
                CliError::new(Exit::BadInput, "bad_tar", message, None)
            }
            SnapshotError::EscapingPath { .. } => CliError::new(
                Exit::BadInput,
                "escaping_path",
                message,
                Some(
                    "a root tar holds paths relative to its root; none may climb out of it".into(),
                ),
            ),
            SnapshotError::Unsupported { .. } | SnapshotError::Ext4(_) => {
                CliError::new(Exit::BadInput, "unsupported_tree", message, None)
            }
            SnapshotError::Fill { .. } => {
                CliError::new(Exit::BadInput, "tree_changed", message, None)
            }
            SnapshotError::TooSmall { needed_mb, .. } => {
                let hint = Some(format!("pass --disk_mb {needed_mb} or more"));
                CliError::new(Exit::BadInput, "disk_too_small", message, hint)
            }
            SnapshotError::DiskSize(_) => CliError::new(Exit::BadInput, "usage", message, None),
            SnapshotError::Store { .. }
            | SnapshotError::ReadDisk { .. }
            | SnapshotError::WriteTar { .. } => {
                CliError::new(Exit::Environment, "io", message, None)
            }
        }
    }
}

impl From<RegistryError> for CliError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        let (exit, code, hint): (Exit, &'static str, Option<String>) = match &e {
            RegistryError::Lock { .. }
            | RegistryError::Open { .. }
            | RegistryError::Migrate(_)
            | RegistryError::Db { .. }
            | RegistryError::Corrupt { .. } => (Exit::Environment, "registry", None),
            RegistryError::InvalidName { .. } => (Exit::BadInput, "invalid_name", None),
            RegistryError::OutOfRange { .. } => (Exit::BadInput, "out_of_range", None),
            RegistryError::SnapshotNotFound(_) => (
                Exit::NotFound,
                "snapshot_not_found",
                Some("`kiln snapshot ls` lists snapshots".into()),
            ),
            RegistryError::ImageNotFound { .. } => (
                Exit::NotFound,
                "image_not_found",
                Some("`kiln image ls` lists the names this project sees".into()),
            ),
            RegistryError::SnapshotNotCompleted { .. } => {
                (Exit::Conflict, "snapshot_not_completed", None)
            }
            RegistryError::BadTransition { .. } => (Exit::Conflict, "bad_transition", None),
            RegistryError::NotGarbage { .. } => (Exit::Conflict, "not_garbage", None),
            RegistryError::SnapshotInUse { .. } => (
                Exit::Conflict,
                "snapshot_in_use",
                Some("remove or move the names first (`kiln image rm NAME`)".into()),
            ),
            RegistryError::NameTaken { .. } => (
                Exit::Conflict,
                "name_taken",
                Some("public names are unique across projects; pick another name".into()),
            ),
            RegistryError::NotOwner { .. } => (Exit::Conflict, "not_owner", None),
            RegistryError::NotReady { .. } => (Exit::Conflict, "image_not_ready", None),
        };
        CliError::new(exit, code, message, hint)
    }
}

/// The `describe` JSON of a snapshot (CLI.md).
pub fn snapshot_json(s: &SnapshotRecord) -> Value {
    let (uri, sha, size, reason) = match &s.state {
        SnapshotState::Completed {
            uri,
            sha256,
            size_bytes,
        } => (
            Some(uri.clone()),
            Some(sha256.clone()),
            Some(*size_bytes),
            None,
        ),
        SnapshotState::Pending => (None, None, None, None),
        SnapshotState::Failed { reason } => (None, None, None, Some(reason.clone())),
    };
    let mut v = json!({
        "snapshot_id": s.id.as_str(),
        "status": s.state.name(),
        "snapshot_uri": uri,
        "disk_mb": s.disk_mb,
        "size_bytes": size,
        "sha256": sha,
        "created_at": s.created_at,
        "parent": s.parent.as_ref().map(SnapshotId::as_str),
    });
    if let Some(r) = reason {
        v["reason"] = json!(r);
    }
    v
}

fn snapshot_text(s: &SnapshotRecord) -> String {
    let mut t = format!("{}  {}  {} MiB", s.id, s.state.name(), s.disk_mb);
    match &s.state {
        SnapshotState::Completed {
            uri,
            sha256,
            size_bytes,
        } => t.push_str(&format!("  {size_bytes} bytes  sha256:{sha256}  {uri}")),
        SnapshotState::Pending => {}
        SnapshotState::Failed { reason } => t.push_str(&format!("  {reason}")),
    }
    t.push('\n');
    t
}

/// Runs a `snapshot` subcommand.
pub fn run(cmd: &SnapshotCommand, ctx: &Ctx) -> Result<(), CliError> {
    ctx.block_on(run_async(cmd, ctx))?
}

async fn run_async(cmd: &SnapshotCommand, ctx: &Ctx) -> Result<(), CliError> {
    match cmd {
        SnapshotCommand::Import { source, disk_mb } => {
            let reg = open_registry(ctx).await?;
            let rec = import(ctx, &reg, source, *disk_mb).await?;
            ctx.out.result(&snapshot_text(&rec), &snapshot_json(&rec))
        }
        SnapshotCommand::Ls => {
            let reg = open_registry(ctx).await?;
            let all = reg.snapshots().await?;
            let text: String = all.iter().map(snapshot_text).collect();
            let json: Vec<Value> = all.iter().map(snapshot_json).collect();
            ctx.out.result(&text, &json)
        }
        SnapshotCommand::Describe { snapshot } => {
            let reg = open_registry(ctx).await?;
            let rec = reg.snapshot(snapshot).await?;
            ctx.out.result(&snapshot_text(&rec), &snapshot_json(&rec))
        }
        SnapshotCommand::Rm { snapshot } => {
            // A sandbox's root stands on its snapshot (an overlay over its disk, or a qcow2
            // clone backed by it): removing it would pull the ground from under the sandbox.
            let sandboxes = crate::sbx::Sandboxes::open(&ctx.home()?)?;
            if let Some(sbx) = sandboxes.all()?.iter().find(|r| &r.snapshot_id == snapshot) {
                return Err(CliError::new(
                    Exit::Conflict,
                    "snapshot_in_use",
                    format!("snapshot {snapshot} is the root of sandbox {}", sbx.id),
                    Some(format!("`kiln sbx rm {}` first", sbx.id)),
                ));
            }
            let reg = open_registry(ctx).await?;
            let store = open_store(ctx)?;
            let rec = reg.snapshot_remove(snapshot, Removal::Unnamed).await?;
            store.remove(&rec.id)?;
            ctx.out.result(
                &format!("removed {}\n", rec.id),
                &json!({"snapshot_id": rec.id.as_str(), "removed": true}),
            )
        }
        SnapshotCommand::Export {
            snapshot,
            out: output,
        } => {
            let reg = open_registry(ctx).await?;
            let rec = reg.snapshot(snapshot).await?;
            let uri = match &rec.state {
                SnapshotState::Completed { uri, .. } => uri.clone(),
                SnapshotState::Pending | SnapshotState::Failed { .. } => {
                    return Err(RegistryError::SnapshotNotCompleted {
                        id: rec.id.to_string(),
                        state: rec.state.name(),
                    }
                    .into());
                }
            };
            let disk = snapshot::store::uri_path(&uri).ok_or_else(|| {
                CliError::new(
                    Exit::Environment,
                    "unsupported_uri",
                    format!("cannot read {uri}: only file:// snapshots are local"),
                    None,
                )
            })?;
            let sum = snapshot::export::export(&disk, output)?;
            if sum.sockets_skipped > 0 {
                ctx.out.warn(&format!(
                    "{} unix socket(s) left out: tar cannot hold sockets",
                    sum.sockets_skipped
                ));
            }
            ctx.out.result(
                &format!("wrote {} ({} entries)\n", output.display(), sum.entries),
                &json!({"snapshot_id": rec.id.as_str(), "output": output, "entries": sum.entries}),
            )
        }
    }
}

/// `snapshot import`: scan the tree, lay it out (a tree too big fails here, before anything is
/// recorded), record `Pending`, write and hash the disk, rename it in, record `Completed`.
pub async fn import(
    ctx: &Ctx,
    reg: &Registry,
    source: &std::path::Path,
    disk_mb: u64,
) -> Result<SnapshotRecord, CliError> {
    import_child(ctx, reg, source, disk_mb, None).await
}

/// [`import`] of a tree derived from snapshot `parent` (a sandbox's root), recorded as its
/// child.
pub async fn import_child(
    ctx: &Ctx,
    reg: &Registry,
    source: &std::path::Path,
    disk_mb: u64,
    parent: Option<&SnapshotId>,
) -> Result<SnapshotRecord, CliError> {
    let epoch = match std::env::var(crate::envvars::SOURCE_DATE_EPOCH) {
        Ok(v) if !v.is_empty() => Some(v.trim().parse::<i64>().map_err(|_| {
            CliError::usage(
                format!("SOURCE_DATE_EPOCH must be a number of seconds, got {v:?}"),
                None,
            )
        })?),
        Ok(_) | Err(_) => None,
    };
    let opts = WriteOptions { disk_mb, epoch };
    let tree = Tree::scan(source)?;
    let prepared = snapshot::ext4::prepare(&tree, opts)?;
    let store = open_store(ctx)?;
    let id = SnapshotId::generate();
    reg.snapshot_begin(&id, disk_mb, parent, Owner::current())
        .await?;
    // Writing is blocking work; it runs on this runtime thread, which has nothing else to do.
    match store.write(&id, &tree, prepared) {
        Ok(disk) => {
            reg.snapshot_complete(&id, &disk.uri, &disk.info.sha256, disk.info.size_bytes)
                .await?;
        }
        Err(e) => {
            // The disk is gone already (Store::write cleans up); record why.
            let _ = reg.snapshot_fail(&id, &e.to_string()).await;
            return Err(e.into());
        }
    }
    Ok(reg.snapshot(id.as_str()).await?)
}
