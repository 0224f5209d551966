//! Dockerfile shell-word expansion with the semantics of BuildKit's lexer
//! (`frontend/dockerfile/shell`).
//!
//! This module owns everything that happens to an instruction argument after
//! parsing and before use: `$VAR` / `${VAR…}` expansion, quote removal, escape
//! processing and, for [`Lexer::process_words`], splitting into words. It does
//! not know about instructions; the lowering code decides which words go
//! through which entry point and with which environment.
//!
//! Supported forms, all as in BuildKit:
//!
//! - `$name`, `${name}`; positional (`$1`, `$001`) and special (`$@ $* $# $? $- $$ $!`)
//!   parameters are looked up like any other name (they are normally unset);
//! - `${v:-w}`, `${v-w}`, `${v:+w}`, `${v+w}`, `${v:?msg}`, `${v?msg}`;
//! - `${v#p}`, `${v##p}`, `${v%p}`, `${v%%p}` and `${v/p/r}`, `${v//p/r}` with
//!   patterns made of literals, `?` and `*` (no bracket expressions), `\` escaping
//!   `*`, `?`, `\`, `}` and `/`.
//!
//! Reference quirks that are kept on purpose, because Dockerfiles are written
//! against them:
//!
//! - the default/alternative/message word of `${v:-w}` and friends is always
//!   expanded, so its variables are reported and its errors raised even when it
//!   is not used;
//! - pattern wildcards never match a newline (BuildKit compiles them to a Go
//!   regular expression whose `.` excludes `\n`);
//! - `${v//p/r}` treats `$0` (and `${0}`) in `r` as the matched text and drops
//!   other `$name` references, `$$` being a literal `$` (Go's `ReplaceAllString`
//!   template); `${v/p/r}` inserts `r` literally;
//! - with [`Lexer::raw_escapes`], an escape token inside double quotes that
//!   escapes nothing is written twice;
//! - with [`Lexer::skip_unset`], an unset `${v//p/r}` is written back as `${v/p/r}`;
//! - a byte order mark at the very start of a word (or of a pattern) is dropped.
//!
//! Deviations, none of them covered by the reference data:
//!
//! - nesting of `${…}` is limited to [`MAX_NESTING`] levels ([`ShellError::TooDeep`]),
//!   where BuildKit recurses without bound;
//! - in [`Lexer::process_words`], text before a `${v:-w}`-style form stays in its
//!   word (`a${U:-b}` gives `ab`). Recent BuildKit lexers share one word buffer
//!   between nesting levels and drop the `a`; older ones did not;
//! - error messages carry byte offsets, and `${v` cut off right after the name
//!   reports the missing `}` (BuildKit: "unsupported modifier").
//!
//! Letters and digits in variable names follow Go's `unicode.IsLetter` (category
//! L) and `unicode.IsDigit` (category Nd) at Unicode 15.0, the version of Go's
//! tables; whitespace for splitting is Unicode `White_Space`, as Go's
//! `unicode.IsSpace`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// How deeply `${…}` substitutions may nest inside one another. Expansion
/// recurses once per level; 64 levels fit in well under 512 KiB of stack even
/// in debug builds.
pub const MAX_NESTING: usize = 64;

/// Variable lookup for expansion.
pub trait Env {
    /// The value of `name`, or `None` when it is unset. An empty value is set.
    fn lookup(&self, name: &str) -> Option<&str>;

    /// Lookup ignoring letter case, as on Windows (used when
    /// [`Lexer::case_insensitive_names`] is on). The provided implementations
    /// prefer an exact match. The default falls back to [`Env::lookup`].
    fn lookup_ignore_case(&self, name: &str) -> Option<&str> {
        self.lookup(name)
    }
}

impl Env for HashMap<String, String> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }

    /// Exact match first; otherwise the smallest key equal ignoring case, so
    /// the answer does not depend on hash order.
    fn lookup_ignore_case(&self, name: &str) -> Option<&str> {
        if let Some(v) = self.get(name) {
            return Some(v);
        }
        self.iter()
            .filter(|(k, _)| keys_equal_ignore_case(k, name))
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(_, v)| v.as_str())
    }
}

impl Env for BTreeMap<String, String> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }

    /// Exact match first; otherwise the smallest key equal ignoring case.
    fn lookup_ignore_case(&self, name: &str) -> Option<&str> {
        if let Some(v) = self.get(name) {
            return Some(v);
        }
        self.iter()
            .find(|(k, _)| keys_equal_ignore_case(k, name))
            .map(|(_, v)| v.as_str())
    }
}

/// An ordered list of definitions: the last entry with the name wins.
impl Env for [(String, String)] {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The last entry whose name is equal ignoring case wins, as when BuildKit
    /// builds a Windows environment from a list.
    fn lookup_ignore_case(&self, name: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|(k, _)| keys_equal_ignore_case(k, name))
            .map(|(_, v)| v.as_str())
    }
}

/// An ordered list of definitions: the last entry with the name wins.
impl Env for Vec<(String, String)> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.as_slice().lookup(name)
    }

    fn lookup_ignore_case(&self, name: &str) -> Option<&str> {
        self.as_slice().lookup_ignore_case(name)
    }
}

/// A reference looks up in what it refers to; this lets an unsized
/// environment such as `&[(String, String)]` be passed as `&dyn Env`
/// (`&env_slice`).
impl<T: Env + ?Sized> Env for &T {
    fn lookup(&self, name: &str) -> Option<&str> {
        (**self).lookup(name)
    }

    fn lookup_ignore_case(&self, name: &str) -> Option<&str> {
        (**self).lookup_ignore_case(name)
    }
}

/// Go's `strings.ToUpper(a) == strings.ToUpper(b)`, with per-character simple
/// upper-casing (a character whose upper case is several characters is kept).
fn keys_equal_ignore_case(a: &str, b: &str) -> bool {
    fn upper(c: char) -> char {
        let mut up = c.to_uppercase();
        match (up.next(), up.next()) {
            (Some(u), None) => u,
            _ => c,
        }
    }
    a.chars().map(upper).eq(b.chars().map(upper))
}

/// The shell-word expander. Cheap to build and to clone; one value can be used
/// for any number of words, from any number of threads.
#[derive(Debug, Clone)]
pub struct Lexer {
    escape: char,
    raw_quotes: bool,
    raw_escapes: bool,
    skip_unset: bool,
    case_insensitive: bool,
}

impl Default for Lexer {
    /// A lexer with the default `\` escape token.
    fn default() -> Self {
        Lexer::new('\\')
    }
}

impl Lexer {
    /// A lexer with the given escape token: the Dockerfile's `# escape=`
    /// directive, `\` (the default) or `` ` ``.
    pub fn new(escape: char) -> Self {
        Lexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_unset: false,
            case_insensitive: false,
        }
    }

    /// BuildKit's `RawQuotes`: keep the quote characters in the output (their
    /// meaning still applies).
    pub fn raw_quotes(mut self, on: bool) -> Self {
        self.raw_quotes = on;
        self
    }

    /// BuildKit's `RawEscapes`: keep escape tokens in the output (their meaning
    /// still applies).
    pub fn raw_escapes(mut self, on: bool) -> Self {
        self.raw_escapes = on;
        self
    }

    /// BuildKit's `SkipUnsetEnv`: leave references to unset variables as
    /// written (`$X`, `${X}`, `${X:-w}` with `w` expanded) instead of expanding
    /// them. `${X?}` and `${X:?}` on an unset `X` are then not errors.
    pub fn skip_unset(mut self, on: bool) -> Self {
        self.skip_unset = on;
        self
    }

    /// Windows semantics: variable names are compared ignoring case, through
    /// [`Env::lookup_ignore_case`].
    pub fn case_insensitive_names(mut self, on: bool) -> Self {
        self.case_insensitive = on;
        self
    }

    /// ProcessWord: expand, remove quotes, process escapes; one string, no splitting.
    pub fn process_word(&self, word: &str, env: &dyn Env) -> Result<String, ShellError> {
        let mut ex = Expander::new(self, env, word, false);
        ex.stop_on(None, self.raw_escapes, false).map(|(s, _)| s)
    }

    /// ProcessWordWithMatches: also the sets of variable names looked up and
    /// found / not found (names as written in the word, including names only
    /// used in an unused default word).
    pub fn process_word_with_matches(
        &self,
        word: &str,
        env: &dyn Env,
    ) -> Result<Expansion, ShellError> {
        let mut ex = Expander::new(self, env, word, true);
        let (value, _) = ex.stop_on(None, self.raw_escapes, false)?;
        Ok(Expansion {
            value,
            matched: ex.matched,
            unmatched: ex.unmatched,
        })
    }

    /// ProcessWords: expand, then split into words (unquoted expansions split
    /// on whitespace), remove quotes. Empty words are dropped, so `""` alone
    /// gives no word.
    pub fn process_words(&self, word: &str, env: &dyn Env) -> Result<Vec<String>, ShellError> {
        let mut ex = Expander::new(self, env, word, false);
        ex.stop_on(None, self.raw_escapes, true).map(|(_, w)| w)
    }
}

/// The result of [`Lexer::process_word_with_matches`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Expansion {
    /// The expanded word.
    pub value: String,
    /// Variables that were looked up and are set (possibly empty).
    pub matched: BTreeSet<String>,
    /// Variables that were looked up and are unset.
    pub unmatched: BTreeSet<String>,
}

/// Why a word could not be expanded. Offsets are byte offsets into the word
/// given to the [`Lexer`]: the opening quote, or the `$` of the substitution.
/// Messages follow BuildKit's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    /// A `'` with no closing `'`.
    #[error(
        "unexpected end of statement while looking for matching single-quote (opened at byte {offset})"
    )]
    UnterminatedSingleQuote {
        /// Offset of the opening quote.
        offset: usize,
    },
    /// A `"` with no closing `"`.
    #[error(
        "unexpected end of statement while looking for matching double-quote (opened at byte {offset})"
    )]
    UnterminatedDoubleQuote {
        /// Offset of the opening quote.
        offset: usize,
    },
    /// A `${` whose closing `}` never comes.
    #[error("syntax error: missing '}}' (substitution at byte {offset})")]
    MissingBrace {
        /// Offset of the `$`.
        offset: usize,
    },
    /// A `${v/p` with no `/` between the pattern and the replacement.
    #[error("syntax error: missing '/' in ${{}} (substitution at byte {offset})")]
    MissingSlash {
        /// Offset of the `$`.
        offset: usize,
    },
    /// `${}`, `${{…}`, `${:…}`.
    #[error("syntax error: bad substitution (at byte {offset})")]
    BadSubstitution {
        /// Offset of the `$`.
        offset: usize,
    },
    /// A modifier BuildKit does not support: `${v=w}`, `${v:=w}`, `${v:#p}`,
    /// `${#v}`, `${v:1}`, `${v.}` and the like.
    #[error("unsupported modifier ({modifier}) in substitution (at byte {offset})")]
    UnsupportedModifier {
        /// The modifier as written, e.g. `:=`.
        modifier: String,
        /// Offset of the `$`.
        offset: usize,
    },
    /// A pattern with a `\` that escapes something other than `*`, `?`, `\`,
    /// `}` or `/`.
    #[error(
        "invalid pattern ({pattern}) in substitution: {} (at byte {offset})",
        invalid_escape_text(*.escaped)
    )]
    InvalidPattern {
        /// The pattern after expansion.
        pattern: String,
        /// The escaped character, `None` for a `\` at the end of the pattern.
        escaped: Option<char>,
        /// Offset of the `$`.
        offset: usize,
    },
    /// `${v?msg}` or `${v:?msg}` with `v` unset.
    #[error("{name}: {message}")]
    UnsetVariable {
        /// The variable.
        name: String,
        /// The expanded `msg`, or `is not allowed to be unset`.
        message: String,
        /// Offset of the `$`.
        offset: usize,
    },
    /// `${v:?msg}` with `v` set but empty.
    #[error("{name}: {message}")]
    EmptyVariable {
        /// The variable.
        name: String,
        /// The expanded `msg`, or `is not allowed to be empty`.
        message: String,
        /// Offset of the `$`.
        offset: usize,
    },
    /// More than [`MAX_NESTING`] nested `${…}`.
    #[error("substitutions nested more than {limit} levels deep (at byte {offset})")]
    TooDeep {
        /// The limit, [`MAX_NESTING`].
        limit: usize,
        /// Offset of the `$` that went too deep.
        offset: usize,
    },
}

fn invalid_escape_text(escaped: Option<char>) -> String {
    match escaped {
        Some(c) => format!("invalid escape '\\{c}'"),
        None => "invalid escape '\\' at end of pattern".to_owned(),
    }
}

/// One expansion run over one word. Mirrors the reference's recursive
/// scanner: `stop_on` reads text up to a stop character, calling `dollar` and
/// the quote readers, and `dollar` calls `stop_on` for the words inside `${…}`.
struct Expander<'a> {
    lexer: &'a Lexer,
    env: &'a dyn Env,
    src: &'a str,
    /// Byte offset of the next character.
    pos: usize,
    /// Whether escape tokens are kept at the current nesting level.
    raw_escapes: bool,
    depth: usize,
    track: bool,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

impl<'a> Expander<'a> {
    fn new(lexer: &'a Lexer, env: &'a dyn Env, src: &'a str, track: bool) -> Self {
        // Go's text/scanner skips a byte order mark at the start of its input.
        let pos = if src.starts_with('\u{FEFF}') {
            '\u{FEFF}'.len_utf8()
        } else {
            0
        };
        Expander {
            lexer,
            env,
            src,
            pos,
            raw_escapes: lexer.raw_escapes,
            depth: 0,
            track,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.src.get(self.pos..).and_then(|s| s.chars().next())
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// Reads up to `stop` (consumed) or the end of the word, with escape tokens
    /// kept if `raw_escapes`. Returns the text and, if `split`, its words.
    fn stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
        split: bool,
    ) -> Result<(String, Vec<String>), ShellError> {
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let result = self.stop_on_inner(stop, split);
        self.raw_escapes = saved;
        result
    }

    fn stop_on_inner(
        &mut self,
        stop: Option<char>,
        split: bool,
    ) -> Result<(String, Vec<String>), ShellError> {
        let mut out = String::new();
        let mut words = Words::new(split);
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.bump();
                return Ok((out, words.finish()));
            }
            match ch {
                '$' => {
                    let value = self.dollar()?;
                    words.split_str(&value);
                    out.push_str(&value);
                }
                '\'' => {
                    let value = self.single_quoted()?;
                    words.raw_str(&value);
                    out.push_str(&value);
                }
                '"' => {
                    let value = self.double_quoted()?;
                    words.raw_str(&value);
                    out.push_str(&value);
                }
                _ => {
                    self.bump();
                    if ch == self.lexer.escape {
                        if self.raw_escapes {
                            words.raw_char(ch);
                            out.push(ch);
                        }
                        // An escape token at the very end escapes nothing and is dropped.
                        let Some(escaped) = self.bump() else { break };
                        words.raw_char(escaped);
                        out.push(escaped);
                    } else {
                        words.split_char(ch);
                        out.push(ch);
                    }
                }
            }
        }
        match stop {
            None => Ok((out, words.finish())),
            // Callers replace these with errors pointing at their `$`.
            Some('/') => Err(ShellError::MissingSlash { offset: self.pos }),
            Some(_) => Err(ShellError::MissingBrace { offset: self.pos }),
        }
    }

    /// `'…'`: everything literal up to the next `'`.
    fn single_quoted(&mut self) -> Result<String, ShellError> {
        let offset = self.pos;
        let mut out = String::new();
        self.bump();
        if self.lexer.raw_quotes {
            out.push('\'');
        }
        loop {
            match self.bump() {
                None => return Err(ShellError::UnterminatedSingleQuote { offset }),
                Some('\'') => {
                    if self.lexer.raw_quotes {
                        out.push('\'');
                    }
                    return Ok(out);
                }
                Some(c) => out.push(c),
            }
        }
    }

    /// `"…"`: `$` expands; the escape token escapes only `"`, `$` and itself.
    fn double_quoted(&mut self) -> Result<String, ShellError> {
        let offset = self.pos;
        let mut out = String::new();
        self.bump();
        if self.lexer.raw_quotes {
            out.push('"');
        }
        loop {
            match self.peek() {
                None => return Err(ShellError::UnterminatedDoubleQuote { offset }),
                Some('"') => {
                    self.bump();
                    if self.lexer.raw_quotes {
                        out.push('"');
                    }
                    return Ok(out);
                }
                Some('$') => {
                    let value = self.dollar()?;
                    out.push_str(&value);
                }
                Some(mut ch) => {
                    self.bump();
                    if ch == self.lexer.escape {
                        if self.raw_escapes {
                            out.push(ch);
                        }
                        match self.peek() {
                            // The loop then reports the missing quote.
                            None => continue,
                            Some(next)
                                if next == '"' || next == '$' || next == self.lexer.escape =>
                            {
                                self.bump();
                                ch = next;
                            }
                            // Not escapable: the escape token itself is the character.
                            Some(_) => {}
                        }
                    }
                    out.push(ch);
                }
            }
        }
    }

    /// `$name` or `${…}`, starting at the `$`.
    fn dollar(&mut self) -> Result<String, ShellError> {
        let offset = self.pos;
        self.bump();
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_owned());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v.to_owned(),
                None if self.lexer.skip_unset => format!("${name}"),
                None => String::new(),
            });
        }
        self.bump();
        match self.peek() {
            None => return Err(ShellError::MissingBrace { offset }),
            Some('{' | '}' | ':') => return Err(ShellError::BadSubstitution { offset }),
            Some(_) => {}
        }
        if self.depth >= MAX_NESTING {
            return Err(ShellError::TooDeep {
                limit: MAX_NESTING,
                offset,
            });
        }
        self.depth += 1;
        let result = self.braced(offset);
        self.depth -= 1;
        result
    }

    /// The inside of `${…}`, after the `{`.
    fn braced(&mut self, offset: usize) -> Result<String, ShellError> {
        let name = self.name();
        match self.bump() {
            None => Err(ShellError::MissingBrace { offset }),
            Some('}') => Ok(match self.get_env(&name) {
                Some(v) => v.to_owned(),
                None if self.lexer.skip_unset => format!("${{{name}}}"),
                None => String::new(),
            }),
            Some(c @ (':' | '+' | '-' | '?' | '#' | '%')) => self.modifier(offset, &name, c),
            Some('/') => self.substitute(offset, &name),
            Some(c) => Err(ShellError::UnsupportedModifier {
                modifier: c.to_string(),
                offset,
            }),
        }
    }

    /// `${name:-w}`, `${name+w}`, `${name?w}`, `${name#p}`, … after the name;
    /// `first` is the character after the name.
    fn modifier(&mut self, offset: usize, name: &str, first: char) -> Result<String, ShellError> {
        let null_is_unset = first == ':';
        let op = if null_is_unset {
            self.bump()
        } else {
            Some(first)
        };
        let mut modifier = String::new();
        if null_is_unset {
            modifier.push(':');
        }
        modifier.extend(op);
        let pattern_like = matches!(op, Some('#' | '%'));
        if null_is_unset && pattern_like {
            return Err(ShellError::UnsupportedModifier { modifier, offset });
        }
        let word = self.nested_word('}', pattern_like, offset)?;
        let value = self.get_env(name);
        if value.is_none() && self.lexer.skip_unset {
            return Ok(format!("${{{name}{modifier}{word}}}"));
        }
        let set = value.is_some();
        let value = value.unwrap_or("");
        let null = !set || (null_is_unset && value.is_empty());
        match op {
            Some('-') if null => Ok(word),
            Some('-') => Ok(value.to_owned()),
            Some('+') if null => Ok(String::new()),
            Some('+') => Ok(word),
            Some('?') if !set => Err(ShellError::UnsetVariable {
                name: name.to_owned(),
                message: message_or(word, "is not allowed to be unset"),
                offset,
            }),
            Some('?') if null => Err(ShellError::EmptyVariable {
                name: name.to_owned(),
                message: message_or(word, "is not allowed to be empty"),
                offset,
            }),
            Some('?') => Ok(value.to_owned()),
            Some(c @ ('#' | '%')) => trim(c, &word, value, offset),
            _ => Err(ShellError::UnsupportedModifier { modifier, offset }),
        }
    }

    /// `${name/p/r}` and `${name//p/r}`, after the first `/`.
    fn substitute(&mut self, offset: usize, name: &str) -> Result<String, ShellError> {
        let all = self.peek() == Some('/');
        if all {
            self.bump();
        }
        let pattern = self.nested_word('/', true, offset)?;
        let replacement = self.nested_word('}', true, offset)?;
        let value = self.get_env(name);
        if value.is_none() && self.lexer.skip_unset {
            return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
        }
        let value = value.unwrap_or("");
        let glob = Glob::compile(&pattern, true).map_err(|escaped| ShellError::InvalidPattern {
            pattern: pattern.clone(),
            escaped,
            offset,
        })?;
        let mut vm = Vm::default();
        Ok(if all {
            vm.replace_all(&glob, value, &replacement)
        } else {
            vm.replace_first(&glob, value, &replacement)
        })
    }

    /// A word inside `${…}` ending at `stop`. Any failure at the end of the
    /// input is reported as the missing `stop` of the substitution at `offset`.
    fn nested_word(
        &mut self,
        stop: char,
        raw_escapes: bool,
        offset: usize,
    ) -> Result<String, ShellError> {
        match self.stop_on(Some(stop), raw_escapes, false) {
            Ok((word, _)) => Ok(word),
            Err(e @ ShellError::TooDeep { .. }) => Err(e),
            Err(_) if self.peek().is_none() => Err(if stop == '/' {
                ShellError::MissingSlash { offset }
            } else {
                ShellError::MissingBrace { offset }
            }),
            Err(e) => Err(e),
        }
    }

    /// A variable name: a run of digits, one special-parameter character, or
    /// letters, digits and `_`. Empty if none of those comes next.
    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_go_digit(ch) {
                while let Some(d) = self.peek().filter(|&c| is_go_digit(c)) {
                    self.bump();
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!') {
                self.bump();
                name.push(ch);
                return name;
            }
            if !(is_go_letter(ch) || is_go_digit(ch) || ch == '_') {
                break;
            }
            self.bump();
            name.push(ch);
        }
        name
    }

    fn get_env(&mut self, name: &str) -> Option<&'a str> {
        let env = self.env;
        let value = if self.lexer.case_insensitive {
            env.lookup_ignore_case(name)
        } else {
            env.lookup(name)
        };
        if self.track {
            let set = if value.is_some() {
                &mut self.matched
            } else {
                &mut self.unmatched
            };
            if !set.contains(name) {
                set.insert(name.to_owned());
            }
        }
        value
    }
}

fn message_or(word: String, default: &str) -> String {
    if word.is_empty() {
        default.to_owned()
    } else {
        word
    }
}

/// `${v#p}` (`op` `#`) or `${v%p}` (`op` `%`); `word` still holds the second
/// `#`/`%` of the longest-match forms.
fn trim(op: char, word: &str, value: &str, offset: usize) -> Result<String, ShellError> {
    let (greedy, pattern) = match word.strip_prefix(op) {
        Some(rest) => (true, rest),
        None => (false, word),
    };
    let result = if op == '%' {
        trim_suffix(pattern, value, greedy)
    } else {
        trim_prefix(pattern, value, greedy)
    };
    result.map_err(|escaped| ShellError::InvalidPattern {
        pattern: pattern.to_owned(),
        escaped,
        offset,
    })
}

/// Removes the leftmost-first match of `pattern` anchored at the start.
fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Result<String, Option<char>> {
    let glob = Glob::compile(pattern, greedy)?;
    Ok(match Vm::default().find(&glob, value, 0, true) {
        Some((_, end)) => value.get(end..).unwrap_or_default().to_owned(),
        None => value.to_owned(),
    })
}

/// Removes a suffix the way the reference does: reverse the value and the
/// pattern (keeping `\x` pairs in order) and remove a prefix.
fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Result<String, Option<char>> {
    let reversed: String = value.chars().rev().collect();
    let trimmed = trim_prefix(&reverse_pattern(pattern), &reversed, greedy)?;
    Ok(trimmed.chars().rev().collect())
}

fn reverse_pattern(pattern: &str) -> String {
    let mut units: Vec<(char, Option<char>)> = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        let pair = if c == '\\' { chars.next() } else { None };
        units.push((c, pair));
    }
    let mut out = String::with_capacity(pattern.len());
    for (c, pair) in units.into_iter().rev() {
        out.push(c);
        out.extend(pair);
    }
    out
}

/// Word splitting for [`Lexer::process_words`]; a no-op when disabled.
struct Words {
    enabled: bool,
    done: Vec<String>,
    current: String,
}

impl Words {
    fn new(enabled: bool) -> Self {
        Words {
            enabled,
            done: Vec::new(),
            current: String::new(),
        }
    }

    /// A character that splits words if it is whitespace.
    fn split_char(&mut self, c: char) {
        if !self.enabled {
            return;
        }
        if c.is_whitespace() {
            self.flush();
        } else {
            self.current.push(c);
        }
    }

    fn split_str(&mut self, s: &str) {
        if self.enabled {
            s.chars().for_each(|c| self.split_char(c));
        }
    }

    /// A character that never splits (quoted or escaped).
    fn raw_char(&mut self, c: char) {
        if self.enabled {
            self.current.push(c);
        }
    }

    fn raw_str(&mut self, s: &str) {
        if self.enabled {
            self.current.push_str(s);
        }
    }

    fn flush(&mut self) {
        if !self.current.is_empty() {
            self.done.push(std::mem::take(&mut self.current));
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.flush();
        self.done
    }
}

/// One element of a compiled pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// This character.
    Lit(char),
    /// `?`: any one character but a newline.
    Any,
    /// `*`: any run of characters without a newline.
    Star,
}

/// A `?`/`*` pattern with the reference's leftmost-first (backtracking
/// priority) match semantics: stars prefer the longest run if `greedy`, the
/// shortest otherwise.
struct Glob {
    /// No two `Star`s in a row (they match the same as one).
    toks: Vec<Tok>,
    greedy: bool,
}

impl Glob {
    /// Compiles `pattern`; an invalid escape gives the escaped character
    /// (`None` for a trailing `\`).
    fn compile(pattern: &str, greedy: bool) -> Result<Self, Option<char>> {
        let body = pattern.strip_prefix('\u{FEFF}').unwrap_or(pattern);
        let mut toks = Vec::new();
        let mut chars = body.chars().peekable();
        while let Some(c) = chars.next() {
            let tok = match c {
                '*' => Tok::Star,
                '?' => Tok::Any,
                '\\' => {
                    // `\}` and `\/` only protect the character from `${…}`
                    // parsing; the character itself is read as a literal next.
                    if matches!(chars.peek(), Some('}' | '/')) {
                        continue;
                    }
                    match chars.next() {
                        Some(e @ ('*' | '?' | '\\')) => Tok::Lit(e),
                        other => return Err(other),
                    }
                }
                c => Tok::Lit(c),
            };
            if tok == Tok::Star && toks.last() == Some(&Tok::Star) {
                continue;
            }
            toks.push(tok);
        }
        Ok(Glob { toks, greedy })
    }
}

#[derive(Debug, Clone, Copy)]
struct Thread {
    /// Index into `Glob::toks`; `toks.len()` is the accepting state.
    pc: usize,
    /// Byte offset where this thread's match began.
    start: usize,
}

/// A Pike VM over a [`Glob`]: threads are kept in priority order, so the
/// first thread to accept gives the match a backtracking engine would, in
/// O(text × pattern) time. Buffers are reused across searches.
#[derive(Default)]
struct Vm {
    /// Per state, the generation of the thread list it was last added to.
    seen: Vec<u64>,
    generation: u64,
    current: Vec<Thread>,
    next: Vec<Thread>,
}

impl Vm {
    /// The leftmost-first match of `glob` in `text` starting at or after byte
    /// `from` (exactly at `from` if `anchored`), as `(start, end)`.
    fn find(
        &mut self,
        glob: &Glob,
        text: &str,
        from: usize,
        anchored: bool,
    ) -> Option<(usize, usize)> {
        let states = glob.toks.len() + 1;
        if self.seen.len() != states {
            self.seen = vec![0; states];
            self.generation = 0;
        }
        let mut current = std::mem::take(&mut self.current);
        let mut next = std::mem::take(&mut self.next);
        current.clear();
        next.clear();
        self.generation += 1;
        let mut generation = self.generation;
        let mut matched = None;
        let mut pos = from;
        loop {
            if current.is_empty() && (matched.is_some() || (anchored && pos != from)) {
                break;
            }
            if matched.is_none() && (!anchored || pos == from) {
                add_thread(glob, &mut self.seen, generation, &mut current, 0, pos);
            }
            let c = text.get(pos..).and_then(|s| s.chars().next());
            let next_generation = generation + 1;
            for &Thread { pc, start } in &current {
                let target = match glob.toks.get(pc) {
                    None => {
                        // Accepting; lower-priority threads are cut off.
                        matched = Some((start, pos));
                        break;
                    }
                    Some(Tok::Lit(l)) => (c == Some(*l)).then_some(pc + 1),
                    Some(Tok::Any) => c.is_some_and(|c| c != '\n').then_some(pc + 1),
                    Some(Tok::Star) => c.is_some_and(|c| c != '\n').then_some(pc),
                };
                if let Some(target) = target {
                    add_thread(
                        glob,
                        &mut self.seen,
                        next_generation,
                        &mut next,
                        target,
                        start,
                    );
                }
            }
            current.clear();
            let Some(c) = c else { break };
            pos += c.len_utf8();
            generation = next_generation;
            std::mem::swap(&mut current, &mut next);
        }
        self.generation = generation + 1;
        self.current = current;
        self.next = next;
        matched
    }

    /// `${v/p/r}`: the first match replaced by `replacement`, literally.
    fn replace_first(&mut self, glob: &Glob, value: &str, replacement: &str) -> String {
        match self.find(glob, value, 0, false) {
            Some((start, end)) => {
                let mut out = String::with_capacity(value.len() + replacement.len());
                out.push_str(value.get(..start).unwrap_or_default());
                out.push_str(replacement);
                out.push_str(value.get(end..).unwrap_or_default());
                out
            }
            None => value.to_owned(),
        }
    }

    /// `${v//p/r}`: Go's `Regexp.ReplaceAllString` — successive
    /// non-overlapping matches, an empty match right after a match ignored,
    /// `template` expanded per match.
    fn replace_all(&mut self, glob: &Glob, value: &str, template: &str) -> String {
        let mut out = String::with_capacity(value.len());
        let mut last_end = 0;
        let mut search = 0;
        while search <= value.len() {
            let Some((start, end)) = self.find(glob, value, search, false) else {
                break;
            };
            out.push_str(value.get(last_end..start).unwrap_or_default());
            if end > last_end || start == 0 {
                expand_template(
                    &mut out,
                    template,
                    value.get(start..end).unwrap_or_default(),
                );
            }
            last_end = end;
            let width = value
                .get(search..)
                .and_then(|s| s.chars().next())
                .map_or(0, char::len_utf8);
            search = if search + width > end {
                search + width
            } else if search + 1 > end {
                search + 1
            } else {
                end
            };
        }
        out.push_str(value.get(last_end..).unwrap_or_default());
        out
    }
}

/// Adds the thread at `pc` and the threads reachable from it without input,
/// in priority order, skipping states already in this generation's list.
fn add_thread(
    glob: &Glob,
    seen: &mut [u64],
    generation: u64,
    list: &mut Vec<Thread>,
    pc: usize,
    start: usize,
) {
    if !mark(seen, pc, generation) {
        return;
    }
    let here = Thread { pc, start };
    if glob.toks.get(pc) != Some(&Tok::Star) {
        list.push(here);
        return;
    }
    // A star either loops (consumes one more character) or moves on. The
    // token after a star is never a star, so moving on adds a plain state.
    let move_on = Thread { pc: pc + 1, start };
    if glob.greedy {
        list.push(here);
        if mark(seen, move_on.pc, generation) {
            list.push(move_on);
        }
    } else {
        if mark(seen, move_on.pc, generation) {
            list.push(move_on);
        }
        list.push(here);
    }
}

/// Marks state `pc` as in this generation's list; false if it already was.
fn mark(seen: &mut [u64], pc: usize, generation: u64) -> bool {
    match seen.get_mut(pc) {
        Some(m) if *m != generation => {
            *m = generation;
            true
        }
        _ => false,
    }
}

/// Go's `Regexp.Expand` for a pattern without groups: `$0`/`${0}` is the match,
/// `$$` is `$`, other `$name`/`${name}` are empty, a malformed `$` is literal.
fn expand_template(out: &mut String, template: &str, matched: &str) {
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(rest.get(..i).unwrap_or_default());
        rest = rest.get(i + 1..).unwrap_or_default();
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        match template_reference(rest) {
            Some((name, after)) => {
                if name == "0" {
                    out.push_str(matched);
                }
                rest = after;
            }
            None => out.push('$'),
        }
    }
    out.push_str(rest);
}

/// The name of a `name` or `{name}` reference at the start of `s`, and the rest.
fn template_reference(s: &str) -> Option<(&str, &str)> {
    let (braced, body) = match s.strip_prefix('{') {
        Some(body) => (true, body),
        None => (false, s),
    };
    let end = body
        .char_indices()
        .find(|&(_, c)| !(is_go_letter(c) || is_go_digit(c) || c == '_'))
        .map_or(body.len(), |(i, _)| i);
    if end == 0 {
        return None;
    }
    let (name, after) = body.split_at(end);
    if braced {
        Some((name, after.strip_prefix('}')?))
    } else {
        Some((name, after))
    }
}

/// Go's `unicode.IsLetter`: general category L.
fn is_go_letter(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphabetic()
    } else {
        in_table(LETTER, c)
    }
}

/// Go's `unicode.IsDigit`: general category Nd.
fn is_go_digit(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        in_table(DECIMAL_DIGIT, c)
    }
}

/// Whether `c` is in a sorted table of inclusive `first, last` pairs.
fn in_table(table: &[u32], c: char) -> bool {
    let c = u32::from(c);
    let (mut lo, mut hi) = (0, table.len() / 2);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let (Some(&first), Some(&last)) = (table.get(2 * mid), table.get(2 * mid + 1)) else {
            return false;
        };
        if c < first {
            hi = mid;
        } else if c > last {
            lo = mid + 1;
        } else {
            return true;
        }
    }
    false
}

// Unicode 15.0 general categories L and Nd as inclusive ranges, generated from
// the Unicode Character Database (the version of Go's `unicode` tables).
const LETTER: &[u32] = &[
    0x41, 0x5A, 0x61, 0x7A, 0xAA, 0xAA, 0xB5, 0xB5, 0xBA, 0xBA, 0xC0, 0xD6, 0xD8, 0xF6, 0xF8,
    0x2C1, 0x2C6, 0x2D1, 0x2E0, 0x2E4, 0x2EC, 0x2EC, 0x2EE, 0x2EE, 0x370, 0x374, 0x376, 0x377,
    0x37A, 0x37D, 0x37F, 0x37F, 0x386, 0x386, 0x388, 0x38A, 0x38C, 0x38C, 0x38E, 0x3A1, 0x3A3,
    0x3F5, 0x3F7, 0x481, 0x48A, 0x52F, 0x531, 0x556, 0x559, 0x559, 0x560, 0x588, 0x5D0, 0x5EA,
    0x5EF, 0x5F2, 0x620, 0x64A, 0x66E, 0x66F, 0x671, 0x6D3, 0x6D5, 0x6D5, 0x6E5, 0x6E6, 0x6EE,
    0x6EF, 0x6FA, 0x6FC, 0x6FF, 0x6FF, 0x710, 0x710, 0x712, 0x72F, 0x74D, 0x7A5, 0x7B1, 0x7B1,
    0x7CA, 0x7EA, 0x7F4, 0x7F5, 0x7FA, 0x7FA, 0x800, 0x815, 0x81A, 0x81A, 0x824, 0x824, 0x828,
    0x828, 0x840, 0x858, 0x860, 0x86A, 0x870, 0x887, 0x889, 0x88E, 0x8A0, 0x8C9, 0x904, 0x939,
    0x93D, 0x93D, 0x950, 0x950, 0x958, 0x961, 0x971, 0x980, 0x985, 0x98C, 0x98F, 0x990, 0x993,
    0x9A8, 0x9AA, 0x9B0, 0x9B2, 0x9B2, 0x9B6, 0x9B9, 0x9BD, 0x9BD, 0x9CE, 0x9CE, 0x9DC, 0x9DD,
    0x9DF, 0x9E1, 0x9F0, 0x9F1, 0x9FC, 0x9FC, 0xA05, 0xA0A, 0xA0F, 0xA10, 0xA13, 0xA28, 0xA2A,
    0xA30, 0xA32, 0xA33, 0xA35, 0xA36, 0xA38, 0xA39, 0xA59, 0xA5C, 0xA5E, 0xA5E, 0xA72, 0xA74,
    0xA85, 0xA8D, 0xA8F, 0xA91, 0xA93, 0xAA8, 0xAAA, 0xAB0, 0xAB2, 0xAB3, 0xAB5, 0xAB9, 0xABD,
    0xABD, 0xAD0, 0xAD0, 0xAE0, 0xAE1, 0xAF9, 0xAF9, 0xB05, 0xB0C, 0xB0F, 0xB10, 0xB13, 0xB28,
    0xB2A, 0xB30, 0xB32, 0xB33, 0xB35, 0xB39, 0xB3D, 0xB3D, 0xB5C, 0xB5D, 0xB5F, 0xB61, 0xB71,
    0xB71, 0xB83, 0xB83, 0xB85, 0xB8A, 0xB8E, 0xB90, 0xB92, 0xB95, 0xB99, 0xB9A, 0xB9C, 0xB9C,
    0xB9E, 0xB9F, 0xBA3, 0xBA4, 0xBA8, 0xBAA, 0xBAE, 0xBB9, 0xBD0, 0xBD0, 0xC05, 0xC0C, 0xC0E,
    0xC10, 0xC12, 0xC28, 0xC2A, 0xC39, 0xC3D, 0xC3D, 0xC58, 0xC5A, 0xC5D, 0xC5D, 0xC60, 0xC61,
    0xC80, 0xC80, 0xC85, 0xC8C, 0xC8E, 0xC90, 0xC92, 0xCA8, 0xCAA, 0xCB3, 0xCB5, 0xCB9, 0xCBD,
    0xCBD, 0xCDD, 0xCDE, 0xCE0, 0xCE1, 0xCF1, 0xCF2, 0xD04, 0xD0C, 0xD0E, 0xD10, 0xD12, 0xD3A,
    0xD3D, 0xD3D, 0xD4E, 0xD4E, 0xD54, 0xD56, 0xD5F, 0xD61, 0xD7A, 0xD7F, 0xD85, 0xD96, 0xD9A,
    0xDB1, 0xDB3, 0xDBB, 0xDBD, 0xDBD, 0xDC0, 0xDC6, 0xE01, 0xE30, 0xE32, 0xE33, 0xE40, 0xE46,
    0xE81, 0xE82, 0xE84, 0xE84, 0xE86, 0xE8A, 0xE8C, 0xEA3, 0xEA5, 0xEA5, 0xEA7, 0xEB0, 0xEB2,
    0xEB3, 0xEBD, 0xEBD, 0xEC0, 0xEC4, 0xEC6, 0xEC6, 0xEDC, 0xEDF, 0xF00, 0xF00, 0xF40, 0xF47,
    0xF49, 0xF6C, 0xF88, 0xF8C, 0x1000, 0x102A, 0x103F, 0x103F, 0x1050, 0x1055, 0x105A, 0x105D,
    0x1061, 0x1061, 0x1065, 0x1066, 0x106E, 0x1070, 0x1075, 0x1081, 0x108E, 0x108E, 0x10A0, 0x10C5,
    0x10C7, 0x10C7, 0x10CD, 0x10CD, 0x10D0, 0x10FA, 0x10FC, 0x1248, 0x124A, 0x124D, 0x1250, 0x1256,
    0x1258, 0x1258, 0x125A, 0x125D, 0x1260, 0x1288, 0x128A, 0x128D, 0x1290, 0x12B0, 0x12B2, 0x12B5,
    0x12B8, 0x12BE, 0x12C0, 0x12C0, 0x12C2, 0x12C5, 0x12C8, 0x12D6, 0x12D8, 0x1310, 0x1312, 0x1315,
    0x1318, 0x135A, 0x1380, 0x138F, 0x13A0, 0x13F5, 0x13F8, 0x13FD, 0x1401, 0x166C, 0x166F, 0x167F,
    0x1681, 0x169A, 0x16A0, 0x16EA, 0x16F1, 0x16F8, 0x1700, 0x1711, 0x171F, 0x1731, 0x1740, 0x1751,
    0x1760, 0x176C, 0x176E, 0x1770, 0x1780, 0x17B3, 0x17D7, 0x17D7, 0x17DC, 0x17DC, 0x1820, 0x1878,
    0x1880, 0x1884, 0x1887, 0x18A8, 0x18AA, 0x18AA, 0x18B0, 0x18F5, 0x1900, 0x191E, 0x1950, 0x196D,
    0x1970, 0x1974, 0x1980, 0x19AB, 0x19B0, 0x19C9, 0x1A00, 0x1A16, 0x1A20, 0x1A54, 0x1AA7, 0x1AA7,
    0x1B05, 0x1B33, 0x1B45, 0x1B4C, 0x1B83, 0x1BA0, 0x1BAE, 0x1BAF, 0x1BBA, 0x1BE5, 0x1C00, 0x1C23,
    0x1C4D, 0x1C4F, 0x1C5A, 0x1C7D, 0x1C80, 0x1C88, 0x1C90, 0x1CBA, 0x1CBD, 0x1CBF, 0x1CE9, 0x1CEC,
    0x1CEE, 0x1CF3, 0x1CF5, 0x1CF6, 0x1CFA, 0x1CFA, 0x1D00, 0x1DBF, 0x1E00, 0x1F15, 0x1F18, 0x1F1D,
    0x1F20, 0x1F45, 0x1F48, 0x1F4D, 0x1F50, 0x1F57, 0x1F59, 0x1F59, 0x1F5B, 0x1F5B, 0x1F5D, 0x1F5D,
    0x1F5F, 0x1F7D, 0x1F80, 0x1FB4, 0x1FB6, 0x1FBC, 0x1FBE, 0x1FBE, 0x1FC2, 0x1FC4, 0x1FC6, 0x1FCC,
    0x1FD0, 0x1FD3, 0x1FD6, 0x1FDB, 0x1FE0, 0x1FEC, 0x1FF2, 0x1FF4, 0x1FF6, 0x1FFC, 0x2071, 0x2071,
    0x207F, 0x207F, 0x2090, 0x209C, 0x2102, 0x2102, 0x2107, 0x2107, 0x210A, 0x2113, 0x2115, 0x2115,
    0x2119, 0x211D, 0x2124, 0x2124, 0x2126, 0x2126, 0x2128, 0x2128, 0x212A, 0x212D, 0x212F, 0x2139,
    0x213C, 0x213F, 0x2145, 0x2149, 0x214E, 0x214E, 0x2183, 0x2184, 0x2C00, 0x2CE4, 0x2CEB, 0x2CEE,
    0x2CF2, 0x2CF3, 0x2D00, 0x2D25, 0x2D27, 0x2D27, 0x2D2D, 0x2D2D, 0x2D30, 0x2D67, 0x2D6F, 0x2D6F,
    0x2D80, 0x2D96, 0x2DA0, 0x2DA6, 0x2DA8, 0x2DAE, 0x2DB0, 0x2DB6, 0x2DB8, 0x2DBE, 0x2DC0, 0x2DC6,
    0x2DC8, 0x2DCE, 0x2DD0, 0x2DD6, 0x2DD8, 0x2DDE, 0x2E2F, 0x2E2F, 0x3005, 0x3006, 0x3031, 0x3035,
    0x303B, 0x303C, 0x3041, 0x3096, 0x309D, 0x309F, 0x30A1, 0x30FA, 0x30FC, 0x30FF, 0x3105, 0x312F,
    0x3131, 0x318E, 0x31A0, 0x31BF, 0x31F0, 0x31FF, 0x3400, 0x4DBF, 0x4E00, 0xA48C, 0xA4D0, 0xA4FD,
    0xA500, 0xA60C, 0xA610, 0xA61F, 0xA62A, 0xA62B, 0xA640, 0xA66E, 0xA67F, 0xA69D, 0xA6A0, 0xA6E5,
    0xA717, 0xA71F, 0xA722, 0xA788, 0xA78B, 0xA7CA, 0xA7D0, 0xA7D1, 0xA7D3, 0xA7D3, 0xA7D5, 0xA7D9,
    0xA7F2, 0xA801, 0xA803, 0xA805, 0xA807, 0xA80A, 0xA80C, 0xA822, 0xA840, 0xA873, 0xA882, 0xA8B3,
    0xA8F2, 0xA8F7, 0xA8FB, 0xA8FB, 0xA8FD, 0xA8FE, 0xA90A, 0xA925, 0xA930, 0xA946, 0xA960, 0xA97C,
    0xA984, 0xA9B2, 0xA9CF, 0xA9CF, 0xA9E0, 0xA9E4, 0xA9E6, 0xA9EF, 0xA9FA, 0xA9FE, 0xAA00, 0xAA28,
    0xAA40, 0xAA42, 0xAA44, 0xAA4B, 0xAA60, 0xAA76, 0xAA7A, 0xAA7A, 0xAA7E, 0xAAAF, 0xAAB1, 0xAAB1,
    0xAAB5, 0xAAB6, 0xAAB9, 0xAABD, 0xAAC0, 0xAAC0, 0xAAC2, 0xAAC2, 0xAADB, 0xAADD, 0xAAE0, 0xAAEA,
    0xAAF2, 0xAAF4, 0xAB01, 0xAB06, 0xAB09, 0xAB0E, 0xAB11, 0xAB16, 0xAB20, 0xAB26, 0xAB28, 0xAB2E,
    0xAB30, 0xAB5A, 0xAB5C, 0xAB69, 0xAB70, 0xABE2, 0xAC00, 0xD7A3, 0xD7B0, 0xD7C6, 0xD7CB, 0xD7FB,
    0xF900, 0xFA6D, 0xFA70, 0xFAD9, 0xFB00, 0xFB06, 0xFB13, 0xFB17, 0xFB1D, 0xFB1D, 0xFB1F, 0xFB28,
    0xFB2A, 0xFB36, 0xFB38, 0xFB3C, 0xFB3E, 0xFB3E, 0xFB40, 0xFB41, 0xFB43, 0xFB44, 0xFB46, 0xFBB1,
    0xFBD3, 0xFD3D, 0xFD50, 0xFD8F, 0xFD92, 0xFDC7, 0xFDF0, 0xFDFB, 0xFE70, 0xFE74, 0xFE76, 0xFEFC,
    0xFF21, 0xFF3A, 0xFF41, 0xFF5A, 0xFF66, 0xFFBE, 0xFFC2, 0xFFC7, 0xFFCA, 0xFFCF, 0xFFD2, 0xFFD7,
    0xFFDA, 0xFFDC, 0x10000, 0x1000B, 0x1000D, 0x10026, 0x10028, 0x1003A, 0x1003C, 0x1003D,
    0x1003F, 0x1004D, 0x10050, 0x1005D, 0x10080, 0x100FA, 0x10280, 0x1029C, 0x102A0, 0x102D0,
    0x10300, 0x1031F, 0x1032D, 0x10340, 0x10342, 0x10349, 0x10350, 0x10375, 0x10380, 0x1039D,
    0x103A0, 0x103C3, 0x103C8, 0x103CF, 0x10400, 0x1049D, 0x104B0, 0x104D3, 0x104D8, 0x104FB,
    0x10500, 0x10527, 0x10530, 0x10563, 0x10570, 0x1057A, 0x1057C, 0x1058A, 0x1058C, 0x10592,
    0x10594, 0x10595, 0x10597, 0x105A1, 0x105A3, 0x105B1, 0x105B3, 0x105B9, 0x105BB, 0x105BC,
    0x10600, 0x10736, 0x10740, 0x10755, 0x10760, 0x10767, 0x10780, 0x10785, 0x10787, 0x107B0,
    0x107B2, 0x107BA, 0x10800, 0x10805, 0x10808, 0x10808, 0x1080A, 0x10835, 0x10837, 0x10838,
    0x1083C, 0x1083C, 0x1083F, 0x10855, 0x10860, 0x10876, 0x10880, 0x1089E, 0x108E0, 0x108F2,
    0x108F4, 0x108F5, 0x10900, 0x10915, 0x10920, 0x10939, 0x10980, 0x109B7, 0x109BE, 0x109BF,
    0x10A00, 0x10A00, 0x10A10, 0x10A13, 0x10A15, 0x10A17, 0x10A19, 0x10A35, 0x10A60, 0x10A7C,
    0x10A80, 0x10A9C, 0x10AC0, 0x10AC7, 0x10AC9, 0x10AE4, 0x10B00, 0x10B35, 0x10B40, 0x10B55,
    0x10B60, 0x10B72, 0x10B80, 0x10B91, 0x10C00, 0x10C48, 0x10C80, 0x10CB2, 0x10CC0, 0x10CF2,
    0x10D00, 0x10D23, 0x10E80, 0x10EA9, 0x10EB0, 0x10EB1, 0x10F00, 0x10F1C, 0x10F27, 0x10F27,
    0x10F30, 0x10F45, 0x10F70, 0x10F81, 0x10FB0, 0x10FC4, 0x10FE0, 0x10FF6, 0x11003, 0x11037,
    0x11071, 0x11072, 0x11075, 0x11075, 0x11083, 0x110AF, 0x110D0, 0x110E8, 0x11103, 0x11126,
    0x11144, 0x11144, 0x11147, 0x11147, 0x11150, 0x11172, 0x11176, 0x11176, 0x11183, 0x111B2,
    0x111C1, 0x111C4, 0x111DA, 0x111DA, 0x111DC, 0x111DC, 0x11200, 0x11211, 0x11213, 0x1122B,
    0x1123F, 0x11240, 0x11280, 0x11286, 0x11288, 0x11288, 0x1128A, 0x1128D, 0x1128F, 0x1129D,
    0x1129F, 0x112A8, 0x112B0, 0x112DE, 0x11305, 0x1130C, 0x1130F, 0x11310, 0x11313, 0x11328,
    0x1132A, 0x11330, 0x11332, 0x11333, 0x11335, 0x11339, 0x1133D, 0x1133D, 0x11350, 0x11350,
    0x1135D, 0x11361, 0x11400, 0x11434, 0x11447, 0x1144A, 0x1145F, 0x11461, 0x11480, 0x114AF,
    0x114C4, 0x114C5, 0x114C7, 0x114C7, 0x11580, 0x115AE, 0x115D8, 0x115DB, 0x11600, 0x1162F,
    0x11644, 0x11644, 0x11680, 0x116AA, 0x116B8, 0x116B8, 0x11700, 0x1171A, 0x11740, 0x11746,
    0x11800, 0x1182B, 0x118A0, 0x118DF, 0x118FF, 0x11906, 0x11909, 0x11909, 0x1190C, 0x11913,
    0x11915, 0x11916, 0x11918, 0x1192F, 0x1193F, 0x1193F, 0x11941, 0x11941, 0x119A0, 0x119A7,
    0x119AA, 0x119D0, 0x119E1, 0x119E1, 0x119E3, 0x119E3, 0x11A00, 0x11A00, 0x11A0B, 0x11A32,
    0x11A3A, 0x11A3A, 0x11A50, 0x11A50, 0x11A5C, 0x11A89, 0x11A9D, 0x11A9D, 0x11AB0, 0x11AF8,
    0x11C00, 0x11C08, 0x11C0A, 0x11C2E, 0x11C40, 0x11C40, 0x11C72, 0x11C8F, 0x11D00, 0x11D06,
    0x11D08, 0x11D09, 0x11D0B, 0x11D30, 0x11D46, 0x11D46, 0x11D60, 0x11D65, 0x11D67, 0x11D68,
    0x11D6A, 0x11D89, 0x11D98, 0x11D98, 0x11EE0, 0x11EF2, 0x11F02, 0x11F02, 0x11F04, 0x11F10,
    0x11F12, 0x11F33, 0x11FB0, 0x11FB0, 0x12000, 0x12399, 0x12480, 0x12543, 0x12F90, 0x12FF0,
    0x13000, 0x1342F, 0x13441, 0x13446, 0x14400, 0x14646, 0x16800, 0x16A38, 0x16A40, 0x16A5E,
    0x16A70, 0x16ABE, 0x16AD0, 0x16AED, 0x16B00, 0x16B2F, 0x16B40, 0x16B43, 0x16B63, 0x16B77,
    0x16B7D, 0x16B8F, 0x16E40, 0x16E7F, 0x16F00, 0x16F4A, 0x16F50, 0x16F50, 0x16F93, 0x16F9F,
    0x16FE0, 0x16FE1, 0x16FE3, 0x16FE3, 0x17000, 0x187F7, 0x18800, 0x18CD5, 0x18D00, 0x18D08,
    0x1AFF0, 0x1AFF3, 0x1AFF5, 0x1AFFB, 0x1AFFD, 0x1AFFE, 0x1B000, 0x1B122, 0x1B132, 0x1B132,
    0x1B150, 0x1B152, 0x1B155, 0x1B155, 0x1B164, 0x1B167, 0x1B170, 0x1B2FB, 0x1BC00, 0x1BC6A,
    0x1BC70, 0x1BC7C, 0x1BC80, 0x1BC88, 0x1BC90, 0x1BC99, 0x1D400, 0x1D454, 0x1D456, 0x1D49C,
    0x1D49E, 0x1D49F, 0x1D4A2, 0x1D4A2, 0x1D4A5, 0x1D4A6, 0x1D4A9, 0x1D4AC, 0x1D4AE, 0x1D4B9,
    0x1D4BB, 0x1D4BB, 0x1D4BD, 0x1D4C3, 0x1D4C5, 0x1D505, 0x1D507, 0x1D50A, 0x1D50D, 0x1D514,
    0x1D516, 0x1D51C, 0x1D51E, 0x1D539, 0x1D53B, 0x1D53E, 0x1D540, 0x1D544, 0x1D546, 0x1D546,
    0x1D54A, 0x1D550, 0x1D552, 0x1D6A5, 0x1D6A8, 0x1D6C0, 0x1D6C2, 0x1D6DA, 0x1D6DC, 0x1D6FA,
    0x1D6FC, 0x1D714, 0x1D716, 0x1D734, 0x1D736, 0x1D74E, 0x1D750, 0x1D76E, 0x1D770, 0x1D788,
    0x1D78A, 0x1D7A8, 0x1D7AA, 0x1D7C2, 0x1D7C4, 0x1D7CB, 0x1DF00, 0x1DF1E, 0x1DF25, 0x1DF2A,
    0x1E030, 0x1E06D, 0x1E100, 0x1E12C, 0x1E137, 0x1E13D, 0x1E14E, 0x1E14E, 0x1E290, 0x1E2AD,
    0x1E2C0, 0x1E2EB, 0x1E4D0, 0x1E4EB, 0x1E7E0, 0x1E7E6, 0x1E7E8, 0x1E7EB, 0x1E7ED, 0x1E7EE,
    0x1E7F0, 0x1E7FE, 0x1E800, 0x1E8C4, 0x1E900, 0x1E943, 0x1E94B, 0x1E94B, 0x1EE00, 0x1EE03,
    0x1EE05, 0x1EE1F, 0x1EE21, 0x1EE22, 0x1EE24, 0x1EE24, 0x1EE27, 0x1EE27, 0x1EE29, 0x1EE32,
    0x1EE34, 0x1EE37, 0x1EE39, 0x1EE39, 0x1EE3B, 0x1EE3B, 0x1EE42, 0x1EE42, 0x1EE47, 0x1EE47,
    0x1EE49, 0x1EE49, 0x1EE4B, 0x1EE4B, 0x1EE4D, 0x1EE4F, 0x1EE51, 0x1EE52, 0x1EE54, 0x1EE54,
    0x1EE57, 0x1EE57, 0x1EE59, 0x1EE59, 0x1EE5B, 0x1EE5B, 0x1EE5D, 0x1EE5D, 0x1EE5F, 0x1EE5F,
    0x1EE61, 0x1EE62, 0x1EE64, 0x1EE64, 0x1EE67, 0x1EE6A, 0x1EE6C, 0x1EE72, 0x1EE74, 0x1EE77,
    0x1EE79, 0x1EE7C, 0x1EE7E, 0x1EE7E, 0x1EE80, 0x1EE89, 0x1EE8B, 0x1EE9B, 0x1EEA1, 0x1EEA3,
    0x1EEA5, 0x1EEA9, 0x1EEAB, 0x1EEBB, 0x20000, 0x2A6DF, 0x2A700, 0x2B739, 0x2B740, 0x2B81D,
    0x2B820, 0x2CEA1, 0x2CEB0, 0x2EBE0, 0x2F800, 0x2FA1D, 0x30000, 0x3134A, 0x31350, 0x323AF,
];
const DECIMAL_DIGIT: &[u32] = &[
    0x30, 0x39, 0x660, 0x669, 0x6F0, 0x6F9, 0x7C0, 0x7C9, 0x966, 0x96F, 0x9E6, 0x9EF, 0xA66, 0xA6F,
    0xAE6, 0xAEF, 0xB66, 0xB6F, 0xBE6, 0xBEF, 0xC66, 0xC6F, 0xCE6, 0xCEF, 0xD66, 0xD6F, 0xDE6,
    0xDEF, 0xE50, 0xE59, 0xED0, 0xED9, 0xF20, 0xF29, 0x1040, 0x1049, 0x1090, 0x1099, 0x17E0,
    0x17E9, 0x1810, 0x1819, 0x1946, 0x194F, 0x19D0, 0x19D9, 0x1A80, 0x1A89, 0x1A90, 0x1A99, 0x1B50,
    0x1B59, 0x1BB0, 0x1BB9, 0x1C40, 0x1C49, 0x1C50, 0x1C59, 0xA620, 0xA629, 0xA8D0, 0xA8D9, 0xA900,
    0xA909, 0xA9D0, 0xA9D9, 0xA9F0, 0xA9F9, 0xAA50, 0xAA59, 0xABF0, 0xABF9, 0xFF10, 0xFF19,
    0x104A0, 0x104A9, 0x10D30, 0x10D39, 0x11066, 0x1106F, 0x110F0, 0x110F9, 0x11136, 0x1113F,
    0x111D0, 0x111D9, 0x112F0, 0x112F9, 0x11450, 0x11459, 0x114D0, 0x114D9, 0x11650, 0x11659,
    0x116C0, 0x116C9, 0x11730, 0x11739, 0x118E0, 0x118E9, 0x11950, 0x11959, 0x11C50, 0x11C59,
    0x11D50, 0x11D59, 0x11DA0, 0x11DA9, 0x11F50, 0x11F59, 0x16A60, 0x16A69, 0x16AC0, 0x16AC9,
    0x16B50, 0x16B59, 0x1D7CE, 0x1D7FF, 0x1E140, 0x1E149, 0x1E2F0, 0x1E2F9, 0x1E4F0, 0x1E4F9,
    0x1E950, 0x1E959, 0x1FBF0, 0x1FBF9,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn word(input: &str, pairs: &[(&str, &str)]) -> Result<String, ShellError> {
        Lexer::new('\\').process_word(input, &env(pairs))
    }

    fn ok(input: &str, pairs: &[(&str, &str)]) -> String {
        word(input, pairs).unwrap_or_else(|e| panic!("{input:?}: {e}"))
    }

    #[test]
    fn unset_variable_with_question_mark_is_an_error() {
        let err = word("a${FOO?}", &[]).unwrap_err();
        assert_eq!(err.to_string(), "FOO: is not allowed to be unset");
        assert!(matches!(err, ShellError::UnsetVariable { offset: 1, .. }));
        assert_eq!(ok("${FOO?}", &[("FOO", "")]), "");
    }

    #[test]
    fn empty_variable_with_colon_question_mark_is_an_error() {
        let err = word("${FOO:?}", &[("FOO", "")]).unwrap_err();
        assert_eq!(err.to_string(), "FOO: is not allowed to be empty");
        assert_eq!(ok("${FOO:?}", &[("FOO", "x")]), "x");
    }

    #[test]
    fn question_mark_message_is_expanded() {
        let err = word("${VAR:?need $WHAT}", &[("WHAT", "it")]).unwrap_err();
        assert_eq!(err.to_string(), "VAR: need it");
    }

    #[test]
    fn default_and_alternative_words_distinguish_unset_from_empty() {
        let e = [("EMPTY", ""), ("SET", "v")];
        assert_eq!(
            ok("${EMPTY-d}|${EMPTY:-d}|${UNSET-d}|${SET:-d}", &e),
            "|d|d|v"
        );
        assert_eq!(
            ok("${EMPTY+a}|${EMPTY:+a}|${UNSET+a}|${SET:+a}", &e),
            "a|||a"
        );
    }

    #[test]
    fn unused_default_word_is_still_expanded() {
        let x = Lexer::new('\\')
            .process_word_with_matches("${SET:-$OTHER}", &env(&[("SET", "v")]))
            .unwrap();
        assert_eq!(x.value, "v");
        assert!(x.unmatched.contains("OTHER"));
        assert!(word("${SET:-${NOPE:?}}", &[("SET", "v")]).is_err());
    }

    #[test]
    fn single_quotes_are_literal() {
        assert_eq!(ok(r#"'$X \n "q"'"#, &[("X", "x")]), r#"$X \n "q""#);
    }

    #[test]
    fn escape_in_double_quotes_only_escapes_quote_dollar_and_itself() {
        assert_eq!(ok(r#""\"\$\\\n""#, &[]), r#""$\\n"#);
        assert_eq!(ok(r"a\nb\ c", &[]), "anb c");
    }

    #[test]
    fn trailing_escape_is_dropped() {
        assert_eq!(ok(r"abc\", &[]), "abc");
    }

    #[test]
    fn backtick_escape_token_makes_backslash_ordinary() {
        let lexer = Lexer::new('`');
        let e = env(&[("X", "x")]);
        assert_eq!(lexer.process_word(r"C:\dir\$X", &e).unwrap(), r"C:\dir\x");
        assert_eq!(lexer.process_word("`$X `\"", &e).unwrap(), "$X \"");
    }

    #[test]
    fn raw_quotes_keeps_quote_characters() {
        let lexer = Lexer::new('\\').raw_quotes(true);
        let got = lexer.process_word(r#"'a b'"$X""#, &env(&[("X", "x")]));
        assert_eq!(got.unwrap(), r#"'a b'"x""#);
    }

    #[test]
    fn raw_escapes_keeps_escape_tokens() {
        let lexer = Lexer::new('\\').raw_escapes(true);
        let e = env(&[]);
        assert_eq!(lexer.process_word(r"a\ b\$", &e).unwrap(), r"a\ b\$");
        // Inside double quotes an escape token that escapes nothing is doubled.
        assert_eq!(lexer.process_word(r#""a\b\$""#, &e).unwrap(), r"a\\b\$");
        // `-` words never keep escapes.
        assert_eq!(lexer.process_word(r"${U:-\$}", &e).unwrap(), "$");
    }

    #[test]
    fn skip_unset_leaves_unset_references_as_written() {
        let lexer = Lexer::new('\\').skip_unset(true);
        let e = env(&[("SET", "v")]);
        let got = lexer.process_word("$U ${U} ${U:-$SET} ${U:?} ${U##a*} ${SET}", &e);
        assert_eq!(got.unwrap(), "$U ${U} ${U:-v} ${U:?} ${U##a*} v");
        // BuildKit writes the replace-all form back with a single slash.
        let got = lexer.process_word("${U//a/b}", &e);
        assert_eq!(got.unwrap(), "${U/a/b}");
    }

    #[test]
    fn positional_and_special_parameters_are_looked_up_by_name() {
        let x = Lexer::new('\\')
            .process_word_with_matches("$1$001x$@@$$ ${#}", &env(&[("1", "one")]))
            .unwrap();
        assert_eq!(x.value, "one".to_owned() + "x@ ");
        let names: Vec<&str> = x.unmatched.iter().map(String::as_str).collect();
        assert_eq!(names, ["#", "$", "001", "@"]);
    }

    #[test]
    fn non_ascii_letters_and_digits_continue_a_variable_name() {
        let e = [("KÖR", "k"), ("X٣", "arabic-indic three")];
        assert_eq!(ok("$KÖR.$X٣", &e), "k.arabic-indic three");
        // Superscript two is a number but not a decimal digit.
        assert_eq!(ok("$²", &e), "$²");
        // A combining mark is not a letter.
        assert_eq!(ok("$KÖR\u{301}", &e), "k\u{301}");
    }

    #[test]
    fn letter_and_digit_tables_agree_with_std_properties() {
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            if is_go_letter(c) {
                assert!(c.is_alphabetic(), "{c:?} is L but not Alphabetic");
            }
            if is_go_digit(c) {
                assert!(c.is_numeric(), "{c:?} is Nd but not numeric");
                assert!(!is_go_letter(c), "{c:?} is both L and Nd");
            }
        }
    }

    #[test]
    fn malformed_substitutions_are_errors_with_offsets() {
        assert_eq!(
            word("ab${}", &[]).unwrap_err(),
            ShellError::BadSubstitution { offset: 2 }
        );
        assert_eq!(
            word("x${A:-${B}", &[]).unwrap_err(),
            ShellError::MissingBrace { offset: 1 }
        );
        assert_eq!(
            word("${A/x", &[]).unwrap_err(),
            ShellError::MissingSlash { offset: 0 }
        );
        assert_eq!(
            word("${A:=x}", &[]).unwrap_err().to_string(),
            "unsupported modifier (:=) in substitution (at byte 0)"
        );
        assert!(matches!(
            word("${A:#x}", &[]).unwrap_err(),
            ShellError::UnsupportedModifier { ref modifier, .. } if modifier == ":#"
        ));
        assert_eq!(
            word("a 'b", &[]).unwrap_err(),
            ShellError::UnterminatedSingleQuote { offset: 2 }
        );
        assert_eq!(
            word("\"b", &[]).unwrap_err(),
            ShellError::UnterminatedDoubleQuote { offset: 0 }
        );
    }

    #[test]
    fn invalid_pattern_escape_is_an_error() {
        let err = word(r"${A#\x}", &[("A", "x")]).unwrap_err();
        assert_eq!(
            err,
            ShellError::InvalidPattern {
                pattern: r"\x".to_owned(),
                escaped: Some('x'),
                offset: 0
            }
        );
        assert_eq!(
            err.to_string(),
            r"invalid pattern (\x) in substitution: invalid escape '\x' (at byte 0)"
        );
        assert!(word(r"${A%a\}", &[("A", "x")]).is_err());
    }

    #[test]
    fn shortest_and_longest_prefix_and_suffix_removal() {
        let e = [("P", "a/b/c.tar.gz")];
        assert_eq!(ok("${P#*/}", &e), "b/c.tar.gz");
        assert_eq!(ok("${P##*/}", &e), "c.tar.gz");
        assert_eq!(ok("${P%.*}", &e), "a/b/c.tar");
        assert_eq!(ok("${P%%.*}", &e), "a/b/c");
        assert_eq!(ok("${P#?/?}", &e), "/c.tar.gz");
        assert_eq!(ok("${P#x*}", &e), "a/b/c.tar.gz");
    }

    #[test]
    fn wildcards_do_not_match_newlines() {
        let e = [("V", "a\nb\nc")];
        assert_eq!(ok("${V##*}", &e), "\nb\nc");
        assert_eq!(ok("${V%%*}", &e), "a\nb\n");
        assert_eq!(ok("${V#a?b}", &e), "a\nb\nc");
        assert_eq!(ok("${V//*/x}", &e), "x\nx\nx");
    }

    #[test]
    fn replace_first_inserts_the_replacement_literally() {
        let e = [("V", "foo")];
        assert_eq!(ok("${V/o/'$0'}", &e), "f$0o");
        assert_eq!(ok("${V/x/y}", &e), "foo");
    }

    #[test]
    fn replace_all_expands_dollar_zero_as_the_match() {
        let e = [("V", "foo")];
        assert_eq!(ok("${V//o/'[$0]'}", &e), "f[o][o]");
        assert_eq!(ok("${V//o/'${0}$1$$'}", &e), "fo$o$");
        assert_eq!(ok("${V//o/'$'}", &e), "f$$");
    }

    #[test]
    fn replace_all_with_empty_pattern_inserts_between_characters() {
        assert_eq!(ok("${V//$E/-}", &[("V", "añc"), ("E", "")]), "-a-ñ-c-");
        assert_eq!(ok("${V/$E/-}", &[("V", "abc"), ("E", "")]), "-abc");
    }

    #[test]
    fn lazy_and_greedy_stars_follow_backtracking_priority() {
        let e = [("V", "xaxbxb")];
        assert_eq!(ok("${V#*x*b}", &e), "xb");
        assert_eq!(ok("${V##*x*b}", &e), "");
        assert_eq!(ok("${V%x*}", &e), "xaxb");
        assert_eq!(ok("${V%%x*}", &e), "");
        assert_eq!(ok("${V/x*b/-}", &e), "-");
    }

    #[test]
    fn process_words_splits_unquoted_expansions_only() {
        let lexer = Lexer::new('\\');
        let e = env(&[("S", " a  b ")]);
        let words = lexer
            .process_words(r#"x$S"$S"y ${U:-p q}z '' "" \ "#, &e)
            .unwrap();
        assert_eq!(words, ["x", "a", "b", " a  b y", "p", "qz", " "]);
        // Text before a nested form stays in its word.
        let words = lexer.process_words("a${U:-b c}d", &e).unwrap();
        assert_eq!(words, ["ab", "cd"]);
    }

    #[test]
    fn case_insensitive_names_find_any_case() {
        let lexer = Lexer::new('\\').case_insensitive_names(true);
        let list = env(&[("Path", "1"), ("PATH", "2")]);
        assert_eq!(lexer.process_word("$path", &list).unwrap(), "2");
        let map: HashMap<String, String> = list.iter().cloned().collect();
        assert_eq!(lexer.process_word("$path", &map).unwrap(), "2");
        assert_eq!(lexer.process_word("$Path", &map).unwrap(), "1");
        let tree: BTreeMap<String, String> = list.iter().cloned().collect();
        assert_eq!(lexer.process_word("$pATH", &tree).unwrap(), "2");
        assert_eq!(Lexer::new('\\').process_word("$path", &map).unwrap(), "");
    }

    #[test]
    fn ordered_list_environment_last_entry_wins() {
        let list = env(&[("A", "1"), ("A", "2")]);
        assert_eq!(Lexer::new('\\').process_word("$A", &list).unwrap(), "2");
        assert_eq!(
            Lexer::new('\\')
                .process_word("$A", &list.as_slice())
                .unwrap(),
            "2"
        );
    }

    #[test]
    fn leading_byte_order_mark_is_dropped() {
        assert_eq!(ok("\u{FEFF}a\u{FEFF}", &[]), "a\u{FEFF}");
    }

    #[test]
    fn nesting_beyond_the_limit_is_an_error_not_a_crash() {
        let deep = |n: usize| "${A:-".repeat(n) + &"}".repeat(n);
        // Run on a small stack to be sure the permitted depth fits anywhere.
        let handle = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || {
                let at_limit = word(&deep(MAX_NESTING), &[]);
                let quoted = word(&"\"${A:-".repeat(MAX_NESTING), &[]);
                let beyond = word(&deep(MAX_NESTING + 1), &[]);
                (at_limit, quoted, beyond)
            })
            .unwrap();
        let (at_limit, quoted, beyond) = handle.join().unwrap();
        assert_eq!(at_limit.unwrap(), "");
        assert!(matches!(
            quoted,
            Err(ShellError::MissingBrace { offset: 1 })
        ));
        assert!(matches!(beyond, Err(ShellError::TooDeep { .. })));
        let wide = word(&deep(200_000), &[]);
        assert!(matches!(wide, Err(ShellError::TooDeep { .. })));
    }

    #[test]
    fn megabyte_words_and_values_expand_in_linear_time() {
        let big = "ab $X \"q\" ".repeat(100_000);
        let start = std::time::Instant::now();
        let words = Lexer::new('\\')
            .process_words(&big, &env(&[("X", "x y")]))
            .unwrap();
        assert_eq!(words.len(), 400_000);
        let value = "ab".repeat(500_000);
        let e = [("V", value.as_str())];
        assert_eq!(ok("${V//b/}", &e).len(), 500_000);
        assert_eq!(ok("${V##*a}", &e), "b");
        assert_eq!(ok("${V%a*}", &e).len(), 999_998);
        assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
    }

    #[test]
    fn pathological_patterns_do_not_backtrack_exponentially() {
        let value = "a".repeat(20_000);
        let pattern = "*a".repeat(30) + "b";
        let start = std::time::Instant::now();
        let input = format!("${{V#{pattern}}}|${{V%%{pattern}}}|${{V//{pattern}/x}}");
        let expected = format!("{value}|{value}|{value}");
        assert_eq!(ok(&input, &[("V", &value)]), expected);
        assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
    }

    #[test]
    fn reverse_pattern_keeps_escape_pairs_in_order() {
        assert_eq!(reverse_pattern(r"a\*c"), r"c\*a");
        assert_eq!(reverse_pattern(r"\\\ab"), r"b\a\\");
        assert_eq!(reverse_pattern(r"ab\"), r"\ba");
    }

    proptest::proptest! {
        #[test]
        fn any_input_gives_a_result_or_an_error_without_panicking(
            input in r#"[$\{\}:\-+?#%/'"\\`*a-c0-9 \n\u{FEFF}é]{0,40}"#,
            raw in proptest::bool::ANY,
        ) {
            let e = env(&[("a", "a*b"), ("b", ""), ("c", "x\ny")]);
            for escape in ['\\', '`'] {
                let lexer = Lexer::new(escape).raw_quotes(raw).raw_escapes(raw).skip_unset(raw);
                let _ = lexer.process_word(&input, &e);
                let _ = lexer.process_words(&input, &e);
                let _ = lexer.process_word_with_matches(&input, &e);
            }
        }

        #[test]
        fn text_without_special_characters_is_unchanged(input in "[a-zA-Z0-9 ./_=,-]{0,40}") {
            proptest::prop_assert_eq!(ok(&input, &[]), input);
        }
    }
}
