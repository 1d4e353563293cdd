//! `shoal-agent swarm`: many control clients in one process, to measure how
//! many agents one Controller holds (say at 1 s heartbeats).
//!
//! Each client is a thread running the same client code as a real agent,
//! with a synthetic identity (SMBIOS UUID `00000000-0000-4000-8000-<index in
//! 12 hex digits>`, MAC `02:00:00:xx:xx:xx` from the index) and a tiny
//! synthetic inventory. A power step stops only the client that got it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{error, info, warn};
use shoal_protocol::inventory::{Cpus, MacAddr, Nic, System};
use shoal_protocol::Inventory;

use super::{ClientConfig, Hooks, Stats};
use crate::settings::{PowerAction, Settings};

/// A client thread's stack: the handshake and messages need little.
const STACK: usize = 256 * 1024;
/// Between client starts, so a thousand do not connect in the same instant.
const STAGGER: Duration = Duration::from_millis(1);

/// The synthetic inventory of client `index`.
pub fn inventory(index: u32) -> Inventory {
    let [_, a, b, c] = index.to_be_bytes();
    Inventory {
        system: System {
            vendor: Some("Shoal".into()),
            product: Some("swarm client".into()),
            serial: Some(format!("swarm-{index}")),
            uuid: Some(format!("00000000-0000-4000-8000-{index:012x}")),
        },
        cpus: Cpus {
            count: 1,
            model: Some("synthetic".into()),
            aes: false,
        },
        memory_bytes: Some(1 << 30),
        nics: vec![Nic {
            name: "eth0".into(),
            mac: MacAddr([0x02, 0, 0, a, b, c]),
            driver: Some("swarm".into()),
            carrier: Some(true),
            speed_mbps: Some(1000),
        }],
        disks: Vec::new(),
    }
}

struct SwarmHooks {
    index: u32,
}

impl Hooks for SwarmHooks {
    fn inventory(&self) -> Inventory {
        inventory(self.index)
    }

    fn power(&self, action: PowerAction) {
        info!("swarm {}: would {action}; this client stops", self.index);
    }
}

/// `swarm: N clients, M registered, H heartbeats sent, R reconnects`.
pub fn report(clients: usize, stats: &Stats) -> String {
    format!(
        "swarm: {clients} clients, {} registered, {} heartbeats sent, {} reconnects",
        stats.registered.load(Ordering::Relaxed),
        stats.heartbeats.load(Ordering::Relaxed),
        stats.reconnects.load(Ordering::Relaxed)
    )
}

/// Runs `count` clients for `seconds` (or forever, reporting every 10 s);
/// returns the exit status.
pub fn run(count: u32, cmdline: &str, seconds: Option<u64>) -> u8 {
    let (settings, warnings) = Settings::load(None, cmdline);
    for w in &warnings {
        warn!("{w}");
    }
    let base = match ClientConfig::from_settings(&settings, Inventory::default()) {
        Ok(Some(c)) => c,
        Ok(None) => {
            error!("swarm: --cmdline has no shoal.controller=HOST:PORT");
            return 2;
        }
        Err(e) => {
            error!("swarm: {e}");
            return 2;
        }
    };
    raise_file_limit(u64::from(count) + 64);
    let stats = Arc::new(Stats::default());
    let mut started = 0usize;
    for index in 0..count {
        let cfg = ClientConfig {
            inventory: inventory(index),
            stats: stats.clone(),
            name: Some(format!("swarm {index}")),
            ..base.clone()
        };
        let spawned = thread::Builder::new()
            .name(format!("swarm-{index}"))
            .stack_size(STACK)
            .spawn(move || super::run(cfg, SwarmHooks { index }));
        match spawned {
            Ok(_) => started += 1,
            Err(e) => {
                error!("swarm: cannot start client {index}: {e}; going on with {started}");
                break;
            }
        }
        thread::sleep(STAGGER);
    }
    match seconds {
        Some(s) => {
            thread::sleep(Duration::from_secs(s));
            println!("{}", report(started, &stats));
        }
        None => loop {
            thread::sleep(Duration::from_secs(10));
            println!("{}", report(started, &stats));
        },
    }
    0
}

/// Each client holds one socket: lift the soft open-file limit to the hard one.
fn raise_file_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= want {
        return;
    }
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        warn!("swarm: cannot raise the open-file limit from {soft}: {e}");
    } else if hard < want {
        warn!("swarm: the open-file limit is {hard}; clients beyond that cannot connect");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn synthetic_identities() {
        let inv = super::inventory(0x01_02_03);
        assert_eq!(
            inv.system.uuid.as_deref(),
            Some("00000000-0000-4000-8000-000000010203")
        );
        assert_eq!(inv.nics[0].mac.to_string(), "02:00:00:01:02:03");
        assert_ne!(
            super::inventory(1).nics[0].mac,
            super::inventory(2).nics[0].mac
        );
    }
}
