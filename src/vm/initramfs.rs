//! The initramfs of a builder VM: the static agent as `/init`, the kernel modules it loads
//! (`/lib/modules/NAME.ko`, in load order in `/lib/modules/order`), and `/dev/console`.
//!
//! Written as an uncompressed cpio "newc" archive (the kernel's initramfs format; under TCG
//! unpacking a few MB of uncompressed cpio is faster than inflating it). Images are cached in
//! `KILN_HOME/vm-v1/initramfs/` under a digest of their content, so a new agent or kernel
//! makes a new one and an unchanged pair reuses the file.

use super::VmError;
use super::kernel::{self, Kernel};
use sha2::{Digest, Sha256};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A cpio "newc" writer.
pub struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

/// One cpio entry's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// A directory.
    Dir,
    /// A regular file with this content.
    File(&'a [u8]),
    /// A character device (major, minor).
    Char(u32, u32),
}

impl<W: Write> Cpio<W> {
    /// A writer into `out`.
    pub fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    /// Appends `name` (no leading `/`) with permission bits `mode`, owned by root.
    pub fn add(&mut self, name: &str, mode: u32, entry: Entry<'_>) -> io::Result<()> {
        let (kind, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir => (0o040000, &[], (0, 0)),
            Entry::File(d) => (0o100000, d, (0, 0)),
            Entry::Char(ma, mi) => (0o020000, &[], (ma, mi)),
        };
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        self.header(name, kind | (mode & 0o7777), size, rdev)?;
        self.put(data)?;
        self.pad()
    }

    fn header(&mut self, name: &str, mode: u32, size: u32, rdev: (u32, u32)) -> io::Result<()> {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        let mut h = String::from("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The initramfs for `agent` on `kernel`, made (or found) under `dir`.
pub fn ensure(dir: &Path, agent: &Path, kernel: &Kernel) -> Result<PathBuf, VmError> {
    let agent_bytes = std::fs::read(agent).map_err(|e| VmError::Agent {
        reason: format!("{}: {e}", agent.display()),
    })?;
    let modules = kernel::modules(kernel, kernel::NEEDED_MODULES)?;
    let mut contents = Vec::with_capacity(modules.len());
    let mut h = Sha256::new();
    h.update(b"kiln-initramfs-v1\0");
    h.update(&agent_bytes);
    for m in &modules {
        let bytes = kernel::read_module(&m.path)?;
        h.update(m.name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
        contents.push((m.name.clone(), bytes));
    }
    let digest = hex::encode(h.finalize());
    let path = dir.join(format!("{}-{}.cpio", kernel.release, &digest[..16]));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(VmError::prepare(format!("create {}", dir.display())))?;
    let write = || -> io::Result<()> {
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        let mut c = Cpio::new(io::BufWriter::new(tmp.as_file()));
        for d in ["dev", "proc", "sys", "lib", "lib/modules"] {
            c.add(d, 0o755, Entry::Dir)?;
        }
        c.add("dev/console", 0o600, Entry::Char(5, 1))?;
        c.add("init", 0o755, Entry::File(&agent_bytes))?;
        let mut order = String::new();
        for (name, bytes) in &contents {
            let file = format!("{name}.ko");
            c.add(&format!("lib/modules/{file}"), 0o644, Entry::File(bytes))?;
            order.push_str(&file);
            order.push('\n');
        }
        c.add("lib/modules/order", 0o644, Entry::File(order.as_bytes()))?;
        c.finish()?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    };
    write().map_err(VmError::prepare(format!(
        "write the initramfs {}",
        path.display()
    )))?;
    tracing::debug!(path = %path.display(), modules = contents.len(), "initramfs written");
    prune(dir, &kernel.release, &path);
    Ok(path)
}

/// Removes the initramfs images of `release` other than `keep` (an earlier agent's): a VM
/// that booted one already holds it open, and the next build makes it again if needed.
fn prune(dir: &Path, release: &str, keep: &Path) {
    let prefix = format!("{release}-");
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix)
            && name.ends_with(".cpio")
            && e.path() != keep
            && let Err(err) = std::fs::remove_file(e.path())
        {
            tracing::debug!(path = %e.path().display(), %err, "old initramfs left");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_end_with_a_trailer() {
        let mut c = Cpio::new(Vec::new());
        c.add("init", 0o755, Entry::File(b"abc")).unwrap();
        c.add("dev", 0o755, Entry::Dir).unwrap();
        c.add("dev/console", 0o600, Entry::Char(5, 1)).unwrap();
        let out = c.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // First header: mode 0100755, size 3, name "init".
        let h = std::str::from_utf8(&out[..110]).unwrap();
        assert_eq!(&h[14..22], "000081ed");
        assert_eq!(&h[54..62], "00000003");
        assert_eq!(&out[110..115], b"init\0");
        // Data after the 4-aligned name: 110 + 5 = 115 → 116.
        assert_eq!(&out[116..119], b"abc");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("dev/console"));
        // The console node: mode 020600, rdev 5:1.
        let at = text.find("dev/console").unwrap() - 110;
        assert_eq!(&text[at + 14..at + 22], "00002180");
        assert_eq!(&text[at + 78..at + 86], "00000005");
        assert_eq!(&text[at + 86..at + 94], "00000001");
        // The trailer's name, its NUL and 3 bytes of padding (110 + 11 → 124).
        assert!(out.ends_with(b"TRAILER!!!\0\0\0\0"));
    }
}
