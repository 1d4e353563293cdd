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
//! - `deploy`: one Controller on a bridge and one agent (an ordinary process
//!   in its own network namespace) deploying a `--size-mib` image (1/3
//!   random, 1/3 compressible text, 1/3 zeros) into a file at each
//!   compression level, against a raw TCP copy of the same bytes (socat into
//!   `dd oflag=direct conv=fsync`) between the same two namespaces.

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
    /// deploy: size of the source image in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    Boot,
    Heartbeats,
    Deploy,
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
        What::Deploy => deploy(args),
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

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;

/// `target/shoal/bench`, created.
fn bench_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::util::root().join("target"))
        .join("shoal/bench");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes (or reuses) a deterministic `size_mib` MiB source image: 8 MiB
/// segments cycling random bytes, log-like text, and zeros.
fn deploy_source(path: &std::path::Path, size_mib: u64) -> anyhow::Result<()> {
    use std::io::Write;
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size_mib * MIB) {
        return Ok(());
    }
    let tmp = path.with_extension("partial");
    let mut out = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&tmp)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut line_no: u64 = 0;
    let mut block = vec![0u8; MIB as usize];
    let mut text = String::new();
    for mib in 0..size_mib {
        match (mib / 8) % 3 {
            0 => {
                for w in block.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
            }
            1 => {
                text.clear();
                while text.len() < block.len() {
                    line_no += 1;
                    text.push_str(&format!(
                        "2026-04-20 10:{:02}:{:02} host-{:04} kernel: [{:>8}.{:03}] eth0: link up, 1000 Mbps full duplex, seq {line_no}\n",
                        (line_no / 60) % 60,
                        line_no % 60,
                        line_no % 97,
                        line_no / 7,
                        line_no % 1000
                    ));
                }
                let n = block.len();
                block.copy_from_slice(&text.as_bytes()[..n]);
            }
            _ => block.fill(0),
        }
        out.write_all(&block)?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A fresh target file of `len` bytes (sparse), replacing any old one.
fn fresh_target(path: &std::path::Path, len: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)?.set_len(len)?;
    Ok(())
}

/// Fails unless `target` starts with exactly the bytes of `source`.
fn same_bytes(source: &std::path::Path, target: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Read;
    let (mut a, mut b) = (std::fs::File::open(source)?, std::fs::File::open(target)?);
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut at = 0u64;
    loop {
        let n = read_full(&mut a, &mut ba)?;
        if n == 0 {
            return Ok(());
        }
        let m = read_full(&mut b, &mut bb[..n])?;
        anyhow::ensure!(m == n, "{} is short at byte {at}", target.display());
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            anyhow::bail!(
                "{} differs from {} at byte {}",
                target.display(),
                source.display(),
                at + i as u64
            );
        }
        at += n as u64;
    }

    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
}

/// Parses the output of `sh -c '...; times'`: the second line is the user
/// and system time of the shell's children (`0m1.234s 0m0.567s`).
fn times_cpu(out: &str) -> f64 {
    let secs = |t: &str| -> f64 {
        let t = t.trim().trim_end_matches('s');
        match t.split_once('m') {
            Some((m, s)) => {
                m.parse::<f64>().unwrap_or(0.0) * 60.0 + s.parse::<f64>().unwrap_or(0.0)
            }
            None => t.parse().unwrap_or(0.0),
        }
    };
    out.lines()
        .filter(|l| l.contains('m') && l.trim_end().ends_with('s'))
        .nth(1)
        .map_or(f64::NAN, |l| l.split_whitespace().map(secs).sum())
}

/// The `in S s (` seconds from an agent's `wrote X MiB to T in S s (R MiB/s)`.
fn wrote_secs(line: &str) -> Option<f64> {
    let rest = &line[line.find("wrote ")?..];
    let after = &rest[rest.find(" in ")? + 4..];
    after.split_whitespace().next()?.parse().ok()
}

fn ensure_socat() -> anyhow::Result<()> {
    let have = |p: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("socat") {
        println!("  (installing socat with apt-get)");
        let st = std::process::Command::new("apt-get")
            .args(["install", "-y", "-q", "socat"])
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(
            st.success() && have("socat"),
            "socat is missing and apt-get could not install it"
        );
    }
    anyhow::ensure!(have("dd"), "dd is missing");
    Ok(())
}

/// Builds the Controller and shoalctl with the release profile (the bench
/// measures the data path; the tests use debug builds).
fn release_controller_bins() -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::util::run(
        std::process::Command::new(cargo)
            .current_dir(crate::util::root())
            .args([
                "build",
                "--quiet",
                "--release",
                "--package",
                "shoal-controller",
                "--bins",
            ]),
    )?;
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::util::root().join("target"))
        .join("release");
    Ok((dir.join("shoal-controller"), dir.join("shoalctl")))
}

#[derive(Default)]
struct Samples {
    mibps: Vec<f64>,
    /// Rate from the agent's own timing (its "wrote ... in S s" line).
    agent_mibps: Vec<f64>,
    /// CPU seconds per GiB: Controller / sender, agent / receiver.
    send_cpu: Vec<f64>,
    recv_cpu: Vec<f64>,
}

fn deploy(args: &BenchArgs) -> anyhow::Result<()> {
    use shoal_tests::site::{Controller, FakeMachine, Lan};

    ensure_socat()?;
    let agent_bin = agent::build()?;
    let (controller, shoalctl) = release_controller_bins()?;
    std::env::set_var("SHOAL_CONTROLLER", &controller);
    std::env::set_var("SHOALCTL", &shoalctl);
    std::env::set_var("SHOAL_AGENT", &agent_bin);
    if std::env::var_os("SHOAL_LOG").is_none() {
        std::env::set_var("SHOAL_LOG", "info");
    }

    let size_mib = args.size_mib.max(1);
    let bytes = size_mib * MIB;
    let dir = bench_dir()?;
    let src = dir.join(format!("deploy-source-{size_mib}MiB.img"));
    let t = std::time::Instant::now();
    deploy_source(&src, size_mib)?;
    println!(
        "bench deploy: {size_mib} MiB source ({}; 1/3 random, 1/3 log text, 1/3 zeros in 8 MiB runs) ready in {:.1} s; {} runs per level; release Controller, agent profile `agent`",
        src.display(),
        t.elapsed().as_secs_f64(),
        args.runs
    );

    let mut lan = Lan::new();
    let state = tempfile::tempdir_in(&dir)?;
    let listen = format!("{}:7000", lan.gateway());
    let ctl = Controller::start(state.path(), Some(&lan.ns), &listen, 7100, &[]);
    let cmdline = ctl.agent_cmdline();
    let machine = FakeMachine::new(1, size_mib * 2);
    let h = lan.add_host(10);
    let host_ip = format!("10.88.{}.10", lan.subnet);
    let mut agent = machine.agent("agent", Some(&lan.hosts[h]), &cmdline);
    agent.expect("registered with controller", Duration::from_secs(30));
    let (cpid, apid) = (ctl.proc.pid(), agent.pid());
    for (pid, want) in [(cpid, "shoal-controlle"), (apid, "shoal-agent")] {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        anyhow::ensure!(
            comm.trim() == want,
            "pid {pid} is {comm:?}, not {want}: CPU would be measured on the wrong process"
        );
    }

    // Images: one group per compression level.
    let levels = ["none", "fast", "max"];
    println!("  image add        stored     ratio   add time");
    for level in levels {
        let group = format!("bench-{level}");
        ctl.ctl_ok(&["image", "group", "create", &group]);
        let t = std::time::Instant::now();
        let out = ctl.ctl_ok(&[
            "--json",
            "image",
            "add",
            &group,
            src.to_str().unwrap(),
            "--name",
            "disk",
            "--compression",
            level,
        ]);
        let secs = t.elapsed().as_secs_f64();
        let stored = out
            .split("\"stored_size\"")
            .nth(1)
            .and_then(|r| {
                r.trim_start_matches([':', ' '])
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .ok_or_else(|| anyhow::anyhow!("no stored_size in `image add --json`:\n{out}"))?;
        println!(
            "  {level:<6} {:>12.1} MiB {:>7.1} % {secs:>8.2} s ({:.0} MiB/s)",
            stored as f64 / MIB as f64,
            100.0 * stored as f64 / bytes as f64,
            size_mib as f64 / secs
        );
    }

    let target = dir.join("deploy-target.img");
    let mut shoal: Vec<(&str, Samples)> = levels.iter().map(|l| (*l, Samples::default())).collect();
    let mut raw = Samples::default();
    let port = 7300;
    for run in 1..=args.runs {
        for (level, s) in shoal.iter_mut() {
            fresh_target(&target, bytes)?;
            let step = format!("deploy:bench-{level}/disk@file={}", target.display());
            let (c0, a0) = (cpu_seconds(cpid), cpu_seconds(apid));
            let t0 = std::time::Instant::now();
            let (line, out) = std::thread::scope(|sc| {
                let job = sc.spawn(|| {
                    ctl.ctl(&[
                        "jobs",
                        "run",
                        "--device",
                        &machine.uuid,
                        "--wait",
                        "3600",
                        &step,
                    ])
                });
                // The agent logs "deploy (...) succeeded: wrote ..." when done:
                // finer than shoalctl's 250 ms polling.
                let line = agent.try_expect("succeeded: wrote", Duration::from_secs(3600));
                (line.map(|l| (l, t0.elapsed().as_secs_f64())), job.join())
            });
            let wall_end = t0.elapsed().as_secs_f64();
            let (c1, a1) = (cpu_seconds(cpid), cpu_seconds(apid));
            let out = out.map_err(|_| anyhow::anyhow!("shoalctl thread panicked"))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            anyhow::ensure!(
                out.status.success() && line.is_some(),
                "deploy at {level} failed:\n{stdout}\n{}\nagent log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                shoal_tests::proc::tail(&agent.log(), 3000)
            );
            let (line, wall) = line.unwrap_or_default();
            let wall = if wall > 0.0 { wall } else { wall_end };
            let mibps = size_mib as f64 / wall;
            let agent_rate = wrote_secs(&line).map_or(f64::NAN, |s| size_mib as f64 / s.max(0.05));
            let gib = bytes as f64 / GIB;
            s.mibps.push(mibps);
            s.agent_mibps.push(agent_rate);
            s.send_cpu.push((c1 - c0) / gib);
            s.recv_cpu.push((a1 - a0) / gib);
            println!(
                "  run {run} shoal {level:<4}: {wall:.2} s from submission = {mibps:.0} MiB/s (agent's own timing {agent_rate:.0} MiB/s); CPU controller {:.2} s, agent {:.2} s",
                c1 - c0,
                a1 - a0
            );
            if run == 1 {
                same_bytes(&src, &target)?;
            }
        }

        // The anchor: the same bytes over one TCP connection between the
        // same two namespaces, written with O_DIRECT and fsync'd (as the
        // agent writes: O_DIRECT, then fsync).
        fresh_target(&target, bytes)?;
        let recv_sh = format!(
            "socat -u TCP-LISTEN:{port},reuseaddr STDOUT | dd of={} bs=4M iflag=fullblock oflag=direct conv=notrunc,fsync status=none; times",
            target.display()
        );
        let send_sh = format!(
            "socat -u FILE:{} TCP:{host_ip}:{port},retry=100,interval=0.05; times",
            src.display()
        );
        let mut recv = lan.hosts[h].command("sh");
        recv.args(["-c", &recv_sh])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let recv = recv.spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        let sender = lan.ns.command("sh").args(["-c", &send_sh]).output()?;
        let recv = recv.wait_with_output()?;
        let wall = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            sender.status.success() && recv.status.success(),
            "raw copy failed: sender {}: {}; receiver {}: {}",
            sender.status,
            String::from_utf8_lossy(&sender.stderr),
            recv.status,
            String::from_utf8_lossy(&recv.stderr)
        );
        let scpu = times_cpu(&String::from_utf8_lossy(&sender.stdout));
        let rcpu = times_cpu(&String::from_utf8_lossy(&recv.stdout));
        if run == 1 {
            same_bytes(&src, &target)?;
        }
        let gib = bytes as f64 / GIB;
        let mibps = size_mib as f64 / wall;
        raw.mibps.push(mibps);
        raw.agent_mibps.push(mibps);
        raw.send_cpu.push(scpu / gib);
        raw.recv_cpu.push(rcpu / gib);
        println!("  run {run} raw copy  : {wall:.2} s = {mibps:.0} MiB/s; CPU sender {scpu:.2} s, receiver {rcpu:.2} s");
    }
    let _ = std::fs::remove_file(&target);

    let raw_rate = median(&mut raw.mibps);
    let (rs, rr) = (median(&mut raw.send_cpu), median(&mut raw.recv_cpu));
    println!();
    println!(
        "  {size_mib} MiB image, medians of {} runs (MiB/s; CPU s per GiB of image)",
        args.runs
    );
    println!("  what              MiB/s  (agent)  vs raw   CPU send   CPU recv");
    for (level, s) in shoal.iter_mut() {
        let r = median(&mut s.mibps);
        println!(
            "  shoal {level:<10} {r:>6.0}  {:>7.0}  {:>6.2}x  {:>9.2}  {:>9.2}",
            median(&mut s.agent_mibps),
            r / raw_rate,
            median(&mut s.send_cpu),
            median(&mut s.recv_cpu)
        );
    }
    println!(
        "  raw socat|dd     {raw_rate:>6.0}  {:>7}  {:>6.2}x  {rs:>9.2}  {rr:>9.2}",
        "-", 1.0
    );
    println!("  (shoal: submission to the agent's \"succeeded\" line, CPU of the Controller and agent processes;");
    println!("   raw: socat FILE -> TCP -> socat | dd oflag=direct conv=fsync, CPU of sender / receiver pipelines;");
    println!("   both write the target with O_DIRECT and fsync before done; the source is in the page cache)");
    Ok(())
}
