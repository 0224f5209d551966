//! The built-in bases, made on this machine with no registry: `kiln/busybox` (Debian's
//! static busybox, applet symlinks, `/etc/passwd`, `/etc/group`, `/etc/os-release`) and
//! `kiln/debian:bookworm` (`mmdebstrap --variant=minbase` from the host's configured Debian
//! mirror, without the host's `resolv.conf` and `hostname`). Each is made once per store and recorded like any
//! pulled image; its config (Env PATH, Cmd) is the one lowering already assumes
//! ([`crate::frontend::lower::builtin_config`]).

use super::config::{self, Layer, PLATFORM};
use super::digest::{Digest, HashReader, HashWriter, Hasher};
use super::error::OciError;
use super::pull::Progress;
use super::reference::Reference;
use super::store::{ImageRecord, Source, Store, Tee, now};
use super::unpack::unpack_layer;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The layer media type of the bases Kiln makes.
const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// One of the built-in bases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// `kiln/busybox:latest`.
    Busybox,
    /// `kiln/debian:bookworm` (also `kiln/debian:latest`).
    Debian,
}

impl Builtin {
    /// The built-in base a reference names, if any.
    pub fn of(r: &Reference) -> Option<Builtin> {
        if !r.is_builtin() || r.digest().is_some() {
            return None;
        }
        match (r.path(), r.tag()) {
            ("busybox", Some("latest")) => Some(Builtin::Busybox),
            ("debian", Some("bookworm" | "latest")) => Some(Builtin::Debian),
            _ => None,
        }
    }

    /// Its canonical reference.
    pub fn reference(self) -> Reference {
        let s = match self {
            Builtin::Busybox => "kiln/busybox:latest",
            Builtin::Debian => "kiln/debian:bookworm",
        };
        Reference::parse(s).expect("built-in references parse")
    }

    fn env_and_cmd(self) -> (Vec<String>, Vec<String>) {
        let name = match self {
            Builtin::Busybox => "kiln/busybox",
            Builtin::Debian => "kiln/debian:bookworm",
        };
        let c = crate::frontend::lower::builtin_config(name).unwrap_or_default();
        (c.env, c.cmd.unwrap_or_default())
    }
}

/// The record of built-in base `reference`, making it first if the store lacks it. Blocks
/// (runs `mmdebstrap` for Debian: about 20 s).
pub fn ensure(
    store: &Store,
    reference: &Reference,
    progress: &dyn Progress,
) -> Result<ImageRecord, OciError> {
    if let Some(rec) = store.image(reference)?
        && store.local(reference)?.is_some()
    {
        return Ok(rec);
    }
    let Some(which) = Builtin::of(reference) else {
        return Err(OciError::NoSuchBuiltin {
            reference: reference.familiar(),
        });
    };
    let canonical = which.reference();
    let _store = store.lock(false)?;
    let _making = store.lock_name(&canonical.to_string())?;
    let rec = match (store.image(&canonical)?, store.local(&canonical)?) {
        (Some(rec), Some(_)) => rec,
        _ => make(store, which, progress)?,
    };
    if Store::key(reference) != rec.reference {
        store.put_image(&ImageRecord {
            reference: Store::key(reference),
            ..rec.clone()
        })?;
    }
    Ok(rec)
}

fn make(store: &Store, which: Builtin, progress: &dyn Progress) -> Result<ImageRecord, OciError> {
    let canonical = which.reference();
    let (layer, created_by) = match which {
        Builtin::Busybox => {
            progress.note("making kiln/busybox from this machine's busybox-static");
            busybox_layer(store)?
        }
        Builtin::Debian => {
            progress.note("making kiln/debian:bookworm with mmdebstrap from the configured Debian mirror (first use; about 20 s)");
            debian_layer(store)?
        }
    };
    let (env, cmd) = which.env_and_cmd();
    let cfg = config::make_config(
        std::slice::from_ref(&layer.diff_id),
        &env,
        &cmd,
        &created_by,
    )?;
    let cfg_digest = store.put_blob(&cfg)?;
    let manifest = config::make_manifest(
        (&cfg_digest, cfg.len() as u64),
        &[(layer.digest.clone(), layer.size, layer.media_type.clone())],
    )?;
    let digest = store.put_blob(&manifest)?;
    let rec = ImageRecord {
        reference: Store::key(&canonical),
        digest: digest.clone(),
        platform_digest: digest,
        platform: PLATFORM.to_string(),
        config: cfg_digest,
        layers: vec![layer],
        source: Source::Builtin,
        created_at: now(),
    };
    store.put_image(&rec)?;
    Ok(rec)
}

fn tool(tool: &'static str, detail: impl Into<String>) -> OciError {
    OciError::Tool {
        tool,
        detail: detail.into(),
    }
}

/// The first of `names` found on `PATH` or in the standard directories.
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    let dirs: Vec<PathBuf> = dirs.collect();
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// True when `elf` has no `PT_INTERP` program header, i.e. is statically linked.
fn is_static_elf(elf: &[u8]) -> bool {
    let rd16 = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let rd64 = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    };
    // 64-bit little-endian ELF only (what amd64 busybox is).
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd64(0x20), rd16(0x36), rd16(0x38)) else {
        return false;
    };
    (0..phnum).all(|i| {
        let p_type = elf
            .get(phoff + i * phentsize..phoff + i * phentsize + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        p_type != Some(3) // PT_INTERP
    })
}

/// A tar entry header with root ownership and mtime 0 (the bases are reproducible).
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// The busybox layer: the tar is built in memory (about 2 MB), gzipped, and ingested like
/// a pulled layer.
fn busybox_layer(store: &Store) -> Result<(Layer, String), OciError> {
    let bb = find_program(&["busybox"]).ok_or_else(|| {
        tool(
            "busybox",
            "not found; install Debian's busybox-static (apt-get install busybox-static)",
        )
    })?;
    let binary = std::fs::read(&bb).map_err(OciError::io("read", &bb))?;
    if !is_static_elf(&binary) {
        return Err(tool(
            "busybox",
            format!(
                "{} is dynamically linked; install busybox-static (apt-get install busybox-static)",
                bb.display()
            ),
        ));
    }
    let out = Command::new(&bb)
        .arg("--list-full")
        .output()
        .map_err(|e| tool("busybox", format!("cannot run {}: {e}", bb.display())))?;
    if !out.status.success() {
        return Err(tool("busybox", "`busybox --list-full` failed"));
    }
    let mut applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty() && !l.contains("..") && l != "bin/busybox")
        .collect();
    applets.sort();
    applets.dedup();

    let mut b = tar::Builder::new(Vec::new());
    let tar_err = |e: std::io::Error| tool("busybox", format!("building the layer: {e}"));
    let dirs: &[(&str, u32)] = &[
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sbin", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("var", 0o755),
        ("var/tmp", 0o1777),
    ];
    let mut root = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut root, "./", std::io::empty())
        .map_err(tar_err)?;
    for (d, mode) in dirs {
        let mut h = header(tar::EntryType::Directory, *mode, 0);
        b.append_data(&mut h, format!("{d}/"), std::io::empty())
            .map_err(tar_err)?;
    }
    let files: [(&str, u32, &[u8]); 4] = [
        ("bin/busybox", 0o755, &binary),
        (
            "etc/os-release",
            0o644,
            b"NAME=\"Kiln busybox\"\nID=kiln-busybox\nPRETTY_NAME=\"Kiln busybox (Debian busybox-static)\"\nHOME_URL=\"https://busybox.net/\"\n",
        ),
        (
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        ),
        ("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n"),
    ];
    for (name, mode, data) in files {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        b.append_data(&mut h, name, data).map_err(tar_err)?;
    }
    for a in &applets {
        // Only applets in the usual bin directories (not `/linuxrc`).
        match a.rsplit_once('/') {
            Some((dir, _)) if dirs.iter().any(|(d, _)| d == &dir) => {}
            _ => continue,
        }
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, a, "/bin/busybox").map_err(tar_err)?;
    }
    let tar = b.into_inner().map_err(tar_err)?;
    let diff_id = Digest::of(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).map_err(tar_err)?;
    let gz = gz.finish().map_err(tar_err)?;
    let layer = Layer {
        digest: Digest::of(&gz),
        size: gz.len() as u64,
        media_type: GZIP_LAYER.to_string(),
        diff_id,
    };
    let _lock = store.lock_layer(&layer.diff_id)?;
    let need_blob = !store.has_blob(&layer.digest);
    let need_dir = !store.has_layer(&layer.diff_id);
    if need_blob || need_dir {
        store.ingest_layer(&gz[..], &layer, need_blob, need_dir)?;
    }
    Ok((
        layer,
        format!(
            "kiln: busybox-static from {}, {} applets",
            bb.display(),
            applets.len()
        ),
    ))
}

/// The host's Debian sources, as envlab found works: `sources.list.d/debian.sources`, else
/// `sources.list`; `None` lets mmdebstrap use its default mirror.
fn host_sources() -> Option<PathBuf> {
    let out = Command::new("apt-config")
        .args([
            "shell",
            "PARTS",
            "Dir::Etc::sourceparts/d",
            "LIST",
            "Dir::Etc::sourcelist/f",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| PathBuf::from(v.trim().trim_matches('\'')))
    };
    let parts = value("PARTS").map(|p| p.join("debian.sources"));
    let list = value("LIST");
    [parts, list]
        .into_iter()
        .flatten()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0))
}

/// The Debian layer: mmdebstrap writes a tar to stdout, which is gzipped into the blob and
/// unpacked in the same pass.
fn debian_layer(store: &Store) -> Result<(Layer, String), OciError> {
    let mmdebstrap = find_program(&["mmdebstrap"]).ok_or_else(|| {
        tool(
            "mmdebstrap",
            "not found; install it (apt-get install mmdebstrap)",
        )
    })?;
    let sources = host_sources();
    let mut cmd = Command::new(&mmdebstrap);
    cmd.args([
        "--variant=minbase",
        "--format=tar",
        "--quiet",
        "--aptopt=Acquire::Check-Valid-Until \"false\"",
        // The host's resolver and name must not leak into the image.
        "--customize-hook=rm -f \"$1\"/etc/resolv.conf \"$1\"/etc/hostname",
        "bookworm",
        "-",
    ]);
    if let Some(s) = &sources {
        cmd.arg(s);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        tool(
            "mmdebstrap",
            format!("cannot run {}: {e}", mmdebstrap.display()),
        )
    })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| tool("mmdebstrap", "no stdout"))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| tool("mmdebstrap", "no stderr"))?;
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let blob_tmp = tempfile::Builder::new()
        .prefix("oci-blob-")
        .tempfile_in(store.tmp())
        .map_err(OciError::io("create temp blob in", store.tmp()))?;
    let dir_tmp = tempfile::Builder::new()
        .prefix("oci-layer-")
        .tempdir_in(store.tmp())
        .map_err(OciError::io("create temp layer in", store.tmp()))?;
    let gz = flate2::write::GzEncoder::new(
        HashWriter::new(BufWriter::with_capacity(1 << 20, blob_tmp.as_file())),
        flate2::Compression::fast(),
    );
    let tee = Tee {
        inner: stdout,
        out: Some(gz),
        hasher: Hasher::new(),
    };
    let opts = store.unpack_options().clone();
    let mut tar =
        std::io::BufReader::with_capacity(512 << 10, HashReader::new(tee, opts.max_bytes));
    let unpacked = unpack_layer(&mut tar, dir_tmp.path(), &opts).and_then(|_| {
        std::io::copy(&mut tar, &mut std::io::sink())
            .map(drop)
            .map_err(super::unpack::UnpackError::Read)
    });
    if let Err(e) = unpacked {
        // Close the pipe first, or mmdebstrap blocks writing to it and never exits.
        drop(tar);
        let _ = child.kill();
        let _ = child.wait();
        return Err(tool(
            "mmdebstrap",
            format!(
                "its output cannot be unpacked: {}",
                super::client::describe(&e)
            ),
        ));
    }
    let status = child.wait();
    let stderr = errors.join().unwrap_or_default();
    let tail = |s: &str| {
        s.lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    };
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            return Err(tool(
                "mmdebstrap",
                format!("exited with {s}:\n{}", tail(&stderr)),
            ));
        }
        Err(e) => return Err(tool("mmdebstrap", format!("wait: {e}"))),
    }
    let (tee, diff_id, _) = tar.into_inner().into_parts();
    let (gz, _, _) = tee.into_parts();
    let w = gz
        .ok_or_else(|| tool("mmdebstrap", "no blob writer"))?
        .finish()
        .map_err(OciError::io("write blob", store.tmp()))?;
    let (mut w, digest, size) = w.finish();
    w.flush().map_err(OciError::io("write blob", store.tmp()))?;
    drop(w);
    let layer = Layer {
        digest,
        size,
        media_type: GZIP_LAYER.to_string(),
        diff_id,
    };
    for gone in ["etc/resolv.conf", "etc/hostname"] {
        if Path::new(&dir_tmp.path().join(gone)).exists() {
            return Err(tool("mmdebstrap", format!("{gone} was left in the image")));
        }
    }
    let _lock = store.lock_layer(&layer.diff_id)?;
    let blob = (!store.has_blob(&layer.digest)).then_some(blob_tmp);
    let dir = (!store.has_layer(&layer.diff_id)).then_some(dir_tmp);
    store.commit_layer(blob, dir, &layer)?;
    let from = sources.map_or("mmdebstrap's default mirror".to_string(), |s| {
        s.display().to_string()
    });
    Ok((
        layer,
        format!("kiln: mmdebstrap --variant=minbase bookworm ({from})"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_names_and_aliases_resolve() {
        let of = |s: &str| Builtin::of(&Reference::parse(s).expect("ref"));
        assert_eq!(of("kiln/busybox"), Some(Builtin::Busybox));
        assert_eq!(of("kiln/debian:bookworm"), Some(Builtin::Debian));
        assert_eq!(of("kiln/debian"), Some(Builtin::Debian));
        assert_eq!(of("kiln/debian:trixie"), None);
        assert_eq!(of("docker.io/kiln/busybox"), None);
    }

    #[test]
    fn builtin_configs_match_what_lowering_assumes() {
        let (env, cmd) = Builtin::Busybox.env_and_cmd();
        assert_eq!(env, [format!("PATH={}", crate::ir::DEFAULT_PATH)]);
        assert_eq!(cmd, ["sh"]);
        assert_eq!(Builtin::Debian.env_and_cmd().1, ["bash"]);
    }

    #[test]
    fn static_elf_is_told_from_dynamic() {
        if let Some(bb) = find_program(&["busybox"]) {
            assert!(is_static_elf(&std::fs::read(bb).expect("read")));
        }
        let sh = std::fs::read("/bin/sh").expect("/bin/sh");
        assert!(!is_static_elf(&sh), "/bin/sh is dynamic on Debian");
        assert!(!is_static_elf(b"#!/bin/sh"));
    }
}
