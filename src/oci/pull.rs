//! Resolving a reference to a fully present local image: the local store first, then the
//! built-in bases, then the registry. A pull fetches the manifest (choosing linux/amd64 from
//! an index) and config, then downloads several layers at once, each streamed straight into
//! [`Store::ingest_layer`] (blob and unpacked tree in one pass, verified before commit).

use super::builtin;
use super::client::{CONSUMER_GONE, RegistryClient, Repository};
use super::config::{self, Layer, PLATFORM};
use super::digest::Digest;
use super::error::OciError;
use super::reference::Reference;
use super::store::{ChannelReader, ImageRecord, LocalImage, Source, Store, now};
use std::sync::Arc;

/// The largest config Kiln accepts.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// Receives pull progress (the CLI draws bars or prints lines).
pub trait Progress: Send + Sync {
    /// A layer is about to be fetched; `cached` means it is already in the store.
    fn layer_start(&self, _digest: &Digest, _size: u64, _cached: bool) {}
    /// `bytes` more of a layer arrived.
    fn layer_progress(&self, _digest: &Digest, _bytes: u64) {}
    /// A layer is stored and unpacked.
    fn layer_done(&self, _digest: &Digest) {}
    /// A line of news (resolving, making a built-in base).
    fn note(&self, _message: &str) {}
}

/// Reports nothing.
pub struct Silent;
impl Progress for Silent {}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Layers downloaded at once.
    pub jobs: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions { jobs: 4 }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OciError> + Send + 'static,
) -> Result<T, OciError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OciError::Tool {
            tool: "worker thread",
            detail: e.to_string(),
        })?
}

/// The image `reference` as a local image: from the store if present, else made (built-in
/// `kiln/…`) or pulled. This is what `FROM` uses.
pub async fn ensure(
    store: &Store,
    client: &RegistryClient,
    reference: &Reference,
    opts: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<LocalImage, OciError> {
    if let Some(l) = store.local(reference)? {
        return Ok(l);
    }
    pull(store, client, reference, opts, progress).await?;
    store.local(reference)?.ok_or_else(|| OciError::NotLocal {
        reference: reference.to_string(),
    })
}

/// Fetches `reference` into the store (making it, for a built-in base) and records it.
pub async fn pull(
    store: &Store,
    client: &RegistryClient,
    reference: &Reference,
    opts: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<ImageRecord, OciError> {
    if reference.is_builtin() {
        let (s, r, p) = (store.clone(), reference.clone(), progress.clone());
        return blocking(move || builtin::ensure(&s, &r, &*p)).await;
    }
    let s = store.clone();
    let _lock = blocking(move || s.lock(false)).await?;
    progress.note(&format!("resolving {}", reference.familiar()));
    let repo = client.repository(reference).await?;
    let wanted = match (reference.digest(), reference.tag()) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => "latest".to_string(),
    };
    let name = reference.to_string();
    let top = repo.manifest(&wanted).await?;
    let platform = if config::is_index(&top.media_type) {
        let (d, size) = config::choose_platform(&top.bytes, &name)?;
        let m = repo.manifest(&d.to_string()).await?;
        if config::is_index(&m.media_type) {
            return Err(OciError::UnsupportedMediaType {
                reference: name,
                what: "manifest (an index inside an index)",
                media_type: m.media_type,
            });
        }
        if m.bytes.len() as u64 != size {
            return Err(OciError::SizeMismatch {
                what: "manifest",
                digest: d,
                expected: size,
                actual: m.bytes.len() as u64,
            });
        }
        m
    } else {
        top.clone()
    };
    let manifest = config::parse_manifest(&platform.bytes, &name)?;
    let config_bytes = if store.has_blob(&manifest.config) {
        store.read_blob(&manifest.config)?
    } else {
        repo.blob_bytes(&manifest.config, manifest.config_size, MAX_CONFIG_BYTES)
            .await?
    };
    let cfg = config::parse_config(&config_bytes, &name)?;
    if cfg.platform != PLATFORM {
        return Err(OciError::NoPlatform {
            reference: name,
            available: cfg.platform,
        });
    }
    let layers = layers_of(&manifest, &cfg, &name)?;
    fetch_layers(store, &repo, &layers, opts, progress.clone()).await?;
    store.put_blob(&config_bytes)?;
    store.put_blob(&platform.bytes)?;
    store.put_blob(&top.bytes)?;
    let record = ImageRecord {
        reference: Store::key(reference),
        digest: top.digest,
        platform_digest: platform.digest,
        platform: PLATFORM.to_string(),
        config: manifest.config,
        layers,
        source: Source::Registry,
        created_at: now(),
    };
    store.put_image(&record)?;
    Ok(record)
}

/// [`pull`] for callers without an async runtime (tools, benchmarks, the build pipeline): a
/// client from the environment, a runtime of its own, no progress. Do not call it from
/// inside an async runtime (tokio refuses to nest runtimes).
pub fn pull_blocking(
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
) -> Result<ImageRecord, OciError> {
    let client = RegistryClient::new(super::client::ClientOptions::from_env())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| OciError::Tool {
            tool: "async runtime",
            detail: e.to_string(),
        })?;
    rt.block_on(pull(store, &client, reference, opts, Arc::new(Silent)))
}

/// Pairs the manifest's layers with the config's diff_ids.
pub fn layers_of(
    manifest: &config::Manifest,
    cfg: &config::Config,
    name: &str,
) -> Result<Vec<Layer>, OciError> {
    if manifest.layers.len() != cfg.diff_ids.len() {
        return Err(OciError::Malformed {
            what: format!("image {name}"),
            detail: format!(
                "{} layers in the manifest but {} diff_ids in the config",
                manifest.layers.len(),
                cfg.diff_ids.len()
            ),
        });
    }
    Ok(manifest
        .layers
        .iter()
        .zip(&cfg.diff_ids)
        .map(|((digest, size, media_type), diff_id)| Layer {
            digest: digest.clone(),
            size: *size,
            media_type: media_type.clone(),
            diff_id: diff_id.clone(),
        })
        .collect())
}

async fn fetch_layers(
    store: &Store,
    repo: &Arc<Repository>,
    layers: &[Layer],
    opts: &PullOptions,
    progress: Arc<dyn Progress>,
) -> Result<(), OciError> {
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.jobs.max(1)));
    let mut set = tokio::task::JoinSet::new();
    // The same layer twice in one image is fetched once.
    let mut seen = std::collections::HashSet::new();
    for layer in layers.iter().filter(|l| seen.insert(l.diff_id.clone())) {
        let (store, repo, sem, progress, layer) = (
            store.clone(),
            repo.clone(),
            sem.clone(),
            progress.clone(),
            layer.clone(),
        );
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|e| OciError::Tool {
                tool: "download queue",
                detail: e.to_string(),
            })?;
            fetch_layer(&store, &repo, &layer, &*progress).await
        });
    }
    while let Some(joined) = set.join_next().await {
        let r = joined.map_err(|e| OciError::Tool {
            tool: "layer download task",
            detail: e.to_string(),
        })?;
        // Dropping the set on return aborts the other downloads.
        r?;
    }
    Ok(())
}

async fn fetch_layer(
    store: &Store,
    repo: &Repository,
    layer: &Layer,
    progress: &dyn Progress,
) -> Result<(), OciError> {
    let (s, d) = (store.clone(), layer.diff_id.clone());
    let lock = blocking(move || s.lock_layer(&d)).await?;
    let need_dir = !store.has_layer(&layer.diff_id);
    let need_blob = !store.has_blob(&layer.digest);
    if !need_dir && !need_blob {
        progress.layer_start(&layer.digest, layer.size, true);
        progress.layer_done(&layer.digest);
        return Ok(());
    }
    if !need_blob {
        // The blob is here (its tree was collected): unpack it from the store, not the network.
        progress.layer_start(&layer.digest, layer.size, true);
        let (s, l) = (store.clone(), layer.clone());
        blocking(move || {
            let p = s.blob_path(&l.digest);
            let f = std::fs::File::open(&p).map_err(OciError::io("open blob", &p))?;
            s.ingest_layer(
                std::io::BufReader::with_capacity(1 << 20, f),
                &l,
                false,
                true,
            )
        })
        .await?;
        drop(lock);
        progress.layer_done(&layer.digest);
        return Ok(());
    }
    progress.layer_start(&layer.digest, layer.size, false);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let (s, l) = (store.clone(), layer.clone());
    let consumer = tokio::task::spawn_blocking(move || {
        s.ingest_layer(ChannelReader::new(rx), &l, need_blob, need_dir)
    });
    let digest = layer.digest.clone();
    let fetched = repo
        .blob(&layer.digest, layer.size, &tx, &|n| {
            progress.layer_progress(&digest, n)
        })
        .await;
    drop(tx);
    let consumed = consumer.await.map_err(|e| OciError::Tool {
        tool: "unpack thread",
        detail: e.to_string(),
    })?;
    drop(lock);
    match (fetched, consumed) {
        // The fetch failed first: the unpacker only saw a truncated stream.
        (Err(e), _) if !is_consumer_gone(&e) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(e),
        (Ok(()), Ok(stats)) => {
            tracing::debug!(layer = %layer.digest, files = stats.entries, bytes = stats.file_bytes, "layer stored");
            progress.layer_done(&layer.digest);
            Ok(())
        }
    }
}

fn is_consumer_gone(e: &OciError) -> bool {
    matches!(e, OciError::Io { step, .. } if *step == CONSUMER_GONE)
}
