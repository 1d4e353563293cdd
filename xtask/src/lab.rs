//! `cargo xtask lab`: build everything, start a Controller on the host and
//! boot two agents in QEMU on one shared L2 segment — tap devices on a
//! bridge inside a network namespace the lab creates, with `dnsmasq
//! --no-ping` serving DHCP there. Both check in; the lab builds a small
//! real disk image (GPT, ext4 partition with known files), adds it to the
//! store, runs a job (`echo`, `deploy` of that image to the disk `auto`
//! picks, `poweroff`) on both, prints the result table, and shows the files
//! on agent1's deployed disk. It exits when done.
//! The guests' serial consoles stream here, each line prefixed by its name.
//!
//! `--single` boots one agent on QEMU's user network instead (no root
//! needed for the network, no Controller), and `--wait` keeps the guests up
//! until Ctrl-C.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use shoal_tests::site::{Controller, Lan};
use shoal_tests::vm::{NetBackend, Vm, VmBuilder};

use crate::kernel::{self, Kernel, KernelArgs};
use crate::{agent, initramfs, test, util};

pub const LAB_MAC: &str = "52:54:00:12:34:56";

#[derive(Debug, clap::Args)]
pub struct LabArgs {
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// One agent on QEMU's user network, no Controller.
    #[arg(long)]
    pub single: bool,
    /// Keep the guests running after the job; Ctrl-C stops everything.
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

fn guest(
    kernel: &Kernel,
    initrd: &Path,
    name: &str,
    index: u8,
    args: &LabArgs,
) -> anyhow::Result<VmBuilder> {
    let dir = util::out_dir().join("lab").join(name);
    let d1 = disk(&dir.join("disk1.img"), 64 << 20)?;
    let d2 = disk(&dir.join("disk2.img"), 32 << 20)?;
    let image = kernel
        .vmlinux
        .clone()
        .unwrap_or_else(|| kernel.bzimage.clone());
    let mut b = VmBuilder::new(&image, initrd)
        .name(name)
        .echo(true)
        .smbios(
            &format!("5a0b7c1e-5ea1-4000-8000-0000000000{index:02x}"),
            &format!("SHOAL-LAB-{index:04}"),
        )
        .disk(&d1, Some(&format!("{name}-disk-1")))
        .disk(&d2, Some(&format!("{name}-disk-2")))
        .append(&args.append);
    if args.verbose_kernel {
        b = b.verbose_kernel();
    }
    Ok(b)
}

pub fn run(args: &LabArgs) -> anyhow::Result<()> {
    let agent = agent::build()?;
    let kernel = kernel::ensure(&args.kernel)?;
    let initrd = initramfs::build_for(&kernel, &agent, shoal_initramfs::Flavour::Lab, None)?;
    println!(
        "lab: kernel {}, initramfs {}",
        kernel.version,
        initrd.display()
    );
    if args.single {
        return single(args, &kernel, &initrd);
    }
    let (controller, shoalctl) = test::controller_bins()?;
    // The harness finds the binaries through the same variables as the tests.
    std::env::set_var("SHOAL_CONTROLLER", &controller);
    std::env::set_var("SHOALCTL", &shoalctl);

    let mut lan = Lan::new();
    let net = format!("10.88.{}", lan.subnet);
    let _dhcp = lan.start_dhcp();
    let state = util::out_dir().join("lab").join("controller");
    let ctl = Controller::start(&state, Some(&lan.ns), &format!("{net}.1:7000"), 7100, &[]);
    let cmdline = ctl.agent_cmdline();
    println!(
        "lab: bridge br0 {net}.1/24 in namespace {}, dnsmasq serving {net}.50-99",
        lan.ns.name()
    );
    println!(
        "lab: controller listening on {net}.1:7000, state in {}",
        state.display()
    );
    println!("lab: agents boot with: {cmdline}");

    let mut vms: Vec<Vm> = Vec::new();
    for i in 1..=2u8 {
        let tap = lan.add_tap();
        let b = guest(&kernel, &initrd, &format!("agent{i}"), i, args)?
            .netns(lan.ns.name())
            .nic(&format!("52:54:00:00:00:{i:02x}"), NetBackend::Tap(tap))
            .append(&cmdline);
        vms.push(b.start()?);
    }
    let timeout = Duration::from_secs(args.timeout);
    for vm in &mut vms {
        vm.console().expect("registered with controller", timeout)?;
    }
    println!(
        "\nlab: both agents registered:\n{}",
        ctl.ctl_ok(&["devices", "list"])
    );
    if args.wait {
        println!("lab: --wait: guests stay up; use `shoalctl --url http://127.0.0.1:7100 --state {}` inside `ip netns exec {}`; Ctrl-C ends the lab", state.display(), lan.ns.name());
        for vm in &mut vms {
            vm.wait_exit(Duration::from_secs(365 * 86400))?;
        }
        return Ok(());
    }
    // The lab image: GPT with an ext4 partition holding known files.
    let image_dir = util::out_dir().join("lab").join("image");
    let _ = std::fs::remove_dir_all(&image_dir);
    std::fs::create_dir_all(&image_dir)?;
    let source = shoal_tests::labimage::build(&image_dir, 48);
    let _ = ctl.ctl(&["image", "group", "create", "lab"]);
    let _ = ctl.ctl(&["image", "remove", "lab/demo"]);
    println!(
        "lab: {}",
        ctl.ctl_ok(&[
            "image",
            "add",
            "lab",
            &source.display().to_string(),
            "--name",
            "demo"
        ])
        .trim()
    );

    let started = Instant::now();
    let out = ctl.ctl(&[
        "jobs",
        "run",
        "--device",
        "all",
        "--wait",
        &args.timeout.to_string(),
        "echo:hello from the Shoal lab",
        "deploy:lab/demo@auto",
        "poweroff",
    ]);
    let run_out = String::from_utf8_lossy(&out.stdout).into_owned();
    for vm in &mut vms {
        vm.wait_exit(timeout)?;
    }
    let job = shoal_tests::site::job_id(&run_out);
    println!(
        "\nlab: job {job} (echo, deploy, poweroff) took {:.1} s:\n{}",
        started.elapsed().as_secs_f64(),
        ctl.ctl_ok(&["jobs", "show", &job])
    );
    ensure!(
        out.status.success(),
        "the lab job did not succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, vm) in vms.iter_mut().enumerate() {
        let log = util::out_dir()
            .join("lab")
            .join(format!("agent{}-console.log", i + 1));
        vm.console().save(&log)?;
    }
    // What the first agent's disk now holds, read on the host.
    let disk = util::out_dir().join("lab").join("agent1").join("disk1.img");
    let want = std::fs::read(&source)?;
    let got = std::fs::read(&disk)?;
    ensure!(
        got.len() >= want.len() && got[..want.len()] == want[..],
        "agent1's disk differs from the lab image"
    );
    println!("lab: agent1's disk1 equals the lab image byte for byte; its ext4 partition holds:");
    for (name, text) in shoal_tests::labimage::read_files(&disk) {
        println!("  /{name}: {}", text.trim());
    }
    println!(
        "lab: done; consoles saved under {}",
        util::out_dir().join("lab").display()
    );
    Ok(())
}

fn single(args: &LabArgs, kernel: &Kernel, initrd: &Path) -> anyhow::Result<()> {
    let mut b = guest(kernel, initrd, "single", 1, args)?.nic(LAB_MAC, NetBackend::User);
    if !args.wait {
        b = b.append("shoal.then=poweroff");
    }
    let started = Instant::now();
    let mut vm = b.start()?;
    let timeout = if args.wait {
        Duration::from_secs(365 * 86400)
    } else {
        Duration::from_secs(args.timeout)
    };
    let status = vm.wait_exit(timeout)?;
    let log = util::out_dir().join("lab").join("single-console.log");
    vm.console().save(&log)?;
    println!(
        "\nlab: guest stopped after {:.1} s ({status}); console saved to {}",
        started.elapsed().as_secs_f64(),
        log.display()
    );
    ensure!(
        vm.console().saw("lease acquired on"),
        "lab: the agent never reported a DHCP lease (see {})",
        log.display()
    );
    Ok(())
}
