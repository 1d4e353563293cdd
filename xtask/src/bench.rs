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
//! - `multicast`: one Controller on a bridge and N agents (each in its own
//!   namespace) receiving a `--size-mib` image of random bytes in one
//!   `mode=multicast` deploy job, against Debian's udpcast (`udp-sender` on
//!   the same bridge, N `udp-receiver`s in the same namespaces), for each
//!   N of `--receivers`: wall time, bytes on the wire per image byte, CPU,
//!   peak RSS, and every received file compared with the source.

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
    /// Runs per measurement (default 5; multicast: 3).
    #[arg(long)]
    pub runs: Option<usize>,
    /// heartbeats: swarm sizes to try.
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000,2000")]
    pub counts: Vec<usize>,
    /// heartbeats: seconds to measure each size for, after all registered.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// deploy, multicast: size of the source image in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// multicast: receiver counts to try.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub receivers: Vec<usize>,
    /// multicast: Shoal's session ciphers to run, each against the same
    /// udpcast runs (`auto` is the default a user gets).
    #[arg(long, value_delimiter = ',', default_value = "auto,chacha20poly1305")]
    pub ciphers: Vec<String>,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    Boot,
    Heartbeats,
    Deploy,
    Multicast,
}

impl BenchArgs {
    /// `--runs`, or the default for the benchmark.
    pub fn runs(&self) -> usize {
        self.runs
            .unwrap_or(match self.what {
                What::Multicast => 3,
                _ => 5,
            })
            .max(1)
    }
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
        What::Multicast => multicast(args),
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
        kernel.version,
        args.runs()
    );
    for (label, image) in images {
        let mut to_lease = Vec::new();
        let mut to_init = Vec::new();
        for run in 1..=args.runs() {
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
    status_mib(pid, "VmRSS:")
}

/// Peak resident set size (`VmHWM`) of a live process, in MiB; 0 once it
/// has exited (a zombie has no memory left to report).
fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Starts a new peak: `VmHWM` drops to the current RSS (`clear_refs` 5).
fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`), in MiB.
fn status_mib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `D`, `Z` for a zombie).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
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
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut line_no: u64 = 0;
    let mut text = String::new();
    write_source(path, size_mib, |mib, block| match (mib / 8) % 3 {
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
    })
}

/// Writes `size_mib` MiB to `path`, each MiB filled by `fill(index, block)`,
/// through a temporary file renamed into place; a file of the right size
/// already there is reused.
fn write_source(
    path: &std::path::Path,
    size_mib: u64,
    mut fill: impl FnMut(u64, &mut [u8]),
) -> anyhow::Result<()> {
    use std::io::Write;
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size_mib * MIB) {
        return Ok(());
    }
    let tmp = path.with_extension("partial");
    let mut out = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&tmp)?);
    let mut block = vec![0u8; MIB as usize];
    for mib in 0..size_mib {
        fill(mib, &mut block);
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

fn have_program(p: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {p}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs Debian's `package` with apt-get unless all of `programs` are
/// already on PATH.
fn ensure_package(package: &str, programs: &[&str]) -> anyhow::Result<()> {
    if programs.iter().all(|p| have_program(p)) {
        return Ok(());
    }
    println!("  (installing {package} with apt-get)");
    let st = std::process::Command::new("apt-get")
        .args(["install", "-y", "-q", package])
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(
        st.success() && programs.iter().all(|p| have_program(p)),
        "{} missing and apt-get could not install {package}",
        programs.join(", ")
    );
    Ok(())
}

fn ensure_socat() -> anyhow::Result<()> {
    ensure_package("socat", &["socat"])?;
    anyhow::ensure!(have_program("dd"), "dd is missing");
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
        args.runs()
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
    for run in 1..=args.runs() {
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
        args.runs()
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

// ---------------------------------------------------------------------------
// multicast: Shoal's `mode=multicast` deploy against udpcast.

/// Writes (or reuses) `size_mib` MiB of xorshift bytes: nothing for a
/// compressor to gain, nothing a zero-skipping sender could leave out.
fn random_source(path: &std::path::Path, size_mib: u64) -> anyhow::Result<()> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    write_source(path, size_mib, |_, block| {
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
    })
}

/// `/sys/class/net/DEV/statistics/tx_bytes` as seen inside `ns`.
fn tx_bytes(ns: &shoal_tests::netns::Netns, dev: &str) -> anyhow::Result<u64> {
    let path = format!("/sys/class/net/{dev}/statistics/tx_bytes");
    let out = ns.command("cat").arg(&path).output()?;
    anyhow::ensure!(
        out.status.success(),
        "cannot read {path} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// The median O_DIRECT write rate of this machine's disk where the
/// receivers write: `dd if=/dev/zero of=F bs=1M count=SIZE oflag=direct`,
/// in MB/s (10^6 bytes per second).
fn odirect_limit(dir: &std::path::Path, size_mib: u64, runs: usize) -> anyhow::Result<Vec<f64>> {
    let f = dir.join("odirect-limit.tmp");
    let mut rates = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_file(&f);
        let t = std::time::Instant::now();
        let out = std::process::Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", f.display()))
            .args(["bs=1M", &format!("count={size_mib}"), "oflag=direct"])
            .output()?;
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            out.status.success(),
            "dd oflag=direct failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        rates.push((size_mib * MIB) as f64 / secs / 1e6);
    }
    let _ = std::fs::remove_file(&f);
    Ok(rates)
}

/// A process watched to its end: exit time and status, CPU seconds (read
/// from its zombie, before it is reaped) and the peak RSS sampled while it
/// ran. Killed on drop if still running.
struct Watched {
    label: String,
    child: std::process::Child,
    log: std::path::PathBuf,
    /// Seconds from the run's start, and the status.
    end: Option<(f64, std::process::ExitStatus)>,
    cpu: f64,
    peak_mib: f64,
}

impl Watched {
    /// Starts `cmd` with stdin closed and stdout and stderr into `log`.
    fn spawn(
        label: &str,
        mut cmd: std::process::Command,
        log: std::path::PathBuf,
    ) -> anyhow::Result<Watched> {
        let out = std::fs::File::create(&log)?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {label} ({cmd:?}): {e}"))?;
        Ok(Watched {
            label: label.to_owned(),
            child,
            log,
            end: None,
            cpu: 0.0,
            peak_mib: 0.0,
        })
    }

    /// Samples the process; reaps it once it has exited. True when done.
    fn poll(&mut self, t0: std::time::Instant) -> bool {
        if self.end.is_some() {
            return true;
        }
        // `ip netns exec` execs the program in place: this pid is the program.
        let pid = self.child.id();
        let state = proc_state(pid);
        if state.is_some_and(|s| s != 'Z') {
            self.cpu = cpu_seconds(pid);
            self.peak_mib = self.peak_mib.max(peak_rss_mib(pid));
            return false;
        }
        // A zombie still shows its CPU times until it is reaped.
        if state == Some('Z') {
            self.cpu = cpu_seconds(pid);
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.end = Some((t0.elapsed().as_secs_f64(), st));
                true
            }
            _ => false,
        }
    }

    fn kill(&mut self) {
        if self.end.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        // udpcast redraws its progress line with carriage returns.
        let text = text.replace('\r', "\n");
        shoal_tests::proc::tail(&text, 600).trim().to_owned()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One run of one tool for N receivers.
#[derive(Debug, Default, Clone)]
struct McastRun {
    /// Seconds from the sender's start (udpcast) or the job's submission
    /// (Shoal) to the last receiver's exit (udpcast) or the job's end.
    wall: f64,
    /// udpcast: `wall` plus an fsync of every received file (Shoal's agents
    /// fsync before they report success).
    wall_sync: f64,
    /// udpcast: when the sender exited; Shoal: the Controller's own span,
    /// job created to last step finished.
    other: f64,
    /// Bytes the sender's interface sent per image byte.
    wire: f64,
    send_cpu: f64,
    recv_cpu: Vec<f64>,
    send_rss: f64,
    recv_rss: Vec<f64>,
    /// Received files that differ from the source.
    mismatches: usize,
    /// Receivers (and sender) that exited non-zero or were killed.
    failed_exits: usize,
}

const UDPCAST_PORTBASE: &str = "9000";
/// Both ends rendezvous on this group: the harness's addresses have no
/// broadcast address (`ip addr add` without `brd`), which udpcast's
/// default broadcast rendezvous needs.
const UDPCAST_RDV: &str = "224.0.0.1";

/// The `udp-receiver` arguments for one receiver.
fn udp_receiver_args(out: &std::path::Path, limit: Duration) -> Vec<String> {
    [
        "--file",
        &out.display().to_string(),
        "--interface",
        "eth0",
        "--portbase",
        UDPCAST_PORTBASE,
        "--mcast-rdv-address",
        UDPCAST_RDV,
        "--nokbd",
        "--start-timeout",
        &limit.as_secs().min(60).to_string(),
        "--receive-timeout",
        "20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The `udp-sender` arguments for `n` receivers. `--nopointopoint`: with
/// one receiver udpcast would switch to unicast; the bench compares
/// multicast with multicast at every N. `--rexmit-hello-interval 100`:
/// without it udp-sender looks at its start condition (`--min-receivers`)
/// only every 2 s, and sits idle for up to 2 s after the last receiver
/// joined.
fn udp_sender_args(src: &std::path::Path, n: usize, limit: Duration) -> Vec<String> {
    [
        "--file",
        &src.display().to_string(),
        "--interface",
        "br0",
        "--portbase",
        UDPCAST_PORTBASE,
        "--mcast-rdv-address",
        UDPCAST_RDV,
        "--min-receivers",
        &n.to_string(),
        "--max-wait",
        "20",
        "--rexmit-hello-interval",
        "100",
        "--start-timeout",
        &limit.as_secs().min(60).to_string(),
        "--nopointopoint",
        "--nokbd",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// udpcast from the bridge's namespace to the first `n` hosts, each
/// writing its own file. Process failures and wrong bytes are counted and
/// reported, not returned as errors.
#[allow(clippy::too_many_arguments)]
fn udpcast_run(
    lan: &shoal_tests::site::Lan,
    n: usize,
    src: &std::path::Path,
    outs: &[std::path::PathBuf],
    bytes: u64,
    logs: &std::path::Path,
    limit: Duration,
    label: &str,
) -> anyhow::Result<McastRun> {
    use std::time::Instant;
    for out in &outs[..n] {
        fresh_target(out, bytes)?;
    }
    let tx0 = tx_bytes(&lan.ns, "br0")?;
    let mut receivers = Vec::new();
    for (k, out) in outs[..n].iter().enumerate() {
        let mut cmd = lan.hosts[k].command("udp-receiver");
        cmd.args(udp_receiver_args(out, limit));
        receivers.push(Watched::spawn(
            &format!("udp-receiver {}", k + 1),
            cmd,
            logs.join(format!("udp-receiver-{}.log", k + 1)),
        )?);
    }
    // Each receiver has its socket once it names its address.
    let ready = Instant::now();
    while ready.elapsed() < Duration::from_secs(5)
        && !receivers
            .iter()
            .all(|r| std::fs::read_to_string(&r.log).is_ok_and(|l| l.contains("UDP receiver for")))
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));

    let t0 = Instant::now();
    let mut cmd = lan.ns.command("udp-sender");
    cmd.args(udp_sender_args(src, n, limit));
    let mut sender = Watched::spawn("udp-sender", cmd, logs.join("udp-sender.log"))?;
    loop {
        let mut done = sender.poll(t0);
        for r in receivers.iter_mut() {
            done &= r.poll(t0);
        }
        if done {
            break;
        }
        if t0.elapsed() > limit {
            for w in std::iter::once(&mut sender).chain(receivers.iter_mut()) {
                if w.end.is_none() {
                    println!(
                        "  !! {label}: {} still running after {} s: killed",
                        w.label,
                        limit.as_secs()
                    );
                    w.kill();
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let tx1 = tx_bytes(&lan.ns, "br0")?;
    let wall = receivers
        .iter()
        .map(|r| r.end.map_or(t0.elapsed().as_secs_f64(), |(s, _)| s))
        .fold(0.0, f64::max);
    // What Shoal's agents do before they report success: make it durable.
    let sync_t = Instant::now();
    let synced = std::process::Command::new("sync")
        .args(&outs[..n])
        .status()?;
    anyhow::ensure!(synced.success(), "sync of the received files failed");
    let wall_sync = wall + sync_t.elapsed().as_secs_f64();

    let mut run = McastRun {
        wall,
        wall_sync,
        other: sender.end.map_or(f64::NAN, |(s, _)| s),
        wire: (tx1 - tx0) as f64 / bytes as f64,
        send_cpu: sender.cpu,
        send_rss: sender.peak_mib,
        ..McastRun::default()
    };
    for w in std::iter::once(&sender).chain(receivers.iter()) {
        match w.end {
            Some((_, st)) if st.success() => {}
            Some((_, st)) => {
                run.failed_exits += 1;
                println!(
                    "  !! {label}: {} exited with {st}; its log ends:\n{}",
                    w.label,
                    w.log_tail()
                );
            }
            None => run.failed_exits += 1,
        }
    }
    for (r, out) in receivers.iter().zip(outs) {
        run.recv_cpu.push(r.cpu);
        run.recv_rss.push(r.peak_mib);
        if let Err(e) = same_bytes(src, out) {
            run.mismatches += 1;
            let exit = r
                .end
                .map_or("was killed".to_owned(), |(_, st)| format!("exited {st}"));
            println!(
                "  !! {label}: {} {exit} but its file is WRONG: {e:#}",
                r.label
            );
        }
    }
    Ok(run)
}

/// The string values of `"key": "..."` in pretty JSON, in order.
fn json_strings(text: &str, key: &str) -> Vec<String> {
    let needle = format!("\"{key}\": \"");
    text.match_indices(&needle)
        .filter_map(|(i, _)| {
            let rest = &text[i + needle.len()..];
            Some(rest[..rest.find('"')?].to_owned())
        })
        .collect()
}

/// The integer values of `"key": N` in pretty JSON, in order.
fn json_numbers(text: &str, key: &str) -> Vec<u64> {
    let needle = format!("\"{key}\": ");
    text.match_indices(&needle)
        .filter_map(|(i, _)| {
            let rest = &text[i + needle.len()..];
            let end = rest.find(|c: char| !c.is_ascii_digit())?;
            rest[..end].parse().ok()
        })
        .collect()
}

/// Milliseconds since the epoch of the Controller's `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn rfc3339_ms(s: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let ms = if s.as_bytes().get(19) == Some(&b'.') {
        num(20..23)?
    } else {
        0
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + min) * 60_000 + sec * 1000 + ms)
}

/// The deploy step of the multicast bench: every agent's `vda` (a symlink
/// to its own file in bench_dir), multicast, starting once `n` joined.
/// SHOAL_BENCH_OPTIONS adds step options, e.g. `;cipher=aes256gcm`.
fn multicast_step(n: usize, cipher: &str) -> String {
    let extra = std::env::var("SHOAL_BENCH_OPTIONS").unwrap_or_default();
    format!("deploy:bench/disk@name=vda;mode=multicast;cipher={cipher};min={n};wait=30{extra}")
}

/// One `mode=multicast` job on the first `n` agents. An error is a failed
/// job (or one that did not end in time); wrong bytes are counted.
#[allow(clippy::too_many_arguments)]
fn shoal_run(
    lan: &shoal_tests::site::Lan,
    ctl: &shoal_tests::site::Controller,
    agents: &[(shoal_tests::proc::Proc, &shoal_tests::site::FakeMachine)],
    n: usize,
    cipher: &str,
    src: &std::path::Path,
    outs: &[std::path::PathBuf],
    bytes: u64,
    limit: Duration,
    label: &str,
) -> anyhow::Result<McastRun> {
    use std::time::Instant;
    for out in &outs[..n] {
        fresh_target(out, bytes)?;
    }
    let agents = &agents[..n];
    let cpid = ctl.proc.pid();
    let apids: Vec<u32> = agents.iter().map(|(a, _)| a.pid()).collect();
    for &pid in std::iter::once(&cpid).chain(&apids) {
        reset_peak_rss(pid);
    }
    let c0 = cpu_seconds(cpid);
    let a0: Vec<f64> = apids.iter().map(|&p| cpu_seconds(p)).collect();
    let tx0 = tx_bytes(&lan.ns, "br0")?;
    let step = multicast_step(n, cipher);
    let mut argv = vec!["jobs", "run"];
    for (_, m) in agents {
        argv.extend(["--device", m.uuid.as_str()]);
    }
    argv.push(&step);

    // One blocking `jobs run --wait` (it polls the API every 50 ms in one
    // process): wall time ends when it exits, and no polling processes
    // compete with the agents for the CPU.
    let wait = limit.as_secs().max(1).to_string();
    let mut argv_wait = vec!["--json", "jobs", "run", "--wait", wait.as_str()];
    argv_wait.extend_from_slice(&argv[2..]);
    let t0 = Instant::now();
    let out = ctl.ctl(&argv_wait);
    let wall_exit = t0.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let job = json_numbers(&text, "id")
        .first()
        .map(|n| n.to_string())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "`shoalctl jobs run --wait ... '{step}'` printed no job ({}): {}{}",
                out.status,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
    let shown = text;
    let state = json_strings(&shown, "state")
        .into_iter()
        .next()
        .unwrap_or_else(|| "unknown".into());
    let mut send_rss = peak_rss_mib(cpid);
    let mut recv_rss: Vec<f64> = apids.iter().map(|&p| peak_rss_mib(p)).collect();
    let wall = wall_exit;
    let tx1 = tx_bytes(&lan.ns, "br0")?;
    // Peaks are monotonic while the processes live: one more read catches
    // anything after the last sample.
    send_rss = send_rss.max(peak_rss_mib(cpid));
    for (r, &pid) in recv_rss.iter_mut().zip(&apids) {
        *r = r.max(peak_rss_mib(pid));
    }
    if state != "succeeded" {
        let human = String::from_utf8_lossy(&ctl.ctl(&["jobs", "show", &job]).stdout).into_owned();
        let reasons = json_strings(&shown, "reason");
        let first = reasons.first().cloned().unwrap_or_default();
        // A Shoal without the `;KEY=VALUE` deploy options takes them for
        // part of the disk selector.
        let hint = if first.contains("no disk matches disk=name=vda;") {
            "\n     (this Shoal does not know the deploy step's `;mode=multicast;min=N;wait=S` options yet)"
        } else {
            ""
        };
        anyhow::bail!(
            "job {job} ({step}) {state} after {wall:.1} s, {} of {n} devices failed, first: {first}{hint}\n{human}\nfirst agent's log ends:\n{}",
            reasons.len(),
            shoal_tests::proc::tail(&agents[0].0.log(), 1500)
        );
    }
    let created = json_strings(&shown, "created_at")
        .first()
        .and_then(|s| rfc3339_ms(s));
    let finished = json_strings(&shown, "finished_at")
        .iter()
        .filter_map(|s| rfc3339_ms(s))
        .max();
    let span = match (created, finished) {
        (Some(c), Some(f)) => (f - c) as f64 / 1000.0,
        _ => f64::NAN,
    };
    let mut run = McastRun {
        wall,
        wall_sync: wall,
        other: span,
        wire: (tx1 - tx0) as f64 / bytes as f64,
        send_cpu: cpu_seconds(cpid) - c0,
        recv_cpu: apids
            .iter()
            .zip(&a0)
            .map(|(&p, c)| cpu_seconds(p) - c)
            .collect(),
        send_rss,
        recv_rss,
        ..McastRun::default()
    };
    for (k, out) in outs[..n].iter().enumerate() {
        if let Err(e) = same_bytes(src, out) {
            run.mismatches += 1;
            println!(
                "  !! {label}: job {job} succeeded but agent {}'s file is WRONG: {e:#}",
                k + 1
            );
        }
    }
    // What each agent says of its multicast phase (received, lost, forged,
    // skipped, re-requested, unicast fallback, peak RSS).
    for o in json_strings(&shown, "output") {
        if let Some(m) = o.split("; multicast: ").nth(1) {
            println!("     agent: {m}");
        }
    }
    Ok(run)
}

fn fmt_list(v: &[f64], prec: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.prec$}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_run(label: &str, r: &McastRun, bytes: u64, what_other: &str) {
    println!(
        "  {label}: {:.2} s = {:.1} MB/s (+fsync {:.2} s; {what_other} {:.2} s); wire {:.3} B/B; CPU send {:.2} s, recv [{}] s; peak RSS send {:.1} MiB, recv [{}] MiB; {} wrong files, {} failed exits",
        r.wall,
        bytes as f64 / r.wall / 1e6,
        r.wall_sync,
        r.other,
        r.wire,
        r.send_cpu,
        fmt_list(&r.recv_cpu, 2),
        r.send_rss,
        fmt_list(&r.recv_rss, 1),
        r.mismatches,
        r.failed_exits
    );
}

/// Medians over runs of one tool at one N, for the table.
struct McastSummary {
    wall: f64,
    wall_sync: f64,
    wire: f64,
    send_cpu: f64,
    /// Mean per receiver.
    recv_cpu: f64,
    send_rss: f64,
    /// Largest receiver.
    recv_rss: f64,
    mismatches: usize,
    failed_exits: usize,
    runs: usize,
}

fn summarize(runs: &[McastRun]) -> Option<McastSummary> {
    if runs.is_empty() {
        return None;
    }
    let med = |f: &dyn Fn(&McastRun) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    Some(McastSummary {
        wall: med(&|r| r.wall),
        wall_sync: med(&|r| r.wall_sync),
        wire: med(&|r| r.wire),
        send_cpu: med(&|r| r.send_cpu),
        recv_cpu: med(&|r| r.recv_cpu.iter().sum::<f64>() / r.recv_cpu.len().max(1) as f64),
        send_rss: med(&|r| r.send_rss),
        recv_rss: med(&|r| r.recv_rss.iter().copied().fold(0.0, f64::max)),
        mismatches: runs.iter().map(|r| r.mismatches).sum(),
        failed_exits: runs.iter().map(|r| r.failed_exits).sum(),
        runs: runs.len(),
    })
}

/// Every run of both tools at one receiver count.
struct McastAtN {
    n: usize,
    udp: Vec<McastRun>,
    /// Per cipher (as `--ciphers`): its runs, and why they stopped.
    shoal: Vec<(Vec<McastRun>, Option<String>)>,
}

fn multicast(args: &BenchArgs) -> anyhow::Result<()> {
    use shoal_tests::site::{Controller, FakeMachine, Lan};

    let mut counts: Vec<usize> = args.receivers.iter().copied().filter(|&n| n > 0).collect();
    counts.dedup();
    anyhow::ensure!(
        !counts.is_empty(),
        "--receivers needs at least one count above 0"
    );
    let pool = counts.iter().copied().max().unwrap_or(1);
    anyhow::ensure!(pool <= 100, "at most 100 receivers");
    ensure_package("udpcast", &["udp-sender", "udp-receiver"])?;
    anyhow::ensure!(have_program("dd"), "dd is missing");
    let agent_bin = agent::build()?;
    let (controller, shoalctl) = release_controller_bins()?;
    std::env::set_var("SHOAL_CONTROLLER", &controller);
    std::env::set_var("SHOALCTL", &shoalctl);
    std::env::set_var("SHOAL_AGENT", &agent_bin);
    if std::env::var_os("SHOAL_LOG").is_none() {
        std::env::set_var("SHOAL_LOG", "info");
    }

    let runs = args.runs();
    let size_mib = args.size_mib.max(1);
    let bytes = size_mib * MIB;
    // Generous bounds: 60 s plus 10 MiB/s.
    let limit = Duration::from_secs(60 + size_mib / 10);
    let dir = bench_dir()?;
    let logs = dir.join("multicast-logs");
    std::fs::create_dir_all(&logs)?;
    let src = dir.join(format!("multicast-source-{size_mib}MiB.img"));
    let t = std::time::Instant::now();
    random_source(&src, size_mib)?;
    println!(
        "bench multicast: {size_mib} MiB of random bytes ({}) ready in {:.1} s; receivers {counts:?}; {runs} runs each; release Controller, agent profile `agent`",
        src.display(),
        t.elapsed().as_secs_f64(),
    );
    let mut limit_rates = odirect_limit(&dir, size_mib, runs)?;
    println!(
        "  disk limit: dd if=/dev/zero bs=1M count={size_mib} oflag=direct into {}: {} MB/s, median {:.0} MB/s",
        dir.display(),
        fmt_list(&limit_rates, 0),
        median(&mut limit_rates)
    );

    // The LAN: a bridge (the senders' side: Controller and udp-sender both
    // send from br0) and one namespace per receiver, each on a veth, MTU
    // 1500. The bridge snoops IGMP and is its own querier, as a switch
    // would: group traffic reaches only the ports that joined (that takes
    // the querier's 10 s response interval after it starts). Every
    // namespace routes 224.0.0.0/4 to its LAN interface, as a host with a
    // default route would.
    let mut lan = Lan::new();
    lan.ns
        .ip(&["link", "set", "br0", "type", "bridge", "mcast_querier", "1"]);
    let querier_since = std::time::Instant::now();
    lan.ns.ip(&["route", "add", "224.0.0.0/4", "dev", "br0"]);
    let state = tempfile::tempdir_in(&dir)?;
    let listen = format!("{}:7000", lan.gateway());
    let ctl = Controller::start(state.path(), Some(&lan.ns), &listen, 7100, &[]);
    let cmdline = ctl.agent_cmdline();
    let outs: Vec<std::path::PathBuf> = (1..=pool)
        .map(|k| dir.join(format!("multicast-out-{k}.img")))
        .collect();
    let machines: Vec<FakeMachine> = (1..=pool)
        .map(|k| FakeMachine::new(k as u32, size_mib))
        .collect();
    let mut agents = Vec::new();
    for (k, m) in machines.iter().enumerate() {
        let h = lan.add_host(10 + k as u8);
        lan.hosts[h].ip(&["route", "add", "224.0.0.0/4", "dev", "eth0"]);
        // The agent's disk `vda` is a file in bench_dir (on disk, not in
        // the machine's temp dir): one step string serves every device.
        std::fs::create_dir_all(m.dir.path().join("dev"))?;
        std::os::unix::fs::symlink(&outs[k], m.dir.path().join("dev/vda"))?;
        fresh_target(&outs[k], bytes)?;
        let agent = m.agent(&format!("agent{}", k + 1), Some(&lan.hosts[h]), &cmdline);
        agents.push((agent, m));
    }
    for (a, _) in agents.iter_mut() {
        a.expect("registered with controller", Duration::from_secs(30));
    }
    for (pid, want) in std::iter::once((ctl.proc.pid(), "shoal-controlle"))
        .chain(agents.iter().map(|(a, _)| (a.pid(), "shoal-agent")))
    {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        anyhow::ensure!(
            comm.trim() == want,
            "pid {pid} is {comm:?}, not {want}: CPU would be measured on the wrong process"
        );
    }
    ctl.ctl_ok(&["image", "group", "create", "bench"]);
    let t = std::time::Instant::now();
    ctl.ctl_ok(&[
        "--json",
        "image",
        "add",
        "bench",
        src.to_str().unwrap(),
        "--name",
        "disk",
        "--compression",
        "none",
    ]);
    println!(
        "  image bench/disk added (compression none) in {:.1} s; {pool} agents registered; step {}",
        t.elapsed().as_secs_f64(),
        multicast_step(pool, "CIPHER")
    );
    let auto = shoal_protocol::multicast::Cipher::auto(
        shoal_protocol::multicast::hardware_aes(),
        shoal_protocol::multicast::hardware_aes(),
    );
    println!(
        "  ciphers: {} (auto = {} on this machine: the Controller and every agent {} AES instructions)",
        args.ciphers.join(", "),
        auto.as_str(),
        if shoal_protocol::multicast::hardware_aes() { "have" } else { "lack" }
    );
    let settle = Duration::from_secs(12).saturating_sub(querier_since.elapsed());
    std::thread::sleep(settle);

    let mut results: Vec<McastAtN> = Vec::new();
    for &n in &counts {
        let mut udp = Vec::new();
        let mut shoal: Vec<(Vec<McastRun>, Option<String>)> =
            args.ciphers.iter().map(|_| (Vec::new(), None)).collect();
        for run in 1..=runs {
            let label = format!("N={n} run {run} udpcast");
            // SHOAL_BENCH_SKIP_ANCHOR=1: Shoal only (while tuning).
            let r = if std::env::var_os("SHOAL_BENCH_SKIP_ANCHOR").is_some() {
                McastRun::default()
            } else {
                udpcast_run(&lan, n, &src, &outs, bytes, &logs, limit, &label)?
            };
            print_run(&label, &r, bytes, "sender exit");
            udp.push(r);

            for (cipher, (done, err)) in args.ciphers.iter().zip(shoal.iter_mut()) {
                let label = format!("N={n} run {run} shoal {cipher}");
                if err.is_some() {
                    continue;
                }
                match shoal_run(
                    &lan,
                    &ctl,
                    &agents,
                    n,
                    cipher,
                    &src,
                    &outs,
                    bytes,
                    limit + Duration::from_secs(30),
                    &label,
                ) {
                    Ok(r) => {
                        print_run(&label, &r, bytes, "controller's span");
                        if n >= 2 && r.wire > 1.5 {
                            println!("  !! {label}: {:.2} bytes on the wire per image byte for {n} receivers: that is not multicast", r.wire);
                        }
                        done.push(r);
                    }
                    Err(e) => {
                        println!("  !! {label}: FAILED: {e:#}");
                        println!("     (no more Shoal {cipher} runs at N={n})");
                        *err = Some(format!("{e:#}"));
                    }
                }
            }
        }
        results.push(McastAtN { n, udp, shoal });
    }
    let _ = std::fs::write(logs.join("controller.log"), ctl.proc.log());
    for out in &outs {
        let _ = std::fs::remove_file(out);
    }

    println!();
    println!(
        "  {size_mib} MiB image, medians of {runs} runs; MB/s = image bytes / wall / 10^6; disk MB/s = N x that; vs udpcast = udpcast wall / this wall"
    );
    println!(
        "  wire = bytes sent by br0 per image byte; CPU in s (recv: mean per receiver); peak RSS in MiB (recv: largest receiver); bad = wrong files / failed exits over all runs"
    );
    let mut failures = Vec::new();
    for McastAtN { n, udp, shoal } in &results {
        println!();
        println!("  N = {n:<18} wall s     MB/s  disk MB/s  vs udpcast   wire   CPU send  CPU recv  RSS send  RSS recv    bad");
        let base = summarize(udp);
        let base_wall = base.as_ref().map_or(f64::NAN, |b| b.wall);
        let row = |what: &str, s: &McastSummary, wall: f64| {
            let rate = bytes as f64 / wall / 1e6;
            println!(
                "  {what:<22} {wall:>6.2} {rate:>8.1} {:>10.1} {:>10.2}x {:>6.3} {:>10.2} {:>9.2} {:>9.1} {:>9.1} {:>3}/{}",
                rate * *n as f64,
                base_wall / wall,
                s.wire,
                s.send_cpu,
                s.recv_cpu,
                s.send_rss,
                s.recv_rss,
                s.mismatches,
                s.failed_exits,
            );
        };
        if let Some(b) = &base {
            row("udpcast", b, b.wall);
            row("udpcast+sync", b, b.wall_sync);
        }
        let raw = |v: &[McastRun], f: &dyn Fn(&McastRun) -> f64| {
            fmt_list(&v.iter().map(f).collect::<Vec<_>>(), 2)
        };
        let mut raw_wall = format!(
            "udpcast [{}], udpcast+sync [{}], udp-sender exit [{}]",
            raw(udp, &|r| r.wall),
            raw(udp, &|r| r.wall_sync),
            raw(udp, &|r| r.other)
        );
        let mut raw_wire = format!("udpcast [{}]", raw(udp, &|r| r.wire));
        for (cipher, (runs_done, err)) in args.ciphers.iter().zip(shoal) {
            let what = format!("shoal {cipher}");
            match summarize(runs_done) {
                Some(s) => {
                    row(&what, &s, s.wall);
                    if s.runs < runs {
                        println!("  ({what}: {} of {runs} runs)", s.runs);
                    }
                    if s.mismatches > 0 {
                        failures.push(format!("N={n}: {} wrong files from {what}", s.mismatches));
                    }
                }
                None => println!("  {what:<22} FAILED (see above)"),
            }
            if let Some(e) = err {
                // The headline and its hint, not the job table and log.
                let mut lines = e.lines();
                let head = lines.next().unwrap_or_default().to_owned();
                let hints: String = lines
                    .take_while(|l| l.starts_with("     ("))
                    .map(|l| format!("\n    {}", l.trim()))
                    .collect();
                failures.push(format!("N={n} {what}: {head}{hints}"));
            }
            raw_wall.push_str(&format!(
                ", {what} [{}], its controller's span [{}]",
                raw(runs_done, &|r| r.wall),
                raw(runs_done, &|r| r.other)
            ));
            raw_wire.push_str(&format!(", {what} [{}]", raw(runs_done, &|r| r.wire)));
        }
        println!("  raw wall s: {raw_wall}");
        println!("  raw wire B/B: {raw_wire}");
        let udp_bad: usize = udp.iter().map(|r| r.mismatches).sum();
        if udp_bad > 0 {
            println!("  !! udpcast delivered {udp_bad} WRONG files at N={n} (see the runs above)");
        }
    }
    println!();
    println!(
        "  udpcast: udp-receiver --file OUT {}",
        udp_receiver_args(std::path::Path::new("OUT"), limit)[2..].join(" ")
    );
    println!(
        "           udp-sender --file SRC {}",
        udp_sender_args(std::path::Path::new("SRC"), 0, limit)[2..]
            .join(" ")
            .replace("--min-receivers 0", "--min-receivers N")
    );
    println!("  (udpcast wall: sender start to the last receiver's exit, which includes udp-receiver's default 500 ms --exit-wait;");
    println!(
        "   udpcast writes through the page cache, +sync adds an fsync of every received file;"
    );
    println!("   shoal wall: `jobs run` to `jobs show` reporting the job ended, polled every 50 ms; its agents write with O_DIRECT and fsync)");
    anyhow::ensure!(
        failures.is_empty(),
        "the Shoal half failed:\n  {}",
        failures.join("\n  ")
    );
    Ok(())
}
