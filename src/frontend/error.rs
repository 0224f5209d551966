//! The front end's error: a message located in the Dockerfile (or SDK JSON) it came from.

use super::dockerfile::{ParseError, Span};

/// A front-end failure (typing, lowering, SDK input), pointing at its source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
#[error("{message}")]
#[diagnostic(code(kiln::dockerfile))]
pub struct FrontendError {
    /// What went wrong.
    pub message: String,
    /// Where (in the Dockerfile); `None` for errors with no place (a bad `--target`).
    #[label("{label}")]
    pub span: Option<Span>,
    /// The label under the span.
    pub label: String,
    /// How to fix it.
    #[help]
    pub help: Option<String>,
}

impl FrontendError {
    /// An error at a span.
    pub fn at(message: String, span: Span) -> Self {
        FrontendError {
            message,
            span: Some(span),
            label: "here".into(),
            help: None,
        }
    }

    /// An error with no location.
    pub fn plain(message: String) -> Self {
        FrontendError {
            message,
            span: None,
            label: String::new(),
            help: None,
        }
    }

    /// Adds a hint.
    pub fn with_help(mut self, help: String) -> Self {
        self.help = Some(help);
        self
    }

    /// Replaces the label.
    pub fn with_label(mut self, label: &str) -> Self {
        self.label = label.to_string();
        self
    }
}

impl From<ParseError> for FrontendError {
    fn from(e: ParseError) -> Self {
        FrontendError {
            message: e.kind.to_string(),
            span: Some(e.span),
            label: e.label,
            help: e.help,
        }
    }
}
