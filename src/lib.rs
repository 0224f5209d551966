//! Kiln: Dockerfiles and SDK image definitions to bootable root-disk snapshots.
//!
//! Without the `host` feature (on by default) the library is only what the microVM guest
//! agent links: [`ir`], the step executor and namespace driver in [`build`], and the guest
//! side of [`vm`].
pub mod build;
#[cfg(feature = "host")]
pub mod cli;
#[cfg(feature = "host")]
pub mod doctor;
pub mod envvars;
#[cfg(feature = "host")]
pub mod frontend;
pub mod fs;
pub mod home;
pub mod ir;
#[cfg(feature = "host")]
pub mod mount;
#[cfg(feature = "host")]
pub mod oci;
#[cfg(feature = "host")]
pub mod pipeline;
#[cfg(feature = "host")]
pub mod registry;
#[cfg(feature = "host")]
pub mod sbx;
#[cfg(feature = "host")]
pub mod snapshot;
pub mod vm;
