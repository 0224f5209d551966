//! The one error type of `oci`, and the kinds the CLI maps to exit codes.

use super::auth::CredentialError;
use super::digest::Digest;
use super::reference::ReferenceError;
use super::unpack::UnpackError;
use std::path::PathBuf;

/// What went wrong while resolving, fetching, storing or unpacking a base image.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// No connection, a timeout, or a TLS failure.
    #[error("cannot reach registry {registry}: {detail}")]
    Unreachable {
        /// The registry host.
        registry: String,
        /// Why.
        detail: String,
    },
    /// A 401/403 from the registry or its token server.
    #[error("registry {registry} denied access to {repository} {}: {detail}",
        if *with_credentials { "with the credentials from the docker config" } else { "without credentials" })]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// The repository.
        repository: String,
        /// Whether credentials were sent.
        with_credentials: bool,
        /// What the registry said.
        detail: String,
    },
    /// A 404: unknown repository, tag, manifest or blob.
    #[error("{what} not found in registry {registry}")]
    NotFound {
        /// The registry host.
        registry: String,
        /// What was asked for (`tag latest of x/busybox`).
        what: String,
    },
    /// Any other unexpected status, after retries.
    #[error("registry {registry} answered HTTP {status} for {url}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Status {
        /// The registry host.
        registry: String,
        /// The status code.
        status: u16,
        /// The request.
        url: String,
        /// The registry's error message, if any.
        detail: String,
    },
    /// Content whose sha256 is not the digest it was asked for by.
    #[error(
        "{what} {expected} does not match its content (which hashes to {actual}): the registry or the file served corrupt or tampered data"
    )]
    DigestMismatch {
        /// `layer`, `config`, `manifest`.
        what: &'static str,
        /// The digest it should have.
        expected: Digest,
        /// The digest it has.
        actual: Digest,
    },
    /// Content of another size than its descriptor says.
    #[error("{what} {digest} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        /// `layer`, `config`, `manifest`.
        what: &'static str,
        /// Its digest.
        digest: Digest,
        /// The size in the descriptor.
        expected: u64,
        /// The size received.
        actual: u64,
    },
    /// Docker's schema 1 manifests (pre-2017) are refused.
    #[error("{reference} has a Docker schema 1 manifest, which Kiln does not support")]
    Schema1 {
        /// The reference.
        reference: String,
    },
    /// A manifest or layer of a type Kiln does not read.
    #[error("{reference}: unsupported {what} media type {media_type:?}")]
    UnsupportedMediaType {
        /// The reference.
        reference: String,
        /// `manifest`, `config`, `layer`.
        what: &'static str,
        /// The media type.
        media_type: String,
    },
    /// An index without a linux/amd64 entry.
    #[error("{reference} has no linux/amd64 image (it has: {available})")]
    NoPlatform {
        /// The reference.
        reference: String,
        /// The platforms it lists.
        available: String,
    },
    /// JSON that is not what it should be (manifest, index, config, layout).
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being read.
        what: String,
        /// The parse error.
        detail: String,
    },
    /// A layer that cannot be unpacked (hostile, corrupt, too large).
    #[error("layer {digest} cannot be unpacked")]
    Unpack {
        /// The layer's blob digest.
        digest: Digest,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// A local file-system step.
    #[error("{step} {path}")]
    Io {
        /// The step (`write blob`, `rename layer`).
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The docker config or a credential helper failed.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    /// A tool the built-in bases need is missing or failed (`mmdebstrap`, `busybox`).
    #[error("{tool}: {detail}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// What happened.
        detail: String,
    },
    /// A `kiln/…` reference that names no built-in base.
    #[error("{reference} is not a built-in base (there are kiln/busybox and kiln/debian:bookworm)")]
    NoSuchBuiltin {
        /// The reference.
        reference: String,
    },
    /// Not in the local store.
    #[error("image {reference} is not in the local store")]
    NotLocal {
        /// The reference.
        reference: String,
    },
    /// An image file or layout that cannot be imported.
    #[error("cannot import {source_ref}: {detail}")]
    Import {
        /// The `oci-layout:…` / `oci-archive:…` / `docker-archive:…` argument.
        source_ref: String,
        /// Why.
        detail: String,
    },
    /// The home directory cannot be created.
    #[error(transparent)]
    Home(#[from] crate::home::HomeError),
}

/// How the CLI should classify an [`OciError`] (CLI.md's exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Exit 2: a malformed reference, image or archive.
    BadInput,
    /// Exit 3: unknown repository, tag, local image.
    NotFound,
    /// Exit 5: refused credentials.
    Auth,
    /// Exit 5: the registry cannot be reached or fails.
    Unreachable,
    /// Exit 5: content that does not match its digest.
    Corrupt,
    /// Exit 5: local disk, tools, permissions.
    Environment,
}

impl OciError {
    /// The kind, for exit codes and hints.
    pub fn kind(&self) -> ErrorKind {
        use OciError as E;
        match self {
            E::Reference(_) | E::Schema1 { .. } | E::UnsupportedMediaType { .. } => {
                ErrorKind::BadInput
            }
            E::Malformed { .. } | E::Unpack { .. } | E::Import { .. } => ErrorKind::BadInput,
            E::NotFound { .. }
            | E::NoPlatform { .. }
            | E::NoSuchBuiltin { .. }
            | E::NotLocal { .. } => ErrorKind::NotFound,
            E::Unauthorized { .. } | E::Credentials(_) => ErrorKind::Auth,
            E::Unreachable { .. } | E::Status { .. } => ErrorKind::Unreachable,
            E::DigestMismatch { .. } | E::SizeMismatch { .. } => ErrorKind::Corrupt,
            E::Io { .. } | E::Tool { .. } | E::Home(_) => ErrorKind::Environment,
        }
    }

    pub(crate) fn io(
        step: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> OciError {
        let path = path.into();
        move |source| OciError::Io { step, path, source }
    }
}
