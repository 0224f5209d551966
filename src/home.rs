//! `KILN_HOME`: where all local state lives, and the versioned layout inside it.
//!
//! Every directory carries a format version (`blobs-v1/`), so a future layout can sit beside
//! the old one. Nothing here creates files outside the home.

use std::path::{Path, PathBuf};

/// The local state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

/// Failure to find or create the home.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// Neither `--home`, `KILN_HOME`, `XDG_DATA_HOME` nor `HOME` is set.
    #[error("cannot find a home for Kiln's state: set --home or KILN_HOME")]
    NoHome,
    /// A directory could not be created.
    #[error("cannot create {path}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Home {
    /// A home at `root` (not created yet).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Home { root: root.into() }
    }

    /// `--home`/`KILN_HOME` if given, else `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, HomeError> {
        if let Some(p) = explicit {
            return Ok(Home::at(p));
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Ok(Home::at(PathBuf::from(x).join("kiln")));
        }
        let home = std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .ok_or(HomeError::NoHome)?;
        Ok(Home::at(PathBuf::from(home).join(".local/share/kiln")))
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A directory inside the home, created if missing.
    pub fn dir(&self, name: &str) -> Result<PathBuf, HomeError> {
        let path = self.root.join(name);
        std::fs::create_dir_all(&path).map_err(|source| HomeError::Create {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// The SQLite database file of the registry.
    pub fn database(&self) -> PathBuf {
        self.root.join("kiln.db")
    }

    /// Content-addressed blobs (`blobs-v1/sha256/HEX`).
    pub fn blobs(&self) -> Result<PathBuf, HomeError> {
        self.dir("blobs-v1")
    }

    /// Unpacked layers, one directory per diff_id (`layers-v1/sha256/HEX`).
    pub fn layers(&self) -> Result<PathBuf, HomeError> {
        self.dir("layers-v1")
    }

    /// Snapshot disks (`snapshots-v1/snap_…/disk.ext4`).
    pub fn snapshots(&self) -> Result<PathBuf, HomeError> {
        self.dir("snapshots-v1")
    }

    /// Scratch space for work in progress; `kiln gc` may remove what no live process owns.
    pub fn tmp(&self) -> Result<PathBuf, HomeError> {
        self.dir("tmp")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_home_wins() {
        let h = Home::resolve(Some(Path::new("/x/y"))).expect("home");
        assert_eq!(h.root(), Path::new("/x/y"));
        assert_eq!(h.database(), Path::new("/x/y/kiln.db"));
    }

    #[test]
    fn directories_are_versioned_and_created() {
        let t = tempfile::tempdir().expect("tempdir");
        let h = Home::at(t.path());
        assert!(h.blobs().expect("blobs").ends_with("blobs-v1"));
        assert!(t.path().join("blobs-v1").is_dir());
    }
}
