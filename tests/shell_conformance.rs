//! Holds the shell-word expander (`kiln::frontend::dockerfile::shell`) to
//! BuildKit's lexer, using the reference data read in place:
//! `shell/envVarTest` (ProcessWord), `shell/wordsTest` (ProcessWords) and
//! `derived/shell/word-expansion.json` (ProcessWordWithMatches).
//! Every failure is collected and reported in one assertion.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use kiln::frontend::dockerfile::shell::{Lexer, ShellError};

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn report(file: &str, ran: usize, minimum: usize, failures: &[String]) {
    eprintln!("{file}: {} of {ran} cases passed", ran - failures.len());
    assert!(
        failures.is_empty(),
        "{file}: {} of {ran} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        ran > minimum,
        "{file}: only {ran} cases ran (expected more than {minimum}); is the data complete?"
    );
}

/// One `PLATFORM|INPUT|EXPECTED` line of `envVarTest`.
struct EnvVarCase {
    line: usize,
    platform: String,
    input: String,
    expected: String,
}

fn env_var_cases(text: &str) -> Vec<EnvVarCase> {
    let mut cases = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.starts_with('#') {
            continue;
        }
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        assert_eq!(
            fields.len(),
            3,
            "envVarTest line {}: expected 3 fields: {raw:?}",
            i + 1
        );
        cases.push(EnvVarCase {
            line: i + 1,
            platform: fields[0].trim().to_owned(),
            input: fields[1].trim().to_owned(),
            expected: fields[2].trim().to_owned(),
        });
    }
    cases
}

/// Runs the cases for one platform; returns (cases run, failures).
fn run_env_var_cases(cases: &[EnvVarCase], windows: bool) -> (usize, Vec<String>) {
    let env: Vec<(String, String)> = [
        ("PWD", "/home"),
        ("SHELL", "bash"),
        ("KOREAN", "한국어"),
        ("NULL", ""),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let lexer = Lexer::new('\\').case_insensitive_names(windows);
    let own = if windows { "W" } else { "U" };
    let mut ran = 0;
    let mut failures = Vec::new();
    for case in cases {
        assert!(
            matches!(case.platform.as_str(), "A" | "U" | "W"),
            "envVarTest line {}: bad platform {:?}",
            case.line,
            case.platform
        );
        if case.platform != "A" && case.platform != own {
            continue;
        }
        ran += 1;
        let got = lexer.process_word(&case.input, &env);
        let ok = match (&got, case.expected.as_str()) {
            (Err(_), "error") => true,
            (Ok(value), expected) => value == expected,
            (Err(_), _) => false,
        };
        if !ok {
            failures.push(format!(
                "  line {} [{}] {:?}: expected {:?}, got {:?}",
                case.line, case.platform, case.input, case.expected, got
            ));
        }
    }
    (ran, failures)
}

#[test]
fn env_var_test_unix() {
    let text = read(&common::conformance_dir().join("shell/envVarTest"));
    let (ran, failures) = run_env_var_cases(&env_var_cases(&text), false);
    report("shell/envVarTest (A+U)", ran, 200, &failures);
}

#[test]
fn env_var_test_windows_case_insensitive_names() {
    let text = read(&common::conformance_dir().join("shell/envVarTest"));
    let (ran, failures) = run_env_var_cases(&env_var_cases(&text), true);
    report("shell/envVarTest (A+W)", ran, 200, &failures);
}

#[test]
fn words_test() {
    let text = read(&common::conformance_dir().join("shell/wordsTest"));
    let lexer = Lexer::new('\\');
    let mut env: Vec<(String, String)> = Vec::new();
    let mut ran = 0;
    let mut failures = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(def) = line.strip_prefix("ENV ") {
            let def = def.trim_start_matches(' ');
            let (k, v) = def.split_once('=').unwrap_or((def, ""));
            env.push((k.to_owned(), v.to_owned()));
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        assert_eq!(
            fields.len(),
            2,
            "wordsTest line {}: expected exactly one '|': {line:?}",
            i + 1
        );
        let input = fields[0].trim();
        let expected: Vec<&str> = fields[1].trim_start_matches(' ').split(',').collect();
        ran += 1;
        let got = lexer.process_words(input, &env);
        let ok = match &got {
            Ok(words) => words == &expected,
            Err(_) => expected == ["error"],
        };
        if !ok {
            failures.push(format!(
                "  line {} {input:?}: expected {expected:?}, got {got:?}",
                i + 1
            ));
        }
    }
    report("shell/wordsTest", ran, 20, &failures);
}

fn string_set(case: &serde_json::Value, key: &str) -> Option<Vec<String>> {
    case.get(key).map(|v| {
        v.as_array()
            .unwrap_or_else(|| panic!("{key} must be an array"))
            .iter()
            .map(|s| s.as_str().expect("names are strings").to_owned())
            .collect()
    })
}

#[test]
fn word_expansion_json() {
    let path = common::conformance_dir().join("derived/shell/word-expansion.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&read(&path)).expect("word-expansion.json is a JSON list");
    let lexer = Lexer::new('\\');
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let input = case["input"].as_str().expect("input is a string");
        let env: BTreeMap<String, String> = case["env"]
            .as_object()
            .expect("env is an object")
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().expect("env values are strings").to_owned(),
                )
            })
            .collect();
        let label = format!("  case {i} {input:?} env {env:?}");
        let got = lexer.process_word_with_matches(input, &env);
        if case.get("error").and_then(|e| e.as_bool()) == Some(true) {
            match &got {
                Err(e) => {
                    let message = e.to_string();
                    if let Some(want) = case.get("error_contains").and_then(|v| v.as_str())
                        && !message.contains(want)
                    {
                        failures.push(format!(
                            "{label}: error {message:?} does not contain {want:?}"
                        ));
                    }
                }
                Ok(x) => failures.push(format!("{label}: expected an error, got {x:?}")),
            }
            continue;
        }
        let expected = case["expected"].as_str().expect("expected is a string");
        let expansion = match got {
            Ok(x) => x,
            Err(e) => {
                failures.push(format!("{label}: expected {expected:?}, got error {e}"));
                continue;
            }
        };
        if expansion.value != expected {
            failures.push(format!(
                "{label}: expected {expected:?}, got {:?}",
                expansion.value
            ));
        }
        for (key, got) in [
            ("matched", &expansion.matched),
            ("unmatched", &expansion.unmatched),
        ] {
            if let Some(want) = string_set(case, key) {
                let got: Vec<String> = got.iter().cloned().collect();
                if got != want {
                    failures.push(format!("{label}: {key} expected {want:?}, got {got:?}"));
                }
            }
        }
    }
    report(
        "derived/shell/word-expansion.json",
        cases.len(),
        50,
        &failures,
    );
}

#[test]
fn shell_errors_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Lexer>();
    check::<ShellError>();
}
