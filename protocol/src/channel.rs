//! The authenticated control channel: Noise `IKpsk1` (via the `snow` crate;
//! no hand-rolled cryptography), X25519, ChaCha20-Poly1305, BLAKE2s.
//!
//! - The agent is the initiator and pins the Controller's static public key
//!   (`shoal.controller_key=`): an impostor Controller cannot read message 1
//!   and so cannot answer it.
//! - The site enrolment secret is the pre-shared key, mixed in at the end of
//!   message 1: the Controller refuses an agent without it at once.
//! - Each side contributes an ephemeral key: forward secrecy.
//! - Transport messages carry implicit, strictly increasing nonces, so a
//!   replayed, reordered or altered frame fails authentication.
//! - A replayed message 1 is caught by the Controller's memory of initiator
//!   ephemeral keys (`ReplayGuard`); even if it were not, the replayer could
//!   not finish the handshake or produce a single transport message.
//!
//! Sans-I/O: these types turn handshake and transport bytes into keys and
//! plaintext; the agent and Controller move the bytes. Threat model:
//! `docs/security.md`.

use std::collections::{HashSet, VecDeque};

pub const NOISE_PARAMS: &str = "Noise_IKpsk1_25519_ChaChaPoly_BLAKE2s";
pub const KEY_LEN: usize = 32;
/// Handshake message 1 starts with the initiator's ephemeral public key in clear.
pub const EPHEMERAL_LEN: usize = 32;

pub type PublicKey = [u8; KEY_LEN];
pub type Psk = [u8; KEY_LEN];

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(
        "handshake failed: the peer has another enrolment secret or pins another controller key"
    )]
    Refused,
    #[error("message failed authentication (tampered, replayed, or out of order)")]
    Authentication,
    #[error("malformed handshake message ({0} bytes)")]
    Malformed(usize),
    #[error("replayed handshake: this initiator ephemeral key was seen before")]
    Replayed,
    #[error("noise: {0}")]
    Noise(String),
    #[error("not a {KEY_LEN}-byte key in hex: {0:?}")]
    BadKey(String),
}

fn noise(e: snow::Error) -> ChannelError {
    ChannelError::Noise(e.to_string())
}

fn params() -> snow::params::NoiseParams {
    NOISE_PARAMS.parse().expect("valid noise parameters")
}

/// A static X25519 key pair.
#[derive(Clone)]
pub struct Keypair {
    pub private: [u8; KEY_LEN],
    pub public: PublicKey,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Keypair {{ public: {}, private: <hidden> }}",
            to_hex(&self.public)
        )
    }
}

impl Keypair {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Result<Keypair, ChannelError> {
        let kp = snow::Builder::new(params())
            .generate_keypair()
            .map_err(noise)?;
        Ok(Keypair {
            private: to_key(&kp.private)?,
            public: to_key(&kp.public)?,
        })
    }

    /// Rebuilds a key pair from its private half (the public half is derived).
    pub fn from_private(private: [u8; KEY_LEN]) -> Result<Keypair, ChannelError> {
        // Run a throwaway handshake to learn the public key snow derives;
        // it keeps this module free of any curve arithmetic of its own.
        let probe = Keypair::generate()?;
        let mut init = snow::Builder::new(params())
            .local_private_key(&private)
            .and_then(|b| b.remote_public_key(&probe.public))
            .and_then(|b| b.psk(1, &[0u8; KEY_LEN]))
            .and_then(|b| b.build_initiator())
            .map_err(noise)?;
        let mut resp = snow::Builder::new(params())
            .local_private_key(&probe.private)
            .and_then(|b| b.psk(1, &[0u8; KEY_LEN]))
            .and_then(|b| b.build_responder())
            .map_err(noise)?;
        let mut m1 = [0u8; 256];
        let n = init.write_message(&[], &mut m1).map_err(noise)?;
        resp.read_message(&m1[..n], &mut [0u8; 256])
            .map_err(noise)?;
        let public = to_key(resp.get_remote_static().ok_or(ChannelError::Malformed(n))?)?;
        Ok(Keypair { private, public })
    }
}

fn to_key(b: &[u8]) -> Result<[u8; KEY_LEN], ChannelError> {
    b.try_into().map_err(|_| ChannelError::Malformed(b.len()))
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses 64 hex digits into a key.
pub fn key_from_hex(s: &str) -> Result<[u8; KEY_LEN], ChannelError> {
    let s = s.trim();
    let bad = || ChannelError::BadKey(s.chars().take(80).collect());
    if s.len() != KEY_LEN * 2 || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; KEY_LEN];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// The agent's side of the handshake.
pub struct Initiator {
    hs: snow::HandshakeState,
}

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Initiator")
    }
}

impl Initiator {
    /// Starts a handshake to the Controller whose key is `controller`;
    /// returns the state and message 1 to send.
    pub fn start(
        local: &Keypair,
        controller: &PublicKey,
        psk: &Psk,
    ) -> Result<(Initiator, Vec<u8>), ChannelError> {
        let mut hs = snow::Builder::new(params())
            .local_private_key(&local.private)
            .and_then(|b| b.remote_public_key(controller))
            .and_then(|b| b.psk(1, psk))
            .and_then(|b| b.build_initiator())
            .map_err(noise)?;
        let mut buf = vec![0u8; 1024];
        let n = hs.write_message(&[], &mut buf).map_err(noise)?;
        buf.truncate(n);
        Ok((Initiator { hs }, buf))
    }

    /// Reads message 2; a Controller without the pinned key or the secret
    /// cannot produce one that passes.
    pub fn finish(mut self, msg2: &[u8]) -> Result<Transport, ChannelError> {
        let mut buf = vec![0u8; 1024];
        self.hs
            .read_message(msg2, &mut buf)
            .map_err(|_| ChannelError::Refused)?;
        Ok(Transport {
            ts: self.hs.into_transport_mode().map_err(noise)?,
            remote: None,
        })
    }
}

/// The Controller's side: reads message 1, returns the transport, message 2,
/// and the agent's static key.
pub fn respond(
    local: &Keypair,
    psk: &Psk,
    msg1: &[u8],
) -> Result<(Transport, Vec<u8>), ChannelError> {
    if msg1.len() < EPHEMERAL_LEN {
        return Err(ChannelError::Malformed(msg1.len()));
    }
    let mut hs = snow::Builder::new(params())
        .local_private_key(&local.private)
        .and_then(|b| b.psk(1, psk))
        .and_then(|b| b.build_responder())
        .map_err(noise)?;
    let mut payload = vec![0u8; 1024];
    hs.read_message(msg1, &mut payload)
        .map_err(|_| ChannelError::Refused)?;
    let remote = hs.get_remote_static().map(to_key).transpose()?;
    let mut buf = vec![0u8; 1024];
    let n = hs.write_message(&[], &mut buf).map_err(noise)?;
    buf.truncate(n);
    Ok((
        Transport {
            ts: hs.into_transport_mode().map_err(noise)?,
            remote,
        },
        buf,
    ))
}

/// An established channel: seal and open transport messages in order.
pub struct Transport {
    ts: snow::TransportState,
    remote: Option<PublicKey>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("remote", &self.remote.map(|k| to_hex(&k)))
            .finish()
    }
}

impl Transport {
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, ChannelError> {
        let mut buf = vec![0u8; plaintext.len() + 16];
        let n = self.ts.write_message(plaintext, &mut buf).map_err(noise)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn open(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, ChannelError> {
        let mut buf = vec![0u8; ciphertext.len()];
        let n = self
            .ts
            .read_message(ciphertext, &mut buf)
            .map_err(|_| ChannelError::Authentication)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// The agent's static public key (on the Controller's side).
    pub fn remote_static(&self) -> Option<PublicKey> {
        self.remote
    }
}

/// Remembers the initiator ephemeral keys of recent handshakes (bounded, oldest
/// forgotten first) so that a replayed message 1 is refused by name.
#[derive(Debug)]
pub struct ReplayGuard {
    seen: HashSet<[u8; EPHEMERAL_LEN]>,
    order: VecDeque<[u8; EPHEMERAL_LEN]>,
    capacity: usize,
}

impl ReplayGuard {
    pub fn new(capacity: usize) -> Self {
        ReplayGuard {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records message 1's ephemeral key; `Err(Replayed)` if seen before.
    pub fn check(&mut self, msg1: &[u8]) -> Result<(), ChannelError> {
        let key: [u8; EPHEMERAL_LEN] = msg1
            .get(..EPHEMERAL_LEN)
            .and_then(|k| k.try_into().ok())
            .ok_or(ChannelError::Malformed(msg1.len()))?;
        if !self.seen.insert(key) {
            return Err(ChannelError::Replayed);
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Keypair, Keypair, Psk) {
        (
            Keypair::generate().unwrap(),
            Keypair::generate().unwrap(),
            [7u8; 32],
        )
    }

    #[test]
    fn handshake_and_transport_both_ways() {
        let (agent, ctl, psk) = pair();
        let (init, m1) = Initiator::start(&agent, &ctl.public, &psk).unwrap();
        let (mut c, m2) = respond(&ctl, &psk, &m1).unwrap();
        assert_eq!(c.remote_static(), Some(agent.public));
        let mut a = init.finish(&m2).unwrap();
        let sealed = a.seal(b"hello").unwrap();
        assert_ne!(&sealed[..5], b"hello");
        assert_eq!(c.open(&sealed).unwrap(), b"hello");
        assert_eq!(a.open(&c.seal(b"welcome").unwrap()).unwrap(), b"welcome");
    }

    #[test]
    fn wrong_secret_is_refused_by_the_controller() {
        let (agent, ctl, psk) = pair();
        let (_, m1) = Initiator::start(&agent, &ctl.public, &[8u8; 32]).unwrap();
        assert!(matches!(
            respond(&ctl, &psk, &m1),
            Err(ChannelError::Refused)
        ));
    }

    #[test]
    fn wrong_pinned_key_is_refused() {
        let (agent, ctl, psk) = pair();
        let impostor = Keypair::generate().unwrap();
        let (_, m1) = Initiator::start(&agent, &ctl.public, &psk).unwrap();
        // The impostor cannot read a message meant for the real controller.
        assert!(matches!(
            respond(&impostor, &psk, &m1),
            Err(ChannelError::Refused)
        ));
        // And an agent pinning the impostor cannot talk to the real one.
        let (_, m1) = Initiator::start(&agent, &impostor.public, &psk).unwrap();
        assert!(matches!(
            respond(&ctl, &psk, &m1),
            Err(ChannelError::Refused)
        ));
    }

    fn session() -> (Transport, Transport) {
        let (agent, ctl, psk) = pair();
        let (init, m1) = Initiator::start(&agent, &ctl.public, &psk).unwrap();
        let (c, m2) = respond(&ctl, &psk, &m1).unwrap();
        (init.finish(&m2).unwrap(), c)
    }

    #[test]
    fn tampered_frames_fail() {
        let (mut a, mut c) = session();
        let mut bad = a.seal(b"one").unwrap();
        bad[0] ^= 1;
        assert!(matches!(c.open(&bad), Err(ChannelError::Authentication)));
    }

    #[test]
    fn replayed_and_reordered_frames_fail() {
        let (mut a, mut c) = session();
        let f1 = a.seal(b"one").unwrap();
        let f2 = a.seal(b"two").unwrap();
        assert!(c.open(&f2).is_err(), "out of order");
        let (mut a, mut c) = session();
        let f1b = a.seal(b"one").unwrap();
        assert!(c.open(&f1).is_err(), "a frame from another session");
        assert_eq!(c.open(&f1b).unwrap(), b"one");
        assert!(c.open(&f1b).is_err(), "replayed");
    }

    #[test]
    fn replay_guard_catches_a_second_message_one() {
        let (agent, ctl, psk) = pair();
        let (_, m1) = Initiator::start(&agent, &ctl.public, &psk).unwrap();
        let mut g = ReplayGuard::new(2);
        g.check(&m1).unwrap();
        assert!(matches!(g.check(&m1), Err(ChannelError::Replayed)));
        assert!(matches!(
            g.check(&[0u8; 3]),
            Err(ChannelError::Malformed(3))
        ));
        // Bounded: old keys are forgotten.
        g.check(&[1u8; 32]).unwrap();
        g.check(&[2u8; 32]).unwrap();
        g.check(&m1).unwrap();
    }

    #[test]
    fn keys_in_hex_and_from_private() {
        let kp = Keypair::generate().unwrap();
        assert_eq!(key_from_hex(&to_hex(&kp.public)).unwrap(), kp.public);
        assert!(key_from_hex("abc").is_err());
        assert!(key_from_hex(&"zz".repeat(32)).is_err());
        assert_eq!(Keypair::from_private(kp.private).unwrap().public, kp.public);
    }
}
