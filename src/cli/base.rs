//! `kiln base pull|ls|rm|import`: flags to a call into [`crate::oci`], results as text or
//! JSON, errors mapped to CLI.md's exit codes; layer progress as bars on a TTY, else lines.

use super::Ctx;
use super::output::{CliError, Exit};
use crate::oci::client::{ClientOptions, RegistryClient};
use crate::oci::import::{self, ImportSource};
use crate::oci::pull::{self, Progress, PullOptions};
use crate::oci::store::{ImageRecord, Store};
use crate::oci::{Digest, ErrorKind, OciError, Reference};
use clap::Subcommand;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

/// Base images: pulled, imported or built in.
#[derive(Debug, Subcommand)]
pub enum BaseCommand {
    /// Fetch an image from its registry (or make a built-in `kiln/…` base) into the store.
    Pull {
        /// An image reference (`alpine`, `127.0.0.1:5000/x/busybox:1.36`, `…@sha256:…`).
        reference: String,
        /// Layers downloaded at once.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
    },
    /// List the images in the store.
    Ls,
    /// Remove an image's name from the store (`kiln gc` frees its layers).
    Rm {
        /// The reference it was pulled or imported as.
        reference: String,
    },
    /// Add a local image: `oci-layout:DIR[:TAG]`, `oci-archive:FILE[:TAG]`, `docker-archive:FILE[:TAG]`.
    Import {
        /// Where the image is.
        source: String,
        /// The name `FROM` will know it by.
        #[arg(long, value_name = "NAME")]
        tag: String,
    },
}

/// Runs `kiln base …`.
pub fn run(cmd: &BaseCommand, ctx: &Ctx) -> Result<(), CliError> {
    let store = open(ctx)?;
    match cmd {
        BaseCommand::Pull { reference, jobs } => {
            let r = parse_ref(reference)?;
            let client = RegistryClient::new(ClientOptions::from_env()).map_err(cli_error)?;
            let progress = Arc::new(CliProgress::new(ctx));
            let opts = PullOptions {
                jobs: usize::from(*jobs),
            };
            let p: Arc<dyn Progress> = progress.clone();
            let rec = ctx.block_on(pull::pull(&store, &client, &r, &opts, p))?;
            progress.clear();
            let rec = rec.map_err(cli_error)?;
            render_image(ctx, &r, &rec, "pulled")
        }
        BaseCommand::Ls => {
            let recs = store.images().map_err(cli_error)?;
            let mut text = String::new();
            for r in &recs {
                let name =
                    Reference::parse(&r.reference).map_or(r.reference.clone(), |x| x.familiar());
                let source = serde_json::to_value(r.source).ok();
                let source = source.as_ref().and_then(Value::as_str).unwrap_or("?");
                text.push_str(&format!(
                    "{name}\t{}\t{source}\t{}\n",
                    short(&r.digest),
                    human(r.size_bytes())
                ));
            }
            let v: Vec<Value> = recs.iter().map(record_json).collect();
            ctx.out.result(&text, &v)
        }
        BaseCommand::Rm { reference } => {
            let r = parse_ref(reference)?;
            match store.remove_image(&r).map_err(cli_error)? {
                Some(rec) => ctx.out.result(
                    &format!("removed {}\n", r.familiar()),
                    &json!({"reference": rec.reference, "digest": rec.digest, "removed": true}),
                ),
                None => Err(CliError::new(
                    Exit::NotFound,
                    "not_found",
                    format!("no base image {} in the store", r.familiar()),
                    Some("`kiln base ls` lists them".into()),
                )),
            }
        }
        BaseCommand::Import { source, tag } => {
            let r = parse_ref(tag)?;
            let src = ImportSource::parse(source).map_err(cli_error)?;
            let rec = import::import(&store, &src, &r).map_err(cli_error)?;
            render_image(ctx, &r, &rec, "imported")
        }
    }
}

fn open(ctx: &Ctx) -> Result<Store, CliError> {
    let home = ctx.home()?;
    Store::open(&home).map_err(cli_error)
}

fn parse_ref(s: &str) -> Result<Reference, CliError> {
    Reference::parse(s).map_err(|e| {
        CliError::new(
            Exit::BadInput,
            "bad_reference",
            e.to_string(),
            Some(
                "a reference is [HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST], e.g. alpine:3.20".into(),
            ),
        )
    })
}

fn short(d: &Digest) -> String {
    format!("sha256:{}", &d.hex()[..12])
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} kB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn record_json(r: &ImageRecord) -> Value {
    json!({
        "reference": r.reference,
        "digest": r.digest,
        "platform_digest": r.platform_digest,
        "platform": r.platform,
        "source": r.source,
        "layers": r.layers.iter().map(|l| json!({"digest": l.digest, "size": l.size, "diff_id": l.diff_id})).collect::<Vec<_>>(),
        "size_bytes": r.size_bytes(),
        "created_at": r.created_at,
    })
}

fn render_image(ctx: &Ctx, r: &Reference, rec: &ImageRecord, verb: &str) -> Result<(), CliError> {
    let text = format!(
        "{verb} {}\ndigest: {}\nplatform: {} ({})\nlayers: {} ({})\n",
        r.familiar(),
        rec.digest,
        rec.platform,
        rec.platform_digest,
        rec.layers.len(),
        human(rec.size_bytes())
    );
    let v = json!({
        "reference": r.to_string(),
        "digest": rec.digest,
        "platform_digest": rec.platform_digest,
        "platform": rec.platform,
        "layers": rec.layers.iter().map(|l| json!({"digest": l.digest, "size": l.size})).collect::<Vec<_>>(),
        "size_bytes": rec.size_bytes(),
        "source": rec.source,
    });
    ctx.out.result(&text, &v)
}

/// Maps an [`OciError`] to an exit code, a stable code and a hint that says what to do.
pub fn cli_error(e: OciError) -> CliError {
    let message = crate::oci::client::describe(&e);
    let (exit, code, hint) = match (&e, e.kind()) {
        (OciError::Unauthorized { registry, with_credentials: true, .. }, _) => (
            Exit::Environment,
            "unauthorized",
            Some(format!(
                "the credentials for {registry} in the docker config were refused: log in again with `docker login {registry}` (Kiln reads $DOCKER_CONFIG/config.json, else ~/.docker/config.json)"
            )),
        ),
        (OciError::Unauthorized { registry, .. }, _) => (
            Exit::Environment,
            "unauthorized",
            Some(format!(
                "log in with `docker login {registry}` (Kiln reads $DOCKER_CONFIG/config.json, else ~/.docker/config.json); a repository that does not exist can also look like this"
            )),
        ),
        (OciError::Unreachable { registry, .. }, _) => (
            Exit::Environment,
            "registry_unreachable",
            Some(format!(
                "check that {registry} is up and reachable from here; a registry that speaks plain HTTP must be on a loopback address or listed in KILN_INSECURE_REGISTRIES"
            )),
        ),
        (_, ErrorKind::Unreachable) => (Exit::Environment, "registry_error", None),
        (OciError::NotFound { .. }, _) => (
            Exit::NotFound,
            "not_found",
            Some("check the repository and tag; `skopeo inspect docker://REF` shows what a registry has".into()),
        ),
        (OciError::NoSuchBuiltin { .. }, _) => (Exit::NotFound, "not_found", None),
        (_, ErrorKind::NotFound) => (Exit::NotFound, "not_found", None),
        (_, ErrorKind::Auth) => (Exit::Environment, "credentials", None),
        (_, ErrorKind::Corrupt) => (
            Exit::Environment,
            "digest_mismatch",
            Some("nothing was stored; the registry or the file holds corrupt or tampered content".into()),
        ),
        (OciError::Reference(_), _) => (Exit::BadInput, "bad_reference", None),
        (_, ErrorKind::BadInput) => (Exit::BadInput, "bad_image", None),
        (OciError::Tool { .. }, _) => (Exit::Environment, "missing_tool", None),
        (_, ErrorKind::Environment) => (Exit::Environment, "environment", None),
    };
    CliError::new(exit, code, message, hint)
}

/// Layer progress: indicatif bars (one per layer and a total) when stderr is a terminal,
/// else one line per layer event.
struct CliProgress {
    quiet: bool,
    bars: Option<Bars>,
}

struct Bars {
    multi: indicatif::MultiProgress,
    total: indicatif::ProgressBar,
    layers: Mutex<HashMap<Digest, indicatif::ProgressBar>>,
}

impl CliProgress {
    fn new(ctx: &Ctx) -> CliProgress {
        let quiet = ctx.out.quiet();
        let bars = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let multi =
                indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
            let total = multi.add(indicatif::ProgressBar::new(0));
            total.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            total.set_prefix("total");
            Bars {
                multi,
                total,
                layers: Mutex::new(HashMap::new()),
            }
        });
        CliProgress { quiet, bars }
    }

    fn line(&self, s: &str) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr(), "{s}");
        }
    }

    fn clear(&self) {
        if let Some(b) = &self.bars {
            b.total.finish_and_clear();
            let _ = b.multi.clear();
        }
    }
}

impl Progress for CliProgress {
    fn layer_start(&self, digest: &Digest, size: u64, cached: bool) {
        match &self.bars {
            Some(b) => {
                b.total.inc_length(size);
                let bar = b
                    .multi
                    .insert_before(&b.total, indicatif::ProgressBar::new(size));
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(digest.hex()[..12].to_string());
                if cached {
                    bar.set_position(size);
                    b.total.inc(size);
                    bar.finish_with_message("already here");
                }
                if let Ok(mut m) = b.layers.lock() {
                    m.insert(digest.clone(), bar);
                }
            }
            None if cached => self.line(&format!(
                "layer {} ({}): already here",
                short(digest),
                human(size)
            )),
            None => self.line(&format!(
                "layer {} ({}): fetching",
                short(digest),
                human(size)
            )),
        }
    }

    fn layer_progress(&self, digest: &Digest, bytes: u64) {
        if let Some(b) = &self.bars {
            b.total.inc(bytes);
            if let Some(bar) = b.layers.lock().ok().and_then(|m| m.get(digest).cloned()) {
                bar.inc(bytes);
            }
        }
    }

    fn layer_done(&self, digest: &Digest) {
        match &self.bars {
            Some(b) => {
                if let Some(bar) = b.layers.lock().ok().and_then(|m| m.get(digest).cloned())
                    && !bar.is_finished()
                {
                    bar.finish_with_message("unpacked");
                }
            }
            None => self.line(&format!("layer {}: unpacked", short(digest))),
        }
    }

    fn note(&self, message: &str) {
        match &self.bars {
            Some(b) => {
                let _ = b.multi.println(message);
            }
            None => self.line(message),
        }
    }
}
