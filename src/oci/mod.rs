//! Base images: the distribution reference grammar, a registry client (token and basic auth,
//! docker config credentials), the content-addressed local store under `KILN_HOME`, safe
//! layer unpacking with whiteouts, imports of local image files, and the built-in bases made
//! on this machine. Knows no builder, snapshot or name registry: it hands out layer
//! directories and image configs.

pub mod auth;
pub mod builtin;
pub mod client;
pub mod config;
pub mod digest;
pub mod error;
pub mod flatten;
pub mod import;
pub mod pull;
pub mod reference;
pub mod store;
pub mod sys;
pub mod unpack;

pub use digest::Digest;
pub use error::{ErrorKind, OciError};
pub use reference::{Reference, ReferenceError};
