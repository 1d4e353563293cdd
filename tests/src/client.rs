//! A minimal control-channel client for tests that need to misbehave on
//! purpose (replay a handshake, send garbage): the real protocol crate,
//! blocking sockets, no retry.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use shoal_protocol::channel::{key_from_hex, Initiator, Keypair, Transport};
use shoal_protocol::control::{self, AgentMsg, ControllerMsg};
use shoal_protocol::frame;

/// The keys an agent needs, from `shoal-controller keys`' command line.
#[derive(Debug, Clone)]
pub struct Keys {
    pub controller: [u8; 32],
    pub psk: [u8; 32],
}

impl Keys {
    pub fn from_cmdline(cmdline: &str) -> Keys {
        let get = |k: &str| {
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("{k} missing from {cmdline:?}"))
                .to_owned()
        };
        Keys {
            controller: key_from_hex(&get("shoal.controller_key=")).unwrap(),
            psk: key_from_hex(&get("shoal.enrol_key=")).unwrap(),
        }
    }
}

/// Reads one frame; `None` on EOF or timeout.
pub fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut dec = frame::Decoder::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(Some(f)) = dec.next_frame() {
            return Some(f);
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => dec.push(&buf[..n]),
        }
    }
}

#[derive(Debug)]
pub struct Session {
    pub stream: TcpStream,
    pub transport: Transport,
    /// Handshake message 1 as sent (for replay tests).
    pub msg1: Vec<u8>,
}

/// Connects and completes the handshake.
pub fn connect(addr: &str, keys: &Keys) -> Result<Session, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let local = Keypair::generate().unwrap();
    let (init, msg1) = Initiator::start(&local, &keys.controller, &keys.psk).unwrap();
    stream
        .write_all(&frame::to_vec(&msg1).unwrap())
        .map_err(|e| e.to_string())?;
    let msg2 = read_frame(&mut stream)
        .ok_or("no handshake message 2: the controller closed the connection")?;
    let transport = init.finish(&msg2).map_err(|e| e.to_string())?;
    Ok(Session {
        stream,
        transport,
        msg1,
    })
}

impl Session {
    pub fn send(&mut self, msg: &AgentMsg) -> std::io::Result<()> {
        let sealed = self.transport.seal(&control::encode(msg).unwrap()).unwrap();
        self.stream.write_all(&frame::to_vec(&sealed).unwrap())
    }

    pub fn recv(&mut self) -> Option<ControllerMsg> {
        let f = read_frame(&mut self.stream)?;
        let plain = self.transport.open(&f).ok()?;
        control::decode(&plain).ok()
    }
}
