//! A set of block indices within one chunk: a bitmap that knows its count.

/// Blocks `0..len` of one chunk, each present or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSet {
    words: Vec<u64>,
    len: u32,
    count: u32,
}

impl BlockSet {
    /// No block of `len`.
    pub fn empty(len: u32) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            count: 0,
        }
    }

    /// Every block of `len`.
    pub fn full(len: u32) -> Self {
        let mut s = Self::empty(len);
        s.insert_range(0, len);
        s
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    pub fn contains(&self, i: u32) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Adds `i`; false if it was there already or is out of range.
    pub fn insert(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
        if self.words[w] & b != 0 {
            return false;
        }
        self.words[w] |= b;
        self.count += 1;
        true
    }

    /// Adds `first..first + n`, clipped to the set's length.
    pub fn insert_range(&mut self, first: u32, n: u32) {
        let end = first.saturating_add(n).min(self.len);
        for i in first..end {
            self.insert(i);
        }
    }

    /// Adds every block of `other` (of the same length).
    pub fn union(&mut self, other: &BlockSet) {
        for (i, (a, b)) in self.words.iter_mut().zip(&other.words).enumerate() {
            let new = *b & !*a;
            if new != 0 {
                *a |= new;
                self.count += new.count_ones();
                debug_assert!(i * 64 < self.len as usize);
            }
        }
    }

    /// The first present block at or after `from`.
    pub fn next_from(&self, from: u32) -> Option<u32> {
        if from >= self.len {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut bits = self.words[w] & (!0u64 << (from % 64));
        loop {
            if bits != 0 {
                let i = w as u32 * 64 + bits.trailing_zeros();
                return (i < self.len).then_some(i);
            }
            w += 1;
            bits = *self.words.get(w)?;
        }
    }

    /// The runs of absent blocks, as `(first, count)`.
    pub fn gaps(&self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut start = None;
        for i in 0..self.len {
            match (self.contains(i), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    out.push((s, i - s));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push((s, self.len - s));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_count_gaps_and_iteration() {
        let mut s = BlockSet::empty(130);
        assert!(s.insert(0));
        assert!(!s.insert(0));
        assert!(!s.insert(130));
        s.insert_range(64, 10);
        s.insert(129);
        assert_eq!(s.count(), 12);
        assert_eq!(s.gaps(), vec![(1, 63), (74, 55)]);
        assert_eq!(s.next_from(1), Some(64));
        assert_eq!(s.next_from(74), Some(129));
        assert_eq!(s.next_from(130), None);
        let mut t = BlockSet::empty(130);
        t.insert_range(0, 2);
        t.union(&s);
        assert_eq!(t.count(), 13);
        assert!(BlockSet::full(130).is_full());
        assert_eq!(BlockSet::full(130).gaps(), vec![]);
    }
}
