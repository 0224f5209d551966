//! Every environment variable Kiln reads, in one place.

/// All local state (`--home`).
pub const KILN_HOME: &str = "KILN_HOME";
/// The project names are looked up in (`--project`).
pub const KILN_PROJECT: &str = "KILN_PROJECT";
/// A `tracing` filter for logs on stderr (`-v` raises it).
pub const KILN_LOG: &str = "KILN_LOG";
/// Reproducible builds' clock: the superblock time of a snapshot, and the newest mtime in it.
pub const SOURCE_DATE_EPOCH: &str = "SOURCE_DATE_EPOCH";
/// Registries spoken to over plain HTTP besides loopback ones (comma list of `HOST[:PORT]`).
pub const KILN_INSECURE_REGISTRIES: &str = "KILN_INSECURE_REGISTRIES";
/// The most bytes one base-image layer may unpack to (decompression-bomb limit).
pub const KILN_MAX_LAYER_BYTES: &str = "KILN_MAX_LAYER_BYTES";
/// The directory of the docker `config.json` registry credentials are read from.
pub const DOCKER_CONFIG: &str = "DOCKER_CONFIG";
/// The guest kernel of microVMs (default: the newest `/boot/vmlinuz-*-cloud-amd64`).
pub const KILN_VM_KERNEL: &str = "KILN_VM_KERNEL";
/// The static guest agent (default: `kiln-agent` beside `kiln`, or `../agent/kiln-agent`).
pub const KILN_AGENT: &str = "KILN_AGENT";
/// The microVM accelerator, `kvm` or `tcg` (default: KVM when it works here, else TCG).
pub const KILN_VM_ACCEL: &str = "KILN_VM_ACCEL";
/// Extra guest kernel command-line words (for example `loglevel=7`, or `kiln.crash=step`).
pub const KILN_VM_APPEND: &str = "KILN_VM_APPEND";
/// A per-step time limit in seconds for `image create`, any builder (default: none).
pub const KILN_STEP_TIMEOUT: &str = "KILN_STEP_TIMEOUT";
