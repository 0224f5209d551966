//! Loop mounts of ext4 disk files through util-linux's `mount(8)` and `umount(8)`: they set
//! up and free the loop device, and their messages are the clearest explanation of a failure.

use std::ffi::OsStr;
use std::path::Path;

/// Runs the host program `args[0]` with the rest as its arguments and stdin empty; `Err`
/// holds its stderr (or why it could not run). For tools whose own message is the best
/// explanation of a failure: `mount`, `umount`, `qemu-img`.
pub fn tool(args: &[&OsStr]) -> Result<(), String> {
    let (tool, rest) = args.split_first().ok_or_else(|| "no command".to_string())?;
    let out = std::process::Command::new(tool)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tool.to_string_lossy()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Loop-mounts the ext4 disk file `disk` at `target`, `nodev`. Read-only mounts add
/// `noload`: a journal is never replayed on a disk that must stay byte-identical; writable
/// ones add `nosuid`.
pub fn loop_mount(disk: &Path, target: &Path, read_only: bool) -> Result<(), String> {
    let opts = if read_only {
        "ro,loop,noload,nodev"
    } else {
        "loop,nodev,nosuid"
    };
    tool(&[
        "mount".as_ref(),
        "-t".as_ref(),
        "ext4".as_ref(),
        "-o".as_ref(),
        opts.as_ref(),
        disk.as_os_str(),
        target.as_os_str(),
    ])
}

/// Unmounts `target` (the loop device goes with it).
pub fn umount(target: &Path) -> Result<(), String> {
    tool(&["umount".as_ref(), target.as_os_str()])
}
