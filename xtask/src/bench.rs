//! `cargo xtask bench parse`: Dockerfile parse and parse + lower throughput in MB/s
//! (10^6 bytes per second) on BuildKit's conformance corpus, a generated realistic 10 MB
//! Dockerfile and pathological inputs, as the median of several timed runs after a warm-up.
//!
//! Lowering uses `LowerOptions::default()` and `NoBaseImages`. Each file is parsed on its own,
//! as a user would; a run repeats its case's files until it has processed at least the target
//! size, so small inputs are timed over many calls.

use crate::{corpus, generate};
use kiln::frontend::dockerfile::parse;
use kiln::frontend::{LowerOptions, NoBaseImages, lower_dockerfile};
use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The throughput Kiln aims for, parse + lower.
const AIM_MB_S: f64 = 50.0;

/// Arguments of `cargo xtask bench parse`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchParseArgs {
    /// Timed runs per measurement (the median is reported; at least 5).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(5..))]
    pub runs: u32,
    /// Bytes each run processes, and the size of the realistic Dockerfile, in MB.
    #[arg(long, default_value_t = 10)]
    pub size_mb: usize,
    /// Only the inputs whose name contains this (`corpus`, `realistic`, `heredocs`, …).
    #[arg(long)]
    pub only: Option<String>,
}

struct Case {
    name: String,
    files: Vec<String>,
    /// How many times a run goes through `files`.
    reps: usize,
}

impl Case {
    fn new(name: impl Into<String>, files: Vec<String>, target: usize) -> Case {
        let bytes: usize = files.iter().map(String::len).sum();
        Case {
            name: name.into(),
            reps: target.div_ceil(bytes.max(1)).max(1),
            files,
        }
    }

    fn bytes_per_run(&self) -> usize {
        self.files.iter().map(String::len).sum::<usize>() * self.reps
    }
}

struct Measured {
    parse: Duration,
    full: Duration,
    parse_errors: usize,
    lower_errors: usize,
    first_error: Option<String>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn parse_pass(case: &Case) -> Duration {
    let t = Instant::now();
    for _ in 0..case.reps {
        for f in &case.files {
            black_box(parse(black_box(f)).ok());
        }
    }
    t.elapsed()
}

fn full_pass(case: &Case, opts: &LowerOptions) -> Duration {
    let t = Instant::now();
    for _ in 0..case.reps {
        for f in &case.files {
            if let Ok(file) = parse(black_box(f)) {
                black_box(lower_dockerfile(&file, opts, &NoBaseImages).ok());
            }
        }
    }
    t.elapsed()
}

fn measure(case: &Case, runs: u32) -> Measured {
    let opts = LowerOptions::default();
    // Warm-up, also counting what fails.
    let (mut parse_errors, mut lower_errors, mut first_error) = (0, 0, None);
    for f in &case.files {
        match parse(f) {
            Ok(file) => {
                if let Err(e) = lower_dockerfile(&file, &opts, &NoBaseImages) {
                    lower_errors += 1;
                    first_error.get_or_insert_with(|| format!("lower: {e}"));
                }
            }
            Err(e) => {
                parse_errors += 1;
                first_error.get_or_insert_with(|| format!("parse: {e}"));
            }
        }
    }
    parse_pass(case);
    full_pass(case, &opts);
    let parse = median((0..runs).map(|_| parse_pass(case)).collect());
    let full = median((0..runs).map(|_| full_pass(case, &opts)).collect());
    Measured {
        parse,
        full,
        parse_errors,
        lower_errors,
        first_error,
    }
}

fn mb_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

/// `cargo xtask bench parse`.
pub fn parse_main(args: BenchParseArgs) -> ExitCode {
    let corpus = match corpus::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target = args.size_mb * 1_000_000;
    let corpus_files: Vec<String> = corpus
        .iter()
        .map(|f| String::from_utf8_lossy(&f.bytes).into_owned())
        .collect();
    let n_corpus = corpus_files.len();
    let cases = [
        Case::new(
            format!("(a) conformance corpus ({n_corpus} files)"),
            corpus_files,
            target,
        ),
        Case::new(
            "(b) realistic, 20 stages",
            vec![generate::realistic(target)],
            target,
        ),
        Case::new(
            "(c) 100,000 lines",
            vec![generate::many_lines(100_000)],
            target,
        ),
        Case::new(
            "(c) continuation chain, 100,000 lines",
            vec![generate::continuation_chain(100_000)],
            target,
        ),
        Case::new(
            "(c) 5,000 heredocs",
            vec![generate::heredocs(5_000)],
            target,
        ),
    ];
    println!(
        "bench parse: median of {} runs after a warm-up; each run parses every file of a case \
         separately, repeated to >= {} MB; MB/s = 10^6 bytes/s; aim >= {AIM_MB_S} MB/s",
        args.runs, args.size_mb
    );
    println!(
        "{:<40} {:>9} {:>7} {:>12} {:>17} {:>10} {:>10}  aim",
        "input", "file MB", "calls", "parse MB/s", "parse+lower MB/s", "parse ms", "p+l ms"
    );
    let mut notes = Vec::new();
    let mut below = 0;
    let wanted = |c: &&Case| {
        args.only
            .as_ref()
            .is_none_or(|o| c.name.contains(o.as_str()))
    };
    for case in cases.iter().filter(wanted) {
        let m = measure(case, args.runs);
        let bytes = case.bytes_per_run();
        let file_mb = case.files.iter().map(String::len).sum::<usize>() as f64 / 1e6;
        let (parse_rate, full_rate) = (mb_s(bytes, m.parse), mb_s(bytes, m.full));
        let ok = parse_rate >= AIM_MB_S && full_rate >= AIM_MB_S;
        below += usize::from(!ok);
        println!(
            "{:<40} {:>9.2} {:>7} {:>12.1} {:>17.1} {:>10.1} {:>10.1}  {}",
            case.name,
            file_mb,
            case.files.len() * case.reps,
            parse_rate,
            full_rate,
            m.parse.as_secs_f64() * 1e3,
            m.full.as_secs_f64() * 1e3,
            if ok { "ok" } else { "BELOW" }
        );
        if let Some(e) = m.first_error {
            notes.push(format!(
                "{}: {} of {} files fail to parse, {} to lower (timed anyway); first: {e}",
                case.name,
                m.parse_errors,
                case.files.len(),
                m.lower_errors
            ));
        }
    }
    for n in notes {
        println!("note: {n}");
    }
    if below == 0 {
        println!("all inputs meet the aim of {AIM_MB_S} MB/s (parse and parse+lower)");
    } else {
        println!("{below} input(s) below the aim of {AIM_MB_S} MB/s");
    }
    ExitCode::SUCCESS
}
