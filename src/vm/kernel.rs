//! The guest kernel and its modules: where they are, which release, which `.ko` files the
//! initramfs needs.
//!
//! Looked for in order: `KILN_VM_KERNEL` (a bzImage; its modules beside it in a package tree
//! `…/boot/vmlinuz-R` → `…/lib/modules/R`, or in `/lib/modules/R`), the newest
//! `/boot/vmlinuz-*-cloud-amd64` (both through [`crate::doctor::find_kernel`]), a kernel Kiln
//! fetched before into `KILN_HOME/vm-v1/kernels/`, and last [`fetch`]: `apt-get download` of
//! the package `linux-image-cloud-amd64` depends on, unpacked with `dpkg -x` (about 2 s and
//! 27 MB; nothing is installed and no initramfs-tools run).
//!
//! The release comes from the bzImage header (`kernel_version` at offset 0x20e), so a kernel
//! under any file name finds its modules. Module dependencies come from each module's
//! `.modinfo` ELF section (`depends=`), since a package unpacked with `dpkg -x` has no
//! `modules.dep` (depmod runs at install time).

use super::VmError;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The bzImage.
    pub image: PathBuf,
    /// Its release (`6.1.0-57-cloud-amd64`).
    pub release: String,
    /// `lib/modules/RELEASE`, when there is one.
    pub modules: Option<PathBuf>,
}

/// The modules a builder VM needs (their dependencies are added): virtio over MMIO (how
/// `-M microvm` presents devices), disks, the serial control port, the NIC, overlayfs, ext4.
pub const NEEDED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "overlay",
    "ext4",
];

/// The Debian metapackage whose dependency is the current cloud kernel.
pub const CLOUD_PACKAGE: &str = "linux-image-cloud-amd64";

fn kerr(reason: impl Into<String>) -> VmError {
    VmError::Kernel {
        reason: reason.into(),
    }
}

/// The release string of a bzImage, from its setup header.
pub fn release_of(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]) as usize;
    let start = ptr.checked_add(0x200)?;
    let rest = image.get(start..start.checked_add(256)?.min(image.len()))?;
    let end = rest.iter().position(|b| *b == 0 || *b == b' ')?;
    let s = std::str::from_utf8(&rest[..end]).ok()?;
    (!s.is_empty()).then(|| s.to_string())
}

/// Reads `image`'s release and finds its modules directory.
pub fn open(image: &Path) -> Result<Kernel, VmError> {
    let mut head = vec![0u8; 64 << 10];
    let n = std::fs::File::open(image)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| kerr(format!("{}: {e}", image.display())))?;
    head.truncate(n);
    let release = release_of(&head).ok_or_else(|| {
        kerr(format!(
            "{} is not a bzImage (no kernel version in its header)",
            image.display()
        ))
    })?;
    let mut candidates = Vec::new();
    if let Some(root) = image.parent().and_then(Path::parent) {
        candidates.push(root.join("lib/modules").join(&release));
        candidates.push(root.join("usr/lib/modules").join(&release));
    }
    candidates.push(Path::new("/lib/modules").join(&release));
    let modules = candidates.into_iter().find(|p| p.join("kernel").is_dir());
    Ok(Kernel {
        image: image.to_path_buf(),
        release,
        modules,
    })
}

/// The guest kernel: `KILN_VM_KERNEL`, `/boot`, one fetched before into `vm_dir/kernels`, or
/// (with `fetch_missing`) one fetched now.
pub fn find(vm_dir: &Path, fetch_missing: bool) -> Result<Kernel, VmError> {
    let env = std::env::var_os(crate::envvars::KILN_VM_KERNEL).filter(|v| !v.is_empty());
    if env.is_some() {
        let p = crate::doctor::find_kernel(env.as_deref(), Path::new("/boot")).map_err(kerr)?;
        return open(&p);
    }
    if let Ok(p) = crate::doctor::find_kernel(None, Path::new("/boot"))
        && let Ok(k) = open(&p)
        && k.modules.is_some()
    {
        return Ok(k);
    }
    let kernels = vm_dir.join("kernels");
    if let Some(k) = fetched(&kernels) {
        return Ok(k);
    }
    if !fetch_missing {
        return Err(kerr(format!(
            "no {} set, no /boot/vmlinuz-*-cloud-amd64 with its modules, nothing in {}",
            crate::envvars::KILN_VM_KERNEL,
            kernels.display()
        )));
    }
    tracing::info!(
        package = CLOUD_PACKAGE,
        "fetching the guest kernel with apt-get download"
    );
    fetch(&kernels)
}

/// The newest kernel unpacked under `dir` (`dir/PACKAGE/boot/vmlinuz-*`).
fn fetched(dir: &Path) -> Option<Kernel> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let boot = e.path().join("boot");
            std::fs::read_dir(boot)
                .ok()?
                .flatten()
                .map(|b| b.path())
                .find(|p| {
                    p.file_name()
                        .and_then(OsStr::to_str)
                        .is_some_and(|n| n.starts_with("vmlinuz-"))
                })
        })
        .collect();
    found.sort();
    found
        .into_iter()
        .rev()
        .find_map(|p| open(&p).ok().filter(|k| k.modules.is_some()))
}

fn run(cmd: &mut Command) -> Result<String, VmError> {
    let out = cmd
        .output()
        .map_err(|e| kerr(format!("cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(kerr(format!(
            "{:?} {:?} failed: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The versioned package [`CLOUD_PACKAGE`] depends on, from the apt lists.
pub fn cloud_package() -> Result<String, VmError> {
    let deps = run(Command::new("apt-cache").args(["depends", "--important", CLOUD_PACKAGE]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|p| p.trim().trim_matches(|c| c == '<' || c == '>').to_string())
        .find(|p| p.starts_with("linux-image-") && p != CLOUD_PACKAGE)
        .ok_or_else(|| {
            kerr(format!(
                "apt-cache shows no kernel package under {CLOUD_PACKAGE} (run apt-get update?)"
            ))
        })
}

/// Downloads the current cloud kernel package and unpacks it into `dir/PACKAGE`.
pub fn fetch(dir: &Path) -> Result<Kernel, VmError> {
    let package = cloud_package()?;
    let dest = dir.join(&package);
    if let Some(k) = fetched(dir).filter(|k| k.image.starts_with(&dest)) {
        return Ok(k);
    }
    std::fs::create_dir_all(dir).map_err(VmError::prepare(format!("create {}", dir.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(VmError::prepare("create a download directory"))?;
    run(Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(tmp.path()))?;
    let deb = std::fs::read_dir(tmp.path())
        .map_err(VmError::prepare("read the download directory"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| kerr(format!("apt-get download {package} left no .deb")))?;
    let tree = tmp.path().join("tree");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))?;
    match std::fs::rename(&tree, &dest) {
        Ok(()) => {}
        // Another build fetched the same package meanwhile.
        Err(_) if dest.join("boot").is_dir() => {}
        Err(e) => {
            return Err(VmError::prepare(format!(
                "move the kernel into {}",
                dest.display()
            ))(e));
        }
    }
    fetched(dir)
        .filter(|k| k.image.starts_with(&dest))
        .ok_or_else(|| kerr(format!("{package} holds no usable vmlinuz and modules")))
}

/// One module for the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Its name (`virtio_blk`).
    pub name: String,
    /// The file in the kernel's tree (maybe compressed).
    pub path: PathBuf,
}

fn module_name(file: &OsStr) -> Option<String> {
    let n = file.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| n.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// `wanted` and everything they depend on, dependencies first. Modules built into the kernel
/// (`modules.builtin`) are skipped; one neither there nor built in is an error.
pub fn modules(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<Module>, VmError> {
    let Some(dir) = &kernel.modules else {
        return Err(kerr(format!(
            "no modules directory for {} (looked beside {} and in /lib/modules)",
            kernel.release,
            kernel.image.display()
        )));
    };
    let builtin: BTreeSet<String> = std::fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| module_name(Path::new(l).file_name()?))
        .collect();
    let mut index = BTreeMap::new();
    for e in walk(&dir.join("kernel")) {
        if let Some(n) = e.file_name().and_then(module_name) {
            index.entry(n).or_insert(e);
        }
    }
    let mut out: Vec<Module> = Vec::new();
    let mut seen = BTreeSet::new();
    // Depth-first post-order: a module after its dependencies.
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<Module>,
        release: &str,
    ) -> Result<(), VmError> {
        let name = name.replace('-', "_");
        if !seen.insert(name.clone()) || builtin.contains(&name) {
            return Ok(());
        }
        let path = index
            .get(&name)
            .ok_or_else(|| kerr(format!("kernel {release} has no module {name}")))?;
        let bytes = read_module(path)?;
        for dep in modinfo(&bytes, "depends").unwrap_or_default().split(',') {
            if !dep.is_empty() {
                visit(dep, index, builtin, seen, out, release)?;
            }
        }
        out.push(Module {
            name,
            path: path.clone(),
        });
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &builtin, &mut seen, &mut out, &kernel.release)?;
    }
    Ok(out)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A module file's content, decompressed.
pub fn read_module(path: &Path) -> Result<Vec<u8>, VmError> {
    let raw = std::fs::read(path).map_err(|e| kerr(format!("{}: {e}", path.display())))?;
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    let r = if name.ends_with(".xz") {
        liblzma::read::XzDecoder::new(&raw[..]).read_to_end(&mut out)
    } else if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(&raw[..]).and_then(|mut d| d.read_to_end(&mut out))
    } else if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out)
    } else {
        return Ok(raw);
    };
    r.map_err(|e| kerr(format!("cannot decompress {}: {e}", path.display())))?;
    Ok(out)
}

/// The value of `key` in an ELF module's `.modinfo` section (`key=value` strings).
pub fn modinfo(elf: &[u8], key: &str) -> Option<String> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    // ELF64, little endian.
    if elf.get(0..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(h)?,
            usize::try_from(u64_at(h + 0x18)?).ok()?,
            usize::try_from(u64_at(h + 0x20)?).ok()?,
        ))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = elf.get(stroff..stroff.checked_add(strsize)?)?;
    for i in 0..shnum {
        let (name, off, size) = section(i)?;
        let n = strtab.get(name as usize..)?;
        let n = &n[..n.iter().position(|b| *b == 0)?];
        if n != b".modinfo" {
            continue;
        }
        let data = elf.get(off..off.checked_add(size)?)?;
        let prefix = format!("{key}=");
        return data
            .split(|b| *b == 0)
            .filter_map(|s| std::str::from_utf8(s).ok())
            .find_map(|s| s.strip_prefix(&prefix).map(str::to_string));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_comes_from_the_setup_header() {
        let mut img = vec![0u8; 0x4000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x1000u16.to_le_bytes());
        let v = b"6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        img[0x1200..0x1200 + v.len()].copy_from_slice(v);
        assert_eq!(release_of(&img).as_deref(), Some("6.1.0-57-cloud-amd64"));
        img[0x202] = b'X';
        assert_eq!(release_of(&img), None);
        assert_eq!(release_of(&[0u8; 16]), None);
    }

    #[test]
    fn modinfo_reads_the_section_and_survives_garbage() {
        // A minimal ELF64: header, .modinfo data, .shstrtab, three section headers.
        let mut elf = vec![0u8; 0x40];
        elf[0..6].copy_from_slice(b"\x7fELF\x02\x01");
        let info = b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_blk\0";
        let info_off = elf.len();
        elf.extend_from_slice(info);
        let strtab = b"\0.modinfo\0.shstrtab\0";
        let str_off = elf.len();
        elf.extend_from_slice(strtab);
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, info_off, info.len());
        sh(10, str_off, strtab.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            modinfo(&elf, "depends").as_deref(),
            Some("virtio,virtio_ring")
        );
        assert_eq!(modinfo(&elf, "name").as_deref(), Some("virtio_blk"));
        assert_eq!(modinfo(&elf, "nothing"), None);
        for cut in [0, 10, 0x40, shoff, shoff + 70] {
            let _ = modinfo(&elf[..cut], "depends");
        }
        let mut bad = elf.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(modinfo(&bad, "depends"), None);
    }

    #[test]
    fn module_names_drop_extensions_and_dashes() {
        assert_eq!(
            module_name(OsStr::new("virtio-blk.ko.xz")).as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(
            module_name(OsStr::new("overlay.ko")).as_deref(),
            Some("overlay")
        );
        assert_eq!(module_name(OsStr::new("README")), None);
    }
}
