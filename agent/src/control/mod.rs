//! The agent's control-channel client: connect to the Controller
//! (`shoal.controller=`), authenticate (Noise IKpsk1: the pinned
//! `shoal.controller_key=` and the site secret `shoal.enrol_key=`), say
//! `Hello`, then heartbeat and run the steps it offers, one at a time, until
//! a power step ends the agent. See `protocol/src/{channel,control,frame}.rs`
//! for the wire and ARCHITECTURE.md for where this sits.
//!
//! Plain threads and blocking sockets, no async runtime: this thread
//! connects, reads and heartbeats; each step runs on a worker thread
//! (`steps.rs`); every write goes through the one writer in `link.rs`.
//! Connection failures back off (0.5 s doubling to 4 s, jittered: `backoff.rs`),
//! and a lost connection never stops a running step: the agent reconnects,
//! says `Hello` again with the step it is running, and reports the step's end
//! on the new connection. A dead Controller is noticed through
//! `TCP_USER_TIMEOUT` (heartbeats left unacknowledged for twice the
//! Controller's timeout) and TCP keep-alive.
//! `swarm.rs` runs many clients in one process to load-test a Controller.

mod backoff;
mod deploy;
mod link;
mod steps;
pub mod swarm;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use shoal_protocol::channel::{ChannelError, Initiator, Keypair, Psk, PublicKey};
use shoal_protocol::control::{
    self, AgentMsg, ControllerMsg, Enrolment, Hello, Identity, MessageError,
};
use shoal_protocol::frame::{self, Decoder, FrameError};
use shoal_protocol::Inventory;

use self::backoff::{Backoff, Rng};
use self::link::{seal_frame, Conn, Shared, Sock};
use crate::modules::error_chain;
use crate::settings::{PowerAction, Settings};

/// TCP connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the Controller has to answer the handshake, and `Hello`.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// After a power step's `Finished`, how long to wait for the Controller to
/// close the connection (proof it read everything) before powering off.
const LINGER: Duration = Duration::from_secs(2);
/// How long a power step waits for a connection to report its end on.
const POWER_GRACE: Duration = Duration::from_secs(10);
/// Shortest heartbeat interval honoured, whatever the Controller asks.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("shoal.controller={controller} is set but shoal.controller_key= is missing (the Controller's public key, 64 hex digits)")]
    MissingControllerKey { controller: String },
    #[error("shoal.controller={controller} is set but shoal.enrol_key= is missing (the site enrolment secret, 64 hex digits)")]
    MissingEnrolKey { controller: String },
    #[error("controller {addr}: cannot resolve the address: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("controller {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("controller {addr} refused the handshake: wrong enrolment secret or the controller is not the one pinned (shoal.controller_key)")]
    Refused { addr: String },
    #[error("controller {addr}: no {what} in {} s", REPLY_TIMEOUT.as_secs())]
    NoReply { addr: String, what: &'static str },
    #[error("controller {addr} closed the connection{when}")]
    Closed { addr: String, when: &'static str },
    #[error("controller {addr}: {reason}")]
    Io { addr: String, reason: String },
    #[error("controller {addr}: bad frame")]
    Frame { addr: String, source: FrameError },
    #[error("frame from controller {addr} failed authentication")]
    Authentication { addr: String },
    #[error("undecodable message from controller {addr}")]
    Message { addr: String, source: MessageError },
    #[error("controller {addr} sent {what} before Welcome")]
    Unexpected { addr: String, what: &'static str },
    #[error("controller {addr} turned the agent away: {text}")]
    Rejected { addr: String, text: String },
    #[error("cannot encode a message for the controller")]
    Encode { source: MessageError },
    #[error("controller {addr}: cannot seal a message")]
    Seal { addr: String, source: ChannelError },
    #[error("cannot start the handshake")]
    Handshake { source: ChannelError },
}

/// Counters, shared by all clients of a swarm (one client otherwise).
#[derive(Debug, Default)]
pub struct Stats {
    /// Clients registered right now.
    pub registered: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Registered connections lost (each followed by reconnecting).
    pub reconnects: AtomicU64,
}

/// What the client needs from the rest of the agent.
pub trait Hooks: Send + Sync {
    /// Takes the inventory again (the `Inventory` step).
    fn inventory(&self) -> Inventory;
    /// The machine's root: `select` finds disks under `ROOT/sys` and
    /// `ROOT/dev` (the `deploy` step).
    fn root(&self) -> PathBuf {
        PathBuf::from("/")
    }
    /// Powers off or reboots, after the step's `Finished` went out. PID 1
    /// never returns from this; if it returns, `run` returns.
    fn power(&self, action: PowerAction);
}

/// The agent's own hooks: inventory from `root`; power through PID 1's
/// power path, or, as an ordinary process, exit.
#[derive(Debug, Clone)]
pub struct LocalHooks {
    pub root: PathBuf,
    pub pid1: bool,
}

impl Hooks for LocalHooks {
    fn inventory(&self) -> Inventory {
        crate::inventory::collect(&self.root)
    }

    fn root(&self) -> PathBuf {
        self.root.clone()
    }

    fn power(&self, action: PowerAction) {
        if self.pid1 {
            crate::init::power(action, "step from the controller");
        }
        let what = match action {
            PowerAction::Reboot => "reboot",
            _ => "power off",
        };
        info!("would {what}: exiting");
        std::process::exit(0);
    }
}

/// Where and how to connect.
#[derive(Clone)]
pub struct ClientConfig {
    /// `HOST:PORT`, resolved on each attempt.
    pub controller: String,
    pub controller_key: PublicKey,
    pub enrol_key: Psk,
    pub agent_version: String,
    /// The inventory for the first `Hello` (later ones carry the latest).
    pub inventory: Inventory,
    pub stats: Arc<Stats>,
    /// Log prefix for one of many clients in a process (`swarm`).
    pub name: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("controller", &self.controller)
            .field(
                "controller_key",
                &shoal_protocol::channel::to_hex(&self.controller_key),
            )
            .field("enrol_key", &"<hidden>")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// `Ok(None)` without `shoal.controller=`; an error if it is set but a
    /// key is missing.
    pub fn from_settings(
        settings: &Settings,
        inventory: Inventory,
    ) -> Result<Option<ClientConfig>, ControlError> {
        let Some(controller) = settings.controller.clone() else {
            return Ok(None);
        };
        let Some(controller_key) = settings.controller_key else {
            return Err(ControlError::MissingControllerKey { controller });
        };
        let Some(enrol_key) = settings.enrol_key else {
            return Err(ControlError::MissingEnrolKey { controller });
        };
        Ok(Some(ClientConfig {
            controller,
            controller_key,
            enrol_key,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            inventory,
            stats: Arc::default(),
            name: None,
        }))
    }
}

/// Runs the client until a power step: returns the action once the power
/// hook returns (which PID 1's and an ordinary agent's never do).
pub fn run(cfg: ClientConfig, hooks: impl Hooks + 'static) -> PowerAction {
    let who = cfg
        .name
        .as_ref()
        .map(|n| format!("{n}: "))
        .unwrap_or_default();
    if !crate::sys::random_ready() {
        warn!("{who}waiting for the kernel's random number generator to be seeded (no RDRAND or virtio-rng on this machine?)");
    }
    let mut rng = Rng::from_os();
    let boot_id = rng.next_u64();
    let keypair = loop {
        match Keypair::generate() {
            Ok(k) => break k,
            Err(e) => {
                error!("{who}cannot generate the agent's key pair: {e}; retrying in 5 s");
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    };
    let shared = Arc::new(Shared::new(
        who.clone(),
        Box::new(hooks),
        cfg.stats.clone(),
        cfg.inventory.clone(),
    ));
    let mut backoff = Backoff::default();
    loop {
        if let Some(action) = power_due(&shared) {
            shared.hooks.power(action);
            return action;
        }
        let (e, verb) = match register(&cfg, &shared, &keypair, boot_id) {
            Ok(session) => {
                backoff.reset();
                let end = run_session(&shared, session, &mut rng);
                cfg.stats.registered.fetch_sub(1, Ordering::Relaxed);
                match end {
                    Ended::Stopped => continue,
                    Ended::Lost(e) => {
                        cfg.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        (e, "reconnecting")
                    }
                }
            }
            // Once connected, the next attempt is a reconnect.
            Err(
                e @ (ControlError::Resolve { .. }
                | ControlError::Connect { .. }
                | ControlError::Refused { .. }),
            ) => (e, "retrying"),
            Err(e) => (e, "reconnecting"),
        };
        let wait = backoff.next(&mut rng);
        let text = format!(
            "{who}{}; {verb} in {:.1} s",
            error_chain(&e),
            wait.as_secs_f64()
        );
        match e {
            ControlError::Refused { .. } | ControlError::Rejected { .. } => error!("{text}"),
            _ => warn!("{text}"),
        }
        shared.sleep(wait);
    }
}

/// A power step finished and was reported (or could not be for too long).
fn power_due(shared: &Shared) -> Option<PowerAction> {
    let st = shared.lock();
    let (action, since) = st.stop?;
    if st.unsent.is_none() {
        return Some(action);
    }
    if since.elapsed() >= POWER_GRACE {
        warn!(
            "{}going to {action} without reporting the step's end: no connection to the controller",
            shared.who
        );
        return Some(action);
    }
    None
}

/// A registered connection, handed from `register` to `run_session`.
struct Session {
    stream: Arc<TcpStream>,
    /// Bytes already read past `Welcome`.
    decoder: Decoder,
    addr: String,
    generation: u64,
    heartbeat: Duration,
}

enum Ended {
    Lost(ControlError),
    /// A power step was reported and the connection closed.
    Stopped,
}

/// `connection refused`: the OS's text without ` (os error N)`, lower case.
pub(crate) fn describe(e: &io::Error) -> String {
    let s = e.to_string();
    let s = s.split(" (os error").next().unwrap_or_default();
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_lowercase().chain(c).collect(),
        None => format!("{:?}", e.kind()),
    }
}

fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, ControlError> {
    let resolve = |reason: String| ControlError::Resolve {
        addr: addr.to_owned(),
        reason,
    };
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| resolve(describe(&e)))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let reason = match last {
        None => return Err(resolve("no addresses".into())),
        Some(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            format!("no answer in {} s", timeout.as_secs())
        }
        Some(e) => describe(&e),
    };
    Err(ControlError::Connect {
        addr: addr.to_owned(),
        reason,
    })
}

/// Why no frame came.
enum NoFrame {
    Eof,
    Timeout,
    Io(io::Error),
    Frame(FrameError),
}

/// Reads until one whole frame is there, or the deadline passes.
fn read_frame(
    stream: &TcpStream,
    dec: &mut Decoder,
    deadline: Instant,
) -> Result<Vec<u8>, NoFrame> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame().map_err(NoFrame::Frame)? {
            return Ok(f);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NoFrame::Timeout);
        }
        stream.set_read_timeout(Some(left)).map_err(NoFrame::Io)?;
        match (&*stream).read(&mut buf) {
            Ok(0) => return Err(NoFrame::Eof),
            Ok(n) => dec.push(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(NoFrame::Io(e)),
        }
    }
}

/// Connects, authenticates, says `Hello` and waits for `Welcome`; then makes
/// the connection the current one.
fn register(
    cfg: &ClientConfig,
    shared: &Shared,
    keypair: &Keypair,
    boot_id: u64,
) -> Result<Session, ControlError> {
    let addr = cfg.controller.clone();
    let io_err = |e: io::Error| ControlError::Io {
        addr: addr.clone(),
        reason: describe(&e),
    };
    let stream = connect(&addr, CONNECT_TIMEOUT)?;
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_err)?;

    let (init, m1) = Initiator::start(keypair, &cfg.controller_key, &cfg.enrol_key)
        .map_err(|source| ControlError::Handshake { source })?;
    let m1 = frame::to_vec(&m1).map_err(|source| ControlError::Frame {
        addr: addr.clone(),
        source,
    })?;
    (&stream).write_all(&m1).map_err(io_err)?;
    let mut dec = Decoder::new();
    let refused = || ControlError::Refused { addr: addr.clone() };
    let m2 =
        read_frame(&stream, &mut dec, Instant::now() + REPLY_TIMEOUT).map_err(|e| match e {
            NoFrame::Eof => refused(),
            NoFrame::Io(e) if e.kind() == io::ErrorKind::ConnectionReset => refused(),
            NoFrame::Timeout => ControlError::NoReply {
                addr: addr.clone(),
                what: "handshake reply",
            },
            NoFrame::Io(e) => io_err(e),
            NoFrame::Frame(source) => ControlError::Frame {
                addr: addr.clone(),
                source,
            },
        })?;
    let mut transport = init.finish(&m2).map_err(|_| refused())?;

    let hello = {
        let st = shared.lock();
        AgentMsg::Hello(Hello {
            agent_version: cfg.agent_version.clone(),
            boot_id,
            identity: Identity::from_inventory(&st.inventory),
            inventory: st.inventory.clone(),
            running: st.running_step(),
        })
    };
    let frame = seal_frame(&mut transport, &addr, &hello)?;
    (&stream).write_all(&frame).map_err(io_err)?;

    let f = read_frame(&stream, &mut dec, Instant::now() + REPLY_TIMEOUT).map_err(|e| match e {
        NoFrame::Eof => ControlError::Closed {
            addr: addr.clone(),
            when: " before welcoming the agent",
        },
        NoFrame::Timeout => ControlError::NoReply {
            addr: addr.clone(),
            what: "welcome",
        },
        NoFrame::Io(e) => io_err(e),
        NoFrame::Frame(source) => ControlError::Frame {
            addr: addr.clone(),
            source,
        },
    })?;
    let plain = transport
        .open(&f)
        .map_err(|_| ControlError::Authentication { addr: addr.clone() })?;
    let (device, enrolment, heartbeat_ms, timeout_ms) =
        match control::decode::<ControllerMsg>(&plain) {
            Ok(ControllerMsg::Welcome {
                device,
                enrolment,
                heartbeat_ms,
                timeout_ms,
            }) => (device, enrolment, heartbeat_ms, timeout_ms),
            Ok(ControllerMsg::Error { text }) => {
                let text = control::clip(&text);
                return Err(ControlError::Rejected { addr, text });
            }
            Ok(ControllerMsg::Offer { .. }) => {
                return Err(ControlError::Unexpected {
                    addr,
                    what: "an offer",
                })
            }
            Ok(ControllerMsg::Cancel { .. }) => {
                return Err(ControlError::Unexpected {
                    addr,
                    what: "a cancel",
                })
            }
            Err(source) => return Err(ControlError::Message { addr, source }),
        };

    let heartbeat = Duration::from_millis(heartbeat_ms.into()).max(MIN_HEARTBEAT);
    let timeout = Duration::from_millis(timeout_ms.into()).max(heartbeat);
    liveness(&stream, timeout, &shared.who);
    stream
        .set_write_timeout(Some(timeout * 2))
        .map_err(io_err)?;
    let status = match enrolment {
        Enrolment::Approved => "approved",
        Enrolment::Pending => "pending",
    };
    info!(
        "{}registered with controller {addr} as device {device} ({status})",
        shared.who
    );
    shared.stats.registered.fetch_add(1, Ordering::Relaxed);

    let stream = Arc::new(stream);
    let conn = Conn {
        addr: addr.clone(),
        out: Box::new(Sock(stream.clone())),
        transport,
    };
    let generation = shared.lock().publish(conn);
    Ok(Session {
        stream,
        decoder: dec,
        addr,
        generation,
        heartbeat,
    })
}

/// Makes a dead Controller show as an error: unacknowledged data (our
/// heartbeats) for twice its timeout ends the connection, and so do
/// unanswered keep-alive probes after about as long when idle.
fn liveness(stream: &TcpStream, timeout: Duration, who: &str) {
    use nix::sys::socket::{setsockopt, sockopt};
    let user_ms = (timeout * 2).as_millis().clamp(2_000, 600_000) as u32;
    let idle = (timeout.as_secs() as u32).clamp(1, 600);
    let interval = (idle / 3).max(1);
    let set = setsockopt(stream, sockopt::TcpUserTimeout, &user_ms)
        .and_then(|()| setsockopt(stream, sockopt::KeepAlive, &true))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepIdle, &idle))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepInterval, &interval))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepCount, &3));
    if let Err(e) = set {
        warn!("{who}cannot set TCP keep-alive on the controller connection: {e}; a dead controller may go unnoticed for long");
    }
}

/// Reads and acts on the Controller's messages, heartbeating in between,
/// until the connection is lost or a power step has been reported.
fn run_session(shared: &Arc<Shared>, mut s: Session, rng: &mut Rng) -> Ended {
    let mut next_heartbeat = Instant::now() + rng.jitter(s.heartbeat, 80, 120);
    let mut stopping: Option<Instant> = None;
    let mut buf = vec![0u8; 16 * 1024];
    let end = loop {
        if let Err(e) = drain(shared, &mut s) {
            break Ended::Lost(e);
        }
        {
            let mut st = shared.lock();
            if st.generation != s.generation || st.conn.is_none() {
                let e = st.lost.take().unwrap_or(ControlError::Closed {
                    addr: s.addr.clone(),
                    when: "",
                });
                break Ended::Lost(e);
            }
            match stopping {
                Some(since) if since.elapsed() >= LINGER => break Ended::Stopped,
                Some(_) => {}
                None if st.stop.is_some() => {
                    // The Finished is out: half-close, so the Controller reads
                    // it, sees the end, and closes (then we power off).
                    if let Some(c) = st.conn.as_mut() {
                        c.out.shutdown(Shutdown::Write);
                    }
                    stopping = Some(Instant::now());
                }
                None if Instant::now() >= next_heartbeat => {
                    st.seq += 1;
                    let msg = AgentMsg::Heartbeat {
                        seq: st.seq,
                        running: st.running_step(),
                    };
                    if st.send(&msg).is_ok() {
                        shared.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                    }
                    next_heartbeat = Instant::now() + rng.jitter(s.heartbeat, 80, 120);
                    continue;
                }
                None => {}
            }
        }
        let wait = match stopping {
            Some(_) => Duration::from_millis(50),
            None => next_heartbeat.saturating_duration_since(Instant::now()),
        };
        let io_lost = |e: io::Error| ControlError::Io {
            addr: s.addr.clone(),
            reason: describe(&e),
        };
        if let Err(e) = s
            .stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        {
            break Ended::Lost(io_lost(e));
        }
        match (&*s.stream).read(&mut buf) {
            Ok(0) if stopping.is_some() => break Ended::Stopped,
            Ok(0) => {
                break Ended::Lost(ControlError::Closed {
                    addr: s.addr.clone(),
                    when: "",
                })
            }
            Ok(n) => s.decoder.push(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) if stopping.is_some() => break Ended::Stopped,
            Err(e) => break Ended::Lost(io_lost(e)),
        }
    };
    let mut st = shared.lock();
    let end = match (end, st.lost.take()) {
        // A writer saw the failure first: its reason is the better one.
        (Ended::Lost(_), Some(first)) if st.generation == s.generation => Ended::Lost(first),
        (end, _) => end,
    };
    if st.generation == s.generation {
        if let Some(mut c) = st.conn.take() {
            c.out.shutdown(Shutdown::Both);
        }
    }
    debug!("{}connection to controller {} closed", shared.who, s.addr);
    end
}

/// Acts on the whole frames read so far.
fn drain(shared: &Arc<Shared>, s: &mut Session) -> Result<(), ControlError> {
    loop {
        let frame = match s.decoder.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(source) => {
                return Err(ControlError::Frame {
                    addr: s.addr.clone(),
                    source,
                })
            }
        };
        let mut st = shared.lock();
        if st.generation != s.generation {
            return Ok(());
        }
        let Some(conn) = st.conn.as_mut() else {
            return Ok(());
        };
        let plain = conn
            .transport
            .open(&frame)
            .map_err(|_| ControlError::Authentication {
                addr: s.addr.clone(),
            })?;
        let msg =
            control::decode::<ControllerMsg>(&plain).map_err(|source| ControlError::Message {
                addr: s.addr.clone(),
                source,
            })?;
        steps::handle(shared, &mut st, msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::channel::{respond, Transport};
    use shoal_protocol::control::{Outcome, Step, StepRef};
    use std::net::TcpListener;
    use std::sync::Mutex;

    /// A throwaway Controller end: handshake, then sealed messages.
    struct Responder {
        stream: TcpStream,
        dec: Decoder,
        transport: Transport,
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    impl Responder {
        fn accept(listener: &TcpListener, ctl: &Keypair, psk: &Psk) -> Responder {
            let (stream, _) = listener.accept().unwrap();
            let mut dec = Decoder::new();
            let m1 = read_frame(&stream, &mut dec, soon())
                .ok()
                .expect("message 1");
            let (transport, m2) = respond(ctl, psk, &m1).unwrap();
            (&stream).write_all(&frame::to_vec(&m2).unwrap()).unwrap();
            Responder {
                stream,
                dec,
                transport,
            }
        }

        fn recv(&mut self) -> AgentMsg {
            let f = read_frame(&self.stream, &mut self.dec, soon())
                .ok()
                .expect("a frame");
            control::decode(&self.transport.open(&f).unwrap()).unwrap()
        }

        /// The next message that is not a heartbeat, log line or progress.
        fn recv_main(&mut self) -> AgentMsg {
            loop {
                match self.recv() {
                    AgentMsg::Heartbeat { .. }
                    | AgentMsg::Log { .. }
                    | AgentMsg::Progress { .. } => {}
                    m => return m,
                }
            }
        }

        fn send(&mut self, msg: &ControllerMsg) {
            let sealed = self.transport.seal(&control::encode(msg).unwrap()).unwrap();
            (&self.stream)
                .write_all(&frame::to_vec(&sealed).unwrap())
                .unwrap();
        }

        fn welcome(&mut self) {
            self.send(&ControllerMsg::Welcome {
                device: 7,
                enrolment: Enrolment::Approved,
                heartbeat_ms: 100,
                timeout_ms: 1000,
            });
        }

        fn offer(&mut self, step: StepRef, work: Step) {
            self.send(&ControllerMsg::Offer {
                step,
                work,
                timeout_ms: 0,
            });
        }
    }

    #[derive(Clone, Default)]
    struct TestHooks(Arc<Mutex<Vec<PowerAction>>>);

    impl Hooks for TestHooks {
        fn inventory(&self) -> Inventory {
            Inventory::default()
        }
        fn power(&self, action: PowerAction) {
            self.0.lock().unwrap().push(action);
        }
    }

    fn config(addr: SocketAddr, ctl: &Keypair, psk: Psk) -> ClientConfig {
        let mut inventory = Inventory::default();
        inventory.system.uuid = Some("4c4c4544-0000-1000-8000-000000000001".into());
        ClientConfig {
            controller: addr.to_string(),
            controller_key: ctl.public,
            enrol_key: psk,
            agent_version: "test".into(),
            inventory,
            stats: Arc::default(),
            name: None,
        }
    }

    fn hello(msg: AgentMsg) -> Hello {
        match msg {
            AgentMsg::Hello(h) => h,
            m => panic!("expected Hello, got {m:?}"),
        }
    }

    #[test]
    fn register_run_steps_reconnect_and_power_off() {
        let t = Instant::now();
        let (ctl, psk) = (Keypair::generate().unwrap(), [9u8; 32]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = config(listener.local_addr().unwrap(), &ctl, psk);
        let stats = cfg.stats.clone();
        let hooks = TestHooks::default();
        let agent = {
            let hooks = hooks.clone();
            std::thread::spawn(move || run(cfg, hooks))
        };
        let (s1, s2, s3) = (
            StepRef { job: 1, step: 0 },
            StepRef { job: 1, step: 1 },
            StepRef { job: 2, step: 0 },
        );

        let mut c = Responder::accept(&listener, &ctl, &psk);
        let first = hello(c.recv());
        assert_eq!(
            first.identity.uuid.as_deref(),
            Some("4c4c4544-0000-1000-8000-000000000001")
        );
        assert_eq!(first.running, None);
        c.welcome();
        c.offer(
            s1,
            Step::Echo {
                text: "hello".into(),
            },
        );
        assert_eq!(c.recv_main(), AgentMsg::Started { step: s1 });
        let done = AgentMsg::Finished {
            step: s1,
            outcome: Outcome::Succeeded {
                output: "hello".into(),
                inventory: None,
            },
        };
        assert_eq!(c.recv_main(), done);
        while !matches!(c.recv(), AgentMsg::Heartbeat { .. }) {}

        // The connection drops while a step runs: the agent comes back,
        // says it is still running it, and reports it on the new connection.
        c.offer(s2, Step::Wait { secs: 30 });
        assert_eq!(c.recv_main(), AgentMsg::Started { step: s2 });
        drop(c);
        let mut c = Responder::accept(&listener, &ctl, &psk);
        let second = hello(c.recv());
        assert_eq!(second.boot_id, first.boot_id, "same boot");
        assert_eq!(second.running, Some(s2));
        c.welcome();
        c.offer(s3, Step::Echo { text: "x".into() });
        assert_eq!(
            c.recv_main(),
            AgentMsg::Busy {
                offered: s3,
                running: s2
            }
        );
        c.send(&ControllerMsg::Cancel { step: s2 });
        let cancelled = AgentMsg::Finished {
            step: s2,
            outcome: Outcome::Cancelled,
        };
        assert_eq!(c.recv_main(), cancelled);

        c.offer(s3, Step::Poweroff);
        assert_eq!(c.recv_main(), AgentMsg::Started { step: s3 });
        let off = AgentMsg::Finished {
            step: s3,
            outcome: Outcome::Succeeded {
                output: "powering off".into(),
                inventory: None,
            },
        };
        assert_eq!(c.recv_main(), off);
        // The agent half-closes after the Finished; we close in turn.
        assert!(matches!(
            read_frame(&c.stream, &mut c.dec, soon()),
            Err(NoFrame::Eof)
        ));
        drop(c);
        assert_eq!(agent.join().unwrap(), PowerAction::Poweroff);
        assert_eq!(*hooks.0.lock().unwrap(), [PowerAction::Poweroff]);
        assert_eq!(stats.reconnects.load(Ordering::Relaxed), 1);
        assert_eq!(stats.registered.load(Ordering::Relaxed), 0);
        assert!(stats.heartbeats.load(Ordering::Relaxed) >= 1);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    fn shared() -> Shared {
        Shared::new(
            String::new(),
            Box::new(TestHooks::default()),
            Arc::default(),
            Inventory::default(),
        )
    }

    #[test]
    fn wrong_secret_is_refused_by_name() {
        let (ctl, psk) = (Keypair::generate().unwrap(), [9u8; 32]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let controller = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let m1 = read_frame(&stream, &mut Decoder::new(), soon())
                .ok()
                .unwrap();
            assert!(respond(&ctl, &[1u8; 32], &m1).is_err());
        });
        let agent_key = Keypair::generate().unwrap();
        let pinned = Keypair::generate().unwrap();
        let err = register(&config(addr, &pinned, psk), &shared(), &agent_key, 1)
            .err()
            .unwrap();
        controller.join().unwrap();
        assert!(matches!(err, ControlError::Refused { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "controller {addr} refused the handshake: wrong enrolment secret or the controller is not the one pinned (shoal.controller_key)"
            )
        );
    }

    #[test]
    fn connection_refused_is_named() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let kp = Keypair::generate().unwrap();
        let err = register(&config(addr, &kp, [0; 32]), &shared(), &kp, 1)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            format!("controller {addr}: connection refused")
        );
    }

    #[test]
    fn missing_keys_are_named() {
        let load =
            |c: &str| ClientConfig::from_settings(&Settings::load(None, c).0, Inventory::default());
        assert!(load("").unwrap().is_none());
        let key = "ab".repeat(32);
        let e = load("shoal.controller=10.0.0.1:7000").err().unwrap();
        assert!(
            e.to_string().contains("shoal.controller_key= is missing"),
            "{e}"
        );
        let e = load(&format!(
            "shoal.controller=10.0.0.1:7000 shoal.controller_key={key}"
        ))
        .err()
        .unwrap();
        assert!(e.to_string().contains("shoal.enrol_key= is missing"), "{e}");
        let secret = "cd".repeat(32);
        let cfg = load(&format!(
            "shoal.controller=h:1 shoal.controller_key={key} shoal.enrol_key={secret}"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(cfg.enrol_key, [0xcd; 32]);
        assert!(
            !format!("{cfg:?}").contains("cdcd"),
            "the secret stays out of logs"
        );
    }

    #[test]
    fn os_errors_read_like_prose() {
        let e = io::Error::from_raw_os_error(111);
        assert_eq!(describe(&e), "connection refused");
    }
}
