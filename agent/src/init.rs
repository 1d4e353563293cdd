//! PID 1: early bring-up, settings, logging, signals, then the agent's work:
//! with `shoal.controller=` set, the control loop (`control/`), which runs
//! until a power step from the Controller; without, `shoal.then=`.
//!
//! PID 1 never returns: if it exited, the kernel would panic. A fatal error
//! (or a panic) is logged, the disks are synced, and after a back-off the
//! machine reboots or powers off (`shoal.on_error=`). SIGTERM, SIGINT
//! (Ctrl-Alt-Del) and SIGPWR are an orderly power-off; orphans are reaped.

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use log::{debug, error, info, warn};

use crate::agent::{self, Context};
use crate::bringup::{self, Outcome};
use crate::control::{self, ClientConfig, LocalHooks};
use crate::settings::{PowerAction, Settings};
use crate::{logging, sys};

pub const CONFIG_PATH: &str = "/etc/shoal/agent.toml";

/// What a fatal error does; set once the settings are read.
static ON_ERROR: OnceLock<(PowerAction, Duration)> = OnceLock::new();

pub fn main() -> ! {
    let steps = bringup::run(bringup::EARLY);
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let config = fs::read_to_string(CONFIG_PATH).ok();
    let (settings, warnings) =
        Settings::load(config.as_deref().map(|t| (CONFIG_PATH, t)), &cmdline);
    logging::init(&settings.log);
    let _ = ON_ERROR.set((settings.on_error, settings.error_delay));
    std::panic::set_hook(Box::new(|info| fatal(&format!("panic: {info}"))));

    info!(
        "shoal-agent {} starting as PID 1",
        env!("CARGO_PKG_VERSION")
    );
    let mut required_failed = None;
    for (step, outcome) in &steps {
        match outcome {
            Outcome::Done => debug!("{step}"),
            Outcome::AlreadyThere => debug!("{step}: already there"),
            Outcome::Failed(e) if step.required() => {
                error!("{step}: {e}");
                required_failed = Some(format!("{step}: {e}"));
            }
            Outcome::Failed(e) => warn!("{step}: {e}"),
        }
    }
    if let Some(why) = required_failed {
        fatal(&why);
    }
    info!("kernel command line: {}", cmdline.trim());
    if config.is_some() {
        info!("config file: {CONFIG_PATH}");
    }
    for w in &warnings {
        warn!("{w}");
    }
    start_signal_thread();

    let ctx = Context {
        root: PathBuf::from("/"),
        modules_dir: None,
        load_modules: true,
        once: false,
    };
    let state = agent::run(&ctx, &settings);
    info!("{}", state.ready_line());

    // With a Controller configured, the control loop takes over and
    // `shoal.then` does not apply: the Controller's power steps end the agent.
    if settings.controller.is_some() {
        let hooks = LocalHooks {
            root: ctx.root.clone(),
            pid1: true,
        };
        match ClientConfig::from_settings(&settings, state.inventory.clone()) {
            Ok(Some(cfg)) => {
                control::run(cfg, hooks);
            }
            Ok(None) => {}
            Err(e) => error!("{e}; not connecting to the controller (waiting here)"),
        }
        wait_forever(&state);
    }
    match settings.then {
        PowerAction::Wait => wait_forever(&state),
        action => power(action, "bring-up done (shoal.then)"),
    }
}

/// Keeps PID 1 alive. Signals are handled on their own thread; the lease
/// renewer in `state` lives as long as this loop.
fn wait_forever(state: &agent::State) -> ! {
    loop {
        let _keep = state;
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn start_signal_thread() {
    let set = sys::init_signals();
    if let Err(e) = sys::block(&set) {
        warn!("cannot block signals: {e}; SIGTERM/SIGPWR will not power off cleanly");
        return;
    }
    if let Err(e) = sys::cad_to_signal() {
        warn!("cannot route Ctrl-Alt-Del to SIGINT: {e}");
    }
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match sys::wait_signal(&set) {
                Ok(nix::sys::signal::Signal::SIGCHLD) => {
                    for (pid, status) in sys::reap_children() {
                        debug!("reaped {pid}: {status}");
                    }
                }
                Ok(nix::sys::signal::Signal::SIGHUP) => debug!("SIGHUP ignored"),
                Ok(sig) => power(PowerAction::Poweroff, &format!("{sig} received")),
                Err(e) => {
                    warn!("sigwait: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        });
    if let Err(e) = spawned {
        warn!("cannot start the signal thread: {e}");
    }
}

/// Syncs and powers off or reboots. Never returns.
pub(crate) fn power(action: PowerAction, why: &str) -> ! {
    let poweroff = action != PowerAction::Reboot;
    info!(
        "{why}: {}",
        if poweroff {
            "powering off"
        } else {
            "rebooting"
        }
    );
    sys::sync();
    let e = sys::power(poweroff);
    error!("reboot(2) failed: {e}; halting here");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A fatal error in PID 1: log, sync, back off, then reboot or power off.
pub fn fatal(why: &str) -> ! {
    let (action, delay) = ON_ERROR
        .get()
        .copied()
        .unwrap_or((PowerAction::Reboot, Duration::from_secs(30)));
    error!("fatal: {why}");
    error!(
        "{} in {} s (shoal.on_error, shoal.error_delay)",
        action,
        delay.as_secs()
    );
    sys::sync();
    std::thread::sleep(delay);
    power(action, "fatal error")
}
