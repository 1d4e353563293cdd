//! Decoding and verifying one chunk of an image (`docs/image-format.md`,
//! "Decoding a chunk"): the stored length and SHA-1 are checked before
//! decompression, zstd output is bounded to the chunk's stated volume
//! length (a chunk that would expand beyond it is corrupt), and the volume
//! bytes are checked against both the SHA-1 and the SHA-256 of the table.
//! Memory use is one chunk: never more than `volume_len` bytes of output.

use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::{ChunkEntry, ChunkKind, Compression, Header};

/// A chunk that failed decoding or verification; each names the chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {index}: stored length is {got} bytes, the table says {want}")]
    StoredLength { index: u64, got: u64, want: u32 },
    #[error("chunk {index}: stored SHA-1 mismatch")]
    StoredSha1 { index: u64 },
    #[error("chunk {index}: compressed, but the image is not")]
    NotCompressed { index: u64 },
    #[error("chunk {index}: expands beyond its {volume_len} bytes")]
    ExpandsBeyond { index: u64, volume_len: u32 },
    #[error("chunk {index}: decompresses to {got} bytes, the table says {want}")]
    VolumeLength { index: u64, got: u64, want: u32 },
    #[error("chunk {index}: does not decompress: {reason}")]
    Corrupt { index: u64, reason: &'static str },
    #[error(
        "chunk {index}: {kind:?} chunk of {volume_len} bytes cannot have {stored_len} stored bytes"
    )]
    Inconsistent {
        index: u64,
        kind: ChunkKind,
        stored_len: u32,
        volume_len: u32,
    },
    #[error("chunk {index}: volume SHA-1 mismatch")]
    VolumeSha1 { index: u64 },
    #[error("chunk {index}: volume SHA-256 mismatch")]
    VolumeSha256 { index: u64 },
}

impl ChunkError {
    /// The index of the chunk that failed.
    pub fn index(&self) -> u64 {
        match *self {
            ChunkError::StoredLength { index, .. }
            | ChunkError::StoredSha1 { index }
            | ChunkError::NotCompressed { index }
            | ChunkError::ExpandsBeyond { index, .. }
            | ChunkError::VolumeLength { index, .. }
            | ChunkError::Corrupt { index, .. }
            | ChunkError::Inconsistent { index, .. }
            | ChunkError::VolumeSha1 { index }
            | ChunkError::VolumeSha256 { index } => index,
        }
    }
}

/// Verifies `stored` (the chunk's bytes from the image file) and returns its
/// `volume_len` volume bytes. A zero chunk (`entry.is_zero()`) needs no
/// stored bytes: `stored` must be empty and the result is zeros; deploy
/// should instead check `is_zero()` first and zero the range on the disk.
pub fn decode_chunk(
    header: &Header,
    entry: &ChunkEntry,
    stored: &[u8],
) -> Result<Vec<u8>, ChunkError> {
    let mut out = vec![0u8; entry.volume_len as usize];
    decode_chunk_into(header, entry, stored, &mut out)?;
    Ok(out)
}

/// [`decode_chunk`] into the caller's buffer (e.g. an aligned `O_DIRECT`
/// buffer), which must be exactly `volume_len` bytes. On error its contents
/// are unspecified and must not be written anywhere.
pub fn decode_chunk_into(
    header: &Header,
    entry: &ChunkEntry,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), ChunkError> {
    decode_checked(header, entry, stored, out, Check::Full)
}

/// What [`decode_chunk_into_authenticated`] may leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// SHA-1 of the stored and volume bytes, and SHA-256 of the volume bytes.
    Full,
    /// SHA-1 only (of the stored bytes, and of the volume bytes when they
    /// differ): for bytes that also arrived under an AEAD keyed by the
    /// Controller, so SHA-1 is not the only thing vouching for them.
    Sha1,
}

/// [`decode_chunk_into`] for stored bytes that came authenticated by the
/// Controller (an AEAD multicast session): checks the SHA-1 of
/// the seed's chunk table but skips the SHA-256, the most expensive hash.
pub fn decode_chunk_into_authenticated(
    header: &Header,
    entry: &ChunkEntry,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), ChunkError> {
    decode_checked(header, entry, stored, out, Check::Sha1)
}

/// For stored bytes that came authenticated by the Controller: if the chunk
/// is raw, checks them against the entry's length and SHA-1 in place (they
/// are its volume bytes, to be written as they are) and returns true;
/// returns false for other kinds, which need [`decode_chunk_into_authenticated`].
pub fn check_raw_authenticated(entry: &ChunkEntry, stored: &[u8]) -> Result<bool, ChunkError> {
    if entry.kind != ChunkKind::Raw {
        return Ok(false);
    }
    let index = entry.index;
    if stored.len() as u64 != u64::from(entry.stored_len) || entry.stored_len != entry.volume_len {
        return Err(ChunkError::StoredLength {
            index,
            got: stored.len() as u64,
            want: entry.stored_len,
        });
    }
    let sha1: [u8; 20] = Sha1::digest(stored).into();
    if sha1 != entry.sha1_stored || entry.sha1_volume != entry.sha1_stored {
        return Err(ChunkError::StoredSha1 { index });
    }
    Ok(true)
}

fn decode_checked(
    header: &Header,
    entry: &ChunkEntry,
    stored: &[u8],
    out: &mut [u8],
    check: Check,
) -> Result<(), ChunkError> {
    let index = entry.index;
    if stored.len() as u64 != u64::from(entry.stored_len) {
        return Err(ChunkError::StoredLength {
            index,
            got: stored.len() as u64,
            want: entry.stored_len,
        });
    }
    if out.len() as u64 != u64::from(entry.volume_len) {
        return Err(ChunkError::VolumeLength {
            index,
            got: out.len() as u64,
            want: entry.volume_len,
        });
    }
    let sha1_stored: [u8; 20] = Sha1::digest(stored).into();
    if sha1_stored != entry.sha1_stored {
        return Err(ChunkError::StoredSha1 { index });
    }
    // The entry may not come from `parse_table`: check it is self-consistent.
    let consistent = match entry.kind {
        ChunkKind::Zero => entry.stored_len == 0,
        ChunkKind::Raw => entry.stored_len == entry.volume_len,
        ChunkKind::Zstd => entry.stored_len < entry.volume_len,
    };
    if !consistent {
        return Err(ChunkError::Inconsistent {
            index,
            kind: entry.kind,
            stored_len: entry.stored_len,
            volume_len: entry.volume_len,
        });
    }
    match entry.kind {
        ChunkKind::Zero => out.fill(0),
        ChunkKind::Raw => {
            // The volume bytes are the stored bytes, whose SHA-1 was just
            // checked: the table must say the same SHA-1 for both, and then
            // only the SHA-256 is left to compute.
            if entry.sha1_volume != entry.sha1_stored {
                return Err(ChunkError::VolumeSha1 { index });
            }
            out.copy_from_slice(stored);
            if check == Check::Full {
                let sha256: [u8; 32] = Sha256::digest(&*out).into();
                if sha256 != entry.sha256_volume {
                    return Err(ChunkError::VolumeSha256 { index });
                }
            }
            return Ok(());
        }
        ChunkKind::Zstd => {
            if header.compression == Compression::None {
                return Err(ChunkError::NotCompressed { index });
            }
            decompress(index, stored, out, header.chunk_size)?;
        }
    }
    match check {
        Check::Full => verify_volume(entry, out),
        Check::Sha1 => {
            let sha1: [u8; 20] = Sha1::digest(&*out).into();
            if sha1 != entry.sha1_volume {
                return Err(ChunkError::VolumeSha1 { index });
            }
            Ok(())
        }
    }
}

/// Checks `stored` as [`decode_chunk`] does, discarding the volume bytes
/// (the store's verification on add, export and replace).
pub fn verify_chunk(header: &Header, entry: &ChunkEntry, stored: &[u8]) -> Result<(), ChunkError> {
    decode_chunk(header, entry, stored).map(drop)
}

/// Checks volume bytes (e.g. re-read from a disk to resume a deploy) against
/// the entry's length, SHA-1 and SHA-256.
pub fn verify_volume(entry: &ChunkEntry, volume: &[u8]) -> Result<(), ChunkError> {
    let index = entry.index;
    if volume.len() as u64 != u64::from(entry.volume_len) {
        return Err(ChunkError::VolumeLength {
            index,
            got: volume.len() as u64,
            want: entry.volume_len,
        });
    }
    let sha1: [u8; 20] = Sha1::digest(volume).into();
    if sha1 != entry.sha1_volume {
        return Err(ChunkError::VolumeSha1 { index });
    }
    let sha256: [u8; 32] = Sha256::digest(volume).into();
    if sha256 != entry.sha256_volume {
        return Err(ChunkError::VolumeSha256 { index });
    }
    Ok(())
}

/// Decompresses zstd `src` into exactly `out`, never more. The window is
/// capped at the chunk size, so a frame cannot ask for a bigger buffer.
fn decompress(index: u64, src: &[u8], out: &mut [u8], chunk_size: u32) -> Result<(), ChunkError> {
    use zstd::zstd_safe::{self, DParameter};
    let volume_len = out.len() as u32;
    let beyond = ChunkError::ExpandsBeyond { index, volume_len };
    if let Ok(Some(n)) = zstd_safe::get_frame_content_size(src) {
        if n > u64::from(volume_len) {
            return Err(beyond);
        }
    }
    let corrupt = |code: usize| ChunkError::Corrupt {
        index,
        reason: zstd_safe::get_error_name(code),
    };
    let mut dctx = zstd_safe::DCtx::try_create().ok_or(ChunkError::Corrupt {
        index,
        reason: "no memory for a zstd context",
    })?;
    let window_log = chunk_size.max(1 << 10).ilog2();
    dctx.set_parameter(DParameter::WindowLogMax(window_log))
        .map_err(corrupt)?;
    match dctx.decompress(out, src) {
        Ok(n) if n == volume_len as usize => Ok(()),
        Ok(n) => Err(ChunkError::VolumeLength {
            index,
            got: n as u64,
            want: volume_len,
        }),
        Err(code) if zstd_safe::get_error_name(code) == "Destination buffer is too small" => {
            Err(beyond)
        }
        Err(code) => Err(corrupt(code)),
    }
}
