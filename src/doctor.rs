//! What this host can build with: probes for each builder's needs, and the verdict per builder.
//!
//! Owns the probes `kiln doctor` prints and `--builder auto` (and the microvm builder) decide
//! with: namespaces (each one really unshared in a forked child), overlayfs (really mounted
//! in a scratch directory, a file written and one deleted through it), cgroup limits (through
//! [`crate::build::cgroup::report`]), KVM, QEMU, the guest kernel, `mkfs.ext4`, and running
//! as root. It changes nothing on the host: every probe cleans up after itself.
//!
//! KVM. `/dev/kvm` alone does not mean hardware virtualisation: on a host whose KVM is PVM
//! (`/sys/module/kvm_pvm`, as on this project's machines, see `research/vmlab.md`) the ioctls
//! work but a stock guest kernel aborts or crawls in KVM's instruction emulator. So KVM is
//! the accelerator only when `/dev/kvm` answers `KVM_GET_API_VERSION` *and* the CPU shows
//! `vmx` or `svm`; otherwise the microvm builder runs under QEMU's TCG (software emulation).
//!
//! The probes are free functions returning plain values so callers pick what they need:
//! [`microvm`] is the microvm builder's whole verdict (QEMU + kernel + accelerator), [`kvm`]
//! and [`accel_for`] the accelerator alone, [`namespace`] the namespace builder's.

use crate::build::cgroup;
use crate::build::overlay::{self, Layers};
use serde::Serialize;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One probe's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable name (`namespaces.user`, `overlayfs`, `kvm`, …).
    pub name: &'static str,
    /// It works (or, for informational checks, is present).
    pub ok: bool,
    /// What was found, or why not.
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, r: Result<String, String>) -> Check {
        match r {
            Ok(detail) => Check {
                name,
                ok: true,
                detail,
            },
            Err(detail) => Check {
                name,
                ok: false,
                detail,
            },
        }
    }
}

/// How a microVM's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accel {
    /// The QEMU `-accel` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The namespace builder's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceVerdict {
    /// It can build here.
    pub ok: bool,
    /// Why not (absent when ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The microvm builder's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MicrovmVerdict {
    /// QEMU, a guest kernel and an accelerator are all there.
    pub ok: bool,
    /// The accelerator it would use.
    pub accel: Accel,
    /// Why not, or what the accelerator choice rests on.
    pub reason: String,
    /// `qemu-system-x86_64`, when found.
    #[serde(skip)]
    pub qemu: Option<PathBuf>,
    /// The guest kernel, when found.
    #[serde(skip)]
    pub kernel: Option<PathBuf>,
}

/// Both builders' verdicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Builders {
    /// Linux namespaces + overlayfs on this host.
    pub namespace: NamespaceVerdict,
    /// A QEMU microVM.
    pub microvm: MicrovmVerdict,
}

/// Everything `kiln doctor` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The verdict per builder.
    pub builders: Builders,
    /// Every probe, in the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    /// At least one builder works.
    pub fn any_builder(&self) -> bool {
        self.builders.namespace.ok || self.builders.microvm.ok
    }
}

/// Runs every probe. `scratch` is where the overlayfs probe mounts (use the directory the
/// builder's layers live on: overlayfs needs xattrs and whiteouts on that file system).
pub fn diagnose(scratch: &Path) -> Report {
    let mut checks = host_checks(scratch);
    let kvm = kvm();
    checks.push(Check {
        name: "kvm",
        ok: kvm.accel == Accel::Kvm,
        detail: kvm.reason.clone(),
    });
    let qemu = qemu();
    checks.push(Check::new(
        "qemu",
        qemu.as_ref()
            .map(|q| format!("{} ({})", q.version, q.path.display()))
            .map_err(Clone::clone),
    ));
    let kernel = guest_kernel();
    checks.push(Check::new(
        "guest_kernel",
        kernel
            .as_ref()
            .map(|k| k.display().to_string())
            .map_err(Clone::clone),
    ));
    checks.push(Check::new("mkfs.ext4", mkfs_ext4()));
    let namespace = namespace_verdict(&checks);
    let microvm = microvm_verdict(qemu, kernel, kvm);
    Report {
        builders: Builders { namespace, microvm },
        checks,
    }
}

/// The namespace builder's verdict alone (runs only the probes it needs).
pub fn namespace(scratch: &Path) -> NamespaceVerdict {
    namespace_verdict(&host_checks(scratch))
}

/// Root, each namespace, overlayfs and cgroups: what the namespace builder rests on.
fn host_checks(scratch: &Path) -> Vec<Check> {
    let mut checks = vec![Check::new("root", root())];
    for (name, flag) in NAMESPACES {
        checks.push(Check::new(name, unshare_probe(*flag)));
    }
    checks.push(Check::new("overlayfs", overlayfs(scratch)));
    checks.push(Check::new("cgroups", cgroups()));
    checks
}

/// Whether `auto` picks the microvm builder and runtime: only where KVM works (TCG is too
/// slow to be chosen unasked) and QEMU and a kernel are there.
pub fn microvm_preferred() -> bool {
    kvm().accel == Accel::Kvm && microvm().ok
}

/// The microvm builder's verdict alone: QEMU, a guest kernel and the accelerator.
pub fn microvm() -> MicrovmVerdict {
    microvm_verdict(qemu(), guest_kernel(), kvm())
}

/// Checks the namespace builder needs; the others are informational.
const NAMESPACE_NEEDS: &[&str] = &[
    "root",
    "namespaces.user",
    "namespaces.mount",
    "namespaces.pid",
    "namespaces.uts",
    "namespaces.ipc",
    "overlayfs",
    "cgroups",
];

fn namespace_verdict(checks: &[Check]) -> NamespaceVerdict {
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok && NAMESPACE_NEEDS.contains(&c.name))
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    NamespaceVerdict {
        ok: failed.is_empty(),
        reason: (!failed.is_empty()).then(|| failed.join("; ")),
    }
}

fn microvm_verdict(
    qemu: Result<Qemu, String>,
    kernel: Result<PathBuf, String>,
    kvm: KvmVerdict,
) -> MicrovmVerdict {
    let mut missing = Vec::new();
    if let Err(e) = &qemu {
        missing.push(format!("qemu: {e}"));
    }
    if let Err(e) = &kernel {
        missing.push(format!("guest kernel: {e}"));
    }
    let ok = missing.is_empty();
    let reason = if ok {
        kvm.reason
    } else {
        missing.push(format!(
            "accel would be {}: {}",
            kvm.accel.as_str(),
            kvm.reason
        ));
        missing.join("; ")
    };
    MicrovmVerdict {
        ok,
        accel: kvm.accel,
        reason,
        qemu: qemu.ok().map(|q| q.path),
        kernel: kernel.ok(),
    }
}

fn root() -> Result<String, String> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        Ok("running as root".into())
    } else {
        Err(format!(
            "running as uid {euid}: the namespace builder mounts overlayfs and makes cgroups, run kiln as root"
        ))
    }
}

/// The namespaces a RUN step gets (see `build::executor`), each probed on its own.
/// `namespaces.net` is needed only by `--network none` steps, so it is informational.
const NAMESPACES: &[(&str, nix::sched::CloneFlags)] = &[
    ("namespaces.user", nix::sched::CloneFlags::CLONE_NEWUSER),
    ("namespaces.mount", nix::sched::CloneFlags::CLONE_NEWNS),
    ("namespaces.pid", nix::sched::CloneFlags::CLONE_NEWPID),
    ("namespaces.uts", nix::sched::CloneFlags::CLONE_NEWUTS),
    ("namespaces.ipc", nix::sched::CloneFlags::CLONE_NEWIPC),
    ("namespaces.net", nix::sched::CloneFlags::CLONE_NEWNET),
];

/// Unshares `flag` in a forked child, which exits with 0 or the errno.
fn unshare_probe(flag: nix::sched::CloneFlags) -> Result<String, String> {
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::ForkResult;
    // SAFETY: the child calls only unshare(2) and _exit(2), both async-signal-safe, so forking
    // a multi-threaded process is fine: it touches no lock another thread may hold.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(format!("cannot fork a probe: {e}")),
        Ok(ForkResult::Child) => {
            let code = match nix::sched::unshare(flag) {
                Ok(()) => 0,
                Err(e) => (e as i32).clamp(1, 255),
            };
            // SAFETY: _exit ends the forked child at once, running none of the parent's atexit
            // handlers or destructors (which could flush or free the parent's state twice).
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok("unshare works".into()),
            Ok(WaitStatus::Exited(_, code)) => {
                let errno = nix::errno::Errno::from_raw(code);
                let mut why = format!("unshare failed: {}", errno.desc());
                if flag == nix::sched::CloneFlags::CLONE_NEWUSER
                    && let Ok(max) = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
                {
                    why.push_str(&format!(
                        " (/proc/sys/user/max_user_namespaces = {})",
                        max.trim()
                    ));
                }
                Err(why)
            }
            Ok(other) => Err(format!("the probe ended oddly: {other:?}")),
            Err(e) => Err(format!("cannot wait for the probe: {e}")),
        },
    }
}

/// Mounts an overlay in a fresh directory under `scratch`, writes and deletes a file through
/// it, and checks the upper directory got the file and the whiteout.
pub fn overlayfs(scratch: &Path) -> Result<String, String> {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::Builder::new()
        .prefix(".doctor-overlay-")
        .tempdir_in(scratch)
        .map_err(|e| format!("cannot make a directory in {}: {e}", scratch.display()))?;
    let [lower, upper, work, merged] = ["lower", "upper", "work", "merged"].map(|n| {
        let p = dir.path().join(n);
        std::fs::create_dir(&p).map(|()| p)
    });
    let (lower, upper, work, merged) = match (lower, upper, work, merged) {
        (Ok(l), Ok(u), Ok(w), Ok(m)) => (l, u, w, m),
        _ => {
            return Err(format!(
                "cannot make directories in {}",
                dir.path().display()
            ));
        }
    };
    std::fs::write(lower.join("old"), b"lower")
        .map_err(|e| format!("cannot write in {}: {e}", lower.display()))?;
    let mounted = overlay::mount(
        &Layers {
            lowers: std::slice::from_ref(&lower),
            upper: &upper,
            work: &work,
        },
        &merged,
    )
    .map_err(|e| format!("mount failed on {}: {e}", scratch.display()))?;
    let used = std::fs::write(merged.join("new"), b"upper")
        .and_then(|()| std::fs::remove_file(merged.join("old")));
    let unmounted = mounted.unmount();
    used.map_err(|e| format!("writing through the overlay failed: {e}"))?;
    unmounted.map_err(|e| format!("unmount failed: {e}"))?;
    let whiteout = std::fs::symlink_metadata(upper.join("old"))
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false);
    if !upper.join("new").is_file() || !whiteout {
        return Err("the upper directory did not get the file and the whiteout".into());
    }
    Ok(format!(
        "mounted, wrote and deleted on {}",
        scratch.display()
    ))
}

/// Whether `--memory` and `--cpus` (always passed by `image create`) can be applied.
fn cgroups() -> Result<String, String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let r = cgroup::report(Path::new(cgroup::HOST_ROOT), &text);
    let place = |p: &Option<cgroup::Placement>| match p {
        Some(cgroup::Placement::V1 { .. }) => "v1",
        Some(cgroup::Placement::V2 { .. }) => "v2",
        None => "none",
    };
    let detail = format!(
        "{} (memory {}, cpu {}, pids {}){}",
        r.mode,
        place(&r.memory),
        place(&r.cpu),
        place(&r.pids),
        if r.writable {
            ""
        } else {
            "; cannot create a child cgroup"
        }
    );
    if r.memory.is_some() && r.cpu.is_some() && r.writable {
        Ok(detail)
    } else {
        Err(format!("{detail}: --memory and --cpus cannot be applied"))
    }
}

/// The accelerator and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmVerdict {
    /// What a microVM would use.
    pub accel: Accel,
    /// Why.
    pub reason: String,
}

/// `/dev/kvm`, the CPU flags and the PVM module, on this host.
pub fn kvm() -> KvmVerdict {
    let dev = kvm_api_version(Path::new("/dev/kvm"));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    accel_for(dev, &cpuinfo, pvm)
}

/// `KVM_GET_API_VERSION` of `dev`, or why it cannot be asked.
fn kvm_api_version(dev: &Path) -> Result<i32, String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("{}: {e}", dev.display()))?;
    // KVM_GET_API_VERSION = _IO(KVMIO=0xAE, 0x00).
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    // SAFETY: the fd is open for the call's duration and this ioctl takes no argument.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if v < 0 {
        return Err(format!(
            "{}: KVM_GET_API_VERSION failed: {}",
            dev.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(v)
}

/// The accelerator from what the host shows: `dev` is `/dev/kvm`'s API version (or why it
/// could not be read), `cpuinfo` the text of `/proc/cpuinfo`, `pvm` whether
/// `/sys/module/kvm_pvm` exists.
pub fn accel_for(dev: Result<i32, String>, cpuinfo: &str, pvm: bool) -> KvmVerdict {
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let (accel, reason) = match dev {
        Err(e) => (Accel::Tcg, format!("no usable KVM ({e}): QEMU TCG")),
        Ok(12) if hw => (
            Accel::Kvm,
            "/dev/kvm works and the CPU has hardware virtualisation".to_string(),
        ),
        Ok(12) if pvm => (
            Accel::Tcg,
            "/dev/kvm is PVM (/sys/module/kvm_pvm) and the CPU shows no vmx/svm: stock guest kernels cannot run on it, QEMU TCG".to_string(),
        ),
        Ok(12) => (
            Accel::Tcg,
            "/dev/kvm answers but the CPU shows no vmx/svm: QEMU TCG".to_string(),
        ),
        Ok(v) => (
            Accel::Tcg,
            format!("/dev/kvm has API version {v}, not 12: QEMU TCG"),
        ),
    };
    KvmVerdict { accel, reason }
}

/// `qemu-system-x86_64` found on `PATH`, and its version line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    /// The binary.
    pub path: PathBuf,
    /// `QEMU emulator version 7.2.22 (…)`, first line of `--version`.
    pub version: String,
}

/// The first `name` on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds `qemu-system-x86_64` and asks its version.
pub fn qemu() -> Result<Qemu, String> {
    let path = on_path("qemu-system-x86_64").ok_or_else(|| {
        "qemu-system-x86_64 not found on PATH (Debian: apt-get install qemu-system-x86)".to_string()
    })?;
    let out = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(Qemu { path, version })
}

/// The guest kernel: `KILN_VM_KERNEL`, else the newest `/boot/vmlinuz-*-cloud-amd64`.
pub fn guest_kernel() -> Result<PathBuf, String> {
    let env = std::env::var_os(crate::envvars::KILN_VM_KERNEL);
    find_kernel(env.as_deref(), Path::new("/boot"))
}

/// [`guest_kernel`] with its inputs given: the variable's value and the boot directory.
pub fn find_kernel(env: Option<&OsStr>, boot: &Path) -> Result<PathBuf, String> {
    if let Some(v) = env.filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "{} = {} is not a file",
                crate::envvars::KILN_VM_KERNEL,
                p.display()
            ))
        };
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(boot)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(OsStr::to_str)
                        .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
                        && p.is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by(|a, b| version_order(&a.to_string_lossy(), &b.to_string_lossy()));
    found.pop().ok_or_else(|| {
        format!(
            "no {}/vmlinuz-*-cloud-amd64 and {} is not set (Debian: apt-get install linux-image-cloud-amd64)",
            boot.display(),
            crate::envvars::KILN_VM_KERNEL
        )
    })
}

/// Compares names with runs of digits as numbers (`6.1.0-9` < `6.1.0-56`).
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                out.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let o = match (x, y) {
            ((true, x), (true, y)) => x
                .trim_start_matches('0')
                .len()
                .cmp(&y.trim_start_matches('0').len())
                .then_with(|| x.trim_start_matches('0').cmp(y.trim_start_matches('0'))),
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    ca.len().cmp(&cb.len())
}

fn mkfs_ext4() -> Result<String, String> {
    let path = on_path("mkfs.ext4")
        .or_else(|| {
            ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
                .map(PathBuf::from)
                .into_iter()
                .find(|p| p.is_file())
        })
        .ok_or_else(|| "mkfs.ext4 not found (Debian: apt-get install e2fsprogs)".to_string())?;
    // `mkfs.ext4 -V` prints `mke2fs 1.47.0 (5-Feb-2023)` on stderr and exits 0.
    let out = Command::new(&path)
        .arg("-V")
        .output()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stderr);
    let version = text.lines().next().unwrap_or_default().trim();
    Ok(format!("{version} ({})", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PVM_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr hypervisor\n";
    const VMX_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme vmx tsc\n";

    #[test]
    fn pvm_kvm_without_vmx_means_tcg() {
        let v = accel_for(Ok(12), PVM_CPUINFO, true);
        assert_eq!(v.accel, Accel::Tcg);
        assert!(v.reason.contains("PVM"), "{}", v.reason);
    }

    #[test]
    fn kvm_with_vmx_is_kvm() {
        assert_eq!(accel_for(Ok(12), VMX_CPUINFO, false).accel, Accel::Kvm);
    }

    #[test]
    fn no_dev_kvm_is_tcg_with_the_reason() {
        let v = accel_for(Err("/dev/kvm: No such file".into()), VMX_CPUINFO, false);
        assert_eq!(v.accel, Accel::Tcg);
        assert!(v.reason.contains("No such file"), "{}", v.reason);
    }

    #[test]
    fn newest_cloud_kernel_wins_and_the_variable_overrides() {
        let boot = tempfile::tempdir().expect("tempdir");
        for n in [
            "vmlinuz-6.1.0-9-cloud-amd64",
            "vmlinuz-6.1.0-56-cloud-amd64",
            "vmlinuz-6.1.0-99-amd64",
            "config-6.1.0-56-cloud-amd64",
        ] {
            std::fs::write(boot.path().join(n), b"k").expect("write");
        }
        assert_eq!(
            find_kernel(None, boot.path()).expect("kernel"),
            boot.path().join("vmlinuz-6.1.0-56-cloud-amd64")
        );
        let own = boot.path().join("config-6.1.0-56-cloud-amd64");
        assert_eq!(
            find_kernel(Some(own.as_os_str()), boot.path()).expect("kernel"),
            own
        );
        let missing = boot.path().join("nope");
        assert!(find_kernel(Some(missing.as_os_str()), boot.path()).is_err());
        let empty = tempfile::tempdir().expect("tempdir");
        let e = find_kernel(None, empty.path()).expect_err("no kernel");
        assert!(e.contains("linux-image-cloud-amd64"), "{e}");
    }

    #[test]
    fn microvm_needs_qemu_and_a_kernel() {
        let kvm = KvmVerdict {
            accel: Accel::Tcg,
            reason: "no kvm".into(),
        };
        let v = microvm_verdict(Err("no qemu".into()), Ok("/k".into()), kvm.clone());
        assert!(!v.ok);
        assert!(v.reason.contains("no qemu"), "{}", v.reason);
        let q = Qemu {
            path: "/q".into(),
            version: "QEMU 7.2".into(),
        };
        let v = microvm_verdict(Ok(q), Ok("/k".into()), kvm);
        assert!(v.ok);
        assert_eq!(v.accel, Accel::Tcg);
    }
}
