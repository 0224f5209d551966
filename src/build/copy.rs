//! COPY and ADD into a root tree, with Docker's rules: globs, a directory's contents,
//! trailing-slash destinations, `--chown` (names from the image), `--chmod`, `--exclude`,
//! `--parents`, heredoc files, and ADD's extraction of local archives.
//!
//! Both sides are resolved with `openat2(RESOLVE_IN_ROOT)`: a symlink in the image cannot send
//! a write outside the destination root, and a symlink in the source (context or stage tree)
//! cannot make it read outside the source root. Nested symlinks are copied as links. Owners
//! are `--chown`'s, else 0:0 from the build context and the source's own from a stage or
//! image tree (as BuildKit copies); modes and mtimes come from the source unless `--chmod`.

use super::dockerignore::Matcher;
use crate::ir::Source;
use crate::oci::sys::{self as rooted, Kind, Root};
use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, fstatat};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A COPY/ADD failure.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// No source path matched.
    #[error("{pattern}: no such file or directory in the {place}")]
    NoMatch {
        /// The source as written.
        pattern: String,
        /// "build context", "stage tree", ….
        place: &'static str,
    },
    /// The source glob is malformed.
    #[error("bad source pattern {pattern:?}")]
    BadPattern {
        /// The pattern.
        pattern: String,
    },
    /// `--exclude` is malformed.
    #[error("bad --exclude pattern: {0}")]
    Exclude(#[from] super::dockerignore::PatternError),
    /// Several files into something that is not a directory.
    #[error("copying {count} files to {dest}: the destination must be a directory ending in /")]
    NotADirectory {
        /// Files matched.
        count: usize,
        /// The destination.
        dest: String,
    },
    /// `--chown` names a user or group the image does not have.
    #[error("unable to find {what} {name:?} in the image's /etc/{file}")]
    UnknownOwner {
        /// "user" or "group".
        what: &'static str,
        /// The name.
        name: String,
        /// "passwd" or "group".
        file: &'static str,
    },
    /// A file-system call failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where (relative to its root).
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An archive could not be read.
    #[error("extracting {path}: {message}")]
    Archive {
        /// The archive.
        path: String,
        /// What failed.
        message: String,
    },
}

/// Numeric owner of copied files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Owner {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
}

/// Where sources are read from.
pub enum SourceRoot<'a> {
    /// The build context, filtered by `.dockerignore`.
    Context(&'a super::context::BuildContext),
    /// A root tree (an earlier stage, an image).
    Tree(&'a Path),
}

/// What to copy.
pub struct CopyRequest<'a> {
    /// Sources in order (paths and inline files; URLs and git are fetched by the caller
    /// into a tree first).
    pub sources: &'a [Source],
    /// Absolute destination; a trailing `/` means a directory.
    pub dest: &'a str,
    /// Owner of everything written (`--chown`). `None`: 0:0 for what comes from the build
    /// context (the reference: "All files and directories copied from the build context are
    /// created with a UID and GID of 0"), the source's owner for what comes from a stage or
    /// image tree (BuildKit), archive members' own owners; directories made on the way are 0:0.
    pub owner: Option<Owner>,
    /// Mode of everything written; `None` keeps the source's.
    pub chmod: Option<u32>,
    /// `--exclude` patterns, matched against paths below each source.
    pub exclude: &'a [String],
    /// `--parents`: keep each source's path (after a `/./` marker, if any).
    pub parents: bool,
    /// ADD: extract local tar archives (plain, gzip, bzip2, xz, zstd) instead of copying them.
    pub unpack_archives: bool,
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Entries written (files, links, directories).
    pub entries: u64,
    /// File bytes written.
    pub bytes: u64,
}

fn io_err<'a>(op: &'static str, path: &'a str) -> impl FnOnce(std::io::Error) -> CopyError + 'a {
    move |source| CopyError::Io {
        op,
        path: path.to_string(),
        source,
    }
}

fn errno(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

fn in_root() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// Splits a `/`-separated path into plain components (`.` and empty dropped, `..` kept for
/// in-root resolution to clamp).
fn comps(path: &str) -> Vec<&OsStr> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(OsStr::new)
        .collect()
}

/// Go's `filepath.Match` for one path segment (no `/` inside), without exponential
/// backtracking: `*`, `?`, `[...]` with `^`, ranges and `\` escapes.
pub fn match_segment(pattern: &str, name: &str) -> Option<bool> {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Greedy with one backtrack point per star: linear in practice, O(p·n) at worst.
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    loop {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' if ni < n.len() => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' if ni < n.len() => {
                    let (ok, len) = match_class(&p[pi..], n[ni])?;
                    if ok {
                        pi += len;
                        ni += 1;
                        continue;
                    }
                }
                '\\' => {
                    let c = *p.get(pi + 1)?;
                    if ni < n.len() && n[ni] == c {
                        pi += 2;
                        ni += 1;
                        continue;
                    }
                }
                c if c != '?' && c != '[' && ni < n.len() && n[ni] == c => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        } else if ni == n.len() {
            return Some(true);
        }
        match star {
            Some((sp, sn)) if sn < n.len() => {
                star = Some((sp, sn + 1));
                pi = sp + 1;
                ni = sn + 1;
            }
            _ => {
                // Validate the rest of the pattern, as Go does before answering false.
                validate_rest(&p[pi.min(p.len())..])?;
                return Some(false);
            }
        }
    }
}

fn validate_rest(p: &[char]) -> Option<()> {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '\\' => {
                p.get(i + 1)?;
                i += 2;
            }
            '[' => {
                let (_, len) = match_class(&p[i..], '\0')?;
                i += len;
            }
            _ => i += 1,
        }
    }
    Some(())
}

/// A `[...]` class at the start of `p` against `c`: (matched, length of the class), or `None`
/// when malformed.
fn match_class(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negated = p.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut n = 0;
    loop {
        match p.get(i)? {
            ']' if n > 0 => return Some((matched != negated, i + 1)),
            '-' | ']' => return None,
            _ => {}
        }
        let lo = class_char(p, &mut i)?;
        let hi = if p.get(i) == Some(&'-') {
            i += 1;
            class_char(p, &mut i)?
        } else {
            lo
        };
        if lo <= c && c <= hi {
            matched = true;
        }
        n += 1;
    }
}

fn class_char(p: &[char], i: &mut usize) -> Option<char> {
    match *p.get(*i)? {
        '-' | ']' => None,
        '\\' => {
            let c = *p.get(*i + 1)?;
            *i += 2;
            Some(c)
        }
        c => {
            *i += 1;
            Some(c)
        }
    }
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '[', '\\'])
}

/// One matched source path.
struct Matched {
    /// Path relative to the source root, `/`-separated, no leading `/`.
    rel: String,
    /// The part kept under the destination with `--parents`.
    keep: String,
}

/// A source root with an inclusion filter.
struct Src<'a> {
    root: Root,
    place: &'static str,
    context: Option<&'a super::context::BuildContext>,
}

impl Src<'_> {
    fn included(&self, rel: &str) -> bool {
        match self.context {
            Some(c) => c.get(rel).is_some(),
            None => true,
        }
    }

    /// Opens a directory in the source root (symlinks resolved inside it).
    fn open_dir(&self, rel: &str) -> std::io::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(in_root());
        let path = if rel.is_empty() { "." } else { rel };
        openat2(self.root.fd(), path, how).map_err(errno)
    }

    fn list(&self, rel: &str) -> std::io::Result<Vec<OsString>> {
        let fd = self.open_dir(rel)?;
        let dir = Dir::from_fd(fd).map_err(errno)?;
        let mut out = Vec::new();
        for e in dir.into_iter() {
            let e = e.map_err(errno)?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            out.push(OsStr::from_bytes(name).to_os_string());
        }
        out.sort();
        Ok(out)
    }

    /// Expands one source pattern to matching paths, in sorted order.
    fn expand(&self, pattern: &str, parents: bool) -> Result<Vec<Matched>, CopyError> {
        let trimmed = pattern.trim_start_matches('/');
        // `--parents` keeps what follows a `./` marker, or the whole path.
        let keep_from = trimmed
            .find("/./")
            .map(|i| i + 3)
            .or_else(|| trimmed.strip_prefix("./").map(|_| 2))
            .unwrap_or(0);
        let segs: Vec<&str> = trimmed
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        let mut found: Vec<String> = vec![String::new()];
        for seg in &segs {
            let mut next = Vec::new();
            for base in &found {
                if has_wildcard(seg) {
                    let entries = match self.list(base) {
                        Ok(e) => e,
                        Err(_) => continue,
                    };
                    for name in entries {
                        let Some(name) = name.to_str() else { continue };
                        match match_segment(seg, name) {
                            None => {
                                return Err(CopyError::BadPattern {
                                    pattern: pattern.to_string(),
                                });
                            }
                            Some(true) => next.push(join_rel(base, name)),
                            Some(false) => {}
                        }
                    }
                } else {
                    next.push(join_rel(base, seg));
                }
            }
            found = next;
        }
        let mut out = Vec::new();
        for rel in found {
            if rel.is_empty() {
                out.push(Matched {
                    rel,
                    keep: String::new(),
                });
                continue;
            }
            if !self.included(&rel) || !self.exists(&rel) {
                continue;
            }
            let keep = if parents {
                let prefix_segs = trimmed[..keep_from.min(trimmed.len())]
                    .split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .count();
                rel.split('/')
                    .skip(prefix_segs)
                    .collect::<Vec<_>>()
                    .join("/")
            } else {
                String::new()
            };
            out.push(Matched { rel, keep });
        }
        if out.is_empty() {
            return Err(CopyError::NoMatch {
                pattern: pattern.to_string(),
                place: self.place,
            });
        }
        Ok(out)
    }

    /// `rel` with its symlinks resolved inside the root, relative to the root: a source that
    /// is itself a link to a directory is copied from the directory it names (BuildKit copies
    /// with `FollowSymlinks`), whose entries are then looked up under their own paths.
    fn resolve(&self, rel: &str) -> std::io::Result<String> {
        use std::os::fd::AsRawFd;
        if rel.is_empty() {
            return Ok(String::new());
        }
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(in_root());
        let fd = openat2(self.root.fd(), rel, how).map_err(errno)?;
        let at = |raw: i32| std::fs::read_link(format!("/proc/self/fd/{raw}"));
        let (path, root) = (at(fd.as_raw_fd())?, at(self.root.fd().as_raw_fd())?);
        let inside = path
            .strip_prefix(&root)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        inside
            .to_str()
            .map(str::to_string)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidData))
    }

    /// Whether `rel` exists (following symlinks inside the root).
    fn exists(&self, rel: &str) -> bool {
        self.stat(rel).is_ok()
    }

    /// `stat` of `rel`, symlinks followed inside the root.
    fn stat(&self, rel: &str) -> std::io::Result<FileStat> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(in_root());
        let path = if rel.is_empty() { "." } else { rel };
        let fd = openat2(self.root.fd(), path, how).map_err(errno)?;
        nix::sys::stat::fstat(fd.as_fd()).map_err(errno)
    }
}

fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc_ifmt() == 0o040000
}

fn libc_ifmt() -> u32 {
    0o170000
}

/// Copies sources into `dest_root` as one COPY/ADD step.
pub fn copy(
    from: SourceRoot<'_>,
    req: &CopyRequest<'_>,
    dest_root: &Path,
) -> Result<CopyStats, CopyError> {
    let (root_path, place, context) = match &from {
        SourceRoot::Context(c) => (c.root(), "build context", Some(*c)),
        SourceRoot::Tree(p) => (*p, "source tree", None),
    };
    let src = Src {
        root: Root::open(root_path).map_err(io_err("open source root", "/"))?,
        place,
        context,
    };
    let dest = Root::open(dest_root).map_err(io_err("open destination root", "/"))?;
    let exclude = Matcher::new(req.exclude)?;
    let mut w = Writer {
        dest,
        owner: req.owner,
        chmod: req.chmod,
        exclude,
        links: HashMap::new(),
        stats: CopyStats::default(),
        context,
    };
    // Resolve every source first, so the "into a directory" decision sees them all.
    let mut items: Vec<(Option<Matched>, &Source)> = Vec::new();
    for s in req.sources {
        match s {
            Source::Path { path } => {
                for m in src.expand(path, req.parents)? {
                    items.push((Some(m), s));
                }
            }
            Source::Inline { .. } => items.push((None, s)),
            Source::Url { url } | Source::Git { url } => {
                return Err(CopyError::Archive {
                    path: url.clone(),
                    message: "remote sources must be fetched before copying".into(),
                });
            }
        }
    }
    let dest_is_dir_syntax = req.dest.ends_with('/');
    let dest_exists_as_dir = w.is_dir(req.dest);
    let into_dir = dest_is_dir_syntax || dest_exists_as_dir || items.len() > 1 || req.parents;
    for (m, s) in &items {
        match (m, s) {
            (None, Source::Inline { name, content }) => {
                let target = if into_dir {
                    join_rel(req.dest.trim_end_matches('/'), name)
                } else {
                    req.dest.to_string()
                };
                w.write_inline(&target, content.as_bytes())?;
            }
            (Some(m), _) => {
                let st = src.stat(&m.rel).map_err(io_err("stat", &m.rel))?;
                let base = if req.parents && !m.keep.is_empty() {
                    join_rel(req.dest.trim_end_matches('/'), &m.keep)
                } else if is_dir(&st) || m.rel.is_empty() {
                    req.dest.trim_end_matches('/').to_string()
                } else if into_dir {
                    let name = m.rel.rsplit('/').next().unwrap_or(&m.rel);
                    join_rel(req.dest.trim_end_matches('/'), name)
                } else {
                    req.dest.to_string()
                };
                if req.unpack_archives
                    && !is_dir(&st)
                    && let Some(kind) = archive_kind(&src, &m.rel)?
                {
                    // An archive always unpacks as a directory at the destination.
                    w.extract(&src, &m.rel, kind, req.dest.trim_end_matches('/'))?;
                    continue;
                }
                if is_dir(&st) || m.rel.is_empty() {
                    // A directory's contents, not the directory itself (unless --parents).
                    let top = if req.parents && !m.keep.is_empty() {
                        Some(&st)
                    } else {
                        None
                    };
                    let real = src.resolve(&m.rel).map_err(io_err("resolve", &m.rel))?;
                    w.copy_dir(&src, &real, &base, top)?;
                } else {
                    w.copy_entry(&src, &m.rel, &base, "", true)?;
                }
            }
            (None, _) => {}
        }
    }
    let _ = rooted::syncfs(w.dest.fd());
    Ok(w.stats)
}

struct Writer<'a> {
    dest: Root,
    owner: Option<Owner>,
    chmod: Option<u32>,
    exclude: Matcher,
    /// (dev, ino) of multiply-linked source files → where the first copy went.
    links: HashMap<(u64, u64), String>,
    stats: CopyStats,
    context: Option<&'a super::context::BuildContext>,
}

impl Writer<'_> {
    fn is_dir(&self, abs: &str) -> bool {
        let c = comps(abs);
        self.dest.existing_dir_nofollow(&c).is_ok() || self.dest.dir(&c, false).is_ok()
    }

    /// Opens (creating what is missing, owned by the copy's owner) the parent directory of
    /// `abs` in the destination root; returns it and the last component.
    fn parent(&self, abs: &str) -> Result<(OwnedFd, OsString), CopyError> {
        let c = comps(abs);
        let Some((last, parents)) = c.split_last() else {
            return Err(CopyError::Io {
                op: "write to",
                path: abs.to_string(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        };
        if last.as_bytes() == b".." {
            return Err(CopyError::Io {
                op: "write to",
                path: abs.to_string(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        let dir = self.ensure_dir(parents, abs)?;
        Ok((dir, last.to_os_string()))
    }

    /// Opens the directory `c`, making missing components (0755, the copy's owner).
    fn ensure_dir(&self, c: &[&OsStr], for_path: &str) -> Result<OwnedFd, CopyError> {
        let owned: Vec<OsString> = c.iter().map(|s| s.to_os_string()).collect();
        self.ensure_dir_hops(owned, for_path, 0)
    }

    /// Makes the directory path `c` exist inside the root. A dangling symlink on the way is
    /// resolved (inside the root) and its target created, as `MkdirAll` on a resolved path
    /// does in BuildKit.
    fn ensure_dir_hops(
        &self,
        c: Vec<OsString>,
        for_path: &str,
        hops: u32,
    ) -> Result<OwnedFd, CopyError> {
        let refs: Vec<&OsStr> = c.iter().map(OsString::as_os_str).collect();
        if let Ok(fd) = self.dest.dir(&refs, false) {
            return Ok(fd);
        }
        let not_dir = || CopyError::Io {
            op: "create directory",
            path: for_path.to_string(),
            source: std::io::Error::from_raw_os_error(20), // ENOTDIR
        };
        let mut cur = nix::unistd::dup(self.dest.fd())
            .map_err(errno)
            .map_err(io_err("open", for_path))?;
        for (i, name) in refs.iter().enumerate() {
            if let Ok(fd) = self.dest.dir(&refs[..=i], false) {
                cur = fd;
                continue;
            }
            match rooted::kind_at(cur.as_fd(), name).map_err(io_err("stat", for_path))? {
                None => {}
                Some(Kind::Symlink) if hops < 40 => {
                    let target = nix::fcntl::readlinkat(cur.as_fd(), *name)
                        .map_err(errno)
                        .map_err(io_err("read link", for_path))?;
                    let mut next: Vec<OsString> = if target.as_bytes().starts_with(b"/") {
                        Vec::new()
                    } else {
                        c[..i].to_vec()
                    };
                    for part in target.as_bytes().split(|&b| b == b'/') {
                        match part {
                            b"" | b"." => {}
                            b".." => {
                                next.pop();
                            }
                            p => next.push(OsStr::from_bytes(p).to_os_string()),
                        }
                    }
                    next.extend(c[i + 1..].iter().cloned());
                    return self.ensure_dir_hops(next, for_path, hops + 1);
                }
                Some(_) => return Err(not_dir()),
            }
            rooted::mkdir_at(cur.as_fd(), name).map_err(io_err("mkdir", for_path))?;
            let fd = rooted::open_dir_at(cur.as_fd(), name).map_err(io_err("open", for_path))?;
            rooted::chmod_fd(fd.as_fd(), 0o755).map_err(io_err("chmod", for_path))?;
            let o = self.owner.unwrap_or_default();
            rooted::chown_fd(fd.as_fd(), o.uid, o.gid).map_err(io_err("chown", for_path))?;
            cur = fd;
        }
        Ok(cur)
    }

    fn mode(&self, src_mode: u32) -> u32 {
        self.chmod.unwrap_or(src_mode & 0o7777)
    }

    fn write_inline(&mut self, abs: &str, content: &[u8]) -> Result<(), CopyError> {
        let (dir, name) = self.parent(abs)?;
        self.clear(dir.as_fd(), &name, abs, false)?;
        let mut f = rooted::create_file_at(dir.as_fd(), &name).map_err(io_err("create", abs))?;
        f.write_all(content).map_err(io_err("write", abs))?;
        let o = self.owner.unwrap_or_default();
        rooted::chown_fd(f.as_fd(), o.uid, o.gid).map_err(io_err("chown", abs))?;
        rooted::chmod_fd(f.as_fd(), self.chmod.unwrap_or(0o644)).map_err(io_err("chmod", abs))?;
        self.stats.entries += 1;
        self.stats.bytes += content.len() as u64;
        Ok(())
    }

    /// Removes what is at `name` unless it is a directory we merge into.
    fn clear(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        abs: &str,
        keep_dir: bool,
    ) -> Result<(), CopyError> {
        match rooted::kind_at(dir, name).map_err(io_err("stat", abs))? {
            None => Ok(()),
            Some(Kind::Dir) if keep_dir => Ok(()),
            Some(_) => rooted::remove_at(dir, name).map_err(io_err("replace", abs)),
        }
    }

    /// Copies the directory `rel` of the source: its contents into `dest_abs` (and, with
    /// `top`, the directory's own metadata onto `dest_abs`).
    fn copy_dir(
        &mut self,
        src: &Src<'_>,
        rel: &str,
        dest_abs: &str,
        top: Option<&FileStat>,
    ) -> Result<(), CopyError> {
        let c = comps(dest_abs);
        let dir = self.ensure_dir(&c, dest_abs)?;
        self.copy_children(src, rel, dest_abs, "")?;
        if let Some(st) = top {
            let o = self.owner_of(st);
            rooted::chown_fd(dir.as_fd(), o.uid, o.gid).map_err(io_err("chown", dest_abs))?;
            rooted::chmod_fd(dir.as_fd(), self.mode(st.st_mode))
                .map_err(io_err("chmod", dest_abs))?;
            rooted::set_times_at(dir.as_fd(), OsStr::new("."), st.st_mtime, st.st_mtime_nsec)
                .map_err(io_err("set times", dest_abs))?;
        }
        Ok(())
    }

    fn copy_children(
        &mut self,
        src: &Src<'_>,
        rel: &str,
        dest_abs: &str,
        below: &str,
    ) -> Result<(), CopyError> {
        let entries = src.list(rel).map_err(io_err("read directory", rel))?;
        for name in entries {
            let Some(name) = name.to_str() else {
                continue;
            };
            let child_rel = join_rel(rel, name);
            let child_below = join_rel(below, name);
            if !src.included(&child_rel) || self.exclude.excluded(&child_below) {
                continue;
            }
            let child_dest = join_rel(dest_abs, name);
            self.copy_entry(src, &child_rel, &child_dest, &child_below, false)?;
        }
        Ok(())
    }

    /// Copies one entry. `follow` resolves a symlink at `rel` itself (a top-level source).
    fn copy_entry(
        &mut self,
        src: &Src<'_>,
        rel: &str,
        dest_abs: &str,
        below: &str,
        follow: bool,
    ) -> Result<(), CopyError> {
        let (sdir_rel, sname) = match rel.rsplit_once('/') {
            Some((d, n)) => (d, n),
            None => ("", rel),
        };
        let sdir = src.open_dir(sdir_rel).map_err(io_err("open", rel))?;
        let st = if follow {
            src.stat(rel).map_err(io_err("stat", rel))?
        } else {
            fstatat(sdir.as_fd(), sname, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(errno)
                .map_err(io_err("stat", rel))?
        };
        let fmt = st.st_mode & libc_ifmt();
        let (ddir, dname) = self.parent(dest_abs)?;
        let mode = self.mode(st.st_mode);
        let owner = self.owner_of(&st);
        match fmt {
            0o040000 => {
                self.clear(ddir.as_fd(), &dname, dest_abs, true)?;
                match rooted::mkdir_at(ddir.as_fd(), &dname) {
                    Ok(()) => self.stats.entries += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err("mkdir", dest_abs)(e)),
                }
                self.copy_children(src, rel, dest_abs, below)?;
                let d =
                    rooted::open_dir_at(ddir.as_fd(), &dname).map_err(io_err("open", dest_abs))?;
                rooted::chown_fd(d.as_fd(), owner.uid, owner.gid)
                    .map_err(io_err("chown", dest_abs))?;
                rooted::chmod_fd(d.as_fd(), mode).map_err(io_err("chmod", dest_abs))?;
                copy_xattrs(
                    rooted::xattrs_at(sdir.as_fd(), OsStr::new(sname)),
                    d.as_fd(),
                    OsStr::new("."),
                    dest_abs,
                );
                rooted::set_times_at(d.as_fd(), OsStr::new("."), st.st_mtime, st.st_mtime_nsec)
                    .map_err(io_err("set times", dest_abs))?;
            }
            0o120000 => {
                let target = nix::fcntl::readlinkat(sdir.as_fd(), sname)
                    .map_err(errno)
                    .map_err(io_err("read link", rel))?;
                self.clear(ddir.as_fd(), &dname, dest_abs, false)?;
                rooted::symlink_at(&target, ddir.as_fd(), &dname)
                    .map_err(io_err("symlink", dest_abs))?;
                rooted::chown_at(ddir.as_fd(), &dname, owner.uid, owner.gid)
                    .map_err(io_err("chown", dest_abs))?;
                copy_xattrs(
                    rooted::xattrs_at(sdir.as_fd(), OsStr::new(sname)),
                    ddir.as_fd(),
                    &dname,
                    dest_abs,
                );
                rooted::set_times_at(ddir.as_fd(), &dname, st.st_mtime, st.st_mtime_nsec)
                    .map_err(io_err("set times", dest_abs))?;
                self.stats.entries += 1;
            }
            0o100000 => {
                if st.st_nlink > 1
                    && !follow
                    && let Some(first) = self.links.get(&(st.st_dev, st.st_ino)).cloned()
                {
                    let (fdir, fname) = self.parent(&first)?;
                    self.clear(ddir.as_fd(), &dname, dest_abs, false)?;
                    rooted::link_at(fdir.as_fd(), &fname, ddir.as_fd(), &dname)
                        .map_err(io_err("link", dest_abs))?;
                    self.stats.entries += 1;
                    return Ok(());
                }
                let fd = if follow {
                    let how = OpenHow::new()
                        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
                        .resolve(in_root());
                    openat2(src.root.fd(), rel, how).map_err(errno)
                } else {
                    openat(
                        sdir.as_fd(),
                        sname,
                        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(errno)
                }
                .map_err(io_err("open", rel))?;
                let mut input = File::from(fd);
                self.clear(ddir.as_fd(), &dname, dest_abs, false)?;
                let mut out = rooted::create_file_at(ddir.as_fd(), &dname)
                    .map_err(io_err("create", dest_abs))?;
                let n = std::io::copy(&mut input, &mut out).map_err(io_err("copy", dest_abs))?;
                // chown before chmod: chown clears set-user-ID and set-group-ID bits.
                rooted::chown_fd(out.as_fd(), owner.uid, owner.gid)
                    .map_err(io_err("chown", dest_abs))?;
                rooted::chmod_fd(out.as_fd(), mode).map_err(io_err("chmod", dest_abs))?;
                // After chown, which drops security.capability.
                copy_xattrs(
                    rooted::xattrs_at(input.as_fd(), OsStr::new(".")),
                    out.as_fd(),
                    OsStr::new("."),
                    dest_abs,
                );
                drop(out);
                rooted::set_times_at(ddir.as_fd(), &dname, st.st_mtime, st.st_mtime_nsec)
                    .map_err(io_err("set times", dest_abs))?;
                if st.st_nlink > 1 {
                    self.links
                        .insert((st.st_dev, st.st_ino), dest_abs.to_string());
                }
                self.stats.entries += 1;
                self.stats.bytes += n;
            }
            _ if self.context.is_some() => {}
            _ => {
                // FIFOs and device nodes from a stage or image tree.
                let node = match fmt {
                    0o010000 => rooted::Node::Fifo,
                    0o020000 => rooted::Node::Char(
                        nix::sys::stat::major(st.st_rdev) as u32,
                        nix::sys::stat::minor(st.st_rdev) as u32,
                    ),
                    0o060000 => rooted::Node::Block(
                        nix::sys::stat::major(st.st_rdev) as u32,
                        nix::sys::stat::minor(st.st_rdev) as u32,
                    ),
                    _ => return Ok(()),
                };
                self.clear(ddir.as_fd(), &dname, dest_abs, false)?;
                rooted::mknod_at(ddir.as_fd(), &dname, node, mode)
                    .map_err(io_err("mknod", dest_abs))?;
                rooted::chown_at(ddir.as_fd(), &dname, owner.uid, owner.gid)
                    .map_err(io_err("chown", dest_abs))?;
                self.stats.entries += 1;
            }
        }
        Ok(())
    }

    /// ADD: extracts a local archive into the directory `dest_abs`.
    fn extract(
        &mut self,
        src: &Src<'_>,
        rel: &str,
        kind: ArchiveKind,
        dest_abs: &str,
    ) -> Result<(), CopyError> {
        let reader = open_archive(src, rel, kind)?;
        let c = comps(dest_abs);
        let dir = self.ensure_dir(&c, dest_abs)?;
        drop(dir);
        let target = ResolvedDir {
            root: &self.dest,
            comps: c.iter().map(|s| s.to_os_string()).collect(),
        };
        let n = extract_tar(reader, &target, self.owner).map_err(|message| CopyError::Archive {
            path: rel.to_string(),
            message,
        })?;
        self.stats.entries += n;
        Ok(())
    }

    /// The owner of a copy of `st` (see [`CopyRequest::owner`]).
    fn owner_of(&self, st: &FileStat) -> Owner {
        match self.owner {
            Some(o) => o,
            None if self.context.is_some() => Owner::default(),
            None => Owner {
                uid: st.st_uid,
                gid: st.st_gid,
            },
        }
    }
}

/// Puts the source's extended attributes (as BuildKit's copy does, context files included) on
/// `name` in `dir`. Best effort, as Docker's: an attribute the destination refuses (user.* on
/// a symlink, say) is left out with a warning; overlayfs's own trusted.overlay.* never moves.
fn copy_xattrs(
    from: std::io::Result<Vec<(OsString, Vec<u8>)>>,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    path: &str,
) {
    let attrs = match from {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(entry = %path, error = %e, "xattrs not read");
            return;
        }
    };
    for (k, v) in attrs {
        if k.as_bytes().starts_with(b"trusted.overlay.") {
            continue;
        }
        if let Err(e) = rooted::set_xattr_at(dir, name, &k, &v) {
            tracing::warn!(entry = %path, xattr = ?k, error = %e, "xattr not applied");
        }
    }
}

/// A directory in a rooted destination, named by its components.
struct ResolvedDir<'a> {
    root: &'a Root,
    comps: Vec<OsString>,
}

/// Compression of a local archive, by magic bytes (as Docker detects it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArchiveKind {
    Tar,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

fn open_source(src: &Src<'_>, rel: &str) -> Result<File, CopyError> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(in_root());
    let fd = openat2(src.root.fd(), rel, how)
        .map_err(errno)
        .map_err(io_err("open", rel))?;
    Ok(File::from(fd))
}

/// The tar stream of the archive `rel`, decompressed.
fn open_archive(src: &Src<'_>, rel: &str, kind: ArchiveKind) -> Result<Box<dyn Read>, CopyError> {
    let file = open_source(src, rel)?;
    Ok(match kind {
        ArchiveKind::Tar => Box::new(file),
        ArchiveKind::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        ArchiveKind::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(file)),
        ArchiveKind::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(file)),
        ArchiveKind::Zstd => {
            Box::new(
                zstd::stream::read::Decoder::new(file).map_err(|e| CopyError::Archive {
                    path: rel.to_string(),
                    message: e.to_string(),
                })?,
            )
        }
    })
}

/// Up to `buf.len()` bytes of `r`; a read error ends the data (a stream that is not what its
/// magic says is simply not an archive).
fn read_head(r: &mut dyn Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// Whether ADD extracts `rel`, and how: as Docker decides, by decompressing it (gzip, bzip2,
/// xz, zstd, or none, told by the magic bytes) and reading a first tar header. A compressed
/// file that is not a tar, or a tar with no entries, is copied as it is.
fn archive_kind(src: &Src<'_>, rel: &str) -> Result<Option<ArchiveKind>, CopyError> {
    let mut head = [0u8; 6];
    let n = read_head(&mut open_source(src, rel)?, &mut head);
    let head = &head[..n];
    let kind = if head.starts_with(&[0x1f, 0x8b]) {
        ArchiveKind::Gzip
    } else if head.starts_with(b"BZh") {
        ArchiveKind::Bzip2
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        ArchiveKind::Xz
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ArchiveKind::Zstd
    } else {
        ArchiveKind::Tar
    };
    let mut block = [0u8; 512];
    let n = read_head(&mut *open_archive(src, rel, kind)?, &mut block);
    Ok((n == block.len() && is_tar_header(&block)).then_some(kind))
}

/// A tar header block, as Go's archive/tar accepts one: not all zeros (that ends an empty
/// archive), and its checksum (octal, at 148..156) is the unsigned or signed sum of the
/// block with the checksum field read as spaces.
fn is_tar_header(block: &[u8; 512]) -> bool {
    if block.iter().all(|&b| b == 0) {
        return false;
    }
    let field = &block[148..156];
    let digits: String = field
        .iter()
        .map(|&b| b as char)
        .skip_while(|c| *c == ' ' || *c == '\0')
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let Ok(want) = i64::from_str_radix(&digits, 8) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += i64::from(b);
        signed += i64::from(b as i8);
    }
    want == unsigned || want == signed
}

/// `base` followed by the normal components of an archive path; `None` when it has `..`
/// (absolute paths are taken as relative to `base`).
fn below(base: &[OsString], path: &Path) -> Option<Vec<OsString>> {
    let mut out = base.to_vec();
    for c in path.components() {
        match c {
            std::path::Component::Normal(s) => out.push(s.to_os_string()),
            std::path::Component::ParentDir => return None,
            std::path::Component::RootDir
            | std::path::Component::CurDir
            | std::path::Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// Writes a tar stream below `dest`, every path resolved inside the destination root.
fn extract_tar(
    reader: impl Read,
    dest: &ResolvedDir<'_>,
    owner: Option<Owner>,
) -> Result<u64, String> {
    let mut archive = tar::Archive::new(reader);
    let mut n = 0;
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let mut rel = below(&dest.comps, &path)
            .ok_or_else(|| format!("{}: a path with .. is not allowed", path.display()))?;
        let Some(name) = rel.pop() else { continue };
        let parent: Vec<&OsStr> = rel.iter().map(OsString::as_os_str).collect();
        let dir = dest
            .root
            .dir(&parent, true)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let header = entry.header().clone();
        let mode = header.mode().map_err(|e| e.to_string())? & 0o7777;
        let (uid, gid) = match owner {
            Some(o) => (o.uid, o.gid),
            None => (
                header.uid().unwrap_or(0) as u32,
                header.gid().unwrap_or(0) as u32,
            ),
        };
        let shown = path.display().to_string();
        let pax = crate::oci::unpack::pax_meta(&mut entry, &shown)
            .map_err(|e| format!("{shown}: {e}"))?;
        let xattrs = pax.xattrs;
        let (mtime, mtime_ns) = pax.mtime.unwrap_or((header.mtime().unwrap_or(0) as i64, 0));
        let at = |e: std::io::Error| format!("{}: {e}", path.display());
        // As Docker's untar with BestEffortXattrs: an attribute the file system refuses
        // (user.* on a symlink, say) is left out.
        let set_xattrs = |dir: BorrowedFd<'_>, name: &OsStr| {
            for (k, v) in &xattrs {
                if let Err(e) = rooted::set_xattr_at(dir, name, k, v) {
                    tracing::warn!(entry = %shown, xattr = ?k, error = %e, "xattr not applied");
                }
            }
        };
        match header.entry_type() {
            tar::EntryType::Directory => {
                match rooted::kind_at(dir.as_fd(), &name).map_err(at)? {
                    Some(Kind::Dir) => {}
                    Some(_) => {
                        rooted::remove_at(dir.as_fd(), &name).map_err(at)?;
                        rooted::mkdir_at(dir.as_fd(), &name).map_err(at)?;
                    }
                    None => rooted::mkdir_at(dir.as_fd(), &name).map_err(at)?,
                }
                let d = rooted::open_dir_at(dir.as_fd(), &name).map_err(at)?;
                rooted::chown_fd(d.as_fd(), uid, gid).map_err(at)?;
                rooted::chmod_fd(d.as_fd(), mode).map_err(at)?;
                set_xattrs(dir.as_fd(), &name);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{}: symlink without a target", path.display()))?;
                // Absent is fine: remove_at ignores ENOENT.
                rooted::remove_at(dir.as_fd(), &name).map_err(at)?;
                rooted::symlink_at(target.as_os_str(), dir.as_fd(), &name).map_err(at)?;
                rooted::chown_at(dir.as_fd(), &name, uid, gid).map_err(at)?;
                set_xattrs(dir.as_fd(), &name);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                // Absent is fine: remove_at ignores ENOENT.
                rooted::remove_at(dir.as_fd(), &name).map_err(at)?;
                let mut f = rooted::create_file_at(dir.as_fd(), &name).map_err(at)?;
                std::io::copy(&mut entry, &mut f).map_err(at)?;
                // chown before chmod: chown clears set-user-ID and set-group-ID bits.
                rooted::chown_fd(f.as_fd(), uid, gid).map_err(at)?;
                rooted::chmod_fd(f.as_fd(), mode).map_err(at)?;
                drop(f);
                set_xattrs(dir.as_fd(), &name);
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{}: hard link without a target", path.display()))?;
                let mut tcomps = below(&dest.comps, &target)
                    .ok_or_else(|| format!("{}: a link with .. is not allowed", path.display()))?;
                let Some(tname) = tcomps.pop() else { continue };
                let tparent: Vec<&OsStr> = tcomps.iter().map(OsString::as_os_str).collect();
                let tdir = dest.root.dir(&tparent, false).map_err(at)?;
                // Absent is fine: remove_at ignores ENOENT.
                rooted::remove_at(dir.as_fd(), &name).map_err(at)?;
                rooted::link_at(tdir.as_fd(), &tname, dir.as_fd(), &name).map_err(at)?;
                n += 1;
                continue;
            }
            // Devices and FIFOs in an ADDed archive are skipped: an image's tree is the place
            // for those, not a user archive.
            _ => continue,
        }
        rooted::set_times_at(dir.as_fd(), &name, mtime, mtime_ns).map_err(at)?;
        n += 1;
    }
    Ok(n)
}

/// Resolves `--chown` (`user`, `uid`, `user:group`, `uid:gid`) against the image's
/// /etc/passwd and /etc/group (read inside `root`). A user alone also gives the gid (Docker:
/// "the same numeric UID as the GID").
pub fn resolve_owner(root: &Path, chown: &str) -> Result<Owner, CopyError> {
    resolve(root, chown, false)
}

/// Resolves the current `USER` as the owner of what WORKDIR creates, as BuildKit's file
/// operations do (the Dockerfile reference says nothing here): a user name alone takes its
/// primary gid from /etc/passwd, a uid alone is also the gid, a group given wins.
pub fn resolve_user_owner(root: &Path, user: &str) -> Result<Owner, CopyError> {
    resolve(root, user, true)
}

fn resolve(root: &Path, chown: &str, passwd_gid: bool) -> Result<Owner, CopyError> {
    let (user, group) = match chown.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (chown, None),
    };
    let read = |file: &'static str| -> String {
        let Ok(r) = Root::open(root) else {
            return String::new();
        };
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
            .resolve(in_root());
        let Ok(fd) = openat2(r.fd(), format!("etc/{file}").as_str(), how) else {
            return String::new();
        };
        let mut s = String::new();
        let _ = File::from(fd).take(16 << 20).read_to_string(&mut s);
        s
    };
    // Field `field` (2: the id, 3: passwd's primary gid) of the entry called `name`.
    let lookup = |db: &str, name: &str, field: usize| -> Option<u32> {
        db.lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .and_then(|f| f.get(field)?.parse().ok())
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (n, n),
        Err(_) => {
            let passwd = read("passwd");
            let unknown = || CopyError::UnknownOwner {
                what: "user",
                name: user.to_string(),
                file: "passwd",
            };
            let uid = lookup(&passwd, user, 2).ok_or_else(unknown)?;
            let primary = if passwd_gid {
                lookup(&passwd, user, 3).ok_or_else(unknown)?
            } else {
                uid
            };
            (uid, primary)
        }
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(&read("group"), g, 2).ok_or_else(|| CopyError::UnknownOwner {
                what: "group",
                name: g.to_string(),
                file: "group",
            })?,
        },
    };
    Ok(Owner { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_match_like_go_filepath_match() {
        let cases = [
            ("*.py", "app.py", Some(true)),
            ("*.py", "app.pyc", Some(false)),
            ("a?c", "abc", Some(true)),
            ("[a-c]x", "bx", Some(true)),
            ("[^a-c]x", "bx", Some(false)),
            ("\\*", "*", Some(true)),
            ("*", ".hidden", Some(true)),
            ("a*b*c", "aXbYc", Some(true)),
            ("a*b*c", "aXbY", Some(false)),
            ("[", "x", None),
            ("x[", "y", None),
        ];
        for (p, n, want) in cases {
            assert_eq!(match_segment(p, n), want, "{p:?} vs {n:?}");
        }
    }

    #[test]
    fn pathological_stars_stay_fast() {
        let p = "*a".repeat(200) + "b";
        let n = "a".repeat(5_000);
        assert_eq!(match_segment(&p, &n), Some(false));
    }
}
