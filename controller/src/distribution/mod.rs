//! The Image Distribution service, unicast: agents pull an image's chunks
//! over TCP with the protocol of `shoal_protocol::distribution`
//! (`docs/distribution.md`).
//!
//! The Controller registers a session per deploy step (a random 32-byte ID
//! it gives the agent over the authenticated control channel, the image
//! file and its parsed, verified `Image`, and an expiry); the service
//! answers requests that present a live session and the matching image ID
//! with each chunk's stored bytes, read with `pread` on the blocking pool
//! (the next chunk is read while the previous one is sent). Anything else is
//! refused by name and logged, and the connection closes. The service does
//! not verify what it sends: the store verified the image when it was added,
//! and the agent verifies every chunk against its table before writing.

use std::collections::HashMap;

pub mod multicast;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use shoal_protocol::distribution::{self as wire, Ask, Decoder, DistributionError, Reply, Request};
use shoal_protocol::image::{ChunkEntry, Footer, Image, FOOTER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A connection that sends no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The refusal for a session that is not registered or has expired.
pub const UNKNOWN_SESSION: &str = "session ID unknown or expired";

/// Why one connection ended early; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("connection from {peer}")]
    Io { peer: SocketAddr, source: io::Error },
    #[error("bad request from {peer}")]
    Protocol {
        peer: SocketAddr,
        source: DistributionError,
    },
    #[error("connection from {peer} idle for {}s", IDLE_TIMEOUT.as_secs())]
    Idle { peer: SocketAddr },
    #[error("cannot read chunk {index} of image file {path}")]
    ImageFile {
        path: PathBuf,
        index: u64,
        source: io::Error,
    },
    #[error("refused {peer} (session {session}…): {reason}")]
    Refused {
        peer: SocketAddr,
        session: String,
        reason: String,
    },
}

#[derive(Debug)]
struct Session {
    path: PathBuf,
    image: Arc<Image>,
    expires: Instant,
}

/// The sessions the service will serve. Cheap to clone (shared state).
#[derive(Debug, Clone, Default)]
pub struct Distribution {
    sessions: Arc<Mutex<HashMap<[u8; 32], Session>>>,
}

impl Distribution {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets agents presenting `session` pull `image` (stored at `path`)
    /// until `expires`. Registering an ID again replaces it.
    pub fn register(&self, session: [u8; 32], path: PathBuf, image: Image, expires: Instant) {
        debug!(
            "session {}: serving image {} ({}) until expiry",
            short(&session),
            image.id_hex(),
            path.display()
        );
        self.lock().insert(
            session,
            Session {
                path,
                image: Arc::new(image),
                expires,
            },
        );
    }

    /// Ends a session; requests presenting it are refused from now on.
    pub fn revoke(&self, session: &[u8; 32]) -> bool {
        self.lock().remove(session).is_some()
    }

    /// Accepts connections until the task is aborted (which also ends every
    /// connection it started).
    pub async fn serve(self, listener: TcpListener) {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let this = self.clone();
                        conns.spawn(async move {
                            match this.connection(stream, peer).await {
                                Ok(()) => {}
                                Err(e @ ServeError::Refused { .. }) => {
                                    warn!("distribution: {}", crate::error_chain(&e))
                                }
                                Err(e) => info!("distribution: {}", crate::error_chain(&e)),
                            }
                        });
                    }
                    Err(e) => {
                        warn!("distribution: accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // A panic elsewhere cannot leave the map half-updated: recover it.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `req` asks for, if it may have it: the image file and entries.
    fn admit(&self, req: &Request, now: Instant) -> Result<(PathBuf, Arc<Image>), String> {
        let sessions = self.lock();
        let s = sessions
            .get(&req.session)
            .filter(|s| now < s.expires)
            .ok_or_else(|| UNKNOWN_SESSION.to_string())?;
        if req.image_id != s.image.id {
            return Err(format!(
                "image ID does not match session {}'s image",
                short(&req.session)
            ));
        }
        for &i in &req.chunks {
            match s.image.chunks.get(i as usize) {
                None => return Err(format!("chunk {i} is not in the image")),
                Some(e) if e.is_zero() => {
                    return Err(format!("chunk {i} is a zero chunk: nothing is stored"))
                }
                Some(_) => {}
            }
        }
        Ok((s.path.clone(), s.image.clone()))
    }

    async fn connection(&self, mut stream: TcpStream, peer: SocketAddr) -> Result<(), ServeError> {
        let _ = stream.set_nodelay(true);
        let io_err = |source| ServeError::Io { peer, source };
        let mut decoder = Decoder::requests();
        let mut buf = vec![0u8; 4096];
        // The open image file, for the path of the last request.
        let mut open: Option<(PathBuf, Arc<File>)> = None;
        let (mut chunks, mut bytes) = (0u64, 0u64);
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => {
                    let n = tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf))
                        .await
                        .map_err(|_| ServeError::Idle { peer })?
                        .map_err(io_err)?;
                    if n == 0 {
                        debug!("distribution: {peer} closed after {chunks} chunks, {bytes} bytes");
                        return Ok(());
                    }
                    decoder.push(&buf[..n]);
                    continue;
                }
                Err(source) => return Err(ServeError::Protocol { peer, source }),
            };
            let ask =
                Ask::decode(&frame).map_err(|source| ServeError::Protocol { peer, source })?;
            let req = match ask {
                Ask::Chunks(req) => req,
                Ask::Table(t) => {
                    let probe = Request {
                        session: t.session,
                        image_id: t.image_id,
                        chunks: vec![],
                    };
                    let path = match self.admit(&probe, Instant::now()) {
                        Ok((path, _)) => path,
                        Err(reason) => {
                            refuse(&mut stream, &reason).await;
                            return Err(ServeError::Refused {
                                peer,
                                session: short(&t.session),
                                reason,
                            });
                        }
                    };
                    let p = path.clone();
                    let reply = match tokio::task::spawn_blocking(move || read_table(&p)).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(source)) => {
                            refuse(&mut stream, "image file unreadable on the Controller").await;
                            return Err(ServeError::ImageFile {
                                path,
                                index: 0,
                                source,
                            });
                        }
                        Err(join) => {
                            return Err(ServeError::ImageFile {
                                path,
                                index: 0,
                                source: io::Error::other(join),
                            })
                        }
                    };
                    stream.write_all(&reply).await.map_err(io_err)?;
                    continue;
                }
            };
            let (path, image) = match self.admit(&req, Instant::now()) {
                Ok(x) => x,
                Err(reason) => {
                    refuse(&mut stream, &reason).await;
                    return Err(ServeError::Refused {
                        peer,
                        session: short(&req.session),
                        reason,
                    });
                }
            };
            let file = match &open {
                Some((p, f)) if *p == path => f.clone(),
                _ => {
                    let f = match File::open(&path) {
                        Ok(f) => Arc::new(f),
                        Err(source) => {
                            refuse(&mut stream, "image file unreadable on the Controller").await;
                            return Err(ServeError::ImageFile {
                                path,
                                index: req.chunks[0],
                                source,
                            });
                        }
                    };
                    open = Some((path.clone(), f.clone()));
                    f
                }
            };
            // Read chunk k+1 from the file while chunk k goes out.
            let entries: Vec<ChunkEntry> = req
                .chunks
                .iter()
                .map(|&i| image.chunks[i as usize].clone())
                .collect();
            let mut next = Some(read_chunk(file.clone(), path.clone(), entries[0].clone()));
            for k in 0..entries.len() {
                let frame = match next.take().expect("a read in flight").await {
                    Ok(Ok(f)) => f,
                    Ok(Err(e)) => {
                        refuse(&mut stream, "image file unreadable on the Controller").await;
                        return Err(e);
                    }
                    Err(join) => {
                        return Err(ServeError::ImageFile {
                            path,
                            index: entries[k].index,
                            source: io::Error::other(join),
                        })
                    }
                };
                if let Some(e) = entries.get(k + 1) {
                    next = Some(read_chunk(file.clone(), path.clone(), e.clone()));
                }
                stream.write_all(&frame).await.map_err(io_err)?;
                chunks += 1;
                bytes += u64::from(entries[k].stored_len);
            }
            let done = Reply::Done.encode().expect("Done encodes");
            stream.write_all(&done).await.map_err(io_err)?;
        }
    }
}

/// The `Reply::Table` frame for the image file at `path`: its prefix, chunk
/// table and footer (the agent parses and checks them; they are not
/// trusted here).
fn read_table(path: &std::path::Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let bad = |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    if file_len < FOOTER_LEN as u64 {
        return Err(bad(&"shorter than a footer"));
    }
    let mut footer = [0u8; FOOTER_LEN];
    file.read_exact_at(&mut footer, file_len - FOOTER_LEN as u64)?;
    let parsed = Footer::parse(&footer).map_err(|e| bad(&e))?;
    let table = parsed.table_range(file_len).map_err(|e| bad(&e))?;
    let mut preamble = [0u8; shoal_protocol::image::PREAMBLE_LEN];
    file.read_exact_at(&mut preamble, 0)?;
    let prefix_len = shoal_protocol::image::prefix_len(&preamble).map_err(|e| bad(&e))?;
    let table_len = table.end - table.start;
    let mut bytes = vec![0u8; prefix_len + table_len as usize];
    file.read_exact_at(&mut bytes[..prefix_len], 0)?;
    file.read_exact_at(&mut bytes[prefix_len..], table.start)?;
    bytes.extend_from_slice(&footer);
    Reply::Table {
        prefix_len: prefix_len as u32,
        table_len,
        file_len,
        bytes,
    }
    .encode()
    .map_err(|e| bad(&e))
}

/// Reads one chunk's stored bytes into a whole reply frame, on the blocking
/// pool.
fn read_chunk(
    file: Arc<File>,
    path: PathBuf,
    entry: ChunkEntry,
) -> tokio::task::JoinHandle<Result<Vec<u8>, ServeError>> {
    tokio::task::spawn_blocking(move || {
        let err = |source| ServeError::ImageFile {
            path: path.clone(),
            index: entry.index,
            source,
        };
        let len = entry.stored_len as usize;
        let mut frame = wire::chunk_frame_head(entry.index, len)
            .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        let head = frame.len();
        frame.resize(head + len, 0);
        file.read_exact_at(&mut frame[head..], entry.stored_offset)
            .map_err(err)?;
        Ok(frame)
    })
}

/// Tells the agent why, best effort (it may already be gone).
async fn refuse(stream: &mut TcpStream, reason: &str) {
    if let Ok(frame) = (Reply::Refused {
        reason: reason.to_string(),
    })
    .encode()
    {
        let _ = stream.write_all(&frame).await;
        let _ = stream.shutdown().await;
    }
}

/// The first 8 hex digits of a session ID: enough to tell sessions apart in
/// a log, not enough to use one.
fn short(session: &[u8; 32]) -> String {
    session[..4].iter().map(|b| format!("{b:02x}")).collect()
}
