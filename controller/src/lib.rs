//! Shoal's Controller as a library: the agents' control channel, device
//! records, the job engine, the admin API, and the client `shoalctl` uses.
//!
//! The binaries are thin: `shoal-controller` (`src/main.rs`) parses its
//! command line and runs a [`Server`]; `shoalctl` (`src/bin/shoalctl.rs`)
//! talks to the admin API through [`client`]. Tests start a [`Server`] in
//! process on ephemeral ports. See `docs/controller.md`.
//!
//! Map: `state` (the state directory: keys, secret, admin token), `db`
//! (SQLite: migrations, devices, jobs, logs), `agents` (listener and
//! handshake), `channel` (frames and sealed messages on one connection),
//! `session` (one connected device: enrolment, heartbeats, step offers),
//! `registry` (which device has which live session), `admin` (HTTP API),
//! `api` (its JSON bodies), `jobs` and `model` (the job model and states),
//! `store` (the image store: groups, images, ACLs; its endpoints).

#![forbid(unsafe_code)]

pub mod admin;
pub mod agents;
pub mod api;
pub mod channel;
pub mod client;
pub mod db;
pub mod distribution;
pub mod jobs;
pub mod logging;
pub mod model;
pub mod registry;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod table;
pub mod time;

pub use server::{Config, Server};

/// An error and its `source()` chain on one line, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
