//! Dockerfile syntax: bytes → [`Dockerfile`] tree with spans, and shell-word expansion.
//!
//! Knows no ARG values and runs nothing; [`crate::frontend::lower`] turns the tree into IR.

pub mod ast;
mod json;
pub mod parser;
pub mod shell;

pub use ast::{Arg, Args, Directive, Dockerfile, Heredoc, Instruction, Span, Warning, dump};
pub use parser::{ParseError, ParseErrorKind, parse};

/// Decodes Dockerfile bytes. Invalid UTF-8 is replaced with U+FFFD (BuildKit keeps such bytes
/// as they are; no real Dockerfile depends on that) and reported as the second value.
pub fn decode(bytes: &[u8]) -> (std::borrow::Cow<'_, str>, bool) {
    let s = String::from_utf8_lossy(bytes);
    let lossy = matches!(s, std::borrow::Cow::Owned(_));
    (s, lossy)
}
