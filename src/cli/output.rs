//! Rendering: results as text or JSON, errors as miette reports plus the JSON error object,
//! and the exit codes of CLI.md.

use super::Format;
use crate::frontend::{FrontendError, Lint};
use miette::{NamedSource, Report};
use serde::Serialize;
use std::io::Write;

/// Kiln's exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// The build or the sandbox command failed.
    Failed = 1,
    /// Bad input: usage, Dockerfile syntax, lowering, unreadable context.
    BadInput = 2,
    /// A name, snapshot or base image was not found.
    NotFound = 3,
    /// A conflict: name taken, snapshot not Completed.
    Conflict = 4,
    /// The environment: missing tool, no permission, registry unreachable, disk full.
    Environment = 5,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

/// A failed command: what to print and how to exit.
pub struct CliError {
    /// The exit code.
    pub exit: Exit,
    /// A stable machine-readable code (`dockerfile_syntax`, `io`, …).
    pub code: &'static str,
    /// The rendered report (message, source snippet, help).
    pub report: Report,
    /// The plain message.
    pub message: String,
    /// The hint, if any.
    pub hint: Option<String>,
}

impl CliError {
    /// A front-end error shown against its source file.
    pub fn frontend(e: FrontendError, path: &str, src: &str) -> Self {
        let message = e.message.clone();
        let hint = e.help.clone();
        let report = Report::new(e).with_source_code(NamedSource::new(path, src.to_string()));
        CliError {
            exit: Exit::BadInput,
            code: "bad_input",
            report,
            message,
            hint,
        }
    }

    /// Any failure: exit code, stable code string, message and optional hint.
    pub fn new(exit: Exit, code: &'static str, message: String, hint: Option<String>) -> Self {
        let report = match &hint {
            Some(h) => miette::miette!(help = h.clone(), "{message}"),
            None => miette::miette!("{message}"),
        };
        CliError {
            exit,
            code,
            report,
            message,
            hint,
        }
    }

    /// A file that cannot be read.
    pub fn unreadable(path: &std::path::Path, e: &std::io::Error) -> Self {
        let message = format!("cannot read {}: {e}", path.display());
        CliError::new(Exit::BadInput, "unreadable_input", message, None)
    }

    /// Bad usage.
    pub fn usage(message: String, hint: Option<String>) -> Self {
        CliError::new(Exit::BadInput, "usage", message, hint)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    hint: Option<&'a str>,
}

/// Where output goes.
pub struct Out {
    format: Format,
    quiet: bool,
}

impl Out {
    /// An output in the chosen format.
    pub fn new(format: Format, quiet: bool) -> Self {
        Out { format, quiet }
    }

    /// True for `--output json`.
    pub fn json(&self) -> bool {
        self.format == Format::Json
    }

    /// True for `-q`: progress and warnings are dropped.
    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// Writes a result: `text` in text mode, `value` as JSON in JSON mode, both on stdout.
    pub fn result<T: Serialize>(&self, text: &str, value: &T) -> Result<(), CliError> {
        let mut stdout = std::io::stdout().lock();
        let written = if self.json() {
            serde_json::to_writer(&mut stdout, value)
                .map_err(std::io::Error::other)
                .and_then(|()| stdout.write_all(b"\n"))
        } else {
            stdout.write_all(text.as_bytes())
        };
        match written.and_then(|()| stdout.flush()) {
            // A closed pipe (`kiln … | head`) is not a failure.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::new(
                Exit::Environment,
                "io",
                format!("cannot write output: {e}"),
                None,
            )),
            _ => Ok(()),
        }
    }

    /// Build-check findings, on stderr.
    pub fn lints(&self, path: &str, lints: &[Lint]) {
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        for l in lints {
            let at = if l.line > 0 {
                format!("{path}:{}", l.line)
            } else {
                path.to_string()
            };
            let _ = writeln!(
                err,
                "warning: {} [{}]\n  --> {at}\n  = see {}",
                l.message,
                l.rule,
                l.url()
            );
        }
    }

    /// A free-form warning on stderr.
    pub fn warn(&self, message: &str) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr(), "warning: {message}");
        }
    }

    /// An error: the report on stderr; in JSON mode also the error object on stdout.
    pub fn error(&self, e: &CliError) {
        let _ = writeln!(std::io::stderr(), "{:?}", e.report);
        if self.json() {
            let body = serde_json::json!({ "error": ErrorBody {
                code: e.code,
                message: &e.message,
                hint: e.hint.as_deref(),
            }});
            let _ = writeln!(std::io::stdout(), "{body}");
        }
    }
}
