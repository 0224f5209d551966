//! Every environment variable Kiln reads, in one place.

/// All local state (`--home`).
pub const KILN_HOME: &str = "KILN_HOME";
/// The project names are looked up in (`--project`).
pub const KILN_PROJECT: &str = "KILN_PROJECT";
/// A `tracing` filter for logs on stderr (`-v` raises it).
pub const KILN_LOG: &str = "KILN_LOG";
/// Reproducible builds' clock: the superblock time of a snapshot, and the newest mtime in it.
pub const SOURCE_DATE_EPOCH: &str = "SOURCE_DATE_EPOCH";
