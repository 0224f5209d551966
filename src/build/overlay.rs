//! One overlayfs mount per build step: read-only lower layers (top first), one upper and one
//! work directory, unmounted by a guard.
//!
//! Owns the mount and its option encoding; it does not create or delete the layer
//! directories (the driver does) and knows nothing of what runs on top.
//!
//! The upper directory after unmount is the step's layer: a deleted lower file is a whiteout
//! (char device 0:0), a replaced lower directory is opaque (`trusted.overlay.opaque=y`).
//! `redirect_dir`, `metacopy` and `index` are switched off so every upper layer is
//! self-contained: renamed lower directories are copied, not recorded as redirects.
//!
//! Long stacks. The classic `mount(2)` data string is limited to one page (4096 bytes,
//! terminator included), so `lowerdir=a:b:…` fits only about 4000 bytes of paths (computed:
//! 50 lowers of 80-byte paths, 26 of 150 bytes). The new mount API has no such limit: each
//! lower is a separate `fsconfig(…, "lowerdir+", path)` call (Linux 6.8+), so a stack is
//! limited only by overlayfs's own maximum of 500 layers ([`MAX_LOWERS`], the kernel's
//! `OVL_MAX_STACK`; `tests/namespace.rs` mounts 500 lowers of about 100-byte paths, 50 KB of paths,
//! on this host's 6.18 kernel). [`mount`] uses `lowerdir+` and falls back to the classic string
//! (error [`OverlayError::OptionsTooLong`] when it does not fit) on kernels
//! without it; a caller with more than [`MAX_LOWERS`] layers has to flatten some first.

use super::sys;
use nix::mount::{MntFlags, MsFlags};
use std::ffi::CString;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// overlayfs's maximum stack depth (`OVL_MAX_STACK`).
pub const MAX_LOWERS: usize = 500;

/// The classic mount data limit: one page, including the terminating NUL.
pub const LEGACY_OPTIONS_MAX: usize = 4095;

/// What went wrong mounting or unmounting an overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// More lowers than overlayfs stacks.
    #[error("{count} lower layers; overlayfs stacks at most {MAX_LOWERS}: flatten some first")]
    TooManyLowers {
        /// How many were given.
        count: usize,
    },
    /// A path cannot be passed to the kernel (a NUL byte, or a `:`/`,`/`\` in the classic
    /// option string).
    #[error("{path}: cannot be used as an overlay directory")]
    BadPath {
        /// The path.
        path: PathBuf,
    },
    /// The kernel has no `lowerdir+` and the classic option string is longer than a page.
    #[error("overlay options are {len} bytes, more than the {LEGACY_OPTIONS_MAX} a mount takes")]
    OptionsTooLong {
        /// The string's length.
        len: usize,
    },
    /// The empty lower used for an empty stack could not be created.
    #[error("cannot create the empty lower directory {path}")]
    EmptyLower {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the mount.
    #[error("mounting overlay on {target} failed{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// The kernel's message from the filesystem context, if any.
        detail: Option<String>,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Unmounting failed even lazily.
    #[error("unmounting overlay at {target} failed")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The directories of one overlay.
#[derive(Debug, Clone)]
pub struct Layers<'a> {
    /// Read-only layers, top first. May be empty (a scratch base).
    pub lowers: &'a [PathBuf],
    /// The writable layer.
    pub upper: &'a Path,
    /// overlayfs's scratch directory: empty, on the same filesystem as `upper`.
    pub work: &'a Path,
}

/// A mounted overlay; unmounts on drop (lazily if still busy).
#[derive(Debug)]
pub struct Overlay {
    target: PathBuf,
    empty_lower: Option<PathBuf>,
    mounted: bool,
}

impl Overlay {
    /// The merged view.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting errors (drop does the same but can only log them). Falls back
    /// to a lazy unmount when the mount is busy.
    pub fn unmount(mut self) -> Result<(), OverlayError> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> Result<(), OverlayError> {
        if !self.mounted {
            return Ok(());
        }
        let r = match nix::mount::umount2(&self.target, MntFlags::empty()) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => {
                tracing::warn!(target = %self.target.display(), "overlay busy, detaching lazily");
                nix::mount::umount2(&self.target, MntFlags::MNT_DETACH)
            }
            Err(e) => Err(e),
        };
        self.mounted = false;
        if let Some(empty) = self.empty_lower.take() {
            let _ = std::fs::remove_dir(empty);
        }
        r.map_err(|e| OverlayError::Unmount {
            target: self.target.clone(),
            source: io::Error::from(e),
        })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            tracing::error!(error = %e, "overlay left mounted");
        }
    }
}

fn cpath(p: &Path) -> Result<CString, OverlayError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| OverlayError::BadPath {
        path: p.to_path_buf(),
    })
}

/// Mounts `layers` on `target` (an existing directory). With no lowers, an empty directory
/// beside `work` stands in (overlayfs needs at least one).
pub fn mount(layers: &Layers<'_>, target: &Path) -> Result<Overlay, OverlayError> {
    if layers.lowers.len() > MAX_LOWERS {
        return Err(OverlayError::TooManyLowers {
            count: layers.lowers.len(),
        });
    }
    let mut empty_lower = None;
    let lowers: Vec<PathBuf> = if layers.lowers.is_empty() {
        let mut name = layers.work.as_os_str().to_owned();
        name.push(".empty");
        let empty = PathBuf::from(name);
        match std::fs::create_dir(&empty) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(OverlayError::EmptyLower {
                    path: empty,
                    source,
                });
            }
        }
        empty_lower = Some(empty.clone());
        vec![empty]
    } else {
        layers.lowers.to_vec()
    };
    let result = match mount_fsconfig(&lowers, layers, target) {
        Err(OverlayError::Mount { source, .. }) if source.raw_os_error() == Some(libc::ENOSYS) => {
            mount_legacy(&lowers, layers, target)
        }
        // Kernels before 6.8 reject the `lowerdir+` key itself; those before 6.5 (overlayfs
        // on the legacy mount API, such as a builder VM's 6.1) only at create time, with
        // EINVAL and nothing in the context's log.
        Err(OverlayError::Mount {
            detail: Some(d), ..
        }) if d.contains("lowerdir+") => mount_legacy(&lowers, layers, target),
        Err(OverlayError::Mount {
            detail: None,
            source,
            ..
        }) if source.raw_os_error() == Some(libc::EINVAL) => mount_legacy(&lowers, layers, target),
        r => r,
    };
    match result {
        Ok(()) => Ok(Overlay {
            target: target.to_path_buf(),
            empty_lower,
            mounted: true,
        }),
        Err(e) => {
            if let Some(empty) = empty_lower {
                let _ = std::fs::remove_dir(empty);
            }
            Err(e)
        }
    }
}

/// Options that keep each upper layer self-contained (see the module docs).
const FIXED_OPTIONS: [(&std::ffi::CStr, &std::ffi::CStr); 3] = [
    (c"redirect_dir", c"off"),
    (c"index", c"off"),
    (c"metacopy", c"off"),
];

fn mount_fsconfig(
    lowers: &[PathBuf],
    layers: &Layers<'_>,
    target: &Path,
) -> Result<(), OverlayError> {
    let err = |detail: Option<String>, source: io::Error| OverlayError::Mount {
        target: target.to_path_buf(),
        detail,
        source,
    };
    let fs = sys::fsopen(c"overlay").map_err(|e| err(None, e))?;
    // The context's log holds the kernel's reason for a refusal ("e overlay: …").
    let log = |fs: &std::os::fd::OwnedFd| -> Option<String> {
        let mut msgs = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = nix::unistd::read(fs.as_fd(), &mut buf) {
            if n == 0 {
                break;
            }
            msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        (!msgs.is_empty()).then(|| msgs.join("; "))
    };
    let set = |key: &std::ffi::CStr, value: &std::ffi::CStr| {
        sys::fsconfig_string(fs.as_fd(), key, value).map_err(|e| err(log(&fs), e))
    };
    set(c"source", c"kiln")?;
    for l in lowers {
        set(c"lowerdir+", &cpath(l)?)?;
    }
    set(c"upperdir", &cpath(layers.upper)?)?;
    set(c"workdir", &cpath(layers.work)?)?;
    for (k, v) in FIXED_OPTIONS {
        set(k, v)?;
    }
    sys::fsconfig_create(fs.as_fd()).map_err(|e| err(log(&fs), e))?;
    let mnt = sys::fsmount(fs.as_fd()).map_err(|e| err(log(&fs), e))?;
    sys::move_mount(mnt.as_fd(), &cpath(target)?).map_err(|e| err(None, e))
}

/// The classic option string, or why it cannot be built.
pub fn legacy_options(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
) -> Result<String, OverlayError> {
    let enc = |p: &Path| -> Result<String, OverlayError> {
        match p.to_str() {
            Some(s) if !s.contains([':', ',', '\\']) => Ok(s.to_string()),
            _ => Err(OverlayError::BadPath {
                path: p.to_path_buf(),
            }),
        }
    };
    let lower = lowers
        .iter()
        .map(|l| enc(l))
        .collect::<Result<Vec<_>, _>>()?;
    let mut s = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        enc(upper)?,
        enc(work)?
    );
    for (k, v) in FIXED_OPTIONS {
        s.push_str(&format!(",{}={}", k.to_string_lossy(), v.to_string_lossy()));
    }
    if s.len() > LEGACY_OPTIONS_MAX {
        return Err(OverlayError::OptionsTooLong { len: s.len() });
    }
    Ok(s)
}

fn mount_legacy(
    lowers: &[PathBuf],
    layers: &Layers<'_>,
    target: &Path,
) -> Result<(), OverlayError> {
    let data = legacy_options(lowers, layers.upper, layers.work)?;
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| OverlayError::Mount {
        target: target.to_path_buf(),
        detail: None,
        source: io::Error::from(e),
    })
}

/// Decodes a path field of `/proc/self/mountinfo` (space, tab, newline and backslash are
/// written as `\ooo`).
fn unescape_mountinfo(field: &str) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    std::ffi::OsString::from_vec(out).into()
}

/// Unmounts every mount of this mount namespace at or below `dir`, deepest first (lazily when
/// busy): what a killed process left mounted there. Returns how many. `dir` is resolved
/// first (mountinfo holds canonical paths), so a relative or symlinked path finds them too.
pub fn unmount_under(dir: &Path) -> io::Result<usize> {
    let dir = &std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deeper paths sort after their parents; a path mounted twice is unmounted twice.
    points.sort();
    let mut n = 0;
    for p in points.iter().rev() {
        match nix::mount::umount2(p, MntFlags::empty()) {
            Ok(()) => n += 1,
            Err(nix::errno::Errno::EBUSY) => {
                nix::mount::umount2(p, MntFlags::MNT_DETACH).map_err(io::Error::from)?;
                n += 1;
            }
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(
            unescape_mountinfo(r"/a\040b\011c\134d\12"),
            PathBuf::from("/a b\tc\\d\\12")
        );
    }

    #[test]
    fn legacy_options_reject_separator_characters() {
        let r = legacy_options(&[PathBuf::from("/a:b")], Path::new("/u"), Path::new("/w"));
        assert!(matches!(r, Err(OverlayError::BadPath { .. })));
    }

    #[test]
    fn legacy_options_longer_than_a_page_are_refused() {
        let lowers: Vec<PathBuf> = (0..60)
            .map(|i| PathBuf::from(format!("/{}{i:04}", "x".repeat(70))))
            .collect();
        let r = legacy_options(&lowers, Path::new("/u"), Path::new("/w"));
        assert!(matches!(r, Err(OverlayError::OptionsTooLong { len }) if len > 4095));
        let ok = legacy_options(&lowers[..40], Path::new("/u"), Path::new("/w")).unwrap();
        assert!(ok.starts_with("lowerdir=/x") && ok.ends_with("metacopy=off"));
    }

    #[test]
    fn more_than_max_lowers_are_refused_before_mounting() {
        let lowers: Vec<PathBuf> = (0..=MAX_LOWERS)
            .map(|i| PathBuf::from(format!("/l{i}")))
            .collect();
        let layers = Layers {
            lowers: &lowers,
            upper: Path::new("/nonexistent/u"),
            work: Path::new("/nonexistent/w"),
        };
        let r = mount(&layers, Path::new("/nonexistent/m"));
        assert!(matches!(r, Err(OverlayError::TooManyLowers { count: 501 })));
    }
}
