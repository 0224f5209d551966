//! Finds BuildKit's conformance corpus and loads its Dockerfiles, read in place (never copied
//! into the repository).
//!
//! The corpus lives at `<workspace root>/../shared/conformance/buildkit`, or wherever
//! `$KILN_CONFORMANCE_DIR` points. A missing corpus is an error, never a silent skip.

use std::path::{Path, PathBuf};

/// One Dockerfile of the corpus.
pub struct CorpusFile {
    /// `parser/testfiles/<case>` or `derived/parser-heredoc/<case>`.
    pub name: String,
    /// The file's bytes, unchanged.
    pub bytes: Vec<u8>,
}

/// The conformance corpus directory (the one holding `README.md`).
pub fn conformance_dir() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("KILN_CONFORMANCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("../shared/conformance/buildkit"),
    };
    if dir.join("README.md").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "BuildKit conformance corpus not found at {}: clone kiln beside shared/ or set \
             KILN_CONFORMANCE_DIR",
            dir.display()
        ))
    }
}

/// The Kiln workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Every `parser/testfiles/*/Dockerfile` and `derived/parser-heredoc/*/Dockerfile`, sorted by
/// name so that runs are reproducible.
pub fn load() -> Result<Vec<CorpusFile>, String> {
    let root = conformance_dir()?;
    let mut files = Vec::new();
    for group in ["parser/testfiles", "derived/parser-heredoc"] {
        let dir = root.join(group);
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("read {}: {e}", dir.display()))?;
            let path = entry.path().join("Dockerfile");
            if path.is_file() {
                let bytes =
                    std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
                let case = entry.file_name().to_string_lossy().into_owned();
                found.push(CorpusFile {
                    name: format!("{group}/{case}"),
                    bytes,
                });
            }
        }
        if found.is_empty() {
            return Err(format!("no */Dockerfile under {}", dir.display()));
        }
        files.extend(found);
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}
