//! Deterministic simulation of one sender and several receivers over a
//! seeded, lossy, reordering, duplicating network, in virtual time. Each
//! scenario ends with every receiver holding the exact image.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::wire::{Cipher, Header, Kind, HEADER_LEN, TAG_LEN};
use super::*;

/// splitmix64: a small seeded generator, so runs repeat exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone)]
struct Peer {
    /// Loss probability on the path to this receiver.
    loss: f64,
    /// Joins at this millisecond.
    join_ms: u64,
    /// Away (hears and says nothing) during this window.
    away_ms: Option<(u64, u64)>,
    /// Milliseconds to write one chunk (a slow disk).
    write_ms: u64,
}

impl Peer {
    fn good() -> Peer {
        Peer {
            loss: 0.0,
            join_ms: 0,
            away_ms: None,
            write_ms: 0,
        }
    }
}

struct Scenario {
    seed: u64,
    cipher: Cipher,
    peers: Vec<Peer>,
    dup: f64,
    /// Extra delay up to this many ms: reordering.
    jitter_ms: u64,
    /// Forged data datagrams injected per ms.
    forged_per_ms: u64,
    /// Datagrams the sender may send per ms.
    per_ms: usize,
}

const PAYLOAD: usize = 1000;

fn image(rng: &mut Rng) -> Vec<Vec<u8>> {
    (0..24)
        .map(|i| {
            if i % 7 == 3 {
                return vec![];
            }
            let len = 20_000 + rng.below(30_000) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        })
        .collect()
}

struct Node {
    rx: Receiver,
    disk: BTreeMap<u32, Vec<u8>>,
    fails: BTreeMap<u32, u32>,
    writing: Vec<(u64, u32, Vec<u8>)>,
    peer: Peer,
}

/// Runs a scenario; returns the receivers' final stats and the sender.
fn run(s: &Scenario) -> (Vec<ReceiverStats>, Sender) {
    let mut rng = Rng(s.seed);
    let chunks = image(&mut rng);
    let geo = Geometry::new(
        PAYLOAD,
        chunks.iter().map(|c| (c.len() as u32, c.len() as u32 * 2)),
    );
    let key = [7u8; 32];
    let digest = [9u8; 32];
    let mut tx = Sender::new(
        SenderConfig {
            session: 42,
            key,
            cipher: s.cipher,
            payload: PAYLOAD,
            max_rate: None,
            digest,
        },
        geo.clone(),
    );
    let mut nodes: Vec<Node> = s
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| Node {
            rx: Receiver::new(
                ReceiverConfig {
                    session: 42,
                    key,
                    cipher: s.cipher,
                    receiver: wire::FIRST_RECEIVER + i as u32,
                    payload: PAYLOAD,
                    max_partials: if p.write_ms > 0 { 3 } else { 8 },
                    digest,
                },
                geo.clone(),
                |_| false,
            ),
            disk: BTreeMap::new(),
            fails: BTreeMap::new(),
            writing: vec![],
            peer: p.clone(),
        })
        .collect();
    // In flight: (arrival ms, destination: None = sender, datagram).
    let mut wire: Vec<(u64, Option<usize>, Vec<u8>)> = Vec::new();
    let t0 = Instant::now();
    let mut out = vec![0u8; HEADER_LEN + PAYLOAD + TAG_LEN];
    let mut rc4_cache: Option<(u32, Vec<u8>)> = None;
    let limit_ms = 60_000;
    for ms in 0..limit_ms {
        let now = t0 + Duration::from_millis(ms);
        let present = |n: &Node| {
            ms >= n.peer.join_ms && !n.peer.away_ms.is_some_and(|(a, b)| (a..b).contains(&ms))
        };
        // Start once every receiver present at 0 has reported, or at 50 ms.
        if !tx.started() && (tx.receivers().len() >= 2 || ms >= 50) {
            tx.start();
        }
        // Deliver what arrives now.
        let (due, later): (Vec<_>, Vec<_>) = wire.drain(..).partition(|(t, _, _)| *t <= ms);
        wire = later;
        for (_, to, mut d) in due {
            match to {
                None => {
                    if let Ok((r, Some(ack))) = tx.on_report(now, &mut d) {
                        let i = (r - wire::FIRST_RECEIVER) as usize;
                        wire.push((ms + 1, Some(i), ack));
                    }
                }
                Some(i) => {
                    let n = &mut nodes[i];
                    if !present(n) {
                        continue;
                    }
                    if let Ok(Event::Complete { chunk, stored }) = n.rx.on_datagram(now, &mut d) {
                        n.writing.push((ms + n.peer.write_ms, chunk, stored));
                    }
                }
            }
        }
        // Writers finish: verify against the source like the agent does.
        for n in nodes.iter_mut() {
            let (done, pending): (Vec<_>, Vec<_>) =
                n.writing.drain(..).partition(|(t, _, _)| *t <= ms);
            n.writing = pending;
            for (_, chunk, stored) in done {
                if stored == chunks[chunk as usize] {
                    n.disk.insert(chunk, stored);
                    n.rx.written(chunk);
                } else {
                    n.rx.failed(chunk);
                    // The agent pulls a chunk that failed twice by unicast.
                    let f = n.fails.entry(chunk).or_default();
                    *f += 1;
                    if *f >= 2 {
                        n.disk.insert(chunk, chunks[chunk as usize].clone());
                        n.rx.written_elsewhere(chunk);
                    }
                }
            }
        }
        // Reports.
        for (i, n) in nodes.iter_mut().enumerate() {
            if !present(n) {
                continue;
            }
            if let Some(r) = n.rx.poll(now) {
                if !rng.chance(n.peer.loss) {
                    let delay = 1 + rng.below(s.jitter_ms + 1);
                    wire.push((ms + delay, None, r));
                }
            }
            let _ = i;
        }
        // Sender: one tick's worth of datagrams, multicast to all.
        tx.tick(now);
        for _ in 0..s.per_ms {
            let Some((c, b)) = tx.next_block() else { break };
            let range = tx.geometry().block_range(c, b);
            let plain: Vec<u8> = match s.cipher {
                Cipher::Rc4 => {
                    if rc4_cache.as_ref().is_none_or(|(k, _)| *k != c) {
                        let mut buf = chunks[c as usize].clone();
                        tx.rc4_chunk(c, &mut buf);
                        rc4_cache = Some((c, buf));
                    }
                    rc4_cache.as_ref().unwrap().1[range].to_vec()
                }
                Cipher::ChaCha20Poly1305 | Cipher::Aes256Gcm => chunks[c as usize][range].to_vec(),
            };
            let len = tx.seal_data(c, b, &plain, &mut out);
            for (i, n) in nodes.iter().enumerate() {
                if rng.chance(n.peer.loss) {
                    continue;
                }
                let copies = if rng.chance(s.dup) { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = 1 + rng.below(s.jitter_ms + 1);
                    wire.push((ms + delay, Some(i), out[..len].to_vec()));
                }
            }
        }
        // A rogue on the segment: right session, plausible indices.
        for _ in 0..s.forged_per_ms {
            let c = rng.below(chunks.len() as u64) as u32;
            let blocks = geo.blocks(c);
            if blocks == 0 {
                continue;
            }
            let b = rng.below(u64::from(blocks)) as u32;
            let len = geo.block_range(c, b).len() + s.cipher.data_tag_len();
            let mut d = vec![0u8; HEADER_LEN + len];
            Header {
                kind: Kind::Data,
                session: 42,
                seq: rng.next() >> 40,
                a: c,
                b,
                c: 5,
            }
            .write(&mut d);
            for x in &mut d[HEADER_LEN..] {
                *x = rng.next() as u8;
            }
            for i in 0..nodes.len() {
                wire.push((ms + 1, Some(i), d.clone()));
            }
        }
        if nodes
            .iter()
            .all(|n| n.rx.complete() && n.rx.confirmed() == Some(true))
        {
            break;
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        assert!(
            n.rx.complete(),
            "seed {}: receiver {i} incomplete after {limit_ms} ms: missing {:?}",
            s.seed,
            n.rx.missing()
        );
        assert_eq!(n.rx.confirmed(), Some(true), "receiver {i} not confirmed");
        for (c, data) in chunks.iter().enumerate() {
            if !data.is_empty() {
                assert_eq!(
                    n.disk.get(&(c as u32)),
                    Some(data),
                    "receiver {i} chunk {c}"
                );
            }
        }
        assert!(tx.receivers()[&(wire::FIRST_RECEIVER + i as u32)].confirmed);
    }
    (nodes.iter().map(|n| n.rx.stats()).collect(), tx)
}

fn scenario(seed: u64, peers: Vec<Peer>) -> Scenario {
    Scenario {
        seed,
        cipher: Cipher::ChaCha20Poly1305,
        peers,
        dup: 0.0,
        jitter_ms: 0,
        forged_per_ms: 0,
        per_ms: 20,
    }
}

#[test]
fn clean_network_sends_each_block_once() {
    let (stats, tx) = run(&scenario(1, vec![Peer::good(); 3]));
    assert_eq!(tx.stats().repair_blocks, 0);
    for s in stats {
        assert_eq!((s.lost, s.forged, s.bad_chunks), (0, 0, 0));
    }
}

#[test]
fn loss_reordering_and_duplication() {
    for seed in 10..16 {
        let lossy = Peer {
            loss: 0.1,
            ..Peer::good()
        };
        let mut s = scenario(seed, vec![lossy.clone(), lossy, Peer::good(), Peer::good()]);
        s.dup = 0.05;
        s.jitter_ms = 5;
        let (stats, tx) = run(&s);
        assert!(tx.stats().repair_blocks > 0);
        assert!(stats[0].lost > 0 && stats[0].repairs_requested > 0);
    }
}

#[test]
fn a_late_joiner_catches_up() {
    let late = Peer {
        join_ms: 80,
        ..Peer::good()
    };
    let (stats, _) = run(&scenario(2, vec![Peer::good(), Peer::good(), late]));
    assert!(stats[2].repairs_requested > 0);
}

#[test]
fn a_receiver_that_leaves_and_returns_finishes() {
    let away = Peer {
        away_ms: Some((20, 400)),
        loss: 0.02,
        ..Peer::good()
    };
    let mut s = scenario(3, vec![Peer::good(), away, Peer::good()]);
    s.jitter_ms = 3;
    run(&s);
}

#[test]
fn rc4_sessions_recover_from_loss() {
    let lossy = Peer {
        loss: 0.05,
        ..Peer::good()
    };
    let mut s = scenario(4, vec![lossy.clone(), Peer::good(), lossy]);
    s.cipher = Cipher::Rc4;
    s.jitter_ms = 4;
    run(&s);
}

#[test]
fn aes256gcm_sessions_recover_from_loss_and_drop_forgeries() {
    let lossy = Peer {
        loss: 0.05,
        ..Peer::good()
    };
    let mut s = scenario(8, vec![lossy, Peer::good(), Peer::good()]);
    s.cipher = Cipher::Aes256Gcm;
    s.jitter_ms = 3;
    s.forged_per_ms = 1;
    let (stats, _) = run(&s);
    assert!(
        stats.iter().all(|st| st.forged > 0 && st.bad_chunks == 0),
        "{stats:?}"
    );
}

#[test]
fn forged_datagrams_are_dropped_and_counted() {
    let mut s = scenario(5, vec![Peer::good(); 3]);
    s.forged_per_ms = 3;
    let (stats, _) = run(&s);
    for st in stats {
        assert!(st.forged > 0, "{st:?}");
        assert_eq!(st.bad_chunks, 0, "no forgery reaches a chunk: {st:?}");
    }
}

#[test]
fn rc4_forgeries_fail_chunk_verification_and_are_fetched_again() {
    let mut s = scenario(6, vec![Peer::good(); 2]);
    s.cipher = Cipher::Rc4;
    s.forged_per_ms = 1;
    let (stats, _) = run(&s);
    assert!(stats.iter().any(|st| st.bad_chunks > 0), "{stats:?}");
}

#[test]
fn a_slow_disk_does_not_hold_back_the_others() {
    let slow = Peer {
        write_ms: 40,
        ..Peer::good()
    };
    let (stats, _) = run(&scenario(7, vec![Peer::good(), Peer::good(), slow]));
    assert!(stats[2].skipped > 0, "{:?}", stats[2]);
}

/// Receiver 5 of session 1 (key `[2; 32]`), nothing on its disk yet.
fn lone_receiver(geo: Geometry) -> Receiver {
    Receiver::new(
        ReceiverConfig {
            session: 1,
            key: [2; 32],
            cipher: Cipher::ChaCha20Poly1305,
            receiver: 5,
            payload: PAYLOAD,
            max_partials: 4,
            digest: [0; 32],
        },
        geo,
        |_| false,
    )
}

#[test]
fn reports_from_another_session_or_forged_are_refused() {
    let geo = Geometry::new(PAYLOAD, [(5000, 5000)]);
    let cfg = |session| SenderConfig {
        session,
        key: [1; 32],
        cipher: Cipher::ChaCha20Poly1305,
        payload: PAYLOAD,
        max_rate: None,
        digest: [0; 32],
    };
    let mut tx = Sender::new(cfg(1), geo.clone());
    let mut rx = lone_receiver(geo);
    let now = Instant::now();
    let mut r = rx.poll(now).unwrap();
    assert_eq!(tx.on_report(now, &mut r).unwrap_err(), Drop::Forged);
    r[4..12].copy_from_slice(&9u64.to_be_bytes());
    assert_eq!(tx.on_report(now, &mut r).unwrap_err(), Drop::OtherSession);
    assert_eq!(
        tx.on_report(now, &mut [0u8; 10]).unwrap_err(),
        Drop::Malformed
    );
    assert_eq!(tx.stats().bad_reports, 3);
    assert!(tx.receivers().is_empty());
}

#[test]
fn impossible_indices_are_dropped() {
    let geo = Geometry::new(PAYLOAD, [(5000, 5000), (0, 5000)]);
    let mut rx = lone_receiver(geo);
    let now = Instant::now();
    for (chunk, block, len) in [(0, 5, 100), (1, 0, 100), (9, 0, 100), (0, 0, 10)] {
        let mut d = vec![0u8; HEADER_LEN + len];
        Header {
            kind: Kind::Data,
            session: 1,
            seq: 0,
            a: chunk,
            b: block,
            c: 0,
        }
        .write(&mut d);
        assert_eq!(rx.on_datagram(now, &mut d).unwrap_err(), Drop::Impossible);
    }
    assert_eq!(rx.stats().forged, 4);
    assert_eq!(rx.missing(), vec![0]);
}
