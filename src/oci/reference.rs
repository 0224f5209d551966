//! Image references: the distribution reference grammar (`distribution/reference`) with
//! Docker's normalisation (`alpine` → `docker.io/library/alpine:latest`), plus Kiln's
//! built-in `kiln/…` namespace. Knows no registry and does no I/O.

use super::digest::{Digest, DigestError};
use regex::Regex;
use std::fmt;
use std::sync::OnceLock;

/// The registry of familiar names.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually lives.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The key Docker Hub credentials have in a docker `config.json`.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";
/// The pseudo-registry of Kiln's built-in bases (`kiln/busybox`).
pub const BUILTIN_DOMAIN: &str = "kiln";
const NAME_TOTAL_LENGTH_MAX: usize = 255;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why a string is not an image reference. Messages follow Docker's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The empty string.
    #[error("invalid reference format: repository name must have at least one component")]
    Empty,
    /// Upper-case letters in the repository path.
    #[error("invalid reference format: repository name ({0}) must be lowercase")]
    Uppercase(String),
    /// A bare 64-hex-digit string, which Docker reserves for image ids.
    #[error("invalid repository name ({0}): cannot specify 64-byte hexadecimal strings")]
    HexName(String),
    /// Longer than 255 characters (domain and path).
    #[error("invalid reference format: repository name ({0}) must not be more than 255 characters")]
    TooLong(String),
    /// The tag or the digest is malformed, or the digest is not sha256.
    #[error("invalid reference format: {reference}: {source}")]
    Digest {
        /// The input.
        reference: String,
        /// What is wrong with its digest.
        source: DigestError,
    },
    /// Anything else the grammar does not accept.
    #[error("invalid reference format: {0:?} is not [HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST]")]
    Format(String),
}

fn reference_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        // distribution/reference regexp.go, ASCII classes spelled out (Go's \w is ASCII).
        let alnum = "[a-z0-9]+";
        let separator = "(?:[._]|__|[-]+)";
        let path_component = format!("{alnum}(?:{separator}{alnum})*");
        let remote_name = format!("{path_component}(?:/{path_component})*");
        let domain_component = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
        let domain_name = format!(r"{domain_component}(?:\.{domain_component})*");
        let ipv6 = r"\[(?:[a-fA-F0-9:]+)\]";
        let host = format!("(?:{domain_name}|{ipv6})");
        let domain_and_port = format!("{host}(?::[0-9]+)?");
        let tag = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
        let digest = "[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}";
        let pat =
            format!("^(?:({domain_and_port})/)?({remote_name})(?::({tag}))?(?:@({digest}))?$");
        Regex::new(&pat).expect("the reference grammar is a valid regex")
    })
}

impl Reference {
    /// Parses a reference as `docker pull` does: `alpine` → `docker.io/library/alpine:latest`,
    /// `localhost` and anything with a `.` or `:` before the first `/` is a registry, a
    /// missing tag is `latest` (unless a digest is given). `kiln/NAME` is a built-in base.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ReferenceError::HexName(s.to_string()));
        }
        let (domain, remainder) = split_docker_domain(s);
        let remote = remainder
            .split_once(':')
            .map_or(remainder.as_str(), |(r, _)| r);
        if remote.to_lowercase() != remote {
            return Err(ReferenceError::Uppercase(remote.to_string()));
        }
        let full = format!("{domain}/{remainder}");
        let Some(caps) = reference_regex().captures(&full) else {
            return Err(ReferenceError::Format(s.to_string()));
        };
        let (Some(domain), Some(path)) = (caps.get(1), caps.get(2)) else {
            return Err(ReferenceError::Format(s.to_string()));
        };
        if domain.as_str().len() + 1 + path.as_str().len() > NAME_TOTAL_LENGTH_MAX {
            return Err(ReferenceError::TooLong(format!(
                "{}/{}",
                domain.as_str(),
                path.as_str()
            )));
        }
        let digest = caps
            .get(4)
            .map(|d| Digest::parse(d.as_str()))
            .transpose()
            .map_err(|source| ReferenceError::Digest {
                reference: s.to_string(),
                source,
            })?;
        let mut tag = caps.get(3).map(|t| t.as_str().to_string());
        if tag.is_none() && digest.is_none() {
            tag = Some("latest".to_string());
        }
        let mut domain = domain.as_str().to_string();
        let mut path = path.as_str().to_string();
        // `kiln/busybox` is Kiln's, not Docker Hub's; `docker.io/kiln/…` still means Hub.
        if domain == DOCKER_HUB
            && s.split('/').next() == Some(BUILTIN_DOMAIN)
            && let Some(rest) = path.strip_prefix("kiln/")
        {
            domain = BUILTIN_DOMAIN.to_string();
            path = rest.to_string();
        }
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// The registry as written and normalised (`docker.io`, `127.0.0.1:5000`, `[::1]:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path (`library/alpine`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if any (`latest` when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if pinned.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// A built-in base (`kiln/busybox`), made on this machine.
    pub fn is_builtin(&self) -> bool {
        self.domain == BUILTIN_DOMAIN
    }

    /// The host (and port) the registry API is spoken to at.
    pub fn api_host(&self) -> &str {
        if self.domain == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.domain
        }
    }

    /// The key of this registry's credentials in a docker `config.json`.
    pub fn auth_key(&self) -> &str {
        if self.domain == DOCKER_HUB {
            DOCKER_HUB_AUTH_KEY
        } else {
            &self.domain
        }
    }

    /// True for `localhost`, `127.0.0.0/8` and `[::1]`, with or without a port: these
    /// are spoken to over plain HTTP, as Docker does.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.domain)
    }

    /// `NAME:TAG` or `NAME@DIGEST` with the registry left out where Docker leaves it out
    /// (`alpine:3.20`, `kiln/busybox:latest`).
    pub fn familiar(&self) -> String {
        let name = match self.domain.as_str() {
            DOCKER_HUB => match self.path.strip_prefix("library/") {
                Some(rest) if !rest.contains('/') => rest.to_string(),
                _ => self.path.clone(),
            },
            d => format!("{d}/{}", self.path),
        };
        self.with_suffix(name)
    }

    /// The repository without tag or digest (`docker.io/library/alpine`).
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The same repository with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        }
    }

    /// The same reference without its digest (what a local name records).
    pub fn without_digest(&self) -> Reference {
        Reference {
            tag: self.tag.clone().or_else(|| Some("latest".into())),
            digest: None,
            ..self.clone()
        }
    }

    fn with_suffix(&self, mut s: String) -> String {
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(&d.to_string());
        }
        s
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, optionally with `:PORT`.
pub fn is_loopback_host(domain: &str) -> bool {
    let host = if let Some(rest) = domain.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        domain.split_once(':').map_or(domain, |(h, _)| h)
    };
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host == "localhost",
    }
}

impl fmt::Display for Reference {
    /// The canonical form: `docker.io/library/alpine:latest`, `kiln/busybox:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.with_suffix(format!("{}/{}", self.domain, self.path)))
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

/// distribution's `splitDockerDomain`: registry and remainder (with tag and digest).
fn split_docker_domain(name: &str) -> (String, String) {
    let Some((maybe_domain, rest)) = name.split_once('/') else {
        return (DOCKER_HUB.into(), format!("library/{name}"));
    };
    let (domain, remainder) = if maybe_domain == "localhost"
        || maybe_domain.contains(['.', ':'])
        || maybe_domain.to_lowercase() != maybe_domain
    {
        let d = if maybe_domain == "index.docker.io" {
            DOCKER_HUB
        } else {
            maybe_domain
        };
        (d.to_string(), rest.to_string())
    } else {
        (DOCKER_HUB.to_string(), name.to_string())
    };
    if domain == DOCKER_HUB && !remainder.contains('/') {
        return (domain, format!("library/{remainder}"));
    }
    (domain, remainder)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

    /// input → (canonical, familiar)
    #[test]
    fn valid_references_normalise_like_docker() {
        let with_digest = format!("docker.io/library/alpine@{D}");
        let both = format!("127.0.0.1:5000/x/busybox:1.36@{D}");
        let table: &[(&str, &str, &str)] = &[
            ("alpine", "docker.io/library/alpine:latest", "alpine:latest"),
            (
                "alpine:3.20",
                "docker.io/library/alpine:3.20",
                "alpine:3.20",
            ),
            (
                "library/alpine",
                "docker.io/library/alpine:latest",
                "alpine:latest",
            ),
            (
                "docker.io/alpine",
                "docker.io/library/alpine:latest",
                "alpine:latest",
            ),
            (
                "docker.io/library/alpine:edge",
                "docker.io/library/alpine:edge",
                "alpine:edge",
            ),
            (
                "index.docker.io/library/alpine",
                "docker.io/library/alpine:latest",
                "alpine:latest",
            ),
            (
                "python:3.12-slim",
                "docker.io/library/python:3.12-slim",
                "python:3.12-slim",
            ),
            (
                "bitnami/redis",
                "docker.io/bitnami/redis:latest",
                "bitnami/redis:latest",
            ),
            ("ghcr.io/o/i:t", "ghcr.io/o/i:t", "ghcr.io/o/i:t"),
            (
                "localhost/app",
                "localhost/app:latest",
                "localhost/app:latest",
            ),
            (
                "localhost:5000/app:v1",
                "localhost:5000/app:v1",
                "localhost:5000/app:v1",
            ),
            (
                "127.0.0.1:5000/x/busybox",
                "127.0.0.1:5000/x/busybox:latest",
                "127.0.0.1:5000/x/busybox:latest",
            ),
            ("[::1]:5000/a/b:c", "[::1]:5000/a/b:c", "[::1]:5000/a/b:c"),
            (
                "Example.com/app",
                "Example.com/app:latest",
                "Example.com/app:latest",
            ),
            (
                "registry:5000/a__b/c--d.e",
                "registry:5000/a__b/c--d.e:latest",
                "registry:5000/a__b/c--d.e:latest",
            ),
            (
                "localhost:5000",
                "docker.io/library/localhost:5000",
                "localhost:5000",
            ),
            ("kiln/busybox", "kiln/busybox:latest", "kiln/busybox:latest"),
            (
                "kiln/debian:bookworm",
                "kiln/debian:bookworm",
                "kiln/debian:bookworm",
            ),
            (
                "docker.io/kiln/busybox",
                "docker.io/kiln/busybox:latest",
                "kiln/busybox:latest",
            ),
        ];
        for (input, canonical, familiar) in table {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&r.to_string(), canonical, "canonical of {input}");
            assert_eq!(&r.familiar(), familiar, "familiar of {input}");
        }
        let r = Reference::parse(&format!("alpine@{D}")).expect("digest");
        assert_eq!(r.to_string(), with_digest);
        assert_eq!(r.tag(), None);
        let r = Reference::parse(&both).expect("tag and digest");
        assert_eq!(r.to_string(), both);
        assert_eq!(
            (r.tag(), r.digest().map(|d| d.to_string())),
            (Some("1.36"), Some(D.into()))
        );
        assert!(Reference::parse("kiln/busybox").expect("kiln").is_builtin());
        assert!(
            !Reference::parse("docker.io/kiln/busybox")
                .expect("hub")
                .is_builtin()
        );
    }

    #[test]
    fn invalid_references_say_why() {
        use ReferenceError as E;
        let long = format!("a/{}", "b".repeat(300));
        let hex = "a".repeat(64);
        type Check = fn(&ReferenceError) -> bool;
        let table: Vec<(&str, Check)> = vec![
            ("", |e| matches!(e, E::Empty)),
            ("Alpine", |e| matches!(e, E::Uppercase(_))),
            ("docker.io/Library/alpine", |e| matches!(e, E::Uppercase(_))),
            (&hex, |e| matches!(e, E::HexName(_))),
            (&long, |e| matches!(e, E::TooLong(_))),
            ("alpine@sha256:abc", |e| matches!(e, E::Format(_))),
            (
                "alpine@sha512:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
                |e| matches!(e, E::Digest { .. }),
            ),
            ("alpine:", |e| matches!(e, E::Format(_))),
            ("alpine:-x", |e| matches!(e, E::Format(_))),
            (":tag", |e| matches!(e, E::Format(_))),
            ("a//b", |e| matches!(e, E::Format(_))),
            ("a/b/", |e| matches!(e, E::Format(_))),
            ("-a/b", |e| matches!(e, E::Format(_))),
            ("a_/b", |e| matches!(e, E::Format(_))),
            ("host:port/x", |e| matches!(e, E::Format(_))),
            ("alpine:a b", |e| matches!(e, E::Format(_))),
            ("alpine:tág", |e| matches!(e, E::Format(_))),
            ("a:b:c", |e| matches!(e, E::Format(_))),
        ];
        for (input, ok) in &table {
            let e = Reference::parse(input).expect_err(input);
            assert!(ok(&e), "{input:?} gave {e:?}");
            assert!(e.to_string().starts_with("invalid"), "{e}");
        }
    }

    #[test]
    fn loopback_registries_are_recognised() {
        for (d, lo) in [
            ("127.0.0.1:5000", true),
            ("127.1.2.3", true),
            ("localhost:1", true),
            ("[::1]:5000", true),
            ("10.0.0.1:5000", false),
            ("docker.io", false),
            ("localhost.example.com", false),
        ] {
            assert_eq!(is_loopback_host(d), lo, "{d}");
        }
    }

    #[test]
    fn docker_hub_uses_its_api_host_and_legacy_auth_key() {
        let r = Reference::parse("alpine").expect("alpine");
        assert_eq!(r.api_host(), DOCKER_HUB_API);
        assert_eq!(r.auth_key(), DOCKER_HUB_AUTH_KEY);
        let r = Reference::parse("127.0.0.1:5000/a").expect("local");
        assert_eq!(
            (r.api_host(), r.auth_key()),
            ("127.0.0.1:5000", "127.0.0.1:5000")
        );
    }
}
