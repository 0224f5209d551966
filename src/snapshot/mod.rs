//! Snapshots: bootable ext4 root disks made from a root tree, their ids and states, and the
//! local store they live in (`snapshots-v1/snap_…/disk.ext4`).
//!
//! Owns: reading a root tree (a directory or a tar, [`tree`]), writing it as a reproducible,
//! sparse ext4 image and hashing it in the same pass ([`ext4`]), the on-disk store with its
//! temp-then-rename discipline ([`store`]), and exporting a disk back to a tar ([`export`]).
//! Knows nothing of names, projects or SQL: the registry records a snapshot's state, this module
//! only makes and reads disks.
//!
//! Why `mkext4` and not `mkfs.ext4 -d`: `mke2fs -d` inserts directory entries by a linear scan,
//! so a directory of n entries costs O(n²) (envlab.md §4: 20,000 files in one directory take
//! 15 s), and it copies each source file's atime, so reading a tree changes the next image.
//! mkext4 builds the htree in one pass and takes every timestamp, the UUID and the hash seed as
//! inputs. A loop mount plus copy is linear too, but needs root and a loop device, drops
//! sockets, and the kernel stamps ctimes with the wall clock, so it cannot be reproducible.
//! The numbers are in the report of `cargo xtask bench snapshot`.

pub mod digest;
pub mod export;
pub mod ext4;
pub mod store;
pub mod tree;

use std::fmt;
use std::path::PathBuf;

pub use ext4::{DiskInfo, Prepared, WriteOptions};
pub use store::{Keep, Leftover, Store, StoredDisk};
pub use tree::Tree;

/// The default size of a root disk, in MiB (CLI.md: `--disk_mb`, default 10240).
pub const DEFAULT_DISK_MB: u64 = 10240;

/// The largest disk Kiln makes, in MiB (1 TiB): mkext4 writes no 64bit feature.
pub const MAX_DISK_MB: u64 = 1 << 20;

/// A snapshot's id: `snap_` followed by a ULID (26 Crockford base-32 characters, uppercase).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(String);

impl SnapshotId {
    /// A new id, ordered by creation time.
    pub fn generate() -> Self {
        SnapshotId(format!("snap_{}", ulid::Ulid::generate()))
    }

    /// Parses `snap_` + ULID; anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("snap_")?;
        let u = ulid::Ulid::from_string(rest).ok()?;
        // Only the canonical spelling, so one snapshot has exactly one id string.
        (u.to_string() == rest).then(|| SnapshotId(s.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When the id was made (the ULID's timestamp).
    pub fn created(&self) -> std::time::SystemTime {
        self.0
            .strip_prefix("snap_")
            .and_then(|u| ulid::Ulid::from_string(u).ok())
            .map_or(std::time::UNIX_EPOCH, |u| u.datetime())
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a snapshot is in its life. `Pending` → `Completed` or `Failed`; never back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotState {
    /// Being made; the disk may be incomplete or absent.
    Pending,
    /// The disk is complete, durable and hashed.
    Completed {
        /// A durable URI of the disk (`file:///…/disk.ext4` locally).
        uri: String,
        /// The block digest of the whole disk file ([`digest`]), lowercase hex.
        sha256: String,
        /// Bytes the disk occupies on the host (allocated blocks; the file is sparse).
        size_bytes: u64,
    },
    /// Making it failed; there is no disk.
    Failed {
        /// Why.
        reason: String,
    },
}

impl SnapshotState {
    /// `Pending`, `Completed` or `Failed`, as CLI.md prints it.
    pub fn name(&self) -> &'static str {
        match self {
            SnapshotState::Pending => "Pending",
            SnapshotState::Completed { .. } => "Completed",
            SnapshotState::Failed { .. } => "Failed",
        }
    }

    /// True only for `Completed`: the one state a name may point at.
    pub fn is_completed(&self) -> bool {
        match self {
            SnapshotState::Completed { .. } => true,
            SnapshotState::Pending | SnapshotState::Failed { .. } => false,
        }
    }
}

/// Everything that can go wrong making, storing or exporting a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The root tree could not be read.
    #[error("cannot read {path}: {source}")]
    ReadTree {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tar could not be parsed.
    #[error("cannot parse the tar {path}: {source}")]
    ReadTar {
        /// The archive.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tar entry names a path outside the root (`../x`, or a hard link to one).
    #[error("tar entry {entry:?} escapes the root")]
    EscapingPath {
        /// The entry's path as written in the archive.
        entry: String,
    },
    /// The tree holds something ext4 or Kiln cannot represent.
    #[error("{path}: {reason}")]
    Unsupported {
        /// Where in the tree.
        path: String,
        /// What.
        reason: String,
    },
    /// The tree does not fit the disk.
    #[error("the tree needs a disk of at least {needed_mb} MiB, but disk_mb is {disk_mb}")]
    TooSmall {
        /// The size asked for.
        disk_mb: u64,
        /// The smallest size that fits.
        needed_mb: u64,
    },
    /// `disk_mb` out of range.
    #[error("disk_mb must be between 1 and {MAX_DISK_MB}, got {0}")]
    DiskSize(u64),
    /// The ext4 writer rejected the tree or failed writing it.
    #[error("writing the ext4 image failed: {0}")]
    Ext4(#[from] mkext4::Error),
    /// A file of the tree changed while it was being copied.
    #[error("{path} changed while it was being copied: {source}")]
    Fill {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: mkext4::Error,
    },
    /// A store file or directory could not be written, synced or renamed.
    #[error("{step} {path}: {source}")]
    Store {
        /// What was being done (`create`, `sync`, `rename`, `remove`).
        step: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A disk could not be read back for export.
    #[error("cannot read the disk {path}: {reason}")]
    ReadDisk {
        /// The disk.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The export tar could not be written.
    #[error("cannot write {path}: {source}")]
    WriteTar {
        /// The tar.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back_and_sort_by_time() {
        let a = SnapshotId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = SnapshotId::generate();
        assert_eq!(SnapshotId::parse(a.as_str()), Some(a.clone()));
        assert!(a < b);
        assert_eq!(a.as_str().len(), 5 + 26);
    }

    #[test]
    fn ids_that_are_not_snap_ulid_are_rejected() {
        for bad in [
            "snap_",
            "img_01J0000000000000000000000",
            "snap_01j0000000000000000000000",
            "snap_../../etc",
            "01J00000000000000000000000",
        ] {
            assert_eq!(SnapshotId::parse(bad), None, "{bad}");
        }
    }
}
