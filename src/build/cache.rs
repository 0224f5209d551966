//! Step cache keys and the local layer cache.
//!
//! A key is the sha256 of: the parent key, the step's canonical IR (its JSON, which already
//! holds the expanded env, user, workdir and arguments it sees) and the digests of what it
//! reads (context files after `.dockerignore`, or the key of the stage it copies from). The
//! root key of a stage is its base: the image's manifest digest, the key of the parent
//! stage, or scratch. Same inputs, same key; a changed context file changes exactly the keys
//! from the first step that reads it on. Secrets never enter a key: the IR holds only their
//! ids.

use super::context::{BuildContext, ContextError};
use super::copy::match_segment;
use crate::ir::{Copy, CopyFrom, Op, Source};
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};

/// Format version of keys: bump when what goes into them changes, or what a step makes of
/// them (v2: COPY --from keeps the stage's owners and set-user-ID bits, ADD keeps archive
/// members' set-user-ID bits and xattrs and copies non-tar compressed files, WORKDIR's group,
/// RUN's supplementary groups and symlinked directory sources changed; v3: COPY copies
/// xattrs, and an excluded directory comes back with what a `!` exception keeps below it).
const KEY_VERSION: &str = "kiln-step-key-v3";

/// A step cache key (`sha256:…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct CacheKey(String);

impl CacheKey {
    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part, for file names.
    pub fn hex(&self) -> &str {
        self.0.strip_prefix("sha256:").unwrap_or(&self.0)
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn hash(parts: &[&[u8]]) -> CacheKey {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    CacheKey(format!("sha256:{}", hex::encode(h.finalize())))
}

/// What a stage starts from, for its root key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseKey<'a> {
    /// An empty root.
    Scratch,
    /// An image, by its manifest digest (`sha256:…`, the platform manifest).
    Image(&'a str),
    /// The final key of an earlier stage.
    Stage(&'a CacheKey),
}

/// The key a stage's first step builds on.
pub fn root_key(base: &BaseKey<'_>) -> CacheKey {
    match base {
        BaseKey::Scratch => hash(&[KEY_VERSION.as_bytes(), b"scratch"]),
        BaseKey::Image(digest) => hash(&[KEY_VERSION.as_bytes(), b"image", digest.as_bytes()]),
        BaseKey::Stage(k) => hash(&[KEY_VERSION.as_bytes(), b"stage", k.as_str().as_bytes()]),
    }
}

/// The inputs a step reads besides its IR.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepInputs {
    /// Digests of what it reads, in source order (context paths, stage keys, fetched URLs).
    pub digests: Vec<String>,
}

/// The key of a step.
pub fn step_key(parent: &CacheKey, op: &Op, inputs: &StepInputs) -> CacheKey {
    // The IR's JSON is canonical: struct fields in declaration order, maps are BTreeMaps.
    let ir = serde_json::to_vec(op).unwrap_or_default();
    let mut parts: Vec<&[u8]> = vec![
        KEY_VERSION.as_bytes(),
        parent.as_str().as_bytes(),
        ir.as_slice(),
    ];
    parts.extend(inputs.digests.iter().map(|d| d.as_bytes()));
    hash(&parts)
}

/// The context paths a COPY/ADD source pattern names (sorted), with Docker's glob rules.
pub fn matching_paths<'a>(ctx: &'a BuildContext, pattern: &str) -> Vec<&'a str> {
    let segs: Vec<&str> = pattern
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    if segs.is_empty() {
        return vec![""];
    }
    ctx.entries()
        .map(|(p, _)| p)
        .filter(|p| {
            let parts: Vec<&str> = p.split('/').collect();
            parts.len() == segs.len()
                && parts
                    .iter()
                    .zip(&segs)
                    .all(|(name, seg)| match_segment(seg, name) == Some(true))
        })
        .collect()
}

/// The inputs of a COPY/ADD from the context: the digest of every matched path (a
/// directory's covers everything below it). `stage_keys` gives the final key of a stage
/// for `--from`; images are keyed by their reference's digest, which the caller passes as
/// `from_digest`.
pub fn copy_inputs(
    ctx: &BuildContext,
    sources: &[Source],
    from_digest: Option<&str>,
) -> Result<StepInputs, ContextError> {
    let mut digests = Vec::new();
    if let Some(d) = from_digest {
        digests.push(d.to_string());
        return Ok(StepInputs { digests });
    }
    for s in sources {
        match s {
            Source::Path { path } => {
                let matched = matching_paths(ctx, path);
                if matched.is_empty() {
                    return Err(ContextError::NotFound { path: path.clone() });
                }
                for m in matched {
                    digests.push(format!("{m}={}", ctx.digest(m)?));
                }
            }
            // Inline content is in the IR; remote content is added by the caller once fetched.
            Source::Inline { .. } | Source::Url { .. } | Source::Git { .. } => {}
        }
    }
    Ok(StepInputs { digests })
}

/// Whether a COPY reads the build context (and so its key needs context digests).
pub fn reads_context(copy: &Copy) -> bool {
    copy.from.is_none()
}

/// A `--from` that names a stage.
pub fn from_stage(copy: &Copy) -> Option<usize> {
    match copy.from {
        Some(CopyFrom::Stage { index }) => Some(index),
        _ => None,
    }
}

/// Step layers kept under `KILN_HOME/cache-v1/<key hex>/`: `layer/` is the step's upper
/// directory. Entries are renamed in complete, so a crash leaves a whole entry or none.
#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    /// A cache rooted at `dir` (created if missing).
    pub fn open(dir: &Path) -> std::io::Result<LayerCache> {
        std::fs::create_dir_all(dir)?;
        Ok(LayerCache {
            dir: dir.to_path_buf(),
        })
    }

    /// The cached layer of `key`, if present.
    pub fn get(&self, key: &CacheKey) -> Option<PathBuf> {
        let layer = self.dir.join(key.hex()).join("layer");
        layer.is_dir().then_some(layer)
    }

    /// A fresh staging directory for a step's upper and work dirs (same file system as the
    /// cache, so [`LayerCache::commit`] is a rename).
    pub fn stage(&self) -> std::io::Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(&self.dir)
    }

    /// Moves `upper` (a finished step's layer) into the cache under `key`. If another
    /// process committed the same key meanwhile, theirs is kept (same inputs, same layer).
    pub fn commit(&self, key: &CacheKey, upper: &Path) -> std::io::Result<PathBuf> {
        let entry = self.dir.join(key.hex());
        let layer = entry.join("layer");
        if layer.is_dir() {
            return Ok(layer);
        }
        let tmp = tempfile::Builder::new()
            .prefix(".entry-")
            .tempdir_in(&self.dir)?;
        std::fs::rename(upper, tmp.path().join("layer"))?;
        crate::fs::sync_dir(tmp.path())?;
        let staged = tmp.keep();
        match std::fs::rename(&staged, &entry) {
            Ok(()) => {}
            Err(_) if layer.is_dir() => {
                let _ = std::fs::remove_dir_all(&staged);
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staged);
                return Err(e);
            }
        }
        crate::fs::sync_dir(&self.dir)?;
        Ok(layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Command, Network, Run, Security};

    fn run(script: &str, env: &[(&str, &str)]) -> Op {
        Op::Run(Run {
            command: Command::Shell {
                shell: vec!["/bin/sh".into(), "-c".into()],
                script: script.into(),
            },
            env: env
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            user: None,
            workdir: "/".into(),
            network: Network::Default,
            security: Security::Sandbox,
            mounts: vec![],
            devices: vec![],
        })
    }

    #[test]
    fn same_inputs_give_the_same_key_and_any_change_another() {
        let root = root_key(&BaseKey::Image("sha256:aaa"));
        let k1 = step_key(&root, &run("make", &[("A", "1")]), &StepInputs::default());
        let k2 = step_key(&root, &run("make", &[("A", "1")]), &StepInputs::default());
        assert_eq!(k1, k2);
        assert_ne!(
            k1,
            step_key(&root, &run("make", &[("A", "2")]), &StepInputs::default())
        );
        assert_ne!(
            k1,
            step_key(&root, &run("make ", &[("A", "1")]), &StepInputs::default())
        );
        let other_base = root_key(&BaseKey::Image("sha256:bbb"));
        assert_ne!(
            k1,
            step_key(
                &other_base,
                &run("make", &[("A", "1")]),
                &StepInputs::default()
            )
        );
        let with_input = StepInputs {
            digests: vec!["x=sha256:1".into()],
        };
        assert_ne!(
            k1,
            step_key(&root, &run("make", &[("A", "1")]), &with_input)
        );
    }

    #[test]
    fn copy_inputs_follow_the_files_a_step_reads() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("a.py"), "1").expect("write");
        std::fs::write(t.path().join("b.py"), "2").expect("write");
        std::fs::write(t.path().join("c.txt"), "3").expect("write");
        let src = vec![Source::Path {
            path: "*.py".into(),
        }];
        let before = copy_inputs(
            &BuildContext::open(t.path(), None).expect("ctx"),
            &src,
            None,
        )
        .expect("inputs");
        assert_eq!(before.digests.len(), 2);
        std::fs::write(t.path().join("c.txt"), "changed").expect("write");
        let unrelated = copy_inputs(
            &BuildContext::open(t.path(), None).expect("ctx"),
            &src,
            None,
        )
        .expect("inputs");
        assert_eq!(
            before, unrelated,
            "a file the step does not read changes nothing"
        );
        std::fs::write(t.path().join("b.py"), "changed").expect("write");
        let after = copy_inputs(
            &BuildContext::open(t.path(), None).expect("ctx"),
            &src,
            None,
        )
        .expect("inputs");
        assert_ne!(before, after);
    }

    #[test]
    fn commit_is_a_rename_and_first_writer_wins() {
        let t = tempfile::tempdir().expect("tempdir");
        let cache = LayerCache::open(t.path()).expect("cache");
        let key = root_key(&BaseKey::Scratch);
        assert!(cache.get(&key).is_none());
        let stage = cache.stage().expect("stage");
        let upper = stage.path().join("upper");
        std::fs::create_dir(&upper).expect("mkdir");
        std::fs::write(upper.join("f"), "one").expect("write");
        let layer = cache.commit(&key, &upper).expect("commit");
        assert_eq!(
            std::fs::read_to_string(layer.join("f")).expect("read"),
            "one"
        );
        let stage2 = cache.stage().expect("stage");
        let upper2 = stage2.path().join("upper");
        std::fs::create_dir(&upper2).expect("mkdir");
        std::fs::write(upper2.join("f"), "two").expect("write");
        let again = cache.commit(&key, &upper2).expect("commit");
        assert_eq!(
            std::fs::read_to_string(again.join("f")).expect("read"),
            "one"
        );
    }
}
