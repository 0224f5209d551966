//! The three examples, built as the README shows: `kiln image create examples/X`, then
//! `image ls` and `image describe`, the result checked inside its ext4 disk (loop-mounted
//! read-only), and the image's own command run in a sandbox (`kiln sbx run --image X`). One build per example, all in one home so `kiln/debian:bookworm` is made once.
//! Runs as root; python-app and multistage need the Debian package mirror (mmdebstrap makes
//! the base, their RUN steps call apt-get).

mod snapshot_common;

use serde_json::{Value, json};
use snapshot_common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

/// `image create examples/NAME`; returns the create JSON and the disk. The builder gets
/// 2 GiB of scratch whatever the image's size: multistage's build stage installs gcc into a
/// stage whose output is a 64 MiB image (`--builder_disk_mb` is enforced).
fn create(home: &Path, name: &str, disk_mb: u64) -> (Value, PathBuf) {
    let v = kiln(
        home,
        "default",
        &[
            "image",
            "create",
            &example(name),
            "--disk_mb",
            &disk_mb.to_string(),
            "--builder_disk_mb",
            "2048",
        ],
    )
    .ok();
    assert_eq!(v["name"], name, "{v}");
    assert_eq!(v["status"], "Completed", "{v}");
    assert!(
        v["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .any(|s| s["cached"] == false),
        "a first build runs its steps: {v}"
    );
    let disk = PathBuf::from(
        v["snapshot_uri"]
            .as_str()
            .and_then(|u| u.strip_prefix("file://"))
            .expect("a file:// snapshot_uri"),
    );
    fsck(&disk);
    (v, disk)
}

fn describe(home: &Path, name: &str) -> Value {
    let d = kiln(home, "default", &["image", "describe", name]).ok();
    assert_eq!(d["name"], name, "{d}");
    d
}

/// `sbx run --image NAME -- ARGS` (no ARGS: the image's command); returns its stdout.
fn sbx_run(home: &Path, name: &str, args: &[&str]) -> String {
    let mut all = vec!["sbx", "run", "--image", name];
    if !args.is_empty() {
        all.push("--");
        all.extend_from_slice(args);
    }
    let v = kiln(home, "default", &all).ok();
    assert_eq!(v["exit_code"], 0, "{name}: {v}");
    v["stdout"].as_str().expect("stdout").to_string()
}

/// Runs `args` chrooted into a mounted disk, with no environment but PATH.
fn chroot(root: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new("chroot")
        .arg(root)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .output()
        .expect("chroot runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn hello(home: &Path) {
    let (v, disk) = create(home, "hello", 64);
    assert_eq!(v["steps"].as_array().map(Vec::len), Some(3), "{v}");
    let d = describe(home, "hello");
    assert_eq!(d["config"]["cmd"], json!(["cat", "/srv/hello.txt"]), "{d}");
    assert_eq!(d["config"]["workdir"], "/srv", "{d}");
    assert_eq!(d["base"]["reference"], "kiln/busybox", "{d}");
    let m = Mounted::new(&disk);
    assert_eq!(
        std::fs::read_to_string(m.dir.path().join("srv/hello.txt")).expect("hello.txt"),
        "hello from Linux\n"
    );
    // The namespace builder runs RUN on this host's kernel (the microvm builder's is the
    // guest's: tests/microvm.rs).
    let host = nix::sys::utsname::uname().expect("uname");
    assert_eq!(
        std::fs::read_to_string(m.dir.path().join("srv/built-on.txt")).expect("built-on.txt"),
        format!("built on {}\n", host.release().to_string_lossy())
    );
    assert_eq!(sbx_run(home, "hello", &[]), "hello from Linux\n");
}

fn python_app(home: &Path) {
    let (v, disk) = create(home, "python-app", 768);
    let steps: Vec<&str> = v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["instruction"].as_str())
        .collect();
    assert!(
        steps.iter().any(|s| s.starts_with("RUN apt-get update")),
        "{v}"
    );
    assert!(steps.contains(&"COPY app/ /app/"), "{v}");
    let d = describe(home, "python-app");
    assert_eq!(d["config"]["cmd"], json!(["python3", "app.py"]), "{d}");
    assert_eq!(d["config"]["workdir"], "/app", "{d}");
    let env: Vec<&str> = d["config"]["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.contains(&"APP_GREETING=hello from python-app"), "{d}");
    assert!(env.iter().any(|e| e.starts_with("PATH=")), "{d}");
    assert_eq!(d["base"]["reference"], "kiln/debian:bookworm", "{d}");
    assert!(
        d["base"]["digest"]
            .as_str()
            .is_some_and(|s| s.starts_with("sha256:")),
        "{d}"
    );

    let m = Mounted::new(&disk);
    let root = m.dir.path();
    for f in ["app/app.py", "app/greeting.py", "usr/bin/python3"] {
        assert!(root.join(f).exists(), "python-app: /{f} is missing");
    }
    // .dockerignore keeps the tests out; the RUN step cleaned the apt lists.
    assert!(
        !root.join("app/test_app.py").exists(),
        "python-app: .dockerignore lists app/test_*.py"
    );
    let lists: Vec<_> = std::fs::read_dir(root.join("var/lib/apt/lists"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(lists.is_empty(), "python-app: apt lists left: {lists:?}");
    // The build's resolv.conf and hostname are not left behind.
    assert!(!root.join("etc/hostname").exists());
    let (code, out) = chroot(root, &["sh", "-c", "cd /app && python3 -B app.py"]);
    assert_eq!(code, 0, "python-app: {out}");
    assert!(out.starts_with("hello, sandbox!\npython 3."), "{out}");
    // In a sandbox: the image's CMD, WORKDIR and ENV.
    let out = sbx_run(home, "python-app", &[]);
    assert!(
        out.starts_with("hello from python-app, sandbox!\npython 3.")
            && out.ends_with(" in /app\n"),
        "{out}"
    );
    let out = sbx_run(home, "python-app", &["sh", "-c", "pwd; echo $APP_GREETING"]);
    assert_eq!(out, "/app\nhello from python-app\n");
}

fn multistage(home: &Path) {
    let (v, disk) = create(home, "multistage", 64);
    let steps = v["steps"].as_array().expect("steps");
    assert!(
        steps.iter().any(|s| s["instruction"]
            .as_str()
            .is_some_and(|i| i.contains("gcc -static"))),
        "{v}"
    );
    let d = describe(home, "multistage");
    assert_eq!(
        d["config"]["entrypoint"],
        json!(["/usr/local/bin/hello"]),
        "{d}"
    );
    assert_eq!(d["config"]["user"], "1000:1000", "{d}");
    assert_eq!(d["base"]["reference"], "kiln/busybox", "{d}");
    let m = Mounted::new(&disk);
    let root = m.dir.path();
    // Only the binary came across: no compiler, no sources, no Debian.
    for absent in ["usr/bin/gcc", "src/hello.c", "etc/debian_version"] {
        assert!(
            !root.join(absent).exists(),
            "multistage: /{absent} should not be in the final stage"
        );
    }
    let (code, out) = chroot(root, &["/usr/local/bin/hello"]);
    assert_eq!((code, out.as_str()), (0, "hello from a static binary\n"));
    // In a sandbox: the ENTRYPOINT, as USER 1000:1000.
    assert_eq!(
        sbx_run(home, "multistage", &[]),
        "hello from a static binary\n"
    );
}

#[test]
fn examples_hello_python_app_and_multistage_build_list_describe_and_run() {
    require_root();
    for tool in ["mmdebstrap", "e2fsck", "mount", "chroot"] {
        require_tool(tool);
    }
    let t = tempfile::tempdir().expect("tempdir");
    let home = t.path().join("home");
    hello(&home);
    python_app(&home);
    multistage(&home);
    let ls = kiln(&home, "default", &["image", "ls"]).ok();
    let mut names: Vec<&str> = ls
        .as_array()
        .expect("image ls is an array")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["hello", "multistage", "python-app"], "{ls}");
    assert!(
        ls.as_array()
            .expect("array")
            .iter()
            .all(|i| i["status"] == "Ready" && i["snapshot_id"].is_string()),
        "{ls}"
    );
}
