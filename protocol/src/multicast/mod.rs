//! Multicast image distribution, sans-I/O (`docs/multicast.md`).
//!
//! One sender (the Controller's Image Distribution service) multicasts the
//! stored bytes of an image's data chunks, cut into blocks that fit one
//! datagram, to every receiver (agent) in a session. Receivers are in
//! charge of reliability: each keeps track of what it lacks and asks the
//! sender (unicast reports) for it; the sender merges the requests of all
//! receivers into one queue. [`sender::Sender`] and [`receiver::Receiver`]
//! are the two state machines; [`wire`] is the datagram layout and crypto.

use std::ops::Range;

pub mod blocks;
pub mod receiver;
pub mod sender;
pub mod wire;

#[cfg(test)]
mod sim;

pub use receiver::{Event, Receiver, ReceiverConfig};
pub use sender::{ReceiverView, Sender, SenderConfig, SenderStats};
pub use wire::{completion_digest, hardware_aes, payload_for_mtu, Cipher, Drop, ReceiverStats};

/// How an image's chunks split into blocks.
#[derive(Debug, Clone)]
pub struct Geometry {
    payload: usize,
    /// Stored bytes per chunk; 0 for a zero chunk (never sent).
    stored: Vec<u32>,
    volume: Vec<u32>,
}

impl Geometry {
    /// `payload` bytes per block; `chunks` as `(stored_len, volume_len)`.
    pub fn new(payload: usize, chunks: impl IntoIterator<Item = (u32, u32)>) -> Geometry {
        let (stored, volume) = chunks.into_iter().unzip();
        Geometry {
            payload: payload.max(1),
            stored,
            volume,
        }
    }

    /// The geometry of `image` for `payload`-byte blocks.
    pub fn of_image(image: &crate::image::Image, payload: usize) -> Geometry {
        Geometry::new(
            payload,
            image.chunks.iter().map(|e| (e.stored_len, e.volume_len)),
        )
    }

    pub fn payload(&self) -> usize {
        self.payload
    }

    pub fn chunks(&self) -> usize {
        self.stored.len()
    }

    /// Blocks in `chunk` (0 for a zero chunk or an index out of range).
    pub fn blocks(&self, chunk: u32) -> u32 {
        self.stored
            .get(chunk as usize)
            .map_or(0, |&s| (s as usize).div_ceil(self.payload) as u32)
    }

    pub fn stored_len(&self, chunk: u32) -> usize {
        self.stored.get(chunk as usize).map_or(0, |&s| s as usize)
    }

    pub fn volume_len(&self, chunk: u32) -> u64 {
        self.volume.get(chunk as usize).map_or(0, |&v| u64::from(v))
    }

    /// Where block `block` lies in `chunk`'s stored bytes.
    pub fn block_range(&self, chunk: u32, block: u32) -> Range<usize> {
        let len = self.stored_len(chunk);
        let start = (block as usize * self.payload).min(len);
        start..(start + self.payload).min(len)
    }
}
