//! Tests for the image format: round trips at each compression, any chunk
//! order, corruption, truncation, lying lengths (with the table hash
//! recomputed so validation, not the hash, must catch them), zero and
//! incompressible data, chunks that expand beyond their length, and
//! property tests feeding random bytes to every parser.

use proptest::prelude::*;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::*;

const CHUNK: u32 = MIN_CHUNK_SIZE;

fn meta(size: u64) -> Metadata {
    Metadata {
        name: "debian-12".into(),
        description: "test volume".into(),
        source_size: size,
        logical_sector_size: 512,
        partition_table: Some("gpt".into()),
        os_name: Some("Debian".into()),
        os_version: Some("12".into()),
        os_arch: Some("x86_64".into()),
        os_language: None,
        created_by: "tests".into(),
        created_at: 1_700_000_000,
    }
}

fn build(data: &[u8], compression: Compression, chunk_size: u32) -> (Vec<u8>, Image) {
    let mut enc = Encoder::new(meta(data.len() as u64), compression, chunk_size).unwrap();
    let mut file = enc.prefix().to_vec();
    for c in data.chunks(chunk_size as usize) {
        if let Some(stored) = enc.push(c).unwrap() {
            file.extend_from_slice(&stored);
        }
    }
    let (tail, image) = enc.finish().unwrap();
    file.extend_from_slice(&tail);
    (file, image)
}

/// Decodes every chunk in `order` and assembles the volume.
fn decode_in(file: &[u8], order: &[usize]) -> Result<Vec<u8>, String> {
    let image = Image::from_bytes(file).map_err(|e| e.to_string())?;
    let mut vol = vec![0xAAu8; image.header.metadata.source_size as usize];
    for &i in order {
        let e = &image.chunks[i];
        let stored = image.stored(file, e).ok_or("stored range outside file")?;
        let bytes = decode_chunk(&image.header, e, stored).map_err(|e| e.to_string())?;
        let r = e.volume_range();
        vol[r.start as usize..r.end as usize].copy_from_slice(&bytes);
    }
    Ok(vol)
}

fn decode_all(file: &[u8]) -> Result<Vec<u8>, String> {
    let n = Image::from_bytes(file)
        .map_err(|e| e.to_string())?
        .chunks
        .len();
    decode_in(file, &(0..n).collect::<Vec<_>>())
}

/// Deterministic volume: segments of noise, zeros and text.
fn volume(seed: u64, segments: &[(u8, usize)]) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::new();
    for &(kind, len) in segments {
        for i in 0..len {
            out.push(match kind % 3 {
                0 => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
                1 => 0,
                _ => b"shoal image "[i % 12],
            });
        }
    }
    out
}

/// Rewrites the table with `edit` applied and every hash above it
/// (table SHA-256, footer) recomputed.
fn retable(file: &[u8], edit: impl FnOnce(&mut Vec<ChunkEntry>)) -> Vec<u8> {
    let image = Image::from_bytes(file).unwrap();
    let footer = Footer::parse(&file[file.len() - FOOTER_LEN..]).unwrap();
    let at = footer.table_offset as usize;
    let mut entries = image.chunks.clone();
    edit(&mut entries);
    let mut table = file[at..at + TABLE_HEAD_LEN].to_vec();
    for e in &entries {
        e.emit(&mut table);
    }
    let footer = Footer {
        table_offset: footer.table_offset,
        table_len: table.len() as u64,
        table_sha256: Sha256::digest(&table).into(),
    };
    let mut out = file[..at].to_vec();
    out.extend_from_slice(&table);
    out.extend_from_slice(&footer.emit());
    out
}

fn sample() -> Vec<u8> {
    volume(7, &[(2, 70_000), (1, 140_000), (0, 60_000), (2, 9_000)])
}

/// `sample()` built once at `fast` (the property tests reuse it).
fn sample_fast() -> &'static (Vec<u8>, Image) {
    static IMAGE: std::sync::OnceLock<(Vec<u8>, Image)> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| build(&sample(), Compression::Fast, CHUNK))
}

#[test]
fn round_trip_each_compression() {
    let data = sample();
    for c in [Compression::None, Compression::Fast, Compression::Max] {
        let (file, image) = build(&data, c, CHUNK);
        assert_eq!(Image::from_bytes(&file).unwrap(), image, "{c}");
        assert_eq!(decode_all(&file).unwrap(), data, "{c}");
        assert_eq!(image.id_hex().len(), 64);
        let kinds: Vec<_> = image.chunks.iter().map(|e| e.kind).collect();
        assert!(kinds.contains(&ChunkKind::Zero), "{c}: {kinds:?}");
        if c == Compression::None {
            assert!(!kinds.contains(&ChunkKind::Zstd));
        } else {
            assert!(kinds.contains(&ChunkKind::Zstd));
            assert!(file.len() < data.len());
        }
    }
}

#[test]
fn same_input_same_image_id() {
    let data = sample();
    let (a, ia) = build(&data, Compression::Fast, CHUNK);
    let (b, ib) = build(&data, Compression::Fast, CHUNK);
    assert_eq!((a, ia.id), (b, ib.id));
    let (_, ic) = build(&data, Compression::Max, CHUNK);
    assert_ne!(
        ia.id, ic.id,
        "the header (compression) is bound into the ID"
    );
}

#[test]
fn all_zero_volume_stores_nothing() {
    let data = vec![0u8; 1 << 20];
    let (file, image) = build(&data, Compression::Max, CHUNK);
    assert!(image.chunks.iter().all(ChunkEntry::is_zero));
    let table = TABLE_HEAD_LEN + image.chunks.len() * ENTRY_LEN;
    assert_eq!(
        file.len() as u64,
        image.data_offset + (table + FOOTER_LEN) as u64
    );
    assert!(file.len() < 2_500, "{} bytes", file.len());
    assert_eq!(decode_all(&file).unwrap(), data);
}

#[test]
fn incompressible_volume_is_stored_raw() {
    let data = volume(99, &[(0, 300_000)]);
    let (file, image) = build(&data, Compression::Max, CHUNK);
    assert!(image.chunks.iter().all(|e| e.kind == ChunkKind::Raw));
    let stored: u64 = image.chunks.iter().map(|e| u64::from(e.stored_len)).sum();
    assert_eq!(stored, data.len() as u64);
    assert!(file.len() < data.len() + 1_000);
    assert_eq!(decode_all(&file).unwrap(), data);
}

#[test]
fn empty_volume() {
    let (file, image) = build(&[], Compression::Fast, CHUNK);
    assert!(image.chunks.is_empty());
    assert_eq!(decode_all(&file).unwrap(), Vec::<u8>::new());
}

#[test]
fn flipped_stored_bit_is_caught() {
    let data = sample();
    for c in [Compression::None, Compression::Fast] {
        let (mut file, image) = build(&data, c, CHUNK);
        let e = image.chunks.iter().find(|e| !e.is_zero()).unwrap();
        file[(e.stored_offset + u64::from(e.stored_len) / 2) as usize] ^= 0x10;
        let err = decode_chunk(&image.header, e, image.stored(&file, e).unwrap()).unwrap_err();
        assert_eq!(err, ChunkError::StoredSha1 { index: e.index });
        assert_eq!(
            err.to_string(),
            format!("chunk {}: stored SHA-1 mismatch", e.index)
        );
    }
}

#[test]
fn authenticated_checks_keep_sha1_and_raw_chunks_need_no_copy() {
    let data = sample();
    for c in [Compression::None, Compression::Fast] {
        let (mut file, image) = build(&data, c, CHUNK);
        for e in image.chunks.iter().filter(|e| !e.is_zero()) {
            let stored = image.stored(&file, e).unwrap();
            let mut out = vec![0u8; e.volume_len as usize];
            match e.kind {
                ChunkKind::Raw => {
                    assert_eq!(check_raw_authenticated(e, stored), Ok(true));
                }
                _ => {
                    assert_eq!(check_raw_authenticated(e, stored), Ok(false));
                    decode_chunk_into_authenticated(&image.header, e, stored, &mut out).unwrap();
                    assert_eq!(out, decode_chunk(&image.header, e, stored).unwrap());
                }
            }
        }
        // A flipped bit still fails the SHA-1, on both paths.
        let e = image.chunks.iter().find(|e| !e.is_zero()).unwrap().clone();
        file[(e.stored_offset + u64::from(e.stored_len) / 2) as usize] ^= 0x10;
        let stored = image.stored(&file, &e).unwrap();
        let mut out = vec![0u8; e.volume_len as usize];
        let err = match e.kind {
            ChunkKind::Raw => check_raw_authenticated(&e, stored).unwrap_err(),
            _ => decode_chunk_into_authenticated(&image.header, &e, stored, &mut out).unwrap_err(),
        };
        assert_eq!(err, ChunkError::StoredSha1 { index: e.index });
    }
}

#[test]
fn sha256_catches_what_sha1_would_not() {
    // Swap a raw chunk's bytes and fix both SHA-1s in the table (as a SHA-1
    // collision would): the SHA-256 of the volume bytes still fails.
    let data = volume(3, &[(0, 100_000)]);
    let (file, _) = build(&data, Compression::None, CHUNK);
    let mut file = retable(&file, |es| {
        let forged: [u8; 20] = Sha1::digest(vec![0x55u8; es[0].volume_len as usize]).into();
        es[0].sha1_stored = forged;
        es[0].sha1_volume = forged;
    });
    let image = Image::from_bytes(&file).unwrap();
    let e = &image.chunks[0];
    let r = e.stored_range();
    file[r.start as usize..r.end as usize].fill(0x55);
    let err = decode_chunk(&image.header, e, image.stored(&file, e).unwrap()).unwrap_err();
    assert_eq!(err, ChunkError::VolumeSha256 { index: 0 });
}

#[test]
fn truncated_files_are_errors() {
    let (file, _) = build(&sample(), Compression::Fast, CHUNK);
    for n in 0..file.len() {
        assert!(Image::from_bytes(&file[..n]).is_err(), "cut at {n}");
    }
    let prefix_len = prefix_len(&file).unwrap();
    for n in 0..prefix_len {
        assert!(parse_prefix(&file[..n]).is_err(), "prefix cut at {n}");
    }
    let footer = &file[file.len() - FOOTER_LEN..];
    for n in 0..FOOTER_LEN {
        assert!(Footer::parse(&footer[..n]).is_err());
    }
    // A table read short of what the footer says.
    let f = Footer::parse(footer).unwrap();
    let r = f.table_range(file.len() as u64).unwrap();
    let table = &file[r.start as usize..r.end as usize - 1];
    let prefix = parse_prefix(&file).unwrap();
    assert!(parse_table(table, &f, &prefix, file.len() as u64).is_err());
    // A stored chunk cut short.
    let image = Image::from_bytes(&file).unwrap();
    let e = image
        .chunks
        .iter()
        .find(|e| e.kind == ChunkKind::Zstd)
        .unwrap();
    let s = image.stored(&file, e).unwrap();
    assert!(matches!(
        decode_chunk(&image.header, e, &s[..s.len() - 1]),
        Err(ChunkError::StoredLength { .. })
    ));
}

#[test]
fn lying_tables_are_rejected() {
    let (file, image) = build(&sample(), Compression::Fast, CHUNK);
    let data_i = image.chunks.iter().position(|e| !e.is_zero()).unwrap();
    let zero_i = image.chunks.iter().position(|e| e.is_zero()).unwrap();
    let last = image.chunks.len() - 1;
    type Edit = Box<dyn Fn(&mut Vec<ChunkEntry>)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "stored_len + 1",
            Box::new(move |es| es[data_i].stored_len += 1),
        ),
        (
            "stored_len - 1",
            Box::new(move |es| es[data_i].stored_len -= 1),
        ),
        (
            "volume_len - 1",
            Box::new(move |es| es[data_i].volume_len -= 1),
        ),
        (
            "last volume_len + 1",
            Box::new(move |es| es[last].volume_len += 1),
        ),
        (
            "volume_offset + 1",
            Box::new(move |es| es[data_i].volume_offset += 1),
        ),
        (
            "stored_offset + 1",
            Box::new(move |es| es[data_i].stored_offset += 1),
        ),
        (
            "stored_offset huge",
            Box::new(move |es| es[data_i].stored_offset = u64::MAX - 3),
        ),
        ("index", Box::new(move |es| es[data_i].index += 1)),
        ("swap", Box::new(move |es| es.swap(0, 1))),
        (
            "drop last",
            Box::new(|es| {
                es.pop();
            }),
        ),
        (
            "duplicate",
            Box::new(|es| {
                let e = es[0].clone();
                es.push(e);
            }),
        ),
        (
            "data marked zero",
            Box::new(move |es| es[data_i].kind = ChunkKind::Zero),
        ),
        (
            "zero marked raw",
            Box::new(move |es| es[zero_i].kind = ChunkKind::Raw),
        ),
        (
            "zero with bytes",
            Box::new(move |es| es[zero_i].stored_len = 5),
        ),
        (
            "zero digest",
            Box::new(move |es| es[zero_i].sha256_volume[0] ^= 1),
        ),
        (
            "zstd as raw",
            Box::new(move |es| es[data_i].kind = ChunkKind::Raw),
        ),
        (
            "zstd bigger than volume",
            Box::new(move |es| {
                es[data_i].stored_len = es[data_i].volume_len;
            }),
        ),
    ];
    for (what, edit) in edits {
        let bad = retable(&file, edit);
        assert!(Image::from_bytes(&bad).is_err(), "{what} was accepted");
    }
    // Unedited, the rewrite is accepted (the harness is sound).
    assert!(Image::from_bytes(&retable(&file, |_| ())).is_ok());
}

#[test]
fn header_and_footer_edits_are_rejected() {
    let (file, _) = build(&sample(), Compression::Fast, CHUNK);
    // The table binds the prefix: a renamed image no longer matches.
    let mut renamed = file.clone();
    let at = renamed.windows(9).position(|w| w == b"debian-12").unwrap();
    renamed[at] = b'D';
    assert_eq!(Image::from_bytes(&renamed), Err(ImageError::PrefixSha256));
    let mut bad = file.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(Image::from_bytes(&bad), Err(ImageError::BadMagic("footer")));
    let mut bad = file.clone();
    bad[8] = 2;
    assert_eq!(
        Image::from_bytes(&bad),
        Err(ImageError::UnsupportedVersion(2))
    );
    let mut bad = file.clone();
    let n = bad.len();
    bad[n - FOOTER_LEN + 20] ^= 1;
    assert_eq!(Image::from_bytes(&bad), Err(ImageError::TableSha256));
}

#[test]
fn chunk_expanding_beyond_its_length_is_corrupt() {
    let (_, image) = build(&sample(), Compression::Fast, CHUNK);
    let big = vec![b'a'; CHUNK as usize + 4096];
    let with_size = zstd::bulk::compress(&big, 3).unwrap();
    let without_size = zstd::stream::encode_all(&big[..], 3).unwrap();
    assert!(matches!(
        zstd::zstd_safe::get_frame_content_size(&without_size),
        Ok(None)
    ));
    for frame in [with_size, without_size] {
        let e = ChunkEntry {
            index: 3,
            volume_offset: 3 * u64::from(CHUNK),
            volume_len: CHUNK,
            kind: ChunkKind::Zstd,
            stored_offset: 0,
            stored_len: frame.len() as u32,
            sha1_stored: Sha1::digest(&frame).into(),
            sha1_volume: [0; 20],
            sha256_volume: [0; 32],
        };
        let err = decode_chunk(&image.header, &e, &frame).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("chunk 3: expands beyond its {CHUNK} bytes")
        );
    }
}

#[test]
fn encoder_refuses_misuse() {
    let m = meta(100_000);
    for bad in [0, 1000, 3 << 16, MAX_CHUNK_SIZE * 2] {
        assert!(
            Encoder::new(m.clone(), Compression::Fast, bad).is_err(),
            "{bad}"
        );
    }
    let mut sector = m.clone();
    sector.logical_sector_size = 520;
    assert!(Encoder::new(sector, Compression::Fast, CHUNK).is_err());
    let mut pt = m.clone();
    pt.partition_table = Some("apm".into());
    assert!(Encoder::new(pt, Compression::Fast, CHUNK).is_err());

    let mut enc = Encoder::new(m.clone(), Compression::Fast, CHUNK).unwrap();
    assert!(enc.push(&[]).is_err());
    assert!(
        enc.push(&[1; 1000]).is_err(),
        "short chunk that is not the last"
    );
    enc.push(&[1; CHUNK as usize]).unwrap();
    assert!(
        enc.push(&[1; CHUNK as usize]).is_err(),
        "past the source size"
    );
    assert!(enc.finish().is_err(), "short of the source size");

    let mut enc = Encoder::new(m, Compression::Fast, CHUNK).unwrap();
    enc.push(&[1; CHUNK as usize]).unwrap();
    enc.push(&[1; 100_000 - CHUNK as usize]).unwrap();
    assert!(enc.finish().is_ok());
}

#[test]
fn compression_names() {
    for (c, s) in [
        (Compression::None, "none"),
        (Compression::Fast, "fast"),
        (Compression::Max, "max"),
    ] {
        assert_eq!(c.to_string(), s);
        assert_eq!(s.parse::<Compression>().unwrap(), c);
        assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{s}\""));
    }
    assert!("lzx".parse::<Compression>().is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn round_trip_in_any_order(
        seed in any::<u64>(),
        segments in prop::collection::vec((0u8..3, 0usize..90_000), 0..5),
        c in prop::sample::select(vec![Compression::None, Compression::Fast, Compression::Max]),
        shuffle in any::<u64>(),
    ) {
        let data = volume(seed, &segments);
        let (file, image) = build(&data, c, CHUNK);
        prop_assert_eq!(&Image::from_bytes(&file).unwrap(), &image);
        let mut order: Vec<usize> = (0..image.chunks.len()).collect();
        let mut x = shuffle | 1;
        for i in (1..order.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        prop_assert_eq!(decode_in(&file, &order).unwrap(), data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = prefix_len(&bytes);
        let _ = parse_prefix(&bytes);
        let _ = Footer::parse(&bytes);
        let _ = Image::from_bytes(&bytes);
        // With a magic in front so the header decoder runs.
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&1u16.to_le_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        p.extend_from_slice(&bytes);
        let _ = parse_prefix(&p);
    }

    #[test]
    fn random_tables_with_valid_hashes_never_panic(
        entries in prop::collection::vec(any::<u8>(), 0..(4 * ENTRY_LEN)),
        count in 0u64..6,
        source in 0u64..300_000,
    ) {
        let (file, _) = sample_fast();
        let mut prefix = parse_prefix(file).unwrap();
        prefix.header.metadata.source_size = source;
        let mut table = TABLE_MAGIC.to_vec();
        table.extend_from_slice(&source.to_le_bytes());
        table.extend_from_slice(&count.to_le_bytes());
        table.extend_from_slice(&prefix.sha256);
        table.extend_from_slice(&entries);
        let footer = Footer {
            table_offset: prefix.data_offset,
            table_len: table.len() as u64,
            table_sha256: Sha256::digest(&table).into(),
        };
        let file_len = prefix.data_offset + table.len() as u64 + FOOTER_LEN as u64;
        let _ = parse_table(&table, &footer, &prefix, file_len);
    }

    #[test]
    fn random_stored_bytes_never_panic(
        stored in prop::collection::vec(any::<u8>(), 0..2000),
        volume_len in 1u32..=CHUNK,
        kind in 0u8..3,
    ) {
        let (_, image) = sample_fast();
        let e = ChunkEntry {
            index: 0,
            volume_offset: 0,
            volume_len,
            kind: ChunkKind::from_code(kind).unwrap(),
            stored_offset: 0,
            stored_len: stored.len() as u32,
            sha1_stored: Sha1::digest(&stored).into(),
            sha1_volume: [0; 20],
            sha256_volume: [0; 32],
        };
        let _ = decode_chunk(&image.header, &e, &stored);
        // A real zstd frame header in front, so decompression gets further.
        let mut framed = vec![0x28, 0xb5, 0x2f, 0xfd];
        framed.extend_from_slice(&stored);
        let e = ChunkEntry {
            stored_len: framed.len() as u32,
            sha1_stored: Sha1::digest(&framed).into(),
            kind: ChunkKind::Zstd,
            ..e
        };
        let _ = decode_chunk(&image.header, &e, &framed);
    }

    #[test]
    fn mutated_images_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut file = sample_fast().0.clone();
        for (i, x) in flips {
            let i = i.index(file.len());
            file[i] ^= x;
        }
        if let Ok(image) = Image::from_bytes(&file) {
            for e in &image.chunks {
                if let Some(s) = image.stored(&file, e) {
                    let _ = decode_chunk(&image.header, e, s);
                }
            }
        }
    }
}
