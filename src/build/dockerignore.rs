//! `.dockerignore` with Docker's semantics, not gitignore's: a port of moby's
//! `ignorefile.ReadAll` (line rules) and `patternmatcher` (matching), both Apache-2.0.
//!
//! Knows nothing of the file system: it answers "is this context-relative path excluded?".
//! The walker (`context`) decides how to use that (prune a directory only when no `!`
//! pattern could re-include something below it).
//!
//! Rules, in short: `#` starts a comment only in column 1; lines are trimmed and
//! `filepath.Clean`ed, one leading `/` dropped; `*` and `?` never cross `/`; `**` spans any
//! number of directories; `[...]` classes negate with `^`; there is no `{a,b}`; a pattern
//! that matches a parent directory excludes everything below it; the last matching pattern
//! decides, and `!` patterns re-include.

use regex::Regex;

/// A pattern that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// `!` on its own.
    #[error("illegal exclusion pattern: \"!\"")]
    LoneExclusion,
    /// Malformed per Go's `filepath.Match` (unclosed `[`, bad range, trailing `\`).
    #[error("syntax error in pattern {pattern:?}: {reason}")]
    Syntax {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Go's `path/filepath.Clean` for `/`-separated paths.
pub fn clean(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            s => parts.push(s),
        }
    }
    let body = parts.join("/");
    if rooted {
        format!("/{body}")
    } else if body.is_empty() {
        ".".into()
    } else {
        body
    }
}

/// `ignorefile.ReadAll`: the patterns of a `.dockerignore` text, in order.
pub fn read_patterns(text: &str) -> Vec<String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut p = String::new();
        if !pattern.is_empty() {
            p = clean(pattern);
            if p.len() > 1 && p.starts_with('/') {
                p.remove(0);
            }
        }
        out.push(if invert { format!("!{p}") } else { p });
    }
    out
}

#[derive(Debug, Clone)]
enum Kind {
    Exact,
    Prefix,
    Suffix,
    Regex(Regex),
}

#[derive(Debug, Clone)]
struct Pattern {
    exclusion: bool,
    cleaned: String,
    kind: Kind,
}

/// Characters `filepath.Match` gives no meaning that are special in a regex.
fn regex_special(c: char) -> bool {
    ".+()|{}$".contains(c)
}

impl Pattern {
    fn new(cleaned: String, exclusion: bool) -> Result<Pattern, PatternError> {
        validate(&cleaned)?;
        #[derive(PartialEq)]
        enum T {
            Exact,
            Prefix,
            Suffix,
            Regex,
        }
        let chars: Vec<char> = cleaned.chars().collect();
        let mut re = String::from("^");
        let mut t = T::Exact;
        let mut i = 0;
        let mut first = true;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            match c {
                '*' if chars.get(i) == Some(&'*') => {
                    i += 1;
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    if i >= chars.len() {
                        if t == T::Exact {
                            t = T::Prefix;
                        } else {
                            re.push_str(".*");
                            t = T::Regex;
                        }
                    } else {
                        re.push_str("(.*/)?");
                        t = T::Regex;
                    }
                    if first {
                        t = T::Suffix;
                    }
                }
                '*' => {
                    re.push_str("[^/]*");
                    t = T::Regex;
                }
                '?' => {
                    re.push_str("[^/]");
                    t = T::Regex;
                }
                c if regex_special(c) => {
                    re.push('\\');
                    re.push(c);
                }
                '\\' => match chars.get(i) {
                    Some(&n) => {
                        i += 1;
                        re.push('\\');
                        re.push(n);
                        t = T::Regex;
                    }
                    None => re.push_str("\\\\"),
                },
                '[' | ']' => {
                    re.push(c);
                    t = T::Regex;
                }
                c => re.push(c),
            }
            first = false;
        }
        let kind = match t {
            T::Exact => Kind::Exact,
            T::Prefix => Kind::Prefix,
            T::Suffix => Kind::Suffix,
            T::Regex => {
                re.push('$');
                Kind::Regex(Regex::new(&re).map_err(|_| PatternError::Syntax {
                    pattern: cleaned.clone(),
                    reason: "not a valid pattern",
                })?)
            }
        };
        Ok(Pattern {
            exclusion,
            cleaned,
            kind,
        })
    }

    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact => path == self.cleaned,
            Kind::Prefix => path.starts_with(&self.cleaned[..self.cleaned.len() - 2]),
            Kind::Suffix => {
                let suffix = &self.cleaned[2..];
                path.ends_with(suffix) || suffix.strip_prefix('/').is_some_and(|rest| path == rest)
            }
            Kind::Regex(r) => r.is_match(path),
        }
    }
}

/// Go's `filepath.Match` syntax check: classes closed and well formed, no trailing `\`.
fn validate(p: &str) -> Result<(), PatternError> {
    let bad = |reason| {
        Err(PatternError::Syntax {
            pattern: p.to_string(),
            reason,
        })
    };
    let chars: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                if i + 1 >= chars.len() {
                    return bad("trailing backslash");
                }
                i += 2;
            }
            '[' => {
                i += 1;
                if chars.get(i) == Some(&'^') {
                    i += 1;
                }
                let mut n = 0;
                loop {
                    match chars.get(i) {
                        None => return bad("unclosed character class"),
                        Some(']') if n > 0 => {
                            i += 1;
                            break;
                        }
                        Some(_) => {}
                    }
                    // `[]`, `[-` and a `-` with no range start are malformed.
                    let Some(lo) = class_char(&chars, &mut i) else {
                        return bad("bad character class");
                    };
                    if chars.get(i) == Some(&'-') {
                        i += 1;
                        let Some(hi) = class_char(&chars, &mut i) else {
                            return bad("bad range in character class");
                        };
                        if hi < lo {
                            return bad("bad range in character class");
                        }
                    }
                    n += 1;
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// One (possibly escaped) character of a class; `None` for `-`, `]` or the end.
fn class_char(chars: &[char], i: &mut usize) -> Option<char> {
    match chars.get(*i)? {
        '-' | ']' => None,
        '\\' => {
            let c = *chars.get(*i + 1)?;
            *i += 2;
            Some(c)
        }
        &c => {
            *i += 1;
            Some(c)
        }
    }
}

/// A compiled `.dockerignore`.
#[derive(Debug, Clone)]
pub struct Matcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
}

impl Matcher {
    /// `patternmatcher.New` over patterns as [`read_patterns`] returns them.
    pub fn new(patterns: &[String]) -> Result<Matcher, PatternError> {
        let mut out = Vec::with_capacity(patterns.len());
        let mut exclusions = false;
        for p in patterns {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            let p = clean(p);
            let (exclusion, p) = match p.strip_prefix('!') {
                Some("") => return Err(PatternError::LoneExclusion),
                Some(rest) => (true, rest.to_string()),
                None => (false, p),
            };
            exclusions |= exclusion;
            out.push(Pattern::new(p, exclusion)?);
        }
        Ok(Matcher {
            patterns: out,
            exclusions,
        })
    }

    /// Parses a `.dockerignore` text.
    pub fn parse(text: &str) -> Result<Matcher, PatternError> {
        Matcher::new(&read_patterns(text))
    }

    /// True when some `!` pattern may re-include a path below an excluded directory, so the
    /// walker must not prune.
    pub fn has_exclusions(&self) -> bool {
        self.exclusions
    }

    /// True when nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// `MatchesOrParentMatches`: is the context-relative, `/`-separated `path` excluded?
    pub fn excluded(&self, path: &str) -> bool {
        let parent = path.rfind('/').map_or(".", |i| &path[..i]);
        let mut matched = false;
        for p in &self.patterns {
            // An inclusion can only flip an excluded path back, and vice versa.
            if p.exclusion != matched {
                continue;
            }
            let mut m = p.matches(path);
            if !m && parent != "." {
                m = parent
                    .match_indices('/')
                    .map(|(i, _)| &parent[..i])
                    .chain(std::iter::once(parent))
                    .any(|prefix| p.matches(prefix));
            }
            if m {
                matched = !p.exclusion;
            }
        }
        matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! excluded {
        ($name:ident, $ignore:expr, $path:expr, $want:expr) => {
            #[test]
            fn $name() {
                let m = Matcher::parse($ignore).expect("patterns");
                assert_eq!(m.excluded($path), $want, "{:?} vs {:?}", $ignore, $path);
            }
        };
    }

    excluded!(a_name_is_anchored_at_the_root, "foo", "a/foo", false);
    excluded!(a_root_glob_does_not_descend, "*.log", "a/b.log", false);
    excluded!(trailing_slash_still_matches_a_file, "foo/", "foo", true);
    excluded!(leading_slash_is_dropped, "/foo", "foo", true);
    excluded!(dot_slash_is_cleaned, "./foo", "foo", true);
    excluded!(leading_spaces_are_trimmed, "   foo", "foo", true);
    excluded!(
        exception_under_excluded_dir,
        "dir\n!dir/keep",
        "dir/keep",
        false
    );
    excluded!(double_star_at_depth, "**/*.go", "a/b/c.go", true);
    excluded!(bang_in_class_is_literal, "[!a]bc", "xbc", false);
    excluded!(braces_are_literal, "{a,b}", "a", false);
    excluded!(child_of_excluded_dir, "foo", "foo/bar/baz", true);
    excluded!(double_star_matches_zero_dirs, "a/**/b", "a/b", true);
    excluded!(double_star_inside_a_name, "a**b", "a/x/b", true);
    excluded!(leading_double_star_is_a_suffix, "**foo", "x/yfoo", true);
    excluded!(
        last_match_wins,
        "*.md\n!README.md\nREADME*",
        "README.md",
        true
    );
    excluded!(
        star_excludes_dockerignore_itself,
        "*",
        ".dockerignore",
        true
    );
    excluded!(
        reinclude_dir_below_star,
        "dir/*\n!dir/sub",
        "dir/sub/f",
        false
    );
    excluded!(space_hash_is_a_pattern, " #x", "#x", true);
    excluded!(hash_in_column_one_is_a_comment, "#x", "#x", false);
    excluded!(caret_negates_a_class, "[^a]bc", "xbc", true);
    excluded!(question_mark_is_one_char, "a?c", "abc", true);
    excluded!(question_mark_does_not_cross_slash, "a?c", "a/c", false);
    excluded!(trailing_double_star_is_a_prefix, "foo/**", "foo/x/y", true);
    excluded!(trailing_double_star_needs_the_slash, "foo/**", "foo", false);
    excluded!(escaped_star_is_literal, "a\\*", "a*", true);
    excluded!(escaped_star_is_not_a_glob, "a\\*", "ab", false);
    excluded!(crlf_lines, "foo\r\nbar\r\n", "bar", true);
    excluded!(bom_is_stripped, "\u{feff}foo", "foo", true);
    excluded!(regex_chars_are_literal, "a.b", "axb", false);
    excluded!(dot_dot_is_cleaned_away, "a/../b", "b", true);

    #[test]
    fn lone_bang_is_an_error() {
        assert_eq!(
            Matcher::parse("!").expect_err("bad").to_string(),
            "illegal exclusion pattern: \"!\""
        );
    }

    #[test]
    fn malformed_classes_are_errors() {
        for bad in ["[", "[a", "[z-a]", "a\\", "[]a]", "[-a]"] {
            assert!(Matcher::parse(bad).is_err(), "{bad:?} must be rejected");
        }
        for good in ["[a-z]", "[^a]", "[\\]]", "a]"] {
            assert!(Matcher::parse(good).is_ok(), "{good:?} must be accepted");
        }
    }

    #[test]
    fn exclusions_are_reported_for_the_walker() {
        assert!(!Matcher::parse("a\nb").expect("ok").has_exclusions());
        assert!(Matcher::parse("a\n!a/b").expect("ok").has_exclusions());
    }

    #[test]
    fn clean_follows_go() {
        for (input, want) in [
            ("", "."),
            ("a/./b/", "a/b"),
            ("../a", "../a"),
            ("/../a", "/a"),
            ("a/../..", ".."),
            ("//a//b", "/a/b"),
        ] {
            assert_eq!(clean(input), want, "{input:?}");
        }
    }
}
