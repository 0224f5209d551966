//! A [`Tree`] → a sparse, reproducible ext4 image, hashed while it is written.
//!
//! Reproducibility: the image is a function of the tree alone. The UUID and the htree hash seed
//! are taken from a sha256 of the tree's manifest (every name, type, owner, mode, mtime, size,
//! link target, device number and xattr, in walk order); file contents are not in the manifest,
//! so that the identity is known before the first data byte is read. atime, ctime and crtime
//! are set to the mtime (a source's atime changes when it is read, so copying it would make
//! the next image differ); the superblock times are `SOURCE_DATE_EPOCH` when given, else the
//! newest mtime. With an epoch, newer mtimes are clamped to it.
//!
//! The digest ([`super::digest`]: SHA-256 over each 4 MiB block's SHA-256) is of the whole disk
//! file, holes included, computed in the same pass: mkext4 emits every metadata byte first and
//! then file data at ascending offsets, so the hasher keeps the out-of-order metadata (a few MB)
//! until the data before it has streamed by. A hole of whole blocks costs one update.

use super::digest::BlockDigest;
use super::tree::{Data, Dir, Kind, Meta, Node, Source, Tree};
use super::{MAX_DISK_MB, SnapshotError};
use mkext4::{FsBuilder, InodeCount, InodeHandle, RegionSink, SparseSeg, SpecialKind};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// How to write the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Size of the disk in MiB.
    pub disk_mb: u64,
    /// `SOURCE_DATE_EPOCH`: superblock time, and the newest mtime allowed.
    pub epoch: Option<i64>,
}

/// What a written disk is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The block digest of the whole file ([`super::digest`]), lowercase hex.
    pub sha256: String,
    /// Bytes allocated on the host (the file is sparse).
    pub size_bytes: u64,
    /// Apparent size in bytes (`disk_mb` MiB).
    pub disk_bytes: u64,
}

/// A tree laid out on a disk of a given size: every metadata byte is decided, no byte is
/// written yet. Making one is where a tree that does not fit is found.
pub struct Prepared {
    layout: mkext4::Layout,
    fills: Fills,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("image_len", &self.layout.image_len())
            .field("files", &self.fills.len())
            .finish()
    }
}

/// Lays `tree` out on a disk of `opts.disk_mb` MiB; a tree that does not fit is
/// [`SnapshotError::TooSmall`] with the size it needs.
pub fn prepare(tree: &Tree, opts: WriteOptions) -> Result<Prepared, SnapshotError> {
    if opts.disk_mb == 0 || opts.disk_mb > MAX_DISK_MB {
        return Err(SnapshotError::DiskSize(opts.disk_mb));
    }
    match seal(tree, opts) {
        Ok((layout, fills)) => Ok(Prepared { layout, fills }),
        Err(e) => Err(too_small(tree, opts).unwrap_or(e)),
    }
}

/// Writes `tree` as an ext4 image of `opts.disk_mb` MiB to `out` (created or truncated),
/// synced to disk before this returns. On error `out` may hold a partial image; the caller
/// removes it.
pub fn write(tree: &Tree, opts: WriteOptions, out: &Path) -> Result<DiskInfo, SnapshotError> {
    write_prepared(tree, prepare(tree, opts)?, out)
}

/// Writes a prepared layout of `tree` to `out`, as [`write`].
pub fn write_prepared(
    tree: &Tree,
    prepared: Prepared,
    out: &Path,
) -> Result<DiskInfo, SnapshotError> {
    write_inner(tree, prepared, out, true)
}

/// Writes the same image as [`write`] without computing its sha256 (`DiskInfo::sha256` is
/// empty): for measuring what filling a disk costs apart from hashing it (`cargo xtask bench
/// snapshot`). A snapshot always uses [`write`].
pub fn write_without_digest(
    tree: &Tree,
    opts: WriteOptions,
    out: &Path,
) -> Result<DiskInfo, SnapshotError> {
    write_inner(tree, prepare(tree, opts)?, out, false)
}

fn write_inner(
    tree: &Tree,
    prepared: Prepared,
    out: &Path,
    digest: bool,
) -> Result<DiskInfo, SnapshotError> {
    let Prepared { layout, fills } = prepared;
    let store = |step, source| SnapshotError::Store {
        step,
        path: out.to_path_buf(),
        source,
    };
    let file = File::create(out).map_err(|e| store("create", e))?;
    file.set_len(layout.image_len())
        .map_err(|e| store("create", e))?;
    let mut sink = HashingSink::new(&file, layout.image_len(), digest);
    let mut w = layout.writer(&mut sink)?;
    let tar = match &tree.source {
        Source::Tar(p) => Some(File::open(p).map_err(|source| SnapshotError::ReadTree {
            path: p.clone(),
            source,
        })?),
        Source::Dir(_) => None,
    };
    for fill in &fills {
        let fill_err = |source| SnapshotError::Fill {
            path: match &fill.data {
                Data::Path(p) => p.display().to_string(),
                Data::TarRange { offset } => format!("tar entry at byte {offset}"),
            },
            source,
        };
        match (&fill.data, &tar) {
            (Data::Path(p), _) => {
                let f = File::open(p).map_err(|source| SnapshotError::ReadTree {
                    path: p.clone(),
                    source,
                })?;
                match &fill.segments {
                    Some(segs) => {
                        let mut r = SegmentReader::new(&f, segs);
                        w.fill(fill.handle, &mut r).map_err(fill_err)?;
                    }
                    None => {
                        let mut r = RangeReader::new(&f, 0, fill.len);
                        w.fill(fill.handle, &mut r).map_err(fill_err)?;
                    }
                }
            }
            (Data::TarRange { offset }, Some(t)) => {
                let mut r = RangeReader::new(t, *offset, fill.len);
                w.fill(fill.handle, &mut r).map_err(fill_err)?;
            }
            (Data::TarRange { .. }, None) => {
                return Err(SnapshotError::Unsupported {
                    path: "/".into(),
                    reason: "a tar range in a tree not read from a tar".into(),
                });
            }
        }
    }
    w.finish()?;
    let sha256 = sink.finish().map_err(|e| store("hash", e))?;
    file.sync_all().map_err(|e| store("sync", e))?;
    let md = file.metadata().map_err(|e| store("stat", e))?;
    Ok(DiskInfo {
        sha256,
        size_bytes: md.blocks() * 512,
        disk_bytes: md.len(),
    })
}

/// The UUID and hash seed of a tree: sha256 of its canonical manifest.
pub fn identity(tree: &Tree, epoch: Option<i64>) -> ([u8; 16], [u32; 4]) {
    let mut h = Sha256::new();
    h.update(b"kiln-ext4-manifest-v1\0");
    fn meta(h: &mut Sha256, m: &Meta) {
        h.update(m.mode.to_le_bytes());
        h.update(m.uid.to_le_bytes());
        h.update(m.gid.to_le_bytes());
        h.update(m.mtime.0.to_le_bytes());
        h.update(m.mtime.1.to_le_bytes());
    }
    fn xattrs(h: &mut Sha256, x: &[(String, Vec<u8>)]) {
        h.update((x.len() as u64).to_le_bytes());
        for (k, v) in x {
            h.update((k.len() as u64).to_le_bytes());
            h.update(k.as_bytes());
            h.update((v.len() as u64).to_le_bytes());
            h.update(v);
        }
    }
    // Inodes are named by the order of their first name in the walk, not by their index in
    // the tree, so a directory and a tar of the same tree (read in different orders) agree.
    fn dir(
        h: &mut Sha256,
        tree: &Tree,
        d: &Dir,
        epoch: Option<i64>,
        ordinal: &mut std::collections::HashMap<usize, u64>,
    ) {
        meta(h, &clamped(&d.meta, epoch));
        xattrs(h, &d.xattrs);
        h.update((d.entries.len() as u64).to_le_bytes());
        for (name, node) in &d.entries {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            match node {
                Node::Dir(i) => {
                    h.update(b"d");
                    dir(h, tree, &tree.dirs[*i], epoch, ordinal);
                }
                Node::Link(i) => {
                    let ino = &tree.inodes[*i];
                    let next = ordinal.len() as u64;
                    let n = *ordinal.entry(*i).or_insert(next);
                    h.update(b"i");
                    h.update(n.to_le_bytes());
                    meta(h, &clamped(&ino.meta, epoch));
                    xattrs(h, &ino.xattrs);
                    match &ino.kind {
                        Kind::File { size, segments, .. } => {
                            h.update(b"f");
                            h.update(size.to_le_bytes());
                            for (o, l) in segments.iter().flatten() {
                                h.update(o.to_le_bytes());
                                h.update(l.to_le_bytes());
                            }
                        }
                        Kind::Symlink { target } => {
                            h.update(b"l");
                            h.update((target.len() as u64).to_le_bytes());
                            h.update(target.as_bytes());
                        }
                        Kind::Char { major, minor } => {
                            h.update(b"c");
                            h.update(major.to_le_bytes());
                            h.update(minor.to_le_bytes());
                        }
                        Kind::Block { major, minor } => {
                            h.update(b"b");
                            h.update(major.to_le_bytes());
                            h.update(minor.to_le_bytes());
                        }
                        Kind::Fifo => h.update(b"p"),
                        Kind::Socket => h.update(b"s"),
                    }
                }
            }
        }
    }
    h.update(epoch.unwrap_or(i64::MIN).to_le_bytes());
    dir(&mut h, tree, &tree.dirs[0], epoch, &mut Default::default());
    let d = h.finalize();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&d[..16]);
    // An RFC 4122 version-4 layout, so tools that check UUIDs take it.
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let mut seed = [0u32; 4];
    for (i, s) in seed.iter_mut().enumerate() {
        let b = &d[16 + 4 * i..20 + 4 * i];
        *s = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    (uuid, seed)
}

fn clamped(m: &Meta, epoch: Option<i64>) -> Meta {
    match epoch {
        Some(e) if m.mtime.0 > e || (m.mtime.0 == e && m.mtime.1 > 0) => Meta {
            mtime: (e, 0),
            ..*m
        },
        Some(_) | None => *m,
    }
}

fn ext4_meta(m: &Meta, epoch: Option<i64>) -> mkext4::Meta {
    let m = clamped(m, epoch);
    // atime/ctime/crtime default to the mtime (see the module docs).
    mkext4::Meta::new(m.mode, m.uid, m.gid, m.mtime)
}

/// One file to copy into the image, in declaration order (so data streams at ascending offsets).
struct Fill {
    handle: InodeHandle,
    data: Data,
    /// Bytes the writer takes: the size, or the sum of the data segments of a sparse file.
    len: u64,
    segments: Option<Vec<(u64, u64)>>,
}

type Fills = Vec<Fill>;

/// Declares the tree and seals the layout at `opts.disk_mb`.
fn seal(tree: &Tree, opts: WriteOptions) -> Result<(mkext4::Layout, Fills), SnapshotError> {
    let (uuid, seed) = identity(tree, opts.epoch);
    let size_bytes = opts.disk_mb << 20;
    let epoch = opts.epoch.unwrap_or_else(|| tree.newest_mtime());
    let mut o = mkext4::Options::new(size_bytes, uuid, epoch);
    o.hash_seed = seed;
    o.label = Some("rootfs".into());
    // mke2fs's ratio (one inode per 16 KiB), but never fewer than the tree needs plus room to
    // grow, so a tree of many small files fits any disk its data fits.
    let names = (tree.dirs.len() + tree.inodes.len()) as u64;
    let auto = size_bytes / 16384;
    let want = auto.max(names + names / 4 + 1024).min(u32::MAX as u64 / 2);
    o.inodes = InodeCount::Exact(want as u32);
    let mut b = FsBuilder::new(o)?;
    let root = &tree.dirs[0];
    b.set_meta(mkext4::ROOT, ext4_meta(&root.meta, opts.epoch))?;
    for (k, v) in &root.xattrs {
        b.set_xattr(mkext4::ROOT, k, v)?;
    }
    let mut handles: Vec<Option<InodeHandle>> = vec![None; tree.inodes.len()];
    let mut fills = Vec::new();
    declare_dir(
        &mut b,
        tree,
        mkext4::ROOT,
        root,
        opts.epoch,
        &mut handles,
        &mut fills,
    )?;
    let layout = b.seal()?;
    Ok((layout, fills))
}

fn declare_dir(
    b: &mut FsBuilder,
    tree: &Tree,
    at: InodeHandle,
    dir: &Dir,
    epoch: Option<i64>,
    handles: &mut [Option<InodeHandle>],
    fills: &mut Fills,
) -> Result<(), SnapshotError> {
    for (name, node) in &dir.entries {
        match node {
            Node::Dir(i) => {
                let d = &tree.dirs[*i];
                let h = b.mkdir(at, name, ext4_meta(&d.meta, epoch))?;
                for (k, v) in &d.xattrs {
                    b.set_xattr(h, k, v)?;
                }
                declare_dir(b, tree, h, d, epoch, handles, fills)?;
            }
            Node::Link(i) => {
                if let Some(h) = handles[*i] {
                    b.hardlink(at, name, h)?;
                    continue;
                }
                let ino = &tree.inodes[*i];
                let meta = ext4_meta(&ino.meta, epoch);
                let h = match &ino.kind {
                    Kind::File {
                        size,
                        data,
                        segments,
                    } => {
                        let h = match segments {
                            Some(segs) => {
                                let mut list = Vec::new();
                                let mut at_off = 0u64;
                                for (o, l) in segs {
                                    if *o > at_off {
                                        list.push(SparseSeg::Hole(o - at_off));
                                    }
                                    list.push(SparseSeg::Data(*l));
                                    at_off = o + l;
                                }
                                if at_off < *size {
                                    list.push(SparseSeg::Hole(size - at_off));
                                }
                                b.file_sparse(at, name, meta, &list)?
                            }
                            None => b.file(at, name, meta, *size)?,
                        };
                        if let Some(d) = data {
                            let filled = match segments {
                                Some(segs) => segs.iter().map(|(_, l)| l).sum(),
                                None => *size,
                            };
                            if filled > 0 {
                                fills.push(Fill {
                                    handle: h,
                                    data: d.clone(),
                                    len: filled,
                                    segments: segments.clone(),
                                });
                            }
                        }
                        h
                    }
                    Kind::Symlink { target } => b.symlink(at, name, target, meta)?,
                    Kind::Char { major, minor } => b.mknod(
                        at,
                        name,
                        meta,
                        SpecialKind::Char {
                            major: *major,
                            minor: *minor,
                        },
                    )?,
                    Kind::Block { major, minor } => b.mknod(
                        at,
                        name,
                        meta,
                        SpecialKind::Block {
                            major: *major,
                            minor: *minor,
                        },
                    )?,
                    Kind::Fifo => b.mknod(at, name, meta, SpecialKind::Fifo)?,
                    Kind::Socket => b.mknod(at, name, meta, SpecialKind::Socket)?,
                };
                for (k, v) in &ino.xattrs {
                    b.set_xattr(h, k, v)?;
                }
                handles[*i] = Some(h);
            }
        }
    }
    Ok(())
}

/// When the tree does not fit `opts.disk_mb`, the error that says the size it needs; `None`
/// when it fails for another reason (it would not fit any size either).
fn too_small(tree: &Tree, opts: WriteOptions) -> Option<SnapshotError> {
    let fits = |mb: u64| {
        seal(
            tree,
            WriteOptions {
                disk_mb: mb,
                ..opts
            },
        )
        .is_ok()
    };
    let mut lo = opts.disk_mb; // does not fit
    let mut hi = opts.disk_mb.max(1);
    loop {
        hi = hi.saturating_mul(2).min(MAX_DISK_MB);
        if fits(hi) {
            break;
        }
        if hi == MAX_DISK_MB {
            return None;
        }
        lo = hi;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(SnapshotError::TooSmall {
        disk_mb: opts.disk_mb,
        needed_mb: hi,
    })
}

/// Reads `len` bytes of `file` from `offset` with positioned reads (no shared cursor).
struct RangeReader<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
}

impl<'f> RangeReader<'f> {
    fn new(file: &'f File, offset: u64, len: u64) -> Self {
        RangeReader {
            file,
            pos: offset,
            end: offset + len,
        }
    }
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads the data segments of a sparse file, one after the other.
struct SegmentReader<'f> {
    file: &'f File,
    segs: std::iter::Copied<std::slice::Iter<'f, (u64, u64)>>,
    cur: Option<RangeReader<'f>>,
}

impl<'f> SegmentReader<'f> {
    fn new(file: &'f File, segs: &'f [(u64, u64)]) -> Self {
        SegmentReader {
            file,
            segs: segs.iter().copied(),
            cur: None,
        }
    }
}

impl Read for SegmentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(r) = &mut self.cur {
                let n = r.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
            }
            match self.segs.next() {
                Some((o, l)) => self.cur = Some(RangeReader::new(self.file, o, l)),
                None => return Ok(0),
            }
        }
    }
}

enum Region {
    Bytes(Vec<u8>),
    Zeros(u64),
}

/// Writes regions into the (pre-sized, sparse) file and hashes the file's bytes in order.
struct HashingSink<'f> {
    file: &'f File,
    len: u64,
    /// False only when measuring the write alone.
    digest: bool,
    hasher: BlockDigest,
    cursor: u64,
    queued: BTreeMap<u64, Region>,
}

impl<'f> HashingSink<'f> {
    fn new(file: &'f File, len: u64, digest: bool) -> Self {
        HashingSink {
            file,
            len,
            digest,
            hasher: BlockDigest::new(),
            cursor: 0,
            queued: BTreeMap::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(entry) = self.queued.first_entry() {
            if *entry.key() != self.cursor {
                break;
            }
            match entry.remove() {
                Region::Bytes(b) => {
                    self.hasher.update(&b);
                    self.cursor += b.len() as u64;
                }
                Region::Zeros(n) => {
                    self.hasher.zeros(n);
                    self.cursor += n;
                }
            }
        }
    }

    fn check(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if offset < self.cursor || offset + len > self.len {
            return Err(std::io::Error::other(format!(
                "region [{offset}, {}) overlaps what is written or passes the end",
                offset + len
            )));
        }
        Ok(())
    }

    /// The digest of the whole image; an error if some byte was never emitted.
    fn finish(self) -> std::io::Result<String> {
        if !self.digest {
            return Ok(String::new());
        }
        if self.cursor != self.len || !self.queued.is_empty() {
            return Err(std::io::Error::other(format!(
                "the image writer left bytes unwritten from offset {}",
                self.cursor
            )));
        }
        Ok(self.hasher.finish())
    }
}

impl RegionSink for HashingSink<'_> {
    fn data(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.check(offset, bytes.len() as u64)?;
        self.file.write_all_at(bytes, offset)?;
        if !self.digest {
            return Ok(());
        }
        if offset == self.cursor {
            self.hasher.update(bytes);
            self.cursor += bytes.len() as u64;
            self.drain();
        } else {
            self.queued.insert(offset, Region::Bytes(bytes.to_vec()));
        }
        Ok(())
    }

    fn zeros(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check(offset, len)?;
        // The file was extended with set_len, so zeros are already there (as holes).
        if !self.digest {
            return Ok(());
        }
        if offset == self.cursor {
            self.hasher.zeros(len);
            self.cursor += len;
            self.drain();
        } else {
            self.queued.insert(offset, Region::Zeros(len));
        }
        Ok(())
    }
}
