//! A directory tree → a tar stream, with everything a layer needs: numeric owners, all 12
//! mode bits, mtimes with nanoseconds (PAX `mtime`), xattrs (PAX `SCHILY.xattr.*`), hard
//! links, symlinks, device nodes and FIFOs. Unix sockets have no tar form and are left out.
//!
//! With [`Whiteouts::Oci`] an overlayfs upper directory becomes an OCI layer: a whiteout
//! (char device 0:0) is written as `.wh.NAME`, an opaque directory
//! (`trusted.overlay.opaque=y`) gets a `.wh..wh..opq` entry, and overlayfs's other private
//! xattrs (`trusted.overlay.origin`, `impure`, …) are dropped. The host reads it back with
//! `oci::unpack::unpack_layer`, which turns the OCI markers into overlayfs ones again, so the
//! upper directory on the host is the guest's, byte for byte.
//!
//! Entries come in name order, parents before children, so the same tree gives the same
//! stream.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// How overlayfs markers are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// An overlayfs upper: whiteouts and opaque directories become OCI markers.
    Oci,
    /// A plain tree: a char device 0:0 is a device, every xattr is kept.
    Keep,
}

const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// What was written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TarStats {
    /// Entries written (markers included).
    pub entries: u64,
    /// Bytes of file content.
    pub file_bytes: u64,
}

fn ctx(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Writes the tree under `root` (the root itself as `./`) to `out` as a tar stream.
pub fn write_tree(root: &Path, out: impl Write, whiteouts: Whiteouts) -> io::Result<TarStats> {
    let mut w = Walker {
        b: tar::Builder::new(out),
        whiteouts,
        links: HashMap::new(),
        stats: TarStats::default(),
    };
    let meta = fs::symlink_metadata(root).map_err(ctx(root))?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", root.display()),
        ));
    }
    w.entry(root, Path::new("."), &meta)?;
    w.children(root, Path::new(""))?;
    w.b.into_inner()?.flush()?;
    Ok(w.stats)
}

/// Writes the single file (or tree) `path` as the tar entry `name` (a directory's children
/// go under `name/`).
pub fn write_entry(path: &Path, name: &str, out: impl Write) -> io::Result<TarStats> {
    let mut w = Walker {
        b: tar::Builder::new(out),
        whiteouts: Whiteouts::Keep,
        links: HashMap::new(),
        stats: TarStats::default(),
    };
    w.add(path, Path::new(name))?;
    w.b.into_inner()?.flush()?;
    Ok(w.stats)
}

/// Appends `path` as `name` to an existing builder (several entries in one stream).
pub fn append_entry<W: Write>(b: &mut tar::Builder<W>, path: &Path, name: &str) -> io::Result<()> {
    let mut w = Walker {
        b,
        whiteouts: Whiteouts::Keep,
        links: HashMap::new(),
        stats: TarStats::default(),
    };
    w.add(path, Path::new(name))
}

struct Walker<B> {
    b: B,
    whiteouts: Whiteouts,
    /// (dev, ino) of files with more than one link → the name first written.
    links: HashMap<(u64, u64), PathBuf>,
    stats: TarStats,
}

/// The builder, owned or borrowed.
trait AsBuilder {
    type W: Write;
    fn builder(&mut self) -> &mut tar::Builder<Self::W>;
}

impl<W: Write> AsBuilder for tar::Builder<W> {
    type W = W;
    fn builder(&mut self) -> &mut tar::Builder<W> {
        self
    }
}

impl<W: Write> AsBuilder for &mut tar::Builder<W> {
    type W = W;
    fn builder(&mut self) -> &mut tar::Builder<W> {
        self
    }
}

impl<B: AsBuilder> Walker<B> {
    fn add(&mut self, path: &Path, name: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(path).map_err(ctx(path))?;
        self.entry(path, name, &meta)?;
        if meta.is_dir() {
            self.children(path, name)?;
        }
        Ok(())
    }

    fn children(&mut self, dir: &Path, prefix: &Path) -> io::Result<()> {
        let mut names: Vec<OsString> = fs::read_dir(dir)
            .map_err(ctx(dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(ctx(dir))?;
        names.sort();
        for n in names {
            let path = dir.join(&n);
            let rel = prefix.join(&n);
            let meta = fs::symlink_metadata(&path).map_err(ctx(&path))?;
            let ft = meta.file_type();
            if ft.is_socket() {
                continue;
            }
            if self.whiteouts == Whiteouts::Oci && ft.is_char_device() && meta.rdev() == 0 {
                let mut marker = OsString::from(".wh.");
                marker.push(&n);
                self.marker(&prefix.join(marker))?;
                continue;
            }
            self.entry(&path, &rel, &meta)?;
            if ft.is_dir() {
                self.children(&path, &rel)?;
            }
        }
        Ok(())
    }

    fn marker(&mut self, name: &Path) -> io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_mtime(0);
        self.stats.entries += 1;
        self.b.builder().append_data(&mut h, name, io::empty())
    }

    fn entry(&mut self, path: &Path, name: &Path, meta: &fs::Metadata) -> io::Result<()> {
        let ft = meta.file_type();
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if meta.mtime_nsec() != 0 || meta.mtime() < 0 {
            pax.push((
                "mtime".into(),
                format!("{}.{:09}", meta.mtime(), meta.mtime_nsec()).into_bytes(),
            ));
        }
        let mut opaque = false;
        if !ft.is_symlink() {
            for key in xattr::list(path).map_err(ctx(path))? {
                let k = key.as_bytes();
                if self.whiteouts == Whiteouts::Oci && k.starts_with(OVERLAY_XATTR_PREFIX) {
                    opaque |= k == OPAQUE_XATTR
                        && xattr::get(path, &key)
                            .map_err(ctx(path))?
                            .is_some_and(|v| v == b"y");
                    continue;
                }
                if let Some(v) = xattr::get(path, &key).map_err(ctx(path))? {
                    pax.push((format!("SCHILY.xattr.{}", String::from_utf8_lossy(k)), v));
                }
            }
        }
        let b = self.b.builder();
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(meta.mode() & 0o7777);
        h.set_uid(meta.uid() as u64);
        h.set_gid(meta.gid() as u64);
        h.set_mtime(meta.mtime().max(0) as u64);
        h.set_size(0);
        self.stats.entries += 1;
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, name, io::empty())?;
            if opaque {
                self.marker(&name.join(".wh..wh..opq"))?;
            }
            return Ok(());
        }
        if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(path).map_err(ctx(path))?;
            return b.append_link(&mut h, name, &target);
        }
        if meta.nlink() > 1 {
            let id = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&id) {
                h.set_entry_type(tar::EntryType::Link);
                return b.append_link(&mut h, name, first);
            }
            self.links.insert(id, name.to_path_buf());
        }
        if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(meta.len());
            let f = fs::File::open(path).map_err(ctx(path))?;
            self.stats.file_bytes += meta.len();
            // A file that shrinks while it is read would corrupt the stream: read exactly
            // its size, padding with zeros.
            let len = meta.len();
            let r = io::Read::take(io::Read::chain(io::Read::take(f, len), io::repeat(0)), len);
            return b.append_data(&mut h, name, r);
        }
        let (kind, dev) = if ft.is_char_device() {
            (tar::EntryType::Char, Some(meta.rdev()))
        } else if ft.is_block_device() {
            (tar::EntryType::Block, Some(meta.rdev()))
        } else {
            (tar::EntryType::Fifo, None)
        };
        h.set_entry_type(kind);
        if let Some(rdev) = dev {
            h.set_device_major(libc::major(rdev))?;
            h.set_device_minor(libc::minor(rdev))?;
        }
        b.append_data(&mut h, name, io::empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entries(bytes: &[u8]) -> Vec<(String, tar::EntryType)> {
        let mut a = tar::Archive::new(bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                    e.header().entry_type(),
                )
            })
            .collect()
    }

    #[test]
    fn tree_is_written_in_name_order_with_links_and_modes() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        fs::create_dir(r.join("b")).unwrap();
        fs::write(r.join("b/z"), b"zz").unwrap();
        fs::write(r.join("a"), b"hello").unwrap();
        fs::set_permissions(r.join("a"), fs::Permissions::from_mode(0o4711)).unwrap();
        fs::hard_link(r.join("a"), r.join("c")).unwrap();
        std::os::unix::fs::symlink("/nowhere", r.join("d")).unwrap();
        let mut out = Vec::new();
        let stats = write_tree(r, &mut out, Whiteouts::Keep).unwrap();
        assert_eq!(stats.file_bytes, 7);
        let e = entries(&out);
        let names: Vec<&str> = e.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [".", "a", "b", "b/z", "c", "d"]);
        assert_eq!(e[4].1, tar::EntryType::Link);
        assert_eq!(e[5].1, tar::EntryType::Symlink);
        let mut a = tar::Archive::new(&out[..]);
        let first = a.entries().unwrap().nth(1).unwrap().unwrap();
        assert_eq!(first.header().mode().unwrap(), 0o4711);
    }

    #[test]
    fn a_single_file_becomes_one_named_entry() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("f"), b"x").unwrap();
        let mut out = Vec::new();
        write_entry(&t.path().join("f"), "m0", &mut out).unwrap();
        let e = entries(&out);
        assert_eq!(e, vec![("m0".to_string(), tar::EntryType::Regular)]);
    }
}
