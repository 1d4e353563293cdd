//! Shoal's Deployment Agent.
//!
//! As PID 1 of the netboot initramfs it brings the machine up (`init`); run
//! as an ordinary process, the same binary offers its pieces as commands so
//! they can be tested against a fake `/sys` tree, a veth pair or a loop
//! device. See ARCHITECTURE.md for the map.

mod agent;
mod bringup;
mod control;
mod deploy;
mod disk;
mod init;
mod inventory;
mod logging;
mod modules;
mod net;
mod settings;
mod sys;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use lexopt::prelude::*;

use crate::agent::Context;
use crate::control::{ClientConfig, LocalHooks};
use crate::settings::Settings;

const USAGE: &str = "\
usage: shoal-agent                     (as PID 1: the netboot agent)
       shoal-agent run [--root DIR] [--cmdline TEXT] [--config FILE]
                       [--modules DIR] [--load-modules] [--iface NAME]
       shoal-agent inventory [--root DIR] [--json]
       shoal-agent modules [--root DIR] [--modules DIR] [--load]
       shoal-agent dhcp --iface NAME [--timeout SECS]
       shoal-agent swarm --count N --cmdline TEXT [--seconds S]
       shoal-agent version

run        bring-up as PID 1 does it, minus mounts and power: modules,
           inventory, network (one attempt), then exit; with
           shoal.controller= (and shoal.controller_key=, shoal.enrol_key=)
           set, stay connected to the Controller running its steps until a
           poweroff/reboot step (which exits 0) or SIGTERM/Ctrl-C
inventory  print the hardware inventory read from DIR/sys and DIR/proc
modules    match DIR/sys devices against modules.alias; --load loads them
dhcp       get a DHCP lease on NAME, configure it, print the lease
swarm      N control clients in one process, each with a synthetic identity,
           connecting to the Controller named in TEXT's shoal.controller=,
           shoal.controller_key=, shoal.enrol_key=; after S seconds (or every
           10 s if none) print `swarm: N clients, M registered, H heartbeats
           sent, R reconnects` (S given: then exit). SHOAL_LOG defaults to warn";

fn main() -> ExitCode {
    if std::process::id() == 1 {
        init::main();
    }
    match cli() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoal-agent: {e}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn cli() -> Result<ExitCode, lexopt::Error> {
    let mut parser = lexopt::Parser::from_env();
    let command = match parser.next()? {
        Some(Value(v)) => v.string()?,
        Some(Long("help") | Short('h')) | None => {
            println!("{USAGE}");
            return Ok(ExitCode::SUCCESS);
        }
        Some(Long("version")) => "version".into(),
        Some(other) => return Err(other.unexpected()),
    };
    let mut root = PathBuf::from("/");
    let mut cmdline = None;
    let mut config = None;
    let mut modules_dir = None;
    let mut load = false;
    let mut json = false;
    let mut iface = None;
    let mut timeout = 10u64;
    let mut count = 1u32;
    let mut seconds = None;
    while let Some(arg) = parser.next()? {
        match arg {
            Long("root") => root = parser.value()?.into(),
            Long("cmdline") => cmdline = Some(parser.value()?.string()?),
            Long("config") => config = Some(PathBuf::from(parser.value()?)),
            Long("modules") => modules_dir = Some(PathBuf::from(parser.value()?)),
            Long("load-modules") | Long("load") => load = true,
            Long("json") => json = true,
            Long("iface") => iface = Some(parser.value()?.string()?),
            Long("timeout") => timeout = parser.value()?.parse()?,
            Long("count") => count = parser.value()?.parse()?,
            Long("seconds") => seconds = Some(parser.value()?.parse()?),
            _ => return Err(arg.unexpected()),
        }
    }
    // A swarm's thousand clients would drown the console at info.
    let default_log = if command == "swarm" { "warn" } else { "info" };
    logging::init(&std::env::var("SHOAL_LOG").unwrap_or_else(|_| default_log.into()));
    let ctx = Context {
        root: root.clone(),
        modules_dir,
        load_modules: load,
        once: true,
    };
    match command.as_str() {
        "version" => println!("shoal-agent {}", env!("CARGO_PKG_VERSION")),
        "inventory" => {
            let inv = inventory::collect(&root);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&inv).expect("inventory serialises")
                );
            } else {
                print!("{}", inventory::summary(&inv));
            }
        }
        "modules" => agent::load_modules(&ctx),
        "dhcp" => {
            let iface = iface.ok_or("dhcp needs --iface NAME")?;
            return Ok(ExitCode::from(
                net::dhcp_command(&iface, Duration::from_secs(timeout)) as u8,
            ));
        }
        "run" => {
            let cmdline = match cmdline {
                Some(c) => c,
                None => std::fs::read_to_string(root.join("proc/cmdline")).unwrap_or_default(),
            };
            let text = config
                .as_ref()
                .map(|p| (p.display().to_string(), std::fs::read_to_string(p)));
            let file = match &text {
                Some((p, Ok(t))) => Some((p.as_str(), t.as_str())),
                Some((p, Err(e))) => {
                    log::warn!("config file {p}: {e}; ignored");
                    None
                }
                None => None,
            };
            let (mut settings, warnings) = Settings::load(file, &cmdline);
            for w in &warnings {
                log::warn!("{w}");
            }
            if iface.is_some() {
                settings.iface = iface;
            }
            let state = agent::run(&ctx, &settings);
            log::info!("{}", state.ready_line());
            match ClientConfig::from_settings(&settings, state.inventory.clone()) {
                Ok(None) => {}
                Ok(Some(cfg)) => {
                    // Returns only if the power hook does (it exits).
                    control::run(cfg, LocalHooks { root, pid1: false });
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => {
                    log::error!("{e}; not connecting to the controller");
                    if let Some(r) = state.renewer {
                        r.stop();
                    }
                    return Ok(ExitCode::FAILURE);
                }
            }
            let ok = state.lease.is_some() || settings.net == net::NetMode::Off;
            if let Some(r) = state.renewer {
                r.stop();
            }
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        "swarm" => {
            let cmdline = cmdline.ok_or("swarm needs --cmdline \"shoal.controller=... shoal.controller_key=... shoal.enrol_key=...\"")?;
            return Ok(ExitCode::from(control::swarm::run(
                count, &cmdline, seconds,
            )));
        }
        other => return Err(format!("unknown command {other:?}").into()),
    }
    Ok(ExitCode::SUCCESS)
}
