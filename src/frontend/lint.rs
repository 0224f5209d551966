//! Non-fatal findings (BuildKit's build checks) and the `# check=` directive that tunes them.

use super::dockerfile::Span;
use serde::Serialize;
use std::collections::BTreeSet;

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lint {
    /// BuildKit's rule name (`MaintainerDeprecated`, `StageNameCasing`, …).
    pub rule: &'static str,
    /// What was found.
    pub message: String,
    /// Where, if it has a place.
    #[serde(skip)]
    pub span: Option<Span>,
    /// 1-based line, 0 if none.
    pub line: u32,
}

impl Lint {
    /// The rule's documentation page.
    pub fn url(&self) -> String {
        let chars: Vec<char> = self.rule.chars().collect();
        let mut kebab = String::new();
        for (i, &c) in chars.iter().enumerate() {
            let prev_lower = i > 0 && chars[i - 1].is_ascii_lowercase();
            let acronym_end = i > 0
                && chars[i - 1].is_ascii_uppercase()
                && chars.get(i + 1).is_some_and(char::is_ascii_lowercase);
            if c.is_ascii_uppercase() && (prev_lower || acronym_end) {
                kebab.push('-');
            }
            kebab.push(c.to_ascii_lowercase());
        }
        format!("https://docs.docker.com/go/dockerfile/rule/{kebab}/")
    }
}

/// What `# check=skip=A,B;error=true` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckConfig {
    /// `skip=all`.
    pub skip_all: bool,
    /// Rules to skip.
    pub skip: BTreeSet<String>,
    /// `error=true`: findings fail the build.
    pub error: bool,
}

impl CheckConfig {
    /// Parses the directive's value; unknown keys are ignored as BuildKit does.
    pub fn parse(value: &str) -> Result<CheckConfig, String> {
        let mut c = CheckConfig::default();
        for part in value.split(';') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!(
                    "invalid check directive {part:?}: expected key=value"
                ));
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "skip" => {
                    for rule in v.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                        if rule.eq_ignore_ascii_case("all") {
                            c.skip_all = true;
                        } else {
                            c.skip.insert(rule.to_string());
                        }
                    }
                }
                "error" => {
                    c.error = match v.trim().to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(format!(
                                "invalid check directive: error={other:?}, want true or false"
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(c)
    }

    /// Whether a rule is reported.
    pub fn enabled(&self, rule: &str) -> bool {
        !self.skip_all && !self.skip.contains(rule)
    }
}

/// BuildKit's `SecretsUsedInArgOrEnv` heuristic: a name with a secret-looking token.
pub fn looks_secret(name: &str) -> bool {
    const TOKENS: &[&str] = &[
        "apikey",
        "auth",
        "credential",
        "credentials",
        "key",
        "password",
        "pword",
        "passwd",
        "secret",
        "token",
    ];
    const ALLOWED: &[&str] = &["public"];
    let lower = name.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split('_').collect();
    parts.iter().any(|p| TOKENS.contains(p)) && !parts.iter().any(|p| ALLOWED.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_directive_skips_rules_and_can_make_them_errors() {
        let c = CheckConfig::parse("skip=JSONArgsRecommended,StageNameCasing;error=true")
            .expect("parses");
        assert!(!c.enabled("StageNameCasing"));
        assert!(c.enabled("MaintainerDeprecated"));
        assert!(c.error);
        assert!(!CheckConfig::parse("skip=all").expect("parses").enabled("X"));
        assert!(CheckConfig::parse("error=maybe").is_err());
    }

    #[test]
    fn secret_names() {
        assert!(looks_secret("API_TOKEN"));
        assert!(looks_secret("password"));
        assert!(!looks_secret("MONKEY"));
        assert!(!looks_secret("PUBLIC_KEY"));
    }

    #[test]
    fn rule_urls_are_kebab_case() {
        let l = Lint {
            rule: "JSONArgsRecommended",
            message: String::new(),
            span: None,
            line: 0,
        };
        assert_eq!(
            l.url(),
            "https://docs.docker.com/go/dockerfile/rule/json-args-recommended/"
        );
    }
}
