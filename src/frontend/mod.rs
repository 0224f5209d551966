//! Front end: Dockerfiles and SDK image definitions → [`crate::ir::ImageSpec`].
//!
//! `dockerfile` parses, `instructions` types, `lower` expands and resolves, `sdk` reads the
//! JSON form. Uses nothing of the build, snapshot or registry modules.

pub mod dockerfile;
mod error;
pub mod instructions;
pub mod lint;
pub mod lower;
pub mod sdk;

pub use error::FrontendError;
pub use lint::Lint;
pub use lower::{BaseImages, LowerOptions, Lowered, NoBaseImages, lower_dockerfile};
