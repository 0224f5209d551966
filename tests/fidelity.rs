//! Fidelity: every Dockerfile under `tests/fidelity/CASE/` is built by Kiln (`kiln image
//! create`, namespace builder; the cases with RUN steps also with `--builder microvm`, the
//! `microvm_*` tests) and by buildah (`buildah bud --isolation chroot`, vfs storage),
//! both `FROM` the same `kiln/busybox` base served by a `docker-registry` on 127.0.0.1, and the
//! two root trees are compared file by file: paths, types, modes, numeric owners, contents
//! (sha256), symlink targets, xattrs, hard links, and the mtimes of everything that existed
//! before the build (base files, context files, archive members).
//!
//! Kiln's tree is `kiln snapshot export` of the registered snapshot; buildah's is the
//! directory `buildah mount` gives for a container of the built image. The files one tool adds
//! that Docker does not are listed in [`VOLATILE`], each with its reason. Where the two tools
//! disagree, Docker's documented behaviour decides: the case says so in a comment, and where
//! buildah 1.28 (Debian 12) is the one that is wrong or lacks a flag, the instruction has
//! `#buildah-instead: …` lines above it (a comment to Kiln) that buildah runs in its place:
//! Docker's documented result spelled with instructions buildah gets right, the reason in
//! the comment above them.
//!
//! Differences found, and how each was decided (details in the cases' Dockerfiles):
//! - Kiln was wrong, and fixed: RUN's supplementary groups lacked the primary gid
//!   (containerd's ensureAdditionalGids); WORKDIR gave a user name its uid as gid instead of
//!   passwd's group (BuildKit's file ops); a source symlinked to a directory copied nothing;
//!   COPY --from reset the stage's owners to 0:0 (the reference's 0:0 rule is for the build
//!   context) and chown dropped set-user-ID bits; ADD tried to extract a gzip that is not a
//!   tar, and dropped archive members' set-user-ID bits and xattrs; COPY dropped xattrs; a
//!   `!` exception below an excluded directory did not bring the directory back.
//! - buildah 1.28 is wrong or lacks the feature, and gets `#buildah-instead:` lines:
//!   `--chown=NAME` without a group (the reference: "the same numeric UID as the GID"), ADD
//!   `--chown` on archive members, set-user-ID bits of context files, `!` exceptions with
//!   wildcards below excluded directories, COPY `--link`/`--exclude`/`--parents`, RUN
//!   `--network`; and [`VOLATILE`] and `buildah_stubs` for the mount stubs it leaves.
//!
//! buildah runs with its own storage (vfs, in a temp dir) and configuration files; it still
//! writes its blob-info cache under /var/lib/containers/cache, as it always does as root.
//! Runs as root (the namespace builder and buildah's chroot isolation both need it). Needs
//! buildah, docker-registry, skopeo and busybox-static (`scripts/test.sh` installs them).
//! `KILN_FIDELITY_KEEP=1` keeps each case's work dir (context, both trees as text).

mod oci_support;
mod vm_support;

use oci_support::{Registry, RegistryAuth, json_of, kiln, need, run, skopeo_copy};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The mtime every context file gets before a build (2001-09-09): a time no build step can
/// produce, so a tool that resets a preserved mtime shows.
const CONTEXT_MTIME: i64 = 1_000_000_000;

/// Files one tool leaves in the image that Docker does not. An entry only excuses a path
/// present on that tool's side, absent on the other, and empty (see [`excused`]).
const VOLATILE: &[(Tool, &str)] = &[
    // buildah 1.28's chroot isolation bind-mounts these over empty stub files it creates in
    // the rootfs and never removes. Docker does not leave them: BuildKit's executor removes
    // the mount stubs it created (executor.MountStubsCleaner), and issue 6 item 2 says they
    // are provided while RUN runs but not left in the image. Kiln's side is checked to have
    // none of them.
    (Tool::Buildah, "etc/hostname"),
    (Tool::Buildah, "etc/hosts"),
    (Tool::Buildah, "etc/resolv.conf"),
    // The same: chroot isolation mounts a tmpfs on /run (for /run/.containerenv) and leaves
    // the empty directory it made for it when the base had none.
    (Tool::Buildah, "run"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Kiln,
    Buildah,
}

// ---------------------------------------------------------------------------------------
// Trees
// ---------------------------------------------------------------------------------------

/// What one path is, as both trees can say it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File { size: u64, sha256: String },
    Symlink(String),
    Char(u64, u64),
    Block(u64, u64),
    Fifo,
}

/// Everything compared about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// The first path (by name) of the hard-link group this path is in, when it has others.
    link_group: Option<String>,
    /// A short file's text, to show in a difference (not compared: `kind` has its digest).
    text: Option<String>,
}

type Tree = BTreeMap<String, Node>;

/// Names each multi-member group by its smallest path.
fn set_link_groups(tree: &mut Tree, groups: Vec<Vec<String>>) {
    for g in groups.into_iter().filter(|g| g.len() > 1) {
        let first = g.iter().min().cloned();
        for p in &g {
            if let Some(n) = tree.get_mut(p) {
                n.link_group = first.clone();
            }
        }
    }
}

/// Size, sha256 and (for a short file) text of a file's contents.
fn hash_reader(r: &mut impl Read) -> (Kind, Option<String>) {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut head = Vec::new();
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf).expect("read file contents");
        if n == 0 {
            break;
        }
        if head.len() < 512 {
            head.extend_from_slice(&buf[..n.min(512)]);
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    let text = (size <= 512)
        .then(|| String::from_utf8(head).ok())
        .flatten();
    let sha256 = hex::encode(h.finalize());
    (Kind::File { size, sha256 }, text)
}

/// `./a/b/` → `a/b`; the root is `.`.
fn tar_name(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    let s = s.trim_start_matches("./").trim_end_matches('/');
    if s.is_empty() || s == "." {
        ".".into()
    } else {
        s.to_string()
    }
}

/// The tree in a tar (what `kiln snapshot export` writes).
fn tar_tree(path: &Path) -> Tree {
    let f = std::fs::File::open(path).expect("open exported tar");
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    let mut tree = Tree::new();
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    for e in ar.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        let name = tar_name(&e.path_bytes());
        let mut xattrs = BTreeMap::new();
        if let Some(exts) = e.pax_extensions().expect("pax") {
            for x in exts {
                let x = x.expect("pax record");
                if let Some(k) = x.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    xattrs.insert(k.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        let h = e.header().clone();
        let mut text = None;
        let dev = || {
            (
                u64::from(h.device_major().ok().flatten().unwrap_or(0)),
                u64::from(h.device_minor().ok().flatten().unwrap_or(0)),
            )
        };
        let kind = match h.entry_type() {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let (kind, t) = hash_reader(&mut e);
                text = t;
                kind
            }
            tar::EntryType::Symlink => Kind::Symlink(
                String::from_utf8_lossy(&e.link_name_bytes().expect("link target")).into_owned(),
            ),
            tar::EntryType::Char => Kind::Char(dev().0, dev().1),
            tar::EntryType::Block => Kind::Block(dev().0, dev().1),
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::Link => {
                let target = tar_name(&e.link_name_bytes().expect("link target"));
                let node = tree
                    .get(&target)
                    .unwrap_or_else(|| panic!("hard link {name} to {target}, not seen before"))
                    .clone();
                groups
                    .entry(target.clone())
                    .or_insert_with(|| vec![target.clone()])
                    .push(name.clone());
                tree.insert(name, node);
                continue;
            }
            other => panic!("{name}: unexpected tar entry type {other:?}"),
        };
        tree.insert(
            name,
            Node {
                kind,
                mode: h.mode().expect("mode") & 0o7777,
                uid: h.uid().expect("uid"),
                gid: h.gid().expect("gid"),
                mtime: h.mtime().expect("mtime") as i64,
                xattrs,
                link_group: None,
                text,
            },
        );
    }
    set_link_groups(&mut tree, groups.into_values().collect());
    tree
}

/// The tree of a directory (what `buildah mount` gives).
fn dir_tree(root: &Path) -> Tree {
    use std::os::unix::fs::FileTypeExt;
    let mut tree = Tree::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    for e in walkdir::WalkDir::new(root).sort_by_file_name() {
        let e = e.expect("walk");
        let rel = e.path().strip_prefix(root).expect("under root");
        let name = if rel.as_os_str().is_empty() {
            ".".to_string()
        } else {
            rel.to_string_lossy().into_owned()
        };
        let md = e.path().symlink_metadata().expect("lstat");
        let ft = md.file_type();
        let mut text = None;
        let dev = || {
            let r = md.rdev();
            (
                u64::from(libc::major(r as libc::dev_t)),
                u64::from(libc::minor(r as libc::dev_t)),
            )
        };
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink(
                std::fs::read_link(e.path())
                    .expect("readlink")
                    .to_string_lossy()
                    .into_owned(),
            )
        } else if ft.is_file() {
            let (kind, t) = hash_reader(&mut std::fs::File::open(e.path()).expect("open file"));
            text = t;
            kind
        } else if ft.is_char_device() {
            Kind::Char(dev().0, dev().1)
        } else if ft.is_block_device() {
            Kind::Block(dev().0, dev().1)
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            panic!("{name}: a socket or unknown file type in buildah's tree");
        };
        if !ft.is_dir() && md.nlink() > 1 {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(name.clone());
        }
        let mut xattrs = BTreeMap::new();
        for k in xattr::list(e.path()).expect("list xattrs") {
            let v = xattr::get(e.path(), &k)
                .expect("get xattr")
                .unwrap_or_default();
            xattrs.insert(k.to_string_lossy().into_owned(), v);
        }
        tree.insert(
            name,
            Node {
                kind,
                mode: md.mode() & 0o7777,
                uid: u64::from(md.uid()),
                gid: u64::from(md.gid()),
                mtime: md.mtime(),
                xattrs,
                link_group: None,
                text,
            },
        );
    }
    set_link_groups(&mut tree, inodes.into_values().collect());
    tree
}

/// The differences between Kiln's and buildah's trees, one line each. Mtimes are compared
/// for non-directories whose mtime on either side is before `started` (they were not made by
/// the build, so Docker preserves them).
fn differences(kiln: &Tree, buildah: &Tree, started: i64, stubs: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let paths: BTreeSet<&String> = kiln.keys().chain(buildah.keys()).collect();
    for p in paths {
        match (kiln.get(p), buildah.get(p)) {
            (Some(_), None) if excused(Tool::Kiln, p, kiln, stubs) => {}
            (None, Some(_)) if excused(Tool::Buildah, p, buildah, stubs) => {}
            (Some(k), None) => out.push(format!("{p}: only in Kiln's tree ({k:?})")),
            (None, Some(b)) => out.push(format!("{p}: only in buildah's tree ({b:?})")),
            (Some(k), Some(b)) => {
                let mut fields = Vec::new();
                if k.kind != b.kind {
                    match (&k.text, &b.text) {
                        (Some(kt), Some(bt)) => fields.push(format!("contents {kt:?} vs {bt:?}")),
                        _ => fields.push(format!("kind {:?} vs {:?}", k.kind, b.kind)),
                    }
                }
                if k.mode != b.mode {
                    fields.push(format!("mode {:o} vs {:o}", k.mode, b.mode));
                }
                if (k.uid, k.gid) != (b.uid, b.gid) {
                    fields.push(format!("owner {}:{} vs {}:{}", k.uid, k.gid, b.uid, b.gid));
                }
                if k.xattrs != b.xattrs {
                    fields.push(format!("xattrs {:?} vs {:?}", k.xattrs, b.xattrs));
                }
                if k.link_group != b.link_group {
                    fields.push(format!(
                        "hard links {:?} vs {:?}",
                        k.link_group, b.link_group
                    ));
                }
                if k.kind != Kind::Dir
                    && k.mtime != b.mtime
                    && (k.mtime < started || b.mtime < started)
                {
                    fields.push(format!("mtime {} vs {}", k.mtime, b.mtime));
                }
                if !fields.is_empty() {
                    out.push(format!("{p}: {} (Kiln vs buildah)", fields.join(", ")));
                }
            }
            (None, None) => unreachable!("a path from one of the trees"),
        }
    }
    out
}

/// Whether `p`, in `tree` (of `tool`) and not in the other, is a file the tool leaves that
/// Docker does not: listed in [`VOLATILE`] or (buildah) in the case's `buildah_stubs`, and
/// only as what a mount stub is: an empty file, or a directory holding nothing but such.
fn excused(tool: Tool, p: &str, tree: &Tree, stubs: &[&str]) -> bool {
    let listed = |p: &str| {
        VOLATILE.iter().any(|(t, v)| *t == tool && *v == p)
            || (tool == Tool::Buildah && stubs.contains(&p))
    };
    let stub = |p: &str| match tree.get(p).map(|n| &n.kind) {
        Some(Kind::File { size: 0, .. }) | Some(Kind::Dir) => listed(p),
        _ => false,
    };
    let below = format!("{p}/");
    stub(p)
        && tree
            .keys()
            .filter(|k| k.starts_with(&below))
            .all(|k| stub(k))
}

// ---------------------------------------------------------------------------------------
// The two builders
// ---------------------------------------------------------------------------------------

/// A registry holding the base, a Kiln home, and a buildah storage, all in temp dirs.
struct Peers {
    _registry: Registry,
    base: String,
    kiln_home: tempfile::TempDir,
    buildah: Buildah,
}

impl Peers {
    /// Makes `kiln/busybox` in a Kiln store, exports it as an OCI layout and pushes it to a
    /// fresh loopback registry with skopeo.
    fn start() -> Peers {
        need("buildah", "buildah");
        need("skopeo", "skopeo");
        let registry = Registry::start(RegistryAuth::None);
        let kiln_home = tempfile::tempdir().expect("kiln home");
        let out = kiln(
            kiln_home.path(),
            None,
            &["base", "pull", "kiln/busybox", "--json"],
            &[],
        );
        assert!(
            out.status.success(),
            "kiln base pull kiln/busybox: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let store = kiln::oci::store::Store::open(&kiln::home::Home::at(kiln_home.path()))
            .expect("open the store");
        let reference = kiln::oci::Reference::parse("kiln/busybox").expect("reference");
        let rec = store
            .image(&reference)
            .expect("store")
            .expect("kiln/busybox is in the store");
        let layout = tempfile::tempdir().expect("layout");
        store
            .export_layout(&rec, layout.path(), "latest")
            .expect("export the base as an OCI layout");
        let base = format!("{}/fidelity/busybox:latest", registry.host);
        skopeo_copy(
            &format!("oci:{}:latest", layout.path().display()),
            &format!("docker://{base}"),
            None,
            false,
        );
        Peers {
            _registry: registry,
            base,
            kiln_home,
            buildah: Buildah::new(),
        }
    }
}

/// buildah with its own storage, containers.conf, registries.conf, storage.conf and
/// signature policy in a temp dir (the host's /etc/containers does not matter); it writes
/// nothing outside but the blob-info cache it always keeps under /var/lib/containers/cache.
struct Buildah {
    dir: tempfile::TempDir,
}

impl Buildah {
    fn new() -> Buildah {
        let dir = tempfile::tempdir().expect("buildah dir");
        let w = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("buildah config");
        };
        w(
            "policy.json",
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        );
        w("registries.conf", "unqualified-search-registries = []\n");
        w(
            "storage.conf",
            "[storage]\ndriver = \"vfs\"\nrunroot = \"\"\ngraphroot = \"\"\n",
        );
        w(
            "containers.conf",
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\n",
        );
        Buildah { dir }
    }

    fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("buildah");
        c.env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("BUILDAH_ISOLATION", "chroot")
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--storage-driver", "vfs"]);
        c
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.cmd().args(["rm", "--all"]).output();
        let _ = self.cmd().args(["rmi", "--all", "--force"]).output();
    }
}

/// How one case is built.
#[derive(Default)]
struct Case {
    /// The directory under tests/fidelity.
    name: &'static str,
    /// `--secret id=ID,src=FILE` for both tools, FILE relative to a scratch dir, with contents.
    secrets: &'static [(&'static str, &'static str)],
    /// Files to add to the context before the build (paths relative to it); for what git
    /// cannot hold (modes, symlinks, archives, empty directories).
    setup: Option<fn(&Path)>,
    /// Empty directories buildah 1.28 leaves behind as the mount points of `RUN --mount`
    /// targets (and their parents) that the image did not have. Docker leaves none: BuildKit
    /// removes the stubs it created, parents included (executor.MountStubsCleaner), and Kiln
    /// is checked to leave none either.
    buildah_stubs: &'static [&'static str],
    /// `--builder microvm` (issue 7: the microvm builder gives the trees the namespace
    /// builder gives); the namespace builder otherwise.
    microvm: bool,
}

fn copy_tree(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from) {
        let e = e.expect("walk testdata");
        let dst = to.join(e.path().strip_prefix(from).expect("under testdata"));
        let ft = e.file_type();
        if ft.is_dir() {
            std::fs::create_dir_all(&dst).expect("mkdir");
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).expect("readlink"), &dst)
                .expect("symlink");
        } else {
            std::fs::copy(e.path(), &dst).expect("copy testdata");
        }
    }
}

/// Every path in `dir` gets mtime [`CONTEXT_MTIME`] (links themselves, not their targets).
fn set_mtimes(dir: &Path) {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(CONTEXT_MTIME, 0);
    for e in walkdir::WalkDir::new(dir) {
        let e = e.expect("walk context");
        utimensat(
            nix::fcntl::AT_FDCWD,
            e.path(),
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )
        .expect("set mtime");
    }
}

/// The marker of an instruction buildah gets instead of the next one (see the module doc).
const INSTEAD: &str = "#buildah-instead:";

/// buildah's Dockerfile: the case's, with the instruction after a run of `#buildah-instead:
/// X` lines (continuation lines included) replaced by those X.
fn buildah_dockerfile(text: &str) -> String {
    let mut out = Vec::new();
    let mut instead = Vec::new();
    let mut skipping = false;
    for line in text.lines() {
        if let Some(x) = line.strip_prefix(INSTEAD) {
            instead.push(x.trim().to_string());
        } else if skipping || (!instead.is_empty() && !line.trim_start().starts_with('#')) {
            if !skipping {
                out.append(&mut instead);
            }
            skipping = line.trim_end().ends_with('\\');
        } else {
            out.push(line.to_string());
        }
    }
    assert!(instead.is_empty(), "{INSTEAD} at the end replaces nothing");
    out.join("\n") + "\n"
}

/// One case set up for building: the peers, a context made from its testdata, its secrets.
struct Run {
    case: Case,
    peers: Peers,
    /// Holds the context, the secret files, buildah's Dockerfile, exported tars.
    work: tempfile::TempDir,
    ctx: PathBuf,
    /// `id=ID,src=FILE` for each secret.
    secrets: Vec<String>,
    /// Seconds since the epoch before the first build.
    started: i64,
    builds: u32,
}

/// What one build of a case by both tools gave.
struct Built {
    kiln: Tree,
    /// Kiln's `steps` from `image create --json`.
    steps: Vec<serde_json::Value>,
    buildah: Tree,
}

impl Run {
    fn new(case: Case) -> Run {
        let peers = Peers::start();
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
            - 1;
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fidelity")
            .join(case.name);
        assert!(
            src.join("Dockerfile").is_file(),
            "{}: no Dockerfile",
            src.display()
        );
        let work = tempfile::Builder::new()
            .prefix("fidelity-")
            .disable_cleanup(std::env::var_os("KILN_FIDELITY_KEEP").is_some())
            .tempdir()
            .expect("work dir");
        let ctx = work.path().join("context");
        copy_tree(&src, &ctx);
        if let Some(setup) = case.setup {
            setup(&ctx);
        }
        set_mtimes(&ctx);
        let secrets = case
            .secrets
            .iter()
            .map(|(id, text)| {
                let p = work.path().join(format!("secret-{id}"));
                std::fs::write(&p, text).expect("secret file");
                format!("id={id},src={}", p.display())
            })
            .collect();
        Run {
            case,
            peers,
            work,
            ctx,
            secrets,
            started,
            builds: 0,
        }
    }

    /// Builds the context as it is now with both tools (Kiln registers it as `name`).
    fn build(&mut self, name: &str) -> Built {
        self.builds += 1;
        let base_arg = format!("BASE={}", self.peers.base);
        let t = Instant::now();
        let (kiln, steps) = self.kiln(name, &base_arg);
        let kiln_time = t.elapsed();
        let t = Instant::now();
        let buildah = self.buildah(&base_arg);
        eprintln!(
            "{} build {}: kiln {:.2} s, buildah {:.2} s, {} paths",
            self.case.name,
            self.builds,
            kiln_time.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            kiln.len()
        );
        Built {
            kiln,
            steps,
            buildah,
        }
    }

    /// `kiln image create`, then `kiln snapshot export` of what it registered.
    fn kiln(&self, name: &str, base_arg: &str) -> (Tree, Vec<serde_json::Value>) {
        let home = self.peers.kiln_home.path();
        let ctx = self.ctx.to_str().expect("utf-8 path");
        let mut args = vec![
            "image",
            "create",
            ctx,
            "-n",
            name,
            "--disk_mb",
            "64",
            "--build-arg",
            base_arg,
            "--json",
        ];
        for s in &self.secrets {
            args.extend(["--secret", s]);
        }
        let agent;
        let mut env = Vec::new();
        let _one = if self.case.microvm {
            vm_support::require_tools();
            agent = vm_support::agent().to_string_lossy().into_owned();
            env.push(("KILN_AGENT", agent.as_str()));
            args.extend_from_slice(vm_support::SMALL_VM);
            Some(vm_support::one_vm())
        } else {
            None
        };
        let out = kiln(home, None, &args, &env);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "kiln image create {name}: {stdout}\n{stderr}"
        );
        for (_, secret) in self.case.secrets {
            assert!(
                !stdout.contains(secret.trim()) && !stderr.contains(secret.trim()),
                "{name}: Kiln's output shows a secret"
            );
        }
        let v = json_of(&out);
        let snap = v["snapshot_id"].as_str().expect("snapshot_id").to_string();
        let steps = v["steps"].as_array().cloned().unwrap_or_default();
        let tar = self.work.path().join(format!("kiln-{}.tar", self.builds));
        let tar_s = tar.to_str().expect("utf-8 path");
        let out = kiln(home, None, &["snapshot", "export", &snap, "-o", tar_s], &[]);
        assert!(
            out.status.success(),
            "kiln snapshot export: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tree = tar_tree(&tar);
        std::fs::remove_file(&tar).expect("remove exported tar");
        (tree, steps)
    }

    /// `buildah bud` of buildah's Dockerfile (see [`buildah_dockerfile`]), then the tree of a
    /// container of the image, as `buildah mount` shows it.
    fn buildah(&self, base_arg: &str) -> Tree {
        let b = &self.peers.buildah;
        let dockerfile = self.work.path().join("Dockerfile.buildah");
        let text = std::fs::read_to_string(self.ctx.join("Dockerfile")).expect("read Dockerfile");
        std::fs::write(&dockerfile, buildah_dockerfile(&text)).expect("write buildah's Dockerfile");
        let image = format!(
            "localhost/fidelity-{}:{}",
            self.case.name.replace('_', "-"),
            self.builds
        );
        let mut bud = b.cmd();
        bud.args([
            "bud",
            "--isolation",
            "chroot",
            "--tls-verify=false",
            // buildah ignores SHELL when it writes an OCI config (it runs `/bin/sh -c` then);
            // with Docker's config format it honours SHELL as Docker does.
            "--format",
            "docker",
            "--signature-policy",
        ])
        .arg(b.dir.path().join("policy.json"))
        .args(["--build-arg", base_arg, "-t", &image, "-f"])
        .arg(&dockerfile);
        for s in &self.secrets {
            bud.args(["--secret", s]);
        }
        run(bud.arg(&self.ctx));
        let c = String::from_utf8_lossy(
            &run(b.cmd().args(["from", "--quiet", "--pull-never", &image])).stdout,
        )
        .trim()
        .to_string();
        let mnt =
            PathBuf::from(String::from_utf8_lossy(&run(b.cmd().args(["mount", &c])).stdout).trim());
        let tree = dir_tree(&mnt);
        run(b.cmd().args(["umount", &c]));
        run(b.cmd().args(["rm", &c]));
        tree
    }

    /// Asserts the two trees of `built` agree (but for what [`excused`] lets pass) and that
    /// Kiln left none of RUN's /etc files and no secret in the image.
    fn assert_same(&self, built: &Built) {
        let name = self.case.name;
        for p in ["etc/resolv.conf", "etc/hosts", "etc/hostname"] {
            assert!(
                !built.kiln.contains_key(p),
                "{name}: Kiln left /{p} in the image"
            );
        }
        for (_, secret) in self.case.secrets {
            let leaked: Vec<&String> = built
                .kiln
                .iter()
                .filter(|(_, n)| n.text.as_deref().is_some_and(|t| t.contains(secret.trim())))
                .map(|(p, _)| p)
                .collect();
            assert!(leaked.is_empty(), "{name}: a secret is in {leaked:?}");
        }
        if std::env::var_os("KILN_FIDELITY_KEEP").is_some() {
            // For debugging a case: both trees as text, beside the context, kept.
            let dump = |tool: &str, t: &Tree| {
                let text: String = t.iter().map(|(p, n)| format!("{p} {n:?}\n")).collect();
                let p = self
                    .work
                    .path()
                    .join(format!("{tool}-{}.tree", self.builds));
                std::fs::write(p, text).expect("dump");
            };
            dump("kiln", &built.kiln);
            dump("buildah", &built.buildah);
            eprintln!("{name}: trees in {}", self.work.path().display());
        }
        let diffs = differences(
            &built.kiln,
            &built.buildah,
            self.started,
            self.case.buildah_stubs,
        );
        assert!(
            diffs.is_empty(),
            "{name}: {} paths differ between Kiln and buildah:\n{}",
            diffs.len(),
            diffs.join("\n")
        );
    }
}

/// Builds `case` with both tools and asserts the trees agree.
fn same_tree(case: Case) {
    let mut run = Run::new(case);
    let built = run.build(run.case.name);
    run.assert_same(&built);
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

/// Issue 6 item 2: RUN with ENV, USER (names from /etc/passwd and /etc/group, ids), WORKDIR
/// (created if missing), SHELL; /etc/resolv.conf, hosts and hostname not left behind.
#[test]
fn run_env_user_workdir_shell() {
    same_tree(Case {
        name: "run",
        ..Case::default()
    });
}

/// Issue 6 item 3: COPY's sources (globs, directory contents, symlinks), destinations
/// (trailing slash, existing directory, relative to WORKDIR), `--chown`, `--chmod`.
#[test]
fn copy_sources_destinations_chown_chmod() {
    same_tree(Case {
        name: "copy",
        setup: Some(|ctx| {
            chmod(&ctx.join("exec.sh"), 0o755);
            chmod(&ctx.join("private"), 0o600);
            chmod(&ctx.join("dir/sub"), 0o700);
            std::fs::create_dir(ctx.join("dir/empty")).expect("mkdir");
            symlink("a.txt", &ctx.join("link-rel"));
            symlink("no/such/file", &ctx.join("dir/dangling"));
            symlink("/etc/passwd", &ctx.join("dir/link-abs"));
            symlink("../a.txt", &ctx.join("dir/sub/link-up"));
            symlink("dir", &ctx.join("link-dir"));
        }),
        ..Case::default()
    });
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn symlink(target: &str, at: &Path) {
    std::os::unix::fs::symlink(target, at).expect("symlink");
}

/// Issue 6 item 3: multi-stage builds and `COPY --from` (name, index, a derived stage),
/// `--link`, `--exclude`, `--parents`.
#[test]
fn stages_from_link_exclude_parents() {
    same_tree(Case {
        name: "stages",
        ..Case::default()
    });
}

/// Issue 6 item 3: ADD of local archives (uncompressed, gzip, bzip2, xz, zstd) and of files
/// that are not archives.
#[test]
fn add_local_archives() {
    same_tree(Case {
        name: "add",
        setup: Some(|ctx| {
            let tar = pkg_tar();
            let w =
                |name: &str, bytes: Vec<u8>| std::fs::write(ctx.join(name), bytes).expect("write");
            w("pkg.tar.gz", gzip(&tar));
            w("pkg.tgz", gzip(&tar));
            w("pkg.tar.bz2", {
                use std::io::Write;
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                e.write_all(&tar).expect("bzip2");
                e.finish().expect("bzip2")
            });
            w("pkg.tar.xz", {
                use std::io::Write;
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(&tar).expect("xz");
                e.finish().expect("xz")
            });
            w("pkg.tar.zst", zstd::encode_all(&tar[..], 1).expect("zstd"));
            w("notes.txt.gz", gzip(b"not a tar\n"));
            w("pkg.tar", tar);
        }),
        ..Case::default()
    });
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

/// A tar with what extraction must keep: owners, modes (set-user-ID too), mtimes, an empty
/// directory, a symlink, a hard link and a user xattr.
fn pkg_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let entry = |kind: tar::EntryType, mode: u32, uid: u64, gid: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_100_000_000);
        h.set_size(0);
        h
    };
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| {
        let mut h = entry(tar::EntryType::Directory, mode, 1000, 1000);
        b.append_data(&mut h, path, &[][..]).expect("dir");
    };
    dir(&mut b, "pkg/", 0o750);
    dir(&mut b, "pkg/empty/", 0o700);
    let files: [(&str, u32, u64, u64, &[u8]); 3] = [
        ("pkg/file", 0o640, 1000, 1001, b"new\n"),
        ("pkg/run", 0o755, 0, 0, b"#!/bin/sh\n"),
        ("pkg/suid", 0o4755, 0, 0, b"suid\n"),
    ];
    for (path, mode, uid, gid, data) in files {
        let mut h = entry(tar::EntryType::Regular, mode, uid, gid);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).expect("file");
    }
    let mut h = entry(tar::EntryType::Symlink, 0o777, 1000, 1000);
    b.append_link(&mut h, "pkg/link", "file").expect("symlink");
    let mut h = entry(tar::EntryType::Link, 0o640, 1000, 1001);
    b.append_link(&mut h, "pkg/hard", "pkg/file")
        .expect("hard link");
    b.append_pax_extensions([("SCHILY.xattr.user.fidelity", &b"yes"[..])])
        .expect("pax");
    let mut h = entry(tar::EntryType::Regular, 0o644, 0, 0);
    h.set_size(6);
    b.append_data(&mut h, "pkg/with-xattr", &b"xattr\n"[..])
        .expect("file");
    b.into_inner().expect("tar")
}

/// Issue 6 item 1 through COPY: `.dockerignore` (`!`, `**`, leading `/`), symlinks in the
/// context copied as links, hard links, modes, empty directories, unusual names.
#[test]
fn context_dockerignore_links_modes() {
    same_tree(Case {
        name: "context",
        setup: Some(|ctx| {
            std::fs::create_dir_all(ctx.join("links")).expect("mkdir");
            symlink("../app/main.txt", &ctx.join("links/rel"));
            symlink("/etc/hostname", &ctx.join("links/abs"));
            symlink("../app", &ctx.join("links/dir"));
            symlink("nowhere", &ctx.join("links/dangling"));
            symlink("../secret.txt", &ctx.join("links/to-ignored"));
            std::fs::write(ctx.join("hard-a"), "linked\n").expect("write");
            std::fs::hard_link(ctx.join("hard-a"), ctx.join("app/hard-b")).expect("link");
            std::fs::create_dir_all(ctx.join("empty/inner")).expect("mkdir");
            chmod(&ctx.join("empty"), 0o700);
            chmod(&ctx.join("app/main.txt"), 0o600);
            chmod(&ctx.join("with space.txt"), 0o4755);
            chmod(&ctx.join("nested/keep"), 0o2775);
            xattr::set(ctx.join("app/main.txt"), "user.fidelity", b"ctx").expect("xattr");
        }),
        ..Case::default()
    });
}

/// Issue 6 item 3: `RUN --mount` of type cache, bind (context and stage) and secret leave
/// nothing in the image.
#[test]
fn run_mounts_leave_nothing() {
    same_tree(Case {
        name: "mounts",
        secrets: &[("token", "s3cr3t-value\n")],
        buildah_stubs: &["etc/app", "mnt", "opt", "run/secrets", "var/cache"],
        ..Case::default()
    });
}

/// Issue 6 item 2: what RUN steps delete, replace, rename and re-own, through overlayfs
/// upper directories stacked into one tree.
#[test]
fn whiteouts_and_copy_ups() {
    same_tree(Case {
        name: "whiteouts",
        ..Case::default()
    });
}

/// Issue 6 item 4: cached steps give the trees fresh ones give; a changed context file (its
/// contents, or only its mode) re-runs exactly the steps from the first one that reads it;
/// cached layers serve another name too.
#[test]
fn step_cache_reruns_from_the_first_changed_input() {
    let mut run = Run::new(Case {
        name: "cache",
        ..Case::default()
    });
    let cached = |b: &Built| -> Vec<bool> {
        b.steps
            .iter()
            .map(|s| s["cached"].as_bool().expect("cached"))
            .collect()
    };
    let fresh = run.build("cache");
    run.assert_same(&fresh);
    assert_eq!(cached(&fresh), [false; 6]);

    let again = run.build("cache");
    run.assert_same(&again);
    assert_eq!(cached(&again), [true; 6]);

    std::fs::write(run.ctx.join("changing.txt"), "version 2\n").expect("write");
    set_mtimes(&run.ctx);
    let changed = run.build("cache");
    run.assert_same(&changed);
    assert_eq!(cached(&changed), [true, true, false, false, false, false]);
    assert_ne!(changed.kiln.get("derived"), fresh.kiln.get("derived"));

    chmod(&run.ctx.join("mode.sh"), 0o755);
    set_mtimes(&run.ctx);
    let other = run.build("cache-other-name");
    run.assert_same(&other);
    assert_eq!(cached(&other), [true, true, true, true, false, false]);
}

// ---------------------------------------------------------------------------------------
// The same cases on the microvm builder (issue 7 item 5): each RUN in a QEMU microVM (TCG
// here), the layers brought back through the hardened unpacker; the trees must be the ones
// buildah gives, as on the namespace builder. COPY and ADD run on the host either way, so
// the cases with RUN steps are the ones that tell.
// ---------------------------------------------------------------------------------------

#[test]
fn microvm_run_env_user_workdir_shell() {
    same_tree(Case {
        name: "run",
        microvm: true,
        ..Case::default()
    });
}

#[test]
fn microvm_run_mounts_leave_nothing() {
    same_tree(Case {
        name: "mounts",
        secrets: &[("token", "s3cr3t-value\n")],
        buildah_stubs: &["etc/app", "mnt", "opt", "run/secrets", "var/cache"],
        microvm: true,
        ..Case::default()
    });
}

#[test]
fn microvm_whiteouts_and_copy_ups() {
    same_tree(Case {
        name: "whiteouts",
        microvm: true,
        ..Case::default()
    });
}

#[test]
fn microvm_stages_from_link_exclude_parents() {
    same_tree(Case {
        name: "stages",
        microvm: true,
        ..Case::default()
    });
}
