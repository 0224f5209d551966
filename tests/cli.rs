//! The real `kiln` binary: stdout, stderr and exit codes, snapshotted (CLI.md's contract).

mod common;

use std::path::Path;
use std::process::Command;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn kiln(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILN_LOG")
        .env("NO_COLOR", "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("kiln runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit: {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

#[test]
fn dockerfile_ast_matches_buildkit_dump_for_every_positive_case() {
    let root = common::conformance_dir().join("parser/testfiles");
    let mut n = 0;
    for entry in std::fs::read_dir(&root).expect("testfiles") {
        let dir = entry.expect("entry").path();
        let file = dir.join("Dockerfile");
        let r = kiln(&["dockerfile", "ast", file.to_str().expect("utf-8 path")]);
        let want = std::fs::read_to_string(dir.join("result")).expect("result");
        assert_eq!(r.code, 0, "{}: {r}", dir.display());
        assert_eq!(r.stdout, want, "{}", dir.display());
        n += 1;
    }
    assert_eq!(n, 33);
}

#[test]
fn dockerfile_ast_exits_2_with_a_located_error_on_negative_cases() {
    let root = common::conformance_dir().join("parser/testfiles-negative");
    for entry in std::fs::read_dir(&root).expect("testfiles-negative") {
        let dir = entry.expect("entry").path();
        let file = dir.join("Dockerfile");
        let r = kiln(&["dockerfile", "ast", file.to_str().expect("utf-8 path")]);
        assert_eq!(r.code, 2, "{}: {r}", dir.display());
        assert!(r.stdout.is_empty(), "{r}");
        assert!(
            r.stderr.contains("Dockerfile:"),
            "{}: no location in {r}",
            dir.display()
        );
    }
}

fn masked(r: Run) -> String {
    r.to_string().replace(env!("CARGO_MANIFEST_DIR"), "[repo]")
}

#[test]
fn lower_multistage_with_target_and_build_arg() {
    let r = kiln(&[
        "lower",
        "examples/multistage",
        "--target",
        "test",
        "--build-arg",
        "DEBIAN=bookworm",
        "--output",
        "json",
    ]);
    assert_eq!(r.code, 0, "{r}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let names: Vec<&str> = v["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(names, ["build", "test"], "the final stage is pruned");
    insta::assert_snapshot!(masked(r));
}

#[test]
fn lower_prints_lints_and_unused_build_args_on_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("Dockerfile");
    std::fs::write(
        &file,
        "FROM kiln/busybox as Build\nMAINTAINER me\nCMD echo hi\n",
    )
    .expect("write");
    let r = kiln(&[
        "lower",
        file.to_str().expect("path"),
        "--build-arg",
        "NOPE=1",
    ]);
    assert_eq!(r.code, 0, "{r}");
    insta::assert_snapshot!(
        r.stderr
            .replace(file.to_str().expect("path"), "[Dockerfile]")
    );
}

#[test]
fn lower_error_in_json_mode_is_an_error_object_on_stdout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("Dockerfile");
    std::fs::write(&file, "FROM kiln/busybox\nRUNN echo\n").expect("write");
    let r = kiln(&["lower", file.to_str().expect("path"), "--json"]);
    assert_eq!(r.code, 2, "{r}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json error");
    assert_eq!(v["error"]["code"], "bad_input");
    assert_eq!(
        v["error"]["message"],
        "unknown instruction: RUNN (did you mean RUN?)"
    );
    assert_eq!(v["error"]["hint"], "did you mean `RUN`?");
    insta::assert_snapshot!(
        r.stderr
            .replace(file.to_str().expect("path"), "[Dockerfile]")
    );
}

#[test]
fn lower_sdk_json_matches_its_dockerfile_twin() {
    let twin = Path::new("testdata/sdk/busybox-tools");
    let a = kiln(&["lower", twin.join("Dockerfile").to_str().expect("path")]);
    let b = kiln(&[
        "lower",
        "--sdk-json",
        twin.join("image.json").to_str().expect("path"),
    ]);
    assert_eq!((a.code, b.code), (0, 0), "{a}\n{b}");
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn unreadable_dockerfile_is_bad_input() {
    let r = kiln(&["lower", "/nonexistent/Dockerfile"]);
    assert_eq!(r.code, 2, "{r}");
    insta::assert_snapshot!(masked(r));
}

#[test]
fn bad_sdk_json_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("image.json");
    std::fs::write(
        &file,
        r#"{"base_image": "kiln/busybox", "operations": [{"op": "RUN", "args": ["true"]}, {"op": "COPY", "args": ["a", "/b"], "options": {"chmode": "755"}}]}"#,
    )
    .expect("write");
    let r = kiln(&[
        "lower",
        "--sdk-json",
        file.to_str().expect("path"),
        "--json",
    ]);
    assert_eq!(r.code, 2, "{r}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json error");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("operations[1]") && msg.contains("chmode"),
        "{msg}"
    );
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    assert_eq!(kiln(&["lower"]).code, 2);
    assert_eq!(kiln(&["frobnicate"]).code, 2);
    let help = kiln(&["--help"]);
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("lower"), "{help}");
}
