//! The local store under `KILN_HOME`: blobs by digest (`blobs-v1/sha256/HEX`, the OCI layout
//! of blobs), each layer unpacked once into `layers-v1/sha256/DIFF_ID/` and shared by every
//! image and build, and image records (`bases-v1/images/*.json`: reference → manifest, config,
//! layers). Writes go to `tmp/` and are renamed in; one `syncfs` makes a layer durable.
//! Two processes pulling at once are safe: a pull holds the store lock shared and each layer
//! is made under its own exclusive lock, `gc` holds the store lock exclusively.

use super::config::{self, Config, Layer};
use super::digest::{Digest, HashReader, Hasher};
use super::error::OciError;
use super::reference::Reference;
use super::sys;
use super::unpack::{UnpackOptions, UnpackStats, unpack_layer};
use crate::home::Home;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Where an image in the store came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Pulled from a registry.
    Registry,
    /// `kiln base import`.
    Import,
    /// Made on this machine (`kiln/…`).
    Builtin,
}

/// One image the store knows by name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageRecord {
    /// The canonical reference it is known by (`docker.io/library/alpine:3.20`).
    pub reference: String,
    /// What the reference resolved to: an index's digest for multi-arch images.
    pub digest: Digest,
    /// The linux/amd64 manifest's digest (equal to `digest` for single-arch images).
    pub platform_digest: Digest,
    /// `linux/amd64`.
    pub platform: String,
    /// The config blob.
    pub config: Digest,
    /// Layers, bottom to top.
    pub layers: Vec<Layer>,
    /// Where it came from.
    pub source: Source,
    /// Seconds since the epoch.
    pub created_at: u64,
}

impl ImageRecord {
    /// The sum of the layer blobs' sizes.
    pub fn size_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// An image that is fully present: record, parsed config and layer directories.
#[derive(Debug, Clone)]
pub struct LocalImage {
    /// The record.
    pub record: ImageRecord,
    /// The config (ENV, CMD, … in the IR's shape; diff_ids).
    pub config: Config,
    /// The unpacked layers, bottom to top (overlayfs wants them top first: reverse them).
    pub layer_dirs: Vec<PathBuf>,
}

/// What `gc` must keep besides what image records reference (the builder's own layers).
#[derive(Debug, Clone, Default)]
pub struct GcRoots {
    /// Blobs to keep.
    pub blobs: HashSet<Digest>,
    /// Layer directories (by diff_id) to keep.
    pub layers: HashSet<Digest>,
}

/// What `gc` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Blobs removed.
    pub blobs_removed: u64,
    /// Layer directories removed.
    pub layers_removed: u64,
    /// Leftovers of interrupted pulls removed.
    pub temp_removed: u64,
    /// Bytes freed (apparent sizes).
    pub bytes_freed: u64,
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// The local base-image store.
#[derive(Debug, Clone)]
pub struct Store {
    blobs: PathBuf,
    layers: PathBuf,
    images: PathBuf,
    locks: PathBuf,
    tmp: PathBuf,
    unpack: UnpackOptions,
}

fn mkdirs(p: &Path) -> Result<(), OciError> {
    fs::create_dir_all(p).map_err(OciError::io("create", p))
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// Opens (creating) the store in `home`. `KILN_MAX_LAYER_BYTES` sets the bomb limit.
    pub fn open(home: &Home) -> Result<Store, OciError> {
        let mut unpack = UnpackOptions::default();
        if let Some(max) = std::env::var(crate::envvars::KILN_MAX_LAYER_BYTES)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            unpack.max_bytes = max;
        }
        let s = Store {
            blobs: home.blobs()?.join("sha256"),
            layers: home.layers()?.join("sha256"),
            images: home.dir("bases-v1")?.join("images"),
            locks: home.dir("locks-v1")?,
            tmp: home.tmp()?,
            unpack,
        };
        for d in [&s.blobs, &s.layers, &s.images] {
            mkdirs(d)?;
        }
        Ok(s)
    }

    /// The unpack options in force (bomb limit, owners).
    pub fn unpack_options(&self) -> &UnpackOptions {
        &self.unpack
    }

    /// Changes the bomb limit (tests; `KILN_MAX_LAYER_BYTES` otherwise).
    pub fn set_max_layer_bytes(&mut self, max: u64) {
        self.unpack.max_bytes = max;
    }

    /// Scratch space on the store's file system.
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// Where blob `d` lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(d.hex())
    }

    /// Where the layer with diff_id `d` is unpacked.
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.layers.join(diff_id.hex())
    }

    /// True when blob `d` is stored.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// True when the layer is unpacked.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).is_dir()
    }

    /// Reads a (small) blob, checking its digest.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, OciError> {
        let p = self.blob_path(d);
        let bytes = fs::read(&p).map_err(OciError::io("read blob", &p))?;
        let actual = Digest::of(&bytes);
        if &actual != d {
            return Err(OciError::DigestMismatch {
                what: "stored blob",
                expected: d.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Stores `bytes` as a blob (atomically, durably); returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest, OciError> {
        let d = Digest::of(bytes);
        let p = self.blob_path(&d);
        if !p.is_file() {
            crate::fs::write_atomic(&p, bytes).map_err(OciError::io("write blob", &p))?;
        }
        Ok(d)
    }

    fn lock_at(&self, name: &str, shared: bool) -> Result<Lock, OciError> {
        mkdirs(&self.locks)?;
        let p = self.locks.join(name);
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&p)
            .map_err(OciError::io("open lock", &p))?;
        if shared { f.lock_shared() } else { f.lock() }.map_err(OciError::io("lock", &p))?;
        Ok(Lock { _file: f })
    }

    /// The store lock: shared for pulls and imports, exclusive for `gc`. Blocks.
    pub fn lock(&self, exclusive: bool) -> Result<Lock, OciError> {
        self.lock_at("store.lock", !exclusive)
    }

    /// The lock one layer is made under. Blocks.
    pub fn lock_layer(&self, diff_id: &Digest) -> Result<Lock, OciError> {
        self.lock_at(&format!("layer-{}.lock", diff_id.hex()), false)
    }

    /// The lock making one built-in base takes. Blocks.
    pub fn lock_name(&self, name: &str) -> Result<Lock, OciError> {
        self.lock_at(
            &format!("make-{}.lock", Digest::of(name.as_bytes()).hex()),
            false,
        )
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.images
            .join(format!("{}.json", Digest::of(key.as_bytes()).hex()))
    }

    /// The record key of a reference: the canonical reference, `REPO@DIGEST` when pinned.
    pub fn key(reference: &Reference) -> String {
        match reference.digest() {
            Some(d) => format!("{}@{d}", reference.repository()),
            None => reference.to_string(),
        }
    }

    /// Writes the record of an image (atomically; replaces one of the same reference).
    pub fn put_image(&self, rec: &ImageRecord) -> Result<(), OciError> {
        let p = self.record_path(&rec.reference);
        let json = serde_json::to_vec_pretty(rec).map_err(|e| OciError::Malformed {
            what: "image record".into(),
            detail: e.to_string(),
        })?;
        crate::fs::write_atomic(&p, &json).map_err(OciError::io("write image record", &p))
    }

    /// The record of `reference`, if any. A pinned digest also matches a tag's record of the
    /// same repository that resolved to it.
    pub fn image(&self, reference: &Reference) -> Result<Option<ImageRecord>, OciError> {
        let p = self.record_path(&Store::key(reference));
        match fs::read(&p) {
            Ok(b) => {
                return serde_json::from_slice(&b)
                    .map(Some)
                    .map_err(|e| OciError::Malformed {
                        what: format!("image record {}", p.display()),
                        detail: e.to_string(),
                    });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(OciError::io("read image record", &p)(e)),
        }
        let Some(d) = reference.digest() else {
            return Ok(None);
        };
        let repo = reference.repository();
        Ok(self.images()?.into_iter().find(|r| {
            (&r.digest == d || &r.platform_digest == d)
                && Reference::parse(&r.reference).is_ok_and(|x| x.repository() == repo)
        }))
    }

    /// Every image record, sorted by reference.
    pub fn images(&self) -> Result<Vec<ImageRecord>, OciError> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.images).map_err(OciError::io("list", &self.images))?;
        for e in rd {
            let e = e.map_err(OciError::io("list", &self.images))?;
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<ImageRecord>(&b).ok())
            {
                Some(r) => out.push(r),
                None => tracing::warn!(path = %p.display(), "unreadable image record skipped"),
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Removes the record of `reference`; blobs and layers stay until `gc`.
    pub fn remove_image(&self, reference: &Reference) -> Result<Option<ImageRecord>, OciError> {
        let Some(rec) = self.image(reference)? else {
            return Ok(None);
        };
        let p = self.record_path(&rec.reference);
        fs::remove_file(&p).map_err(OciError::io("remove image record", &p))?;
        crate::fs::sync_dir(&self.images).map_err(OciError::io("sync", &self.images))?;
        Ok(Some(rec))
    }

    /// The image `reference` if it is fully present (record, config, every layer).
    pub fn local(&self, reference: &Reference) -> Result<Option<LocalImage>, OciError> {
        let Some(record) = self.image(reference)? else {
            return Ok(None);
        };
        if !record.layers.iter().all(|l| self.has_layer(&l.diff_id))
            || !self.has_blob(&record.config)
        {
            return Ok(None);
        }
        let config = config::parse_config(&self.read_blob(&record.config)?, &record.reference)?;
        let layer_dirs = record
            .layers
            .iter()
            .map(|l| self.layer_dir(&l.diff_id))
            .collect();
        Ok(Some(LocalImage {
            record,
            config,
            layer_dirs,
        }))
    }

    /// Makes a layer from its blob bytes read from `input`: the blob is written (if `blob`)
    /// and unpacked (if `unpack`) in one pass, both hashed on the way; nothing is committed
    /// unless the blob's digest and size and the uncompressed diff_id all match `layer`.
    /// Call with the layer's lock held. gzip, zstd and plain tar are told apart by magic.
    pub fn ingest_layer(
        &self,
        input: impl Read,
        layer: &Layer,
        blob: bool,
        unpack: bool,
    ) -> Result<UnpackStats, OciError> {
        let blob_tmp = blob
            .then(|| {
                tempfile::Builder::new()
                    .prefix("oci-blob-")
                    .tempfile_in(&self.tmp)
            })
            .transpose()
            .map_err(OciError::io("create temp blob in", &self.tmp))?;
        let dir_tmp = unpack
            .then(|| {
                tempfile::Builder::new()
                    .prefix("oci-layer-")
                    .tempdir_in(&self.tmp)
            })
            .transpose()
            .map_err(OciError::io("create temp layer in", &self.tmp))?;
        let mut tee = Tee {
            inner: input,
            out: blob_tmp
                .as_ref()
                .map(|t| BufWriter::with_capacity(1 << 20, t.as_file())),
            hasher: Hasher::new(),
        };
        let started = std::time::Instant::now();
        let decoded = self.decode_and_unpack(&mut tee, layer, dir_tmp.as_ref().map(|d| d.path()));
        // Read to the end either way: a blob that does not match its digest explains a failed
        // unpack better than the unpack error does.
        let drained = io::copy(&mut tee, &mut io::sink());
        let (digest, len) = tee
            .finish()
            .map_err(OciError::io("write blob", &self.tmp))?;
        if len != layer.size {
            return Err(OciError::SizeMismatch {
                what: "layer",
                digest: layer.digest.clone(),
                expected: layer.size,
                actual: len,
            });
        }
        if digest != layer.digest {
            return Err(OciError::DigestMismatch {
                what: "layer",
                expected: layer.digest.clone(),
                actual: digest,
            });
        }
        let (stats, diff_id) = decoded?;
        drained.map_err(|e| self.read_error(layer, e))?;
        if diff_id != layer.diff_id {
            return Err(OciError::DigestMismatch {
                what: "uncompressed layer (diff_id)",
                expected: layer.diff_id.clone(),
                actual: diff_id,
            });
        }
        let unpacked = started.elapsed();
        self.commit_layer(blob_tmp, dir_tmp, layer)?;
        tracing::debug!(
            layer = %layer.digest,
            unpack_ms = unpacked.as_millis() as u64,
            commit_ms = (started.elapsed() - unpacked).as_millis() as u64,
            "layer stored"
        );
        Ok(stats)
    }

    fn read_error(&self, layer: &Layer, e: io::Error) -> OciError {
        OciError::Unpack {
            digest: layer.digest.clone(),
            source: if e.kind() == io::ErrorKind::FileTooLarge {
                super::unpack::UnpackError::TooLarge {
                    limit: self.unpack.max_bytes,
                }
            } else {
                super::unpack::UnpackError::Read(e)
            },
        }
    }

    /// Decompresses (told by magic) and unpacks into `dir` (if given); returns the diff_id.
    fn decode_and_unpack(
        &self,
        input: &mut impl Read,
        layer: &Layer,
        dir: Option<&Path>,
    ) -> Result<(UnpackStats, Digest), OciError> {
        let read_err = |e| self.read_error(layer, e);
        let mut magic = [0u8; 4];
        let got = read_up_to(input, &mut magic).map_err(read_err)?;
        let stream = BufReader::with_capacity(
            256 << 10,
            io::Cursor::new(magic[..got].to_vec()).chain(input),
        );
        let decoded: Box<dyn Read + '_> = match Compression::sniff(&magic[..got]) {
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(stream)),
            Compression::Zstd => Box::new(zstd::Decoder::with_buffer(stream).map_err(read_err)?),
            Compression::None => Box::new(stream),
        };
        // Buffered above the hash, so tar's 512-byte header reads do not each reach the
        // decompressor; every byte is still hashed once, on its way into the buffer.
        let mut tar =
            BufReader::with_capacity(512 << 10, HashReader::new(decoded, self.unpack.max_bytes));
        let stats = match dir {
            Some(d) => {
                unpack_layer(&mut tar, d, &self.unpack).map_err(|source| OciError::Unpack {
                    digest: layer.digest.clone(),
                    source,
                })?
            }
            None => UnpackStats::default(),
        };
        // The diff_id covers the whole stream, padding after the end-of-archive included.
        io::copy(&mut tar, &mut io::sink()).map_err(read_err)?;
        Ok((stats, tar.into_inner().finish().0))
    }

    /// Moves a verified blob and unpacked tree of `layer` into place (either may be absent):
    /// one `syncfs` makes the blob and every file of the tree durable, then the renames.
    pub fn commit_layer(
        &self,
        blob_tmp: Option<tempfile::NamedTempFile>,
        dir_tmp: Option<tempfile::TempDir>,
        layer: &Layer,
    ) -> Result<(), OciError> {
        if let Some(t) = &blob_tmp {
            use std::os::unix::fs::PermissionsExt;
            // Like every other blob (and an OCI layout's): readable, written once.
            t.as_file()
                .set_permissions(fs::Permissions::from_mode(0o644))
                .map_err(OciError::io("chmod", t.path()))?;
        }
        let tmp_fd = sys::Root::open(&self.tmp).map_err(OciError::io("open", &self.tmp))?;
        sys::syncfs(tmp_fd.fd()).map_err(OciError::io("sync", &self.tmp))?;
        if let Some(t) = blob_tmp {
            let dst = self.blob_path(&layer.digest);
            t.persist(&dst)
                .map_err(|e| OciError::io("store blob", &dst)(e.error))?;
            crate::fs::sync_dir(&self.blobs).map_err(OciError::io("sync", &self.blobs))?;
        }
        if let Some(d) = dir_tmp {
            let dst = self.layer_dir(&layer.diff_id);
            let src = d.keep();
            if let Err(e) = fs::rename(&src, &dst) {
                // Made meanwhile by a process that ignored the lock: keep theirs.
                let _ = fs::remove_dir_all(&src);
                if !dst.is_dir() {
                    return Err(OciError::io("store layer", &dst)(e));
                }
            }
            crate::fs::sync_dir(&self.layers).map_err(OciError::io("sync", &self.layers))?;
        }
        Ok(())
    }

    /// Writes `rec` as an OCI image layout in `dir` (blobs hard-linked where possible),
    /// tagged `tag`: what skopeo and umoci read (`oci:DIR:TAG`).
    pub fn export_layout(&self, rec: &ImageRecord, dir: &Path, tag: &str) -> Result<(), OciError> {
        let blobs = dir.join("blobs/sha256");
        mkdirs(&blobs)?;
        let mut wanted = vec![
            rec.digest.clone(),
            rec.platform_digest.clone(),
            rec.config.clone(),
        ];
        wanted.extend(rec.layers.iter().map(|l| l.digest.clone()));
        for d in &wanted {
            let (src, dst) = (self.blob_path(d), blobs.join(d.hex()));
            if dst.exists() {
                continue;
            }
            if fs::hard_link(&src, &dst).is_err() {
                fs::copy(&src, &dst).map_err(OciError::io("copy blob to", &dst))?;
            }
        }
        let top = self.read_blob(&rec.digest)?;
        let media_type = serde_json::from_slice::<serde_json::Value>(&top)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| super::client::OCI_MANIFEST.to_string());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": super::client::OCI_INDEX,
            "manifests": [{
                "mediaType": media_type,
                "digest": rec.digest,
                "size": top.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        let w = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            crate::fs::write_atomic(&p, bytes).map_err(OciError::io("write", &p))
        };
        w("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        w("index.json", index.to_string().as_bytes())
    }

    /// Removes blobs and layers no image record (nor `extra`) references, and leftovers of
    /// interrupted pulls. Takes the store lock exclusively, so it waits for running pulls.
    pub fn gc(&self, extra: &GcRoots) -> Result<GcReport, OciError> {
        let _lock = self.lock(true)?;
        let mut blobs = extra.blobs.clone();
        let mut layers = extra.layers.clone();
        for r in self.images()? {
            blobs.extend([
                r.digest.clone(),
                r.platform_digest.clone(),
                r.config.clone(),
            ]);
            for l in &r.layers {
                blobs.insert(l.digest.clone());
                layers.insert(l.diff_id.clone());
            }
        }
        let mut report = GcReport::default();
        let live = |set: &HashSet<Digest>, name: &str| {
            Digest::parse(&format!("sha256:{name}")).is_ok_and(|d| set.contains(&d))
        };
        for (dir, set, count) in [
            (&self.blobs, &blobs, &mut report.blobs_removed),
            (&self.layers, &layers, &mut report.layers_removed),
        ] {
            for e in fs::read_dir(dir).map_err(OciError::io("list", dir))? {
                let e = e.map_err(OciError::io("list", dir))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if live(set, &name) {
                    continue;
                }
                report.bytes_freed += remove_tree(&e.path())?;
                *count += 1;
            }
        }
        for e in fs::read_dir(&self.tmp).map_err(OciError::io("list", &self.tmp))? {
            let e = e.map_err(OciError::io("list", &self.tmp))?;
            if e.file_name().to_string_lossy().starts_with("oci-") {
                report.bytes_freed += remove_tree(&e.path())?;
                report.temp_removed += 1;
            }
        }
        for e in fs::read_dir(&self.locks).map_err(OciError::io("list", &self.locks))? {
            let e = e.map_err(OciError::io("list", &self.locks))?;
            let n = e.file_name().to_string_lossy().into_owned();
            // Per-layer locks are only taken under the shared store lock, which we exclude.
            if n.starts_with("layer-") || n.starts_with("make-") {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(report)
    }
}

/// Lowering sees the real config (ENV, CMD, WORKDIR, ONBUILD, …) of images in the store;
/// a built-in base not made yet lowers with the config it will have.
impl crate::frontend::BaseImages for Store {
    fn config(&self, reference: &str) -> Option<crate::ir::ImageConfig> {
        let local = Reference::parse(reference)
            .ok()
            .and_then(|r| self.local(&r).ok().flatten());
        match local {
            Some(l) => Some(l.config.image),
            None => crate::frontend::lower::builtin_config(reference),
        }
    }
}

/// Removes a file or a tree (not following symlinks); returns the apparent bytes freed.
fn remove_tree(p: &Path) -> Result<u64, OciError> {
    let md = fs::symlink_metadata(p).map_err(OciError::io("stat", p))?;
    let mut bytes = md.len();
    if md.is_dir() {
        for e in fs::read_dir(p).map_err(OciError::io("list", p))? {
            let e = e.map_err(OciError::io("list", p))?;
            bytes += remove_tree(&e.path())?;
        }
        fs::remove_dir(p).map_err(OciError::io("remove", p))?;
    } else {
        fs::remove_file(p).map_err(OciError::io("remove", p))?;
    }
    Ok(bytes)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Layer compression, told by magic bytes (media types are not always right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `1f 8b`.
    Gzip,
    /// `28 b5 2f fd`.
    Zstd,
    /// A plain tar.
    None,
}

impl Compression {
    /// Tells the compression from the first bytes.
    pub fn sniff(magic: &[u8]) -> Compression {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Reads from `inner`, hashing and (optionally) copying every byte to `out`.
pub(crate) struct Tee<R, W: Write> {
    pub(crate) inner: R,
    pub(crate) out: Option<W>,
    pub(crate) hasher: Hasher,
}

impl<R: Read, W: Write> Tee<R, W> {
    /// The writer back, and the digest and length of what passed.
    pub(crate) fn into_parts(self) -> (Option<W>, Digest, u64) {
        let len = self.hasher.len();
        (self.out, self.hasher.finish(), len)
    }

    fn finish(self) -> io::Result<(Digest, u64)> {
        if let Some(mut w) = self.out {
            w.flush()?;
        }
        let len = self.hasher.len();
        Ok((self.hasher.finish(), len))
    }
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if let Some(w) = &mut self.out {
            w.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}

/// A blocking reader over chunks from an async producer; ends when the sender is dropped.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl ChannelReader {
    /// Reads what `rx` receives.
    pub fn new(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> Self {
        ChannelReader {
            rx,
            cur: bytes::Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => break,
            }
        }
        Ok(&self.cur)
    }
    fn consume(&mut self, n: usize) {
        let _ = self.cur.split_to(n.min(self.cur.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::BaseImages;

    fn store() -> (tempfile::TempDir, Store) {
        let t = tempfile::tempdir().expect("tmp");
        let s = Store::open(&Home::at(t.path())).expect("store");
        (t, s)
    }

    fn gz_layer(entries: &[(&str, &[u8])]) -> (Vec<u8>, Layer) {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, *data).expect("append");
        }
        let tar = b.into_inner().expect("tar");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).expect("gz");
        let gz = e.finish().expect("gz");
        let layer = Layer {
            digest: Digest::of(&gz),
            size: gz.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: Digest::of(&tar),
        };
        (gz, layer)
    }

    fn record(s: &Store, name: &str, layers: &[(Vec<u8>, Layer)], env: &str) -> ImageRecord {
        for (gz, l) in layers {
            s.ingest_layer(&gz[..], l, true, true).expect("ingest");
        }
        let diff_ids: Vec<Digest> = layers.iter().map(|(_, l)| l.diff_id.clone()).collect();
        let cfg = config::make_config(&diff_ids, &[env.to_string()], &["sh".into()], "test")
            .expect("cfg");
        let cfg_d = s.put_blob(&cfg).expect("cfg blob");
        let descs: Vec<_> = layers
            .iter()
            .map(|(_, l)| (l.digest.clone(), l.size, l.media_type.clone()))
            .collect();
        let m = config::make_manifest((&cfg_d, cfg.len() as u64), &descs).expect("manifest");
        let d = s.put_blob(&m).expect("manifest blob");
        let rec = ImageRecord {
            reference: Store::key(&Reference::parse(name).expect("ref")),
            digest: d.clone(),
            platform_digest: d,
            platform: "linux/amd64".into(),
            config: cfg_d,
            layers: layers.iter().map(|(_, l)| l.clone()).collect(),
            source: Source::Import,
            created_at: 0,
        };
        s.put_image(&rec).expect("record");
        rec
    }

    #[test]
    fn lowering_sees_the_config_of_stored_images() {
        let (_t, s) = store();
        record(
            &s,
            "local/app:1",
            &[gz_layer(&[("a", b"1")])],
            "MARK=stored",
        );
        let c = s.config("local/app:1").expect("config");
        assert_eq!(c.env, ["MARK=stored"]);
        assert_eq!(
            s.config("docker.io/local/app:1").map(|c| c.env),
            Some(vec!["MARK=stored".into()])
        );
        assert_eq!(s.config("local/app:2"), None);
        assert_eq!(
            s.config("kiln/busybox").and_then(|c| c.cmd),
            Some(vec!["sh".into()])
        );
    }

    #[test]
    fn a_digest_reference_finds_the_tag_that_resolved_to_it() {
        let (_t, s) = store();
        let rec = record(&s, "local/app:1", &[gz_layer(&[("a", b"1")])], "A=1");
        let by_digest = Reference::parse(&format!("local/app@{}", rec.digest)).expect("ref");
        assert_eq!(
            s.image(&by_digest).expect("lookup").map(|r| r.digest),
            Some(rec.digest)
        );
        let other = Reference::parse(&format!("local/other@{}", rec.platform_digest)).expect("ref");
        assert_eq!(
            s.image(&other).expect("lookup"),
            None,
            "another repository's digest is not it"
        );
    }

    #[test]
    fn gc_keeps_what_images_use_and_removes_the_rest() {
        let (_t, s) = store();
        let shared = gz_layer(&[("shared", b"s")]);
        let only_a = gz_layer(&[("a", b"a")]);
        let only_b = gz_layer(&[("b", b"b")]);
        let a = record(&s, "local/a", &[shared.clone(), only_a.clone()], "A=1");
        let b = record(&s, "local/b", &[shared.clone(), only_b.clone()], "B=1");
        std::fs::create_dir(s.tmp().join("oci-layer-interrupted")).expect("leftover");
        std::fs::create_dir(s.tmp().join("build-not-ours")).expect("someone else's");
        s.remove_image(&Reference::parse("local/a").expect("ref"))
            .expect("rm")
            .expect("was there");
        let kept = only_b.1.diff_id.clone();
        let roots = GcRoots::default();
        let report = s.gc(&roots).expect("gc");
        assert_eq!(report.layers_removed, 1);
        assert_eq!(report.blobs_removed, 3, "a's layer, config and manifest");
        assert_eq!(report.temp_removed, 1);
        assert!(report.bytes_freed > 0);
        assert!(!s.has_layer(&only_a.1.diff_id) && !s.has_blob(&a.config));
        assert!(s.has_layer(&shared.1.diff_id) && s.has_layer(&kept));
        assert!(
            s.local(&Reference::parse("local/b").expect("ref"))
                .expect("b")
                .is_some()
        );
        assert!(s.tmp().join("build-not-ours").exists());
        assert!(s.has_blob(&b.digest));
        // What another part of Kiln still uses survives too.
        s.remove_image(&Reference::parse("local/b").expect("ref"))
            .expect("rm");
        let roots = GcRoots {
            layers: [kept.clone()].into(),
            blobs: Default::default(),
        };
        s.gc(&roots).expect("gc");
        assert!(s.has_layer(&kept) && !s.has_layer(&shared.1.diff_id));
    }

    #[test]
    fn a_layer_that_does_not_match_its_digest_or_diff_id_is_not_stored() {
        let (_t, s) = store();
        let (gz, good) = gz_layer(&[("f", b"data")]);
        let wrong_digest = Layer {
            digest: Digest::of(b"other"),
            ..good.clone()
        };
        let e = s
            .ingest_layer(&gz[..], &wrong_digest, true, true)
            .expect_err("digest");
        assert!(
            matches!(e, OciError::DigestMismatch { what: "layer", .. }),
            "{e}"
        );
        let wrong_diff = Layer {
            diff_id: Digest::of(b"other"),
            ..good.clone()
        };
        let e = s
            .ingest_layer(&gz[..], &wrong_diff, true, true)
            .expect_err("diff_id");
        assert!(
            matches!(
                e,
                OciError::DigestMismatch {
                    what: "uncompressed layer (diff_id)",
                    ..
                }
            ),
            "{e}"
        );
        let short = Layer {
            size: good.size + 1,
            ..good.clone()
        };
        assert!(matches!(
            s.ingest_layer(&gz[..], &short, true, true),
            Err(OciError::SizeMismatch { .. })
        ));
        assert!(!s.has_blob(&good.digest) && !s.has_layer(&good.diff_id));
        assert_eq!(std::fs::read_dir(s.tmp()).expect("tmp").count(), 0);
        s.ingest_layer(&gz[..], &good, true, true)
            .expect("the right one");
        assert!(s.has_blob(&good.digest) && s.has_layer(&good.diff_id));
    }
}
