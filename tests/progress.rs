//! `image create` progress: spinners on a terminal (a real pseudo-terminal from `script`),
//! the plain line format on a pipe (runs as root; the built-in busybox base).

use std::path::Path;
use std::process::Command;

const DOCKERFILE: &str = "FROM kiln/busybox\nRUN echo first-line && echo last-line-of-step\n";

fn context() -> tempfile::TempDir {
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(ctx.path().join("Dockerfile"), DOCKERFILE).expect("write");
    ctx
}

/// Runs `kiln image create` on a pseudo-terminal; returns the exit code and what the
/// terminal showed.
fn on_a_tty(home: &Path, ctx: &Path, extra: &str) -> (i32, String) {
    let cmd = format!(
        "{} --home {} image create {} -n progress-test --disk_mb 64 {extra}",
        env!("CARGO_BIN_EXE_kiln"),
        home.display(),
        ctx.display()
    );
    // bsdutils' `script` gives the command a pty; -e keeps its exit code.
    let out = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("script (bsdutils) runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_terminal_gets_spinners_with_the_step_and_its_output() {
    assert!(nix::unistd::geteuid().is_root(), "run as root (CI does)");
    let home = tempfile::tempdir().expect("home");
    let ctx = context();
    let (code, screen) = on_a_tty(home.path(), ctx.path(), "");
    assert_eq!(code, 0, "{screen}");
    // Drawn with cursor movement, not the plain `#N | line` format.
    assert!(screen.contains("\u{1b}["), "no escape codes: {screen:?}");
    assert!(
        !screen.contains("#1 | "),
        "plain lines on a tty: {screen:?}"
    );
    assert!(screen.contains("#1/1 RUN echo first-line"), "{screen:?}");
    // The finished step stays as one line with its time.
    let finished = screen
        .lines()
        .any(|l| l.contains("#1/1") && l.contains("RUN echo first-line") && l.contains("s)"));
    assert!(finished, "{screen:?}");
    assert!(screen.contains("registered progress-test"), "{screen:?}");
    // A rebuild shows the step as cached.
    let (code, screen) = on_a_tty(home.path(), ctx.path(), "");
    assert_eq!(code, 0, "{screen}");
    assert!(screen.contains("CACHED RUN echo first-line"), "{screen:?}");
    // --progress plain keeps lines even on a terminal.
    let (code, screen) = on_a_tty(home.path(), ctx.path(), "--no-cache --progress plain");
    assert_eq!(code, 0, "{screen}");
    assert!(screen.contains("#1 | last-line-of-step"), "{screen:?}");
}

#[test]
fn a_pipe_gets_the_plain_lines() {
    assert!(nix::unistd::geteuid().is_root(), "run as root (CI does)");
    let home = tempfile::tempdir().expect("home");
    let ctx = context();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(home.path())
        .args(["image", "create"])
        .arg(ctx.path())
        .args(["-n", "progress-test", "--disk_mb", "64"])
        .output()
        .expect("kiln runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains('\u{1b}'), "escape codes on a pipe: {err:?}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with('#')).collect();
    assert_eq!(
        lines,
        [
            "#1/1 RUN echo first-line && echo last-line-of-step",
            "#1 | first-line",
            "#1 | last-line-of-step",
        ],
        "{err}"
    );
}
