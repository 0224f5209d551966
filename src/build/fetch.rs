//! ADD's remote sources: http(s) URLs and git repositories, fetched into a scratch tree that
//! the copy then reads like any other source tree.
//!
//! # URLs (Docker's and BuildKit's rules)
//! - The file is named after the last segment of the URL's path (percent-decoded), or
//!   `__unnamed__` when the path has none; `Content-Disposition` is not used (the Dockerfile
//!   frontend names the file itself). The copy then places it: inside `dest` when `dest` ends
//!   in `/` or is a directory, else at `dest`.
//! - Mode 0600 unless `--chmod`; owner 0:0 unless `--chown`; mtime from `Last-Modified`, the
//!   epoch without one. Remote archives are not unpacked (only with `--unpack=true`).
//! - A status outside 200–399 is an error; at most 10 redirects, never https → http; a file
//!   larger than [`MAX_DOWNLOAD_BYTES`] is refused. `Authorization` is never logged: URLs in
//!   messages go through [`crate::ir::redact_credentials`] and reqwest errors drop their URL.
//!
//! # Cache keys
//! With `--checksum` the checksum is the key (as BuildKit's http source): a cached step is
//! reused without any request, and the checksum is verified when the step runs. Without one,
//! BuildKit asks the server again every build (with the stored ETag); Kiln downloads the file
//! every build and keys the step on the sha256 of its content and its `Last-Modified`, so a
//! changed file re-runs the step and an unchanged one is a cache hit. (No ETag store: a
//! conditional request would save the transfer but needs the previous download kept.)
//!
//! # Git (`ADD https://host/repo.git#ref:subdir dest`, `git@host:repo.git`, `git://…`)
//! The `git` program does the work. The key is the commit `git ls-remote` resolves the ref to
//! (a 40-hex ref is taken as the commit), plus the subdirectory and `--keep-git-dir`; so a
//! moved branch re-runs the step and an unmoved one does not. `--checksum` for git is the
//! expected commit. The checkout is shallow (depth 1, submodules too), `.git` is removed unless
//! `--keep-git-dir`, and every file's mtime is the commit's committer time, so one commit gives
//! one layer. Only the http, https, git and ssh transports are allowed, prompts are off, and
//! ssh runs in batch mode.

use crate::ir::redact_credentials;
use sha2::Digest as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// The largest file `ADD <url>` downloads.
pub const MAX_DOWNLOAD_BYTES: u64 = 8 << 30;

/// A remote source could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No connection, a timeout, a TLS failure, too many redirects.
    #[error("cannot fetch {url}: {detail}")]
    Unreachable {
        /// The URL, credentials masked.
        url: String,
        /// Why.
        detail: String,
    },
    /// The server answered with an error status.
    #[error("cannot fetch {url}: the server answered {status}")]
    Status {
        /// The URL, credentials masked.
        url: String,
        /// The status.
        status: u16,
    },
    /// The content does not match `--checksum`.
    #[error("checksum mismatch for {url}: got {got}, expected {expected}")]
    Checksum {
        /// The URL, credentials masked.
        url: String,
        /// What the content hashes to.
        got: String,
        /// `--checksum`.
        expected: String,
    },
    /// Too big.
    #[error("{url} is larger than {limit} bytes")]
    TooLarge {
        /// The URL, credentials masked.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The URL cannot be parsed.
    #[error("bad URL {url}: {detail}")]
    BadUrl {
        /// The URL, credentials masked.
        url: String,
        /// Why.
        detail: String,
    },
    /// A git command failed.
    #[error("git {what} for {url} failed: {detail}")]
    Git {
        /// What was being done (`ls-remote`, `fetch`, …).
        what: &'static str,
        /// The repository, credentials masked.
        url: String,
        /// git's message, credentials masked.
        detail: String,
    },
    /// Writing the download failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl FetchError {
    /// True when the network or a tool is the problem rather than the build's input.
    pub fn is_environment(&self) -> bool {
        matches!(self, FetchError::Unreachable { .. } | FetchError::Io { .. })
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One downloaded file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// Where it is, relative to the tree it was downloaded into.
    pub rel: String,
    /// `sha256:HEX` of its content.
    pub sha256: String,
    /// `Last-Modified`, as the server sent it (empty when absent).
    pub last_modified: String,
}

/// The file name ADD gives a URL's content: the last path segment, percent-decoded, or
/// `__unnamed__`.
pub fn file_name(url: &str) -> String {
    let path = reqwest::Url::parse(url)
        .map(|u| u.path().to_string())
        .unwrap_or_default();
    let last = path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let decoded = percent_decode(last);
    // `path.Base` of a path ending in `/..` or `.` names a directory, never a file.
    if decoded.is_empty() || decoded == "." || decoded == ".." || decoded.contains('/') {
        "__unnamed__".to_string()
    } else {
        decoded
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escapes a literal file name for a COPY source pattern (`*`, `?`, `[` and `\` are glob).
pub fn literal_pattern(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '*' | '?' | '[' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Verifies `path`'s content against `--checksum` (`sha256:`, `sha384:` or `sha512:` HEX).
/// `sha256` is the digest the download already computed.
pub fn verify(path: &Path, sha256: &str, checksum: &str, url: &str) -> Result<(), FetchError> {
    let (alg, want) = checksum.split_once(':').unwrap_or(("", checksum));
    let got = match alg {
        "sha256" => sha256.to_string(),
        "sha384" => format!("sha384:{}", hash_file::<sha2::Sha384>(path)?),
        "sha512" => format!("sha512:{}", hash_file::<sha2::Sha512>(path)?),
        _ => {
            return Err(FetchError::Checksum {
                url: redact_credentials(url),
                got: sha256.to_string(),
                expected: checksum.to_string(),
            });
        }
    };
    if got.eq_ignore_ascii_case(&format!("{alg}:{want}")) {
        Ok(())
    } else {
        Err(FetchError::Checksum {
            url: redact_credentials(url),
            got,
            expected: checksum.to_string(),
        })
    }
}

fn hash_file<D: sha2::Digest>(path: &Path) -> Result<String, FetchError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io("read", path))?;
    let mut h = D::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match f.read(&mut buf).map_err(io("read", path))? {
            0 => break,
            n => h.update(&buf[..n]),
        }
    }
    Ok(hex::encode(h.finalize()))
}

fn client(direct: bool) -> Result<reqwest::Client, String> {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.previous().iter().any(|u| u.scheme() == "https")
            && attempt.url().scheme() == "http";
        if attempt.previous().len() >= 10 {
            attempt.error("more than 10 redirects")
        } else if downgrade {
            attempt.error("refusing a redirect from https to plain http")
        } else {
            attempt.follow()
        }
    });
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .redirect(policy)
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120));
    if direct {
        b = b.no_proxy();
    }
    b.build().map_err(|e| crate::oci::client::describe(&e))
}

/// Downloads `url` to `dir/rel` with ADD's mode (0600) and mtime (`Last-Modified`, else the
/// epoch), hashing it on the way.
pub fn download(url: &str, dir: &Path, rel: &str) -> Result<Download, FetchError> {
    let shown = redact_credentials(url);
    let parsed = reqwest::Url::parse(url).map_err(|e| FetchError::BadUrl {
        url: shown.clone(),
        detail: e.to_string(),
    })?;
    let direct = parsed
        .host_str()
        .is_some_and(crate::oci::reference::is_loopback_host);
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    }
    // The step loop is synchronous and may itself run under a runtime (tokio refuses to
    // nest): the request gets a thread and a runtime of its own.
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| FetchError::Unreachable {
                    url: shown.clone(),
                    detail: format!("cannot start the async runtime: {e}"),
                })?;
            rt.block_on(get(parsed, direct, &path, &shown))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(FetchError::Unreachable {
                url: shown.clone(),
                detail: "the download thread panicked".into(),
            })
        })
    });
    let (sha256, last_modified) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    let mtime = httpdate(&last_modified).unwrap_or(SystemTime::UNIX_EPOCH);
    let f = std::fs::File::options()
        .write(true)
        .open(&path)
        .map_err(io("open", &path))?;
    f.set_modified(mtime)
        .map_err(io("set the mtime of", &path))?;
    Ok(Download {
        rel: rel.to_string(),
        sha256,
        last_modified,
    })
}

async fn get(
    url: reqwest::Url,
    direct: bool,
    path: &Path,
    shown: &str,
) -> Result<(String, String), FetchError> {
    use std::os::unix::fs::OpenOptionsExt;
    let unreachable = |detail: String| FetchError::Unreachable {
        url: shown.to_string(),
        detail,
    };
    let http = client(direct).map_err(unreachable)?;
    let mut resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| unreachable(crate::oci::client::describe(&e.without_url())))?;
    let status = resp.status().as_u16();
    if !(200..400).contains(&status) {
        return Err(FetchError::Status {
            url: shown.to_string(),
            status,
        });
    }
    let too_large = || FetchError::TooLarge {
        url: shown.to_string(),
        limit: MAX_DOWNLOAD_BYTES,
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_DOWNLOAD_BYTES)
    {
        return Err(too_large());
    }
    let last_modified = resp
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut out = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    // The umask may have cut the mode: ADD's is exactly 0600.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io("chmod", path))?;
    let mut h = sha2::Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| unreachable(crate::oci::client::describe(&e.without_url())))?
    {
        n += chunk.len() as u64;
        if n > MAX_DOWNLOAD_BYTES {
            return Err(too_large());
        }
        h.update(&chunk);
        out.write_all(&chunk).map_err(io("write", path))?;
    }
    out.sync_all().map_err(io("write", path))?;
    Ok((
        format!("sha256:{}", hex::encode(h.finalize())),
        last_modified,
    ))
}

/// Parses an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`; RFC 850 and asctime forms too).
pub fn httpdate(s: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let parts: Vec<&str> = s.split([' ', ',', '-']).filter(|p| !p.is_empty()).collect();
    // IMF-fixdate and RFC 850: weekday day month year time GMT; asctime: weekday month day
    // time year.
    let (day, month, year, time) = match parts.as_slice() {
        [_, d, m, y, t, "GMT"] => (*d, *m, *y, *t),
        [_, m, d, t, y] => (*d, *m, *y, *t),
        _ => return None,
    };
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let mut year: i64 = year.parse().ok()?;
    if year < 100 {
        year += if year < 70 { 2000 } else { 1900 };
    }
    let day: i64 = day.parse().ok()?;
    let mut hms = time.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, se) = (hms.next()??, hms.next()??, hms.next()??);
    if !(1..=31).contains(&day) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    u64::try_from(secs)
        .ok()
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

/// A git source split as Docker does: `REMOTE#REF:SUBDIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRef {
    /// The repository URL (without the fragment).
    pub remote: String,
    /// The ref (branch, tag, commit); empty is the remote's HEAD.
    pub reference: String,
    /// A subdirectory to copy instead of the whole tree.
    pub subdir: String,
}

impl GitRef {
    /// Splits `url#ref:subdir`.
    pub fn parse(url: &str) -> GitRef {
        let (remote, fragment) = url.split_once('#').unwrap_or((url, ""));
        let (reference, subdir) = fragment.split_once(':').unwrap_or((fragment, ""));
        GitRef {
            remote: remote.to_string(),
            reference: reference.to_string(),
            subdir: subdir.trim_matches('/').to_string(),
        }
    }
}

fn is_commit(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn git() -> Command {
    let mut c = Command::new("git");
    c.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", "http:https:git:ssh")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stdin(std::process::Stdio::null());
    c
}

fn run_git(what: &'static str, url: &str, cmd: &mut Command) -> Result<String, FetchError> {
    let out = cmd.output().map_err(|e| FetchError::Git {
        what,
        url: redact_credentials(url),
        detail: if e.kind() == std::io::ErrorKind::NotFound {
            "git is not installed (Debian: apt-get install git)".into()
        } else {
            e.to_string()
        },
    })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        // git prints the URL it was given: mask it (and any form of it) in the message.
        let detail = msg
            .replace(url, &redact_credentials(url))
            .trim()
            .lines()
            .last()
            .unwrap_or("")
            .to_string();
        return Err(FetchError::Git {
            what,
            url: redact_credentials(url),
            detail: redact_words(&detail),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Masks anything URL-like with user info in free text.
fn redact_words(s: &str) -> String {
    s.split(' ')
        .map(|w| {
            if w.contains("://") {
                redact_credentials(w.trim_matches(['\'', '"']))
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The commit `r.reference` names on the remote.
pub fn resolve_commit(r: &GitRef) -> Result<String, FetchError> {
    if is_commit(&r.reference) {
        return Ok(r.reference.to_ascii_lowercase());
    }
    let want = if r.reference.is_empty() {
        "HEAD"
    } else {
        &r.reference
    };
    let out = run_git(
        "ls-remote",
        &r.remote,
        // `X^{}` too: a pattern alone does not match an annotated tag's peeled line.
        git()
            .args(["ls-remote", "--", &r.remote, want])
            .arg(format!("{want}^{{}}")),
    )?;
    let refs: Vec<(&str, &str)> = out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(sha, name)| (sha.trim(), name.trim()))
        .collect();
    // A tag's peeled commit first, then the tag, a branch, any exact match.
    let candidates = [
        format!("refs/tags/{want}^{{}}"),
        format!("refs/tags/{want}"),
        format!("refs/heads/{want}"),
        want.to_string(),
    ];
    candidates
        .iter()
        .find_map(|c| {
            refs.iter()
                .find(|(_, n)| n == c)
                .map(|(s, _)| s.to_string())
        })
        .ok_or_else(|| FetchError::Git {
            what: "ls-remote",
            url: redact_credentials(&r.remote),
            detail: format!("no ref {want:?} in the repository"),
        })
}

/// Checks out `commit` of `r.remote` into `dir` (which must not exist), shallow, with
/// submodules; removes `.git` unless `keep_git_dir`; sets every mtime to the commit time.
/// Returns the directory to copy from (`dir` or its `subdir`).
pub fn checkout(
    r: &GitRef,
    commit: &str,
    dir: &Path,
    keep_git_dir: bool,
) -> Result<PathBuf, FetchError> {
    let url = &r.remote;
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let d = dir.as_os_str();
    run_git("init", url, git().arg("init").arg("-q").arg(d))?;
    run_git(
        "remote add",
        url,
        git()
            .arg("-C")
            .arg(d)
            .args(["remote", "add", "origin", "--", url]),
    )?;
    // By commit, shallow (servers speaking protocol v2 over http(s) serve any reachable
    // object); else the ref by name, shallow; else everything. Then the commit must be there.
    let fetch = |args: &[&str]| {
        run_git(
            "fetch",
            url,
            git().arg("-C").arg(d).args(["fetch", "-q"]).args(args),
        )
    };
    let named = !r.reference.is_empty() && !is_commit(&r.reference);
    let fetched = fetch(&["--depth", "1", "origin", commit])
        .or_else(|e| {
            if named {
                fetch(&["--depth", "1", "origin", &r.reference])
            } else {
                Err(e)
            }
        })
        .or_else(|_| fetch(&["--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"]));
    fetched?;
    let have = run_git(
        "fetch",
        url,
        git()
            .arg("-C")
            .arg(d)
            .args(["rev-parse", "--verify", "-q"])
            .arg(format!("{commit}^{{commit}}")),
    )
    .map_err(|_| FetchError::Git {
        what: "fetch",
        url: redact_credentials(url),
        detail: format!("the repository has no commit {commit}"),
    })?;
    if have.trim() != commit {
        return Err(FetchError::Git {
            what: "fetch",
            url: redact_credentials(url),
            detail: format!("got commit {}, expected {commit}", have.trim()),
        });
    }
    run_git(
        "checkout",
        url,
        git()
            .arg("-C")
            .arg(d)
            .args(["-c", "advice.detachedHead=false", "checkout", "-q", commit]),
    )?;
    if dir.join(".gitmodules").is_file() {
        run_git(
            "submodule update",
            url,
            git().arg("-C").arg(d).args([
                "submodule",
                "update",
                "-q",
                "--init",
                "--recursive",
                "--depth",
                "1",
            ]),
        )?;
    }
    let time = run_git(
        "log",
        url,
        git()
            .arg("-C")
            .arg(d)
            .args(["log", "-1", "--format=%ct", commit]),
    )?;
    let secs: u64 = time.trim().parse().unwrap_or(0);
    if !keep_git_dir {
        let g = dir.join(".git");
        std::fs::remove_dir_all(&g).map_err(io("remove", &g))?;
    }
    let src = if r.subdir.is_empty() {
        dir.to_path_buf()
    } else {
        let s = dir.join(&r.subdir);
        // The subdirectory must stay inside the checkout (no `..`, no symlink out of it).
        let inside = std::fs::canonicalize(&s)
            .ok()
            .zip(std::fs::canonicalize(dir).ok())
            .is_some_and(|(s, d)| s.starts_with(d) && s.is_dir());
        if !inside || r.subdir.split('/').any(|c| c == "..") {
            return Err(FetchError::Git {
                what: "checkout",
                url: redact_credentials(url),
                detail: format!("no directory {:?} in commit {commit}", r.subdir),
            });
        }
        s
    };
    set_mtimes(dir, SystemTime::UNIX_EPOCH + Duration::from_secs(secs))?;
    Ok(src)
}

/// Sets the mtime of everything under `dir` (symlinks themselves, not their targets).
fn set_mtimes(dir: &Path, t: SystemTime) -> Result<(), FetchError> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let ts = nix::sys::time::TimeSpec::new(secs, 0);
    for e in walkdir::WalkDir::new(dir).contents_first(true) {
        let e = e.map_err(|e| FetchError::Io {
            what: "walk",
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            e.path(),
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|errno| FetchError::Io {
            what: "set the mtime of",
            path: e.path().to_path_buf(),
            source: std::io::Error::from_raw_os_error(errno as i32),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_come_from_the_url_path() {
        assert_eq!(file_name("https://h.example/a/b/app.tar.gz"), "app.tar.gz");
        assert_eq!(file_name("https://h.example/a/b/"), "b");
        assert_eq!(file_name("https://h.example/a%20b?x=1#f"), "a b");
        assert_eq!(file_name("https://h.example"), "__unnamed__");
        assert_eq!(file_name("https://h.example/"), "__unnamed__");
        assert_eq!(file_name("https://h.example/x/%2e%2e"), "__unnamed__");
    }

    #[test]
    fn http_dates_parse_in_all_three_forms() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(httpdate("Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(httpdate("Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(httpdate("Sun Nov  6 08:49:37 1994"), Some(t));
        assert_eq!(httpdate("yesterday"), None);
    }

    #[test]
    fn git_fragments_split_into_ref_and_subdir() {
        assert_eq!(
            GitRef::parse("https://h.example/r.git#v1.2:docs/"),
            GitRef {
                remote: "https://h.example/r.git".into(),
                reference: "v1.2".into(),
                subdir: "docs".into(),
            }
        );
        assert_eq!(GitRef::parse("git@h.example:o/r.git").reference, "");
    }

    #[test]
    fn literal_names_escape_glob_characters() {
        assert_eq!(literal_pattern("a*[b]?.txt"), "a\\*\\[b]\\?.txt");
    }
}
