//! `cargo xtask agent`: the statically linked agent.
//!
//! Built for an explicit `--target x86_64-unknown-linux-gnu` with
//! `+crt-static`: with an explicit target, RUSTFLAGS reach only the target's
//! crates, so proc-macros stay ordinary dynamic libraries and still load.

use std::path::PathBuf;
use std::process::Command;

use crate::util;

pub const TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn build() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(
        Command::new(cargo)
            .current_dir(util::root())
            .args([
                "build",
                "--quiet",
                "--package",
                "shoal-agent",
                "--profile",
                "agent",
                "--target",
                TARGET,
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::root().join("target"));
    let bin = target_dir.join(TARGET).join("agent").join("shoal-agent");
    anyhow::ensure!(
        bin.exists(),
        "cargo built the agent but {} is missing",
        bin.display()
    );
    Ok(bin)
}
