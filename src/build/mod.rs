//! The builder side: build context and `.dockerignore`, step cache keys, drivers.
//!
//! Depends on `ir` and the OS; knows no registry. Disks it makes for itself (the microVM's,
//! the namespace builder's scratch disk) come from the snapshot module's ext4 writer.

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
#[cfg(feature = "host")]
pub mod scratch_disk;
pub mod sys;
