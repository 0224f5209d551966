//! The step loop: builds the stages of an [`ImageSpec`] into stacks of cached layers.
//!
//! For each stage, in order: its base layers (from [`Bases`], an earlier stage, or none),
//! then one step at a time — compute the step's cache key, reuse the cached layer or run the
//! step on an overlay (RUN through the [`Driver`], COPY/ADD/WORKDIR by Kiln itself) and
//! commit its upper directory to the cache. The result is each stage's layer stack; making a
//! snapshot of the target is the caller's business.

use super::cache::{self, BaseKey, CacheKey, LayerCache, StepInputs};
use super::cgroup::Limits;
use super::context::BuildContext;
use super::copy::{self, CopyRequest, Owner, SourceRoot};
use super::driver::{Driver, StepRequest};
use super::executor::{PreparedMount, Stdio, Stream};
use super::fetch::{self, FetchError, GitRef};
use super::overlay::{self, Layers, Overlay};
use super::scratch_disk::{ScratchDisk, move_layer};
use crate::ir::{Base, CopyFrom, ImageConfig, ImageSpec, Mount, Op, Source};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A base image made available to the builder.
#[derive(Debug, Clone)]
pub struct ResolvedBase {
    /// Unpacked layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// The platform manifest digest (part of the root cache key).
    pub digest: String,
    /// The image config.
    pub config: ImageConfig,
}

/// Where the step loop gets base images (and `--from=image` trees) from.
pub trait Bases {
    /// Resolves a reference to local layers, pulling or making it if needed.
    fn resolve(&self, reference: &str) -> Result<ResolvedBase, String>;
}

/// A build failure.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A RUN step exited non-zero.
    #[error("step {step} ({instruction}) failed with exit code {code}{why}")]
    StepFailed {
        /// 1-based step number across the build.
        step: usize,
        /// The step, as `Op::summary` renders it.
        instruction: String,
        /// Its exit code.
        code: i32,
        /// " (timed out)", " (out of memory)" or "".
        why: &'static str,
        /// The last lines of its output.
        tail: Vec<String>,
    },
    /// A base image could not be had.
    #[error("base image {reference}: {message}")]
    Base {
        /// The reference.
        reference: String,
        /// Why.
        message: String,
    },
    /// COPY/ADD failed.
    #[error("step {step} ({instruction}): {source}")]
    Copy {
        /// 1-based step number.
        step: usize,
        /// The step.
        instruction: String,
        /// Why.
        #[source]
        source: copy::CopyError,
    },
    /// The build context could not be read for a step.
    #[error("step {step} ({instruction}): {source}")]
    Context {
        /// 1-based step number.
        step: usize,
        /// The step.
        instruction: String,
        /// Why.
        #[source]
        source: super::context::ContextError,
    },
    /// The driver failed (mounts, namespaces).
    #[error("step {step} ({instruction}): {source}")]
    Driver {
        /// 1-based step number.
        step: usize,
        /// The step.
        instruction: String,
        /// Why.
        #[source]
        source: super::driver::DriverError,
    },
    /// Something the step needs is missing (a secret, an unsupported feature).
    #[error("step {step} ({instruction}): {message}")]
    Unsupported {
        /// 1-based step number.
        step: usize,
        /// The step.
        instruction: String,
        /// What.
        message: String,
    },
    /// ADD could not fetch a URL or git repository, or its checksum did not match.
    #[error("step {step} ({instruction}): {source}")]
    Fetch {
        /// 1-based step number.
        step: usize,
        /// The step.
        instruction: String,
        /// Why.
        #[source]
        source: FetchError,
    },
    /// Mounting a view of layers failed.
    #[error("mounting layers: {0}")]
    Overlay(#[from] overlay::OverlayError),
    /// The cache or scratch space failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// Progress of a build, as it happens.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A step starts (or is found in the cache).
    Step {
        /// 1-based step number across the build.
        number: usize,
        /// Steps in all.
        total: usize,
        /// Its summary (`RUN apt-get update`).
        instruction: &'a str,
        /// Served from the cache.
        cached: bool,
    },
    /// A line of a RUN step's output.
    Output {
        /// The step number.
        number: usize,
        /// stdout or stderr.
        stream: Stream,
        /// The line.
        line: &'a str,
    },
}

/// How a build runs.
pub struct BuildOptions<'a> {
    /// Ignore cached layers (results are still cached).
    pub no_cache: bool,
    /// Limits for each RUN step.
    pub limits: Limits,
    /// Per-step timeout.
    pub step_timeout: Option<Duration>,
    /// `--secret id=…,src=…`.
    pub secrets: BTreeMap<String, PathBuf>,
    /// Where `RUN --mount=type=cache` directories live (`KILN_HOME/cache-mounts-v1`).
    pub cache_mounts: PathBuf,
    /// Scratch space for views and downloads (same file system as the cache).
    pub scratch: PathBuf,
    /// RUN steps write on a scratch disk of this many MiB, made under `disk_dir` on the
    /// first RUN that runs ([`super::scratch_disk`]); `None`: on the cache's file system.
    pub builder_disk_mb: Option<u64>,
    /// Where the scratch disk goes (`KILN_HOME/tmp`).
    pub disk_dir: PathBuf,
    /// Progress.
    pub events: &'a mut dyn FnMut(Event<'_>),
}

/// One step of the report (`image create` JSON `steps`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StepReport {
    /// 0-based index across the build.
    pub index: usize,
    /// The step, rendered from the IR.
    pub instruction: String,
    /// Served from the cache.
    pub cached: bool,
    /// Wall time.
    pub duration_ms: u64,
}

/// A built stage.
#[derive(Debug, Clone)]
pub struct BuiltStage {
    /// Its source index.
    pub index: usize,
    /// Its layers, bottom first (base layers, then one per step that changed files).
    pub layers: Vec<PathBuf>,
    /// The key of its last step.
    pub key: CacheKey,
    /// The base image digest, when the stage chain starts from an image.
    pub base_digest: Option<String>,
}

/// The result of a build.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// Every stage built, in spec order.
    pub stages: Vec<BuiltStage>,
    /// Every step, in order.
    pub steps: Vec<StepReport>,
}

impl BuildOutput {
    /// The target (last) stage.
    pub fn target(&self) -> Option<&BuiltStage> {
        self.stages.last()
    }
}

/// Gives a fresh upper directory the root attributes (mode, owner, mtime) of the stack it
/// goes on: overlayfs shows the upper's root as the merged root, so without this a new
/// layer would make `/` 0755 root:root with the time of the build, and the same layers
/// would give a different snapshot every time.
fn inherit_root_attrs(layers: &[PathBuf], upper: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(top) = layers.last() else {
        // Scratch: a root directory as Docker makes it, at the epoch.
        std::fs::set_permissions(upper, std::fs::Permissions::from_mode(0o755))?;
        return std::fs::File::open(upper)?.set_modified(std::time::UNIX_EPOCH);
    };
    let meta = std::fs::metadata(top)?;
    std::os::unix::fs::chown(upper, Some(meta.uid()), Some(meta.gid()))?;
    std::fs::set_permissions(upper, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    std::fs::File::open(upper)?.set_modified(meta.modified()?)
}

/// Mounts `layers` (bottom first, as stages keep them) under `upper` at `merged`.
fn mount_stack(
    layers: &[PathBuf],
    upper: &Path,
    work: &Path,
    merged: &Path,
) -> Result<Overlay, overlay::OverlayError> {
    // overlayfs wants the top layer first.
    let lowers: Vec<PathBuf> = layers.iter().rev().cloned().collect();
    overlay::mount(
        &Layers {
            lowers: &lowers,
            upper,
            work,
        },
        merged,
    )
}

/// A read-only merged view of a layer stack (an empty throwaway upper keeps it unchanged).
pub struct View {
    _dir: tempfile::TempDir,
    overlay: Option<Overlay>,
    path: PathBuf,
}

impl View {
    /// Mounts `layers` (bottom first) at a fresh directory under `scratch`.
    pub fn mount(layers: &[PathBuf], scratch: &Path) -> Result<View, BuildError> {
        let dir = tempfile::Builder::new()
            .prefix("view-")
            .tempdir_in(scratch)
            .map_err(io("make a view directory"))?;
        let upper = dir.path().join("upper");
        let work = dir.path().join("work");
        let merged = dir.path().join("merged");
        for d in [&upper, &work, &merged] {
            std::fs::create_dir(d).map_err(io("make a view directory"))?;
        }
        inherit_root_attrs(layers, &upper).map_err(io("prepare a view directory"))?;
        let overlay = mount_stack(layers, &upper, &work, &merged)?;
        Ok(View {
            _dir: dir,
            overlay: Some(overlay),
            path: merged,
        })
    }

    /// The merged tree.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if let Some(o) = self.overlay.take() {
            let _ = o.unmount();
        }
    }
}

struct Loop<'a, 'o> {
    ctx: &'a BuildContext,
    bases: &'a dyn Bases,
    cache: &'a LayerCache,
    driver: &'a dyn Driver,
    opts: &'a mut BuildOptions<'o>,
    total: usize,
    number: usize,
    steps: Vec<StepReport>,
    built: BTreeMap<usize, BuiltStage>,
    /// The remote sources of the ADD step being keyed and run.
    remote: Option<Remote>,
    /// The RUN steps' scratch disk, once one ran.
    disk: Option<ScratchDisk>,
}

/// ADD's URLs and git repositories, fetched (or resolved) while keying the step, by source
/// index (see [`fetch`] for what goes into the key).
struct Remote {
    dir: tempfile::TempDir,
    urls: BTreeMap<usize, fetch::Download>,
    commits: BTreeMap<usize, String>,
}

/// Builds every stage of `spec` (dependencies first, as the spec orders them).
pub fn build(
    spec: &ImageSpec,
    ctx: &BuildContext,
    bases: &dyn Bases,
    cache: &LayerCache,
    driver: &dyn Driver,
    opts: &mut BuildOptions<'_>,
) -> Result<BuildOutput, BuildError> {
    let total = spec.stages.iter().map(|s| s.steps.len()).sum();
    let mut l = Loop {
        ctx,
        bases,
        cache,
        driver,
        opts,
        total,
        number: 0,
        steps: Vec::new(),
        built: BTreeMap::new(),
        remote: None,
        disk: None,
    };
    let mut order = Vec::new();
    for stage in &spec.stages {
        let built = l.stage(stage)?;
        order.push(stage.index);
        l.built.insert(stage.index, built);
    }
    let stages = order.iter().filter_map(|i| l.built.remove(i)).collect();
    Ok(BuildOutput {
        stages,
        steps: l.steps,
    })
}

impl Loop<'_, '_> {
    fn resolve(&self, reference: &str) -> Result<ResolvedBase, BuildError> {
        self.bases
            .resolve(reference)
            .map_err(|message| BuildError::Base {
                reference: reference.to_string(),
                message,
            })
    }

    fn base(&self, base: &Base) -> Result<(Vec<PathBuf>, CacheKey, Option<String>), BuildError> {
        Ok(match base {
            Base::Scratch => (Vec::new(), cache::root_key(&BaseKey::Scratch), None),
            Base::Image { reference } => {
                let b = self.resolve(reference)?;
                let key = cache::root_key(&BaseKey::Image(&b.digest));
                (b.layers, key, Some(b.digest))
            }
            Base::Stage { index } => {
                let parent = self.built.get(index).ok_or_else(|| BuildError::Base {
                    reference: format!("stage {index}"),
                    message: "was not built before the stage that needs it".into(),
                })?;
                (
                    parent.layers.clone(),
                    cache::root_key(&BaseKey::Stage(&parent.key)),
                    parent.base_digest.clone(),
                )
            }
        })
    }

    fn stage(&mut self, stage: &crate::ir::Stage) -> Result<BuiltStage, BuildError> {
        let (mut layers, mut key, base_digest) = self.base(&stage.base)?;
        let mut user: Option<String> = None;
        for op in &stage.steps {
            self.number += 1;
            let number = self.number;
            let instruction = op.summary();
            let started = Instant::now();
            let inputs = self.inputs(op, number, &instruction)?;
            let step_key = cache::step_key(&key, op, &inputs);
            // ENV and USER change only the config: nothing runs, and they count as cached
            // unless the cache is off.
            let changes_files = !matches!(op, Op::Env { .. } | Op::User { .. });
            let cached = if !changes_files {
                !self.opts.no_cache
            } else if !self.opts.no_cache
                && let Some(layer) = self.cache.get(&step_key)
            {
                layers.push(layer);
                true
            } else {
                (self.opts.events)(Event::Step {
                    number,
                    total: self.total,
                    instruction: &instruction,
                    cached: false,
                });
                let layer = self.execute(
                    op,
                    &layers,
                    &step_key,
                    number,
                    &instruction,
                    user.as_deref(),
                )?;
                layers.push(layer);
                false
            };
            if cached || !changes_files {
                (self.opts.events)(Event::Step {
                    number,
                    total: self.total,
                    instruction: &instruction,
                    cached: true,
                });
            }
            if let Op::User { user: u } = op {
                user = Some(u.clone());
            }
            self.steps.push(StepReport {
                index: number - 1,
                instruction,
                cached,
                duration_ms: started.elapsed().as_millis() as u64,
            });
            key = step_key;
        }
        Ok(BuiltStage {
            index: stage.index,
            layers,
            key,
            base_digest,
        })
    }

    /// What a step reads besides its IR, for its key.
    fn inputs(
        &mut self,
        op: &Op,
        number: usize,
        instruction: &str,
    ) -> Result<StepInputs, BuildError> {
        self.remote = None;
        let (sources, from) = match op {
            Op::Copy(c) => (&c.sources, c.from.as_ref()),
            Op::Add(a) => {
                let mut inputs =
                    cache::copy_inputs(self.ctx, &a.sources, None).map_err(|source| {
                        BuildError::Context {
                            step: number,
                            instruction: instruction.to_string(),
                            source,
                        }
                    })?;
                inputs
                    .digests
                    .extend(self.remote_inputs(a).map_err(|source| BuildError::Fetch {
                        step: number,
                        instruction: instruction.to_string(),
                        source,
                    })?);
                return Ok(inputs);
            }
            Op::Run(r) => {
                // Bind/cache mounts from stages read those stages.
                let mut digests = Vec::new();
                for m in &r.mounts {
                    if let Some(CopyFrom::Stage { index }) = m.from()
                        && let Some(s) = self.built.get(index)
                    {
                        digests.push(s.key.to_string());
                    }
                    if let Mount::Bind {
                        from: None, source, ..
                    } = m
                    {
                        let d = self
                            .ctx
                            .digest(source)
                            .map_err(|source| BuildError::Context {
                                step: number,
                                instruction: instruction.to_string(),
                                source,
                            })?;
                        digests.push(d);
                    }
                }
                // What a RUN writes can depend on the kernel it ran on (`uname -r`), so
                // layers from a builder VM are keyed apart; namespace keys stay as they were.
                let builder = self.driver.name();
                if builder != "namespace" {
                    digests.push(format!("builder:{builder}"));
                }
                return Ok(StepInputs { digests });
            }
            Op::Env { .. } | Op::Workdir { .. } | Op::User { .. } => {
                return Ok(StepInputs::default());
            }
        };
        let from_digest = match from {
            Some(CopyFrom::Stage { index }) => self.built.get(index).map(|s| s.key.to_string()),
            Some(CopyFrom::Image { reference }) => Some(self.resolve(reference)?.digest),
            None => None,
        };
        if from.is_some() {
            return Ok(StepInputs {
                digests: from_digest.into_iter().collect(),
            });
        }
        cache::copy_inputs(self.ctx, sources, None).map_err(|source| BuildError::Context {
            step: number,
            instruction: instruction.to_string(),
            source,
        })
    }

    /// The key inputs of ADD's remote sources: a URL's `--checksum` (no request), else its
    /// content digest and `Last-Modified` (downloaded now, kept for the copy); a git source's
    /// resolved commit.
    fn remote_inputs(&mut self, a: &crate::ir::Add) -> Result<Vec<String>, FetchError> {
        let mut out = Vec::new();
        for (i, s) in a.sources.iter().enumerate() {
            match s {
                Source::Url { url } => match &a.checksum {
                    Some(c) => out.push(format!("url:{i}:{c}")),
                    None => {
                        let d = self.download(i, url)?;
                        out.push(format!("url:{i}:{}:{}", d.sha256, d.last_modified));
                    }
                },
                Source::Git { url } => {
                    let commit = fetch::resolve_commit(&GitRef::parse(url))?;
                    if let Some(c) = &a.checksum
                        && !(c.len() >= 7 && commit.starts_with(&c.to_ascii_lowercase()))
                    {
                        return Err(FetchError::Checksum {
                            url: crate::ir::redact_credentials(url),
                            got: commit,
                            expected: c.clone(),
                        });
                    }
                    out.push(format!("git:{i}:{commit}"));
                    self.remote()?.commits.insert(i, commit);
                }
                Source::Path { .. } | Source::Inline { .. } => {}
            }
        }
        Ok(out)
    }

    /// The step's remote scratch tree, made on first use.
    fn remote(&mut self) -> Result<&mut Remote, FetchError> {
        let scratch = &self.opts.scratch;
        if self.remote.is_none() {
            let dir = tempfile::Builder::new()
                .prefix("fetch-")
                .tempdir_in(scratch)
                .map_err(|source| FetchError::Io {
                    what: "make a download directory in",
                    path: scratch.clone(),
                    source,
                })?;
            self.remote = Some(Remote {
                dir,
                urls: BTreeMap::new(),
                commits: BTreeMap::new(),
            });
        }
        Ok(self
            .remote
            .get_or_insert_with(|| unreachable!("made above")))
    }

    /// Source `i`'s download, fetched now unless keying the step already did.
    fn download(&mut self, i: usize, url: &str) -> Result<fetch::Download, FetchError> {
        let remote = self.remote()?;
        if let Some(d) = remote.urls.get(&i) {
            return Ok(d.clone());
        }
        let rel = format!("{i}/{}", fetch::file_name(url));
        let d = fetch::download(url, remote.dir.path(), &rel)?;
        remote.urls.insert(i, d.clone());
        Ok(d)
    }

    /// ADD with URL or git sources: each remote source copied from its scratch tree, runs of
    /// local ones from the context, in source order (several sources need a `/` destination,
    /// so one copy per run places files as one copy of all would).
    fn add_remote(
        &mut self,
        a: &crate::ir::Add,
        owner: Option<Owner>,
        root: &Path,
        number: usize,
        instruction: &str,
    ) -> Result<(), BuildError> {
        let fetch_err = |source| BuildError::Fetch {
            step: number,
            instruction: instruction.to_string(),
            source,
        };
        let copy_err = |source| BuildError::Copy {
            step: number,
            instruction: instruction.to_string(),
            source,
        };
        let copy_from = |from: SourceRoot<'_>, sources: &[Source], unpack: bool| {
            let req = CopyRequest {
                sources,
                dest: &a.dest,
                owner,
                chmod: a.chmod,
                exclude: &a.exclude,
                parents: false,
                unpack_archives: unpack,
            };
            copy::copy(from, &req, root).map(|_| ()).map_err(copy_err)
        };
        let mut local: Vec<Source> = Vec::new();
        for (i, s) in a.sources.iter().enumerate() {
            let remote = matches!(s, Source::Url { .. } | Source::Git { .. });
            if remote && !local.is_empty() {
                copy_from(
                    SourceRoot::Context(self.ctx),
                    &local,
                    a.unpack.unwrap_or(true),
                )?;
                local.clear();
            }
            match s {
                Source::Url { url } => {
                    let d = self.download(i, url).map_err(fetch_err)?;
                    let dir = self.remote().map_err(fetch_err)?.dir.path().to_path_buf();
                    if let Some(c) = &a.checksum {
                        fetch::verify(&dir.join(&d.rel), &d.sha256, c, url).map_err(fetch_err)?;
                    }
                    let name = fetch::literal_pattern(&fetch::file_name(url));
                    let sources = [Source::Path {
                        path: format!("{i}/{name}"),
                    }];
                    // Remote archives stay archives unless `--unpack=true`.
                    copy_from(SourceRoot::Tree(&dir), &sources, a.unpack == Some(true))?;
                }
                Source::Git { url } => {
                    let r = GitRef::parse(url);
                    let known = self.remote().map_err(fetch_err)?.commits.get(&i).cloned();
                    let commit = match known {
                        Some(c) => c,
                        None => fetch::resolve_commit(&r).map_err(fetch_err)?,
                    };
                    let dir = self
                        .remote()
                        .map_err(fetch_err)?
                        .dir
                        .path()
                        .join(format!("git-{i}"));
                    let tree =
                        fetch::checkout(&r, &commit, &dir, a.keep_git_dir).map_err(fetch_err)?;
                    let sources = [Source::Path { path: ".".into() }];
                    copy_from(SourceRoot::Tree(&tree), &sources, false)?;
                }
                Source::Path { .. } | Source::Inline { .. } => local.push(s.clone()),
            }
        }
        if !local.is_empty() {
            copy_from(
                SourceRoot::Context(self.ctx),
                &local,
                a.unpack.unwrap_or(true),
            )?;
        }
        Ok(())
    }

    /// Runs a step that changes files on top of `layers`; returns its committed layer.
    fn execute(
        &mut self,
        op: &Op,
        layers: &[PathBuf],
        key: &CacheKey,
        number: usize,
        instruction: &str,
        user: Option<&str>,
    ) -> Result<PathBuf, BuildError> {
        let staging = self.cache.stage().map_err(io("make a staging directory"))?;
        let upper = staging.path().join("upper");
        std::fs::create_dir(&upper).map_err(io("make a staging directory"))?;
        inherit_root_attrs(layers, &upper).map_err(io("prepare a staging directory"))?;
        match op {
            Op::Run(run) => match self.run_disk(number, instruction)? {
                None => self.run(run, layers, &upper, number, instruction)?,
                Some(disk) => {
                    let on_disk =
                        tempfile::tempdir_in(&disk).map_err(io("use the scratch disk"))?;
                    let run_upper = on_disk.path().join("upper");
                    std::fs::create_dir(&run_upper).map_err(io("use the scratch disk"))?;
                    inherit_root_attrs(layers, &run_upper).map_err(io("use the scratch disk"))?;
                    let mut ran = self.run(run, layers, &run_upper, number, instruction);
                    if let Err(BuildError::StepFailed { why, .. }) = &mut ran
                        && why.is_empty()
                        && self.disk.as_ref().is_some_and(ScratchDisk::full)
                    {
                        *why = " (the builder's scratch disk is full: raise --builder_disk_mb)";
                    }
                    ran?;
                    move_layer(&run_upper, &upper)
                        .map_err(io("move the step's layer into the cache"))?;
                }
            },
            Op::Copy(_) | Op::Add(_) | Op::Workdir { .. } => {
                let work = staging.path().join("work");
                let merged = staging.path().join("merged");
                std::fs::create_dir(&work).map_err(io("make a work directory"))?;
                std::fs::create_dir(&merged).map_err(io("make a work directory"))?;
                let mounted = mount_stack(layers, &upper, &work, &merged)?;
                let result = self.fs_step(op, &merged, number, instruction, user);
                mounted.unmount()?;
                result?;
                let _ = std::fs::remove_dir_all(&work);
            }
            Op::Env { .. } | Op::User { .. } => {}
        }
        self.cache
            .commit(key, &upper)
            .map_err(io("commit a layer to the cache"))
    }

    /// The scratch disk RUN steps write on (mounted on first use), or `None` when they write
    /// on the cache's file system (no `builder_disk_mb`, or a driver with its own disk).
    fn run_disk(
        &mut self,
        number: usize,
        instruction: &str,
    ) -> Result<Option<PathBuf>, BuildError> {
        let Some(mb) = self.opts.builder_disk_mb else {
            return Ok(None);
        };
        if self.driver.name() != "namespace" {
            return Ok(None);
        }
        if self.disk.is_none() {
            let disk = ScratchDisk::mount(&self.opts.disk_dir, mb).map_err(|e| BuildError::Io {
                what: format!(
                    "step {number} ({instruction}): make the builder's scratch disk of {mb} MiB (--builder_disk_mb)"
                ),
                source: e,
            })?;
            self.disk = Some(disk);
        }
        Ok(self.disk.as_ref().map(|d| d.path().to_path_buf()))
    }

    fn fs_step(
        &mut self,
        op: &Op,
        root: &Path,
        number: usize,
        instruction: &str,
        user: Option<&str>,
    ) -> Result<(), BuildError> {
        let copy_err = |source| BuildError::Copy {
            step: number,
            instruction: instruction.to_string(),
            source,
        };
        match op {
            Op::Workdir { path } => {
                // WORKDIR creates the directory owned by the current USER, as BuildKit does.
                let owner = match user {
                    Some(u) => copy::resolve_user_owner(root, u).map_err(copy_err)?,
                    None => Owner::default(),
                };
                let t = tempfile::tempdir_in(&self.opts.scratch).map_err(io("scratch"))?;
                copy::copy(
                    SourceRoot::Tree(t.path()),
                    &CopyRequest {
                        sources: &[Source::Path { path: ".".into() }],
                        dest: &format!("{}/", path.trim_end_matches('/')),
                        owner: Some(owner),
                        chmod: None,
                        exclude: &[],
                        parents: false,
                        unpack_archives: false,
                    },
                    root,
                )
                .map_err(copy_err)?;
                Ok(())
            }
            Op::Copy(c) => {
                let owner = match &c.chown {
                    Some(spec) => Some(copy::resolve_owner(root, spec).map_err(copy_err)?),
                    None => None,
                };
                let req = CopyRequest {
                    sources: &c.sources,
                    dest: &c.dest,
                    owner,
                    chmod: c.chmod,
                    exclude: &c.exclude,
                    parents: c.parents,
                    unpack_archives: false,
                };
                match &c.from {
                    None => {
                        copy::copy(SourceRoot::Context(self.ctx), &req, root).map_err(copy_err)?
                    }
                    Some(from) => {
                        let view = self.view_of(from, number, instruction)?;
                        copy::copy(SourceRoot::Tree(view.path()), &req, root).map_err(copy_err)?
                    }
                };
                Ok(())
            }
            Op::Add(a) => {
                let owner = match &a.chown {
                    Some(spec) => Some(copy::resolve_owner(root, spec).map_err(copy_err)?),
                    None => None,
                };
                if a.sources
                    .iter()
                    .any(|s| matches!(s, Source::Url { .. } | Source::Git { .. }))
                {
                    return self.add_remote(a, owner, root, number, instruction);
                }
                let req = CopyRequest {
                    sources: &a.sources,
                    dest: &a.dest,
                    owner,
                    chmod: a.chmod,
                    exclude: &a.exclude,
                    parents: false,
                    unpack_archives: a.unpack.unwrap_or(true),
                };
                copy::copy(SourceRoot::Context(self.ctx), &req, root).map_err(copy_err)?;
                Ok(())
            }
            Op::Run(_) | Op::Env { .. } | Op::User { .. } => Ok(()),
        }
    }

    /// A read-only tree for `--from` / `from=`.
    fn view_of(
        &self,
        from: &CopyFrom,
        number: usize,
        instruction: &str,
    ) -> Result<View, BuildError> {
        let layers = match from {
            CopyFrom::Stage { index } => self
                .built
                .get(index)
                .map(|s| s.layers.clone())
                .ok_or_else(|| BuildError::Unsupported {
                    step: number,
                    instruction: instruction.to_string(),
                    message: format!("stage {index} was not built"),
                })?,
            CopyFrom::Image { reference } => self.resolve(reference)?.layers,
        };
        View::mount(&layers, &self.opts.scratch)
    }

    fn run(
        &mut self,
        run: &crate::ir::Run,
        layers: &[PathBuf],
        upper: &Path,
        number: usize,
        instruction: &str,
    ) -> Result<(), BuildError> {
        let unsupported = |message: String| BuildError::Unsupported {
            step: number,
            instruction: instruction.to_string(),
            message,
        };
        let mut views: Vec<View> = Vec::new();
        let mut prepared = Vec::with_capacity(run.mounts.len());
        for m in &run.mounts {
            prepared.push(match m {
                Mount::Bind { source, from, .. } => {
                    let base = match from {
                        None => self.ctx.root().to_path_buf(),
                        Some(f) => {
                            let v = self.view_of(f, number, instruction)?;
                            let p = v.path().to_path_buf();
                            views.push(v);
                            p
                        }
                    };
                    PreparedMount::Bind {
                        source: base.join(source.trim_start_matches('/')),
                    }
                }
                Mount::Cache { id, .. } => {
                    let dir = self.opts.cache_mounts.join(sanitize(id));
                    PreparedMount::Cache { dir }
                }
                Mount::Tmpfs { .. } => PreparedMount::Tmpfs,
                Mount::Secret { id, required, .. } => {
                    let file = self.opts.secrets.get(id).cloned();
                    if file.is_none() && *required {
                        return Err(unsupported(format!(
                            "secret {id:?} is required: pass --secret id={id},src=FILE"
                        )));
                    }
                    PreparedMount::Secret { file }
                }
                Mount::Ssh { .. } => PreparedMount::Ssh,
            });
        }
        let lowers: Vec<PathBuf> = layers.iter().rev().cloned().collect();
        let mut tail: Vec<String> = Vec::new();
        let events = &mut self.opts.events;
        let mut output = |stream: Stream, line: &str| {
            if tail.len() == 20 {
                tail.remove(0);
            }
            tail.push(line.to_string());
            events(Event::Output {
                number,
                stream,
                line,
            });
        };
        let outcome = self
            .driver
            .run_step(
                &lowers,
                upper,
                StepRequest {
                    run,
                    hostname: "kiln-build",
                    mounts: &prepared,
                    resolv_conf: None,
                    limits: self.opts.limits,
                    output: &mut output,
                    stdio: Stdio::Capture,
                    timeout: self.opts.step_timeout,
                },
            )
            .map_err(|source| BuildError::Driver {
                step: number,
                instruction: instruction.to_string(),
                source,
            })?;
        drop(views);
        if outcome.exit_code != 0 {
            return Err(BuildError::StepFailed {
                step: number,
                instruction: instruction.to_string(),
                code: outcome.exit_code,
                why: if outcome.timed_out {
                    " (timed out)"
                } else if outcome.oom_killed {
                    " (out of memory)"
                } else {
                    ""
                },
                tail,
            });
        }
        Ok(())
    }
}

/// A cache id as a directory name (ids are user text: `/root/.cache`, `pip`).
fn sanitize(id: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let short: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    format!("{short}-{}", &hex::encode(digest)[..16])
}
