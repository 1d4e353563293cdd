//! The Shoal image format: a volume (a whole disk or one partition) stored
//! as independently decodable chunks, specified in `docs/image-format.md`.
//!
//! A file is `prefix` (a fixed preamble, then a postcard [`Header`]), the
//! stored chunk data, the chunk table (the image's "check block", after the
//! WDS image store's SHA-1 verification of every block) and a fixed
//! [`Footer`] locating the table. A writer streams data first and the table
//! last ([`Encoder`]); a reader parses the prefix, the footer and the table
//! ([`Image::parse`]) and then decodes chunks in any order
//! ([`decode_chunk`]). Everything here is sans-I/O and validates every
//! length and offset before use: the agent links it as PID 1, so no input
//! may panic it or make it allocate more than one chunk.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};

mod chunk;

pub use chunk::{
    check_raw_authenticated, decode_chunk, decode_chunk_into, decode_chunk_into_authenticated,
    verify_chunk, verify_volume, ChunkError,
};

/// First eight bytes of the preamble and last eight bytes of the footer.
pub const MAGIC: [u8; 8] = *b"SHOALIMG";
/// First eight bytes of the chunk table.
pub const TABLE_MAGIC: [u8; 8] = *b"SHOALTBL";
/// The format version this crate writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the fixed preamble; read these first, then [`prefix_len`].
pub const PREAMBLE_LEN: usize = 16;
/// Largest postcard header accepted.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// Bytes of the fixed footer at the end of the file.
pub const FOOTER_LEN: usize = 56;
/// Bytes of the chunk table's fixed head.
pub const TABLE_HEAD_LEN: usize = 56;
/// Bytes of one chunk-table entry.
pub const ENTRY_LEN: usize = 112;
/// Largest chunk table accepted (about 2.4 million chunks).
pub const MAX_TABLE_LEN: u64 = 256 * 1024 * 1024;
/// Default chunk size: 4 MiB of volume bytes.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Smallest chunk size.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk size.
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;

type Field = Range<usize>;

/// Byte positions of the fixed-size structures (little-endian integers).
mod field {
    use super::Field;

    pub mod preamble {
        use super::Field;
        pub const MAGIC: Field = 0..8;
        pub const VERSION: Field = 8..10;
        pub const RESERVED: Field = 10..12;
        pub const HEADER_LEN: Field = 12..16;
    }
    pub mod footer {
        use super::Field;
        pub const TABLE_OFFSET: Field = 0..8;
        pub const TABLE_LEN: Field = 8..16;
        pub const TABLE_SHA256: Field = 16..48;
        pub const MAGIC: Field = 48..56;
    }
    pub mod table {
        use super::Field;
        pub const MAGIC: Field = 0..8;
        pub const SOURCE_SIZE: Field = 8..16;
        pub const CHUNK_COUNT: Field = 16..24;
        pub const PREFIX_SHA256: Field = 24..56;
    }
    pub mod entry {
        use super::Field;
        pub const INDEX: Field = 0..8;
        pub const VOLUME_OFFSET: Field = 8..16;
        pub const VOLUME_LEN: Field = 16..20;
        pub const KIND: usize = 20;
        pub const RESERVED1: Field = 21..24;
        pub const STORED_OFFSET: Field = 24..32;
        pub const STORED_LEN: Field = 32..36;
        pub const RESERVED2: Field = 36..40;
        pub const SHA1_STORED: Field = 40..60;
        pub const SHA1_VOLUME: Field = 60..80;
        pub const SHA256_VOLUME: Field = 80..112;
    }
}

/// What went wrong building or parsing an image, naming the part that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("image {part}: truncated: {got} bytes, need {need}")]
    Truncated {
        part: &'static str,
        need: u64,
        got: u64,
    },
    #[error("image {0}: bad magic")]
    BadMagic(&'static str),
    #[error("image preamble: unsupported format version {0}")]
    UnsupportedVersion(u16),
    #[error("image preamble: reserved bytes are not zero")]
    Reserved,
    #[error("image header: {0} bytes exceeds the limit of {MAX_HEADER_LEN}")]
    HeaderTooLong(u64),
    #[error("image header: does not decode")]
    HeaderDecode,
    #[error("image header: {0} trailing bytes")]
    HeaderTrailing(usize),
    #[error("image header: {0}")]
    InvalidHeader(String),
    #[error("image footer: table at {offset} (+{len}) does not end where the footer begins in a {file_len}-byte file")]
    TablePlacement {
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("chunk table: {0} bytes is not a whole number of entries")]
    TableSize(u64),
    #[error("chunk table: exceeds {MAX_TABLE_LEN} bytes")]
    TableTooLong,
    #[error("chunk table: SHA-256 mismatch")]
    TableSha256,
    #[error("chunk table: does not belong to this prefix (SHA-256 mismatch)")]
    PrefixSha256,
    #[error("chunk table: {0}")]
    InvalidTable(String),
    #[error("chunk table entry {index}: {reason}")]
    InvalidEntry { index: u64, reason: String },
    #[error("image encoder: {0}")]
    Encoder(String),
    #[error("image encoder: chunk {index}: compression failed: {reason}")]
    Compress { index: u64, reason: String },
}

/// Compression of every data chunk in an image (the seeds' no compression,
/// XPRESS and LZX), as zstd at two levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is.
    None,
    /// zstd level [`Compression::FAST_LEVEL`]: quick to make (the default for captures).
    #[default]
    Fast,
    /// zstd level [`Compression::MAX_LEVEL`]: smallest, slow to make, as fast to decode.
    Max,
}

impl Compression {
    /// zstd level for [`Compression::Fast`].
    pub const FAST_LEVEL: i32 = 3;
    /// zstd level for [`Compression::Max`].
    pub const MAX_LEVEL: i32 = 19;

    /// The zstd level, or `None` for no compression.
    pub fn zstd_level(self) -> Option<i32> {
        match self {
            Compression::None => None,
            Compression::Fast => Some(Self::FAST_LEVEL),
            Compression::Max => Some(Self::MAX_LEVEL),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Fast => "fast",
            Compression::Max => "max",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not one of `none`, `fast`, `max`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown compression {0:?} (expected none, fast or max)")]
pub struct UnknownCompression(pub String);

impl FromStr for Compression {
    type Err = UnknownCompression;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "fast" => Ok(Compression::Fast),
            "max" => Ok(Compression::Max),
            other => Err(UnknownCompression(other.to_string())),
        }
    }
}

/// What people and the store know about an image.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    pub description: String,
    /// Volume bytes; the pushed chunks must add up to it exactly.
    pub source_size: u64,
    /// A power of two, 512..=65536.
    pub logical_sector_size: u32,
    /// `"gpt"` or `"mbr"` when the volume is a whole partitioned disk.
    pub partition_table: Option<String>,
    pub os_name: Option<String>,
    pub os_version: Option<String>,
    pub os_arch: Option<String>,
    pub os_language: Option<String>,
    pub created_by: String,
    /// Unix seconds, given by the caller (this crate has no clock).
    pub created_at: u64,
}

/// The postcard header after the preamble.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub metadata: Metadata,
    pub compression: Compression,
    /// Volume bytes per chunk (every chunk but the last is exactly this).
    pub chunk_size: u32,
}

impl Header {
    /// Number of chunks that cover `source_size`.
    pub fn chunk_count(&self) -> u64 {
        self.metadata
            .source_size
            .div_ceil(u64::from(self.chunk_size))
    }

    fn validate(&self) -> Result<(), ImageError> {
        let bad = |s: String| Err(ImageError::InvalidHeader(s));
        let c = self.chunk_size;
        if !c.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) {
            return bad(format!(
                "chunk size {c} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
            ));
        }
        let s = self.metadata.logical_sector_size;
        if !s.is_power_of_two() || !(512..=65536).contains(&s) {
            return bad(format!(
                "logical sector size {s} is not a power of two in 512..=65536"
            ));
        }
        if let Some(t) = &self.metadata.partition_table {
            if t != "gpt" && t != "mbr" {
                return bad(format!("partition table {t:?} is not \"gpt\" or \"mbr\""));
            }
        }
        if self.chunk_count() * ENTRY_LEN as u64 + TABLE_HEAD_LEN as u64 > MAX_TABLE_LEN {
            return bad(format!(
                "source size {} needs a chunk table over {MAX_TABLE_LEN} bytes",
                self.metadata.source_size
            ));
        }
        Ok(())
    }
}

/// How a chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkKind {
    /// All zero bytes: nothing stored (`stored_len` 0); deploy zeroes the range.
    Zero,
    /// Stored as is (compression off, or it did not make the chunk smaller).
    Raw,
    /// One zstd frame, strictly smaller than the volume bytes.
    Zstd,
}

impl ChunkKind {
    fn code(self) -> u8 {
        match self {
            ChunkKind::Zero => 0,
            ChunkKind::Raw => 1,
            ChunkKind::Zstd => 2,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(ChunkKind::Zero),
            1 => Some(ChunkKind::Raw),
            2 => Some(ChunkKind::Zstd),
            _ => None,
        }
    }
}

/// One chunk-table entry: where a chunk goes on the volume, where its bytes
/// are in the file, and its digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkEntry {
    pub index: u64,
    pub volume_offset: u64,
    pub volume_len: u32,
    pub kind: ChunkKind,
    /// Offset in the image file.
    pub stored_offset: u64,
    pub stored_len: u32,
    pub sha1_stored: [u8; 20],
    pub sha1_volume: [u8; 20],
    pub sha256_volume: [u8; 32],
}

impl ChunkEntry {
    /// An all-zero chunk: nothing to fetch or decode, zero the volume range.
    pub fn is_zero(&self) -> bool {
        self.kind == ChunkKind::Zero
    }
    /// Byte range on the volume.
    pub fn volume_range(&self) -> Range<u64> {
        self.volume_offset..self.volume_offset + u64::from(self.volume_len)
    }
    /// Byte range in the image file.
    pub fn stored_range(&self) -> Range<u64> {
        self.stored_offset..self.stored_offset + u64::from(self.stored_len)
    }

    fn emit(&self, out: &mut Vec<u8>) {
        use field::entry as f;
        let mut b = [0u8; ENTRY_LEN];
        b[f::INDEX].copy_from_slice(&self.index.to_le_bytes());
        b[f::VOLUME_OFFSET].copy_from_slice(&self.volume_offset.to_le_bytes());
        b[f::VOLUME_LEN].copy_from_slice(&self.volume_len.to_le_bytes());
        b[f::KIND] = self.kind.code();
        b[f::STORED_OFFSET].copy_from_slice(&self.stored_offset.to_le_bytes());
        b[f::STORED_LEN].copy_from_slice(&self.stored_len.to_le_bytes());
        b[f::SHA1_STORED].copy_from_slice(&self.sha1_stored);
        b[f::SHA1_VOLUME].copy_from_slice(&self.sha1_volume);
        b[f::SHA256_VOLUME].copy_from_slice(&self.sha256_volume);
        out.extend_from_slice(&b);
    }

    /// Decodes the fields of one `ENTRY_LEN` slice (no cross-checks yet).
    fn parse(b: &[u8; ENTRY_LEN], i: u64) -> Result<Self, ImageError> {
        use field::entry as f;
        let bad = |reason: &str| ImageError::InvalidEntry {
            index: i,
            reason: reason.to_string(),
        };
        if b[f::RESERVED1]
            .iter()
            .chain(&b[f::RESERVED2])
            .any(|&x| x != 0)
        {
            return Err(bad("reserved bytes are not zero"));
        }
        let kind = ChunkKind::from_code(b[f::KIND]).ok_or_else(|| bad("unknown kind"))?;
        Ok(ChunkEntry {
            index: le64(b, f::INDEX),
            volume_offset: le64(b, f::VOLUME_OFFSET),
            volume_len: le32(b, f::VOLUME_LEN),
            kind,
            stored_offset: le64(b, f::STORED_OFFSET),
            stored_len: le32(b, f::STORED_LEN),
            sha1_stored: arr(b, f::SHA1_STORED),
            sha1_volume: arr(b, f::SHA1_VOLUME),
            sha256_volume: arr(b, f::SHA256_VOLUME),
        })
    }
}

/// The fixed footer: where the chunk table is and its SHA-256 (the image ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub table_offset: u64,
    pub table_len: u64,
    pub table_sha256: [u8; 32],
}

impl Footer {
    /// Parses exactly the last [`FOOTER_LEN`] bytes of a file.
    pub fn parse(bytes: &[u8]) -> Result<Footer, ImageError> {
        use field::footer as f;
        if bytes.len() != FOOTER_LEN {
            return Err(ImageError::Truncated {
                part: "footer",
                need: FOOTER_LEN as u64,
                got: bytes.len() as u64,
            });
        }
        if bytes[f::MAGIC] != MAGIC {
            return Err(ImageError::BadMagic("footer"));
        }
        Ok(Footer {
            table_offset: le64(bytes, f::TABLE_OFFSET),
            table_len: le64(bytes, f::TABLE_LEN),
            table_sha256: arr(bytes, f::TABLE_SHA256),
        })
    }

    pub fn emit(&self) -> [u8; FOOTER_LEN] {
        use field::footer as f;
        let mut b = [0u8; FOOTER_LEN];
        b[f::TABLE_OFFSET].copy_from_slice(&self.table_offset.to_le_bytes());
        b[f::TABLE_LEN].copy_from_slice(&self.table_len.to_le_bytes());
        b[f::TABLE_SHA256].copy_from_slice(&self.table_sha256);
        b[f::MAGIC].copy_from_slice(&MAGIC);
        b
    }

    /// The table's byte range in a file of `file_len` bytes, checked: it must
    /// end exactly where the footer begins and be a plausible size. Read
    /// only this range before [`parse_table`].
    pub fn table_range(&self, file_len: u64) -> Result<Range<u64>, ImageError> {
        let placement = ImageError::TablePlacement {
            offset: self.table_offset,
            len: self.table_len,
            file_len,
        };
        let end = self
            .table_offset
            .checked_add(self.table_len)
            .and_then(|e| e.checked_add(FOOTER_LEN as u64))
            .ok_or(placement.clone())?;
        if end != file_len || self.table_offset < PREAMBLE_LEN as u64 {
            return Err(placement);
        }
        if self.table_len > MAX_TABLE_LEN {
            return Err(ImageError::TableTooLong);
        }
        if self.table_len < TABLE_HEAD_LEN as u64
            || !(self.table_len - TABLE_HEAD_LEN as u64).is_multiple_of(ENTRY_LEN as u64)
        {
            return Err(ImageError::TableSize(self.table_len));
        }
        Ok(self.table_offset..self.table_offset + self.table_len)
    }
}

/// The parsed prefix: the header, where the data begins, and the prefix's
/// SHA-256 (which the chunk table records, binding header to table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    pub header: Header,
    /// Offset of the first stored chunk byte (= prefix length).
    pub data_offset: u64,
    pub sha256: [u8; 32],
}

/// Length of the whole prefix (preamble + header), from the first
/// [`PREAMBLE_LEN`] bytes (more are ignored).
pub fn prefix_len(preamble: &[u8]) -> Result<usize, ImageError> {
    use field::preamble as f;
    if preamble.len() < PREAMBLE_LEN {
        return Err(ImageError::Truncated {
            part: "preamble",
            need: PREAMBLE_LEN as u64,
            got: preamble.len() as u64,
        });
    }
    if preamble[f::MAGIC] != MAGIC {
        return Err(ImageError::BadMagic("preamble"));
    }
    let version = u16::from_le_bytes(arr(preamble, f::VERSION));
    if version != VERSION {
        return Err(ImageError::UnsupportedVersion(version));
    }
    if preamble[f::RESERVED] != [0, 0] {
        return Err(ImageError::Reserved);
    }
    let header_len = le32(preamble, f::HEADER_LEN) as usize;
    if header_len > MAX_HEADER_LEN {
        return Err(ImageError::HeaderTooLong(header_len as u64));
    }
    Ok(PREAMBLE_LEN + header_len)
}

/// Parses the prefix from the start of a file (`bytes` may run on past it).
pub fn parse_prefix(bytes: &[u8]) -> Result<Prefix, ImageError> {
    let len = prefix_len(bytes)?;
    let prefix = bytes.get(..len).ok_or(ImageError::Truncated {
        part: "header",
        need: len as u64,
        got: bytes.len() as u64,
    })?;
    let (header, rest) = postcard::take_from_bytes::<Header>(&prefix[PREAMBLE_LEN..])
        .map_err(|_| ImageError::HeaderDecode)?;
    if !rest.is_empty() {
        return Err(ImageError::HeaderTrailing(rest.len()));
    }
    header.validate()?;
    Ok(Prefix {
        header,
        data_offset: len as u64,
        sha256: Sha256::digest(prefix).into(),
    })
}

/// Validates the chunk table against its footer and prefix and returns the
/// entries. `file_len` is the whole file's length. Checks the table SHA-256,
/// the prefix SHA-256, the count, that volume ranges are in order and cover
/// exactly `source_size`, that stored ranges are packed in order inside the
/// data region, and that each kind's lengths and digests are consistent.
pub fn parse_table(
    table: &[u8],
    footer: &Footer,
    prefix: &Prefix,
    file_len: u64,
) -> Result<Vec<ChunkEntry>, ImageError> {
    let range = footer.table_range(file_len)?;
    if table.len() as u64 != footer.table_len {
        return Err(ImageError::Truncated {
            part: "chunk table",
            need: footer.table_len,
            got: table.len() as u64,
        });
    }
    let id: [u8; 32] = Sha256::digest(table).into();
    if id != footer.table_sha256 {
        return Err(ImageError::TableSha256);
    }
    let t = field::table::MAGIC;
    if table[t] != TABLE_MAGIC {
        return Err(ImageError::BadMagic("chunk table"));
    }
    if arr::<32>(table, field::table::PREFIX_SHA256) != prefix.sha256 {
        return Err(ImageError::PrefixSha256);
    }
    let header = &prefix.header;
    let source_size = le64(table, field::table::SOURCE_SIZE);
    if source_size != header.metadata.source_size {
        return Err(ImageError::InvalidTable(format!(
            "source size {source_size} differs from the header's {}",
            header.metadata.source_size
        )));
    }
    let count = le64(table, field::table::CHUNK_COUNT);
    let present = (table.len() - TABLE_HEAD_LEN) as u64 / ENTRY_LEN as u64;
    if count != present || count != header.chunk_count() {
        return Err(ImageError::InvalidTable(format!(
            "{present} entries, count field {count}, {} chunks expected",
            header.chunk_count()
        )));
    }
    if range.start < prefix.data_offset {
        return Err(ImageError::InvalidTable(
            "table overlaps the prefix".to_string(),
        ));
    }
    let chunk_size = u64::from(header.chunk_size);
    let empty_sha1: [u8; 20] = Sha1::digest([]).into();
    let mut zero_digests = ZeroDigests::default();
    let mut stored_pos = prefix.data_offset;
    let mut entries = Vec::with_capacity(present as usize);
    for (i, raw) in table[TABLE_HEAD_LEN..].chunks_exact(ENTRY_LEN).enumerate() {
        let i = i as u64;
        let mut b = [0u8; ENTRY_LEN];
        b.copy_from_slice(raw);
        let e = ChunkEntry::parse(&b, i)?;
        let bad = |reason: String| ImageError::InvalidEntry { index: i, reason };
        if e.index != i {
            return Err(bad(format!("index field says {}", e.index)));
        }
        let want_offset = i * chunk_size;
        let want_len = (source_size - want_offset).min(chunk_size);
        if e.volume_offset != want_offset {
            return Err(bad(format!(
                "volume offset {} should be {want_offset}",
                e.volume_offset
            )));
        }
        if u64::from(e.volume_len) != want_len {
            return Err(bad(format!(
                "volume length {} should be {want_len}",
                e.volume_len
            )));
        }
        if e.stored_offset != stored_pos {
            return Err(bad(format!(
                "stored offset {} should be {stored_pos} (chunks are packed in order)",
                e.stored_offset
            )));
        }
        match e.kind {
            ChunkKind::Zero => {
                if e.stored_len != 0 || e.sha1_stored != empty_sha1 {
                    return Err(bad("zero chunk with stored bytes".to_string()));
                }
                let (s1, s256) = zero_digests.get(e.volume_len);
                if e.sha1_volume != s1 || e.sha256_volume != s256 {
                    return Err(bad("zero chunk digests are not those of zeros".to_string()));
                }
            }
            ChunkKind::Raw => {
                if e.stored_len != e.volume_len || e.sha1_stored != e.sha1_volume {
                    return Err(bad(
                        "raw chunk whose stored bytes differ from its volume bytes".to_string(),
                    ));
                }
            }
            ChunkKind::Zstd => {
                if header.compression == Compression::None {
                    return Err(bad("compressed chunk in an uncompressed image".to_string()));
                }
                if e.stored_len == 0 || e.stored_len >= e.volume_len {
                    return Err(bad(format!(
                        "compressed to {} bytes, not smaller than its {}",
                        e.stored_len, e.volume_len
                    )));
                }
            }
        }
        stored_pos += u64::from(e.stored_len);
        if stored_pos > range.start {
            return Err(bad("stored bytes run past the data region".to_string()));
        }
        entries.push(e);
    }
    if stored_pos != range.start {
        return Err(ImageError::InvalidTable(format!(
            "data region ends at {stored_pos} but the table starts at {}",
            range.start
        )));
    }
    Ok(entries)
}

/// Digests of all-zero chunks, computed once per length (at most two
/// lengths occur: the chunk size and the last chunk's).
#[derive(Debug, Default)]
struct ZeroDigests(Vec<(u32, [u8; 20], [u8; 32])>);

impl ZeroDigests {
    fn get(&mut self, len: u32) -> ([u8; 20], [u8; 32]) {
        if let Some(&(_, a, b)) = self.0.iter().find(|z| z.0 == len) {
            return (a, b);
        }
        let zeros = [0u8; 64 * 1024];
        let (mut s1, mut s256) = (Sha1::new(), Sha256::new());
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(zeros.len());
            s1.update(&zeros[..n]);
            s256.update(&zeros[..n]);
            left -= n;
        }
        let d = (s1.finalize().into(), s256.finalize().into());
        self.0.push((len, d.0, d.1));
        d
    }
}

/// A validated image: header, data offset, chunk table and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub header: Header,
    /// Offset of the stored data (= prefix length).
    pub data_offset: u64,
    pub chunks: Vec<ChunkEntry>,
    /// SHA-256 of the encoded chunk table: the image's identity.
    pub id: [u8; 32],
}

impl Image {
    /// Parses and validates from the prefix bytes (at least the prefix), the
    /// table bytes ([`Footer::table_range`]), the last [`FOOTER_LEN`] bytes
    /// and the file's length.
    pub fn parse(
        prefix: &[u8],
        table: &[u8],
        footer: &[u8],
        file_len: u64,
    ) -> Result<Image, ImageError> {
        let prefix = parse_prefix(prefix)?;
        let footer = Footer::parse(footer)?;
        let chunks = parse_table(table, &footer, &prefix, file_len)?;
        Ok(Image {
            header: prefix.header,
            data_offset: prefix.data_offset,
            chunks,
            id: footer.table_sha256,
        })
    }

    /// Parses a whole image file held in memory (tests, small images).
    pub fn from_bytes(file: &[u8]) -> Result<Image, ImageError> {
        let len = file.len() as u64;
        let footer_at = file
            .len()
            .checked_sub(FOOTER_LEN)
            .ok_or(ImageError::Truncated {
                part: "footer",
                need: FOOTER_LEN as u64,
                got: len,
            })?;
        let footer = Footer::parse(&file[footer_at..])?;
        let r = footer.table_range(len)?;
        let table = &file[r.start as usize..r.end as usize];
        Image::parse(file, table, &file[footer_at..], len)
    }

    /// The image ID as 64 lowercase hex digits.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The stored bytes of `entry` within a whole file held in memory.
    pub fn stored<'a>(&self, file: &'a [u8], entry: &ChunkEntry) -> Option<&'a [u8]> {
        let r = entry.stored_range();
        file.get(usize::try_from(r.start).ok()?..usize::try_from(r.end).ok()?)
    }
}

/// Builds an image while the caller streams it out: write [`Encoder::prefix`]
/// at offset 0, append what each [`Encoder::push`] returns, then append what
/// [`Encoder::finish`] returns. Holds only the table in memory.
pub struct Encoder {
    header: Header,
    prefix: Vec<u8>,
    prefix_sha256: [u8; 32],
    compressor: Option<zstd::bulk::Compressor<'static>>,
    chunks: Vec<ChunkEntry>,
    volume_pos: u64,
    stored_pos: u64,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder")
            .field("header", &self.header)
            .field("chunks", &self.chunks.len())
            .field("volume_pos", &self.volume_pos)
            .field("stored_pos", &self.stored_pos)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// Starts an image of `metadata.source_size` volume bytes.
    pub fn new(
        metadata: Metadata,
        compression: Compression,
        chunk_size: u32,
    ) -> Result<Encoder, ImageError> {
        let header = Header {
            metadata,
            compression,
            chunk_size,
        };
        header.validate()?;
        let body = postcard::to_allocvec(&header)
            .map_err(|e| ImageError::Encoder(format!("header does not encode: {e}")))?;
        if body.len() > MAX_HEADER_LEN {
            return Err(ImageError::HeaderTooLong(body.len() as u64));
        }
        let mut prefix = Vec::with_capacity(PREAMBLE_LEN + body.len());
        prefix.extend_from_slice(&MAGIC);
        prefix.extend_from_slice(&VERSION.to_le_bytes());
        prefix.extend_from_slice(&[0, 0]);
        prefix.extend_from_slice(&(body.len() as u32).to_le_bytes());
        prefix.extend_from_slice(&body);
        let compressor = match compression.zstd_level() {
            None => None,
            Some(level) => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| ImageError::Encoder(format!("zstd: {e}")))?,
            ),
        };
        Ok(Encoder {
            prefix_sha256: Sha256::digest(&prefix).into(),
            stored_pos: prefix.len() as u64,
            header,
            prefix,
            compressor,
            chunks: Vec::new(),
            volume_pos: 0,
        })
    }

    /// Preamble + header: the first bytes of the file. Its length is fixed.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Adds the next chunk of volume bytes (exactly `chunk_size` bytes, or
    /// fewer for the last). Returns the bytes to append to the file, or
    /// `None` for an all-zero chunk (nothing is stored).
    pub fn push(&mut self, volume: &[u8]) -> Result<Option<Vec<u8>>, ImageError> {
        let index = self.chunks.len() as u64;
        let chunk_size = self.header.chunk_size as usize;
        let source_size = self.header.metadata.source_size;
        if volume.is_empty() || volume.len() > chunk_size {
            return Err(ImageError::Encoder(format!(
                "chunk {index} is {} bytes, not 1..={chunk_size}",
                volume.len()
            )));
        }
        if !self.volume_pos.is_multiple_of(chunk_size as u64) {
            return Err(ImageError::Encoder(format!(
                "chunk {index} follows a short chunk (only the last may be short)"
            )));
        }
        let end = self.volume_pos + volume.len() as u64;
        if end > source_size {
            return Err(ImageError::Encoder(format!(
                "chunk {index} ends at {end}, past the source size {source_size}"
            )));
        }
        if volume.len() < chunk_size && end != source_size {
            return Err(ImageError::Encoder(format!(
                "chunk {index} is short ({} bytes) but not the last",
                volume.len()
            )));
        }
        let sha1_volume: [u8; 20] = Sha1::digest(volume).into();
        let sha256_volume: [u8; 32] = Sha256::digest(volume).into();
        let (kind, stored) = if is_all_zero(volume) {
            (ChunkKind::Zero, None)
        } else {
            match self.compressor.as_mut() {
                None => (ChunkKind::Raw, None),
                Some(c) => {
                    // Room for one byte less than the input: if it doesn't
                    // fit, compression does not pay and the chunk goes raw.
                    let mut out = Vec::with_capacity(volume.len() - 1);
                    match c.compress_to_buffer(volume, &mut out) {
                        Ok(n) if n > 0 && n < volume.len() => (ChunkKind::Zstd, Some(out)),
                        _ => (ChunkKind::Raw, None),
                    }
                }
            }
        };
        let stored = match kind {
            ChunkKind::Zero => Vec::new(),
            ChunkKind::Raw => volume.to_vec(),
            ChunkKind::Zstd => stored.unwrap_or_default(),
        };
        let entry = ChunkEntry {
            index,
            volume_offset: self.volume_pos,
            volume_len: volume.len() as u32,
            kind,
            stored_offset: self.stored_pos,
            stored_len: stored.len() as u32,
            sha1_stored: if kind == ChunkKind::Raw {
                sha1_volume
            } else {
                Sha1::digest(&stored).into()
            },
            sha1_volume,
            sha256_volume,
        };
        self.volume_pos = end;
        self.stored_pos += stored.len() as u64;
        self.chunks.push(entry);
        Ok(if kind == ChunkKind::Zero {
            None
        } else {
            Some(stored)
        })
    }

    /// Ends the image: returns the table + footer to append, and the image.
    /// Fails if the pushed chunks do not add up to `source_size`.
    pub fn finish(self) -> Result<(Vec<u8>, Image), ImageError> {
        let source_size = self.header.metadata.source_size;
        if self.volume_pos != source_size {
            return Err(ImageError::Encoder(format!(
                "{} volume bytes pushed, the source size is {source_size}",
                self.volume_pos
            )));
        }
        let mut out =
            Vec::with_capacity(TABLE_HEAD_LEN + self.chunks.len() * ENTRY_LEN + FOOTER_LEN);
        out.extend_from_slice(&TABLE_MAGIC);
        out.extend_from_slice(&source_size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.prefix_sha256);
        for e in &self.chunks {
            e.emit(&mut out);
        }
        let id: [u8; 32] = Sha256::digest(&out).into();
        let footer = Footer {
            table_offset: self.stored_pos,
            table_len: out.len() as u64,
            table_sha256: id,
        };
        out.extend_from_slice(&footer.emit());
        let image = Image {
            header: self.header,
            data_offset: self.prefix.len() as u64,
            chunks: self.chunks,
            id,
        };
        Ok((out, image))
    }
}

fn is_all_zero(b: &[u8]) -> bool {
    let (words, tail) = b.split_at(b.len() - b.len() % 8);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && tail.iter().all(|&x| x == 0)
}

fn arr<const N: usize>(b: &[u8], f: Field) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[f]);
    a
}

fn le64(b: &[u8], f: Field) -> u64 {
    u64::from_le_bytes(arr(b, f))
}

fn le32(b: &[u8], f: Field) -> u32 {
    u32::from_le_bytes(arr(b, f))
}

#[cfg(test)]
mod tests;
