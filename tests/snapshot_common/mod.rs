//! Helpers for the snapshot and registry tests: running the real `kiln`, generating root trees,
//! and reading disks back. Tools the tests need are required loudly, never skipped.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One run of the binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout as JSON (the run used `--json`).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }

    /// Asserts success and returns the JSON.
    pub fn ok(&self) -> Value {
        assert_eq!(self.code, 0, "{self}");
        self.json()
    }

    /// Asserts the exit code and the error code of the JSON error object.
    pub fn fails(&self, exit: i32, code: &str) -> Value {
        assert_eq!(self.code, exit, "{self}");
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{self}");
        v
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

/// `kiln --home HOME --project PROJECT --json ARGS…`.
pub fn kiln_cmd(home: &Path, project: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--home")
        .arg(home)
        .args(["--project", project, "--json"])
        .args(args)
        .env_remove("KILN_LOG")
        .env_remove("SOURCE_DATE_EPOCH")
        .env("NO_COLOR", "1");
    c
}

/// Runs `kiln` and waits.
pub fn kiln(home: &Path, project: &str, args: &[&str]) -> Run {
    let out = kiln_cmd(home, project, args).output().expect("kiln runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Imports `src` and returns `(snapshot_id, sha256)`.
pub fn import(home: &Path, src: &Path, disk_mb: u64) -> (String, String) {
    let v = kiln(
        home,
        "default",
        &[
            "snapshot",
            "import",
            src.to_str().expect("utf-8"),
            "--disk_mb",
            &disk_mb.to_string(),
        ],
    )
    .ok();
    assert_eq!(v["status"], "Completed", "{v}");
    (
        v["snapshot_id"].as_str().expect("id").to_string(),
        v["sha256"].as_str().expect("sha").to_string(),
    )
}

/// Fails loudly when a tool the test needs is missing (scripts/test.sh installs them).
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(name).is_file());
    assert!(
        found,
        "{name} is required by this test: apt-get install it (scripts/test.sh does)"
    );
}

/// Fails loudly unless running as root (owners, device nodes and loop mounts need it).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests make device nodes and set owners: run them as root (CI does)"
    );
}

/// A disk's digest by its plain definition (README: SHA-256 over the SHA-256 of each 4 MiB
/// block, the last one shorter), read byte by byte with no knowledge of holes: the oracle for
/// the digest Kiln computes while it writes.
pub fn disk_digest(p: &Path) -> String {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(p).expect("open");
    let mut outer = sha2::Sha256::new();
    let mut block = Vec::with_capacity(4 << 20);
    loop {
        block.clear();
        if (&mut f)
            .take(4 << 20)
            .read_to_end(&mut block)
            .expect("read")
            == 0
        {
            break;
        }
        outer.update(sha2::Sha256::digest(&block));
    }
    hex::encode(outer.finalize())
}

/// sha256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(p).expect("open");
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

fn set_mtime(p: &Path, secs: i64, nanos: i64) {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(secs, nanos);
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .expect("utimensat");
}

/// A small root tree with every kind of thing a rootfs holds: owners, setuid/setgid/sticky
/// modes, xattrs (user, trusted, security.capability), hard links, symlinks (one dangling),
/// character and block devices, a FIFO, nanosecond mtimes, long and odd names, empty files and
/// directories. With `sparse`, also a 64 MiB sparse file; with `socket`, a unix socket.
pub fn make_tree(root: &Path, sparse: bool, socket: bool) {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    use std::os::unix::fs::{PermissionsExt, symlink};
    let p = |s: &str| root.join(s);
    for d in [
        "bin",
        "etc/ssl",
        "dev",
        "tmp",
        "usr/lib",
        "var/empty",
        "home/user",
    ] {
        std::fs::create_dir_all(p(d)).expect("mkdir");
    }
    std::fs::write(p("etc/hostname"), b"kiln\n").expect("write");
    std::fs::write(p("etc/empty"), b"").expect("write");
    std::fs::write(p("bin/tool"), vec![7u8; 70_000]).expect("write");
    std::fs::hard_link(p("bin/tool"), p("usr/lib/tool-link")).expect("link");
    std::fs::hard_link(p("bin/tool"), p("bin/tool2")).expect("link");
    std::fs::set_permissions(p("bin/tool"), std::fs::Permissions::from_mode(0o4755))
        .expect("chmod");
    std::fs::write(p("bin/sgid"), b"#!/bin/sh\n").expect("write");
    std::fs::set_permissions(p("bin/sgid"), std::fs::Permissions::from_mode(0o2711))
        .expect("chmod");
    std::fs::set_permissions(p("tmp"), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    symlink("../bin/tool", p("etc/rel-link")).expect("symlink");
    symlink("/does/not/exist", p("etc/dangling")).expect("symlink");
    symlink("a".repeat(200), p("etc/long-target")).expect("symlink");
    mknod(
        &p("dev/null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .expect("mknod");
    mknod(
        &p("dev/loop9"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(7, 9),
    )
    .expect("mknod");
    mknod(
        &p("dev/big"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(300, 70_000),
    )
    .expect("mknod");
    nix::unistd::mkfifo(&p("dev/fifo"), Mode::from_bits_truncate(0o644)).expect("mkfifo");
    std::fs::write(p("home/user/owned"), b"mine").expect("write");
    std::os::unix::fs::lchown(p("home/user/owned"), Some(1234), Some(5678)).expect("chown");
    std::os::unix::fs::lchown(p("home/user"), Some(1000), Some(1000)).expect("chown");
    std::os::unix::fs::lchown(p("etc/dangling"), Some(42), Some(43)).expect("lchown");
    xattr::set(p("home/user/owned"), "user.kiln", b"hello").expect("xattr");
    xattr::set(p("home/user/owned"), "trusted.overlay.x", b"y").expect("xattr");
    // cap_net_raw+ep, as setcap writes it (VFS_CAP_REVISION_2).
    let cap: [u8; 20] = [
        0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    xattr::set(p("bin/tool"), "security.capability", &cap).expect("xattr");
    xattr::set(p("etc"), "user.dir", b"d").expect("xattr");
    std::fs::write(p(&format!("var/{}", "n".repeat(250))), b"long name").expect("write");
    std::fs::write(p("var/sp ace-ü"), b"odd name").expect("write");
    for i in 0..300 {
        std::fs::write(p(&format!("usr/lib/f{i:04}")), format!("{i}")).expect("write");
    }
    if sparse {
        let f = std::fs::File::create(p("var/sparse")).expect("create");
        f.set_len(64 << 20).expect("set_len");
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"end", (64 << 20) - 3).expect("write");
        f.write_all_at(b"start", 0).expect("write");
    }
    if socket {
        let s = std::os::unix::net::UnixListener::bind(p("tmp/sock")).expect("bind");
        drop(s);
    }
    // Fixed, nanosecond mtimes everywhere, deepest first so parents keep theirs.
    let mut all: Vec<PathBuf> = walk(root).into_keys().map(|k| root.join(k)).collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, path) in all.iter().enumerate() {
        set_mtime(path, 1_600_000_000 + i as i64, 123_456_789);
    }
    set_mtime(root, 1_600_000_000, 5);
}

/// Everything about one entry that a root disk must keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub nlink: u64,
    pub rdev: u64,
    pub target: Option<String>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub sha: Option<String>,
}

/// A walk of `root` (relative paths, `lost+found` at the top left out), lstat-exact.
pub fn walk(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let e = e.expect("entry");
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .expect("prefix")
                .to_string_lossy()
                .into_owned();
            if rel == "lost+found" {
                continue;
            }
            let md = std::fs::symlink_metadata(&path).expect("lstat");
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push(path.clone());
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_file() {
                'f'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else if ft.is_fifo() {
                'p'
            } else {
                's'
            };
            let xattrs = xattr::list(&path)
                .expect("listxattr")
                .map(|n| {
                    let v = xattr::get(&path, &n).expect("getxattr").unwrap_or_default();
                    (n.to_string_lossy().into_owned(), v)
                })
                .collect();
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if kind == 'd' { 0 } else { md.len() },
                    mtime: (md.mtime(), md.mtime_nsec()),
                    nlink: if kind == 'd' { 0 } else { md.nlink() },
                    rdev: md.rdev(),
                    target: (kind == 'l').then(|| {
                        std::fs::read_link(&path)
                            .expect("readlink")
                            .to_string_lossy()
                            .into_owned()
                    }),
                    xattrs,
                    sha: (kind == 'f').then(|| sha256_file(&path)),
                },
            );
        }
    }
    out
}

/// A read-only loop mount, unmounted on drop.
pub struct Mounted {
    pub dir: tempfile::TempDir,
}

impl Mounted {
    pub fn new(disk: &Path) -> Mounted {
        require_tool("mount");
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Command::new("mount")
            .args(["-o", "loop,ro", "-t", "ext4"])
            .arg(disk)
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(st.success(), "mount -o loop,ro {} failed", disk.display());
        Mounted { dir }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// `e2fsck -fn` must pass.
pub fn fsck(disk: &Path) {
    require_tool("e2fsck");
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(disk)
        .output()
        .expect("e2fsck runs");
    assert!(
        out.status.success(),
        "e2fsck -fn {} failed:\n{}{}",
        disk.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The disk path of a Completed snapshot.
pub fn disk_of(home: &Path, id: &str) -> PathBuf {
    home.join("snapshots-v1").join(id).join("disk.ext4")
}

/// Entries in the snapshot store (names only).
pub fn store_entries(home: &Path) -> Vec<String> {
    match std::fs::read_dir(home.join("snapshots-v1")) {
        Ok(rd) => rd
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}
