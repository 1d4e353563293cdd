//! The control protocol's messages: what an agent and the Controller say to
//! each other inside the authenticated channel (`channel.rs`), one message
//! per frame (`frame.rs`).
//!
//! Each message is `postcard`-encoded after a `u16` protocol version. A
//! message with another version, an unknown variant, trailing bytes, or a
//! body larger than a frame can hold is an error, never a panic. See
//! `docs/protocol.md` for the exchange.

use serde::{Deserialize, Serialize};

use crate::inventory::{Inventory, MacAddr};

/// Bumped on any incompatible change to the messages below.
pub const PROTOCOL_VERSION: u16 = 4;
/// Largest plaintext message: a frame minus the AEAD tag.
pub const MAX_MESSAGE: usize = crate::frame::MAX_FRAME - 16;
/// Longest log line or step output an agent sends (longer text is cut).
pub const MAX_TEXT: usize = 8 * 1024;

/// A job's step, as both sides name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StepRef {
    pub job: u64,
    pub step: u32,
}

/// Who the agent says it is. The Controller recognises a device by SMBIOS
/// UUID, else by any of its MACs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub uuid: Option<String>,
    pub serial: Option<String>,
    pub macs: Vec<MacAddr>,
}

impl Identity {
    pub fn from_inventory(inv: &Inventory) -> Identity {
        Identity {
            uuid: inv.system.uuid.clone(),
            serial: inv.system.serial.clone(),
            macs: inv.nics.iter().map(|n| n.mac).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub agent_version: String,
    /// Random per boot: tells a reconnect from a reboot.
    pub boot_id: u64,
    pub identity: Identity,
    pub inventory: Inventory,
    /// A step still running from before a reconnect.
    pub running: Option<StepRef>,
}

/// The work of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Take the inventory again and send it.
    Inventory,
    /// Sleep this many seconds (tests, staging).
    Wait {
        secs: u32,
    },
    Reboot,
    Poweroff,
    /// Return the text: a test step.
    Echo {
        text: String,
    },
    /// Write an image to a disk: pull its chunks from the Image
    /// Distribution service at `service` with `session`. The chunk table is
    /// fetched from the service too and must hash to `image_id` (which
    /// comes over this authenticated channel, so the table is trusted).
    Deploy {
        /// `GROUP/NAME`, for messages.
        image: String,
        /// The disk selector text (`serial=…`, `auto`, `file=…`, ...).
        disk: String,
        /// `HOST:PORT` of the distribution service.
        service: String,
        session: [u8; 32],
        /// SHA-256 of the image's chunk table.
        image_id: [u8; 32],
        /// Join this multicast session; `None`: pull by unicast only.
        multicast: Option<Box<MulticastOffer>>,
    },
}

/// A multicast session as the Controller hands it to one agent: everything
/// the agent needs to receive, decrypt and report (`docs/multicast.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MulticastOffer {
    /// `GROUP:PORT`, e.g. `239.255.0.1:40000`.
    pub group: String,
    /// `HOST:PORT` of the sender's unicast socket (reports go there).
    pub sender: String,
    pub session: u64,
    /// The session key (data keys are derived from it).
    pub key: [u8; 32],
    pub cipher: crate::multicast::Cipher,
    /// This agent's receiver ID in the session.
    pub receiver: u32,
    /// Block payload bytes (from the session's MTU).
    pub payload: u32,
    /// The session starts at the latest this many seconds after it was set
    /// up; no data for this long plus a margin means multicast does not
    /// reach this agent and it pulls by unicast.
    pub start_within_secs: u32,
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Inventory => "inventory",
            Step::Wait { .. } => "wait",
            Step::Reboot => "reboot",
            Step::Poweroff => "poweroff",
            Step::Echo { .. } => "echo",
            Step::Deploy { .. } => "deploy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Succeeded {
        output: String,
        inventory: Option<Inventory>,
    },
    Failed {
        reason: String,
    },
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Enrolment {
    /// May be given jobs.
    Approved,
    /// Recorded, waiting for an admin (`shoalctl devices approve`); no jobs.
    Pending,
}

/// Agent → Controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// First message after the handshake, and after every reconnect.
    Hello(Hello),
    Heartbeat {
        seq: u64,
        running: Option<StepRef>,
    },
    /// The offer was taken and the step started.
    Started {
        step: StepRef,
    },
    Progress {
        step: StepRef,
        done: u64,
        total: u64,
        text: String,
    },
    Finished {
        step: StepRef,
        outcome: Outcome,
    },
    /// The offer was refused: the agent is running another step.
    Busy {
        offered: StepRef,
        running: StepRef,
    },
    Log {
        level: Level,
        text: String,
    },
    Error {
        text: String,
    },
}

/// Controller → Agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerMsg {
    Welcome {
        device: u64,
        enrolment: Enrolment,
        heartbeat_ms: u32,
        timeout_ms: u32,
    },
    Offer {
        step: StepRef,
        work: Step,
        timeout_ms: u32,
    },
    Cancel {
        step: StepRef,
    },
    Error {
        text: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("protocol version {got}, expected {PROTOCOL_VERSION}")]
    Version { got: u16 },
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE}")]
    Oversized(usize),
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

/// Encodes a message with the protocol version in front.
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, MessageError> {
    let bytes = postcard::to_allocvec(&(PROTOCOL_VERSION, msg))
        .map_err(|e| MessageError::Decode(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE {
        return Err(MessageError::Oversized(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes a message, checking the version first.
pub fn decode<'de, M: Deserialize<'de>>(bytes: &'de [u8]) -> Result<M, MessageError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(MessageError::Oversized(bytes.len()));
    }
    let (version, rest): (u16, _) =
        postcard::take_from_bytes(bytes).map_err(|e| MessageError::Decode(e.to_string()))?;
    if version != PROTOCOL_VERSION {
        return Err(MessageError::Version { got: version });
    }
    let (msg, rest) =
        postcard::take_from_bytes(rest).map_err(|e| MessageError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(MessageError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// Cuts text to at most `MAX_TEXT` bytes on a character boundary.
pub fn clip(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_owned();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> AgentMsg {
        AgentMsg::Hello(Hello {
            agent_version: "0.1.0".into(),
            boot_id: 42,
            identity: Identity {
                uuid: Some("u".into()),
                serial: None,
                macs: vec![MacAddr([2, 0, 0, 0, 0, 1])],
            },
            inventory: Inventory::default(),
            running: None,
        })
    }

    #[test]
    fn messages_round_trip() {
        let msgs = [
            hello(),
            AgentMsg::Heartbeat {
                seq: 7,
                running: Some(StepRef { job: 1, step: 2 }),
            },
            AgentMsg::Finished {
                step: StepRef { job: 1, step: 0 },
                outcome: Outcome::Succeeded {
                    output: "hi".into(),
                    inventory: None,
                },
            },
        ];
        for m in msgs {
            assert_eq!(decode::<AgentMsg>(&encode(&m).unwrap()).unwrap(), m);
        }
        let offer = ControllerMsg::Offer {
            step: StepRef { job: 3, step: 1 },
            work: Step::Echo { text: "x".into() },
            timeout_ms: 5,
        };
        assert_eq!(
            decode::<ControllerMsg>(&encode(&offer).unwrap()).unwrap(),
            offer
        );
        let deploy = ControllerMsg::Offer {
            step: StepRef { job: 4, step: 0 },
            work: Step::Deploy {
                image: "lab/disk".into(),
                disk: "auto".into(),
                service: "10.0.0.1:7001".into(),
                session: [7; 32],
                image_id: [9; 32],
                multicast: Some(Box::new(MulticastOffer {
                    group: "239.255.0.1:40000".into(),
                    sender: "10.0.0.1:40001".into(),
                    session: 5,
                    key: [3; 32],
                    cipher: crate::multicast::Cipher::Rc4,
                    receiver: 2,
                    payload: 1424,
                    start_within_secs: 30,
                })),
            },
            timeout_ms: 3_600_000,
        };
        assert_eq!(
            decode::<ControllerMsg>(&encode(&deploy).unwrap()).unwrap(),
            deploy
        );
    }

    #[test]
    fn version_trailing_and_unknown_variants_are_errors() {
        let mut bytes = encode(&hello()).unwrap();
        bytes[0] = 9;
        assert_eq!(
            decode::<AgentMsg>(&bytes),
            Err(MessageError::Version { got: 9 })
        );
        let mut bytes = encode(&AgentMsg::Error { text: "x".into() }).unwrap();
        bytes.push(0);
        assert_eq!(decode::<AgentMsg>(&bytes), Err(MessageError::Trailing(1)));
        assert!(matches!(
            decode::<AgentMsg>(&[PROTOCOL_VERSION as u8, 99]),
            Err(MessageError::Decode(_))
        ));
        assert!(matches!(
            decode::<AgentMsg>(&[]),
            Err(MessageError::Decode(_))
        ));
        let big = AgentMsg::Log {
            level: Level::Info,
            text: "x".repeat(MAX_MESSAGE),
        };
        assert!(matches!(encode(&big), Err(MessageError::Oversized(_))));
    }

    #[test]
    fn clip_cuts_on_a_char_boundary() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(MAX_TEXT);
        let c = clip(&long);
        assert!(c.len() <= MAX_TEXT + 3 && c.ends_with('…'));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<AgentMsg>(&data);
            let _ = decode::<ControllerMsg>(&data);
        }
    }
}
