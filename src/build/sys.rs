//! The raw Linux calls the builder needs and neither `nix` nor `std` wraps: the new mount API
//! (`fsopen`/`fsconfig`/`fsmount`/`move_mount`, for overlayfs stacks longer than a mount option
//! page), `pidfd_open`, capability sets (`capset`, `PR_CAPBSET_DROP`) and `close_range`.
//!
//! This is the only module under `build` that calls `libc` directly. Every function is a thin,
//! allocation-free wrapper, so the capability and `close_range` calls are safe to use in a
//! forked child.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

// From <linux/mount.h> (libc has the syscall numbers but not all constants).
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
// From <linux/prctl.h> and <linux/capability.h>.
const PR_CAPBSET_DROP: libc::c_int = 24;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Wraps a descriptor number the kernel just returned.
fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = check(ret)?;
    // SAFETY: `fd` is a descriptor the kernel has just created for this process (the call
    // returned it); nothing else owns it, so wrapping it transfers sole ownership.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `fsopen(fstype, FSOPEN_CLOEXEC)`: a filesystem context to configure.
pub fn fsopen(fstype: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `fstype` is a NUL-terminated string that outlives the call; the kernel only
    // reads it.
    owned(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })
}

/// `fsconfig(fs, FSCONFIG_SET_STRING, key, value)`.
pub fn fsconfig_string(fs: BorrowedFd<'_>, key: &CStr, value: &CStr) -> io::Result<()> {
    // SAFETY: `fs` is an open descriptor borrowed for the call; `key` and `value` are
    // NUL-terminated strings that outlive it; aux 0 is what SET_STRING requires.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `fsconfig(fs, FSCONFIG_CMD_CREATE)`: make the superblock from the configured context.
pub fn fsconfig_create(fs: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fs` is an open descriptor borrowed for the call; CMD_CREATE takes null key and
    // value and aux 0.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })
    .map(drop)
}

/// `fsmount(fs, FSMOUNT_CLOEXEC, 0)`: a detached mount of the created superblock.
pub fn fsmount(fs: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: `fs` is an open descriptor borrowed for the call; the flags are plain integers.
    owned(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0) })
}

/// `move_mount(mnt, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)`: attach a detached mount.
pub fn move_mount(mnt: BorrowedFd<'_>, target: &CStr) -> io::Result<()> {
    // SAFETY: `mnt` is an open descriptor borrowed for the call; the empty string and
    // `target` are NUL-terminated and outlive it.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// `pidfd_open(pid, 0)`: a descriptor that becomes readable when the process exits.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; the result is checked.
    owned(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })
}

/// Marks every descriptor from `first` up close-on-exec (`close_range(CLOSE_RANGE_CLOEXEC)`).
pub fn cloexec_from(first: libc::c_uint) -> io::Result<()> {
    // SAFETY: plain integer arguments; marking descriptors close-on-exec invalidates no
    // pointer or owned handle in this process.
    check(
        unsafe { libc::close_range(first, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) }
            as libc::c_long,
    )
    .map(drop)
}

/// The highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap` is read by
/// the caller; 40 = CAP_CHECKPOINT_RESTORE on 5.9+ is the fallback).
pub const CAP_LAST_CAP_FALLBACK: u32 = 40;

/// Drops every capability not in `keep` (a bit mask) from the bounding set.
pub fn drop_bounding_except(keep: u64, last_cap: u32) -> io::Result<()> {
    for cap in 0..=last_cap.min(63) {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: plain integer arguments; PR_CAPBSET_DROP only changes this thread's
        // bounding set.
        let r = unsafe { libc::prctl(PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // EINVAL: the kernel does not know this capability; nothing to drop.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets this thread's effective, permitted and inheritable capabilities to `caps` (a bit mask).
pub fn set_capabilities(caps: u64) -> io::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let lo = caps as u32;
    let hi = (caps >> 32) as u32;
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: hi,
        },
    ];
    // SAFETY: `header` and `data` are live, properly laid out (`_LINUX_CAPABILITY_VERSION_3`
    // takes two data structs) and outlive the call; the kernel reads `data` and may write the
    // preferred version into `header`, which is mutable.
    check(unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    })
    .map(drop)
}
