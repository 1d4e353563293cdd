//! The data path of the deploy step: pull an image's chunks from the Image
//! Distribution service (`shoal_protocol::distribution`,
//! `docs/distribution.md`), verify each against the chunk table the agent
//! already holds, write it to the disk, and zero the holes.
//!
//! Blocking std TCP, one connection at a time, several requests in flight
//! (by default 4 requests and at most 32 MiB of chunks). Every chunk is
//! decoded and verified (`image::decode_chunk_into`) before `DiskWriter`
//! sees it: unverified data never reaches the disk. Data chunks are pulled
//! first and zero chunks zeroed after, so a refused session writes nothing.
//! A dropped connection is retried with back-off (bounded; the count resets
//! whenever a connection made progress) and asks only for the chunks still
//! missing in `Written`, so a deploy resumes rather than restarts. At the end
//! the disk is flushed and its partition table re-read.

//! Before any of that, [`fetch_image`] gets the image's prefix, chunk table
//! and footer from the service and accepts them only if the table hashes to
//! the image ID the Controller sent over the authenticated control channel.

pub mod multicast;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use log::{info, warn};
use shoal_protocol::distribution::MAX_CHUNKS_PER_REQUEST;
use shoal_protocol::distribution::{Decoder, DistributionError, Reply, Request, TableRequest};
use shoal_protocol::image::{decode_chunk_into, ChunkError, Image, ImageError, FOOTER_LEN};

use crate::disk::progress::{ProgressError, Rate, Written};
use crate::disk::writer::{DiskWriter, WriteError};

/// Where to pull from and how hard to try.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    /// The Image Distribution service.
    pub service: SocketAddr,
    /// The session ID the Controller gave for this job.
    pub session: [u8; 32],
    /// Requests outstanding at once.
    pub max_requests: usize,
    /// Volume bytes of chunks outstanding at once (at least one chunk).
    pub max_bytes: u64,
    /// Failed connections in a row before giving up.
    pub retries: u32,
    /// First wait before reconnecting; doubles up to [`BACKOFF_CAP`].
    pub backoff: Duration,
    /// Connect, read and write timeout.
    pub io_timeout: Duration,
}

/// Longest wait between reconnects.
pub const BACKOFF_CAP: Duration = Duration::from_secs(8);
/// Shortest interval between progress callbacks (the last one always comes).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

impl DeployConfig {
    pub fn new(service: SocketAddr, session: [u8; 32]) -> Self {
        Self {
            service,
            session,
            max_requests: 4,
            max_bytes: 32 << 20,
            retries: 6,
            backoff: Duration::from_millis(500),
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// Where a deploy stands, for the Controller and the console.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Volume bytes on the disk (written or zeroed), of `total`.
    pub done: u64,
    pub total: u64,
    pub bytes_per_sec: Option<f64>,
    pub eta: Option<Duration>,
}

/// What a finished deploy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeployReport {
    /// Volume bytes of the image.
    pub bytes: u64,
    /// Data chunks pulled, verified and written in this call.
    pub chunks_fetched: u64,
    /// Zero chunks zeroed in this call.
    pub chunks_zeroed: u64,
    /// Chunks already written before this call (a resumed deploy).
    pub chunks_already: u64,
    /// Connections after the first.
    pub reconnects: u32,
    pub elapsed: Duration,
    /// Whether the kernel re-read the partition table.
    pub partitions_reread: bool,
}

/// A failed deploy, naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("disk {disk} ({disk_size}) is smaller than the image ({image_size})")]
    DiskTooSmall {
        disk: String,
        disk_size: Size,
        image_size: Size,
    },
    #[error("written-chunk record holds {record} chunks, the image has {image}")]
    Record { record: usize, image: usize },
    #[error("distribution service refused the session: {reason}")]
    Refused { reason: String },
    #[error("{0}; nothing written")]
    Chunk(ChunkError),
    #[error("distribution service {service} failed {attempts} times in a row")]
    Unreachable {
        service: SocketAddr,
        attempts: u32,
        source: ConnError,
    },
    #[error("chunk {index}")]
    Write { index: u64, source: WriteError },
    #[error("chunk {index}")]
    Mark { index: u64, source: ProgressError },
    #[error("finishing the image")]
    Finish { source: WriteError },
}

/// Why one connection to the service ended early. A deploy retries these.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot connect")]
    Connect(#[source] io::Error),
    #[error("connection lost")]
    Io(#[source] io::Error),
    #[error("connection closed by the service")]
    Closed,
    #[error("bad message from the service")]
    Protocol(#[source] DistributionError),
    #[error("service sent {got}, expected {want}")]
    Unexpected { got: String, want: String },
}

/// Why the image's table could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("distribution service {service}")]
    Conn {
        service: SocketAddr,
        source: ConnError,
    },
    #[error("distribution service refused the session: {reason}")]
    Refused { reason: String },
    #[error("image table from {service} does not parse")]
    Invalid {
        service: SocketAddr,
        source: ImageError,
    },
    #[error("image table from {service} is not image {want} (it hashes to {got})")]
    Mismatch {
        service: SocketAddr,
        want: String,
        got: String,
    },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fetches image `image_id`'s prefix, chunk table and footer from the
/// service and returns the parsed image, if its table's SHA-256 is
/// `image_id` (the table is then as trusted as the channel `image_id` came
/// over). Tries `cfg.retries + 1` times on connection errors.
pub fn fetch_image(cfg: &DeployConfig, image_id: [u8; 32]) -> Result<Image, TableError> {
    let service = cfg.service;
    let mut attempt = 0u32;
    loop {
        let err = match fetch_once(cfg, image_id) {
            Ok(Ok(image)) => return Ok(image),
            Ok(Err(fatal)) => return Err(fatal),
            Err(e) => e,
        };
        attempt += 1;
        if attempt > cfg.retries {
            return Err(TableError::Conn {
                service,
                source: err,
            });
        }
        let wait = cfg
            .backoff
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(BACKOFF_CAP);
        warn!(
            "deploy: distribution service {service}: {}; retrying in {wait:?}",
            crate::modules::error_chain(&err)
        );
        std::thread::sleep(wait);
    }
}

/// One try: `Err` is worth retrying, `Ok(Err)` is not.
fn fetch_once(
    cfg: &DeployConfig,
    image_id: [u8; 32],
) -> Result<Result<Image, TableError>, ConnError> {
    let service = cfg.service;
    let mut stream =
        TcpStream::connect_timeout(&service, cfg.io_timeout).map_err(ConnError::Connect)?;
    stream
        .set_read_timeout(Some(cfg.io_timeout))
        .map_err(ConnError::Io)?;
    stream
        .set_write_timeout(Some(cfg.io_timeout))
        .map_err(ConnError::Io)?;
    let req = TableRequest {
        session: cfg.session,
        image_id,
    };
    let frame = req.encode().map_err(ConnError::Protocol)?;
    stream.write_all(&frame).map_err(ConnError::Io)?;
    let mut decoder = Decoder::replies();
    let mut rbuf = vec![0u8; 64 * 1024];
    let frame = loop {
        if let Some(f) = decoder.next_frame().map_err(ConnError::Protocol)? {
            break f;
        }
        let n = stream.read(&mut rbuf).map_err(ConnError::Io)?;
        if n == 0 {
            return Err(ConnError::Closed);
        }
        decoder.push(&rbuf[..n]);
    };
    let (prefix_len, table_len, file_len, bytes) =
        match Reply::decode(frame).map_err(ConnError::Protocol)? {
            Reply::Refused { reason } => return Ok(Err(TableError::Refused { reason })),
            Reply::Table {
                prefix_len,
                table_len,
                file_len,
                bytes,
            } => (prefix_len as usize, table_len, file_len, bytes),
            other => {
                return Err(ConnError::Unexpected {
                    got: format!("{other:?}").chars().take(40).collect(),
                    want: "the image table".into(),
                })
            }
        };
    let table_end = usize::try_from(table_len)
        .ok()
        .and_then(|t| prefix_len.checked_add(t))
        .filter(|&e| e.checked_add(FOOTER_LEN) == Some(bytes.len()));
    let Some(table_end) = table_end else {
        return Err(ConnError::Unexpected {
            got: format!("{} table bytes", bytes.len()),
            want: format!("{prefix_len} + {table_len} + {FOOTER_LEN}"),
        });
    };
    let image = match Image::parse(
        &bytes[..prefix_len],
        &bytes[prefix_len..table_end],
        &bytes[table_end..],
        file_len,
    ) {
        Ok(i) => i,
        Err(source) => return Ok(Err(TableError::Invalid { service, source })),
    };
    if image.id != image_id {
        return Ok(Err(TableError::Mismatch {
            service,
            want: hex(&image_id),
            got: image.id_hex(),
        }));
    }
    Ok(Ok(image))
}

/// A byte count for people: "64.0 MiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} bytes", self.0);
        }
        let (mut v, mut unit) = (self.0 as f64 / 1024.0, 0);
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        write!(f, "{v:.1} {}", UNITS[unit])
    }
}

/// How one connection ended.
enum Stop {
    Fatal(DeployError),
    Retry(ConnError),
}

impl From<DeployError> for Stop {
    fn from(e: DeployError) -> Self {
        Stop::Fatal(e)
    }
}

impl From<ConnError> for Stop {
    fn from(e: ConnError) -> Self {
        Stop::Retry(e)
    }
}

/// Progress and the callback, throttled.
/// Counts written bytes and calls back with progress now and then.
pub struct Meter<F: FnMut(Progress)> {
    rate: Rate,
    done: u64,
    last: Option<Instant>,
    callback: F,
}

impl<F: FnMut(Progress)> Meter<F> {
    /// A meter for `image` that counts what `written` holds as done.
    pub fn new(image: &Image, written: &Written, start: Instant, callback: F) -> Self {
        let done: u64 = image
            .chunks
            .iter()
            .filter(|e| written.contains(e.index as usize))
            .map(|e| u64::from(e.volume_len))
            .sum();
        let total = image.header.metadata.source_size;
        Meter {
            rate: Rate::new(total, done, Duration::from_secs(5), start),
            done,
            last: None,
            callback,
        }
    }

    fn add(&mut self, bytes: u64) {
        self.done += bytes;
        let now = Instant::now();
        self.rate.update(self.done, now);
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= PROGRESS_EVERY);
        if due || self.done == self.rate.total() {
            self.last = Some(now);
            (self.callback)(Progress {
                done: self.done,
                total: self.rate.total(),
                bytes_per_sec: self.rate.bytes_per_sec(),
                eta: self.rate.eta(),
            });
        }
    }
}

/// Deploys `image` (its verified table; the chunks come from the service)
/// to `writer`, skipping the chunks `written` already records and marking
/// each one written. On error, `written` records what is on the disk, so a
/// later call resumes from there.
pub fn deploy(
    cfg: &DeployConfig,
    image: &Image,
    writer: &mut DiskWriter,
    written: &mut Written,
    progress: impl FnMut(Progress),
) -> Result<DeployReport, DeployError> {
    let start = Instant::now();
    let total = image.header.metadata.source_size;
    if writer.size() < total {
        return Err(DeployError::DiskTooSmall {
            disk: disk_name(writer),
            disk_size: Size(writer.size()),
            image_size: Size(total),
        });
    }
    if written.chunks() != image.chunks.len() {
        return Err(DeployError::Record {
            record: written.chunks(),
            image: image.chunks.len(),
        });
    }
    let mut report = DeployReport {
        bytes: total,
        chunks_already: written.count() as u64,
        ..DeployReport::default()
    };
    let mut meter = Meter::new(image, written, start, progress);
    let mut buf = vec![0u8; image.header.chunk_size as usize];
    let mut failures = 0u32;
    loop {
        let todo: Vec<u64> = written
            .missing()
            .filter(|&i| !image.chunks[i].is_zero())
            .map(|i| i as u64)
            .collect();
        if todo.is_empty() {
            break;
        }
        let before = report.chunks_fetched;
        let err = match pull(
            cfg,
            image,
            writer,
            written,
            &todo,
            &mut buf,
            &mut meter,
            &mut report,
        ) {
            Ok(()) => continue,
            Err(Stop::Fatal(e)) => return Err(e),
            Err(Stop::Retry(e)) => e,
        };
        failures = if report.chunks_fetched > before {
            1
        } else {
            failures + 1
        };
        if failures > cfg.retries {
            return Err(DeployError::Unreachable {
                service: cfg.service,
                attempts: failures,
                source: err,
            });
        }
        let wait = cfg
            .backoff
            .saturating_mul(1 << (failures - 1).min(16))
            .min(BACKOFF_CAP);
        warn!(
            "deploy: distribution service {}: {}; {} of {} chunks written, retrying in {wait:?}",
            cfg.service,
            crate::modules::error_chain(&err),
            written.count(),
            written.chunks()
        );
        std::thread::sleep(wait);
        report.reconnects += 1;
    }
    for e in image.chunks.iter().filter(|e| e.is_zero()) {
        let index = e.index;
        if written.contains(index as usize) {
            continue;
        }
        writer
            .zero_range(e.volume_offset, u64::from(e.volume_len))
            .map_err(|source| DeployError::Write { index, source })?;
        written
            .mark(index as usize)
            .map_err(|source| DeployError::Mark { index, source })?;
        report.chunks_zeroed += 1;
        meter.add(u64::from(e.volume_len));
    }
    writer
        .flush()
        .map_err(|source| DeployError::Finish { source })?;
    report.partitions_reread = writer.reread_partitions();
    report.elapsed = start.elapsed();
    info!(
        "deploy: image {} on disk {}: {} in {:.1}s ({} chunks fetched, {} zeroed, {} already there, {} reconnects)",
        image.id_hex(),
        disk_name(writer),
        Size(total),
        report.elapsed.as_secs_f64(),
        report.chunks_fetched,
        report.chunks_zeroed,
        report.chunks_already,
        report.reconnects
    );
    Ok(report)
}

/// One connection: requests `todo` pipelined, writes what arrives.
#[allow(clippy::too_many_arguments)]
fn pull<F: FnMut(Progress)>(
    cfg: &DeployConfig,
    image: &Image,
    writer: &mut DiskWriter,
    written: &mut Written,
    todo: &[u64],
    buf: &mut [u8],
    meter: &mut Meter<F>,
    report: &mut DeployReport,
) -> Result<(), Stop> {
    let mut stream =
        TcpStream::connect_timeout(&cfg.service, cfg.io_timeout).map_err(ConnError::Connect)?;
    let io = ConnError::Io;
    stream.set_read_timeout(Some(cfg.io_timeout)).map_err(io)?;
    stream.set_write_timeout(Some(cfg.io_timeout)).map_err(io)?;
    let _ = stream.set_nodelay(true);
    let chunk_size = u64::from(image.header.chunk_size);
    // Each request asks for about its share of the byte window.
    let per_request = (cfg.max_bytes / cfg.max_requests.max(1) as u64 / chunk_size)
        .clamp(1, MAX_CHUNKS_PER_REQUEST as u64) as usize;
    let mut queue = todo.iter().copied().peekable();
    let mut inflight: VecDeque<VecDeque<u64>> = VecDeque::new();
    let mut inflight_bytes = 0u64;
    let mut decoder = Decoder::replies();
    let mut rbuf = vec![0u8; 256 * 1024];
    let vlen = |i: u64| u64::from(image.chunks[i as usize].volume_len);
    loop {
        while inflight.len() < cfg.max_requests.max(1)
            && (inflight.is_empty() || inflight_bytes < cfg.max_bytes)
            && queue.peek().is_some()
        {
            let chunks: Vec<u64> = queue.by_ref().take(per_request).collect();
            let req = Request {
                session: cfg.session,
                image_id: image.id,
                chunks,
            };
            let frame = req.encode().map_err(ConnError::Protocol)?;
            stream.write_all(&frame).map_err(io)?;
            inflight_bytes += req.chunks.iter().map(|&i| vlen(i)).sum::<u64>();
            inflight.push_back(req.chunks.into());
        }
        let Some(front) = inflight.front_mut() else {
            return Ok(());
        };
        let frame = loop {
            if let Some(f) = decoder.next_frame().map_err(ConnError::Protocol)? {
                break f;
            }
            let n = stream.read(&mut rbuf).map_err(io)?;
            if n == 0 {
                return Err(ConnError::Closed.into());
            }
            decoder.push(&rbuf[..n]);
        };
        match Reply::decode(frame).map_err(ConnError::Protocol)? {
            Reply::Refused { reason } => return Err(DeployError::Refused { reason }.into()),
            Reply::Done if front.is_empty() => {
                inflight.pop_front();
            }
            Reply::Done => {
                return Err(ConnError::Unexpected {
                    got: "the end of a request".into(),
                    want: format!("chunk {}", front[0]),
                }
                .into())
            }
            Reply::Table { .. } => {
                return Err(ConnError::Unexpected {
                    got: "an image table".into(),
                    want: front
                        .front()
                        .map_or("the end of a request".into(), |i| format!("chunk {i}")),
                }
                .into())
            }
            Reply::Chunk { index, stored } => {
                if front.front() != Some(&index) {
                    let want = front
                        .front()
                        .map_or("the end of a request".into(), |i| format!("chunk {i}"));
                    return Err(ConnError::Unexpected {
                        got: format!("chunk {index}"),
                        want,
                    }
                    .into());
                }
                front.pop_front();
                let entry = &image.chunks[index as usize];
                let out = &mut buf[..entry.volume_len as usize];
                decode_chunk_into(&image.header, entry, &stored, out)
                    .map_err(DeployError::Chunk)?;
                writer
                    .write_at(entry.volume_offset, out)
                    .map_err(|source| DeployError::Write { index, source })?;
                written
                    .mark(index as usize)
                    .map_err(|source| DeployError::Mark { index, source })?;
                inflight_bytes -= vlen(index);
                report.chunks_fetched += 1;
                meter.add(vlen(index));
            }
        }
    }
}

/// The disk's name for messages: `vdb` for `/dev/vdb`.
fn disk_name(writer: &DiskWriter) -> String {
    let p = writer.path();
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
