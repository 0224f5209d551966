//! The fuzzer's inputs: their kinds, how input `i` of a seeded run is made, and how one input
//! is run through the library (parse, dump, lower; from_json, lower_sdk; the shell lexer),
//! with span invariants checked on every tree and error.

use crate::corpus::CorpusFile;
use crate::generate::{self, ShellCase};
use crate::{mutate, sdk_gen};
use fastrand::Rng;
use kiln::frontend::dockerfile::shell::Lexer;
use kiln::frontend::dockerfile::{Args, Dockerfile, Instruction, Span, dump, parse};
use kiln::frontend::sdk::{from_json, lower_sdk};
use kiln::frontend::{LowerOptions, NoBaseImages, lower_dockerfile};
use std::collections::BTreeMap;
use std::hint::black_box;

/// Where an input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Generated,
    GeneratedMutated,
    CorpusMutated,
    Stress,
    Sdk,
    Shell,
}

pub const KINDS: [Kind; 6] = [
    Kind::Generated,
    Kind::GeneratedMutated,
    Kind::CorpusMutated,
    Kind::Stress,
    Kind::Sdk,
    Kind::Shell,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Generated => "generated Dockerfile",
            Kind::GeneratedMutated => "generated + mutated",
            Kind::CorpusMutated => "corpus mutation",
            Kind::Stress => "stress (large)",
            Kind::Sdk => "SDK JSON",
            Kind::Shell => "shell lexer",
        }
    }

    pub fn index(self) -> usize {
        KINDS.iter().position(|&k| k == self).unwrap_or(0)
    }
}

/// One fuzz input.
pub enum Input {
    Dockerfile {
        text: String,
        opts: LowerOptions,
        /// `tame`, `wild`, `mutated`, a stress variant: shown in reports and signatures.
        variant: &'static str,
    },
    Sdk {
        text: String,
        opts: LowerOptions,
    },
    Shell(ShellCase),
}

impl Input {
    /// The Dockerfile variant, or "" for other kinds.
    pub fn variant(&self) -> &'static str {
        match self {
            Input::Dockerfile { variant, .. } => variant,
            _ => "",
        }
    }

    /// The main text: the Dockerfile, the JSON document or the shell word.
    pub fn text(&self) -> &str {
        match self {
            Input::Dockerfile { text, .. } | Input::Sdk { text, .. } => text,
            Input::Shell(c) => &c.word,
        }
    }

    /// Size in bytes (for a shell case, the word and the environment).
    pub fn len(&self) -> usize {
        match self {
            Input::Dockerfile { text, .. } | Input::Sdk { text, .. } => text.len(),
            Input::Shell(c) => {
                c.word.len() + c.env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            }
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Input `index` of the run seeded `seed`.
pub fn make(seed: u64, index: u64, corpus: &[CorpusFile]) -> (Kind, Input) {
    let mut rng = Rng::with_seed(splitmix(seed ^ splitmix(index)));
    let roll = rng.u16(..1000);
    let kind = match roll {
        0..350 => Kind::Generated,
        350..500 => Kind::GeneratedMutated,
        500..795 => Kind::CorpusMutated,
        795..800 => Kind::Stress,
        800..900 => Kind::Sdk,
        _ => Kind::Shell,
    };
    let donors: Vec<&[u8]> = corpus.iter().map(|f| f.bytes.as_slice()).collect();
    let input = match kind {
        Kind::Generated => {
            let c = generate::dockerfile(&mut rng);
            Input::Dockerfile {
                text: c.text,
                opts: c.opts,
                variant: c.variant,
            }
        }
        Kind::GeneratedMutated => {
            let c = generate::dockerfile(&mut rng);
            let mut bytes = c.text.into_bytes();
            mutate::mutate(&mut rng, &mut bytes, &donors, 64 * 1024);
            Input::Dockerfile {
                text: String::from_utf8_lossy(&bytes).into_owned(),
                opts: c.opts,
                variant: c.variant,
            }
        }
        Kind::CorpusMutated => {
            let mut bytes = corpus[rng.usize(..corpus.len())].bytes.clone();
            mutate::mutate(&mut rng, &mut bytes, &donors, 64 * 1024);
            let opts = if rng.bool() {
                LowerOptions::default()
            } else {
                generate::options(&mut rng)
            };
            Input::Dockerfile {
                text: kiln::frontend::dockerfile::decode(&bytes).0.into_owned(),
                opts,
                variant: "mutated",
            }
        }
        Kind::Stress => {
            let c = generate::stress(&mut rng);
            Input::Dockerfile {
                text: c.text,
                opts: c.opts,
                variant: c.variant,
            }
        }
        Kind::Sdk => {
            let text = sdk_gen::document(&mut rng);
            let mut opts = generate::options(&mut rng);
            if rng.u8(..10) != 0 {
                opts.target = None;
            }
            Input::Sdk { text, opts }
        }
        Kind::Shell => Input::Shell(generate::shell(&mut rng)),
    };
    (kind, input)
}

/// What one input did, for the tallies: `(first step ok, second step ok if it ran)`.
pub type Outcome = (bool, Option<bool>);

fn check_span(span: Span, src: &str, what: &str) -> Result<(), String> {
    let (s, e) = (span.start as usize, span.end as usize);
    if s > e || e > src.len() || !src.is_char_boundary(s) || !src.is_char_boundary(e) {
        return Err(format!(
            "invariant: {what} span {s}..{e} is not a char range of the {}-byte source",
            src.len()
        ));
    }
    Ok(())
}

fn check_args(args: &Args, src: &str) -> Result<(), String> {
    match args {
        Args::Empty | Args::Unknown => Ok(()),
        Args::Json { items, span } => {
            check_span(*span, src, "JSON array")?;
            items
                .iter()
                .try_for_each(|a| check_span(a.span, src, "JSON item"))
        }
        Args::Text(a) => check_span(a.span, src, "text argument"),
        Args::List(v) | Args::Words(v) => {
            v.iter().try_for_each(|a| check_span(a.span, src, "word"))
        }
        Args::Pairs { pairs, .. } => pairs.iter().try_for_each(|(k, v)| {
            check_span(k.span, src, "key")?;
            check_span(v.span, src, "value")
        }),
        Args::Healthcheck { kind, command } => {
            check_span(kind.span, src, "HEALTHCHECK kind")?;
            check_args(command, src)
        }
        Args::Onbuild(ins) => check_instruction(ins, src),
    }
}

fn check_instruction(ins: &Instruction, src: &str) -> Result<(), String> {
    check_span(ins.span, src, "instruction")?;
    check_span(ins.keyword_span, src, "keyword")?;
    if ins.start_line > ins.end_line {
        return Err(format!(
            "invariant: instruction lines {}..{} are reversed",
            ins.start_line, ins.end_line
        ));
    }
    for f in &ins.flags {
        check_span(f.span, src, "flag")?;
    }
    for h in &ins.heredocs {
        check_span(h.span, src, "heredoc")?;
    }
    check_args(&ins.args, src)
}

fn check_tree(file: &Dockerfile, src: &str) -> Result<(), String> {
    for d in &file.directives {
        check_span(d.span, src, "directive")?;
    }
    for w in &file.warnings {
        check_span(w.span, src, "warning")?;
    }
    file.instructions
        .iter()
        .try_for_each(|ins| check_instruction(ins, src))
}

/// Runs one input. `Err` is a broken invariant (a wrong result, not a panic).
pub fn run(input: &Input) -> Result<Outcome, String> {
    match input {
        Input::Dockerfile { text, opts, .. } => match parse(text) {
            Ok(file) => {
                check_tree(&file, text)?;
                black_box(dump(&file));
                let lowered = match lower_dockerfile(&file, opts, &NoBaseImages) {
                    Ok(l) => {
                        black_box(l);
                        true
                    }
                    Err(e) => {
                        if let Some(span) = e.span {
                            check_span(span, text, "lowering error")?;
                        }
                        false
                    }
                };
                Ok((true, Some(lowered)))
            }
            Err(e) => {
                check_span(e.span, text, "parse error")?;
                Ok((false, None))
            }
        },
        Input::Sdk { text, opts } => match from_json(text) {
            Ok(img) => Ok((true, Some(lower_sdk(&img, opts, &NoBaseImages).is_ok()))),
            Err(_) => Ok((false, None)),
        },
        Input::Shell(c) => {
            let [raw_quotes, raw_escapes, skip_unset, ci] = c.options;
            let lexer = Lexer::new(c.escape)
                .raw_quotes(raw_quotes)
                .raw_escapes(raw_escapes)
                .skip_unset(skip_unset)
                .case_insensitive_names(ci);
            let word = lexer.process_word(&c.word, &c.env);
            let words = lexer.process_words(&c.word, &c.env);
            let matches = lexer.process_word_with_matches(&c.word, &c.env);
            let map: BTreeMap<String, String> = c.env.iter().cloned().collect();
            black_box(lexer.process_word(&c.word, &map).ok());
            if let (Ok(a), Ok(b)) = (&word, &matches)
                && a != &b.value
            {
                return Err(format!(
                    "invariant: process_word gave {a:?} but process_word_with_matches gave {:?}",
                    b.value
                ));
            }
            Ok((word.is_ok(), Some(words.is_ok())))
        }
    }
}

/// Prints an input and the errors it gives (for `--show`).
pub fn show(index: u64, kind: Kind, input: &Input) {
    let result = match input {
        Input::Dockerfile { text, opts, .. } => match parse(text) {
            Ok(file) => match lower_dockerfile(&file, opts, &NoBaseImages) {
                Ok(l) => format!("lowered: {} stage(s)", l.spec.stages.len()),
                Err(e) => format!("lower error: {e}"),
            },
            Err(e) => format!("parse error: {e}"),
        },
        Input::Sdk { text, opts } => match from_json(text) {
            Ok(img) => match lower_sdk(&img, opts, &NoBaseImages) {
                Ok(_) => "lowered".to_string(),
                Err(e) => format!("lower error: {e}"),
            },
            Err(e) => format!("from_json error: {e}"),
        },
        Input::Shell(c) => {
            let lexer = Lexer::new(c.escape);
            format!("{:?}", lexer.process_words(&c.word, &c.env))
        }
    };
    let text = match input {
        Input::Dockerfile { text, .. } | Input::Sdk { text, .. } => text.as_str(),
        Input::Shell(c) => c.word.as_str(),
    };
    let head: String = text.chars().take(2_000).collect();
    println!("#{index} {}: {head:?}\n  => {result}", kind.name());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_is_a_function_of_seed_and_index() {
        let corpus = crate::corpus::load().expect("the conformance corpus");
        let mut kinds = [0; KINDS.len()];
        for i in 0..2_000 {
            let (k1, a) = make(9, i, &corpus);
            let (k2, b) = make(9, i, &corpus);
            assert_eq!(k1, k2);
            assert_eq!(a.text(), b.text());
            kinds[k1.index()] += 1;
        }
        assert!(
            kinds.iter().all(|&n| n > 0),
            "every kind is drawn: {kinds:?}"
        );
        let (_, other) = make(10, 0, &corpus);
        assert_ne!(make(9, 0, &corpus).1.text(), other.text());
    }
}
