//! The Controller server: opens the state directory and the database,
//! recovers from the previous run, binds the agent listener and the admin
//! API, and runs both until dropped.
//!
//! On start every device is marked offline (nothing is connected yet) and
//! every step left running is failed ("controller restarted while the step
//! ran"). The log lines `controller public key: HEX` and
//! `listening on ADDR (agents), ADDR (admin)` come once both sockets are
//! bound, so a test can wait for them and read the ports from them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use shoal_protocol::channel::{to_hex, Keypair, Psk, PublicKey, ReplayGuard};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::db::{Db, DbError, Store};
use crate::model::EnrolmentPolicy;
use crate::registry::Registry;
use crate::state::{State, StateError};

/// Initiator ephemeral keys remembered against replayed handshakes.
pub const REPLAY_CAPACITY: usize = 100_000;
/// Longest heartbeat timeout (the protocol carries `u32` milliseconds).
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// How often devices' `last_seen` is written to the database.
pub const LAST_SEEN_FLUSH: Duration = Duration::from_secs(1);
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7100);

/// How to run the server.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// Where agents connect.
    pub listen: SocketAddr,
    /// The admin API (loopback).
    pub admin: SocketAddr,
    pub enrolment: EnrolmentPolicy,
    /// How often agents should send a heartbeat.
    pub heartbeat: Duration,
    /// Silence after which a device is offline and its running step failed.
    pub timeout: Duration,
    /// The Image Distribution service; `None`: the agent listener's
    /// address with port + 1 (any free port if that one is taken).
    pub distribution: Option<SocketAddr>,
    /// Multicast sessions of the Image Distribution service.
    pub multicast: crate::distribution::multicast::MulticastConfig,
}

impl Config {
    /// Defaults: admin on 127.0.0.1:7100, `auto` enrolment, heartbeat 1 s,
    /// timeout 5 s.
    pub fn new(state_dir: impl Into<PathBuf>, listen: SocketAddr) -> Config {
        Config {
            state_dir: state_dir.into(),
            listen,
            admin: DEFAULT_ADMIN,
            enrolment: EnrolmentPolicy::Auto,
            heartbeat: Duration::from_millis(1000),
            timeout: Duration::from_millis(5000),
            distribution: None,
            multicast: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the state directory")]
    State(#[from] StateError),
    #[error("cannot open the database")]
    Db(#[from] DbError),
    #[error("cannot listen for agents on {0}")]
    BindAgents(SocketAddr, #[source] std::io::Error),
    #[error("cannot serve the admin API on {0}")]
    BindAdmin(SocketAddr, #[source] std::io::Error),
    #[error("cannot serve image distribution on {0}")]
    BindDistribution(SocketAddr, #[source] std::io::Error),
    #[error("heartbeat {heartbeat} ms and timeout {timeout} ms: need 1 <= heartbeat < timeout <= {MAX_TIMEOUT_MS}")]
    Timeouts { heartbeat: u128, timeout: u128 },
    #[error("startup task failed")]
    Task,
}

/// What the listener, the sessions and the admin API share.
pub struct Shared {
    pub store: Store,
    pub keypair: Keypair,
    pub psk: Psk,
    pub replay: Mutex<ReplayGuard>,
    /// Bounds the handshakes computed at once (`agents.rs`).
    pub handshakes: tokio::sync::Semaphore,
    pub registry: Registry,
    pub policy: EnrolmentPolicy,
    pub heartbeat: Duration,
    pub timeout: Duration,
    pub admin_token: String,
    /// The image store (none for an in-memory database).
    pub images: Option<Arc<crate::store::ImageStore>>,
    /// Sessions of the Image Distribution service.
    pub distribution: crate::distribution::Distribution,
    /// Where that service listens (an unspecified IP: agents are told the
    /// address they reached the Controller at).
    pub distribution_addr: SocketAddr,
    /// Multicast sessions of the Image Distribution service.
    pub multicast: crate::distribution::multicast::Multicast,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("public_key", &to_hex(&self.keypair.public))
            .field("policy", &self.policy)
            .field("heartbeat", &self.heartbeat)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A running Controller. Dropping it stops the listener, the admin API and
/// every agent connection.
#[derive(Debug)]
pub struct Server {
    /// The agent listener's address (with the real port when 0 was asked).
    pub agents_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub public_key: PublicKey,
    pub admin_token: String,
    pub shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        let (hb, to) = (config.heartbeat.as_millis(), config.timeout.as_millis());
        if hb == 0 || hb >= to || to > u128::from(MAX_TIMEOUT_MS) {
            return Err(ServerError::Timeouts {
                heartbeat: hb,
                timeout: to,
            });
        }
        let dir = config.state_dir.clone();
        let (state, db) = tokio::task::spawn_blocking(move || -> Result<_, ServerError> {
            let state = State::open_or_create(&dir)?;
            let mut db = Db::open(&state.db_path())?;
            let now = crate::time::now_ms();
            let offline = db.mark_all_offline()?;
            let failed = db.fail_all_running("controller restarted while the step ran", now)?;
            if offline + failed > 0 {
                info!("recovered from the previous run: {offline} devices marked offline, {failed} running steps failed");
            }
            Ok((state, db))
        })
        .await
        .map_err(|_| ServerError::Task)??;
        info!("controller public key: {}", state.public_hex());

        let agents = TcpListener::bind(config.listen)
            .await
            .map_err(|e| ServerError::BindAgents(config.listen, e))?;
        let admin = TcpListener::bind(config.admin)
            .await
            .map_err(|e| ServerError::BindAdmin(config.admin, e))?;
        let agents_addr = agents
            .local_addr()
            .map_err(|e| ServerError::BindAgents(config.listen, e))?;
        let admin_addr = admin
            .local_addr()
            .map_err(|e| ServerError::BindAdmin(config.admin, e))?;
        let dist_default = config.distribution.is_none();
        let dist_want = config.distribution.unwrap_or_else(|| {
            let port = match agents_addr.port() {
                0 | u16::MAX => 0,
                p => p + 1,
            };
            SocketAddr::new(agents_addr.ip(), port)
        });
        let dist = match TcpListener::bind(dist_want).await {
            Ok(l) => l,
            Err(e) if dist_default => {
                warn!(
                    "image distribution: cannot listen on {dist_want} ({e}); using any free port"
                );
                TcpListener::bind(SocketAddr::new(dist_want.ip(), 0))
                    .await
                    .map_err(|e| ServerError::BindDistribution(dist_want, e))?
            }
            Err(e) => return Err(ServerError::BindDistribution(dist_want, e)),
        };
        let distribution_addr = dist
            .local_addr()
            .map_err(|e| ServerError::BindDistribution(dist_want, e))?;
        if !admin_addr.ip().is_loopback() {
            warn!("the admin API listens on {admin_addr}, which is not a loopback address: anyone who can reach it and has the token can run jobs");
        }

        let store = Store::new(db);
        // The image store next to the database (or `serve --images`); none
        // for an in-memory database. Opening it is quick (a directory).
        let images = match crate::store::ImageStore::from_db(&store) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                warn!("no image store: {}", crate::error_chain(&e));
                None
            }
        };
        let shared = Arc::new(Shared {
            store,
            keypair: state.keypair.clone(),
            psk: state.psk,
            replay: Mutex::new(ReplayGuard::new(REPLAY_CAPACITY)),
            handshakes: tokio::sync::Semaphore::new(crate::agents::handshake_slots()),
            registry: Registry::new(),
            policy: config.enrolment,
            heartbeat: config.heartbeat,
            timeout: config.timeout,
            admin_token: state.admin_token.clone(),
            images,
            distribution: crate::distribution::Distribution::new(),
            distribution_addr,
            multicast: crate::distribution::multicast::Multicast::new(config.multicast.clone()),
        });
        let router = crate::admin::router(shared.clone());
        let flusher = shared.clone();
        let tasks = vec![
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(LAST_SEEN_FLUSH);
                loop {
                    tick.tick().await;
                    let seen = flusher.registry.take_seen();
                    if seen.is_empty() {
                        continue;
                    }
                    if let Err(e) = flusher.store.call(move |db| db.touch(&seen)).await {
                        log::error!(
                            "cannot record when devices were last seen: {}",
                            crate::error_chain(&e)
                        );
                    }
                }
            }),
            tokio::spawn(crate::agents::serve(shared.clone(), agents)),
            tokio::spawn(async move {
                if let Err(e) = axum::serve(admin, router).await {
                    log::error!("the admin API stopped: {e}");
                }
            }),
            tokio::spawn(shared.distribution.clone().serve(dist)),
        ];
        info!("listening on {agents_addr} (agents), {admin_addr} (admin), {distribution_addr} (image distribution)");
        Ok(Server {
            agents_addr,
            admin_addr,
            public_key: state.keypair.public,
            admin_token: state.admin_token,
            shared,
            tasks,
        })
    }

    /// Runs until the listener or the admin API stops (they do not, short
    /// of a fatal error).
    pub async fn wait(&mut self) {
        if let Some(first) = self.tasks.get_mut(1) {
            let _ = first.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
