-- The registry: projects, snapshots, images (one row per name in a project) and the history of
-- each name. Names follow [a-z0-9][a-z0-9._-]{0,62} (checked in Rust and here).

CREATE TABLE projects (
    name       TEXT PRIMARY KEY NOT NULL,
    created_at TEXT NOT NULL
) STRICT;

CREATE TABLE snapshots (
    id          TEXT PRIMARY KEY NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('Pending', 'Completed', 'Failed')),
    disk_mb     INTEGER NOT NULL CHECK (disk_mb > 0),
    uri         TEXT,
    sha256      TEXT,
    size_bytes  INTEGER,
    reason      TEXT,
    parent      TEXT REFERENCES snapshots (id) ON DELETE SET NULL,
    -- The process making a Pending snapshot: pid and its start time (clock ticks since boot,
    -- /proc/PID/stat field 22), so a reused pid is not mistaken for the owner.
    owner_pid   INTEGER,
    owner_start INTEGER,
    created_at  TEXT NOT NULL,
    CHECK (state <> 'Completed' OR (uri IS NOT NULL AND sha256 IS NOT NULL AND size_bytes IS NOT NULL)),
    CHECK (state <> 'Failed' OR reason IS NOT NULL)
) STRICT;

CREATE TABLE images (
    id             TEXT PRIMARY KEY NOT NULL,
    name           TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 63),
    project        TEXT NOT NULL REFERENCES projects (name),
    public         INTEGER NOT NULL CHECK (public IN (0, 1)),
    snapshot_id    TEXT NOT NULL REFERENCES snapshots (id),
    dockerfile     TEXT,
    config         TEXT NOT NULL,
    base_reference TEXT,
    base_digest    TEXT,
    builder        TEXT,
    memory_mb      INTEGER NOT NULL CHECK (memory_mb BETWEEN 256 AND 8192),
    ttl_seconds    INTEGER CHECK (ttl_seconds IS NULL OR ttl_seconds > 0),
    readiness_port INTEGER CHECK (readiness_port IS NULL OR readiness_port BETWEEN 1 AND 65535),
    enabled        INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    status         TEXT NOT NULL CHECK (status IN ('Ready', 'Preparing', 'Failed')),
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    UNIQUE (project, name)
) STRICT;

-- Public names are unique across all projects.
CREATE UNIQUE INDEX images_public_name ON images (name) WHERE public = 1;
CREATE INDEX images_snapshot ON images (snapshot_id);

CREATE TABLE name_history (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id      TEXT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    snapshot_id   TEXT NOT NULL REFERENCES snapshots (id),
    registered_at TEXT NOT NULL
) STRICT;

CREATE INDEX name_history_image ON name_history (image_id, seq);
CREATE INDEX name_history_snapshot ON name_history (snapshot_id);
