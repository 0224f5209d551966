//! Base images: the distribution reference grammar, a registry client (token and basic auth,
//! docker config credentials), the content-addressed local store under `KILN_HOME`, safe
//! layer unpacking with whiteouts, imports of local image files, and the built-in bases made
//! on this machine. Knows no builder, snapshot or name registry: it hands out layer
//! directories and image configs.
//!
//! For the builder: [`pull::ensure`] (or [`store::Store::local`] then [`pull::pull_blocking`])
//! gives a [`store::LocalImage`] whose `layer_dirs` are bottom to top (reverse them for an
//! overlayfs `lowerdir`); [`flatten::flatten`] stacks them into one tree instead; the store
//! implements [`crate::frontend::BaseImages`] so lowering sees base configs;
//! [`store::Store::gc`] keeps whatever [`store::GcRoots`] names besides image records.

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
