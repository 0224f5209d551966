//! `image create`'s step progress on stderr: one indicatif spinner per step on a terminal (the
//! step's summary, then its latest output line; a finished step keeps one line with its time,
//! or `CACHED`), plain lines otherwise, nothing with `--progress quiet` or `-q`.
//!
//! The plain form is a contract that scripts and tests read:
//! `#N/TOTAL [CACHED ]INSTRUCTION` when a step starts (or is found in the cache), and
//! `#N | LINE` / `#N ! LINE` for each stdout / stderr line of a RUN step.

use crate::build::executor::Stream;
use crate::build::run::Event;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How progress is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Spinners (stderr is a terminal).
    Bars,
    /// One line per event.
    Plain,
    /// Nothing.
    Quiet,
}

impl Mode {
    /// The mode for `--progress`: `auto` and `tty` draw bars when stderr is a terminal (bars
    /// on a pipe or file would be escape codes; `tty` falls back to plain lines there).
    pub fn choose(flag: super::create::ProgressFlag, quiet: bool) -> Mode {
        use super::create::ProgressFlag;
        match flag {
            _ if quiet => Mode::Quiet,
            ProgressFlag::Quiet => Mode::Quiet,
            ProgressFlag::Plain => Mode::Plain,
            ProgressFlag::Auto | ProgressFlag::Tty if std::io::stderr().is_terminal() => Mode::Bars,
            ProgressFlag::Auto | ProgressFlag::Tty => Mode::Plain,
        }
    }
}

/// The step currently drawn as a spinner.
struct Running {
    bar: ProgressBar,
    /// `#N/TOTAL`.
    label: String,
    instruction: String,
    started: Instant,
}

/// Renders build [`Event`]s.
pub struct StepProgress {
    mode: Mode,
    multi: Option<MultiProgress>,
    running: Option<Running>,
}

/// Output lines longer than this are cut in the spinner (the terminal width cuts too).
const MAX_LINE: usize = 200;

/// A running step: spinner, `#N/TOTAL INSTRUCTION`, time; below it the latest output line.
const RUNNING: &str = "{spinner:.cyan} {prefix} {elapsed:.dim}\n    {wide_msg:.dim}";
/// A finished or cached step: one line.
const DONE: &str = "  {prefix} {wide_msg}";

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

impl StepProgress {
    /// Progress in `mode`.
    pub fn new(mode: Mode) -> StepProgress {
        let multi = (mode == Mode::Bars)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        StepProgress {
            mode,
            multi,
            running: None,
        }
    }

    /// Shows one event.
    pub fn event(&mut self, e: Event<'_>) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Plain => plain(e),
            Mode::Bars => self.bar(e),
        }
    }

    fn bar(&mut self, e: Event<'_>) {
        let Some(multi) = self.multi.clone() else {
            return;
        };
        match e {
            Event::Step {
                number,
                total,
                instruction,
                cached,
            } => {
                self.finish_running();
                let bar = multi.add(ProgressBar::new_spinner());
                if cached {
                    bar.set_style(style(DONE));
                    bar.set_prefix(format!("#{number}/{total}"));
                    bar.finish_with_message(format!("CACHED {instruction}"));
                } else {
                    // The summary is the prefix; the message, on the line below, is the
                    // step's latest output.
                    bar.set_style(style(RUNNING));
                    bar.set_prefix(format!("#{number}/{total} {instruction}"));
                    bar.enable_steady_tick(Duration::from_millis(100));
                    self.running = Some(Running {
                        bar,
                        label: format!("#{number}/{total}"),
                        instruction: instruction.to_string(),
                        started: Instant::now(),
                    });
                }
            }
            Event::Output { stream, line, .. } => {
                if let Some(r) = &self.running {
                    let mut shown: String = line.chars().take(MAX_LINE).collect();
                    if stream == Stream::Stderr {
                        shown.insert_str(0, "! ");
                    }
                    r.bar.set_message(shown);
                }
            }
        }
    }

    /// Leaves the running step as one finished line with its time.
    fn finish_running(&mut self) {
        if let Some(r) = self.running.take() {
            r.bar.set_style(style(DONE));
            r.bar.set_prefix(r.label);
            r.bar.finish_with_message(format!(
                "{} ({:.1}s)",
                r.instruction,
                r.started.elapsed().as_secs_f64()
            ));
        }
    }

    /// Ends the display (the build finished or failed): a running step stays as a line.
    pub fn finish(&mut self) {
        self.finish_running();
        // Finished bars stay on the screen as their last lines.
        self.multi = None;
    }
}

impl Drop for StepProgress {
    fn drop(&mut self) {
        self.finish();
    }
}

fn plain(e: Event<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = match e {
        Event::Step {
            number,
            total,
            instruction,
            cached,
        } => writeln!(
            err,
            "#{number}/{total} {}{instruction}",
            if cached { "CACHED " } else { "" }
        ),
        Event::Output {
            number,
            stream,
            line,
        } => writeln!(
            err,
            "#{number} {}{line}",
            if stream == Stream::Stderr { "! " } else { "| " }
        ),
    };
}
