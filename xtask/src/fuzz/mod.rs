//! `cargo xtask fuzz`: a deterministic fuzzer over Kiln's front end — Dockerfile parse, dump
//! and lower, the SDK JSON path and the shell lexer.
//!
//! Input `i` is a pure function of `(seed, i)`, so any failure replays with
//! `--seed S --start i --iterations 1`. A panic, a broken span invariant, or an input slower
//! than [`TIME_LIMIT`] is a failure, printed with its input as a Rust string literal.
//!
//! This process supervises: the inputs run in a worker process (this binary with `--worker`),
//! so that an abort `catch_unwind` cannot stop (stack overflow, out of memory) is still traced
//! to its input, by re-running the last block of inputs with `--trace`. The run stops at the
//! first failure, or with `--keep-going` restarts after it and reports every distinct failure
//! at the end.

mod input;
mod worker;

use crate::corpus::{self, CorpusFile};
use input::{KINDS, Kind, Outcome};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// One input slower than this is reported as a likely super-linear case.
pub const TIME_LIMIT: Duration = Duration::from_secs(2);

/// The worker reports progress to the supervisor every this many inputs.
const CHECKPOINT_EVERY: u64 = 1024;

/// Exit codes of the worker for failures it reported itself.
const EXIT_FAILURE: u8 = 1;
const EXIT_TIMEOUT: u8 = 2;

/// Arguments of `cargo xtask fuzz`.
#[derive(clap::Args, Debug, Clone)]
pub struct FuzzArgs {
    /// Number of inputs to run.
    #[arg(long, default_value_t = 1_000_000, conflicts_with = "smoke")]
    pub iterations: u64,
    /// Seed of the run (every input is derived from it and its index).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Index of the first input (to replay one: `--start I --iterations 1`).
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// CI mode: 20,000 inputs.
    #[arg(long)]
    pub smoke: bool,
    /// After a failure, go on with the next input; report every distinct failure at the end
    /// (the exit status is still non-zero).
    #[arg(long)]
    pub keep_going: bool,
    /// Print every input and what became of it (to tune the generators; use few iterations).
    #[arg(long)]
    pub show: bool,
    /// Run the inputs in this process (used by the supervisor).
    #[arg(long, hide = true)]
    pub worker: bool,
    /// Print each input's index before running it (used to find an abort).
    #[arg(long, hide = true)]
    pub trace: bool,
    /// Inputs not to run (ones that aborted the worker).
    #[arg(long, hide = true)]
    pub skip: Vec<u64>,
    /// Failure signatures already reported (get a one-line report, no minimizing).
    #[arg(long, hide = true)]
    pub seen: Vec<String>,
    /// Dockerfile variants not to run (ones that timed out again and again).
    #[arg(long, hide = true)]
    pub skip_variant: Vec<String>,
    /// Self-test: `panic@I`, `hang@I` or `overflow@I` replaces input I with that fault.
    #[arg(long, hide = true)]
    pub inject: Option<String>,
    /// The end of the whole run, for progress lines.
    #[arg(long, hide = true)]
    pub end: Option<u64>,
}

impl FuzzArgs {
    fn count(&self) -> u64 {
        if self.smoke { 20_000 } else { self.iterations }
    }
}

/// What the inputs of one kind did.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tally {
    inputs: u64,
    bytes: u64,
    first_ok: u64,
    second_ok: u64,
    second_run: u64,
    nanos: u64,
    max_nanos: u64,
    /// Inputs not run: their variant had timed out [`SKIP_AFTER`] times (`--keep-going`).
    skipped: u64,
}

/// With `--keep-going`, a Dockerfile variant that timed out this often is not run again.
const SKIP_AFTER: usize = 3;

impl Tally {
    fn add(&mut self, input: &input::Input, elapsed: Duration, outcome: Option<&Outcome>) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.inputs += 1;
        self.bytes += input.len() as u64;
        self.nanos = self.nanos.saturating_add(nanos);
        self.max_nanos = self.max_nanos.max(nanos);
        if let Some(&(first, second)) = outcome {
            self.first_ok += u64::from(first);
            if let Some(s) = second {
                self.second_run += 1;
                self.second_ok += u64::from(s);
            }
        }
    }

    fn merge(&mut self, o: &Tally) {
        self.inputs += o.inputs;
        self.bytes += o.bytes;
        self.first_ok += o.first_ok;
        self.second_ok += o.second_ok;
        self.second_run += o.second_run;
        self.nanos = self.nanos.saturating_add(o.nanos);
        self.max_nanos = self.max_nanos.max(o.max_nanos);
        self.skipped += o.skipped;
    }

    /// `@tally KIND inputs bytes first_ok second_ok second_run nanos max_nanos skipped`.
    fn to_line(self, kind: usize) -> String {
        format!(
            "@tally {kind} {} {} {} {} {} {} {} {}",
            self.inputs,
            self.bytes,
            self.first_ok,
            self.second_ok,
            self.second_run,
            self.nanos,
            self.max_nanos,
            self.skipped
        )
    }

    fn from_line(rest: &str) -> Option<(usize, Tally)> {
        let v: Vec<u64> = rest
            .split(' ')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let [
            kind,
            inputs,
            bytes,
            first_ok,
            second_ok,
            second_run,
            nanos,
            max_nanos,
            skipped,
        ] = v[..]
        else {
            return None;
        };
        let kind = usize::try_from(kind).ok().filter(|&k| k < KINDS.len())?;
        Some((
            kind,
            Tally {
                inputs,
                bytes,
                first_ok,
                second_ok,
                second_run,
                nanos,
                max_nanos,
                skipped,
            },
        ))
    }
}

/// `cargo xtask fuzz`.
pub fn main(args: FuzzArgs) -> ExitCode {
    let corpus = match corpus::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.worker {
        worker::main(&args, corpus)
    } else {
        supervise(&args, &corpus)
    }
}

/// A failure the supervisor learnt of.
struct Found {
    index: u64,
    what: String,
    signature: String,
    /// The Dockerfile variant of the input, or "".
    variant: String,
}

/// What one worker process did.
struct Segment {
    status: ExitStatus,
    /// Tallies of the inputs before `checkpoint` (or of all, after a clean exit).
    tallies: [Tally; KINDS.len()],
    checkpoint: u64,
    failed: Option<Found>,
}

/// What the supervisor tells each worker it starts.
#[derive(Default)]
struct Known {
    /// Signatures reported already.
    seen: BTreeSet<String>,
    /// Inputs that abort the worker.
    skip: Vec<u64>,
    /// Variants that timed out [`SKIP_AFTER`] times (with `--keep-going`).
    skip_variants: BTreeSet<String>,
}

fn worker_command(args: &FuzzArgs, start: u64, end: u64, known: &Known) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| "xtask".into());
    let mut cmd = Command::new(exe);
    cmd.args(["fuzz", "--worker"])
        .args(["--seed", &args.seed.to_string()])
        .args(["--start", &start.to_string()])
        .args(["--iterations", &(end - start).to_string()])
        .args(["--end", &args.end.unwrap_or(end).to_string()]);
    for s in &known.seen {
        cmd.arg(format!("--seen={s}"));
    }
    for s in &known.skip {
        cmd.arg(format!("--skip={s}"));
    }
    for v in &known.skip_variants {
        cmd.arg(format!("--skip-variant={v}"));
    }
    if args.show {
        cmd.arg("--show");
    }
    if let Some(i) = &args.inject {
        cmd.arg(format!("--inject={i}"));
    }
    cmd
}

/// Runs one worker, forwarding its reports and output, and collects its tallies.
fn run_segment(cmd: &mut Command, start: u64) -> std::io::Result<Segment> {
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let mut tallies = [Tally::default(); KINDS.len()];
    let mut checkpoint = start;
    let mut failed = None;
    let mut in_report = false;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if in_report {
                if line == "@end-report" {
                    in_report = false;
                } else {
                    eprintln!("{line}");
                }
            } else if let Some(rest) = line.strip_prefix("@tally ") {
                if let Some((k, t)) = Tally::from_line(rest) {
                    tallies[k] = t;
                }
            } else if let Some(n) = line.strip_prefix("@checkpoint ") {
                checkpoint = n.parse().unwrap_or(checkpoint);
            } else if let Some(rest) = line.strip_prefix("@failed ") {
                let mut fields = rest.split('\t');
                let head = fields.next().unwrap_or_default();
                let (signature, variant) = (fields.next(), fields.next());
                let (index, what) = head.split_once(' ').unwrap_or((head, ""));
                failed = index.parse().ok().map(|index| Found {
                    index,
                    what: what.to_string(),
                    signature: signature.unwrap_or_default().to_string(),
                    variant: variant.unwrap_or_default().to_string(),
                });
            } else if line == "@report" {
                in_report = true;
            } else {
                println!("{line}");
            }
        }
    }
    let status = child.wait()?;
    Ok(Segment {
        status,
        tallies,
        checkpoint,
        failed,
    })
}

/// After a worker died, re-runs inputs `from..` with tracing to find the one that killed it.
fn find_abort(
    args: &FuzzArgs,
    corpus: &[CorpusFile],
    from: u64,
    end: u64,
    known: &Known,
) -> Option<Found> {
    let to = end.min(from + CHECKPOINT_EVERY);
    let mut cmd = worker_command(args, from, to, known);
    cmd.arg("--trace");
    let traced = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&traced.stdout);
    let culprit = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("@at "))
        .filter_map(|n| n.parse::<u64>().ok())
        .next_back();
    let stderr = String::from_utf8_lossy(&traced.stderr);
    let Some(index) = culprit.filter(|_| !traced.status.success()) else {
        eprintln!(
            "fuzz: re-running inputs #{from}..#{to} did not reproduce the abort ({}); \
             stderr:\n{stderr}",
            traced.status
        );
        return None;
    };
    let (kind, input) = input::make(args.seed, index, corpus);
    let tail: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
    let why = format!("the process died ({}): {tail}", traced.status);
    let what = "abort (stack overflow, out of memory or abort: not catchable)";
    eprint!(
        "{}",
        worker::report(what, args.seed, index, kind, &input, &why, None)
    );
    Some(Found {
        index,
        what: what.into(),
        signature: format!("abort in {}: {tail}", kind.name())
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect(),
        variant: input.variant().to_string(),
    })
}

/// Runs the whole range in worker processes and prints the summary.
fn supervise(args: &FuzzArgs, corpus: &[CorpusFile]) -> ExitCode {
    let end = args.start + args.count();
    let t0 = Instant::now();
    let mut start = args.start;
    let mut known = Known::default();
    let mut found: Vec<Found> = Vec::new();
    let mut totals = [Tally::default(); KINDS.len()];
    let mut complete = true;
    while start < end {
        let mut cmd = worker_command(args, start, end, &known);
        let seg = match run_segment(&mut cmd, start) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: running the fuzz worker: {e}");
                return ExitCode::FAILURE;
            }
        };
        for (t, s) in totals.iter_mut().zip(&seg.tallies) {
            t.merge(s);
        }
        let next = match (seg.status.code(), seg.failed) {
            (Some(0), _) => end,
            (Some(c), Some(f)) if c == i32::from(EXIT_FAILURE) || c == i32::from(EXIT_TIMEOUT) => {
                let next = f.index + 1;
                known.seen.insert(f.signature.clone());
                let timeouts = found
                    .iter()
                    .filter(|o| o.what == "timeout" && o.variant == f.variant)
                    .count();
                if f.what == "timeout" && !f.variant.is_empty() && timeouts + 1 >= SKIP_AFTER {
                    eprintln!(
                        "fuzz: variant {:?} timed out {SKIP_AFTER} times; skipping it from now on",
                        f.variant
                    );
                    known.skip_variants.insert(f.variant.clone());
                }
                found.push(f);
                next
            }
            (_, _) => {
                eprintln!(
                    "\nfuzz: the worker died ({}) after input #{}; re-running that block with \
                     tracing to find the input",
                    seg.status, seg.checkpoint
                );
                let Some(f) = find_abort(args, corpus, seg.checkpoint, end, &known) else {
                    complete = false;
                    break;
                };
                known.skip.push(f.index);
                known.seen.insert(f.signature.clone());
                found.push(f);
                // The inputs since the checkpoint run again (their tallies were lost).
                seg.checkpoint
            }
        };
        if !found.is_empty() && !args.keep_going {
            complete = next >= end;
            break;
        }
        start = next;
    }
    print_summary(args, t0.elapsed(), &totals, &found, complete);
    if !known.skip_variants.is_empty() {
        let skipped: u64 = totals.iter().map(|t| t.skipped).sum();
        println!(
            "skipped {skipped} input(s) of variants that kept timing out: {:?}",
            known.skip_variants
        );
    }
    if found.is_empty() && complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_summary(
    args: &FuzzArgs,
    elapsed: Duration,
    tallies: &[Tally],
    found: &[Found],
    complete: bool,
) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let inputs: u64 = tallies.iter().map(|t| t.inputs).sum();
    let bytes: u64 = tallies.iter().map(|t| t.bytes).sum();
    println!(
        "\nfuzz: {inputs} inputs ({} requested from #{}, seed {}) in {secs:.1} s: {:.0} inputs/s, \
         {:.1} MB/s{}",
        args.count(),
        args.start,
        args.seed,
        inputs as f64 / secs,
        bytes as f64 / secs / 1e6,
        if complete { "" } else { " (stopped early)" }
    );
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>16} {:>16} {:>9}",
        "kind", "inputs", "MB", "max ms", "1st step ok", "2nd step ok", "µs/input"
    );
    for (kind, t) in KINDS.iter().zip(tallies) {
        let per = t.nanos as f64 / t.inputs.max(1) as f64 / 1e3;
        println!(
            "{:<22} {:>9} {:>9.1} {:>9.1} {:>16} {:>16} {:>9.1}",
            Kind::name(*kind),
            t.inputs,
            t.bytes as f64 / 1e6,
            t.max_nanos as f64 / 1e6,
            format!("{}/{}", t.first_ok, t.inputs),
            format!("{}/{}", t.second_ok, t.second_run),
            per
        );
    }
    println!(
        "(1st step ok: parse / from_json / process_word succeeded; 2nd: lower / lower_sdk / \
         process_words succeeded; time includes dump and invariant checks)"
    );
    if found.is_empty() {
        println!(
            "no panics, no broken invariants, no aborts, no input over {} s",
            TIME_LIMIT.as_secs()
        );
        return;
    }
    let distinct: BTreeSet<&str> = found.iter().map(|f| f.signature.as_str()).collect();
    println!(
        "{} failure(s), {} distinct (replay one with --seed {} --start I --iterations 1):",
        found.len(),
        distinct.len(),
        args.seed
    );
    for sig in distinct {
        let of: Vec<&Found> = found.iter().filter(|f| f.signature == sig).collect();
        let first = of[0];
        let more = if of.len() > 1 {
            format!(" and {} more", of.len() - 1)
        } else {
            String::new()
        };
        println!("  {}: {sig} (input #{}{more})", first.what, first.index);
    }
}
