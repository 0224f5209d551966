//! `kiln lower`.

use super::dockerfile::read_dockerfile;
use super::output::{CliError, Out};
use crate::frontend::{self, LowerOptions, NoBaseImages, dockerfile, sdk};
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Print the IR of a Dockerfile or an SDK image definition as JSON.
#[derive(Debug, Args)]
pub struct LowerArgs {
    /// A Dockerfile, or a directory holding one.
    #[arg(required_unless_present = "sdk_json", conflicts_with = "sdk_json")]
    pub dockerfile: Option<PathBuf>,
    /// An SDK image definition (JSON) instead of a Dockerfile.
    #[arg(long, value_name = "FILE")]
    pub sdk_json: Option<PathBuf>,
    /// A build argument, as `docker build --build-arg` (repeat).
    #[arg(long = "build-arg", value_name = "K=V", value_parser = parse_build_arg)]
    pub build_args: Vec<(String, String)>,
    /// The stage to build (default: the last).
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
}

/// `K=V`; a bare `K` takes the value of the environment variable K, as Docker does.
pub fn parse_build_arg(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err("a build arg needs a name: K=V".into()),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => std::env::var(s)
            .map(|v| (s.to_string(), v))
            .map_err(|_| format!("--build-arg {s}: no value and no environment variable {s}")),
    }
}

/// The Dockerfile a path names: itself, or `Dockerfile` inside a directory.
pub fn dockerfile_path(p: &std::path::Path) -> PathBuf {
    if p.is_dir() {
        p.join("Dockerfile")
    } else {
        p.to_path_buf()
    }
}

/// Runs `kiln lower`.
pub fn run(args: &LowerArgs, out: &Out) -> Result<(), CliError> {
    let opts = LowerOptions {
        build_args: args.build_args.iter().cloned().collect::<BTreeMap<_, _>>(),
        target: args.target.clone(),
        ..LowerOptions::default()
    };
    let lowered = if let Some(json) = &args.sdk_json {
        let text = std::fs::read_to_string(json).map_err(|e| CliError::unreadable(json, &e))?;
        let name = json.display().to_string();
        let img = sdk::from_json(&text).map_err(|e| CliError::frontend(e, &name, &text))?;
        sdk::lower_sdk(&img, &opts, &NoBaseImages)
            .map_err(|e| CliError::frontend(e, &name, &text))?
    } else {
        let Some(arg) = &args.dockerfile else {
            return Err(CliError::usage(
                "give a Dockerfile or --sdk-json".into(),
                None,
            ));
        };
        let path = dockerfile_path(arg);
        let name = path.display().to_string();
        let src = read_dockerfile(&path, out)?;
        let tree =
            dockerfile::parse(&src).map_err(|e| CliError::frontend(e.into(), &name, &src))?;
        let lowered = frontend::lower_dockerfile(&tree, &opts, &NoBaseImages)
            .map_err(|e| CliError::frontend(e, &name, &src))?;
        out.lints(&name, &lowered.lints);
        lowered
    };
    if !lowered.unused_build_args.is_empty() {
        out.warn(&format!(
            "One or more build-args [{}] were not consumed",
            lowered.unused_build_args.join(" ")
        ));
    }
    let mut text = serde_json::to_string_pretty(&lowered.spec).unwrap_or_default();
    text.push('\n');
    out.result(&text, &lowered.spec)
}
