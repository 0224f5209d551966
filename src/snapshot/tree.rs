//! A root tree in memory: every name, type, owner, mode, time, xattr and link of a directory or
//! a tar, with where each file's bytes come from. Nothing is extracted to the host: a tar is
//! read twice (once here, once to copy the data out of it by offset), so its paths never touch
//! the host's file system and cannot escape anywhere.

use super::SnapshotError;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Seconds and nanoseconds since the epoch.
pub type Time = (i64, u32);

/// Owner, permission bits and mtime of one inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits incl. setuid, setgid and sticky (`0o7777`).
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: Time,
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// A file of the source directory.
    Path(PathBuf),
    /// A byte range of the source tar.
    TarRange {
        /// Offset of the first byte in the archive.
        offset: u64,
    },
}

/// What a non-directory inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file of `size` bytes.
    File {
        /// Length.
        size: u64,
        /// Where its bytes are (`None` when empty).
        data: Option<Data>,
        /// For a sparse file, its data segments `(offset, len)`, block-aligned, ascending; the
        /// rest are holes. `None`: every byte is data.
        segments: Option<Vec<(u64, u64)>>,
    },
    /// A symbolic link; the target is kept as written and never followed.
    Symlink {
        /// The target.
        target: String,
    },
    /// A character device.
    Char {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    Block {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

/// One inode that is not a directory; several names (hard links) may share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Its type and payload.
    pub kind: Kind,
    /// Owner, mode, mtime.
    pub meta: Meta,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// A name in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory (index into [`Tree::dirs`]).
    Dir(usize),
    /// A link to an inode (index into [`Tree::inodes`]).
    Link(usize),
}

/// One directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    /// Owner, mode, mtime.
    pub meta: Meta,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Entries by name; a `BTreeMap` so every walk is in byte order, whatever the source order.
    pub entries: BTreeMap<String, Node>,
}

/// Where a tree came from; data is read from it again while the disk is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory.
    Dir(PathBuf),
    /// A tar archive.
    Tar(PathBuf),
}

/// A whole root tree. `dirs[0]` is the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The source.
    pub source: Source,
    /// Directories; `dirs[0]` is `/`.
    pub dirs: Vec<Dir>,
    /// Non-directory inodes.
    pub inodes: Vec<Inode>,
}

const DEFAULT_DIR: Meta = Meta {
    mode: 0o755,
    uid: 0,
    gid: 0,
    mtime: (0, 0),
};

impl Tree {
    /// Reads a directory or a tar, whichever `path` is.
    pub fn scan(path: &Path) -> Result<Tree, SnapshotError> {
        let md = std::fs::metadata(path).map_err(|source| SnapshotError::ReadTree {
            path: path.to_path_buf(),
            source,
        })?;
        if md.is_dir() {
            Tree::from_dir(path)
        } else {
            Tree::from_tar(path)
        }
    }

    /// Reads a directory tree without following symlinks; hard links are found by
    /// (device, inode).
    pub fn from_dir(root: &Path) -> Result<Tree, SnapshotError> {
        let read = |p: &Path| {
            let p = p.to_path_buf();
            move |source| SnapshotError::ReadTree { path: p, source }
        };
        // The root itself may be a symlink to the tree: follow it (and only it).
        let real = std::fs::canonicalize(root).map_err(read(root))?;
        let root = real.as_path();
        let md = std::fs::symlink_metadata(root).map_err(read(root))?;
        let mut tree = Tree {
            source: Source::Dir(root.to_path_buf()),
            dirs: vec![Dir {
                meta: meta_of(&md),
                xattrs: xattrs_of(root)?,
                entries: BTreeMap::new(),
            }],
            inodes: Vec::new(),
        };
        let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
        let mut stack = vec![(0usize, root.to_path_buf())];
        while let Some((dir, path)) = stack.pop() {
            let rd = std::fs::read_dir(&path).map_err(read(&path))?;
            for entry in rd {
                let entry = entry.map_err(read(&path))?;
                let child = entry.path();
                let name = utf8_name(&entry.file_name(), &child)?;
                let md = std::fs::symlink_metadata(&child).map_err(read(&child))?;
                let ft = md.file_type();
                // A mounted ext4 root (a sandbox's view) has the file system's own empty
                // lost+found; the writer makes its own, as `export` leaves it out.
                if dir == 0
                    && name == "lost+found"
                    && ft.is_dir()
                    && std::fs::read_dir(&child).is_ok_and(|mut d| d.next().is_none())
                {
                    continue;
                }
                let meta = meta_of(&md);
                let node = if ft.is_dir() {
                    let idx = tree.dirs.len();
                    tree.dirs.push(Dir {
                        meta,
                        xattrs: xattrs_of(&child)?,
                        entries: BTreeMap::new(),
                    });
                    stack.push((idx, child));
                    Node::Dir(idx)
                } else if let Some(&ino) = seen.get(&(md.dev(), md.ino())) {
                    Node::Link(ino)
                } else {
                    let kind = if ft.is_file() {
                        let size = md.len();
                        // Open now, so an unreadable file fails the scan, not the write.
                        let segments = if size > 0 {
                            let f = std::fs::File::open(&child).map_err(read(&child))?;
                            if md.blocks() * 512 < size {
                                data_segments(&f, size).map_err(read(&child))?
                            } else {
                                None
                            }
                        } else {
                            None
                        };
                        Kind::File {
                            size,
                            data: (size > 0).then(|| Data::Path(child.clone())),
                            segments,
                        }
                    } else if ft.is_symlink() {
                        let t = std::fs::read_link(&child).map_err(read(&child))?;
                        Kind::Symlink {
                            target: utf8_name(t.as_os_str(), &child)?,
                        }
                    } else if ft.is_char_device() {
                        let (major, minor) = split_rdev(md.rdev());
                        Kind::Char { major, minor }
                    } else if ft.is_block_device() {
                        let (major, minor) = split_rdev(md.rdev());
                        Kind::Block { major, minor }
                    } else if ft.is_fifo() {
                        Kind::Fifo
                    } else {
                        Kind::Socket
                    };
                    let idx = tree.inodes.len();
                    tree.inodes.push(Inode {
                        kind,
                        meta,
                        xattrs: xattrs_of(&child)?,
                    });
                    if md.nlink() > 1 {
                        seen.insert((md.dev(), md.ino()), idx);
                    }
                    Node::Link(idx)
                };
                tree.dirs[dir].entries.insert(name, node);
            }
        }
        Ok(tree)
    }

    /// Reads a tar (ustar, GNU or PAX; PAX `SCHILY.xattr.*` gives xattrs). Paths are made
    /// relative to the root; one that climbs out of it is an error. Later entries replace
    /// earlier ones of the same path, as when a tar is extracted.
    pub fn from_tar(path: &Path) -> Result<Tree, SnapshotError> {
        let bad = |source| SnapshotError::ReadTar {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(|source| SnapshotError::ReadTree {
            path: path.to_path_buf(),
            source,
        })?;
        let mut archive = tar::Archive::new(std::io::BufReader::new(file));
        let mut tree = Tree {
            source: Source::Tar(path.to_path_buf()),
            dirs: vec![Dir {
                meta: DEFAULT_DIR,
                xattrs: Vec::new(),
                entries: BTreeMap::new(),
            }],
            inodes: Vec::new(),
        };
        let mut count = 0usize;
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            count += 1;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let parts = clean_path(&raw)?;
            let header = entry.header();
            let meta = Meta {
                mode: (header.mode().map_err(bad)? & 0o7777) as u16,
                uid: u32::try_from(header.uid().map_err(bad)?)
                    .map_err(|_| unsupported(&raw, "uid above 2^32"))?,
                gid: u32::try_from(header.gid().map_err(bad)?)
                    .map_err(|_| unsupported(&raw, "gid above 2^32"))?,
                mtime: (header.mtime().map_err(bad)? as i64, 0),
            };
            let et = header.entry_type();
            let devno = match et {
                tar::EntryType::Char | tar::EntryType::Block => (
                    header.device_major().map_err(bad)?.unwrap_or(0),
                    header.device_minor().map_err(bad)?.unwrap_or(0),
                ),
                _ => (0, 0),
            };
            let link_name = entry
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            let mut xattrs = Vec::new();
            let mut mtime = meta.mtime;
            if let Some(pax) = entry.pax_extensions().map_err(bad)? {
                for ext in pax {
                    let ext = ext.map_err(bad)?;
                    let Ok(key) = ext.key() else { continue };
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                    } else if key == "mtime" {
                        mtime = parse_pax_time(ext.value_bytes()).unwrap_or(mtime);
                    } else if key.starts_with("GNU.sparse.") {
                        return Err(unsupported(&raw, "sparse tar entries are not supported"));
                    }
                }
            }
            xattrs.sort();
            let meta = Meta { mtime, ..meta };
            let Some((name, parents)) = parts.split_last() else {
                // `./` (or `/`): the root directory's own metadata.
                if et.is_dir() {
                    tree.dirs[0].meta = meta;
                    tree.dirs[0].xattrs = xattrs;
                    continue;
                }
                return Err(unsupported(&raw, "the root must be a directory"));
            };
            let parent = tree.mkdir_p(parents, &raw)?;
            let node = match et {
                tar::EntryType::Directory => {
                    if let Some(Node::Dir(d)) = tree.dirs[parent].entries.get(name) {
                        // An existing directory keeps its children; the entry sets its metadata.
                        let d = *d;
                        tree.dirs[d].meta = meta;
                        tree.dirs[d].xattrs = xattrs;
                        continue;
                    }
                    tree.dirs.push(Dir {
                        meta,
                        xattrs,
                        entries: BTreeMap::new(),
                    });
                    Node::Dir(tree.dirs.len() - 1)
                }
                tar::EntryType::Link => {
                    let target =
                        link_name.ok_or_else(|| unsupported(&raw, "hard link without a target"))?;
                    let tparts = clean_path(&target)?;
                    match tree.lookup(&tparts) {
                        Some(Node::Link(i)) => Node::Link(i),
                        Some(Node::Dir(_)) => {
                            return Err(unsupported(&raw, "hard link to a directory"));
                        }
                        None => {
                            return Err(unsupported(
                                &raw,
                                &format!(
                                    "hard link to {target:?}, which is not earlier in the archive"
                                ),
                            ));
                        }
                    }
                }
                tar::EntryType::GNUSparse => {
                    return Err(unsupported(&raw, "sparse tar entries are not supported"));
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = entry.size();
                    tree.push_inode(
                        Kind::File {
                            size,
                            data: (size > 0).then(|| Data::TarRange {
                                offset: entry.raw_file_position(),
                            }),
                            segments: None,
                        },
                        meta,
                        xattrs,
                    )
                }
                tar::EntryType::Symlink => {
                    let target =
                        link_name.ok_or_else(|| unsupported(&raw, "symlink without a target"))?;
                    tree.push_inode(Kind::Symlink { target }, meta, xattrs)
                }
                tar::EntryType::Char => {
                    let (major, minor) = devno;
                    tree.push_inode(Kind::Char { major, minor }, meta, xattrs)
                }
                tar::EntryType::Block => {
                    let (major, minor) = devno;
                    tree.push_inode(Kind::Block { major, minor }, meta, xattrs)
                }
                tar::EntryType::Fifo => tree.push_inode(Kind::Fifo, meta, xattrs),
                // PAX/GNU headers are folded into the entry they precede by the tar crate;
                // anything else is not part of a root tree.
                other => {
                    return Err(unsupported(
                        &raw,
                        &format!("unsupported tar entry type {other:?}"),
                    ));
                }
            };
            tree.dirs[parent].entries.insert(name.clone(), node);
        }
        if count == 0 {
            return Err(bad(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a tar archive, or an empty one",
            )));
        }
        Ok(tree)
    }

    fn push_inode(&mut self, kind: Kind, meta: Meta, xattrs: Vec<(String, Vec<u8>)>) -> Node {
        self.inodes.push(Inode { kind, meta, xattrs });
        Node::Link(self.inodes.len() - 1)
    }

    /// The directory at `parts`, creating missing ones with default metadata (tars may list a
    /// file before, or without, its parent directories).
    fn mkdir_p(&mut self, parts: &[String], raw: &str) -> Result<usize, SnapshotError> {
        let mut dir = 0;
        for p in parts {
            dir = match self.dirs[dir].entries.get(p) {
                Some(Node::Dir(d)) => *d,
                Some(Node::Link(_)) => {
                    return Err(unsupported(
                        raw,
                        &format!(
                            "a parent, {p:?}, is not a directory (symlinks are never followed)"
                        ),
                    ));
                }
                None => {
                    self.dirs.push(Dir {
                        meta: DEFAULT_DIR,
                        xattrs: Vec::new(),
                        entries: BTreeMap::new(),
                    });
                    let d = self.dirs.len() - 1;
                    self.dirs[dir].entries.insert(p.clone(), Node::Dir(d));
                    d
                }
            };
        }
        Ok(dir)
    }

    fn lookup(&self, parts: &[String]) -> Option<Node> {
        let mut node = Node::Dir(0);
        for p in parts {
            match node {
                Node::Dir(d) => node = self.dirs[d].entries.get(p)?.clone(),
                Node::Link(_) => return None,
            }
        }
        Some(node)
    }

    /// Number of names (directory entries) in the tree, the root not counted.
    pub fn entry_count(&self) -> usize {
        self.dirs.iter().map(|d| d.entries.len()).sum()
    }

    /// Bytes of regular-file data.
    pub fn data_bytes(&self) -> u64 {
        self.inodes
            .iter()
            .map(|i| match &i.kind {
                Kind::File { size, .. } => *size,
                Kind::Symlink { .. }
                | Kind::Char { .. }
                | Kind::Block { .. }
                | Kind::Fifo
                | Kind::Socket => 0,
            })
            .sum()
    }

    /// Clamps every mtime to `epoch` (reproducible-builds' `SOURCE_DATE_EPOCH` rule: nothing
    /// newer than the epoch).
    pub fn clamp_mtimes(&mut self, epoch: i64) {
        let clamp = |m: &mut Meta| {
            if m.mtime.0 > epoch || (m.mtime.0 == epoch && m.mtime.1 > 0) {
                m.mtime = (epoch, 0);
            }
        };
        self.dirs.iter_mut().for_each(|d| clamp(&mut d.meta));
        self.inodes.iter_mut().for_each(|i| clamp(&mut i.meta));
    }

    /// The newest mtime in the tree (0 for an empty tree), the default superblock time.
    pub fn newest_mtime(&self) -> i64 {
        let dirs = self.dirs.iter().map(|d| d.meta.mtime.0);
        let inodes = self.inodes.iter().map(|i| i.meta.mtime.0);
        dirs.chain(inodes).max().unwrap_or(0).max(0)
    }
}

fn unsupported(path: &str, reason: &str) -> SnapshotError {
    SnapshotError::Unsupported {
        path: path.to_string(),
        reason: reason.to_string(),
    }
}

/// Splits a tar path into components below the root: leading `/` and `.` are dropped, `..`
/// pops one; climbing above the root is an error.
fn clean_path(raw: &str) -> Result<Vec<String>, SnapshotError> {
    let mut parts: Vec<String> = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(SnapshotError::EscapingPath {
                        entry: raw.to_string(),
                    });
                }
            }
            c => parts.push(c.to_string()),
        }
    }
    Ok(parts)
}

fn parse_pax_time(v: &[u8]) -> Option<Time> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nanos: u32 = digits.parse().ok()?;
    if secs < 0 && nanos > 0 {
        return Some((secs - 1, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

fn meta_of(md: &std::fs::Metadata) -> Meta {
    Meta {
        mode: (md.mode() & 0o7777) as u16,
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), md.mtime_nsec() as u32),
    }
}

fn utf8_name(name: &OsStr, path: &Path) -> Result<String, SnapshotError> {
    name.to_str()
        .map(str::to_string)
        .ok_or_else(|| SnapshotError::Unsupported {
            path: path.display().to_string(),
            reason: format!(
                "the name {:?} is not UTF-8, which the ext4 writer cannot take",
                String::from_utf8_lossy(name.as_bytes())
            ),
        })
}

fn xattrs_of(path: &Path) -> Result<Vec<(String, Vec<u8>)>, SnapshotError> {
    let err = |source| SnapshotError::ReadTree {
        path: path.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    // `xattr::list`/`get` do not follow symlinks (llistxattr, lgetxattr).
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(err(e)),
    };
    for name in names {
        let n = utf8_name(&name, path)?;
        if let Some(v) = xattr::get(path, &name).map_err(err)? {
            out.push((n, v));
        }
    }
    out.sort();
    Ok(out)
}

/// The data segments of a sparse file (`SEEK_DATA`/`SEEK_HOLE`), widened to 4 KiB blocks; `None`
/// when it turns out to have no hole.
fn data_segments(f: &std::fs::File, size: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
    use nix::unistd::{Whence, lseek};
    const BS: u64 = 4096;
    let mut segs: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let start = match lseek(f, at as i64, Whence::SeekData) {
            Ok(o) => o as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = (lseek(f, start as i64, Whence::SeekHole)? as u64).min(size);
        let (s, e) = (start / BS * BS, end.div_ceil(BS) * BS);
        match segs.last_mut() {
            Some((o, l)) if *o + *l >= s => *l = (e - *o).max(*l),
            _ => segs.push((s, e - s)),
        }
        at = end;
    }
    if let Some((o, l)) = segs.last_mut() {
        *l = (*l).min(size - *o);
    }
    let dense = matches!(segs.as_slice(), [(0, l)] if *l == size);
    Ok((!dense).then_some(segs))
}

/// glibc's `major()`/`minor()` split of a `dev_t`.
fn split_rdev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_dot_that_climbs_out_of_the_root_is_an_escape() {
        assert!(matches!(
            clean_path("../etc/passwd"),
            Err(SnapshotError::EscapingPath { .. })
        ));
        assert!(matches!(
            clean_path("a/../../b"),
            Err(SnapshotError::EscapingPath { .. })
        ));
        assert_eq!(clean_path("/./a//b/../c").expect("inside"), ["a", "c"]);
        assert!(clean_path("./").expect("root").is_empty());
    }

    #[test]
    fn pax_times_keep_nanoseconds() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
    }

    #[test]
    fn rdev_splits_like_glibc() {
        assert_eq!(split_rdev(0x0103), (1, 3));
        assert_eq!(split_rdev(0x0709), (7, 9));
    }

    #[test]
    fn clamping_moves_only_newer_mtimes() {
        let mut t = Tree {
            source: Source::Dir(PathBuf::from("/x")),
            dirs: vec![Dir {
                meta: Meta {
                    mtime: (50, 7),
                    ..DEFAULT_DIR
                },
                xattrs: vec![],
                entries: BTreeMap::new(),
            }],
            inodes: vec![Inode {
                kind: Kind::Fifo,
                meta: Meta {
                    mtime: (10, 0),
                    ..DEFAULT_DIR
                },
                xattrs: vec![],
            }],
        };
        t.clamp_mtimes(20);
        assert_eq!(t.dirs[0].meta.mtime, (20, 0));
        assert_eq!(t.inodes[0].meta.mtime, (10, 0));
        assert_eq!(t.newest_mtime(), 20);
    }
}
