//! The namespace builder's scratch disk: `--builder_disk_mb` as a real limit on what RUN
//! steps may write.
//!
//! Owns `KILN_HOME/tmp/kiln-PID-START-builder-disk-…/` while a build runs: a sparse blank
//! ext4 file of `builder_disk_mb` (Kiln's own ext4 writer, no `mkfs`), loop-mounted
//! `nodev,nosuid`, on which each RUN step's overlayfs upper and work directories live. A step
//! that writes more fails with `ENOSPC` inside its own file system, never filling the host's;
//! its finished upper is then moved into the step cache through the same OCI tar stream and
//! hardened unpacker the microvm builder uses for its layers (so the cached layer is the tree
//! the step made, whiteouts and xattrs included). COPY and ADD write to the cache directly:
//! their size is bounded by the context and their checked downloads.
//!
//! Made on the first RUN step that is not cached, so a cached rebuild mounts nothing; unmounted
//! on drop, and `kiln gc` unmounts and removes what a killed build left.

use crate::oci::unpack::{UnpackOptions, unpack_layer};
use crate::snapshot::ext4::{self, WriteOptions};
use crate::snapshot::tree::Tree;
use crate::vm::tarball::{self, Whiteouts};
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};

/// A mounted scratch disk, unmounted on drop.
pub struct ScratchDisk {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    mb: u64,
}

fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl ScratchDisk {
    /// Writes a blank ext4 of `mb` MiB under `tmp` and mounts it.
    pub fn mount(tmp: &Path, mb: u64) -> io::Result<ScratchDisk> {
        let owner = crate::registry::Owner::current();
        let dir = tempfile::Builder::new()
            .prefix(&format!("kiln-{}-{}-builder-disk-", owner.pid, owner.start))
            .tempdir_in(tmp)?;
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty)?;
        let tree = Tree::from_dir(&empty).map_err(|e| other("read an empty tree", e))?;
        let disk = dir.path().join("disk.ext4");
        ext4::write_without_digest(
            &tree,
            WriteOptions {
                disk_mb: mb,
                epoch: Some(0),
            },
            &disk,
        )
        .map_err(|e| other("write the builder's scratch disk", e))?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt)?;
        crate::mount::loop_mount(&disk, &mnt, false).map_err(|e| other("mount it", e))?;
        Ok(ScratchDisk { dir, mnt, mb })
    }

    /// The mounted file system.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// Less than 1 MiB is free (what a step that failed for space leaves).
    pub fn full(&self) -> bool {
        nix::sys::statvfs::statvfs(&self.mnt)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .is_ok_and(|free| free < 1 << 20)
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        if let Err(e) = crate::mount::umount(&self.mnt) {
            tracing::warn!(mount = %self.mnt.display(), error = %e, "builder scratch disk left mounted; `kiln gc` removes it");
            // The directory must stay while it is mounted.
            self.dir.disable_cleanup(true);
        }
    }
}

/// Moves the tree `from` (an overlayfs upper: whiteouts as 0/0 character devices, opaque
/// directories as xattrs) into the empty directory `to` on another file system.
pub fn move_layer(from: &Path, to: &Path) -> io::Result<()> {
    let (r, w) = io::pipe()?;
    std::thread::scope(|s| {
        let writer = s.spawn(move || tarball::write_tree(from, BufWriter::new(w), Whiteouts::Oci));
        let mut r = BufReader::new(r);
        let opts = UnpackOptions {
            max_bytes: u64::MAX,
            preserve_owners: true,
        };
        let unpacked = unpack_layer(&mut r, to, &opts).map_err(|e| other("unpack", e));
        // Drained, so the writer never blocks on a pipe nobody reads.
        let _ = io::copy(&mut r, &mut io::sink());
        drop(r);
        let written = writer
            .join()
            .map_err(|_| other("pack", "the writer thread panicked"))?;
        written?;
        unpacked.map(|_| ())
    })?;
    std::fs::remove_dir_all(from)
}

impl std::fmt::Debug for ScratchDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScratchDisk")
            .field("mnt", &self.mnt)
            .field("mb", &self.mb)
            .finish()
    }
}
