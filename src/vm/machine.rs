//! One QEMU `-M microvm` process: its command line, its console, the agent channel, and its
//! death.
//!
//! QEMU is always killed: [`Machine`] SIGKILLs and reaps it on drop (every early return and
//! unwinding path), and the child has `PR_SET_PDEATHSIG(SIGKILL)` so a SIGKILL of Kiln kills
//! it too (an orphaned QEMU would keep the disk images locked). It runs in its own process
//! group, so a terminal's ^C reaches Kiln, which decides.
//!
//! The console (the guest's ttyS0 on QEMU's stdout) and QEMU's stderr are read by threads
//! into one bounded buffer: its tail goes into error messages, and a `Kernel panic` line
//! marks a guest crash, since QEMU exits 0 on a panic with `panic=-1 -no-reboot`.
//!
//! The agent channel is a Unix socket Kiln listens on and QEMU connects to at start
//! (`-chardev socket` in client mode), so no connect retries are needed.

use super::VmError;
use crate::doctor::Accel;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMode {
    /// Read-only.
    ReadOnly,
    /// The guest writes to a throwaway overlay (`snapshot=on`); the file is never changed,
    /// so several VMs may share it.
    Throwaway,
    /// The guest writes to the file.
    ReadWrite,
    /// A qcow2 file the guest writes to, over its read-only backing image (a sandbox's
    /// copy-on-write clone of a snapshot).
    Qcow2,
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The raw image.
    pub path: PathBuf,
    /// The serial the guest finds it by.
    pub serial: &'static str,
    /// How it is attached.
    pub mode: DiskMode,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// KVM or TCG.
    pub accel: Accel,
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM, MiB.
    pub memory_mb: u64,
    /// Disks, in any order (the guest finds them by serial).
    pub disks: Vec<Disk>,
    /// A NIC on QEMU user networking.
    pub network: bool,
    /// Extra kernel command-line words.
    pub append: String,
    /// The virtio-serial port name of the agent channel.
    pub port_name: &'static str,
}

/// The accelerator to use and why: `KILN_VM_ACCEL`, else [`crate::doctor::kvm`].
pub fn accelerator() -> Result<(Accel, String), VmError> {
    match std::env::var(crate::envvars::KILN_VM_ACCEL).ok().as_deref() {
        None | Some("") => {
            let v = crate::doctor::kvm();
            Ok((v.accel, v.reason))
        }
        Some("kvm") => Ok((Accel::Kvm, "KILN_VM_ACCEL=kvm".into())),
        Some("tcg") => Ok((Accel::Tcg, "KILN_VM_ACCEL=tcg".into())),
        Some(other) => Err(VmError::Qemu {
            reason: format!("KILN_VM_ACCEL={other}: use kvm or tcg"),
        }),
    }
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo` (`cpu MHz`).
pub fn host_khz(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "cpu MHz")
            .then(|| v.trim().parse::<f64>().ok())
            .flatten()
            .map(|mhz| (mhz * 1000.0).round() as u64)
    })
}

/// The kernel command line.
pub fn kernel_cmdline(accel: Accel, khz: Option<u64>, extra: &str) -> String {
    // cryptomgr.notests: the boot-time self-tests of every crypto algorithm the kernel
    // registers were the largest initcall under TCG (about 0.26 s of a 2 s kernel boot,
    // initcall_debug); a throwaway builder VM gains nothing from them.
    let mut s = String::from("console=ttyS0 quiet panic=-1 random.trust_cpu=on cryptomgr.notests");
    // microvm has no HPET or ACPI PM timer; under TCG PIT calibration fails at random and
    // the boot hangs (vmlab: 5 of 21 boots) unless the TSC frequency is given.
    if accel == Accel::Tcg
        && let Some(k) = khz
    {
        s.push_str(&format!(" tsc_early_khz={k}"));
    }
    if !extra.trim().is_empty() {
        s.push(' ');
        s.push_str(extra.trim());
    }
    s
}

/// QEMU's arguments for `cfg`, with the agent socket at `socket`.
pub fn qemu_args(cfg: &MachineConfig, socket: &Path, khz: Option<u64>) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |v: &[&str]| a.extend(v.iter().map(|s| s.to_string()));
    push(&["-M", "microvm", "-accel", cfg.accel.as_str()]);
    push(&[
        "-cpu",
        match cfg.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        },
    ]);
    push(&["-m", &format!("{}M", cfg.memory_mb)]);
    push(&["-smp", &cfg.cpus.max(1).to_string()]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&[
        "-chardev",
        "stdio,id=con,signal=off",
        "-serial",
        "chardev:con",
    ]);
    push(&["-kernel", &cfg.kernel.to_string_lossy()]);
    push(&["-initrd", &cfg.initrd.to_string_lossy()]);
    push(&["-append", &kernel_cmdline(cfg.accel, khz, &cfg.append)]);
    push(&[
        "-chardev",
        &format!("socket,id=agent,path={}", socket.display()),
        "-device",
        "virtio-serial-device",
        "-device",
        &format!("virtserialport,chardev=agent,name={}", cfg.port_name),
    ]);
    for (i, d) in cfg.disks.iter().enumerate() {
        let (format, mode) = match d.mode {
            DiskMode::ReadOnly => ("raw", ",readonly=on"),
            DiskMode::Throwaway => ("raw", ",snapshot=on"),
            DiskMode::ReadWrite => ("raw", ""),
            DiskMode::Qcow2 => ("qcow2", ""),
        };
        // QEMU's option syntax: a comma in a value is written twice.
        let file = d.path.to_string_lossy().replace(',', ",,");
        push(&[
            "-drive",
            &format!("id=d{i},file={file},format={format},if=none{mode}"),
            "-device",
            &format!("virtio-blk-device,drive=d{i},serial={}", d.serial),
        ]);
    }
    if cfg.network {
        push(&[
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-device,netdev=net0",
        ]);
    }
    a
}

/// The console and QEMU's stderr, bounded.
#[derive(Default)]
struct Console {
    lines: VecDeque<String>,
    panic: Option<String>,
}

const CONSOLE_LINES: usize = 200;

impl Console {
    fn push(&mut self, line: String) {
        if self.panic.is_none()
            && let Some(at) = line.find("Kernel panic")
        {
            self.panic = Some(line[at..].trim().to_string());
        }
        if self.lines.len() == CONSOLE_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }
}

/// A running VM. Dropping it kills QEMU.
pub struct Machine {
    child: Child,
    exited: Option<ExitStatus>,
    console: Arc<Mutex<Console>>,
    channel: UnixStream,
    started: Instant,
    _dir: tempfile::TempDir,
}

fn read_lines(r: impl Read + Send + 'static, console: Arc<Mutex<Console>>, prefix: &'static str) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            // Lines are capped so a guest printing without newlines cannot grow memory.
            match (&mut r).take(4096).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']);
                    tracing::trace!(target: "kiln::vm::console", "{prefix}{line}");
                    console
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{prefix}{line}"));
                }
            }
        }
    });
}

impl Machine {
    /// Starts QEMU and waits (up to `connect_timeout`) for it to connect the agent channel.
    pub fn launch(cfg: &MachineConfig, connect_timeout: Duration) -> Result<Machine, VmError> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-vm-")
            .tempdir()
            .map_err(VmError::prepare("create the VM's socket directory"))?;
        let socket = dir.path().join("agent.sock");
        let listener =
            UnixListener::bind(&socket).map_err(VmError::prepare("listen for the agent"))?;
        listener
            .set_nonblocking(true)
            .map_err(VmError::prepare("listen for the agent"))?;
        let khz = host_khz(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
        let args = qemu_args(cfg, &socket, khz);
        tracing::debug!(qemu = %cfg.qemu.display(), ?args, "starting the VM");
        let parent = nix::unistd::getpid();
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(&args)
            .env("TMPDIR", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: the hook only calls prctl(2), getppid(2) and _exit(2), which are
        // async-signal-safe and allocate nothing, as code between fork and exec must.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                // Kiln died between fork and prctl: nobody would ever kill this VM.
                if nix::unistd::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| VmError::Qemu {
            reason: format!("cannot start {}: {e}", cfg.qemu.display()),
        })?;
        let console = Arc::new(Mutex::new(Console::default()));
        if let Some(out) = child.stdout.take() {
            read_lines(out, Arc::clone(&console), "");
        }
        if let Some(err) = child.stderr.take() {
            read_lines(err, Arc::clone(&console), "qemu: ");
        }
        let kill = |child: &mut Child| {
            let _ = child.kill();
            let _ = child.wait();
        };
        let deadline = started + connect_timeout;
        let channel = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    kill(&mut child);
                    return Err(VmError::prepare("accept the agent channel")(e));
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Let the reader threads drain what QEMU said.
                std::thread::sleep(Duration::from_millis(50));
                return Err(VmError::Launch {
                    reason: format!("QEMU exited at once ({status})"),
                    console: tail_of(&console),
                });
            }
            if Instant::now() > deadline {
                kill(&mut child);
                return Err(VmError::Launch {
                    reason: format!(
                        "QEMU did not connect the agent channel within {}s",
                        connect_timeout.as_secs()
                    ),
                    console: tail_of(&console),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        channel
            .set_nonblocking(false)
            .map_err(VmError::prepare("set up the agent channel"))?;
        Ok(Machine {
            child,
            exited: None,
            console,
            channel,
            started,
            _dir: dir,
        })
    }

    /// The agent channel (a clone of the socket).
    pub fn channel(&self) -> Result<UnixStream, VmError> {
        self.channel
            .try_clone()
            .map_err(VmError::prepare("clone the agent channel"))
    }

    /// The last console lines (and QEMU's own messages, prefixed `qemu: `).
    pub fn console(&self) -> String {
        tail_of(&self.console)
    }

    /// The console's `Kernel panic - not syncing: …` line, if the guest panicked.
    pub fn panic_line(&self) -> Option<String> {
        self.console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .panic
            .clone()
    }

    /// When QEMU was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// QEMU's exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.exited = Some(s);
        }
        self.exited
    }

    /// Waits up to `timeout` for QEMU to exit by itself; kills it after that. Returns
    /// whether it exited by itself.
    pub fn wait_or_kill(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.try_wait().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        false
    }

    /// Kills QEMU now and reaps it.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            if let Ok(s) = self.child.wait() {
                self.exited = Some(s);
            }
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail_of(console: &Mutex<Console>) -> String {
    let c = console.lock().unwrap_or_else(|p| p.into_inner());
    c.lines.iter().cloned().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_khz_reads_cpu_mhz() {
        let info = "processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2596.120\n";
        assert_eq!(host_khz(info), Some(2_596_120));
        assert_eq!(host_khz("flags: fpu"), None);
    }

    #[test]
    fn tcg_gets_the_tsc_frequency_and_kvm_does_not() {
        assert!(kernel_cmdline(Accel::Tcg, Some(2_596_120), "").contains("tsc_early_khz=2596120"));
        assert!(!kernel_cmdline(Accel::Kvm, Some(2_596_120), "").contains("tsc_early_khz"));
        assert!(kernel_cmdline(Accel::Tcg, None, " loglevel=7 ").ends_with(" loglevel=7"));
    }

    #[test]
    fn args_attach_disks_by_serial_and_drop_the_nic_without_network() {
        let cfg = MachineConfig {
            qemu: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cpus: 2,
            memory_mb: 512,
            disks: vec![
                Disk {
                    path: "/root.img".into(),
                    serial: "kiln-root",
                    mode: DiskMode::ReadOnly,
                },
                Disk {
                    path: "/scratch.img".into(),
                    serial: "kiln-scratch",
                    mode: DiskMode::Throwaway,
                },
            ],
            network: false,
            append: String::new(),
            port_name: "kiln.agent",
        };
        let a = qemu_args(&cfg, Path::new("/s/agent.sock"), None).join(" ");
        assert!(a.contains("-M microvm -accel tcg -cpu max -m 512M -smp 2"));
        assert!(a.contains("file=/root.img,format=raw,if=none,readonly=on"));
        assert!(a.contains("virtio-blk-device,drive=d0,serial=kiln-root"));
        assert!(a.contains("file=/scratch.img,format=raw,if=none,snapshot=on"));
        assert!(a.contains("virtserialport,chardev=agent,name=kiln.agent"));
        assert!(!a.contains("netdev"));
        let with_net = qemu_args(
            &MachineConfig {
                network: true,
                ..cfg
            },
            Path::new("/s"),
            None,
        )
        .join(" ");
        assert!(with_net.contains("-netdev user,id=net0 -device virtio-net-device,netdev=net0"));
    }
}
