//! The JSON (exec) form of RUN/CMD/ENTRYPOINT/SHELL/COPY/ADD/VOLUME, decoded as Go's
//! `encoding/json` decodes it into `[]interface{}`.
//!
//! serde_json is not used here because the exec form's outcome hinges on Go's quirks: a lone
//! surrogate escape or an invalid UTF-8 byte decodes to U+FFFD instead of failing, nesting is
//! allowed 10,000 deep (serde_json stops at 128 and would flip a "not an array of strings"
//! error into a silent shell-form fallback), and only a valid array whose elements are all
//! strings is exec form. The validator is iterative, so hostile nesting cannot overflow the
//! stack.

/// Why a text is not exec form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Not valid JSON, or not an array: the caller falls back to shell form.
    Invalid,
    /// Valid JSON array with a non-string element: an error in BuildKit.
    NotStrings,
}

const MAX_DEPTH: usize = 10_000;

/// Decodes `text` (already left-trimmed) as a JSON array of strings.
pub fn parse_string_array(text: &str) -> Result<Vec<String>, JsonError> {
    let mut p = Cursor {
        b: text.as_bytes(),
        i: 0,
    };
    p.ws();
    if p.peek() != Some(b'[') {
        return Err(JsonError::Invalid);
    }
    p.i += 1;
    let mut items = Vec::new();
    let mut non_string = false;
    p.ws();
    if p.peek() == Some(b']') {
        p.i += 1;
    } else {
        loop {
            p.ws();
            if p.peek() == Some(b'"') {
                items.push(p.string()?);
            } else {
                p.value()?;
                non_string = true;
            }
            p.ws();
            match p.next() {
                Some(b',') => continue,
                Some(b']') => break,
                _ => return Err(JsonError::Invalid),
            }
        }
    }
    p.ws();
    if p.i != p.b.len() {
        return Err(JsonError::Invalid);
    }
    if non_string {
        return Err(JsonError::NotStrings);
    }
    Ok(items)
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn lit(&mut self, word: &[u8]) -> Result<(), JsonError> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(JsonError::Invalid)
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let h = self.b.get(self.i..self.i + 4).ok_or(JsonError::Invalid)?;
        let s = std::str::from_utf8(h).map_err(|_| JsonError::Invalid)?;
        if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(JsonError::Invalid);
        }
        self.i += 4;
        u32::from_str_radix(s, 16).map_err(|_| JsonError::Invalid)
    }

    /// A string starting at `"`, decoded.
    fn string(&mut self) -> Result<String, JsonError> {
        self.i += 1;
        let mut out = String::new();
        loop {
            let start = self.i;
            while let Some(c) = self.peek() {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.i += 1;
            }
            // The input is a &str, so the run is valid UTF-8.
            out.push_str(&String::from_utf8_lossy(&self.b[start..self.i]));
            match self.next() {
                Some(b'"') => return Ok(out),
                Some(b'\\') => {}
                _ => return Err(JsonError::Invalid),
            }
            match self.next() {
                Some(b'"') => out.push('"'),
                Some(b'\\') => out.push('\\'),
                Some(b'/') => out.push('/'),
                Some(b'b') => out.push('\u{8}'),
                Some(b'f') => out.push('\u{c}'),
                Some(b'n') => out.push('\n'),
                Some(b'r') => out.push('\r'),
                Some(b't') => out.push('\t'),
                Some(b'u') => {
                    let hi = self.hex4()?;
                    if (0xD800..0xDC00).contains(&hi) && self.b[self.i..].starts_with(b"\\u") {
                        let save = self.i;
                        self.i += 2;
                        let lo = self.hex4()?;
                        if (0xDC00..0xE000).contains(&lo) {
                            let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                            out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                            continue;
                        }
                        // Not a pair: the high half alone is U+FFFD, the next escape stands.
                        self.i = save;
                    }
                    out.push(char::from_u32(hi).unwrap_or('\u{fffd}'));
                }
                _ => return Err(JsonError::Invalid),
            }
        }
    }

    fn number(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.next() {
            Some(b'0') => {}
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(JsonError::Invalid),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.one_or_more_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            self.one_or_more_digits()?;
        }
        Ok(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
    }

    fn one_or_more_digits(&mut self) -> Result<(), JsonError> {
        if !matches!(self.peek(), Some(b'0'..=b'9')) {
            return Err(JsonError::Invalid);
        }
        self.digits();
        Ok(())
    }

    /// Any JSON value, validated without recursion.
    fn value(&mut self) -> Result<(), JsonError> {
        // Each open container: b']' or b'}' it waits for.
        let mut stack: Vec<u8> = Vec::new();
        loop {
            self.ws();
            // A value.
            match self.peek() {
                Some(b'"') => {
                    self.string()?;
                }
                Some(b't') => self.lit(b"true")?,
                Some(b'f') => self.lit(b"false")?,
                Some(b'n') => self.lit(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(b'[') => {
                    self.i += 1;
                    if stack.len() + 2 > MAX_DEPTH {
                        return Err(JsonError::Invalid);
                    }
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                    } else {
                        stack.push(b']');
                        continue;
                    }
                }
                Some(b'{') => {
                    self.i += 1;
                    if stack.len() + 2 > MAX_DEPTH {
                        return Err(JsonError::Invalid);
                    }
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                    } else {
                        stack.push(b'}');
                        self.key()?;
                        continue;
                    }
                }
                _ => return Err(JsonError::Invalid),
            }
            // After a value: close containers or go on to the next element.
            loop {
                let Some(&close) = stack.last() else {
                    return Ok(());
                };
                self.ws();
                match self.next() {
                    Some(b',') => {
                        if close == b'}' {
                            self.key()?;
                        }
                        break;
                    }
                    Some(c) if c == close => {
                        stack.pop();
                    }
                    _ => return Err(JsonError::Invalid),
                }
            }
        }
    }

    /// An object key and its colon.
    fn key(&mut self) -> Result<(), JsonError> {
        self.ws();
        if self.peek() != Some(b'"') {
            return Err(JsonError::Invalid);
        }
        self.string()?;
        self.ws();
        if self.next() != Some(b':') {
            return Err(JsonError::Invalid);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_of_strings_decodes_escapes() {
        assert_eq!(
            parse_string_array(r#"[ "a\/b", "\u0000", "\ud83d\ude00" ]"#),
            Ok(vec!["a/b".into(), "\0".into(), "😀".into()])
        );
    }

    #[test]
    fn lone_surrogate_becomes_replacement_character() {
        assert_eq!(
            parse_string_array(r#"["\ud800x"]"#),
            Ok(vec!["\u{fffd}x".into()])
        );
    }

    #[test]
    fn nested_value_is_not_strings_but_broken_json_is_invalid() {
        assert_eq!(
            parse_string_array(r#"[ "echo", [ "nested json" ] ]"#),
            Err(JsonError::NotStrings)
        );
        assert_eq!(
            parse_string_array(r#"["a", {"k": [1, 2e5, true]}]"#),
            Err(JsonError::NotStrings)
        );
        assert_eq!(parse_string_array(r#"["a", [1"#), Err(JsonError::Invalid));
        assert_eq!(parse_string_array(r#"['a']"#), Err(JsonError::Invalid));
        assert_eq!(parse_string_array(r#"["a"] x"#), Err(JsonError::Invalid));
        assert_eq!(parse_string_array(r#"["a" "b"]"#), Err(JsonError::Invalid));
        assert_eq!(parse_string_array("[\"a\tb\"]"), Err(JsonError::Invalid));
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let deep = format!("[{}{}]", "[".repeat(200_000), "]".repeat(200_000));
        assert_eq!(parse_string_array(&deep), Err(JsonError::Invalid));
        let ok = format!("[{}{}]", "[".repeat(500), "]".repeat(500));
        assert_eq!(parse_string_array(&ok), Err(JsonError::NotStrings));
    }
}
