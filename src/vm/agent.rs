//! The guest agent binary on the host: where it is, and that it is static (a guest has no
//! libc to load).
//!
//! It is looked for at `KILN_AGENT`, beside the running `kiln` (an installed pair), and in
//! the cargo profile directory `agent/` beside it (`target/debug/kiln` →
//! `target/agent/kiln-agent`, where `cargo xtask agent` builds it).
//!
//! How it is built: the `kiln-agent` bin target of this package, with the `agent` feature and
//! no `host` feature, linked static by passing `-C target-feature=+crt-static` to the final
//! crate only ([`BUILD_ARGS`]). That needs no extra rustup target (the musl one would have to
//! be downloaded, and CI reaches only the crate and Debian registries); static glibc is fine
//! since the agent resolves users itself and never calls NSS.

use super::VmError;
use std::path::{Path, PathBuf};

/// The `cargo` arguments that build the static agent into `TARGET/agent/kiln-agent`.
pub const BUILD_ARGS: &[&str] = &[
    "rustc",
    "--package",
    "kiln",
    "--bin",
    "kiln-agent",
    "--no-default-features",
    "--features",
    "agent",
    "--profile",
    "agent",
    "--locked",
    "--",
    "-C",
    "target-feature=+crt-static",
];

/// The file name of the agent.
pub const FILE_NAME: &str = "kiln-agent";

/// Builds the agent with `cargo` ([`BUILD_ARGS`]) from the package in `package_dir` into
/// `target/agent/kiln-agent`, checks it is static, and returns its path (`cargo xtask agent`,
/// and the VM tests, which build it into a target directory of their own).
pub fn build(
    cargo: &std::ffi::OsStr,
    package_dir: &Path,
    target: &Path,
) -> Result<PathBuf, String> {
    let out = std::process::Command::new(cargo)
        .args(BUILD_ARGS)
        .env("CARGO_TARGET_DIR", target)
        .current_dir(package_dir)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building kiln-agent failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let path = target.join("agent").join(FILE_NAME);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    check_static(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Finds the agent and checks it is a static x86-64 executable.
pub fn locate() -> Result<PathBuf, VmError> {
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os(crate::envvars::KILN_AGENT).filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(p));
    } else if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(FILE_NAME));
        if let Some(target) = dir.parent() {
            candidates.push(target.join("agent").join(FILE_NAME));
        }
    }
    for c in candidates {
        match std::fs::read(&c) {
            Ok(bytes) => {
                return match check_static(&bytes) {
                    Ok(()) => Ok(c),
                    Err(why) => Err(VmError::Agent {
                        reason: format!(
                            "{}: {why} (build it with `cargo xtask agent`)",
                            c.display()
                        ),
                    }),
                };
            }
            Err(_) => tried.push(c.display().to_string()),
        }
    }
    Err(VmError::Agent {
        reason: format!(
            "no {FILE_NAME} (looked at {}; build it with `cargo xtask agent` or set {})",
            tried.join(", "),
            crate::envvars::KILN_AGENT
        ),
    })
}

/// `Ok` for a 64-bit x86 ELF executable with no program interpreter (statically linked).
pub fn check_static(elf: &[u8]) -> Result<(), String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(0..6) != Some(b"\x7fELF\x02\x01") || u16_at(0x12) != Some(62) {
        return Err("not an x86-64 ELF file".into());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err("truncated ELF header".into());
    };
    const PT_INTERP: u32 = 3;
    for i in 0..phnum as usize {
        let at = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i * phentsize as usize));
        match at.and_then(u32_at) {
            Some(PT_INTERP) => {
                return Err("dynamically linked (it has a program interpreter)".into());
            }
            Some(_) => {}
            None => return Err("truncated program headers".into()),
        }
    }
    Ok(())
}

/// Whether `path` exists and is a static agent (for messages and benchmarks).
pub fn is_static(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| check_static(&b).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(interp: bool) -> Vec<u8> {
        let mut e = vec![0u8; 0x40 + 2 * 56];
        e[0..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        e[0x40..0x44].copy_from_slice(&1u32.to_le_bytes());
        let second = if interp { 3u32 } else { 1 };
        e[0x40 + 56..0x40 + 60].copy_from_slice(&second.to_le_bytes());
        e
    }

    #[test]
    fn a_program_interpreter_means_dynamic() {
        assert!(check_static(&elf(false)).is_ok());
        assert!(
            check_static(&elf(true))
                .unwrap_err()
                .contains("dynamically")
        );
        assert!(check_static(b"#!/bin/sh\n").is_err());
        assert!(check_static(&elf(false)[..0x50]).is_err());
    }

    #[test]
    fn the_test_binary_itself_is_dynamic() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(check_static(&me).is_err());
    }
}
