//! The unicast chunk protocol between a Deployment Agent and the Image
//! Distribution service (`docs/distribution.md`): over plain TCP, the agent
//! asks for chunks of one image by index and the service sends each chunk's
//! stored bytes exactly as they are in the image file.
//!
//! Integrity never rests on this stream: the agent verifies every chunk
//! against the chunk table it already holds (`image::decode_chunk_into`)
//! before anything reaches its disk. The session ID only says which job the
//! agent pulls for; the service refuses an unknown or expired one.
//!
//! Frames are a 4-byte big-endian length and a body, like `frame.rs`, but
//! with a larger, per-direction bound: a chunk frame carries up to
//! [`MAX_CHUNK_SIZE`] stored bytes. Each body starts with the postcard `u16`
//! [`VERSION`]. Sans-I/O: callers push bytes into a [`Decoder`] and write
//! what the encoders return.

use serde::{Deserialize, Serialize};

use crate::image::MAX_CHUNK_SIZE;

/// Bumped on any incompatible change to the messages below.
pub const VERSION: u16 = 2;
/// Bytes of a frame's length prefix.
pub const HEADER: usize = 4;
/// Most chunk indices in one request.
pub const MAX_CHUNKS_PER_REQUEST: usize = 64;
/// Largest request body: version, session, image ID and 64 varint indices
/// fit in well under this.
pub const MAX_REQUEST_FRAME: usize = 1024;
/// Largest reply body: a chunk's stored bytes (at most the largest chunk
/// size, 64 MiB) plus 1 KiB for the message head.
pub const MAX_REPLY_FRAME: usize = MAX_CHUNK_SIZE as usize + 1024;
/// Longest refusal reason; longer text is cut on encoding and refused on
/// decoding.
pub const MAX_REASON: usize = 512;

/// What went wrong with bytes from the other side. Any of these ends the
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DistributionError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversized { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("message has protocol version {0}, expected {VERSION}")]
    Version(u16),
    #[error("message does not decode")]
    Decode,
    #[error("message has {0} trailing bytes")]
    Trailing(usize),
    #[error("request names {0} chunks, not 1..={MAX_CHUNKS_PER_REQUEST}")]
    ChunkCount(usize),
    #[error("refusal reason of {0} bytes exceeds {MAX_REASON}")]
    ReasonTooLong(usize),
    #[error("chunk {index} carries {len} stored bytes, more than any chunk may")]
    ChunkTooLarge { index: u64, len: usize },
}

/// Agent → service: send these chunks of `image_id`, for `session`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The session ID the Controller gave the agent for this job.
    pub session: [u8; 32],
    /// The image's ID (SHA-256 of its chunk table).
    pub image_id: [u8; 32],
    /// 1..=[`MAX_CHUNKS_PER_REQUEST`] chunk indices, answered in this order.
    pub chunks: Vec<u64>,
}

/// Agent → service: send the image's prefix, chunk table and footer (so
/// the agent can parse the table and check it hashes to `image_id`, which
/// it got over the authenticated control channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRequest {
    pub session: [u8; 32],
    pub image_id: [u8; 32],
}

/// Any request, as it travels: a postcard enum after the version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ask {
    /// Variant 0: chunks.
    Chunks(Request),
    /// Variant 1: prefix + table + footer.
    Table(TableRequest),
}

impl Ask {
    /// One whole frame (length prefix included).
    pub fn encode(&self) -> Result<Vec<u8>, DistributionError> {
        if let Ask::Chunks(r) = self {
            check_count(r.chunks.len())?;
        }
        let body =
            postcard::to_allocvec(&(VERSION, self)).map_err(|_| DistributionError::Decode)?;
        frame(body, MAX_REQUEST_FRAME)
    }

    /// Decodes a frame body.
    pub fn decode(body: &[u8]) -> Result<Ask, DistributionError> {
        let rest = version(body)?;
        let (ask, rest) =
            postcard::take_from_bytes::<Ask>(rest).map_err(|_| DistributionError::Decode)?;
        if !rest.is_empty() {
            return Err(DistributionError::Trailing(rest.len()));
        }
        if let Ask::Chunks(r) = &ask {
            check_count(r.chunks.len())?;
        }
        Ok(ask)
    }

    pub fn session(&self) -> &[u8; 32] {
        match self {
            Ask::Chunks(r) => &r.session,
            Ask::Table(t) => &t.session,
        }
    }
}

impl Request {
    /// One whole frame (length prefix included), as [`Ask::Chunks`].
    pub fn encode(&self) -> Result<Vec<u8>, DistributionError> {
        Ask::Chunks(self.clone()).encode()
    }

    /// Decodes a frame body that must be a chunk request.
    pub fn decode(body: &[u8]) -> Result<Request, DistributionError> {
        match Ask::decode(body)? {
            Ask::Chunks(r) => Ok(r),
            Ask::Table(_) => Err(DistributionError::Decode),
        }
    }
}

impl TableRequest {
    /// One whole frame (length prefix included), as [`Ask::Table`].
    pub fn encode(&self) -> Result<Vec<u8>, DistributionError> {
        Ask::Table(self.clone()).encode()
    }
}

/// Service → agent. The service answers each request in order: one
/// `Chunk` per index asked for, then `Done`; or `Refused`, then it closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A chunk's stored bytes, exactly as in the image file.
    Chunk { index: u64, stored: Vec<u8> },
    /// The request is refused; the connection closes after this.
    Refused { reason: String },
    /// Every chunk of the oldest outstanding request has been sent.
    Done,
    /// The answer to a [`TableRequest`]: `bytes` is the image file's prefix
    /// (`prefix_len` bytes), chunk table (`table_len`) and footer, in that
    /// order; `file_len` is the whole file's length.
    Table {
        prefix_len: u32,
        table_len: u64,
        file_len: u64,
        bytes: Vec<u8>,
    },
}

/// The postcard part of a reply body. A `Chunk` body's stored bytes follow
/// it raw, to the end of the frame (so 64 MiB are not varint-walked).
#[derive(Debug, Serialize, Deserialize)]
enum Head {
    Chunk {
        index: u64,
    },
    Refused {
        reason: String,
    },
    Done,
    Table {
        prefix_len: u32,
        table_len: u64,
        file_len: u64,
    },
}

impl Reply {
    /// One whole frame (length prefix included).
    pub fn encode(&self) -> Result<Vec<u8>, DistributionError> {
        match self {
            Reply::Chunk { index, stored } => {
                let mut out = chunk_frame_head(*index, stored.len())?;
                out.extend_from_slice(stored);
                Ok(out)
            }
            Reply::Refused { reason } => {
                let mut cut = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                let head = Head::Refused {
                    reason: reason[..cut].to_string(),
                };
                let body = postcard::to_allocvec(&(VERSION, head))
                    .map_err(|_| DistributionError::Decode)?;
                frame(body, MAX_REPLY_FRAME)
            }
            Reply::Done => {
                let body = postcard::to_allocvec(&(VERSION, Head::Done))
                    .map_err(|_| DistributionError::Decode)?;
                frame(body, MAX_REPLY_FRAME)
            }
            Reply::Table {
                prefix_len,
                table_len,
                file_len,
                bytes,
            } => {
                let head = Head::Table {
                    prefix_len: *prefix_len,
                    table_len: *table_len,
                    file_len: *file_len,
                };
                let mut body = postcard::to_allocvec(&(VERSION, head))
                    .map_err(|_| DistributionError::Decode)?;
                body.extend_from_slice(bytes);
                frame(body, MAX_REPLY_FRAME)
            }
        }
    }

    /// Decodes a frame body, taking it to avoid copying a chunk's bytes.
    pub fn decode(mut body: Vec<u8>) -> Result<Reply, DistributionError> {
        let after_version = body.len() - version(&body)?.len();
        let (head, rest) = postcard::take_from_bytes::<Head>(&body[after_version..])
            .map_err(|_| DistributionError::Decode)?;
        let head_len = body.len() - rest.len();
        match head {
            Head::Chunk { index } => {
                if rest.len() > MAX_CHUNK_SIZE as usize {
                    return Err(DistributionError::ChunkTooLarge {
                        index,
                        len: rest.len(),
                    });
                }
                body.drain(..head_len);
                Ok(Reply::Chunk {
                    index,
                    stored: body,
                })
            }
            Head::Table {
                prefix_len,
                table_len,
                file_len,
            } => {
                body.drain(..head_len);
                Ok(Reply::Table {
                    prefix_len,
                    table_len,
                    file_len,
                    bytes: body,
                })
            }
            _ if !rest.is_empty() => Err(DistributionError::Trailing(rest.len())),
            Head::Refused { reason } if reason.len() > MAX_REASON => {
                Err(DistributionError::ReasonTooLong(reason.len()))
            }
            Head::Refused { reason } => Ok(Reply::Refused { reason }),
            Head::Done => Ok(Reply::Done),
        }
    }
}

/// The start of a chunk frame carrying `stored_len` stored bytes: length
/// prefix and message head. Append exactly `stored_len` bytes to complete
/// it (the service reads them from the image file straight after this).
pub fn chunk_frame_head(index: u64, stored_len: usize) -> Result<Vec<u8>, DistributionError> {
    if stored_len > MAX_CHUNK_SIZE as usize {
        return Err(DistributionError::ChunkTooLarge {
            index,
            len: stored_len,
        });
    }
    let head = postcard::to_allocvec(&(VERSION, Head::Chunk { index }))
        .map_err(|_| DistributionError::Decode)?;
    let body_len = head.len() + stored_len;
    let mut out = Vec::with_capacity(HEADER + body_len);
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.extend_from_slice(&head);
    Ok(out)
}

fn check_count(n: usize) -> Result<(), DistributionError> {
    if n == 0 || n > MAX_CHUNKS_PER_REQUEST {
        return Err(DistributionError::ChunkCount(n));
    }
    Ok(())
}

/// Checks the leading version; returns the bytes after it.
fn version(body: &[u8]) -> Result<&[u8], DistributionError> {
    let (v, rest) =
        postcard::take_from_bytes::<u16>(body).map_err(|_| DistributionError::Decode)?;
    if v != VERSION {
        return Err(DistributionError::Version(v));
    }
    Ok(rest)
}

fn frame(body: Vec<u8>, max: usize) -> Result<Vec<u8>, DistributionError> {
    if body.len() > max {
        return Err(DistributionError::Oversized {
            len: body.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reassembles frames of at most `max` body bytes from a byte stream
/// ([`crate::frame::Decoder`] with this protocol's limits and errors). An
/// empty or oversized frame poisons it: the caller closes the connection.
#[derive(Debug)]
pub struct Decoder {
    max: usize,
    inner: crate::frame::Decoder,
}

impl Decoder {
    /// A decoder for the service's side (requests).
    pub fn requests() -> Self {
        Self::new(MAX_REQUEST_FRAME)
    }

    /// A decoder for the agent's side (replies, up to a whole chunk).
    pub fn replies() -> Self {
        Self::new(MAX_REPLY_FRAME)
    }

    pub fn new(max: usize) -> Self {
        Self {
            max,
            inner: crate::frame::Decoder::with_limit(max),
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.inner.push(bytes);
    }

    /// The next whole frame body, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, DistributionError> {
        self.inner.next_frame().map_err(|e| match e {
            crate::frame::FrameError::Empty => DistributionError::Empty,
            crate::frame::FrameError::Oversized(len) => {
                DistributionError::Oversized { len, max: self.max }
            }
        })
    }

    /// Bytes held that are not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.inner.pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_frame(wire: &[u8], max: usize) -> Vec<u8> {
        let mut d = Decoder::new(max);
        d.push(wire);
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!(d.pending(), 0);
        f
    }

    #[test]
    fn request_bytes_are_pinned_and_round_trip() {
        let req = Request {
            session: [1; 32],
            image_id: [2; 32],
            chunks: vec![0, 300],
        };
        let wire = req.encode().unwrap();
        // length, version 2, variant 0 (chunks), 32 + 32 bytes, count 2,
        // varints 0 and 300.
        let mut want = vec![0, 0, 0, 70, 2, 0];
        want.extend([1; 32]);
        want.extend([2; 32]);
        want.extend([2, 0, 0xac, 0x02]);
        assert_eq!(wire, want);
        let body = one_frame(&wire, MAX_REQUEST_FRAME);
        assert_eq!(Request::decode(&body).unwrap(), req);
    }

    #[test]
    fn request_bounds() {
        let mut req = Request {
            session: [0; 32],
            image_id: [0; 32],
            chunks: vec![],
        };
        assert_eq!(req.encode(), Err(DistributionError::ChunkCount(0)));
        req.chunks = (0..65).collect();
        assert_eq!(req.encode(), Err(DistributionError::ChunkCount(65)));
        req.chunks = (u64::MAX - 63..=u64::MAX).collect();
        let wire = req.encode().unwrap();
        assert!(wire.len() - HEADER <= MAX_REQUEST_FRAME);
        // 65 indices, hand-encoded, are refused on decoding too.
        let mut body = postcard::to_allocvec(&(VERSION, Ask::Chunks(req.clone()))).unwrap();
        body[2 + 64] = 65;
        body.push(0);
        assert_eq!(
            Request::decode(&body),
            Err(DistributionError::ChunkCount(65))
        );
    }

    #[test]
    fn request_version_and_trailing_bytes_are_refused() {
        let req = Request {
            session: [0; 32],
            image_id: [0; 32],
            chunks: vec![5],
        };
        let mut body = one_frame(&req.encode().unwrap(), MAX_REQUEST_FRAME);
        body.push(0);
        assert_eq!(Request::decode(&body), Err(DistributionError::Trailing(1)));
        body.pop();
        body[0] = 1;
        assert_eq!(Request::decode(&body), Err(DistributionError::Version(1)));
        assert_eq!(Request::decode(&[2, 0]), Err(DistributionError::Decode));
        let table = TableRequest {
            session: [3; 32],
            image_id: [4; 32],
        };
        let body = one_frame(&table.encode().unwrap(), MAX_REQUEST_FRAME);
        assert_eq!(Ask::decode(&body).unwrap(), Ask::Table(table));
        assert_eq!(Request::decode(&body), Err(DistributionError::Decode));
    }

    #[test]
    fn replies_round_trip_and_chunk_bytes_are_raw() {
        let chunk = Reply::Chunk {
            index: 7,
            stored: b"stored".to_vec(),
        };
        let wire = chunk.encode().unwrap();
        // length 9: version 2, variant 0, index 7, then the bytes as they are.
        assert_eq!(wire, [&[0, 0, 0, 9, 2, 0, 7][..], b"stored"].concat());
        for reply in [
            chunk,
            Reply::Chunk {
                index: 1,
                stored: vec![],
            },
            Reply::Refused {
                reason: "session ID unknown or expired".into(),
            },
            Reply::Done,
            Reply::Table {
                prefix_len: 3,
                table_len: 2,
                file_len: 99,
                bytes: b"pretaFOOTER".to_vec(),
            },
        ] {
            let body = one_frame(&reply.encode().unwrap(), MAX_REPLY_FRAME);
            assert_eq!(Reply::decode(body).unwrap(), reply);
        }
        assert_eq!(Reply::Done.encode().unwrap(), [0, 0, 0, 2, 2, 2]);
    }

    #[test]
    fn reply_bounds() {
        let long = Reply::Refused {
            reason: "é".repeat(MAX_REASON),
        };
        let body = one_frame(&long.encode().unwrap(), MAX_REPLY_FRAME);
        match Reply::decode(body).unwrap() {
            Reply::Refused { reason } => assert_eq!(reason.len(), MAX_REASON),
            other => panic!("{other:?}"),
        }
        let mut too_long = postcard::to_allocvec(&(VERSION, 1u8)).unwrap();
        too_long.extend(postcard::to_allocvec(&"x".repeat(MAX_REASON + 1)).unwrap());
        assert_eq!(
            Reply::decode(too_long),
            Err(DistributionError::ReasonTooLong(MAX_REASON + 1))
        );
        assert!(matches!(
            chunk_frame_head(3, MAX_CHUNK_SIZE as usize + 1),
            Err(DistributionError::ChunkTooLarge { index: 3, .. })
        ));
        assert_eq!(
            Reply::decode(vec![2, 2, 0]),
            Err(DistributionError::Trailing(1))
        );
        assert_eq!(Reply::decode(vec![2, 9]), Err(DistributionError::Decode));
    }

    #[test]
    fn decoder_bounds_poison() {
        let mut d = Decoder::requests();
        d.push(&(MAX_REQUEST_FRAME as u32 + 1).to_be_bytes());
        assert!(matches!(
            d.next_frame(),
            Err(DistributionError::Oversized { .. })
        ));
        d.push(&Reply::Done.encode().unwrap());
        assert!(d.next_frame().is_err(), "a poisoned stream stays poisoned");
        let mut d = Decoder::replies();
        d.push(&[0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(DistributionError::Empty));
        // The largest chunk frame fits the reply bound.
        let head = chunk_frame_head(u64::MAX, MAX_CHUNK_SIZE as usize).unwrap();
        let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
        assert!(len <= MAX_REPLY_FRAME);
    }

    proptest! {
        /// Any bytes split anywhere: nothing panics and frames are in bounds.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048), cut in 0usize..2048) {
            let mut d = Decoder::requests();
            let cut = cut.min(data.len());
            for part in [&data[..cut], &data[cut..]] {
                d.push(part);
                while let Ok(Some(f)) = d.next_frame() {
                    prop_assert!(!f.is_empty() && f.len() <= MAX_REQUEST_FRAME);
                    let _ = Request::decode(&f);
                    let _ = Reply::decode(f);
                }
            }
        }

        #[test]
        fn frames_come_back_in_pieces(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..6), step in 1usize..50) {
            let mut wire = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                wire.extend(Reply::Chunk { index: i as u64, stored: c.clone() }.encode().unwrap());
            }
            let mut d = Decoder::replies();
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    match Reply::decode(f).unwrap() {
                        Reply::Chunk { stored, .. } => got.push(stored),
                        other => prop_assert!(false, "{other:?}"),
                    }
                }
            }
            prop_assert_eq!(got, chunks);
        }
    }
}
