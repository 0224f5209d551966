//! The host ↔ guest-agent protocol on the virtio-serial port: length-prefixed frames.
//!
//! A frame is `kind: u8`, `len: u32` little-endian, then `len` bytes. Structured messages
//! ([`Hello`], [`StepMessage`], [`GuestOutcome`], [`GuestFailure`], [`TarHeader`]) are JSON;
//! output lines and tar data are raw bytes. The guest is untrusted: the host refuses frames
//! longer than [`MAX_FRAME`] and unknown kinds, and never trusts a tar stream beyond what
//! [`crate::oci`]'s hardened unpacker accepts.
//!
//! One step, in order:
//!
//! ```text
//! guest → Hello                              (agent up: kernel release, uptime)
//! host  → Step(StepMessage)
//! guest → Stdout/Stderr lines, Heartbeat every second while the step runs
//! guest → Outcome(GuestOutcome) | Failure(GuestFailure)
//! guest → TarBegin(TarHeader{what: "upper"}), Tar…, TarEnd        (exit 0 only)
//! guest → TarBegin(TarHeader{what: "cache", index}), Tar…, TarEnd (per cache mount)
//! guest → Done                               (everything synced)
//! host  → PowerOff                           (the agent powers the VM off)
//! ```

use crate::ir;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// The largest frame either side accepts (tar data comes in chunks of [`TAR_CHUNK`]).
pub const MAX_FRAME: usize = 1 << 20;
/// Tar data per frame.
pub const TAR_CHUNK: usize = 64 << 10;
/// The virtio-serial port name the agent looks for (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "kiln.agent";
/// The virtio-blk serials of the disks (`/sys/block/vd*/serial`).
pub const ROOT_SERIAL: &str = "kiln-root";
/// The scratch disk's serial.
pub const SCRATCH_SERIAL: &str = "kiln-scratch";
/// The context disk's serial.
pub const CONTEXT_SERIAL: &str = "kiln-context";
/// Kernel command-line switch that makes the agent crash the guest kernel on purpose
/// (`kiln.crash=step`: through `/proc/sysrq-trigger` when the step would start). Used to
/// check that the host detects a guest panic; set through `KILN_VM_APPEND`.
pub const CRASH_SWITCH: &str = "kiln.crash=step";

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// guest → host: [`Hello`].
    Hello = 1,
    /// host → guest: [`StepMessage`].
    Step = 2,
    /// guest → host: one line of the step's stdout (no newline).
    Stdout = 3,
    /// guest → host: one line of the step's stderr.
    Stderr = 4,
    /// guest → host: [`GuestOutcome`].
    Outcome = 5,
    /// guest → host: [`GuestFailure`].
    Failure = 6,
    /// guest → host: a tar stream starts ([`TarHeader`]).
    TarBegin = 7,
    /// guest → host: tar bytes.
    Tar = 8,
    /// guest → host: the tar stream is complete.
    TarEnd = 9,
    /// guest → host: the agent is alive (sent every second while a step runs).
    Heartbeat = 10,
    /// guest → host: everything is synced; power-off follows.
    Done = 11,
    /// guest → host: a line of the agent's own log.
    Log = 12,
    /// host → guest: everything arrived; power off.
    PowerOff = 13,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            Hello, Step, Stdout, Stderr, Outcome, Failure, TarBegin, Tar, TarEnd, Heartbeat, Done,
            Log, PowerOff,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes is over {MAX_FRAME}", payload.len()),
        ));
    }
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    // One write for small frames keeps them whole on the port.
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&head);
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// Writes a JSON message as one frame.
pub fn write_json(w: &mut impl Write, kind: Kind, msg: &impl Serialize) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    write_frame(w, kind, &bytes)
}

/// Reads one frame; `Ok(None)` at a clean end of stream (between frames).
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(Kind, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let kind = Kind::from_u8(head[0]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame kind {}", head[0]),
        )
    })?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over {MAX_FRAME}"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((kind, payload)))
}

/// Decodes a JSON payload.
pub fn decode<T: for<'de> Deserialize<'de>>(what: &str, payload: &[u8]) -> io::Result<T> {
    serde_json::from_slice(payload).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad {what} message: {e}"),
        )
    })
}

/// The agent is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub agent: String,
    /// The guest kernel's release (`uname -r`).
    pub kernel: String,
    /// Guest uptime when the agent was ready, ms.
    pub uptime_ms: u64,
}

/// The root directory's attributes the step's upper layer starts with (overlayfs shows the
/// upper's root as the merged root).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootAttrs {
    /// Mode bits (12).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// mtime, seconds.
    pub mtime: i64,
    /// mtime, nanoseconds.
    pub mtime_nsec: i64,
}

/// A `RUN --mount` as the guest gets it (same order as `run.mounts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "lowercase")]
pub enum GuestMount {
    /// Its source is the context disk's entry `name` (a file or a directory).
    Bind {
        /// The top-level entry in the context tar.
        name: String,
    },
    /// A cache directory: its current content is the context disk's entry `name`; the agent
    /// sends it back after the step.
    Cache {
        /// The top-level entry in the context tar.
        name: String,
    },
    /// A tmpfs.
    Tmpfs,
    /// A secret's bytes (held in guest memory only), or `None` when not provided.
    Secret {
        /// The content.
        content: Option<Vec<u8>>,
    },
    /// Not supported.
    Ssh,
}

/// One step to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepMessage {
    /// The step.
    pub run: ir::Run,
    /// Hostname inside the step.
    pub hostname: String,
    /// `/etc/resolv.conf` for the step.
    pub resolv_conf: String,
    /// One per `run.mounts`.
    pub mounts: Vec<GuestMount>,
    /// Kill the step after this long.
    pub timeout_ms: Option<u64>,
    /// The VM has a NIC (QEMU user networking) for the agent to configure.
    pub network: bool,
    /// Attributes of the upper layer's root.
    pub root: RootAttrs,
    /// A sandbox command: the root disk is the sandbox's own writable disk and the command
    /// runs on it directly (no scratch disk, no upper layer sent back).
    #[serde(default)]
    pub sandbox: bool,
}

/// How the step's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum GuestExit {
    /// Exit code.
    Exited(i32),
    /// Killing signal.
    Signaled(i32),
}

/// The step ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestOutcome {
    /// How it ended.
    pub exit: GuestExit,
    /// Killed at the timeout.
    pub timed_out: bool,
    /// The guest kernel's OOM killer struck during the step.
    pub oom_killed: bool,
    /// Time the command ran, ms.
    pub run_ms: u64,
}

/// The step could not run (setup failed in the guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestFailure {
    /// The error, with its causes.
    pub message: String,
}

/// What a tar stream holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "what", rename_all = "lowercase")]
pub enum TarHeader {
    /// The step's upper layer (OCI whiteouts).
    Upper,
    /// A cache mount's directory after the step.
    Cache {
        /// Its index in `run.mounts`.
        index: usize,
    },
}

/// Writes tar bytes as [`Kind::Tar`] frames of at most [`TAR_CHUNK`].
pub struct FrameWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// Frames into `inner`.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::with_capacity(TAR_CHUNK),
        }
    }

    /// Sends what is buffered and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.send()?;
        Ok(self.inner)
    }

    fn send(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            write_frame(&mut self.inner, Kind::Tar, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(TAR_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == TAR_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Stdout, b"hello").unwrap();
        write_json(
            &mut buf,
            Kind::Outcome,
            &GuestOutcome {
                exit: GuestExit::Exited(3),
                timed_out: false,
                oom_killed: false,
                run_ms: 7,
            },
        )
        .unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((Kind::Stdout, b"hello".to_vec()))
        );
        let (k, p) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(k, Kind::Outcome);
        let o: GuestOutcome = decode("outcome", &p).unwrap();
        assert_eq!(o.exit, GuestExit::Exited(3));
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn oversized_unknown_and_truncated_frames_are_refused() {
        let mut big = vec![Kind::Tar as u8];
        big.extend_from_slice(&((MAX_FRAME as u32) + 1).to_le_bytes());
        assert!(read_frame(&mut &big[..]).is_err());
        let unknown = [200u8, 0, 0, 0, 0];
        assert!(read_frame(&mut &unknown[..]).is_err());
        let truncated = [Kind::Stdout as u8, 5, 0, 0, 0, b'h'];
        assert!(read_frame(&mut &truncated[..]).is_err());
        let half_head = [Kind::Stdout as u8, 5];
        assert!(read_frame(&mut &half_head[..]).is_err());
    }

    #[test]
    fn frame_writer_chunks_tar_data() {
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out);
        w.write_all(&vec![7u8; TAR_CHUNK * 2 + 10]).unwrap();
        w.finish().unwrap();
        let mut r = &out[..];
        let mut sizes = Vec::new();
        while let Some((k, p)) = read_frame(&mut r).unwrap() {
            assert_eq!(k, Kind::Tar);
            sizes.push(p.len());
        }
        assert_eq!(sizes, vec![TAR_CHUNK, TAR_CHUNK, 10]);
    }
}
