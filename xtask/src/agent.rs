//! `cargo xtask agent`: builds the static guest agent where `kiln` looks for it
//! (`TARGET/agent/kiln-agent`, beside `TARGET/debug` and `TARGET/release`), with the cargo
//! arguments the library defines ([`kiln::vm::agent::BUILD_ARGS`]), and checks it is static.

use std::path::PathBuf;
use std::process::ExitCode;

/// Builds the agent; returns its path.
pub fn build() -> Result<PathBuf, String> {
    let root = crate::bench_build::repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    kiln::vm::agent::build(&cargo, &root, &target)
}

/// `cargo xtask agent`.
pub fn main() -> ExitCode {
    match build() {
        Ok(p) => {
            println!("{}", p.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xtask agent: {e}");
            ExitCode::FAILURE
        }
    }
}
