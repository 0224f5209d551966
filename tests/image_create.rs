//! `kiln image create` through the real binary: the built-in busybox base (made offline),
//! the namespace builder, an ext4 snapshot, a registered name (runs as root).

use std::path::Path;
use std::process::Command;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn kiln(home: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .env_remove("KILN_PROJECT")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("kiln runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {} {}", r.stdout, r.stderr))
}

#[test]
fn hello_builds_registers_and_rebuilds_from_cache() {
    let home = tempfile::tempdir().expect("home");
    let r = kiln(
        home.path(),
        &[
            "image",
            "create",
            "examples/hello",
            "--disk_mb",
            "64",
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r);
    assert_eq!(v["name"], "hello");
    assert_eq!(v["status"], "Completed");
    assert_eq!(v["builder"], "namespace");
    assert!(v["snapshot_id"].as_str().expect("id").starts_with("snap_"));
    assert!(v["image_id"].as_str().expect("id").starts_with("img_"));
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[2]["cached"], false);
    let uri = v["snapshot_uri"].as_str().expect("uri");
    let disk = uri.strip_prefix("file://").expect("file uri");
    let fsck = Command::new("e2fsck")
        .args(["-fn", disk])
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /srv/hello.txt", disk])
        .output()
        .expect("debugfs");
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "hello from Linux\n");

    let again = json(&kiln(
        home.path(),
        &[
            "image",
            "create",
            "examples/hello",
            "--disk_mb",
            "64",
            "--json",
        ],
    ));
    assert!(
        again["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .all(|s| s["cached"] == true),
        "{again}"
    );
    // The same tree at the same size is the same snapshot: a no-op rebuild writes no disk.
    assert_eq!(again["snapshot_id"], v["snapshot_id"], "{again}");
    assert_eq!(again["sha256"], v["sha256"], "{again}");
    let d = json(&kiln(
        home.path(),
        &["image", "describe", "hello", "--json"],
    ));
    assert_eq!(
        d["config"]["cmd"],
        serde_json::json!(["cat", "/srv/hello.txt"])
    );
    assert_eq!(d["config"]["workdir"], "/srv");
    assert_eq!(d["base"]["reference"], "kiln/busybox");
    assert_eq!(d["snapshot_id"], again["snapshot_id"]);
    let history = json(&kiln(home.path(), &["image", "history", "hello", "--json"]));
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history}");

    // --no-cache runs every step again, and its tree gets its own snapshot.
    let fresh = json(&kiln(
        home.path(),
        &[
            "image",
            "create",
            "examples/hello",
            "--disk_mb",
            "64",
            "--no-cache",
            "--json",
        ],
    ));
    assert_ne!(fresh["snapshot_id"], v["snapshot_id"], "{fresh}");

    // Another size is another disk.
    let bigger = json(&kiln(
        home.path(),
        &[
            "image",
            "create",
            "examples/hello",
            "--disk_mb",
            "80",
            "--json",
        ],
    ));
    assert_ne!(bigger["snapshot_id"], v["snapshot_id"], "{bigger}");
    assert_eq!(bigger["disk_mb"], 80, "{bigger}");
    // A snapshot that is gone is made again, not reused.
    let other = bigger["snapshot_id"].as_str().expect("id");
    let disk = bigger["snapshot_uri"].as_str().expect("uri");
    let disk = disk.strip_prefix("file://").expect("file uri");
    std::fs::remove_file(disk).expect("remove the disk");
    let remade = json(&kiln(
        home.path(),
        &[
            "image",
            "create",
            "examples/hello",
            "--disk_mb",
            "80",
            "--json",
        ],
    ));
    assert_ne!(remade["snapshot_id"], other, "{remade}");
}

#[test]
fn a_failing_run_exits_1_and_keeps_the_previous_image() {
    let home = tempfile::tempdir().expect("home");
    let ctx = tempfile::tempdir().expect("ctx");
    let df = ctx.path().join("Dockerfile");
    std::fs::write(&df, "FROM kiln/busybox\nRUN echo ok > /ok\n").expect("write");
    let dir = ctx.path().to_str().expect("utf-8");
    let first = kiln(
        home.path(),
        &[
            "image",
            "create",
            dir,
            "-n",
            "app",
            "--disk_mb",
            "64",
            "--json",
        ],
    );
    assert_eq!(first.code, 0, "{}", first.stderr);
    let before = json(&first)["snapshot_id"].clone();
    std::fs::write(&df, "FROM kiln/busybox\nRUN echo going down && exit 7\n").expect("write");
    let r = kiln(
        home.path(),
        &[
            "image",
            "create",
            dir,
            "-n",
            "app",
            "--disk_mb",
            "64",
            "--json",
        ],
    );
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let e = json(&r);
    assert_eq!(e["error"]["code"], "step_failed");
    let msg = e["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("exit code 7") && msg.contains("going down"),
        "{msg}"
    );
    let d = json(&kiln(home.path(), &["image", "describe", "app", "--json"]));
    assert_eq!(
        d["snapshot_id"], before,
        "the name still points at the old snapshot"
    );
}

#[test]
fn bad_dockerfiles_exit_2_with_a_location() {
    let home = tempfile::tempdir().expect("home");
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(ctx.path().join("Dockerfile"), "FROM kiln/busybox\nRUNN x\n").expect("write");
    let r = kiln(
        home.path(),
        &[
            "image",
            "create",
            ctx.path().to_str().expect("utf-8"),
            "-n",
            "bad",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("Dockerfile:2:1"), "{}", r.stderr);
    let ls = json(&kiln(home.path(), &["image", "ls", "--json"]));
    assert_eq!(ls.as_array().map(Vec::len), Some(0));
}

/// `--builder_disk_mb` is a real limit on the namespace builder: RUN writes on a scratch
/// disk of that size, a step that writes more fails with the reason, the host's file system
/// takes none of it, and nothing is left mounted; a step within it builds the same layer.
#[test]
fn builder_disk_mb_bounds_what_run_may_write() {
    let home = tempfile::tempdir().expect("home");
    let ctx = tempfile::tempdir().expect("ctx");
    let df = ctx.path().join("Dockerfile");
    let dir = ctx.path().to_str().expect("utf-8");
    let create = |name: &str| {
        kiln(
            home.path(),
            &[
                "image",
                "create",
                dir,
                "-n",
                name,
                "--disk_mb",
                "64",
                "--builder_disk_mb",
                "64",
                "--json",
            ],
        )
    };
    std::fs::write(
        &df,
        "FROM kiln/busybox\nRUN mkdir /d && dd if=/dev/zero of=/d/ten bs=1M count=10 2>/dev/null \
         && ln -s ten /d/link && rm /etc/group && chmod 700 /d\n",
    )
    .expect("write");
    let r = create("fits");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r);
    let disk = v["snapshot_uri"]
        .as_str()
        .and_then(|u| u.strip_prefix("file://"))
        .expect("uri")
        .to_string();
    let stat = |p: &str| {
        let out = Command::new("debugfs")
            .args(["-R", &format!("stat {p}"), &disk])
            .output()
            .expect("debugfs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        stat("/d/ten").contains("Size: 10485760"),
        "{}",
        stat("/d/ten")
    );
    assert!(stat("/d").contains("Mode:  0700"), "{}", stat("/d"));
    assert!(
        stat("/d/link").contains("Fast link dest: \"ten\""),
        "{}",
        stat("/d/link")
    );
    // The deletion came through the move into the cache as a whiteout.
    assert!(
        !stat("/etc/group").contains("Inode:"),
        "{}",
        stat("/etc/group")
    );

    std::fs::write(
        &df,
        "FROM kiln/busybox\nRUN dd if=/dev/zero of=/big bs=1M count=200\n",
    )
    .expect("write");
    let r = create("too-big");
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let msg = json(&r)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("scratch disk is full"), "{msg}");
    assert!(msg.contains("No space left on device"), "{msg}");
    let ls = json(&kiln(home.path(), &["image", "ls", "--json"]));
    assert!(!ls.to_string().contains("too-big"), "{ls}");
    // Nothing of it under KILN_HOME, and no scratch disk still mounted.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let home_s = home.path().to_string_lossy();
    assert!(
        !mounts.contains(&*home_s),
        "left mounted under {home_s}:\n{mounts}"
    );
    let used = Command::new("du")
        .args(["-sm", &home_s])
        .output()
        .expect("du");
    let mb: u64 = String::from_utf8_lossy(&used.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du figure");
    assert!(mb < 150, "KILN_HOME holds {mb} MiB after a refused step");
}
