//! `shoal-controller`: the Controller daemon.
//!
//! - `serve --state DIR --listen ADDR:PORT [--admin ADDR:PORT]
//!   [--enrolment auto|known-only] [--heartbeat-ms N] [--timeout-ms N]
//!   [--images DIR] [--distribution ADDR:PORT]` runs the agent listener,
//!   the admin API and the Image Distribution service until SIGINT or
//!   SIGTERM; the image store is DIR (default `STATE/images`), the
//!   distribution service listens on the `--listen` address with port + 1
//!   unless `--distribution` says.
//! - `keys --state DIR [--listen HOST:PORT]` prints the public key and the
//!   agent kernel command line, creating the state directory if missing.
//!
//! The work is in the library (`lib.rs`); this file parses arguments.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use shoal_controller::db::{Db, IMAGES_DIR_SETTING};
use shoal_controller::model::EnrolmentPolicy;
use shoal_controller::state::State;
use shoal_controller::{error_chain, logging, Config, Server};

#[derive(Debug, Parser)]
#[command(
    name = "shoal-controller",
    version,
    about = "Shoal's Controller: devices, jobs, the agents' control channel and the admin API"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Controller.
    Serve(ServeArgs),
    /// Print the public key and the agent kernel command line.
    Keys {
        /// State directory (created if missing).
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// The address agents reach the Controller at.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// State directory: keys, enrolment secret, admin token, database.
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// Where agents connect (port 0: any free port, logged).
    #[arg(long, value_name = "ADDR:PORT", value_parser = socket_addr)]
    listen: SocketAddr,
    /// The admin API (keep it on loopback).
    #[arg(long, value_name = "ADDR:PORT", value_parser = socket_addr, default_value = "127.0.0.1:7100")]
    admin: SocketAddr,
    /// New devices: approved at once, or pending until approved.
    #[arg(long, value_enum, default_value = "auto")]
    enrolment: Enrolment,
    /// Heartbeat period asked of agents.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Silence after which a device is offline.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    timeout_ms: u64,
    /// The image store directory (default: STATE/images).
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// The Image Distribution service (default: the --listen address, port + 1).
    #[arg(long, value_name = "ADDR:PORT", value_parser = socket_addr)]
    distribution: Option<SocketAddr>,
    /// Multicast group addresses for deploy sessions (administratively scoped by default).
    #[arg(long, value_name = "ADDR/PREFIX", default_value = "239.0.0.0/8", value_parser = pool)]
    multicast_pool: (std::net::Ipv4Addr, u8),
    /// UDP port of the multicast groups.
    #[arg(long, value_name = "PORT", default_value_t = 40000)]
    multicast_port: u16,
    /// TTL of multicast datagrams (1: this segment only).
    #[arg(long, value_name = "HOPS", default_value_t = 1)]
    multicast_ttl: u32,
    /// Path MTU of the deployment network (9000 for jumbo frames).
    #[arg(long, value_name = "BYTES", default_value_t = 1500)]
    multicast_mtu: usize,
    /// Most megabytes per second per multicast session (0: adapt to loss only).
    #[arg(long, value_name = "MB/S", default_value_t = 0)]
    multicast_rate: u32,
}

fn pool(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or("expected ADDR/PREFIX, e.g. 239.0.0.0/8")?;
    let addr: std::net::Ipv4Addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
    let prefix: u8 = p.parse().map_err(|e| format!("{p}: {e}"))?;
    if !addr.is_multicast() || !(4..=30).contains(&prefix) {
        return Err(format!(
            "{s}: not a multicast range with a prefix of 4 to 30"
        ));
    }
    Ok((addr, prefix))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Enrolment {
    Auto,
    KnownOnly,
}

fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{s}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s}: no address"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init();
    let result = match cli.cmd {
        Command::Keys { state, listen } => keys(&state, listen.as_deref()),
        Command::Serve(args) => serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-controller: {e}");
            ExitCode::FAILURE
        }
    }
}

fn keys(dir: &std::path::Path, listen: Option<&str>) -> Result<(), String> {
    let state = State::open_or_create(dir).map_err(|e| error_chain(&e))?;
    let controller = listen.unwrap_or("HOST:PORT");
    if controller.starts_with("0.0.0.0:") || controller.starts_with("[::]:") {
        eprintln!("shoal-controller: warning: agents cannot connect to {controller}; pass --listen with an address they can reach");
    }
    println!("controller public key: {}", state.public_hex());
    println!("{}", state.kernel_cmdline(controller));
    Ok(())
}

/// Records where the image store is (the admin API reads the setting).
fn set_images_dir(state_dir: &std::path::Path, images: Option<PathBuf>) -> Result<(), String> {
    let state = State::open_or_create(state_dir).map_err(|e| error_chain(&e))?;
    let dir = images.unwrap_or_else(|| state.dir.join(shoal_controller::store::DEFAULT_DIR));
    let dir = std::path::absolute(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut db = Db::open(&state.db_path()).map_err(|e| error_chain(&e))?;
    db.set_setting(IMAGES_DIR_SETTING, &dir.to_string_lossy())
        .map_err(|e| error_chain(&e))
}

fn serve(args: ServeArgs) -> Result<(), String> {
    set_images_dir(&args.state, args.images)?;
    let config = Config {
        state_dir: args.state,
        listen: args.listen,
        admin: args.admin,
        enrolment: match args.enrolment {
            Enrolment::Auto => EnrolmentPolicy::Auto,
            Enrolment::KnownOnly => EnrolmentPolicy::KnownOnly,
        },
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        timeout: Duration::from_millis(args.timeout_ms),
        distribution: args.distribution,
        multicast: shoal_controller::distribution::multicast::MulticastConfig {
            pool: args.multicast_pool.0,
            prefix: args.multicast_pool.1,
            port: args.multicast_port,
            ttl: args.multicast_ttl,
            mtu: args.multicast_mtu,
            max_rate: (args.multicast_rate > 0).then(|| f64::from(args.multicast_rate) * 1e6),
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        let mut server = Server::start(config).await.map_err(|e| error_chain(&e))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        tokio::select! {
            _ = server.wait() => return Err("the agent listener stopped".to_owned()),
            _ = tokio::signal::ctrl_c() => log::info!("shutting down (SIGINT)"),
            _ = term.recv() => log::info!("shutting down (SIGTERM)"),
        }
        Ok(())
    })?;
    // Sessions end with the runtime; the next start marks devices offline
    // and fails what was running.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
