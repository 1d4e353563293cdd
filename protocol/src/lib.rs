//! Shoal's protocol crate: the messages the Deployment Agent and the
//! Controller exchange, their wire formats, and the image format.
//!
//! Architecture invariant: this crate knows nothing about sockets, files or
//! time. It turns bytes into validated values and values into bytes; the
//! agent and the controller do the I/O.

#![forbid(unsafe_code)]

pub mod channel;
pub mod control;
pub mod distribution;
pub mod frame;
pub mod image;
pub mod inventory;
pub mod multicast;

pub use inventory::Inventory;
