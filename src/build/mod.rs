//! The builder side: build context and `.dockerignore`, step cache keys, drivers.
//!
//! Depends on `ir` and the OS only; knows no registry and no snapshot format.

#[cfg(feature = "host")]
pub mod cache;
pub mod cgroup;
#[cfg(feature = "host")]
pub mod context;
#[cfg(feature = "host")]
pub mod copy;
#[cfg(feature = "host")]
pub mod dockerignore;
pub mod driver;
pub mod executor;
#[cfg(feature = "host")]
pub mod fetch;
pub mod overlay;
#[cfg(feature = "host")]
pub mod run;
pub mod sys;
