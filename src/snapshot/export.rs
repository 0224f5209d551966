//! A disk → a tar of its root tree, read in-process (no mount, no root): numeric owners, all
//! mode bits, mtimes with nanoseconds (PAX `mtime`), xattrs (PAX `SCHILY.xattr.*`), symlinks,
//! hard links, device nodes and FIFOs. Unix sockets have no tar form and are left out, as GNU
//! tar does; so is the file system's own empty `/lost+found`.

use super::SnapshotError;
use mkext4::reader::Fs;
use mkext4::spec::Inode;
use mkext4::spec::inode::FileType;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportSummary {
    /// Tar entries written.
    pub entries: u64,
    /// Unix sockets left out.
    pub sockets_skipped: u64,
}

const ROOT_INO: u32 = 2;

/// Writes the tree of the ext4 image `disk` as a tar to `out` (atomically: a temp file renamed
/// into place).
pub fn export(disk: &Path, out: &Path) -> Result<ExportSummary, SnapshotError> {
    let rd = |reason: String| SnapshotError::ReadDisk {
        path: disk.to_path_buf(),
        reason,
    };
    let file = File::open(disk).map_err(|e| rd(e.to_string()))?;
    let fs = Fs::open(file).map_err(|e| rd(e.to_string()))?;
    let wt = |source| SnapshotError::WriteTar {
        path: out.to_path_buf(),
        source,
    };
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(wt)?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(tmp.as_file()));
    let mut summary = ExportSummary::default();
    let mut links: HashMap<u32, String> = HashMap::new();
    // Depth-first, entries sorted by name, parents before children.
    let mut stack: Vec<(u32, String)> = vec![(ROOT_INO, String::new())];
    while let Some((ino, path)) = stack.pop() {
        let inode = fs.inode(ino).map_err(|e| rd(e.to_string()))?;
        let name = if path.is_empty() {
            "./".to_string()
        } else {
            path.clone()
        };
        let ft = inode.file_type();
        match ft {
            FileType::Dir => {
                append(
                    &fs,
                    &mut b,
                    ino,
                    &inode,
                    &format!("{}/", name.trim_end_matches('/')),
                    None,
                )
                .map_err(|e| err_of(e, disk, out))?;
                summary.entries += 1;
                let mut entries = fs.read_dir(ino).map_err(|e| rd(e.to_string()))?;
                entries.retain(|e| e.name != b"." && e.name != b"..");
                entries.sort_by(|a, b| b.name.cmp(&a.name));
                for e in entries {
                    let child = String::from_utf8_lossy(&e.name).into_owned();
                    if path.is_empty() && child == "lost+found" && is_empty_dir(&fs, e.inode) {
                        continue;
                    }
                    let p = if path.is_empty() {
                        child
                    } else {
                        format!("{path}/{child}")
                    };
                    stack.push((e.inode, p));
                }
            }
            FileType::Socket => summary.sockets_skipped += 1,
            FileType::Regular
            | FileType::Symlink
            | FileType::CharDev
            | FileType::BlockDev
            | FileType::Fifo
            | FileType::Unknown => {
                if inode.links_count > 1 {
                    if let Some(first) = links.get(&ino) {
                        let mut h = tar::Header::new_gnu();
                        h.set_entry_type(tar::EntryType::Link);
                        h.set_size(0);
                        h.set_mode(u32::from(inode.mode & 0o7777));
                        h.set_uid(u64::from(inode.uid));
                        h.set_gid(u64::from(inode.gid));
                        h.set_mtime(u64::from(inode.mtime));
                        b.append_link(&mut h, &name, first).map_err(wt)?;
                        summary.entries += 1;
                        continue;
                    }
                    links.insert(ino, name.clone());
                }
                if ft == FileType::Unknown {
                    return Err(rd(format!("inode {ino} at {name} has an unknown type")));
                }
                append(&fs, &mut b, ino, &inode, &name, None).map_err(|e| err_of(e, disk, out))?;
                summary.entries += 1;
            }
        }
    }
    b.into_inner().and_then(|mut w| w.flush()).map_err(wt)?;
    tmp.as_file().sync_all().map_err(wt)?;
    tmp.persist(out).map_err(|e| wt(e.error))?;
    Ok(summary)
}

enum ExportError {
    Disk(String),
    Tar(std::io::Error),
}

fn err_of(e: ExportError, disk: &Path, out: &Path) -> SnapshotError {
    match e {
        ExportError::Disk(reason) => SnapshotError::ReadDisk {
            path: disk.to_path_buf(),
            reason,
        },
        ExportError::Tar(source) => SnapshotError::WriteTar {
            path: out.to_path_buf(),
            source,
        },
    }
}

fn is_empty_dir(fs: &Fs<File>, ino: u32) -> bool {
    fs.read_dir(ino)
        .map(|es| es.iter().all(|e| e.name == b"." || e.name == b".."))
        .unwrap_or(false)
}

/// One entry: a PAX header with xattrs and the exact mtime, then the entry itself.
fn append<W: Write>(
    fs: &Fs<File>,
    b: &mut tar::Builder<W>,
    ino: u32,
    inode: &Inode,
    name: &str,
    _unused: Option<()>,
) -> Result<(), ExportError> {
    let disk = |e: mkext4::Error| ExportError::Disk(e.to_string());
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let nanos = inode.mtime_extra >> 2;
    let secs = i64::from(inode.mtime as i32) + (i64::from(inode.mtime_extra & 3) << 32);
    if nanos != 0 {
        pax.push(("mtime".into(), format!("{secs}.{nanos:09}").into_bytes()));
    }
    for x in fs.xattrs(ino).map_err(disk)? {
        if let Some(full) = x.full_name() {
            let key = format!("SCHILY.xattr.{}", String::from_utf8_lossy(&full));
            pax.push((key, x.value));
        }
    }
    if !pax.is_empty() {
        let body = pax_records(&pax);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        let short: String = name
            .chars()
            .rev()
            .take(80)
            .collect::<String>()
            .chars()
            .rev()
            .collect();
        h.set_path(format!("PaxHeaders/{}", short.trim_start_matches('/')))
            .or_else(|_| h.set_path("PaxHeaders/entry"))
            .map_err(ExportError::Tar)?;
        h.set_cksum();
        b.append(&h, body.as_slice()).map_err(ExportError::Tar)?;
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(u32::from(inode.mode & 0o7777));
    h.set_uid(u64::from(inode.uid));
    h.set_gid(u64::from(inode.gid));
    h.set_mtime(secs.max(0) as u64);
    h.set_size(0);
    match inode.file_type() {
        FileType::Dir => {
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, name, std::io::empty())
                .map_err(ExportError::Tar)
        }
        FileType::Regular => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(inode.size);
            let extents = fs.extents(ino, inode).map_err(disk)?;
            let r = InodeReader {
                fs,
                inode,
                extents: &extents,
                pos: 0,
            };
            b.append_data(&mut h, name, r).map_err(ExportError::Tar)
        }
        FileType::Symlink => {
            h.set_entry_type(tar::EntryType::Symlink);
            let t = fs.symlink_target(ino).map_err(disk)?;
            let t = String::from_utf8_lossy(&t).into_owned();
            b.append_link(&mut h, name, t).map_err(ExportError::Tar)
        }
        FileType::CharDev | FileType::BlockDev => {
            let (major, minor) = inode.dev_numbers().unwrap_or((0, 0));
            h.set_entry_type(if inode.file_type() == FileType::CharDev {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            });
            h.set_device_major(major).map_err(ExportError::Tar)?;
            h.set_device_minor(minor).map_err(ExportError::Tar)?;
            b.append_data(&mut h, name, std::io::empty())
                .map_err(ExportError::Tar)
        }
        FileType::Fifo => {
            h.set_entry_type(tar::EntryType::Fifo);
            b.append_data(&mut h, name, std::io::empty())
                .map_err(ExportError::Tar)
        }
        FileType::Socket | FileType::Unknown => Ok(()),
    }
}

/// PAX extended-header records: `"<len> <key>=<value>\n"`, where len counts itself.
fn pax_records(recs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in recs {
        let rest = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

struct InodeReader<'a> {
    fs: &'a Fs<File>,
    inode: &'a Inode,
    extents: &'a [mkext4::reader::FileExtent],
    pos: u64,
}

impl Read for InodeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self
            .fs
            .read_file_at(self.inode, self.extents, self.pos, buf)
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        let r = pax_records(&[("mtime".into(), b"1.5".to_vec())]);
        assert_eq!(r, b"13 mtime=1.5\n");
        let long = pax_records(&[("k".into(), vec![b'v'; 95])]);
        assert!(
            long.starts_with(b"102 k="),
            "{}",
            String::from_utf8_lossy(&long)
        );
        assert_eq!(long.len(), 102);
    }
}
