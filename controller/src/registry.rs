//! Which device has a live session, and a way to reach it: the admin API
//! and the job engine nudge sessions (`Kick`: look for work; `Approved`;
//! `CancelJob`; `Close`) through the registry.
//!
//! It also gathers when each device was last heard from; the server writes
//! that to the database once a second in one transaction, rather than on
//! every heartbeat of every device.
//!
//! A device has at most one session. A new connection from a device that
//! still has one replaces it (the old is told to close). Registering and
//! unregistering hold the registry's lock across the device-state write,
//! so an old session going away never marks a freshly reconnected device
//! offline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, Mutex};

use crate::db::{DbError, Store};
use crate::model::DeviceState;

/// What a session can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// New work may be queued for the device: look for it.
    Kick,
    /// An admin approved the pending device.
    Approved,
    /// An admin cancelled this job: stop its step if it is the current one.
    CancelJob(i64),
    /// Close the connection for this reason.
    Close(String),
}

#[derive(Debug)]
struct Entry {
    session: u64,
    peer: SocketAddr,
    tx: mpsc::UnboundedSender<Cmd>,
}

#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<i64, Entry>>,
    next: AtomicU64,
    /// Device → last message time (ms) not yet written to the database.
    seen: std::sync::Mutex<HashMap<i64, i64>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers a session for `device` and marks it ready; an older
    /// session of the same device is told to close. Returns the session id.
    pub async fn register(
        &self,
        device: i64,
        peer: SocketAddr,
        tx: mpsc::UnboundedSender<Cmd>,
        store: &Store,
    ) -> Result<u64, DbError> {
        let session = self.next.fetch_add(1, Ordering::Relaxed);
        let mut map = self.sessions.lock().await;
        store
            .call(move |db| db.set_device_state(device, DeviceState::Ready))
            .await?;
        if let Some(old) = map.insert(device, Entry { session, peer, tx }) {
            let _ = old.tx.send(Cmd::Close(format!(
                "replaced by a new connection from {peer}"
            )));
            log::info!(
                "device {device}: new connection from {peer} replaces the one from {}",
                old.peer
            );
        }
        Ok(session)
    }

    /// Removes the session if it is still the device's and marks the
    /// device offline; `false` if another session had replaced it.
    pub async fn unregister(
        &self,
        device: i64,
        session: u64,
        store: &Store,
    ) -> Result<bool, DbError> {
        let mut map = self.sessions.lock().await;
        if map.get(&device).map(|e| e.session) != Some(session) {
            return Ok(false);
        }
        map.remove(&device);
        store
            .call(move |db| db.set_device_state(device, DeviceState::Offline))
            .await?;
        Ok(true)
    }

    /// Tells the device's session `cmd`; `false` if it has none.
    pub async fn send(&self, device: i64, cmd: Cmd) -> bool {
        let map = self.sessions.lock().await;
        map.get(&device).is_some_and(|e| e.tx.send(cmd).is_ok())
    }

    /// Notes a message from `device` at `now` (ms).
    pub fn seen(&self, device: i64, now: i64) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device, now);
    }

    /// The last-seen times noted since the previous call.
    pub fn take_seen(&self) -> Vec<(i64, i64)> {
        let mut map = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        map.drain().collect()
    }

    pub async fn online(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.sessions.lock().await.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}
