//! Pathological Dockerfiles: huge lines, huge files, deep nesting. Each must parse (and lower)
//! or fail cleanly with an error: never panic, never overflow the stack. Only the shape of the
//! result is checked here; speed is measured by `cargo xtask bench parse`, not asserted.

use kiln::frontend::dockerfile::shell::Lexer;
use kiln::frontend::dockerfile::{Args, Dockerfile, ParseErrorKind, parse};
use kiln::frontend::{LowerOptions, Lowered, NoBaseImages, lower_dockerfile};
use kiln::ir::{Command, Op};
use std::fmt::Write as _;

/// Runs `f` on a thread with a 2 MiB stack, the default of a spawned Rust thread (and of a
/// tokio worker), so that recursion deep enough to overflow a library user's thread fails
/// here whatever `RUST_MIN_STACK` says.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .expect("spawn a test thread")
        .join()
        .expect("no panic")
}

fn parsed(src: &str) -> Dockerfile {
    parse(src).unwrap_or_else(|e| panic!("expected a parse, got: {e}"))
}

fn lowered(file: &Dockerfile) -> Lowered {
    lower_dockerfile(file, &LowerOptions::default(), &NoBaseImages)
        .unwrap_or_else(|e| panic!("expected lowering to succeed, got: {e}"))
}

fn text_arg(args: &Args) -> &str {
    match args {
        Args::Text(a) => &a.value,
        other => panic!("expected shell form, got {other:?}"),
    }
}

#[test]
fn a_one_megabyte_line_is_an_error_not_a_panic() {
    let src = format!("FROM scratch\nRUN echo {}\n", "a".repeat(1_000_000));
    let err = parse(&src).expect_err("BuildKit rejects lines over 65535 bytes");
    assert_eq!(err.kind, ParseErrorKind::LineTooLong);
    assert_eq!((err.start_line, err.end_line), (2, 2));
}

#[test]
fn the_line_limit_is_65535_bytes_without_the_newline() {
    let at_limit = format!("FROM scratch\nRUN {}\n", "a".repeat(65_535 - 4));
    let file = parsed(&at_limit);
    assert_eq!(text_arg(&file.instructions[1].args).len(), 65_535 - 4);
    // Whether the CR of a CRLF counts is BuildKit's call; either way, no panic.
    let crlf = format!("FROM scratch\nRUN {}\r\n", "a".repeat(65_535 - 4));
    let _ = parse(&crlf);
    let over = format!("FROM scratch\nRUN {}\n", "a".repeat(65_536 - 4));
    assert_eq!(
        parse(&over).expect_err("one byte over").kind,
        ParseErrorKind::LineTooLong
    );
}

#[test]
fn a_one_megabyte_line_of_continuations_without_newlines_is_an_error() {
    // Backslashes but no newline: still one physical line.
    let src = format!("FROM scratch\nRUN {}\n", "a \\".repeat(350_000));
    assert_eq!(
        parse(&src).expect_err("one physical line").kind,
        ParseErrorKind::LineTooLong
    );
}

#[test]
fn one_hundred_thousand_instruction_lines_parse_and_lower() {
    let mut src = String::from("FROM scratch\n");
    for i in 1..100_000 {
        let _ = writeln!(src, "RUN echo line {i}");
    }
    let file = parsed(&src);
    assert_eq!(file.instructions.len(), 100_000);
    assert_eq!(file.instructions[99_999].start_line, 100_000);
    assert_eq!(text_arg(&file.instructions[99_999].args), "echo line 99999");
    let l = lowered(&file);
    assert_eq!(l.spec.stages.len(), 1);
    assert_eq!(l.spec.stages[0].steps.len(), 99_999);
}

#[test]
fn a_continuation_chain_of_one_hundred_thousand_lines_is_one_instruction() {
    let mut src = String::from("FROM scratch\nRUN echo start \\\n");
    for i in 2..100_000 {
        let _ = writeln!(src, "  && echo {i} \\");
    }
    src.push_str("  && true\n");
    let file = parsed(&src);
    assert_eq!(file.instructions.len(), 2);
    let run = &file.instructions[1];
    assert_eq!((run.start_line, run.end_line), (2, 100_001));
    let script = text_arg(&run.args);
    assert!(
        script.starts_with("echo start   && echo 2 "),
        "{}",
        &script[..40]
    );
    assert!(script.ends_with("&& true"));
    assert_eq!(script.matches("&& echo").count(), 99_998);
    let l = lowered(&file);
    match &l.spec.stages[0].steps[..] {
        [Op::Run(r)] => match &r.command {
            Command::Shell { script, .. } => assert!(script.ends_with("&& true")),
            other => panic!("expected a shell command, got {other:?}"),
        },
        other => panic!("expected one RUN step, got {} steps", other.len()),
    }
}

#[test]
fn a_continuation_chain_with_comments_and_blank_lines_inside() {
    let mut src = String::from("FROM scratch\nRUN echo start \\\n");
    for i in 0..50_000 {
        let _ = write!(src, "# comment {i}\n\n  && echo {i} \\\n");
    }
    src.push_str("  && true\n");
    let file = parsed(&src);
    assert_eq!(file.instructions.len(), 2);
    assert_eq!(
        text_arg(&file.instructions[1].args)
            .matches("&& echo")
            .count(),
        50_000
    );
}

#[test]
fn five_thousand_heredocs_in_one_file() {
    let mut src = String::from("FROM scratch\n");
    for i in 0..5_000 {
        let _ = write!(src, "RUN <<EOF\necho heredoc {i}\nEOF\n");
    }
    let file = parsed(&src);
    assert_eq!(file.instructions.len(), 5_001);
    let heredocs: Vec<_> = file.instructions.iter().flat_map(|i| &i.heredocs).collect();
    assert_eq!(heredocs.len(), 5_000);
    assert_eq!(heredocs[4_999].content, "echo heredoc 4999\n");
    assert_eq!(lowered(&file).spec.stages[0].steps.len(), 5_000);
}

#[test]
fn five_thousand_heredocs_on_one_line() {
    let mut src = String::from("FROM scratch\nRUN cat");
    for i in 0..5_000 {
        let _ = write!(src, " <<H{i}");
    }
    src.push('\n');
    for i in 0..5_000 {
        let _ = write!(src, "body {i}\nH{i}\n");
    }
    let file = parsed(&src);
    let run = &file.instructions[1];
    assert_eq!(run.heredocs.len(), 5_000);
    assert_eq!(run.heredocs[1_234].name, "H1234");
    assert_eq!(run.heredocs[1_234].content, "body 1234\n");
    assert_eq!(run.end_line, 2 + 2 * 5_000);
    lowered(&file);
}

#[test]
fn an_unterminated_heredoc_at_the_end_of_a_large_file_is_an_error() {
    let mut src = String::from("FROM scratch\nRUN <<EOF\n");
    for i in 0..100_000 {
        let _ = writeln!(src, "line {i}");
    }
    let err = parse(&src).expect_err("no terminator");
    assert_eq!(err.kind, ParseErrorKind::UnterminatedHeredoc);
}

fn nested_default(depth: usize) -> String {
    let mut v = String::with_capacity(depth * 6 + 1);
    for _ in 0..depth {
        v.push_str("${a:-");
    }
    v.push('x');
    v.push_str(&"}".repeat(depth));
    v
}

#[test]
fn ten_thousand_nested_default_expansions_in_env_are_a_value_or_an_error() {
    let outcome = on_small_stack(|| {
        let src = format!("FROM scratch\nENV b={}\n", nested_default(10_000));
        let file = parse(&src).map_err(|e| format!("parse: {e}"))?;
        let l = lower_dockerfile(&file, &LowerOptions::default(), &NoBaseImages)
            .map_err(|e| format!("lower: {e}"))?;
        Ok::<_, String>(l.spec.stages[0].config.env.clone())
    });
    match outcome {
        // `a` is unset, so every level falls back to its default: the value is `x`.
        Ok(env) => assert!(env.contains(&"b=x".to_string()), "{env:?}"),
        Err(e) => assert!(!e.is_empty()),
    }
}

#[test]
fn ten_thousand_nested_default_expansions_in_the_lexer_are_a_value_or_an_error() {
    let outcome = on_small_stack(|| {
        let env: Vec<(String, String)> = Vec::new();
        Lexer::new('\\')
            .process_word(&nested_default(10_000), &env)
            .map_err(|e| e.to_string())
    });
    if let Ok(v) = outcome {
        assert_eq!(v, "x");
    }
}

/// `CMD` and `depth` `[`s then `]`s, split over continuation lines to stay under the line limit.
fn deep_json_cmd(depth: usize) -> String {
    let mut src = String::from("FROM scratch\nCMD ");
    for (i, c) in std::iter::repeat_n('[', depth)
        .chain(std::iter::repeat_n(']', depth))
        .enumerate()
    {
        src.push(c);
        if i % 10_000 == 9_999 {
            src.push_str("\\\n");
        }
    }
    src.push('\n');
    src
}

#[test]
fn a_two_hundred_thousand_deep_json_array_in_cmd_falls_back_to_shell_form() {
    // Go's encoding/json stops at 10,000 levels, so BuildKit reads this as shell form.
    let src = deep_json_cmd(200_000);
    let file = on_small_stack(move || parse(&src).map_err(|e| e.to_string()));
    let file = file.expect("parses");
    let cmd = &file.instructions[1];
    assert_eq!(text_arg(&cmd.args).len(), 400_000);
    let l = on_small_stack(move || {
        lower_dockerfile(&file, &LowerOptions::default(), &NoBaseImages).map(|l| l.spec)
    });
    let cmd = l.expect("lowers").stages[0]
        .config
        .cmd
        .clone()
        .expect("CMD set");
    assert_eq!(cmd.len(), 3, "shell form: /bin/sh -c TEXT");
}

#[test]
fn a_deep_json_array_within_go_s_depth_limit_is_not_strings() {
    let src = deep_json_cmd(5_000);
    let err = on_small_stack(move || parse(&src).map(|_| ()).map_err(|e| e.kind));
    assert_eq!(err, Err(ParseErrorKind::JsonNotStrings));
}

#[test]
fn a_two_hundred_thousand_deep_json_array_on_one_line_is_too_long() {
    let src = format!(
        "FROM scratch\nCMD {}{}\n",
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    assert_eq!(
        parse(&src).expect_err("one 400 KB line").kind,
        ParseErrorKind::LineTooLong
    );
}
