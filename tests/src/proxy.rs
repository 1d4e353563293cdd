//! A TCP proxy for control-channel tests that can alter one frame from the
//! agent (to prove a tampered frame is refused), built on the protocol
//! crate's frame decoder. Controller-to-agent bytes pass unchanged.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_protocol::frame;

#[derive(Debug)]
pub struct Proxy {
    pub addr: String,
    stop: Arc<AtomicBool>,
    /// Frames altered so far.
    pub tampered: Arc<AtomicUsize>,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`. On every
    /// connection, the agent's frame number `tamper_frame` (0 = handshake
    /// message 1, 1 = the first encrypted message) gets one bit flipped.
    pub fn start(upstream: &str, tamper_frame: Option<usize>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let tampered = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (s, t, c, up) = (
            stop.clone(),
            tampered.clone(),
            connections.clone(),
            upstream.to_owned(),
        );
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((agent, _)) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        let Ok(ctl) = TcpStream::connect(&up) else {
                            continue;
                        };
                        agent.set_nonblocking(false).unwrap();
                        let (a2, c2) = (agent.try_clone().unwrap(), ctl.try_clone().unwrap());
                        std::thread::spawn(move || copy(c2, a2));
                        let t = t.clone();
                        std::thread::spawn(move || forward_frames(agent, ctl, tamper_frame, &t));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Proxy {
            addr,
            stop,
            tampered,
            connections,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16384];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

fn forward_frames(
    mut agent: TcpStream,
    mut ctl: TcpStream,
    tamper: Option<usize>,
    count: &AtomicUsize,
) {
    let mut dec = frame::Decoder::new();
    let mut buf = [0u8; 16384];
    let mut index = 0;
    loop {
        let n = match agent.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        while let Ok(Some(mut body)) = dec.next_frame() {
            if Some(index) == tamper {
                let last = body.len() - 1;
                body[last] ^= 0x01;
                count.fetch_add(1, Ordering::Relaxed);
            }
            index += 1;
            if ctl.write_all(&frame::to_vec(&body).unwrap()).is_err() {
                return;
            }
        }
    }
    let _ = ctl.shutdown(Shutdown::Both);
}
