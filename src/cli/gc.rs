//! `kiln gc`, the snapshot and registry part: `Pending` snapshots whose process is gone,
//! `Failed` ones, unnamed `Completed` ones older than a grace period, partial disks, store
//! entries no snapshot owns, and `tmp/` entries of dead processes.
//!
//! Race-free with a running `kiln`: the store is listed *before* the registry is read, and
//! an import records its `Pending` row before it creates its directory, so a directory seen
//! here always has its row visible by the time rows are read. Whether a row is garbage is
//! decided again inside the transaction that deletes it (`Removal::Garbage`), so a snapshot
//! that completed or got a name since it was read is never taken; then its files go.

use super::Ctx;
use super::output::{CliError, Exit};
use super::snapshot::{open_registry, open_store};
use crate::registry::{Owner, RegistryError, Removal, SnapshotRecord};
use crate::snapshot::{Leftover, SnapshotState};
use clap::Args;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Remove what nothing references and what interrupted runs left behind.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Keep unnamed Completed snapshots younger than this (so an import about to be
    /// registered is not collected).
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub grace_seconds: u64,
}

/// Why a snapshot was collected.
fn why(rec: &SnapshotRecord) -> &'static str {
    match rec.state {
        SnapshotState::Pending => "interrupted",
        SnapshotState::Failed { .. } => "failed",
        SnapshotState::Completed { .. } => "unreferenced",
    }
}

fn size_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !md.is_dir() {
        return md.blocks() * 512;
    }
    std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| size_of(&e.path())).sum())
        .unwrap_or(0)
}

fn remove_path(path: &Path) -> std::io::Result<()> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Runs `kiln gc`.
pub fn run(args: &GcArgs, ctx: &Ctx) -> Result<(), CliError> {
    ctx.block_on(run_async(args, ctx))?
}

async fn run_async(args: &GcArgs, ctx: &Ctx) -> Result<(), CliError> {
    let io = |path: &Path, e: std::io::Error| {
        CliError::new(
            Exit::Environment,
            "io",
            format!("cannot remove {}: {e}", path.display()),
            None,
        )
    };
    let store = open_store(ctx)?;
    // 1. List the store first (see the module docs for why the order matters).
    let listed = store.leftovers(&|_| crate::snapshot::Keep::Nothing)?;
    let reg = open_registry(ctx).await?;
    let rows: BTreeMap<String, SnapshotRecord> = reg
        .snapshots()
        .await?
        .into_iter()
        .map(|r| (r.id.to_string(), r))
        .collect();
    let mut referenced = reg.referenced_snapshots().await?;
    // Sandboxes keep their image's snapshot alive even after its name moves or goes; the
    // shared read-only mounts of the other snapshots are released first, so a removed disk
    // is never left mounted.
    let sandboxes = crate::sbx::Sandboxes::open(&ctx.home()?)?;
    let sandbox_leftovers = sandboxes.remove_leftovers()?;
    let in_use: std::collections::BTreeSet<String> = sandboxes
        .all()?
        .into_iter()
        .map(|r| r.snapshot_id)
        .collect();
    let unmounted = sandboxes.unmount_unused(&in_use)?;
    referenced.extend(in_use.iter().cloned());
    let grace = Duration::from_secs(args.grace_seconds);
    let now = SystemTime::now();
    let mut removed = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut freed = 0u64;

    // 2. Rows that no longer stand for a usable or in-progress snapshot. The look here only
    //    skips what is surely alive; `snapshot_remove` decides on the current row.
    let removal = Removal::Garbage { grace };
    for rec in rows.values() {
        let maybe = match &rec.state {
            SnapshotState::Pending => !rec.owner.is_some_and(|o| o.is_alive()),
            SnapshotState::Failed { .. } => true,
            SnapshotState::Completed { .. } => {
                !referenced.contains(rec.id.as_str())
                    && now.duration_since(rec.id.created()).unwrap_or_default() >= grace
            }
        };
        if !maybe {
            continue;
        }
        match reg.snapshot_remove(rec.id.as_str(), removal).await {
            Ok(gone) => {
                let dir = store.dir(&gone.id);
                freed += size_of(&dir);
                store.remove(&gone.id)?;
                removed.push(json!({"snapshot_id": gone.id.as_str(), "reason": why(&gone)}));
            }
            Err(e) if not_garbage(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }

    // 3. Store entries: directories without a row, partial files beside finished disks,
    //    anything that is not a snapshot directory.
    for l in listed {
        match l {
            Leftover::Dir { id, path } => match rows.get(id.as_str()).map(|r| &r.state) {
                Some(SnapshotState::Pending) => {
                    // Being made when the rows were read: its process may have finished since
                    // (the row is Completed now) or died after step 2 looked.
                    let orphan = match reg.snapshot_remove(id.as_str(), removal).await {
                        Ok(gone) => {
                            removed.push(
                                json!({"snapshot_id": gone.id.as_str(), "reason": why(&gone)}),
                            );
                            true
                        }
                        Err(RegistryError::SnapshotNotFound(_)) => true,
                        Err(e) if not_garbage(&e) => false,
                        Err(e) => return Err(e.into()),
                    };
                    if !orphan || !path.exists() {
                        continue;
                    }
                    freed += size_of(&path);
                    remove_path(&path).map_err(|e| io(&path, e))?;
                    files.push(path);
                }
                Some(SnapshotState::Completed { .. }) => {
                    let Ok(rd) = std::fs::read_dir(&path) else {
                        continue;
                    };
                    for f in rd.flatten() {
                        if f.file_name() != "disk.ext4" {
                            let p = f.path();
                            freed += size_of(&p);
                            remove_path(&p).map_err(|e| io(&p, e))?;
                            files.push(p);
                        }
                    }
                }
                Some(SnapshotState::Failed { .. }) | None => {
                    if !path.exists() {
                        continue;
                    }
                    freed += size_of(&path);
                    remove_path(&path).map_err(|e| io(&path, e))?;
                    files.push(path);
                }
            },
            Leftover::Stray(path) => {
                freed += size_of(&path);
                remove_path(&path).map_err(|e| io(&path, e))?;
                files.push(path);
            }
        }
    }

    // 4. tmp/ entries named by a process that is gone (`kiln-PID-START-…`), among them a
    // killed build's scratch disk (unmounted first).
    let home = ctx.home()?;
    let tmp = home.root().join("tmp");
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(owner) = name.to_str().and_then(owner_of_tmp) else {
                continue;
            };
            if owner.is_alive() {
                continue;
            }
            let p = e.path();
            // A killed build's scratch disk is still mounted in its directory.
            crate::build::overlay::unmount_under(&p).map_err(|e| io(&p, e))?;
            freed += size_of(&p);
            remove_path(&p).map_err(|e| io(&p, e))?;
            files.push(p);
        }
    }

    // 5. Base-image blobs and layers no image record uses (the builder's step layers live in
    // cache-v1/, not in the base store, so they need no roots here).
    let base = crate::oci::store::Store::open(&home)
        .and_then(|s| s.gc(&crate::oci::store::GcRoots::default()))
        .map_err(super::base::cli_error)?;
    freed += base.bytes_freed;

    // 6. Entries of `image create`'s tree → snapshot map whose snapshot is gone.
    if let Ok(rd) = std::fs::read_dir(home.root().join("tree-snapshots-v1")) {
        for e in rd.flatten() {
            let id = std::fs::read_to_string(e.path()).unwrap_or_default();
            if reg.snapshot(id.trim()).await.is_err() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let text = format!(
        "removed {} snapshot(s), {} leftover file(s), {} base blob(s) and {} base layer(s); {} bytes freed\n",
        removed.len(),
        files.len(),
        base.blobs_removed,
        base.layers_removed,
        freed
    );
    ctx.out.result(
        &text,
        &json!({
            "removed_snapshots": removed,
            "removed_files": files,
            "base": base,
            "freed_bytes": freed,
            "unmounted_snapshots": unmounted,
            "removed_sandbox_leftovers": sandbox_leftovers,
        }),
    )
}

/// Errors that mean "not garbage after all": named, still being made, young, or gone already.
fn not_garbage(e: &RegistryError) -> bool {
    matches!(
        e,
        RegistryError::SnapshotInUse { .. }
            | RegistryError::NotGarbage { .. }
            | RegistryError::SnapshotNotFound(_)
    )
}

/// The owner a `tmp/` entry's name gives: `kiln-PID-START-anything`.
fn owner_of_tmp(name: &str) -> Option<Owner> {
    let mut it = name.strip_prefix("kiln-")?.splitn(3, '-');
    let pid = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    Some(Owner { pid, start })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_names_carry_their_owner() {
        assert_eq!(
            owner_of_tmp("kiln-12-345-unpack"),
            Some(Owner {
                pid: 12,
                start: 345
            })
        );
        assert_eq!(owner_of_tmp("other"), None);
        assert_eq!(owner_of_tmp("kiln-x-1-a"), None);
    }
}
