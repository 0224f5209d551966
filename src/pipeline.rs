//! `image create` as one short orchestration: lower → make the bases available → build the
//! steps on cached layers → snapshot the target's merged tree → register the name.
//!
//! Each stage knows nothing of the others: the builder gets IR and layer directories, the
//! snapshot gets a directory tree, the registry gets a Completed snapshot id.

use crate::build::cache::LayerCache;
use crate::build::cgroup::Limits;
use crate::build::context::BuildContext;
use crate::build::driver::Driver;
use crate::build::run::{self, Bases, BuildOptions, Event, ResolvedBase, StepReport, View};
use crate::frontend::{self, Lowered};
use crate::home::Home;
use crate::ir::{Base, CopyFrom, ImageSpec, Op};
use crate::oci::{self, Reference};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

/// Base images from the local store: imported or pulled images first, then the built-in
/// bases (made on first use), then a registry pull.
pub struct StoreBases<'a> {
    store: &'a oci::store::Store,
    resolved: Mutex<BTreeMap<String, ResolvedBase>>,
}

impl<'a> StoreBases<'a> {
    /// Bases backed by `store`.
    pub fn new(store: &'a oci::store::Store) -> Self {
        StoreBases {
            store,
            resolved: Mutex::new(BTreeMap::new()),
        }
    }

    /// The digest a base resolved to during this build, for `describe`'s `base`.
    pub fn digest_of(&self, reference: &str) -> Option<String> {
        self.lock().get(reference).map(|b| b.digest.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ResolvedBase>> {
        self.resolved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fetch(&self, reference: &str) -> Result<ResolvedBase, oci::OciError> {
        let r = Reference::parse(reference)?;
        if self.store.local(&r)?.is_none() {
            if oci::builtin::Builtin::of(&r).is_some() {
                oci::builtin::ensure(self.store, &r, &oci::pull::Silent)?;
            } else {
                oci::pull::pull_blocking(self.store, &r, &oci::pull::PullOptions::default())?;
            }
        }
        let local = self
            .store
            .local(&r)?
            .ok_or_else(|| oci::OciError::NotLocal {
                reference: r.familiar(),
            })?;
        Ok(ResolvedBase {
            layers: local.layer_dirs,
            digest: local.record.platform_digest.to_string(),
            config: local.config.image,
        })
    }
}

impl Bases for StoreBases<'_> {
    fn resolve(&self, reference: &str) -> Result<ResolvedBase, String> {
        if let Some(b) = self.lock().get(reference) {
            return Ok(b.clone());
        }
        let b = self.fetch(reference).map_err(|e| e.to_string())?;
        self.lock().insert(reference.to_string(), b.clone());
        Ok(b)
    }
}

/// Every image a spec reads: stage bases, `COPY --from=image`, `--mount from=image`.
pub fn images_needed(spec: &ImageSpec) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for stage in &spec.stages {
        if let Base::Image { reference } = &stage.base {
            out.insert(reference.clone());
        }
        for op in &stage.steps {
            match op {
                Op::Copy(c) => {
                    if let Some(CopyFrom::Image { reference }) = &c.from {
                        out.insert(reference.clone());
                    }
                }
                Op::Run(r) => {
                    for m in &r.mounts {
                        if let Some(CopyFrom::Image { reference }) = m.from() {
                            out.insert(reference.clone());
                        }
                    }
                }
                Op::Add(_) | Op::Env { .. } | Op::Workdir { .. } | Op::User { .. } => {}
            }
        }
    }
    out
}

/// Why a build did not produce an image.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The Dockerfile or SDK definition is wrong.
    #[error(transparent)]
    Frontend(#[from] frontend::FrontendError),
    /// A base image could not be had.
    #[error("{reference}: {source}")]
    Base {
        /// The reference.
        reference: String,
        /// Why.
        #[source]
        source: oci::OciError,
    },
    /// The build context cannot be read.
    #[error(transparent)]
    Context(#[from] crate::build::context::ContextError),
    /// A step failed.
    #[error(transparent)]
    Build(#[from] run::BuildError),
    /// Local state could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What to build.
pub struct BuildRequest<'a> {
    /// The lowered definition (lowered with the store's configs).
    pub lower: &'a dyn Fn(&dyn frontend::BaseImages) -> Result<Lowered, frontend::FrontendError>,
    /// The build context.
    pub context: PathBuf,
    /// The Dockerfile, for its `.dockerignore` (`None` for SDK definitions).
    pub dockerfile: Option<PathBuf>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// Builder limits.
    pub limits: Limits,
    /// `--secret`s.
    pub secrets: BTreeMap<String, PathBuf>,
    /// Kill a RUN step after this long.
    pub step_timeout: Option<std::time::Duration>,
    /// `--builder_disk_mb`: what RUN steps may write on the namespace builder.
    pub builder_disk_mb: Option<u64>,
}

/// A finished build: the spec, the steps, and the target's layers.
pub struct Built {
    /// The IR that was built.
    pub lowered: Lowered,
    /// Per step.
    pub steps: Vec<StepReport>,
    /// The target stage's layers, bottom first ([`Built::mount_tree`] merges them).
    pub layers: Vec<std::path::PathBuf>,
    /// Where views are mounted (the cache's file system).
    scratch: std::path::PathBuf,
    /// The base reference and digest of the target's stage chain.
    pub base: Option<(String, String)>,
    /// The key of the target's last step: the same key, the same tree.
    pub key: crate::build::cache::CacheKey,
}

/// Lowers, fetches bases and builds; returns the target's tree for the snapshot.
pub fn build(
    home: &Home,
    req: &BuildRequest<'_>,
    driver: &dyn Driver,
    events: &mut dyn FnMut(Event<'_>),
) -> Result<Built, PipelineError> {
    let store = oci::store::Store::open(home).map_err(|source| PipelineError::Base {
        reference: "local store".into(),
        source,
    })?;
    // First pass: which images are read. They are fetched, then the definition is lowered
    // again so base configs (ENV, WORKDIR, ONBUILD) are the real ones.
    let first = (req.lower)(&store)?;
    let bases = StoreBases::new(&store);
    for reference in images_needed(&first.spec) {
        let b = bases
            .fetch(&reference)
            .map_err(|source| PipelineError::Base {
                reference: reference.clone(),
                source,
            })?;
        bases.lock().insert(reference, b);
    }
    let lowered = (req.lower)(&store)?;
    let ctx = BuildContext::open(&req.context, req.dockerfile.as_deref())?;
    let cache_dir = home.dir("cache-v1").map_err(|e| PipelineError::Io {
        what: "the step cache",
        source: std::io::Error::other(e.to_string()),
    })?;
    let cache = LayerCache::open(&cache_dir).map_err(|source| PipelineError::Io {
        what: "the step cache",
        source,
    })?;
    let cache_mounts = home.dir("cache-mounts-v1").map_err(|e| PipelineError::Io {
        what: "the cache mounts",
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut opts = BuildOptions {
        no_cache: req.no_cache,
        limits: req.limits,
        step_timeout: req.step_timeout,
        secrets: req.secrets.clone(),
        cache_mounts,
        scratch: cache_dir.clone(),
        builder_disk_mb: req.builder_disk_mb,
        disk_dir: home.tmp().map_err(|e| PipelineError::Io {
            what: "the scratch space",
            source: std::io::Error::other(e.to_string()),
        })?,
        events,
    };
    let out = run::build(&lowered.spec, &ctx, &bases, &cache, driver, &mut opts)?;
    let target = out.target().ok_or_else(|| PipelineError::Io {
        what: "the build",
        source: std::io::Error::other("no stage was built"),
    })?;
    let layers = target.layers.clone();
    let key = target.key.clone();
    let base = chain_base(&lowered.spec).map(|r| {
        let d = bases.digest_of(&r).unwrap_or_default();
        (r, d)
    });
    Ok(Built {
        steps: out.steps,
        lowered,
        layers,
        scratch: cache_dir,
        base,
        key,
    })
}

impl Built {
    /// The target's merged tree, read-only, unmounted on drop. Only when a snapshot is
    /// made: a cached rebuild that reuses one mounts nothing (an overlay's unmount syncs the
    /// host's file system, tens of milliseconds).
    pub fn mount_tree(&self) -> Result<View, PipelineError> {
        Ok(View::mount(&self.layers, &self.scratch)?)
    }
}

/// The image the target's stage chain starts from (`FROM stage` followed to its root).
fn chain_base(spec: &ImageSpec) -> Option<String> {
    let mut stage = spec.target()?;
    for _ in 0..spec.stages.len() {
        match &stage.base {
            Base::Image { reference } => return Some(reference.clone()),
            Base::Scratch => return None,
            Base::Stage { index } => stage = spec.stage(*index)?,
        }
    }
    None
}
