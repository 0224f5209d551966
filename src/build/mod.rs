//! The builder side: build context and `.dockerignore`, step cache keys, drivers.
//!
//! Depends on `ir` and the OS only; knows no registry and no snapshot format.

pub mod cache;
pub mod cgroup;
pub mod context;
pub mod copy;
pub mod dockerignore;
pub mod driver;
pub mod executor;
pub mod fetch;
pub mod overlay;
pub mod run;
pub mod sys;
