//! A Dockerfile and its SDK twin (`testdata/sdk/<case>/{Dockerfile,image.json}`) lower to
//! identical IR; the IR itself is snapshotted beside them.

use kiln::frontend::dockerfile::parse;
use kiln::frontend::sdk::{from_json, lower_sdk};
use kiln::frontend::{LowerOptions, NoBaseImages, lower_dockerfile};
use std::path::{Path, PathBuf};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sdk");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("testdata/sdk")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("image.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 2);
    dirs
}

fn options(dir: &Path) -> LowerOptions {
    let mut opts = LowerOptions::default();
    if let Ok(args) = std::fs::read_to_string(dir.join("args")) {
        for line in args.lines().filter(|l| !l.is_empty()) {
            let kv = line.strip_prefix("--build-arg ").expect("--build-arg K=V");
            let (k, v) = kv.split_once('=').expect("K=V");
            opts.build_args.insert(k.into(), v.into());
        }
    }
    opts
}

#[test]
fn dockerfile_and_sdk_twin_lower_to_the_same_ir() {
    for dir in cases() {
        let name = dir.file_name().expect("name").to_string_lossy().to_string();
        let src = std::fs::read_to_string(dir.join("Dockerfile")).expect("Dockerfile");
        let from_dockerfile =
            lower_dockerfile(&parse(&src).expect("parses"), &options(&dir), &NoBaseImages)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        let json = std::fs::read_to_string(dir.join("image.json")).expect("image.json");
        let img = from_json(&json).unwrap_or_else(|e| panic!("{name}: {e}"));
        let from_sdk = lower_sdk(&img, &LowerOptions::default(), &NoBaseImages)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            serde_json::to_value(&from_dockerfile.spec).expect("json"),
            serde_json::to_value(&from_sdk.spec).expect("json"),
            "{name}: the Dockerfile and its SDK twin differ"
        );
        assert!(
            !from_sdk.spec.stages[0].steps.is_empty(),
            "{name}: no steps"
        );
        insta::with_settings!({snapshot_path => dir.clone(), prepend_module_to_snapshot => false,
                               omit_expression => true}, {
            insta::assert_json_snapshot!("ir", from_sdk.spec);
        });
    }
}
