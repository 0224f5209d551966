//! The raw Linux calls of `vm` that `nix` does not wrap: the guest's interface and route
//! ioctls (a static agent has no `ip` to call).
//!
//! This is the only module under `vm` that calls `libc` directly.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// From <linux/sockios.h>, <linux/route.h>, <linux/if.h>.
const SIOCADDRT: libc::c_ulong = 0x890B;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891C;
const RTF_UP: libc::c_ushort = 0x1;
const RTF_GATEWAY: libc::c_ushort = 0x2;
const IFF_UP: libc::c_short = 0x1;

/// An `AF_INET` datagram socket for interface ioctls.
pub struct Socket(OwnedFd);

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(())
    }
}

fn sockaddr_in(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the kernel reads the
    // family to know which one it got.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all zeroes is a valid (empty) request.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= r.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name} is too long"),
        ));
    }
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

impl Socket {
    /// Opens the socket.
    pub fn new() -> io::Result<Socket> {
        // SAFETY: socket(2) with constant arguments; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        check(fd, "socket")?;
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Socket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ioctl(&self, req: libc::c_ulong, arg: *mut libc::c_void, what: &str) -> io::Result<()> {
        // SAFETY: `arg` points to a live ifreq or rtentry of the type `req` expects, for the
        // duration of the call.
        check(
            unsafe { libc::ioctl(self.0.as_raw_fd(), req as _, arg) },
            what,
        )
    }

    /// Sets `name`'s IPv4 address and netmask.
    pub fn set_addr(&self, name: &str, addr: [u8; 4], mask: [u8; 4]) -> io::Result<()> {
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_addr = sockaddr_in(addr);
        self.ioctl(
            SIOCSIFADDR,
            (&raw mut r).cast(),
            &format!("set {name}'s address"),
        )?;
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_netmask = sockaddr_in(mask);
        self.ioctl(
            SIOCSIFNETMASK,
            (&raw mut r).cast(),
            &format!("set {name}'s netmask"),
        )
    }

    /// Brings `name` up.
    pub fn up(&self, name: &str) -> io::Result<()> {
        let mut r = ifreq(name)?;
        self.ioctl(
            SIOCGIFFLAGS,
            (&raw mut r).cast(),
            &format!("read {name}'s flags"),
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        r.ifr_ifru.ifru_flags = flags | IFF_UP;
        self.ioctl(
            SIOCSIFFLAGS,
            (&raw mut r).cast(),
            &format!("bring {name} up"),
        )
    }

    /// Adds the default route through `gateway`.
    pub fn default_route(&self, gateway: [u8; 4]) -> io::Result<()> {
        // SAFETY: rtentry is plain data; zeroes are "no value" for every field.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in([0; 4]);
        rt.rt_genmask = sockaddr_in([0; 4]);
        rt.rt_gateway = sockaddr_in(gateway);
        rt.rt_flags = RTF_UP | RTF_GATEWAY;
        self.ioctl(SIOCADDRT, (&raw mut rt).cast(), "add the default route")
    }
}
