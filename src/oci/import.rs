//! `kiln base import`: images from an OCI layout directory, an OCI archive (a tar of a
//! layout) or a `docker save` archive, added to the store under a name that `FROM` then
//! resolves before any registry. Archives are read in place (an index of member offsets),
//! never extracted; every blob is verified like a pulled one.

use super::config::{self, Layer, PLATFORM};
use super::digest::{Digest, Hasher};
use super::error::OciError;
use super::pull::layers_of;
use super::reference::Reference;
use super::store::{Compression, ImageRecord, Source, Store, now};
use oci_spec::image::ImageIndex;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where an image to import is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportSource {
    /// `oci-layout:DIR[:TAG]`.
    OciLayout {
        /// The layout directory.
        dir: PathBuf,
        /// Its `org.opencontainers.image.ref.name`.
        tag: Option<String>,
    },
    /// `oci-archive:FILE[:TAG]`.
    OciArchive {
        /// The tar of a layout.
        file: PathBuf,
        /// Its `org.opencontainers.image.ref.name`.
        tag: Option<String>,
    },
    /// `docker-archive:FILE[:REF]`.
    DockerArchive {
        /// The `docker save` tar.
        file: PathBuf,
        /// One of its `RepoTags`.
        tag: Option<String>,
    },
}

impl ImportSource {
    /// Parses `TRANSPORT:PATH[:TAG]`; the longest prefix that exists is the path.
    pub fn parse(s: &str) -> Result<ImportSource, OciError> {
        let bad = |detail: &str| OciError::Import {
            source_ref: s.to_string(),
            detail: detail.to_string(),
        };
        let (transport, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("expected oci-layout:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE[:TAG]"))?;
        let mut cuts: Vec<usize> = rest.match_indices(':').map(|(i, _)| i).collect();
        cuts.push(rest.len());
        let (path, tag) = cuts
            .iter()
            .rev()
            .map(|&i| (&rest[..i], rest.get(i + 1..)))
            .find(|(p, _)| !p.is_empty() && Path::new(p).exists())
            .ok_or_else(|| bad("no such file or directory"))?;
        let path = PathBuf::from(path);
        let tag = tag.filter(|t| !t.is_empty()).map(str::to_string);
        match transport {
            "oci-layout" | "oci" => Ok(ImportSource::OciLayout { dir: path, tag }),
            "oci-archive" => Ok(ImportSource::OciArchive { file: path, tag }),
            "docker-archive" => Ok(ImportSource::DockerArchive { file: path, tag }),
            _ => Err(bad(
                "unknown transport; use oci-layout:, oci-archive: or docker-archive:",
            )),
        }
    }

    fn describe(&self) -> String {
        match self {
            ImportSource::OciLayout { dir, .. } => format!("oci-layout:{}", dir.display()),
            ImportSource::OciArchive { file, .. } => format!("oci-archive:{}", file.display()),
            ImportSource::DockerArchive { file, .. } => {
                format!("docker-archive:{}", file.display())
            }
        }
    }
}

/// Imports `source` and records it as `name`.
pub fn import(
    store: &Store,
    source: &ImportSource,
    name: &Reference,
) -> Result<ImageRecord, OciError> {
    if name.is_builtin() {
        return Err(OciError::Import {
            source_ref: source.describe(),
            detail: "kiln/… names belong to the built-in bases".into(),
        });
    }
    let _lock = store.lock(false)?;
    let err = |detail: String| OciError::Import {
        source_ref: source.describe(),
        detail,
    };
    let rec = match source {
        ImportSource::OciLayout { dir, tag } => {
            let blobs = DirBlobs { root: dir.clone() };
            import_oci(store, &blobs, tag.as_deref(), name, &err)?
        }
        ImportSource::OciArchive { file, tag } => {
            let blobs = ArchiveBlobs::open(file)?;
            import_oci(store, &blobs, tag.as_deref(), name, &err)?
        }
        ImportSource::DockerArchive { file, tag } => {
            let blobs = ArchiveBlobs::open(file)?;
            import_docker(store, &blobs, tag.as_deref(), name, &err)?
        }
    };
    store.put_image(&rec)?;
    Ok(rec)
}

/// Named files of a layout or archive.
trait Blobs {
    /// Opens `name` (a path inside the layout or archive) and gives its size.
    fn open(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), OciError>;

    fn open_blob(&self, d: &Digest) -> Result<(Box<dyn Read + '_>, u64), OciError> {
        self.open(&format!("blobs/sha256/{}", d.hex()))
    }

    /// A small file whole.
    fn read(&self, name: &str, limit: u64) -> Result<Vec<u8>, OciError> {
        let (r, size) = self.open(name)?;
        if size > limit {
            return Err(OciError::Malformed {
                what: name.to_string(),
                detail: format!("{size} bytes is more than the {limit} allowed"),
            });
        }
        let mut v = Vec::with_capacity(size as usize);
        r.take(limit)
            .read_to_end(&mut v)
            .map_err(OciError::io("read", name))?;
        Ok(v)
    }

    /// A small blob, verified.
    fn read_blob(&self, d: &Digest, what: &'static str) -> Result<Vec<u8>, OciError> {
        let v = self.read(&format!("blobs/sha256/{}", d.hex()), 64 << 20)?;
        let actual = Digest::of(&v);
        if &actual != d {
            return Err(OciError::DigestMismatch {
                what,
                expected: d.clone(),
                actual,
            });
        }
        Ok(v)
    }
}

struct DirBlobs {
    root: PathBuf,
}

impl Blobs for DirBlobs {
    fn open(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), OciError> {
        let p = self.root.join(name);
        // A layout's files are plain files; a symlink there is not followed.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&p)
            .map_err(OciError::io("open", &p))?;
        let md = f.metadata().map_err(OciError::io("stat", &p))?;
        if !md.is_file() {
            return Err(OciError::Malformed {
                what: p.display().to_string(),
                detail: "not a regular file".into(),
            });
        }
        Ok((
            Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
            md.len(),
        ))
    }
}

enum Member {
    File { offset: u64, size: u64 },
    Link(String),
}

/// A tar read in place: member name → offset and size.
struct ArchiveBlobs {
    path: PathBuf,
    members: HashMap<String, Member>,
}

/// `a/./b/../c` → `a/c`; `None` if it climbs above the top.
fn normalize(p: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

impl ArchiveBlobs {
    fn open(path: &Path) -> Result<ArchiveBlobs, OciError> {
        let f = File::open(path).map_err(OciError::io("open", path))?;
        let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
        let mut members = HashMap::new();
        let bad = |e: std::io::Error| OciError::Malformed {
            what: format!("archive {}", path.display()),
            detail: e.to_string(),
        };
        for entry in ar.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let Some(name) = normalize(&String::from_utf8_lossy(&entry.path_bytes())) else {
                continue;
            };
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    members.insert(
                        name,
                        Member::File {
                            offset: entry.raw_file_position(),
                            size: entry.size(),
                        },
                    );
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let target =
                        String::from_utf8_lossy(&entry.link_name_bytes().unwrap_or_default())
                            .into_owned();
                    let base = if entry.header().entry_type() == tar::EntryType::Link {
                        String::new()
                    } else {
                        name.rsplit_once('/')
                            .map_or(String::new(), |(d, _)| d.to_string())
                    };
                    if let Some(t) = normalize(&format!("{base}/{target}")) {
                        members.insert(name, Member::Link(t));
                    }
                }
                _ => {}
            }
        }
        Ok(ArchiveBlobs {
            path: path.to_path_buf(),
            members,
        })
    }
}

impl Blobs for ArchiveBlobs {
    fn open(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), OciError> {
        let mut n = normalize(name).unwrap_or_default();
        for _ in 0..8 {
            match self.members.get(&n) {
                Some(Member::File { offset, size }) => {
                    let mut f = File::open(&self.path).map_err(OciError::io("open", &self.path))?;
                    f.seek(SeekFrom::Start(*offset))
                        .map_err(OciError::io("seek", &self.path))?;
                    let r = std::io::BufReader::with_capacity(1 << 20, f).take(*size);
                    return Ok((Box::new(r), *size));
                }
                Some(Member::Link(t)) => n = t.clone(),
                None => break,
            }
        }
        Err(OciError::Malformed {
            what: format!("archive {}", self.path.display()),
            detail: format!("no file {name} in it"),
        })
    }
}

fn import_oci(
    store: &Store,
    blobs: &dyn Blobs,
    tag: Option<&str>,
    name: &Reference,
    err: &dyn Fn(String) -> OciError,
) -> Result<ImageRecord, OciError> {
    let index_bytes = blobs.read("index.json", 16 << 20)?;
    let index: ImageIndex =
        serde_json::from_slice(&index_bytes).map_err(|e| err(format!("index.json: {e}")))?;
    let tag_of = |d: &oci_spec::image::Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .cloned()
    };
    let chosen = match tag {
        Some(t) => index
            .manifests()
            .iter()
            .find(|d| tag_of(d).as_deref() == Some(t)),
        None if index.manifests().len() == 1 => index.manifests().first(),
        None => None,
    };
    let Some(desc) = chosen else {
        let tags: Vec<String> = index.manifests().iter().filter_map(tag_of).collect();
        return Err(err(match tag {
            Some(t) => format!("no image tagged {t:?} (tags: {})", tags.join(", ")),
            None => format!(
                "{} images in it: name one with :TAG ({})",
                index.manifests().len(),
                tags.join(", ")
            ),
        }));
    };
    let top_digest = Digest::parse(desc.digest().as_ref()).map_err(|e| err(e.to_string()))?;
    let top = blobs.read_blob(&top_digest, "manifest")?;
    let what = format!("{name}");
    let (platform_digest, platform) = if config::is_index(desc.media_type().as_ref()) {
        let (d, _) = config::choose_platform(&top, &what)?;
        let bytes = blobs.read_blob(&d, "manifest")?;
        (d, bytes)
    } else {
        (top_digest.clone(), top.clone())
    };
    let manifest = config::parse_manifest(&platform, &what)?;
    let cfg_bytes = blobs.read_blob(&manifest.config, "config")?;
    let cfg = config::parse_config(&cfg_bytes, &what)?;
    if cfg.platform != PLATFORM {
        return Err(OciError::NoPlatform {
            reference: what,
            available: cfg.platform,
        });
    }
    let layers = layers_of(&manifest, &cfg, &what)?;
    for l in &layers {
        ingest(store, l, || blobs.open_blob(&l.digest).map(|(r, _)| r))?;
    }
    store.put_blob(&cfg_bytes)?;
    store.put_blob(&platform)?;
    store.put_blob(&top)?;
    Ok(ImageRecord {
        reference: Store::key(name),
        digest: top_digest,
        platform_digest,
        platform: PLATFORM.to_string(),
        config: manifest.config,
        layers,
        source: Source::Import,
        created_at: now(),
    })
}

fn ingest<'a>(
    store: &Store,
    layer: &Layer,
    open: impl FnOnce() -> Result<Box<dyn Read + 'a>, OciError>,
) -> Result<(), OciError> {
    let _lock = store.lock_layer(&layer.diff_id)?;
    let need_blob = !store.has_blob(&layer.digest);
    let need_dir = !store.has_layer(&layer.diff_id);
    if need_blob || need_dir {
        store.ingest_layer(open()?, layer, need_blob, need_dir)?;
    }
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn import_docker(
    store: &Store,
    blobs: &ArchiveBlobs,
    tag: Option<&str>,
    name: &Reference,
    err: &dyn Fn(String) -> OciError,
) -> Result<ImageRecord, OciError> {
    let m = blobs.read("manifest.json", 16 << 20)?;
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&m).map_err(|e| err(format!("manifest.json: {e}")))?;
    let same = |a: &str, b: &str| match (Reference::parse(a), Reference::parse(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    };
    let chosen = match tag {
        Some(t) => entries
            .iter()
            .find(|e| e.repo_tags.iter().flatten().any(|rt| same(rt, t))),
        None if entries.len() == 1 => entries.first(),
        None => None,
    };
    let Some(entry) = chosen else {
        let tags: Vec<&str> = entries
            .iter()
            .flat_map(|e| e.repo_tags.iter().flatten())
            .map(String::as_str)
            .collect();
        return Err(err(format!(
            "choose an image with :REF (it has: {})",
            tags.join(", ")
        )));
    };
    let what = format!("{name}");
    let cfg_bytes = blobs.read(&entry.config, 64 << 20)?;
    let cfg = config::parse_config(&cfg_bytes, &what)?;
    if cfg.platform != PLATFORM {
        return Err(OciError::NoPlatform {
            reference: what,
            available: cfg.platform,
        });
    }
    if cfg.diff_ids.len() != entry.layers.len() {
        return Err(err(format!(
            "{} layers but {} diff_ids in the config",
            entry.layers.len(),
            cfg.diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (path, diff_id) in entry.layers.iter().zip(&cfg.diff_ids) {
        // Pass 1 hashes the member (its digest names the blob), pass 2 ingests it.
        let (mut r, size) = blobs.open(path)?;
        let mut h = Hasher::new();
        let mut magic = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).map_err(OciError::io("read", path))?;
            if n == 0 {
                break;
            }
            if magic.len() < 4 {
                magic.extend_from_slice(&buf[..n.min(4)]);
            }
            h.update(&buf[..n]);
        }
        let media_type = match Compression::sniff(&magic) {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        };
        let layer = Layer {
            digest: h.finish(),
            size,
            media_type: media_type.to_string(),
            diff_id: diff_id.clone(),
        };
        ingest(store, &layer, || blobs.open(path).map(|(r, _)| r))?;
        layers.push(layer);
    }
    let cfg_digest = store.put_blob(&cfg_bytes)?;
    let descs: Vec<(Digest, u64, String)> = layers
        .iter()
        .map(|l| (l.digest.clone(), l.size, l.media_type.clone()))
        .collect();
    let manifest = config::make_manifest((&cfg_digest, cfg_bytes.len() as u64), &descs)?;
    let digest = store.put_blob(&manifest)?;
    Ok(ImageRecord {
        reference: Store::key(name),
        digest: digest.clone(),
        platform_digest: digest,
        platform: PLATFORM.to_string(),
        config: cfg_digest,
        layers,
        source: Source::Import,
        created_at: now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_sources_split_path_and_tag() {
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("img.tar");
        std::fs::write(&f, b"").expect("file");
        let d = t.path().display();
        assert_eq!(
            ImportSource::parse(&format!("docker-archive:{d}/img.tar:busybox:latest"))
                .expect("docker"),
            ImportSource::DockerArchive {
                file: f.clone(),
                tag: Some("busybox:latest".into())
            }
        );
        assert_eq!(
            ImportSource::parse(&format!("oci-layout:{d}:v1")).expect("layout"),
            ImportSource::OciLayout {
                dir: t.path().to_path_buf(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            ImportSource::parse(&format!("oci-archive:{d}/img.tar")).expect("archive"),
            ImportSource::OciArchive { file: f, tag: None }
        );
        assert!(ImportSource::parse("oci-layout:/nonexistent/x").is_err());
        assert!(ImportSource::parse(&format!("ftp:{d}")).is_err());
        assert!(ImportSource::parse("plain").is_err());
    }

    #[test]
    fn archive_member_names_normalise_and_never_climb() {
        assert_eq!(normalize("./a/./b/../c").as_deref(), Some("a/c"));
        assert_eq!(normalize("../x"), None);
        assert_eq!(
            normalize("/blobs/sha256/x").as_deref(),
            Some("blobs/sha256/x")
        );
    }
}
