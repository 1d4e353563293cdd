//! `cargo xtask test`: build the artefacts the end-to-end tests need (static
//! agent, kernel, both initramfs flavours), export their paths, and run every
//! test in the workspace: unit, network-namespace and QEMU tests.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::Context;

use crate::kernel::{self, KernelArgs};
use crate::{agent, initramfs, util};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// Passed on to `cargo test` (e.g. `-- qemu`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    let agent = agent::build()?;
    let kernel = kernel::ensure(&args.kernel)?;
    let lab = initramfs::build_for(&kernel, &agent, shoal_initramfs::Flavour::Lab, None)?;
    let full = initramfs::build_for(&kernel, &agent, shoal_initramfs::Flavour::Full, None)?;
    let image = kernel
        .vmlinux
        .clone()
        .unwrap_or_else(|| kernel.bzimage.clone());
    let (controller, shoalctl) = controller_bins()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(util::root())
        .args(["test", "--workspace"])
        .args(&args.rest)
        .env("SHOAL_AGENT", &agent)
        .env("SHOAL_CONTROLLER", &controller)
        .env("SHOALCTL", &shoalctl)
        .env("SHOAL_KERNEL_IMAGE", &image)
        .env("SHOAL_KERNEL_BZIMAGE", &kernel.bzimage)
        .env("SHOAL_KERNEL_MODULES", &kernel.modules_dir)
        .env("SHOAL_KERNEL_VERSION", &kernel.version)
        .env("SHOAL_INITRAMFS_LAB", &lab)
        .env("SHOAL_INITRAMFS_FULL", &full)
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().context("cannot start cargo test")?;
    // Pass the output through and add up the per-binary results, so the run
    // ends with one line that counts every test.
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count(rest, " passed");
            failed += count(rest, " failed");
            ignored += count(rest, " ignored");
        }
    }
    let status = child.wait()?;
    println!("\nshoal: {passed} passed, {failed} failed, {ignored} skipped");
    anyhow::ensure!(status.success(), "cargo test failed: {status}");
    anyhow::ensure!(passed > 0, "no test ran");
    Ok(())
}

/// Builds `shoal-controller` and `shoalctl` (debug profile, like the tests).
pub fn controller_bins() -> anyhow::Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(Command::new(cargo).current_dir(util::root()).args([
        "build",
        "--quiet",
        "--package",
        "shoal-controller",
        "--bins",
    ]))?;
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::root().join("target"))
        .join("debug");
    Ok((dir.join("shoal-controller"), dir.join("shoalctl")))
}

/// The number before `what` in a `test result:` line (`ok. 41 passed; 0 failed; ...`).
fn count(line: &str, what: &str) -> u64 {
    line.split(';')
        .find_map(|part| {
            part.trim()
                .strip_suffix(what.trim())
                .map(str::trim)
                .and_then(|n| n.rsplit(' ').next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_a_cargo_result_line() {
        let l = "ok. 41 passed; 2 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.31s";
        assert_eq!(
            (
                super::count(l, " passed"),
                super::count(l, " failed"),
                super::count(l, " ignored")
            ),
            (41, 2, 3)
        );
        assert_eq!(
            super::count("FAILED. 1 passed; 1 failed; 0 ignored", " failed"),
            1
        );
    }
}
