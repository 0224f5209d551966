//! The host end of the agent channel: frames in on a reader thread (so waiting always has a
//! deadline), frames out on the caller's thread, and tar streams as a [`Read`].

use super::protocol::{self, Kind};
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::{Duration, Instant};

/// What arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// A frame.
    Frame(Kind, Vec<u8>),
    /// Nothing within the timeout.
    Timeout,
    /// The channel closed (QEMU exited, or the guest closed the port).
    Closed,
    /// The guest sent something that is not a frame.
    Broken(String),
}

enum Event {
    Frame(Kind, Vec<u8>),
    Closed,
    Broken(String),
}

/// A connected agent channel.
pub struct Session {
    rx: Receiver<Event>,
    out: UnixStream,
    /// When the last frame arrived (heartbeats included).
    pub last_frame: Instant,
}

impl Session {
    /// Starts reading `channel`.
    pub fn new(channel: UnixStream) -> io::Result<Session> {
        let mut input = channel.try_clone()?;
        // Bounded: a host that is busy unpacking slows the guest down instead of buffering.
        let (tx, rx): (SyncSender<Event>, _) = sync_channel(64);
        std::thread::spawn(move || {
            loop {
                let ev = match protocol::read_frame(&mut input) {
                    Ok(Some((k, p))) => Event::Frame(k, p),
                    Ok(None) => Event::Closed,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Event::Closed,
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        Event::Broken(e.to_string())
                    }
                    Err(_) => Event::Closed,
                };
                let end = !matches!(ev, Event::Frame(..));
                if tx.send(ev).is_err() || end {
                    return;
                }
            }
        });
        Ok(Session {
            rx,
            out: channel,
            last_frame: Instant::now(),
        })
    }

    /// Sends a frame.
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        protocol::write_frame(&mut self.out, kind, payload)
    }

    /// Sends a JSON message.
    pub fn send_json(&mut self, kind: Kind, msg: &impl serde::Serialize) -> io::Result<()> {
        protocol::write_json(&mut self.out, kind, msg)
    }

    /// The next frame, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Recv {
        match self.rx.recv_timeout(timeout) {
            Ok(Event::Frame(k, p)) => {
                self.last_frame = Instant::now();
                Recv::Frame(k, p)
            }
            Ok(Event::Closed) | Err(RecvTimeoutError::Disconnected) => Recv::Closed,
            Ok(Event::Broken(why)) => Recv::Broken(why),
            Err(RecvTimeoutError::Timeout) => Recv::Timeout,
        }
    }
}

/// Why a tar stream from the guest stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarStop {
    /// The channel closed.
    Closed,
    /// No frame for the idle limit.
    Idle,
    /// A frame that has no place in a tar stream, or garbage.
    Protocol(String),
    /// Kiln was interrupted.
    Interrupted,
}

/// The tar bytes of one stream (between `TarBegin` and `TarEnd`), as a reader. Heartbeats
/// in between are skipped. A reader error is reported through [`TarReader::stopped`].
pub struct TarReader<'s> {
    session: &'s mut Session,
    idle: Duration,
    interrupted: &'s dyn Fn() -> bool,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
    /// Why the stream ended early, if it did.
    pub stopped: Option<TarStop>,
}

impl<'s> TarReader<'s> {
    /// Reads the stream that follows a `TarBegin` on `session`; fails after `idle` without a
    /// frame, or when `interrupted()` says so.
    pub fn new(
        session: &'s mut Session,
        idle: Duration,
        interrupted: &'s dyn Fn() -> bool,
    ) -> Self {
        TarReader {
            session,
            idle,
            interrupted,
            buf: Vec::new(),
            pos: 0,
            done: false,
            stopped: None,
        }
    }

    /// Reads to the stream's end (what the unpacker left unread, e.g. tar padding).
    pub fn drain(&mut self) -> io::Result<()> {
        let mut sink = [0u8; 64 << 10];
        while self.read(&mut sink)? > 0 {}
        Ok(())
    }

    fn stop(&mut self, why: TarStop) -> io::Error {
        let e = io::Error::other(format!("{why:?}"));
        self.stopped = Some(why);
        e
    }
}

impl Read for TarReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            if (self.interrupted)() {
                return Err(self.stop(TarStop::Interrupted));
            }
            match self.session.recv(Duration::from_millis(200)) {
                Recv::Frame(Kind::Tar, data) => {
                    self.buf = data;
                    self.pos = 0;
                }
                Recv::Frame(Kind::TarEnd, _) => self.done = true,
                Recv::Frame(Kind::Heartbeat | Kind::Log, _) => {}
                Recv::Frame(k, _) => {
                    return Err(self.stop(TarStop::Protocol(format!(
                        "{k:?} frame inside a tar stream"
                    ))));
                }
                Recv::Timeout => {
                    if self.session.last_frame.elapsed() > self.idle {
                        return Err(self.stop(TarStop::Idle));
                    }
                }
                Recv::Closed => return Err(self.stop(TarStop::Closed)),
                Recv::Broken(why) => return Err(self.stop(TarStop::Protocol(why))),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
