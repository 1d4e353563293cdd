//! `cargo xtask initramfs`: the netboot initramfs, built in process by
//! `shoal-initramfs` from the static agent, the kernel's modules and an
//! optional agent configuration, written to
//! `target/shoal/initramfs-<flavour>.cpio.zst`.
//!
//! The lab and test tasks call [`build_for`] with a kernel and agent they
//! already have.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use shoal_initramfs::{Flavour, Spec};

use crate::kernel::{self, Kernel, KernelArgs};
use crate::{agent, util};

#[derive(Debug, clap::Args)]
pub struct InitramfsArgs {
    /// Module set: `lab` (virtio only) or `full` (lab plus common server NICs and storage).
    #[arg(long, default_value = "lab", value_name = "lab|full")]
    pub flavour: Flavour,
    /// An agent.toml to install as /etc/shoal/agent.toml.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// Use this agent binary as /init instead of building one.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Another kernel module to include, with its dependencies (repeatable).
    #[arg(long = "module", value_name = "NAME")]
    pub extra_modules: Vec<String>,
}

pub fn run(args: &InitramfsArgs) -> Result<PathBuf> {
    let agent = match &args.agent {
        Some(a) => a.clone(),
        None => agent::build()?,
    };
    let kernel = kernel::ensure(&args.kernel)?;
    build(
        &kernel,
        &agent,
        args.flavour,
        args.config.as_deref(),
        &args.extra_modules,
    )
}

/// Builds `target/shoal/initramfs-<flavour>.cpio.zst` for `kernel` with
/// `agent` as `/init`, prints the report and returns the path.
pub fn build_for(
    kernel: &Kernel,
    agent: &Path,
    flavour: Flavour,
    config: Option<&Path>,
) -> Result<PathBuf> {
    build(kernel, agent, flavour, config, &[])
}

fn build(
    kernel: &Kernel,
    agent: &Path,
    flavour: Flavour,
    config: Option<&Path>,
    extra: &[String],
) -> Result<PathBuf> {
    let config = config
        .map(|c| {
            std::fs::read(c)
                .with_context(|| format!("cannot read the agent configuration {}", c.display()))
        })
        .transpose()?;
    let spec = Spec {
        init: agent.to_owned(),
        modules_dir: kernel.modules_dir.clone(),
        kernel_version: kernel.version.clone(),
        flavour,
        extra_modules: extra.to_vec(),
        config,
    };
    let built = shoal_initramfs::build(&spec)
        .with_context(|| format!("cannot build the {flavour} initramfs"))?;
    let out = util::out_dir().join(format!("initramfs-{flavour}.cpio.zst"));
    let tmp = out.with_extension("zst.partial");
    std::fs::write(&tmp, &built.bytes)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &out).with_context(|| format!("cannot write {}", out.display()))?;
    print!("{}", built.report);
    Ok(out)
}
