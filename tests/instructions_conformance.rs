//! BuildKit's instruction-level error cases (`derived/instructions/error-cases.json`): the
//! file parses, and typing its first instruction fails with the reference's message.

mod common;

use kiln::frontend::dockerfile::{ast::dump_instruction, parse};
use kiln::frontend::instructions::parse_instruction;
use serde_json::Value;

#[test]
fn instruction_error_cases_fail_with_buildkit_messages() {
    let path = common::conformance_dir().join("derived/instructions/error-cases.json");
    let text = std::fs::read_to_string(&path).expect("error-cases.json");
    let cases: Vec<Value> = serde_json::from_str(&text).expect("json");
    assert!(cases.len() >= 18, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().expect("name");
        let src = case["dockerfile"].as_str().expect("dockerfile");
        let want_dump = case["first_instruction_dump"].as_str().expect("dump");
        let want = case["error_contains"].as_str().expect("error_contains");
        let file = match parse(src) {
            Ok(f) => f,
            Err(e) => {
                failures.push(format!("{name}: parse failed: {e}"));
                continue;
            }
        };
        let first = &file.instructions[0];
        let dump = format!("({})", dump_instruction(first));
        if dump != want_dump {
            failures.push(format!("{name}: dump {dump} != {want_dump}"));
        }
        match parse_instruction(first) {
            Ok(_) => failures.push(format!("{name}: typed, but must fail with {want:?}")),
            Err(e) if !e.message.contains(want) => {
                failures.push(format!("{name}: {:?} does not contain {want:?}", e.message))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
