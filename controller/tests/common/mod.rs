//! Test helpers shared by the Controller's integration tests: a tiny agent
//! built from the protocol crate (handshake, frames, sealed messages), raw
//! frame I/O for hostile peers, log capture, and the admin client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use shoal_controller::client::Client;
use shoal_controller::{Config, Server};
use shoal_protocol::channel::{Initiator, Keypair, Psk, PublicKey, Transport};
use shoal_protocol::control::{self, AgentMsg, ControllerMsg, Hello, Identity};
use shoal_protocol::frame::{self, Decoder};
use shoal_protocol::inventory::{Inventory, MacAddr, Nic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const WAIT: Duration = Duration::from_secs(10);

// ---- log capture ----

struct Capture;

static LINES: OnceLock<Mutex<Vec<String>>> = OnceLock::new();

fn lines() -> &'static Mutex<Vec<String>> {
    LINES.get_or_init(|| Mutex::new(Vec::new()))
}

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target().starts_with("shoal_controller") && m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {}", r.level(), r.args());
            eprintln!("{line}");
            lines().lock().unwrap().push(line);
        }
    }
    fn flush(&self) {}
}

pub fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// Waits for a log line containing every one of `parts`; returns it.
pub async fn wait_log(parts: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(l) = lines()
            .lock()
            .unwrap()
            .iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return l.clone();
        }
        if tokio::time::Instant::now() > deadline {
            panic!("no log line with {parts:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn has_log(parts: &[&str]) -> bool {
    lines()
        .lock()
        .unwrap()
        .iter()
        .any(|l| parts.iter().all(|p| l.contains(p)))
}

// ---- server ----

pub struct TestServer {
    pub server: Server,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        capture_logs();
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start_in(dir.path(), tweak).await;
        TestServer { server, dir }
    }

    pub async fn start_in(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> Server {
        capture_logs();
        let mut config = Config::new(dir.join("state"), "127.0.0.1:0".parse().unwrap());
        config.admin = "127.0.0.1:0".parse().unwrap();
        config.heartbeat = Duration::from_millis(500);
        config.timeout = Duration::from_millis(5000);
        tweak(&mut config);
        Server::start(config).await.unwrap()
    }

    pub fn key(&self) -> PublicKey {
        self.server.public_key
    }

    pub fn psk(&self) -> Psk {
        self.server.shared.psk
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.agents_addr
    }

    /// Runs `f` with an admin client on the blocking pool.
    pub async fn api<T: Send + 'static>(&self, f: impl FnOnce(&Client) -> T + Send + 'static) -> T {
        api(&self.server, f).await
    }

    pub async fn agent(&self, uuid: &str, mac: u8) -> (TestAgent, u64) {
        let mut a = TestAgent::connect(self.addr(), &self.key(), &self.psk())
            .await
            .unwrap();
        a.send(&hello(uuid, mac)).await;
        match a.recv().await {
            ControllerMsg::Welcome { device, .. } => (a, device),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }
}

pub async fn api<T: Send + 'static>(
    server: &Server,
    f: impl FnOnce(&Client) -> T + Send + 'static,
) -> T {
    let client = Client::new(
        &format!("http://{}", server.admin_addr),
        &server.admin_token,
    );
    tokio::task::spawn_blocking(move || f(&client))
        .await
        .unwrap()
}

// ---- the test agent ----

pub fn hello(uuid: &str, mac: u8) -> AgentMsg {
    let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, mac]);
    let inventory = Inventory {
        nics: vec![Nic {
            name: "eth0".into(),
            mac,
            ..Nic::default()
        }],
        ..Inventory::default()
    };
    AgentMsg::Hello(Hello {
        agent_version: "test-agent".into(),
        boot_id: 7,
        identity: Identity {
            uuid: (!uuid.is_empty()).then(|| uuid.to_owned()),
            serial: Some("SER1".into()),
            macs: vec![mac],
        },
        inventory,
        running: None,
    })
}

pub async fn write_frame(s: &mut TcpStream, body: &[u8]) {
    s.write_all(&frame::to_vec(body).unwrap()).await.unwrap();
}

/// The next frame, `None` on EOF, reset, or after `WAIT`.
pub async fn read_frame(s: &mut TcpStream, dec: &mut Decoder) -> Option<Vec<u8>> {
    let fut = async {
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(Some(f)) = dec.next_frame() {
                return Some(f);
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => dec.push(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, fut).await.ok().flatten()
}

/// True once the peer closes the connection (within `WAIT`).
pub async fn closed(s: &mut TcpStream) -> bool {
    let fut = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, fut).await.unwrap_or(false)
}

pub struct TestAgent {
    pub stream: TcpStream,
    pub dec: Decoder,
    pub transport: Transport,
    pub local: SocketAddr,
    pub msg1: Vec<u8>,
}

impl TestAgent {
    /// Handshake as an agent with a fresh static key.
    pub async fn connect(
        addr: SocketAddr,
        controller: &PublicKey,
        psk: &Psk,
    ) -> Result<TestAgent, String> {
        let kp = Keypair::generate().unwrap();
        let (init, msg1) = Initiator::start(&kp, controller, psk).unwrap();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let local = stream.local_addr().unwrap();
        write_frame(&mut stream, &msg1).await;
        let mut dec = Decoder::new();
        let msg2 = read_frame(&mut stream, &mut dec)
            .await
            .ok_or_else(|| format!("{local}: connection closed during the handshake"))?;
        let transport = init.finish(&msg2).map_err(|e| e.to_string())?;
        Ok(TestAgent {
            stream,
            dec,
            transport,
            local,
            msg1,
        })
    }

    pub async fn send(&mut self, msg: &AgentMsg) {
        let sealed = self.transport.seal(&control::encode(msg).unwrap()).unwrap();
        write_frame(&mut self.stream, &sealed).await;
    }

    /// Sends `msg` with one ciphertext bit flipped.
    pub async fn send_tampered(&mut self, msg: &AgentMsg) {
        let mut sealed = self.transport.seal(&control::encode(msg).unwrap()).unwrap();
        sealed[0] ^= 1;
        write_frame(&mut self.stream, &sealed).await;
    }

    /// The next message within `d`; `Err` on timeout, `Ok(None)` on close.
    pub async fn recv_within(&mut self, d: Duration) -> Result<Option<ControllerMsg>, ()> {
        let fut = async {
            let mut buf = [0u8; 4096];
            loop {
                if let Ok(Some(f)) = self.dec.next_frame() {
                    let plain = self.transport.open(&f).unwrap();
                    return Some(control::decode::<ControllerMsg>(&plain).unwrap());
                }
                match self.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.dec.push(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(d, fut).await.map_err(|_| ())
    }

    pub async fn recv(&mut self) -> ControllerMsg {
        match self.recv_within(WAIT).await {
            Ok(Some(m)) => m,
            Ok(None) => panic!("{}: connection closed", self.local),
            Err(()) => panic!("{}: no message within {WAIT:?}", self.local),
        }
    }

    pub async fn closed(&mut self) -> bool {
        matches!(self.recv_within(WAIT).await, Ok(None))
    }
}
