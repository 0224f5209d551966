//! SDK image definitions: the JSON a Python or TypeScript SDK's image builder sends, lowered
//! to the same IR as the equivalent Dockerfile.
//!
//! Values are literal: no `$VAR` expansion and no quote processing, because an SDK caller
//! passes strings, not Dockerfile words. Build args reach RUN steps as environment, as a
//! declared `ARG` does. Unknown ops and fields are errors that name their JSON path.
//!
//! ```json
//! {"name": "py-tools", "base_image": "kiln/debian:bookworm",
//!  "operations": [{"op": "RUN", "args": ["apt-get update"]},
//!                 {"op": "COPY", "args": ["src", "/app"], "options": {"chown": "1000"}},
//!                 {"op": "ENV", "args": ["KEY", "value"]}],
//!  "cmd": ["python3", "-m", "app"]}
//! ```

use super::error::FrontendError;
use super::lower::{
    BaseImages, LowerOptions, Lowered, Origin, RunParts, StageState, check_checksum, check_chown,
    check_multi_source_dest, classify_source, expand_ports, parse_chmod, parse_mount, resolve_dest,
    shell_command, valid_signal,
};
use crate::ir::{
    Add, Base, Command, Copy, CopyFrom, Empty, IR_VERSION, ImageConfig, ImageSpec, Mount, Network,
    Security, Stage,
};
use serde::Deserialize;
use std::collections::BTreeMap;

/// An image definition.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdkImage {
    /// The image's name (the default registered name).
    #[serde(default)]
    pub name: Option<String>,
    /// A tag, kept for the caller.
    #[serde(default)]
    pub tag: Option<String>,
    /// The base image reference, or `scratch`.
    pub base_image: String,
    /// Steps, in order.
    #[serde(default)]
    pub operations: Vec<Operation>,
    /// Build arguments: visible to RUN steps as environment, not kept in the image.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// Default command (exec form).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Entrypoint (exec form).
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Ports: numbers (`8080`) or specs (`"53/udp"`, `"8000-8010"`).
    #[serde(default)]
    pub expose: Vec<Port>,
    /// Volumes.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Stop signal.
    #[serde(default)]
    pub stop_signal: Option<String>,
}

/// A port given as a number or a spec string.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Port {
    /// `8080`.
    Number(u16),
    /// `"53/udp"`.
    Spec(String),
}

/// One operation. `op` is `RUN`, `COPY`, `ADD`, `ENV`, `WORKDIR`, `USER` or `SHELL`
/// (any case).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum Operation {
    /// `args`: one script (shell form), or argv with `options.exec`.
    #[serde(rename = "RUN", alias = "run", alias = "Run")]
    Run {
        /// The script, or argv.
        args: Vec<String>,
        /// Flags.
        #[serde(default)]
        options: RunOptions,
    },
    /// `args`: sources…, destination.
    #[serde(rename = "COPY", alias = "copy", alias = "Copy")]
    Copy {
        /// Sources and destination.
        args: Vec<String>,
        /// Flags.
        #[serde(default)]
        options: CopyOptions,
    },
    /// `args`: sources… (paths, URLs, git), destination.
    #[serde(rename = "ADD", alias = "add", alias = "Add")]
    Add {
        /// Sources and destination.
        args: Vec<String>,
        /// Flags.
        #[serde(default)]
        options: AddOptions,
    },
    /// `args`: `KEY, value` pairs.
    #[serde(rename = "ENV", alias = "env", alias = "Env")]
    Env {
        /// Keys and values, alternating.
        args: Vec<String>,
    },
    /// `args`: one path.
    #[serde(rename = "WORKDIR", alias = "workdir", alias = "Workdir")]
    Workdir {
        /// The path.
        args: Vec<String>,
    },
    /// `args`: one user.
    #[serde(rename = "USER", alias = "user", alias = "User")]
    User {
        /// The user.
        args: Vec<String>,
    },
    /// `args`: the shell argv for later shell-form RUNs.
    #[serde(rename = "SHELL", alias = "shell", alias = "Shell")]
    Shell {
        /// The shell.
        args: Vec<String>,
    },
}

/// RUN options.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOptions {
    /// `args` is an argv (exec form).
    #[serde(default)]
    pub exec: bool,
    /// `default`, `none` or `host`.
    #[serde(default)]
    pub network: Option<String>,
    /// `sandbox` or `insecure`.
    #[serde(default)]
    pub security: Option<String>,
    /// `--mount` values, as in a Dockerfile (`type=cache,target=/root/.cache`).
    #[serde(default)]
    pub mounts: Vec<String>,
    /// `--device` values.
    #[serde(default)]
    pub devices: Vec<String>,
}

/// A mode as a string (`"755"`) or the same digits as a number (`755`), octal either way.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Mode {
    /// `"755"`.
    Text(String),
    /// `755`.
    Digits(u32),
}

impl Mode {
    fn parse(&self) -> Result<u32, String> {
        match self {
            Mode::Text(s) => parse_chmod(s),
            Mode::Digits(d) => parse_chmod(&d.to_string()),
        }
    }
}

/// COPY options.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyOptions {
    /// An image to copy from.
    #[serde(default)]
    pub from: Option<String>,
    /// `user[:group]`.
    #[serde(default)]
    pub chown: Option<String>,
    /// Octal mode.
    #[serde(default)]
    pub chmod: Option<Mode>,
    /// `--link`.
    #[serde(default)]
    pub link: bool,
    /// `--exclude` patterns.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `--parents`.
    #[serde(default)]
    pub parents: bool,
}

/// ADD options.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddOptions {
    /// `user[:group]`.
    #[serde(default)]
    pub chown: Option<String>,
    /// Octal mode.
    #[serde(default)]
    pub chmod: Option<Mode>,
    /// `--link`.
    #[serde(default)]
    pub link: bool,
    /// `--exclude` patterns.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `sha256:…` of a URL source.
    #[serde(default)]
    pub checksum: Option<String>,
    /// Keep `.git` of a git source.
    #[serde(default)]
    pub keep_git_dir: bool,
    /// Unpack archives (`null`: the default).
    #[serde(default)]
    pub unpack: Option<bool>,
}

/// Reads an SDK definition; errors name the JSON path (`operations[2].options.chmod`).
pub fn from_json(text: &str) -> Result<SdkImage, FrontendError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        FrontendError::plain(format!(
            "invalid SDK image definition at {path}: {inner}"
        ))
        .with_help(
            "see DESIGN.md, \"SDK image definitions\": {\"base_image\", \"operations\": [{\"op\", \"args\", \"options\"}]}"
                .into(),
        )
    })
}

fn at(i: usize, msg: impl std::fmt::Display) -> FrontendError {
    FrontendError::plain(format!("operations[{i}]: {msg}"))
}

fn one(i: usize, op: &str, args: &[String]) -> Result<String, FrontendError> {
    match args {
        [a] if !a.is_empty() => Ok(a.clone()),
        _ => Err(at(i, format!("{op} takes exactly one non-empty argument"))),
    }
}

/// Lowers an SDK definition. `opts.build_args` override the definition's own.
pub fn lower_sdk(
    img: &SdkImage,
    opts: &LowerOptions,
    bases: &dyn BaseImages,
) -> Result<Lowered, FrontendError> {
    if opts.target.is_some() {
        return Err(FrontendError::plain(
            "--target needs a multi-stage Dockerfile; an SDK definition has one stage".into(),
        ));
    }
    let reference = img.base_image.trim();
    if reference.is_empty() {
        return Err(FrontendError::plain("base_image: must not be empty".into()));
    }
    let base = if reference.eq_ignore_ascii_case("scratch") {
        Base::Scratch
    } else {
        Base::Image {
            reference: reference.to_string(),
        }
    };
    let base_config = match &base {
        Base::Image { reference } => bases.config(reference).unwrap_or_default(),
        _ => ImageConfig::default(),
    };
    let mut build_args = img.build_args.clone();
    build_args.extend(opts.build_args.clone());
    let proxies = build_args
        .iter()
        .filter(|(k, _)| super::lower::PROXY_ARGS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut st = StageState::new(base_config, proxies);
    for (k, v) in &build_args {
        if !super::lower::PROXY_ARGS.contains(&k.as_str()) {
            st.declare_arg(k, Some(v.clone()));
        }
    }
    for (i, op) in img.operations.iter().enumerate() {
        let origin = Origin::Operation(i);
        match op {
            Operation::Run { args, options } => {
                let command = if options.exec {
                    if args.is_empty() {
                        return Err(at(i, "RUN with exec needs at least one argument"));
                    }
                    Command::Exec { args: args.clone() }
                } else {
                    let script = one(i, "RUN (shell form)", args)?;
                    shell_command(st.shell(), &script, &[])
                };
                let network = match options.network.as_deref() {
                    None | Some("default") => Network::Default,
                    Some("none") => Network::None,
                    Some("host") => Network::Host,
                    Some(other) => {
                        return Err(at(i, format!("unsupported network mode {other:?}")));
                    }
                };
                let security = match options.security.as_deref() {
                    None | Some("sandbox") => Security::Sandbox,
                    Some("insecure") => Security::Insecure,
                    Some(other) => {
                        return Err(at(i, format!("unsupported security mode {other:?}")));
                    }
                };
                let literal = |v: &str| Ok(v.to_string());
                let mut mounts = Vec::with_capacity(options.mounts.len());
                for (j, m) in options.mounts.iter().enumerate() {
                    let mount: Mount = parse_mount(m, &st.workdir(), &literal)
                        .map_err(|e| at(i, format!("options.mounts[{j}]: {e}")))?;
                    mounts.push(mount);
                }
                st.run(
                    origin,
                    RunParts {
                        command,
                        network,
                        security,
                        mounts,
                        devices: options.devices.clone(),
                    },
                );
            }
            Operation::Copy { args, options } => {
                let (dest, sources) = split_dest(i, "COPY", args)?;
                let sources = sources
                    .iter()
                    .map(|s| classify_source(s.clone(), true))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| at(i, e))?;
                let dest = resolve_dest(&st.workdir(), dest);
                check_multi_source_dest("COPY", &sources, &dest).map_err(|e| at(i, e))?;
                if let Some(c) = &options.chown {
                    check_chown(c).map_err(|e| at(i, format!("options.chown: {e}")))?;
                }
                let chmod = match &options.chmod {
                    Some(m) => Some(
                        m.parse()
                            .map_err(|e| at(i, format!("options.chmod: {e}")))?,
                    ),
                    None => None,
                };
                st.copy(
                    origin,
                    Copy {
                        sources,
                        dest,
                        from: options.from.as_ref().map(|f| CopyFrom::Image {
                            reference: f.clone(),
                        }),
                        chown: options.chown.clone(),
                        chmod,
                        link: options.link,
                        exclude: options.exclude.clone(),
                        parents: options.parents,
                    },
                );
            }
            Operation::Add { args, options } => {
                let (dest, sources) = split_dest(i, "ADD", args)?;
                let sources = sources
                    .iter()
                    .map(|s| classify_source(s.clone(), false))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| at(i, e))?;
                let dest = resolve_dest(&st.workdir(), dest);
                check_multi_source_dest("ADD", &sources, &dest).map_err(|e| at(i, e))?;
                if let Some(c) = &options.chown {
                    check_chown(c).map_err(|e| at(i, format!("options.chown: {e}")))?;
                }
                if let Some(c) = &options.checksum {
                    check_checksum(c, &sources)
                        .map_err(|e| at(i, format!("options.checksum: {e}")))?;
                }
                let chmod = match &options.chmod {
                    Some(m) => Some(
                        m.parse()
                            .map_err(|e| at(i, format!("options.chmod: {e}")))?,
                    ),
                    None => None,
                };
                st.add(
                    origin,
                    Add {
                        sources,
                        dest,
                        chown: options.chown.clone(),
                        chmod,
                        link: options.link,
                        exclude: options.exclude.clone(),
                        checksum: options.checksum.clone(),
                        keep_git_dir: options.keep_git_dir,
                        unpack: options.unpack,
                    },
                );
            }
            Operation::Env { args } => {
                if args.is_empty() || args.len() % 2 != 0 {
                    return Err(at(i, "ENV takes KEY, value pairs"));
                }
                let vars: Vec<(String, String)> = args
                    .chunks(2)
                    .map(|kv| (kv[0].clone(), kv[1].clone()))
                    .collect();
                if vars.iter().any(|(k, _)| k.is_empty() || k.contains('=')) {
                    return Err(at(i, "ENV keys must be non-empty and contain no `=`"));
                }
                st.env(origin, vars);
            }
            Operation::Workdir { args } => {
                let path = one(i, "WORKDIR", args)?;
                st.set_workdir(origin, &path);
            }
            Operation::User { args } => {
                let user = one(i, "USER", args)?;
                st.user(origin, user);
            }
            Operation::Shell { args } => {
                if args.is_empty() {
                    return Err(at(i, "SHELL needs at least one argument"));
                }
                st.config.shell = Some(args.clone());
            }
        }
    }
    if let Some(e) = &img.entrypoint {
        st.entrypoint(e.clone());
    }
    if let Some(c) = &img.cmd {
        st.cmd(c.clone());
    }
    for (k, v) in &img.labels {
        st.config.labels.insert(k.clone(), v.clone());
    }
    for (j, p) in img.expose.iter().enumerate() {
        let spec = match p {
            Port::Number(n) => n.to_string(),
            Port::Spec(s) => s.clone(),
        };
        for port in
            expand_ports(&spec).map_err(|e| FrontendError::plain(format!("expose[{j}]: {e}")))?
        {
            st.config.exposed_ports.insert(port, Empty {});
        }
    }
    for v in &img.volumes {
        if v.trim().is_empty() {
            return Err(FrontendError::plain(
                "volumes: a volume path is empty".into(),
            ));
        }
        st.config.volumes.insert(v.clone(), Empty {});
    }
    if let Some(s) = &img.stop_signal {
        if !valid_signal(s) {
            return Err(FrontendError::plain(format!(
                "stop_signal: invalid signal {s:?}"
            )));
        }
        st.config.stop_signal = Some(s.clone());
    }
    let origins = vec![st.origins];
    Ok(Lowered {
        spec: ImageSpec {
            version: IR_VERSION,
            stages: vec![Stage {
                index: 0,
                name: None,
                base,
                platform: None,
                steps: st.steps,
                config: st.config,
            }],
            build_args,
        },
        lints: Vec::new(),
        unused_build_args: Vec::new(),
        origins,
    })
}

fn split_dest<'a>(
    i: usize,
    op: &str,
    args: &'a [String],
) -> Result<(&'a str, &'a [String]), FrontendError> {
    match args.split_last() {
        Some((dest, srcs)) if !srcs.is_empty() => Ok((dest.as_str(), srcs)),
        _ => Err(at(
            i,
            format!("{op} takes sources and a destination (at least two arguments)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_errors_with_a_path() {
        let e = from_json(
            r#"{"base_image": "x", "operations": [{"op": "RUN", "args": ["true"], "options": {"netwrk": "none"}}]}"#,
        )
        .expect_err("unknown field");
        assert!(e.message.contains("operations[0]"), "{}", e.message);
        assert!(e.message.contains("netwrk"), "{}", e.message);
    }

    #[test]
    fn unknown_ops_are_errors() {
        let e = from_json(r#"{"base_image": "x", "operations": [{"op": "FROB", "args": []}]}"#)
            .expect_err("unknown op");
        assert!(e.message.contains("operations[0]"), "{}", e.message);
    }

    #[test]
    fn env_needs_pairs() {
        let img = from_json(r#"{"base_image": "x", "operations": [{"op": "ENV", "args": ["A"]}]}"#)
            .expect("parses");
        let e = lower_sdk(&img, &LowerOptions::default(), &super::super::NoBaseImages)
            .expect_err("odd args");
        assert!(e.message.starts_with("operations[0]"), "{}", e.message);
    }
}
