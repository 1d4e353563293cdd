//! `cargo xtask bench`: benchmarks, measured on this machine in one run and
//! reported as medians (the machine is shared and noisy).
//!
//! - `boot`: time from starting QEMU (TCG) to the agent's "lease acquired"
//!   line on the serial console, over `--runs` boots, with the bzImage and
//!   with the extracted `vmlinux` (PVH entry) when there is one.

use std::time::Duration;

use shoal_tests::vm::{NetBackend, VmBuilder};

use crate::kernel::{self, KernelArgs};
use crate::lab::LAB_MAC;
use crate::{agent, initramfs};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub what: What,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    Boot,
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match args.what {
        What::Boot => boot(args),
    }
}

fn boot(args: &BenchArgs) -> anyhow::Result<()> {
    let agent = agent::build()?;
    let kernel = kernel::ensure(&args.kernel)?;
    let initrd = initramfs::build_for(&kernel, &agent, shoal_initramfs::Flavour::Lab, None)?;
    let mut images = vec![("bzImage", kernel.bzimage.clone())];
    if let Some(v) = &kernel.vmlinux {
        images.push(("vmlinux (PVH)", v.clone()));
    }
    println!(
        "bench boot: kernel {}, {} runs each, QEMU TCG, 1 vCPU, virtio NIC on user network",
        kernel.version, args.runs
    );
    for (label, image) in images {
        let mut to_lease = Vec::new();
        let mut to_init = Vec::new();
        for run in 1..=args.runs {
            let mut vm = VmBuilder::new(&image, &initrd)
                .name("bench")
                .nic(LAB_MAC, NetBackend::User)
                .append("shoal.then=poweroff")
                .start()?;
            let t0 = vm.started();
            vm.console()
                .expect("starting as PID 1", Duration::from_secs(120))?;
            let init = t0.elapsed().as_secs_f64();
            vm.console()
                .expect("lease acquired on", Duration::from_secs(120))?;
            let lease = t0.elapsed().as_secs_f64();
            let _ = vm.wait_exit(Duration::from_secs(60));
            println!("  {label:<14} run {run}: /init at {init:.2} s, lease at {lease:.2} s");
            to_init.push(init);
            to_lease.push(lease);
        }
        let (mi, ml) = (median(&mut to_init), median(&mut to_lease));
        println!("  {label:<14} median: /init at {mi:.2} s, lease acquired at {ml:.2} s (min {:.2}, max {:.2})", to_lease[0], to_lease[to_lease.len() - 1]);
    }
    Ok(())
}
