//! `cargo xtask lab`: build everything, then boot the agent in QEMU with a
//! virtio NIC on QEMU's user network and two virtio disks backed by files
//! under `target/shoal/lab/`, streaming the serial console here.
//!
//! By default the agent powers off once it is up (`shoal.then=poweroff`), so
//! the lab ends by itself; `--wait` keeps it running until Ctrl-C.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_tests::vm::{NetBackend, VmBuilder};

use crate::kernel::{self, KernelArgs};
use crate::{agent, initramfs, util};

pub const LAB_MAC: &str = "52:54:00:12:34:56";

#[derive(Debug, clap::Args)]
pub struct LabArgs {
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// Keep the agent running after bring-up; Ctrl-C stops QEMU.
    #[arg(long)]
    pub wait: bool,
    /// Extra kernel command-line words (e.g. "shoal.log=debug").
    #[arg(long, default_value = "")]
    pub append: String,
    /// Show the kernel's own boot messages too.
    #[arg(long)]
    pub verbose_kernel: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// A sparse disk image of `size` bytes (kept if it already has that size).
pub fn disk(path: &Path, size: u64) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(path.parent().unwrap())?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    Ok(path.to_owned())
}

pub fn run(args: &LabArgs) -> anyhow::Result<()> {
    let agent = agent::build()?;
    let kernel = kernel::ensure(&args.kernel)?;
    let initrd = initramfs::build_for(&kernel, &agent, shoal_initramfs::Flavour::Lab, None)?;
    let dir = util::out_dir().join("lab");
    let d1 = disk(&dir.join("disk1.img"), 64 << 20)?;
    let d2 = disk(&dir.join("disk2.img"), 32 << 20)?;
    let image = kernel
        .vmlinux
        .clone()
        .unwrap_or_else(|| kernel.bzimage.clone());
    println!(
        "lab: kernel {} ({}), initramfs {}",
        kernel.version,
        image.display(),
        initrd.display()
    );
    println!(
        "lab: disks {} (64 MiB), {} (32 MiB); NIC {LAB_MAC} on QEMU user network",
        d1.display(),
        d2.display()
    );
    let mut builder = VmBuilder::new(&image, &initrd)
        .name("lab")
        .echo(true)
        .smbios("5a0b7c1e-5ea1-4000-8000-00000000000a", "SHOAL-LAB-0001")
        .disk(&d1, Some("shoal-lab-disk-1"))
        .disk(&d2, Some("shoal-lab-disk-2"))
        .nic(LAB_MAC, NetBackend::User)
        .append(&args.append);
    if !args.wait {
        builder = builder.append("shoal.then=poweroff");
    }
    if args.verbose_kernel {
        builder = builder.verbose_kernel();
    }
    let started = Instant::now();
    let mut vm = builder.start()?;
    let timeout = if args.wait {
        Duration::from_secs(365 * 86400)
    } else {
        Duration::from_secs(args.timeout)
    };
    let status = vm.wait_exit(timeout)?;
    let log = dir.join("console.log");
    vm.console().save(&log)?;
    println!(
        "\nlab: guest stopped after {:.1} s ({status}); console saved to {}",
        started.elapsed().as_secs_f64(),
        log.display()
    );
    anyhow::ensure!(
        vm.console().saw("lease acquired on"),
        "lab: the agent never reported a DHCP lease (see {})",
        log.display()
    );
    Ok(())
}
