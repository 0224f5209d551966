//! Registry credentials and challenges: the docker `config.json` (`auths`, `credsStore`,
//! `credHelpers`, through `docker_credential`), and `WWW-Authenticate` parsing. Sends nothing
//! over the network; [`super::client`] does the token exchange.

use super::reference::{DOCKER_HUB_AUTH_KEY, Reference};
use docker_credential::{CredentialRetrievalError, DockerCredential};
use std::fmt;
use std::path::PathBuf;

/// What a registry may be given to prove who we are.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Username and password (or a personal access token as the password).
    Basic {
        /// The username.
        username: String,
        /// The password.
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken` in config.json), exchanged at the realm.
    IdentityToken(String),
}

impl fmt::Debug for Credential {
    // Never print secrets, not even in debug logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

/// The docker config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// `config.json` exists but does not parse.
    #[error("cannot read {path}: not a valid docker config.json")]
    Config {
        /// The file.
        path: PathBuf,
    },
    /// A `docker-credential-*` helper failed.
    #[error("credential helper for {registry} failed: {detail}")]
    Helper {
        /// The registry asked for.
        registry: String,
        /// What the helper said.
        detail: String,
    },
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    let dir = std::env::var_os(crate::envvars::DOCKER_CONFIG)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".docker"))
        })?;
    Some(dir.join("config.json"))
}

/// The credential for `reference`'s registry from the docker config, if any. A missing
/// config file means "no credentials"; this may run a credential helper, so call it off the
/// async threads.
pub fn lookup(reference: &Reference) -> Result<Option<Credential>, CredentialError> {
    let Some(path) = docker_config_path() else {
        return Ok(None);
    };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(_) => return Err(CredentialError::Config { path }),
    };
    let key = reference.auth_key();
    // Hub credentials are keyed by the legacy v1 URL; `docker.io` keys also occur.
    let keys: &[&str] = if key == DOCKER_HUB_AUTH_KEY {
        &[DOCKER_HUB_AUTH_KEY, "index.docker.io"]
    } else {
        &[key]
    };
    for k in keys {
        match docker_credential::get_credential_from_reader(&text[..], k) {
            Ok(DockerCredential::UsernamePassword(username, password)) => {
                return Ok(Some(Credential::Basic { username, password }));
            }
            Ok(DockerCredential::IdentityToken(t)) => {
                return Ok(Some(Credential::IdentityToken(t)));
            }
            Err(CredentialRetrievalError::NoCredentialConfigured) => {}
            Err(CredentialRetrievalError::HelperFailure { stdout, stderr, .. })
                if format!("{stdout}{stderr}").contains("credentials not found") => {}
            Err(CredentialRetrievalError::ConfigReadError) => {
                return Err(CredentialError::Config { path });
            }
            Err(e) => {
                return Err(CredentialError::Helper {
                    registry: k.to_string(),
                    detail: e.to_string().trim().to_string(),
                });
            }
        }
    }
    Ok(None)
}

/// One `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm="…"`.
    Basic,
    /// `Bearer realm="…",service="…",scope="…"`.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The `service` to ask a token for.
        service: Option<String>,
        /// The scope the registry asked for, if it said.
        scope: Option<String>,
    },
}

/// Parses the challenges of a `WWW-Authenticate` header (RFC 7235 auth-params with quoted
/// strings); unknown schemes are dropped.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    let mut rest = header.trim();
    while !rest.is_empty() {
        let (scheme, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let (params, remaining) = parse_params(after.trim_start());
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => out.push(Challenge::Basic),
            "bearer" => {
                let get = |k: &str| {
                    params
                        .iter()
                        .find(|(pk, _)| pk.eq_ignore_ascii_case(k))
                        .map(|(_, v)| v.clone())
                };
                if let Some(realm) = get("realm") {
                    out.push(Challenge::Bearer {
                        realm,
                        service: get("service"),
                        scope: get("scope"),
                    });
                }
            }
            _ => {}
        }
        rest = remaining.trim_start_matches([',', ' ']).trim();
    }
    out
}

/// `k=v, k="v"` pairs up to the next challenge; returns them and the unparsed rest.
fn parse_params(mut s: &str) -> (Vec<(String, String)>, &str) {
    let mut params = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ', '\t']);
        let Some(eq) = s.find('=') else {
            return (params, s);
        };
        let key = &s[..eq];
        if key.is_empty() || key.contains([' ', ',', '"']) {
            // Not a parameter: the next challenge's scheme.
            return (params, s);
        }
        let after = &s[eq + 1..];
        let (value, rest) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end.min(q.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.push((key.to_string(), value));
        s = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_challenges_parse() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            vec![Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            }]
        );
        assert_eq!(
            parse_challenges(r#"Basic realm="basic-realm""#),
            vec![Challenge::Basic]
        );
        let two = parse_challenges(r#"Basic realm="x", Bearer realm="http://a/t", service=s"#);
        assert_eq!(two.len(), 2);
        assert_eq!(
            two[1],
            Challenge::Bearer {
                realm: "http://a/t".into(),
                service: Some("s".into()),
                scope: None
            }
        );
        assert_eq!(
            parse_challenges(r#"Bearer realm="a\"b""#)[0],
            Challenge::Bearer {
                realm: "a\"b".into(),
                service: None,
                scope: None
            }
        );
        assert!(parse_challenges("Negotiate").is_empty());
    }

    #[test]
    fn credentials_never_print_their_secret() {
        let c = Credential::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
