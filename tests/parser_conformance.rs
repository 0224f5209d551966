//! BuildKit's own parser test data, read in place from ../shared/conformance/buildkit.

mod common;

use kiln::frontend::dockerfile::{dump, parse};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn case_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("Dockerfile").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn read(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    String::from_utf8(bytes).expect("conformance data is UTF-8")
}

fn positive_dirs() -> Vec<PathBuf> {
    let root = common::conformance_dir();
    let mut dirs = case_dirs(&root.join("parser/testfiles"));
    assert_eq!(dirs.len(), 33, "BuildKit ships 33 positive parser cases");
    dirs.extend(case_dirs(&root.join("derived/parser-heredoc")));
    dirs.extend(case_dirs(&root.join("derived/parser-warnings")));
    dirs
}

#[test]
fn positive_cases_dump_byte_for_byte() {
    let mut failures = Vec::new();
    let dirs = positive_dirs();
    for dir in &dirs {
        let src = read(&dir.join("Dockerfile"));
        let expected = read(&dir.join("result"));
        match std::panic::catch_unwind(|| parse(&src)) {
            Ok(Ok(file)) => {
                let got = dump(&file);
                if got != expected {
                    failures.push(format!(
                        "{}:\n--- expected\n{expected}--- got\n{got}",
                        dir.display()
                    ));
                }
            }
            Ok(Err(e)) => failures.push(format!("{}: error {e}", dir.display())),
            Err(_) => failures.push(format!("{}: panicked", dir.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n")
    );
}

/// Line ranges, escape token, heredoc fields and warnings against the reference's ast.json.
#[test]
fn positive_cases_match_reference_spans_heredocs_and_warnings() {
    let root = common::conformance_dir();
    let mut checked = 0;
    let mut failures = Vec::new();
    for dir in positive_dirs() {
        let name = dir.file_name().expect("name").to_string_lossy().to_string();
        let json_path = if dir.join("ast.json").is_file() {
            dir.join("ast.json")
        } else {
            root.join("derived/ast/testfiles")
                .join(format!("{name}.json"))
        };
        let reference: Value =
            serde_json::from_str(&read(&json_path)).expect("reference ast.json parses");
        let file = parse(&read(&dir.join("Dockerfile"))).expect("parses");
        checked += 1;
        let mut check = |what: &str, got: Value, want: &Value| {
            if &got != want {
                failures.push(format!("{name}: {what}: got {got}, want {want}"));
            }
        };
        check(
            "start_line",
            file.start_line.into(),
            &reference["start_line"],
        );
        check("end_line", file.end_line.into(), &reference["end_line"]);
        check(
            "escape_token",
            file.escape.to_string().into(),
            &reference["escape_token"],
        );
        let children = reference["children"].as_array().expect("children");
        check(
            "instruction count",
            file.instructions.len().into(),
            &children.len().into(),
        );
        for (ins, want) in file.instructions.iter().zip(children) {
            check("start_line", ins.start_line.into(), &want["start_line"]);
            check("end_line", ins.end_line.into(), &want["end_line"]);
            let docs: Vec<Value> = ins
                .heredocs
                .iter()
                .map(|h| {
                    serde_json::json!({"name": h.name, "fd": h.fd, "expand": h.expand,
                        "chomp": h.chomp, "content": h.content})
                })
                .collect();
            let want_docs = want
                .get("heredocs")
                .cloned()
                .unwrap_or(Value::Array(vec![]));
            check("heredocs", Value::Array(docs), &want_docs);
        }
        let warnings: Vec<Value> = file
            .warnings
            .iter()
            .map(|w| serde_json::json!({"short": w.message, "line": w.line}))
            .collect();
        let want_warnings = reference
            .get("warnings")
            .cloned()
            .unwrap_or(Value::Array(vec![]));
        check("warnings", Value::Array(warnings), &want_warnings);
    }
    assert!(checked >= 36, "only {checked} reference files checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn negative_cases_are_errors_with_the_reference_location() {
    let root = common::conformance_dir();
    let dirs = case_dirs(&root.join("parser/testfiles-negative"));
    assert_eq!(dirs.len(), 4, "BuildKit ships 4 negative parser cases");
    for dir in dirs {
        let name = dir.file_name().expect("name").to_string_lossy().to_string();
        let src = read(&dir.join("Dockerfile"));
        let result = std::panic::catch_unwind(|| parse(&src)).expect("no panic");
        let err = result.expect_err(&format!("{name} must fail"));
        let reference: Value = serde_json::from_str(&read(
            &root
                .join("derived/ast/testfiles-negative")
                .join(format!("{name}.json")),
        ))
        .expect("reference json");
        assert_eq!(
            err.kind.to_string(),
            reference["error"].as_str().expect("error"),
            "{name}"
        );
        let line = reference["error_location_lines"][0][0]
            .as_u64()
            .expect("line");
        // BuildKit reports "no instructions" at the 0-based count of lines read.
        if line > 0 {
            assert_eq!(u64::from(err.start_line), line, "{name}");
        }
    }
}

#[test]
fn testfile_line_spans() {
    let root = common::conformance_dir();
    let file = parse(&read(&root.join("parser/testfile-line/Dockerfile"))).expect("parses");
    assert_eq!((file.start_line, file.end_line), (5, 31));
    let lines: Vec<(u32, u32)> = file
        .instructions
        .iter()
        .map(|i| (i.start_line, i.end_line))
        .collect();
    assert_eq!(lines, vec![(5, 5), (11, 12), (17, 31)]);
}
