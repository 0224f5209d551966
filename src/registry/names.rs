//! The name grammar of images and projects, and the ids the registry hands out.
//!
//! A name is `[a-z0-9][a-z0-9._-]{0,62}`: 1 to 63 characters, lowercase ASCII letters, digits,
//! `.`, `_` and `-`, starting with a letter or digit. Project names follow the same grammar.

use std::fmt;

/// A valid image or project name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// Empty.
    Empty,
    /// Longer than 63 characters.
    TooLong(usize),
    /// Starts with something other than `[a-z0-9]`.
    BadStart(char),
    /// Holds a character outside `[a-z0-9._-]`.
    BadChar(char),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => write!(f, "it is empty"),
            NameError::TooLong(n) => write!(f, "it has {n} characters, at most 63 are allowed"),
            NameError::BadStart(c) => write!(f, "it starts with {c:?}; use a-z or 0-9"),
            NameError::BadChar(c) => {
                write!(
                    f,
                    "it contains {c:?}; only a-z, 0-9, '.', '_' and '-' are allowed"
                )
            }
        }
    }
}

impl Name {
    /// The grammar, for messages.
    pub const GRAMMAR: &'static str = "[a-z0-9][a-z0-9._-]{0,62}";

    /// Checks `s` against the grammar.
    pub fn parse(s: &str) -> Result<Name, NameError> {
        let mut chars = s.chars();
        let first = chars.next().ok_or(NameError::Empty)?;
        let n = s.chars().count();
        if n > 63 {
            return Err(NameError::TooLong(n));
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(NameError::BadStart(first));
        }
        if let Some(c) =
            chars.find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(*c)))
        {
            return Err(NameError::BadChar(c));
        }
        Ok(Name(s.to_string()))
    }

    /// A default name from a directory or file stem: lowercased, every other character
    /// becomes `-`, cut to 63 (CLI.md). `None` if nothing valid remains.
    pub fn from_stem(stem: &str) -> Option<Name> {
        let s: String = stem
            .chars()
            .flat_map(char::to_lowercase)
            .map(|c| {
                if c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(63)
            .collect();
        Name::parse(&s).ok()
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An image id: `img_` + ULID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageId(String);

impl ImageId {
    /// A new id.
    pub fn generate() -> Self {
        ImageId(format!("img_{}", ulid::Ulid::generate()))
    }

    /// Parses `img_` + ULID.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("img_")?;
        let u = ulid::Ulid::from_string(rest).ok()?;
        (u.to_string() == rest).then(|| ImageId(s.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! name_ok {
        ($($case:ident: $s:expr;)*) => {$(
            #[test]
            fn $case() { assert!(Name::parse($s).is_ok(), "{}", $s); }
        )*};
    }
    macro_rules! name_bad {
        ($($case:ident: $s:expr => $err:pat,)*) => {$(
            #[test]
            fn $case() { assert!(matches!(Name::parse($s), Err($err)), "{}", $s); }
        )*};
    }

    name_ok! {
        single_letter_is_a_name: "a";
        digits_and_punctuation_inside_are_fine: "py-tools_3.12";
        sixty_three_characters_are_allowed: &"a".repeat(63);
    }
    name_bad! {
        empty_is_rejected: "" => NameError::Empty,
        sixty_four_characters_are_too_long: &"a".repeat(64) => NameError::TooLong(64),
        uppercase_is_rejected: "Py" => NameError::BadStart('P'),
        leading_dash_is_rejected: "-x" => NameError::BadStart('-'),
        leading_dot_is_rejected: ".x" => NameError::BadStart('.'),
        slash_is_rejected: "a/b" => NameError::BadChar('/'),
        space_is_rejected: "a b" => NameError::BadChar(' '),
        non_ascii_is_rejected: "caf\u{e9}" => NameError::BadChar('\u{e9}'),
    }

    #[test]
    fn stems_become_names() {
        assert_eq!(
            Name::from_stem("My App").map(|n| n.0),
            Some("my-app".into())
        );
        assert_eq!(Name::from_stem("-x"), None);
    }

    #[test]
    fn image_ids_round_trip() {
        let id = ImageId::generate();
        assert_eq!(ImageId::parse(id.as_str()), Some(id));
        assert_eq!(ImageId::parse("img_nope"), None);
    }
}
