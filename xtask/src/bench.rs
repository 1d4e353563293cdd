//! `cargo xtask bench`: benchmarks, measured on this machine in one run and
//! reported as medians (the machine is shared and noisy).
//!
//! - `boot`: time from starting QEMU (TCG) to the agent's "lease acquired"
//!   line on the serial console, over `--runs` boots, with the bzImage and
//!   with the extracted `vmlinux` (PVH entry) when there is one.
//! - `heartbeats`: one Controller on loopback and a swarm of agents (the
//!   real control client, `shoal-agent swarm`, as threads of one process)
//!   beating every second: how many it holds, at what CPU and memory cost,
//!   and the bytes one heartbeat costs on the wire.

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
    /// heartbeats: swarm sizes to try.
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000,2000")]
    pub counts: Vec<usize>,
    /// heartbeats: seconds to measure each size for, after all registered.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    Boot,
    Heartbeats,
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
        What::Heartbeats => heartbeats(args),
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

/// utime + stime of a process, in seconds (from `/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `)` that ends the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn heartbeats(args: &BenchArgs) -> anyhow::Result<()> {
    use shoal_protocol::channel::{respond, Initiator, Keypair};
    use shoal_protocol::control::{self, AgentMsg};
    use shoal_tests::proc::Proc;
    use shoal_tests::site::{free_port, Controller};

    let agent = agent::build()?;
    let (controller, shoalctl) = crate::test::controller_bins()?;
    std::env::set_var("SHOAL_CONTROLLER", &controller);
    std::env::set_var("SHOALCTL", &shoalctl);

    // What one heartbeat costs: frame header + AEAD tag + the message.
    let (a, c, psk) = (Keypair::generate()?, Keypair::generate()?, [1u8; 32]);
    let (init, m1) = Initiator::start(&a, &c.public, &psk)?;
    let (_, m2) = respond(&c, &psk, &m1)?;
    let mut t = init.finish(&m2)?;
    let plain = control::encode(&AgentMsg::Heartbeat {
        seq: 1_000_000,
        running: None,
    })?;
    let sealed = t.seal(&plain)?;
    let frame = shoal_protocol::frame::HEADER + sealed.len();
    println!("bench heartbeats: one heartbeat is {} bytes of message, {frame} bytes of TCP payload ({} with IPv4+TCP headers and timestamps)", plain.len(), frame + 52);

    for &count in &args.counts {
        let state = tempfile::tempdir()?;
        let listen = format!("127.0.0.1:{}", free_port());
        let ctl = Controller::start(
            state.path(),
            None,
            &listen,
            free_port(),
            &["--heartbeat-ms", "1000", "--timeout-ms", "5000"],
        );
        let cmdline = ctl.agent_cmdline();
        let total = args.seconds + 60;
        // (The swarm raises its own open-file limit to the hard limit; the
        // Controller inherits ours.)
        let mut cmd = std::process::Command::new(&agent);
        cmd.args([
            "swarm",
            "--count",
            &count.to_string(),
            "--seconds",
            &total.to_string(),
            "--cmdline",
            &cmdline,
        ])
        .env("SHOAL_LOG", "warn");
        let mut swarm = Proc::spawn("swarm", cmd);
        // Wait until every client is registered (bounded), then measure.
        let t0 = std::time::Instant::now();
        let mut registered = 0;
        while t0.elapsed() < Duration::from_secs(60) {
            let out = ctl.ctl_ok(&["--json", "devices", "list"]);
            registered = out.matches("\"ready\"").count();
            if registered >= count {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let ramp = t0.elapsed().as_secs_f64();
        let (cpu0, w0) = (cpu_seconds(ctl.proc.pid()), std::time::Instant::now());
        let scpu0 = cpu_seconds(swarm.pid());
        std::thread::sleep(Duration::from_secs(args.seconds));
        let wall = w0.elapsed().as_secs_f64();
        let cpu = cpu_seconds(ctl.proc.pid()) - cpu0;
        let scpu = cpu_seconds(swarm.pid()) - scpu0;
        let rss = rss_mib(ctl.proc.pid());
        let offline = ctl.proc.count("offline");
        println!(
            "  {count:>5} agents: {registered} registered in {ramp:.1} s; controller {:.1} % of one core ({:.1} µs per heartbeat), RSS {rss:.1} MiB, {offline} went offline; swarm {:.1} % CPU",
            100.0 * cpu / wall,
            1e6 * cpu / (wall * count as f64),
            100.0 * scpu / wall
        );
        swarm.kill();
        let _ = swarm.log();
    }
    Ok(())
}
