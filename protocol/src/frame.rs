//! Length-delimited frames on the control channel's TCP stream.
//!
//! A frame is a 4-byte big-endian length, then that many bytes (one Noise
//! message: a handshake message or an encrypted transport message). Noise
//! messages are at most 65 535 bytes, so a larger length is an error, and so
//! is an empty frame; either ends the connection. The decoder is sans-I/O:
//! push the bytes read, pop whole frames.

/// Largest frame body: Noise's maximum message size.
pub const MAX_FRAME: usize = 65_535;
/// Bytes of the length prefix.
pub const HEADER: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    Oversized(usize),
    #[error("empty frame")]
    Empty,
}

/// Appends one frame carrying `body` to `out`.
pub fn encode(body: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    if body.len() > MAX_FRAME {
        return Err(FrameError::Oversized(body.len()));
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// One frame as a new buffer.
pub fn to_vec(body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    encode(body, &mut out)?;
    Ok(out)
}

/// Reassembles frames from a byte stream. Holds at most one partial frame
/// (`HEADER` plus the limit, [`MAX_FRAME`] unless [`Decoder::with_limit`]
/// says otherwise) plus whatever one `push` added.
#[derive(Debug)]
pub struct Decoder {
    max: usize,
    buf: Vec<u8>,
    failed: Option<FrameError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::with_limit(MAX_FRAME)
    }
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder for frames of at most `max` body bytes (longer ones are
    /// [`FrameError::Oversized`]).
    pub fn with_limit(max: usize) -> Self {
        Self {
            max,
            buf: Vec::new(),
            failed: None,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or the
    /// error that poisoned the stream (it stays poisoned: the caller closes).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        let err = match len {
            0 => Some(FrameError::Empty),
            n if n > self.max => Some(FrameError::Oversized(n)),
            _ => None,
        };
        if let Some(e) = err {
            self.failed = Some(e.clone());
            self.buf = Vec::new();
            return Err(e);
        }
        if self.buf.len() < HEADER + len {
            // Grow once to the whole frame rather than doubling up to it.
            self.buf.reserve(HEADER + len - self.buf.len());
            return Ok(None);
        }
        // The frame keeps the buffer; only what follows it is copied.
        let rest = self.buf.split_off(HEADER + len);
        let mut frame = std::mem::replace(&mut self.buf, rest);
        frame.drain(..HEADER);
        Ok(Some(frame))
    }

    /// Bytes held that are not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_in_pieces() {
        let mut wire = Vec::new();
        encode(b"hello", &mut wire).unwrap();
        encode(&[7u8; 300], &mut wire).unwrap();
        assert_eq!(&wire[..4], &[0, 0, 0, 5]);
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &wire {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![b"hello".to_vec(), vec![7u8; 300]]);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn truncated_frame_waits_oversized_and_empty_fail() {
        let mut d = Decoder::new();
        d.push(&[0, 0, 0, 9, 1, 2]);
        assert_eq!(d.next_frame(), Ok(None));
        let mut d = Decoder::new();
        d.push(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next_frame(), Err(FrameError::Oversized(0xffff_ffff)));
        d.push(&[0, 0, 0, 1, 1]);
        assert!(d.next_frame().is_err(), "a poisoned stream stays poisoned");
        let mut d = Decoder::new();
        d.push(&[0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::Empty));
        assert_eq!(
            encode(&[0; MAX_FRAME + 1], &mut Vec::new()),
            Err(FrameError::Oversized(MAX_FRAME + 1))
        );
    }

    proptest! {
        /// Any bytes, split anywhere: the decoder never panics, never holds
        /// more than one frame's worth, and frames it yields are in bounds.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048), cut in 0usize..2048) {
            let mut d = Decoder::new();
            let cut = cut.min(data.len());
            for part in [&data[..cut], &data[cut..]] {
                d.push(part);
                while let Ok(Some(f)) = d.next_frame() {
                    prop_assert!(!f.is_empty() && f.len() <= MAX_FRAME);
                }
            }
            prop_assert!(d.pending() <= data.len());
        }

        #[test]
        fn encoded_frames_come_back(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..600), 0..8)) {
            let mut wire = Vec::new();
            for b in &bodies {
                encode(b, &mut wire).unwrap();
            }
            let mut d = Decoder::new();
            d.push(&wire);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            prop_assert_eq!(got, bodies);
        }
    }
}
