//! End-to-end deploy tests over real loopback sockets: the Controller's
//! real Image Distribution service (on a tokio runtime in a thread) serves
//! an image file built with `Encoder`, and `deploy` writes a real temporary
//! file through `DiskWriter`. A small std proxy cuts a connection after N
//! chunks and records, with the protocol's own decoder, what was asked for
//! and what was delivered on each connection.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_controller::distribution::Distribution;
use shoal_protocol::distribution::{Decoder, Reply, Request};
use shoal_protocol::image::{Compression, Encoder, Image, Metadata};

use super::*;
use crate::disk::progress::Written;
use crate::disk::writer::DiskWriter;

const CHUNK: u32 = 64 * 1024;
const SESSION: [u8; 32] = [7; 32];
/// What the disk holds before a deploy, so untouched regions show.
const FILL: u8 = 0xee;

/// A 64-chunk volume: random chunks, compressible chunks, zero chunks and a
/// short last chunk. Returns the image file, its parsed table and the volume.
fn build_image(dir: &Path) -> (PathBuf, Image, Vec<u8>) {
    let size = 63 * CHUNK as usize + 5000;
    let mut volume = vec![0u8; size];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for (i, c) in volume.chunks_mut(CHUNK as usize).enumerate() {
        match i % 4 {
            0 | 1 => c.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }),
            2 => c
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"shoal "[j % 6]),
            _ => {} // zeros
        }
    }
    let meta = Metadata {
        name: "test".into(),
        source_size: size as u64,
        logical_sector_size: 512,
        ..Metadata::default()
    };
    let mut enc = Encoder::new(meta, Compression::Fast, CHUNK).unwrap();
    let mut file = enc.prefix().to_vec();
    for c in volume.chunks(CHUNK as usize) {
        if let Some(stored) = enc.push(c).unwrap() {
            file.extend(stored);
        }
    }
    let (tail, image) = enc.finish().unwrap();
    file.extend(tail);
    let path = dir.join("test.shoalimg");
    std::fs::write(&path, &file).unwrap();
    assert_eq!(Image::from_bytes(&file).unwrap(), image);
    (path, image, volume)
}

/// The real service on a loopback port, in its own thread and runtime.
fn start_service(dist: &Distribution) -> SocketAddr {
    let dist = dist.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            dist.serve(listener).await;
        });
    });
    rx.recv().unwrap()
}

fn disk(dir: &Path, size: usize) -> PathBuf {
    let path = dir.join("disk");
    std::fs::write(&path, vec![FILL; size]).unwrap();
    path
}

fn config(service: SocketAddr, session: [u8; 32]) -> DeployConfig {
    DeployConfig {
        backoff: Duration::from_millis(20),
        io_timeout: Duration::from_secs(10),
        max_bytes: 512 * 1024,
        ..DeployConfig::new(service, session)
    }
}

fn data_chunks(image: &Image) -> usize {
    image.chunks.iter().filter(|e| !e.is_zero()).count()
}

#[test]
fn deploys_an_image_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (path, image, volume) = build_image(dir.path());
    let dist = Distribution::new();
    dist.register(
        SESSION,
        path,
        image.clone(),
        Instant::now() + Duration::from_secs(60),
    );
    let addr = start_service(&dist);
    let disk_path = disk(dir.path(), volume.len() + 8192);
    let mut w = DiskWriter::open(&disk_path).unwrap();
    let mut written = Written::new(image.chunks.len());
    let mut seen = Vec::new();
    let report = deploy(&config(addr, SESSION), &image, &mut w, &mut written, |p| {
        seen.push(p)
    })
    .unwrap();
    drop(w);
    let on_disk = std::fs::read(&disk_path).unwrap();
    assert!(
        on_disk[..volume.len()] == volume[..],
        "disk differs from the volume"
    );
    assert!(
        on_disk[volume.len()..].iter().all(|&b| b == FILL),
        "wrote past the image"
    );
    assert!(written.is_complete());
    assert_eq!(report.chunks_fetched as usize, data_chunks(&image));
    assert_eq!(
        report.chunks_zeroed as usize,
        image.chunks.len() - data_chunks(&image)
    );
    assert_eq!(report.reconnects, 0);
    let last = seen.last().unwrap();
    assert_eq!(
        (last.done, last.total),
        (volume.len() as u64, volume.len() as u64)
    );
    assert_eq!(last.eta, Some(Duration::ZERO));
}

#[test]
fn wrong_or_expired_session_fails_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, image, volume) = build_image(dir.path());
    let dist = Distribution::new();
    dist.register(
        SESSION,
        path.clone(),
        image.clone(),
        Instant::now() + Duration::from_secs(60),
    );
    dist.register([9; 32], path, image.clone(), Instant::now());
    let addr = start_service(&dist);
    let disk_path = disk(dir.path(), volume.len());
    for session in [[8; 32], [9; 32]] {
        let mut w = DiskWriter::open(&disk_path).unwrap();
        let mut written = Written::new(image.chunks.len());
        let e = deploy(&config(addr, session), &image, &mut w, &mut written, |_| {}).unwrap_err();
        assert_eq!(
            e.to_string(),
            "distribution service refused the session: session ID unknown or expired"
        );
        assert_eq!(written.count(), 0);
    }
    assert!(std::fs::read(&disk_path)
        .unwrap()
        .iter()
        .all(|&b| b == FILL));
    // A revoked session is refused as well.
    assert!(dist.revoke(&SESSION));
    let mut w = DiskWriter::open(&disk_path).unwrap();
    let mut written = Written::new(image.chunks.len());
    let e = deploy(&config(addr, SESSION), &image, &mut w, &mut written, |_| {}).unwrap_err();
    assert!(matches!(e, DeployError::Refused { .. }), "{e}");
}

#[test]
fn corrupt_chunk_fails_naming_it_and_its_region_stays_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (path, image, volume) = build_image(dir.path());
    // Flip a byte of chunk 17's stored bytes after the table was parsed.
    let bad = &image.chunks[17];
    assert!(!bad.is_zero());
    let mut file = std::fs::read(&path).unwrap();
    file[(bad.stored_offset + 100) as usize] ^= 0x01;
    std::fs::write(&path, &file).unwrap();
    let dist = Distribution::new();
    dist.register(
        SESSION,
        path,
        image.clone(),
        Instant::now() + Duration::from_secs(60),
    );
    let addr = start_service(&dist);
    let disk_path = disk(dir.path(), volume.len());
    let mut w = DiskWriter::open(&disk_path).unwrap();
    let mut written = Written::new(image.chunks.len());
    let e = deploy(&config(addr, SESSION), &image, &mut w, &mut written, |_| {}).unwrap_err();
    assert_eq!(
        e.to_string(),
        "chunk 17: stored SHA-1 mismatch; nothing written"
    );
    assert!(!written.contains(17));
    let on_disk = std::fs::read(&disk_path).unwrap();
    let r = bad.volume_range();
    assert!(on_disk[r.start as usize..r.end as usize]
        .iter()
        .all(|&b| b == FILL));
}

#[test]
fn disk_smaller_than_the_image_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (_, image, _) = build_image(dir.path());
    let disk_path = dir.path().join("vdb");
    std::fs::write(&disk_path, vec![0u8; 2 << 20]).unwrap();
    let mut w = DiskWriter::open(&disk_path).unwrap();
    let mut written = Written::new(image.chunks.len());
    let addr = "127.0.0.1:9".parse().unwrap();
    let e = deploy(&config(addr, SESSION), &image, &mut w, &mut written, |_| {}).unwrap_err();
    assert_eq!(
        e.to_string(),
        "disk vdb (2.0 MiB) is smaller than the image (3.9 MiB)"
    );
}

/// What the proxy saw, per connection.
#[derive(Debug, Default)]
struct Seen {
    requested: Vec<Vec<u64>>,
    delivered: Vec<Vec<u64>>,
}

/// Forwards to `upstream`; on the first connection, right after forwarding
/// `cut_after` chunk frames, ends the stream to the agent (FIN, so every
/// frame forwarded arrives) and closes the service's side.
fn cutting_proxy(upstream: SocketAddr, cut_after: usize) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (conn, agent) in listener.incoming().enumerate() {
            let mut agent = agent.unwrap();
            let mut service = TcpStream::connect(upstream).unwrap();
            {
                let mut s = log.lock().unwrap();
                s.requested.push(Vec::new());
                s.delivered.push(Vec::new());
            }
            let (mut a_in, mut s_out) = (agent.try_clone().unwrap(), service.try_clone().unwrap());
            let log_up = log.clone();
            std::thread::spawn(move || {
                let mut d = Decoder::requests();
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = a_in.read(&mut buf) {
                    d.push(&buf[..n]);
                    while let Ok(Some(f)) = d.next_frame() {
                        let req = Request::decode(&f).unwrap();
                        log_up.lock().unwrap().requested[conn].extend(req.chunks);
                    }
                    // After a cut, keep draining the agent (closing with
                    // unread bytes would reset the connection and lose the
                    // chunks already forwarded).
                    let _ = s_out.write_all(&buf[..n]);
                }
                let _ = s_out.shutdown(Shutdown::Write);
            });
            let log_down = log.clone();
            std::thread::spawn(move || {
                let mut d = Decoder::replies();
                let mut buf = vec![0u8; 64 * 1024];
                let mut chunks = 0;
                while let Ok(n @ 1..) = service.read(&mut buf) {
                    d.push(&buf[..n]);
                    while let Ok(Some(f)) = d.next_frame() {
                        let mut frame = (f.len() as u32).to_be_bytes().to_vec();
                        frame.extend(&f);
                        if agent.write_all(&frame).is_err() {
                            return;
                        }
                        if let Ok(Reply::Chunk { index, .. }) = Reply::decode(f) {
                            log_down.lock().unwrap().delivered[conn].push(index);
                            chunks += 1;
                            if conn == 0 && chunks == cut_after {
                                let _ = agent.shutdown(Shutdown::Write);
                                let _ = service.shutdown(Shutdown::Both);
                                return;
                            }
                        }
                    }
                }
                let _ = agent.shutdown(Shutdown::Write);
            });
        }
    });
    (addr, seen)
}

#[test]
fn cut_connection_resumes_without_refetching_written_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (path, image, volume) = build_image(dir.path());
    let dist = Distribution::new();
    dist.register(
        SESSION,
        path,
        image.clone(),
        Instant::now() + Duration::from_secs(60),
    );
    let (addr, seen) = cutting_proxy(start_service(&dist), 10);
    let disk_path = disk(dir.path(), volume.len());
    let mut w = DiskWriter::open(&disk_path).unwrap();
    let mut written = Written::new(image.chunks.len());
    let report = deploy(&config(addr, SESSION), &image, &mut w, &mut written, |_| {}).unwrap();
    drop(w);
    assert!(
        std::fs::read(&disk_path).unwrap() == volume,
        "disk differs from the volume"
    );
    assert_eq!(report.reconnects, 1);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.requested.len(), 2, "{seen:?}");
    let first: HashSet<u64> = seen.delivered[0].iter().copied().collect();
    assert_eq!(first.len(), 10);
    let again: Vec<_> = seen.requested[1]
        .iter()
        .filter(|i| first.contains(i))
        .collect();
    assert!(again.is_empty(), "chunks fetched twice: {again:?}");
    assert_eq!(first.len() + seen.requested[1].len(), data_chunks(&image));
    assert_eq!(report.chunks_fetched as usize, data_chunks(&image));
}

#[test]
fn the_table_is_fetched_and_accepted_only_under_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let (path, image, _) = build_image(dir.path());
    let dist = Distribution::new();
    dist.register(
        SESSION,
        path,
        image.clone(),
        Instant::now() + Duration::from_secs(60),
    );
    let addr = start_service(&dist);
    let got = fetch_image(&config(addr, SESSION), image.id).unwrap();
    assert_eq!(got, image);

    // Another ID: the service refuses it for this session (and a service
    // that sent the table anyway would fail the hash check).
    let mut other = image.id;
    other[0] ^= 1;
    match fetch_image(&config(addr, SESSION), other) {
        Err(TableError::Refused { reason }) => assert!(reason.contains("image ID"), "{reason}"),
        r => panic!("{r:?}"),
    }
    match fetch_image(&config(addr, [9; 32]), image.id) {
        Err(TableError::Refused { reason }) => {
            assert!(reason.contains("unknown or expired"), "{reason}")
        }
        r => panic!("{r:?}"),
    }
}
