//! `cargo xtask test`: build the artefacts the end-to-end tests need (static
//! agent, kernel, both initramfs flavours), export their paths, and run every
//! test in the workspace: unit, network-namespace and QEMU tests.

use std::process::Command;

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
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(util::root())
        .args(["test", "--workspace"])
        .args(&args.rest)
        .env("SHOAL_AGENT", &agent)
        .env("SHOAL_KERNEL_IMAGE", &image)
        .env("SHOAL_KERNEL_BZIMAGE", &kernel.bzimage)
        .env("SHOAL_KERNEL_MODULES", &kernel.modules_dir)
        .env("SHOAL_KERNEL_VERSION", &kernel.version)
        .env("SHOAL_INITRAMFS_LAB", &lab)
        .env("SHOAL_INITRAMFS_FULL", &full);
    util::run(&mut cmd)
}
