//! The agent's disk side of a deploy: choosing the disk a step names
//! (`selector`), writing it with `O_DIRECT` in aligned pieces, zeroing holes,
//! flushing and re-reading the partition table (`writer`), and keeping track
//! of what is written and how fast (`progress`). All raw calls are in `sys`.

// Some helpers are used only by tests and the benchmark so far.
#![allow(dead_code)]

pub mod progress;
pub mod selector;
mod sys;
pub mod writer;
