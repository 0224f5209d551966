//! The image registry: names in project and public scopes, the snapshots they point at, the
//! history of every name, and the SQLite schema that holds them (embedded sqlx migrations).
//!
//! Owns: the database file (`Home::database()`), WAL mode, foreign keys and the busy timeout;
//! every state change is one `BEGIN IMMEDIATE` transaction, so concurrent `kiln` processes
//! queue for the write lock instead of failing with "database is locked", and a crash leaves
//! either the old state or the new one. Knows no builder and no disk format: it records what
//! `snapshot` made, and checks that only `Completed` snapshots get a name.
//!
//! Scopes: a project sees its own names and every public name; its own win when both exist.
//! A public name is unique across all projects; a private name may repeat across projects.
//! Only the owning project may move, update or remove a name.

pub mod names;

use crate::ir::ImageConfig;
use crate::snapshot::{SnapshotId, SnapshotState};
pub use names::{ImageId, Name, NameError};
use serde::Serialize;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use std::path::{Path, PathBuf};
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a process waits for another's write transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Sandbox memory limits an image may ask for, in MiB.
pub const MEMORY_MB: std::ops::RangeInclusive<u32> = 256..=8192;
/// The default sandbox memory of a new image, in MiB.
pub const DEFAULT_MEMORY_MB: u32 = 1024;

/// Everything that can go wrong in the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The lock file that serializes migrations could not be taken.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened.
    #[error("cannot open the registry {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// The schema could not be migrated.
    #[error("cannot migrate the registry schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("registry query failed while {step}: {source}")]
    Db {
        /// What was being done.
        step: &'static str,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// A name or project breaks the grammar.
    #[error("invalid {what} {value:?}: {reason} (names are {grammar})", grammar = Name::GRAMMAR)]
    InvalidName {
        /// `name` or `project`.
        what: &'static str,
        /// The text given.
        value: String,
        /// Why.
        reason: NameError,
    },
    /// No snapshot with this id.
    #[error("snapshot {0} not found")]
    SnapshotNotFound(String),
    /// The snapshot is not `Completed`.
    #[error("snapshot {id} is {state}, only Completed snapshots can be registered")]
    SnapshotNotCompleted {
        /// The snapshot.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// A state change that the state machine does not allow.
    #[error("snapshot {id} is {state}, it cannot become {to}")]
    BadTransition {
        /// The snapshot.
        id: String,
        /// Its state.
        state: &'static str,
        /// The state asked for.
        to: &'static str,
    },
    /// The snapshot is still named.
    #[error("snapshot {id} is used by {}", names.join(", "))]
    SnapshotInUse {
        /// The snapshot.
        id: String,
        /// `project/name` of each image that points at it or has it in its history.
        names: Vec<String>,
    },
    /// No such image visible from the project.
    #[error("image {name} not found in project {project}")]
    ImageNotFound {
        /// The name or id asked for.
        name: String,
        /// The project looked in.
        project: String,
    },
    /// The public name belongs to another project.
    #[error("the public name {name} is taken by project {owner}")]
    NameTaken {
        /// The name.
        name: String,
        /// The project that holds it.
        owner: String,
    },
    /// The name is another project's (public) name.
    #[error("image {name} belongs to project {owner}; only that project can change it")]
    NotOwner {
        /// The name.
        name: String,
        /// Its project.
        owner: String,
    },
    /// A sandbox default out of range.
    #[error("{field} {value} is out of range: {range}")]
    OutOfRange {
        /// Which default.
        field: &'static str,
        /// The value given.
        value: i64,
        /// The allowed range.
        range: &'static str,
    },
    /// `kiln gc` found the snapshot still young or in use by the time it looked again.
    #[error("snapshot {id} is not garbage")]
    NotGarbage {
        /// The snapshot.
        id: String,
    },
    /// The image cannot be launched yet (or at all).
    #[error("image {name} is {status}, not Ready")]
    NotReady {
        /// The name.
        name: String,
        /// Its status.
        status: &'static str,
    },
    /// A row holds something this version does not understand.
    #[error("the registry holds an invalid {what}: {detail}")]
    Corrupt {
        /// Which column.
        what: &'static str,
        /// What was found.
        detail: String,
    },
}

type Result<T> = std::result::Result<T, RegistryError>;

fn db(step: &'static str) -> impl FnOnce(sqlx::Error) -> RegistryError {
    move |source| RegistryError::Db { step, source }
}

/// The status of an image: whether a sandbox can be launched from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ImageStatus {
    /// Its snapshot is Completed; sandboxes launch from it.
    Ready,
    /// Being built or prepared.
    Preparing,
    /// The build or preparation failed.
    Failed,
}

impl ImageStatus {
    /// As stored and printed.
    pub fn name(self) -> &'static str {
        match self {
            ImageStatus::Ready => "Ready",
            ImageStatus::Preparing => "Preparing",
            ImageStatus::Failed => "Failed",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "Ready" => Ok(ImageStatus::Ready),
            "Preparing" => Ok(ImageStatus::Preparing),
            "Failed" => Ok(ImageStatus::Failed),
            other => Err(RegistryError::Corrupt {
                what: "image status",
                detail: other.into(),
            }),
        }
    }
}

/// The process that owns a `Pending` snapshot: its pid and start time, so that a pid reused by
/// another process is not taken for the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            start: process_start(pid).unwrap_or(0),
        }
    }

    /// True while the owning process runs.
    pub fn is_alive(&self) -> bool {
        process_start(self.pid) == Some(self.start)
    }
}

fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); starttime is field 22.
    let start = rest.split_whitespace().nth(19)?.parse().ok()?;
    // A zombie has exited: its snapshot will never complete.
    let state = rest.split_whitespace().next()?;
    (state != "Z" && state != "X").then_some(start)
}

/// Which snapshots [`Registry::snapshot_remove`] may delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Any that nothing names (`kiln snapshot rm`).
    Unnamed,
    /// Only garbage (`kiln gc`): Pending of a process that is gone, Failed, or Completed,
    /// unnamed and older than `grace`.
    Garbage {
        /// How long an unnamed Completed snapshot is kept.
        grace: Duration,
    },
}

/// A snapshot as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Its id.
    pub id: SnapshotId,
    /// Its state.
    pub state: SnapshotState,
    /// Size of its disk in MiB.
    pub disk_mb: u64,
    /// The snapshot it was taken from, if any.
    pub parent: Option<SnapshotId>,
    /// The process making it, while `Pending`.
    pub owner: Option<Owner>,
    /// When it was created (RFC 3339, UTC).
    pub created_at: String,
}

/// A base image reference and the digest it resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseRef {
    /// As written after `FROM`.
    pub reference: String,
    /// The resolved digest, if known.
    pub digest: Option<String>,
}

/// What a sandbox launched from an image gets unless the launch says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SandboxDefaults {
    /// Memory in MiB, within [`MEMORY_MB`].
    pub memory_mb: u32,
    /// Lifetime in seconds (`None`: no limit).
    pub ttl_seconds: Option<u64>,
    /// A TCP port that answers when the sandbox is ready.
    pub readiness_port: Option<u16>,
    /// Whether sandboxes may be launched from the image.
    pub enabled: bool,
}

impl Default for SandboxDefaults {
    fn default() -> Self {
        SandboxDefaults {
            memory_mb: DEFAULT_MEMORY_MB,
            ttl_seconds: None,
            readiness_port: None,
            enabled: true,
        }
    }
}

/// A change to sandbox defaults; `None` leaves a field as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DefaultsPatch {
    /// New memory in MiB.
    pub memory_mb: Option<u32>,
    /// New lifetime in seconds.
    pub ttl_seconds: Option<u64>,
    /// New readiness port.
    pub readiness_port: Option<u16>,
    /// New enabled flag.
    pub enabled: Option<bool>,
}

impl DefaultsPatch {
    /// Checks the ranges (memory 256–8192 MiB, ttl > 0, port > 0).
    pub fn validate(&self) -> Result<()> {
        if let Some(m) = self.memory_mb
            && !MEMORY_MB.contains(&m)
        {
            return Err(RegistryError::OutOfRange {
                field: "memory_mb",
                value: i64::from(m),
                range: "256 to 8192 MiB",
            });
        }
        if self.ttl_seconds == Some(0) {
            return Err(RegistryError::OutOfRange {
                field: "ttl_seconds",
                value: 0,
                range: "at least 1",
            });
        }
        if self.readiness_port == Some(0) {
            return Err(RegistryError::OutOfRange {
                field: "readiness_port",
                value: 0,
                range: "1 to 65535",
            });
        }
        Ok(())
    }
}

/// What a registration records besides the name and snapshot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Registration {
    /// Make (or keep) the name public. A name already public stays public.
    pub public: bool,
    /// The Dockerfile text, for `describe`.
    pub dockerfile: Option<String>,
    /// The image configuration.
    pub config: ImageConfig,
    /// The base image.
    pub base: Option<BaseRef>,
    /// Which builder made it (`namespace`, `microvm`), if one did.
    pub builder: Option<String>,
}

/// A registered name and everything known about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Its id (stable while the name exists in its project).
    pub id: ImageId,
    /// The name.
    pub name: String,
    /// The project that owns the name.
    pub project: String,
    /// Visible from every project.
    pub public: bool,
    /// The snapshot the name points at.
    pub snapshot: SnapshotRecord,
    /// The Dockerfile text, if one was given.
    pub dockerfile: Option<String>,
    /// The image configuration.
    pub config: ImageConfig,
    /// The base image.
    pub base: Option<BaseRef>,
    /// Which builder made it.
    pub builder: Option<String>,
    /// Sandbox defaults.
    pub defaults: SandboxDefaults,
    /// Ready, Preparing or Failed.
    pub status: ImageStatus,
    /// When the name was first registered.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
}

/// One entry of a name's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The snapshot the name pointed to.
    pub snapshot_id: String,
    /// When it was registered.
    pub registered_at: String,
    /// True for the entry the name points to now.
    pub current: bool,
}

/// The result of a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The image as it is now.
    pub image: Image,
    /// The snapshot the name pointed to before, when it was moved.
    pub previous: Option<String>,
}

/// Validates a project name.
pub fn project(s: &str) -> Result<Name> {
    Name::parse(s).map_err(|reason| RegistryError::InvalidName {
        what: "project",
        value: s.into(),
        reason,
    })
}

/// Validates an image name.
pub fn name(s: &str) -> Result<Name> {
    Name::parse(s).map_err(|reason| RegistryError::InvalidName {
        what: "name",
        value: s.into(),
        reason,
    })
}

/// An open registry.
#[derive(Debug, Clone)]
pub struct Registry {
    pool: SqlitePool,
}

const IMAGE_COLUMNS: &str = "i.id, i.name, i.project, i.public, i.dockerfile, i.config, \
     i.base_reference, i.base_digest, i.builder, i.memory_mb, i.ttl_seconds, i.readiness_port, \
     i.enabled, i.status, i.created_at, i.updated_at, \
     s.id AS s_id, s.state AS s_state, s.disk_mb AS s_disk_mb, s.uri AS s_uri, \
     s.sha256 AS s_sha256, s.size_bytes AS s_size_bytes, s.reason AS s_reason, \
     s.parent AS s_parent, s.owner_pid AS s_owner_pid, s.owner_start AS s_owner_start, \
     s.created_at AS s_created_at";

impl Registry {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub async fn open(path: &Path) -> Result<Registry> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| RegistryError::Lock {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        // Creating the file, switching it to WAL and migrating must happen once: an exclusive
        // flock around them makes 20 first runs at once safe.
        let lock_path = path.with_extension("db.lock");
        let lock_err = |source| RegistryError::Lock {
            path: lock_path.clone(),
            source,
        };
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(lock_err)?;
        let lock = tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| std::io::Error::from(e))
        })
        .await
        .map_err(|e| lock_err(std::io::Error::other(e)))?
        .map_err(lock_err)?;
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(opts)
            .await
            .map_err(|source| RegistryError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        MIGRATOR.run(&pool).await?;
        drop(lock);
        Ok(Registry { pool })
    }

    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db("starting a transaction"))
    }

    // ---- snapshots ------------------------------------------------------------------------

    /// Records a new `Pending` snapshot owned by `owner`.
    pub async fn snapshot_begin(
        &self,
        id: &SnapshotId,
        disk_mb: u64,
        parent: Option<&SnapshotId>,
        owner: Owner,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO snapshots (id, state, disk_mb, parent, owner_pid, owner_start, created_at) \
             VALUES (?, 'Pending', ?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        )
        .bind(id.as_str())
        .bind(disk_mb as i64)
        .bind(parent.map(SnapshotId::as_str))
        .bind(i64::from(owner.pid))
        .bind(owner.start as i64)
        .execute(&mut *tx)
        .await
        .map_err(db("recording a pending snapshot"))?;
        tx.commit().await.map_err(db("committing"))
    }

    /// `Pending` → `Completed`: call only when the disk is durable at `uri` and hashed.
    pub async fn snapshot_complete(
        &self,
        id: &SnapshotId,
        uri: &str,
        sha256: &str,
        size_bytes: u64,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let state = snapshot_state_in(&mut tx, id).await?;
        match state {
            SnapshotState::Pending => {}
            SnapshotState::Completed { .. } | SnapshotState::Failed { .. } => {
                return Err(RegistryError::BadTransition {
                    id: id.to_string(),
                    state: state.name(),
                    to: "Completed",
                });
            }
        }
        sqlx::query(
            "UPDATE snapshots SET state = 'Completed', uri = ?, sha256 = ?, size_bytes = ?, \
             owner_pid = NULL, owner_start = NULL WHERE id = ?",
        )
        .bind(uri)
        .bind(sha256)
        .bind(size_bytes as i64)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db("completing a snapshot"))?;
        tx.commit().await.map_err(db("committing"))
    }

    /// `Pending` → `Failed` with the reason.
    pub async fn snapshot_fail(&self, id: &SnapshotId, reason: &str) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let state = snapshot_state_in(&mut tx, id).await?;
        match state {
            SnapshotState::Pending => {}
            SnapshotState::Completed { .. } | SnapshotState::Failed { .. } => {
                return Err(RegistryError::BadTransition {
                    id: id.to_string(),
                    state: state.name(),
                    to: "Failed",
                });
            }
        }
        sqlx::query(
            "UPDATE snapshots SET state = 'Failed', reason = ?, owner_pid = NULL, \
             owner_start = NULL WHERE id = ?",
        )
        .bind(reason)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db("failing a snapshot"))?;
        tx.commit().await.map_err(db("committing"))
    }

    /// One snapshot.
    pub async fn snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        let row = sqlx::query(
            "SELECT id AS s_id, state AS s_state, disk_mb AS s_disk_mb, uri AS s_uri, \
             sha256 AS s_sha256, size_bytes AS s_size_bytes, reason AS s_reason, \
             parent AS s_parent, owner_pid AS s_owner_pid, owner_start AS s_owner_start, \
             created_at AS s_created_at FROM snapshots WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a snapshot"))?;
        match row {
            Some(r) => snapshot_of(&r),
            None => Err(RegistryError::SnapshotNotFound(id.into())),
        }
    }

    /// All snapshots, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let rows = sqlx::query(
            "SELECT id AS s_id, state AS s_state, disk_mb AS s_disk_mb, uri AS s_uri, \
             sha256 AS s_sha256, size_bytes AS s_size_bytes, reason AS s_reason, \
             parent AS s_parent, owner_pid AS s_owner_pid, owner_start AS s_owner_start, \
             created_at AS s_created_at FROM snapshots ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing snapshots"))?;
        rows.iter().map(snapshot_of).collect()
    }

    /// Deletes a snapshot's row if no image points at it or has it in its history, and, for a
    /// `Pending` one, only if its owner is gone; with [`Removal::Garbage`], only if it is
    /// garbage *now* (decided inside the transaction, so a snapshot that completed since the
    /// caller looked is never taken). The caller removes the disk afterwards.
    pub async fn snapshot_remove(&self, id: &str, removal: Removal) -> Result<SnapshotRecord> {
        let mut tx = self.write_tx().await?;
        let rec = sqlx::query(
            "SELECT id AS s_id, state AS s_state, disk_mb AS s_disk_mb, uri AS s_uri, \
             sha256 AS s_sha256, size_bytes AS s_size_bytes, reason AS s_reason, \
             parent AS s_parent, owner_pid AS s_owner_pid, owner_start AS s_owner_start, \
             created_at AS s_created_at FROM snapshots WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("reading a snapshot"))?;
        let rec = match rec {
            Some(r) => snapshot_of(&r)?,
            None => return Err(RegistryError::SnapshotNotFound(id.into())),
        };
        if let (SnapshotState::Pending, Some(owner)) = (&rec.state, rec.owner)
            && owner.is_alive()
        {
            return Err(RegistryError::SnapshotInUse {
                id: id.into(),
                names: vec![format!("the running process {}", owner.pid)],
            });
        }
        match (&rec.state, removal) {
            (_, Removal::Unnamed)
            | (SnapshotState::Pending | SnapshotState::Failed { .. }, Removal::Garbage { .. }) => {}
            (SnapshotState::Completed { .. }, Removal::Garbage { grace }) => {
                let age = std::time::SystemTime::now()
                    .duration_since(rec.id.created())
                    .unwrap_or_default();
                if age < grace {
                    return Err(RegistryError::NotGarbage { id: id.into() });
                }
            }
        }
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT i.project || '/' || i.name FROM images i \
             LEFT JOIN name_history h ON h.image_id = i.id \
             WHERE i.snapshot_id = ?1 OR h.snapshot_id = ?1 ORDER BY 1",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("finding a snapshot's users"))?;
        if !users.is_empty() {
            return Err(RegistryError::SnapshotInUse {
                id: id.into(),
                names: users,
            });
        }
        sqlx::query("DELETE FROM snapshots WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db("deleting a snapshot"))?;
        tx.commit().await.map_err(db("committing"))?;
        Ok(rec)
    }

    // ---- names ----------------------------------------------------------------------------

    /// Points `name` in `project` at `snapshot` in one transaction: creates the name, or moves
    /// it (keeping its id, defaults and history), so registering an older snapshot is a
    /// rollback. Only `Completed` snapshots are accepted.
    pub async fn register(
        &self,
        project: &Name,
        name: &Name,
        snapshot: &str,
        reg: Registration,
    ) -> Result<Registered> {
        let config = serde_json::to_string(&reg.config).map_err(|e| RegistryError::Corrupt {
            what: "image config",
            detail: e.to_string(),
        })?;
        let mut tx = self.write_tx().await?;
        let sid = SnapshotId::parse(snapshot)
            .ok_or_else(|| RegistryError::SnapshotNotFound(snapshot.into()))?;
        let state = snapshot_state_in(&mut tx, &sid).await?;
        match state {
            SnapshotState::Completed { .. } => {}
            SnapshotState::Pending | SnapshotState::Failed { .. } => {
                return Err(RegistryError::SnapshotNotCompleted {
                    id: snapshot.into(),
                    state: state.name(),
                });
            }
        }
        sqlx::query(
            "INSERT INTO projects (name, created_at) VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(project.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db("recording the project"))?;
        if reg.public {
            let owner: Option<String> = sqlx::query_scalar(
                "SELECT project FROM images WHERE name = ? AND public = 1 AND project <> ?",
            )
            .bind(name.as_str())
            .bind(project.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("checking public names"))?;
            if let Some(owner) = owner {
                return Err(RegistryError::NameTaken {
                    name: name.to_string(),
                    owner,
                });
            }
        }
        let existing: Option<(String, String)> =
            sqlx::query_as("SELECT id, snapshot_id FROM images WHERE project = ? AND name = ?")
                .bind(project.as_str())
                .bind(name.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("looking up the name"))?;
        let (image_id, previous) = match existing {
            Some((id, prev)) => {
                sqlx::query(
                    "UPDATE images SET snapshot_id = ?, public = MAX(public, ?), \
                     dockerfile = ?, config = ?, base_reference = ?, base_digest = ?, \
                     builder = ?, status = 'Ready', \
                     updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
                )
                .bind(snapshot)
                .bind(i64::from(reg.public))
                .bind(&reg.dockerfile)
                .bind(&config)
                .bind(reg.base.as_ref().map(|b| b.reference.clone()))
                .bind(reg.base.as_ref().and_then(|b| b.digest.clone()))
                .bind(&reg.builder)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_or(e, name, "moving the name"))?;
                (id, Some(prev))
            }
            None => {
                let id = ImageId::generate().to_string();
                let d = SandboxDefaults::default();
                sqlx::query(
                    "INSERT INTO images (id, name, project, public, snapshot_id, dockerfile, \
                     config, base_reference, base_digest, builder, memory_mb, ttl_seconds, \
                     readiness_port, enabled, status, created_at, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'Ready', \
                     strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                )
                .bind(&id)
                .bind(name.as_str())
                .bind(project.as_str())
                .bind(i64::from(reg.public))
                .bind(snapshot)
                .bind(&reg.dockerfile)
                .bind(&config)
                .bind(reg.base.as_ref().map(|b| b.reference.clone()))
                .bind(reg.base.as_ref().and_then(|b| b.digest.clone()))
                .bind(&reg.builder)
                .bind(i64::from(d.memory_mb))
                .bind(d.ttl_seconds.map(|t| t as i64))
                .bind(d.readiness_port.map(i64::from))
                .bind(i64::from(d.enabled))
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_or(e, name, "creating the name"))?;
                (id, None)
            }
        };
        sqlx::query(
            "INSERT INTO name_history (image_id, snapshot_id, registered_at) \
             VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        )
        .bind(&image_id)
        .bind(snapshot)
        .execute(&mut *tx)
        .await
        .map_err(db("recording history"))?;
        let image = image_by_id(&mut tx, &image_id).await?;
        tx.commit().await.map_err(db("committing"))?;
        Ok(Registered { image, previous })
    }

    /// Names visible from `project`: its own, then the public names of others that it does
    /// not shadow, each sorted by name.
    pub async fn list(&self, project: &Name) -> Result<Vec<Image>> {
        let sql = format!(
            "SELECT {IMAGE_COLUMNS} FROM images i JOIN snapshots s ON s.id = i.snapshot_id \
             WHERE i.project = ?1 OR (i.public = 1 AND i.name NOT IN \
               (SELECT name FROM images WHERE project = ?1)) \
             ORDER BY i.project <> ?1, i.name, i.project"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(project.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing images"))?;
        rows.iter().map(image_of).collect()
    }

    /// Resolves `NAME` or `img_…` from `project`: its own name first, then a public one; an
    /// id resolves if the image is the project's own or public.
    pub async fn describe(&self, project: &Name, key: &str) -> Result<Image> {
        let mut conn = self.pool.acquire().await.map_err(db("connecting"))?;
        resolve(&mut conn, project, key).await
    }

    /// Resolves a name for launching a sandbox: as [`Registry::describe`], and it must be
    /// Ready and enabled.
    pub async fn resolve_for_launch(&self, project: &Name, key: &str) -> Result<Image> {
        let img = self.describe(project, key).await?;
        match img.status {
            ImageStatus::Ready if img.defaults.enabled => Ok(img),
            ImageStatus::Ready => Err(RegistryError::NotReady {
                name: img.name,
                status: "disabled",
            }),
            ImageStatus::Preparing | ImageStatus::Failed => Err(RegistryError::NotReady {
                name: img.name,
                status: img.status.name(),
            }),
        }
    }

    /// Changes sandbox defaults of a name the project owns.
    pub async fn update(&self, project: &Name, key: &str, patch: DefaultsPatch) -> Result<Image> {
        patch.validate()?;
        let mut tx = self.write_tx().await?;
        let img = owned(&mut tx, project, key).await?;
        let d = img.defaults;
        let memory = patch.memory_mb.unwrap_or(d.memory_mb);
        let ttl = patch.ttl_seconds.or(d.ttl_seconds);
        let port = patch.readiness_port.or(d.readiness_port);
        let enabled = patch.enabled.unwrap_or(d.enabled);
        sqlx::query(
            "UPDATE images SET memory_mb = ?, ttl_seconds = ?, readiness_port = ?, enabled = ?, \
             updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
        )
        .bind(i64::from(memory))
        .bind(ttl.map(|t| t as i64))
        .bind(port.map(i64::from))
        .bind(i64::from(enabled))
        .bind(img.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db("updating defaults"))?;
        let img = image_by_id(&mut tx, img.id.as_str()).await?;
        tx.commit().await.map_err(db("committing"))?;
        Ok(img)
    }

    /// Sets the status of an image (the builder marks `Preparing`/`Failed`).
    pub async fn set_status(&self, image: &ImageId, status: ImageStatus) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "UPDATE images SET status = ?, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
             WHERE id = ?",
        )
        .bind(status.name())
        .bind(image.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db("setting the status"))?;
        tx.commit().await.map_err(db("committing"))
    }

    /// The snapshots a name visible from `project` pointed to, newest first.
    pub async fn history(&self, project: &Name, key: &str) -> Result<(Image, Vec<HistoryEntry>)> {
        let mut conn = self.pool.acquire().await.map_err(db("connecting"))?;
        let img = resolve(&mut conn, project, key).await?;
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT snapshot_id, registered_at, seq FROM name_history WHERE image_id = ? \
             ORDER BY seq DESC",
        )
        .bind(img.id.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading history"))?;
        let entries = rows
            .into_iter()
            .enumerate()
            .map(|(i, (snapshot_id, registered_at, _))| HistoryEntry {
                snapshot_id,
                registered_at,
                current: i == 0,
            })
            .collect();
        Ok((img, entries))
    }

    /// Removes a name the project owns, with its history. Its snapshot stays.
    pub async fn remove(&self, project: &Name, key: &str) -> Result<Image> {
        let mut tx = self.write_tx().await?;
        let img = owned(&mut tx, project, key).await?;
        sqlx::query("DELETE FROM images WHERE id = ?")
            .bind(img.id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db("removing the name"))?;
        tx.commit().await.map_err(db("committing"))?;
        Ok(img)
    }

    /// Ids of every snapshot an image points at or has in its history.
    pub async fn referenced_snapshots(&self) -> Result<std::collections::BTreeSet<String>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT snapshot_id FROM images UNION SELECT snapshot_id FROM name_history",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("finding referenced snapshots"))?;
        Ok(ids.into_iter().collect())
    }

    /// Closes the pool (waits for connections to finish).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn unique_or(e: sqlx::Error, name: &Name, step: &'static str) -> RegistryError {
    if let sqlx::Error::Database(d) = &e
        && d.is_unique_violation()
    {
        return RegistryError::NameTaken {
            name: name.to_string(),
            owner: "another project".into(),
        };
    }
    RegistryError::Db { step, source: e }
}

async fn snapshot_state_in(
    tx: &mut Transaction<'static, Sqlite>,
    id: &SnapshotId,
) -> Result<SnapshotState> {
    let row = sqlx::query(
        "SELECT id AS s_id, state AS s_state, disk_mb AS s_disk_mb, uri AS s_uri, \
         sha256 AS s_sha256, size_bytes AS s_size_bytes, reason AS s_reason, \
         parent AS s_parent, owner_pid AS s_owner_pid, owner_start AS s_owner_start, \
         created_at AS s_created_at FROM snapshots WHERE id = ?",
    )
    .bind(id.as_str())
    .fetch_optional(&mut **tx)
    .await
    .map_err(db("reading a snapshot"))?;
    match row {
        Some(r) => Ok(snapshot_of(&r)?.state),
        None => Err(RegistryError::SnapshotNotFound(id.to_string())),
    }
}

async fn image_by_id(tx: &mut Transaction<'static, Sqlite>, id: &str) -> Result<Image> {
    let sql = format!(
        "SELECT {IMAGE_COLUMNS} FROM images i JOIN snapshots s ON s.id = i.snapshot_id \
         WHERE i.id = ?"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(&mut **tx)
        .await
        .map_err(db("reading an image"))?;
    image_of(&row)
}

/// A name or id visible from `project`.
async fn resolve(conn: &mut sqlx::SqliteConnection, project: &Name, key: &str) -> Result<Image> {
    let not_found = || RegistryError::ImageNotFound {
        name: key.into(),
        project: project.to_string(),
    };
    let sql = format!(
        "SELECT {IMAGE_COLUMNS} FROM images i JOIN snapshots s ON s.id = i.snapshot_id \
         WHERE (i.id = ?2 OR i.name = ?2) AND (i.project = ?1 OR i.public = 1) \
         ORDER BY i.project <> ?1 LIMIT 1"
    );
    if ImageId::parse(key).is_none() && Name::parse(key).is_err() {
        return Err(not_found());
    }
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(project.as_str())
        .bind(key)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db("resolving a name"))?;
    match row {
        Some(r) => image_of(&r),
        None => Err(not_found()),
    }
}

/// A name or id the project owns (for changes). Another project's public name is `NotOwner`.
async fn owned(tx: &mut Transaction<'static, Sqlite>, project: &Name, key: &str) -> Result<Image> {
    let img = resolve(&mut *tx, project, key).await?;
    if img.project != project.as_str() {
        return Err(RegistryError::NotOwner {
            name: img.name,
            owner: img.project,
        });
    }
    Ok(img)
}

fn corrupt(what: &'static str) -> impl Fn(sqlx::Error) -> RegistryError {
    move |e| RegistryError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

fn snapshot_of(r: &SqliteRow) -> Result<SnapshotRecord> {
    let c = corrupt("snapshot row");
    let id: String = r.try_get("s_id").map_err(&c)?;
    let state: String = r.try_get("s_state").map_err(&c)?;
    let state = match state.as_str() {
        "Pending" => SnapshotState::Pending,
        "Completed" => SnapshotState::Completed {
            uri: r.try_get("s_uri").map_err(&c)?,
            sha256: r.try_get("s_sha256").map_err(&c)?,
            size_bytes: r.try_get::<i64, _>("s_size_bytes").map_err(&c)? as u64,
        },
        "Failed" => SnapshotState::Failed {
            reason: r.try_get("s_reason").map_err(&c)?,
        },
        other => {
            return Err(RegistryError::Corrupt {
                what: "snapshot state",
                detail: other.into(),
            });
        }
    };
    let pid: Option<i64> = r.try_get("s_owner_pid").map_err(&c)?;
    let start: Option<i64> = r.try_get("s_owner_start").map_err(&c)?;
    let parent: Option<String> = r.try_get("s_parent").map_err(&c)?;
    Ok(SnapshotRecord {
        id: SnapshotId::parse(&id).ok_or_else(|| RegistryError::Corrupt {
            what: "snapshot id",
            detail: id.clone(),
        })?,
        state,
        disk_mb: r.try_get::<i64, _>("s_disk_mb").map_err(&c)? as u64,
        parent: parent.as_deref().and_then(SnapshotId::parse),
        owner: match (pid, start) {
            (Some(pid), Some(start)) => Some(Owner {
                pid: pid as u32,
                start: start as u64,
            }),
            _ => None,
        },
        created_at: r.try_get("s_created_at").map_err(&c)?,
    })
}

fn image_of(r: &SqliteRow) -> Result<Image> {
    let c = corrupt("image row");
    let id: String = r.try_get("id").map_err(&c)?;
    let config: String = r.try_get("config").map_err(&c)?;
    let base_reference: Option<String> = r.try_get("base_reference").map_err(&c)?;
    let status: String = r.try_get("status").map_err(&c)?;
    Ok(Image {
        id: ImageId::parse(&id).ok_or_else(|| RegistryError::Corrupt {
            what: "image id",
            detail: id.clone(),
        })?,
        name: r.try_get("name").map_err(&c)?,
        project: r.try_get("project").map_err(&c)?,
        public: r.try_get::<i64, _>("public").map_err(&c)? != 0,
        snapshot: snapshot_of(r)?,
        dockerfile: r.try_get("dockerfile").map_err(&c)?,
        config: serde_json::from_str(&config).map_err(|e| RegistryError::Corrupt {
            what: "image config",
            detail: e.to_string(),
        })?,
        base: match base_reference {
            Some(reference) => Some(BaseRef {
                reference,
                digest: r.try_get("base_digest").map_err(&c)?,
            }),
            None => None,
        },
        builder: r.try_get("builder").map_err(&c)?,
        defaults: SandboxDefaults {
            memory_mb: r.try_get::<i64, _>("memory_mb").map_err(&c)? as u32,
            ttl_seconds: r
                .try_get::<Option<i64>, _>("ttl_seconds")
                .map_err(&c)?
                .map(|t| t as u64),
            readiness_port: r
                .try_get::<Option<i64>, _>("readiness_port")
                .map_err(&c)?
                .map(|p| p as u16),
            enabled: r.try_get::<i64, _>("enabled").map_err(&c)? != 0,
        },
        status: ImageStatus::parse(&status)?,
        created_at: r.try_get("created_at").map_err(&c)?,
        updated_at: r.try_get("updated_at").map_err(&c)?,
    })
}
