//! ADD of URLs and git repositories through the real step loop (overlayfs, namespaces, the
//! layer cache): an HTTP server on 127.0.0.1 in the test and `git daemon` on 127.0.0.1
//! (runs as root).

use kiln::build::cache::LayerCache;
use kiln::build::cgroup::Limits;
use kiln::build::context::BuildContext;
use kiln::build::driver::NamespaceDriver;
use kiln::build::fetch::FetchError;
use kiln::build::run::{Bases, BuildError, BuildOptions, Event, ResolvedBase, View, build};
use kiln::frontend::dockerfile::parse;
use kiln::frontend::{LowerOptions, NoBaseImages, lower_dockerfile};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// `Wed, 21 Oct 2015 07:28:00 GMT`.
const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";
const LAST_MODIFIED_SECS: i64 = 1_445_412_480;
const HELLO: &str = "hello remote\n";

/// What the server serves and what it was asked.
#[derive(Default)]
struct State {
    /// Path → body for `/v/…` (changeable by the test).
    variable: BTreeMap<String, String>,
    /// Every request: (path, Authorization header).
    requests: Vec<(String, Option<String>)>,
}

/// A tiny HTTP/1.1 server on 127.0.0.1: `/files/hello.txt` with Last-Modified, `/v/NAME`
/// from the state, `/redirect` → hello, `/private/…` needs basic auth, anything else 404.
struct Server {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let mut auth = None;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("authorization")
                        {
                            auth = Some(v.trim().to_string());
                        }
                    }
                    let (status, headers, body) = {
                        let mut s = st.lock().expect("state");
                        s.requests.push((path.clone(), auth.clone()));
                        match path.as_str() {
                            "/files/hello.txt" => (
                                "200 OK",
                                format!("Last-Modified: {LAST_MODIFIED}\r\n"),
                                HELLO.to_string(),
                            ),
                            "/redirect" => (
                                "302 Found",
                                "Location: /files/hello.txt\r\n".to_string(),
                                String::new(),
                            ),
                            p if p.starts_with("/private/") => {
                                ("401 Unauthorized", String::new(), String::new())
                            }
                            p => match s.variable.get(p) {
                                Some(b) => ("200 OK", String::new(), b.clone()),
                                None => ("404 Not Found", String::new(), "nope".to_string()),
                            },
                        }
                    };
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
                        body.len()
                    );
                    let _ = conn.flush();
                    let mut rest = Vec::new();
                    let _ = conn.read_to_end(&mut rest);
                });
            }
        });
        Server { port, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn requests_for(&self, path: &str) -> usize {
        let s = self.state.lock().expect("state");
        s.requests.iter().filter(|(p, _)| p == path).count()
    }

    fn set(&self, path: &str, body: &str) {
        let mut s = self.state.lock().expect("state");
        s.variable.insert(path.to_string(), body.to_string());
    }
}

struct NoBases;

impl Bases for NoBases {
    fn resolve(&self, reference: &str) -> Result<ResolvedBase, String> {
        Err(format!("{reference}: no images in this test"))
    }
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "ADD builds mount overlayfs and set owners: run these tests as root (CI does)"
    );
}

struct Home {
    home: tempfile::TempDir,
    ctx: tempfile::TempDir,
}

fn home() -> Home {
    require_root();
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(ctx.path().join("local.txt"), "local\n").expect("write");
    Home {
        home: tempfile::tempdir().expect("home"),
        ctx,
    }
}

/// Builds `dockerfile`; returns whether each step was cached and the target's layers.
fn run_build(h: &Home, dockerfile: &str) -> Result<(Vec<bool>, Vec<PathBuf>), BuildError> {
    let spec = lower_dockerfile(
        &parse(dockerfile).expect("parse"),
        &LowerOptions::default(),
        &NoBaseImages,
    )
    .expect("lower")
    .spec;
    let ctx = BuildContext::open(h.ctx.path(), None).expect("context");
    let cache = LayerCache::open(&h.home.path().join("cache-v1")).expect("cache");
    let mut events = |_: Event<'_>| {};
    let mut opts = BuildOptions {
        no_cache: false,
        limits: Limits::default(),
        step_timeout: None,
        secrets: BTreeMap::new(),
        cache_mounts: h.home.path().join("cache-mounts-v1"),
        scratch: h.home.path().join("cache-v1"),
        builder_disk_mb: None,
        disk_dir: h.home.path().join("tmp"),
        events: &mut events,
    };
    let out = build(&spec, &ctx, &NoBases, &cache, &NamespaceDriver, &mut opts)?;
    Ok((
        out.steps.iter().map(|s| s.cached).collect(),
        out.target().expect("target").layers.clone(),
    ))
}

fn fetch_error(r: Result<(Vec<bool>, Vec<PathBuf>), BuildError>) -> (FetchError, String) {
    match r {
        Err(e @ BuildError::Fetch { .. }) => {
            let msg = e.to_string();
            match e {
                BuildError::Fetch { source, .. } => (source, msg),
                _ => unreachable!(),
            }
        }
        Err(e) => panic!("expected a fetch error, got {e}"),
        Ok(_) => panic!("expected a fetch error, the build succeeded"),
    }
}

fn sha256(s: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[test]
fn url_lands_with_docker_naming_mode_owner_and_last_modified_mtime() {
    let h = home();
    let srv = Server::start();
    let df = format!(
        "FROM scratch\n\
         ADD {u} /dl/\n\
         ADD --chmod=644 --chown=1000:1001 {u} /named.txt\n\
         ADD {r} {local} /multi/\n",
        u = srv.url("/files/hello.txt"),
        r = srv.url("/redirect"),
        local = "local.txt",
    );
    let (_, layers) = run_build(&h, &df).expect("build");
    let view = View::mount(&layers, h.home.path()).expect("view");
    let p = view.path();
    // Into the directory, named after the URL path; 0600, root, mtime from Last-Modified.
    let f = p.join("dl/hello.txt");
    assert_eq!(std::fs::read_to_string(&f).expect("read"), HELLO);
    let m = std::fs::metadata(&f).expect("stat");
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert_eq!((m.uid(), m.gid()), (0, 0));
    assert_eq!(m.mtime(), LAST_MODIFIED_SECS);
    // A destination without `/` is the file; --chmod and --chown apply.
    let m = std::fs::metadata(p.join("named.txt")).expect("stat");
    assert_eq!(m.mode() & 0o7777, 0o644);
    assert_eq!((m.uid(), m.gid()), (1000, 1001));
    // A redirect is followed; the file is named after the URL written, not the target, with
    // the target's Last-Modified; a local source beside it lands too.
    let m = std::fs::metadata(p.join("multi/redirect")).expect("redirect file");
    assert_eq!(m.mtime(), LAST_MODIFIED_SECS);
    assert_eq!(
        std::fs::read_to_string(p.join("multi/local.txt")).expect("local"),
        "local\n"
    );
}

#[test]
fn checksum_is_verified_and_is_the_key_so_a_cached_step_makes_no_request() {
    let h = home();
    let srv = Server::start();
    let url = srv.url("/files/hello.txt");
    let wrong = format!(
        "FROM scratch\nADD --checksum=sha256:{} {url} /x\n",
        sha256("other")
    );
    let (e, msg) = fetch_error(run_build(&h, &wrong));
    assert!(matches!(e, FetchError::Checksum { .. }), "{e}");
    assert!(msg.contains("checksum mismatch"), "{msg}");
    assert!(msg.contains(&sha256(HELLO)), "names what it got: {msg}");

    let right = format!(
        "FROM scratch\nADD --checksum=sha256:{} {url} /x\n",
        sha256(HELLO)
    );
    let (cached, layers) = run_build(&h, &right).expect("build");
    assert_eq!(cached, [false]);
    {
        let view = View::mount(&layers, h.home.path()).expect("view");
        assert_eq!(
            std::fs::read_to_string(view.path().join("x")).expect("x"),
            HELLO
        );
    }
    let asked = srv.requests_for("/files/hello.txt");
    let (cached, _) = run_build(&h, &right).expect("rebuild");
    assert_eq!(cached, [true]);
    assert_eq!(
        srv.requests_for("/files/hello.txt"),
        asked,
        "no request on a hit"
    );
}

#[test]
fn without_checksum_the_content_is_the_key() {
    let h = home();
    let srv = Server::start();
    srv.set("/v/data.txt", "one\n");
    let df = format!(
        "FROM scratch\nADD {} /d/\nADD local.txt /l\n",
        srv.url("/v/data.txt")
    );
    assert_eq!(run_build(&h, &df).expect("build").0, [false, false]);
    // Same content: downloaded again, but a cache hit.
    assert_eq!(run_build(&h, &df).expect("rebuild").0, [true, true]);
    assert_eq!(srv.requests_for("/v/data.txt"), 2);
    // Changed content: the ADD and every step after it run again.
    srv.set("/v/data.txt", "two\n");
    let (cached, layers) = run_build(&h, &df).expect("rebuild");
    assert_eq!(cached, [false, false]);
    let view = View::mount(&layers, h.home.path()).expect("view");
    assert_eq!(
        std::fs::read_to_string(view.path().join("d/data.txt")).expect("d"),
        "two\n"
    );
    // No Last-Modified: the epoch.
    let m = std::fs::metadata(view.path().join("d/data.txt")).expect("stat");
    assert_eq!(m.mtime(), 0);
}

#[test]
fn error_statuses_fail_the_step_clearly_without_showing_credentials() {
    let h = home();
    let srv = Server::start();
    let df = format!("FROM scratch\nADD {} /x\n", srv.url("/missing.tar.gz"));
    let (e, msg) = fetch_error(run_build(&h, &df));
    assert!(matches!(e, FetchError::Status { status: 404, .. }), "{e}");
    assert!(
        msg.contains("404") && msg.contains("/missing.tar.gz"),
        "{msg}"
    );
    assert!(msg.starts_with("step 1 (ADD "), "{msg}");

    let secret_url = format!("http://bob:hunter2@127.0.0.1:{}/private/f", srv.port);
    let df = format!("FROM scratch\nADD {secret_url} /x\n");
    let (e, msg) = fetch_error(run_build(&h, &df));
    assert!(matches!(e, FetchError::Status { status: 401, .. }), "{e}");
    assert!(!msg.contains("hunter2"), "{msg}");
    assert!(msg.contains("bob:xxxxx@"), "{msg}");
    // The credentials were sent (basic auth from the URL), just never shown.
    let s = srv.state.lock().expect("state");
    let sent = s
        .requests
        .iter()
        .find(|(p, _)| p == "/private/f")
        .and_then(|(_, a)| a.clone());
    assert!(sent.is_some_and(|a| a.starts_with("Basic ")));
}

#[test]
fn unreachable_host_is_an_environment_error() {
    let h = home();
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let df = format!("FROM scratch\nADD http://127.0.0.1:{port}/f /x\n");
    let (e, _) = fetch_error(run_build(&h, &df));
    assert!(e.is_environment(), "{e}");
}

/// A git repository served by `git daemon` on 127.0.0.1.
struct GitServer {
    _dir: tempfile::TempDir,
    repo: PathBuf,
    port: u16,
    daemon: std::process::Child,
}

impl Drop for GitServer {
    fn drop(&mut self) {
        // `git daemon` runs `git-daemon` as a child: end the whole process group.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.daemon.wait();
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .env("GIT_COMMITTER_DATE", "1600000000 +0000")
        .env("GIT_AUTHOR_DATE", "1600000000 +0000")
        .output()
        .expect("git is not installed: apt-get install git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn git_server() -> GitServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("sub/deeper")).expect("mkdir");
    std::fs::write(work.join("top.txt"), "top\n").expect("write");
    std::fs::write(work.join("sub/a.txt"), "a v1\n").expect("write");
    std::fs::write(work.join("sub/deeper/b.txt"), "b\n").expect("write");
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "one"]);
    git(&work, &["tag", "-a", "v1", "-m", "v1"]);
    let repo = dir.path().join("srv/repo.git");
    std::fs::create_dir_all(dir.path().join("srv")).expect("mkdir");
    let out = Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(&work)
        .arg(&repo)
        .output()
        .expect("git clone");
    assert!(out.status.success());
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let daemon = Command::new("git")
        .arg("daemon")
        .arg("--export-all")
        .arg("--reuseaddr")
        .arg("--listen=127.0.0.1")
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", dir.path().join("srv").display()))
        .arg(dir.path().join("srv"))
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("git daemon (apt-get install git)");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "git daemon did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    GitServer {
        _dir: dir,
        repo,
        port,
        daemon,
    }
}

#[test]
fn git_ref_and_subdir_are_checked_out_without_git_dir_and_keyed_on_the_commit() {
    let h = home();
    let g = git_server();
    let url = format!("git://127.0.0.1:{}/repo.git", g.port);
    let df = format!(
        "FROM scratch\n\
         ADD {url}#v1:sub /src/\n\
         ADD --keep-git-dir=true {url}#main /full/\n"
    );
    let (cached, layers) = run_build(&h, &df).expect("build");
    assert_eq!(cached, [false, false]);
    {
        let view = View::mount(&layers, h.home.path()).expect("view");
        let p = view.path();
        assert_eq!(
            std::fs::read_to_string(p.join("src/a.txt")).expect("a"),
            "a v1\n"
        );
        assert_eq!(
            std::fs::read_to_string(p.join("src/deeper/b.txt")).expect("b"),
            "b\n"
        );
        assert!(!p.join("src/top.txt").exists());
        assert!(!p.join("src/.git").exists());
        // Every mtime is the commit time.
        let m = std::fs::metadata(p.join("src/a.txt")).expect("stat");
        assert_eq!(m.mtime(), 1_600_000_000);
        assert!(p.join("full/top.txt").is_file());
        assert!(p.join("full/.git").is_dir(), "--keep-git-dir keeps .git");
    }
    // Unmoved refs: cached. A new commit on main re-runs only the step that reads main.
    assert_eq!(run_build(&h, &df).expect("rebuild").0, [true, true]);
    let work = g
        .repo
        .parent()
        .expect("srv")
        .parent()
        .expect("dir")
        .join("work");
    std::fs::write(work.join("top.txt"), "top v2\n").expect("write");
    git(&work, &["commit", "-q", "-am", "two"]);
    git(
        &work,
        &["push", "-q", g.repo.to_str().expect("utf-8"), "main"],
    );
    let (cached, layers) = run_build(&h, &df).expect("rebuild after a push");
    assert_eq!(cached, [true, false]);
    let view = View::mount(&layers, h.home.path()).expect("view");
    assert_eq!(
        std::fs::read_to_string(view.path().join("full/top.txt")).expect("top"),
        "top v2\n"
    );
}

#[test]
fn git_checksum_is_the_commit_and_unknown_refs_fail_clearly() {
    let h = home();
    let g = git_server();
    let url = format!("git://127.0.0.1:{}/repo.git", g.port);
    let commit = git(&g.repo, &["rev-parse", "main"]);
    let df = format!("FROM scratch\nADD --checksum={commit} {url}#main /s/\n");
    assert_eq!(run_build(&h, &df).expect("build").0, [false]);
    let df = format!(
        "FROM scratch\nADD --checksum={} {url}#main /s/\n",
        "1".repeat(40)
    );
    let (e, _) = fetch_error(run_build(&h, &df));
    assert!(matches!(e, FetchError::Checksum { .. }), "{e}");
    let df = format!("FROM scratch\nADD {url}#no-such-branch /s/\n");
    let (e, msg) = fetch_error(run_build(&h, &df));
    assert!(matches!(e, FetchError::Git { .. }), "{e}");
    assert!(msg.contains("no-such-branch"), "{msg}");
}

#[test]
fn image_create_exits_1_on_a_checksum_mismatch_and_registers_nothing() {
    let h = home();
    let srv = Server::start();
    std::fs::write(
        h.ctx.path().join("Dockerfile"),
        format!(
            "FROM scratch\nADD --checksum=sha256:{} {} /x\n",
            sha256("other"),
            srv.url("/files/hello.txt")
        ),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(h.home.path())
        .args([
            "image",
            "create",
            "-n",
            "remote",
            "--disk_mb",
            "16",
            "--json",
        ])
        .arg(h.ctx.path())
        .output()
        .expect("kiln runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("error JSON");
    assert_eq!(v["error"]["code"], "fetch_failed", "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(msg.contains("checksum mismatch"), "{msg}");
    let ls = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--home")
        .arg(h.home.path())
        .args(["image", "ls", "--json"])
        .output()
        .expect("kiln runs");
    let names: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("ls JSON");
    assert_eq!(names, serde_json::json!([]));
}
