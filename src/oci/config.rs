//! Image configs, manifests and indexes: parsing them with `oci-spec` (plus Docker's own
//! `OnBuild`, `Healthcheck` and `Shell`, which the OCI spec lacks), choosing linux/amd64 from
//! an index, and converting a config to the IR's [`crate::ir::ImageConfig`].

use super::client::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use super::digest::Digest;
use super::error::OciError;
use crate::ir;
use oci_spec::image::{Arch, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os};
use serde::Deserialize;

/// The platform Kiln builds for.
pub const PLATFORM: &str = "linux/amd64";

/// A layer as a manifest lists it, with the diff_id the config gives it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    /// The blob's digest (compressed, as stored in the registry).
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// The media type.
    pub media_type: String,
    /// sha256 of the uncompressed tar: the key of its unpacked directory.
    pub diff_id: Digest,
}

/// A parsed image manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The config blob.
    pub config: Digest,
    /// Its size.
    pub config_size: u64,
    /// Layers bottom to top: blob digest, size, media type.
    pub layers: Vec<(Digest, u64, String)>,
}

/// A parsed image config.
#[derive(Debug, Clone)]
pub struct Config {
    /// `rootfs.diff_ids`.
    pub diff_ids: Vec<Digest>,
    /// `os/architecture`.
    pub platform: String,
    /// The run configuration in the IR's shape.
    pub image: ir::ImageConfig,
}

fn malformed(what: &str, e: impl std::fmt::Display) -> OciError {
    OciError::Malformed {
        what: what.to_string(),
        detail: e.to_string(),
    }
}

fn digest_of(what: &str, d: &oci_spec::image::Digest) -> Result<Digest, OciError> {
    Digest::parse(d.as_ref()).map_err(|e| malformed(what, e))
}

/// True for OCI and Docker indexes.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// Parses an image manifest (OCI or Docker schema 2).
pub fn parse_manifest(bytes: &[u8], what: &str) -> Result<Manifest, OciError> {
    let m: ImageManifest = serde_json::from_slice(bytes).map_err(|e| malformed(what, e))?;
    let config_type = m.config().media_type().to_string();
    if !matches!(
        config_type.as_str(),
        "application/vnd.oci.image.config.v1+json"
            | "application/vnd.docker.container.image.v1+json"
    ) {
        return Err(OciError::UnsupportedMediaType {
            reference: what.to_string(),
            what: "config (not a container image)",
            media_type: config_type,
        });
    }
    let layers = m
        .layers()
        .iter()
        .map(|l| {
            let mt = l.media_type().to_string();
            if mt.contains("foreign") || mt.contains("nondistributable") {
                return Err(OciError::UnsupportedMediaType {
                    reference: what.to_string(),
                    what: "layer",
                    media_type: mt,
                });
            }
            Ok((digest_of(what, l.digest())?, l.size(), mt))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Manifest {
        config: digest_of(what, m.config().digest())?,
        config_size: m.config().size(),
        layers,
    })
}

/// The linux/amd64 manifest of an index: its digest, size and media type. Entries that are
/// not image manifests (attestations, nested indexes) are passed over.
pub fn choose_platform(bytes: &[u8], what: &str) -> Result<(Digest, u64), OciError> {
    let idx: ImageIndex = serde_json::from_slice(bytes).map_err(|e| malformed(what, e))?;
    let mut seen = Vec::new();
    for m in idx.manifests() {
        let mt = m.media_type().to_string();
        if !(mt == OCI_MANIFEST || mt == DOCKER_MANIFEST) {
            continue;
        }
        let Some(p) = m.platform() else { continue };
        seen.push(format!("{}/{}", p.os(), p.architecture()));
        if *p.os() == Os::Linux && *p.architecture() == Arch::Amd64 {
            return Ok((digest_of(what, m.digest())?, m.size()));
        }
    }
    Err(OciError::NoPlatform {
        reference: what.to_string(),
        available: if seen.is_empty() {
            "no platform manifests".into()
        } else {
            seen.join(", ")
        },
    })
}

#[derive(Deserialize, Default)]
struct DockerExtras {
    #[serde(default)]
    config: Option<DockerConfigExtras>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct DockerConfigExtras {
    on_build: Option<Vec<String>>,
    healthcheck: Option<DockerHealthcheck>,
    shell: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerHealthcheck {
    #[serde(default)]
    test: Vec<String>,
    #[serde(default)]
    interval: u64,
    #[serde(default)]
    timeout: u64,
    #[serde(default)]
    start_period: u64,
    #[serde(default)]
    start_interval: u64,
    #[serde(default)]
    retries: u32,
}

/// Parses an image config; its run configuration becomes the IR's.
pub fn parse_config(bytes: &[u8], what: &str) -> Result<Config, OciError> {
    let c: ImageConfiguration = serde_json::from_slice(bytes).map_err(|e| malformed(what, e))?;
    let extras: DockerExtras = serde_json::from_slice(bytes).unwrap_or_default();
    let extras = extras.config.unwrap_or_default();
    let diff_ids = c
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| Digest::parse(d).map_err(|e| malformed(what, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut image = ir::ImageConfig::default();
    if let Some(cfg) = c.config() {
        image.env = cfg.env().clone().unwrap_or_default();
        image.workdir = cfg.working_dir().clone().filter(|w| !w.is_empty());
        image.user = cfg.user().clone().filter(|u| !u.is_empty());
        image.cmd = cfg.cmd().clone();
        image.entrypoint = cfg.entrypoint().clone();
        image.exposed_ports = cfg
            .exposed_ports()
            .iter()
            .flatten()
            .map(|p| (p.clone(), ir::Empty {}))
            .collect();
        image.volumes = cfg
            .volumes()
            .iter()
            .flatten()
            .map(|v| (v.clone(), ir::Empty {}))
            .collect();
        image.labels = cfg
            .labels()
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        image.stop_signal = cfg.stop_signal().clone().filter(|s| !s.is_empty());
    }
    image.onbuild = extras.on_build.unwrap_or_default();
    image.shell = extras.shell;
    image.healthcheck =
        extras
            .healthcheck
            .filter(|h| !h.test.is_empty())
            .map(|h| ir::Healthcheck {
                test: h.test,
                interval: h.interval,
                timeout: h.timeout,
                start_period: h.start_period,
                start_interval: h.start_interval,
                retries: h.retries,
            });
    Ok(Config {
        diff_ids,
        platform: format!("{}/{}", c.os(), c.architecture()),
        image,
    })
}

/// The OCI config JSON of a single-platform image Kiln makes itself (built-in bases).
pub fn make_config(
    diff_ids: &[Digest],
    env: &[String],
    cmd: &[String],
    created_by: &str,
) -> Result<Vec<u8>, OciError> {
    use oci_spec::image::{
        ConfigBuilder, HistoryBuilder, ImageConfigurationBuilder, RootFsBuilder,
    };
    let err = |e: oci_spec::OciSpecError| malformed("generated config", e);
    let config = ConfigBuilder::default()
        .env(env.to_vec())
        .cmd(cmd.to_vec())
        .build()
        .map_err(err)?;
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(err)?;
    let history = HistoryBuilder::default()
        .created("1970-01-01T00:00:00Z")
        .created_by(created_by)
        .build()
        .map_err(err)?;
    let c = ImageConfigurationBuilder::default()
        .created("1970-01-01T00:00:00Z")
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(config)
        .rootfs(rootfs)
        .history(vec![history])
        .build()
        .map_err(err)?;
    serde_json::to_vec(&c).map_err(|e| malformed("generated config", e))
}

/// The OCI manifest JSON for a config and layers (digest, size, media type).
pub fn make_manifest(
    config: (&Digest, u64),
    layers: &[(Digest, u64, String)],
) -> Result<Vec<u8>, OciError> {
    use oci_spec::image::{DescriptorBuilder, ImageManifestBuilder};
    let err = |e: oci_spec::OciSpecError| malformed("generated manifest", e);
    let desc = |mt: MediaType, d: &Digest, size: u64| -> Result<_, OciError> {
        let d: oci_spec::image::Digest = d.to_string().parse().map_err(err)?;
        DescriptorBuilder::default()
            .media_type(mt)
            .digest(d)
            .size(size)
            .build()
            .map_err(err)
    };
    let layers = layers
        .iter()
        .map(|(d, s, mt)| desc(MediaType::from(mt.as_str()), d, *s))
        .collect::<Result<Vec<_>, _>>()?;
    let m = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(desc(MediaType::ImageConfig, config.0, config.1)?)
        .layers(layers)
        .build()
        .map_err(err)?;
    serde_json::to_vec(&m).map_err(|e| malformed("generated manifest", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "A=b"], "Cmd": ["sh"], "WorkingDir": "/app", "User": "1000",
                   "ExposedPorts": {"8080/tcp": {}}, "Labels": {"k": "v"}, "Volumes": {"/data": {}},
                   "OnBuild": ["RUN echo hi"], "Shell": ["/bin/bash", "-c"],
                   "Healthcheck": {"Test": ["CMD", "true"], "Interval": 1000000000, "Retries": 3}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]}
    }"#;

    #[test]
    fn docker_config_fields_reach_the_ir_including_onbuild() {
        let c = parse_config(CONFIG.as_bytes(), "test config").expect("config");
        assert_eq!(c.platform, "linux/amd64");
        assert_eq!(c.diff_ids.len(), 1);
        let i = c.image;
        assert_eq!(i.env, ["PATH=/bin", "A=b"]);
        assert_eq!(i.cmd, Some(vec!["sh".into()]));
        assert_eq!(i.workdir.as_deref(), Some("/app"));
        assert_eq!(i.user.as_deref(), Some("1000"));
        assert!(i.exposed_ports.contains_key("8080/tcp"));
        assert!(i.volumes.contains_key("/data"));
        assert_eq!(i.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(i.onbuild, ["RUN echo hi"]);
        assert_eq!(i.shell, Some(vec!["/bin/bash".into(), "-c".into()]));
        assert_eq!(
            i.healthcheck.map(|h| (h.interval, h.retries)),
            Some((1_000_000_000, 3))
        );
    }

    #[test]
    fn index_picks_linux_amd64_past_other_platforms_and_attestations() {
        let idx = r#"{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
          {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1, "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
          {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 2, "digest": "sha256:3333333333333333333333333333333333333333333333333333333333333333", "platform": {"os": "unknown", "architecture": "unknown"}},
          {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 7, "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222", "platform": {"os": "linux", "architecture": "amd64"}}]}"#;
        let (d, size) = choose_platform(idx.as_bytes(), "idx").expect("amd64");
        assert_eq!((d.hex().as_bytes()[0], size), (b'2', 7));
        let arm_only = idx.replace("\"amd64\"", "\"s390x\"");
        let e = choose_platform(arm_only.as_bytes(), "idx").expect_err("no amd64");
        assert!(e.to_string().contains("linux/arm64"), "{e}");
    }

    #[test]
    fn generated_configs_and_manifests_parse_back() {
        let d = Digest::of(b"layer");
        let cfg = make_config(
            std::slice::from_ref(&d),
            &["PATH=/bin".into()],
            &["sh".into()],
            "kiln",
        )
        .expect("cfg");
        let c = parse_config(&cfg, "cfg").expect("parse");
        assert_eq!(
            (c.diff_ids, c.image.cmd),
            (vec![d.clone()], Some(vec!["sh".into()]))
        );
        let m = make_manifest(
            (&Digest::of(&cfg), cfg.len() as u64),
            &[(
                d.clone(),
                5,
                "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            )],
        )
        .expect("manifest");
        let m = parse_manifest(&m, "m").expect("parse");
        assert_eq!(
            m.layers,
            vec![(
                d,
                5,
                "application/vnd.oci.image.layer.v1.tar+gzip".to_string()
            )]
        );
    }
}
