//! `kiln image create`: build a Dockerfile or SDK definition, snapshot it, register the name.

use super::Ctx;
use super::base::cli_error;
use super::dockerfile::read_dockerfile;
use super::lower::{dockerfile_path, parse_build_arg};
use super::output::{CliError, Exit};
use super::progress::{Mode, StepProgress};
use super::snapshot::{import, open_registry};
use crate::build::cgroup::Limits;
use crate::build::driver::{Driver, MicrovmDriver, MicrovmOptions, NamespaceDriver};
use crate::build::run::{BuildError, Event};
use crate::frontend::{self, LowerOptions, Lowered, dockerfile, sdk};
use crate::ir::{Network, Op};
use crate::pipeline::{self, BuildRequest, PipelineError};
use crate::registry::{self, BaseRef, Registration};
use clap::{Args, ValueEnum};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which builder runs the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BuilderKind {
    /// microvm where KVM works, else namespace.
    Auto,
    /// Linux namespaces and overlayfs.
    Namespace,
    /// A QEMU microVM.
    Microvm,
}

/// RUN steps' network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkFlag {
    /// As each step asks (`RUN --network`), the host's by default.
    Default,
    /// No network for any step.
    None,
}

/// How progress is shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressFlag {
    /// A spinner per step when stderr is a terminal, else plain lines.
    Auto,
    /// Plain lines: `#N/TOTAL INSTRUCTION`, `#N | OUTPUT`.
    Plain,
    /// Spinners (plain lines when stderr is not a terminal).
    Tty,
    /// Nothing but errors.
    Quiet,
}

/// Build, snapshot and register in one go.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A Dockerfile, or a directory holding `Dockerfile`.
    #[arg(default_value = ".")]
    pub path: PathBuf,
    /// The name to register (default: the directory name for a file named Dockerfile, else
    /// the file stem).
    #[arg(short = 'n', long = "registered-name", value_name = "N")]
    pub registered_name: Option<String>,
    /// The Dockerfile, when PATH is the context directory.
    #[arg(short = 'f', long, value_name = "F")]
    pub file: Option<PathBuf>,
    /// The build context (default: the Dockerfile's directory).
    #[arg(long, value_name = "DIR")]
    pub context: Option<PathBuf>,
    /// Build from an SDK image definition (JSON) instead of a Dockerfile.
    #[arg(long, value_name = "F")]
    pub sdk_json: Option<PathBuf>,
    /// A build argument (repeat).
    #[arg(long = "build-arg", value_name = "K=V", value_parser = parse_build_arg)]
    pub build_args: Vec<(String, String)>,
    /// The stage to build.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Run every step again.
    #[arg(long)]
    pub no_cache: bool,
    /// A secret for `RUN --mount=type=secret`: `id=ID,src=FILE` (repeat).
    #[arg(long = "secret", value_name = "id=ID,src=FILE")]
    pub secrets: Vec<String>,
    /// Which builder runs the steps.
    #[arg(long, value_enum, default_value_t = BuilderKind::Auto)]
    pub builder: BuilderKind,
    /// CPUs for each step.
    #[arg(long, default_value_t = 2.0)]
    pub cpus: f64,
    /// Memory for each step, MiB.
    #[arg(long, default_value_t = 4096)]
    pub memory: u64,
    /// Size of the snapshot's root disk, MiB.
    #[arg(long = "disk_mb", alias = "disk-mb", default_value_t = crate::snapshot::DEFAULT_DISK_MB)]
    pub disk_mb: u64,
    /// Scratch space of the builder, MiB (default 2 × disk_mb): what RUN steps may write (a
    /// loop-mounted scratch disk on the namespace builder, the VM's scratch disk on microvm).
    #[arg(long = "builder_disk_mb", alias = "builder-disk-mb")]
    pub builder_disk_mb: Option<u64>,
    /// Register a public name (unique across all projects).
    #[arg(long)]
    pub public: bool,
    /// RUN steps' network.
    #[arg(long, value_enum, default_value_t = NetworkFlag::Default)]
    pub network: NetworkFlag,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressFlag::Auto)]
    pub progress: ProgressFlag,
    /// Kill a RUN step that runs longer than this many seconds (the build fails, exit 1).
    #[arg(long, value_name = "SECS", env = crate::envvars::KILN_STEP_TIMEOUT)]
    pub step_timeout: Option<u64>,
}

/// The driver `--builder` asks for: `auto` is microvm where KVM works (TCG is too slow to be
/// chosen unasked), else namespace.
fn driver(args: &CreateArgs, home: &crate::home::Home) -> Result<Box<dyn Driver>, CliError> {
    let microvm = match args.builder {
        BuilderKind::Namespace => false,
        BuilderKind::Microvm => true,
        BuilderKind::Auto => crate::doctor::microvm_preferred(),
    };
    if !microvm {
        return Ok(Box::new(NamespaceDriver));
    }
    let opts = MicrovmOptions {
        cpus: args.cpus.ceil().max(1.0) as u32,
        memory_mb: args.memory.max(128),
        scratch_mb: args
            .builder_disk_mb
            .unwrap_or(args.disk_mb.saturating_mul(2))
            .max(64),
        ..MicrovmOptions::default()
    };
    let d = MicrovmDriver::new(home, opts).map_err(|e| {
        CliError::new(
            Exit::Environment,
            "builder_unavailable",
            format!("the microvm builder cannot start: {e}"),
            Some("`kiln doctor` says what this host lacks; --builder namespace needs no VM".into()),
        )
    })?;
    let (accel, why) = d.accel();
    tracing::info!(accel = accel.as_str(), kernel = %d.kernel().release, "microvm builder: {why}");
    Ok(Box::new(d))
}

/// The default name: the directory of a file named `Dockerfile`, else the file stem;
/// lower-cased, every other character `-`.
pub fn default_name(dockerfile: &Path) -> String {
    let stem = if dockerfile.file_name().is_some_and(|n| n == "Dockerfile") {
        std::fs::canonicalize(dockerfile).ok().and_then(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        })
    } else {
        dockerfile
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
    };
    stem.unwrap_or_else(|| "image".into())
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn parse_secret(s: &str) -> Result<(String, PathBuf), CliError> {
    let mut id = None;
    let mut src = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
            _ => {
                return Err(CliError::usage(
                    format!("--secret {s:?}: unknown part {part:?}"),
                    Some("write --secret id=ID,src=FILE".into()),
                ));
            }
        }
    }
    match (id, src) {
        (Some(id), Some(src)) if src.is_file() => Ok((id, src)),
        (Some(_), Some(src)) => Err(CliError::usage(
            format!("--secret: {} is not a readable file", src.display()),
            None,
        )),
        _ => Err(CliError::usage(
            format!("--secret {s:?} needs id= and src="),
            Some("write --secret id=ID,src=FILE".into()),
        )),
    }
}

/// What a build is made from.
enum Definition {
    Dockerfile {
        path: PathBuf,
        text: String,
    },
    Sdk {
        path: PathBuf,
        text: String,
        image: Box<sdk::SdkImage>,
    },
}

/// Runs `image create`.
pub fn run(args: &CreateArgs, ctx: &Ctx) -> Result<(), CliError> {
    let started = Instant::now();
    let home = ctx.home()?;
    let (def, context) = definition(args, &ctx.out)?;
    let name_text = match (&args.registered_name, &def) {
        (Some(n), _) => n.clone(),
        (None, Definition::Sdk { image, path, .. }) => {
            image.name.clone().unwrap_or_else(|| default_name(path))
        }
        (None, Definition::Dockerfile { path, .. }) => default_name(path),
    };
    let name = registry::name(&name_text)?;
    let project = registry::project(&ctx.project)?;
    let mut secrets = BTreeMap::new();
    for s in &args.secrets {
        let (id, src) = parse_secret(s)?;
        secrets.insert(id, src);
    }
    let opts = LowerOptions {
        build_args: args.build_args.iter().cloned().collect(),
        target: args.target.clone(),
        ..LowerOptions::default()
    };
    let network_none = args.network == NetworkFlag::None;
    let lower = |bases: &dyn frontend::BaseImages| -> Result<Lowered, frontend::FrontendError> {
        let mut lowered = match &def {
            Definition::Dockerfile { text, .. } => {
                let tree = dockerfile::parse(text)?;
                frontend::lower_dockerfile(&tree, &opts, bases)?
            }
            Definition::Sdk { image, .. } => sdk::lower_sdk(image, &opts, bases)?,
        };
        if network_none {
            for stage in &mut lowered.spec.stages {
                for op in &mut stage.steps {
                    if let Op::Run(r) = op {
                        r.network = Network::None;
                    }
                }
            }
        }
        Ok(lowered)
    };
    let mut progress = StepProgress::new(Mode::choose(args.progress, ctx.out.quiet()));
    let mut events = |e: Event<'_>| progress.event(e);
    let req = BuildRequest {
        lower: &lower,
        context,
        dockerfile: match &def {
            Definition::Dockerfile { path, .. } => Some(path.clone()),
            Definition::Sdk { .. } => None,
        },
        no_cache: args.no_cache,
        limits: Limits {
            memory_bytes: Some(args.memory.saturating_mul(1 << 20)),
            cpus: Some(args.cpus),
            pids: None,
        },
        secrets,
        step_timeout: args.step_timeout.map(Duration::from_secs),
        builder_disk_mb: Some(
            args.builder_disk_mb
                .unwrap_or(args.disk_mb.saturating_mul(2))
                .max(64),
        ),
    };
    let driver = driver(args, &home)?;
    let builder = driver.name();
    let built = pipeline::build(&home, &req, driver.as_ref(), &mut events);
    // The last step's spinner stops before the snapshot is made (or the error shows).
    progress.finish();
    let built = built.map_err(|e| pipeline_error(e, &def))?;
    for l in &built.lowered.lints {
        if let Definition::Dockerfile { path, .. } = &def {
            ctx.out
                .lints(&path.display().to_string(), std::slice::from_ref(l));
        }
    }
    let config = built
        .lowered
        .spec
        .target()
        .map(|s| s.config.clone())
        .unwrap_or_default();
    let dockerfile_text = match &def {
        Definition::Dockerfile { text, .. } => Some(text.clone()),
        Definition::Sdk { text, .. } => Some(text.clone()),
    };
    let disk_mb = args.disk_mb;
    let public = args.public;
    let base = built.base.clone();
    let steps = built.steps.clone();
    let reuse = TreeSnapshots::open(&home, &project, &built.key, disk_mb)?;
    let all_cached = built.steps.iter().all(|s| s.cached);
    let registered = ctx.block_on(async {
        let reg = open_registry(ctx).await?;
        // The same tree at the same size is the same disk: reuse the snapshot made for it.
        // Only when every step came from the cache: a step that ran (`--no-cache`, or a
        // cache entry replaced) may have made another tree under the same key.
        let found = if all_cached {
            reuse.find(&reg).await
        } else {
            None
        };
        let snap = match found {
            Some(s) => s,
            None => {
                let tree = built.mount_tree().map_err(|e| pipeline_error(e, &def))?;
                let s = import(ctx, &reg, tree.path(), disk_mb).await?;
                drop(tree);
                reuse.remember(&s.id);
                s
            }
        };
        let r = reg
            .register(
                &project,
                &name,
                snap.id.as_str(),
                Registration {
                    public,
                    dockerfile: dockerfile_text,
                    config,
                    base: base.map(|(reference, digest)| BaseRef {
                        reference,
                        digest: (!digest.is_empty()).then_some(digest),
                    }),
                    builder: Some(builder.into()),
                },
            )
            .await?;
        reg.close().await;
        Ok::<_, CliError>((snap, r))
    })??;
    drop(built);
    let (snap, r) = registered;
    let snap_json = super::snapshot::snapshot_json(&snap);
    let value = json!({
        "name": r.image.name,
        "project": r.image.project,
        "public": r.image.public,
        "image_id": r.image.id.as_str(),
        "snapshot_id": snap.id.as_str(),
        "snapshot_uri": snap_json["snapshot_uri"],
        "status": snap_json["status"],
        "disk_mb": snap.disk_mb,
        "size_bytes": snap_json["size_bytes"],
        "sha256": snap_json["sha256"],
        "builder": builder,
        "duration_ms": started.elapsed().as_millis() as u64,
        "steps": steps,
    });
    let text = format!(
        "registered {} ({}) -> {} in {:.1}s\n",
        r.image.name,
        r.image.id.as_str(),
        snap.id,
        started.elapsed().as_secs_f64()
    );
    ctx.out.result(&text, &value)
}

/// Which snapshot was made from a tree: `KILN_HOME/tree-snapshots-v1/PROJECT-KEY-MB-EPOCH`
/// holds its id. The tree is a function of the last step's key (the cache guarantees it), the
/// disk of the tree, its size and `SOURCE_DATE_EPOCH`; a stale entry (the snapshot removed,
/// not `Completed`, its disk gone) is ignored and replaced.
struct TreeSnapshots {
    path: PathBuf,
    disk_mb: u64,
}

impl TreeSnapshots {
    fn open(
        home: &crate::home::Home,
        project: &crate::registry::Name,
        key: &crate::build::cache::CacheKey,
        disk_mb: u64,
    ) -> Result<Self, CliError> {
        let dir = home
            .dir("tree-snapshots-v1")
            .map_err(|e| CliError::new(Exit::Environment, "no_home", e.to_string(), None))?;
        // Anything but digits would fail the import anyway; it must not make a path.
        let epoch: String = std::env::var(crate::envvars::SOURCE_DATE_EPOCH)
            .unwrap_or_default()
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        Ok(TreeSnapshots {
            path: dir.join(format!(
                "{}-{}-{disk_mb}-{}",
                project.as_str(),
                key.hex(),
                if epoch.is_empty() { "none" } else { &epoch }
            )),
            disk_mb,
        })
    }

    async fn find(
        &self,
        reg: &crate::registry::Registry,
    ) -> Option<crate::registry::SnapshotRecord> {
        let id = std::fs::read_to_string(&self.path).ok()?;
        let rec = reg.snapshot(id.trim()).await.ok()?;
        match &rec.state {
            crate::snapshot::SnapshotState::Completed { uri, .. }
                if rec.disk_mb == self.disk_mb
                    && crate::snapshot::store::uri_path(uri).is_some_and(|p| p.is_file()) =>
            {
                Some(rec)
            }
            _ => None,
        }
    }

    fn remember(&self, id: &crate::snapshot::SnapshotId) {
        if let Err(e) = crate::fs::write_atomic(&self.path, id.as_str().as_bytes()) {
            tracing::warn!(error = %e, "cannot record the snapshot of this tree");
        }
    }
}

fn definition(args: &CreateArgs, out: &super::Out) -> Result<(Definition, PathBuf), CliError> {
    if let Some(json) = &args.sdk_json {
        let text = std::fs::read_to_string(json).map_err(|e| CliError::unreadable(json, &e))?;
        let image = sdk::from_json(&text)
            .map_err(|e| CliError::frontend(e, &json.display().to_string(), &text))?;
        let context = args.context.clone().unwrap_or_else(|| args.path.clone());
        return Ok((
            Definition::Sdk {
                path: json.clone(),
                text,
                image: Box::new(image),
            },
            context,
        ));
    }
    let path = match &args.file {
        Some(f) => f.clone(),
        None => dockerfile_path(&args.path),
    };
    let text = read_dockerfile(&path, out)?;
    let context = match &args.context {
        Some(c) => c.clone(),
        None if args.file.is_some() || args.path.is_dir() => args.path.clone(),
        None => path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    };
    Ok((Definition::Dockerfile { path, text }, context))
}

fn pipeline_error(e: PipelineError, def: &Definition) -> CliError {
    match e {
        PipelineError::Frontend(fe) => match def {
            Definition::Dockerfile { path, text } => {
                CliError::frontend(fe, &path.display().to_string(), text)
            }
            Definition::Sdk { path, text, .. } => {
                CliError::frontend(fe, &path.display().to_string(), text)
            }
        },
        PipelineError::Base { source, .. } => cli_error(source),
        PipelineError::Context(c) => {
            CliError::new(Exit::BadInput, "bad_context", c.to_string(), None)
        }
        PipelineError::Build(BuildError::StepFailed {
            step,
            instruction,
            code,
            why,
            tail,
        }) => {
            let mut message =
                format!("step {step} ({instruction}) failed with exit code {code}{why}");
            if !tail.is_empty() {
                message.push_str("\nlast output:\n");
                for l in &tail {
                    message.push_str("  ");
                    message.push_str(l);
                    message.push('\n');
                }
            }
            CliError::new(
                Exit::Failed,
                "step_failed",
                message,
                Some("nothing was registered; the previous image of this name is unchanged".into()),
            )
        }
        PipelineError::Build(BuildError::Copy { .. } | BuildError::Context { .. }) => {
            CliError::new(Exit::BadInput, "bad_input", e.to_string(), None)
        }
        PipelineError::Build(BuildError::Base { .. }) => {
            CliError::new(Exit::NotFound, "not_found", e.to_string(), None)
        }
        // A checksum mismatch or an error status is the build failing (as in Docker); no
        // connection is the environment.
        PipelineError::Build(BuildError::Fetch { ref source, .. }) => {
            let exit = if source.is_environment() {
                Exit::Environment
            } else {
                Exit::Failed
            };
            CliError::new(exit, "fetch_failed", e.to_string(), None)
        }
        PipelineError::Build(BuildError::Driver {
            source: crate::build::driver::DriverError::Interrupted { .. },
            ..
        }) => CliError::new(Exit::Failed, "interrupted", e.to_string(), None),
        // A guest that crashed, hung or broke the protocol failed the build; a host that
        // cannot run a VM is the environment.
        PipelineError::Build(BuildError::Driver {
            source: crate::build::driver::DriverError::Vm(ref v),
            ..
        }) if !v.is_environment() => CliError::new(
            Exit::Failed,
            "builder_vm_failed",
            e.to_string(),
            Some("nothing was registered; the previous image of this name is unchanged".into()),
        ),
        PipelineError::Build(_) | PipelineError::Io { .. } => {
            CliError::new(Exit::Environment, "environment", e.to_string(), None)
        }
    }
}
