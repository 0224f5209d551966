//! The fuzz worker: runs a block of inputs in this process, each under `catch_unwind` with a
//! quiet panic hook (restored afterwards), while a watchdog thread stops the run when one
//! input passes the time limit. Failures are minimized (panics and broken invariants) and
//! reported on stdout, framed for the supervisor, together with the per-kind tallies.

use super::input::{self, Input, KINDS, Kind, Outcome, run as run_one};
use super::{CHECKPOINT_EVERY, EXIT_FAILURE, EXIT_TIMEOUT, FuzzArgs, TIME_LIMIT, Tally};
use crate::corpus::{self, CorpusFile};
use crate::generate::ShellCase;
use std::fmt::Write as _;
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Stack of the thread that runs inputs: a main thread's, so findings match the CLI.
const STACK: usize = 8 << 20;

/// Inputs larger than this are written to a file instead of the terminal.
const PRINT_LIMIT: usize = 8 * 1024;

/// How long the minimizer may take for one failure.
const MINIMIZE_FOR: Duration = Duration::from_secs(30);

/// The message of the last panic, from the quiet hook.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn quiet_hook(info: &std::panic::PanicHookInfo<'_>) {
    let msg = info.to_string();
    if let Ok(mut slot) = LAST_PANIC.lock() {
        *slot = Some(msg);
    }
}

/// A failure of one input.
enum Failure {
    Panic(String),
    Invariant(String),
}

impl Failure {
    fn message(&self) -> &str {
        match self {
            Failure::Panic(m) | Failure::Invariant(m) => m,
        }
    }

    /// What identifies "the same bug" while minimizing: the panic location or the invariant.
    fn signature(&self) -> String {
        match self {
            Failure::Panic(m) => m.lines().next().unwrap_or_default().to_string(),
            Failure::Invariant(m) => m.chars().filter(|c| !c.is_ascii_digit()).collect(),
        }
    }
}

/// Runs `input` under `catch_unwind` (the quiet hook must be installed).
fn guarded(input: &Input) -> Result<Outcome, Failure> {
    guarded_with(|| run_one(input))
}

fn guarded_with(f: impl FnOnce() -> Result<Outcome, String>) -> Result<Outcome, Failure> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(msg)) => Err(Failure::Invariant(msg)),
        Err(payload) => {
            let hooked = LAST_PANIC.lock().ok().and_then(|mut s| s.take());
            let msg = hooked.unwrap_or_else(|| {
                payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic with a non-string payload".into())
            });
            Err(Failure::Panic(msg))
        }
    }
}

/// A fault injected with `--inject KIND@INDEX` to test the fuzzer's own failure paths.
enum Fault {
    Panic,
    Hang,
    StackOverflow,
}

impl Fault {
    fn strike(&self) -> Result<Outcome, String> {
        match self {
            Fault::Panic => panic!("injected panic"),
            Fault::Hang => {
                std::thread::sleep(TIME_LIMIT * 2);
                Ok((true, None))
            }
            Fault::StackOverflow => {
                fn recurse(n: u64) -> u64 {
                    let pad = std::hint::black_box([n; 64]);
                    if n == u64::MAX {
                        return pad[0];
                    }
                    recurse(n + 1) + pad[1]
                }
                Ok((recurse(0) > 0, None))
            }
        }
    }
}

/// The fault `spec` (`panic@12`, `hang@12`, `overflow@12`) injects at `index`, if any.
fn injected(spec: &str, index: u64) -> Option<Fault> {
    let (kind, at) = spec.split_once('@')?;
    if at.parse::<u64>().ok()? != index {
        return None;
    }
    match kind {
        "panic" => Some(Fault::Panic),
        "hang" => Some(Fault::Hang),
        "overflow" => Some(Fault::StackOverflow),
        _ => None,
    }
}

/// Shared with the watchdog: the input running now, since when, and the tallies so far.
struct Shared {
    index: AtomicU64,
    /// Nanoseconds since `epoch` + 1 when the input started; 0 while idle.
    started: AtomicU64,
    epoch: Instant,
    tallies: Mutex<[Tally; KINDS.len()]>,
}

impl Shared {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Prints the tallies for the supervisor.
    fn emit_tallies(&self) {
        let tallies = self.tallies.lock().map(|t| *t).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        for (i, t) in tallies.iter().enumerate() {
            let _ = writeln!(out, "{}", t.to_line(i));
        }
    }
}

/// `cargo xtask fuzz --worker`.
pub fn main(args: &FuzzArgs, corpus: Vec<CorpusFile>) -> ExitCode {
    let corpus = Arc::new(corpus);
    let shared = Arc::new(Shared {
        index: AtomicU64::new(args.start),
        started: AtomicU64::new(0),
        epoch: Instant::now(),
        tallies: Mutex::new([Tally::default(); KINDS.len()]),
    });
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(quiet_hook));
    let fuzz = {
        let (corpus, shared, args) = (Arc::clone(&corpus), Arc::clone(&shared), args.clone());
        std::thread::Builder::new()
            .name("fuzz".into())
            .stack_size(STACK)
            .spawn(move || fuzz_loop(&args, &corpus, &shared))
    };
    let fuzz = match fuzz {
        Ok(h) => h,
        Err(e) => {
            std::panic::set_hook(previous_hook);
            eprintln!("error: cannot start the fuzz thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The watchdog: an input still running after TIME_LIMIT ends the run.
    while !fuzz.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        let started = shared.started.load(Ordering::SeqCst);
        if started == 0 {
            continue;
        }
        let index = shared.index.load(Ordering::SeqCst);
        let elapsed = Duration::from_nanos(shared.now().saturating_sub(started));
        if elapsed > TIME_LIMIT && shared.started.load(Ordering::SeqCst) == started {
            std::panic::set_hook(previous_hook);
            let (kind, input) = input::make(args.seed, index, &corpus);
            let why = format!(
                "still running after {:.1} s (limit {} s): likely super-linear time",
                elapsed.as_secs_f64(),
                TIME_LIMIT.as_secs()
            );
            let signature = timeout_signature(kind, &input);
            emit_failure(args, "timeout", index, kind, &input, &why, &signature, None);
            shared.emit_tallies();
            let _ = std::io::stdout().flush();
            std::process::exit(EXIT_TIMEOUT.into());
        }
    }
    let result = fuzz.join();
    std::panic::set_hook(previous_hook);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(_) => {
            eprintln!("error: the fuzz thread panicked outside an input");
            ExitCode::FAILURE
        }
    }
}

/// What groups timeouts: the kind and, for Dockerfiles, the variant.
pub fn timeout_signature(kind: Kind, input: &Input) -> String {
    match input.variant() {
        "" => format!("timeout in {}", kind.name()),
        v => format!("timeout in {} ({v})", kind.name()),
    }
}

fn fuzz_loop(args: &FuzzArgs, corpus: &[CorpusFile], shared: &Shared) -> u8 {
    let end = args.start + args.count();
    let t0 = Instant::now();
    let mut last_progress = Instant::now();
    let mut out = std::io::stdout();
    for index in args.start..end {
        if args.trace {
            let _ = writeln!(out, "@at {index}");
        } else if (index - args.start).is_multiple_of(CHECKPOINT_EVERY) {
            // Tallies of the inputs before `index`, then the checkpoint itself.
            shared.emit_tallies();
            let _ = writeln!(out, "@checkpoint {index}");
        }
        if args.skip.contains(&index) {
            continue;
        }
        let (kind, input) = input::make(args.seed, index, corpus);
        if args.skip_variant.iter().any(|v| v == input.variant()) {
            if let Ok(mut tallies) = shared.tallies.lock() {
                tallies[kind.index()].skipped += 1;
            }
            continue;
        }
        shared.index.store(index, Ordering::SeqCst);
        let t = Instant::now();
        shared.started.store(shared.now(), Ordering::SeqCst);
        let outcome = match args.inject.as_deref().and_then(|i| injected(i, index)) {
            Some(fault) => guarded_with(|| fault.strike()),
            None => guarded(&input),
        };
        let elapsed = t.elapsed();
        shared.started.store(0, Ordering::SeqCst);
        if args.show {
            input::show(index, kind, &input);
        }
        if let Ok(mut tallies) = shared.tallies.lock() {
            tallies[kind.index()].add(&input, elapsed, outcome.as_ref().ok());
        }
        if let Err(failure) = outcome {
            let (what, signature) = match &failure {
                Failure::Panic(_) => ("panic", failure.signature()),
                Failure::Invariant(_) => ("broken invariant", failure.signature()),
            };
            let known = args.seen.contains(&signature);
            let minimized = if known {
                None
            } else {
                minimize(&input, &signature)
            };
            emit_failure(
                args,
                what,
                index,
                kind,
                &input,
                failure.message(),
                &signature,
                minimized.as_ref(),
            );
            shared.emit_tallies();
            return EXIT_FAILURE;
        }
        if elapsed > TIME_LIMIT {
            let why = format!(
                "took {:.1} s (limit {} s): likely super-linear time",
                elapsed.as_secs_f64(),
                TIME_LIMIT.as_secs()
            );
            let signature = timeout_signature(kind, &input);
            emit_failure(args, "timeout", index, kind, &input, &why, &signature, None);
            shared.emit_tallies();
            return EXIT_TIMEOUT;
        }
        if last_progress.elapsed() > Duration::from_secs(15) {
            last_progress = Instant::now();
            let done = index + 1 - args.start;
            eprintln!(
                "fuzz: at input #{index} (run ends before #{}), {:.0} inputs/s",
                args.end.unwrap_or(end),
                done as f64 / t0.elapsed().as_secs_f64()
            );
        }
    }
    shared.emit_tallies();
    0
}

/// Shrinks a failing input while it fails the same way (a bounded ddmin over characters).
fn minimize(input: &Input, signature: &str) -> Option<String> {
    let (text, rebuild): (&str, Box<dyn Fn(String) -> Input>) = match input {
        Input::Dockerfile {
            text,
            opts,
            variant,
        } => {
            let (opts, variant) = (opts.clone(), *variant);
            (
                text,
                Box::new(move |t| Input::Dockerfile {
                    text: t,
                    opts: opts.clone(),
                    variant,
                }),
            )
        }
        Input::Sdk { text, opts } => {
            let opts = opts.clone();
            (
                text,
                Box::new(move |t| Input::Sdk {
                    text: t,
                    opts: opts.clone(),
                }),
            )
        }
        Input::Shell(c) => {
            let (env, escape, options) = (c.env.clone(), c.escape, c.options);
            (
                &c.word,
                Box::new(move |w| {
                    Input::Shell(ShellCase {
                        word: w,
                        env: env.clone(),
                        escape,
                        options,
                    })
                }),
            )
        }
    };
    let fails = |chars: &[char]| -> bool {
        let candidate = rebuild(chars.iter().collect());
        matches!(guarded(&candidate), Err(f) if f.signature() == signature)
    };
    let mut chars: Vec<char> = text.chars().collect();
    let deadline = Instant::now() + MINIMIZE_FOR;
    let mut chunk = chars.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        while i < chars.len() && Instant::now() < deadline {
            let end = (i + chunk).min(chars.len());
            let mut candidate = chars.clone();
            candidate.drain(i..end);
            if fails(&candidate) {
                chars = candidate;
            } else {
                i += chunk;
            }
        }
        if chunk == 1 || Instant::now() >= deadline {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    let min: String = chars.into_iter().collect();
    (min.len() < text.len()).then_some(min)
}

/// Prints a failure for the supervisor: `@failed`, then the report between `@report` and
/// `@end-report`. A failure whose signature the supervisor has seen gets a one-line report.
#[allow(clippy::too_many_arguments)]
fn emit_failure(
    args: &FuzzArgs,
    what: &str,
    index: u64,
    kind: Kind,
    input: &Input,
    message: &str,
    signature: &str,
    minimized: Option<&String>,
) {
    let text = if args.seen.iter().any(|s| s == signature) {
        format!(
            "fuzz: {what} on input #{index} ({}), same as an earlier failure: {}\n",
            kind.name(),
            message.lines().next().unwrap_or_default()
        )
    } else {
        report(what, args.seed, index, kind, input, message, minimized)
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "@failed {index} {what}\t{signature}\t{}",
        input.variant()
    );
    let _ = writeln!(out, "@report");
    let _ = write!(out, "{text}");
    let _ = writeln!(out, "@end-report");
    let _ = out.flush();
}

/// A failure with its input as a Rust string literal (or saved to a file, when it is large).
pub fn report(
    what: &str,
    seed: u64,
    index: u64,
    kind: Kind,
    input: &Input,
    message: &str,
    minimized: Option<&String>,
) -> String {
    let mut r = String::new();
    let variant = match input.variant() {
        "" => String::new(),
        v => format!(", {v}"),
    };
    let _ = writeln!(
        r,
        "\nFUZZ FAILURE: {what} on input #{index} ({}{variant})",
        kind.name()
    );
    let _ = writeln!(
        r,
        "replay: cargo xtask fuzz --seed {seed} --start {index} --iterations 1"
    );
    let _ = writeln!(r, "message: {message}");
    let label = match input {
        Input::Dockerfile { opts, .. } => {
            let _ = writeln!(r, "lower options: {opts:?}");
            "Dockerfile"
        }
        Input::Sdk { opts, .. } => {
            let _ = writeln!(r, "lower options: {opts:?}");
            "SDK JSON"
        }
        Input::Shell(c) => {
            let _ = writeln!(
                r,
                "lexer: Lexer::new({:?}), [raw_quotes, raw_escapes, skip_unset, \
                 case_insensitive_names] = {:?}\nenv: {:?}",
                c.escape, c.options, c.env
            );
            "word"
        }
    };
    let text = input.text();
    if text.len() <= PRINT_LIMIT {
        let _ = writeln!(
            r,
            "{label} ({} bytes, Rust string literal):\n{text:?}",
            text.len()
        );
    } else {
        let dir = corpus::workspace_root().join("target/fuzz-failures");
        let path = dir.join(format!("seed{seed}-input{index}.txt"));
        let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text));
        let head: String = text.chars().take(400).collect();
        let place = match saved {
            Ok(()) => format!("written to {}", path.display()),
            Err(e) => format!("not saved: {e}"),
        };
        let _ = writeln!(
            r,
            "{label} ({} bytes) {place}; it starts:\n{head:?}",
            text.len()
        );
    }
    if let Some(m) = minimized {
        let _ = writeln!(
            r,
            "minimized {label} ({} bytes, same failure):\n{m:?}",
            m.len()
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_caught_with_its_message_and_location() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(quiet_hook));
        let got = guarded_with(|| panic!("boom {}", 42));
        std::panic::set_hook(previous);
        let Err(Failure::Panic(msg)) = got else {
            panic!("expected a caught panic");
        };
        assert!(msg.contains("boom 42"), "{msg}");
        assert!(msg.contains("worker.rs"), "{msg}");
    }

    #[test]
    fn injected_faults_hit_only_their_index() {
        assert!(matches!(injected("panic@7", 7), Some(Fault::Panic)));
        assert!(injected("panic@7", 8).is_none());
        assert!(injected("bogus@7", 7).is_none());
    }
}
