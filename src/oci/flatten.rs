//! Stacking unpacked layers into one tree, as overlayfs would show them merged: a whiteout
//! (char device 0:0) removes what lies below, an opaque directory (`trusted.overlay.opaque=y`)
//! hides everything below it. Keeps owners, modes, mtimes, xattrs, hard links (within a
//! layer), symlinks, devices and FIFOs. Writes only inside `dest`, through [`super::sys`].

use super::error::OciError;
use super::sys::{self, Kind, Node, Root};
use super::unpack::OPAQUE_XATTR;
use nix::sys::stat::SFlag;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// Applies `layers` (bottom to top) onto the directory `dest`.
pub fn flatten(layers: &[PathBuf], dest: &Path) -> Result<(), OciError> {
    let dst = Root::open(dest).map_err(OciError::io("open", dest))?;
    for layer in layers {
        let src = Root::open(layer).map_err(OciError::io("open layer", layer))?;
        let mut f = Flattener {
            dst: &dst,
            layer,
            links: HashMap::new(),
        };
        f.copy_meta(src.fd(), OsStr::new("."), dst.fd(), OsStr::new("."), true)?;
        f.dir(src.fd(), &mut Vec::new())?;
        f.times(src.fd(), OsStr::new("."), dst.fd(), OsStr::new("."))?;
    }
    Ok(())
}

struct Flattener<'a> {
    dst: &'a Root,
    layer: &'a Path,
    /// (dev, ino) of multiply-linked files of this layer → where the first copy went.
    links: HashMap<(u64, u64), Vec<OsString>>,
}

impl Flattener<'_> {
    fn err(
        &self,
        step: &'static str,
        rel: &[OsString],
    ) -> impl FnOnce(std::io::Error) -> OciError + use<> {
        let mut p = self.layer.to_path_buf();
        p.extend(rel);
        OciError::io(step, p)
    }

    fn dir(&mut self, src: BorrowedFd<'_>, rel: &mut Vec<OsString>) -> Result<(), OciError> {
        let refs: Vec<&OsStr> = rel.iter().map(|s| s.as_os_str()).collect();
        let dparent = self.dst.dir(&refs, false).map_err(self.err("open", rel))?;
        let dp = dparent.as_fd();
        for name in sys::list_dir(src).map_err(self.err("list", rel))? {
            let mut at = rel.clone();
            at.push(name.clone());
            let st = sys::stat_at(src, &name).map_err(self.err("stat", &at))?;
            let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
            let existing = sys::kind_at(dp, &name).map_err(self.err("stat", &at))?;
            if fmt == SFlag::S_IFCHR && st.st_rdev == 0 {
                sys::remove_at(dp, &name).map_err(self.err("remove", &at))?;
                continue;
            }
            if fmt == SFlag::S_IFDIR {
                let sub = sys::open_dir_at(src, &name).map_err(self.err("open", &at))?;
                let opaque = sys::xattrs_at(sub.as_fd(), OsStr::new("."))
                    .map_err(self.err("xattrs", &at))?
                    .iter()
                    .any(|(k, v)| k == OPAQUE_XATTR && v == b"y");
                match existing {
                    Some(Kind::Dir) if opaque => {
                        let d = sys::open_dir_at(dp, &name).map_err(self.err("open", &at))?;
                        for child in sys::list_dir(d.as_fd()).map_err(self.err("list", &at))? {
                            sys::remove_at(d.as_fd(), &child).map_err(self.err("remove", &at))?;
                        }
                    }
                    Some(Kind::Dir) => {}
                    Some(_) => {
                        sys::remove_at(dp, &name).map_err(self.err("remove", &at))?;
                        sys::mkdir_at(dp, &name).map_err(self.err("mkdir", &at))?;
                    }
                    None => sys::mkdir_at(dp, &name).map_err(self.err("mkdir", &at))?,
                }
                self.copy_meta(src, &name, dp, &name, true)?;
                rel.push(name.clone());
                self.dir(sub.as_fd(), rel)?;
                rel.pop();
                self.times(src, &name, dp, &name)?;
                continue;
            }
            if existing.is_some() {
                sys::remove_at(dp, &name).map_err(self.err("remove", &at))?;
            }
            let key = (st.st_dev, st.st_ino);
            if st.st_nlink > 1
                && let Some(first) = self.links.get(&key)
            {
                let (fname, fparents) = first.split_last().expect("a linked path has a name");
                let fr: Vec<&OsStr> = fparents.iter().map(|s| s.as_os_str()).collect();
                let fdir = self.dst.dir(&fr, false).map_err(self.err("open", &at))?;
                sys::link_at(fdir.as_fd(), fname, dp, &name).map_err(self.err("link", &at))?;
                continue;
            }
            let perm = st.st_mode & 0o7777;
            if fmt == SFlag::S_IFREG {
                let mut from = sys::open_read_at(src, &name).map_err(self.err("open", &at))?;
                let mut to = sys::create_file_at(dp, &name).map_err(self.err("create", &at))?;
                std::io::copy(&mut from, &mut to).map_err(self.err("copy", &at))?;
            } else if fmt == SFlag::S_IFLNK {
                let target = sys::readlink_at(src, &name).map_err(self.err("readlink", &at))?;
                sys::symlink_at(&target, dp, &name).map_err(self.err("symlink", &at))?;
            } else {
                let (ma, mi) = (
                    nix::sys::stat::major(st.st_rdev) as u32,
                    nix::sys::stat::minor(st.st_rdev) as u32,
                );
                let node = match fmt {
                    SFlag::S_IFCHR => Node::Char(ma, mi),
                    SFlag::S_IFBLK => Node::Block(ma, mi),
                    SFlag::S_IFIFO => Node::Fifo,
                    _ => continue, // sockets are not image content
                };
                sys::mknod_at(dp, &name, node, perm).map_err(self.err("mknod", &at))?;
            }
            self.copy_meta(src, &name, dp, &name, fmt != SFlag::S_IFLNK)?;
            self.times(src, &name, dp, &name)?;
            if st.st_nlink > 1 {
                self.links.insert(key, at);
            }
        }
        Ok(())
    }

    /// Owner, mode (unless a symlink) and xattrs (not overlayfs' own).
    fn copy_meta(
        &self,
        src: BorrowedFd<'_>,
        sname: &OsStr,
        dst: BorrowedFd<'_>,
        dname: &OsStr,
        chmod: bool,
    ) -> Result<(), OciError> {
        let here = [sname.to_os_string()];
        let st = sys::stat_at(src, sname).map_err(self.err("stat", &here))?;
        if sys::is_root() {
            sys::chown_at(dst, dname, st.st_uid, st.st_gid).map_err(self.err("chown", &here))?;
        }
        if chmod {
            // The destination is a file or directory we just made (never a symlink).
            nix::sys::stat::fchmodat(
                dst,
                dname,
                nix::sys::stat::Mode::from_bits_truncate(st.st_mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| self.err("chmod", &here)(std::io::Error::from_raw_os_error(e as i32)))?;
        }
        for (k, v) in sys::xattrs_at(src, sname).map_err(self.err("xattrs", &here))? {
            if k.as_encoded_bytes().starts_with(b"trusted.overlay.") {
                continue;
            }
            if let Err(e) = sys::set_xattr_at(dst, dname, &k, &v) {
                tracing::warn!(xattr = ?k, error = %e, "xattr not copied");
            }
        }
        Ok(())
    }

    fn times(
        &self,
        src: BorrowedFd<'_>,
        sname: &OsStr,
        dst: BorrowedFd<'_>,
        dname: &OsStr,
    ) -> Result<(), OciError> {
        let here = [sname.to_os_string()];
        let st = sys::stat_at(src, sname).map_err(self.err("stat", &here))?;
        sys::set_times_at(dst, dname, st.st_mtime, st.st_mtime_nsec)
            .map_err(self.err("set times", &here))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::unpack::{UnpackOptions, unpack_layer};
    use std::fs;

    fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            if name.ends_with('/') {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
            } else {
                h.set_mode(0o644);
            }
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn whiteouts_and_opaque_dirs_apply_when_flattening() {
        let t = tempfile::tempdir().expect("tmp");
        let l1 = layer(&[
            ("a/", b""),
            ("a/x", b"1"),
            ("a/y", b"1"),
            ("keep/", b""),
            ("keep/k", b"1"),
            ("o/", b""),
            ("o/old", b"1"),
        ]);
        let l2 = layer(&[
            ("a/", b""),
            ("a/.wh.x", b""),
            ("a/z", b"2"),
            ("o/", b""),
            ("o/.wh..wh..opq", b""),
            ("o/new", b"2"),
            ("keep/k", b"2"),
        ]);
        let mut dirs = Vec::new();
        for (i, l) in [l1, l2].iter().enumerate() {
            let d = t.path().join(format!("l{i}"));
            fs::create_dir(&d).expect("dir");
            unpack_layer(&l[..], &d, &UnpackOptions::default()).expect("unpack");
            dirs.push(d);
        }
        let out = t.path().join("out");
        fs::create_dir(&out).expect("out");
        flatten(&dirs, &out).expect("flatten");
        assert!(!out.join("a/x").exists(), "whiteout removed a/x");
        assert_eq!(fs::read(out.join("a/y")).expect("a/y"), b"1");
        assert_eq!(fs::read(out.join("a/z")).expect("a/z"), b"2");
        assert_eq!(fs::read(out.join("keep/k")).expect("k"), b"2");
        assert!(!out.join("o/old").exists(), "opaque dir hid o/old");
        assert_eq!(fs::read(out.join("o/new")).expect("o/new"), b"2");
        assert_eq!(xattr::get(out.join("o"), OPAQUE_XATTR).expect("get"), None);
    }
}
