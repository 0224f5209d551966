//! Lowering golden tests: `testdata/lower/<case>/Dockerfile` (+ optional `args`, one
//! `--build-arg K=V` or `--target S` per line) → IR, lints and step origins, snapshotted with
//! insta as `expected.snap` beside the input; `testdata/lower-fail/<case>/` → the diagnostic
//! exactly as the CLI renders it (without colour).

use kiln::frontend::dockerfile::parse;
use kiln::frontend::{FrontendError, LowerOptions, NoBaseImages, lower_dockerfile};
use miette::{GraphicalReportHandler, GraphicalTheme, NamedSource, Report};
use std::path::{Path, PathBuf};

fn cases(kind: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(kind);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("read {}: {e}", root.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("Dockerfile").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 10, "too few cases in {}", root.display());
    dirs
}

fn options(dir: &Path) -> LowerOptions {
    let mut opts = LowerOptions::default();
    let Ok(args) = std::fs::read_to_string(dir.join("args")) else {
        return opts;
    };
    for line in args.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(kv) = line.strip_prefix("--build-arg ") {
            let (k, v) = kv.split_once('=').expect("K=V");
            opts.build_args.insert(k.into(), v.into());
        } else if let Some(t) = line.strip_prefix("--target ") {
            opts.target = Some(t.into());
        } else {
            panic!("{}: unknown args line {line:?}", dir.display());
        }
    }
    opts
}

fn render(e: FrontendError, src: &str) -> String {
    let report = Report::new(e).with_source_code(NamedSource::new("Dockerfile", src.to_string()));
    let mut out = String::new();
    GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor())
        .with_width(100)
        .render_report(&mut out, report.as_ref())
        .expect("renders");
    out
}

fn lower_file(dir: &Path) -> (String, Result<kiln::frontend::Lowered, FrontendError>) {
    let src = std::fs::read_to_string(dir.join("Dockerfile")).expect("Dockerfile");
    let result = parse(&src)
        .map_err(FrontendError::from)
        .and_then(|f| lower_dockerfile(&f, &options(dir), &NoBaseImages));
    (src, result)
}

#[test]
fn dockerfiles_lower_to_the_expected_ir() {
    for dir in cases("lower") {
        let name = dir.file_name().expect("name").to_string_lossy().to_string();
        let (src, result) = lower_file(&dir);
        let lowered = result.unwrap_or_else(|e| panic!("{name}:\n{}", render(e, &src)));
        let lints: Vec<serde_json::Value> = lowered
            .lints
            .iter()
            .map(|l| serde_json::json!({"rule": l.rule, "line": l.line, "message": l.message}))
            .collect();
        let value = serde_json::json!({
            "spec": lowered.spec,
            "origins": lowered.origins,
            "lints": lints,
            "unused_build_args": lowered.unused_build_args,
        });
        insta::with_settings!({snapshot_path => dir.clone(), prepend_module_to_snapshot => false,
                               input_file => dir.join("Dockerfile"), omit_expression => true}, {
            insta::assert_json_snapshot!("expected", value);
        });
    }
}

#[test]
fn bad_dockerfiles_fail_with_located_diagnostics() {
    for dir in cases("lower-fail") {
        let name = dir.file_name().expect("name").to_string_lossy().to_string();
        let (src, result) = std::panic::catch_unwind(|| lower_file(&dir))
            .unwrap_or_else(|_| panic!("{name}: panicked"));
        let Err(e) = result else {
            panic!("{name}: lowered, but must fail");
        };
        let rendered = render(e, &src);
        insta::with_settings!({snapshot_path => dir.clone(), prepend_module_to_snapshot => false,
                               input_file => dir.join("Dockerfile"), omit_expression => true}, {
            insta::assert_snapshot!("expected", rendered);
        });
    }
}
