//! Typed commands → [`ImageSpec`]: stage selection and pruning, ARG scoping, variable
//! expansion, path resolution and image metadata, following `docker build` (BuildKit).
//!
//! The Dockerfile path expands raw words with the shell lexer and hands literal values to
//! [`StageState`]; the SDK path hands it literal values directly, so both share every rule
//! downstream of expansion.

use super::dockerfile::Dockerfile;
use super::dockerfile::ast::Span;
use super::dockerfile::shell::{Env, Expansion, Lexer};
use super::error::FrontendError;
use super::instructions::{
    ArgDecl, Command as Cmd, CommandLine, CopyCommand, CopySource, HealthcheckCommand, Typed,
    parse_instruction,
};
use super::lint::{CheckConfig, Lint, looks_secret};
use crate::ir::{
    Add, Base, CacheSharing, Command, Copy, CopyFrom, DEFAULT_PATH, Empty, Healthcheck, IR_VERSION,
    ImageConfig, ImageSpec, Mount, Network, Op, Run, Security, Source, Stage,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Arguments every build knows without an ARG in global scope; proxies also reach RUN.
pub const PROXY_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// What the caller asks of lowering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerOptions {
    /// `--build-arg K=V`.
    pub build_args: BTreeMap<String, String>,
    /// `--target STAGE`; `None` is the last stage.
    pub target: Option<String>,
    /// The target platform (`linux/amd64`).
    pub platform: String,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions {
            build_args: BTreeMap::new(),
            target: None,
            platform: "linux/amd64".into(),
        }
    }
}

/// Where lowering learns a base image's configuration (ENV, WORKDIR, CMD, ONBUILD, …).
pub trait BaseImages {
    /// The config of `reference`, if known. `None` lowers as if the image set nothing.
    fn config(&self, reference: &str) -> Option<ImageConfig>;
}

/// Knows only Kiln's built-in bases; every other image lowers as if it set nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoBaseImages;

impl BaseImages for NoBaseImages {
    fn config(&self, reference: &str) -> Option<ImageConfig> {
        builtin_config(reference)
    }
}

/// The image config of a built-in `kiln/…` base.
pub fn builtin_config(reference: &str) -> Option<ImageConfig> {
    let cmd = match reference {
        "kiln/busybox" | "kiln/busybox:latest" => "sh",
        "kiln/debian:bookworm" | "kiln/debian" | "kiln/debian:latest" => "bash",
        _ => return None,
    };
    Some(ImageConfig {
        env: vec![format!("PATH={DEFAULT_PATH}")],
        cmd: Some(vec![cmd.to_string()]),
        ..ImageConfig::default()
    })
}

/// The result of lowering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lowered {
    /// The IR.
    pub spec: ImageSpec,
    /// Build-check findings (not fatal unless `# check=error=true`, which fails instead).
    pub lints: Vec<Lint>,
    /// `--build-arg`s no ARG consumed.
    pub unused_build_args: Vec<String>,
    /// Per stage of `spec.stages`, where each step came from.
    pub origins: Vec<Vec<Origin>>,
}

fn os_arch(platform: &str) -> (String, String, String) {
    let mut it = platform.split('/');
    let os = it.next().unwrap_or("linux").to_string();
    let arch = it.next().unwrap_or("amd64").to_string();
    let variant = it.next().unwrap_or("").to_string();
    (os, arch, variant)
}

/// BUILDPLATFORM, TARGETPLATFORM and their parts.
fn platform_args(target: &str) -> Vec<(String, String)> {
    let (tos, tarch, tvar) = os_arch(target);
    vec![
        ("BUILDPLATFORM".into(), "linux/amd64".into()),
        ("BUILDOS".into(), "linux".into()),
        ("BUILDARCH".into(), "amd64".into()),
        ("BUILDVARIANT".into(), String::new()),
        ("TARGETPLATFORM".into(), target.into()),
        ("TARGETOS".into(), tos),
        ("TARGETARCH".into(), tarch),
        ("TARGETVARIANT".into(), tvar),
    ]
}

/// `path.Clean` of an absolute path.
pub fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Resolves `p` against the working directory, as WORKDIR and COPY destinations are.
pub fn resolve_path(workdir: &str, p: &str) -> String {
    if p.starts_with('/') {
        clean_path(p)
    } else {
        clean_path(&format!("{workdir}/{p}"))
    }
}

/// A COPY/ADD destination: resolved, with a trailing `/` kept (or added for `.`).
pub fn resolve_dest(workdir: &str, dest: &str) -> String {
    let mut out = resolve_path(workdir, dest);
    let dir = dest.is_empty() || dest == "." || dest.ends_with('/') || dest.ends_with("/.");
    if dir && !out.ends_with('/') {
        out.push('/');
    }
    out
}

/// The state of one stage while its steps are lowered. Values given to it are literal.
pub struct StageState {
    /// The config so far.
    pub config: ImageConfig,
    /// Declared ARGs in scope, with values, in declaration order.
    args: Vec<(String, Option<String>)>,
    /// Position of each ARG in `args`.
    arg_index: HashMap<String, usize>,
    /// Position of each variable in `config.env`.
    env_index: HashMap<String, usize>,
    /// Steps so far.
    pub steps: Vec<Op>,
    /// Where each step came from.
    pub origins: Vec<Origin>,
    /// Build args the caller passed that reach RUN without an ARG (proxies).
    pub proxies: Vec<(String, String)>,
    cmd_set: bool,
}

fn env_key(kv: &str) -> &str {
    kv.split_once('=').map_or(kv, |(k, _)| k)
}

/// Words expand against ENV first (it wins over an ARG of the same name), then ARGs with a
/// value. Lookups are hashed, so lowering stays linear in the number of variables.
impl Env for StageState {
    fn lookup(&self, name: &str) -> Option<&str> {
        if let Some(&i) = self.env_index.get(name) {
            return self
                .config
                .env
                .get(i)
                .map(|kv| kv.split_once('=').map_or("", |(_, v)| v));
        }
        let &i = self.arg_index.get(name)?;
        self.args.get(i)?.1.as_deref()
    }
}

impl StageState {
    /// A stage starting from a base config.
    pub fn new(mut config: ImageConfig, proxies: Vec<(String, String)>) -> Self {
        if config.env_get("PATH").is_none() {
            config.env.push(format!("PATH={DEFAULT_PATH}"));
        }
        let mut env_index = HashMap::new();
        for (i, kv) in config.env.iter().enumerate() {
            env_index.insert(env_key(kv).to_string(), i);
        }
        StageState {
            config,
            args: Vec::new(),
            arg_index: HashMap::new(),
            env_index,
            steps: Vec::new(),
            origins: Vec::new(),
            proxies,
            cmd_set: false,
        }
    }

    /// Declares an ARG (again): a redeclaration keeps its place and takes the new value.
    pub fn declare_arg(&mut self, key: &str, value: Option<String>) {
        match self.arg_index.get(key) {
            Some(&i) => self.args[i].1 = value,
            None => {
                self.arg_index.insert(key.to_string(), self.args.len());
                self.args.push((key.to_string(), value));
            }
        }
    }

    /// Whether an ARG of this name is in scope (with or without a value).
    pub fn arg_declared(&self, key: &str) -> bool {
        self.arg_index.contains_key(key)
    }

    fn set_env(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self.env_index.get(key) {
            Some(&i) => self.config.env[i] = entry,
            None => {
                self.env_index
                    .insert(key.to_string(), self.config.env.len());
                self.config.env.push(entry);
            }
        }
    }

    /// The environment a RUN sees: ENV, then ARGs and proxies ENV does not set.
    pub fn run_env(&self) -> Vec<(String, String)> {
        let mut env = self.config.env_pairs();
        let mut seen: std::collections::HashSet<&str> =
            self.env_index.keys().map(String::as_str).collect();
        let extra = self
            .args
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
            .chain(self.proxies.iter().map(|(k, v)| (k, v)));
        for (k, v) in extra {
            if seen.insert(k.as_str()) {
                env.push((k.clone(), v.clone()));
            }
        }
        env
    }

    /// The working directory steps run in.
    pub fn workdir(&self) -> String {
        self.config.workdir.clone().unwrap_or_else(|| "/".into())
    }

    /// The shell for shell forms.
    pub fn shell(&self) -> Vec<String> {
        self.config
            .shell
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }

    fn push(&mut self, origin: Origin, op: Op) {
        self.steps.push(op);
        self.origins.push(origin);
    }

    /// ENV.
    pub fn env(&mut self, origin: Origin, vars: Vec<(String, String)>) {
        for (k, v) in &vars {
            self.set_env(k, v);
        }
        self.push(origin, Op::Env { vars });
    }

    /// WORKDIR (relative paths resolve against the current one).
    pub fn set_workdir(&mut self, origin: Origin, path: &str) {
        let path = resolve_path(&self.workdir(), path);
        self.config.workdir = Some(path.clone());
        self.push(origin, Op::Workdir { path });
    }

    /// USER.
    pub fn user(&mut self, origin: Origin, user: String) {
        self.config.user = Some(user.clone());
        self.push(origin, Op::User { user });
    }

    /// RUN with a prepared command.
    pub fn run(&mut self, origin: Origin, run: RunParts) {
        let op = Op::Run(Run {
            command: run.command,
            env: self.run_env(),
            user: self.config.user.clone(),
            workdir: self.workdir(),
            network: run.network,
            security: run.security,
            mounts: run.mounts,
            devices: run.devices,
        });
        self.push(origin, op);
    }

    /// COPY.
    pub fn copy(&mut self, origin: Origin, copy: Copy) {
        self.push(origin, Op::Copy(copy));
    }

    /// ADD.
    pub fn add(&mut self, origin: Origin, add: Add) {
        self.push(origin, Op::Add(add));
    }

    /// CMD.
    pub fn cmd(&mut self, cmd: Vec<String>) {
        self.config.cmd = Some(cmd);
        self.cmd_set = true;
    }

    /// ENTRYPOINT; an inherited CMD is reset, as Docker does.
    pub fn entrypoint(&mut self, entrypoint: Vec<String>) {
        self.config.entrypoint = Some(entrypoint);
        if !self.cmd_set {
            self.config.cmd = None;
        }
    }
}

/// Where a step came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A Dockerfile line (1-based).
    Line(u32),
    /// An SDK operation (0-based index into `operations`).
    Operation(usize),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Line(n) => write!(f, "line {n}"),
            Origin::Operation(i) => write!(f, "operations[{i}]"),
        }
    }
}

/// The parts of a RUN decided before the stage state applies env, user and workdir.
pub struct RunParts {
    /// What to run.
    pub command: Command,
    /// `--network`.
    pub network: Network,
    /// `--security`.
    pub security: Security,
    /// `--mount`s.
    pub mounts: Vec<Mount>,
    /// `--device`s.
    pub devices: Vec<String>,
}

/// Removes leading tabs from every line (`<<-`).
pub fn chomp_heredoc(content: &str) -> String {
    content
        .split_inclusive('\n')
        .map(|l| l.trim_start_matches('\t'))
        .collect()
}

/// Lowers a parsed Dockerfile.
pub fn lower_dockerfile(
    file: &Dockerfile,
    opts: &LowerOptions,
    bases: &dyn BaseImages,
) -> Result<Lowered, FrontendError> {
    let checks = match file.directive("check") {
        Some(v) => CheckConfig::parse(v).map_err(FrontendError::plain)?,
        None => CheckConfig::default(),
    };
    let mut typed = Vec::with_capacity(file.instructions.len());
    for ins in &file.instructions {
        typed.push(parse_instruction(ins)?);
    }
    let mut l = Lowerer {
        opts,
        bases,
        lexer: Lexer::new(file.escape),
        lints: Vec::new(),
        checks,
        consumed: BTreeSet::new(),
        stages: Vec::new(),
        global_env: Vec::new(),
        global_declared: BTreeSet::new(),
    };
    for w in &file.warnings {
        l.lint(w.rule, w.message.clone(), Some(w.span), w.line);
    }
    l.casing_lint(&typed);
    l.split_stages(typed)?;
    let target = l.target_index()?;
    let (order, mut lowered) = l.lower_needed(target)?;
    let (stages, origins): (Vec<Stage>, Vec<Vec<Origin>>) =
        order.iter().filter_map(|i| lowered.remove(i)).unzip();
    let unused_build_args: Vec<String> = opts
        .build_args
        .keys()
        .filter(|k| !l.consumed.contains(*k) && !PROXY_ARGS.contains(&k.as_str()))
        .filter(|k| !k.starts_with("BUILDKIT_"))
        .cloned()
        .collect();
    if l.checks.error
        && let Some(first) = l.lints.first()
    {
        let more = match l.lints.len() - 1 {
            0 => String::new(),
            n => format!(" (and {n} more)"),
        };
        let mut e = FrontendError::plain(format!(
            "{}{more}: build checks are errors under `# check=error=true`",
            first.message
        ));
        e.span = first.span;
        e.label = first.rule.to_string();
        return Err(e);
    }
    Ok(Lowered {
        spec: ImageSpec {
            version: IR_VERSION,
            stages,
            build_args: opts.build_args.clone(),
        },
        lints: l.lints,
        unused_build_args,
        origins,
    })
}

/// A stage as written: its FROM and its commands.
struct RawStage {
    from: Typed,
    image: String,
    name: Option<String>,
    platform: Option<String>,
    commands: Vec<Typed>,
    /// Stages it needs: (index, why) — the base first if it is a stage.
    deps: Vec<usize>,
    base: Base,
}

struct Lowerer<'a> {
    opts: &'a LowerOptions,
    bases: &'a dyn BaseImages,
    lexer: Lexer,
    lints: Vec<Lint>,
    checks: CheckConfig,
    consumed: BTreeSet<String>,
    stages: Vec<RawStage>,
    global_env: Vec<(String, String)>,
    global_declared: BTreeSet<String>,
}

impl Lowerer<'_> {
    fn lint(&mut self, rule: &'static str, message: String, span: Option<Span>, line: u32) {
        if self.checks.enabled(rule) {
            self.lints.push(Lint {
                rule,
                message,
                span,
                line,
            });
        }
    }

    fn expand(&self, word: &str, env: &dyn Env, span: Span) -> Result<Expansion, FrontendError> {
        self.lexer
            .process_word_with_matches(word, env)
            .map_err(|e| FrontendError::at(e.to_string(), span).with_label("in this word"))
    }

    fn casing_lint(&mut self, typed: &[Typed]) {
        let upper = typed
            .iter()
            .filter(|t| t.keyword.chars().all(|c| !c.is_lowercase()))
            .count();
        let lower = typed
            .iter()
            .filter(|t| t.keyword.chars().all(|c| !c.is_uppercase()))
            .count();
        let majority_upper = upper >= lower;
        for t in typed {
            let ok = if majority_upper {
                t.keyword.chars().all(|c| !c.is_lowercase())
            } else {
                t.keyword.chars().all(|c| !c.is_uppercase())
            };
            if !ok {
                self.lint(
                    "ConsistentInstructionCasing",
                    format!(
                        "Command '{}' should match the case of the command majority ({})",
                        t.keyword,
                        if majority_upper {
                            "uppercase"
                        } else {
                            "lowercase"
                        }
                    ),
                    Some(t.keyword_span),
                    t.line,
                );
            }
        }
    }

    /// Global ARGs, then one [`RawStage`] per FROM with its expanded reference.
    fn split_stages(&mut self, typed: Vec<Typed>) -> Result<(), FrontendError> {
        let mut global_env = platform_args(&self.opts.platform);
        let mut rest = typed.into_iter().peekable();
        while let Some(t) = rest.next_if(|t| !matches!(t.command, Cmd::From { .. })) {
            let Cmd::Arg(decls) = &t.command else {
                return Err(FrontendError::at(
                    format!(
                        "{} is not allowed before the first FROM: only ARG may come before it",
                        t.keyword.to_uppercase()
                    ),
                    t.keyword_span,
                )
                .with_help("add a FROM line above it".into()));
            };
            for d in decls {
                self.consumed.insert(d.key.clone());
                self.global_declared.insert(d.key.clone());
                let value = match self.opts.build_args.get(&d.key) {
                    Some(v) => Some(v.clone()),
                    None => match &d.value {
                        Some(raw) => Some(self.expand(raw, &global_env, d.span)?.value),
                        None => None,
                    },
                };
                if looks_secret(&d.key) {
                    self.lint(
                        "SecretsUsedInArgOrEnv",
                        format!(
                            "Do not use ARG or ENV instructions for sensitive data (ARG \"{}\")",
                            d.key
                        ),
                        Some(d.span),
                        t.line,
                    );
                }
                global_env.retain(|(k, _)| *k != d.key);
                if let Some(v) = value {
                    global_env.push((d.key.clone(), v));
                }
            }
        }
        self.global_env = global_env;
        let mut current: Option<RawStage> = None;
        for t in rest {
            if let Cmd::From {
                image,
                name,
                as_keyword,
                platform,
            } = &t.command
            {
                if let Some(done) = current.take() {
                    self.stages.push(done);
                }
                let stage = self.from(
                    &t,
                    image,
                    name.as_ref(),
                    as_keyword.as_ref(),
                    platform.as_ref(),
                )?;
                current = Some(stage);
            } else if let Some(stage) = current.as_mut() {
                stage.commands.push(t);
            }
        }
        match current {
            Some(done) => self.stages.push(done),
            None => {
                return Err(FrontendError::plain(
                    "the Dockerfile has no FROM: there is no stage to build".into(),
                )
                .with_help("start the first stage with `FROM image`".into()));
            }
        }
        // Resolve bases now that every stage name is known.
        let names: Vec<Option<String>> = self.stages.iter().map(|s| s.name.clone()).collect();
        for (i, s) in self.stages.iter_mut().enumerate() {
            let lower = s.image.to_lowercase();
            s.base = if lower == "scratch" {
                Base::Scratch
            } else if let Some(j) = names
                .iter()
                .enumerate()
                .position(|(j, n)| j != i && n.as_deref() == Some(lower.as_str()))
            {
                s.deps.push(j);
                Base::Stage { index: j }
            } else {
                Base::Image {
                    reference: s.image.clone(),
                }
            };
        }
        Ok(())
    }

    fn from(
        &mut self,
        t: &Typed,
        image: &super::dockerfile::Arg,
        name: Option<&super::dockerfile::Arg>,
        as_keyword: Option<&super::dockerfile::Arg>,
        platform: Option<&super::dockerfile::Arg>,
    ) -> Result<RawStage, FrontendError> {
        let exp = self.expand(&image.value, &self.global_env.clone(), image.span)?;
        for var in &exp.unmatched {
            if !self.global_declared.contains(var) {
                self.lint(
                    "UndefinedArgInFrom",
                    format!("FROM argument '{var}' is not declared"),
                    Some(image.span),
                    t.line,
                );
            }
        }
        if exp.value.is_empty() {
            return Err(FrontendError::at(
                format!("base name ({}) should not be blank", image.value),
                image.span,
            )
            .with_help("give the ARG a default or pass --build-arg".into()));
        }
        let platform = match platform {
            Some(p) => Some(
                self.expand(&p.value, &self.global_env.clone(), p.span)?
                    .value,
            ),
            None => None,
        };
        let stage_name = match name {
            Some(n) => {
                let lower = n.value.to_lowercase();
                if !valid_stage_name(&lower) {
                    return Err(FrontendError::at(
                        format!(
                            "invalid name for build stage: {:?}, name can't start with a number or contain symbols",
                            n.value
                        ),
                        n.span,
                    ));
                }
                if self
                    .stages
                    .iter()
                    .any(|s| s.name.as_deref() == Some(&lower))
                {
                    return Err(FrontendError::at(
                        format!("duplicate stage name {lower:?}"),
                        n.span,
                    )
                    .with_help("stage names must be unique".into()));
                }
                if n.value != lower {
                    self.lint(
                        "StageNameCasing",
                        format!("Stage name '{}' should be lowercase", n.value),
                        Some(n.span),
                        t.line,
                    );
                }
                if lower == "scratch" || lower == "context" {
                    self.lint(
                        "ReservedStageName",
                        format!("'{lower}' is reserved and should not be used as a stage name"),
                        Some(n.span),
                        t.line,
                    );
                }
                if let Some(kw) = as_keyword {
                    let from_upper = t.keyword.chars().all(|c| !c.is_lowercase());
                    let as_upper = kw.value.chars().all(|c| !c.is_lowercase());
                    let from_lower = t.keyword.chars().all(|c| !c.is_uppercase());
                    let as_lower = kw.value.chars().all(|c| !c.is_uppercase());
                    if (from_upper && as_lower) || (from_lower && as_upper) {
                        self.lint(
                            "FromAsCasing",
                            format!(
                                "'{}' and '{}' keywords' casing do not match",
                                kw.value, t.keyword
                            ),
                            Some(kw.span),
                            t.line,
                        );
                    }
                }
                Some(lower)
            }
            None => None,
        };
        Ok(RawStage {
            from: t.clone(),
            image: exp.value,
            name: stage_name,
            platform,
            commands: Vec::new(),
            deps: Vec::new(),
            base: Base::Scratch,
        })
    }

    fn target_index(&self) -> Result<usize, FrontendError> {
        let Some(target) = &self.opts.target else {
            return Ok(self.stages.len() - 1);
        };
        let lower = target.to_lowercase();
        self.stages
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
            .ok_or_else(|| {
                let names: Vec<String> =
                    self.stages.iter().filter_map(|s| s.name.clone()).collect();
                FrontendError::plain(format!("target stage {target:?} could not be found"))
                    .with_help(if names.is_empty() {
                        "no stage has a name: name one with `FROM image AS name`".into()
                    } else {
                        format!("stages are: {}", names.join(", "))
                    })
            })
    }

    /// Resolves `--from` / `from=`: a stage name, a stage index, or an image.
    fn resolve_from(&self, from: &str) -> CopyFrom {
        let lower = from.to_lowercase();
        if let Some(i) = self
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            return CopyFrom::Stage { index: i };
        }
        if let Ok(i) = from.parse::<usize>()
            && i < self.stages.len()
        {
            return CopyFrom::Stage { index: i };
        }
        CopyFrom::Image {
            reference: from.to_string(),
        }
    }

    /// Lowers the stages the target needs and returns their build order (dependencies
    /// first). A stage's base is lowered before it (its config is inherited); the stages it
    /// copies or mounts from are found in its IR and visited after it. Iterative, so a long
    /// chain of stages cannot overflow the stack; a cycle is an error.
    #[allow(clippy::type_complexity)]
    fn lower_needed(
        &mut self,
        target: usize,
    ) -> Result<(Vec<usize>, BTreeMap<usize, (Stage, Vec<Origin>)>), FrontendError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Active,
            Done,
        }
        struct Frame {
            stage: usize,
            deps: Option<Vec<usize>>,
            next: usize,
        }
        let mut marks = vec![Mark::New; self.stages.len()];
        let mut lowered: BTreeMap<usize, (Stage, Vec<Origin>)> = BTreeMap::new();
        let mut order = Vec::new();
        let mut stack = vec![Frame {
            stage: target,
            deps: None,
            next: 0,
        }];
        marks[target] = Mark::Active;
        while let Some(top) = stack.last_mut() {
            let s = top.stage;
            let next_dep = match &top.deps {
                None => {
                    // Before lowering: the base stage must be done.
                    if let Base::Stage { index: b } = self.stages[s].base
                        && marks[b] != Mark::Done
                    {
                        Some(b)
                    } else {
                        let parent = match self.stages[s].base {
                            Base::Stage { index } => lowered.get(&index).map(|(p, _)| &p.config),
                            Base::Scratch | Base::Image { .. } => None,
                        };
                        let (stage, origins) = self.lower_stage(s, parent.cloned())?;
                        top.deps = Some(stage_deps(&stage));
                        lowered.insert(s, (stage, origins));
                        continue;
                    }
                }
                Some(deps) => {
                    let d = deps.get(top.next).copied();
                    top.next += 1;
                    match d {
                        Some(d) => Some(d),
                        None => {
                            marks[s] = Mark::Done;
                            order.push(s);
                            stack.pop();
                            continue;
                        }
                    }
                }
            };
            let Some(d) = next_dep else { continue };
            match marks[d] {
                Mark::New => {
                    marks[d] = Mark::Active;
                    stack.push(Frame {
                        stage: d,
                        deps: None,
                        next: 0,
                    });
                }
                Mark::Active => {
                    let name = self.stages[d].name.clone().unwrap_or_else(|| d.to_string());
                    return Err(FrontendError::at(
                        format!("circular dependency detected on stage: {name}"),
                        self.stages[s].from.span,
                    )
                    .with_help("a stage cannot depend on itself through FROM or --from".into()));
                }
                Mark::Done => {}
            }
        }
        Ok((order, lowered))
    }

    fn lower_stage(
        &mut self,
        index: usize,
        parent_config: Option<ImageConfig>,
    ) -> Result<(Stage, Vec<Origin>), FrontendError> {
        let base = self.stages[index].base.clone();
        let base_config = match &base {
            Base::Scratch => ImageConfig::default(),
            Base::Image { reference } => self.bases.config(reference).unwrap_or_default(),
            Base::Stage { .. } => parent_config.unwrap_or_default(),
        };
        let proxies: Vec<(String, String)> = self
            .opts
            .build_args
            .iter()
            .filter(|(k, _)| PROXY_ARGS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut st = StageState::new(base_config, proxies);
        let mut counts: BTreeMap<&'static str, u32> = BTreeMap::new();
        let mut workdir_set = false;
        // The base's ONBUILD triggers run first, then are cleared. They come from another
        // text than this Dockerfile, so their errors and findings point at this FROM.
        let from = self.stages[index].from.clone();
        let triggers = std::mem::take(&mut st.config.onbuild);
        for trigger in &triggers {
            let in_trigger = |e: String| {
                FrontendError::at(
                    format!("ONBUILD trigger {trigger:?} of the base image: {e}"),
                    from.span,
                )
                .with_label("the base image's trigger runs here")
            };
            let parsed =
                super::dockerfile::parse(trigger).map_err(|e| in_trigger(e.to_string()))?;
            for ins in &parsed.instructions {
                let mut t = parse_instruction(ins).map_err(|e| in_trigger(e.message))?;
                t.line = from.line;
                let first_lint = self.lints.len();
                self.dispatch(&mut st, &t, &mut counts, &mut workdir_set)
                    .map_err(|e| in_trigger(e.message))?;
                for l in &mut self.lints[first_lint..] {
                    l.span = Some(from.span);
                    l.line = from.line;
                }
            }
        }
        // Taken out for the loop (dispatch needs `&mut self`); an error ends lowering anyway.
        let commands = std::mem::take(&mut self.stages[index].commands);
        for t in &commands {
            self.dispatch(&mut st, t, &mut counts, &mut workdir_set)?;
        }
        self.stages[index].commands = commands;
        let raw = &self.stages[index];
        let stage = Stage {
            index,
            name: raw.name.clone(),
            base,
            platform: raw.platform.clone(),
            steps: st.steps,
            config: st.config,
        };
        Ok((stage, st.origins))
    }

    fn expand_lint(
        &mut self,
        st: &StageState,
        word: &str,
        span: Span,
        line: u32,
    ) -> Result<String, FrontendError> {
        let exp = self.expand(word, st, span)?;
        for var in &exp.unmatched {
            let declared = st.arg_declared(var);
            if !declared {
                self.lint(
                    "UndefinedVar",
                    format!("Usage of undefined variable '${var}'"),
                    Some(span),
                    line,
                );
            }
        }
        Ok(exp.value)
    }

    fn dispatch(
        &mut self,
        st: &mut StageState,
        t: &Typed,
        counts: &mut BTreeMap<&'static str, u32>,
        workdir_set: &mut bool,
    ) -> Result<(), FrontendError> {
        let line = t.line;
        match &t.command {
            Cmd::From { .. } => {}
            Cmd::Arg(decls) => self.arg(st, decls, line)?,
            Cmd::Env { pairs, legacy } => {
                if *legacy {
                    self.lint(
                        "LegacyKeyValueFormat",
                        "\"ENV key=value\" should be used instead of legacy \"ENV key value\" format".into(),
                        Some(t.span),
                        line,
                    );
                }
                let mut vars = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    let key = self.expand_lint(st, &k.value, k.span, line)?;
                    let value = self.expand_lint(st, &v.value, v.span, line)?;
                    if looks_secret(&key) {
                        self.lint(
                            "SecretsUsedInArgOrEnv",
                            format!("Do not use ARG or ENV instructions for sensitive data (ENV \"{key}\")"),
                            Some(k.span),
                            line,
                        );
                    }
                    vars.push((key, value));
                }
                st.env(Origin::Line(line), vars);
            }
            Cmd::Label { pairs, legacy } => {
                if *legacy {
                    self.lint(
                        "LegacyKeyValueFormat",
                        "\"LABEL key=value\" should be used instead of legacy \"LABEL key value\" format".into(),
                        Some(t.span),
                        line,
                    );
                }
                for (k, v) in pairs {
                    let key = self.expand_lint(st, &k.value, k.span, line)?;
                    let value = self.expand_lint(st, &v.value, v.span, line)?;
                    st.config.labels.insert(key, value);
                }
            }
            Cmd::Run(r) => {
                let command = match &r.command {
                    CommandLine::Exec(args) => Command::Exec { args: args.clone() },
                    CommandLine::Shell(a) => shell_command(st.shell(), &a.value, &r.heredocs),
                };
                let network = match &r.network {
                    None => Network::Default,
                    Some(n) => match n.value.as_str() {
                        "default" => Network::Default,
                        "none" => Network::None,
                        "host" => Network::Host,
                        other => {
                            return Err(FrontendError::at(
                                format!("unsupported network mode {other:?}"),
                                n.span,
                            )
                            .with_help("use --network=default, none or host".into()));
                        }
                    },
                };
                let security = match &r.security {
                    None => Security::Sandbox,
                    Some(s) => match s.value.as_str() {
                        "sandbox" => Security::Sandbox,
                        "insecure" => Security::Insecure,
                        other => {
                            return Err(FrontendError::at(
                                format!("unsupported security mode {other:?}"),
                                s.span,
                            )
                            .with_help("use --security=sandbox or insecure".into()));
                        }
                    },
                };
                let mut mounts = Vec::with_capacity(r.mounts.len());
                for m in &r.mounts {
                    let lexer = &self.lexer;
                    let scope: &StageState = st;
                    let expand = |v: &str| lexer.process_word(v, scope).map_err(|e| e.to_string());
                    let mount = parse_mount(&m.value, &st.workdir(), &expand)
                        .map_err(|msg| FrontendError::at(msg, m.span).with_label("this mount"))?;
                    let mount = match mount {
                        Mount::Bind {
                            target,
                            source,
                            from: Some(CopyFrom::Image { reference }),
                            readwrite,
                        } => Mount::Bind {
                            target,
                            source,
                            from: Some(self.resolve_from(&reference)),
                            readwrite,
                        },
                        Mount::Cache {
                            target,
                            id,
                            sharing,
                            readonly,
                            from: Some(CopyFrom::Image { reference }),
                            source,
                            mode,
                            uid,
                            gid,
                        } => Mount::Cache {
                            target,
                            id,
                            sharing,
                            readonly,
                            from: Some(self.resolve_from(&reference)),
                            source,
                            mode,
                            uid,
                            gid,
                        },
                        other => other,
                    };
                    mounts.push(mount);
                }
                st.run(
                    Origin::Line(line),
                    RunParts {
                        command,
                        network,
                        security,
                        mounts,
                        devices: r.devices.iter().map(|d| d.value.clone()).collect(),
                    },
                );
            }
            Cmd::Cmd(c) | Cmd::Entrypoint(c) => {
                let is_cmd = matches!(t.command, Cmd::Cmd(_));
                let what = if is_cmd { "CMD" } else { "ENTRYPOINT" };
                let n = counts.entry(what).or_insert(0);
                *n += 1;
                if *n == 2 {
                    self.lint(
                        "MultipleInstructionsDisallowed",
                        format!("Multiple {what} instructions should not be used in the same stage because only the last one will be used"),
                        Some(t.span),
                        line,
                    );
                }
                let args = match c {
                    Some(CommandLine::Exec(args)) => args.clone(),
                    Some(CommandLine::Shell(a)) => {
                        if st.config.shell.is_none() {
                            self.lint(
                                "JSONArgsRecommended",
                                format!("JSON arguments recommended for {what} to prevent unintended behavior related to OS signals"),
                                Some(a.span),
                                line,
                            );
                        }
                        let mut s = st.shell();
                        s.push(a.value.clone());
                        s
                    }
                    None => st.shell(),
                };
                if is_cmd {
                    st.cmd(args);
                } else {
                    st.entrypoint(args);
                }
            }
            Cmd::Shell(args) => st.config.shell = Some(args.clone()),
            Cmd::Copy(c) => {
                let copy = self.copy_parts(st, c, line, true)?;
                st.copy(Origin::Line(line), copy.into_copy());
            }
            Cmd::Add(c) => {
                let add = self.copy_parts(st, c, line, false)?;
                st.add(Origin::Line(line), add.into_add());
            }
            Cmd::Workdir(p) => {
                let path = self.expand_lint(st, &p.value, p.span, line)?;
                if path.is_empty() {
                    return Err(FrontendError::at("WORKDIR cannot be empty".into(), p.span));
                }
                if !path.starts_with('/') && !*workdir_set && st.config.workdir.is_none() {
                    self.lint(
                        "WorkdirRelativePath",
                        format!("Relative workdir {path:?} can have unexpected results if the base image changes"),
                        Some(p.span),
                        line,
                    );
                }
                *workdir_set = true;
                st.set_workdir(Origin::Line(line), &path);
            }
            Cmd::User(u) => {
                let user = self.expand_lint(st, &u.value, u.span, line)?;
                if user.is_empty() {
                    return Err(FrontendError::at("USER cannot be empty".into(), u.span));
                }
                st.user(Origin::Line(line), user);
            }
            Cmd::Expose(ports) => {
                for p in ports {
                    let v = self.expand_lint(st, &p.value, p.span, line)?;
                    for spec in v.split_whitespace() {
                        if spec.contains(|c: char| c.is_ascii_uppercase()) {
                            self.lint(
                                "ExposeProtoCasing",
                                format!("Defined protocol '{spec}' in EXPOSE instruction should be lowercase"),
                                Some(p.span),
                                line,
                            );
                        }
                        for port in expand_ports(spec).map_err(|m| FrontendError::at(m, p.span))? {
                            st.config.exposed_ports.insert(port, Empty {});
                        }
                    }
                }
            }
            Cmd::Volume(paths) => {
                for p in paths {
                    let v = self.expand_lint(st, &p.value, p.span, line)?;
                    if v.trim().is_empty() {
                        return Err(FrontendError::at(
                            "VOLUME specified can not be an empty string".into(),
                            p.span,
                        ));
                    }
                    st.config.volumes.insert(v, Empty {});
                }
            }
            Cmd::StopSignal(s) => {
                let v = self.expand_lint(st, &s.value, s.span, line)?;
                if !valid_signal(&v) {
                    return Err(FrontendError::at(format!("Invalid signal: {v}"), s.span)
                        .with_help("use a signal name (SIGTERM) or number (15)".into()));
                }
                st.config.stop_signal = Some(v);
            }
            Cmd::Healthcheck(h) => {
                let n = counts.entry("HEALTHCHECK").or_insert(0);
                *n += 1;
                if *n == 2 {
                    self.lint(
                        "MultipleInstructionsDisallowed",
                        "Multiple HEALTHCHECK instructions should not be used in the same stage because only the last one will be used".into(),
                        Some(t.span),
                        line,
                    );
                }
                st.config.healthcheck = Some(match h {
                    HealthcheckCommand::None => Healthcheck {
                        test: vec!["NONE".into()],
                        interval: 0,
                        timeout: 0,
                        start_period: 0,
                        start_interval: 0,
                        retries: 0,
                    },
                    HealthcheckCommand::Cmd {
                        test,
                        interval,
                        timeout,
                        start_period,
                        start_interval,
                        retries,
                    } => Healthcheck {
                        test: test.clone(),
                        interval: *interval,
                        timeout: *timeout,
                        start_period: *start_period,
                        start_interval: *start_interval,
                        retries: *retries,
                    },
                });
            }
            Cmd::Onbuild { expression, .. } => st.config.onbuild.push(expression.clone()),
            Cmd::Maintainer(_) => self.lint(
                "MaintainerDeprecated",
                "Maintainer instruction is deprecated in favor of using label".into(),
                Some(t.span),
                line,
            ),
        }
        Ok(())
    }

    fn arg(
        &mut self,
        st: &mut StageState,
        decls: &[ArgDecl],
        line: u32,
    ) -> Result<(), FrontendError> {
        for d in decls {
            self.consumed.insert(d.key.clone());
            let value = if let Some(v) = self.opts.build_args.get(&d.key) {
                Some(v.clone())
            } else if let Some(raw) = &d.value {
                Some(self.expand_lint(st, raw, d.span, line)?)
            } else if let Some((_, v)) = self.global_env.iter().rev().find(|(k, _)| {
                *k == d.key && (self.global_declared.contains(k) || is_platform_arg(k))
            }) {
                Some(v.clone())
            } else {
                None
            };
            if looks_secret(&d.key) {
                self.lint(
                    "SecretsUsedInArgOrEnv",
                    format!(
                        "Do not use ARG or ENV instructions for sensitive data (ARG \"{}\")",
                        d.key
                    ),
                    Some(d.span),
                    line,
                );
            }
            st.declare_arg(&d.key, value);
        }
        Ok(())
    }

    fn copy_parts(
        &mut self,
        st: &StageState,
        c: &CopyCommand,
        line: u32,
        is_copy: bool,
    ) -> Result<CopyParts, FrontendError> {
        let what = if is_copy { "COPY" } else { "ADD" };
        let mut sources = Vec::with_capacity(c.sources.len());
        for s in &c.sources {
            match s {
                CopySource::Path(p) => {
                    let v = self.expand_lint(st, &p.value, p.span, line)?;
                    if v.is_empty() {
                        continue;
                    }
                    sources.push(
                        classify_source(v, is_copy).map_err(|m| FrontendError::at(m, p.span))?,
                    );
                }
                CopySource::Heredoc(h) => {
                    let mut content = h.content.clone();
                    if h.chomp {
                        content = chomp_heredoc(&content);
                    }
                    if h.expand {
                        content = self
                            .lexer
                            .clone()
                            .raw_quotes(true)
                            .raw_escapes(true)
                            .process_word(&content, st)
                            .map_err(|e| FrontendError::at(e.to_string(), h.span))?;
                    }
                    sources.push(Source::Inline {
                        name: h.name.clone(),
                        content,
                    });
                }
            }
        }
        if sources.is_empty() {
            return Err(FrontendError::at(
                format!("{what} has no sources left after expansion"),
                c.dest.span,
            ));
        }
        let dest_raw = self.expand_lint(st, &c.dest.value, c.dest.span, line)?;
        let dest = resolve_dest(&st.workdir(), &dest_raw);
        let from = match &c.from {
            Some(f) => {
                let v = self.expand_lint(st, &f.value, f.span, line)?;
                if v.is_empty() {
                    return Err(FrontendError::at("--from cannot be empty".into(), f.span));
                }
                Some(self.resolve_from(&v))
            }
            None => None,
        };
        let chown = match &c.chown {
            Some(o) => {
                let v = self.expand_lint(st, &o.value, o.span, line)?;
                check_chown(&v).map_err(|m| FrontendError::at(m, o.span))?;
                Some(v)
            }
            None => None,
        };
        let chmod = match &c.chmod {
            Some(m) => {
                let v = self.expand_lint(st, &m.value, m.span, line)?;
                let mode = parse_chmod(&v).map_err(|e| {
                    FrontendError::at(e, m.span).with_help("write e.g. --chmod=755".into())
                })?;
                Some(mode)
            }
            None => None,
        };
        let mut exclude = Vec::with_capacity(c.exclude.len());
        for e in &c.exclude {
            exclude.push(self.expand_lint(st, &e.value, e.span, line)?);
        }
        let checksum = match &c.checksum {
            Some(cs) => {
                let v = self.expand_lint(st, &cs.value, cs.span, line)?;
                check_checksum(&v, &sources).map_err(|m| FrontendError::at(m, cs.span))?;
                Some(v)
            }
            None => None,
        };
        check_multi_source_dest(what, &sources, &dest)
            .map_err(|m| FrontendError::at(m, c.dest.span))?;
        Ok(CopyParts {
            sources,
            dest,
            from,
            chown,
            chmod,
            link: c.link,
            exclude,
            parents: c.parents,
            checksum,
            keep_git_dir: c.keep_git_dir,
            unpack: c.unpack,
        })
    }
}

struct CopyParts {
    sources: Vec<Source>,
    dest: String,
    from: Option<CopyFrom>,
    chown: Option<String>,
    chmod: Option<u32>,
    link: bool,
    exclude: Vec<String>,
    parents: bool,
    checksum: Option<String>,
    keep_git_dir: bool,
    unpack: Option<bool>,
}

impl CopyParts {
    fn into_copy(self) -> Copy {
        Copy {
            sources: self.sources,
            dest: self.dest,
            from: self.from,
            chown: self.chown,
            chmod: self.chmod,
            link: self.link,
            exclude: self.exclude,
            parents: self.parents,
        }
    }

    fn into_add(self) -> Add {
        Add {
            sources: self.sources,
            dest: self.dest,
            chown: self.chown,
            chmod: self.chmod,
            link: self.link,
            exclude: self.exclude,
            checksum: self.checksum,
            keep_git_dir: self.keep_git_dir,
            unpack: self.unpack,
        }
    }
}

/// `--chown`: `user`, `uid`, `user:group` or `uid:gid`.
pub fn check_chown(v: &str) -> Result<(), String> {
    if v.is_empty() || v.split(':').count() > 2 || v.split(':').any(str::is_empty) {
        return Err(format!(
            "invalid --chown {v:?}: want user, uid, user:group or uid:gid"
        ));
    }
    Ok(())
}

/// `--chmod`: an octal mode up to 7777.
pub fn parse_chmod(v: &str) -> Result<u32, String> {
    u32::from_str_radix(v, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("invalid chmod {v:?}: must be an octal mode"))
}

/// A COPY/ADD source word: COPY takes paths only; ADD also URLs and git repositories.
pub fn classify_source(v: String, is_copy: bool) -> Result<Source, String> {
    let is_url = v.starts_with("http://") || v.starts_with("https://");
    if is_copy {
        if is_url || is_git_url(&v) {
            return Err(format!("COPY does not take URLs ({v}): use ADD"));
        }
        return Ok(Source::Path { path: v });
    }
    Ok(if is_git_url(&v) {
        Source::Git { url: v }
    } else if is_url {
        Source::Url { url: v }
    } else {
        Source::Path { path: v }
    })
}

/// ADD `--checksum`: `sha256:HEX` (sha384/sha512 too) for URLs, a commit for git.
pub fn check_checksum(v: &str, sources: &[Source]) -> Result<(), String> {
    if !sources
        .iter()
        .all(|s| matches!(s, Source::Url { .. } | Source::Git { .. }))
    {
        return Err("checksum can't be specified for non-HTTP(S) sources".into());
    }
    let digest = v.split_once(':').is_some_and(|(alg, hex)| {
        matches!(alg, "sha256" | "sha384" | "sha512")
            && !hex.is_empty()
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
    });
    let git_commit = sources.iter().all(|s| matches!(s, Source::Git { .. }))
        && !v.is_empty()
        && v.bytes().all(|b| b.is_ascii_hexdigit());
    if !digest && !git_commit {
        return Err(format!("invalid checksum {v:?}: want sha256:HEX"));
    }
    Ok(())
}

/// Several sources need a directory destination (`/` at the end).
pub fn check_multi_source_dest(what: &str, sources: &[Source], dest: &str) -> Result<(), String> {
    if sources.len() > 1 && !dest.ends_with('/') {
        return Err(format!(
            "When using {what} with more than one source file, the destination must be a directory and end with a /"
        ));
    }
    Ok(())
}

fn is_platform_arg(k: &str) -> bool {
    platform_args("linux/amd64").iter().any(|(n, _)| n == k)
}

/// The stages a lowered stage reads from: its base, `COPY --from`, `RUN --mount from=`.
fn stage_deps(stage: &Stage) -> Vec<usize> {
    let mut deps = Vec::new();
    if let Base::Stage { index } = stage.base {
        deps.push(index);
    }
    for op in &stage.steps {
        match op {
            Op::Copy(c) => {
                if let Some(CopyFrom::Stage { index }) = c.from {
                    deps.push(index);
                }
            }
            Op::Run(r) => {
                for m in &r.mounts {
                    if let Some(CopyFrom::Stage { index }) = m.from() {
                        deps.push(*index);
                    }
                }
            }
            Op::Add(_) | Op::Env { .. } | Op::Workdir { .. } | Op::User { .. } => {}
        }
    }
    deps
}

/// BuildKit's stage-name grammar, on the lower-cased name.
fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

/// ADD's git source detection (BuildKit's `isGitURL` rules).
pub fn is_git_url(s: &str) -> bool {
    if s.starts_with("git://") || s.starts_with("git@") || s.starts_with("ssh://") {
        return true;
    }
    if s.starts_with("http://") || s.starts_with("https://") {
        let base = s.split('#').next().unwrap_or(s);
        return base.ends_with(".git");
    }
    false
}

/// The shell form of RUN with heredocs handled as BuildKit does: a lone heredoc runs as the
/// script (or as an executable file with a `#!`), any other use is reassembled for the shell.
pub fn shell_command(
    shell: Vec<String>,
    text: &str,
    heredocs: &[super::dockerfile::Heredoc],
) -> Command {
    let Some(first) = heredocs.first() else {
        return Command::Shell {
            shell,
            script: text.to_string(),
        };
    };
    let lone = heredocs.len() == 1 && super::instructions::is_heredoc_word(text.trim());
    if lone {
        let mut data = first.content.clone();
        if first.chomp {
            data = chomp_heredoc(&data);
        }
        if data.starts_with("#!") {
            return Command::Script {
                name: first.name.clone(),
                content: data,
            };
        }
        return Command::Shell {
            shell,
            script: data,
        };
    }
    let mut full = text.to_string();
    for d in heredocs {
        full.push('\n');
        full.push_str(&d.content);
        full.push_str(&d.name);
    }
    Command::Shell {
        shell,
        script: full,
    }
}

/// EXPOSE specs (`80`, `80/tcp`, `8000-8010/udp`) → `port/proto` keys.
pub fn expand_ports(spec: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!(
            "invalid proto {proto:?} in EXPOSE {spec:?}: want tcp, udp or sctp"
        ));
    }
    if ports.contains(':') {
        return Err(format!(
            "EXPOSE {spec:?}: only container ports can be exposed, not host:container"
        ));
    }
    let parse = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("invalid port {p:?} in EXPOSE {spec:?}"))
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => {
            let p = parse(ports)?;
            (p, p)
        }
    };
    if hi < lo {
        return Err(format!("invalid port range {ports:?} in EXPOSE"));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

pub fn valid_signal(s: &str) -> bool {
    const NAMES: &[&str] = &[
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ",
    ];
    if let Ok(n) = s.parse::<u32>() {
        return (1..=64).contains(&n);
    }
    let name = s.strip_prefix("SIG").unwrap_or(s);
    if NAMES.contains(&name) {
        return true;
    }
    // RTMIN+n / RTMAX-n
    name.strip_prefix("RTMIN")
        .or_else(|| name.strip_prefix("RTMAX"))
        .is_some_and(|r| r.is_empty() || r[1..].parse::<u32>().is_ok())
}

/// Splits a `--mount` value on commas, honouring double-quoted fields (Go's csv reader).
fn split_csv(s: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut in_quotes = false;
    let mut field_start = true;
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push('"');
                } else {
                    in_quotes = false;
                }
            } else {
                cur.push(c);
            }
        } else if c == ',' {
            fields.push(std::mem::take(&mut cur));
            field_start = true;
            continue;
        } else if c == '"' && field_start {
            in_quotes = true;
        } else if c == '"' {
            return Err(format!("bare \" in non-quoted field of {s:?}"));
        } else {
            cur.push(c);
        }
        field_start = false;
    }
    if in_quotes {
        return Err(format!("unterminated quote in {s:?}"));
    }
    fields.push(cur);
    Ok(fields)
}

fn parse_octal(key: &str, v: &str) -> Result<u32, String> {
    u32::from_str_radix(v, 8).map_err(|_| format!("invalid {key} {v:?}: want an octal mode"))
}

fn parse_id(key: &str, v: &str) -> Result<u32, String> {
    v.parse()
        .map_err(|_| format!("invalid {key} {v:?}: want a number"))
}

fn parse_bool(key: &str, v: Option<&str>) -> Result<bool, String> {
    match v {
        None | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(format!(
            "invalid value {other:?} for {key}: want true or false"
        )),
    }
}

/// Go-units' RAMInBytes (`64m`, `1g`, `512`).
fn parse_size(v: &str) -> Result<u64, String> {
    let lower = v.to_ascii_lowercase();
    let digits = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let num: f64 = lower[..digits]
        .parse()
        .map_err(|_| format!("invalid size {v:?}"))?;
    let mult: f64 = match lower[digits..].trim() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0f64.powi(4),
        _ => return Err(format!("invalid size {v:?}")),
    };
    Ok((num * mult) as u64)
}

/// Parses one `RUN --mount=…` value; relative targets resolve against `workdir`.
pub fn parse_mount(
    raw: &str,
    workdir: &str,
    expand: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Mount, String> {
    let mut kind = "bind".to_string();
    let mut kv: Vec<(String, Option<String>)> = Vec::new();
    for field in split_csv(raw)? {
        let field = field.trim();
        if field.is_empty() {
            continue;
        }
        let (k, v) = match field.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.to_string())),
            None => (field.to_ascii_lowercase(), None),
        };
        if k == "type" {
            kind = v.unwrap_or_default().to_ascii_lowercase();
            continue;
        }
        let v = match v {
            Some(v) => Some(expand(&v)?),
            None => None,
        };
        kv.push((k, v));
    }
    let allowed: &[&str] = match kind.as_str() {
        "bind" => &[
            "target",
            "dst",
            "destination",
            "source",
            "src",
            "from",
            "ro",
            "readonly",
            "rw",
            "readwrite",
        ],
        "cache" => &[
            "target",
            "dst",
            "destination",
            "source",
            "src",
            "from",
            "ro",
            "readonly",
            "rw",
            "readwrite",
            "id",
            "sharing",
            "mode",
            "uid",
            "gid",
        ],
        "tmpfs" => &["target", "dst", "destination", "size"],
        "secret" => &[
            "target",
            "dst",
            "destination",
            "id",
            "required",
            "mode",
            "uid",
            "gid",
            "env",
        ],
        "ssh" => &[
            "target",
            "dst",
            "destination",
            "id",
            "required",
            "mode",
            "uid",
            "gid",
        ],
        other => {
            return Err(format!(
                "unsupported mount type {other:?}: want bind, cache, tmpfs, secret or ssh"
            ));
        }
    };
    let mut target: Option<String> = None;
    let mut source: Option<String> = None;
    let mut from: Option<String> = None;
    let mut readonly: Option<bool> = None;
    let mut id: Option<String> = None;
    let mut sharing = CacheSharing::Shared;
    let mut mode: Option<u32> = None;
    let mut uid = 0;
    let mut gid = 0;
    let mut required = false;
    let mut size = None;
    let mut env = None;
    for (k, v) in kv {
        if !allowed.contains(&k.as_str()) {
            return Err(format!(
                "unexpected key '{k}' in '{raw}' for a {kind} mount"
            ));
        }
        let need = |v: &Option<String>| {
            v.clone()
                .ok_or_else(|| format!("mount option {k} needs a value ({k}=…)"))
        };
        match k.as_str() {
            "target" | "dst" | "destination" => target = Some(need(&v)?),
            "source" | "src" => source = Some(need(&v)?),
            "from" => from = Some(need(&v)?),
            "ro" | "readonly" => readonly = Some(parse_bool(&k, v.as_deref())?),
            "rw" | "readwrite" => readonly = Some(!parse_bool(&k, v.as_deref())?),
            "id" => id = Some(need(&v)?),
            "sharing" => {
                sharing = match need(&v)?.as_str() {
                    "shared" => CacheSharing::Shared,
                    "private" => CacheSharing::Private,
                    "locked" => CacheSharing::Locked,
                    other => {
                        return Err(format!(
                            "unsupported sharing value {other:?}: want shared, private or locked"
                        ));
                    }
                }
            }
            "mode" => mode = Some(parse_octal(&k, &need(&v)?)?),
            "uid" => uid = parse_id(&k, &need(&v)?)?,
            "gid" => gid = parse_id(&k, &need(&v)?)?,
            "required" => required = parse_bool(&k, v.as_deref())?,
            "size" => size = Some(parse_size(&need(&v)?)?),
            "env" => env = Some(need(&v)?),
            _ => {}
        }
    }
    let abs = |t: String| resolve_path(workdir, &t);
    let from = from.map(|f| CopyFrom::Image { reference: f });
    match kind.as_str() {
        "bind" => Ok(Mount::Bind {
            target: abs(target.ok_or("a bind mount needs target=")?),
            source: source.unwrap_or_else(|| "/".into()),
            from,
            readwrite: readonly == Some(false),
        }),
        "cache" => {
            let target = abs(target.ok_or("a cache mount needs target=")?);
            Ok(Mount::Cache {
                id: id.unwrap_or_else(|| target.clone()),
                target,
                sharing,
                readonly: readonly.unwrap_or(false),
                from,
                source,
                mode: mode.unwrap_or(0o755),
                uid,
                gid,
            })
        }
        "tmpfs" => Ok(Mount::Tmpfs {
            target: abs(target.ok_or("a tmpfs mount needs target=")?),
            size,
        }),
        "secret" => {
            let id = match (id, &target) {
                (Some(id), _) => id,
                (None, Some(t)) => t.rsplit('/').next().unwrap_or(t).to_string(),
                (None, None) => return Err("a secret mount needs id= or target=".into()),
            };
            let target = match (target, &env) {
                (Some(t), _) => Some(abs(t)),
                (None, Some(_)) => None,
                (None, None) => Some(format!("/run/secrets/{id}")),
            };
            Ok(Mount::Secret {
                id,
                target,
                env,
                required,
                mode: mode.unwrap_or(0o400),
                uid,
                gid,
            })
        }
        _ => Ok(Mount::Ssh {
            id: id.unwrap_or_else(|| "default".into()),
            target: target.map(abs),
            required,
            mode: mode.unwrap_or(0o600),
            uid,
            gid,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_expand(v: &str) -> Result<String, String> {
        Ok(v.to_string())
    }

    #[test]
    fn paths_resolve_against_the_workdir() {
        assert_eq!(resolve_path("/app", "src"), "/app/src");
        assert_eq!(resolve_path("/app", "../x/./y"), "/x/y");
        assert_eq!(resolve_path("/app", "/abs/"), "/abs");
        assert_eq!(resolve_dest("/app", "."), "/app/");
        assert_eq!(resolve_dest("/app", "lib/"), "/app/lib/");
        assert_eq!(resolve_dest("/", "x"), "/x");
    }

    #[test]
    fn expose_ranges_expand() {
        assert_eq!(expand_ports("80").expect("ok"), vec!["80/tcp"]);
        assert_eq!(expand_ports("53/UDP").expect("ok"), vec!["53/udp"]);
        assert_eq!(expand_ports("8000-8002").expect("ok").len(), 3);
        assert!(expand_ports("80/xyz").is_err());
        assert!(expand_ports("70000").is_err());
    }

    #[test]
    fn cache_mount_defaults() {
        let m = parse_mount("type=cache,target=.cache", "/root", &no_expand).expect("ok");
        assert_eq!(
            m,
            Mount::Cache {
                target: "/root/.cache".into(),
                id: "/root/.cache".into(),
                sharing: CacheSharing::Shared,
                readonly: false,
                from: None,
                source: None,
                mode: 0o755,
                uid: 0,
                gid: 0,
            }
        );
    }

    #[test]
    fn secret_mount_defaults_to_run_secrets() {
        let m = parse_mount("type=secret,id=npmrc", "/", &no_expand).expect("ok");
        let Mount::Secret { target, mode, .. } = m else {
            panic!("secret expected")
        };
        assert_eq!(target.as_deref(), Some("/run/secrets/npmrc"));
        assert_eq!(mode, 0o400);
        let env_only = parse_mount("type=secret,id=tok,env=TOKEN", "/", &no_expand).expect("ok");
        assert!(matches!(env_only, Mount::Secret { target: None, .. }));
    }

    #[test]
    fn bad_mounts_are_errors() {
        assert!(parse_mount("type=nfs,target=/x", "/", &no_expand).is_err());
        assert!(parse_mount("type=cache", "/", &no_expand).is_err());
        assert!(parse_mount("type=tmpfs,target=/x,from=a", "/", &no_expand).is_err());
        assert!(parse_mount("type=cache,target=/x,sharing=weird", "/", &no_expand).is_err());
        assert!(parse_mount("type=bind,target=\"/x", "/", &no_expand).is_err());
    }

    #[test]
    fn signals() {
        assert!(valid_signal("SIGTERM"));
        assert!(valid_signal("KILL"));
        assert!(valid_signal("9"));
        assert!(valid_signal("SIGRTMIN+3"));
        assert!(!valid_signal("SIGFOO"));
        assert!(!valid_signal("0"));
    }

    #[test]
    fn git_urls() {
        assert!(is_git_url("https://github.com/moby/buildkit.git#v0.10.1"));
        assert!(is_git_url("git@github.com:moby/buildkit.git"));
        assert!(!is_git_url("https://example.com/file.tar.gz"));
    }
}
