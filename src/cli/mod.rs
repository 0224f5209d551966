//! The command line: clap types, one thin handler per command, and the rendering of results
//! and errors (text on stderr, `--output json` on stdout, exit codes as CLI.md says).

mod base;
mod create;
mod dockerfile;
mod doctor;
mod gc;
mod image;
mod lower;
mod output;
mod progress;
mod sbx;
mod snapshot;

use clap::{Parser, Subcommand};
pub use output::{CliError, Exit, Out};
use std::path::PathBuf;

/// Kiln turns Dockerfiles and SDK image definitions into bootable root-disk snapshots for
/// microVM sandboxes.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
pub struct Cli {
    /// All local state: SQLite file, blobs, layers, snapshots.
    #[arg(long, global = true, env = crate::envvars::KILN_HOME, value_name = "DIR")]
    home: Option<PathBuf>,
    /// The project every name is looked up in.
    #[arg(long, global = true, env = crate::envvars::KILN_PROJECT, default_value = "default")]
    project: String,
    /// Output format: human text on stderr, or JSON on stdout.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    output: Format,
    /// Same as `--output json`.
    #[arg(long, global = true)]
    json: bool,
    /// Print less (warnings are dropped).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Print more log (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Commands,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human text.
    Text,
    /// JSON on stdout.
    Json,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Dockerfile tools.
    #[command(subcommand)]
    Dockerfile(dockerfile::DockerfileCommand),
    /// Print the IR of a Dockerfile or SDK definition as JSON.
    Lower(lower::LowerArgs),
    /// Snapshots: ext4 root disks made from a root tree.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Registered images: names that sandboxes launch from.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Remove unreferenced snapshots and what interrupted runs left behind.
    Gc(gc::GcArgs),
    /// Report which builders work on this host and why not.
    Doctor(doctor::DoctorArgs),
    /// Base images: pull from a registry, import, list, remove.
    #[command(subcommand)]
    Base(base::BaseCommand),
    /// Sandboxes launched from registered images.
    #[command(subcommand)]
    Sbx(sbx::SbxCommand),
}

/// Runs the CLI and maps the outcome to an exit code.
pub fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                Exit::BadInput
            } else {
                Exit::Ok
            };
            let _ = e.print();
            return code.into();
        }
    };
    init_tracing(cli.quiet, cli.verbose);
    let format = if cli.json { Format::Json } else { cli.output };
    let ctx = Ctx {
        out: Out::new(format, cli.quiet),
        home: cli.home.clone(),
        project: cli.project.clone(),
    };
    let result = match &cli.command {
        Commands::Dockerfile(cmd) => dockerfile::run(cmd, &ctx.out),
        Commands::Lower(args) => lower::run(args, &ctx.out),
        Commands::Snapshot(cmd) => snapshot::run(cmd, &ctx),
        Commands::Image(cmd) => image::run(cmd, &ctx),
        Commands::Gc(args) => gc::run(args, &ctx),
        // doctor prints its report and still exits 5 when no builder works.
        Commands::Doctor(args) => match doctor::run(args, &ctx) {
            Ok(exit) => return exit.into(),
            Err(e) => Err(e),
        },
        Commands::Base(cmd) => base::run(cmd, &ctx),
        // run and exec exit with the sandbox command's code.
        Commands::Sbx(cmd) => match sbx::run(cmd, &ctx) {
            Ok(code) => return code.into(),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            ctx.out.error(&e);
            e.exit.into()
        }
    }
}

/// What every command handler gets: output, the home and the project.
pub struct Ctx {
    /// Where results and errors go.
    pub out: Out,
    home: Option<PathBuf>,
    /// The project names are looked up in.
    pub project: String,
}

impl Ctx {
    /// The home (`--home`, `KILN_HOME`, XDG default).
    pub fn home(&self) -> Result<crate::home::Home, CliError> {
        crate::home::Home::resolve(self.home.as_deref()).map_err(|e| {
            CliError::new(
                Exit::Environment,
                "no_home",
                e.to_string(),
                Some("pass --home DIR or set KILN_HOME".into()),
            )
        })
    }

    /// Runs a future to completion on a fresh multi-threaded runtime.
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> Result<F::Output, CliError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                CliError::new(
                    Exit::Environment,
                    "runtime",
                    format!("cannot start the async runtime: {e}"),
                    None,
                )
            })?;
        Ok(rt.block_on(fut))
    }
}

fn init_tracing(quiet: bool, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env(crate::envvars::KILN_LOG)
        .unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
}
