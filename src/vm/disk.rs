//! Copy-on-write disks of microVM sandboxes, through `qemu-img` (Debian: `qemu-utils`).
//!
//! A sandbox's root disk is a qcow2 file whose backing file is its image's snapshot disk
//! (raw ext4, never written): creating one writes a few hundred KiB whatever the snapshot's
//! size, and the guest's writes land in the qcow2 file only. `sbx snapshot` reads the
//! sandbox's tree back through a sparse raw copy ([`to_raw`]).

use super::VmError;
use std::path::{Path, PathBuf};

/// `qemu-img` on `PATH`.
pub fn qemu_img() -> Result<PathBuf, VmError> {
    crate::doctor::on_path("qemu-img").ok_or_else(|| VmError::Qemu {
        reason: "qemu-img not found on PATH (Debian: apt-get install qemu-utils)".into(),
    })
}

fn run(args: &[&std::ffi::OsStr], what: &str) -> Result<(), VmError> {
    let qemu_img = qemu_img()?;
    let mut all = vec![qemu_img.as_os_str()];
    all.extend_from_slice(args);
    crate::mount::tool(&all).map_err(|detail| VmError::Prepare {
        what: what.to_string(),
        source: std::io::Error::other(format!("qemu-img: {detail}")),
    })
}

/// Writes `out`, a qcow2 clone of the raw disk `backing` (which must stay where it is).
pub fn clone_overlay(backing: &Path, out: &Path) -> Result<(), VmError> {
    let backing = std::path::absolute(backing)
        .map_err(VmError::prepare(format!("resolve {}", backing.display())))?;
    run(
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            "-b".as_ref(),
            backing.as_os_str(),
            out.as_os_str(),
        ],
        "clone the snapshot disk",
    )
}

/// Writes `out`, the whole disk `qcow2` shows as a sparse raw file.
pub fn to_raw(qcow2: &Path, out: &Path) -> Result<(), VmError> {
    run(
        &[
            "convert".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            qcow2.as_os_str(),
            out.as_os_str(),
        ],
        "read the sandbox disk",
    )
}
