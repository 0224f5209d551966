//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The BuildKit conformance data, read in place from `../shared/conformance/buildkit`
/// (or `$KILN_CONFORMANCE_DIR`). Missing data is a loud failure, never a skip.
pub fn conformance_dir() -> PathBuf {
    let dir = match std::env::var_os("KILN_CONFORMANCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/buildkit"),
    };
    assert!(
        dir.join("README.md").is_file(),
        "BuildKit conformance data not found at {}: clone kiln beside shared/ or set KILN_CONFORMANCE_DIR",
        dir.display()
    );
    dir
}
