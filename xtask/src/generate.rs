//! Input generators: random Dockerfiles from a grammar of every instruction, flag, word form,
//! directive, continuation and heredoc shape; shell words for the lexer; large "stress"
//! inputs that expose super-linear time; and the fixed inputs `bench parse` measures.
//!
//! Everything is driven by a caller-supplied [`fastrand::Rng`], so an input is a pure
//! function of its seed.

use fastrand::Rng;
use kiln::frontend::LowerOptions;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The 18 Dockerfile instructions.
pub const KEYWORDS: &[&str] = &[
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
];

/// Keywords no Dockerfile knows.
const JUNK_KEYWORDS: &[&str] = &[
    "FORM",
    "RUNN",
    "COPYY",
    "ECHO",
    "IMPORT",
    "\u{dc}BER",
    "FROM-",
    "--",
    "\u{0}RUN",
    "RUN\u{a0}",
    "R\u{130}N",
    "\u{212a}ELVIN",
    "123",
];

const VARS: &[&str] = &[
    "A",
    "B",
    "V",
    "HOME",
    "PATH",
    "TARGETARCH",
    "TARGETPLATFORM",
    "BUILDPLATFORM",
    "HTTP_PROXY",
    "no_proxy",
    "_",
    "a1",
    "\u{e9}t\u{e9}",
    "lower",
];

const LITERALS: &[&str] = &[
    "echo",
    "hello",
    "/usr/local/bin",
    "apt-get",
    "install",
    "-y",
    "&&",
    "||",
    ";",
    "|",
    ">",
    "2>&1",
    "*.txt",
    "src/",
    ".",
    "..",
    "/",
    "a=b",
    "=",
    "==",
    "x=",
    "--flag",
    "-",
    "#",
    "#not-a-comment",
    "AS",
    "as",
    "CMD",
    "NONE",
    "\u{e9}",
    "\u{65e5}\u{672c}\u{8a9e}",
    "\u{1f980}",
    "\u{feff}",
    "\u{200b}",
    "\u{1}",
    "\u{7f}",
    "\u{85}",
    "tab\there",
    "<<",
    "<",
    "<<<",
    "[",
    "]",
    "{",
    "}",
    "~",
    "@",
    "sha256:abc",
];

const IMAGES: &[&str] = &[
    "scratch",
    "SCRATCH",
    "kiln/debian:bookworm",
    "kiln/busybox",
    "alpine:3.20",
    "debian@sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "ghcr.io/org/img:tag",
    "localhost:5000/a/b",
    "${BASE:-alpine}",
    "${BASE}",
    "$BASE:latest",
    "UPPER:Case",
    "",
    "a:b:c",
    "img@",
];

/// How many of [`IMAGES`] come first as valid references.
const VALID_IMAGES: usize = 9;

const PLATFORMS: &[&str] = &[
    "linux/amd64",
    "linux/arm64",
    "linux/arm/v7",
    "windows/amd64",
    "$BUILDPLATFORM",
    "${TARGETPLATFORM}",
    "",
    "linux",
    "///",
    "linux/amd64,linux/arm64",
];

/// A generated Dockerfile and the options to lower it with.
pub struct DockerfileCase {
    /// The Dockerfile text.
    pub text: String,
    /// Build args, target and platform.
    pub opts: LowerOptions,
    /// Which shape of input this is (`tame`, `wild`, a stress variant).
    pub variant: &'static str,
}

/// The stress variants, by [`stress`]'s choice number.
pub const STRESS_VARIANTS: [&str; 14] = [
    "continuation chain",
    "many heredocs",
    "heredocs on one line",
    "long dense line",
    "nested ${A:-...}",
    "many ENV names",
    "many stages",
    "long JSON array",
    "deep JSON array",
    "many --mount flags",
    "glob trims of a long value",
    "ARG chain",
    "empty continuation lines",
    "many LABEL lines",
];

/// Inputs for one call of the shell lexer.
pub struct ShellCase {
    /// The word.
    pub word: String,
    /// The environment, in order (the last definition of a name wins).
    pub env: Vec<(String, String)>,
    /// `\` or `` ` `` (or, rarely, something else).
    pub escape: char,
    /// `raw_quotes`, `raw_escapes`, `skip_unset`, `case_insensitive_names`.
    pub options: [bool; 4],
}

struct Gen<'r> {
    rng: &'r mut Rng,
    out: String,
    esc: char,
    nl: &'static str,
    stages: Vec<String>,
    vars: Vec<String>,
    /// Heredocs opened on the current logical line: (terminator, chomp).
    pending: Vec<(String, bool)>,
    depth: u32,
    /// False: only choices that should lower cleanly, so lowering is exercised in depth.
    wild: bool,
    /// Stages before the current one (the ones a tame `--from` may name).
    prev_stages: usize,
}

impl<'r> Gen<'r> {
    fn new(rng: &'r mut Rng) -> Self {
        let nl = if rng.u8(..10) == 0 { "\r\n" } else { "\n" };
        Gen {
            rng,
            out: String::new(),
            esc: '\\',
            nl,
            stages: Vec::new(),
            vars: VARS.iter().map(|v| v.to_string()).collect(),
            pending: Vec::new(),
            depth: 0,
            wild: true,
            prev_stages: 0,
        }
    }

    fn chance(&mut self, percent: u8) -> bool {
        self.rng.u8(..100) < percent
    }

    /// Like [`Gen::chance`] for choices that make an input invalid: never when tame.
    fn odd(&mut self, percent: u8) -> bool {
        self.wild && self.chance(percent)
    }

    /// One of `xs`; when tame, one of the first `valid` (the valid choices come first).
    fn pick_valid<T: Copy>(&mut self, xs: &[T], valid: usize) -> T {
        let n = if self.wild {
            xs.len()
        } else {
            valid.clamp(1, xs.len())
        };
        xs[self.rng.usize(..n)]
    }

    fn push_valid(&mut self, xs: &[&str], valid: usize) {
        let s = self.pick_valid(xs, valid);
        self.out.push_str(s);
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.rng.usize(..xs.len())]
    }

    fn push(&mut self, s: &str) {
        self.out.push_str(s);
    }

    fn push_pick(&mut self, xs: &[&str]) {
        let s = self.pick(xs);
        self.out.push_str(s);
    }

    /// A physical line break: usually the file's style, sometimes the other one or a lone CR.
    fn raw_newline(&mut self) {
        let nl = match self.rng.u8(..40) {
            0 => "\r\n",
            1 if self.wild => "\r",
            2 => "\n",
            _ => self.nl,
        };
        self.push(nl);
    }

    /// Ends the logical line, then writes the bodies of the heredocs it opened.
    fn end_line(&mut self) {
        if self.chance(5) {
            self.push_valid(&[" ", "\t", "  ", " # trailing"], 3);
        }
        self.raw_newline();
        let pending = std::mem::take(&mut self.pending);
        for (name, chomp) in pending {
            for _ in 0..self.rng.usize(..5) {
                if chomp || self.chance(10) {
                    self.push("\t");
                }
                match self.rng.u8(..10) {
                    0 => {
                        let s = format!("{name}x");
                        self.push(&s);
                    }
                    1 => {
                        let s = format!(" {name}");
                        self.push(&s);
                    }
                    2 => self.push("\\"),
                    3 => self.push("<<EOF"),
                    _ => self.some_words(1, 5),
                }
                self.raw_newline();
            }
            if self.odd(3) {
                continue; // unterminated: the body runs on
            }
            if chomp && self.chance(50) {
                self.push("\t\t");
            }
            self.push(&name);
            self.raw_newline();
        }
    }

    /// Space between words; sometimes a continuation, with comments or blank lines inside.
    fn sep(&mut self) {
        match self.rng.u8(..30) {
            0 | 1 => {
                let esc = if !self.wild || self.chance(90) {
                    self.esc
                } else {
                    '\\'
                };
                self.out.push(esc);
                if self.chance(10) {
                    self.push("  ");
                }
                self.raw_newline();
                // Comment and blank lines inside the continuation (a comment line ends with
                // its newline; without one it would swallow the rest of the logical line).
                for _ in 0..self.rng.usize(..3) {
                    match self.rng.u8(..4) {
                        0 => self.push("# comment inside a continuation"),
                        1 => self.push("   "),
                        2 => self.push("  # indented comment"),
                        _ => {}
                    }
                    if !self.wild || self.chance(70) {
                        self.raw_newline();
                    }
                }
                // The joined line has no space here unless the next line is indented.
                self.push_valid(&[" ", "    ", "\t", ""], 3);
            }
            2 => self.push("\t"),
            3 => self.push("   "),
            4 if self.wild => self.push("\u{a0}"),
            5 if self.wild => self.push("\u{b}"),
            _ => self.push(" "),
        }
    }

    fn var(&mut self) -> String {
        if !self.wild || self.chance(85) {
            let i = self.rng.usize(..self.vars.len());
            self.vars[i].clone()
        } else {
            self.pick(&["", "1", "@", "{", "-", "A B", "$", "\u{e9}"])
                .to_string()
        }
    }

    /// `$V`, `${V}`, `${V:-w}`, `${V#*}` and the rest, possibly nested.
    fn var_ref(&mut self) -> String {
        let v = self.var();
        self.depth += 1;
        let deep = self.depth < 4;
        let inner = |g: &mut Gen| -> String {
            if deep && g.chance(30) {
                g.var_ref()
            } else {
                g.pick(&[
                    "x", "", "a b", "*", "?", "[a-z]", "\\}", "'q'", "\"d\"", "/",
                ])
                .to_string()
            }
        };
        let mut form = self.rng.u8(..24);
        if !self.wild && matches!(form, 10 | 11 | 18..=21) {
            form = 0;
        }
        let s = match form {
            0..=3 => format!("${v}"),
            4 | 5 => format!("${{{v}}}"),
            6 => format!("${{{v}:-{}}}", inner(self)),
            7 => format!("${{{v}-{}}}", inner(self)),
            8 => format!("${{{v}:+{}}}", inner(self)),
            9 => format!("${{{v}+{}}}", inner(self)),
            10 => format!("${{{v}:?{}}}", inner(self)),
            11 => format!("${{{v}?}}"),
            12 => format!("${{{v}#{}}}", inner(self)),
            13 => format!("${{{v}##{}}}", inner(self)),
            14 => format!("${{{v}%{}}}", inner(self)),
            15 => format!("${{{v}%%{}}}", inner(self)),
            16 => format!("${{{v}/{}/{}}}", inner(self), inner(self)),
            17 => format!("${{{v}//{}/{}}}", inner(self), inner(self)),
            18 => format!("${{{v}:{}}}", self.pick(&["0:2", "1", "-1", ":", "x"])),
            19 => format!("${{{v}^^}}"),
            20 => self
                .pick(&["$", "${", "${}", "$$", "$1", "${#V}", "${!V}", "$ "])
                .to_string(),
            21 => format!("${{{v}"),
            22 => format!("${{{v}:-${{{v}:-${{{v}:-x}}}}}}"),
            _ => format!("${{{v}/\\//\\/}}"),
        };
        self.depth -= 1;
        s
    }

    /// One shell word: literals, variable references, quotes, escapes, odd characters. When
    /// tame, without whitespace, control characters, heredoc openers or a leading `--`.
    fn word(&mut self) -> String {
        let w = self.raw_word();
        if self.wild {
            return w;
        }
        let mut w: String = w
            .chars()
            .map(|c| {
                if c.is_whitespace() || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect::<String>()
            .replace('<', "_");
        if w.starts_with('-') {
            w.insert(0, 'x');
        }
        w
    }

    fn raw_word(&mut self) -> String {
        let mut w = String::new();
        for _ in 0..1 + self.rng.usize(..3) {
            match self.rng.u8(..20) {
                0..=7 => w.push_str(self.pick(LITERALS)),
                8..=10 => w.push_str(&self.var_ref()),
                11 => {
                    let inner = self.word();
                    let _ = write!(w, "'{inner}'");
                }
                12 => {
                    let inner = self.word();
                    let _ = write!(w, "\"{inner}\"");
                }
                13 => {
                    let e = self.esc;
                    let c = self.pick(&['$', '"', '\'', ' ', 'n', '\\', '`', '#', 'x']);
                    w.push(e);
                    w.push(c);
                }
                14 if self.wild => w.push(self.pick(&['"', '\'', '\\', '`', '$'])),
                14 => w.push('_'),
                15 => w.push(char::from_u32(self.rng.u32(0x80..0x3000)).unwrap_or('?')),
                16 => w.push(char::from(self.rng.u8(..0x20))),
                17 => {
                    let n = self.rng.usize(..30);
                    w.push_str(&"a".repeat(n));
                }
                _ => {
                    let _ = write!(w, "{}", self.rng.u32(..100_000));
                }
            }
        }
        w
    }

    /// `min` to `min + extra - 1` words.
    fn some_words(&mut self, min: usize, extra: usize) {
        let n = min + self.rng.usize(..extra);
        self.words(n);
    }

    fn words(&mut self, n: usize) {
        for i in 0..n {
            if i > 0 {
                self.sep();
            }
            let w = self.word();
            self.push(&w);
        }
    }

    /// A JSON array, usually valid, sometimes broken in the ways BuildKit's tests break it.
    /// The exec form of COPY/ADD/VOLUME: sources and a directory destination, when tame.
    fn json_paths(&mut self, volume: bool) {
        if self.wild {
            return self.json();
        }
        let mut items: Vec<&str> = Vec::new();
        for _ in 0..1 + self.rng.usize(..3) {
            items.push(self.pick(&[
                "src",
                "a b.txt",
                "dir/",
                "*.rs",
                "$HOME/f",
                "\\u00e9t\\u00e9",
            ]));
        }
        if !volume {
            items.push(self.pick(&["/dst/", "rel dir/", "./"]));
        }
        let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
        let s = format!("[{}]", quoted.join(", "));
        self.push(&s);
    }

    fn json(&mut self) {
        let n = usize::from(!self.wild) + self.rng.usize(..5);
        let mut items = Vec::new();
        for _ in 0..n {
            let roll = if self.wild { self.rng.u8(..14) } else { 10 };
            let item = match roll {
                0 => "\"\\u00e9\\n\\t\\\"\"".to_string(),
                1 => "\"\\ud800\"".to_string(),
                2 => "\"\\ud83e\\udd80\"".to_string(),
                3 => "1".to_string(),
                4 => "null".to_string(),
                5 => "[\"nested\"]".to_string(),
                6 => "'single'".to_string(),
                7 => "\"unterminated".to_string(),
                8 => "{\"a\":1}".to_string(),
                9 => "\"bad \\x escape\"".to_string(),
                _ => {
                    let w = self.word();
                    serde_json::to_string(&w).unwrap_or_default()
                }
            };
            items.push(item);
        }
        let sep = self.pick(&[", ", ",", " , ", ",\t"]);
        let mut s = format!("[{}]", items.join(sep));
        let breakage = if self.wild { self.rng.u8(..20) } else { 19 };
        match breakage {
            0 => {
                s.pop();
            }
            1 => s.push(','),
            2 => s.push_str(" trailing"),
            3 => s = s.replace('"', "'"),
            4 => s.insert(0, ' '),
            _ => {}
        }
        self.push(&s);
    }

    fn keyword(&mut self, k: &str) {
        let k = match self.rng.u8(..10) {
            0 => k.to_lowercase(),
            1 => k
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_lowercase()
                    } else {
                        c
                    }
                })
                .collect(),
            _ => k.to_string(),
        };
        if self.odd(5) {
            self.push_pick(&["  ", "\t", "\u{feff}"]);
        }
        self.push(&k);
    }

    fn stage_ref(&mut self) -> String {
        let known = if self.wild {
            self.stages.len()
        } else {
            self.prev_stages.min(self.stages.len())
        };
        if known > 0 && self.chance(60) {
            let i = self.rng.usize(..known);
            return self.stages[i].clone();
        }
        self.pick_valid(
            &[
                "alpine:3",
                "kiln/busybox",
                "0",
                "1",
                "99",
                "nosuchstage",
                "$STAGE",
                "${A}",
                "",
                "-1",
            ],
            2,
        )
        .to_string()
    }

    fn flag(&mut self, kw: &str) -> String {
        let lower = kw.to_ascii_lowercase();
        let specific: &[&str] = match lower.as_str() {
            "run" => &["mount", "mount", "network", "security", "device"],
            "copy" => &["from", "chown", "chmod", "link", "exclude", "parents"],
            "add" => &[
                "chown",
                "chmod",
                "link",
                "checksum",
                "keep-git-dir",
                "unpack",
                "exclude",
            ],
            "from" => &["platform"],
            "healthcheck" => &[
                "interval",
                "timeout",
                "start-period",
                "start-interval",
                "retries",
            ],
            _ => &["bogus"],
        };
        let specific: &[&str] = match (self.wild, lower.as_str()) {
            (true, _) => specific,
            (false, "run") => &["mount", "mount", "network"],
            (false, "add") => &["chown", "chmod", "link", "exclude"],
            (false, _) => specific,
        };
        let name = if !self.wild || self.chance(85) {
            self.pick(specific)
        } else {
            self.pick(&[
                "bogus", "platform", "from", "mount", "", "=", "MOUNT", "chown",
            ])
        };
        let value = match name {
            "mount" => self.mount(),
            "network" => self
                .pick_valid(&["none", "host", "default", "bogus", "$NET", ""], 3)
                .to_string(),
            "security" => self
                .pick_valid(&["sandbox", "insecure", "x"], 2)
                .to_string(),
            "device" => self.pick_valid(&["/dev/fuse", "name=x", ""], 1).to_string(),
            "from" => self.stage_ref(),
            "chown" => self
                .pick_valid(
                    &[
                        "1000:1000",
                        "user",
                        "$U:$G",
                        "root:",
                        ":g",
                        "a:b:c",
                        "",
                        "-1",
                    ],
                    2,
                )
                .to_string(),
            "chmod" => self
                .pick_valid(
                    &[
                        "755",
                        "0644",
                        "u+x",
                        "9999",
                        "0o7",
                        "",
                        "-1",
                        "77777777777",
                        "$M",
                    ],
                    2,
                )
                .to_string(),
            "platform" => self.pick_valid(PLATFORMS, 3).to_string(),
            "checksum" => self
                .pick(&["sha256:0123", "sha256:", "md5:x", ""])
                .to_string(),
            "interval" | "timeout" | "start-period" | "start-interval" => self
                .pick_valid(
                    &[
                        "30s",
                        "1m30s",
                        "1h",
                        "0s",
                        "-1s",
                        "5",
                        "1.5s",
                        "x",
                        "",
                        "99999999h",
                    ],
                    3,
                )
                .to_string(),
            "retries" => self
                .pick_valid(&["3", "0", "-1", "x", "99999999999"], 1)
                .to_string(),
            "link" | "parents" | "unpack" | "keep-git-dir" if !self.wild => {
                self.pick(&["true", "false"]).to_string()
            }
            "exclude" if !self.wild => self.pick(&["*.md", "docs/", "**/*.tmp"]).to_string(),
            _ => self.word(),
        };
        let form = if self.wild { self.rng.u8(..12) } else { 11 };
        match form {
            0 => format!("--{name}"),
            1 => format!("--{name}=\"{value}\""),
            2 => format!("--{name}='{value}'"),
            3 => format!("-{name}={value}"),
            _ => format!("--{name}={value}"),
        }
    }

    fn mount(&mut self) -> String {
        if !self.wild {
            let from = self.stage_ref();
            return match self.rng.u8(..7) {
                0 => "type=cache,target=/root/.cache".into(),
                1 => "type=cache,target=/c,id=c-$TARGETARCH,sharing=locked".into(),
                2 => "type=bind,source=/src,target=/dst".into(),
                3 => format!("type=bind,from={from},target=/x,ro"),
                4 => "type=tmpfs,target=/t,size=10m".into(),
                5 => "type=secret,id=tok,target=/run/secrets/tok".into(),
                _ => "type=ssh".into(),
            };
        }
        let kind = self.pick(&["cache", "bind", "tmpfs", "secret", "ssh", "bogus", ""]);
        let mut fields = Vec::new();
        if !kind.is_empty() || self.chance(50) {
            fields.push(format!("type={kind}"));
        }
        for _ in 0..self.rng.usize(..4) {
            let f = match self.rng.u8(..16) {
                0 => "target=/root/.cache".to_string(),
                1 => "dst=rel/path".to_string(),
                2 => "source=/src".to_string(),
                3 => format!("from={}", self.stage_ref()),
                4 => "ro".to_string(),
                5 => "rw=false".to_string(),
                6 => "id=cache-$TARGETARCH".to_string(),
                7 => self
                    .pick(&["sharing=locked", "sharing=shared", "sharing=x"])
                    .to_string(),
                8 => "mode=0700".to_string(),
                9 => "uid=1000,gid=1000".to_string(),
                10 => "size=10m".to_string(),
                11 => "required=true".to_string(),
                12 => "\"target=/a,b\"".to_string(),
                13 => "target=\"/a b\"".to_string(),
                14 => "=".to_string(),
                _ => format!("{}={}", self.var(), self.word()),
            };
            fields.push(f);
        }
        fields.join(",")
    }

    /// `<<EOF`-style words, registered so [`Gen::end_line`] writes their bodies.
    fn heredoc_word(&mut self) -> String {
        let name = self.pick(&["EOF", "END", "E", "FILE1", "x"]).to_string();
        let chomp = self.chance(30);
        let dash = if chomp { "-" } else { "" };
        let fd = if self.chance(10) { "3" } else { "" };
        let quoted = match self.rng.u8(..5) {
            0 => format!("'{name}'"),
            1 => format!("\"{name}\""),
            _ => name.clone(),
        };
        self.pending.push((name, chomp));
        format!("{fd}<<{dash}{quoted}")
    }

    fn command(&mut self, heredocs: bool) {
        if self.chance(25) {
            self.json();
            return;
        }
        if heredocs && self.chance(25) {
            for i in 0..1 + self.rng.usize(..3) {
                if i > 0 {
                    self.sep();
                    let w = self.word();
                    self.push(&w);
                    self.sep();
                }
                let h = self.heredoc_word();
                self.push(&h);
            }
            if self.chance(50) {
                self.sep();
                self.some_words(0, 3);
            }
            return;
        }
        let n = 1 + self.rng.usize(..6);
        self.words(n);
    }

    fn pairs(&mut self) {
        if self.chance(20) {
            // legacy `KEY value with spaces`
            let v = self.var();
            self.push(&v);
            self.sep();
            self.some_words(1, 3);
            return;
        }
        for i in 0..1 + self.rng.usize(..3) {
            if i > 0 {
                self.sep();
            }
            let k = if self.chance(90) {
                self.var()
            } else {
                self.word()
            };
            let v = self.word();
            let quote = self.pick(&["", "", "\"", "'"]);
            let s = format!("{k}={quote}{v}{quote}");
            self.push(&s);
            if self.chance(30) {
                self.vars.push(k);
            }
        }
    }

    fn from(&mut self) {
        self.keyword("FROM");
        self.push(" ");
        if self.chance(15) {
            let f = self.flag("FROM");
            self.push(&f);
            self.push(" ");
        }
        self.prev_stages = self.stages.len();
        let image = if !self.stages.is_empty() && self.chance(15) {
            self.stage_ref()
        } else {
            self.pick_valid(IMAGES, VALID_IMAGES).to_string()
        };
        self.push(&image);
        if self.chance(60) {
            let name = if !self.wild || self.chance(90) {
                format!("stage{}", self.stages.len())
            } else {
                self.pick(&["", "UPPER", "1", "a.b", "bad name", "$A", "scratch"])
                    .to_string()
            };
            self.sep();
            let kw = self.pick_valid(&["AS", "as", "As", "AS", "is"], 4);
            self.push(kw);
            self.sep();
            self.push(&name);
            self.stages.push(name);
        } else if self.odd(5) {
            self.push(" extra words here");
        }
        self.end_line();
    }

    /// One instruction (not FROM), with flags, in any of its argument shapes.
    fn instruction(&mut self) {
        let kw = if self.odd(4) {
            self.pick(JUNK_KEYWORDS)
        } else {
            self.pick(&KEYWORDS[1..])
        };
        self.instruction_named(kw, true);
        self.end_line();
    }

    fn instruction_named(&mut self, kw: &str, allow_onbuild: bool) {
        self.keyword(kw);
        if self.odd(3) {
            return; // no arguments at all
        }
        self.push(" ");
        let lower = kw.to_ascii_lowercase();
        let nflags = match lower.as_str() {
            "run" | "copy" | "add" | "healthcheck" => self.rng.usize(..3),
            _ if self.odd(5) => 1,
            _ => 0,
        };
        let mut used: Vec<String> = Vec::new();
        for _ in 0..nflags {
            let f = self.flag(kw);
            let name = f.split('=').next().unwrap_or_default().to_string();
            let repeatable = name == "--mount" || name == "--exclude";
            if !self.wild && !repeatable && used.contains(&name) {
                continue;
            }
            used.push(name);
            self.push(&f);
            self.sep();
        }
        if self.odd(2) {
            self.push("-- ");
        }
        match lower.as_str() {
            "run" => self.command(true),
            "cmd" | "entrypoint" => self.command(false),
            "shell" => {
                if !self.wild || self.chance(80) {
                    self.push_valid(
                        &[
                            "[\"/bin/bash\", \"-c\"]",
                            "[\"cmd\", \"/S\", \"/C\"]",
                            "[\"sh\"]",
                            "[]",
                        ],
                        3,
                    );
                } else {
                    self.command(false);
                }
            }
            "env" | "label" => self.pairs(),
            "arg" => {
                for i in 0..1 + self.rng.usize(..3) {
                    if i > 0 {
                        self.sep();
                    }
                    let v = self.var();
                    self.push(&v);
                    if self.chance(50) {
                        self.push("=");
                        let w = self.word();
                        self.push(&w);
                    }
                }
            }
            "copy" | "add" => {
                if self.chance(20) {
                    self.json_paths(false);
                } else if self.chance(15) {
                    let h = self.heredoc_word();
                    self.push(&h);
                    self.sep();
                    self.push_valid(&["/dst", "/dir/", "rel", "$D"], 3);
                } else {
                    for _ in 0..1 + self.rng.usize(..3) {
                        let src = match self.rng.u8(..8) {
                            0 if lower == "add" || self.wild => {
                                "https://example.com/a.tar.gz".to_string()
                            }
                            1 if lower == "add" || self.wild => {
                                "https://github.com/moby/buildkit.git#v0.13".to_string()
                            }
                            2 if self.wild => "git@github.com:a/b.git".to_string(),
                            3 => ".".to_string(),
                            _ if !self.wild => self
                                .pick(&["src", "a.txt", "dir/", "*.rs", "$HOME/f", "\u{e9}t\u{e9}"])
                                .to_string(),
                            _ => self.word(),
                        };
                        self.push(&src);
                        self.sep();
                    }
                    // A directory destination: several sources need one.
                    self.push_valid(
                        &["/app/", "rel/", "./", "$HOME/x/", "/app", ".", "", "/"],
                        4,
                    );
                }
            }
            "expose" => {
                for i in 0..1 + self.rng.usize(..3) {
                    if i > 0 {
                        self.sep();
                    }
                    self.push_valid(
                        &[
                            "80",
                            "80/tcp",
                            "53/udp",
                            "8000-8010",
                            "8000-8010/udp",
                            "$PORT",
                            "99999",
                            "10-1",
                            "a",
                            "1-",
                            "80/sctp",
                            "80/xyz",
                            "0",
                        ],
                        5,
                    );
                }
            }
            "volume" => {
                if self.chance(30) {
                    self.json_paths(true);
                } else if self.wild {
                    self.some_words(1, 3);
                } else {
                    self.push_pick(&["/data", "/var/lib/app /cache", "rel", "/\u{e9}t\u{e9}"]);
                }
            }
            "user" | "workdir" | "stopsignal" | "maintainer" => {
                if !self.wild || self.chance(50) {
                    let s = match lower.as_str() {
                        "user" => self
                            .pick_valid(&["1000:1000", "root", "app:app", "$U", "a:b:c", ":"], 3),
                        "workdir" => {
                            self.pick_valid(&["/app", "rel", "$HOME/x", "/a/../..", "C:\\x"], 4)
                        }
                        "stopsignal" => self.pick_valid(
                            &["SIGTERM", "9", "SIGRTMIN+3", "KILL", "$SIG", "99", "x"],
                            4,
                        ),
                        _ => "Jane Doe <jane@example.com>",
                    };
                    self.push(s);
                } else {
                    self.some_words(1, 3);
                }
            }
            "healthcheck" => match self.rng.u8(..5) {
                0 => self.push_valid(&["NONE", "none", "NONE extra", "BOGUS x"], 2),
                _ => {
                    self.push_valid(&["CMD", "cmd", "CMD-SHELL"], 2);
                    self.sep();
                    self.command(false);
                }
            },
            "onbuild" => {
                let next = if allow_onbuild && self.odd(10) {
                    "ONBUILD"
                } else if self.odd(5) {
                    self.pick(&["FROM", "MAINTAINER", "bogus"])
                } else {
                    self.pick(&KEYWORDS[1..])
                };
                let next = if !self.wild && matches!(next, "ONBUILD" | "MAINTAINER" | "FROM") {
                    "RUN"
                } else {
                    next
                };
                let allow = allow_onbuild && next != "ONBUILD";
                self.instruction_named(next, allow);
            }
            "from" => {
                self.push_valid(IMAGES, VALID_IMAGES);
            }
            _ => self.some_words(0, 4),
        }
    }

    fn directives(&mut self) {
        if self.chance(50) {
            return;
        }
        let count = if self.wild {
            1 + self.rng.usize(..3)
        } else {
            1
        };
        for _ in 0..count {
            if self.odd(10) {
                self.push("# just a comment");
                self.raw_newline();
            }
            let hash = self.pick(&["# ", "#", "#  ", "# \t"]);
            self.push(hash);
            let which = if self.wild {
                self.rng.u8(..6)
            } else {
                self.rng.u8(..4)
            };
            match which {
                0..=2 => {
                    let name = self.pick(&["escape", "ESCAPE", "Escape"]);
                    let eq = self.pick(&["=", " = ", "= "]);
                    let value = self.pick_valid(&["`", "`", "\\", "x", "", "``", "\\\\"], 3);
                    if value == "`" && self.esc == '\\' {
                        self.esc = '`';
                    }
                    let s = format!("{name}{eq}{value}");
                    self.push(&s);
                }
                3 => self.push("syntax=docker/dockerfile:1.7"),
                4 => {
                    let v = self.pick_valid(
                        &[
                            "skip=all",
                            "error=true",
                            "skip=JSONArgsRecommended;error=true",
                            "skip=",
                            "error=maybe",
                            "bogus",
                        ],
                        1,
                    );
                    let s = format!("check={v}");
                    self.push(&s);
                }
                _ => self.push("unknown=directive"),
            }
            self.raw_newline();
        }
    }

    fn comment_or_blank(&mut self) {
        match self.rng.u8(..4) {
            0 => self.push("# a comment"),
            1 => self.push("   "),
            2 => self.push("  # indented \u{e9}"),
            _ => {}
        }
        self.raw_newline();
    }
}

/// A random Dockerfile and lowering options that refer to its stages and variables.
pub fn dockerfile(rng: &mut Rng) -> DockerfileCase {
    let mut g = Gen::new(rng);
    g.wild = g.chance(50);
    dockerfile_with(g)
}

fn dockerfile_with(mut g: Gen) -> DockerfileCase {
    if g.chance(5) {
        g.push("\u{feff}");
    }
    g.directives();
    if g.chance(30) {
        for _ in 0..1 + g.rng.usize(..3) {
            g.instruction_named("ARG", false);
            g.end_line();
        }
    }
    let stages = if g.odd(5) { 0 } else { 1 + g.rng.usize(..4) };
    for _ in 0..stages {
        g.from();
        for _ in 0..g.rng.usize(..12) {
            if g.chance(10) {
                g.comment_or_blank();
            }
            g.instruction();
        }
    }
    if stages == 0 {
        for _ in 0..g.rng.usize(..5) {
            g.instruction();
        }
    }
    if g.chance(10) {
        // No final newline.
        while g.out.ends_with(['\n', '\r']) {
            g.out.pop();
        }
    }
    let opts = lower_options(&mut g);
    let variant = if g.wild { "wild" } else { "tame" };
    DockerfileCase {
        text: g.out,
        opts,
        variant,
    }
}

/// Random lowering options for a Dockerfile whose stage names are not known.
pub fn options(rng: &mut Rng) -> LowerOptions {
    let mut g = Gen::new(rng);
    g.stages = vec!["builder".into(), "build".into(), "0".into()];
    lower_options(&mut g)
}

fn lower_options(g: &mut Gen) -> LowerOptions {
    let mut build_args = BTreeMap::new();
    for _ in 0..g.rng.usize(..4) {
        let k = g.var();
        let v = g.word();
        build_args.insert(k, v);
    }
    g.prev_stages = g.stages.len();
    let target = match g.rng.u8(..10) {
        0..=2 if !g.stages.is_empty() && !g.wild => {
            Some(g.stages[g.rng.usize(..g.stages.len())].clone())
        }
        0..=2 if !g.stages.is_empty() => Some(g.stage_ref()),
        3 if g.wild => Some(g.pick(&["nosuch", "", "STAGE0", "0"]).to_string()),
        _ => None,
    };
    let platform = if !g.wild || g.chance(80) {
        "linux/amd64".to_string()
    } else {
        g.pick(PLATFORMS).to_string()
    };
    LowerOptions {
        build_args,
        target,
        platform,
    }
}

/// A random word, environment and lexer configuration.
pub fn shell(rng: &mut Rng) -> ShellCase {
    let escape = if rng.u8(..4) == 0 { '`' } else { '\\' };
    let options = [
        rng.u8(..4) == 0,
        rng.u8(..4) == 0,
        rng.u8(..4) == 0,
        rng.u8(..8) == 0,
    ];
    let mut g = Gen::new(rng);
    g.esc = escape;
    let mut env = Vec::new();
    for _ in 0..g.rng.usize(..6) {
        let k = g.var();
        let v = if g.chance(20) {
            String::new()
        } else {
            g.word()
        };
        env.push((k, v));
    }
    let mut word = String::new();
    for i in 0..1 + g.rng.usize(..4) {
        if i > 0 {
            word.push(g.pick(&[' ', ' ', '\t', '\n']));
        }
        word.push_str(&g.word());
    }
    ShellCase {
        word,
        env,
        escape,
        options,
    }
}

/// A large input built by repeating one construct thousands of times: continuation chains,
/// heredoc runs, long lines, deep nesting, many stages. Anything super-linear shows here.
pub fn stress(rng: &mut Rng) -> DockerfileCase {
    let n = 1_000 + rng.usize(..20_000);
    let mut s = String::from("FROM scratch AS base\n");
    let choice = rng.usize(..STRESS_VARIANTS.len());
    match choice {
        0 => {
            s.push_str("RUN echo start \\\n");
            for i in 0..n {
                let _ = writeln!(s, "  && echo {i} \\");
                if i % 7 == 0 {
                    s.push_str("# comment in the chain\n");
                }
                if i % 11 == 0 {
                    s.push('\n');
                }
            }
            s.push_str("  && true\n");
        }
        1 => {
            for i in 0..n.min(5_000) {
                let _ = write!(s, "RUN <<EOF{i}\necho {i}\nEOF{i}\n");
            }
        }
        2 => {
            let k = n.min(3_000);
            s.push_str("RUN cat");
            for i in 0..k {
                let _ = write!(s, " <<H{i}");
            }
            s.push('\n');
            for i in 0..k {
                let _ = write!(s, "body {i}\nH{i}\n");
            }
        }
        3 => {
            // One line just under BuildKit's limit, dense with expansions and quotes.
            let unit = rng.choice(["$A", "${A:-x}", "'q'", "\"d\"", "\\ ", "${A#*}", "a"]);
            let unit = unit.unwrap_or("a");
            s.push_str("ENV A=");
            while s.len() < 65_000 {
                s.push_str(unit);
            }
            s.push_str("\nRUN echo $A\n");
        }
        4 => {
            let depth = n.min(5_000);
            s.push_str("ENV A=");
            for _ in 0..depth {
                s.push_str("${A:-");
            }
            s.push('x');
            for _ in 0..depth {
                s.push('}');
            }
            s.push('\n');
        }
        5 => {
            for i in 0..n {
                let _ = writeln!(s, "ENV V{i}=value{i} W{i}=$V{i}");
            }
            s.push_str("RUN env\n");
        }
        6 => {
            s.clear();
            let k = n.min(2_000);
            for i in 0..k {
                let from = if i == 0 {
                    "scratch".to_string()
                } else {
                    format!("s{}", i - 1)
                };
                let _ = write!(s, "FROM {from} AS s{i}\nCOPY --from=s0 /a /b{i}\n");
            }
        }
        7 => {
            s.push_str("CMD [");
            for i in 0..n {
                if i > 0 {
                    s.push_str(", ");
                }
                let _ = write!(s, "\"arg{i}\"");
                if i % 1_000 == 999 {
                    s.push_str("\\\n");
                }
            }
            s.push_str("]\n");
        }
        8 => {
            s.push_str("CMD ");
            for i in 0..n {
                s.push('[');
                if i % 1_000 == 999 {
                    s.push_str("\\\n");
                }
            }
            s.push('\n');
        }
        9 => {
            s.push_str("RUN");
            for i in 0..n.min(3_000) {
                let _ = write!(s, " --mount=type=cache,target=/c{i}");
                if i % 500 == 499 {
                    s.push_str(" \\\n");
                }
            }
            s.push_str(" true\n");
        }
        10 => {
            // A long value, then greedy glob trims of it.
            let _ = writeln!(s, "ENV A={}", "ab".repeat(n.min(30_000)));
            for pat in ["*a", "*b*", "a*b", "[a]*", "*"] {
                let _ = writeln!(
                    s,
                    "ENV B=${{A##{pat}}} C=${{A%%{pat}}} D=${{A//{pat}/x}} E=${{A#{pat}}}"
                );
            }
        }
        11 => {
            for i in 0..n {
                let _ = writeln!(s, "ARG A{i}=${{A{}:-d}}", i.saturating_sub(1));
            }
            s.push_str("RUN echo $A0\n");
        }
        12 => {
            for _ in 0..n {
                s.push_str("\\\n");
            }
            s.push_str("RUN x\n");
        }
        _ => {
            for i in 0..n {
                let _ = writeln!(s, "LABEL k{i}=\"v {i}\" \"q{i}\"='w'");
            }
        }
    }
    DockerfileCase {
        text: s,
        opts: LowerOptions::default(),
        variant: STRESS_VARIANTS[choice],
    }
}

/// A realistic Dockerfile of at least `bytes` bytes: 20 stages, each copying from the one
/// before, with ARG/ENV/RUN/COPY lines, continuations and some heredocs.
pub fn realistic(bytes: usize) -> String {
    const STAGES: usize = 20;
    let per_stage = bytes / STAGES + 1;
    let mut s = String::with_capacity(bytes + 4096);
    s.push_str("# syntax=docker/dockerfile:1\nARG BASE=kiln/debian:bookworm\nARG VERSION=1.0\n\n");
    for stage in 0..STAGES {
        let start = s.len();
        let base = if stage == 0 {
            "${BASE}".to_string()
        } else {
            format!("stage{}", stage - 1)
        };
        let _ = writeln!(s, "FROM {base} AS stage{stage}");
        s.push_str("ARG VERSION\nARG TARGETARCH\n");
        let mut i = 0usize;
        while s.len() - start < per_stage {
            match i % 10 {
                0 => {
                    let _ = writeln!(s, "# step {i} of stage {stage}");
                    // A handful of names, set again and again, as real files do.
                    let _ = writeln!(
                        s,
                        "ENV APP_HOME=/opt/app{stage} STEP_{}=\"value {i}\"",
                        i % 8
                    );
                }
                1 => {
                    let _ = writeln!(s, "ARG OPT_{}=${{VERSION:-0}}-{i}", i % 8);
                }
                2 => {
                    s.push_str("RUN set -eux; \\\n    apt-get update && \\\n");
                    let _ = writeln!(
                        s,
                        "    apt-get install -y --no-install-recommends pkg{i} lib{i}-dev \\"
                    );
                    s.push_str("        ca-certificates curl && \\\n");
                    s.push_str("    rm -rf /var/lib/apt/lists/*\n");
                }
                3 => {
                    let _ = writeln!(s, "COPY --chown=1000:1000 src/module{i}/ $APP_HOME/m{i}/");
                }
                4 => {
                    let _ = writeln!(
                        s,
                        "RUN --mount=type=cache,target=/root/.cache/{stage} \\\n    make -C $APP_HOME/m{} ARCH=${{TARGETARCH}} -j2",
                        i - 1
                    );
                }
                5 => {
                    let _ = writeln!(s, "WORKDIR $APP_HOME/work{i}");
                }
                6 => {
                    s.push_str("RUN <<EOF\nset -e\n");
                    let _ = writeln!(s, "echo \"building step {i}\" > /tmp/step{i}");
                    s.push_str("test -f /tmp/step0 || true\nEOF\n");
                }
                7 => {
                    let _ = writeln!(s, "LABEL org.example.step{i}=\"{i}\" maintainer=\"team\"");
                }
                8 => {
                    let _ = writeln!(
                        s,
                        "COPY <<-EOF /etc/app{stage}/conf{i}.ini\n\t[section]\n\tkey = {i}\n\tEOF"
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "RUN [\"/bin/sh\", \"-c\", \"echo step {i} && ls -la /opt\"]"
                    );
                }
            }
            i += 1;
        }
        if stage > 0 {
            let _ = writeln!(s, "COPY --from=stage{} /opt /opt/prev", stage - 1);
        }
    }
    s.push_str("USER 1000:1000\nEXPOSE 8080/tcp\nCMD [\"/opt/app19/bin/run\"]\n");
    s
}

/// `FROM scratch` and `lines` RUN lines.
pub fn many_lines(lines: usize) -> String {
    let mut s = String::from("FROM scratch\n");
    for i in 1..lines {
        let _ = writeln!(s, "RUN echo line {i}");
    }
    s
}

/// `FROM scratch` and one RUN of `lines` physical lines joined by continuations.
pub fn continuation_chain(lines: usize) -> String {
    let mut s = String::from("FROM scratch\nRUN echo start \\\n");
    for i in 2..lines {
        let _ = writeln!(s, "  && echo {i} \\");
    }
    s.push_str("  && true\n");
    s
}

/// `FROM scratch` and `count` RUN heredocs.
pub fn heredocs(count: usize) -> String {
    let mut s = String::from("FROM scratch\n");
    for i in 0..count {
        let _ = write!(s, "RUN <<EOF\necho heredoc {i}\nls /\nEOF\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_deterministic() {
        let a = dockerfile(&mut Rng::with_seed(1)).text;
        let b = dockerfile(&mut Rng::with_seed(1)).text;
        assert_eq!(a, b);
    }

    #[test]
    fn fixed_inputs_have_their_shape() {
        assert_eq!(many_lines(100).lines().count(), 100);
        assert_eq!(continuation_chain(100).lines().count(), 101);
        assert!(realistic(100_000).len() >= 100_000);
    }
}
