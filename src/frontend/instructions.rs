//! Syntax tree → typed commands: arity, flags and forms checked, words still raw.
//!
//! This is BuildKit's `instructions` layer. Nothing is expanded here because ARG values are
//! known only while lowering; every word keeps its [`Span`] so later errors can point at it.

use super::dockerfile::ast::{Arg, Args, Heredoc, Instruction, Span, lowercase};
use super::error::FrontendError;

/// Every instruction keyword BuildKit knows.
pub const KEYWORDS: &[&str] = &[
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];

/// A shell-form or exec-form command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// Shell form: the text as written.
    Shell(Arg),
    /// Exec form.
    Exec(Vec<String>),
}

/// One typed instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `FROM [--platform=P] image [AS name]`.
    From {
        /// The image word, raw.
        image: Arg,
        /// `AS name`, raw.
        name: Option<Arg>,
        /// The `AS` keyword as written (for the casing lint).
        as_keyword: Option<Arg>,
        /// `--platform`.
        platform: Option<Arg>,
    },
    /// `ARG name[=default] …`.
    Arg(Vec<ArgDecl>),
    /// `ENV k=v …` (values raw).
    Env {
        /// Pairs.
        pairs: Vec<(Arg, Arg)>,
        /// Legacy `ENV k v` form.
        legacy: bool,
    },
    /// `LABEL k=v …`.
    Label {
        /// Pairs.
        pairs: Vec<(Arg, Arg)>,
        /// Legacy form.
        legacy: bool,
    },
    /// RUN.
    Run(RunCommand),
    /// CMD.
    Cmd(Option<CommandLine>),
    /// ENTRYPOINT.
    Entrypoint(Option<CommandLine>),
    /// SHELL (exec form only).
    Shell(Vec<String>),
    /// COPY.
    Copy(CopyCommand),
    /// ADD.
    Add(CopyCommand),
    /// WORKDIR.
    Workdir(Arg),
    /// USER.
    User(Arg),
    /// EXPOSE.
    Expose(Vec<Arg>),
    /// VOLUME.
    Volume(Vec<Arg>),
    /// STOPSIGNAL.
    StopSignal(Arg),
    /// HEALTHCHECK.
    Healthcheck(HealthcheckCommand),
    /// ONBUILD: the trigger's text and its typed form.
    Onbuild {
        /// The trigger as written (stored in the image config).
        expression: String,
        /// The trigger, checked.
        trigger: Box<Typed>,
    },
    /// MAINTAINER (deprecated).
    Maintainer(Arg),
}

/// A command with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Typed {
    /// The command.
    pub command: Command,
    /// The keyword as written.
    pub keyword: String,
    /// The keyword's span.
    pub keyword_span: Span,
    /// The whole instruction.
    pub span: Span,
    /// 1-based first line.
    pub line: u32,
    /// The logical line as written.
    pub original: String,
}

/// One `ARG` word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// The name.
    pub key: String,
    /// The raw default, if any.
    pub value: Option<String>,
    /// The word.
    pub span: Span,
}

/// RUN with its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCommand {
    /// The command.
    pub command: CommandLine,
    /// Heredocs of the line.
    pub heredocs: Vec<Heredoc>,
    /// `--mount` values, raw.
    pub mounts: Vec<Arg>,
    /// `--network`.
    pub network: Option<Arg>,
    /// `--security`.
    pub security: Option<Arg>,
    /// `--device` values.
    pub devices: Vec<Arg>,
}

/// COPY or ADD with its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyCommand {
    /// Source words (raw) and heredoc sources.
    pub sources: Vec<CopySource>,
    /// Destination word (raw).
    pub dest: Arg,
    /// `--from` (COPY only).
    pub from: Option<Arg>,
    /// `--chown`.
    pub chown: Option<Arg>,
    /// `--chmod`.
    pub chmod: Option<Arg>,
    /// `--link`.
    pub link: bool,
    /// `--exclude`.
    pub exclude: Vec<Arg>,
    /// `--parents` (COPY).
    pub parents: bool,
    /// `--checksum` (ADD).
    pub checksum: Option<Arg>,
    /// `--keep-git-dir` (ADD).
    pub keep_git_dir: bool,
    /// `--unpack` (ADD).
    pub unpack: Option<bool>,
}

/// A COPY/ADD source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySource {
    /// A path word.
    Path(Arg),
    /// A heredoc.
    Heredoc(Heredoc),
}

/// HEALTHCHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthcheckCommand {
    /// `HEALTHCHECK NONE`.
    None,
    /// `HEALTHCHECK [flags] CMD …`.
    Cmd {
        /// `CMD` argv or `CMD-SHELL` text, as the config stores it.
        test: Vec<String>,
        /// `--interval` etc. in nanoseconds.
        interval: u64,
        /// `--timeout`.
        timeout: u64,
        /// `--start-period`.
        start_period: u64,
        /// `--start-interval`.
        start_interval: u64,
        /// `--retries`.
        retries: u32,
    },
}

/// Which flags an instruction takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Bool,
    String,
    Strings,
}

struct Flags<'a> {
    keyword: &'a str,
    values: Vec<(&'static str, Option<String>, Span)>,
}

impl<'a> Flags<'a> {
    fn parse(
        ins: &'a Instruction,
        allowed: &[(&'static str, FlagKind)],
    ) -> Result<Flags<'a>, FrontendError> {
        let mut values: Vec<(&'static str, Option<String>, Span)> = Vec::new();
        for f in &ins.flags {
            let body = f.value.strip_prefix("--").unwrap_or(&f.value);
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let Some(&(known, kind)) = allowed.iter().find(|(n, _)| *n == name) else {
                let mut e = FrontendError::at(format!("unknown flag: --{name}"), f.span);
                e.help = Some(if allowed.is_empty() {
                    format!("{} takes no flags", ins.keyword.to_uppercase())
                } else {
                    format!(
                        "{} takes {}",
                        ins.keyword.to_uppercase(),
                        allowed
                            .iter()
                            .map(|(n, _)| format!("--{n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
                return Err(e);
            };
            if kind != FlagKind::Strings && values.iter().any(|(n, _, _)| *n == known) {
                return Err(FrontendError::at(
                    format!("Duplicate flag specified: --{name}"),
                    f.span,
                ));
            }
            match (kind, &value) {
                (FlagKind::Bool, Some(v)) if v != "true" && v != "false" => {
                    return Err(FrontendError::at(
                        format!("expecting boolean value for flag {name}, not: {v}"),
                        f.span,
                    ));
                }
                (FlagKind::String | FlagKind::Strings, None) => {
                    return Err(FrontendError::at(
                        format!("Missing a value on flag: --{name}"),
                        f.span,
                    )
                    .with_help(format!("write --{name}=VALUE")));
                }
                _ => {}
            }
            values.push((known, value, f.span));
        }
        Ok(Flags {
            keyword: &ins.keyword,
            values,
        })
    }

    fn string(&self, name: &str) -> Option<Arg> {
        self.values
            .iter()
            .rev()
            .find(|(n, _, _)| *n == name)
            .and_then(|(_, v, span)| {
                v.as_ref().map(|v| Arg {
                    value: v.clone(),
                    span: *span,
                })
            })
    }

    fn strings(&self, name: &str) -> Vec<Arg> {
        self.values
            .iter()
            .filter(|(n, _, _)| *n == name)
            .filter_map(|(_, v, span)| {
                v.as_ref().map(|v| Arg {
                    value: v.clone(),
                    span: *span,
                })
            })
            .collect()
    }

    fn bool(&self, name: &str) -> Option<bool> {
        self.values
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, v, _)| v.as_deref() != Some("false"))
    }

    #[allow(dead_code)]
    fn keyword(&self) -> &str {
        self.keyword
    }
}

/// Raw words of list-shaped arguments.
fn list(args: &Args) -> Vec<Arg> {
    match args {
        Args::Empty | Args::Unknown => Vec::new(),
        Args::Json { items, .. } | Args::List(items) | Args::Words(items) => items.clone(),
        Args::Text(a) => vec![a.clone()],
        Args::Pairs { pairs, .. } => pairs
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .collect(),
        Args::Healthcheck { kind, .. } => vec![kind.clone()],
        Args::Onbuild(i) => vec![Arg {
            value: i.original.clone(),
            span: i.span,
        }],
    }
}

fn command_line(args: &Args) -> Option<CommandLine> {
    match args {
        Args::Json { items, .. } => Some(CommandLine::Exec(
            items.iter().map(|a| a.value.clone()).collect(),
        )),
        Args::Text(a) => Some(CommandLine::Shell(a.clone())),
        _ => None,
    }
}

/// Edit distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest keyword to a misspelt one, in the casing the user wrote.
pub fn suggest_keyword(word: &str) -> Option<String> {
    let lower = lowercase(word);
    if lower.chars().count() > 32 {
        return None;
    }
    let (best, d) = KEYWORDS
        .iter()
        .map(|k| (*k, distance(&lower, k)))
        .min_by_key(|&(_, d)| d)?;
    if d == 0 || d > 2.max(best.len() / 3) {
        return None;
    }
    Some(if word.chars().any(char::is_lowercase) {
        best.to_string()
    } else {
        best.to_uppercase()
    })
}

fn exactly_one(ins: &Instruction, name: &str) -> Result<Arg, FrontendError> {
    match &ins.args {
        Args::Text(a) => Ok(a.clone()),
        _ => Err(FrontendError::at(
            format!("{name} requires exactly one argument"),
            ins.span,
        )),
    }
}

fn at_least_one(ins: &Instruction, name: &str) -> Result<(), FrontendError> {
    if matches!(ins.args, Args::Empty) {
        return Err(FrontendError::at(
            format!("{name} requires at least one argument"),
            ins.span,
        ));
    }
    Ok(())
}

/// Checks one instruction and gives it its type.
pub fn parse_instruction(ins: &Instruction) -> Result<Typed, FrontendError> {
    let name = ins.name();
    let upper = name.to_uppercase();
    use FlagKind::*;
    let no_flags = |ins| Flags::parse(ins, &[]).map(|_| ());
    let command = match name.as_str() {
        "from" => {
            let flags = Flags::parse(ins, &[("platform", String)])?;
            let words = list(&ins.args);
            match words.as_slice() {
                [image] => Command::From {
                    image: image.clone(),
                    name: None,
                    as_keyword: None,
                    platform: flags.string("platform"),
                },
                [image, kw, stage] if kw.value.eq_ignore_ascii_case("as") => Command::From {
                    image: image.clone(),
                    name: Some(stage.clone()),
                    as_keyword: Some(kw.clone()),
                    platform: flags.string("platform"),
                },
                [_, kw, _] => {
                    return Err(FrontendError::at(
                        "FROM requires either one or three arguments".to_string(),
                        kw.span,
                    )
                    .with_help("write `FROM image AS name`".into()));
                }
                _ => {
                    return Err(FrontendError::at(
                        "FROM requires either one or three arguments".to_string(),
                        ins.span,
                    )
                    .with_help("write `FROM image` or `FROM image AS name`".into()));
                }
            }
        }
        "arg" => {
            no_flags(ins)?;
            at_least_one(ins, "ARG")?;
            let decls = list(&ins.args)
                .into_iter()
                .map(|w| {
                    let (key, value) = match w.value.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (w.value.clone(), None),
                    };
                    ArgDecl {
                        key,
                        value,
                        span: w.span,
                    }
                })
                .collect::<Vec<_>>();
            if let Some(bad) = decls.iter().find(|d| d.key.is_empty()) {
                return Err(FrontendError::at(
                    "ARG names can not be blank".to_string(),
                    bad.span,
                ));
            }
            Command::Arg(decls)
        }
        "env" | "label" => {
            no_flags(ins)?;
            at_least_one(ins, &upper)?;
            let Args::Pairs { legacy, pairs } = &ins.args else {
                return Err(FrontendError::at(
                    format!("{upper} requires at least one argument"),
                    ins.span,
                ));
            };
            if let Some((k, _)) = pairs.iter().find(|(k, _)| k.value.is_empty()) {
                return Err(FrontendError::at(
                    format!("{upper} names can not be blank"),
                    k.span,
                ));
            }
            if name == "env" {
                Command::Env {
                    pairs: pairs.clone(),
                    legacy: *legacy,
                }
            } else {
                Command::Label {
                    pairs: pairs.clone(),
                    legacy: *legacy,
                }
            }
        }
        "run" => {
            let flags = Flags::parse(
                ins,
                &[
                    ("mount", Strings),
                    ("network", String),
                    ("security", String),
                    ("device", Strings),
                ],
            )?;
            let Some(command) = command_line(&ins.args) else {
                return Err(FrontendError::at(
                    "RUN requires at least one argument".to_string(),
                    ins.span,
                ));
            };
            Command::Run(RunCommand {
                command,
                heredocs: ins.heredocs.clone(),
                mounts: flags.strings("mount"),
                network: flags.string("network"),
                security: flags.string("security"),
                devices: flags.strings("device"),
            })
        }
        "cmd" | "entrypoint" => {
            no_flags(ins)?;
            let line = match &ins.args {
                Args::Empty => None,
                other => command_line(other),
            };
            if name == "cmd" {
                Command::Cmd(line)
            } else {
                Command::Entrypoint(line)
            }
        }
        "shell" => {
            no_flags(ins)?;
            match &ins.args {
                Args::Json { items, .. } if !items.is_empty() => {
                    Command::Shell(items.iter().map(|a| a.value.clone()).collect())
                }
                Args::Json { span, .. } => {
                    return Err(FrontendError::at(
                        "SHELL requires at least one argument".to_string(),
                        *span,
                    ));
                }
                Args::Empty => {
                    return Err(FrontendError::at(
                        "SHELL requires at least one argument".to_string(),
                        ins.span,
                    ));
                }
                _ => {
                    return Err(FrontendError::at(
                        "SHELL requires the arguments to be in JSON form".to_string(),
                        ins.span,
                    )
                    .with_help("write `SHELL [\"/bin/bash\", \"-c\"]`".into()));
                }
            }
        }
        "copy" | "add" => {
            let is_copy = name == "copy";
            let flags = if is_copy {
                Flags::parse(
                    ins,
                    &[
                        ("from", String),
                        ("chown", String),
                        ("chmod", String),
                        ("link", Bool),
                        ("exclude", Strings),
                        ("parents", Bool),
                    ],
                )?
            } else {
                Flags::parse(
                    ins,
                    &[
                        ("chown", String),
                        ("chmod", String),
                        ("link", Bool),
                        ("keep-git-dir", Bool),
                        ("checksum", String),
                        ("unpack", Bool),
                        ("exclude", Strings),
                    ],
                )?
            };
            let words = list(&ins.args);
            if words.len() < 2 {
                let msg = if words.len() == 1 {
                    format!(
                        "{upper} requires at least two arguments, but only one was provided. Destination could not be determined"
                    )
                } else {
                    format!("{upper} requires at least two arguments")
                };
                return Err(FrontendError::at(msg, ins.span)
                    .with_help(format!("write `{upper} SOURCE... DEST`")));
            }
            let (dest, srcs) = words.split_last().ok_or_else(|| {
                FrontendError::at(format!("{upper} requires at least two arguments"), ins.span)
            })?;
            let json = matches!(ins.args, Args::Json { .. });
            if !json && is_heredoc_word(&dest.value) {
                return Err(FrontendError::at(
                    format!("{upper} cannot accept a heredoc as a destination"),
                    dest.span,
                ));
            }
            let mut docs = ins.heredocs.iter();
            let mut sources = Vec::with_capacity(srcs.len());
            for s in srcs {
                if !json
                    && is_heredoc_word(&s.value)
                    && let Some(d) = docs.next()
                {
                    sources.push(CopySource::Heredoc(d.clone()));
                    continue;
                }
                sources.push(CopySource::Path(s.clone()));
            }
            Command::Add(CopyCommand {
                sources,
                dest: dest.clone(),
                from: flags.string("from"),
                chown: flags.string("chown"),
                chmod: flags.string("chmod"),
                link: flags.bool("link").unwrap_or(false),
                exclude: flags.strings("exclude"),
                parents: flags.bool("parents").unwrap_or(false),
                checksum: flags.string("checksum"),
                keep_git_dir: flags.bool("keep-git-dir").unwrap_or(false),
                unpack: flags.bool("unpack"),
            })
            .into_copy_if(is_copy)
        }
        "workdir" => {
            no_flags(ins)?;
            Command::Workdir(exactly_one(ins, "WORKDIR")?)
        }
        "user" => {
            no_flags(ins)?;
            Command::User(exactly_one(ins, "USER")?)
        }
        "stopsignal" => {
            no_flags(ins)?;
            Command::StopSignal(exactly_one(ins, "STOPSIGNAL")?)
        }
        "maintainer" => {
            no_flags(ins)?;
            Command::Maintainer(exactly_one(ins, "MAINTAINER")?)
        }
        "expose" => {
            no_flags(ins)?;
            at_least_one(ins, "EXPOSE")?;
            Command::Expose(list(&ins.args))
        }
        "volume" => {
            no_flags(ins)?;
            at_least_one(ins, "VOLUME")?;
            let paths = list(&ins.args);
            if let Some(p) = paths.iter().find(|p| p.value.trim().is_empty()) {
                return Err(FrontendError::at(
                    "VOLUME specified can not be an empty string".to_string(),
                    p.span,
                ));
            }
            Command::Volume(paths)
        }
        "healthcheck" => Command::Healthcheck(healthcheck(ins)?),
        "onbuild" => {
            no_flags(ins)?;
            at_least_one(ins, "ONBUILD")?;
            let Args::Onbuild(inner) = &ins.args else {
                return Err(FrontendError::at(
                    "ONBUILD requires at least one argument".to_string(),
                    ins.span,
                ));
            };
            match inner.name().as_str() {
                "onbuild" => {
                    return Err(FrontendError::at(
                        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".to_string(),
                        inner.keyword_span,
                    ));
                }
                "from" | "maintainer" => {
                    return Err(FrontendError::at(
                        format!(
                            "{} isn't allowed as an ONBUILD trigger",
                            inner.keyword.to_uppercase()
                        ),
                        inner.keyword_span,
                    ));
                }
                _ => {}
            }
            let trigger = parse_instruction(inner)?;
            Command::Onbuild {
                expression: inner.original.clone(),
                trigger: Box::new(trigger),
            }
        }
        _ => {
            let suggestion = suggest_keyword(&ins.keyword);
            let message = match &suggestion {
                Some(s) => format!("unknown instruction: {} (did you mean {s}?)", ins.keyword),
                None => format!("unknown instruction: {}", ins.keyword),
            };
            let mut e = FrontendError::at(message, ins.keyword_span);
            e.label = "not a Dockerfile instruction".into();
            e.help = Some(match suggestion {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!(
                    "instructions are {}",
                    KEYWORDS
                        .iter()
                        .map(|k| k.to_uppercase())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
            return Err(e);
        }
    };
    Ok(Typed {
        command,
        keyword: ins.keyword.clone(),
        keyword_span: ins.keyword_span,
        span: ins.span,
        line: ins.start_line,
        original: ins.original.clone(),
    })
}

impl Command {
    fn into_copy_if(self, copy: bool) -> Command {
        match self {
            Command::Add(c) if copy => Command::Copy(c),
            other => other,
        }
    }
}

/// A word that opens a heredoc (`<<EOF`, `<<-EOF`, `3<<EOF`).
pub fn is_heredoc_word(w: &str) -> bool {
    super::dockerfile::parser::parse_heredoc_word(w).is_some()
}

fn healthcheck(ins: &Instruction) -> Result<HealthcheckCommand, FrontendError> {
    use FlagKind::*;
    let flags = Flags::parse(
        ins,
        &[
            ("interval", String),
            ("timeout", String),
            ("start-period", String),
            ("start-interval", String),
            ("retries", String),
        ],
    )?;
    let Args::Healthcheck { kind, command } = &ins.args else {
        return Err(FrontendError::at(
            "HEALTHCHECK requires at least one argument".to_string(),
            ins.span,
        ));
    };
    match kind.value.to_uppercase().as_str() {
        "NONE" => {
            if !matches!(command.as_ref(), Args::Empty) {
                return Err(FrontendError::at(
                    "HEALTHCHECK NONE takes no arguments".to_string(),
                    ins.span,
                ));
            }
            Ok(HealthcheckCommand::None)
        }
        "CMD" => {
            let test = match command.as_ref() {
                Args::Json { items, .. } if !items.is_empty() => std::iter::once("CMD".to_string())
                    .chain(items.iter().map(|a| a.value.clone()))
                    .collect(),
                Args::Text(a) => vec!["CMD-SHELL".to_string(), a.value.clone()],
                _ => {
                    return Err(FrontendError::at(
                        "Missing command after HEALTHCHECK CMD".to_string(),
                        ins.span,
                    ));
                }
            };
            let duration = |name: &str| -> Result<u64, FrontendError> {
                let Some(v) = flags.string(name) else {
                    return Ok(0);
                };
                let d = parse_go_duration(&v.value).ok_or_else(|| {
                    FrontendError::at(
                        format!("invalid duration {:?} for --{name}", v.value),
                        v.span,
                    )
                    .with_help("use Go duration syntax, e.g. 30s, 1m30s, 500ms".into())
                })?;
                if d != 0 && d < 1_000_000 {
                    return Err(FrontendError::at(
                        format!("Interval {name:?} cannot be less than 1ms"),
                        v.span,
                    ));
                }
                Ok(d)
            };
            let retries = match flags.string("retries") {
                None => 0,
                Some(v) => {
                    let n: i64 = v.value.parse().map_err(|_| {
                        FrontendError::at(format!("invalid --retries value {:?}", v.value), v.span)
                    })?;
                    if n < 0 {
                        return Err(FrontendError::at(
                            "--retries cannot be negative".to_string(),
                            v.span,
                        ));
                    }
                    u32::try_from(n).unwrap_or(u32::MAX)
                }
            };
            Ok(HealthcheckCommand::Cmd {
                test,
                interval: duration("interval")?,
                timeout: duration("timeout")?,
                start_period: duration("start-period")?,
                start_interval: duration("start-interval")?,
                retries,
            })
        }
        other => Err(FrontendError::at(
            format!("Unknown type {other:?} in HEALTHCHECK (try CMD)"),
            kind.span,
        )),
    }
}

/// Go's `time.ParseDuration`, in nanoseconds (negative durations are refused).
pub fn parse_go_duration(s: &str) -> Option<u64> {
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Some(0);
    }
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let num: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += num * scale;
    }
    if total > u64::MAX as f64 {
        return None;
    }
    Some(total as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("30s"), Some(30_000_000_000));
        assert_eq!(parse_go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_go_duration("1.5h"), Some(5_400_000_000_000));
        assert_eq!(parse_go_duration("500ms"), Some(500_000_000));
        assert_eq!(parse_go_duration("0"), Some(0));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("-1s"), None);
        assert_eq!(parse_go_duration("1x"), None);
    }

    #[test]
    fn misspelt_keywords_get_a_suggestion_in_their_casing() {
        assert_eq!(suggest_keyword("FOO").as_deref(), Some("FROM"));
        assert_eq!(suggest_keyword("foo").as_deref(), Some("from"));
        assert_eq!(suggest_keyword("RUNN").as_deref(), Some("RUN"));
        assert_eq!(suggest_keyword("XYZZYQWERTY"), None);
    }

    #[test]
    fn heredoc_words() {
        assert!(is_heredoc_word("<<EOF"));
        assert!(is_heredoc_word("<<-EOF"));
        assert!(is_heredoc_word("3<<EOF"));
        assert!(!is_heredoc_word("file"));
        assert!(!is_heredoc_word("<<"));
    }
}
