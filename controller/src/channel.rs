//! One agent connection's bytes: length-delimited frames
//! (`shoal_protocol::frame`) read from and written to the TCP stream, and,
//! after the handshake, each frame opened or sealed by the Noise transport
//! and decoded as a control message.
//!
//! Reading is cancel-safe (the frame decoder keeps partial input between
//! calls), so the session can `select!` on it. Every failure is a
//! [`ConnError`]; none panics, whatever the peer sends.

use std::time::Duration;

use shoal_protocol::channel::{ChannelError, Transport};
use shoal_protocol::control::{self, AgentMsg, ControllerMsg, MessageError};
use shoal_protocol::frame::{self, FrameError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// How long one frame may take to send before the connection is given up.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("oversized frame: {0} bytes, the limit is {max}", max = frame::MAX_FRAME)]
    Oversized(usize),
    #[error("empty frame")]
    Empty,
    #[error("connection closed in the middle of a frame ({0} bytes held)")]
    Truncated(usize),
    #[error("read failed")]
    Read(#[source] std::io::Error),
    #[error("send failed")]
    Write(#[source] std::io::Error),
    #[error("send timed out after {}s", SEND_TIMEOUT.as_secs())]
    WriteTimeout,
    #[error("frame failed authentication (tampered, replayed, or out of order)")]
    Authentication,
    #[error("cannot seal a message")]
    Seal(#[source] ChannelError),
    #[error("bad message")]
    Message(#[source] MessageError),
    #[error("cannot encode a message")]
    Encode(#[source] MessageError),
}

fn frame_error(e: FrameError) -> ConnError {
    match e {
        FrameError::Oversized(n) => ConnError::Oversized(n),
        FrameError::Empty => ConnError::Empty,
    }
}

/// Frames from the read half of a connection.
#[derive(Debug)]
pub struct FrameReader {
    rd: OwnedReadHalf,
    dec: frame::Decoder,
    buf: Vec<u8>,
}

impl FrameReader {
    /// The next frame; `None` when the peer closed cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, ConnError> {
        loop {
            if let Some(f) = self.dec.next_frame().map_err(frame_error)? {
                return Ok(Some(f));
            }
            let n = self.rd.read(&mut self.buf).await.map_err(ConnError::Read)?;
            if n == 0 {
                return match self.dec.pending() {
                    0 => Ok(None),
                    held => Err(ConnError::Truncated(held)),
                };
            }
            self.dec.push(&self.buf[..n]);
        }
    }
}

/// Frames to the write half of a connection.
#[derive(Debug)]
pub struct FrameWriter {
    wr: OwnedWriteHalf,
}

impl FrameWriter {
    pub async fn send(&mut self, body: &[u8]) -> Result<(), ConnError> {
        let bytes = frame::to_vec(body).map_err(frame_error)?;
        match tokio::time::timeout(SEND_TIMEOUT, self.wr.write_all(&bytes)).await {
            Ok(r) => r.map_err(ConnError::Write),
            Err(_) => Err(ConnError::WriteTimeout),
        }
    }
}

/// Splits a connection into framed halves.
pub fn framed(stream: TcpStream) -> (FrameReader, FrameWriter) {
    let (rd, wr) = stream.into_split();
    let reader = FrameReader {
        rd,
        dec: frame::Decoder::new(),
        buf: vec![0u8; 4096],
    };
    (reader, FrameWriter { wr })
}

/// An established, authenticated channel to one agent.
#[derive(Debug)]
pub struct Channel {
    pub reader: FrameReader,
    pub writer: FrameWriter,
    pub transport: Transport,
}

impl Channel {
    /// The next message; `None` when the agent closed cleanly.
    pub async fn recv(&mut self) -> Result<Option<AgentMsg>, ConnError> {
        let Some(sealed) = self.reader.next().await? else {
            return Ok(None);
        };
        let plain = self
            .transport
            .open(&sealed)
            .map_err(|_| ConnError::Authentication)?;
        control::decode::<AgentMsg>(&plain)
            .map(Some)
            .map_err(ConnError::Message)
    }

    pub async fn send(&mut self, msg: &ControllerMsg) -> Result<(), ConnError> {
        let plain = control::encode(msg).map_err(ConnError::Encode)?;
        let sealed = self.transport.seal(&plain).map_err(ConnError::Seal)?;
        self.writer.send(&sealed).await
    }
}
