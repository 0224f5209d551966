//! The local snapshot store: `snapshots-v1/snap_…/disk.ext4`.
//!
//! A disk is written as `disk.ext4.partial` beside its final name, synced, hashed, and only
//! then renamed to `disk.ext4` (and the directory synced), so a `disk.ext4` is always complete.
//! Anything else in the store (a `.partial`, a directory whose snapshot the registry does not
//! list as `Completed`) is a leftover that [`Store::leftovers`] reports for `kiln gc`.

use super::ext4::{self, DiskInfo, Prepared};
use super::tree::Tree;
use super::{SnapshotError, SnapshotId};
use std::path::{Path, PathBuf};

const DISK: &str = "disk.ext4";
const PARTIAL: &str = "disk.ext4.partial";

/// The store under one directory (normally `Home::snapshots()`).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A disk written and renamed into place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDisk {
    /// `file://` URI of the disk.
    pub uri: String,
    /// The disk's path.
    pub path: PathBuf,
    /// Hash and sizes.
    pub info: DiskInfo,
}

/// Something in the store that no finished snapshot owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// A snapshot directory (with whatever it holds).
    Dir {
        /// The id it is named after.
        id: SnapshotId,
        /// Its path.
        path: PathBuf,
    },
    /// A file or directory that is not a snapshot directory at all.
    Stray(PathBuf),
}

fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Store { step, path, source }
}

impl Store {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    /// The directory of one snapshot.
    pub fn dir(&self, id: &SnapshotId) -> PathBuf {
        self.root.join(id.as_str())
    }

    /// Where a completed snapshot's disk is.
    pub fn disk_path(&self, id: &SnapshotId) -> PathBuf {
        self.dir(id).join(DISK)
    }

    /// Writes `tree`, laid out as `prepared`, as the disk of `id`: into `disk.ext4.partial`,
    /// then renamed in. On any error the snapshot's directory is removed again, so nothing is
    /// left behind.
    pub fn write(
        &self,
        id: &SnapshotId,
        tree: &Tree,
        prepared: Prepared,
    ) -> Result<StoredDisk, SnapshotError> {
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        match self.write_in(&dir, tree, prepared) {
            Ok(d) => Ok(d),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn write_in(
        &self,
        dir: &Path,
        tree: &Tree,
        prepared: Prepared,
    ) -> Result<StoredDisk, SnapshotError> {
        let partial = dir.join(PARTIAL);
        let info = ext4::write_prepared(tree, prepared, &partial)?;
        let disk = dir.join(DISK);
        std::fs::rename(&partial, &disk).map_err(io("rename", &partial))?;
        crate::fs::sync_dir(dir).map_err(io("sync", dir))?;
        if let Some(parent) = dir.parent() {
            crate::fs::sync_dir(parent).map_err(io("sync", parent))?;
        }
        let abs = std::path::absolute(&disk).map_err(io("resolve", &disk))?;
        Ok(StoredDisk {
            uri: file_uri(&abs),
            path: abs,
            info,
        })
    }

    /// Removes a snapshot's directory; absent is fine.
    pub fn remove(&self, id: &SnapshotId) -> Result<(), SnapshotError> {
        let dir = self.dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &dir)(e)),
        }
    }

    /// What in the store no snapshot owns, given what the registry says of each id: a
    /// [`Keep::All`] directory is left alone (its snapshot is being made), a [`Keep::Disk`] one
    /// keeps only `disk.ext4`, a [`Keep::Nothing`] one goes, and so does anything that is not a
    /// snapshot directory.
    pub fn leftovers(
        &self,
        classify: &dyn Fn(&SnapshotId) -> Keep,
    ) -> Result<Vec<Leftover>, SnapshotError> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("list", &self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(io("list", &self.root))?;
            let path = entry.path();
            let id = entry.file_name().to_str().and_then(SnapshotId::parse);
            match id.as_ref().map(|id| (id, classify(id))) {
                Some((_, Keep::All)) => {}
                Some((_, Keep::Disk)) => {
                    let inner = std::fs::read_dir(&path).map_err(io("list", &path))?;
                    for f in inner {
                        let f = f.map_err(io("list", &path))?;
                        if f.file_name() != DISK {
                            out.push(Leftover::Stray(f.path()));
                        }
                    }
                }
                Some((id, Keep::Nothing)) => out.push(Leftover::Dir {
                    id: id.clone(),
                    path,
                }),
                None => out.push(Leftover::Stray(path)),
            }
        }
        out.sort_by(|a, b| leftover_path(a).cmp(leftover_path(b)));
        Ok(out)
    }
}

/// What of a snapshot directory to keep (see [`Store::leftovers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Everything: a live process is writing it.
    All,
    /// The finished disk only.
    Disk,
    /// Nothing: no snapshot owns it.
    Nothing,
}

fn leftover_path(l: &Leftover) -> &Path {
    match l {
        Leftover::Dir { path, .. } | Leftover::Stray(path) => path,
    }
}

/// `file://` + the path, with bytes outside RFC 3986's unreserved set and `/` percent-encoded.
pub fn file_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut s = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// The path a `file://` URI names (the inverse of [`file_uri`]); `None` for other schemes.
pub fn uri_path(uri: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let rest = uri.strip_prefix("file://")?;
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_uris_round_trip_odd_paths() {
        let p = Path::new("/tmp/a b/ü%/disk.ext4");
        let u = file_uri(p);
        assert_eq!(u, "file:///tmp/a%20b/%C3%BC%25/disk.ext4");
        assert_eq!(uri_path(&u).as_deref(), Some(p));
        assert_eq!(uri_path("s3://b/k"), None);
    }

    #[test]
    fn strays_and_unkept_snapshot_dirs_are_leftovers() {
        let t = tempfile::tempdir().expect("tempdir");
        let store = Store::new(t.path());
        let kept = SnapshotId::generate();
        let orphan = SnapshotId::generate();
        std::fs::create_dir_all(store.dir(&kept)).expect("mkdir");
        std::fs::write(store.dir(&kept).join(PARTIAL), b"x").expect("partial");
        std::fs::create_dir_all(store.dir(&orphan)).expect("mkdir");
        std::fs::write(t.path().join("junk"), b"x").expect("junk");
        let left = store
            .leftovers(&|id| {
                if *id == kept {
                    Keep::Disk
                } else {
                    Keep::Nothing
                }
            })
            .expect("leftovers");
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(left.contains(&Leftover::Dir {
            id: orphan.clone(),
            path: store.dir(&orphan)
        }));
        assert!(left.contains(&Leftover::Stray(store.dir(&kept).join(PARTIAL))));
    }
}
