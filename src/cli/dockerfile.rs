//! `kiln dockerfile …`.

use super::output::{CliError, Out};
use crate::frontend::dockerfile;
use clap::Subcommand;
use std::path::PathBuf;

/// Dockerfile tools.
#[derive(Debug, Subcommand)]
pub enum DockerfileCommand {
    /// Print the parse tree in BuildKit's `Node.Dump()` format (JSON: the tree with spans).
    Ast {
        /// The Dockerfile.
        file: PathBuf,
    },
}

/// Reads and decodes a Dockerfile, warning about invalid UTF-8.
pub fn read_dockerfile(path: &std::path::Path, out: &Out) -> Result<String, CliError> {
    let bytes = std::fs::read(path).map_err(|e| CliError::unreadable(path, &e))?;
    let (text, lossy) = dockerfile::decode(&bytes);
    if lossy {
        out.warn(&format!(
            "{} is not valid UTF-8; invalid bytes were replaced with U+FFFD",
            path.display()
        ));
    }
    Ok(text.into_owned())
}

/// Runs a `dockerfile` subcommand.
pub fn run(cmd: &DockerfileCommand, out: &Out) -> Result<(), CliError> {
    match cmd {
        DockerfileCommand::Ast { file } => {
            let src = read_dockerfile(file, out)?;
            let name = file.display().to_string();
            let tree =
                dockerfile::parse(&src).map_err(|e| CliError::frontend(e.into(), &name, &src))?;
            out.result(&dockerfile::dump(&tree), &tree)
        }
    }
}
