//! `kiln doctor`: which builders work on this host, and why not.

use super::Ctx;
use super::output::{CliError, Exit};
use crate::doctor::{self, Report};
use clap::Args;
use std::fmt::Write as _;

/// Report which builders work on this host and why not.
#[derive(Debug, Args)]
pub struct DoctorArgs {}

/// Runs `kiln doctor`: prints the report; exit 0 when a builder works, 5 otherwise.
pub fn run(_args: &DoctorArgs, ctx: &Ctx) -> Result<Exit, CliError> {
    // Probe overlayfs where the builder's layers go; without a usable home, the temp dir.
    let scratch = ctx
        .home()
        .ok()
        .and_then(|h| h.tmp().ok())
        .unwrap_or_else(std::env::temp_dir);
    let report = doctor::diagnose(&scratch);
    ctx.out.result(&render(&report), &report)?;
    Ok(if report.any_builder() {
        Exit::Ok
    } else {
        Exit::Environment
    })
}

fn yes(ok: bool) -> &'static str {
    if ok { "yes" } else { "NO" }
}

/// The text form: a builders table, then a checks table.
fn render(r: &Report) -> String {
    let b = &r.builders;
    let rows = [
        (
            "namespace",
            b.namespace.ok,
            b.namespace.reason.clone().unwrap_or_default(),
        ),
        (
            "microvm",
            b.microvm.ok,
            format!("accel {}: {}", b.microvm.accel.as_str(), b.microvm.reason),
        ),
    ];
    let mut s = String::new();
    let _ = writeln!(s, "{:<10} {:<3}  detail", "builder", "ok");
    for (name, ok, detail) in rows {
        let _ = writeln!(s, "{name:<10} {:<3}  {detail}", yes(ok));
    }
    let width = r.checks.iter().map(|c| c.name.len()).max().unwrap_or(5);
    let _ = writeln!(s, "\n{:<width$} {:<3}  detail", "check", "ok");
    for c in &r.checks {
        let _ = writeln!(s, "{:<width$} {:<3}  {}", c.name, yes(c.ok), c.detail);
    }
    s
}
