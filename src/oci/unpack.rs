//! Layer tar → directory, safely. Parses with `tar`, writes every entry itself relative to
//! the layer root ([`super::sys::Root`]), so no entry — `..`, an absolute name, a write through
//! a symlink, a hard link to outside, a whiteout naming `..` — touches anything outside it.
//!
//! Keeps numeric owners, all 12 mode bits, mtimes (0 stays 0), xattrs, hard links, symlinks
//! (absolute targets too), device nodes and FIFOs. OCI whiteouts become overlayfs ones:
//! `.wh.NAME` → char device 0:0 at NAME, `.wh..wh..opq` → `trusted.overlay.opaque=y` on the
//! directory, so unpacked layers stack as overlayfs lower dirs ([`super::flatten`] applies them
//! to a single tree). Knows nothing of compression, digests or the store.

use super::sys::{self, Kind, Node, Root};
use std::cmp::Reverse;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The default cap on what one layer may unpack to (stream and file bytes): 32 GiB.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 32 << 30;
/// The xattr overlayfs reads to make a directory opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// How to unpack.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// The most bytes a layer may unpack to; more is a decompression bomb.
    pub max_bytes: u64,
    /// Apply the entries' numeric owners (needs root; off otherwise).
    pub preserve_owners: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            max_bytes: DEFAULT_MAX_LAYER_BYTES,
            preserve_owners: sys::is_root(),
        }
    }
}

/// What a layer held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries applied (whiteouts included).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub file_bytes: u64,
}

/// Why a layer could not be unpacked. Any error leaves a partial tree for the caller to
/// discard; nothing outside the root was touched.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The tar stream is malformed or could not be read.
    #[error("reading the layer tar failed")]
    Read(#[source] io::Error),
    /// An entry name or hard-link target with `..` in it.
    #[error("entry {path:?} points outside the layer (`..` in {name:?})")]
    Escape {
        /// The entry.
        path: String,
        /// The offending name (the entry's or its link target).
        name: String,
    },
    /// A whiteout with an empty, `.` or `..` name.
    #[error("whiteout {path:?} names no file")]
    BadWhiteout {
        /// The entry.
        path: String,
    },
    /// An entry that cannot be applied as given (no link target, root replaced, ids too big).
    #[error("entry {path:?}: {detail}")]
    BadEntry {
        /// The entry.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A file-system step failed for an entry.
    #[error("{step} failed for {path:?}")]
    Write {
        /// The step (`create file`, `mknod`, …).
        step: &'static str,
        /// The entry.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// More than the allowed bytes.
    #[error(
        "layer unpacks to more than {limit} bytes (the per-layer limit; see KILN_MAX_LAYER_BYTES)"
    )]
    TooLarge {
        /// The limit.
        limit: u64,
    },
}

struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    xattrs: Vec<(OsString, Vec<u8>)>,
}

struct DeferredDir {
    comps: Vec<OsString>,
    mode: u32,
    mtime: (i64, i64),
}

/// Unpacks the (uncompressed) layer tar `input` into the existing, empty directory `dest`.
pub fn unpack_layer(
    input: impl Read,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    let root = Root::open(dest).map_err(|source| UnpackError::Write {
        step: "open the layer root",
        path: dest.display().to_string(),
        source,
    })?;
    let mut u = Unpacker {
        root,
        opts,
        stats: UnpackStats::default(),
        deferred: Vec::new(),
        cached_parent: None,
        buf: vec![0u8; 256 << 10],
    };
    // Like a fresh `mkdir`, unless the layer says otherwise with a `./` entry.
    u.deferred.push(DeferredDir {
        comps: Vec::new(),
        mode: 0o755,
        mtime: (0, libc_utime_omit()),
    });
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(read_error(opts))?;
    for entry in entries {
        let entry = entry.map_err(read_error(opts))?;
        u.apply(entry)?;
    }
    u.finish()
}

/// `UTIME_OMIT`: leave a time as it is (the root's mtime when the layer has no `./`).
fn libc_utime_omit() -> i64 {
    (1 << 30) - 2
}

fn read_error(opts: &UnpackOptions) -> impl Fn(io::Error) -> UnpackError + '_ {
    move |e| {
        if e.kind() == io::ErrorKind::FileTooLarge {
            UnpackError::TooLarge {
                limit: opts.max_bytes,
            }
        } else {
            UnpackError::Read(e)
        }
    }
}

/// Splits an entry name into plain components: `/` and `.` dropped (so absolute names land
/// under the root), `..` refused.
fn components(raw: &[u8], entry: &str) -> Result<Vec<OsString>, UnpackError> {
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(UnpackError::Escape {
                    path: entry.to_string(),
                    name: String::from_utf8_lossy(raw).into_owned(),
                });
            }
            c => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    Ok(out)
}

struct Unpacker<'o> {
    root: Root,
    opts: &'o UnpackOptions,
    stats: UnpackStats,
    deferred: Vec<DeferredDir>,
    /// The last parent directory opened, by components. Dropped whenever anything is
    /// removed, since a removal can change what a path resolves to.
    cached_parent: Option<(Vec<OsString>, OwnedFd)>,
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        use tar::EntryType as T;
        let raw = entry.path_bytes().into_owned();
        let path = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let comps = components(&raw, &path)?;
        let meta = self.meta(&mut entry, &path)?;
        self.stats.entries += 1;

        let Some((name, parents)) = comps.split_last() else {
            if kind != T::Directory {
                return Err(UnpackError::BadEntry {
                    path,
                    detail: "only a directory can stand for the layer root".into(),
                });
            }
            let fd = self.root.fd();
            self.owner_and_xattrs(fd, OsStr::new("."), &meta, &path)?;
            self.deferred.push(DeferredDir {
                comps: Vec::new(),
                mode: meta.mode,
                mtime: meta.mtime,
            });
            return Ok(());
        };

        if let Some(target) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(parents, name, target, &meta, &path);
        }

        let parent = self.parent(parents, &path)?;
        let pfd = parent.as_fd();
        let existing = sys::kind_at(pfd, name).map_err(write("look up", &path))?;
        let replace = |u: &mut Self, keep_dir: bool| -> Result<(), UnpackError> {
            match existing {
                None => Ok(()),
                Some(Kind::Dir) if keep_dir => Ok(()),
                Some(_) => {
                    u.cached_parent = None;
                    sys::remove_at(pfd, name).map_err(write("replace", &path))
                }
            }
        };
        match kind {
            T::Directory => {
                replace(self, true)?;
                if existing != Some(Kind::Dir) {
                    sys::mkdir_at(pfd, name).map_err(write("mkdir", &path))?;
                }
                let dir = sys::open_dir_at(pfd, name).map_err(write("open directory", &path))?;
                if self.opts.preserve_owners {
                    sys::chown_fd(dir.as_fd(), meta.uid, meta.gid)
                        .map_err(write("chown", &path))?;
                }
                self.xattrs(dir.as_fd(), OsStr::new("."), &meta, &path);
                let mut full = parents.to_vec();
                full.push(name.clone());
                self.deferred.push(DeferredDir {
                    comps: full,
                    mode: meta.mode,
                    mtime: meta.mtime,
                });
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                replace(self, false)?;
                let mut f = sys::create_file_at(pfd, name).map_err(write("create file", &path))?;
                self.copy_content(&mut entry, &mut f, &path)?;
                if self.opts.preserve_owners {
                    sys::chown_fd(f.as_fd(), meta.uid, meta.gid).map_err(write("chown", &path))?;
                }
                // After chown, which clears setuid/setgid.
                sys::chmod_fd(f.as_fd(), meta.mode).map_err(write("chmod", &path))?;
                drop(f);
                self.xattrs(pfd, name, &meta, &path);
                self.times(pfd, name, &meta, &path)?;
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| OsStr::from_bytes(&t).to_os_string())
                    .ok_or_else(|| UnpackError::BadEntry {
                        path: path.clone(),
                        detail: "symlink without a target".into(),
                    })?;
                replace(self, false)?;
                sys::symlink_at(&target, pfd, name).map_err(write("symlink", &path))?;
                self.owner_and_xattrs(pfd, name, &meta, &path)?;
                self.times(pfd, name, &meta, &path)?;
            }
            T::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = components(&target_raw, &path)?;
                let Some((src_name, src_parents)) = target.split_last() else {
                    return Err(UnpackError::BadEntry {
                        path,
                        detail: "hard link without a target".into(),
                    });
                };
                if target == comps {
                    return Err(UnpackError::BadEntry {
                        path,
                        detail: "hard link to itself".into(),
                    });
                }
                replace(self, false)?;
                let link_err = |source| UnpackError::Write {
                    step: "hard link",
                    path: format!("{path} -> {}", String::from_utf8_lossy(&target_raw)),
                    source,
                };
                let src_dir = self
                    .root
                    .dir(&os_refs(src_parents), false)
                    .map_err(link_err)?;
                sys::link_at(src_dir.as_fd(), src_name, pfd, name).map_err(link_err)?;
            }
            T::Char | T::Block | T::Fifo => {
                let dev = |n: io::Result<Option<u32>>| n.ok().flatten().unwrap_or(0);
                let node = match kind {
                    T::Char => Node::Char(
                        dev(entry.header().device_major()),
                        dev(entry.header().device_minor()),
                    ),
                    T::Block => Node::Block(
                        dev(entry.header().device_major()),
                        dev(entry.header().device_minor()),
                    ),
                    _ => Node::Fifo,
                };
                replace(self, false)?;
                match sys::mknod_at(pfd, name, node, meta.mode) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied && !sys::is_root() => {
                        tracing::warn!(entry = %path, "device node skipped: creating it needs root");
                        return Ok(());
                    }
                    Err(e) => return Err(write("mknod", &path)(e)),
                }
                self.owner_and_xattrs(pfd, name, &meta, &path)?;
                self.times(pfd, name, &meta, &path)?;
            }
            other => {
                tracing::debug!(entry = %path, kind = ?other, "tar entry type skipped");
            }
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        parents: &[OsString],
        name: &OsStr,
        target: &[u8],
        meta: &Meta,
        path: &str,
    ) -> Result<(), UnpackError> {
        let parent = self.parent(parents, path)?;
        let pfd = parent.as_fd();
        if name.as_bytes() == OPAQUE_MARKER {
            return sys::set_xattr_at(pfd, OsStr::new("."), OsStr::new(OPAQUE_XATTR), b"y")
                .map_err(write("mark opaque", path));
        }
        if target.starts_with(WHITEOUT_PREFIX) {
            // Other `.wh..wh.*` names are aufs bookkeeping (`.wh..wh.plnk`), not content.
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(UnpackError::BadWhiteout { path: path.into() });
        }
        let target = OsStr::from_bytes(target);
        // The layer's own entry of that name wins over the whiteout, as in the OCI spec.
        if sys::kind_at(pfd, target)
            .map_err(write("look up", path))?
            .is_some()
        {
            return Ok(());
        }
        sys::mknod_at(pfd, target, Node::Char(0, 0), 0).map_err(write("make whiteout", path))?;
        if self.opts.preserve_owners {
            sys::chown_at(pfd, target, meta.uid, meta.gid).map_err(write("chown", path))?;
        }
        Ok(())
    }

    fn parent(&mut self, parents: &[OsString], path: &str) -> Result<OwnedFd, UnpackError> {
        if let Some((p, fd)) = &self.cached_parent
            && p.as_slice() == parents
        {
            return fd.try_clone().map_err(write("open parent", path));
        }
        let fd = self
            .root
            .dir(&os_refs(parents), true)
            .map_err(write("open parent directory", path))?;
        self.cached_parent = Some((
            parents.to_vec(),
            fd.try_clone().map_err(write("open parent", path))?,
        ));
        Ok(fd)
    }

    fn meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        path: &str,
    ) -> Result<Meta, UnpackError> {
        let h = entry.header();
        let bad = |detail: String| UnpackError::BadEntry {
            path: path.to_string(),
            detail,
        };
        // An all-blank numeric field is 0, as Go's archive/tar (which wrote most layers) reads it.
        let blank = |f: &[u8]| f.iter().all(|b| *b == 0 || *b == b' ');
        let id = |v: io::Result<u64>, raw: &[u8], what: &str| -> Result<u32, UnpackError> {
            let v = match v {
                Ok(v) => v,
                Err(_) if blank(raw) => 0,
                Err(e) => return Err(bad(format!("bad {what}: {e}"))),
            };
            u32::try_from(v).map_err(|_| bad(format!("{what} {v} is too large")))
        };
        let old = h.as_old();
        let mode = match h.mode() {
            Ok(m) => m & 0o7777,
            Err(_) if blank(&old.mode) => 0,
            Err(e) => return Err(bad(format!("bad mode: {e}"))),
        };
        let uid = id(h.uid(), &old.uid, "uid")?;
        let gid = id(h.gid(), &old.gid, "gid")?;
        let header_mtime = (h.mtime().unwrap_or(0) as i64, 0i64);
        let PaxMeta {
            mtime: pax_mtime,
            xattrs,
        } = pax_meta(entry, path).map_err(UnpackError::Read)?;
        let mtime = pax_mtime.unwrap_or(header_mtime);
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }

    fn copy_content(
        &mut self,
        entry: &mut impl Read,
        f: &mut std::fs::File,
        path: &str,
    ) -> Result<(), UnpackError> {
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(self.opts)(e)),
            };
            self.stats.file_bytes += n as u64;
            if self.stats.file_bytes > self.opts.max_bytes {
                return Err(UnpackError::TooLarge {
                    limit: self.opts.max_bytes,
                });
            }
            f.write_all(&self.buf[..n])
                .map_err(write("write file", path))?;
        }
    }

    fn owner_and_xattrs(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
        meta: &Meta,
        path: &str,
    ) -> Result<(), UnpackError> {
        if self.opts.preserve_owners {
            sys::chown_at(dir, name, meta.uid, meta.gid).map_err(write("chown", path))?;
        }
        self.xattrs(dir, name, meta, path);
        Ok(())
    }

    fn xattrs(&self, dir: std::os::fd::BorrowedFd<'_>, name: &OsStr, meta: &Meta, path: &str) {
        for (k, v) in &meta.xattrs {
            // Not fatal: user.* cannot sit on symlinks, trusted.* needs root, and some file
            // systems support neither.
            if let Err(e) = sys::set_xattr_at(dir, name, k, v) {
                tracing::warn!(entry = %path, xattr = ?k, error = %e, "xattr not applied");
            }
        }
    }

    fn times(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
        meta: &Meta,
        path: &str,
    ) -> Result<(), UnpackError> {
        sys::set_times_at(dir, name, meta.mtime.0, meta.mtime.1).map_err(write("set times", path))
    }

    fn finish(mut self) -> Result<UnpackStats, UnpackError> {
        self.cached_parent = None;
        // Deepest first, so setting a directory's time is not undone by its children; modes
        // last, so a read-only directory did not block writing into it.
        self.deferred.sort_by_key(|d| Reverse(d.comps.len()));
        for d in &self.deferred {
            let path = d
                .comps
                .iter()
                .map(|c| c.to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let fd = match self.root.existing_dir_nofollow(&os_refs(&d.comps)) {
                Ok(fd) => fd,
                // Replaced by a later entry with something that is not a directory.
                Err(e)
                    if [
                        nix::errno::Errno::ENOTDIR,
                        nix::errno::Errno::ELOOP,
                        nix::errno::Errno::ENOENT,
                    ]
                    .iter()
                    .any(|n| e.raw_os_error() == Some(*n as i32)) =>
                {
                    continue;
                }
                Err(e) => return Err(write("open directory", &path)(e)),
            };
            sys::chmod_fd(fd.as_fd(), d.mode).map_err(write("chmod", &path))?;
            if d.mtime.1 != libc_utime_omit() {
                sys::set_times_at(fd.as_fd(), OsStr::new("."), d.mtime.0, d.mtime.1)
                    .map_err(write("set times", &path))?;
            }
        }
        Ok(self.stats)
    }
}

fn os_refs(v: &[OsString]) -> Vec<&OsStr> {
    v.iter().map(|s| s.as_os_str()).collect()
}

fn write<'a>(step: &'static str, path: &'a str) -> impl Fn(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Write {
        step,
        path: path.to_string(),
        source,
    }
}

/// A PAX time (`1700000000.25`) as seconds and nanoseconds.
/// What the PAX records of a tar entry add to its header.
#[derive(Debug, Default)]
pub struct PaxMeta {
    /// `mtime` (seconds, nanoseconds).
    pub mtime: Option<(i64, i64)>,
    /// `SCHILY.xattr.*` attributes.
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

/// The [`PaxMeta`] of `entry` (at `path`, for logs), without overlayfs's own
/// `trusted.overlay.*` (only whiteouts may set those). Layers and ADDed archives both apply it.
pub fn pax_meta<R: Read>(entry: &mut tar::Entry<'_, R>, path: &str) -> io::Result<PaxMeta> {
    let mut mtime = None;
    let mut xattrs = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let key = ext.key_bytes();
            if key == b"mtime" {
                if let Some(t) = ext.value().ok().and_then(parse_pax_time) {
                    mtime = Some(t);
                }
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if name.starts_with(b"trusted.overlay.") {
                    tracing::warn!(entry = %path, "overlayfs xattr in an archive ignored");
                    continue;
                }
                xattrs.push((
                    OsStr::from_bytes(name).to_os_string(),
                    ext.value_bytes().to_vec(),
                ));
            }
        }
    }
    Ok(PaxMeta { mtime, xattrs })
}

fn parse_pax_time(s: &str) -> Option<(i64, i64)> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    // A negative time with a fraction counts the fraction towards zero.
    Some(if secs < 0 && nanos > 0 {
        (secs - 1, 1_000_000_000 - nanos)
    } else {
        (secs, nanos)
    })
}

#[cfg(test)]
mod tests;
