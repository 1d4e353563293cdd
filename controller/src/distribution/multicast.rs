//! The Image Distribution service, multicast (`docs/multicast.md`): one
//! session per deploy step of a job on several devices, each with its own
//! group address (from the configured pool), session ID and fresh key.
//!
//! A session's sender is a thread with one UDP socket bound to the address
//! agents reach the Controller at: it multicasts blocks from there (UDP GSO:
//! up to 64 KiB of equal-sized datagrams per `sendmsg`, paced by a token
//! bucket at the state machine's rate) and receives the agents' reports on
//! it. `shoal_protocol::multicast::Sender` decides what to send. The
//! session starts when `min` receivers have reported or `wait` has passed,
//! whichever is first; receivers may join later. A receiver counts as
//! complete only when it reports the right completion digest; a deploy step
//! that says it succeeded without that fails (`session.rs`).
//!
//! `Member`s are handed to the device sessions; dropping the last member
//! of a session ends it. Snapshots of live and recently ended sessions are
//! what `shoalctl sessions` shows.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use nix::sys::socket::{self as sock, ControlMessage, MsgFlags};
use serde::{Deserialize, Serialize};
use shoal_protocol::control::MulticastOffer;
use shoal_protocol::image::Image;
use shoal_protocol::multicast::wire::{HEADER_LEN, TAG_LEN};
use shoal_protocol::multicast::{
    completion_digest, payload_for_mtu, Cipher, Geometry, Sender, SenderConfig,
};

/// Most datagrams in one GSO send.
const GSO_SEGMENTS: usize = 44;
/// Most bytes in one GSO send.
const GSO_BYTES: usize = 65000;
/// Chunks of stored bytes the sender keeps in memory.
const CACHE_CHUNKS: usize = 6;
/// Ended sessions kept for `shoalctl sessions`.
const KEEP_ENDED: usize = 32;

/// The service's settings (`shoal-controller serve --multicast-*`).
#[derive(Debug, Clone)]
pub struct MulticastConfig {
    /// Group addresses come from `pool`/`prefix`.
    pub pool: Ipv4Addr,
    pub prefix: u8,
    /// The UDP port of every group.
    pub port: u16,
    pub ttl: u32,
    /// Path MTU: datagrams are sized to fit it unfragmented.
    pub mtu: usize,
    /// Most bytes per second per session; `None`: adapt to loss only.
    pub max_rate: Option<f64>,
}

impl Default for MulticastConfig {
    fn default() -> Self {
        Self {
            pool: Ipv4Addr::new(239, 0, 0, 0),
            prefix: 8,
            port: 40000,
            ttl: 1,
            mtu: 1500,
            max_rate: None,
        }
    }
}

/// A step's multicast options (`deploy:…;cipher=rc4;min=3;wait=10`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOptions {
    /// `None` (`cipher=auto`, the default): [`Cipher::auto`].
    pub cipher: Option<Cipher>,
    /// Start when this many receivers joined (default: the job's devices).
    pub min: Option<u32>,
    /// Start at the latest after this many seconds (default 30).
    pub wait_secs: Option<u32>,
    /// Most megabytes per second (default: the service's setting).
    pub rate_mbps: Option<u32>,
}

/// Default start bound.
pub const DEFAULT_WAIT_SECS: u32 = 30;

/// What `shoalctl sessions` shows of a session.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionSnapshot {
    pub id: String,
    pub job: u64,
    pub step: u32,
    pub image: String,
    pub group: String,
    pub sender: String,
    pub cipher: String,
    /// waiting, sending, idle or ended.
    pub state: String,
    pub created_unix: u64,
    pub age_secs: f64,
    pub started_after_secs: Option<f64>,
    pub min_receivers: u32,
    pub wait_secs: u32,
    pub rate_mbps: f64,
    pub datagrams: u64,
    pub bytes_sent: u64,
    pub repair_blocks: u64,
    pub bad_reports: u64,
    pub data_chunks: u32,
    pub image_bytes: u64,
    pub receivers: Vec<ReceiverSnapshot>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReceiverSnapshot {
    pub receiver: u32,
    pub device: Option<i64>,
    /// Still in the session (its step is running).
    pub member: bool,
    pub confirmed: bool,
    pub wrong_digest: bool,
    pub chunks_done: u32,
    pub bytes_done: u64,
    pub mbps: f64,
    pub loss_pct: f64,
    pub received: u64,
    pub lost: u64,
    pub forged: u64,
    pub other_session: u64,
    pub skipped: u64,
    pub bad_chunks: u32,
    pub repairs_requested: u64,
    pub busy: bool,
    pub eta_secs: Option<f64>,
    pub last_heard_secs: f64,
}

/// One session.
#[derive(Debug)]
pub struct McSession {
    pub id: u64,
    key: [u8; 32],
    cipher: Cipher,
    group: SocketAddrV4,
    sender: SocketAddr,
    payload: usize,
    wait_secs: u32,
    stop: AtomicBool,
    state: Mutex<McState>,
}

#[derive(Debug, Default)]
struct McState {
    members: HashMap<u32, i64>,
    devices: HashMap<u32, i64>,
    next_receiver: u32,
    confirmed: HashSet<u32>,
    snapshot: SessionSnapshot,
}

impl McSession {
    fn lock(&self) -> std::sync::MutexGuard<'_, McState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `receiver` reported the right completion digest.
    pub fn confirmed(&self, receiver: u32) -> bool {
        self.lock().confirmed.contains(&receiver)
    }
}

/// A device's place in a session; dropping it leaves the session.
#[derive(Debug)]
pub struct Member {
    pub session: Arc<McSession>,
    pub receiver: u32,
    service: Multicast,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.service.leave(&self.session, self.receiver);
    }
}

#[derive(Debug, Default)]
struct Inner {
    live: HashMap<(u64, u32), Arc<McSession>>,
    ended: VecDeque<Arc<McSession>>,
}

/// The multicast sessions. Cheap to clone (shared state).
#[derive(Debug, Clone, Default)]
pub struct Multicast {
    cfg: Arc<MulticastConfig>,
    inner: Arc<Mutex<Inner>>,
}

/// What a device needs to join a step's session.
#[derive(Debug)]
pub struct Join<'a> {
    pub job: u64,
    pub step: u32,
    pub device: i64,
    /// Devices in the job (the default `min`).
    pub devices: u32,
    /// Whether every device in the job reported AES instructions (worked
    /// out only for the join that sets the session up; `false` otherwise).
    pub devices_aes: bool,
    pub image_name: &'a str,
    pub path: PathBuf,
    pub image: Arc<Image>,
    pub options: &'a StepOptions,
    /// The Controller's address as this agent reached it.
    pub local: IpAddr,
    pub expires: Instant,
}

impl Multicast {
    pub fn new(cfg: MulticastConfig) -> Self {
        Self {
            cfg: Arc::new(cfg),
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the step's session is set up (and not yet ended).
    pub fn has_session(&self, job: u64, step: u32) -> bool {
        self.lock().live.contains_key(&(job, step))
    }

    /// Joins `join.device` to the step's session, setting the session up
    /// (and starting its sender) for the first device.
    pub fn join(&self, join: Join<'_>) -> Result<(Member, MulticastOffer), String> {
        let session = {
            let mut inner = self.lock();
            match inner.live.get(&(join.job, join.step)) {
                Some(s) => s.clone(),
                None => {
                    let s = self.create(&inner, &join)?;
                    inner.live.insert((join.job, join.step), s.clone());
                    s
                }
            }
        };
        let receiver = {
            let mut st = session.lock();
            let r = st.next_receiver;
            st.next_receiver += 1;
            st.members.insert(r, join.device);
            st.devices.insert(r, join.device);
            r
        };
        let offer = MulticastOffer {
            group: session.group.to_string(),
            sender: session.sender.to_string(),
            session: session.id,
            key: session.key,
            cipher: session.cipher,
            receiver,
            payload: session.payload as u32,
            start_within_secs: session.wait_secs,
        };
        info!(
            "multicast session {:016x}: device {} joins as receiver {receiver}",
            session.id, join.device
        );
        Ok((
            Member {
                session,
                receiver,
                service: self.clone(),
            },
            offer,
        ))
    }

    fn create(&self, inner: &Inner, join: &Join<'_>) -> Result<Arc<McSession>, String> {
        let cfg = &self.cfg;
        let payload = payload_for_mtu(cfg.mtu)
            .ok_or_else(|| format!("multicast MTU {} is outside 576..=9216", cfg.mtu))?;
        let IpAddr::V4(local) = join.local else {
            return Err(format!(
                "multicast needs IPv4; the agent reached {}",
                join.local
            ));
        };
        let used: HashSet<Ipv4Addr> = inner.live.values().map(|s| *s.group.ip()).collect();
        let size = 1u64 << (32 - u32::from(cfg.prefix.min(32)));
        let base = u32::from(cfg.pool) & !((size - 1) as u32);
        let group = (1..size.saturating_sub(1).max(2))
            .map(|i| Ipv4Addr::from(base + i as u32))
            .find(|g| !used.contains(g))
            .ok_or_else(|| format!("multicast pool {}/{} exhausted", cfg.pool, cfg.prefix))?;
        let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(local), 0))
            .map_err(|e| format!("multicast sender socket on {local}: {e}"))?;
        socket
            .set_multicast_ttl_v4(cfg.ttl)
            .and_then(|()| socket.set_multicast_loop_v4(true))
            .and_then(|()| socket.set_nonblocking(true))
            .map_err(|e| format!("multicast sender socket: {e}"))?;
        let _ = sock::setsockopt(&socket, sock::sockopt::SndBufForce, &(8 << 20));
        let sender = socket
            .local_addr()
            .map_err(|e| format!("multicast sender socket: {e}"))?;
        let id = u64::from_be_bytes(
            crate::state::random_id().map_err(|e| crate::error_chain(&e))?[..8]
                .try_into()
                .expect("8 bytes"),
        );
        let key = crate::state::random_id().map_err(|e| crate::error_chain(&e))?;
        let file = File::open(&join.path)
            .map_err(|e| format!("image file {}: {e}", join.path.display()))?;
        let o = join.options;
        let (cipher, why) = match o.cipher {
            Some(c) => (c, "the step's choice"),
            None => {
                let own = shoal_protocol::multicast::hardware_aes();
                let c = Cipher::auto(own, join.devices_aes);
                let why = match (own, join.devices_aes) {
                    (true, true) => "auto: AES instructions here and on every device",
                    (false, _) => "auto: no AES instructions on the Controller",
                    (true, false) => "auto: not every device reported AES instructions",
                };
                (c, why)
            }
        };
        let max_rate = o.rate_mbps.map(|m| f64::from(m) * 1e6).or(cfg.max_rate);
        let min = o.min.unwrap_or(join.devices).max(1);
        let wait_secs = o.wait_secs.unwrap_or(DEFAULT_WAIT_SECS);
        let geo = Geometry::of_image(&join.image, payload);
        let state = Sender::new(
            SenderConfig {
                session: id,
                key,
                cipher,
                payload,
                max_rate,
                digest: completion_digest(&join.image),
            },
            geo,
        );
        let group = SocketAddrV4::new(group, cfg.port);
        let data_chunks = join.image.chunks.iter().filter(|e| !e.is_zero()).count() as u32;
        let session = Arc::new(McSession {
            id,
            key,
            cipher,
            group,
            sender,
            payload,
            wait_secs,
            stop: AtomicBool::new(false),
            state: Mutex::new(McState {
                next_receiver: shoal_protocol::multicast::wire::FIRST_RECEIVER,
                snapshot: SessionSnapshot {
                    id: format!("{id:016x}"),
                    job: join.job,
                    step: join.step,
                    image: join.image_name.to_owned(),
                    group: group.to_string(),
                    sender: sender.to_string(),
                    cipher: cipher.as_str().into(),
                    state: "waiting".into(),
                    created_unix: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    min_receivers: min,
                    wait_secs,
                    data_chunks,
                    image_bytes: join.image.header.metadata.source_size,
                    ..SessionSnapshot::default()
                },
                ..McState::default()
            }),
        });
        info!(
            "multicast session {id:016x}: job {} step {}, image {} to {group} from {sender}, {} ({why}), start at {min} receivers or after {wait_secs} s{}",
            join.job,
            join.step,
            join.image_name,
            cipher.as_str(),
            max_rate.map_or(String::new(), |r| format!(", at most {:.0} MB/s", r / 1e6))
        );
        let data_bytes = join
            .image
            .chunks
            .iter()
            .filter(|e| !e.is_zero())
            .map(|e| u64::from(e.volume_len))
            .sum();
        let run = Run {
            data_bytes,
            session: session.clone(),
            socket,
            state,
            file,
            image: join.image.clone(),
            min,
            wait: Duration::from_secs(u64::from(wait_secs)),
            expires: join.expires,
        };
        std::thread::Builder::new()
            .name(format!("mcast-{id:016x}"))
            .spawn(move || run.run())
            .map_err(|e| format!("starting the multicast sender: {e}"))?;
        Ok(session)
    }

    fn leave(&self, session: &Arc<McSession>, receiver: u32) {
        let empty = {
            let mut st = session.lock();
            st.members.remove(&receiver);
            st.members.is_empty()
        };
        if empty {
            session.stop.store(true, Ordering::SeqCst);
            let mut inner = self.lock();
            inner.live.retain(|_, s| !Arc::ptr_eq(s, session));
            inner.ended.push_back(session.clone());
            while inner.ended.len() > KEEP_ENDED {
                inner.ended.pop_front();
            }
        }
    }

    /// Live sessions, then recently ended ones, newest first.
    pub fn sessions(&self) -> Vec<SessionSnapshot> {
        let inner = self.lock();
        let mut all: Vec<SessionSnapshot> = inner
            .live
            .values()
            .chain(inner.ended.iter())
            .map(|s| s.lock().snapshot.clone())
            .collect();
        all.sort_by(|a, b| b.created_unix.cmp(&a.created_unix).then(b.job.cmp(&a.job)));
        all.dedup_by(|a, b| a.id == b.id);
        all
    }
}

/// A session's sender thread.
struct Run {
    session: Arc<McSession>,
    socket: UdpSocket,
    state: Sender,
    file: File,
    image: Arc<Image>,
    min: u32,
    wait: Duration,
    expires: Instant,
    /// Volume bytes of the data chunks (for receivers' ETA).
    data_bytes: u64,
}

impl Run {
    fn run(mut self) {
        let id = self.session.id;
        // Pacing sleeps are 100 µs or less: the default 50 µs of timer
        // slack would be half of that.
        if let Err(e) = nix::sys::prctl::set_timerslack(1_000) {
            debug!("multicast session {id:016x}: timer slack: {e}");
        }
        let created = Instant::now();
        let mut started_at: Option<Instant> = None;
        let mut cache: VecDeque<(u32, Arc<Vec<u8>>)> = VecDeque::new();
        let payload = self.session.payload;
        let max_dgram = HEADER_LEN + payload + TAG_LEN;
        let mut batch = vec![0u8; GSO_SEGMENTS * max_dgram];
        let mut pending: Option<(u32, u32)> = None;
        let mut allowance = 0f64;
        let mut last_fill = Instant::now();
        let mut last_snapshot = Instant::now() - Duration::from_secs(1);
        let mut gso = true;
        let mut rbuf = vec![0u8; 65536];
        let mut end_reason = "all receivers left";
        loop {
            let now = Instant::now();
            if self.session.stop.load(Ordering::SeqCst) {
                break;
            }
            if now >= self.expires {
                end_reason = "expired";
                break;
            }
            // Reports.
            for _ in 0..256 {
                match self.socket.recv_from(&mut rbuf) {
                    Ok((n, from)) => match self.state.on_report(Instant::now(), &mut rbuf[..n]) {
                        Ok((receiver, ack)) => {
                            // Record the confirmation before the agent can
                            // hear of it: its step may end right after.
                            let v = &self.state.receivers()[&receiver];
                            if v.confirmed && self.session.lock().confirmed.insert(receiver) {
                                info!(
                                    "multicast session {id:016x}: receiver {receiver} ({from}) complete, digest confirmed"
                                );
                            }
                            if let Some(ack) = ack {
                                let _ = self.socket.send_to(&ack, from);
                            }
                        }
                        Err(e) => {
                            debug!("multicast session {id:016x}: report from {from} dropped: {e}")
                        }
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!("multicast session {id:016x}: receiving reports: {e}");
                        break;
                    }
                }
            }
            if !self.state.started()
                && (self.state.receivers().len() as u32 >= self.min
                    || now.duration_since(created) >= self.wait)
            {
                info!(
                    "multicast session {id:016x}: starting with {} of {} receivers after {:.1} s",
                    self.state.receivers().len(),
                    self.min,
                    now.duration_since(created).as_secs_f64()
                );
                self.state.start();
                started_at = Some(now);
            }
            self.state.tick(now);
            if now.duration_since(last_snapshot) >= Duration::from_millis(250) {
                last_snapshot = now;
                debug!(
                    "multicast session {id:016x}: rate {:.1} MB/s, {} datagrams, queue {}, work {}",
                    self.state.rate() / 1e6,
                    self.state.stats().datagrams,
                    self.state.queued(),
                    self.state.has_work()
                );
                self.publish(created, started_at, "");
            }
            if pending.is_none() && !self.state.has_work() {
                let _ = nix::poll::poll(
                    &mut [nix::poll::PollFd::new(
                        self.socket.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )],
                    nix::poll::PollTimeout::from(5u8),
                );
                allowance = 0.0;
                last_fill = Instant::now();
                continue;
            }
            // Fill one batch of equal-sized datagrams.
            let mut seg_len = 0usize;
            let mut used = 0usize;
            let mut count = 0usize;
            while count < GSO_SEGMENTS && used + max_dgram <= GSO_BYTES {
                let Some((c, b)) = pending.take().or_else(|| self.state.next_block()) else {
                    break;
                };
                let len =
                    HEADER_LEN + self.state.block_len(c, b) + self.session.cipher.data_tag_len();
                if count > 0 && len > seg_len {
                    pending = Some((c, b));
                    break;
                }
                let data = match self.chunk(&mut cache, c) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!("multicast session {id:016x}: {e}; ending the session");
                        self.publish(created, started_at, "failed");
                        return;
                    }
                };
                let range = self.state.geometry().block_range(c, b);
                let n =
                    self.state
                        .seal_data(c, b, &data[range], &mut batch[used..used + max_dgram]);
                debug_assert_eq!(n, len);
                if count == 0 {
                    seg_len = n;
                }
                used += n;
                count += 1;
                if n < seg_len {
                    break;
                }
            }
            if count == 0 {
                continue;
            }
            // Pace.
            let rate = self.state.rate();
            loop {
                let t = Instant::now();
                // A small burst (two batches, or 200 µs at the rate, up to
                // four batches): receivers' queues and a switch's buffers
                // see a steady stream, not spikes, and a sleep that
                // overruns a little does not cost its share of the rate.
                let burst = (rate * 200e-6).clamp(2.0 * GSO_BYTES as f64, 4.0 * GSO_BYTES as f64);
                allowance =
                    (allowance + rate * t.duration_since(last_fill).as_secs_f64()).min(burst);
                last_fill = t;
                if allowance >= used as f64 {
                    break;
                }
                let need = (used as f64 - allowance) / rate;
                std::thread::sleep(Duration::from_secs_f64(need.min(0.005)));
            }
            allowance -= used as f64;
            if let Err(e) = self.send(&batch[..used], seg_len, count, &mut gso) {
                debug!(
                    "multicast session {id:016x}: sending to {}: {e}",
                    self.session.group
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        info!(
            "multicast session {id:016x}: ended ({end_reason}); {} datagrams, {} bytes, {} repair blocks",
            self.state.stats().datagrams,
            self.state.stats().bytes,
            self.state.stats().repair_blocks
        );
        self.publish(created, started_at, "ended");
    }

    /// `count` datagrams of `seg_len` bytes (the last may be shorter).
    fn send(&self, buf: &[u8], seg_len: usize, count: usize, gso: &mut bool) -> io::Result<()> {
        let to = sock::SockaddrIn::from(self.session.group);
        if *gso && count > 1 {
            let seg = seg_len as u16;
            let r = sock::sendmsg(
                self.socket.as_raw_fd(),
                &[IoSlice::new(buf)],
                &[ControlMessage::UdpGsoSegments(&seg)],
                MsgFlags::empty(),
                Some(&to),
            );
            match r {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) => {
                    std::thread::sleep(Duration::from_micros(200));
                    return Ok(());
                }
                Err(
                    e @ (nix::errno::Errno::EINVAL
                    | nix::errno::Errno::EIO
                    | nix::errno::Errno::EOPNOTSUPP),
                ) => {
                    warn!("multicast: UDP GSO unavailable ({e}); one datagram per send");
                    *gso = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        for d in buf.chunks(seg_len) {
            match self.socket.send_to(d, SocketAddr::V4(self.session.group)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Chunk `c`'s stored bytes (RC4-encrypted for RC4 sessions).
    fn chunk(
        &self,
        cache: &mut VecDeque<(u32, Arc<Vec<u8>>)>,
        c: u32,
    ) -> Result<Arc<Vec<u8>>, String> {
        if let Some((_, d)) = cache.iter().find(|(i, _)| *i == c) {
            return Ok(d.clone());
        }
        let e = &self.image.chunks[c as usize];
        let mut data = vec![0u8; e.stored_len as usize];
        self.file
            .read_exact_at(&mut data, e.stored_offset)
            .map_err(|err| format!("reading chunk {c} of the image file: {err}"))?;
        if self.session.cipher == Cipher::Rc4 {
            self.state.rc4_chunk(c, &mut data);
        }
        let d = Arc::new(data);
        cache.push_back((c, d.clone()));
        if cache.len() > CACHE_CHUNKS {
            cache.pop_front();
        }
        Ok(d)
    }

    fn publish(&self, created: Instant, started: Option<Instant>, state: &str) {
        let now = Instant::now();
        let s = self.state.stats();
        let data_bytes = self.data_bytes;
        let mut st = self.session.lock();
        let members = st.members.clone();
        let devices = st.devices.clone();
        let confirmed = st.confirmed.clone();
        let snap = &mut st.snapshot;
        snap.state = if !state.is_empty() {
            state.into()
        } else if started.is_none() {
            "waiting".into()
        } else if self.state.has_work() {
            "sending".into()
        } else {
            "idle".into()
        };
        snap.age_secs = now.duration_since(created).as_secs_f64();
        snap.started_after_secs = started.map(|t| t.duration_since(created).as_secs_f64());
        snap.rate_mbps = self.state.rate() / 1e6;
        snap.datagrams = s.datagrams;
        snap.bytes_sent = s.bytes;
        snap.repair_blocks = s.repair_blocks;
        snap.bad_reports = s.bad_reports;
        snap.receivers = self
            .state
            .receivers()
            .iter()
            .map(|(&r, v)| {
                let st = &v.stats;
                let seen = st.received + st.lost;
                let left = data_bytes.saturating_sub(st.bytes_done);
                ReceiverSnapshot {
                    receiver: r,
                    device: devices.get(&r).copied(),
                    member: members.contains_key(&r),
                    confirmed: confirmed.contains(&r),
                    wrong_digest: v.wrong_digest,
                    chunks_done: st.chunks_done,
                    bytes_done: st.bytes_done,
                    mbps: v.bytes_per_sec / 1e6,
                    loss_pct: if seen > 0 {
                        100.0 * st.lost as f64 / seen as f64
                    } else {
                        0.0
                    },
                    received: st.received,
                    lost: st.lost,
                    forged: st.forged,
                    other_session: st.other_session,
                    skipped: st.skipped,
                    bad_chunks: st.bad_chunks,
                    repairs_requested: st.repairs_requested,
                    busy: st.busy,
                    eta_secs: (v.bytes_per_sec > 0.0 && left > 0)
                        .then(|| left as f64 / v.bytes_per_sec),
                    last_heard_secs: now.duration_since(v.last_heard).as_secs_f64(),
                }
            })
            .collect();
    }
}
