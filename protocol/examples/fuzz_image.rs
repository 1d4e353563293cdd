//! A time-bounded random and mutation fuzzer for the image format's
//! parsers (`docs/image-format.md`): the preamble and prefix, the footer,
//! the chunk table, and `decode_chunk` (zstd with a bounded output). Inputs
//! are pure noise; real small images from the `Encoder` with bytes flipped,
//! inserted or cut; the same images with only the chunk table mutated and
//! its SHA-256 recomputed (so entry validation, not the hash, must reject
//! them); and random stored bytes with a matching SHA-1 (so decompression
//! runs on garbage). Any panic aborts the run. An image that parses and
//! decodes fully must decode to its original volume: anything else counts
//! as an accepted corruption and fails the run.
//!
//! `cargo run --release -p shoal-protocol --example fuzz_image -- --seconds 300`
//! (stable Rust: no coverage feedback, but structure-aware seeds).

use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};
use sha2::Sha256;
use shoal_protocol::image::{
    self, decode_chunk, ChunkEntry, ChunkKind, Compression, Encoder, Footer, Image, Metadata,
    FOOTER_LEN, MIN_CHUNK_SIZE,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A real image file and the volume it holds.
struct Seed {
    file: Vec<u8>,
    volume: Vec<u8>,
}

fn seed(rng: &mut Rng, volume: Vec<u8>, compression: Compression) -> Seed {
    let meta = Metadata {
        name: "fuzz".into(),
        source_size: volume.len() as u64,
        logical_sector_size: 512,
        partition_table: Some("mbr".into()),
        os_arch: Some("x86_64".into()),
        created_by: "fuzz_image".into(),
        created_at: rng.next() >> 32,
        ..Metadata::default()
    };
    let mut enc = Encoder::new(meta, compression, MIN_CHUNK_SIZE).unwrap();
    let mut file = enc.prefix().to_vec();
    for c in volume.chunks(MIN_CHUNK_SIZE as usize) {
        if let Some(s) = enc.push(c).unwrap() {
            file.extend_from_slice(&s);
        }
    }
    file.extend_from_slice(&enc.finish().unwrap().0);
    Seed { file, volume }
}

fn seeds(rng: &mut Rng) -> Vec<Seed> {
    let text: Vec<u8> = b"shoal fuzz "
        .iter()
        .cycle()
        .take(150_000)
        .copied()
        .collect();
    let mut mixed = text[..70_000].to_vec();
    mixed.extend(std::iter::repeat_n(0u8, 70_000));
    mixed.extend(rng.bytes(3_000));
    let noise = rng.bytes(2_000);
    vec![
        seed(rng, mixed.clone(), Compression::Fast),
        seed(rng, mixed, Compression::None),
        seed(rng, text, Compression::Max),
        seed(rng, vec![0; 200_000], Compression::Fast),
        seed(rng, noise, Compression::Fast),
        seed(rng, Vec::new(), Compression::None),
    ]
}

fn mutate(rng: &mut Rng, v: &mut Vec<u8>, range: std::ops::Range<usize>) {
    for _ in 0..1 + rng.below(4) {
        let (lo, hi) = (range.start.min(v.len()), range.end.min(v.len()));
        let i = lo + rng.below(hi - lo);
        match rng.below(6) {
            0 if i < v.len() => v[i] ^= 1 << rng.below(8),
            1 if i < v.len() => v[i] = rng.next() as u8,
            2 if i + 8 <= v.len() => {
                // Overwrite an integer field with an interesting value.
                let x = [0, 1, u64::MAX, 1 << 16, 1 << 32, rng.next()][rng.below(6)];
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            3 => {
                let n = 1 + rng.below(8);
                let extra = rng.bytes(n);
                v.splice(i..i, extra);
            }
            4 if i < v.len() => {
                let n = 1 + rng.below(16);
                v.drain(i..(i + n).min(v.len()));
            }
            _ => v.truncate(i),
        }
    }
}

/// Mutates only the chunk table and recomputes the footer's SHA-256.
fn mutate_table(rng: &mut Rng, file: &[u8]) -> Vec<u8> {
    let footer = Footer::parse(&file[file.len() - FOOTER_LEN..]).unwrap();
    let at = footer.table_offset as usize;
    let mut table = file[at..file.len() - FOOTER_LEN].to_vec();
    let len = table.len();
    mutate(rng, &mut table, 0..len);
    let footer = Footer {
        table_len: table.len() as u64,
        table_sha256: Sha256::digest(&table).into(),
        ..footer
    };
    let mut out = file[..at].to_vec();
    out.extend_from_slice(&table);
    out.extend_from_slice(&footer.emit());
    out
}

/// Parses `file` and decodes every chunk. `Some(volume)` if all of it is
/// accepted.
fn run(file: &[u8], decoded: &mut u64) -> Option<Vec<u8>> {
    let _ = image::prefix_len(file);
    let _ = image::parse_prefix(file);
    if let Some(f) = file.len().checked_sub(FOOTER_LEN) {
        let _ = Footer::parse(&file[f..]);
    }
    let image = Image::from_bytes(file).ok()?;
    let mut volume = vec![0u8; image.header.metadata.source_size as usize];
    let mut ok = true;
    for e in &image.chunks {
        let Some(stored) = image.stored(file, e) else {
            ok = false;
            continue;
        };
        match decode_chunk(&image.header, e, stored) {
            Ok(bytes) => {
                *decoded += 1;
                let r = e.volume_range();
                volume[r.start as usize..r.end as usize].copy_from_slice(&bytes);
            }
            Err(_) => ok = false,
        }
    }
    ok.then_some(volume)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut seconds = 10u64;
    let mut seed = 0x5ea1_1a6e_u64;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            "--seed" => seed = args.next().and_then(|s| s.parse().ok()).expect("--seed N"),
            other => panic!("unknown argument {other}"),
        }
    }
    let mut rng = Rng(seed | 1);
    let seeds = seeds(&mut rng);
    let header = Image::from_bytes(&seeds[0].file).unwrap().header;

    let start = Instant::now();
    let limit = Duration::from_secs(seconds);
    let mut last_report = start;
    let (mut execs, mut parsed, mut decoded, mut corrupt) = (0u64, 0u64, 0u64, 0u64);
    // Accepted although the bytes changed (yet decoding to the same volume).
    let mut changed = 0u64;
    while start.elapsed() < limit {
        let s = &seeds[rng.below(seeds.len())];
        let input = match rng.below(4) {
            0 => {
                let n = rng.below(400);
                rng.bytes(n)
            }
            1 => {
                let mut f = s.file.clone();
                let n = f.len();
                mutate(&mut rng, &mut f, 0..n);
                f
            }
            2 => mutate_table(&mut rng, &s.file),
            _ => {
                // Garbage stored bytes with a matching SHA-1, often behind
                // a zstd magic, so the decompressor sees them.
                let n = rng.below(3000);
                let mut stored = rng.bytes(n);
                if rng.below(2) == 0 {
                    stored.splice(0..0, [0x28, 0xb5, 0x2f, 0xfd]);
                }
                let volume_len = 1 + rng.below(MIN_CHUNK_SIZE as usize) as u32;
                let kind = [ChunkKind::Zero, ChunkKind::Raw, ChunkKind::Zstd][rng.below(3)];
                let e = ChunkEntry {
                    index: 0,
                    volume_offset: 0,
                    volume_len,
                    kind,
                    stored_offset: 0,
                    stored_len: stored.len() as u32,
                    sha1_stored: Sha1::digest(&stored).into(),
                    sha1_volume: [0; 20],
                    sha256_volume: [0; 32],
                };
                let _ = decode_chunk(&header, &e, &stored);
                execs += 1;
                continue;
            }
        };
        if let Some(volume) = run(&input, &mut decoded) {
            parsed += 1;
            changed += (input != s.file) as u64;
            // Accepted in full: it must be the original volume (a mutation
            // that only touched, say, trailing garbage was rejected above).
            if volume != s.volume && input != s.file {
                corrupt += 1;
                eprintln!("fuzz: accepted a corrupted image ({} bytes)", input.len());
            }
        }
        execs += 1;
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "fuzz: {execs} executions after {:.0} s",
                start.elapsed().as_secs_f64()
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz: {execs} executions in {secs:.0} s ({:.0}/s), {parsed} images accepted whole ({changed} with changed bytes, same volume), {decoded} chunks decoded, {corrupt} corrupted images accepted, 0 panics",
        execs as f64 / secs
    );
    assert_eq!(corrupt, 0, "a corrupted image was accepted");
}
