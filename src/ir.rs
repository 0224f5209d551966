//! The image IR: what every front end (Dockerfile, SDK JSON) lowers to and every builder
//! consumes. It holds no Dockerfile syntax: words are expanded, paths resolved, defaults
//! applied. The JSON form (`kiln lower`) is a stable, versioned contract; see
//! `docs/ir.md`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the IR's JSON form.
pub const IR_VERSION: u32 = 1;

/// Docker's default PATH for Linux images that set none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A whole build: the target stage and every stage it needs, in build order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// [`IR_VERSION`].
    pub version: u32,
    /// Stages the target needs, dependencies first; the last one is the target.
    pub stages: Vec<Stage>,
    /// Build arguments given by the caller, as given.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
}

impl ImageSpec {
    /// The target stage.
    pub fn target(&self) -> Option<&Stage> {
        self.stages.last()
    }

    /// A stage by its index in the source file.
    pub fn stage(&self, index: usize) -> Option<&Stage> {
        self.stages.iter().find(|s| s.index == index)
    }
}

/// One build stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Position of the stage in the source (0-based), as `COPY --from=N` counts.
    pub index: usize,
    /// `AS name`, lower-cased, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the stage starts from.
    pub base: Base,
    /// `--platform`, expanded, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Steps in order. Where each came from (a Dockerfile line, an SDK operation) is kept
    /// beside the IR by the front end, so a Dockerfile and its SDK twin give equal IR.
    pub steps: Vec<Op>,
    /// The image configuration at the end of the stage (base config plus this stage's changes).
    pub config: ImageConfig,
}

/// The starting point of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Base {
    /// An empty root.
    Scratch,
    /// An image reference as written after expansion (`alpine:3.20`, `kiln/busybox`).
    Image {
        /// The reference.
        reference: String,
    },
    /// The final tree of an earlier stage.
    Stage {
        /// The earlier stage's source index.
        index: usize,
    },
}

/// One step: an operation on the root tree or the build state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Run a command.
    Run(Run),
    /// Copy files from the context, a stage or an image.
    Copy(Copy),
    /// Add files: like copy, plus URLs, git and local archive extraction.
    Add(Add),
    /// Set environment variables (already applied to later steps' `env`).
    Env {
        /// The pairs this step sets, in order.
        vars: Vec<(String, String)>,
    },
    /// Set the working directory (created if missing).
    Workdir {
        /// Absolute path.
        path: String,
    },
    /// Set the user later steps and the image run as.
    User {
        /// `user`, `uid`, `user:group` or `uid:gid`, expanded.
        user: String,
    },
}

/// `url` with the password of its user info (`https://user:pass@host/…`) replaced by `xxxxx`,
/// as BuildKit shows URLs in logs and errors.
pub fn redact_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split_once(':').map_or(user_info, |(u, _)| u);
            let masked = if user_info.contains(':') {
                format!("{user}:xxxxx")
            } else {
                "xxxxx".to_string()
            };
            format!("{scheme}://{masked}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

impl Op {
    /// A one-line, Dockerfile-like description for logs and `image create` JSON
    /// (`RUN apt-get update`, `COPY app.py /app/`), rendered from the IR alone.
    pub fn summary(&self) -> String {
        fn sources(s: &[Source]) -> String {
            s.iter()
                .map(|s| match s {
                    Source::Path { path } => path.clone(),
                    Source::Inline { name, .. } => format!("<<{name}"),
                    Source::Url { url } | Source::Git { url } => redact_credentials(url),
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
        let flag = |name: &str, v: &Option<String>| {
            v.as_ref()
                .map(|v| format!("--{name}={v} "))
                .unwrap_or_default()
        };
        match self {
            Op::Run(r) => {
                let cmd = match &r.command {
                    Command::Shell { script, .. } => {
                        script.lines().next().unwrap_or("").to_string()
                    }
                    Command::Exec { args } => serde_json::to_string(args).unwrap_or_default(),
                    Command::Script { name, .. } => format!("<<{name}"),
                };
                format!("RUN {cmd}")
            }
            Op::Copy(c) => {
                let from = match &c.from {
                    Some(CopyFrom::Stage { index }) => format!("--from={index} "),
                    Some(CopyFrom::Image { reference }) => format!("--from={reference} "),
                    None => String::new(),
                };
                format!(
                    "COPY {from}{}{}{}",
                    flag("chown", &c.chown),
                    sources(&c.sources),
                    format_args!(" {}", c.dest)
                )
            }
            Op::Add(a) => format!(
                "ADD {}{}{}",
                flag("chown", &a.chown),
                sources(&a.sources),
                format_args!(" {}", a.dest)
            ),
            Op::Env { vars } => format!(
                "ENV {}",
                vars.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Op::Workdir { path } => format!("WORKDIR {path}"),
            Op::User { user } => format!("USER {user}"),
        }
    }
}

/// What a RUN executes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "form", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Shell form: `shell + [script]`.
    Shell {
        /// The shell (`SHELL`, default `["/bin/sh", "-c"]`).
        shell: Vec<String>,
        /// The script text, heredocs reassembled.
        script: String,
    },
    /// Exec form: argv as given.
    Exec {
        /// The argv.
        args: Vec<String>,
    },
    /// A heredoc with a `#!` line: written to `/dev/pipes/NAME` (mode 0755) and executed.
    Script {
        /// The heredoc's name (the file name).
        name: String,
        /// The file content.
        content: String,
    },
}

/// RUN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// What to execute.
    pub command: Command,
    /// The full environment the command sees: stage ENV, then ARGs in scope that ENV does
    /// not set.
    pub env: Vec<(String, String)>,
    /// The user to run as (`None`: the image default, root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Absolute working directory.
    pub workdir: String,
    /// `--network`.
    pub network: Network,
    /// `--security`.
    pub security: Security,
    /// `--mount` specs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// `--device` requests, as written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

/// RUN's network mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// The builder's default network.
    #[default]
    Default,
    /// No network.
    None,
    /// The host's network.
    Host,
}

/// RUN's security mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// The normal sandbox.
    #[default]
    Sandbox,
    /// `--security=insecure`.
    Insecure,
}

/// A `RUN --mount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Mount {
    /// A bind mount from the context, a stage or an image.
    Bind {
        /// Absolute target.
        target: String,
        /// Path in the source (default `/`).
        source: String,
        /// Where from (`None`: the build context).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<CopyFrom>,
        /// Writes are allowed but discarded.
        readwrite: bool,
    },
    /// A persistent cache directory.
    Cache {
        /// Absolute target.
        target: String,
        /// Cache id (default: the target).
        id: String,
        /// `shared`, `private` or `locked`.
        sharing: CacheSharing,
        /// Read-only.
        readonly: bool,
        /// Seed from this source.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<CopyFrom>,
        /// Path inside `from`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
        /// Octal mode of the cache root (default 0755).
        mode: u32,
        /// Owner uid (default 0).
        uid: u32,
        /// Owner gid (default 0).
        gid: u32,
    },
    /// A fresh tmpfs.
    Tmpfs {
        /// Absolute target.
        target: String,
        /// Size limit in bytes, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
    },
    /// A build secret, never stored in the image, the cache key or the logs.
    Secret {
        /// The secret id (`--secret id=…`).
        id: String,
        /// Mounted as a file here (default `/run/secrets/ID`), unless only `env` is given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        /// Also exposed as this environment variable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        env: Option<String>,
        /// Fail when the secret is not provided.
        required: bool,
        /// File mode (default 0400).
        mode: u32,
        /// Owner uid.
        uid: u32,
        /// Owner gid.
        gid: u32,
    },
    /// An SSH agent socket.
    Ssh {
        /// The ssh id (default `default`).
        id: String,
        /// Socket path (default `/run/buildkit/ssh_agent.N`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        /// Fail when not provided.
        required: bool,
        /// Socket mode (default 0600).
        mode: u32,
        /// Owner uid.
        uid: u32,
        /// Owner gid.
        gid: u32,
    },
}

impl Mount {
    /// The stage or image a bind or cache mount reads from, if not the build context.
    pub fn from(&self) -> Option<&CopyFrom> {
        match self {
            Mount::Bind { from, .. } | Mount::Cache { from, .. } => from.as_ref(),
            Mount::Tmpfs { .. } | Mount::Secret { .. } | Mount::Ssh { .. } => None,
        }
    }
}

/// Cache mount sharing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheSharing {
    /// Concurrent users share it.
    #[default]
    Shared,
    /// Each concurrent user gets its own.
    Private,
    /// One user at a time.
    Locked,
}

/// Where COPY/ADD/mount sources come from when not the build context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CopyFrom {
    /// An earlier stage's final tree.
    Stage {
        /// Its source index.
        index: usize,
    },
    /// An image's root tree.
    Image {
        /// The reference.
        reference: String,
    },
}

/// A source of COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A path or glob in the context (or the `from` tree), expanded, as written.
    Path {
        /// The path.
        path: String,
    },
    /// Inline content from a heredoc (chomped and expanded as asked).
    Inline {
        /// File name (the heredoc name).
        name: String,
        /// The content.
        content: String,
    },
    /// ADD of an http(s) URL.
    Url {
        /// The URL.
        url: String,
    },
    /// ADD of a git repository.
    Git {
        /// The URL, `#ref:subdir` fragment included.
        url: String,
    },
}

/// COPY.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Copy {
    /// Sources in order.
    pub sources: Vec<Source>,
    /// Absolute destination; a trailing `/` means "into this directory".
    pub dest: String,
    /// `--from`; `None` is the build context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<CopyFrom>,
    /// `--chown`, expanded (`user[:group]`); `None` is 0:0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chown: Option<String>,
    /// `--chmod` as a mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chmod: Option<u32>,
    /// `--link`.
    pub link: bool,
    /// `--exclude` patterns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// `--parents`.
    pub parents: bool,
}

/// ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Add {
    /// Sources in order.
    pub sources: Vec<Source>,
    /// Absolute destination; a trailing `/` means "into this directory".
    pub dest: String,
    /// `--chown`, expanded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chown: Option<String>,
    /// `--chmod` as a mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chmod: Option<u32>,
    /// `--link`.
    pub link: bool,
    /// `--exclude` patterns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// `--checksum` (`sha256:…`) for URL sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// `--keep-git-dir`.
    pub keep_git_dir: bool,
    /// `--unpack`: `None` is the default (local archives unpack, URLs do not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpack: Option<bool>,
}

/// A HEALTHCHECK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", argv…]` or `["CMD-SHELL", script]`, as in the OCI/Docker config.
    pub test: Vec<String>,
    /// Nanoseconds; 0 means the default.
    #[serde(default)]
    pub interval: u64,
    /// Nanoseconds.
    #[serde(default)]
    pub timeout: u64,
    /// Nanoseconds.
    #[serde(default)]
    pub start_period: u64,
    /// Nanoseconds.
    #[serde(default)]
    pub start_interval: u64,
    /// Consecutive failures before unhealthy; 0 means the default.
    #[serde(default)]
    pub retries: u32,
}

/// Image configuration that is kept, not run. Field names follow `kiln image describe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// `K=V` entries, in order.
    #[serde(default)]
    pub env: Vec<String>,
    /// Absolute working directory, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Default command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `{"80/tcp": {}}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, Empty>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// Stop signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// `{"/data": {}}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, Empty>,
    /// SHELL, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    /// ONBUILD triggers, as written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub onbuild: Vec<String>,
}

/// The `{}` of OCI's port and volume sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

impl ImageConfig {
    /// The value of an environment variable.
    pub fn env_get(&self, key: &str) -> Option<&str> {
        self.env.iter().find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v)
        })
    }

    /// Sets a variable in place (keeping its position), or appends it.
    pub fn env_set(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self
            .env
            .iter_mut()
            .find(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k) == key)
        {
            Some(slot) => *slot = entry,
            None => self.env.push(entry),
        }
    }

    /// The environment as ordered pairs.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.clone(), String::new()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_masked() {
        assert_eq!(
            redact_credentials("https://bob:s3cret@h.example/a@b?x#y"),
            "https://bob:xxxxx@h.example/a@b?x#y"
        );
        assert_eq!(
            redact_credentials("https://tok3n@h.example/r.git"),
            "https://xxxxx@h.example/r.git"
        );
        assert_eq!(
            redact_credentials("https://h.example/a@b"),
            "https://h.example/a@b"
        );
        assert_eq!(
            redact_credentials("git@github.com:o/r.git"),
            "git@github.com:o/r.git"
        );
    }

    #[test]
    fn env_set_replaces_in_place() {
        let mut c = ImageConfig {
            env: vec!["A=1".into(), "B=2".into()],
            ..Default::default()
        };
        c.env_set("A", "3");
        c.env_set("C", "x=y");
        assert_eq!(c.env, vec!["A=3", "B=2", "C=x=y"]);
        assert_eq!(c.env_get("C"), Some("x=y"));
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = ImageSpec {
            version: IR_VERSION,
            stages: vec![Stage {
                index: 0,
                name: Some("build".into()),
                base: Base::Image {
                    reference: "kiln/busybox".into(),
                },
                platform: None,
                steps: vec![Op::Run(Run {
                    command: Command::Shell {
                        shell: vec!["/bin/sh".into(), "-c".into()],
                        script: "true".into(),
                    },
                    env: vec![("PATH".into(), DEFAULT_PATH.into())],
                    user: None,
                    workdir: "/".into(),
                    network: Network::None,
                    security: Security::Sandbox,
                    mounts: vec![Mount::Cache {
                        target: "/root/.cache".into(),
                        id: "/root/.cache".into(),
                        sharing: CacheSharing::Locked,
                        readonly: false,
                        from: None,
                        source: None,
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                    }],
                    devices: vec![],
                })],
                config: ImageConfig::default(),
            }],
            build_args: BTreeMap::new(),
        };
        let json = serde_json::to_string(&spec).expect("serializes");
        let back: ImageSpec = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(spec, back);
    }
}
