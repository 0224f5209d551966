//! `kiln snapshot …` against the real binary: fidelity (checked through a loop mount and
//! e2fsck, not through Kiln's own reader), reproducibility, sizing, bad input.

mod snapshot_common;

use snapshot_common::*;
use std::path::Path;

fn home() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn imported_disk_keeps_owners_modes_xattrs_links_devices_fifos_sockets_and_holes() {
    require_root();
    let t = home();
    let src = t.path().join("tree");
    make_tree(&src, true, true);
    let (id, sha) = import(&t.path().join("home"), &src, 256);
    let disk = disk_of(&t.path().join("home"), &id);
    fsck(&disk);
    assert_eq!(
        disk_digest(&disk),
        sha,
        "the recorded sha256 is the file's digest"
    );
    let m = Mounted::new(&disk);
    let want = walk(&src);
    let got = walk(m.dir.path());
    assert_eq!(want.len(), got.len());
    for (path, w) in &want {
        let g = got
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from the disk"));
        assert_eq!(g, w, "{path}");
    }
    // The root directory's own metadata.
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (
        std::fs::metadata(&src).expect("stat"),
        std::fs::metadata(m.dir.path()).expect("stat"),
    );
    assert_eq!(
        (a.mode(), a.uid(), a.mtime(), a.mtime_nsec()),
        (b.mode(), b.uid(), b.mtime(), b.mtime_nsec())
    );
    // The 64 MiB sparse file stays sparse inside the image.
    let sp = std::fs::metadata(m.dir.path().join("var/sparse")).expect("stat");
    assert!(sp.blocks() * 512 <= 64 * 1024, "{} blocks", sp.blocks());
}

#[test]
fn importing_the_same_tree_twice_gives_the_same_sha256() {
    require_root();
    let t = home();
    let src = t.path().join("tree");
    make_tree(&src, true, true);
    let h = t.path().join("home");
    let (a, sha_a) = import(&h, &src, 128);
    // Reading the tree changed atimes; that must not reach the disk.
    let (b, sha_b) = import(&h, &src, 128);
    assert_ne!(a, b);
    assert_eq!(sha_a, sha_b);
    assert_eq!(disk_digest(&disk_of(&h, &b)), sha_b);
    // Another home, another time: still the same bytes.
    let (_, sha_c) = import(&t.path().join("home2"), &src, 128);
    assert_eq!(sha_a, sha_c);
    // One changed mode changes the disk.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        src.join("etc/hostname"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let (_, sha_d) = import(&h, &src, 128);
    assert_ne!(sha_a, sha_d);
}

#[test]
fn disk_is_sparse_sized_to_disk_mb_and_described_as_cli_md_says() {
    require_root();
    let t = home();
    let src = t.path().join("tree");
    make_tree(&src, false, false);
    let h = t.path().join("home");
    let (id, sha) = import(&h, &src, 2048);
    let disk = disk_of(&h, &id);
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&disk).expect("stat");
    assert_eq!(md.len(), 2048 << 20);
    assert!(
        md.blocks() * 512 < 64 << 20,
        "allocated {}",
        md.blocks() * 512
    );
    let v = kiln(&h, "default", &["snapshot", "describe", &id]).ok();
    let keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "created_at",
            "disk_mb",
            "parent",
            "sha256",
            "size_bytes",
            "snapshot_id",
            "snapshot_uri",
            "status"
        ]
    );
    assert_eq!(v["sha256"], sha);
    // The README's check of the digest, with coreutils and xxd.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("split -b 4M --filter=sha256sum \"$1\" | cut -c1-64 | xxd -r -p | sha256sum")
        .arg("sh")
        .arg(&disk)
        .output()
        .expect("sh (xxd: apt-get install xxd)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some(sha.as_str()),
        "the README's shell check of the digest"
    );
    assert_eq!(v["disk_mb"], 2048);
    assert_eq!(v["size_bytes"], md.blocks() * 512);
    assert_eq!(v["parent"], serde_json::Value::Null);
    let uri = v["snapshot_uri"].as_str().expect("uri");
    assert_eq!(uri, format!("file://{}", disk.display()));
    let ls = kiln(&h, "default", &["snapshot", "ls"]).ok();
    assert_eq!(ls.as_array().expect("array").len(), 1);
    assert_eq!(ls[0], v);
}

#[test]
fn exported_tar_imports_to_a_byte_identical_disk() {
    require_root();
    let t = home();
    let src = t.path().join("tree");
    // No holes (a tar has none) and no socket (a tar cannot hold one).
    make_tree(&src, false, false);
    let h = t.path().join("home");
    let (id, sha) = import(&h, &src, 128);
    let tar = t.path().join("out.tar");
    let v = kiln(
        &h,
        "default",
        &[
            "snapshot",
            "export",
            &id,
            "-o",
            tar.to_str().expect("utf-8"),
        ],
    )
    .ok();
    assert_eq!(v["snapshot_id"], id);
    let (_, sha_tar) = import(&h, &tar, 128);
    assert_eq!(sha, sha_tar);
    // And GNU tar reads the export with numeric owners and xattrs.
    require_tool("tar");
    let x = t.path().join("x");
    std::fs::create_dir(&x).expect("mkdir");
    let st = std::process::Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(&tar)
        .arg("-C")
        .arg(&x)
        .status()
        .expect("tar runs");
    assert!(st.success());
    let (w, g) = (walk(&src), walk(&x));
    for (path, e) in &w {
        let ge = &g[path];
        assert_eq!(
            (
                ge.kind, ge.mode, ge.uid, ge.gid, &ge.sha, &ge.target, &ge.xattrs
            ),
            (e.kind, e.mode, e.uid, e.gid, &e.sha, &e.target, &e.xattrs),
            "{path}"
        );
    }
}

#[test]
fn source_date_epoch_clamps_mtimes_and_fixes_the_disk() {
    require_root();
    let t = home();
    let src = t.path().join("tree");
    make_tree(&src, false, false);
    let h = t.path().join("home");
    let run = |epoch: &str| {
        let out = kiln_cmd(
            &h,
            "default",
            &[
                "snapshot",
                "import",
                src.to_str().expect("utf-8"),
                "--disk_mb",
                "64",
            ],
        )
        .env("SOURCE_DATE_EPOCH", epoch)
        .output()
        .expect("kiln");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        (
            v["snapshot_id"].as_str().expect("id").to_string(),
            v["sha256"].as_str().expect("sha").to_string(),
        )
    };
    let (id, a) = run("1000000000");
    let (_, b) = run("1000000000");
    let (_, c) = run("1000000001");
    assert_eq!(a, b);
    assert_ne!(a, c);
    let m = Mounted::new(&disk_of(&h, &id));
    for (path, e) in walk(m.dir.path()) {
        assert_eq!(e.mtime, (1_000_000_000, 0), "{path}");
    }
    let bad = kiln_cmd(
        &h,
        "default",
        &["snapshot", "import", src.to_str().expect("utf-8")],
    )
    .env("SOURCE_DATE_EPOCH", "yesterday")
    .output()
    .expect("kiln");
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn tree_larger_than_disk_mb_fails_with_the_size_needed_and_leaves_nothing() {
    let t = home();
    let src = t.path().join("tree");
    std::fs::create_dir_all(&src).expect("mkdir");
    // 40 MiB of incompressible data; ext4 cannot hide it.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..40 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(src.join("big"), &data).expect("write");
    let h = t.path().join("home");
    let r = kiln(
        &h,
        "default",
        &[
            "snapshot",
            "import",
            src.to_str().expect("utf-8"),
            "--disk_mb",
            "16",
        ],
    );
    let v = r.fails(2, "disk_too_small");
    let msg = v["error"]["message"].as_str().expect("message");
    let needed: u64 = msg
        .split("at least ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {msg:?}"));
    assert!(needed > 40, "{msg}");
    assert!(msg.contains("disk_mb is 16"), "{msg}");
    assert!(
        v["error"]["hint"]
            .as_str()
            .expect("hint")
            .contains(&format!("--disk_mb {needed}"))
    );
    // Nothing recorded, nothing on disk.
    assert_eq!(
        kiln(&h, "default", &["snapshot", "ls"]).ok(),
        serde_json::json!([])
    );
    assert!(store_entries(&h).is_empty(), "{:?}", store_entries(&h));
    // The size it names is enough, and one less is not.
    let (id, _) = import(&h, &src, needed);
    fsck(&disk_of(&h, &id));
    let r = kiln(
        &h,
        "default",
        &[
            "snapshot",
            "import",
            src.to_str().expect("utf-8"),
            "--disk_mb",
            &(needed - 1).to_string(),
        ],
    );
    r.fails(2, "disk_too_small");
}

/// One raw tar entry: name, type, link name, data.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

fn raw_tar(entries: &[RawEntry]) -> Vec<u8> {
    // Raw GNU headers: tar-rs refuses to *write* `..`, which is what these tests need.
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name);
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn tar_with_escaping_paths_is_rejected_and_leaves_nothing() {
    let t = home();
    let h = t.path().join("home");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            raw_tar(&[(b"../evil", tar::EntryType::Regular, b"", b"x")]),
        ),
        (
            "inner",
            raw_tar(&[(b"a/../../evil", tar::EntryType::Regular, b"", b"x")]),
        ),
        (
            "hardlink",
            raw_tar(&[
                (b"ok", tar::EntryType::Regular, b"", b"x"),
                (b"h", tar::EntryType::Link, b"../../etc/passwd", b""),
            ]),
        ),
    ];
    for (case, bytes) in cases {
        let tar = t.path().join(format!("{case}.tar"));
        std::fs::write(&tar, bytes).expect("write");
        let r = kiln(
            &h,
            "default",
            &[
                "snapshot",
                "import",
                tar.to_str().expect("utf-8"),
                "--disk_mb",
                "16",
            ],
        );
        let v = r.fails(2, "escaping_path");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("msg")
                .contains("escapes the root"),
            "{case}: {r}"
        );
        assert!(
            !t.path().join("evil").exists()
                && !t.path().parent().expect("parent").join("evil").exists()
        );
    }
    assert_eq!(
        kiln(&h, "default", &["snapshot", "ls"]).ok(),
        serde_json::json!([])
    );
    assert!(store_entries(&h).is_empty());
}

#[test]
fn tar_with_a_path_through_a_symlink_is_rejected_not_followed() {
    let t = home();
    let h = t.path().join("home");
    let tar = t.path().join("t.tar");
    std::fs::write(
        &tar,
        raw_tar(&[
            (b"link", tar::EntryType::Symlink, b"/etc", b""),
            (b"link/passwd", tar::EntryType::Regular, b"", b"pwned"),
        ]),
    )
    .expect("write");
    let r = kiln(
        &h,
        "default",
        &[
            "snapshot",
            "import",
            tar.to_str().expect("utf-8"),
            "--disk_mb",
            "16",
        ],
    );
    r.fails(2, "unsupported_tree");
    assert!(store_entries(&h).is_empty());
}

#[test]
fn unreadable_directory_is_bad_input_and_leaves_nothing() {
    require_root();
    require_tool("setpriv");
    let t = home();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let src = t.path().join("tree");
    std::fs::create_dir_all(src.join("secret")).expect("mkdir");
    std::fs::write(src.join("secret/x"), b"x").expect("write");
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    let h = t.path().join("home");
    std::fs::create_dir(&h).expect("mkdir");
    std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    // As nobody, `secret/` cannot be listed.
    // A copy of the binary nobody can run, wherever the build tree is (CI may build under a
    // directory only root can enter).
    let bin = t.path().join("kiln");
    std::fs::copy(env!("CARGO_BIN_EXE_kiln"), &bin).expect("copy kiln");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .arg("--home")
        .arg(&h)
        .args(["--json", "snapshot", "import"])
        .arg(&src)
        .args(["--disk_mb", "16"])
        .output()
        .expect("setpriv runs");
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let v = r.fails(2, "unreadable_input");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("secret"),
        "{r}"
    );
    assert!(store_entries(&h).is_empty());
    assert_eq!(
        kiln(&h, "default", &["snapshot", "ls"]).ok(),
        serde_json::json!([])
    );
}

#[test]
fn missing_source_bad_disk_mb_and_unknown_ids_have_their_exit_codes() {
    let t = home();
    let h = t.path().join("home");
    kiln(&h, "default", &["snapshot", "import", "/nonexistent/tree"]).fails(2, "unreadable_input");
    let src = t.path().join("tree");
    std::fs::create_dir(&src).expect("mkdir");
    kiln(
        &h,
        "default",
        &[
            "snapshot",
            "import",
            src.to_str().expect("utf-8"),
            "--disk-mb",
            "0",
        ],
    )
    .fails(2, "usage");
    let ghost = "snap_01J00000000000000000000000";
    kiln(&h, "default", &["snapshot", "describe", ghost]).fails(3, "snapshot_not_found");
    kiln(&h, "default", &["snapshot", "rm", ghost]).fails(3, "snapshot_not_found");
    let out = t.path().join("o.tar");
    kiln(
        &h,
        "default",
        &[
            "snapshot",
            "export",
            ghost,
            "-o",
            out.to_str().expect("utf-8"),
        ],
    )
    .fails(3, "snapshot_not_found");
    assert!(!out.exists());
}

#[test]
fn snapshot_rm_refuses_a_named_snapshot_and_removes_an_unnamed_one() {
    let t = home();
    let h = t.path().join("home");
    let src = t.path().join("tree");
    std::fs::create_dir_all(src.join("etc")).expect("mkdir");
    std::fs::write(src.join("etc/os-release"), b"ID=kiln\n").expect("write");
    let (id, _) = import(&h, &src, 16);
    kiln(&h, "default", &["image", "register", "app", &id]).ok();
    let v = kiln(&h, "default", &["snapshot", "rm", &id]).fails(4, "snapshot_in_use");
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("default/app")
    );
    kiln(&h, "default", &["image", "rm", "app"]).ok();
    kiln(&h, "default", &["snapshot", "rm", &id]).ok();
    assert!(!disk_of(&h, &id).exists());
    kiln(&h, "default", &["snapshot", "describe", &id]).fails(3, "snapshot_not_found");
}

/// The reproducibility promise on a real Debian root: `mmdebstrap --variant=minbase` from the
/// machine's configured mirror, imported twice at the default size.
#[test]
fn debian_minbase_imports_to_the_same_sha256_twice() {
    require_root();
    require_tool("mmdebstrap");
    let t = home();
    let root = t.path().join("minbase");
    let sources = apt_sources();
    let st = std::process::Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--variant=minbase",
            "--customize-hook=rm -f \"$1\"/etc/resolv.conf \"$1\"/etc/hostname",
            "bookworm",
        ])
        .arg(&root)
        .arg(&sources)
        .status()
        .expect("mmdebstrap runs");
    assert!(
        st.success(),
        "mmdebstrap failed (it needs the Debian package mirror)"
    );
    let h = t.path().join("home");
    let (a, sha_a) = import(&h, &root, 10240);
    let (_, sha_b) = import(&h, &root, 10240);
    assert_eq!(sha_a, sha_b);
    fsck(&disk_of(&h, &a));
    let m = Mounted::new(&disk_of(&h, &a));
    let (want, got) = (walk(&root), walk(m.dir.path()));
    assert_eq!(want.len(), got.len());
    for (path, w) in &want {
        assert_eq!(&got[path], w, "{path}");
    }
}

/// The host's apt source list, as envlab.md §3 passes it to mmdebstrap.
fn apt_sources() -> std::path::PathBuf {
    let out = std::process::Command::new("apt-config")
        .args(["shell", "D", "Dir::Etc::sourceparts/d"])
        .output()
        .expect("apt-config runs");
    let s = String::from_utf8_lossy(&out.stdout);
    let dir = s
        .split('\'')
        .nth(1)
        .unwrap_or("/etc/apt/sources.list.d/")
        .to_string();
    let p = Path::new(&dir).join("debian.sources");
    if p.is_file() {
        p
    } else {
        Path::new("/etc/apt/sources.list").to_path_buf()
    }
}

#[test]
fn a_directory_of_twenty_thousand_entries_gets_a_valid_htree() {
    // The case that makes `mkfs.ext4 -d` quadratic (envlab.md §4); the image must stay exact.
    let t = home();
    let src = t.path().join("tree");
    let flat = src.join("flat");
    std::fs::create_dir_all(&flat).expect("mkdir");
    for i in 0..20_000 {
        std::fs::write(flat.join(format!("entry-{i:05}")), []).expect("write");
    }
    let h = t.path().join("home");
    let (id, _) = import(&h, &src, 256);
    let disk = disk_of(&h, &id);
    fsck(&disk);
    let m = Mounted::new(&disk);
    let n = std::fs::read_dir(m.dir.path().join("flat"))
        .expect("read_dir")
        .count();
    assert_eq!(n, 20_000);
    // Lookups go through the htree.
    for i in [0, 7_777, 19_999] {
        assert!(
            m.dir.path().join(format!("flat/entry-{i:05}")).is_file(),
            "{i}"
        );
    }
    assert!(!m.dir.path().join("flat/entry-20000").exists());
}
