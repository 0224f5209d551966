//! Concurrency: 20 `kiln` processes at once registering overlapping names across 4 projects.
//! Public names stay unique, no registration is lost, and "database is locked" never reaches
//! the user.

mod snapshot_common;

use serde_json::Value;
use snapshot_common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Barrier};

/// One finished registration attempt.
struct Attempt {
    project: String,
    name: String,
    public: bool,
    run: Run,
}

fn spawn_all(home: &Path, jobs: Vec<(String, Vec<String>)>) -> Vec<Run> {
    let barrier = Arc::new(Barrier::new(jobs.len()));
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|(project, args)| {
            let home = home.to_path_buf();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                barrier.wait();
                kiln(&home, &project, &args)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect()
}

fn assert_never_locked(r: &Run) {
    let all = format!("{}{}", r.stdout, r.stderr).to_lowercase();
    assert!(!all.contains("locked") && !all.contains("busy"), "{r}");
}

#[test]
fn twenty_processes_on_a_fresh_home_all_open_and_migrate_it() {
    let t = tempfile::tempdir().expect("tempdir");
    let home = t.path().join("home");
    let jobs = (0..20)
        .map(|i| {
            (
                format!("p{}", i % 4),
                vec!["image".to_string(), "ls".to_string()],
            )
        })
        .collect();
    for r in spawn_all(&home, jobs) {
        assert_never_locked(&r);
        assert_eq!(r.ok(), serde_json::json!([]));
    }
}

#[test]
fn twenty_processes_registering_overlapping_names_across_four_projects_lose_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let home = t.path().join("home");
    let tree = t.path().join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    let snaps: Vec<String> = (0..4)
        .map(|i| {
            std::fs::write(tree.join("tag"), format!("{i}")).expect("write");
            import(&home, &tree, 16).0
        })
        .collect();
    let projects = ["p0", "p1", "p2", "p3"];
    // Three rounds of 20 processes at once: private names every project shares, and public
    // names that several projects race for.
    let mut attempts: Vec<Attempt> = Vec::new();
    for round in 0..3 {
        let mut jobs = Vec::new();
        let mut meta = Vec::new();
        for i in 0..20usize {
            let project = projects[i % 4].to_string();
            let public = i % 5 == 0 || i % 7 == 0;
            let name = if public {
                format!("pub-{}", i % 2)
            } else {
                format!("app-{}", i % 3)
            };
            let snap = &snaps[(i + round) % 4];
            let mut args = vec![
                "image".to_string(),
                "register".into(),
                name.clone(),
                snap.clone(),
            ];
            if public {
                args.push("--public".into());
            }
            jobs.push((project.clone(), args));
            meta.push((project, name, public));
        }
        for ((project, name, public), run) in meta.into_iter().zip(spawn_all(&home, jobs)) {
            assert_never_locked(&run);
            attempts.push(Attempt {
                project,
                name,
                public,
                run,
            });
        }
    }

    // Every attempt either succeeded or lost a public name to another project (exit 4).
    let mut ok: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut public_owner: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for a in &attempts {
        match a.run.code {
            0 => {
                let v = a.run.json();
                assert_eq!(v["project"], a.project.as_str());
                *ok.entry((a.project.clone(), a.name.clone())).or_default() += 1;
                if a.public {
                    public_owner
                        .entry(a.name.clone())
                        .or_default()
                        .insert(a.project.clone());
                }
            }
            4 => {
                assert!(a.public, "only public names conflict: {}", a.run);
                a.run.fails(4, "name_taken");
            }
            _ => panic!("unexpected failure: {}", a.run),
        }
    }
    // Public uniqueness: each public name was won by exactly one project, which is the one
    // every project sees.
    for (name, owners) in &public_owner {
        assert_eq!(owners.len(), 1, "{name} is public in {owners:?}");
        for p in projects {
            let d = kiln(&home, p, &["image", "describe", name]).ok();
            let mine = ok.contains_key(&(p.to_string(), name.clone())) && !owners.contains(p);
            let want = if mine {
                p
            } else {
                owners.iter().next().expect("owner")
            };
            assert_eq!(d["project"], want, "{name} from {p}");
        }
    }
    let ls = kiln(&home, "nobody", &["image", "ls"]).ok();
    let public_names: Vec<&str> = ls
        .as_array()
        .expect("array")
        .iter()
        .map(|i| i["name"].as_str().expect("name"))
        .collect();
    let unique: BTreeSet<&str> = public_names.iter().copied().collect();
    assert_eq!(public_names.len(), unique.len(), "{public_names:?}");
    // No lost update: each name's history has one entry per successful registration, and
    // the name points at the newest entry.
    for ((project, name), n) in &ok {
        let h: Value = kiln(&home, project, &["image", "history", name]).ok();
        let h = h.as_array().expect("array");
        assert_eq!(h.len(), *n, "{project}/{name}");
        let d = kiln(&home, project, &["image", "describe", name]).ok();
        assert_eq!(d["snapshot_id"], h[0]["snapshot_id"], "{project}/{name}");
    }
}
