//! `cargo xtask`: the one entry point for building Shoal's artefacts, running
//! the QEMU lab, the tests and the benchmarks. One module per task.
//!
//! Artefacts land under `target/shoal/`:
//! - `target/shoal/agent/shoal-agent` — the static agent (`xtask agent`);
//! - `target/shoal/kernel/<version>/` — the lab kernel (`xtask kernel`);
//! - `target/shoal/initramfs-<flavour>.cpio.zst` — the initramfs (`xtask initramfs`).

mod agent;
mod bench;
mod initramfs;
mod kernel;
mod lab;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Build, boot and test Shoal")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the statically linked agent.
    Agent,
    /// Fetch (or take) the lab kernel and its modules.
    Kernel(kernel::KernelArgs),
    /// Build the initramfs (agent as /init, kernel modules, config).
    Initramfs(initramfs::InitramfsArgs),
    /// Build everything and boot the agent in QEMU.
    Lab(lab::LabArgs),
    /// Build the artefacts and run every test (unit, namespace, QEMU).
    Test(test::TestArgs),
    /// Run a benchmark and report medians.
    Bench(bench::BenchArgs),
    /// Fuzz the control channel's parsers for a while (release build).
    Fuzz {
        /// `control` (frames, messages, Noise) or `image` (image parsers, chunk decoding).
        #[arg(default_value = "control")]
        target: String,
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.task {
        Task::Agent => {
            let path = agent::build()?;
            println!("{}", path.display());
        }
        Task::Kernel(args) => {
            let k = kernel::ensure(&args)?;
            println!("kernel {} at {}", k.version, k.dir.display());
        }
        Task::Initramfs(args) => {
            let out = initramfs::run(&args)?;
            println!("{}", out.display());
        }
        Task::Lab(args) => lab::run(&args)?,
        Task::Test(args) => test::run(&args)?,
        Task::Bench(args) => bench::run(&args)?,
        Task::Fuzz { target, seconds } => {
            anyhow::ensure!(
                ["control", "image"].contains(&target.as_str()),
                "unknown fuzz target {target:?}: control or image"
            );
            let example = format!("fuzz_{target}");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            util::run(
                std::process::Command::new(cargo)
                    .current_dir(util::root())
                    .args([
                        "run",
                        "--quiet",
                        "--release",
                        "-p",
                        "shoal-protocol",
                        "--example",
                        &example,
                        "--",
                    ])
                    .args(["--seconds", &seconds.to_string()]),
            )?;
        }
    }
    Ok(())
}
