//! The receiver's state machine: assembles blocks into chunks, hands whole
//! chunks out for verification, and says what it lacks.
//!
//! A chunk is `Missing`, `Partial` (some blocks held, in a buffer),
//! `Handed` (assembled, out for verification and writing) or `Written`.
//! At most `max_partials` chunks are buffered at once (bounded memory); a
//! datagram that would start another is skipped and the receiver says it
//! is busy. Reports go out every [`REPORT_EVERY`]; they ask again for the
//! gaps of a partial chunk that has had no block for [`REPAIR_AFTER`], and,
//! once the stream is idle, for whole chunks never seen (a late joiner).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::blocks::BlockSet;
use super::wire::{
    seal_message, Ack, Cipher, Drop, Header, Keys, Kind, ReceiverStats, Report, Want, HEADER_LEN,
    MAX_WANTS, NONCE_ACK, NONCE_DATA, TAG_LEN,
};
use super::Geometry;

/// A report at least this often (it is also the join and the heartbeat).
pub const REPORT_EVERY: Duration = Duration::from_millis(50);
/// A partial chunk with no new block for this long has its gaps asked for.
pub const REPAIR_AFTER: Duration = Duration::from_millis(40);
/// The same blocks are not asked for again sooner than this.
pub const REASK: Duration = Duration::from_millis(400);
/// Whole chunks are asked for again this often before any data came.
pub const JOIN_REASK: Duration = Duration::from_secs(1);
/// No data for this long: the stream is idle (or has not started).
pub const IDLE: Duration = Duration::from_millis(150);
/// Whole chunks asked for at once when idle.
pub const WINDOW: usize = 16;
/// A done receiver repeats its digest this often until acknowledged.
pub const DONE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub session: u64,
    pub key: [u8; 32],
    pub cipher: Cipher,
    /// This receiver's ID in the session (at least [`super::wire::FIRST_RECEIVER`]).
    pub receiver: u32,
    pub payload: usize,
    /// Chunks buffered at once (partial, or assembled but not yet written).
    pub max_partials: usize,
    /// The completion digest ([`super::wire::completion_digest`]).
    pub digest: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Missing,
    Partial,
    Handed,
    Written,
}

#[derive(Debug)]
struct Partial {
    have: BlockSet,
    buf: Vec<u8>,
    last: Instant,
    asked: Option<Instant>,
}

/// What a datagram did.
#[derive(Debug)]
pub enum Event {
    /// A block stored; nothing else to do.
    Block,
    /// A chunk is whole: verify its stored bytes, write them, then call
    /// [`Receiver::written`] or [`Receiver::failed`].
    Complete { chunk: u32, stored: Vec<u8> },
    /// The sender acknowledged the completion digest.
    Ack(Ack),
}

#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    keys: Keys,
    geo: Geometry,
    slots: Vec<Slot>,
    partials: HashMap<u32, Partial>,
    /// Buffers given back, for the next chunks.
    spare: Vec<Vec<u8>>,
    handed: usize,
    asked_whole: HashMap<u32, Instant>,
    stats: ReceiverStats,
    seq_lo: Option<u64>,
    seq_hi: u64,
    last_data: Option<Instant>,
    last_queued: u32,
    last_report: Option<Instant>,
    report_seq: u64,
    confirmed: Option<bool>,
}

impl Receiver {
    /// A receiver for `geo`; chunks for which `already(index)` is true are
    /// on the disk already (a resumed deploy) and never asked for.
    pub fn new(cfg: ReceiverConfig, geo: Geometry, already: impl Fn(usize) -> bool) -> Receiver {
        let slots = (0..geo.chunks())
            .map(|i| {
                if geo.blocks(i as u32) == 0 || already(i) {
                    Slot::Written
                } else {
                    Slot::Missing
                }
            })
            .collect();
        Receiver {
            keys: Keys::new(&cfg.key, cfg.cipher),
            cfg,
            geo,
            slots,
            partials: HashMap::new(),
            spare: Vec::new(),
            handed: 0,
            asked_whole: HashMap::new(),
            stats: ReceiverStats::default(),
            seq_lo: None,
            seq_hi: 0,
            last_data: None,
            last_queued: u32::MAX,
            last_report: None,
            report_seq: 0,
            confirmed: None,
        }
    }

    /// Handles one datagram (decrypting it in place): [`Receiver::open`],
    /// then [`Receiver::accept`].
    pub fn on_datagram(&mut self, now: Instant, d: &mut [u8]) -> Result<Event, Drop> {
        let r = self.open(d).and_then(|h| self.accept(now, &h, d));
        if let Err(e) = r {
            self.count(e);
        }
        r
    }

    /// Counts a dropped datagram in the statistics.
    fn count(&mut self, e: Drop) {
        match e {
            Drop::Forged | Drop::Impossible | Drop::Malformed | Drop::Unexpected => {
                self.stats.forged += 1
            }
            Drop::OtherSession => self.stats.other_session += 1,
            Drop::Busy => self.stats.skipped += 1,
            Drop::Duplicate => {}
        }
    }

    /// Checks a datagram and authenticates and decrypts it in place,
    /// without touching the receiver's state.
    fn open(&self, d: &mut [u8]) -> Result<Header, Drop> {
        let h = Header::parse(d)?;
        if h.session != self.cfg.session {
            return Err(Drop::OtherSession);
        }
        match h.kind {
            Kind::Data => {}
            Kind::Ack if h.a == self.cfg.receiver => {
                if d.len() < HEADER_LEN + TAG_LEN {
                    return Err(Drop::Malformed);
                }
                let end = d.len() - TAG_LEN;
                let (head, rest) = d.split_at_mut(HEADER_LEN);
                let (payload, t) = rest.split_at_mut(end - HEADER_LEN);
                self.keys.open(&h, NONCE_ACK, head, payload, t)?;
                return Ok(h);
            }
            Kind::Ack => return Err(Drop::OtherSession),
            Kind::Report => return Err(Drop::Unexpected),
        }
        let (chunk, block) = (h.a, h.b);
        let tag = self.cfg.cipher.data_tag_len();
        if chunk as usize >= self.geo.chunks() || block >= self.geo.blocks(chunk) {
            return Err(Drop::Impossible);
        }
        let range = self.geo.block_range(chunk, block);
        if d.len() != HEADER_LEN + range.len() + tag {
            return Err(Drop::Impossible);
        }
        if self.cfg.cipher.is_aead() {
            // Authenticate everything, duplicates too, so forgeries are
            // counted and never touch a chunk buffer.
            let (head, rest) = d.split_at_mut(HEADER_LEN);
            let (payload, t) = rest.split_at_mut(range.len());
            self.keys.open(&h, NONCE_DATA, head, payload, t)?;
        }
        Ok(h)
    }

    /// Takes in a datagram [`Receiver::open`] accepted (`d` as it left it).
    fn accept(&mut self, now: Instant, h: &Header, d: &[u8]) -> Result<Event, Drop> {
        if h.kind == Kind::Ack {
            let body = &d[HEADER_LEN..d.len().saturating_sub(TAG_LEN)];
            let ack: Ack = postcard::from_bytes(body).map_err(|_| Drop::Malformed)?;
            self.confirmed = Some(ack.confirmed);
            return Ok(Event::Ack(ack));
        }
        let (chunk, block) = (h.a, h.b);
        let range = self.geo.block_range(chunk, block);
        if self.cfg.cipher == Cipher::Rc4
            && self.seq_lo.is_some()
            && h.seq > self.seq_hi.saturating_add(1 << 20)
        {
            // RC4 headers are not authenticated: an absurd jump in the
            // sequence is a forgery, not a million lost datagrams.
            return Err(Drop::Impossible);
        }
        let slot = self.slots[chunk as usize];
        let have = slot != Slot::Partial && slot != Slot::Missing
            || self
                .partials
                .get(&chunk)
                .is_some_and(|p| p.have.contains(block));
        self.note_seq(now, h);
        if have {
            self.stats.received += 1;
            return Err(Drop::Duplicate);
        }
        if slot == Slot::Missing && self.busy() {
            return Err(Drop::Busy);
        }
        self.stats.received += 1;
        if !self.partials.contains_key(&chunk) {
            let n = self.geo.blocks(chunk);
            let len = self.geo.stored_len(chunk);
            let buf = match self.spare.pop() {
                Some(mut b) => {
                    b.clear();
                    b.resize(len, 0);
                    b
                }
                None => vec![0u8; len],
            };
            self.partials.insert(
                chunk,
                Partial {
                    have: BlockSet::empty(n),
                    buf,
                    last: now,
                    asked: None,
                },
            );
        }
        let p = self.partials.get_mut(&chunk).expect("inserted above");
        let blen = range.len();
        p.buf[range].copy_from_slice(&d[HEADER_LEN..HEADER_LEN + blen]);
        self.slots[chunk as usize] = Slot::Partial;
        p.have.insert(block);
        p.last = now;
        let whole = self.partials.get(&chunk).is_some_and(|p| p.have.is_full());
        if !whole {
            return Ok(Event::Block);
        }
        let mut p = self.partials.remove(&chunk).expect("checked above");
        if self.cfg.cipher == Cipher::Rc4 {
            self.keys.rc4_chunk(chunk, &mut p.buf);
        }
        self.slots[chunk as usize] = Slot::Handed;
        self.handed += 1;
        self.asked_whole.remove(&chunk);
        Ok(Event::Complete {
            chunk,
            stored: p.buf,
        })
    }

    fn note_seq(&mut self, now: Instant, h: &Header) {
        self.seq_lo = Some(self.seq_lo.map_or(h.seq, |lo| lo.min(h.seq)));
        self.seq_hi = self.seq_hi.max(h.seq);
        self.last_data = Some(now);
        self.last_queued = h.c;
    }

    /// Gives back a chunk buffer handed out with [`Event::Complete`], to be
    /// reused for a later chunk (no fresh pages to fault in).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < self.cfg.max_partials {
            self.spare.push(buf);
        }
    }

    /// `chunk` (handed out) was verified and written.
    pub fn written(&mut self, chunk: u32) {
        if self.slots.get(chunk as usize) == Some(&Slot::Handed) {
            self.slots[chunk as usize] = Slot::Written;
            self.handed -= 1;
            self.stats.chunks_done += 1;
            self.stats.bytes_done += self.geo.volume_len(chunk);
        }
    }

    /// `chunk` (handed out) failed verification: it is missing again.
    pub fn failed(&mut self, chunk: u32) {
        if self.slots.get(chunk as usize) == Some(&Slot::Handed) {
            self.slots[chunk as usize] = Slot::Missing;
            self.handed -= 1;
            self.stats.bad_chunks += 1;
        }
    }

    /// `chunk` was written by other means (a unicast pull).
    pub fn written_elsewhere(&mut self, chunk: u32) {
        match self.slots.get(chunk as usize) {
            Some(Slot::Missing) | Some(Slot::Partial) => {
                self.partials.remove(&chunk);
                self.slots[chunk as usize] = Slot::Written;
                self.stats.chunks_done += 1;
                self.stats.bytes_done += self.geo.volume_len(chunk);
            }
            _ => {}
        }
    }

    /// Every data chunk is written.
    pub fn complete(&self) -> bool {
        self.slots.iter().all(|s| *s == Slot::Written)
    }

    /// The sender's verdict on the completion digest, once acknowledged.
    pub fn confirmed(&self) -> Option<bool> {
        self.confirmed
    }

    /// Chunks neither written nor out for writing.
    pub fn missing(&self) -> Vec<u32> {
        (0..self.slots.len() as u32)
            .filter(|&c| matches!(self.slots[c as usize], Slot::Missing | Slot::Partial))
            .collect()
    }

    /// Chunks assembled and out for writing.
    pub fn handed(&self) -> usize {
        self.handed
    }

    pub fn busy(&self) -> bool {
        self.partials.len() + self.handed >= self.cfg.max_partials
    }

    /// When the last data datagram came.
    pub fn last_data(&self) -> Option<Instant> {
        self.last_data
    }

    /// No data for [`IDLE`], or the sender's queue ran dry a moment ago.
    pub fn stream_idle(&self, now: Instant) -> bool {
        match self.last_data {
            None => true,
            Some(t) => {
                let quiet = now.duration_since(t);
                quiet >= IDLE || (self.last_queued == 0 && quiet >= REPAIR_AFTER)
            }
        }
    }

    pub fn stats(&self) -> ReceiverStats {
        let mut s = self.stats;
        if let Some(lo) = self.seq_lo {
            let span = self.seq_hi - lo + 1;
            s.lost = span.saturating_sub(s.received + s.skipped);
        }
        s.busy = self.busy();
        s
    }

    /// The report to send now, if one is due.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<u8>> {
        let mut want: Vec<Want> = Vec::new();
        let done = self.complete();
        if !done {
            for (&chunk, p) in self.partials.iter_mut() {
                if want.len() >= MAX_WANTS {
                    break;
                }
                let stale = now.duration_since(p.last) >= REPAIR_AFTER;
                let asked = p.asked.is_some_and(|t| now.duration_since(t) < REASK);
                if !stale || asked {
                    continue;
                }
                for (first, count) in p.have.gaps() {
                    if want.len() < MAX_WANTS {
                        want.push(Want {
                            chunk,
                            first,
                            count,
                        });
                        self.stats.repairs_requested += u64::from(count);
                    }
                }
                p.asked = Some(now);
            }
            if self.stream_idle(now) {
                // Before any data (a session not started yet, or one that
                // ended before this receiver joined) ask once a second, not
                // at the repair pace.
                let reask = if self.last_data.is_none() {
                    JOIN_REASK
                } else {
                    REASK
                };
                let outstanding = self
                    .asked_whole
                    .values()
                    .filter(|t| now.duration_since(**t) < reask)
                    .count();
                let mut room = WINDOW.saturating_sub(outstanding);
                for c in 0..self.slots.len() as u32 {
                    if room == 0 || want.len() >= MAX_WANTS {
                        break;
                    }
                    if self.slots[c as usize] != Slot::Missing {
                        continue;
                    }
                    if self
                        .asked_whole
                        .get(&c)
                        .is_some_and(|t| now.duration_since(*t) < reask)
                    {
                        continue;
                    }
                    let n = self.geo.blocks(c);
                    want.push(Want {
                        chunk: c,
                        first: 0,
                        count: n,
                    });
                    self.stats.repairs_requested += u64::from(n);
                    self.asked_whole.insert(c, now);
                    room -= 1;
                }
            }
        }
        let every = if done && self.confirmed.is_none() {
            DONE_EVERY
        } else {
            REPORT_EVERY
        };
        let due = self
            .last_report
            .is_none_or(|t| now.duration_since(t) >= every);
        if want.is_empty() && !due {
            return None;
        }
        self.last_report = Some(now);
        let report = Report {
            stats: self.stats(),
            want,
            done: done.then_some(self.cfg.digest),
        };
        let header = Header {
            kind: Kind::Report,
            session: self.cfg.session,
            seq: self.report_seq,
            a: self.cfg.receiver,
            b: 0,
            c: 0,
        };
        self.report_seq += 1;
        seal_message(
            &self.keys,
            &header,
            self.cfg.receiver,
            &report,
            self.cfg.payload,
        )
    }
}
