//! Kiln's developer tasks, run as `cargo xtask …` (an alias that builds this crate in
//! release mode):
//!
//! - `cargo xtask fuzz [--iterations N] [--seed S] [--smoke]`: fuzz the Dockerfile parser and
//!   lowering, the SDK JSON path and the shell lexer; fails on any panic or slow input.
//! - `cargo xtask bench parse`: parse and parse + lower throughput in MB/s.
//! - `cargo xtask bench snapshot`: snapshot writing against `mkfs.ext4 -d`.
//! - `cargo xtask bench pull`: base pull + unpack against skopeo + umoci.
//! - `cargo xtask bench build`: `image create` of examples/python-app (cold, no-op, one file
//!   changed) against buildah + `mkfs.ext4 -d`, and `sbx run` launch latency.
//! - `cargo xtask bench vm`: microVM boot to agent, examples/hello on the microvm builder
//!   against the namespace builder, and `sbx run` on both runtimes.
//! - `cargo xtask agent`: build the static guest agent into `target/agent/kiln-agent`.
//!
//! `fuzz` and `bench parse` read BuildKit's conformance corpus in place from
//! `../shared/conformance/buildkit` (or `$KILN_CONFORMANCE_DIR`) and fail if it is missing.

mod agent;
mod bench;
mod bench_build;
mod bench_pull;
mod bench_snapshot;
mod bench_vm;
mod corpus;
mod fuzz;
mod generate;
mod mutate;
mod sdk_gen;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Kiln developer tasks", version)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Fuzz parse + lower, the SDK JSON path and the shell lexer.
    Fuzz(fuzz::FuzzArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
    /// Build the static guest agent into `target/agent/kiln-agent`.
    Agent,
}

#[derive(Subcommand)]
enum Bench {
    /// Dockerfile parse and parse + lower throughput.
    Parse(bench::BenchParseArgs),
    /// Snapshot writing against `mkfs.ext4 -d` of the same tree.
    Snapshot(bench_snapshot::BenchSnapshotArgs),
    /// Pull + unpack of kiln/debian:bookworm vs skopeo copy + umoci unpack.
    Pull(bench_pull::BenchPullArgs),
    /// `image create` of examples/python-app against buildah + mkfs.ext4, and sbx launch.
    Build(bench_build::BenchBuildArgs),
    /// MicroVM boot to agent, examples/hello on both builders, sbx run on both runtimes.
    Vm(bench_vm::BenchVmArgs),
}

fn main() -> ExitCode {
    match Cli::parse().task {
        Task::Fuzz(args) => fuzz::main(args),
        Task::Bench {
            what: Bench::Parse(args),
        } => bench::parse_main(args),
        Task::Bench {
            what: Bench::Snapshot(args),
        } => bench_snapshot::main(args),
        Task::Bench {
            what: Bench::Pull(args),
        } => bench_pull::pull_main(args),
        Task::Bench {
            what: Bench::Build(args),
        } => bench_build::main(args),
        Task::Bench {
            what: Bench::Vm(args),
        } => bench_vm::main(args),
        Task::Agent => agent::main(),
    }
}
