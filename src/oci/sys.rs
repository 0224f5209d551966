//! File-system calls relative to a layer root, through `nix` (no raw libc, no `unsafe`).
//!
//! Every path that comes from a layer goes through [`Root::dir`], which resolves it with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: symlinks and `..` are resolved as if
//! the root were `/`, so nothing resolves outside it. The `*_at` helpers then act on one final
//! component (never containing `/`, `.` or `..`) inside a directory opened that way, without
//! following a symlink in that last position. The layer being written is private to this
//! process (a fresh temp dir), so nothing else races these calls.

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags, fstatat, mkdirat, mknodat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A directory that paths are resolved inside of.
pub struct Root {
    fd: OwnedFd,
}

/// What sits at a name, as `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A symlink.
    Symlink,
    /// A whiteout (char device 0:0).
    Whiteout,
    /// Anything else.
    Other,
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn in_root() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

impl Root {
    /// Opens `path` (a directory) as a root.
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(path, dir_flags() | OFlag::O_NOFOLLOW, Mode::empty())
            .map_err(errno)?;
        Ok(Root { fd })
    }

    /// The root's own descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens the directory `comps` (relative, no `..`) inside the root; with `create`, makes
    /// missing directories (mode 0755) on the way, as tar does for implied parents.
    pub fn dir(&self, comps: &[&OsStr], create: bool) -> io::Result<OwnedFd> {
        let how = OpenHow::new().flags(dir_flags()).resolve(in_root());
        let full = join(comps);
        match openat2(self.fd(), full.as_os_str(), how) {
            Err(Errno::ENOENT) if create => {}
            r => return r.map_err(errno),
        }
        // Walk down, creating what is missing. Each mkdir names one plain component inside a
        // directory that was itself resolved in the root.
        let mut cur = nix::unistd::dup(self.fd()).map_err(errno)?;
        for i in 0..comps.len() {
            let prefix = join(&comps[..=i]);
            let next = match openat2(self.fd(), prefix.as_os_str(), how) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match mkdirat(cur.as_fd(), comps[i], Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(errno(e)),
                    }
                    openat2(self.fd(), prefix.as_os_str(), how).map_err(errno)?
                }
                Err(e) => return Err(errno(e)),
            };
            cur = next;
        }
        Ok(cur)
    }

    /// Opens `comps` in the root as a directory, not following a symlink in last position.
    pub fn existing_dir_nofollow(&self, comps: &[&OsStr]) -> io::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(dir_flags() | OFlag::O_NOFOLLOW)
            .resolve(in_root());
        openat2(self.fd(), join(comps).as_os_str(), how).map_err(errno)
    }
}

fn join(comps: &[&OsStr]) -> PathBuf {
    if comps.is_empty() {
        return PathBuf::from(".");
    }
    let mut p = OsString::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            p.push("/");
        }
        p.push(c);
    }
    PathBuf::from(p)
}

/// What `name` in `dir` is, without following it; `None` when absent.
pub fn kind_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Kind>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
            Ok(Some(if fmt == SFlag::S_IFDIR {
                Kind::Dir
            } else if fmt == SFlag::S_IFLNK {
                Kind::Symlink
            } else if fmt == SFlag::S_IFCHR && st.st_rdev == 0 {
                Kind::Whiteout
            } else {
                Kind::Other
            }))
        }
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(errno(e)),
    }
}

/// Removes `name` from `dir`, a directory with everything under it; never follows symlinks.
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(errno(e)),
    }
    let sub = open_dir_at(dir, name)?;
    let names: Vec<OsString> = {
        let d =
            nix::dir::Dir::from_fd(nix::unistd::dup(sub.as_fd()).map_err(errno)?).map_err(errno)?;
        let mut v = Vec::new();
        for e in d.into_iter() {
            let e = e.map_err(errno)?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                v.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        v
    };
    for n in names {
        remove_at(sub.as_fd(), &n)?;
    }
    unlinkat(dir, name, UnlinkatFlags::RemoveDir).map_err(errno)
}

/// Opens the directory `name` in `dir`, failing on a symlink.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    openat(dir, name, dir_flags() | OFlag::O_NOFOLLOW, Mode::empty()).map_err(errno)
}

/// Creates a new regular file `name` in `dir` (never through a symlink, never an old file).
pub fn create_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir, name, flags, Mode::from_bits_truncate(0o600)).map_err(errno)?;
    Ok(File::from(fd))
}

/// `mkdirat`; an existing directory is fine.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    mkdirat(dir, name, Mode::from_bits_truncate(0o700)).map_err(errno)
}

/// `symlinkat(target, dir, name)`.
pub fn symlink_at(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    symlinkat(target, dir, name).map_err(errno)
}

/// The device/FIFO kinds [`mknod_at`] makes.
#[derive(Debug, Clone, Copy)]
pub enum Node {
    /// A character device.
    Char(u32, u32),
    /// A block device.
    Block(u32, u32),
    /// A FIFO.
    Fifo,
}

/// `mknodat`, then the exact permission bits (mknod applies the umask).
pub fn mknod_at(dir: BorrowedFd<'_>, name: &OsStr, node: Node, mode: u32) -> io::Result<()> {
    let (kind, dev) = match node {
        Node::Char(ma, mi) => (
            SFlag::S_IFCHR,
            nix::sys::stat::makedev(ma.into(), mi.into()),
        ),
        Node::Block(ma, mi) => (
            SFlag::S_IFBLK,
            nix::sys::stat::makedev(ma.into(), mi.into()),
        ),
        Node::Fifo => (SFlag::S_IFIFO, 0),
    };
    mknodat(dir, name, kind, Mode::empty(), dev).map_err(errno)?;
    // Following is harmless here: `name` was just made by us and is not a symlink.
    nix::sys::stat::fchmodat(
        dir,
        name,
        Mode::from_bits_truncate(mode & 0o7777),
        FchmodatFlags::FollowSymlink,
    )
    .map_err(errno)
}

/// A hard link `dst_dir/dst` to `src_dir/src` (a symlink there is linked, not followed).
pub fn link_at(
    src_dir: BorrowedFd<'_>,
    src: &OsStr,
    dst_dir: BorrowedFd<'_>,
    dst: &OsStr,
) -> io::Result<()> {
    linkat(src_dir, src, dst_dir, dst, AtFlags::empty()).map_err(errno)
}

/// `lchown`-like: owner of `name` in `dir`, not following a symlink.
pub fn chown_at(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(errno)
}

/// Owner of an open file.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    nix::unistd::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(errno)
}

/// Mode of an open file (all 12 bits: setuid, setgid, sticky).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode & 0o7777)).map_err(errno)
}

/// Access and modification times of `name` in `dir` (`name` = `.` for `dir` itself), not
/// following a symlink. An mtime of 0 stays 0.
pub fn set_times_at(dir: BorrowedFd<'_>, name: &OsStr, secs: i64, nsecs: i64) -> io::Result<()> {
    let t = TimeSpec::new(secs, nsecs);
    nix::sys::stat::utimensat(dir, name, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(errno)
}

/// The path under `/proc/self/fd` that names `name` in `dir` without resolving it again.
fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(name);
    p
}

/// Sets an extended attribute on `name` in `dir`, not following a symlink in last position.
pub fn set_xattr_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    key: &OsStr,
    value: &[u8],
) -> io::Result<()> {
    if name == "." {
        // `/proc/self/fd/N` itself is a (magic) symlink: set it on the descriptor instead.
        use xattr::FileExt;
        let f = File::from(nix::unistd::dup(dir).map_err(errno)?);
        return f.set_xattr(key, value);
    }
    xattr::set(proc_path(dir, name), key, value)
}

/// Flushes the file system holding `fd` (one call instead of an fsync per file).
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::unistd::syncfs(fd).map_err(errno)
}

/// True when the process runs as root (owners, device nodes and `trusted.*` xattrs need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The names in the directory `dir` (without `.` and `..`), sorted.
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let d = nix::dir::Dir::from_fd(nix::unistd::dup(dir).map_err(errno)?).map_err(errno)?;
    let mut v = Vec::new();
    for e in d.into_iter() {
        let e = e.map_err(errno)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            v.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    v.sort();
    Ok(v)
}

/// `lstat` of `name` in `dir`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<nix::sys::stat::FileStat> {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(errno)
}

/// The target of the symlink `name` in `dir`.
pub fn readlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OsString> {
    nix::fcntl::readlinkat(dir, name).map_err(errno)
}

/// Opens the regular file `name` in `dir` for reading, not following a symlink.
pub fn open_read_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno)?;
    Ok(File::from(fd))
}

/// The extended attributes of `name` in `dir` (`.` for `dir` itself), not following a symlink.
pub fn xattrs_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<(OsString, Vec<u8>)>> {
    let mut out = Vec::new();
    if name == "." {
        use xattr::FileExt;
        let f = File::from(nix::unistd::dup(dir).map_err(errno)?);
        for k in f.list_xattr()? {
            if let Some(v) = f.get_xattr(&k)? {
                out.push((k, v));
            }
        }
        return Ok(out);
    }
    let p = proc_path(dir, name);
    for k in xattr::list(&p)? {
        if let Some(v) = xattr::get(&p, &k)? {
            out.push((k, v));
        }
    }
    Ok(out)
}
