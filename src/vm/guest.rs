//! The guest agent: PID 1 of a builder VM (the `kiln-agent` binary is a call to [`main`]).
//!
//! Boot, in order: mount `/dev`, `/proc`, `/sys`; load the kernel modules the initramfs
//! carries (`/lib/modules/order`, dependencies first); move onto a fresh tmpfs root (the
//! step executor's `pivot_root` cannot leave the initramfs's rootfs); find the disks by
//! their virtio-blk serials and the control port by its virtio-serial name; say [`Hello`].
//!
//! Then one step: the host's [`StepMessage`] runs through the same
//! [`NamespaceDriver`] the namespace builder uses, with the root disk (the merged lower
//! layers, read-only ext4) as its only lower layer and the upper directory on the scratch
//! disk. Output lines, the outcome, the upper layer as an OCI tar and the cache mounts go
//! back as frames ([`super::protocol`]); then `sync`, [`Kind::Done`], and power-off once the
//! host has answered (so nothing in flight is lost when QEMU exits).
//!
//! Whatever fails is reported as a [`GuestFailure`] and the VM still powers off; if the agent
//! itself dies, the kernel panics (`panic=-1`), QEMU exits, and the host reports the console.

use super::protocol::{
    self, CONTEXT_SERIAL, CRASH_SWITCH, FrameWriter, GuestExit, GuestFailure, GuestMount,
    GuestOutcome, Hello, Kind, PORT_NAME, ROOT_SERIAL, SCRATCH_SERIAL, StepMessage, TarHeader,
};
use super::tarball::{self, Whiteouts};
use crate::build::cgroup::Limits;
use crate::build::driver::{Driver, DriverError, NamespaceDriver, StepOutcome, StepRequest};
use crate::build::executor::{ExitStatus, PreparedMount, Stdio, Stream};
use nix::mount::MsFlags;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the guest mounts things (in its tmpfs root).
const LOWER: &str = "/mnt/lower";
const SCRATCH: &str = "/mnt/scratch";

/// Runs the agent as PID 1. Never returns: the VM powers off.
pub fn main() -> ! {
    if std::process::id() != 1 {
        // Anywhere else it would mount over /dev and power the machine off.
        eprintln!("kiln-agent runs only as PID 1 of a Kiln builder VM");
        std::process::exit(2);
    }
    let started = Instant::now();
    let port = match boot() {
        Ok(p) => p,
        Err(e) => {
            console(&format!("kiln-agent: boot failed: {e}"));
            power_off();
        }
    };
    let port = Arc::new(port);
    if let Err(e) = serve(&port, started) {
        console(&format!("kiln-agent: {e}"));
        let _ = protocol::write_json(
            &mut &*port,
            Kind::Failure,
            &GuestFailure {
                message: e.to_string(),
            },
        );
        finish(&port);
    }
    power_off()
}

/// The control port: frames from any thread go out whole.
pub struct Port {
    read: Mutex<File>,
    write: Mutex<File>,
}

impl Write for &Port {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Every frame is written with a single `write_all` under the lock, so frames from
        // the heartbeat thread never split another's.
        let mut f = self.write.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Port {
    fn send(&self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        protocol::write_frame(&mut &*self, kind, payload)
    }

    fn recv(&self) -> io::Result<Option<(Kind, Vec<u8>)>> {
        let mut f = self.read.lock().unwrap_or_else(|p| p.into_inner());
        protocol::read_frame(&mut *f)
    }
}

fn console(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn nix_err(what: impl std::fmt::Display) -> impl FnOnce(nix::errno::Errno) -> io::Error {
    move |e| io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    fs::create_dir_all(target).map_err(err(format_args!("mkdir {target}")))?;
    nix::mount::mount(Some(src), target, Some(fstype), flags, data)
        .map_err(nix_err(format_args!("mount {fstype} {src} on {target}")))
}

/// Pseudo file systems, modules, the tmpfs root, disks and the port.
fn boot() -> io::Result<Port> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount("proc", "/proc", "proc", nosuid | MsFlags::MS_NODEV, None)?;
    mount("sysfs", "/sys", "sysfs", nosuid | MsFlags::MS_NODEV, None)?;
    load_modules(Path::new("/lib/modules"))?;
    switch_to_tmpfs()?;
    for d in ["/tmp", "/run", LOWER, SCRATCH] {
        fs::create_dir_all(d).map_err(err(format_args!("mkdir {d}")))?;
    }
    fs::set_permissions("/tmp", fs::Permissions::from_mode(0o1777)).map_err(err("chmod /tmp"))?;
    set_up_loopback()?;
    let port = open_port(Duration::from_secs(10))?;
    Ok(port)
}

/// Loads the modules listed in `dir/order` (file names, dependencies first).
fn load_modules(dir: &Path) -> io::Result<()> {
    let order = match fs::read_to_string(dir.join("order")) {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err("read /lib/modules/order")(e)),
    };
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        let f = File::open(&path).map_err(err(format_args!("open {}", path.display())))?;
        match nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(nix_err(format_args!("load module {name}"))(e)),
        }
    }
    Ok(())
}

/// `switch_root` onto a tmpfs: `pivot_root(2)` refuses a caller whose root is the rootfs.
fn switch_to_tmpfs() -> io::Result<()> {
    let new = "/newroot";
    mount("tmpfs", new, "tmpfs", MsFlags::empty(), Some("mode=0755"))?;
    for m in ["dev", "proc", "sys"] {
        let target = format!("{new}/{m}");
        fs::create_dir_all(&target).map_err(err(format_args!("mkdir {target}")))?;
        nix::mount::mount(
            Some(format!("/{m}").as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(nix_err(format_args!("move /{m}")))?;
    }
    nix::unistd::chdir(new).map_err(nix_err("chdir /newroot"))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(nix_err("move the new root onto /"))?;
    nix::unistd::chroot(".").map_err(nix_err("chroot"))?;
    nix::unistd::chdir("/").map_err(nix_err("chdir /"))
}

/// The `/dev` name of the virtio-serial port called `name`, once it shows up.
fn open_port(wait: Duration) -> io::Result<Port> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(rd) = fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                let n = fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if n.trim() == PORT_NAME {
                    let dev = Path::new("/dev").join(e.file_name());
                    // A port opens once (a second open is EBUSY): one descriptor, cloned.
                    let f = fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&dev)
                        .map_err(err(format_args!("open {}", dev.display())))?;
                    let w = f.try_clone().map_err(err("clone the port"))?;
                    return Ok(Port {
                        read: Mutex::new(f),
                        write: Mutex::new(w),
                    });
                }
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial port named {PORT_NAME}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `/dev/vdX` of the disk with virtio-blk serial `serial`, waiting up to `wait`.
fn disk(serial: &str, wait: Duration) -> io::Result<Option<PathBuf>> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(rd) = fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                let s = fs::read_to_string(e.path().join("serial")).unwrap_or_default();
                if s.trim() == serial {
                    let dev = Path::new("/dev").join(e.file_name());
                    if dev.exists() {
                        return Ok(Some(dev));
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn required_disk(serial: &str) -> io::Result<PathBuf> {
    disk(serial, Duration::from_secs(10))?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no disk with serial {serial}"),
        )
    })
}

fn uptime_ms() -> u64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64)
}

fn oom_kills() -> u64 {
    fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Says hello, runs the step, sends everything back.
fn serve(port: &Arc<Port>, started: Instant) -> io::Result<()> {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    protocol::write_json(
        &mut &**port,
        Kind::Hello,
        &Hello {
            agent: env!("CARGO_PKG_VERSION").to_string(),
            kernel,
            uptime_ms: uptime_ms(),
        },
    )?;
    let msg: StepMessage = match port.recv()? {
        Some((Kind::Step, p)) => protocol::decode("step", &p)?,
        Some((k, _)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected a step, got {k:?}"),
            ));
        }
        None => {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the host closed the port",
            ));
        }
    };
    let sandbox = msg.sandbox;
    let lower = required_disk(ROOT_SERIAL)?;
    // A sandbox's disk is its own copy-on-write clone: mounted writable, journal and all.
    let (flags, data) = if sandbox {
        (MsFlags::MS_NODEV, None)
    } else {
        (MsFlags::MS_RDONLY, Some("noload"))
    };
    mount(
        lower.to_str().unwrap_or_default(),
        LOWER,
        "ext4",
        flags,
        data,
    )?;
    let mounts_dir = if sandbox {
        PathBuf::from("/tmp/mounts")
    } else {
        let scratch = required_disk(SCRATCH_SERIAL)?;
        mount(
            scratch.to_str().unwrap_or_default(),
            SCRATCH,
            "ext4",
            MsFlags::empty(),
            None,
        )?;
        Path::new(SCRATCH).join("mounts")
    };
    fs::create_dir_all(&mounts_dir).map_err(err("mkdir the mounts directory"))?;
    if let Some(ctx) = disk(CONTEXT_SERIAL, Duration::ZERO)? {
        let f = File::open(&ctx).map_err(err("open the context disk"))?;
        let mut a = tar::Archive::new(io::BufReader::new(f));
        a.set_preserve_permissions(true);
        a.set_preserve_ownerships(true);
        a.set_preserve_mtime(true);
        a.set_unpack_xattrs(true);
        a.unpack(&mounts_dir)
            .map_err(err("unpack the context disk"))?;
    }
    if msg.network {
        set_up_network()?;
    }
    let upper = if sandbox {
        None
    } else {
        let upper = Path::new(SCRATCH).join("upper");
        fs::create_dir(&upper).map_err(err("mkdir the upper directory"))?;
        apply_root_attrs(&upper, &msg.root)?;
        Some(upper)
    };

    let prepared = prepare_mounts(&msg.mounts, &mounts_dir)?;
    if fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .any(|w| w == CRASH_SWITCH)
    {
        console("kiln-agent: crashing the kernel as asked (kiln.crash=step)");
        fs::write("/proc/sysrq-trigger", b"c").map_err(err("write /proc/sysrq-trigger"))?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let beat = {
        let (port, stop) = (Arc::clone(port), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if port.send(Kind::Heartbeat, &[]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let ooms = oom_kills();
    let mut send_err = None;
    let mut output = |stream: Stream, line: &str| {
        let kind = match stream {
            Stream::Stdout => Kind::Stdout,
            Stream::Stderr => Kind::Stderr,
        };
        let bytes = line.as_bytes();
        let bytes = &bytes[..bytes.len().min(protocol::MAX_FRAME)];
        if let Err(e) = port.send(kind, bytes) {
            send_err.get_or_insert(e);
        }
    };
    let req = StepRequest {
        run: &msg.run,
        hostname: &msg.hostname,
        mounts: &prepared,
        resolv_conf: Some(&msg.resolv_conf),
        limits: Limits::default(),
        output: &mut output,
        stdio: Stdio::Capture,
        timeout: msg.timeout_ms.map(Duration::from_millis),
    };
    let result = match &upper {
        Some(upper) => NamespaceDriver.run_step(&[PathBuf::from(LOWER)], upper, req),
        None => NamespaceDriver.run_in_root(Path::new(LOWER), req),
    };
    stop.store(true, Ordering::Relaxed);
    let _ = beat.join();
    if let Some(e) = send_err {
        return Err(err("send output")(e));
    }
    let outcome = match result {
        // A sandbox command that cannot start gets Docker's codes, as on the host runtime.
        Err(DriverError::Exec(e)) if sandbox && e.start_failure_code().is_some() => {
            let code = e.start_failure_code().unwrap_or(126);
            port.send(
                Kind::Stderr,
                format!("kiln: {}", error_chain(&e)).as_bytes(),
            )?;
            StepOutcome {
                status: ExitStatus::Exited(code),
                exit_code: code,
                timed_out: false,
                oom_killed: false,
                run_time: Duration::ZERO,
                total_time: Duration::ZERO,
            }
        }
        r => r.map_err(|e| io::Error::other(error_chain(&e)))?,
    };
    let exit = match outcome.status {
        ExitStatus::Exited(c) => GuestExit::Exited(c),
        ExitStatus::Signaled(s) => GuestExit::Signaled(s),
    };
    protocol::write_json(
        &mut &**port,
        Kind::Outcome,
        &GuestOutcome {
            exit,
            timed_out: outcome.timed_out,
            oom_killed: oom_kills() > ooms,
            run_ms: outcome.run_time.as_millis() as u64,
        },
    )?;
    if let Some(upper) = &upper
        && outcome.exit_code == 0
    {
        send_tree(port, &TarHeader::Upper, upper, Whiteouts::Oci)?;
    }
    if sandbox {
        // Cleanly, so the next boot of this disk replays nothing.
        nix::unistd::sync();
        if let Err(e) = nix::mount::umount(LOWER) {
            console(&format!("kiln-agent: cannot unmount the sandbox disk: {e}"));
        }
    }
    for (index, m) in msg.mounts.iter().enumerate() {
        if let GuestMount::Cache { name } = m {
            let dir = mounts_dir.join(name);
            if dir.is_dir() {
                send_tree(port, &TarHeader::Cache { index }, &dir, Whiteouts::Keep)?;
            }
        }
    }
    console(&format!(
        "kiln-agent: step done in {:.2}s (uptime {:.2}s)",
        started.elapsed().as_secs_f64(),
        uptime_ms() as f64 / 1000.0
    ));
    finish(port);
    Ok(())
}

fn send_tree(port: &Port, header: &TarHeader, dir: &Path, w: Whiteouts) -> io::Result<()> {
    protocol::write_json(&mut &*port, Kind::TarBegin, header)?;
    let mut fw = FrameWriter::new(port);
    tarball::write_tree(dir, &mut fw, w).map_err(err(format_args!("send {}", dir.display())))?;
    fw.finish()?;
    port.send(Kind::TarEnd, &[])
}

/// Syncs, says Done, and waits (briefly) for the host's answer before the power-off.
fn finish(port: &Port) {
    nix::unistd::sync();
    let _ = port.send(Kind::Done, &[]);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = tx.send(port.recv());
        });
        // The host answers at once; a host that is gone does not hold the VM up.
        let _ = rx.recv_timeout(Duration::from_secs(5));
        // The reader thread may still block: power-off ends it.
        power_off();
    });
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot(2) returns only on failure; PID 1 must not exit cleanly either way.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn apply_root_attrs(dir: &Path, a: &protocol::RootAttrs) -> io::Result<()> {
    std::os::unix::fs::chown(dir, Some(a.uid), Some(a.gid)).map_err(err("chown the upper"))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(a.mode & 0o7777))
        .map_err(err("chmod the upper"))?;
    let t = nix::sys::time::TimeSpec::new(a.mtime, a.mtime_nsec);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        dir,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(nix_err("set the upper's mtime"))
}

fn prepare_mounts(mounts: &[GuestMount], dir: &Path) -> io::Result<Vec<PreparedMount>> {
    let secrets = Path::new("/run/kiln-secrets");
    let mut out = Vec::with_capacity(mounts.len());
    for (i, m) in mounts.iter().enumerate() {
        out.push(match m {
            GuestMount::Bind { name } => PreparedMount::Bind {
                source: dir.join(name),
            },
            GuestMount::Cache { name } => PreparedMount::Cache {
                dir: dir.join(name),
            },
            GuestMount::Tmpfs => PreparedMount::Tmpfs,
            GuestMount::Secret { content: None } => PreparedMount::Secret { file: None },
            GuestMount::Secret {
                content: Some(bytes),
            } => {
                fs::create_dir_all(secrets).map_err(err("mkdir /run/kiln-secrets"))?;
                let file = secrets.join(i.to_string());
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&file)
                    .and_then(|mut f| f.write_all(bytes))
                    .map_err(err("write a secret"))?;
                PreparedMount::Secret { file: Some(file) }
            }
            GuestMount::Ssh => PreparedMount::Ssh,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Network: QEMU user networking's fixed addresses (guest 10.0.2.15/24, gateway 10.0.2.2,
// DNS 10.0.2.3).

const GUEST_ADDR: [u8; 4] = [10, 0, 2, 15];
const NETMASK: [u8; 4] = [255, 255, 255, 0];
const GATEWAY: [u8; 4] = [10, 0, 2, 2];
/// The resolver QEMU user networking answers on.
pub const USER_NET_DNS: &str = "nameserver 10.0.2.3\n";

fn set_up_loopback() -> io::Result<()> {
    let s = super::sys::Socket::new()?;
    s.up("lo")
}

fn set_up_network() -> io::Result<()> {
    let s = super::sys::Socket::new()?;
    s.set_addr("eth0", GUEST_ADDR, NETMASK)?;
    s.up("eth0")?;
    s.default_route(GATEWAY)
}
