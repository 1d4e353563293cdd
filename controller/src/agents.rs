//! The agent listener: accepts TCP connections, runs the responder side of
//! the Noise `IKpsk1` handshake (`shoal_protocol::channel`), and reads the
//! agent's first message, which must be `Hello`; the session
//! (`session.rs`) takes it from there.
//!
//! Per connection: handshake message 1 must arrive within 10 s; its
//! initiator ephemeral key goes through the shared `ReplayGuard` (a replay
//! is refused by name); `respond` refuses an agent without the enrolment
//! secret or pinning another key. Whatever a peer sends (garbage, a
//! truncated or oversized frame, a tampered message) ends that connection
//! with one log line naming the peer; nothing panics and the listener
//! carries on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use shoal_protocol::channel::{self, to_hex};
use shoal_protocol::control::AgentMsg;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::channel::{framed, Channel, ConnError};
use crate::error_chain;
use crate::server::Shared;

/// Time for handshake message 1, and then for the `Hello`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open agent connections at most; more are refused.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Longest wait for a handshake slot; an agent gives up on message 2 after
/// about this long, so answering later is wasted work.
pub const HANDSHAKE_QUEUE: Duration = Duration::from_secs(4);

/// Handshakes computed at once (each is four X25519 operations, run on the
/// blocking pool so a connection storm cannot starve heartbeats or the
/// admin API).
pub fn handshake_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Accepts agent connections until the task is aborted (which also ends
/// every connection it started).
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        warn!("connection from {peer} refused: {MAX_CONNECTIONS} connections already open");
                        continue;
                    };
                    let shared = shared.clone();
                    conns.spawn(async move {
                        connection(shared, stream, peer).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!("accepting an agent connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Logs why a connection is being closed, once.
pub fn log_conn_error(who: &str, e: &ConnError) {
    match e {
        ConnError::Authentication => {
            warn!(
                "{who}: frame failed authentication (tampered, replayed, or out of order); closing"
            )
        }
        other => warn!("{who}: {}; closing", error_chain(other)),
    }
}

/// The message's name for logs.
pub fn msg_name(m: &AgentMsg) -> &'static str {
    match m {
        AgentMsg::Hello(_) => "Hello",
        AgentMsg::Heartbeat { .. } => "Heartbeat",
        AgentMsg::Started { .. } => "Started",
        AgentMsg::Progress { .. } => "Progress",
        AgentMsg::Finished { .. } => "Finished",
        AgentMsg::Busy { .. } => "Busy",
        AgentMsg::Log { .. } => "Log",
        AgentMsg::Error { .. } => "Error",
    }
}

async fn connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| shared.distribution_addr);
    let (mut reader, mut writer) = framed(stream);
    let msg1 = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
        Err(_) => {
            info!(
                "connection from {peer} closed: no handshake within {}s",
                HANDSHAKE_TIMEOUT.as_secs()
            );
            return;
        }
        Ok(Ok(None)) => {
            info!("connection from {peer} closed before the handshake");
            return;
        }
        Ok(Err(e)) => {
            warn!(
                "connection from {peer} closed before the handshake: {}",
                error_chain(&e)
            );
            return;
        }
        Ok(Ok(Some(m))) => m,
    };
    let checked = shared
        .replay
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .check(&msg1);
    if let Err(e) = checked {
        warn!("handshake from {peer} refused: {e}");
        return;
    }
    let slot = match tokio::time::timeout(HANDSHAKE_QUEUE, shared.handshakes.acquire()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            warn!(
                "handshake from {peer} dropped: no handshake slot within {}s (the controller is overloaded)",
                HANDSHAKE_QUEUE.as_secs()
            );
            return;
        }
    };
    let keys = shared.clone();
    let responded =
        tokio::task::spawn_blocking(move || channel::respond(&keys.keypair, &keys.psk, &msg1))
            .await;
    drop(slot);
    let (transport, msg2) = match responded {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            warn!("handshake from {peer} refused: {e}");
            return;
        }
        Err(_) => {
            warn!("handshake from {peer}: the handshake task failed");
            return;
        }
    };
    if let Err(e) = writer.send(&msg2).await {
        warn!(
            "handshake from {peer}: cannot send message 2: {}",
            error_chain(&e)
        );
        return;
    }
    let agent_key = transport.remote_static().map(|k| to_hex(&k));
    let mut ch = Channel {
        reader,
        writer,
        transport,
    };
    let who = format!("agent at {peer}");
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, ch.recv()).await {
        Err(_) => {
            warn!(
                "{who}: no Hello within {}s; closing",
                HANDSHAKE_TIMEOUT.as_secs()
            );
            return;
        }
        Ok(Ok(None)) => {
            info!("{who} closed the connection before its Hello");
            return;
        }
        Ok(Err(e)) => {
            log_conn_error(&who, &e);
            return;
        }
        Ok(Ok(Some(AgentMsg::Hello(h)))) => h,
        Ok(Ok(Some(other))) => {
            warn!(
                "{who}: first message is {} instead of Hello; closing",
                msg_name(&other)
            );
            return;
        }
    };
    crate::session::run(shared, ch, peer, local, hello, agent_key).await;
}
