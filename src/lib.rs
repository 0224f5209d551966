//! Kiln: Dockerfiles and SDK image definitions to bootable root-disk snapshots.
pub mod build;
pub mod cli;
pub mod doctor;
pub mod envvars;
pub mod frontend;
pub mod fs;
pub mod home;
pub mod ir;
pub mod oci;
pub mod pipeline;
pub mod registry;
pub mod sbx;
pub mod snapshot;
