//! The Dockerfile syntax tree: what the parser produces, before any typing or expansion.
//!
//! Words stay raw here (quotes, escapes and `$VAR` as written) because ARG values are known
//! only during lowering. Every node carries a byte [`Span`] into the parsed source; line and
//! column are computed from it only to render an error.

use serde::Serialize;

/// A byte range `[start, end)` in the parsed source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Span {
    /// First byte.
    pub start: u32,
    /// One past the last byte.
    pub end: u32,
}

impl Span {
    /// A span from byte offsets.
    pub fn new(start: usize, end: usize) -> Self {
        Span {
            start: to_u32(start),
            end: to_u32(end.max(start)),
        }
    }

    /// The smallest span that covers both.
    pub fn to(self, other: Span) -> Span {
        Span {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// True for an empty span.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

impl From<Span> for miette::SourceSpan {
    fn from(s: Span) -> Self {
        (s.start as usize, s.len()).into()
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// 1-based line and column (in characters) of a byte offset in `src`, for rendering.
pub fn line_col(src: &str, offset: u32) -> (u32, u32) {
    let offset = (offset as usize).min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (to_u32(line), to_u32(col))
}

/// A parser directive from the head of the file (`# escape=`, `# syntax=`, `# check=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Directive {
    /// Lower-cased name.
    pub name: String,
    /// Value, surrounding whitespace trimmed.
    pub value: String,
    /// The directive's line.
    pub span: Span,
}

/// A non-fatal finding of the parser.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// What was found, as BuildKit words it.
    pub message: String,
    /// A stable rule name (`NoEmptyContinuation`, …).
    pub rule: &'static str,
    /// Where.
    pub span: Span,
    /// 1-based line BuildKit reports it at.
    pub line: u32,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dockerfile {
    /// Parser directives, in order.
    pub directives: Vec<Directive>,
    /// The escape token (`\` or `` ` ``).
    pub escape: char,
    /// Top-level instructions, in order.
    pub instructions: Vec<Instruction>,
    /// Parser warnings (empty continuation lines, …).
    pub warnings: Vec<Warning>,
    /// First line of the first instruction (1-based).
    pub start_line: u32,
    /// Last line of the last instruction.
    pub end_line: u32,
}

impl Dockerfile {
    /// The value of a directive, if present.
    pub fn directive(&self, name: &str) -> Option<&str> {
        self.directives
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.value.as_str())
    }
}

/// One instruction with its raw flags and arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instruction {
    /// The keyword as written (`RUN`, `run`, `Run`).
    pub keyword: String,
    /// Where the keyword stands.
    pub keyword_span: Span,
    /// Leading `--flag[=value]` words, quotes removed, in order.
    pub flags: Vec<Arg>,
    /// The arguments, shaped by the keyword.
    pub args: Args,
    /// Heredocs opened on this line, in order.
    pub heredocs: Vec<Heredoc>,
    /// The logical line after continuations were joined.
    pub original: String,
    /// From the first byte of the first physical line to the end of the last one consumed.
    pub span: Span,
    /// 1-based first physical line.
    pub start_line: u32,
    /// 1-based last physical line consumed (continuations, heredoc bodies).
    pub end_line: u32,
    /// Comment lines directly above the instruction.
    pub comments: Vec<String>,
}

impl Instruction {
    /// The keyword, lower-cased.
    pub fn name(&self) -> String {
        lowercase(&self.keyword)
    }
}

/// A raw word and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Arg {
    /// The text.
    pub value: String,
    /// Where it stands in the source (for JSON elements: the whole array).
    pub span: Span,
}

/// Arguments, in the shape the keyword gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "form", rename_all = "snake_case")]
pub enum Args {
    /// No arguments at all.
    Empty,
    /// A JSON array of strings (exec form); the span covers the array.
    Json {
        /// The decoded elements.
        items: Vec<Arg>,
        /// The array text.
        span: Span,
    },
    /// The rest of the line verbatim: shell-form RUN/CMD/ENTRYPOINT/SHELL, MAINTAINER,
    /// STOPSIGNAL, USER, WORKDIR.
    Text(Arg),
    /// Whitespace-separated words, quotes not processed: FROM, EXPOSE, non-JSON COPY/ADD/VOLUME.
    List(Vec<Arg>),
    /// ENV and LABEL pairs.
    Pairs {
        /// True for the legacy `KEY value` form.
        legacy: bool,
        /// Key and raw value (quotes kept).
        pairs: Vec<(Arg, Arg)>,
    },
    /// ARG words (`name` or `name=value`, quotes kept).
    Words(Vec<Arg>),
    /// HEALTHCHECK: the kind word (`CMD`, `NONE`, …) and the command in RUN's shape.
    Healthcheck {
        /// `CMD`, `NONE`, … as written.
        kind: Arg,
        /// The command after it.
        command: Box<Args>,
    },
    /// ONBUILD's trigger instruction.
    Onbuild(Box<Instruction>),
    /// An instruction the parser does not know; its arguments are dropped (BuildKit rejects
    /// it at the next stage).
    Unknown,
}

/// A here-document (`<<EOF` … `EOF`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heredoc {
    /// The terminator, quotes removed.
    pub name: String,
    /// The file descriptor before `<<` (0 if none).
    pub fd: u32,
    /// False when any part of the name was quoted.
    pub expand: bool,
    /// `<<-`: leading tabs are stripped (by the builder).
    pub chomp: bool,
    /// The body lines verbatim, with their line endings.
    pub content: String,
    /// The body, from its first line through the terminator.
    pub span: Span,
}

/// Lower-cases like Go's `strings.ToLower` (per character, no context rules).
pub fn lowercase(s: &str) -> String {
    s.chars().flat_map(char::to_lowercase).collect()
}

/// BuildKit's `Node.Dump()` of a whole file, followed by one `"\n"`: the conformance view
/// of the tree (see `shared/conformance/buildkit/README.md`).
pub fn dump(file: &Dockerfile) -> String {
    let mut out = String::new();
    for ins in &file.instructions {
        out.push('(');
        out.push_str(&dump_instruction(ins));
        out.push_str(")\n");
    }
    let trimmed = out.trim_matches(is_go_space);
    let mut s = trimmed.to_string();
    s.push('\n');
    s
}

/// `Node.Dump()` of one instruction, without the surrounding parentheses.
pub fn dump_instruction(ins: &Instruction) -> String {
    let mut s = lowercase(&ins.keyword);
    if !ins.flags.is_empty() {
        s.push_str(" [");
        for (i, f) in ins.flags.iter().enumerate() {
            if i > 0 {
                s.push(' ');
            }
            go_quote_into(&f.value, &mut s);
        }
        s.push(']');
    }
    dump_args(&ins.args, &mut s);
    s.trim_matches(is_go_space).to_string()
}

fn dump_args(args: &Args, s: &mut String) {
    let word = |w: &str, s: &mut String| {
        s.push(' ');
        go_quote_into(w, s);
    };
    match args {
        Args::Empty => {}
        Args::Json { items, .. } | Args::List(items) | Args::Words(items) => {
            for a in items {
                word(&a.value, s);
            }
        }
        Args::Text(a) => word(&a.value, s),
        Args::Pairs { legacy, pairs } => {
            for (k, v) in pairs {
                word(&k.value, s);
                word(&v.value, s);
                word(if *legacy { "" } else { "=" }, s);
            }
        }
        Args::Healthcheck { kind, command } => {
            word(&kind.value, s);
            dump_args(command, s);
        }
        Args::Onbuild(inner) => {
            s.push_str(" (");
            s.push_str(&dump_instruction(inner));
            s.push(')');
        }
        Args::Unknown => word("", s),
    }
}

/// Go's `unicode.IsSpace`.
pub fn is_go_space(c: char) -> bool {
    c.is_whitespace()
}

/// Go's `strconv.Quote`, appended to `out`.
pub fn go_quote_into(v: &str, out: &mut String) {
    use std::fmt::Write;
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if is_go_print(c) => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
}

/// Go's `strconv.Quote` as a new string.
pub fn go_quote(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    go_quote_into(v, &mut s);
    s
}

/// Go's `unicode.IsPrint`: letters, marks, numbers, punctuation, symbols and U+0020.
fn is_go_print(c: char) -> bool {
    use unicode_properties::{GeneralCategoryGroup as G, UnicodeGeneralCategory};
    if c == ' ' {
        return true;
    }
    matches!(
        c.general_category_group(),
        G::Letter | G::Mark | G::Number | G::Punctuation | G::Symbol
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_follows_go_strconv_quote() {
        assert_eq!(go_quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(go_quote("\u{0}\u{7f}\u{1b}"), r#""\x00\x7f\x1b""#);
        assert_eq!(
            go_quote("\u{a0}\u{200b}\u{feff}"),
            r#""\u00a0\u200b\ufeff""#
        );
        assert_eq!(go_quote("♥é한국어😀"), "\"♥é한국어😀\"");
        assert_eq!(go_quote("\u{e000}\u{10ffff}"), r#""\ue000\U0010ffff""#);
        assert_eq!(go_quote("\u{85}"), r#""\u0085""#);
    }

    #[test]
    fn line_col_counts_characters() {
        let src = "FROM a\nRUN é x\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 7), (2, 1));
        assert_eq!(line_col(src, 14), (2, 7));
    }

    #[test]
    fn lowercase_has_no_final_sigma_rule() {
        assert_eq!(lowercase("ΑΣ"), "ασ");
    }
}
