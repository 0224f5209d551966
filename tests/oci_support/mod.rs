//! Real parts for the base-image tests: Debian's `docker-registry` on 127.0.0.1 (no auth,
//! htpasswd, or Bearer tokens from a token server run here, signing with a key made here),
//! a fault-injecting proxy, an OCI layout writer, skopeo/umoci, and tree comparison. Every
//! process and thread started here is stopped on drop, panics included. Only loopback
//! addresses are ever contacted. A missing tool fails the test.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fails loudly when a tool the test needs is missing.
pub fn need(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{tool} is missing: install the Debian package {package} (scripts/test.sh does)"
    );
}

/// Runs a command, panicking with its output on failure.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Waits until something answers HTTP on `addr`.
fn wait_http(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes());
            let mut buf = [0u8; 12];
            if s.read(&mut buf).is_ok_and(|n| n > 0) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing answered on {addr}");
}

/// How a registry authenticates.
pub enum RegistryAuth {
    /// Anyone may pull and push.
    None,
    /// htpasswd Basic auth with one user.
    Basic { user: String, pass: String },
    /// Bearer tokens from `server`.
    Token(Arc<TokenServer>),
}

/// A `docker-registry` process on 127.0.0.1 with its storage in a temp dir.
pub struct Registry {
    child: Child,
    pub host: String,
    pub dir: tempfile::TempDir,
    _token: Option<Arc<TokenServer>>,
}

impl Registry {
    pub fn start(auth: RegistryAuth) -> Registry {
        need("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("registry dir");
        let port = free_port("127.0.0.1");
        let host = format!("127.0.0.1:{port}");
        let auth_yaml = match &auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Basic { user, pass } => {
                need("htpasswd", "apache2-utils");
                let out = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
                let p = dir.path().join("htpasswd");
                std::fs::write(&p, &out.stdout).expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                    p.display()
                )
            }
            RegistryAuth::Token(t) => format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                t.realm,
                t.service,
                t.issuer,
                t.cert.display()
            ),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n  secret: kiln-test-secret\n{auth_yaml}",
            dir.path().join("data").display()
        );
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).expect("config");
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let r = Registry {
            child,
            host,
            dir,
            _token: match auth {
                RegistryAuth::Token(t) => Some(t),
                _ => None,
            },
        };
        wait_http(&r.host);
        r
    }

    /// The `data` file of a blob in the registry's storage.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pushes with skopeo (an independent client).
pub fn skopeo_copy(src: &str, dst: &str, creds: Option<(&str, &str)>, all: bool) {
    need("skopeo", "skopeo");
    let mut c = Command::new("skopeo");
    c.args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--src-tls-verify=false",
    ]);
    if all {
        c.arg("--all");
    }
    if let Some((u, p)) = creds {
        c.arg(format!("--dest-creds={u}:{p}"));
    }
    run(c.args([src, dst]));
}

/// `skopeo inspect` (with `--raw`, the manifest bytes).
pub fn skopeo_inspect(reference: &str, raw: bool, creds: Option<(&str, &str)>) -> Vec<u8> {
    need("skopeo", "skopeo");
    let mut c = Command::new("skopeo");
    c.args(["inspect", "--tls-verify=false"]);
    if raw {
        c.arg("--raw");
    }
    if let Some((u, p)) = creds {
        c.arg(format!("--creds={u}:{p}"));
    }
    run(c.arg(format!("docker://{reference}"))).stdout
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

pub fn b64(data: &[u8], url: bool) -> String {
    let alphabet: &[u8] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if !url {
            out.push_str(&"=".repeat(3 - chunk.len()));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match h {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One HTTP/1.x request as read from a socket.
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Values of `key` in the query string, or in a form body.
    pub fn query(&self, key: &str) -> Vec<String> {
        let q = if self.method == "POST" {
            String::from_utf8_lossy(&self.body).into_owned()
        } else {
            self.target
                .split_once('?')
                .map_or("", |(_, q)| q)
                .to_string()
        };
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| percent_decode(v))
            .collect()
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut req = Request {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    if let Some(n) = req
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).ok()?;
        req.body = body;
    }
    Some(req)
}

/// A tiny threaded HTTP server on `ip`, one request per connection; stops on drop.
pub struct Server {
    pub addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Handler = dyn Fn(&Request, &mut TcpStream) + Send + Sync;

impl Server {
    pub fn start(ip: &str, handler: Arc<Handler>) -> Server {
        let listener = TcpListener::bind((ip, 0)).expect("bind loopback");
        let addr = listener.local_addr().expect("addr").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let h = handler.clone();
                std::thread::spawn(move || {
                    let mut w = match conn.try_clone() {
                        Ok(w) => w,
                        Err(_) => return,
                    };
                    let mut r = BufReader::new(conn);
                    if let Some(req) = read_request(&mut r) {
                        h(&req, &mut w);
                    }
                    let _ = w.flush();
                    let _ = w.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Server {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn respond(w: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = w.write_all(head.as_bytes());
    let _ = w.write_all(body);
}

/// A Bearer-token server for the distribution registry's `token` auth: RS256 JWTs with an
/// `x5c` header, signed by a key made here whose self-signed certificate the registry trusts.
/// Anonymous clients get `pull` on `public/…` only; `user:pass` gets what it asks for.
pub struct TokenServer {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub cert: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
    _server: Server,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    pub fn start(user: &str, pass: &str) -> Arc<TokenServer> {
        need("openssl", "openssl");
        let dir = tempfile::tempdir().expect("token dir");
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=kiln-test-token",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let der = run(Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert))
        .stdout;
        let x5c = b64(&der, false);
        let service = "kiln-test-registry".to_string();
        let issuer = "kiln-test-issuer".to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let expected = format!("Basic {}", b64(format!("{user}:{pass}").as_bytes(), false));
        let (svc, iss, lg, k) = (service.clone(), issuer.clone(), log.clone(), key.clone());
        let handler: Arc<Handler> = Arc::new(move |req: &Request, w: &mut TcpStream| {
            let auth = req.header("authorization").map(str::to_string);
            let scopes = req.query("scope");
            // An OAuth2 refresh-token grant (docker config `identitytoken`).
            let refresh = req.query("refresh_token").into_iter().next();
            lg.lock().expect("log").push(format!(
                "{} auth={} scope={}",
                req.method,
                match (&auth, &refresh) {
                    (_, Some(r)) if r == "refresh-ok" => "refresh-ok",
                    (_, Some(_)) => "refresh-wrong",
                    (None, None) => "anonymous",
                    (Some(a), None) if *a == expected => "basic-ok",
                    (Some(_), None) => "basic-wrong",
                },
                scopes.join(" ")
            ));
            let authed = match (&auth, &refresh) {
                (_, Some(r)) if r == "refresh-ok" => true,
                (None, None) => false,
                (Some(a), None) if *a == expected => true,
                _ => {
                    respond(w, "401 Unauthorized", &[], br#"{"errors":[{"code":"UNAUTHORIZED","message":"wrong username or password"}]}"#);
                    return;
                }
            };
            let mut access = Vec::new();
            for scope in scopes.iter().flat_map(|s| s.split(' ')) {
                let mut p = scope.splitn(3, ':');
                let (Some(typ), Some(name), Some(actions)) = (p.next(), p.next(), p.next()) else {
                    continue;
                };
                let actions: Vec<&str> = actions
                    .split(',')
                    .filter(|a| authed || (*a == "pull" && name.starts_with("public/")))
                    .collect();
                access.push(serde_json::json!({"type": typ, "name": name, "actions": actions}));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs();
            let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
            let claims = serde_json::json!({
                "iss": iss, "sub": if authed { "tester" } else { "" }, "aud": svc,
                "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", access.len()),
                "access": access,
            });
            let signing_input = format!(
                "{}.{}",
                b64(header.to_string().as_bytes(), true),
                b64(claims.to_string().as_bytes(), true)
            );
            let mut child = Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(&k)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("openssl dgst");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(signing_input.as_bytes())
                .expect("sign input");
            let sig = child.wait_with_output().expect("signature").stdout;
            let token = format!("{signing_input}.{}", b64(&sig, true));
            let body =
                serde_json::json!({"token": token, "access_token": token, "expires_in": 300})
                    .to_string();
            respond(
                w,
                "200 OK",
                &[("Content-Type", "application/json".into())],
                body.as_bytes(),
            );
        });
        let server = Server::start("127.0.0.1", handler);
        Arc::new(TokenServer {
            realm: format!("http://{}/token", server.addr),
            service,
            issuer,
            cert,
            log,
            _server: server,
            _dir: dir,
        })
    }
}

/// What a [`FaultProxy`] does to blob GETs.
#[derive(Default)]
pub struct Faults {
    /// Answer this many blob GETs with 503 first.
    pub fail_blobs: AtomicUsize,
    /// Cut the body of this many blob GETs after half of it (a reset).
    pub cut_blobs: AtomicUsize,
    /// Redirect blob GETs to this blob-storage server instead.
    pub redirect_to: Mutex<Option<String>>,
    /// Every request line seen, with its Range header.
    pub log: Mutex<Vec<String>>,
}

/// A proxy in front of a registry that injects faults into blob downloads.
pub struct FaultProxy {
    pub host: String,
    pub faults: Arc<Faults>,
    _server: Server,
}

/// Forwards `req` to `upstream` and returns the raw response (status line, headers, body).
fn forward(upstream: &str, req: &Request, host: &str) -> (String, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(upstream).expect("upstream");
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.target);
    for (k, v) in &req.headers {
        if k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("host") {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Host: {host}\r\nConnection: close\r\n\r\n"));
    s.write_all(head.as_bytes()).expect("forward");
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).expect("status");
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut body = Vec::new();
    let _ = r.read_to_end(&mut body);
    (status.trim_end().to_string(), headers, body)
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        let faults = Arc::new(Faults::default());
        let (f, up) = (faults.clone(), upstream.to_string());
        let handler: Arc<Handler> = Arc::new(move |req: &Request, w: &mut TcpStream| {
            let is_blob = req.method == "GET" && req.target.contains("/blobs/sha256:");
            f.log.lock().expect("log").push(format!(
                "{} {} range={}",
                req.method,
                req.target,
                req.header("range").unwrap_or("-")
            ));
            if is_blob {
                if f.fail_blobs.load(Ordering::SeqCst) > 0 {
                    f.fail_blobs.fetch_sub(1, Ordering::SeqCst);
                    respond(w, "503 Service Unavailable", &[], b"try later");
                    return;
                }
                if let Some(to) = f.redirect_to.lock().expect("lock").clone() {
                    let digest = req
                        .target
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    respond(
                        w,
                        "307 Temporary Redirect",
                        &[("Location", format!("http://{to}/storage/{digest}?sig=x"))],
                        b"",
                    );
                    return;
                }
            }
            let (status, headers, body) = forward(&up, req, &up);
            let cut = is_blob && status.contains(" 200") && f.cut_blobs.load(Ordering::SeqCst) > 0;
            let mut head = format!("{status}\r\n");
            for (k, v) in &headers {
                if k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("content-length")
                {
                    continue;
                }
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ));
            let _ = w.write_all(head.as_bytes());
            if cut {
                f.cut_blobs.fetch_sub(1, Ordering::SeqCst);
                let _ = w.write_all(&body[..body.len() / 2]);
                let _ = w.flush();
                // The connection drops mid-body, as on a reset.
                return;
            }
            let _ = w.write_all(&body);
        });
        let server = Server::start("127.0.0.1", handler);
        FaultProxy {
            host: server.addr.clone(),
            faults,
            _server: server,
        }
    }
}

/// "Blob storage" on another loopback host: serves blobs it fetches from the registry
/// with its own credentials, and records the Authorization header clients sent it.
pub struct BlobStorage {
    pub host: String,
    pub seen_auth: Arc<Mutex<Vec<Option<String>>>>,
    _server: Server,
}

impl BlobStorage {
    pub fn start(registry: &str, repo: &str, basic: Option<(&str, &str)>) -> BlobStorage {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, reg, repo) = (seen.clone(), registry.to_string(), repo.to_string());
        let auth =
            basic.map(|(u, p)| format!("Basic {}", b64(format!("{u}:{p}").as_bytes(), false)));
        let handler: Arc<Handler> = Arc::new(move |req: &Request, w: &mut TcpStream| {
            s.lock()
                .expect("lock")
                .push(req.header("authorization").map(str::to_string));
            let digest = req
                .target
                .trim_start_matches("/storage/")
                .split('?')
                .next()
                .unwrap_or_default()
                .to_string();
            let mut headers = vec![];
            if let Some(a) = &auth {
                headers.push(("Authorization".to_string(), a.clone()));
            }
            let up = Request {
                method: "GET".into(),
                target: format!("/v2/{repo}/blobs/{digest}"),
                headers,
                body: Vec::new(),
            };
            let (status, _, body) = forward(&reg, &up, &reg);
            assert!(status.contains(" 200"), "storage fetch: {status}");
            respond(
                w,
                "200 OK",
                &[("Content-Type", "application/octet-stream".into())],
                &body,
            );
        });
        // Another host than the registry's 127.0.0.1.
        let server = Server::start("127.0.0.2", handler);
        BlobStorage {
            host: server.addr.clone(),
            seen_auth: seen,
            _server: server,
        }
    }
}

/// One entry of a test layer.
#[derive(Clone)]
pub enum Entry {
    Dir(&'static str, u32),
    File(String, Vec<u8>, u32),
    Symlink(&'static str, String),
    /// A name written raw (hostile names `Header::set_path` refuses).
    RawFile(Vec<u8>, Vec<u8>),
}

/// A layer tar of `entries` (owners 0, mtime 1700000000).
pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match e {
            Entry::Dir(name, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, name, std::io::empty()).expect("dir");
            }
            Entry::File(name, data, mode) => {
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, &data[..]).expect("file");
            }
            Entry::Symlink(name, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, name, target).expect("symlink");
            }
            Entry::RawFile(name, data) => {
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.set_cksum();
                b.append(&h, &data[..]).expect("raw");
            }
        }
    }
    b.into_inner().expect("tar")
}

pub fn file(name: &str, data: &str) -> Entry {
    Entry::File(name.to_string(), data.as_bytes().to_vec(), 0o644)
}

/// How a test layer is compressed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Comp {
    Gzip,
    Zstd,
    Plain,
}

impl Comp {
    fn apply(self, tar: &[u8]) -> (Vec<u8>, &'static str) {
        match self {
            Comp::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(tar).expect("gzip");
                (
                    e.finish().expect("gzip"),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Comp::Zstd => (
                zstd::encode_all(tar, 3).expect("zstd"),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            Comp::Plain => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        }
    }
}

/// A descriptor: media type, digest, size.
#[derive(Clone, Debug)]
pub struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: usize,
}

impl Desc {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// An OCI image layout written by hand.
pub struct Layout {
    pub dir: PathBuf,
    tags: Vec<serde_json::Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("layout");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        Layout {
            dir: dir.to_path_buf(),
            tags: Vec::new(),
        }
    }

    pub fn blob(&self, bytes: &[u8], media_type: &str) -> Desc {
        let hex = sha256_hex(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), bytes).expect("blob");
        Desc {
            media_type: media_type.to_string(),
            digest: format!("sha256:{hex}"),
            size: bytes.len(),
        }
    }

    /// An image of `layers` for `arch`, with `env` in its config; returns the manifest.
    pub fn image(&self, layers: &[(Vec<u8>, Comp)], arch: &str, env: &[&str]) -> Desc {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, comp) in layers {
            let (bytes, mt) = comp.apply(tar);
            descs.push(self.blob(&bytes, mt).json());
            diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
        }
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": env, "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let c = self.blob(
            config.to_string().as_bytes(),
            "application/vnd.oci.image.config.v1+json",
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": c.json(), "layers": descs,
        });
        self.blob(
            manifest.to_string().as_bytes(),
            "application/vnd.oci.image.manifest.v1+json",
        )
    }

    /// An index of `(manifest, arch)`.
    pub fn index(&self, entries: &[(Desc, &str)]) -> Desc {
        let manifests: Vec<_> = entries
            .iter()
            .map(|(d, arch)| {
                let mut j = d.json();
                j["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
                j
            })
            .collect();
        let idx = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        self.blob(
            idx.to_string().as_bytes(),
            "application/vnd.oci.image.index.v1+json",
        )
    }

    /// Names `desc` `tag` in index.json (written now).
    pub fn tag(&mut self, tag: &str, desc: &Desc) {
        let mut j = desc.json();
        j["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        self.tags.push(j);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.tags});
        std::fs::write(self.dir.join("index.json"), index.to_string()).expect("index.json");
    }
}

/// `kiln` with a home, an empty docker config (unless `docker_config` is given) and args.
pub fn kiln(
    home: &Path,
    docker_config: Option<&Path>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let empty = tempfile::tempdir().expect("docker config dir");
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--home").arg(home).args(args);
    c.env("DOCKER_CONFIG", docker_config.unwrap_or(empty.path()));
    c.env_remove("KILN_INSECURE_REGISTRIES");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run kiln")
}

pub fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): status {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A docker config dir with `auths` for `host`.
pub fn docker_config(dir: &Path, host: &str, user: &str, pass: &str) {
    let auth = b64(format!("{user}:{pass}").as_bytes(), false);
    let cfg = serde_json::json!({"auths": {host: {"auth": auth}}});
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("config.json");
}

/// Everything that matters about each path of a tree (mtimes of files and links, not
/// directories, whose mtimes whiteout processing legitimately changes).
pub fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .collect();
        names.sort();
        for p in names {
            let md = std::fs::symlink_metadata(&p).expect("lstat");
            let rel = p.strip_prefix(root).expect("rel").display().to_string();
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_symlink() {
                format!(
                    "link->{}",
                    std::fs::read_link(&p).expect("readlink").display()
                )
            } else if ft.is_file() {
                format!("file:{}", sha256_hex(&std::fs::read(&p).expect("read")))
            } else if ft.is_char_device() || ft.is_block_device() {
                format!("dev:{}", md.rdev())
            } else if ft.is_fifo() {
                "fifo".into()
            } else {
                "other".into()
            };
            let mut xattrs: Vec<String> = xattr::list(&p)
                .map(|l| {
                    l.filter(|k| !k.to_string_lossy().starts_with("trusted.overlay."))
                        .map(|k| {
                            format!(
                                "{}={:?}",
                                k.to_string_lossy(),
                                xattr::get(&p, &k).ok().flatten()
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            xattrs.sort();
            let mtime = if ft.is_dir() {
                String::new()
            } else {
                format!(" mtime={}", md.mtime())
            };
            let mode = if ft.is_symlink() {
                0
            } else {
                md.mode() & 0o7777
            };
            out.insert(
                rel,
                format!(
                    "{kind} mode={mode:o} uid={} gid={}{mtime} xattrs={xattrs:?}",
                    md.uid(),
                    md.gid()
                ),
            );
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Asserts two trees are the same, printing the first differences.
pub fn assert_same_tree(ours: &Path, theirs: &Path) {
    let (a, b) = (tree(ours), tree(theirs));
    let mut diffs = Vec::new();
    for k in a
        .keys()
        .chain(b.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        if a.get(k) != b.get(k) {
            diffs.push(format!(
                "{k}:\n  kiln:  {:?}\n  other: {:?}",
                a.get(k),
                b.get(k)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} paths differ:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!a.is_empty(), "empty tree");
}

/// `umoci unpack` of `layout:tag` (as root); returns the bundle dir (rootfs inside).
pub fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) {
    need("umoci", "umoci");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle));
}

/// A `docker-credential-NAME` helper in a fresh bin dir: `get` answers `user`/`secret` for
/// `server`, and "credentials not found" (exit 1) for anything else. Returns a PATH with the
/// bin dir first.
pub fn credential_helper(dir: &Path, name: &str, server: &str, user: &str, secret: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\nif [ \"$server\" = \"{server}\" ]; then\n  printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}' \"$server\"\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi\n"
    );
    let p = bin.join(format!("docker-credential-{name}"));
    std::fs::write(&p, script).expect("helper");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}
