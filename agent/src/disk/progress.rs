//! Deploy progress that outlives a connection: [`Written`], the set of
//! chunks already on the disk (so a deploy resumes from them after a dropped
//! connection, not from byte 0), and [`Rate`], bytes per second over a
//! sliding window and the ETA it implies.
//!
//! Both are plain state with time passed in (`Instant` parameters), so they
//! are tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Why progress could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("chunk {chunk} is beyond the image's {chunks} chunks")]
    ChunkOutOfRange { chunk: usize, chunks: usize },
}

/// The chunk indices written so far: one bit per chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    words: Vec<u64>,
    chunks: usize,
    count: usize,
}

impl Written {
    /// An empty set for an image of `chunks` chunks.
    pub fn new(chunks: usize) -> Self {
        Self {
            words: vec![0; chunks.div_ceil(64)],
            chunks,
            count: 0,
        }
    }

    /// The number of chunks in the image.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Records `chunk` as written; `true` if it was not already.
    pub fn mark(&mut self, chunk: usize) -> Result<bool, ProgressError> {
        if chunk >= self.chunks {
            return Err(ProgressError::ChunkOutOfRange {
                chunk,
                chunks: self.chunks,
            });
        }
        let (word, bit) = (&mut self.words[chunk / 64], 1u64 << (chunk % 64));
        let new = *word & bit == 0;
        *word |= bit;
        self.count += usize::from(new);
        Ok(new)
    }

    /// Whether `chunk` is written (`false` for one beyond the image).
    pub fn contains(&self, chunk: usize) -> bool {
        chunk < self.chunks && self.words[chunk / 64] & (1 << (chunk % 64)) != 0
    }

    /// How many chunks are written.
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn is_complete(&self) -> bool {
        self.count == self.chunks
    }

    /// The chunks still to write, in ascending order.
    pub fn missing(&self) -> impl Iterator<Item = usize> + '_ {
        let chunks = self.chunks;
        self.words
            .iter()
            .enumerate()
            .flat_map(|(w, &bits)| {
                let mut free = !bits;
                std::iter::from_fn(move || {
                    if free == 0 {
                        return None;
                    }
                    let b = free.trailing_zeros() as usize;
                    free &= free - 1;
                    Some(w * 64 + b)
                })
            })
            .take_while(move |&i| i < chunks)
    }
}

/// Throughput over a sliding window, and the ETA at that pace.
#[derive(Debug, Clone)]
pub struct Rate {
    total: u64,
    window: Duration,
    /// `(when, bytes done)`, oldest first; the first sample is the newest
    /// one at or before the window's start, so the rate spans a whole window.
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    /// Tracks `total` bytes of which `done` are already done at `now` (a
    /// resumed deploy counts only new progress in its rate), averaging
    /// over `window`.
    pub fn new(total: u64, done: u64, window: Duration, now: Instant) -> Self {
        Self {
            total,
            window,
            samples: VecDeque::from([(now, done)]),
        }
    }

    /// Records that `done` bytes (in all) are done at `now`.
    pub fn update(&mut self, done: u64, now: Instant) {
        // Samples closer together than 1/32 of the window are merged, so the
        // deque stays small however often this is called.
        let n = self.samples.len();
        if n >= 2 && now.saturating_duration_since(self.samples[n - 2].0) < self.window / 32 {
            self.samples[n - 1] = (now, done);
        } else {
            self.samples.push_back((now, done));
        }
        if let Some(start) = now.checked_sub(self.window) {
            while self.samples.len() > 2 && self.samples[1].0 <= start {
                self.samples.pop_front();
            }
        }
    }

    pub fn done(&self) -> u64 {
        self.samples.back().map_or(0, |s| s.1)
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes per second over the window; `None` until time has passed.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        let (&(t0, d0), &(t1, d1)) = (self.samples.front()?, self.samples.back()?);
        let secs = t1.saturating_duration_since(t0).as_secs_f64();
        (secs > 0.0).then(|| d1.saturating_sub(d0) as f64 / secs)
    }

    /// Time left at the current rate: zero when done, `None` while the rate
    /// is unknown or zero.
    pub fn eta(&self) -> Option<Duration> {
        let left = self.total.saturating_sub(self.done());
        if left == 0 {
            return Some(Duration::ZERO);
        }
        let rate = self.bytes_per_sec().filter(|&r| r > 0.0)?;
        Some(Duration::from_secs_f64(left as f64 / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_marks_counts_and_lists_what_is_missing() {
        let mut w = Written::new(130);
        assert_eq!(w.missing().count(), 130);
        for c in [0, 5, 63, 64, 129] {
            assert!(w.mark(c).unwrap());
        }
        assert!(!w.mark(5).unwrap(), "marking twice counts once");
        assert_eq!(w.count(), 5);
        assert!(w.contains(64) && !w.contains(65) && !w.contains(1000));
        let missing: Vec<usize> = w.missing().collect();
        assert_eq!(missing.len(), 125);
        assert_eq!(&missing[..5], [1, 2, 3, 4, 6]);
        assert!(!missing.contains(&63) && !missing.contains(&129));
        assert_eq!(*missing.last().unwrap(), 128);
        let e = w.mark(130).unwrap_err().to_string();
        assert_eq!(e, "chunk 130 is beyond the image's 130 chunks");
        for c in missing {
            w.mark(c).unwrap();
        }
        assert!(w.is_complete());
        assert_eq!(w.missing().next(), None);
    }

    #[test]
    fn written_edge_sizes() {
        assert_eq!(Written::new(0).missing().next(), None);
        assert!(Written::new(0).is_complete());
        let mut w = Written::new(64);
        for c in 0..63 {
            w.mark(c).unwrap();
        }
        assert_eq!(w.missing().collect::<Vec<_>>(), [63]);
    }

    #[test]
    fn rate_and_eta_over_a_window() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut r = Rate::new(1000, 100, s(10), t0);
        assert_eq!((r.bytes_per_sec(), r.eta()), (None, None));
        r.update(200, t0 + s(1));
        assert_eq!(
            r.bytes_per_sec(),
            Some(100.0),
            "resumed bytes are not counted"
        );
        assert_eq!(r.eta(), Some(s(8)));
        // Faster later: after the window has moved on, the old pace is gone.
        for i in 2..=20 {
            r.update(200 + (i - 1) * 10, t0 + s(i));
        }
        assert_eq!(r.done(), 390);
        assert_eq!(r.bytes_per_sec(), Some(10.0));
        assert_eq!(r.eta(), Some(s(61)));
        assert!(r.samples.len() <= 12, "{}", r.samples.len());
        // A stall: rate 0, no ETA.
        r.update(390, t0 + s(40));
        assert_eq!(r.bytes_per_sec(), Some(0.0));
        assert_eq!(r.eta(), None);
        r.update(1000, t0 + s(41));
        assert_eq!(r.eta(), Some(Duration::ZERO));
    }

    #[test]
    fn rapid_updates_stay_bounded() {
        let t0 = Instant::now();
        let mut r = Rate::new(u64::MAX, 0, Duration::from_secs(10), t0);
        for i in 1..=100_000u64 {
            r.update(i * 1000, t0 + Duration::from_micros(i * 100));
        }
        assert!(r.samples.len() < 40, "{}", r.samples.len());
        let rate = r.bytes_per_sec().unwrap();
        assert!((rate - 1e7).abs() < 1e3, "{rate}");
    }
}
