//! What the microVM tests share: the static agent, built once per test binary into its own
//! target directory (the outer `cargo test` holds the lock of its own), so it is never
//! stale; the tools a VM needs, checked loudly; and one VM at a time per binary (several
//! TCG guests on a 2-core machine only slow each other down).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// `image create` flags for a small builder VM: one vCPU, 512 MiB, a 256 MiB scratch disk.
pub const SMALL_VM: &[&str] = &[
    "--builder",
    "microvm",
    "--cpus",
    "1",
    "--memory",
    "512",
    "--builder_disk_mb",
    "256",
];

/// The static agent, built once per test binary.
pub fn agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("agent-target");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        kiln::vm::agent::build(&cargo, Path::new(env!("CARGO_MANIFEST_DIR")), &target)
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

/// Fails loudly when a tool a VM needs is missing.
pub fn require_tools() {
    assert!(
        kiln::doctor::on_path("qemu-system-x86_64").is_some(),
        "qemu-system-x86_64 is missing: apt-get install qemu-system-x86 (scripts/test.sh does)"
    );
    assert!(
        kiln::doctor::on_path("qemu-img").is_some(),
        "qemu-img is missing: apt-get install qemu-utils (scripts/test.sh does)"
    );
    if let Err(e) = kiln::doctor::guest_kernel() {
        panic!("no guest kernel ({e}): apt-get install linux-image-cloud-amd64");
    }
}

/// Held while a VM runs (see the module docs).
pub fn one_vm() -> MutexGuard<'static, ()> {
    static VMS: Mutex<()> = Mutex::new(());
    VMS.lock().unwrap_or_else(|p| p.into_inner())
}
