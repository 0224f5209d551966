//! `kiln sbx …` through the real binary on the namespace runtime: images built from the
//! built-in busybox base, sandboxes over a read-only loop mount of their snapshot, commands
//! with the image's settings, copy-on-write roots, `sbx snapshot` → `image register` (runs as
//! root).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: {} {}", self.out(), self.stderr))
    }
}

fn kiln_in(home: &Path, project: &str, args: &[&str], stdin: Option<&[u8]>) -> Run {
    kiln_env(home, project, args, stdin, &[])
}

fn kiln_env(
    home: &Path,
    project: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, &str)],
) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .env("KILN_PROJECT", project)
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln runs");
    // Written from another thread: the command's output fills its pipe while it reads.
    let writer = stdin.map(|data| {
        let mut w = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        std::thread::spawn(move || w.write_all(&data))
    });
    let out = child.wait_with_output().expect("kiln ends");
    if let Some(w) = writer {
        w.join().expect("writer").expect("write stdin");
    }
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn kiln(home: &Path, args: &[&str]) -> Run {
    kiln_in(home, "default", args, None)
}

/// Builds `dockerfile` as image `name` in `home`; returns `image create`'s JSON.
fn build(home: &Path, name: &str, dockerfile: &str) -> serde_json::Value {
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).expect("dockerfile");
    std::fs::write(ctx.path().join("data.txt"), "from the context\n").expect("data");
    let ctx_dir = ctx.path().to_str().expect("utf-8");
    let r = kiln(
        home,
        &[
            "image",
            "create",
            ctx_dir,
            "-n",
            name,
            "--disk_mb",
            "64",
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.json()
}

const APP: &str = r#"FROM kiln/busybox
RUN echo app:x:1234:1234::/app:/bin/sh >> /etc/passwd && echo app:x:1234: >> /etc/group \
    && mkdir /app && chown app /app
COPY data.txt /app/data.txt
ENV GREETING=hello MODE=image
WORKDIR /app/work
USER app
CMD ["sh", "-c", "echo $GREETING $MODE $(id -u) $(pwd); cat /app/data.txt"]
"#;

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn disk_of(v: &serde_json::Value) -> std::path::PathBuf {
    let uri = v["snapshot_uri"].as_str().expect("uri");
    uri.strip_prefix("file://").expect("file uri").into()
}

#[test]
fn run_applies_the_image_config_and_exits_with_the_commands_code() {
    let home = tempfile::tempdir().expect("home");
    let h = home.path();
    build(h, "app", APP);

    // The image's CMD, ENV, USER and WORKDIR (created when missing, as Docker does).
    let r = kiln(h, &["sbx", "run", "--image", "app"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.out(),
        "hello image 1234 /app/work\nfrom the context\n",
        "{}",
        r.stderr
    );

    // Flags override; the command after -- replaces CMD.
    let r = kiln(
        h,
        &[
            "sbx",
            "run",
            "--image",
            "app",
            "-e",
            "MODE=flag",
            "-e",
            "EXTRA=1",
            "-w",
            "/tmp",
            "-u",
            "0",
            "--",
            "sh",
            "-c",
            "echo $GREETING $MODE $EXTRA $(id -u) $(pwd)",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.out(), "hello flag 1 0 /tmp\n");

    // Exit codes are the command's; Docker's 127 and 126 when it cannot start.
    let r = kiln(
        h,
        &["sbx", "run", "--image", "app", "--", "sh", "-c", "exit 7"],
    );
    assert_eq!(r.code, 7, "{}", r.stderr);
    let r = kiln(
        h,
        &["sbx", "run", "--image", "app", "--", "no-such-command"],
    );
    assert_eq!(r.code, 127, "{}", r.stderr);
    let r = kiln(h, &["sbx", "run", "--image", "app", "--", "/app/data.txt"]);
    assert_eq!(r.code, 126, "{}", r.stderr);

    // JSON mode captures the output.
    let r = kiln(
        h,
        &[
            "sbx",
            "run",
            "--image",
            "app",
            "--json",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; hostname; exit 3",
        ],
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["timed_out"], false);
    let id = v["sandbox_id"].as_str().expect("id");
    assert!(id.starts_with("sbx_"), "{v}");
    let host = id.to_ascii_lowercase().replace('_', "-");
    assert_eq!(v["stdout"], format!("out\n{host}\n"));
    assert_eq!(v["stderr"], "err\n");

    // A timed-out command is killed and is a failure.
    let r = kiln(
        h,
        &[
            "sbx",
            "run",
            "--image",
            "app",
            "--timeout",
            "1",
            "--json",
            "--",
            "sleep",
            "30",
        ],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.json()["timed_out"], true);

    // Nothing is left: run removes its sandbox.
    let ls = kiln(h, &["sbx", "ls", "--json"]);
    assert_eq!(ls.code, 0, "{}", ls.stderr);
    assert_eq!(ls.json(), serde_json::json!([]));
}

#[test]
fn stdin_and_binary_output_pass_through() {
    let home = tempfile::tempdir().expect("home");
    let h = home.path();
    build(h, "app", APP);
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let r = kiln_in(
        h,
        "default",
        &["sbx", "run", "--image", "app", "--", "cat"],
        Some(&data),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout == data, "{} bytes back", r.stdout.len());
}

#[test]
fn sandboxes_are_copy_on_write_and_snapshot_into_a_registrable_image() {
    let home = tempfile::tempdir().expect("home");
    let h = home.path();
    let built = build(h, "app", APP);
    let disk = disk_of(&built);
    let before = sha256(&disk);

    let c = kiln(h, &["sbx", "create", "--image", "app", "--json"]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    let rec = c.json();
    let id = rec["sandbox_id"].as_str().expect("id").to_string();
    assert_eq!(rec["image"], "app");
    assert_eq!(rec["snapshot_id"], built["snapshot_id"]);
    assert_eq!(rec["runtime"], "namespace");
    assert_eq!(rec["workdir"], "/app/work");
    assert_eq!(rec["user"], "app");
    // Files persist between commands; the image's disk is not written.
    let w = kiln(
        h,
        &[
            "sbx",
            "exec",
            &id,
            "-u",
            "0",
            "--",
            "sh",
            "-c",
            "echo changed > /app/data.txt && echo new > /app/new.txt && rm -rf /app/work",
        ],
    );
    assert_eq!(w.code, 0, "{}", w.stderr);
    let r = kiln(
        h,
        &[
            "sbx",
            "exec",
            &id,
            "-w",
            "/",
            "--",
            "cat",
            "/app/data.txt",
            "/app/new.txt",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.out(), "changed\nnew\n");
    let r = kiln(h, &["sbx", "exec", &id, "-w", "/", "--", "ls", "/app/work"]);
    assert_ne!(r.code, 0, "a deleted directory stays deleted: {}", r.out());
    assert_eq!(sha256(&disk), before, "the snapshot's disk changed");

    // Another sandbox of the same image sees the image, not the first one's changes.
    let other = kiln(
        h,
        &["sbx", "run", "--image", "app", "--", "cat", "/app/data.txt"],
    );
    assert_eq!(other.out(), "from the context\n", "{}", other.stderr);

    // The image's mount is read-only and shared; the root is an overlay.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let snap = built["snapshot_id"].as_str().expect("snap");
    let line = mounts
        .lines()
        .find(|l| l.contains(&format!("/mnt-v1/{snap} ")))
        .unwrap_or_else(|| panic!("no mount of {snap}"));
    assert!(line.contains(" ro,") || line.contains(" ro "), "{line}");

    let ls = kiln(h, &["sbx", "ls", "--json"]).json();
    assert_eq!(ls.as_array().map(Vec::len), Some(1), "{ls}");
    assert_eq!(ls[0]["sandbox_id"], id.as_str());

    // sbx snapshot → a Completed snapshot, child of the image's, that register accepts.
    let s = kiln(h, &["sbx", "snapshot", &id, "--json"]);
    assert_eq!(s.code, 0, "{}", s.stderr);
    let sv = s.json();
    assert_eq!(sv["status"], "Completed", "{sv}");
    assert_eq!(sv["parent"], built["snapshot_id"], "{sv}");
    let snap_id = sv["snapshot_id"].as_str().expect("id");
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(disk_of(&sv))
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let reg = kiln(h, &["image", "register", "app-v2", snap_id, "--json"]);
    assert_eq!(reg.code, 0, "{}", reg.stderr);
    let r = kiln(
        h,
        &[
            "sbx",
            "run",
            "--image",
            "app-v2",
            "--",
            "sh",
            "-c",
            "cat /app/data.txt /app/new.txt; ls -d /app/work 2>&1; ls -a / | grep -c lost+found",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = r.out();
    assert!(out.starts_with("changed\nnew\n"), "{out}");
    assert!(out.contains("No such file"), "{out}");
    assert!(out.ends_with("1\n"), "one lost+found: {out}");

    // The sandbox's snapshot cannot be removed from under it (here: once no name uses it).
    let snap = built["snapshot_id"].as_str().expect("snapshot id");
    let other = build(h, "app-other", "FROM kiln/busybox\nRUN true\n");
    let moved = kiln(
        h,
        &[
            "image",
            "register",
            "app",
            other["snapshot_id"].as_str().expect("id"),
        ],
    );
    assert_eq!(moved.code, 0, "{}", moved.stderr);
    let rm = kiln(h, &["snapshot", "rm", snap, "--json"]);
    assert_eq!(rm.code, 4, "{} {}", rm.out(), rm.stderr);
    assert_eq!(
        rm.json()["error"]["code"],
        "snapshot_in_use",
        "{}",
        rm.out()
    );
    assert!(std::path::Path::new(&disk).is_file());

    let rm = kiln(h, &["sbx", "rm", &id, "--json"]);
    assert_eq!(rm.code, 0, "{}", rm.stderr);
    assert_eq!(rm.json()["removed"], true);
    assert_eq!(kiln(h, &["sbx", "exec", &id, "--", "true"]).code, 3);
    assert_eq!(
        kiln(h, &["sbx", "ls", "--json"]).json(),
        serde_json::json!([])
    );
}

#[test]
fn sandboxes_belong_to_their_project() {
    let home = tempfile::tempdir().expect("home");
    let h = home.path();
    build(h, "app", APP);
    let c = kiln(h, &["sbx", "create", "--image", "app", "--json"]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    let id = c.json()["sandbox_id"].as_str().expect("id").to_string();
    let other = |args: &[&str]| kiln_in(h, "other", args, None);
    assert_eq!(
        other(&["sbx", "ls", "--json"]).json(),
        serde_json::json!([])
    );
    assert_eq!(other(&["sbx", "exec", &id, "--", "true"]).code, 3);
    assert_eq!(other(&["sbx", "rm", &id]).code, 3);
    // The image name is project-scoped too.
    assert_eq!(
        other(&["sbx", "run", "--image", "app", "--", "true"]).code,
        3
    );
    assert_eq!(kiln(h, &["sbx", "rm", &id]).code, 0);
}

#[test]
fn bad_launches_fail_with_meaningful_codes() {
    let home = tempfile::tempdir().expect("home");
    let h = home.path();
    build(h, "app", APP);
    let no_image = kiln(
        h,
        &["sbx", "run", "--image", "nope", "--json", "--", "true"],
    );
    assert_eq!(no_image.code, 3, "{}", no_image.stderr);
    let bad_id = kiln(h, &["sbx", "exec", "../../etc", "--", "true"]);
    assert_eq!(bad_id.code, 3, "{}", bad_id.stderr);
    let bad_env = kiln(
        h,
        &["sbx", "run", "--image", "app", "-e", "=x", "--", "true"],
    );
    assert_eq!(bad_env.code, 2, "{}", bad_env.stderr);
    let bad_wd = kiln(
        h,
        &["sbx", "run", "--image", "app", "-w", "rel", "--", "true"],
    );
    assert_eq!(bad_wd.code, 2, "{}", bad_wd.stderr);
    let bad_user = kiln(
        h,
        &[
            "sbx",
            "run",
            "--image",
            "app",
            "-u",
            "nobody-here",
            "--",
            "true",
        ],
    );
    assert_eq!(bad_user.code, 2, "{}", bad_user.stderr);
    // A host that cannot boot the microVM runtime is an environment failure (5), and the
    // sandbox it would have made is gone (tests/microvm.rs runs the real thing).
    let vm = kiln_env(
        h,
        "default",
        &[
            "sbx",
            "run",
            "--image",
            "app",
            "--runtime",
            "microvm",
            "--",
            "true",
        ],
        None,
        &[("KILN_VM_KERNEL", "/nonexistent/vmlinuz")],
    );
    assert_eq!(vm.code, 5, "{}", vm.stderr);
    assert!(
        vm.stderr.contains("the microvm runtime cannot start"),
        "{}",
        vm.stderr
    );
    // An image without a command needs one after --.
    // kiln/busybox has `CMD ["sh"]`, as Docker Hub's busybox; `CMD []` clears it.
    build(h, "bare", "FROM kiln/busybox\nCMD []\n");
    let r = kiln(h, &["sbx", "run", "--image", "bare"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no command"), "{}", r.stderr);
    assert_eq!(
        kiln(h, &["sbx", "ls", "--json"]).json(),
        serde_json::json!([])
    );
}

#[test]
fn network_none_leaves_only_loopback() {
    let home = tempfile::tempdir().expect("home");
    let h = home.path();
    build(h, "app", APP);
    let r = kiln(
        h,
        &[
            "sbx",
            "run",
            "--image",
            "app",
            "--network",
            "none",
            "--",
            "ls",
            "/sys/class/net",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.out(), "lo\n");
}

#[test]
fn gc_releases_mounts_and_what_a_killed_run_left() {
    let home = tempfile::tempdir().expect("home");
    let h = home.path();
    let built = build(h, "app", APP);
    let snap = built["snapshot_id"].as_str().expect("snap").to_string();
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .contains(&format!("/mnt-v1/{snap} "))
    };

    // A run whose kiln is SIGKILLed leaves its sandbox; gc removes it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["sbx", "run", "--image", "app", "--", "sleep", "30"])
        .env("KILN_HOME", h)
        .env("KILN_PROJECT", "default")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let ls = kiln(h, &["sbx", "ls", "--json"]).json();
        if ls.as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // gc while it runs keeps it.
    let g = kiln(h, &["gc", "--json"]);
    assert_eq!(g.code, 0, "{}", g.stderr);
    assert_eq!(g.json()["removed_sandbox_leftovers"], 0);
    assert!(mounted());
    child.kill().expect("kill");
    child.wait().expect("wait");
    // Its command dies with kiln's pid namespace child; wait for the lock to be free.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let g = kiln(h, &["gc", "--json"]);
    assert_eq!(g.code, 0, "{}", g.stderr);
    let v = g.json();
    assert_eq!(v["removed_sandbox_leftovers"], 1, "{v}");
    assert_eq!(v["unmounted_snapshots"], serde_json::json!([snap]), "{v}");
    assert!(!mounted(), "gc left the snapshot mounted");
    assert_eq!(
        kiln(h, &["sbx", "ls", "--json"]).json(),
        serde_json::json!([])
    );

    // A sandbox of `create` keeps its image's mount and snapshot through gc.
    let c = kiln(h, &["sbx", "create", "--image", "app", "--json"]);
    let id = c.json()["sandbox_id"].as_str().expect("id").to_string();
    let g = kiln(h, &["gc", "--json"]).json();
    assert_eq!(g["unmounted_snapshots"], serde_json::json!([]), "{g}");
    assert!(mounted());
    assert_eq!(kiln(h, &["sbx", "exec", &id, "--", "true"]).code, 0);
    assert_eq!(kiln(h, &["sbx", "rm", &id]).code, 0);
    let g = kiln(h, &["gc", "--json"]).json();
    assert_eq!(g["unmounted_snapshots"], serde_json::json!([snap]), "{g}");
    assert!(!mounted());
}
