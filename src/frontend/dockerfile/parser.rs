//! Bytes of a Dockerfile → [`Dockerfile`] syntax tree, exactly as BuildKit's parser splits
//! it: directives, comments, continuations, flags, JSON versus shell form, heredocs.
//!
//! Knows no ARG values and no instruction semantics beyond the argument shape each keyword
//! takes; `lower` does the rest. Runs in time linear in the input.

use super::ast::{
    Arg, Args, Directive, Dockerfile, Heredoc, Instruction, Span, Warning, is_go_space, lowercase,
};
use super::json::{self, JsonError};
use super::shell::Lexer;

/// The longest physical line BuildKit's scanner accepts, newline excluded.
pub const MAX_LINE: usize = 65_535;

/// What went wrong while parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// No instruction at all.
    #[error("file with no instructions")]
    NoInstructions,
    /// A physical line over [`MAX_LINE`] bytes.
    #[error("dockerfile line greater than max allowed size of {MAX_LINE}")]
    LineTooLong,
    /// The same directive twice.
    #[error("only one {0} parser directive can be used")]
    DuplicateDirective(String),
    /// `# escape=` with something other than `\` or `` ` ``.
    #[error("invalid escape token '{0}' does not match ` or \\")]
    InvalidEscape(String),
    /// `ENV x` / `LABEL x`.
    #[error("{0} must have two arguments")]
    MissingValue(String),
    /// `ENV a=b c`.
    #[error("Syntax error - can't find = in {0}. Must be of the form: name=value")]
    MissingEquals(String),
    /// `CMD ["a", 1]`.
    #[error("when using JSON array syntax, arrays must be comprised of strings only")]
    JsonNotStrings,
    /// A heredoc whose terminator never comes.
    #[error("unterminated heredoc")]
    UnterminatedHeredoc,
}

/// A parse failure, located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
#[error("{kind}")]
#[diagnostic(code(kiln::dockerfile::parse))]
pub struct ParseError {
    /// What.
    pub kind: ParseErrorKind,
    /// Where.
    #[label("{label}")]
    pub span: Span,
    /// What the label says.
    pub label: String,
    /// 1-based lines the error covers (BuildKit's location).
    pub start_line: u32,
    /// Last line covered.
    pub end_line: u32,
    /// How to fix it.
    #[help]
    pub help: Option<String>,
}

/// Parses a Dockerfile. `src` must be the whole file; a leading BOM is allowed.
pub fn parse(src: &str) -> Result<Dockerfile, ParseError> {
    Parser::new(src).run()
}

struct PhysLine<'a> {
    /// Byte offset of the line's first byte in the source.
    start: usize,
    /// The line without its trailing `\r`/`\n` run.
    text: &'a str,
    /// The line with its line ending.
    raw: &'a str,
}

/// The physical lines of the source, as BuildKit's scanner yields them.
struct Lines<'a> {
    src: &'a str,
    pos: usize,
    /// 1-based number of the last line handed out.
    no: u32,
}

impl<'a> Lines<'a> {
    fn next(&mut self) -> Option<Result<PhysLine<'a>, ParseError>> {
        if self.pos >= self.src.len() {
            return None;
        }
        let start = self.pos;
        let rest = &self.src[start..];
        let len = rest.find('\n').map_or(rest.len(), |i| i + 1);
        let mut raw = &rest[..len];
        self.pos += len;
        self.no += 1;
        let mut content_start = start;
        if self.no == 1
            && let Some(stripped) = raw.strip_prefix('\u{feff}')
        {
            raw = stripped;
            content_start += '\u{feff}'.len_utf8();
        }
        let without_nl = raw.strip_suffix('\n').unwrap_or(raw);
        if without_nl.len() > MAX_LINE {
            let span = Span::new(content_start, content_start + without_nl.len());
            return Some(Err(error(
                ParseErrorKind::LineTooLong,
                span,
                "this line",
                self.no,
                self.no,
            )));
        }
        let text = raw.trim_end_matches(['\r', '\n']);
        Some(Ok(PhysLine {
            start: content_start,
            text,
            raw,
        }))
    }
}

fn error(kind: ParseErrorKind, span: Span, label: &str, start: u32, end: u32) -> ParseError {
    ParseError {
        kind,
        span,
        label: label.to_string(),
        start_line: start,
        end_line: end,
        help: None,
    }
}

/// The directive section at the head of the file.
struct Directives {
    done: bool,
    parsed: Vec<Directive>,
    escape: char,
}

impl Directives {
    /// Feeds one line (newline trimmed); returns an error for a bad or repeated directive.
    fn feed(&mut self, line: &str, span: Span) -> Result<(), ParseErrorKind> {
        if self.done {
            return Ok(());
        }
        let Some((name, value)) = match_directive(line) else {
            self.done = true;
            return Ok(());
        };
        let name = name.to_ascii_lowercase();
        if !matches!(name.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(());
        }
        if self.parsed.iter().any(|d| d.name == name) {
            return Err(ParseErrorKind::DuplicateDirective(name));
        }
        if name == "escape" {
            self.escape = match value {
                "\\" => '\\',
                "`" => '`',
                other => return Err(ParseErrorKind::InvalidEscape(other.to_string())),
            };
        }
        self.parsed.push(Directive {
            name,
            value: value.to_string(),
            span,
        });
        Ok(())
    }
}

/// `^#[ \t]*([a-zA-Z][a-zA-Z0-9]*)[ \t]*=[ \t]*(.+?)[ \t]*$`
fn match_directive(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('#')?;
    let rest = rest.trim_start_matches([' ', '\t']);
    let name_len = rest
        .bytes()
        .enumerate()
        .take_while(|&(i, b)| {
            if i == 0 {
                b.is_ascii_alphabetic()
            } else {
                b.is_ascii_alphanumeric()
            }
        })
        .count();
    if name_len == 0 {
        return None;
    }
    let (name, rest) = rest.split_at(name_len);
    let rest = rest.trim_start_matches([' ', '\t']).strip_prefix('=')?;
    let value = rest.trim_matches([' ', '\t']);
    if value.is_empty() {
        return None;
    }
    Some((name, value))
}

/// Go's `isComment`: the first non-space character is `#`.
fn is_comment(text: &str) -> bool {
    text.trim_start_matches(is_go_space).starts_with('#')
}

/// Removes a trailing line continuation (`E[ \t]*$` not preceded by E). Returns the line and
/// whether the instruction ends here.
fn trim_continuation(text: &str, escape: char) -> (&str, bool) {
    let body = text.trim_end_matches([' ', '\t']);
    let Some(before) = body.strip_suffix(escape) else {
        return (text, true);
    };
    if before.ends_with(escape) {
        return (text, true);
    }
    (before, false)
}

/// The joined logical line, with a map back to source offsets.
struct Logical {
    text: String,
    /// (offset in `text`, offset in source) of each appended piece.
    pieces: Vec<(usize, usize)>,
}

impl Logical {
    fn push(&mut self, piece: &str, src_offset: usize) {
        if piece.is_empty() {
            return;
        }
        self.pieces.push((self.text.len(), src_offset));
        self.text.push_str(piece);
    }

    fn map(&self, off: usize, is_end: bool) -> usize {
        let idx = self
            .pieces
            .partition_point(|&(l, _)| if is_end { l < off } else { l <= off });
        match idx.checked_sub(1).and_then(|i| self.pieces.get(i)) {
            Some(&(l, s)) => s + (off - l),
            None => self.pieces.first().map_or(0, |&(_, s)| s),
        }
    }

    /// The source span of `text[start..end]`.
    fn span(&self, start: usize, end: usize) -> Span {
        let s = self.map(start, false);
        let e = if end > start { self.map(end, true) } else { s };
        Span::new(s, e)
    }
}

struct Parser<'a> {
    lines: Lines<'a>,
    directives: Directives,
    warnings: Vec<Warning>,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Parser {
            lines: Lines { src, pos: 0, no: 0 },
            directives: Directives {
                done: false,
                parsed: Vec::new(),
                escape: '\\',
            },
            warnings: Vec::new(),
        }
    }

    fn next_line(&mut self) -> Result<Option<PhysLine<'a>>, ParseError> {
        self.lines.next().transpose()
    }

    fn directive(&mut self, text: &str, start: usize) -> Result<(), ParseError> {
        let span = Span::new(start, start + text.len());
        let no = self.lines.no;
        self.directives
            .feed(text, span)
            .map_err(|k| error(k, span, "this directive", no, no))
    }

    fn run(mut self) -> Result<Dockerfile, ParseError> {
        let mut instructions: Vec<Instruction> = Vec::new();
        let mut comments: Vec<String> = Vec::new();
        while let Some(first) = self.next_line()? {
            let trimmed = first.text.trim_start_matches(is_go_space);
            let first_start = first.start + (first.text.len() - trimmed.len());
            if is_comment(first.text) {
                let c = trimmed[1..].trim_matches(is_go_space);
                if c.is_empty() {
                    comments.clear();
                } else {
                    comments.push(c.to_string());
                }
            }
            self.directive(trimmed, first_start)?;
            let start_line = self.lines.no;
            let text = if is_comment(first.text) { "" } else { trimmed };
            let (piece, mut ended) = trim_continuation(text, self.directives.escape);
            if ended && piece.is_empty() {
                continue;
            }
            let mut logical = Logical {
                text: String::new(),
                pieces: Vec::new(),
            };
            logical.push(piece, first_start);
            let mut end_offset = first.start + first.text.len();
            let mut empty_continuation = false;
            while !ended {
                let Some(line) = self.next_line()? else { break };
                self.directive(line.text, line.start)?;
                end_offset = line.start + line.text.len();
                if is_comment(line.text) {
                    continue;
                }
                if line.text.trim_start_matches(is_go_space).is_empty() {
                    empty_continuation = true;
                    continue;
                }
                let (piece, e) = trim_continuation(line.text, self.directives.escape);
                ended = e;
                logical.push(piece, line.start);
            }
            let end_line = self.lines.no;
            let instr_span = Span::new(first_start, end_offset);
            if empty_continuation {
                self.warnings.push(Warning {
                    message: format!("Empty continuation line found in: {}", logical.text),
                    rule: "NoEmptyContinuation",
                    span: instr_span,
                    line: end_line,
                });
            }
            let ctx = Ctx {
                logical: &logical,
                escape: self.directives.escape,
                lines: (start_line, end_line),
                span: instr_span,
            };
            let mut ins = ctx.instruction(0, logical.text.len())?;
            ins.start_line = start_line;
            ins.span = instr_span;
            ins.comments = std::mem::take(&mut comments);
            if can_contain_heredoc(&ins) && logical.text.contains("<<") {
                for mut doc in heredocs_from_line(&logical.text) {
                    let body_start = self.lines.pos;
                    let mut terminated = false;
                    while let Some(line) = self.next_line()? {
                        end_offset = line.start + line.text.len();
                        let candidate = if doc.chomp {
                            line.text.trim_start_matches('\t')
                        } else {
                            line.text
                        };
                        if candidate == doc.name {
                            terminated = true;
                            break;
                        }
                        doc.content.push_str(line.raw);
                    }
                    doc.span = Span::new(body_start, end_offset);
                    if !terminated {
                        let mut e = error(
                            ParseErrorKind::UnterminatedHeredoc,
                            Span::new(first_start, end_offset),
                            "this heredoc",
                            start_line,
                            self.lines.no,
                        );
                        e.help = Some(format!(
                            "end the heredoc with a line that is exactly `{}`",
                            doc.name
                        ));
                        return Err(e);
                    }
                    ins.heredocs.push(doc);
                }
                ins.span = Span::new(first_start, end_offset);
            }
            ins.end_line = self.lines.no;
            instructions.push(ins);
        }
        let (Some(first), Some(last)) = (instructions.first(), instructions.last()) else {
            let end = self.lines.src.len();
            let no = self.lines.no;
            let mut e = error(
                ParseErrorKind::NoInstructions,
                Span::new(end, end),
                "the file ends here",
                no,
                no,
            );
            e.help = Some("a Dockerfile needs at least a FROM instruction".into());
            return Err(e);
        };
        let (start_line, end_line) = (first.start_line, last.end_line);
        Ok(Dockerfile {
            directives: self.directives.parsed,
            escape: self.directives.escape,
            instructions,
            warnings: self.warnings,
            start_line,
            end_line,
        })
    }
}

/// Parsing of one logical line; offsets are into `logical.text`.
struct Ctx<'l> {
    logical: &'l Logical,
    escape: char,
    lines: (u32, u32),
    span: Span,
}

/// `[\t\v\f\r ]`, the separator of BuildKit's `reWhitespace`.
fn is_sep(c: char) -> bool {
    matches!(c, '\t' | '\u{b}' | '\u{c}' | '\r' | ' ')
}

impl Ctx<'_> {
    fn text(&self, start: usize, end: usize) -> &str {
        &self.logical.text[start..end]
    }

    fn arg(&self, start: usize, end: usize) -> Arg {
        Arg {
            value: self.text(start, end).to_string(),
            span: self.logical.span(start, end),
        }
    }

    fn fail(&self, kind: ParseErrorKind, span: Span, label: &str) -> ParseError {
        error(kind, span, label, self.lines.0, self.lines.1)
    }

    /// `newNodeFromLine` over `text[start..end]`.
    fn instruction(&self, start: usize, end: usize) -> Result<Instruction, ParseError> {
        let (start, end) = trim_range(&self.logical.text, start, end, is_go_space);
        let line = self.text(start, end);
        let kw_len = line.find(is_sep).unwrap_or(line.len());
        let keyword = &line[..kw_len];
        let keyword_span = self.logical.span(start, start + kw_len);
        let mut flags = Vec::new();
        let mut args_start = end;
        if kw_len < line.len() {
            let after = start + kw_len + line[kw_len..].len()
                - line[kw_len..].trim_start_matches(is_sep).len();
            let (rest, f) = self.extract_flags(after, end);
            flags = f;
            args_start = rest;
        }
        let (a, b) = trim_range(&self.logical.text, args_start, end, is_go_space);
        let args = match lowercase(keyword).as_str() {
            "add" | "copy" | "volume" => self.maybe_json_list(a, b)?,
            "run" | "cmd" | "entrypoint" | "shell" => self.maybe_json(a, b)?,
            "arg" => self.name_or_name_val(a, b),
            "env" => self.name_val(a, b, "ENV")?,
            "label" => self.name_val(a, b, "LABEL")?,
            "expose" | "from" => self.whitespace_list(a, b),
            "healthcheck" => self.healthcheck(a, b)?,
            "maintainer" | "stopsignal" | "user" | "workdir" => self.string(a, b),
            "onbuild" => {
                if a == b {
                    Args::Empty
                } else {
                    Args::Onbuild(Box::new(self.instruction(a, b)?))
                }
            }
            _ => Args::Unknown,
        };
        Ok(Instruction {
            keyword: keyword.to_string(),
            keyword_span,
            flags,
            args,
            heredocs: Vec::new(),
            original: line.to_string(),
            span: self.logical.span(start, end),
            start_line: self.lines.0,
            end_line: self.lines.1,
            comments: Vec::new(),
        })
    }

    /// BuildKit's `extractBuilderFlags`: leading `--` words, quotes removed, `\` escaping.
    /// Returns where the arguments start and the flags.
    fn extract_flags(&self, start: usize, end: usize) -> (usize, Vec<Arg>) {
        #[derive(PartialEq)]
        enum Phase {
            Spaces,
            Word,
            Quote(char),
        }
        let text = self.text(start, end);
        let mut flags = Vec::new();
        let mut phase = Phase::Spaces;
        let mut word = String::new();
        let mut word_start = 0;
        let mut blank_ok = false;
        let mut it = text.char_indices().peekable();
        while let Some((pos, c)) = it.next() {
            match phase {
                Phase::Spaces => {
                    if is_go_space(c) {
                        continue;
                    }
                    if !text[pos..].starts_with("--") {
                        return (start + pos, flags);
                    }
                    phase = Phase::Word;
                    word_start = pos;
                    word.push(c);
                }
                Phase::Word => {
                    if is_go_space(c) {
                        phase = Phase::Spaces;
                        if word == "--" {
                            return (start + pos, flags);
                        }
                        if blank_ok || !word.is_empty() {
                            flags.push(Arg {
                                value: std::mem::take(&mut word),
                                span: self.logical.span(start + word_start, start + pos),
                            });
                        }
                        word.clear();
                        blank_ok = false;
                    } else if c == '\'' || c == '"' {
                        phase = Phase::Quote(c);
                        blank_ok = true;
                    } else if c == '\\' {
                        if let Some((_, n)) = it.next() {
                            word.push(n);
                        }
                    } else {
                        word.push(c);
                    }
                }
                Phase::Quote(q) => {
                    if c == q {
                        phase = Phase::Word;
                    } else if c == '\\' {
                        match it.next() {
                            Some((_, n)) => word.push(n),
                            None => phase = Phase::Word,
                        }
                    } else {
                        word.push(c);
                    }
                }
            }
        }
        if phase != Phase::Spaces && word != "--" && (blank_ok || !word.is_empty()) {
            flags.push(Arg {
                value: word,
                span: self.logical.span(start + word_start, end),
            });
        }
        (end, flags)
    }

    fn string(&self, a: usize, b: usize) -> Args {
        if a == b {
            Args::Empty
        } else {
            Args::Text(self.arg(a, b))
        }
    }

    fn whitespace_list(&self, a: usize, b: usize) -> Args {
        if a == b {
            return Args::Empty;
        }
        Args::List(self.split_sep(a, b))
    }

    fn split_sep(&self, a: usize, b: usize) -> Vec<Arg> {
        let text = self.text(a, b);
        let mut out = Vec::new();
        let mut word_start: Option<usize> = None;
        for (i, c) in text.char_indices() {
            if is_sep(c) {
                if let Some(s) = word_start.take() {
                    out.push(self.arg(a + s, a + i));
                }
            } else if word_start.is_none() {
                word_start = Some(i);
            }
        }
        if let Some(s) = word_start {
            out.push(self.arg(a + s, b));
        }
        out
    }

    fn json(&self, a: usize, b: usize) -> Result<Option<Args>, ParseError> {
        let text = self.text(a, b);
        if !text.starts_with('[') {
            return Ok(None);
        }
        let span = self.logical.span(a, b);
        match json::parse_string_array(text) {
            Ok(items) => Ok(Some(Args::Json {
                items: items.into_iter().map(|value| Arg { value, span }).collect(),
                span,
            })),
            Err(JsonError::Invalid) => Ok(None),
            Err(JsonError::NotStrings) => {
                let mut e = self.fail(ParseErrorKind::JsonNotStrings, span, "this array");
                e.help = Some("quote every element, e.g. [\"sh\", \"-c\", \"echo 1\"]".into());
                Err(e)
            }
        }
    }

    fn maybe_json(&self, a: usize, b: usize) -> Result<Args, ParseError> {
        if a == b {
            return Ok(Args::Empty);
        }
        Ok(self
            .json(a, b)?
            .unwrap_or_else(|| Args::Text(self.arg(a, b))))
    }

    fn maybe_json_list(&self, a: usize, b: usize) -> Result<Args, ParseError> {
        if a == b {
            return Ok(Args::Empty);
        }
        Ok(self
            .json(a, b)?
            .unwrap_or_else(|| self.whitespace_list(a, b)))
    }

    fn healthcheck(&self, a: usize, b: usize) -> Result<Args, ParseError> {
        let text = self.text(a, b);
        let sep = text.find(is_go_space).unwrap_or(text.len());
        if sep == 0 {
            return Ok(Args::Empty);
        }
        let next = text.len() - text[sep..].trim_start_matches(is_go_space).len();
        Ok(Args::Healthcheck {
            kind: self.arg(a, a + sep),
            command: Box::new(self.maybe_json(a + next, b)?),
        })
    }

    fn name_or_name_val(&self, a: usize, b: usize) -> Args {
        let words = self.words(a, b);
        if words.is_empty() {
            Args::Empty
        } else {
            Args::Words(words)
        }
    }

    fn name_val(&self, a: usize, b: usize, key: &str) -> Result<Args, ParseError> {
        let words = self.words_at(a, b);
        let Some((first, _)) = words.first() else {
            return Ok(Args::Empty);
        };
        if !first.value.contains('=') {
            let text = self.text(a, b);
            let Some(k_end) = text.find(is_sep) else {
                let mut e = self.fail(
                    ParseErrorKind::MissingValue(key.to_string()),
                    self.span,
                    "needs a value",
                );
                e.help = Some(format!("write `{key} {}=value`", text));
                return Err(e);
            };
            let v_start = text.len() - text[k_end..].trim_start_matches(is_sep).len();
            return Ok(Args::Pairs {
                legacy: true,
                pairs: vec![(self.arg(a, a + k_end), self.arg(a + v_start, b))],
            });
        }
        let mut pairs = Vec::with_capacity(words.len());
        for (w, start) in words {
            let Some(eq) = w.value.find('=') else {
                let mut e = self.fail(
                    ParseErrorKind::MissingEquals(super::ast::go_quote(&w.value)),
                    w.span,
                    "no `=` in this word",
                );
                e.help = Some(format!("every word of {key} must be NAME=VALUE"));
                return Err(e);
            };
            // The word is the logical line's text from `start` on (quotes and escapes kept),
            // so its parts map through the logical line, across continuations.
            let end = start + w.value.len();
            let key_span = self.logical.span(start, start + eq);
            let val_span = self.logical.span(start + eq + 1, end);
            pairs.push((
                Arg {
                    value: w.value[..eq].to_string(),
                    span: key_span,
                },
                Arg {
                    value: w.value[eq + 1..].to_string(),
                    span: val_span,
                },
            ));
        }
        Ok(Args::Pairs {
            legacy: false,
            pairs,
        })
    }

    /// BuildKit's `parseWords`: whitespace outside quotes separates; quotes and escapes stay.
    fn words(&self, a: usize, b: usize) -> Vec<Arg> {
        self.words_at(a, b).into_iter().map(|(w, _)| w).collect()
    }

    /// [`Ctx::words`] with each word's start in the logical line, so spans of its parts can
    /// be mapped even across a continuation.
    fn words_at(&self, a: usize, b: usize) -> Vec<(Arg, usize)> {
        let text = self.text(a, b);
        let esc = self.escape;
        let mut out = Vec::new();
        let mut word = String::new();
        let mut word_start = 0;
        let mut in_word = false;
        let mut quote: Option<char> = None;
        let mut blank_ok = false;
        let mut it = text.char_indices().peekable();
        while let Some((pos, c)) = it.next() {
            if !in_word {
                if is_go_space(c) {
                    continue;
                }
                in_word = true;
                word_start = pos;
            }
            match quote {
                None => {
                    if is_go_space(c) {
                        if blank_ok || !word.is_empty() {
                            out.push((
                                Arg {
                                    value: std::mem::take(&mut word),
                                    span: self.logical.span(a + word_start, a + pos),
                                },
                                a + word_start,
                            ));
                        }
                        in_word = false;
                        blank_ok = false;
                        continue;
                    }
                    if c == '\'' || c == '"' {
                        quote = Some(c);
                        blank_ok = true;
                    }
                    if c == esc {
                        match it.next() {
                            // An escape token at the very end is dropped.
                            None => continue,
                            Some((_, n)) => {
                                word.push(c);
                                word.push(n);
                            }
                        }
                        continue;
                    }
                    word.push(c);
                }
                Some(q) => {
                    if c == q {
                        quote = None;
                    }
                    if c == esc && q != '\'' {
                        match it.next() {
                            None => {
                                quote = None;
                                continue;
                            }
                            Some((_, n)) => {
                                word.push(c);
                                word.push(n);
                            }
                        }
                        continue;
                    }
                    word.push(c);
                }
            }
        }
        if in_word && (blank_ok || !word.is_empty()) {
            out.push((
                Arg {
                    value: word,
                    span: self.logical.span(a + word_start, b),
                },
                a + word_start,
            ));
        }
        out
    }
}

fn trim_range(s: &str, start: usize, end: usize, f: fn(char) -> bool) -> (usize, usize) {
    let t = &s[start..end];
    let left = t.len() - t.trim_start_matches(f).len();
    let right = t.trim_end_matches(f).len();
    if right <= left {
        (start + left, start + left)
    } else {
        (start + left, start + right)
    }
}

/// Heredocs only open on RUN, COPY and ADD (also under ONBUILD), in shell form.
fn can_contain_heredoc(ins: &Instruction) -> bool {
    let ins = match &ins.args {
        Args::Onbuild(inner) => inner.as_ref(),
        _ => ins,
    };
    matches!(ins.name().as_str(), "run" | "copy" | "add") && !matches!(ins.args, Args::Json { .. })
}

/// The heredocs a logical line opens, in order. A line with an unbalanced quote opens none.
fn heredocs_from_line(line: &str) -> Vec<Heredoc> {
    let Some(words) = raw_shell_words(line) else {
        return Vec::new();
    };
    let mut docs = Vec::new();
    for w in words {
        match heredoc_from_word(&w) {
            Ok(Some(d)) => docs.push(d),
            Ok(None) => {}
            // BuildKit lexes the whole line first and finds no heredoc where that fails.
            Err(()) => return Vec::new(),
        }
    }
    docs
}

/// Splits a line into shell words keeping quotes and escapes, joining `<<` to the word after
/// it (`<<  EOF` is one word). `None` on an unbalanced quote.
fn raw_shell_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut it = line.chars();
    while let Some(c) = it.next() {
        match quote {
            None if c.is_whitespace() => {
                let joining = word.trim_end_matches([' ', '\t', '\r']).ends_with("<<");
                if joining && matches!(c, ' ' | '\t' | '\r') {
                    word.push(c);
                } else if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            None => {
                word.push(c);
                if c == '\\' {
                    if let Some(n) = it.next() {
                        word.push(n);
                    }
                } else if c == '\'' || c == '"' {
                    quote = Some(c);
                }
            }
            Some('"') if c == '\\' => {
                word.push(c);
                if let Some(n) = it.next() {
                    word.push(n);
                }
            }
            Some(q) => {
                word.push(c);
                if c == q {
                    quote = None;
                }
            }
        }
    }
    if quote.is_some() {
        return None;
    }
    if !word.is_empty() {
        words.push(word);
    }
    Some(words)
}

/// The heredoc a single word opens (`<<EOF`, `<<-'EOF'`, `3<<EOF`), as BuildKit's
/// `ParseHeredoc` decides it; `None` for any other word.
pub fn parse_heredoc_word(word: &str) -> Option<Heredoc> {
    heredoc_from_word(word).ok().flatten()
}

/// `^(\d*)<<(-?)\s*([^<]*)$` with a rest that lexes to exactly one word.
fn heredoc_from_word(word: &str) -> Result<Option<Heredoc>, ()> {
    let digits = word.bytes().take_while(u8::is_ascii_digit).count();
    let Some(rest) = word[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let rest = rest.trim_start_matches(['\t', '\n', '\u{c}', '\r', ' ']);
    if rest.contains('<') {
        return Ok(None);
    }
    let empty: Vec<(String, String)> = Vec::new();
    let lexer = Lexer::new('\\').skip_unset(true);
    let words = lexer.process_words(rest, &empty).map_err(|_| ())?;
    let [name] = words.as_slice() else {
        return Ok(None);
    };
    let raw = lexer
        .clone()
        .raw_quotes(true)
        .process_words(rest, &empty)
        .map_err(|_| ())?;
    let quotes = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    let expand = raw.len() == 1 && quotes(name) == quotes(&raw[0]);
    Ok(Some(Heredoc {
        name: name.clone(),
        fd: word[..digits]
            .parse()
            .unwrap_or(if digits == 0 { 0 } else { u32::MAX }),
        expand,
        chomp,
        content: String::new(),
        span: Span::default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::dockerfile::ast::dump;

    fn d(src: &str) -> String {
        dump(&parse(src).expect("parses"))
    }

    #[test]
    fn keyword_case_is_folded_in_the_dump_but_kept_in_the_tree() {
        let f = parse("Run echo hi\n").expect("parses");
        assert_eq!(f.instructions[0].keyword, "Run");
        assert_eq!(d("Run echo hi\n"), "(run \"echo hi\")\n");
    }

    #[test]
    fn flags_drop_quotes_and_stop_at_double_dash() {
        assert_eq!(
            d("RUN --mount=type=cache,target=\"/a b\" ls\n"),
            "(run [\"--mount=type=cache,target=/a b\"] \"ls\")\n"
        );
        assert_eq!(d("COPY -- --x y\n"), "(copy \"--x\" \"y\")\n");
    }

    #[test]
    fn invalid_json_falls_back_to_shell_form() {
        assert_eq!(d("CMD ['a']\n"), "(cmd \"['a']\")\n");
        assert!(parse("CMD [1]\n").is_err());
    }

    #[test]
    fn env_forms() {
        assert_eq!(
            d("ENV a=1 b=\"2 3\"\n"),
            "(env \"a\" \"1\" \"=\" \"b\" \"\\\"2 3\\\"\" \"=\")\n"
        );
        assert_eq!(d("ENV a  b c\n"), "(env \"a\" \"b c\" \"\")\n");
        let e = parse("FROM x\nENV a=1 b\n").expect_err("fails");
        assert_eq!(
            e.kind,
            ParseErrorKind::MissingEquals("\"b\"".into()),
            "{e:?}"
        );
        assert_eq!((e.start_line, e.end_line), (2, 2));
    }

    #[test]
    fn continuation_keeps_the_character_before_the_escape() {
        assert_eq!(d("RUN a\\\n b\n"), "(run \"a b\")\n");
        assert_eq!(
            d("RUN a\\\\\nRUN b\n"),
            "(run \"a\\\\\\\\\")\n(run \"b\")\n"
        );
    }

    #[test]
    fn heredoc_bodies_are_consumed_and_recorded() {
        let f = parse("RUN <<EOF\necho hi\nEOF\nRUN x\n").expect("parses");
        assert_eq!(f.instructions.len(), 2);
        assert_eq!(f.instructions[0].heredocs[0].content, "echo hi\n");
        assert_eq!(f.instructions[0].end_line, 3);
        assert!(parse("RUN <<EOF\necho\n").is_err());
    }

    #[test]
    fn spans_point_into_the_source_across_continuations() {
        let src = "FROM x\nRUN --network=none \\\n  echo hi\n";
        let f = parse(src).expect("parses");
        let run = &f.instructions[1];
        let Args::Text(a) = &run.args else {
            panic!("shell form expected")
        };
        assert_eq!(&src[a.span.start as usize..a.span.end as usize], "echo hi");
        let flag = &run.flags[0];
        assert_eq!(
            &src[flag.span.start as usize..flag.span.end as usize],
            "--network=none"
        );
        assert_eq!(
            &src[run.keyword_span.start as usize..run.keyword_span.end as usize],
            "RUN"
        );
    }

    #[test]
    fn env_key_and_value_spans_survive_a_continuation_inside_the_key() {
        let src = "FROM scratch\nENV a\\\nb=v\n";
        let f = parse(src).expect("parses");
        let Args::Pairs { pairs, .. } = &f.instructions[1].args else {
            panic!("pairs expected")
        };
        let (k, v) = &pairs[0];
        assert_eq!(k.value, "ab");
        assert_eq!(&src[k.span.start as usize..k.span.end as usize], "a\\\nb");
        assert_eq!(&src[v.span.start as usize..v.span.end as usize], "v");
        let src = "# escape=`\nENV é`\né=x\n";
        let f = parse(src).expect("parses");
        let Args::Pairs { pairs, .. } = &f.instructions[0].args else {
            panic!("pairs expected")
        };
        let (k, v) = &pairs[0];
        assert!(
            src.is_char_boundary(k.span.start as usize)
                && src.is_char_boundary(k.span.end as usize)
        );
        assert_eq!(&src[v.span.start as usize..v.span.end as usize], "x");
    }

    #[test]
    fn long_lines_are_rejected_not_slow() {
        let src = format!("RUN {}\n", "a".repeat(1 << 20));
        let e = parse(&src).expect_err("too long");
        assert_eq!(e.kind, ParseErrorKind::LineTooLong);
    }

    #[test]
    fn bom_and_crlf_parse_like_plain_lf() {
        let plain = d("FROM a\nRUN b \\\n  c\n");
        assert_eq!(d("\u{feff}FROM a\r\nRUN b \\\r\n  c\r\n"), plain);
        let f = parse("\u{feff}FROM a\r\n").expect("parses");
        assert_eq!(f.instructions[0].keyword_span, Span::new(3, 7));
    }

    #[test]
    fn crlf_heredoc_keeps_its_line_endings() {
        let f = parse("RUN <<EOF\r\nx\r\nEOF\r\n").expect("parses");
        assert_eq!(f.instructions[0].heredocs[0].content, "x\r\n");
    }

    #[test]
    fn unknown_instructions_parse_with_an_empty_argument() {
        assert_eq!(d("FROM a\nFOO bar baz\n"), "(from \"a\")\n(foo \"\")\n");
    }

    #[test]
    fn escape_directive_changes_continuation() {
        assert_eq!(d("# escape=`\nRUN a`\n b\n"), "(run \"a b\")\n");
        assert!(parse("# escape=x\nFROM a\n").is_err());
        assert!(parse("# escape=`\n# escape=\\\nFROM a\n").is_err());
    }
}
