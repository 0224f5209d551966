//! Crash safety: `kiln snapshot import` + `kiln image register` killed with SIGKILL at random
//! moments, 50 times. Afterwards every name points to a Completed snapshot whose disk exists
//! with the recorded sha256, and `kiln gc` leaves no orphan behind.

mod snapshot_common;

use kiln::registry::{self, Registry};
use kiln::snapshot::SnapshotState;
use snapshot_common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// xorshift64*: a fixed seed keeps the kill schedule the same from run to run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// Runs `kiln`, killing it with SIGKILL after `after` if it is still running. Returns stdout
/// when it finished on its own.
fn run_or_kill(
    home: &Path,
    project: &str,
    args: &[&str],
    after: Duration,
) -> Option<(i32, String)> {
    let mut child = kiln_cmd(home, project, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn kiln");
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            let mut out = String::new();
            use std::io::Read;
            child
                .stdout
                .take()
                .expect("stdout")
                .read_to_string(&mut out)
                .expect("read");
            return Some((st.code().unwrap_or(-1), out));
        }
        if start.elapsed() >= after {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
}

fn timed(home: &Path, args: &[&str]) -> (Duration, String) {
    let t = Instant::now();
    let (code, out) = run_or_kill(home, "p", args, Duration::from_secs(120)).expect("finishes");
    assert_eq!(code, 0, "{out}");
    (t.elapsed(), out)
}

#[test]
fn sigkill_at_random_moments_of_import_and_register_never_leaves_a_broken_name_and_gc_cleans_up() {
    let t = tempfile::tempdir().expect("tempdir");
    let home = t.path().join("home");
    let tree = t.path().join("tree");
    std::fs::create_dir_all(tree.join("data")).expect("mkdir");
    for i in 0..200 {
        std::fs::write(
            tree.join("data").join(format!("f{i}")),
            vec![i as u8; 4096 + i],
        )
        .expect("write");
    }
    std::fs::write(tree.join("data/big"), vec![0xa5u8; 3 << 20]).expect("write");
    let src = tree.to_str().expect("utf-8");

    // How long each step takes here, so kills land anywhere inside it.
    let (t_import, out) = timed(&home, &["snapshot", "import", src, "--disk_mb", "64"]);
    let first: serde_json::Value = serde_json::from_str(&out).expect("json");
    let first_id = first["snapshot_id"].as_str().expect("id").to_string();
    let (t_register, _) = timed(&home, &["image", "register", "n0", &first_id]);

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut killed_import, mut killed_register, mut completed) = (0, 0, 0);
    for i in 0..50 {
        std::fs::write(tree.join("data/round"), format!("{i}")).expect("write");
        let budget = t_import.as_micros() as u64 * 12 / 10;
        let after = Duration::from_micros(rng.below(budget));
        let Some((code, out)) = run_or_kill(
            &home,
            "p",
            &["snapshot", "import", src, "--disk_mb", "64"],
            after,
        ) else {
            killed_import += 1;
            continue;
        };
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let id = v["snapshot_id"].as_str().expect("id").to_string();
        let name = format!("n{}", i % 4);
        let budget = t_register.as_micros() as u64 * 12 / 10;
        let after = Duration::from_micros(rng.below(budget));
        match run_or_kill(&home, "p", &["image", "register", &name, &id], after) {
            None => killed_register += 1,
            Some((code, out)) => {
                assert_eq!(code, 0, "{out}");
                completed += 1;
            }
        }
    }
    eprintln!(
        "killed {killed_import} imports and {killed_register} registrations; {completed} ran to the end"
    );
    assert!(
        killed_import > 0 && killed_register > 0,
        "the schedule must kill both steps"
    );

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let check_names = || {
        rt.block_on(async {
            let reg = Registry::open(&home.join("kiln.db")).await.expect("open");
            let p = registry::project("p").expect("project");
            let images = reg.list(&p).await.expect("list");
            assert!(!images.is_empty());
            for img in images {
                let SnapshotState::Completed { uri, sha256, .. } = &img.snapshot.state else {
                    panic!(
                        "{} points at a {} snapshot",
                        img.name,
                        img.snapshot.state.name()
                    );
                };
                let path = kiln::snapshot::store::uri_path(uri).expect("file uri");
                assert!(
                    path.is_file(),
                    "{}: {} is missing",
                    img.name,
                    path.display()
                );
                assert_eq!(
                    &disk_digest(&path),
                    sha256,
                    "{}: the disk is not what was recorded",
                    img.name
                );
                let (_, hist) = reg.history(&p, &img.name).await.expect("history");
                for h in hist {
                    let s = reg
                        .snapshot(&h.snapshot_id)
                        .await
                        .expect("history snapshot exists");
                    assert!(s.state.is_completed());
                }
            }
            reg.close().await;
        })
    };
    check_names();

    kiln(&home, "p", &["gc"]).ok();

    // No orphans: no Pending or Failed rows, no partial files, no directory without a
    // Completed row, nothing in tmp/; every Completed disk is intact.
    rt.block_on(async {
        let reg = Registry::open(&home.join("kiln.db")).await.expect("open");
        let snaps = reg.snapshots().await.expect("snapshots");
        let mut ids = Vec::new();
        for s in &snaps {
            match &s.state {
                SnapshotState::Completed { uri, sha256, .. } => {
                    let path = kiln::snapshot::store::uri_path(uri).expect("file uri");
                    assert_eq!(&disk_digest(&path), sha256);
                    ids.push(s.id.to_string());
                }
                SnapshotState::Pending | SnapshotState::Failed { .. } => {
                    panic!("gc left {} {}", s.state.name(), s.id)
                }
            }
        }
        let mut dirs = store_entries(&home);
        dirs.sort();
        ids.sort();
        assert_eq!(
            dirs, ids,
            "store directories are exactly the Completed snapshots"
        );
        for id in &ids {
            let files: Vec<String> = std::fs::read_dir(home.join("snapshots-v1").join(id))
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(files, ["disk.ext4"], "{id}");
        }
        reg.close().await;
    });
    if let Ok(rd) = std::fs::read_dir(home.join("tmp")) {
        assert_eq!(rd.count(), 0, "tmp/ is empty after gc");
    }
    check_names();
}

#[test]
fn gc_running_beside_imports_never_takes_their_work() {
    let t = tempfile::tempdir().expect("tempdir");
    let home = t.path().join("home");
    let trees: Vec<_> = (0..4)
        .map(|i| {
            let d = t.path().join(format!("tree{i}"));
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("data"), vec![i as u8; 2 << 20]).expect("write");
            d
        })
        .collect();
    kiln(&home, "p", &["image", "ls"]).ok();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (home, stop) = (home.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                kiln(&home, "p", &["gc"]).ok();
                runs += 1;
            }
            runs
        })
    };
    let imports: Vec<_> = trees
        .iter()
        .map(|tree| {
            let (home, tree) = (home.clone(), tree.clone());
            std::thread::spawn(move || (0..6).map(|_| import(&home, &tree, 32)).collect::<Vec<_>>())
        })
        .collect();
    let made: Vec<(String, String)> = imports
        .into_iter()
        .flat_map(|h| h.join().expect("import"))
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = gc.join().expect("gc");
    assert!(runs > 0);
    for (id, sha) in &made {
        let disk = disk_of(&home, id);
        assert!(disk.is_file(), "gc took {id}");
        assert_eq!(&disk_digest(&disk), sha);
        assert_eq!(
            kiln(&home, "p", &["snapshot", "describe", id]).ok()["status"],
            "Completed"
        );
    }
}
