//! Image files on disk: detecting what a source file is (Shoal image,
//! qcow2, raw), encoding a raw volume or re-encoding a Shoal image chunk by
//! chunk with the protocol's `Encoder`, converting qcow2 with `qemu-img`,
//! and verifying a stored file (prefix, footer and table parsed, then every
//! chunk's SHA-1/SHA-256 through `verify_chunk`). Memory stays at about one
//! chunk plus the table; no image is ever read whole.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use shoal_protocol::image::{
    decode_chunk, parse_prefix, prefix_len, verify_chunk, Compression, Encoder, Footer, Image,
    Metadata, DEFAULT_CHUNK_SIZE, FOOTER_LEN, MAGIC, PREAMBLE_LEN,
};

use super::StoreError;

/// First bytes of a qcow2 file.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// What a source file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A Shoal image (re-encoded, every chunk verified on the way).
    Shoal,
    /// A qcow2 disk (converted to raw with `qemu-img` first).
    Qcow2,
    /// A raw volume.
    Raw,
}

/// Looks at the first bytes of `path`.
pub fn detect(path: &Path) -> Result<SourceKind, StoreError> {
    let read = |e| StoreError::Read(path.into(), e);
    let mut f = File::open(path).map_err(read)?;
    let meta = f.metadata().map_err(read)?;
    if !meta.is_file() {
        return Err(StoreError::NotAFile(path.into()));
    }
    if meta.len() == 0 {
        return Err(StoreError::Empty(path.into()));
    }
    let mut head = [0u8; 8];
    let n = read_full(&mut f, &mut head).map_err(read)?;
    Ok(if n == 8 && head == MAGIC {
        SourceKind::Shoal
    } else if n >= 4 && head[..4] == QCOW2_MAGIC {
        SourceKind::Qcow2
    } else {
        SourceKind::Raw
    })
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn read_at(f: &mut File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
    let read = |e| StoreError::Read(path.into(), e);
    f.seek(SeekFrom::Start(offset)).map_err(read)?;
    f.read_exact(buf).map_err(read)
}

/// Parses an image file's prefix, footer and table (not the chunks).
/// Returns the image and the file's length.
pub fn read_image(path: &Path) -> Result<(Image, u64), StoreError> {
    let mut f = File::open(path).map_err(|e| StoreError::Read(path.into(), e))?;
    read_image_from(&mut f, path)
}

fn read_image_from(f: &mut File, path: &Path) -> Result<(Image, u64), StoreError> {
    let invalid = |e| StoreError::Invalid(path.into(), e);
    let len = f
        .metadata()
        .map_err(|e| StoreError::Read(path.into(), e))?
        .len();
    if len < (PREAMBLE_LEN + FOOTER_LEN) as u64 {
        return Err(StoreError::Truncated(path.into(), len));
    }
    let mut pre = [0u8; PREAMBLE_LEN];
    read_at(f, path, 0, &mut pre)?;
    let n = prefix_len(&pre).map_err(invalid)?;
    if n as u64 > len {
        return Err(StoreError::Truncated(path.into(), len));
    }
    let mut prefix = vec![0u8; n];
    read_at(f, path, 0, &mut prefix)?;
    let mut foot = [0u8; FOOTER_LEN];
    read_at(f, path, len - FOOTER_LEN as u64, &mut foot)?;
    let footer = Footer::parse(&foot).map_err(invalid)?;
    let range = footer.table_range(len).map_err(invalid)?;
    let mut table = vec![0u8; (range.end - range.start) as usize];
    read_at(f, path, range.start, &mut table)?;
    // Parse the prefix first so a bad header is named before the table.
    parse_prefix(&prefix).map_err(invalid)?;
    let image = Image::parse(&prefix, &table, &foot, len).map_err(invalid)?;
    Ok((image, len))
}

/// Verifies a whole image file: structure, then every stored chunk.
pub fn verify_file(path: &Path) -> Result<(Image, u64), StoreError> {
    let mut f = File::open(path).map_err(|e| StoreError::Read(path.into(), e))?;
    let (image, len) = read_image_from(&mut f, path)?;
    let mut buf = Vec::new();
    for entry in image.chunks.iter().filter(|e| !e.is_zero()) {
        buf.resize(entry.stored_len as usize, 0);
        read_at(&mut f, path, entry.stored_offset, &mut buf)?;
        verify_chunk(&image.header, entry, &buf)
            .map_err(|e| StoreError::Corrupt(path.into(), e))?;
    }
    Ok((image, len))
}

/// The partition table a raw disk starts with, if any.
fn partition_table(f: &mut File) -> std::io::Result<Option<String>> {
    let mut head = [0u8; 1024];
    f.seek(SeekFrom::Start(0))?;
    let n = read_full(f, &mut head)?;
    f.seek(SeekFrom::Start(0))?;
    Ok(if n >= 520 && &head[512..520] == b"EFI PART" {
        Some("gpt".into())
    } else if n >= 512 && head[510..512] == [0x55, 0xaa] {
        Some("mbr".into())
    } else {
        None
    })
}

/// Encodes the raw volume `src` into `out` (written from its start).
/// `meta.source_size` and `partition_table` are filled in here.
pub fn encode_raw(
    src: &Path,
    out: &mut File,
    out_path: &Path,
    mut meta: Metadata,
    compression: Compression,
) -> Result<Image, StoreError> {
    let read = |e| StoreError::Read(src.into(), e);
    let mut f = File::open(src).map_err(read)?;
    meta.source_size = f.metadata().map_err(read)?.len();
    if meta.source_size == 0 {
        return Err(StoreError::Empty(src.into()));
    }
    meta.partition_table = partition_table(&mut f).map_err(read)?;
    if meta.logical_sector_size == 0 {
        meta.logical_sector_size = 512;
    }
    let mut enc = Encoder::new(meta, compression, DEFAULT_CHUNK_SIZE)
        .map_err(|e| StoreError::Encode(src.into(), e))?;
    let write = |e| StoreError::Write(out_path.into(), e);
    let mut w = BufWriter::with_capacity(1 << 20, out);
    w.write_all(enc.prefix()).map_err(write)?;
    let mut buf = vec![0u8; DEFAULT_CHUNK_SIZE as usize];
    let mut left = enc.header().metadata.source_size;
    while left > 0 {
        let want = left.min(u64::from(DEFAULT_CHUNK_SIZE)) as usize;
        let n = read_full(&mut f, &mut buf[..want]).map_err(read)?;
        if n < want {
            return Err(StoreError::Shrank(src.into()));
        }
        if let Some(stored) = enc
            .push(&buf[..n])
            .map_err(|e| StoreError::Encode(src.into(), e))?
        {
            w.write_all(&stored).map_err(write)?;
        }
        left -= n as u64;
    }
    let (tail, image) = enc
        .finish()
        .map_err(|e| StoreError::Encode(src.into(), e))?;
    w.write_all(&tail).map_err(write)?;
    w.flush().map_err(write)?;
    Ok(image)
}

/// Re-encodes the Shoal image `src` at `compression`, decoding (and so
/// verifying) each chunk; `adjust` may change the metadata (name,
/// description). The chunk size is kept.
pub fn transcode(
    src: &Path,
    out: &mut File,
    out_path: &Path,
    compression: Compression,
    adjust: impl FnOnce(&mut Metadata),
) -> Result<Image, StoreError> {
    let mut f = File::open(src).map_err(|e| StoreError::Read(src.into(), e))?;
    let (image, _) = read_image_from(&mut f, src)?;
    let mut meta = image.header.metadata.clone();
    adjust(&mut meta);
    let mut enc = Encoder::new(meta, compression, image.header.chunk_size)
        .map_err(|e| StoreError::Encode(src.into(), e))?;
    let write = |e| StoreError::Write(out_path.into(), e);
    let mut w = BufWriter::with_capacity(1 << 20, out);
    w.write_all(enc.prefix()).map_err(write)?;
    let zeros = vec![0u8; image.header.chunk_size as usize];
    let mut stored = Vec::new();
    for entry in &image.chunks {
        let pushed = if entry.is_zero() {
            enc.push(&zeros[..entry.volume_len as usize])
        } else {
            stored.resize(entry.stored_len as usize, 0);
            read_at(&mut f, src, entry.stored_offset, &mut stored)?;
            let volume = decode_chunk(&image.header, entry, &stored)
                .map_err(|e| StoreError::Corrupt(src.into(), e))?;
            enc.push(&volume)
        };
        if let Some(bytes) = pushed.map_err(|e| StoreError::Encode(src.into(), e))? {
            w.write_all(&bytes).map_err(write)?;
        }
    }
    let (tail, image) = enc
        .finish()
        .map_err(|e| StoreError::Encode(src.into(), e))?;
    w.write_all(&tail).map_err(write)?;
    w.flush().map_err(write)?;
    Ok(image)
}

/// Converts the qcow2 disk `src` to the raw file `dst` with
/// `qemu-img convert -f qcow2 -O raw`.
pub fn qcow2_to_raw(src: &Path, dst: &Path) -> Result<(), StoreError> {
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(src)
        .arg(dst)
        .output()
        .map_err(|e| StoreError::Qemu(src.into(), format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(StoreError::Qemu(
            src.into(),
            format!("qemu-img {}: {why}", out.status),
        ));
    }
    Ok(())
}
