//! The sender's state machine: a queue of chunks and the blocks of each
//! that some receiver lacks, merged across receivers (Frisbee's design),
//! the receivers' reports, and the send rate.
//!
//! `start` queues every data chunk once. After that the sender only sends
//! what receivers ask for: a request for a chunk already queued adds its
//! blocks to that entry; a request for blocks of the chunk being sent that
//! are still ahead of the cursor is already covered; gaps in a chunk go to
//! the front of the queue (they free a receiver's buffer) and whole chunks
//! to the back. Late joiners and lossy receivers are served from
//! the same queue without holding the others back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::blocks::BlockSet;
use super::wire::{
    open_message, seal_message, Ack, Cipher, Drop, Header, Keys, Kind, ReceiverStats, Report,
    FIRST_RECEIVER, HEADER_LEN, NONCE_ACK, NONCE_DATA,
};
use super::Geometry;

/// How a session sends.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub session: u64,
    pub key: [u8; 32],
    pub cipher: Cipher,
    /// Block payload bytes ([`super::wire::payload_for_mtu`]).
    pub payload: usize,
    /// Most bytes per second on the wire; `None`: as fast as reports allow.
    pub max_rate: Option<f64>,
    /// The digest a receiver must report to count as complete.
    pub digest: [u8; 32],
}

/// What the sender knows of one receiver.
#[derive(Debug, Clone)]
pub struct ReceiverView {
    pub stats: ReceiverStats,
    pub first_heard: Instant,
    pub last_heard: Instant,
    /// Reported the right completion digest.
    pub confirmed: bool,
    /// Reported a wrong one.
    pub wrong_digest: bool,
    /// Blocks this receiver asked for.
    pub blocks_requested: u64,
    /// Volume bytes per second over the last few seconds.
    pub bytes_per_sec: f64,
    rate_mark: (Instant, u64),
    loss_mark: (u64, u64, u64),
}

impl ReceiverView {
    /// First heard from at `now`.
    fn new(now: Instant) -> ReceiverView {
        ReceiverView {
            stats: ReceiverStats::default(),
            first_heard: now,
            last_heard: now,
            confirmed: false,
            wrong_digest: false,
            blocks_requested: 0,
            bytes_per_sec: 0.0,
            rate_mark: (now, 0),
            loss_mark: (0, 0, 0),
        }
    }
}

/// The sender's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SenderStats {
    pub datagrams: u64,
    pub bytes: u64,
    /// Blocks sent because a receiver asked (beyond the first pass).
    pub repair_blocks: u64,
    pub reports: u64,
    /// Reports dropped: forged, malformed, another session.
    pub bad_reports: u64,
}

/// Rate control: multiplicative decrease on reported loss, multiplicative
/// increase while none is reported, within `min..=max`.
#[derive(Debug, Clone)]
struct Rate {
    now: f64,
    max: f64,
    last_tick: Option<Instant>,
    slow_start: bool,
    /// Bytes sent as of the last tick.
    sent_mark: Option<(Instant, u64)>,
    /// What got through when loss last cut the rate (what went out, less
    /// the loss): growth heads back there fast, then probes gently.
    ceiling: Option<f64>,
    /// What went out in each of the last few ticks.
    recent_sent: VecDeque<f64>,
}

/// Ticks over which what went out caps the rate (a sender starved of
/// CPU for one tick does not crash the rate).
const SENT_TICKS: usize = 5;

/// A receiver whose loss share is more than 3x the median and this much
/// above it does not set the rate: its own link or disk is the limit (a
/// bad cable, a slow port), not the session's rate, and it catches up by
/// repairs or by unicast.
pub const STRAGGLER_POINTS: f64 = 0.02;

/// Bytes per second a session starts at.
pub const START_RATE: f64 = 40e6;
/// Never slower than this.
pub const MIN_RATE: f64 = 1e6;
/// Without a configured maximum.
pub const UNCAPPED_RATE: f64 = 20e9;
/// How often the rate adapts.
pub const RATE_TICK: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    keys: Keys,
    geo: Geometry,
    started: bool,
    seq: u64,
    ack_seq: u64,
    queue: VecDeque<u32>,
    wanted: HashMap<u32, BlockSet>,
    current: Option<(u32, BlockSet, u32)>,
    /// Blocks sent per chunk at least once (repairs are the rest).
    first_pass: Vec<bool>,
    receivers: BTreeMap<u32, ReceiverView>,
    stats: SenderStats,
    rate: Rate,
}

impl Sender {
    pub fn new(cfg: SenderConfig, geo: Geometry) -> Sender {
        let max = cfg.max_rate.unwrap_or(UNCAPPED_RATE).max(MIN_RATE);
        Sender {
            keys: Keys::new(&cfg.key, cfg.cipher),
            first_pass: vec![false; geo.chunks()],
            cfg,
            geo,
            started: false,
            seq: 0,
            ack_seq: 0,
            queue: VecDeque::new(),
            wanted: HashMap::new(),
            current: None,
            receivers: BTreeMap::new(),
            stats: SenderStats::default(),
            rate: Rate {
                now: START_RATE.min(max),
                max,
                last_tick: None,
                slow_start: true,
                sent_mark: None,
                ceiling: None,
                recent_sent: VecDeque::new(),
            },
        }
    }

    pub fn config(&self) -> &SenderConfig {
        &self.cfg
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// Queues every data chunk (the first pass).
    pub fn start(&mut self) {
        if self.started {
            return;
        }
        self.started = true;
        for c in 0..self.geo.chunks() as u32 {
            let n = self.geo.blocks(c);
            if n > 0 {
                self.want(c, 0, n);
            }
        }
    }

    pub fn started(&self) -> bool {
        self.started
    }

    /// Whether a block is waiting to be sent.
    pub fn has_work(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|(_, s, cur)| s.next_from(*cur).is_some())
            || !self.queue.is_empty()
    }

    /// Chunks queued behind the one being sent.
    pub fn queued(&self) -> u32 {
        self.queue.len() as u32
    }

    fn want(&mut self, chunk: u32, first: u32, count: u32) {
        let n = self.geo.blocks(chunk);
        if n == 0 || first >= n || count == 0 {
            return;
        }
        let mut add = BlockSet::empty(n);
        add.insert_range(first, count);
        if let Some((c, set, cursor)) = &self.current {
            if *c == chunk {
                // Blocks still ahead of the cursor go out anyway.
                let mut rest = BlockSet::empty(n);
                let mut b = add.next_from(0);
                while let Some(i) = b {
                    if !(i >= *cursor && set.contains(i)) {
                        rest.insert(i);
                    }
                    b = add.next_from(i + 1);
                }
                add = rest;
                if add.is_empty() {
                    return;
                }
            }
        }
        match self.wanted.get_mut(&chunk) {
            Some(set) => set.union(&add),
            None => {
                // Gaps in a chunk a receiver is assembling go first: they
                // free its buffer. Whole chunks (a late joiner's, or the
                // first pass) wait their turn at the back.
                let repair = add.count() < n;
                self.wanted.insert(chunk, add);
                if repair {
                    self.queue.push_front(chunk);
                } else {
                    self.queue.push_back(chunk);
                }
            }
        }
    }

    /// The next block to send, in queue order.
    pub fn next_block(&mut self) -> Option<(u32, u32)> {
        loop {
            if let Some((c, set, cursor)) = &mut self.current {
                if let Some(b) = set.next_from(*cursor) {
                    *cursor = b + 1;
                    return Some((*c, b));
                }
                let c = *c;
                self.first_pass[c as usize] = true;
                self.current = None;
            }
            let c = self.queue.pop_front()?;
            let set = self.wanted.remove(&c)?;
            self.current = Some((c, set, 0));
        }
    }

    /// The length of block `block` of `chunk`'s stored bytes.
    pub fn block_len(&self, chunk: u32, block: u32) -> usize {
        self.geo.block_range(chunk, block).len()
    }

    /// Builds the data datagram for `block` of `chunk` in `out` from its
    /// `plain` bytes (for RC4, already encrypted with the chunk's key, see
    /// [`Sender::rc4_chunk`]); returns its length.
    pub fn seal_data(&mut self, chunk: u32, block: u32, plain: &[u8], out: &mut [u8]) -> usize {
        let header = Header {
            kind: Kind::Data,
            session: self.cfg.session,
            seq: self.seq,
            a: chunk,
            b: block,
            c: self.queued(),
        };
        self.seq += 1;
        let len = plain.len();
        out[HEADER_LEN..HEADER_LEN + len].copy_from_slice(plain);
        let n = match self.cfg.cipher {
            Cipher::ChaCha20Poly1305 | Cipher::Aes256Gcm => {
                self.keys.seal(&header, NONCE_DATA, out, len)
            }
            Cipher::Rc4 => {
                header.write(out);
                HEADER_LEN + len
            }
        };
        self.stats.datagrams += 1;
        self.stats.bytes += n as u64;
        if self.first_pass[chunk as usize] {
            self.stats.repair_blocks += 1;
        }
        n
    }

    /// Encrypts a chunk's stored bytes with its RC4 key (RC4 sessions send
    /// slices of this).
    pub fn rc4_chunk(&self, chunk: u32, buf: &mut [u8]) {
        self.keys.rc4_chunk(chunk, buf);
    }

    /// Handles a receiver's report; returns the receiver ID and the ack to
    /// send back to it, if any.
    pub fn on_report(
        &mut self,
        now: Instant,
        d: &mut [u8],
    ) -> Result<(u32, Option<Vec<u8>>), Drop> {
        let r = self.open_report(d);
        if r.is_err() {
            self.stats.bad_reports += 1;
        }
        let (receiver, report) = r?;
        self.stats.reports += 1;
        let view = self
            .receivers
            .entry(receiver)
            .or_insert_with(|| ReceiverView::new(now));
        view.last_heard = now;
        view.stats = report.stats;
        let (t0, b0) = view.rate_mark;
        let dt = now.duration_since(t0).as_secs_f64();
        if dt >= 1.0 {
            let db = report.stats.bytes_done.saturating_sub(b0) as f64;
            view.bytes_per_sec = if view.bytes_per_sec == 0.0 {
                db / dt
            } else {
                0.5 * view.bytes_per_sec + 0.5 * db / dt
            };
            view.rate_mark = (now, report.stats.bytes_done);
        }
        let mut ack = None;
        if let Some(digest) = report.done {
            let ok = digest == self.cfg.digest;
            view.confirmed |= ok;
            view.wrong_digest |= !ok;
            let header = Header {
                kind: Kind::Ack,
                session: self.cfg.session,
                seq: self.ack_seq,
                a: receiver,
                b: 0,
                c: 0,
            };
            self.ack_seq += 1;
            ack = seal_message(
                &self.keys,
                &header,
                NONCE_ACK,
                &Ack { confirmed: ok },
                self.cfg.payload,
            );
        }
        if self.started && report.done.is_none() {
            let mut asked = 0u64;
            for w in &report.want {
                if (w.chunk as usize) < self.geo.chunks() {
                    let n = self.geo.blocks(w.chunk);
                    asked += u64::from(w.count.min(n.saturating_sub(w.first)));
                    self.want(w.chunk, w.first, w.count);
                }
            }
            if let Some(v) = self.receivers.get_mut(&receiver) {
                v.blocks_requested += asked;
            }
        }
        Ok((receiver, ack))
    }

    fn open_report(&self, d: &mut [u8]) -> Result<(u32, Report), Drop> {
        let h = Header::parse(d)?;
        if h.session != self.cfg.session {
            return Err(Drop::OtherSession);
        }
        if h.kind != Kind::Report {
            return Err(Drop::Unexpected);
        }
        if h.a < FIRST_RECEIVER {
            return Err(Drop::Forged);
        }
        let report: Report = open_message(&self.keys, &h, h.a, d)?;
        Ok((h.a, report))
    }

    /// Adapts the rate to what receivers reported since the last tick: the
    /// share of datagrams each lost on the network or had to skip (no
    /// buffer: its disk is behind). The worst share decides, leaving out
    /// receivers far worse than the median (more than 3x and 2 points):
    /// a minority of stragglers does not slow the session down, while a
    /// majority that cannot keep up does.
    /// Receivers that are done do not count.
    pub fn tick(&mut self, now: Instant) {
        if self
            .rate
            .last_tick
            .is_some_and(|t| now.duration_since(t) < RATE_TICK)
        {
            return;
        }
        self.rate.last_tick = Some(now);
        let mut shares: Vec<f64> = Vec::new();
        for v in self.receivers.values_mut() {
            let (r0, l0, s0) = v.loss_mark;
            let st = &v.stats;
            let (dr, dl, ds) = (
                st.received.saturating_sub(r0),
                st.lost.saturating_sub(l0),
                st.skipped.saturating_sub(s0),
            );
            if dr + dl + ds < 32 {
                continue;
            }
            v.loss_mark = (st.received, st.lost, st.skipped);
            if v.confirmed {
                continue;
            }
            shares.push((dl + ds) as f64 / (dr + dl + ds) as f64);
        }
        shares.sort_by(f64::total_cmp);
        // The worst share among receivers not far worse than the median:
        // a minority of stragglers does not set the pace.
        let median = shares.get(shares.len().saturating_sub(1) / 2).copied();
        let worst = median.map(|m| {
            shares
                .iter()
                .copied()
                .filter(|&f| f <= (3.0 * m).max(m + STRAGGLER_POINTS))
                .fold(m, f64::max)
        });
        let busy = self.has_work();
        // What actually went out since the last tick: when the sender
        // itself is the limit, the rate is set from that, not from a
        // number it never reached.
        let sent = self.stats.bytes;
        let actual = match self.rate.sent_mark {
            Some((t, b)) if now > t => (sent - b) as f64 / now.duration_since(t).as_secs_f64(),
            _ => 0.0,
        };
        self.rate.sent_mark = Some((now, sent));
        let r = &mut self.rate;
        if actual > 0.0 && busy {
            if r.recent_sent.len() == SENT_TICKS {
                r.recent_sent.pop_front();
            }
            r.recent_sent.push_back(actual);
        }
        // The most that went out in a recent tick.
        let most = r.recent_sent.iter().copied().fold(0.0, f64::max);
        if most > 0.0 && busy {
            r.now = r.now.min(1.5 * most);
        }
        // Slow start (x1.5 a tick, and only on receivers' reports: no
        // growth without evidence) until the first loss; it ends a margin
        // below what got through. Then multiplicative decrease on loss
        // above 0.5 %, and below that growth that heads back fast to 95 %
        // of what got through when loss last struck (half the way a tick),
        // then, below 0.2 %, probes at x1.04.
        let went = if most > 0.0 { most.min(r.now) } else { r.now };
        match worst {
            // (A share above a half says more about receivers short of
            // CPU and reporting late than about the path: what got through
            // is taken as at least half of what went out.)
            Some(f) if f > 0.005 && r.slow_start => {
                let through = went * (1.0 - f.min(0.5));
                r.ceiling = Some(through);
                r.now = through * 0.85;
                r.slow_start = false;
            }
            Some(f) if f > 0.005 => {
                r.ceiling = Some(went * (1.0 - f.min(0.5)));
                r.now *= if f > 0.02 { 0.75 } else { 0.93 };
            }
            Some(f) if r.slow_start && f < 0.002 => r.now *= 1.5,
            Some(_) if r.slow_start => {}
            Some(f) => match r.ceiling {
                Some(c) if r.now < 0.95 * c => r.now += 0.5 * (0.95 * c - r.now),
                _ if f < 0.002 => r.now *= 1.04,
                _ => {}
            },
            None => {}
        }
        r.now = r.now.clamp(MIN_RATE.min(r.max), r.max);
    }

    /// Bytes per second to send at now.
    pub fn rate(&self) -> f64 {
        self.rate.now
    }

    pub fn receivers(&self) -> &BTreeMap<u32, ReceiverView> {
        &self.receivers
    }

    pub fn stats(&self) -> SenderStats {
        self.stats
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    /// Runs `ticks` rate ticks against receivers that each take
    /// in what the rate sends, less their `loss` share, and send nothing
    /// else; returns the rate after each tick.
    fn drive(loss: &[f64], capacity: f64, ticks: usize) -> Vec<f64> {
        let geo = Geometry::new(1424, (0..1000).map(|_| (4 << 20, 4 << 20)));
        let mut s = Sender::new(
            SenderConfig {
                session: 1,
                key: [7; 32],
                cipher: Cipher::ChaCha20Poly1305,
                payload: 1424,
                max_rate: None,
                digest: [0; 32],
            },
            geo,
        );
        s.start();
        let t0 = Instant::now();
        for (i, _) in loss.iter().enumerate() {
            s.receivers
                .insert(FIRST_RECEIVER + i as u32, ReceiverView::new(t0));
        }
        let datagram = (1424 + HEADER_LEN + super::super::wire::TAG_LEN) as f64;
        let mut rates = Vec::new();
        let mut carry = vec![0.0f64; loss.len()];
        for k in 1..=ticks {
            // What went out in this tick, and what each receiver saw of it:
            // beyond `capacity` everything is lost (congestion), and each
            // loses its own share of the rest at random (deterministic
            // here: the share exactly).
            let tick = RATE_TICK.as_secs_f64();
            let sent = s.rate() * tick;
            s.stats.bytes += sent as u64;
            let n = sent / datagram;
            let fits = (capacity * tick / datagram).min(n);
            for (i, (&l, c)) in loss.iter().zip(carry.iter_mut()).enumerate() {
                let v = s.receivers.get_mut(&(FIRST_RECEIVER + i as u32)).unwrap();
                let got = fits * (1.0 - l) + *c;
                let whole = got.floor();
                *c = got - whole;
                v.stats.received += whole as u64;
                v.stats.lost += (n - whole).max(0.0) as u64;
            }
            s.tick(t0 + RATE_TICK * k as u32);
            rates.push(s.rate());
        }
        rates
    }

    #[test]
    fn two_of_four_receivers_on_bad_links_do_not_set_the_pace() {
        // 5 % random loss on two links, 600 MB/s of room: the rate finds
        // the room instead of sinking to its minimum.
        let rates = drive(&[0.05, 0.05, 0.0, 0.0], 600e6, 60);
        let last = rates[rates.len() - 10..]
            .iter()
            .copied()
            .fold(f64::MAX, f64::min);
        assert!(last > 300e6, "{rates:?}");
    }

    #[test]
    fn congestion_cuts_the_rate_and_it_comes_back_near_the_room() {
        let rates = drive(&[0.0, 0.0, 0.0, 0.0], 300e6, 80);
        // Slow start overshoots the room, loss cuts it; the rate then
        // stays near the room rather than far under it.
        assert!(rates.iter().any(|&r| r > 300e6), "{rates:?}");
        let tail = &rates[40..];
        let mean = tail.iter().sum::<f64>() / tail.len() as f64;
        assert!((200e6..400e6).contains(&mean), "mean {mean:.0}: {rates:?}");
    }

    #[test]
    fn everyone_losing_a_lot_slows_the_session() {
        // Every receiver loses 10 % whatever the rate: a majority that
        // cannot keep up does set the pace.
        let rates = drive(&[0.1, 0.1, 0.1, 0.1], 1e9, 40);
        assert!(rates[39] < START_RATE, "{rates:?}");
    }
}
