//! `kiln image register|ls|describe|update|history|rm` against the real binary: two projects,
//! public and private names, rollback, the isolation matrix, bad input, gc.

mod snapshot_common;

use kiln::registry::{self, ImageStatus, Registry, RegistryError};
use serde_json::{Value, json};
use snapshot_common::*;
use std::path::PathBuf;

struct Fixture {
    _t: tempfile::TempDir,
    home: PathBuf,
    tree: PathBuf,
}

fn fixture() -> Fixture {
    let t = tempfile::tempdir().expect("tempdir");
    let home = t.path().join("home");
    let tree = t.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
    std::fs::write(tree.join("etc/os-release"), b"ID=kiln\n").expect("write");
    Fixture { _t: t, home, tree }
}

impl Fixture {
    /// A new Completed snapshot (a different tree each time, so different digests).
    fn snap(&self, tag: &str) -> String {
        std::fs::write(self.tree.join("etc/tag"), tag).expect("write");
        import(&self.home, &self.tree, 16).0
    }

    fn k(&self, project: &str, args: &[&str]) -> Run {
        kiln(&self.home, project, args)
    }

    fn registry<T>(&self, f: impl AsyncFnOnce(Registry) -> T) -> T {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let reg = Registry::open(&self.home.join("kiln.db"))
                .await
                .expect("open");
            f(reg).await
        })
    }
}

fn names(v: &Value) -> Vec<(String, String, bool)> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|i| {
            (
                i["project"].as_str().expect("project").to_string(),
                i["name"].as_str().expect("name").to_string(),
                i["public"].as_bool().expect("public"),
            )
        })
        .collect()
}

#[test]
fn register_ls_describe_history_rm_across_two_projects_and_a_public_name() {
    let f = fixture();
    let (s1, s2, s3) = (f.snap("1"), f.snap("2"), f.snap("3"));
    let dockerfile = f._t.path().join("Dockerfile");
    std::fs::write(&dockerfile, "FROM kiln/busybox\nRUN true\n").expect("write");
    let v = f
        .k(
            "alpha",
            &[
                "image",
                "register",
                "app",
                &s1,
                "--dockerfile",
                dockerfile.to_str().expect("utf-8"),
            ],
        )
        .ok();
    assert_eq!(
        (v["name"].clone(), v["project"].clone(), v["public"].clone()),
        (json!("app"), json!("alpha"), json!(false))
    );
    assert_eq!(v["status"], "Ready");
    assert_eq!(v["previous_snapshot_id"], Value::Null);
    assert!(v["image_id"].as_str().expect("id").starts_with("img_"));
    f.k("alpha", &["image", "register", "tools", &s2, "--public"])
        .ok();
    f.k("beta", &["image", "register", "app", &s3]).ok();

    // ls: own names first, then public ones of others.
    let ls = f.k("alpha", &["image", "ls"]).ok();
    assert_eq!(
        names(&ls),
        [
            ("alpha".into(), "app".into(), false),
            ("alpha".into(), "tools".into(), true)
        ]
    );
    let keys: Vec<&str> = ls[0]
        .as_object()
        .expect("obj")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "created_at",
            "image_id",
            "name",
            "project",
            "public",
            "size_bytes",
            "snapshot_id",
            "status"
        ]
    );
    let ls = f.k("beta", &["image", "ls"]).ok();
    assert_eq!(
        names(&ls),
        [
            ("beta".into(), "app".into(), false),
            ("alpha".into(), "tools".into(), true)
        ]
    );
    let ls = f.k("gamma", &["image", "ls"]).ok();
    assert_eq!(names(&ls), [("alpha".into(), "tools".into(), true)]);

    // describe: by name and by id, with dockerfile, config, base and defaults.
    let d = f.k("alpha", &["image", "describe", "app"]).ok();
    assert_eq!(d["snapshot_id"], s1);
    assert_eq!(d["dockerfile"], "FROM kiln/busybox\nRUN true\n");
    assert_eq!(d["snapshot_status"], "Completed");
    assert_eq!(d["disk_mb"], 16);
    assert!(
        d["snapshot_uri"]
            .as_str()
            .expect("uri")
            .starts_with("file:///")
    );
    assert_eq!(d["sha256"].as_str().expect("sha").len(), 64);
    for k in [
        "env",
        "workdir",
        "user",
        "cmd",
        "entrypoint",
        "exposed_ports",
        "labels",
        "healthcheck",
        "stop_signal",
        "volumes",
        "shell",
    ] {
        assert!(
            d["config"].as_object().expect("config").contains_key(k),
            "config.{k}"
        );
    }
    assert_eq!(d["config"]["exposed_ports"], json!({}));
    assert_eq!(
        (
            d["memory_mb"].clone(),
            d["ttl_seconds"].clone(),
            d["readiness_port"].clone(),
            d["enabled"].clone()
        ),
        (json!(1024), Value::Null, Value::Null, json!(true))
    );
    let by_id = f
        .k(
            "alpha",
            &["image", "describe", d["image_id"].as_str().expect("id")],
        )
        .ok();
    assert_eq!(by_id, d);
    let d = f.k("beta", &["image", "describe", "tools"]).ok();
    assert_eq!(
        (d["project"].clone(), d["snapshot_id"].clone()),
        (json!("alpha"), json!(s2))
    );

    // history and rm.
    let h = f.k("alpha", &["image", "history", "app"]).ok();
    assert_eq!(h.as_array().expect("array").len(), 1);
    assert_eq!(
        (h[0]["snapshot_id"].clone(), h[0]["current"].clone()),
        (json!(s1), json!(true))
    );
    let r = f.k("alpha", &["image", "rm", "app"]).ok();
    assert_eq!(r["removed"], true);
    f.k("alpha", &["image", "describe", "app"])
        .fails(3, "image_not_found");
    f.k("alpha", &["image", "history", "app"])
        .fails(3, "image_not_found");
    f.k("alpha", &["image", "rm", "app"])
        .fails(3, "image_not_found");
    // beta's app is untouched; the snapshot stays until gc.
    assert_eq!(
        f.k("beta", &["image", "describe", "app"]).ok()["snapshot_id"],
        s3
    );
    assert!(disk_of(&f.home, &s1).exists());
}

#[test]
fn registering_an_existing_name_moves_it_and_an_old_snapshot_rolls_back() {
    let f = fixture();
    let (s1, s2) = (f.snap("1"), f.snap("2"));
    let a = f.k("p", &["image", "register", "web", &s1]).ok();
    let b = f.k("p", &["image", "register", "web", &s2]).ok();
    assert_eq!(
        a["image_id"], b["image_id"],
        "a name keeps its id when it moves"
    );
    assert_eq!(b["previous_snapshot_id"], s1);
    f.k("p", &["image", "update", "web", "--memory-mb", "2048"])
        .ok();
    let c = f.k("p", &["image", "register", "web", &s1]).ok();
    assert_eq!(c["snapshot_id"], s1);
    assert_eq!(c["previous_snapshot_id"], s2);
    assert_eq!(c["memory_mb"], 2048, "defaults survive a move");
    let h = f.k("p", &["image", "history", "web"]).ok();
    let snaps: Vec<&str> = h
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["snapshot_id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        snaps,
        [s1.as_str(), s2.as_str(), s1.as_str()],
        "newest first"
    );
    let current: Vec<bool> = h
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["current"].as_bool().expect("bool"))
        .collect();
    assert_eq!(current, [true, false, false]);
    assert_eq!(
        f.k("p", &["image", "ls"])
            .ok()
            .as_array()
            .expect("array")
            .len(),
        1
    );
}

#[test]
fn only_completed_snapshots_register() {
    let f = fixture();
    let s = f.snap("1");
    // Unknown (well-formed and not): 3.
    f.k(
        "p",
        &["image", "register", "x", "snap_01J00000000000000000000000"],
    )
    .fails(3, "snapshot_not_found");
    f.k("p", &["image", "register", "x", "nonsense"])
        .fails(3, "snapshot_not_found");
    // Pending and Failed: 4.
    let (pending, failed) = f.registry(async |reg| {
        let p = kiln::snapshot::SnapshotId::generate();
        reg.snapshot_begin(&p, 16, None, registry::Owner::current())
            .await
            .expect("begin");
        let q = kiln::snapshot::SnapshotId::generate();
        reg.snapshot_begin(&q, 16, None, registry::Owner::current())
            .await
            .expect("begin");
        reg.snapshot_fail(&q, "mkfs exploded").await.expect("fail");
        // The state machine does not go back.
        assert!(matches!(
            reg.snapshot_complete(&q, "file:///x", "00", 1).await,
            Err(RegistryError::BadTransition { .. })
        ));
        (p.to_string(), q.to_string())
    });
    let v = f
        .k("p", &["image", "register", "x", &pending])
        .fails(4, "snapshot_not_completed");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("Pending")
    );
    f.k("p", &["image", "register", "x", &failed])
        .fails(4, "snapshot_not_completed");
    assert_eq!(f.k("p", &["image", "ls"]).ok(), json!([]));
    let d = f.k("p", &["snapshot", "describe", &failed]).ok();
    assert_eq!(
        (d["status"].clone(), d["reason"].clone()),
        (json!("Failed"), json!("mkfs exploded"))
    );
    f.k("p", &["image", "register", "x", &s]).ok();
}

#[test]
fn public_names_are_unique_across_projects_and_private_ones_may_repeat() {
    let f = fixture();
    let s = f.snap("1");
    f.k("a", &["image", "register", "shared", &s, "--public"])
        .ok();
    let v = f
        .k("b", &["image", "register", "shared", &s, "--public"])
        .fails(4, "name_taken");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("project a")
    );
    // A private name of the same spelling is fine, and shadows the public one in its project.
    f.k("b", &["image", "register", "shared", &s]).ok();
    f.k("c", &["image", "register", "solo", &s]).ok();
    f.k("d", &["image", "register", "solo", &s]).ok();
    let b = f.k("b", &["image", "describe", "shared"]).ok();
    assert_eq!(
        (b["project"].clone(), b["public"].clone()),
        (json!("b"), json!(false))
    );
    assert_eq!(
        names(&f.k("b", &["image", "ls"]).ok()),
        [("b".into(), "shared".into(), false)]
    );
    // b cannot turn its private name public while a holds it.
    f.k("b", &["image", "register", "shared", &s, "--public"])
        .fails(4, "name_taken");
    // A public name stays public when it moves without --public.
    f.k("a", &["image", "register", "shared", &s]).ok();
    assert_eq!(
        f.k("z", &["image", "describe", "shared"]).ok()["public"],
        true
    );
}

#[test]
fn private_name_never_lists_describes_resolves_launches_or_is_overwritten_from_another_project() {
    let f = fixture();
    let (mine, theirs) = (f.snap("mine"), f.snap("theirs"));
    let reg = f.k("owner", &["image", "register", "secret", &mine]).ok();
    let id = reg["image_id"].as_str().expect("id").to_string();
    let other = "intruder";
    // list
    assert!(names(&f.k(other, &["image", "ls"]).ok()).is_empty());
    // describe by name and by id
    f.k(other, &["image", "describe", "secret"])
        .fails(3, "image_not_found");
    f.k(other, &["image", "describe", &id])
        .fails(3, "image_not_found");
    // history
    f.k(other, &["image", "history", "secret"])
        .fails(3, "image_not_found");
    // update, rm
    f.k(other, &["image", "update", "secret", "--memory-mb", "512"])
        .fails(3, "image_not_found");
    f.k(other, &["image", "rm", "secret"])
        .fails(3, "image_not_found");
    f.k(other, &["image", "rm", &id])
        .fails(3, "image_not_found");
    // resolve and launch (the runtime's entry point)
    f.registry(async |r| {
        let p = registry::project(other).expect("project");
        assert!(matches!(
            r.describe(&p, "secret").await,
            Err(RegistryError::ImageNotFound { .. })
        ));
        assert!(matches!(
            r.resolve_for_launch(&p, "secret").await,
            Err(RegistryError::ImageNotFound { .. })
        ));
        assert!(matches!(
            r.resolve_for_launch(&p, &id).await,
            Err(RegistryError::ImageNotFound { .. })
        ));
    });
    // overwrite: registering the same name elsewhere makes a second, separate name
    f.k(other, &["image", "register", "secret", &theirs]).ok();
    f.k(other, &["image", "update", "secret", "--memory-mb", "512"])
        .ok();
    f.k(other, &["image", "rm", "secret"]).ok();
    let d = f.k("owner", &["image", "describe", "secret"]).ok();
    assert_eq!(
        (
            d["snapshot_id"].clone(),
            d["memory_mb"].clone(),
            d["image_id"].clone()
        ),
        (json!(mine), json!(1024), json!(id))
    );
    assert_eq!(
        f.k("owner", &["image", "history", "secret"])
            .ok()
            .as_array()
            .expect("array")
            .len(),
        1
    );
    // A public name of another project is visible but not changeable.
    f.k("owner", &["image", "register", "pub", &mine, "--public"])
        .ok();
    f.k(other, &["image", "describe", "pub"]).ok();
    f.k(other, &["image", "update", "pub", "--enabled", "false"])
        .fails(4, "not_owner");
    f.k(other, &["image", "rm", "pub"]).fails(4, "not_owner");
    assert_eq!(
        f.k("owner", &["image", "describe", "pub"]).ok()["enabled"],
        true
    );
}

#[test]
fn launching_an_image_that_is_not_ready_fails_with_image_not_ready() {
    let f = fixture();
    let s = f.snap("1");
    f.k("p", &["image", "register", "app", &s]).ok();
    f.registry(async |r| {
        let p = registry::project("p").expect("project");
        let img = r.resolve_for_launch(&p, "app").await.expect("ready");
        assert_eq!(img.status, ImageStatus::Ready);
        r.set_status(&img.id, ImageStatus::Preparing)
            .await
            .expect("status");
        assert!(matches!(
            r.resolve_for_launch(&p, "app").await,
            Err(RegistryError::NotReady {
                status: "Preparing",
                ..
            })
        ));
        r.set_status(&img.id, ImageStatus::Failed)
            .await
            .expect("status");
        assert!(matches!(
            r.resolve_for_launch(&p, "app").await,
            Err(RegistryError::NotReady {
                status: "Failed",
                ..
            })
        ));
        r.set_status(&img.id, ImageStatus::Ready)
            .await
            .expect("status");
    });
    f.k("p", &["image", "update", "app", "--enabled", "false"])
        .ok();
    f.registry(async |r| {
        let p = registry::project("p").expect("project");
        assert!(matches!(
            r.resolve_for_launch(&p, "app").await,
            Err(RegistryError::NotReady { .. })
        ));
        // The CLI renders it as CLI.md's `image_not_ready`, a conflict.
        let e: kiln::cli::CliError = r
            .resolve_for_launch(&p, "app")
            .await
            .expect_err("disabled")
            .into();
        assert_eq!(
            (e.code, e.exit),
            ("image_not_ready", kiln::cli::Exit::Conflict)
        );
    });
}

#[test]
fn bad_names_and_out_of_range_defaults_are_bad_input_and_change_nothing() {
    let f = fixture();
    let s = f.snap("1");
    for bad in [
        "",
        "Upper",
        "-lead",
        ".dot",
        "has space",
        "a/b",
        "ünï",
        &"x".repeat(64),
    ] {
        let v = f
            .k("p", &["image", "register", "--", bad, &s])
            .fails(2, "invalid_name");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("msg")
                .contains("[a-z0-9][a-z0-9._-]{0,62}"),
            "{bad}"
        );
    }
    f.k("Bad Project", &["image", "register", "ok", &s])
        .fails(2, "invalid_name");
    assert_eq!(f.k("p", &["image", "ls"]).ok(), json!([]));
    f.k("p", &["image", "register", "ok", &s]).ok();
    for m in ["255", "8193", "0", "100000"] {
        let v = f
            .k("p", &["image", "update", "ok", "--memory-mb", m])
            .fails(2, "out_of_range");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("msg")
                .contains("256 to 8192")
        );
    }
    assert_eq!(
        f.k("p", &["image", "update", "ok", "--memory-mb", "-5"])
            .code,
        2
    );
    f.k("p", &["image", "update", "ok", "--ttl-seconds", "0"])
        .fails(2, "out_of_range");
    let d = f.k("p", &["image", "describe", "ok"]).ok();
    assert_eq!(d["memory_mb"], 1024);
    for (m, ok) in [("256", true), ("8192", true)] {
        assert_eq!(
            f.k("p", &["image", "update", "ok", "--memory-mb", m]).code == 0,
            ok
        );
    }
    let d = f
        .k(
            "p",
            &[
                "image",
                "update",
                "ok",
                "--ttl-seconds",
                "600",
                "--readiness-port",
                "8080",
                "--enabled",
                "false",
            ],
        )
        .ok();
    assert_eq!(
        (
            d["memory_mb"].clone(),
            d["ttl_seconds"].clone(),
            d["readiness_port"].clone(),
            d["enabled"].clone()
        ),
        (json!(8192), json!(600), json!(8080), json!(false))
    );
}

#[test]
fn gc_removes_snapshots_nothing_names_and_keeps_named_and_history_ones() {
    let f = fixture();
    let (named, old, loose, dropped) = (f.snap("1"), f.snap("2"), f.snap("3"), f.snap("4"));
    f.k("p", &["image", "register", "app", &old]).ok();
    f.k("p", &["image", "register", "app", &named]).ok();
    f.k("p", &["image", "register", "gone", &dropped]).ok();
    f.k("p", &["image", "rm", "gone"]).ok();
    // Within the grace period an unnamed snapshot stays (it may be about to be registered).
    let v = f.k("p", &["gc"]).ok();
    assert_eq!(v["removed_snapshots"], json!([]));
    let v = f.k("p", &["gc", "--grace-seconds", "0"]).ok();
    let mut removed: Vec<&str> = v["removed_snapshots"]
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["snapshot_id"].as_str().expect("id"))
        .collect();
    removed.sort();
    let mut want = vec![loose.as_str(), dropped.as_str()];
    want.sort();
    assert_eq!(removed, want);
    for s in [&loose, &dropped] {
        assert!(!f.home.join("snapshots-v1").join(s).exists());
        f.k("p", &["snapshot", "describe", s])
            .fails(3, "snapshot_not_found");
    }
    for s in [&named, &old] {
        assert!(disk_of(&f.home, s).exists());
    }
    // The rollback target survived.
    f.k("p", &["image", "register", "app", &old]).ok();
}

#[test]
fn gc_removes_stray_files_partial_disks_and_dead_pending_rows() {
    let f = fixture();
    let s = f.snap("1");
    f.k("p", &["image", "register", "app", &s]).ok();
    let store = f.home.join("snapshots-v1");
    std::fs::write(store.join("junk"), b"x").expect("write");
    std::fs::write(store.join(&s).join("disk.ext4.partial"), b"x").expect("write");
    let orphan = kiln::snapshot::SnapshotId::generate();
    std::fs::create_dir_all(store.join(orphan.as_str())).expect("mkdir");
    std::fs::write(store.join(orphan.as_str()).join("disk.ext4"), b"x").expect("write");
    // A Pending row of a process that is gone (pid 1's start time is never 1).
    let dead = f.registry(async |r| {
        let id = kiln::snapshot::SnapshotId::generate();
        r.snapshot_begin(&id, 16, None, registry::Owner { pid: 1, start: 1 })
            .await
            .expect("begin");
        id
    });
    std::fs::create_dir_all(store.join(dead.as_str())).expect("mkdir");
    std::fs::write(store.join(dead.as_str()).join("disk.ext4.partial"), b"x").expect("write");
    // A Pending row of a live process (this one) is left alone.
    let live = f.registry(async |r| {
        let id = kiln::snapshot::SnapshotId::generate();
        r.snapshot_begin(&id, 16, None, registry::Owner::current())
            .await
            .expect("begin");
        id
    });
    std::fs::create_dir_all(store.join(live.as_str())).expect("mkdir");
    std::fs::write(store.join(live.as_str()).join("disk.ext4.partial"), b"x").expect("write");
    let tmp = f.home.join("tmp");
    std::fs::create_dir_all(tmp.join("kiln-1-1-unpack")).expect("mkdir");
    let v = f.k("p", &["gc"]).ok();
    assert_eq!(
        v["removed_snapshots"],
        json!([{"snapshot_id": dead.as_str(), "reason": "interrupted"}]),
        "{v}"
    );
    let mut left = store_entries(&f.home);
    left.sort();
    let mut want = vec![s.clone(), live.to_string()];
    want.sort();
    assert_eq!(left, want);
    assert!(!store.join(&s).join("disk.ext4.partial").exists());
    assert!(store.join(live.as_str()).join("disk.ext4.partial").exists());
    assert!(!tmp.join("kiln-1-1-unpack").exists());
    f.k("p", &["snapshot", "describe", dead.as_str()])
        .fails(3, "snapshot_not_found");
    assert_eq!(
        f.k("p", &["snapshot", "describe", live.as_str()]).ok()["status"],
        "Pending"
    );
}

/// `kiln` in text mode, with ids, digests, times and the home masked.
fn text(f: &Fixture, project: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(&f.home)
        .args(["--project", project])
        .args(args)
        .env_remove("KILN_LOG")
        .env("NO_COLOR", "1")
        .output()
        .expect("kiln runs");
    let raw = format!(
        "$ kiln {}\nexit: {}\n{}{}",
        args.join(" "),
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let home = f.home.display().to_string();
    let masks = [
        (r"snap_[0-9A-Z]{26}", "snap_[ID]"),
        (r"img_[0-9A-Z]{26}", "img_[ID]"),
        (r"[0-9a-f]{64}", "[SHA256]"),
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", "[TIME]"),
    ];
    let mut s = raw.replace(&home, "[HOME]");
    for (re, with) in masks {
        s = regex::Regex::new(re)
            .expect("regex")
            .replace_all(&s, with)
            .into_owned();
    }
    s
}

#[test]
fn text_output_of_names_and_their_errors_reads_well() {
    let f = fixture();
    let (s1, s2) = (f.snap("1"), f.snap("2"));
    let mut all = String::new();
    for (project, args) in [
        ("web", vec!["image", "register", "site", s1.as_str()]),
        ("web", vec!["image", "register", "site", s2.as_str()]),
        (
            "web",
            vec!["image", "register", "shared", s1.as_str(), "--public"],
        ),
        (
            "api",
            vec!["image", "register", "shared", s2.as_str(), "--public"],
        ),
        ("api", vec!["image", "ls"]),
        ("web", vec!["image", "describe", "site"]),
        ("web", vec!["image", "history", "site"]),
        ("web", vec!["image", "update", "site", "--memory-mb", "100"]),
        ("web", vec!["image", "register", "Bad_Name", s1.as_str()]),
        (
            "web",
            vec!["image", "register", "x", "snap_01J00000000000000000000000"],
        ),
        ("api", vec!["image", "describe", "site"]),
        ("web", vec!["image", "rm", "site"]),
    ] {
        all.push_str(&text(&f, project, &args));
        all.push('\n');
    }
    insta::assert_snapshot!(all);
}
