//! The build context: the directory a build reads COPY/ADD sources from, walked once and
//! filtered by `.dockerignore` with Docker's semantics.
//!
//! Owns which context paths exist for a build and their cache digests. It never follows a
//! symlink (a link is an entry with a target, even one pointing outside the context) and never
//! hands out a path outside the root. Digests cover content, file type, permission bits and
//! link targets; modification times and owners are not part of them, because COPY resets
//! owners (to 0:0 or `--chown`) and BuildKit keeps mtimes out of its cache keys too.

use super::dockerignore::{Matcher, PatternError};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What went wrong reading the context.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The context root is not a readable directory.
    #[error("build context {path} is not a readable directory")]
    Root {
        /// The root.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The ignore file could not be read.
    #[error("cannot read {path}")]
    IgnoreFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A pattern in the ignore file is malformed.
    #[error("{path}: {source}")]
    Pattern {
        /// The file.
        path: PathBuf,
        /// The pattern error.
        #[source]
        source: PatternError,
    },
    /// Walking the context failed (an unreadable directory, a file that vanished).
    #[error("cannot read {path} in the build context")]
    Walk {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A path is not in the context (or was excluded by `.dockerignore`).
    #[error("{path}: not found in the build context")]
    NotFound {
        /// The context-relative path.
        path: String,
    },
}

/// The kind of a context entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file of this size.
    File {
        /// Bytes.
        size: u64,
    },
    /// A directory.
    Dir,
    /// A symbolic link, not followed.
    Symlink {
        /// The link target as stored.
        target: PathBuf,
    },
}

/// One path of the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File type and payload.
    pub kind: EntryKind,
    /// Permission bits (including setuid/setgid/sticky).
    pub mode: u32,
}

/// A walked, filtered build context.
#[derive(Debug)]
pub struct BuildContext {
    root: PathBuf,
    /// Context-relative `/`-separated paths, sorted; directories included.
    entries: BTreeMap<String, Entry>,
    /// The ignore file that applied, if any.
    ignore_file: Option<PathBuf>,
    /// Content digests computed so far.
    digests: Mutex<HashMap<String, String>>,
}

/// The ignore file for a Dockerfile: `<Dockerfile>.dockerignore` beside it, else
/// `.dockerignore` at the context root.
pub fn ignore_file_for(root: &Path, dockerfile: Option<&Path>) -> Option<PathBuf> {
    if let Some(df) = dockerfile
        && let Some(name) = df.file_name()
    {
        let mut specific = name.to_os_string();
        specific.push(".dockerignore");
        let candidate = df.with_file_name(specific);
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    let general = root.join(".dockerignore");
    general.is_file().then_some(general)
}

impl BuildContext {
    /// Walks `root` once, applying the ignore file chosen by [`ignore_file_for`].
    pub fn open(root: &Path, dockerfile: Option<&Path>) -> Result<BuildContext, ContextError> {
        std::fs::read_dir(root).map_err(|source| ContextError::Root {
            path: root.to_path_buf(),
            source,
        })?;
        let ignore_file = ignore_file_for(root, dockerfile);
        let matcher = match &ignore_file {
            Some(p) => {
                let text = std::fs::read(p).map_err(|source| ContextError::IgnoreFile {
                    path: p.clone(),
                    source,
                })?;
                Matcher::parse(&String::from_utf8_lossy(&text)).map_err(|source| {
                    ContextError::Pattern {
                        path: p.clone(),
                        source,
                    }
                })?
            }
            None => Matcher::new(&[]).map_err(|source| ContextError::Pattern {
                path: root.join(".dockerignore"),
                source,
            })?,
        };
        let mut entries = BTreeMap::new();
        // Excluded directories walked for `!` exceptions: kept if something below comes back.
        let mut excluded_dirs: HashMap<String, u32> = HashMap::new();
        let mut walk = walkdir::WalkDir::new(root)
            .follow_links(false)
            .sort_by_file_name()
            .min_depth(1)
            .into_iter();
        while let Some(item) = walk.next() {
            let item = item.map_err(|e| {
                let path = e
                    .path()
                    .map_or_else(|| root.to_path_buf(), Path::to_path_buf);
                ContextError::Walk {
                    path,
                    source: e
                        .into_io_error()
                        .unwrap_or_else(|| std::io::Error::other("loop")),
                }
            })?;
            let Some(rel) = relative(root, item.path()) else {
                continue;
            };
            let is_dir = item.file_type().is_dir();
            if matcher.excluded(&rel) {
                // Without `!` patterns nothing below an excluded directory can come back.
                if is_dir && !matcher.has_exclusions() {
                    walk.skip_current_dir();
                } else if is_dir && let Ok(meta) = item.metadata() {
                    excluded_dirs.insert(rel, meta.permissions().mode() & 0o7777);
                }
                continue;
            }
            let meta = item.metadata().map_err(|e| ContextError::Walk {
                path: item.path().to_path_buf(),
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("metadata")),
            })?;
            let mode = meta.permissions().mode() & 0o7777;
            let kind = if is_dir {
                EntryKind::Dir
            } else if item.file_type().is_symlink() {
                let target =
                    std::fs::read_link(item.path()).map_err(|source| ContextError::Walk {
                        path: item.path().to_path_buf(),
                        source,
                    })?;
                EntryKind::Symlink { target }
            } else if item.file_type().is_file() {
                EntryKind::File { size: meta.size() }
            } else {
                // Sockets, FIFOs and devices are not build inputs (Docker skips them too).
                tracing::debug!(path = %rel, "skipping special file in the build context");
                continue;
            };
            // An entry an exception brings back below an excluded directory brings that
            // directory too (as BuildKit's context transfer sends the parents of what it
            // sends), with its own mode.
            let mut parent = rel.as_str();
            while let Some((up, _)) = parent.rsplit_once('/') {
                if let Some(mode) = excluded_dirs.remove(up) {
                    entries.insert(
                        up.to_string(),
                        Entry {
                            kind: EntryKind::Dir,
                            mode,
                        },
                    );
                }
                parent = up;
            }
            entries.insert(rel, Entry { kind, mode });
        }
        Ok(BuildContext {
            root: root.to_path_buf(),
            entries,
            ignore_file,
            digests: Mutex::new(HashMap::new()),
        })
    }

    /// The context root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The ignore file that applied.
    pub fn ignore_file(&self) -> Option<&Path> {
        self.ignore_file.as_deref()
    }

    /// Every included path, sorted.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// One entry.
    pub fn get(&self, rel: &str) -> Option<&Entry> {
        self.entries.get(rel)
    }

    /// The entries at or below `rel` (`""` or `.` for the whole context), sorted.
    pub fn subtree<'a>(
        &'a self,
        rel: &'a str,
    ) -> Box<dyn Iterator<Item = (&'a str, &'a Entry)> + 'a> {
        let rel = rel.trim_matches('/');
        if rel.is_empty() || rel == "." {
            return Box::new(self.entries());
        }
        // Children sort between "rel/" and "rel0" ('0' follows '/'); siblings such as
        // "rel-x" or "relx" fall outside that range.
        let (lo, hi) = (format!("{rel}/"), format!("{rel}0"));
        let children = self
            .entries
            .range::<str, _>((
                std::ops::Bound::Included(lo.as_str()),
                std::ops::Bound::Excluded(hi.as_str()),
            ))
            .map(|(k, v)| (k.as_str(), v))
            .collect::<Vec<_>>();
        let own = self
            .entries
            .get_key_value(rel)
            .map(|(k, v)| (k.as_str(), v));
        Box::new(own.into_iter().chain(children))
    }

    /// The cache digest of a path: for a file its type, mode and content; for a link its
    /// target; for a directory every entry below it (path, type, mode, content).
    pub fn digest(&self, rel: &str) -> Result<String, ContextError> {
        let rel = rel.trim_matches('/');
        let mut h = Sha256::new();
        let mut any = false;
        for (path, entry) in self.subtree(rel) {
            any = true;
            let suffix = path.strip_prefix(rel).unwrap_or(path);
            h.update(suffix.as_bytes());
            h.update([0]);
            h.update(self.entry_digest(path, entry)?.as_bytes());
            h.update([0]);
        }
        if !any {
            return Err(ContextError::NotFound {
                path: rel.to_string(),
            });
        }
        Ok(format!("sha256:{}", hex::encode(h.finalize())))
    }

    fn entry_digest(&self, rel: &str, entry: &Entry) -> Result<String, ContextError> {
        let header = |kind: &str| format!("{kind} {:o}", entry.mode);
        Ok(match &entry.kind {
            EntryKind::Dir => header("dir"),
            EntryKind::Symlink { target } => {
                format!("{} {}", header("symlink"), target.to_string_lossy())
            }
            EntryKind::File { .. } => {
                format!("{} {}", header("file"), self.content_digest(rel)?)
            }
        })
    }

    /// sha256 of a file's bytes, computed once per build.
    pub fn content_digest(&self, rel: &str) -> Result<String, ContextError> {
        if let Some(d) = self.lock().get(rel) {
            return Ok(d.clone());
        }
        let path = self.root.join(rel);
        let walk_err = |source| ContextError::Walk {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::open(&path).map_err(walk_err)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).map_err(|source| ContextError::Walk {
                path: path.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let d = hex::encode(h.finalize());
        self.lock().insert(rel.to_string(), d.clone());
        Ok(d)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // A poisoned map holds only finished digests; keep using it.
        self.digests.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `path` relative to `root`, `/`-separated; `None` for the root itself or a non-UTF-8 path.
fn relative(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let s = rel.to_str()?;
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        for (p, content) in files {
            let path = t.path().join(p);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, content).expect("write");
        }
        t
    }

    fn paths(c: &BuildContext) -> Vec<&str> {
        c.entries().map(|(p, _)| p).collect()
    }

    #[test]
    fn dockerignore_exceptions_reach_into_excluded_dirs() {
        let t = tree(&[
            ("Dockerfile", "FROM x"),
            (".dockerignore", "dir\n!dir/keep\nfoo\n"),
            ("dir/keep", "k"),
            ("dir/other", "o"),
            ("a/foo", "nested foo stays"),
            ("foo", "root foo goes"),
            (".env", "dotfiles stay"),
        ]);
        let c = BuildContext::open(t.path(), Some(&t.path().join("Dockerfile"))).expect("open");
        assert_eq!(
            paths(&c),
            [
                ".dockerignore",
                ".env",
                "Dockerfile",
                "a",
                "a/foo",
                "dir",
                "dir/keep"
            ]
        );
        // The excluded directory comes back as the parent of what came back, so a COPY of
        // the context reaches dir/keep.
        assert_eq!(c.get("dir").map(|e| &e.kind), Some(&EntryKind::Dir));
    }

    #[test]
    fn dockerfile_specific_ignore_file_wins() {
        let t = tree(&[
            ("app.Dockerfile", "FROM x"),
            ("app.Dockerfile.dockerignore", "secret"),
            (".dockerignore", "public"),
            ("secret", "s"),
            ("public", "p"),
        ]);
        let c = BuildContext::open(t.path(), Some(&t.path().join("app.Dockerfile"))).expect("open");
        assert!(c.get("secret").is_none());
        assert!(c.get("public").is_some());
        assert_eq!(
            c.ignore_file(),
            Some(t.path().join("app.Dockerfile.dockerignore").as_path())
        );
    }

    #[test]
    fn symlinks_are_entries_never_followed() {
        let t = tree(&[("inside", "x")]);
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("secret"), "do not read").expect("write");
        symlink(outside.path(), t.path().join("escape")).expect("symlink");
        let c = BuildContext::open(t.path(), None).expect("open");
        assert_eq!(
            c.get("escape").map(|e| &e.kind),
            Some(&EntryKind::Symlink {
                target: outside.path().to_path_buf()
            })
        );
        assert!(c.get("escape/secret").is_none());
    }

    #[test]
    fn digests_ignore_mtime_but_see_content_and_mode() {
        let t = tree(&[("d/a", "one"), ("d/b", "two")]);
        let c1 = BuildContext::open(t.path(), None).expect("open");
        let before = c1.digest("d").expect("digest");
        let f = std::fs::File::options()
            .write(true)
            .open(t.path().join("d/a"))
            .expect("open");
        f.set_modified(std::time::SystemTime::UNIX_EPOCH)
            .expect("mtime");
        let c2 = BuildContext::open(t.path(), None).expect("open");
        assert_eq!(c2.digest("d").expect("digest"), before, "mtime is not part");
        std::fs::set_permissions(t.path().join("d/a"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let c3 = BuildContext::open(t.path(), None).expect("open");
        assert_ne!(c3.digest("d").expect("digest"), before, "mode is part");
        std::fs::write(t.path().join("d/b"), "changed").expect("write");
        let c4 = BuildContext::open(t.path(), None).expect("open");
        assert_ne!(
            c4.digest("d/b").expect("digest"),
            c3.digest("d/b").expect("digest")
        );
        assert_eq!(
            c4.digest("d/a").expect("digest"),
            c3.digest("d/a").expect("digest")
        );
    }

    #[test]
    fn subtree_does_not_leak_siblings_with_a_common_prefix() {
        let t = tree(&[("ab/x", "1"), ("abc/y", "2"), ("a", "3"), ("ab-x", "4")]);
        let c = BuildContext::open(t.path(), None).expect("open");
        let sub: Vec<&str> = c.subtree("ab").map(|(p, _)| p).collect();
        assert_eq!(sub, ["ab", "ab/x"]);
        assert!(matches!(
            c.digest("missing"),
            Err(ContextError::NotFound { .. })
        ));
    }

    #[test]
    fn a_missing_context_is_an_error() {
        let e = BuildContext::open(Path::new("/nonexistent/ctx"), None).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/ctx"));
    }
}
