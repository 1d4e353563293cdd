//! The multicast half of the deploy step (`docs/multicast.md`): join the
//! session's group, receive, authenticate and decrypt datagrams, assemble
//! chunks, verify each against the chunk table, write it, and report what
//! is missing to the sender. `shoal_protocol::multicast::Receiver` is the
//! state machine; this is its I/O.
//!
//! This thread receives (`recvmmsg` batches with UDP GRO, a 16 MiB socket
//! buffer),
//! authenticates and decrypts; workers (one per core, up to three) verify each chunk
//! against the table (SHA-1 under ChaCha20-Poly1305, SHA-1 and SHA-256
//! under RC4), decompress and write with `O_DIRECT`, in whatever order
//! chunks complete. Memory is bounded by the receiver's chunk buffers. The multicast phase ends when every data chunk is
//! written, or hands the rest to the unicast pull ([`super::deploy`]):
//! when no multicast arrives within the session's start bound (a switch
//! that drops it), when the stream stalls, when this disk is the
//! bottleneck (a straggler, served by TCP at its own pace, like WDS'
//! slow-client split) or for a chunk that failed verification twice.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, TrySendError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::sys::socket::{self as sock, sockopt, MsgFlags, SockaddrIn};
use shoal_protocol::image::{
    check_raw_authenticated, decode_chunk_into, decode_chunk_into_authenticated, Image,
};
use shoal_protocol::multicast::{
    completion_digest, Cipher, Event, Geometry, Receiver, ReceiverConfig, ReceiverStats,
};

use super::{DeployError, Meter, Progress};
use crate::disk::progress::Written;
use crate::disk::writer::DiskWriter;

/// The session as the offer describes it.
#[derive(Debug, Clone)]
pub struct McastConfig {
    pub group: SocketAddrV4,
    pub sender: SocketAddr,
    pub session: u64,
    pub key: [u8; 32],
    pub cipher: Cipher,
    pub receiver: u32,
    pub payload: usize,
    /// No data by then: multicast does not reach us.
    pub first_data_within: Duration,
    /// Chunk buffers (assembling or waiting for the disk).
    pub max_partials: usize,
}

/// No data at all for this long while chunks are missing: stalled.
pub const STALL: Duration = Duration::from_secs(5);
/// How long a done receiver waits for the sender's acknowledgement.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(3);
/// A chunk that fails verification this often comes by unicast.
pub const MAX_FAILS: u32 = 2;

/// How the multicast phase went.
#[derive(Debug, Clone, Default)]
pub struct McastSummary {
    pub stats: ReceiverStats,
    /// Why the rest came by unicast, if it did.
    pub fell_back: Option<String>,
    /// Chunks written from multicast.
    pub chunks: u64,
    pub elapsed: Duration,
}

enum Written_ {
    Ok(u32, Vec<u8>),
    Bad(u32, String, Vec<u8>),
}

/// The socket: bound to the group's port on every address (acks come to
/// it by unicast), member of the group on the interface at `local`.
///
/// UDP GRO is asked for: a run of datagrams from the sender then comes up in
/// one read (a NIC's GRO, or a GSO batch that a veth passed on whole), which
/// is most of the kernel's per-datagram cost saved.
pub fn open_socket(cfg: &McastConfig, local: Ipv4Addr) -> io::Result<(UdpSocket, usize)> {
    let fd = sock::socket(
        sock::AddressFamily::Inet,
        sock::SockType::Datagram,
        sock::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let want = 16 << 20;
    if sock::setsockopt(&fd, sockopt::RcvBufForce, &want).is_err() {
        let _ = sock::setsockopt(&fd, sockopt::RcvBuf, &want);
    }
    let buffer = sock::getsockopt(&fd, sockopt::RcvBuf).unwrap_or(0);
    if let Err(e) = sock::setsockopt(&fd, sockopt::UdpGroSegment, &true) {
        debug!("multicast: no UDP GRO ({e}): one datagram per read");
    }
    let any = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, cfg.group.port()));
    sock::bind(fd.as_raw_fd(), &any)?;
    let s = UdpSocket::from(fd);
    s.join_multicast_v4(cfg.group.ip(), &local)?;
    s.set_read_timeout(Some(Duration::from_millis(5)))?;
    Ok((s, buffer))
}

/// The address of the interface that reaches `sender`.
pub fn local_address(sender: SocketAddr) -> io::Result<Ipv4Addr> {
    let probe = UdpSocket::bind("0.0.0.0:0")?;
    probe.connect(sender)?;
    match probe.local_addr()? {
        SocketAddr::V4(a) => Ok(*a.ip()),
        SocketAddr::V6(_) => Err(io::Error::other("the sender is not IPv4")),
    }
}

/// Receives from the session until every data chunk is written or a reason
/// to go unicast comes up; `written` records what is on the disk either way.
#[allow(clippy::too_many_arguments)]
pub fn receive<F: FnMut(Progress)>(
    cfg: &McastConfig,
    socket: &UdpSocket,
    rx: &mut Receiver,
    image: &Image,
    writer: &mut DiskWriter,
    written: &mut Written,
    meter: &mut Meter<F>,
    cancel: &AtomicBool,
) -> Result<McastSummary, DeployError> {
    let start = Instant::now();
    let mut summary = McastSummary::default();
    // Verification (two hashes per byte) is the heaviest per-byte work:
    // one worker per core, up to three; writes take turns on the disk.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 3);
    let (to_disk, from_net) = mpsc::sync_channel::<(u32, Vec<u8>)>(workers);
    let from_net = Mutex::new(from_net);
    let (done_tx, done_rx) = mpsc::channel::<Written_>();
    let disk = Mutex::new((writer, written));
    let broken = AtomicBool::new(false);
    let header = &image.header;
    let cipher = cfg.cipher;
    let fatal: Result<(), DeployError> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let done_tx = done_tx.clone();
                let (from_net, disk, broken) = (&from_net, &disk, &broken);
                scope.spawn(move || -> Result<(), DeployError> {
                    let mut out = vec![0u8; header.chunk_size as usize];
                    loop {
                        let next = from_net.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((chunk, stored)) = next else {
                            return Ok(());
                        };
                        let entry = &image.chunks[chunk as usize];
                        // A raw chunk under ChaCha20-Poly1305 is checked in
                        // place and written as it came; the others are
                        // decoded into this worker's buffer.
                        let raw = match cipher {
                            c if c.is_aead() => check_raw_authenticated(entry, &stored),
                            _ => Ok(false),
                        };
                        let vlen = entry.volume_len as usize;
                        let decoded = match raw {
                            Ok(true) => Ok(&stored[..]),
                            Ok(false) => {
                                let buf = &mut out[..vlen];
                                if cipher.is_aead() {
                                    // Every block passed the AEAD under the
                                    // session key: the table's SHA-1
                                    // completes the check.
                                    decode_chunk_into_authenticated(header, entry, &stored, buf)
                                } else {
                                    // RC4 has no integrity of its own: SHA-1
                                    // and SHA-256.
                                    decode_chunk_into(header, entry, &stored, buf)
                                }
                                .map(|()| &out[..vlen])
                            }
                            Err(e) => Err(e),
                        };
                        let buf = match decoded {
                            Ok(b) => b,
                            Err(e) => {
                                let _ = done_tx.send(Written_::Bad(chunk, e.to_string(), stored));
                                continue;
                            }
                        };
                        let mut d = disk.lock().unwrap_or_else(|p| p.into_inner());
                        let (writer, written) = &mut *d;
                        let index = u64::from(chunk);
                        let r = writer
                            .write_at(entry.volume_offset, buf)
                            .map_err(|source| DeployError::Write { index, source })
                            .and_then(|()| {
                                written
                                    .mark(chunk as usize)
                                    .map(drop)
                                    .map_err(|source| DeployError::Mark { index, source })
                            });
                        drop(d);
                        if let Err(e) = r {
                            broken.store(true, Ordering::SeqCst);
                            return Err(e);
                        }
                        let _ = done_tx.send(Written_::Ok(chunk, stored));
                    }
                })
            })
            .collect();
        drop(done_tx);
        let r = pump(
            cfg,
            socket,
            rx,
            image,
            &to_disk,
            &done_rx,
            meter,
            cancel,
            &broken,
            &mut summary,
        );
        drop(to_disk);
        let mut w = Ok(());
        for h in handles {
            let r = match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            if w.is_ok() {
                w = r;
            }
        }
        // Apply what the workers finished after the pump stopped.
        for d in done_rx.try_iter() {
            apply(rx, d, image, meter, &mut summary, &mut HashMap::new());
        }
        w.and(r)
    });
    fatal?;
    summary.stats = rx.stats();
    summary.elapsed = start.elapsed();
    Ok(summary)
}

fn apply<F: FnMut(Progress)>(
    rx: &mut Receiver,
    d: Written_,
    image: &Image,
    meter: &mut Meter<F>,
    summary: &mut McastSummary,
    fails: &mut HashMap<u32, u32>,
) {
    match d {
        Written_::Ok(c, buf) => {
            rx.recycle(buf);
            rx.written(c);
            summary.chunks += 1;
            meter.add(u64::from(image.chunks[c as usize].volume_len));
        }
        Written_::Bad(c, why, buf) => {
            rx.recycle(buf);
            warn!("multicast: chunk {c} failed verification ({why}); dropped, asking again");
            rx.failed(c);
            *fails.entry(c).or_default() += 1;
        }
    }
}

/// Chunks assembled and waiting for a free worker.
type Ready = VecDeque<(u32, Vec<u8>)>;

/// One `recvmmsg` and each datagram taken in; false when nothing came.
fn receive_once(
    socket: &UdpSocket,
    rx: &mut Receiver,
    ready: &mut Ready,
    batch: &mut Batch,
) -> bool {
    match batch.receive(socket) {
        Ok(_) => {
            let now = Instant::now();
            for d in batch.datagrams() {
                if let Ok(Event::Complete { chunk, stored }) = rx.on_datagram(now, d) {
                    ready.push_back((chunk, stored));
                }
            }
            true
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(e) => {
            warn!("multicast: receiving: {e}");
            false
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn pump<F: FnMut(Progress)>(
    cfg: &McastConfig,
    socket: &UdpSocket,
    rx: &mut Receiver,
    image: &Image,
    to_disk: &mpsc::SyncSender<(u32, Vec<u8>)>,
    done: &mpsc::Receiver<Written_>,
    meter: &mut Meter<F>,
    cancel: &AtomicBool,
    broken: &AtomicBool,
    summary: &mut McastSummary,
) -> Result<(), DeployError> {
    let start = Instant::now();
    let mut fails: HashMap<u32, u32> = HashMap::new();
    let mut ready = Ready::new();
    let mut batch = Batch::new(socket, cfg.payload + 64);
    let mut was_busy = false;
    let mut last_log = start;
    loop {
        if cancel.load(Ordering::SeqCst) {
            summary.fell_back = Some("cancelled".into());
            return Ok(());
        }
        if broken.load(Ordering::SeqCst) {
            // A worker could not write: its error ends the deploy.
            return Ok(());
        }
        for d in done.try_iter() {
            apply(rx, d, image, meter, summary, &mut fails);
        }
        while let Some(item) = ready.pop_front() {
            match to_disk.try_send(item) {
                Ok(()) => {}
                Err(TrySendError::Full(item)) => {
                    ready.push_front(item);
                    break;
                }
                Err(TrySendError::Disconnected(_)) => return Ok(()),
            }
        }
        let now = Instant::now();
        if rx.complete() {
            return Ok(());
        }
        let (idle, handed, missing) = (rx.stream_idle(now), rx.handed(), rx.missing().len());
        was_busy |= rx.busy();
        let reason = match rx.last_data() {
            None if now.duration_since(start) > cfg.first_data_within => Some(format!(
                "no multicast data within {} s",
                cfg.first_data_within.as_secs()
            )),
            Some(t) if now.duration_since(t) > STALL => {
                Some(format!("multicast stream silent for {} s", STALL.as_secs()))
            }
            // A straggler (its buffers filled while the others went on)
            // takes what it still lacks by TCP at its disk's pace; a few
            // chunks are cheaper to ask for again by multicast.
            Some(_) if idle && was_busy && handed == 0 && missing > (image.chunks.len() / 8).max(8) => {
                Some("this disk is slower than the session (its buffers filled): the rest by unicast".into())
            }
            _ if idle && handed == 0 && fails.values().any(|&f| f >= MAX_FAILS) => {
                let bad: Vec<u32> = fails
                    .iter()
                    .filter(|(_, f)| **f >= MAX_FAILS)
                    .map(|(c, _)| *c)
                    .collect();
                Some(format!(
                    "chunks {bad:?} failed verification {MAX_FAILS} times: fetching them by unicast"
                ))
            }
            _ => None,
        };
        if let Some(r) = reason {
            if ready.is_empty() && handed == 0 {
                info!("multicast: {r}");
                summary.fell_back = Some(r);
                return Ok(());
            }
        }
        if let Some(report) = rx.poll(now) {
            if let Err(e) = socket.send_to(&report, cfg.sender) {
                debug!("multicast: report to {}: {e}", cfg.sender);
            }
        }
        if now.duration_since(last_log) >= Duration::from_secs(5) {
            last_log = now;
            let s = rx.stats();
            debug!(
                "multicast: {} chunks written, {missing} missing, received {}, lost {}, forged {}, skipped {}",
                s.chunks_done, s.received, s.lost, s.forged, s.skipped
            );
        }
        // Receive what is there (bounded per turn, so reports still go).
        for _ in 0..4 {
            if !receive_once(socket, rx, &mut ready, &mut batch) {
                break;
            }
        }
    }
}

/// Reads per `recvmmsg`: datagrams without GRO, runs of them with it.
const BATCH: usize = 32;
const BATCH_GRO: usize = 16;
/// The largest read GRO hands up (one UDP datagram's limit).
const GRO_READ: usize = 65_536;

/// Buffers for one `recvmmsg`, and where in them each datagram lies.
struct Batch {
    headers: sock::MultiHeaders<SockaddrIn>,
    /// Whether reads carry GRO's segment size (a control message).
    gro: bool,
    bufs: Vec<Vec<u8>>,
    /// Per buffer filled: bytes read and the size of each datagram in them
    /// (the GRO segment size; the last may be shorter).
    reads: Vec<(usize, usize)>,
}

impl Batch {
    /// Sized for `socket`: big buffers when it has UDP GRO on.
    fn new(socket: &UdpSocket, datagram: usize) -> Batch {
        let gro = sock::getsockopt(socket, sockopt::UdpGroSegment).unwrap_or(false);
        let (count, size, cmsg) = if gro {
            (BATCH_GRO, GRO_READ, Some(nix::cmsg_space!(i32)))
        } else {
            (BATCH, datagram, None)
        };
        Batch {
            headers: sock::MultiHeaders::preallocate(count, cmsg),
            gro,
            bufs: vec![vec![0u8; size]; count],
            reads: Vec::with_capacity(count),
        }
    }

    /// Up to a batch of reads in one system call (waiting, up to the
    /// socket's timeout, for the first).
    fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        if self.gro {
            // The kernel writes back each header's control length (0 for a
            // read that was one datagram) and `nix` does not restore it:
            // fresh headers, or the next reads lose their segment size.
            self.headers =
                sock::MultiHeaders::preallocate(self.bufs.len(), Some(nix::cmsg_space!(i32)));
        }
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(&mut b[..])])
            .collect();
        let got = sock::recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )
        .map_err(io::Error::from)?;
        self.reads.clear();
        for m in got {
            let segment = m
                .cmsgs()
                .ok()
                .and_then(|mut c| {
                    c.find_map(|c| match c {
                        sock::ControlMessageOwned::UdpGroSegments(s) => usize::try_from(s).ok(),
                        _ => None,
                    })
                })
                .filter(|&s| s > 0)
                .unwrap_or(m.bytes);
            self.reads.push((m.bytes, segment.max(1)));
        }
        Ok(self.reads.len())
    }

    /// Each datagram of the last [`Batch::receive`].
    fn datagrams(&mut self) -> impl Iterator<Item = &mut [u8]> {
        self.bufs
            .iter_mut()
            .zip(&self.reads)
            .flat_map(|(b, &(n, segment))| b[..n].chunks_mut(segment))
    }
}

/// Tells the sender we are done and waits (bounded) for its verdict.
pub fn confirm(cfg: &McastConfig, socket: &UdpSocket, rx: &mut Receiver) -> Option<bool> {
    let deadline = Instant::now() + CONFIRM_WAIT;
    let mut batch = Batch::new(socket, cfg.payload + 64);
    while Instant::now() < deadline {
        if let Some(v) = rx.confirmed() {
            return Some(v);
        }
        if let Some(report) = rx.poll(Instant::now()) {
            let _ = socket.send_to(&report, cfg.sender);
        }
        // Every chunk is written: nothing can complete, only the ack come.
        receive_once(socket, rx, &mut Ready::new(), &mut batch);
    }
    rx.confirmed()
}

/// The receiver state machine for `image` in this session.
pub fn receiver(cfg: &McastConfig, image: &Image, written: &Written) -> Receiver {
    Receiver::new(
        ReceiverConfig {
            session: cfg.session,
            key: cfg.key,
            cipher: cfg.cipher,
            receiver: cfg.receiver,
            payload: cfg.payload,
            max_partials: cfg.max_partials,
            digest: completion_digest(image),
        },
        Geometry::of_image(image, cfg.payload),
        |i| written.contains(i),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;

    /// Sends `count` datagrams of `size` bytes (byte `tag` + index) in one
    /// UDP GSO `sendmsg` (one plain datagram when `count` is 1).
    fn send_run(tx: &UdpSocket, to: SocketAddrV4, size: usize, count: usize, tag: u8) {
        let mut buf = Vec::new();
        for i in 0..count {
            buf.extend(std::iter::repeat_n(tag.wrapping_add(i as u8), size));
        }
        let seg = size as u16;
        let cmsg = [sock::ControlMessage::UdpGsoSegments(&seg)];
        let cmsgs: &[sock::ControlMessage<'_>] = if count > 1 { &cmsg } else { &[] };
        sock::sendmsg(
            tx.as_raw_fd(),
            &[IoSlice::new(&buf)],
            cmsgs,
            MsgFlags::empty(),
            Some(&SockaddrIn::from(to)),
        )
        .expect("sendmsg on loopback");
    }

    #[test]
    fn gro_reads_are_cut_into_datagrams_read_after_read() {
        // Loopback passes a GSO run up whole, as a veth does and as a
        // NIC's GRO builds one. A read that is one datagram comes without
        // the segment-size message; the reads after it must still get
        // theirs (the kernel shrinks each header's control length).
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock::setsockopt(&rx, sockopt::UdpGroSegment, &true).expect("UDP GRO (Linux 5.0+)");
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let SocketAddr::V4(to) = rx.local_addr().unwrap() else {
            unreachable!()
        };
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = Batch::new(&rx, 1500);
        assert!(batch.gro, "GRO on the socket");
        let mut seen: Vec<(usize, u8)> = Vec::new();
        let mut take = |batch: &mut Batch, n: usize| {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut got = 0;
            while got < n && Instant::now() < deadline {
                if batch.receive(&rx).is_ok() {
                    for d in batch.datagrams() {
                        seen.push((d.len(), d[0]));
                        got += 1;
                    }
                }
            }
        };
        for round in 0..3u8 {
            // Each in a read of its own: the single datagram lands in the
            // first slot, then the run in the same slot.
            send_run(&tx, to, 1000, 1, 100 + round);
            take(&mut batch, 1);
            send_run(&tx, to, 1200, 10, 10 * round);
            take(&mut batch, 10);
        }
        let want: Vec<(usize, u8)> = (0..3u8)
            .flat_map(|r| {
                std::iter::once((1000, 100 + r)).chain((0..10).map(move |i| (1200, 10 * r + i)))
            })
            .collect();
        assert_eq!(seen, want);
    }
}
