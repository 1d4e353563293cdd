//! The client's shared state and its one writer.
//!
//! Everything the connection thread, step workers and heartbeats share sits
//! in one `Mutex<State>`: the current connection (if any), the running step,
//! a `Finished` that could not be delivered yet, and a pending power-off.
//! Every message goes out through `State::send`, which seals it with the
//! connection's Noise transport and writes the frame while the lock is held:
//! frames never interleave and transport nonces stay in order. A write error
//! tears the connection down (the connection thread notices and reconnects).

use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::error;
use shoal_protocol::channel::Transport;
use shoal_protocol::control::{self, AgentMsg, StepRef};
use shoal_protocol::{frame, Inventory};

use super::{describe, ControlError, Hooks, Stats};
use crate::modules::error_chain;
use crate::settings::PowerAction;

/// Where sealed frames go: a TCP socket, or a channel in tests.
pub(crate) trait Wire: Write + Send {
    fn shutdown(&mut self, how: Shutdown);
}

/// A socket shared with the connection thread, which reads from it.
#[derive(Debug)]
pub(crate) struct Sock(pub Arc<TcpStream>);

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

impl Wire for Sock {
    fn shutdown(&mut self, how: Shutdown) {
        let _ = self.0.shutdown(how);
    }
}

/// An established, registered connection.
pub(crate) struct Conn {
    pub addr: String,
    pub out: Box<dyn Wire>,
    pub transport: Transport,
}

/// The step being worked on.
#[derive(Debug)]
pub(crate) struct Running {
    pub step: StepRef,
    pub cancel: Arc<AtomicBool>,
}

/// Why a message did not go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsent {
    /// No connection right now.
    NotConnected,
    /// Writing failed; the connection is torn down.
    Lost,
    /// The message cannot be encoded (too large); it is dropped.
    Dropped,
}

pub(crate) struct State {
    pub who: String,
    pub conn: Option<Conn>,
    /// Bumped on every new connection, so a session knows whether the
    /// connection in `conn` is still its own.
    pub generation: u64,
    /// Why a writer tore the connection down (logged by the session).
    pub lost: Option<ControlError>,
    pub running: Option<Running>,
    /// A `Finished` the controller has not been sent yet.
    pub unsent: Option<AgentMsg>,
    /// A power step finished: power off or reboot once it is reported.
    pub stop: Option<(PowerAction, Instant)>,
    /// The latest inventory, for the next `Hello`.
    pub inventory: Inventory,
    /// Heartbeat sequence number, per process.
    pub seq: u64,
}

impl State {
    pub fn running_step(&self) -> Option<StepRef> {
        self.running.as_ref().map(|r| r.step)
    }

    /// Seals and writes one message on the current connection.
    pub fn send(&mut self, msg: &AgentMsg) -> Result<(), Unsent> {
        let conn = self.conn.as_mut().ok_or(Unsent::NotConnected)?;
        let frame = match seal_frame(&mut conn.transport, &conn.addr, msg) {
            Ok(f) => f,
            Err(e @ ControlError::Encode { .. }) => {
                error!("{}{}; message dropped", self.who, error_chain(&e));
                return Err(Unsent::Dropped);
            }
            Err(e) => {
                self.lose(e);
                return Err(Unsent::Lost);
            }
        };
        if let Err(e) = conn.out.write_all(&frame) {
            let e = ControlError::Io {
                addr: conn.addr.clone(),
                reason: format!("sending failed: {}", describe(&e)),
            };
            self.lose(e);
            return Err(Unsent::Lost);
        }
        Ok(())
    }

    /// Tears the connection down, remembering the first reason.
    pub fn lose(&mut self, why: ControlError) {
        if let Some(mut c) = self.conn.take() {
            c.out.shutdown(Shutdown::Both);
        }
        self.lost.get_or_insert(why);
    }

    /// Makes `conn` the current connection and delivers a `Finished` that
    /// was waiting for one. Returns the connection's generation.
    pub fn publish(&mut self, conn: Conn) -> u64 {
        self.generation += 1;
        self.conn = Some(conn);
        self.lost = None;
        if let Some(msg) = self.unsent.take() {
            match self.send(&msg) {
                Ok(()) | Err(Unsent::Dropped) => {}
                Err(Unsent::NotConnected | Unsent::Lost) => self.unsent = Some(msg),
            }
        }
        self.generation
    }
}

/// Encodes, seals and frames one message.
pub(crate) fn seal_frame(
    transport: &mut Transport,
    addr: &str,
    msg: &AgentMsg,
) -> Result<Vec<u8>, ControlError> {
    let plain = control::encode(msg).map_err(|source| ControlError::Encode { source })?;
    let sealed = transport
        .seal(&plain)
        .map_err(|source| ControlError::Seal {
            addr: addr.to_owned(),
            source,
        })?;
    // A sealed message is at most MAX_MESSAGE + 16 = MAX_FRAME bytes.
    frame::to_vec(&sealed).map_err(|source| ControlError::Frame {
        addr: addr.to_owned(),
        source,
    })
}

/// What the connection thread and the step workers share.
pub(crate) struct Shared {
    /// Log prefix: empty, or `swarm 17: ` for the swarm's clients.
    pub who: String,
    pub hooks: Box<dyn Hooks>,
    pub stats: Arc<Stats>,
    state: Mutex<State>,
    /// Signalled when a power step finishes, to cut a back-off short.
    wake: Condvar,
}

impl Shared {
    pub fn new(
        who: String,
        hooks: Box<dyn Hooks>,
        stats: Arc<Stats>,
        inventory: Inventory,
    ) -> Shared {
        let state = State {
            who: who.clone(),
            conn: None,
            generation: 0,
            lost: None,
            running: None,
            unsent: None,
            stop: None,
            inventory,
            seq: 0,
        };
        Shared {
            who,
            hooks,
            stats,
            state: Mutex::new(state),
            wake: Condvar::new(),
        }
    }

    /// The state; a panic on another thread does not poison it for us.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends if connected; log lines and progress are simply lost otherwise.
    pub fn send(&self, msg: &AgentMsg) -> Result<(), Unsent> {
        self.lock().send(msg)
    }

    /// Wakes `sleep` (a power step finished).
    pub fn notify(&self) {
        self.wake.notify_all();
    }

    /// Sleeps for `d`, or until a power step finishes, if none had before.
    pub fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut st = self.lock();
        let stopping = st.stop.is_some();
        loop {
            let now = Instant::now();
            if now >= deadline || (!stopping && st.stop.is_some()) {
                return;
            }
            st = match self.wake.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}
