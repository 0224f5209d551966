//! The distribution API, pull side: `/v2/` ping, `WWW-Authenticate` Bearer tokens (anonymous
//! or with credentials, `repository:NAME:pull` scope) and Basic auth, manifest negotiation,
//! and blobs streamed in chunks with Range-resume and retries with backoff on 5xx and resets.
//! Redirects are followed (at most 10, never https→http) and reqwest drops `Authorization`
//! when one leads to another host, so blob storage never sees registry credentials.
//! Verifies the digest of what it holds whole (manifests); streamed blobs are verified by the
//! consumer that hashes them on the way to disk ([`super::store`]).

use super::auth::{self, Challenge, Credential};
use super::digest::Digest;
use super::error::OciError;
use super::reference::{Reference, is_loopback_host};
use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_RANGE, CONTENT_TYPE, RANGE, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OnceCell, RwLock, mpsc};

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 1 (signed): recognised only to be refused.
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// The most a manifest or index may weigh.
pub const MAX_MANIFEST_BYTES: u64 = 8 << 20;

/// How the client behaves; [`ClientOptions::from_env`] reads `KILN_INSECURE_REGISTRIES`.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Registries (`HOST[:PORT]`) spoken to over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// Retries after the first attempt, for 5xx, 429, resets and timeouts.
    pub retries: u32,
    /// The first backoff; it doubles each retry (capped at 5 s).
    pub backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure: Vec::new(),
            retries: 4,
            backoff: Duration::from_millis(200),
        }
    }
}

impl ClientOptions {
    /// Defaults, plus `KILN_INSECURE_REGISTRIES` (comma list).
    pub fn from_env() -> Self {
        let insecure = std::env::var(crate::envvars::KILN_INSECURE_REGISTRIES)
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        ClientOptions {
            insecure,
            ..ClientOptions::default()
        }
    }
}

/// A registry client (rustls only). Cheap to clone.
#[derive(Clone)]
pub struct RegistryClient {
    proxied: reqwest::Client,
    direct: reqwest::Client,
    opts: Arc<ClientOptions>,
}

fn http_client(proxy: bool) -> Result<reqwest::Client, OciError> {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.previous().iter().any(|u| u.scheme() == "https")
            && attempt.url().scheme() == "http";
        if attempt.previous().len() >= 10 {
            attempt.error("more than 10 redirects")
        } else if downgrade {
            attempt.error("refusing a redirect from https to plain http")
        } else {
            attempt.follow()
        }
    });
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .redirect(policy)
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .tcp_nodelay(true);
    if !proxy {
        b = b.no_proxy();
    }
    b.build().map_err(|e| OciError::Tool {
        tool: "https client",
        detail: describe(&e),
    })
}

impl RegistryClient {
    /// A client with these options.
    pub fn new(opts: ClientOptions) -> Result<Self, OciError> {
        Ok(RegistryClient {
            proxied: http_client(true)?,
            direct: http_client(false)?,
            opts: Arc::new(opts),
        })
    }

    /// `http` for loopback and `KILN_INSECURE_REGISTRIES` registries, else `https`.
    pub fn scheme_for(&self, domain: &str) -> &'static str {
        let host_only = if domain.starts_with('[') {
            domain
                .split_once(']')
                .map_or(domain, |(h, _)| h)
                .trim_start_matches('[')
        } else {
            domain.split_once(':').map_or(domain, |(h, _)| h)
        };
        let listed = self
            .opts
            .insecure
            .iter()
            .any(|i| i == domain || i == host_only);
        if is_loopback_host(domain) || listed {
            "http"
        } else {
            "https"
        }
    }

    /// Pings the registry of `reference` and authenticates for pulling from its repository.
    pub async fn repository(&self, reference: &Reference) -> Result<Arc<Repository>, OciError> {
        let host = reference.api_host().to_string();
        let http = if is_loopback_host(&host) {
            self.direct.clone()
        } else {
            self.proxied.clone()
        };
        let repo = Arc::new(Repository {
            http,
            base: format!("{}://{host}", self.scheme_for(reference.domain())),
            registry: reference.domain().to_string(),
            reference: reference.clone(),
            auth: RwLock::new(Auth::Anonymous),
            credential: OnceCell::new(),
            opts: self.opts.clone(),
        });
        repo.ping().await?;
        Ok(repo)
    }
}

#[derive(Clone)]
enum Auth {
    Anonymous,
    Basic(String, String),
    Bearer(String),
}

/// One repository on one registry, authenticated for pull.
pub struct Repository {
    http: reqwest::Client,
    base: String,
    registry: String,
    reference: Reference,
    auth: RwLock<Auth>,
    credential: OnceCell<Option<Credential>>,
    opts: Arc<ClientOptions>,
}

/// A manifest or index as served, with the digest of its bytes.
#[derive(Debug, Clone)]
pub struct RawManifest {
    /// The bytes (what the digest is of).
    pub bytes: Vec<u8>,
    /// `Content-Type`, or the JSON `mediaType`.
    pub media_type: String,
    /// sha256 of `bytes`.
    pub digest: Digest,
}

impl Repository {
    /// The registry as the reference names it.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    async fn ping(&self) -> Result<(), OciError> {
        let url = format!("{}/v2/", self.base);
        let resp = self.send_raw(|c| c.get(&url)).await?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED => {
                let challenges = challenges_of(&resp);
                self.authenticate(&challenges).await
            }
            s => Err(self.status_error(s, &url, resp).await),
        }
    }

    async fn credential(&self) -> Result<Option<Credential>, OciError> {
        let reference = self.reference.clone();
        self.credential
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || auth::lookup(&reference))
                    .await
                    .map_err(|e| OciError::Tool {
                        tool: "credential lookup",
                        detail: e.to_string(),
                    })?
                    .map_err(OciError::from)
            })
            .await
            .cloned()
    }

    fn unauthorized(&self, with_credentials: bool, detail: String) -> OciError {
        OciError::Unauthorized {
            registry: self.registry.clone(),
            repository: self.reference.path().to_string(),
            with_credentials,
            detail,
        }
    }

    async fn authenticate(&self, challenges: &[Challenge]) -> Result<(), OciError> {
        let cred = self.credential().await?;
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer { realm, service, .. } => Some((realm, service)),
            Challenge::Basic => None,
        });
        let auth = if let Some((realm, service)) = bearer {
            let scope = format!("repository:{}:pull", self.reference.path());
            Auth::Bearer(
                self.token(realm, service.as_deref(), &scope, cred.as_ref())
                    .await?,
            )
        } else if challenges.contains(&Challenge::Basic) {
            match cred {
                Some(Credential::Basic { username, password }) => Auth::Basic(username, password),
                Some(Credential::IdentityToken(_)) => {
                    return Err(self.unauthorized(
                        true,
                        "an identity token needs a Bearer-token registry".into(),
                    ));
                }
                None => {
                    return Err(self.unauthorized(false, "the registry requires a login".into()));
                }
            }
        } else {
            return Err(self.unauthorized(
                cred.is_some(),
                "no usable WWW-Authenticate challenge".into(),
            ));
        };
        *self.auth.write().await = auth;
        Ok(())
    }

    /// The token endpoint: GET with Basic credentials (or none), or the OAuth2 refresh-token
    /// POST for an identity token.
    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        cred: Option<&Credential>,
    ) -> Result<String, OciError> {
        let mut url = reqwest::Url::parse(realm).map_err(|e| OciError::Malformed {
            what: format!("token realm {realm:?} of {}", self.registry),
            detail: e.to_string(),
        })?;
        let realm_host = url.host_str().unwrap_or("").to_string();
        let mut pairs: Vec<(&str, &str)> = vec![("scope", scope)];
        if let Some(s) = service {
            pairs.push(("service", s));
        }
        let resp = match cred {
            Some(Credential::IdentityToken(refresh)) => {
                let mut form = pairs.clone();
                form.extend([
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.as_str()),
                    ("client_id", "kiln"),
                ]);
                let body = form_encode(&form);
                self.send_raw(|c| {
                    c.post(url.clone())
                        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(body.clone())
                })
                .await
            }
            _ => {
                url.query_pairs_mut().extend_pairs(pairs.iter());
                self.send_raw(|c| {
                    let rb = c.get(url.clone());
                    match cred {
                        Some(Credential::Basic { username, password }) => {
                            rb.basic_auth(username, Some(password))
                        }
                        _ => rb,
                    }
                })
                .await
            }
        }
        .map_err(|e| match e {
            OciError::Unreachable { detail, .. } => OciError::Unreachable {
                registry: format!("{} (token server {realm_host})", self.registry),
                detail,
            },
            e => e,
        })?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let detail = error_detail(&body_text(resp).await).unwrap_or_else(|| status.to_string());
            return Err(self.unauthorized(
                cred.is_some(),
                format!("token server {realm_host}: {detail}"),
            ));
        }
        if !status.is_success() {
            return Err(self.status_error(status, realm, resp).await);
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = read_limited(resp, 1 << 20)
            .await
            .map_err(|e| self.unreachable(&e))?;
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| OciError::Malformed {
            what: format!("token response of {realm_host}"),
            detail: e.to_string(),
        })?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| OciError::Malformed {
                what: format!("token response of {realm_host}"),
                detail: "no token in it".into(),
            })
    }

    fn unreachable(&self, e: &reqwest::Error) -> OciError {
        OciError::Unreachable {
            registry: self.registry.clone(),
            detail: describe(e),
        }
    }

    /// Sends with retries on connection errors, timeouts, 5xx and 429; no auth handling.
    async fn send_raw(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Response, OciError> {
        let mut attempt = 0;
        loop {
            match build(&self.http).send().await {
                Err(e) if attempt < self.opts.retries && retryable(&e) => {
                    tracing::debug!(registry = %self.registry, error = %describe(&e), attempt, "retrying");
                }
                Err(e) => return Err(self.unreachable(&e)),
                Ok(r) if attempt < self.opts.retries && retryable_status(r.status()) => {
                    tracing::debug!(registry = %self.registry, status = %r.status(), attempt, "retrying");
                }
                Ok(r) => return Ok(r),
            }
            self.backoff(attempt).await;
            attempt += 1;
        }
    }

    async fn backoff(&self, attempt: u32) {
        let base = self.opts.backoff.saturating_mul(1 << attempt.min(10));
        let capped = base.min(Duration::from_secs(5));
        // Jitter from the clock: enough to keep parallel layer downloads from retrying in step.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = capped.mul_f64(f64::from(nanos % 1000) / 4000.0);
        tokio::time::sleep(capped + jitter).await;
    }

    /// Sends with the current auth; a 401 re-authenticates once from its challenge.
    async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Response, OciError> {
        let mut reauthenticated = false;
        loop {
            let auth = self.auth.read().await.clone();
            let resp = self
                .send_raw(|c| match &auth {
                    Auth::Anonymous => build(c),
                    Auth::Basic(u, p) => build(c).basic_auth(u, Some(p)),
                    Auth::Bearer(t) => build(c).bearer_auth(t),
                })
                .await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !reauthenticated {
                let challenges = challenges_of(&resp);
                self.authenticate(&challenges).await?;
                reauthenticated = true;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let with = !matches!(auth, Auth::Anonymous) && self.credential().await?.is_some();
                let detail =
                    error_detail(&body_text(resp).await).unwrap_or_else(|| status.to_string());
                return Err(self.unauthorized(with, detail));
            }
            return Ok(resp);
        }
    }

    async fn status_error(&self, status: StatusCode, url: &str, resp: Response) -> OciError {
        OciError::Status {
            registry: self.registry.clone(),
            status: status.as_u16(),
            url: url.to_string(),
            detail: error_detail(&body_text(resp).await).unwrap_or_default(),
        }
    }

    async fn not_found(&self, what: String, resp: Response) -> OciError {
        let body = body_text(resp).await;
        let what = if body.contains("NAME_UNKNOWN") {
            format!("repository {}", self.reference.path())
        } else {
            what
        };
        OciError::NotFound {
            registry: self.registry.clone(),
            what,
        }
    }

    /// Fetches the manifest or index `tag_or_digest`, checking the digest of its bytes
    /// against a pinned digest and `Docker-Content-Digest`. Schema 1 is refused.
    pub async fn manifest(&self, tag_or_digest: &str) -> Result<RawManifest, OciError> {
        let url = format!(
            "{}/v2/{}/manifests/{tag_or_digest}",
            self.base,
            self.reference.path()
        );
        let accept = format!(
            "{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}, {DOCKER_SCHEMA1};q=0.5"
        );
        let resp = self.send(|c| c.get(&url).header(ACCEPT, &accept)).await?;
        let status = resp.status();
        let what = match Digest::parse(tag_or_digest) {
            Ok(_) => format!("manifest {tag_or_digest} of {}", self.reference.path()),
            Err(_) => format!("tag {tag_or_digest} of {}", self.reference.path()),
        };
        if status == StatusCode::NOT_FOUND {
            let mut e = self.not_found(what, resp).await;
            // distribution answers MANIFEST_UNKNOWN for a tag of an unknown repository too:
            // its tag list tells the two apart.
            if let OciError::NotFound { what, .. } = &mut e
                && what.starts_with("tag ")
                && self.repository_unknown().await
            {
                *what = format!("repository {}", self.reference.path());
            }
            return Err(e);
        }
        if !status.is_success() {
            return Err(self.status_error(status, &url, resp).await);
        }
        let header_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let claimed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let bytes = read_limited(resp, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| self.unreachable(&e))?;
        let digest = Digest::of(&bytes);
        for expected in [Digest::parse(tag_or_digest).ok(), claimed]
            .into_iter()
            .flatten()
        {
            if expected != digest {
                return Err(OciError::DigestMismatch {
                    what: "manifest",
                    expected,
                    actual: digest,
                });
            }
        }
        let media_type = media_type_of(&bytes, header_type.as_deref(), &self.reference)?;
        Ok(RawManifest {
            bytes,
            media_type,
            digest,
        })
    }

    async fn repository_unknown(&self) -> bool {
        let url = format!("{}/v2/{}/tags/list", self.base, self.reference.path());
        match self.send(|c| c.get(&url)).await {
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                body_text(r).await.contains("NAME_UNKNOWN")
            }
            _ => false,
        }
    }

    /// Streams blob `digest` (of `size` bytes) into `tx` in chunks, resuming with `Range`
    /// after a reset and retrying 5xx; `on_bytes` sees each chunk's length. Returns once all
    /// `size` bytes went out. The digest is the receiver's to check.
    pub async fn blob(
        &self,
        digest: &Digest,
        size: u64,
        tx: &mpsc::Sender<Bytes>,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), OciError> {
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.reference.path());
        let mut offset: u64 = 0;
        let mut failures = 0u32;
        'request: loop {
            let resp = self
                .send(|c| {
                    let rb = c.get(&url);
                    if offset > 0 {
                        rb.header(RANGE, format!("bytes={offset}-"))
                    } else {
                        rb
                    }
                })
                .await?;
            let status = resp.status();
            if status == StatusCode::NOT_FOUND {
                let what = format!("blob {digest} of {}", self.reference.path());
                return Err(self.not_found(what, resp).await);
            }
            if !status.is_success() {
                return Err(self.status_error(status, &url, resp).await);
            }
            // A 200 to a Range request restarts from 0: skip what was already passed on.
            let mut skip = offset;
            if status == StatusCode::PARTIAL_CONTENT {
                let start = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(offset) {
                    return Err(OciError::Status {
                        registry: self.registry.clone(),
                        status: 206,
                        url,
                        detail: format!("asked for bytes {offset}-, got Content-Range {start:?}"),
                    });
                }
                skip = 0;
            }
            let mut resp = resp;
            loop {
                match resp.chunk().await {
                    Ok(Some(mut chunk)) => {
                        if skip > 0 {
                            let k = skip.min(chunk.len() as u64) as usize;
                            chunk = chunk.slice(k..);
                            skip -= k as u64;
                        }
                        if chunk.is_empty() {
                            continue;
                        }
                        offset += chunk.len() as u64;
                        if offset > size {
                            return Err(OciError::SizeMismatch {
                                what: "layer",
                                digest: digest.clone(),
                                expected: size,
                                actual: offset,
                            });
                        }
                        on_bytes(chunk.len() as u64);
                        if tx.send(chunk).await.is_err() {
                            return Err(consumer_gone());
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failures += 1;
                        if failures > self.opts.retries {
                            return Err(self.unreachable(&e));
                        }
                        tracing::debug!(blob = %digest, offset, error = %describe(&e), "resuming");
                        self.backoff(failures - 1).await;
                        continue 'request;
                    }
                }
            }
            if offset < size {
                failures += 1;
                if failures > self.opts.retries {
                    return Err(OciError::SizeMismatch {
                        what: "layer",
                        digest: digest.clone(),
                        expected: size,
                        actual: offset,
                    });
                }
                tracing::debug!(blob = %digest, offset, "body ended early, resuming");
                self.backoff(failures - 1).await;
                continue;
            }
            return Ok(());
        }
    }

    /// A whole small blob (a config), verified against `digest` and `size`.
    pub async fn blob_bytes(
        &self,
        digest: &Digest,
        size: u64,
        limit: u64,
    ) -> Result<Vec<u8>, OciError> {
        if size > limit {
            return Err(OciError::Malformed {
                what: format!("descriptor of {digest}"),
                detail: format!("{size} bytes is more than the {limit} allowed"),
            });
        }
        let (tx, mut rx) = mpsc::channel(16);
        let fetch = async move { self.blob(digest, size, &tx, &|_| {}).await };
        let collect = async move {
            let mut v = Vec::with_capacity(size as usize);
            while let Some(c) = rx.recv().await {
                v.extend_from_slice(&c);
            }
            v
        };
        let (fetched, bytes) = tokio::join!(fetch, collect);
        fetched?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(OciError::DigestMismatch {
                what: "config",
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}

/// The step of [`consumer_gone`]'s error.
pub(crate) const CONSUMER_GONE: &str = "hand blob data to the unpacker";

/// The error a fetch returns when the receiving end went away (it has the real error).
pub(crate) fn consumer_gone() -> OciError {
    OciError::Io {
        step: CONSUMER_GONE,
        path: Default::default(),
        source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
    }
}

fn challenges_of(resp: &Response) -> Vec<Challenge> {
    resp.headers()
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(auth::parse_challenges)
        .collect()
}

fn retryable(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
}

fn retryable_status(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS
}

/// An error with its causes (reqwest's own message says little: "error sending request").
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !parts.iter().any(|p| p.contains(&m)) {
            parts.push(m);
        }
        cur = s.source();
    }
    parts.join(": ")
}

async fn read_limited(mut resp: Response, limit: u64) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(c) = resp.chunk().await? {
        out.extend_from_slice(&c);
        if out.len() as u64 > limit {
            // Stop reading; the caller reports it as malformed by size.
            out.truncate(limit as usize + 1);
            break;
        }
    }
    Ok(out)
}

async fn body_text(resp: Response) -> String {
    let bytes = read_limited(resp, 64 << 10).await.unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The `message` of a distribution error body (`{"errors":[{"code","message"}]}`), or the
/// body itself when short.
fn error_detail(body: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_str::<Errors>(body) {
        let msgs: Vec<String> = e
            .errors
            .into_iter()
            .map(|x| match (x.code, x.message) {
                (Some(c), Some(m)) => format!("{m} ({c})"),
                (c, m) => m.or(c).unwrap_or_default(),
            })
            .collect();
        return Some(msgs.join("; "));
    }
    let t = body.trim();
    (!t.is_empty() && t.len() < 300).then(|| t.to_string())
}

/// The media type of a manifest: the JSON's own `mediaType`, else the header; refuses
/// schema 1 and anything that is not an index or an image manifest.
fn media_type_of(
    bytes: &[u8],
    header: Option<&str>,
    reference: &Reference,
) -> Result<String, OciError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| OciError::Malformed {
        what: format!("manifest of {reference}"),
        detail: e.to_string(),
    })?;
    if probe.schema_version == Some(1) || header == Some(DOCKER_SCHEMA1) {
        return Err(OciError::Schema1 {
            reference: reference.to_string(),
        });
    }
    let mt = match (probe.media_type, header) {
        (Some(m), _) => m,
        (None, Some(h)) if h != "application/json" && h != "application/octet-stream" => {
            h.to_string()
        }
        // OCI allows omitting mediaType: tell index from manifest by shape.
        (None, _) if probe.manifests.is_some() => OCI_INDEX.to_string(),
        (None, _) => OCI_MANIFEST.to_string(),
    };
    match mt.as_str() {
        OCI_INDEX | OCI_MANIFEST | DOCKER_LIST | DOCKER_MANIFEST => Ok(mt),
        "application/vnd.docker.distribution.manifest.v1+json" => Err(OciError::Schema1 {
            reference: reference.to_string(),
        }),
        _ => Err(OciError::UnsupportedMediaType {
            reference: reference.to_string(),
            what: "manifest",
            media_type: mt,
        }),
    }
}

fn form_encode(pairs: &[(&str, &str)]) -> String {
    // reqwest's "form" feature would pull serde_urlencoded for this one body.
    let mut u = reqwest::Url::parse("http://form.invalid/").expect("a constant URL parses");
    u.query_pairs_mut().extend_pairs(pairs.iter());
    u.query().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_listed_registries_use_plain_http() {
        let c = RegistryClient::new(ClientOptions {
            insecure: vec!["reg.lan:5000".into(), "other.lan".into()],
            ..ClientOptions::default()
        })
        .expect("client");
        assert_eq!(c.scheme_for("127.0.0.1:5000"), "http");
        assert_eq!(c.scheme_for("localhost:5000"), "http");
        assert_eq!(c.scheme_for("[::1]:5000"), "http");
        assert_eq!(c.scheme_for("reg.lan:5000"), "http");
        assert_eq!(c.scheme_for("other.lan:443"), "http");
        assert_eq!(c.scheme_for("reg.lan:5001"), "https");
        assert_eq!(c.scheme_for("docker.io"), "https");
    }

    #[test]
    fn schema1_manifests_are_refused_with_a_clear_error() {
        let r = Reference::parse("old/image:1").expect("ref");
        let e = media_type_of(br#"{"schemaVersion":1,"name":"old/image"}"#, None, &r)
            .expect_err("schema 1");
        assert!(matches!(e, OciError::Schema1 { .. }), "{e}");
        assert!(e.to_string().contains("schema 1"));
        let e =
            media_type_of(br#"{"schemaVersion":2}"#, Some(DOCKER_SCHEMA1), &r).expect_err("header");
        assert!(matches!(e, OciError::Schema1 { .. }));
        let e = media_type_of(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.cncf.helm.chart"}"#,
            None,
            &r,
        )
        .expect_err("helm");
        assert!(matches!(e, OciError::UnsupportedMediaType { .. }));
        assert_eq!(
            media_type_of(
                br#"{"schemaVersion":2,"manifests":[]}"#,
                Some("application/json"),
                &r
            )
            .expect("index"),
            OCI_INDEX
        );
    }

    #[test]
    fn registry_error_bodies_give_their_message() {
        assert_eq!(
            error_detail(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#)
                .as_deref(),
            Some("authentication required (UNAUTHORIZED)")
        );
        assert_eq!(error_detail("").as_deref(), None);
    }

    #[test]
    fn form_bodies_are_url_encoded() {
        assert_eq!(
            form_encode(&[("scope", "repository:a/b:pull"), ("x", "a b")]),
            "scope=repository%3Aa%2Fb%3Apull&x=a+b"
        );
    }
}
